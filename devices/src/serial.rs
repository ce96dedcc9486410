//! The guest console: a 16550A UART at COM1 (vm-superio's model), whose interrupt is an eventfd
//! the VMM registers as an irqfd, whose output goes to a sink the VMM picks, and whose registers
//! and receive FIFO migrate with the VM.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use migration::state::{Persist, StateError};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, SerialEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's port range and ISA interrupt line (the GSI its irqfd is registered for).
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Depth of the receive FIFO of vm-superio's 16550A (private there, so a test pins it).
pub const FIFO_SIZE: usize = 64;

const ID: &str = "serial0";

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial output file {path}: {source}")]
    OpenOutput { path: PathBuf, source: io::Error },
}

/// Where the guest's console output goes; the VMM turns its command line into one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    /// Appended to, so several runs (or a source and a destination) can share one log.
    File(PathBuf),
    Null,
}

impl SerialOutput {
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialError> {
        Ok(match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::Null => Box::new(io::sink()),
            SerialOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SerialError::OpenOutput {
                        path: path.clone(),
                        source,
                    })?,
            ),
        })
    }
}

/// Plain-data mirror of vm-superio's `SerialState`, which has no serde support.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes the guest has not read yet, oldest first.
    pub rx_fifo: Vec<u8>,
}

impl From<UartState> for SerialState {
    fn from(s: UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        }
    }
}

/// Shared (`Arc`) so that a restore can hand the very same eventfd to the rebuilt UART without a
/// fallible `dup`.
#[derive(Clone)]
struct IrqTrigger(Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the VMM that the guest drained the receive FIFO, so it can feed the stdin bytes that did
/// not fit before.
#[derive(Clone)]
struct RxEvents(Option<Arc<EventFd>>);

impl SerialEvents for RxEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0
            && let Err(e) = evt.write(1)
        {
            log::warn!("serial: cannot signal rx-ready: {e}");
        }
    }
}

/// The output sink, shared so that a restore that fails halfway still has it.
#[derive(Clone)]
struct Sink(Arc<Mutex<Box<dyn Write + Send>>>);

impl Sink {
    fn lock(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock().flush()
    }
}

type Uart = Serial<IrqTrigger, RxEvents, Sink>;

/// COM1 as a bus device. vm-superio writes and flushes each transmitted byte at once, so a
/// reader of the sink sees every heartbeat line as soon as the guest sends its newline.
pub struct SerialDevice {
    uart: Uart,
    interrupt: IrqTrigger,
    events: RxEvents,
    out: Sink,
    // Counted so a dead sink (e.g. a closed pipe) warns once instead of once per byte.
    tx_errors: u64,
    irq_errors: u64,
}

