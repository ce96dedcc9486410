//! The device: a PCI function behaving as the kernel's mtty sample does (facts read from
//! `samples/vfio-mdev/mtty.c`; this is an independent model, not its code): a 255-byte
//! configuration region, one 8-byte I/O BAR per 16550-like port whose transmitter loops bytes
//! back into a 16-byte receive FIFO, INTx that masks itself on every trigger, and migration
//! state made of the ports' registers and FIFOs.

use crate::Errno;

pub const VENDOR: u16 = 0x4348;
pub const DEVICE: u16 = 0x3253;
pub const CONFIG_SIZE: usize = 0xff;
pub const BAR_SIZE: u64 = 8;
const FIFO: usize = 16;

// Register offsets and bits of a 16550 (as Linux's serial_reg.h names them).
const RX: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;
const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;
const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const FCR_ENABLE_FIFO: u8 = 0x01;
const FCR_CLEAR_RCVR: u8 = 0x02;
const FCR_CLEAR_XMIT: u8 = 0x04;
const LCR_DLAB: u8 = 0x80;
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT2: u8 = 0x08;
const MCR_AFE: u8 = 0x20;
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_DCD: u8 = 0x80;

/// One UART. `trigger` starts at 0, so no receive interrupt comes before the guest writes
/// FCR (as in mtty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port {
    pub reg: [u8; 8],
    pub fifo: [u8; FIFO],
    pub head: u8,
    pub tail: u8,
    pub count: u8,
    pub dlab: bool,
    pub overrun: bool,
    pub divisor: u16,
    pub fcr: u8,
    pub max_fifo: u8,
    pub trigger: u8,
}

/// Serialized size of one port in the migration stream.
pub const PORT_BYTES: usize = 36;
/// Stream header: magic, major, minor, number of ports, flags.
pub const HEADER_BYTES: usize = 24;
/// This model's own stream magic (the stream is opaque to the VMM; only the model reads it).
const MAGIC: u64 = 0x6c65_646f_6d6f_6676;
const MAJOR: u32 = 1;
const MINOR: u32 = 0;

impl Port {
    fn new() -> Port {
        Port {
            max_fifo: FIFO as u8,
            ..Port::default()
        }
    }

    fn empty(&self) -> bool {
        self.head == self.tail
    }

    fn to_bytes(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.reg);
        out.extend_from_slice(&self.fifo);
        out.extend_from_slice(&[self.head, self.tail, self.count]);
        out.extend_from_slice(&[self.dlab as u8, self.overrun as u8]);
        out.extend_from_slice(&self.divisor.to_le_bytes());
        out.extend_from_slice(&[self.fcr, self.max_fifo, self.trigger]);
        out.resize(start + PORT_BYTES, 0);
    }

    fn from_bytes(b: &[u8]) -> Option<Port> {
        let b = b.get(..PORT_BYTES)?;
        let mut p = Port::new();
        p.reg.copy_from_slice(&b[0..8]);
        p.fifo.copy_from_slice(&b[8..24]);
        let mask = FIFO as u8 - 1;
        (p.head, p.tail, p.count) = (b[24] & mask, b[25] & mask, b[26].min(FIFO as u8));
        (p.dlab, p.overrun) = (b[27] != 0, b[28] != 0);
        p.divisor = u16::from_le_bytes([b[29], b[30]]);
        (p.fcr, p.max_fifo, p.trigger) = (b[31], b[32].clamp(1, FIFO as u8), b[33]);
        Some(p)
    }
}

/// What an access asks of the interrupt line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub trigger: bool,
}

/// The function's registers and ports (no interrupt or migration plumbing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mtty {
    pub config: [u8; CONFIG_SIZE],
    pub ports: Vec<Port>,
}

