//! Which KVM dirty-tracking mechanism is cheapest here? Measures the three on this host:
//!
//! - `get`: `KVM_GET_DIRTY_LOG` (fetch and clear in one ioctl; what minivmm uses);
//! - `manual`: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (enable + initially-set), `KVM_GET_DIRTY_LOG`
//!   then `KVM_CLEAR_DIRTY_LOG` over the bitmap it returned;
//! - `ring`: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, the vCPU's mmapped ring of dirty GFNs harvested
//!   into a bitmap, then `KVM_RESET_DIRTY_RINGS` (a full ring stops the vCPU with
//!   `KVM_EXIT_DIRTY_RING_FULL`, and is harvested there).
//!
//! A tiny 64-bit guest writes one word into each of N pages of a data slot (every
//! `stride` bytes), then `out 0x10` ends the pass; the host times each pass (time inside
//! `KVM_RUN`) and each collection (harvest + re-arm, which leaves the pages write-protected
//! again, so every write of the next pass faults, as in a migration's pre-copy). Per mechanism
//! and slot size: harvest+reset cost per collection with few and with all pages dirty, the
//! guest's write rate (pages/s) while logging is on and with logging off, the cost of turning
//! logging on, and of the first collection after it. Every collection is checked to hold
//! exactly the N pages the guest wrote. Prints one JSON document.
//!
//! `cargo run --release -p minivmm --example dirty_log_bench -- [--sizes 256M,1G] [--few 256]
//! [--passes 3] [--mechanisms get,manual,ring] [--ring-bytes 1M]` (scripts/bench-dirty-log).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET, KVM_EXIT_DIRTY_RING_FULL,
    KVM_MEM_LOG_DIRTY_PAGES, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn,
    kvm_enable_cap, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
// _IOWR, not _IOW: the kernel defines it so (an _IOW number gets ENOTTY).
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Missing from kvm-bindings (bindgen skips `_BITUL`).
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CODE_SLOT: u32 = 0;
const CODE_SIZE: u64 = 2 * MIB;
const DATA_SLOT: u32 = 1;
/// The data slot starts at 1 GiB, so that its page directory is its own.
const DATA_GPA: u64 = GIB;
const MAX_DATA: u64 = GIB;

const GDT_ADDR: u64 = 0x500;
const CODE_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD0_ADDR: u64 = 0xb000;
const PD1_ADDR: u64 = 0xc000;
const DONE_PORT: u16 = 0x10;

/// The guest, at `CODE_ADDR`, in 64-bit mode: rdi = first page, rsi = pages, rdx = stride,
/// rax = the value to write (incremented per pass).
const GUEST: [u8; 24] = [
    0x48, 0x89, 0xfb, // start: mov rbx, rdi
    0x48, 0x89, 0xf1, //        mov rcx, rsi
    0x48, 0x89, 0x03, // next:  mov [rbx], rax
    0x48, 0x01, 0xd3, //        add rbx, rdx
    0x48, 0xff, 0xc9, //        dec rcx
    0x75, 0xf5, //              jnz next
    0x48, 0xff, 0xc0, //        inc rax
    0xe6, 0x10, //              out 0x10, al
    0xeb, 0xe8, //              jmp start
];

type Res<T> = Result<T, String>;

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mechanism {
    Get,
    Manual,
    Ring,
}

impl Mechanism {
    fn name(self) -> &'static str {
        match self {
            Mechanism::Get => "get",
            Mechanism::Manual => "manual",
            Mechanism::Ring => "ring",
        }
    }

    fn parse(s: &str) -> Res<Self> {
        match s {
            "get" => Ok(Mechanism::Get),
            "manual" => Ok(Mechanism::Manual),
            "ring" => Ok(Mechanism::Ring),
            _ => Err(format!("unknown mechanism '{s}' (get, manual, ring)")),
        }
    }
}

struct Options {
    sizes: Vec<u64>,
    few: u64,
    passes: usize,
    mechanisms: Vec<Mechanism>,
    ring_bytes: u64,
}

fn parse_size(s: &str) -> Res<u64> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("bad size '{s}'"))
}