impl SerialDevice {
    /// `interrupt` is signalled whenever the UART raises its interrupt line; register it as an
    /// irqfd for [`COM1_GSI`].
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self::build(interrupt, None, out)
    }

    /// Like [`SerialDevice::new`], and also signals `rx_ready` each time the guest empties the
    /// receive FIFO, so the VMM can resume feeding input that [`Self::enqueue_input`] refused.
    pub fn with_rx_ready(
        interrupt: EventFd,
        rx_ready: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self::build(interrupt, Some(rx_ready), out)
    }

    fn build(interrupt: EventFd, rx_ready: Option<EventFd>, out: Box<dyn Write + Send>) -> Self {
        let interrupt = IrqTrigger(Arc::new(interrupt));
        let events = RxEvents(rx_ready.map(Arc::new));
        let out = Sink(Arc::new(Mutex::new(out)));
        SerialDevice {
            uart: Serial::with_events(interrupt.clone(), events.clone(), out.clone()),
            interrupt,
            events,
            out,
            tx_errors: 0,
            irq_errors: 0,
        }
    }

    pub fn interrupt_evt(&self) -> &EventFd {
        &self.interrupt.0
    }

    pub fn rx_ready_evt(&self) -> Option<&EventFd> {
        self.events.0.as_deref()
    }

    /// Free room in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues input for the guest (e.g. bytes read from stdin) and raises the receive interrupt
    /// if the guest enabled it. Returns how many leading bytes of `bytes` fit in the FIFO; the
    /// caller keeps the rest until `rx_ready` fires or room appears.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // vm-superio queues before it triggers, so on a trigger error the bytes are in anyway.
        let fits = bytes.len().min(self.uart.fifo_capacity());
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(UartError::FullFifo) => 0,
            Err(UartError::Trigger(e)) => {
                self.irq_error(&e);
                fits
            }
            Err(UartError::IOError(e)) => {
                log::warn!("serial: unexpected error while queueing input: {e}");
                0
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        match u8::try_from(offset) {
            Ok(reg) if offset < COM1_LEN => self.uart.read(reg),
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        let Ok(reg) = u8::try_from(offset) else {
            return;
        };
        if offset >= COM1_LEN {
            return;
        }
        match self.uart.write(reg, value) {
            Ok(()) => {}
            Err(UartError::IOError(e)) => {
                self.tx_errors += 1;
                if self.tx_errors == 1 {
                    log::warn!("serial: output lost (further losses are not logged): {e}");
                }
            }
            Err(UartError::Trigger(e)) => self.irq_error(&e),
            Err(UartError::FullFifo) => {}
        }
    }

    fn irq_error(&mut self, e: &io::Error) {
        self.irq_errors += 1;
        if self.irq_errors == 1 {
            log::warn!("serial: cannot raise interrupt (further failures are not logged): {e}");
        }
    }
}

fn incompatible(reason: String) -> StateError {
    StateError::Incompatible {
        id: ID.to_string(),
        reason,
    }
}