impl Mtty {
    pub fn new(nr_ports: usize) -> Mtty {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..2].copy_from_slice(&VENDOR.to_le_bytes());
        c[2..4].copy_from_slice(&DEVICE.to_le_bytes());
        // Command: I/O decoding on; status: fast back-to-back (no capability list).
        c[4] = 0x01;
        c[6..8].copy_from_slice(&0x0200u16.to_le_bytes());
        // Revision 0x10; class 07/00/02: a 16550-compatible serial controller.
        (c[8], c[9], c[0xa], c[0xb]) = (0x10, 0x02, 0x00, 0x07);
        c[0x10] = 0x01; // BAR0: I/O
        if nr_ports == 2 {
            c[0x14] = 0x01; // BAR1: I/O
        }
        c[0x2c..0x2e].copy_from_slice(&VENDOR.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&DEVICE.to_le_bytes());
        c[0x3d] = 0x01; // INTA#
        // Vendor-specific bytes, and a readable tag the guest can check.
        (c[0x40], c[0x43], c[0x44], c[0x48], c[0x4c]) = (0x23, 0x80, 0x23, 0x23, 0x23);
        c[0x60..0x6f].copy_from_slice(b"PCI Serial/UART");
        Mtty {
            config: c,
            ports: (0..nr_ports).map(|_| Port::new()).collect(),
        }
    }

    pub fn bar_size(&self, index: u32) -> u64 {
        match index as usize {
            i if i < self.ports.len() => BAR_SIZE,
            _ => 0,
        }
    }

    /// A configuration-space read of `buf.len()` bytes at `offset` (already bounds-checked).
    pub fn config_read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.config[offset..offset + buf.len()]);
    }

    /// A configuration-space write, as mtty treats it: only the interrupt line and the BARs
    /// take values; everything else (command and status included) is ignored.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) {
        match offset {
            0x3c => self.config[0x3c] = data[0],
            0x10 | 0x14 => {
                let index = (offset - 0x10) / 4;
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                let mut addr = u32::from_le_bytes(v);
                if index >= self.ports.len() {
                    addr = 0;
                } else {
                    if addr == u32::MAX {
                        addr &= !(BAR_SIZE as u32 - 1);
                    }
                    addr |= u32::from(self.config[offset] & 3);
                }
                self.config[offset..offset + 4].copy_from_slice(&addr.to_le_bytes());
            }
            0x18 | 0x1c | 0x20 => self.config[offset..offset + 4].fill(0),
            _ => {}
        }
    }

    /// A byte read of UART register `offset` of port `index`.
    pub fn bar_read(&mut self, index: usize, offset: u64) -> (u8, Effects) {
        let mut fx = Effects::default();
        let p = &mut self.ports[index];
        let v = match offset {
            RX if p.dlab => p.divisor as u8,
            RX => {
                let mut v = 0;
                if !p.empty() {
                    v = p.fifo[p.tail as usize];
                    p.count = p.count.saturating_sub(1);
                    p.tail = (p.tail + 1) % FIFO as u8;
                }
                if p.empty() && p.reg[IER as usize] & IER_THRI != 0 {
                    fx.trigger = true;
                }
                v
            }
            IER if p.dlab => (p.divisor >> 8) as u8,
            IER => p.reg[IER as usize] & 0x0f,
            IIR => {
                let ier = p.reg[IER as usize];
                let mut v = 0;
                if ier & IER_RLSI != 0 && p.overrun {
                    v |= IIR_RLSI;
                }
                if ier & IER_RDI != 0 && p.count >= p.trigger {
                    v |= IIR_RDI;
                }
                if ier & IER_THRI != 0 && p.empty() {
                    v |= IIR_THRI;
                }
                if ier & IER_MSI != 0 && p.reg[MCR as usize] & (MCR_RTS | MCR_DTR) != 0 {
                    v |= IIR_MSI;
                }
                if v == 0 {
                    v = IIR_NO_INT;
                }
                v | 0xc0
            }
            LCR | MCR | SCR => p.reg[offset as usize],
            LSR => {
                let mut v = 0;
                if !p.empty() {
                    v |= LSR_DR;
                }
                if p.overrun {
                    v |= LSR_OE;
                }
                if p.empty() {
                    v |= LSR_TEMT | LSR_THRE;
                }
                v
            }
            MSR => {
                let mut v = MSR_DSR | MSR_DDSR | MSR_DCD;
                if p.reg[MCR as usize] & MCR_AFE == 0 || p.count < p.max_fifo {
                    v |= MSR_CTS | MSR_DCTS;
                }
                v
            }
            _ => 0,
        };
        (v, fx)
    }

    /// A byte write of UART register `offset` of port `index`.
    pub fn bar_write(&mut self, index: usize, offset: u64, v: u8) -> Effects {
        let mut fx = Effects::default();
        let p = &mut self.ports[index];
        match offset {
            RX if p.dlab => p.divisor |= u16::from(v),
            RX => {
                if p.count < p.max_fifo {
                    p.fifo[p.head as usize] = v;
                    p.count += 1;
                    p.head = (p.head + 1) % FIFO as u8;
                    p.overrun = false;
                    if p.reg[IER as usize] & IER_RDI != 0 && p.count == p.trigger {
                        fx.trigger = true;
                    }
                } else {
                    p.overrun = true;
                    if p.reg[IER as usize] & IER_RLSI != 0 {
                        fx.trigger = true;
                    }
                }
            }
            IER if p.dlab => p.divisor |= u16::from(v) << 8,
            IER => {
                p.reg[IER as usize] = v;
                if v & IER_THRI != 0 && p.empty() {
                    fx.trigger = true;
                }
            }
            // Offset 2 is FCR on writes.
            IIR => {
                p.fcr = v;
                if v & (FCR_CLEAR_RCVR | FCR_CLEAR_XMIT) != 0 {
                    (p.count, p.head, p.tail) = (0, 0, 0);
                }
                // mtty always ends at trigger level 1, whatever FCR's trigger bits say.
                p.trigger = 1;
                p.max_fifo = if v & FCR_ENABLE_FIFO != 0 {
                    FIFO as u8
                } else {
                    1
                };
            }
            LCR => {
                p.dlab = v & LCR_DLAB != 0;
                if p.dlab {
                    p.divisor = 0;
                }
                p.reg[LCR as usize] = v;
            }
            MCR => {
                p.reg[MCR as usize] = v;
                let msi = p.reg[IER as usize] & IER_MSI != 0;
                if msi && (v & MCR_OUT2 != 0 || v & (MCR_RTS | MCR_DTR) != 0) {
                    fx.trigger = true;
                }
            }
            SCR => p.reg[SCR as usize] = v,
            _ => {}
        }
        fx
    }

    /// Bytes a complete stream for this device has.
    pub fn data_size(&self) -> usize {
        HEADER_BYTES + self.ports.len() * PORT_BYTES
    }

    pub fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(self.data_size());
        h.extend_from_slice(&MAGIC.to_le_bytes());
        h.extend_from_slice(&MAJOR.to_le_bytes());
        h.extend_from_slice(&MINOR.to_le_bytes());
        h.extend_from_slice(&(self.ports.len() as u32).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    }

    pub fn save_ports(&self, out: &mut Vec<u8>) {
        for p in &self.ports {
            p.to_bytes(out);
        }
    }

    /// Whether `h` is a header this device accepts (same format, same number of ports).
    pub fn header_ok(&self, h: &[u8]) -> bool {
        h.len() >= HEADER_BYTES && h[..HEADER_BYTES] == self.header()[..]
    }

    /// Loads a complete stream; EINVAL when it is short or its header does not fit.
    pub fn load(&mut self, data: &[u8]) -> Result<(), Errno> {
        if data.len() < self.data_size() || !self.header_ok(data) {
            return Err(Errno::INVAL);
        }
        let ports = (0..self.ports.len())
            .map(|i| Port::from_bytes(&data[HEADER_BYTES + i * PORT_BYTES..]))
            .collect::<Option<Vec<_>>>()
            .ok_or(Errno::INVAL)?;
        self.ports = ports;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_mttys() {
        let m = Mtty::new(2);
        assert_eq!(&m.config[0..4], &[0x48, 0x43, 0x53, 0x32]);
        assert_eq!(m.config[0x3d], 1);
        assert_eq!((m.config[0x10], m.config[0x14]), (1, 1));
        assert_eq!(Mtty::new(1).config[0x14], 0);
        let mut m = Mtty::new(2);
        m.config_write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(&m.config[0x10..0x14], &0xffff_fff9u32.to_le_bytes());
        m.config_write(0x04, &[0x07, 0]);
        assert_eq!(m.config[4], 1, "command writes are ignored");
        m.config_write(0x3c, &[17]);
        assert_eq!(m.config[0x3c], 17);
    }

    #[test]
    fn fifo_loops_back_and_interrupts_at_trigger_level() {
        let mut m = Mtty::new(2);
        m.bar_write(0, IER, IER_RDI);
        assert!(
            !m.bar_write(0, RX, 1).trigger,
            "no FCR yet: trigger level 0"
        );
        m.bar_write(0, IIR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR);
        assert_eq!(m.bar_read(0, LSR).0 & LSR_DR, 0);
        assert!(m.bar_write(0, RX, b'a').trigger);
        assert!(!m.bar_write(0, RX, b'b').trigger);
        assert_eq!(m.bar_read(0, IIR).0, 0xc0 | IIR_RDI);
        assert_eq!(m.bar_read(0, LSR).0 & LSR_DR, LSR_DR);
        assert_eq!(m.bar_read(0, RX).0, b'a');
        assert_eq!(m.bar_read(0, RX).0, b'b');
        assert_eq!(m.bar_read(0, LSR).0, LSR_TEMT | LSR_THRE);
        for i in 0..17 {
            m.bar_write(1, RX, i);
        }
        assert_eq!(m.bar_read(1, LSR).0 & LSR_OE, LSR_OE, "17th byte overruns");
        m.bar_write(1, SCR, 0x5a);
        assert_eq!(m.bar_read(1, SCR).0, 0x5a);
    }

    #[test]
    fn state_round_trips_and_checks_its_header() {
        let mut a = Mtty::new(2);
        a.bar_write(0, IIR, FCR_ENABLE_FIFO);
        for b in b"hello" {
            a.bar_write(0, RX, *b);
        }
        a.bar_write(1, SCR, 0xa5);
        let mut s = a.header();
        a.save_ports(&mut s);
        assert_eq!(s.len(), a.data_size());
        let mut b = Mtty::new(2);
        b.load(&s).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.load(&s[..s.len() - 1]), Err(Errno::INVAL));
        assert_eq!(
            Mtty::new(1).load(&s),
            Err(Errno::INVAL),
            "port count differs"
        );
    }
}