fn options() -> Res<Options> {
    let mut o = Options {
        sizes: vec![256 * MIB, GIB],
        few: 256,
        passes: 3,
        mechanisms: vec![Mechanism::Get, Mechanism::Manual, Mechanism::Ring],
        ring_bytes: MIB,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sizes" => o.sizes = value()?.split(',').map(parse_size).collect::<Res<_>>()?,
            "--few" => o.few = value()?.parse().map_err(|e| format!("--few: {e}"))?,
            "--passes" => o.passes = value()?.parse().map_err(|e| format!("--passes: {e}"))?,
            "--mechanisms" => {
                o.mechanisms = value()?
                    .split(',')
                    .map(Mechanism::parse)
                    .collect::<Res<_>>()?
            }
            "--ring-bytes" => o.ring_bytes = parse_size(&value()?)?,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if let Some(bad) = o
        .sizes
        .iter()
        .find(|&&s| s == 0 || s > MAX_DATA || s % (2 * MIB) != 0)
    {
        return Err(format!(
            "slot size {bad} must be a multiple of 2 MiB up to 1 GiB"
        ));
    }
    if o.few == 0 || o.passes == 0 {
        return Err("--few and --passes must be at least 1".into());
    }
    Ok(o)
}

/// A vCPU's dirty ring, mmapped from its fd.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    bytes: usize,
    /// The next entry to look at (the ring's fetch index).
    next: u32,
}

impl Ring {
    fn map(vcpu: &VcpuFd, bytes: u64) -> Res<Ring> {
        let offset = PAGE as i64 * i64::from(KVM_DIRTY_LOG_PAGE_OFFSET);
        // SAFETY: maps `bytes` of the vCPU fd at KVM's dirty-ring offset, shared, as the KVM
        // API documents; a fresh mapping aliases no Rust memory. Checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap dirty ring: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Ring {
            entries: ptr.cast(),
            count: (bytes / std::mem::size_of::<kvm_dirty_gfn>() as u64) as u32,
            bytes: bytes as usize,
            next: 0,
        })
    }

    /// Entry `i mod count`: its flags word (shared with KVM), its slot and its page offset.
    fn entry(&self, i: u32) -> (&AtomicU32, u32, u64) {
        // SAFETY: the index is reduced modulo the number of entries, so the pointer stays in
        // the mapping, which lives as long as `self`; entries are 16-byte aligned (the mapping
        // is page-aligned); AtomicU32 has u32's layout, and KVM and this thread access flags
        // only atomically (acquire/release, as the ACQ_REL protocol wants).
        unsafe {
            let e = self.entries.add((i % self.count) as usize);
            let flags = AtomicU32::from_ptr(&raw mut (*e).flags);
            let slot = (&raw const (*e).slot).read_volatile();
            let offset = (&raw const (*e).offset).read_volatile();
            (flags, slot, offset)
        }
    }

    /// Moves every dirty entry into `bitmap` (the data slot's pages) and marks it for reset;
    /// returns how many entries it took (entries for other slots are counted, not recorded).
    fn harvest(&mut self, bitmap: &mut [u64]) -> u32 {
        let mut n = 0;
        loop {
            let (flags, _, _) = self.entry(self.next);
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            let (flags, slot, offset) = self.entry(self.next);
            if slot & 0xffff == DATA_SLOT {
                bitmap[(offset / 64) as usize] |= 1 << (offset % 64);
            }
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers to it any more.
        unsafe { libc::munmap(self.entries.cast(), self.bytes) };
    }
}

/// One VM with the guest, a code slot and a data slot of `size` bytes.
struct Bench {
    mech: Mechanism,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    size: u64,
    ring: Option<Ring>,
    /// Harvests that found the ring completely full (see `collect_ring`).
    ring_overflows: u32,
}

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn page_of(entries: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    for (chunk, e) in page.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    page
}