/// A wider access touches consecutive byte registers, as it does on an ISA bus.
impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in (0u64..).zip(data.iter_mut()) {
            *b = self.read_reg(offset.saturating_add(i));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in (0u64..).zip(data.iter()) {
            self.write_reg(offset.saturating_add(i), b);
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialState;
    const ID: &'static str = ID;

    fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Replaces the UART's registers and FIFO with `state`, keeping this device's sink, interrupt
    /// and rx-ready eventfds. An interrupt pending in `state` is raised again. On error the device
    /// is left as it was.
    fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        if state.rx_fifo.len() > FIFO_SIZE {
            return Err(incompatible(format!(
                "receive FIFO holds {} bytes, more than the {FIFO_SIZE} a 16550A has",
                state.rx_fifo.len()
            )));
        }
        self.uart = Serial::from_state(
            &state.into(),
            self.interrupt.clone(),
            self.events.clone(),
            self.out.clone(),
        )
        .map_err(|e| incompatible(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::state::{Migratable, encode};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const RBR_THR: u64 = 0;
    const DLL: u64 = 0;
    const DLM: u64 = 1;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const IIR_NONE: u8 = 0x01;
    const IIR_THRE: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;
    const IIR_FIFO: u8 = 0xc0;
    const LCR_DLAB: u8 = 0x80;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn evt() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn device() -> (SerialDevice, Capture) {
        let cap = Capture::default();
        (SerialDevice::new(evt(), Box::new(cap.clone())), cap)
    }

    fn rd(dev: &mut SerialDevice, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(off, &mut b);
        b[0]
    }

    fn wr(dev: &mut SerialDevice, off: u64, v: u8) {
        dev.write(off, &[v]);
    }

    /// How many times the eventfd fired since the last call (0 when it did not).
    fn fired(e: &EventFd) -> u64 {
        e.read().unwrap_or(0)
    }

    #[test]
    fn output_reaches_sink() {
        let (mut dev, cap) = device();
        for &b in b"HB 1\n" {
            wr(&mut dev, RBR_THR, b);
        }
        assert_eq!(cap.bytes(), b"HB 1\n");
    }

    /// Holds written bytes back until flushed, like a buffered stdout or file.
    #[derive(Clone, Default)]
    struct Buffered {
        pending: Arc<Mutex<Vec<u8>>>,
        visible: Capture,
    }

    impl Write for Buffered {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.pending.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let bytes = std::mem::take(&mut *self.pending.lock().unwrap());
            self.visible.write(&bytes).map(|_| ())
        }
    }

    #[test]
    fn every_byte_is_flushed_at_once() {
        let out = Buffered::default();
        let mut dev = SerialDevice::new(evt(), Box::new(out.clone()));
        wr(&mut dev, RBR_THR, b'H');
        assert_eq!(out.visible.bytes(), b"H");
        for &b in b"B 7\n" {
            wr(&mut dev, RBR_THR, b);
        }
        assert_eq!(out.visible.bytes(), b"HB 7\n");
    }

    #[test]
    fn broken_sink_does_not_stop_the_uart() {
        let mut dev = SerialDevice::new(evt(), Box::new(Broken));
        wr(&mut dev, RBR_THR, b'x');
        wr(&mut dev, RBR_THR, b'y');
        assert_eq!(dev.tx_errors, 2);
        assert_eq!(rd(&mut dev, LSR) & LSR_THRE, LSR_THRE);
    }

    #[test]
    fn lsr_reports_empty_transmitter_and_data_ready() {
        let (mut dev, _) = device();
        assert_eq!(rd(&mut dev, LSR), LSR_THRE | LSR_TEMT);
        wr(&mut dev, RBR_THR, b'a');
        // The model transmits instantly, so the holding register is empty again right away.
        assert_eq!(rd(&mut dev, LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(dev.enqueue_input(b"z"), 1);
        assert_eq!(rd(&mut dev, LSR), LSR_THRE | LSR_TEMT | LSR_DR);
        assert_eq!(rd(&mut dev, RBR_THR), b'z');
        assert_eq!(rd(&mut dev, LSR) & LSR_DR, 0);
    }

    #[test]
    fn thr_empty_interrupt_fires_only_when_enabled() {
        let (mut dev, _) = device();
        wr(&mut dev, RBR_THR, b'a');
        assert_eq!(fired(dev.interrupt_evt()), 0);
        assert_eq!(rd(&mut dev, IIR), IIR_NONE | IIR_FIFO);

        // Enabling THRE raises it at once: the holding register is already empty.
        wr(&mut dev, IER, IER_THRE);
        assert_eq!(fired(dev.interrupt_evt()), 1);
        // Reading IIR acknowledges it; the next transmitted byte raises it again.
        assert_eq!(rd(&mut dev, IIR), IIR_THRE | IIR_FIFO);
        assert_eq!(rd(&mut dev, IIR), IIR_NONE | IIR_FIFO);
        wr(&mut dev, RBR_THR, b'b');
        assert_eq!(fired(dev.interrupt_evt()), 1);
        assert_eq!(rd(&mut dev, IIR), IIR_THRE | IIR_FIFO);
    }

    #[test]
    fn input_respects_fifo_and_reads_back_in_order() {
        let rx_ready = evt();
        let mut dev =
            SerialDevice::with_rx_ready(evt(), rx_ready.try_clone().unwrap(), Box::new(io::sink()));
        assert_eq!(dev.fifo_capacity(), FIFO_SIZE);
        wr(&mut dev, IER, IER_RDA);
        assert_eq!(fired(dev.interrupt_evt()), 0);

        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(dev.enqueue_input(&input), FIFO_SIZE);
        assert_eq!(fired(dev.interrupt_evt()), 1);
        assert_eq!(dev.fifo_capacity(), 0);
        assert_eq!(dev.enqueue_input(&input[FIFO_SIZE..]), 0);
        assert_eq!(dev.enqueue_input(&[]), 0);

        assert_eq!(rd(&mut dev, IIR), IIR_RDA | IIR_FIFO);
        for &want in &input[..FIFO_SIZE] {
            assert_eq!(rd(&mut dev, LSR) & LSR_DR, LSR_DR);
            assert_eq!(rd(&mut dev, RBR_THR), want);
        }
        assert_eq!(rd(&mut dev, LSR) & LSR_DR, 0);
        assert_eq!(fired(&rx_ready), 1);
        assert_eq!(dev.enqueue_input(&input[FIFO_SIZE..]), 100 - FIFO_SIZE);
    }

    #[test]
    fn state_round_trip_keeps_registers_and_fifo() {
        let (mut src, _) = device();
        wr(&mut src, LCR, LCR_DLAB | 0x03);
        wr(&mut src, DLL, 0x01);
        wr(&mut src, DLM, 0x02);
        wr(&mut src, LCR, 0x1b);
        wr(&mut src, MCR, 0x0b);
        wr(&mut src, SCR, 0x5a);
        wr(&mut src, IER, IER_RDA);
        assert_eq!(src.enqueue_input(b"abc"), 3);
        let saved = src.state();
        assert_eq!(saved.rx_fifo, b"abc");

        let bytes = src.save_state().unwrap();
        let cap = Capture::default();
        let mut dst = SerialDevice::new(evt(), Box::new(cap.clone()));
        dst.restore_state(&bytes).unwrap();
        assert_eq!(dst.state(), saved);
        // The receive interrupt the guest had not handled yet is raised again on this side.
        assert_eq!(fired(dst.interrupt_evt()), 1);

        assert_eq!(rd(&mut dst, LCR), 0x1b);
        assert_eq!(rd(&mut dst, MCR), 0x0b);
        assert_eq!(rd(&mut dst, SCR), 0x5a);
        assert_eq!(rd(&mut dst, IER), IER_RDA);
        wr(&mut dst, LCR, LCR_DLAB | 0x1b);
        assert_eq!((rd(&mut dst, DLL), rd(&mut dst, DLM)), (0x01, 0x02));
        wr(&mut dst, LCR, 0x1b);
        assert_eq!(rd(&mut dst, RBR_THR), b'a');
        assert_eq!(rd(&mut dst, RBR_THR), b'b');
        assert_eq!(rd(&mut dst, RBR_THR), b'c');
        assert_eq!(rd(&mut dst, LSR) & LSR_DR, 0);
        // The restored UART still writes to the destination's own sink.
        wr(&mut dst, RBR_THR, b'!');
        assert_eq!(cap.bytes(), b"!");
    }

    #[test]
    fn oversized_fifo_is_refused_and_device_unchanged() {
        let (mut dev, _) = device();
        wr(&mut dev, SCR, 7);
        let mut bad = dev.state();
        bad.rx_fifo = vec![0; FIFO_SIZE + 1];
        assert!(matches!(
            dev.restore_state(&encode(&bad).unwrap()),
            Err(StateError::Incompatible { .. })
        ));
        assert_eq!(rd(&mut dev, SCR), 7);
        assert!(dev.restore_state(&[1, 2]).is_err());
    }

    #[test]
    fn wide_access_touches_consecutive_registers() {
        let (mut dev, _) = device();
        dev.write(SCR, &[0x11, 0x22]);
        let mut b = [0u8; 2];
        dev.read(LSR, &mut b);
        // LSR, then MSR with its default DCD|DSR|CTS.
        assert_eq!(b, [LSR_THRE | LSR_TEMT, 0xb0]);
        dev.read(SCR, &mut b);
        assert_eq!(b, [0x11, 0xff]);
    }

    #[test]
    fn file_output_appends() {
        let path = std::env::temp_dir().join(format!("minivmm-serial-{}.log", std::process::id()));
        std::fs::write(&path, b"old\n").unwrap();
        let out = SerialOutput::File(path.clone()).open().unwrap();
        let mut dev = SerialDevice::new(evt(), out);
        for &b in b"new\n" {
            wr(&mut dev, RBR_THR, b);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            SerialOutput::File(path.join("nope")).open(),
            Err(SerialError::OpenOutput { .. })
        ));
    }
}
