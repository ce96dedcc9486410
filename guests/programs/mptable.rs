//! Reads the Intel MP configuration table that minivmm (like a BIOS) leaves in low memory.
//!
//! Included with `mod mptable;` by the guests that need to know how many CPUs there are.
#![allow(dead_code)]

fn low_u8(addr: u64) -> u8 {
    // SAFETY: below 1 MiB, identity-mapped; only read, and only where minivmm put BIOS data
    // (the EBDA and the BIOS area) or RAM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn low_u16(addr: u64) -> u16 {
    low_u8(addr) as u16 | (low_u8(addr + 1) as u16) << 8
}

fn low_u32(addr: u64) -> u32 {
    low_u16(addr) as u32 | (low_u16(addr + 2) as u32) << 16
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(low_u8(addr + i))) == 0
}

fn has_signature(addr: u64, sig: &[u8; 4]) -> bool {
    (0..4).all(|i| low_u8(addr + i as u64) == sig[i])
}

/// The MP floating pointer: in the first KiB of the EBDA, where minivmm puts it (README), or
/// in the BIOS area as the MP spec also allows.
fn find_floating() -> Option<u64> {
    let areas = [(0x9_fc00u64, 0xa_0000u64), (0xf_0000, 0x10_0000)];
    for (start, end) in areas {
        let mut a = start;
        while a + 16 <= end {
            if has_signature(a, b"_MP_") {
                let len = low_u8(a + 8) as u64 * 16;
                if len >= 16 && checksum_ok(a, len) {
                    return Some(a);
                }
            }
            a += 16;
        }
    }
    None
}

/// Enabled processors in the MP table.
pub struct Processors {
    pub count: u32,
    /// Bit `id` set for every enabled processor's APIC id.
    pub ids: [u64; 4],
}

impl Processors {
    pub fn has(&self, id: u32) -> bool {
        id < 256 && self.ids[id as usize / 64] & (1 << (id % 64)) != 0
    }
}

/// The enabled processors listed in the MP configuration table.
pub fn processors() -> Result<Processors, &'static str> {
    let fp = find_floating().ok_or("no MP floating pointer")?;
    let table = low_u32(fp + 4) as u64;
    if table == 0 {
        return Err("MP default configurations are not supported");
    }
    if !has_signature(table, b"PCMP") {
        return Err("MP table has no PCMP signature");
    }
    let len = low_u16(table + 4) as u64;
    if !checksum_ok(table, len) {
        return Err("MP table checksum is wrong");
    }
    let entries = low_u16(table + 0x22);
    let mut at = table + 0x2c;
    let mut cpus = Processors {
        count: 0,
        ids: [0; 4],
    };
    for _ in 0..entries {
        if at >= table + len {
            return Err("MP table entries overrun its length");
        }
        match low_u8(at) {
            0 => {
                let id = low_u8(at + 1);
                if low_u8(at + 3) & 1 != 0 {
                    cpus.count += 1;
                    cpus.ids[id as usize / 64] |= 1 << (id % 64);
                }
                at += 20;
            }
            1..=4 => at += 8,
            _ => return Err("MP table has an unknown entry type"),
        }
    }
    Ok(cpus)
}
