//! The loopback copy limit for migration benchmarks (scripts/bench-migrate).
//!
//! One process, two threads, one TCP connection over 127.0.0.1: the sender writes `--bytes`
//! bytes from a resident buffer of non-zero data (like a source VM's RAM, faulted in before
//! the clock starts) in `--chunk`-sized writes; the receiver reads them into a fresh buffer of
//! the same size, so that the first touch of every destination page is paid inside the timed
//! copy, as it is for a destination VM's RAM. Time runs from the connected socket's first
//! write to the receiver's last byte. Prints one JSON line:
//! `{"bytes":N,"chunk":C,"seconds":S,"gib_per_s":G}`.
//!
//! `cargo run --release -p minivmm --example raw_copy -- [--bytes 1G] [--chunk 4M]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn parse_size(s: &str) -> Result<usize, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad size '{s}' (examples: 1G, 4M, 65536)"))
}

struct Options {
    bytes: usize,
    chunk: usize,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        bytes: 1 << 30,
        chunk: 4 << 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--bytes" => o.bytes = parse_size(&value()?)?,
            "--chunk" => o.chunk = parse_size(&value()?)?,
            other => return Err(format!("unknown argument '{other}' (--bytes N, --chunk N)")),
        }
    }
    if o.bytes < 4096 || !o.bytes.is_multiple_of(8) {
        return Err("--bytes must be a multiple of 8 and at least 4096".into());
    }
    Ok(o)
}

/// Non-zero data in every page (each 8-byte word holds its own index plus one), touched now.
fn source_buffer(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    buf
}

/// Reads exactly `len` bytes into a fresh zeroed allocation; large `vec![0; n]` comes from
/// fresh anonymous pages, so each page is first touched by the read that fills it.
fn receive(mut s: TcpStream, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("raw_copy: {e}");
            std::process::exit(2);
        }
    };
    let src = source_buffer(o.bytes);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let len = o.bytes;
    let receiver = std::thread::spawn(move || {
        let (s, _) = listener.accept()?;
        let buf = receive(s, len)?;
        let done = Instant::now();
        Ok::<_, std::io::Error>((done, buf))
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("TCP_NODELAY");
    let start = Instant::now();
    for chunk in src.chunks(o.chunk) {
        s.write_all(chunk).expect("send");
    }
    let (done, dst) = receiver.join().expect("receiver thread").expect("receive");
    let seconds = done.duration_since(start).as_secs_f64();
    // A cheap check that the bytes arrived whole: the first and last words of every 4 KiB.
    let bad = (0..len)
        .step_by(4096)
        .flat_map(|p| [p, (p + 4088).min(len.saturating_sub(8))])
        .any(|off| dst[off..off + 8] != src[off..off + 8]);
    if bad {
        eprintln!("raw_copy: received data differs from what was sent");
        std::process::exit(1);
    }
    println!(
        "{{\"bytes\":{},\"chunk\":{},\"seconds\":{:.6},\"gib_per_s\":{:.4}}}",
        len,
        o.chunk,
        seconds,
        len as f64 / seconds / (1u64 << 30) as f64
    );
}
