//! Compiles the freestanding guest programs in `programs/` into ELF images in OUT_DIR.
//!
//! They are built with the same rustc that builds this crate, for the host target, because
//! the machine has no separate bare-metal toolchain (no rust-src, no extra targets). The
//! linker script and `-nostartfiles -nostdlib` turn the host target's output into a
//! self-contained image that minivmm can load like a vmlinux.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Guest programs: `programs/<name>.rs` becomes `$OUT_DIR/<name>.elf`. Keep in sync with
/// `src/lib.rs`.
const GUESTS: &[&str] = &["hello", "dirtier", "smp", "dmatest", "gpio", "mtty"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let programs = manifest_dir.join("programs");
    let script = manifest_dir.join("guest.ld");

    // Under `cargo clippy` this is clippy-driver, which then lints the guest programs too (with
    // the lint flags cargo passes it through CLIPPY_ARGS).
    let wrapper = env::var_os("RUSTC_WORKSPACE_WRAPPER").filter(|w| !w.is_empty());

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    println!("cargo:rerun-if-changed={}", script.display());
    // A directory makes cargo rescan every file under it, which covers the shared runtime.
    println!("cargo:rerun-if-changed={}", programs.display());

    for name in GUESTS {
        let src = programs.join(format!("{name}.rs"));
        let out = out_dir.join(format!("{name}.elf"));
        let mut cmd = match &wrapper {
            Some(w) => {
                let mut c = Command::new(w);
                c.arg(&rustc);
                c
            }
            None => Command::new(&rustc),
        };
        let output = cmd
            .arg(&src)
            .args(["--crate-name", name])
            .args(["--edition", "2024", "--crate-type", "bin"])
            // The guests run on x86-64 hardware whatever the host build targets.
            .args(["--target", "x86_64-unknown-linux-gnu"])
            .args(["-D", "warnings"])
            .args(["-C", "panic=abort"])
            .args(["-C", "opt-level=2"])
            .args(["-C", "codegen-units=1"])
            .args(["-C", "debuginfo=0"])
            // The prebuilt core carries DWARF; symbols stay for objdump.
            .args(["-C", "strip=debuginfo"])
            // Linked at fixed low addresses: absolute 32-bit addressing is fine, and the
            // AP trampoline relies on 32-bit absolute references into the image.
            .args(["-C", "relocation-model=static"])
            .args(["-C", "code-model=small"])
            // No SSE (nor anything that implies it): on the project's KVM host (kvm_pvm) guest
            // code is run by KVM's instruction emulator, which has no SSE arithmetic and stops
            // the VM with an emulation failure at the first `xorps`. The guests use no floats,
            // so the float ABI that rustc warns about below is never exercised.
            .args(["-C", "target-feature=-sse,-sse2"])
            .args(["-C", "link-arg=-nostartfiles"])
            .args(["-C", "link-arg=-nostdlib"])
            .args(["-C", "link-arg=-static"])
            .args(["-C", "link-arg=-no-pie"])
            .arg("-C")
            .arg(format!("link-arg=-Wl,-T,{}", script.display()))
            .args(["-C", "link-arg=-Wl,--build-id=none"])
            // Keeps the first segment at file offset 0x1000 (multiboot wants its header
            // in the first 8 KiB) instead of wherever a larger page size would push it.
            .args(["-C", "link-arg=-Wl,-z,max-page-size=0x1000"])
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", rustc.to_string_lossy()));
        if !output.status.success() {
            panic!(
                "building guest {name} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // rustc prints nothing else on success with -D warnings; surface anything it did say.
        for line in compiler_messages(&String::from_utf8_lossy(&output.stderr)) {
            println!("cargo:warning=guest {name}: {line}");
        }
    }
}

/// rustc's output without the one warning that `-sse2` always causes (the float ABI of the
/// host target needs SSE registers; no guest passes floats), so that real warnings stand out.
fn compiler_messages(stderr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in stderr.lines() {
        if line.starts_with("warning: target feature `sse2` must be enabled") {
            skipping = true;
            continue;
        }
        if skipping && (line.is_empty() || line.starts_with(' ')) {
            continue;
        }
        skipping = false;
        if line.starts_with("warning: 1 warning emitted") || line.is_empty() {
            continue;
        }
        out.push(line);
    }
    out
}