impl Bench {
    fn new(kvm: &Kvm, mech: Mechanism, size: u64, ring_bytes: u64) -> Res<Bench> {
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        match mech {
            Mechanism::Get => {}
            Mechanism::Manual => vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [
                        u64::from(
                            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
                        ),
                        0,
                        0,
                        0,
                    ],
                    ..Default::default()
                })
                .map_err(kvm_err("enable MANUAL_DIRTY_LOG_PROTECT2"))?,
            // Before any vCPU exists, as the API requires.
            Mechanism::Ring => vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                    args: [ring_bytes, 0, 0, 0],
                    ..Default::default()
                })
                .map_err(kvm_err("enable DIRTY_LOG_RING_ACQ_REL"))?,
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), CODE_SIZE as usize),
            (GuestAddress(DATA_GPA), size as usize),
        ])
        .map_err(|e| format!("guest memory: {e}"))?;
        let mut b = Bench {
            mech,
            vcpu: vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?,
            vm,
            mem,
            size,
            ring: None,
            ring_overflows: 0,
        };
        if mech == Mechanism::Ring {
            b.ring = Some(Ring::map(&b.vcpu, ring_bytes)?);
        }
        b.set_slot(CODE_SLOT, false)?;
        b.set_slot(DATA_SLOT, false)?;
        b.write_guest()?;
        b.set_cpu()?;
        Ok(b)
    }

    fn set_slot(&self, slot: u32, log: bool) -> Res<()> {
        let (gpa, len) = if slot == CODE_SLOT {
            (0, CODE_SIZE)
        } else {
            (DATA_GPA, self.size)
        };
        let host = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| format!("host address: {e}"))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `len` bytes owned by `self.mem`, which outlives
        // the VM's use of it (the VM is dropped with `self`).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("set memory region"))
    }

    fn write_guest(&self) -> Res<()> {
        let w = |bytes: &[u8], at: u64| {
            self.mem
                .write_slice(bytes, GuestAddress(at))
                .map_err(|e| format!("write guest memory at {at:#x}: {e}"))
        };
        let gdt = [
            0,
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
        ];
        w(&page_of(gdt.into_iter())[..32], GDT_ADDR)?;
        const RW_PRESENT: u64 = 3;
        const HUGE: u64 = 1 << 7;
        w(&page_of(std::iter::once(PDPT_ADDR | RW_PRESENT)), PML4_ADDR)?;
        w(
            &page_of([PD0_ADDR | RW_PRESENT, PD1_ADDR | RW_PRESENT].into_iter()),
            PDPT_ADDR,
        )?;
        w(&page_of(std::iter::once(RW_PRESENT | HUGE)), PD0_ADDR)?;
        let data = (0..self.size / (2 * MIB)).map(|i| (DATA_GPA + i * 2 * MIB) | RW_PRESENT | HUGE);
        w(&page_of(data), PD1_ADDR)?;
        w(&GUEST, CODE_ADDR)
    }

    fn set_cpu(&self) -> Res<()> {
        let mut s = self.vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
        s.cs = segment(0x10, true);
        let d = segment(0x18, false);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
        s.gdt.base = GDT_ADDR;
        s.gdt.limit = 31;
        // PE | MP | ET | NE | WP | PG; PAE; LME | LMA.
        s.cr0 = 0x8001_0033;
        s.cr3 = PML4_ADDR;
        s.cr4 = 1 << 5;
        s.efer = (1 << 8) | (1 << 10);
        self.vcpu.set_sregs(&s).map_err(kvm_err("set sregs"))?;
        let mut r = self.vcpu.get_regs().map_err(kvm_err("get regs"))?;
        r.rip = CODE_ADDR;
        r.rflags = 2;
        r.rsp = 0x8000;
        r.rax = 1;
        self.vcpu.set_regs(&r).map_err(kvm_err("set regs"))
    }

    /// The next passes write `pages` pages spread evenly over the data slot.
    fn aim(&self, pages: u64) -> Res<()> {
        let slot_pages = self.size / PAGE;
        let stride = (slot_pages / pages).max(1) * PAGE;
        let mut r = self.vcpu.get_regs().map_err(kvm_err("get regs"))?;
        r.rdi = DATA_GPA;
        r.rsi = pages;
        r.rdx = stride;
        self.vcpu.set_regs(&r).map_err(kvm_err("set regs"))
    }

    fn bitmap_words(&self) -> usize {
        (self.size / PAGE).div_ceil(64) as usize
    }

    /// One pass of the guest. Full rings are harvested where they stop the vCPU, into
    /// `mid` (which the end-of-pass collection then completes).
    fn pass(&mut self, mid: &mut Collection) -> Res<Duration> {
        let mut in_guest = Duration::ZERO;
        loop {
            let t = Instant::now();
            let exit = self.vcpu.run().map_err(kvm_err("KVM_RUN"))?;
            in_guest += t.elapsed();
            match exit {
                VcpuExit::IoOut(DONE_PORT, _) => return Ok(in_guest),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    let t = Instant::now();
                    let taken = self.collect_ring(&mut mid.bitmap)?;
                    mid.harvest += t.elapsed();
                    mid.ring_full_exits += 1;
                    if taken == 0 {
                        // KVM still counts the ring as full with nothing in it to harvest:
                        // it pushed past a full ring (its dirty index ran more than a ring
                        // ahead), so entries were overwritten and the vCPU can never run again.
                        return Err(format!(
                            "dirty ring overflow: KVM_EXIT_DIRTY_RING_FULL with no dirty entry \
                             to harvest after {} full exits; the vCPU was not stopped at the \
                             soft limit, dirty GFNs were overwritten (lost), and it can never \
                             re-enter (see the kvm_dirty_ring_push warning in the kernel log)",
                            mid.ring_full_exits
                        ));
                    }
                }
                other => return Err(format!("unexpected vCPU exit: {other:?}")),
            }
        }
    }

    /// Harvests and resets the ring; returns how many entries it took. A harvest that finds
    /// the ring completely full is counted in `ring_overflows`: KVM should have stopped the
    /// vCPU at the soft limit (a few entries short of full), so the ring may have wrapped.
    fn collect_ring(&mut self, bitmap: &mut [u64]) -> Res<u32> {
        let ring = self.ring.as_mut().ok_or("no ring")?;
        let taken = ring.harvest(bitmap);
        if taken >= ring.count {
            self.ring_overflows += 1;
        }
        if taken > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is this VM's.
            let r = unsafe { ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
            if r < 0 {
                return Err(format!(
                    "KVM_RESET_DIRTY_RINGS: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(taken)
    }

    /// Harvest and re-arm: afterwards `c.bitmap` holds the pages dirtied since the last
    /// collection and those pages are write-protected again.
    fn collect(&mut self, c: &mut Collection) -> Res<()> {
        let t = Instant::now();
        match self.mech {
            Mechanism::Get => {
                let b = self
                    .vm
                    .get_dirty_log(DATA_SLOT, self.size as usize)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                c.bitmap = b;
            }
            Mechanism::Manual => {
                let mut b = self
                    .vm
                    .get_dirty_log(DATA_SLOT, self.size as usize)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                let clear = kvm_clear_dirty_log {
                    slot: DATA_SLOT,
                    num_pages: (self.size / PAGE) as u32,
                    first_page: 0,
                    __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                        dirty_bitmap: b.as_mut_ptr().cast(),
                    },
                };
                // SAFETY: the bitmap holds one bit per page of the slot (`get_dirty_log` sized
                // it) and lives across the call; the fd is this VM's.
                let r = unsafe { ioctl_with_ref(&self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
                if r < 0 {
                    return Err(format!(
                        "KVM_CLEAR_DIRTY_LOG: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                c.bitmap = b;
            }
            Mechanism::Ring => {
                self.collect_ring(&mut c.bitmap)?;
            }
        }
        c.harvest += t.elapsed();
        Ok(())
    }
}

/// What one collection found and cost.
struct Collection {
    bitmap: Vec<u64>,
    harvest: Duration,
    ring_full_exits: u32,
}

impl Collection {
    fn new(words: usize) -> Self {
        Collection {
            bitmap: vec![0; words],
            harvest: Duration::ZERO,
            ring_full_exits: 0,
        }
    }

    fn pages(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    json!({
        "min": s.first(), "median": median, "max": s.last(), "n": s.len(), "samples": v,
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Guest write passes with logging off: the baseline write rate (the first pass, which
/// faults the memory in on the host, is not counted).
fn baseline(b: &mut Bench, passes: usize) -> Res<Vec<f64>> {
    let pages = b.size / PAGE;
    b.aim(pages)?;
    let mut rates = Vec::new();
    for i in 0..=passes {
        let t = b.pass(&mut Collection::new(0))?;
        if i > 0 {
            rates.push(pages as f64 / t.as_secs_f64());
        }
    }
    Ok(rates)
}

/// Passes writing `pages` pages with logging on, each followed by a timed collection.
fn logged(b: &mut Bench, pages: u64, passes: usize) -> Res<Value> {
    b.aim(pages)?;
    let words = b.bitmap_words();
    let (mut harvest, mut rates, mut full_exits, mut wrong) = (vec![], vec![], vec![], vec![]);
    // The first pass is a warm-up (its pages may still be unprotected from before).
    for i in 0..=passes {
        let mut c = Collection::new(words);
        let t = b.pass(&mut c)?;
        b.collect(&mut c)?;
        if i == 0 {
            continue;
        }
        let found = c.pages();
        if found != pages {
            wrong.push(json!({"pass": i, "found": found, "want": pages}));
        }
        harvest.push(us(c.harvest));
        rates.push(pages as f64 / t.as_secs_f64());
        full_exits.push(f64::from(c.ring_full_exits));
    }
    Ok(json!({
        "dirty_pages": pages,
        "harvest_reset_us": stats(&harvest),
        "harvest_reset_ns_per_dirty_page": stats(&harvest.iter().map(|h| h * 1e3 / pages as f64).collect::<Vec<_>>()),
        "guest_pages_per_s": stats(&rates),
        "ring_full_exits_per_pass": stats(&full_exits),
        "exact": wrong.is_empty(),
        "mismatches": wrong,
    }))
}

fn measure(kvm: &Kvm, o: &Options, mech: Mechanism, size: u64) -> Res<Value> {
    let mut b = Bench::new(kvm, mech, size, o.ring_bytes)?;
    let base = baseline(&mut b, o.passes)?;
    let t = Instant::now();
    b.set_slot(DATA_SLOT, true)?;
    let enable = t.elapsed();
    // The first collection after logging is turned on (manual protect with INITIALLY_SET
    // reports every page here and write-protects them in the CLEAR).
    let mut first = Collection::new(b.bitmap_words());
    b.collect(&mut first)?;
    let few = logged(&mut b, o.few.min(size / PAGE), o.passes);
    let few_overflows = b.ring_overflows;
    // A failed class leaves the vCPU unusable (a wrapped ring never lets it re-enter).
    let all = match &few {
        Ok(_) => logged(&mut b, size / PAGE, o.passes),
        Err(_) => Err("not run: the few-pages class failed".to_owned()),
    };
    let class = |r: Res<Value>, overflows: u32| match r {
        Ok(mut v) => {
            v["ring_full_harvests"] = json!(overflows);
            v
        }
        Err(e) => json!({"error": e, "ring_full_harvests": overflows}),
    };
    let all_overflows = b.ring_overflows - few_overflows;
    let (few, all) = (class(few, few_overflows), class(all, all_overflows));
    let t = Instant::now();
    let disabled = b.set_slot(DATA_SLOT, false);
    let disable = t.elapsed();
    Ok(json!({
        "mechanism": mech.name(),
        "slot_mib": size / MIB,
        "slot_pages": size / PAGE,
        "enable_logging_us": us(enable),
        "first_collection_us": us(first.harvest),
        "first_collection_pages": first.pages(),
        "disable_logging_us": disabled.ok().map(|()| us(disable)),
        "guest_pages_per_s_logging_off": stats(&base),
        "few": few,
        "all": all,
    }))
}

fn median(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.get("median")?.as_f64()
}

/// Per slot size and dirty amount: the mechanism with the lowest median harvest+reset cost,
/// and each mechanism's write rate relative to logging off.
fn verdict(results: &[Value], sizes: &[u64]) -> Value {
    let mut out = vec![];
    for &size in sizes {
        let rows: Vec<&Value> = results
            .iter()
            .filter(|r| r["slot_mib"] == size / MIB && r.get("error").is_none())
            .collect();
        for class in ["few", "all"] {
            let costs: Vec<(String, f64)> = rows
                .iter()
                .filter_map(|r| {
                    Some((
                        r["mechanism"].as_str()?.to_owned(),
                        median(r, &[class, "harvest_reset_us"])
                            .filter(|_| r[class]["exact"] == true)?,
                    ))
                })
                .collect();
            let best = costs.iter().min_by(|a, b| a.1.total_cmp(&b.1));
            let unusable: Vec<Value> = rows
                .iter()
                .filter_map(|r| {
                    let e = r[class].get("error")?;
                    Some(json!({"mechanism": r["mechanism"], "error": e}))
                })
                .collect();
            let write_rate: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let on = median(r, &[class, "guest_pages_per_s"]);
                    let off = median(r, &["guest_pages_per_s_logging_off"]);
                    json!({
                        "mechanism": r["mechanism"],
                        "logging_on_pages_per_s": on,
                        "logging_off_pages_per_s": off,
                        "on_over_off": on.zip(off).map(|(a, b)| a / b),
                    })
                })
                .collect();
            out.push(json!({
                "slot_mib": size / MIB,
                "dirty": class,
                "harvest_reset_median_us": costs.iter().map(|(m, c)| json!({"mechanism": m, "us": c})).collect::<Vec<_>>(),
                "cheapest_collection": best.map(|b| b.0.clone()),
                "unusable": unusable,
                "guest_write_rate": write_rate,
            }));
        }
    }
    Value::Array(out)
}

fn host() -> Value {
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    json!({
        "model_name": model,
        "kernel": kernel,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
    })
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dirty_log_bench: {e}");
            std::process::exit(2);
        }
    };
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("dirty_log_bench: cannot open /dev/kvm: {e}");
            std::process::exit(1);
        }
    };
    let cap = |c: u32| kvm.check_extension_raw(c.into());
    let caps = json!({
        "MANUAL_DIRTY_LOG_PROTECT2": cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        "DIRTY_LOG_RING_ACQ_REL": cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
    });
    let mut results = vec![];
    let mut failed = false;
    for &size in &o.sizes {
        for &mech in &o.mechanisms {
            eprintln!(
                "dirty_log_bench: {} with a {} MiB slot",
                mech.name(),
                size / MIB
            );
            match measure(&kvm, &o, mech, size) {
                Ok(r) => {
                    for class in ["few", "all"] {
                        if let Some(e) = r[class].get("error") {
                            eprintln!("dirty_log_bench: {} {class}: {e}", mech.name());
                        }
                    }
                    // A class that could not run (the ring overflowing here) is a result; a
                    // collection that missed or invented pages is a failure.
                    failed |= ["few", "all"].iter().any(|c| r[*c]["exact"] == false);
                    results.push(r);
                }
                Err(e) => {
                    eprintln!("dirty_log_bench: {} failed: {e}", mech.name());
                    failed = true;
                    results.push(
                        json!({"mechanism": mech.name(), "slot_mib": size / MIB, "error": e}),
                    );
                }
            }
        }
    }
    let doc = json!({
        "benchmark": "dirty_log_bench",
        "host": host(),
        "kvm_caps": caps,
        "settings": {
            "few_pages": o.few, "passes": o.passes, "ring_bytes": o.ring_bytes,
            "ring_entries": o.ring_bytes / std::mem::size_of::<kvm_dirty_gfn>() as u64,
            "vcpus": 1,
            "guest": "one 8-byte write per page, pages spread evenly over the slot; 64-bit, 2 MiB guest pages",
        },
        "results": results,
        "verdict": verdict(&results, &o.sizes),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).expect("JSON of plain values")
    );
    if failed {
        std::process::exit(1);
    }
}
