use std::io::{Cursor, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::every_message;
use crate::protocol::{
    Channel, HEADER_LEN, Header, MAGIC, Message, MessageType, PROTOCOL_VERSION, ProtocolError,
    RunState, encode_frame,
};
use crate::ranges::MemoryRange;

fn raw_header(magic: u32, version: u8, flags: u8, t: u16, len: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(&magic.to_le_bytes());
    b.push(version);
    b.push(flags);
    b.extend_from_slice(&t.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b
}

fn recv_from(bytes: Vec<u8>) -> Result<Message, ProtocolError> {
    Channel::new(Cursor::new(bytes)).recv()
}

#[test]
fn every_message_round_trips_over_a_socket_pair() {
    let (a, b) = UnixStream::pair().unwrap();
    let sender = std::thread::spawn(move || {
        let mut ch = Channel::new(a);
        for m in every_message() {
            ch.send(&m).unwrap();
        }
        ch.bytes_written()
    });
    let mut ch = Channel::new(b);
    for expected in every_message() {
        assert_eq!(ch.recv().unwrap(), expected);
    }
    assert!(matches!(ch.recv(), Err(ProtocolError::Closed)));
    assert_eq!(sender.join().unwrap(), ch.bytes_read());
}

#[test]
fn memory_pages_stream_between_memories() {
    let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap();
    let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap();
    vm_memory::Bytes::write_slice(&src, b"hello pages", GuestAddress(0x2ff8)).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = Channel::new(a);
    tx.send_memory(&src, MemoryRange::new(0x2000, 0x2000))
        .unwrap();
    let mut rx = Channel::new(b);
    let m = rx.recv().unwrap();
    assert_eq!(
        m,
        Message::MemoryPages {
            gpa: 0x2000,
            len: 0x2000
        }
    );
    assert!(matches!(
        rx.recv(),
        Err(ProtocolError::PendingPayload(0x2000))
    ));
    rx.recv_memory(&dst).unwrap();
    let mut buf = [0u8; 11];
    vm_memory::Bytes::read_slice(&dst, &mut buf, GuestAddress(0x2ff8)).unwrap();
    assert_eq!(&buf, b"hello pages");
    assert_eq!(tx.bytes_written(), rx.bytes_read());
    // Outside the source's memory: refused before anything is written.
    assert!(
        tx.send_memory(&src, MemoryRange::new(0x4000, 0x2000))
            .is_err()
    );
    assert_eq!(tx.bytes_written(), rx.bytes_read());
}

#[test]
fn discard_pending_skips_page_bytes() {
    let (head, _) = encode_frame(&Message::MemoryPages { gpa: 0, len: 5 }).unwrap();
    let mut bytes = head;
    bytes.extend_from_slice(b"12345");
    bytes.extend(
        encode_frame(&Message::Go {
            guest: RunState::Paused,
        })
        .unwrap()
        .0,
    );
    let mut ch = Channel::new(Cursor::new(bytes));
    assert!(matches!(
        ch.recv().unwrap(),
        Message::MemoryPages { len: 5, .. }
    ));
    ch.discard_pending().unwrap();
    assert_eq!(
        ch.recv().unwrap(),
        Message::Go {
            guest: RunState::Paused
        }
    );
}

#[test]
fn header_checks_refuse_cleanly() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            raw_header(0xdeadbeef, PROTOCOL_VERSION, 0, 4, 0),
            "BadMagic",
        ),
        (raw_header(MAGIC, 3, 0, 4, 0), "UnsupportedVersion(3)"),
        // Version 1 had no session nonce or switchover token.
        (raw_header(MAGIC, 1, 0, 4, 0), "UnsupportedVersion(1)"),
        (raw_header(MAGIC, 0, 0, 4, 0), "UnsupportedVersion(0)"),
        (
            raw_header(MAGIC, PROTOCOL_VERSION, 0x80, 4, 0),
            "UnknownFlags",
        ),
        (
            raw_header(MAGIC, PROTOCOL_VERSION, 0, 0, 0),
            "UnknownType(0)",
        ),
        (
            raw_header(MAGIC, PROTOCOL_VERSION, 0, 999, 0),
            "UnknownType(999)",
        ),
        (raw_header(MAGIC, PROTOCOL_VERSION, 0, 4, 1), "TooLarge"),
        (raw_header(MAGIC, PROTOCOL_VERSION, 0, 1, 11), "TooLarge"),
    ];
    for (bytes, want) in cases {
        let err = recv_from(bytes).unwrap_err();
        assert!(format!("{err:?}").starts_with(want), "{want}: got {err:?}");
    }
}

#[test]
fn huge_lengths_fail_fast_without_allocating() {
    for t in MessageType::ALL {
        let bytes = raw_header(MAGIC, PROTOCOL_VERSION, 0, t as u16, u64::MAX);
        let start = Instant::now();
        let err = recv_from(bytes).unwrap_err();
        assert!(
            matches!(err, ProtocolError::TooLarge { .. }),
            "{t:?}: {err:?}"
        );
        assert!(start.elapsed() < Duration::from_millis(50));
    }
    // A length at the limit but no payload: the buffer grows only with what arrives.
    let max = MessageType::DeviceState.max_payload();
    let bytes = raw_header(
        MAGIC,
        PROTOCOL_VERSION,
        0,
        MessageType::DeviceState as u16,
        max,
    );
    assert!(matches!(
        recv_from(bytes),
        Err(ProtocolError::Truncated { got: 0, .. })
    ));
}

#[test]
fn truncated_frames_and_clean_close_are_told_apart() {
    assert!(matches!(recv_from(vec![]), Err(ProtocolError::Closed)));
    let full = encode_frame(&Message::IterationEnd {
        iteration: 1,
        pages: 2,
    })
    .unwrap()
    .0;
    for cut in [1, HEADER_LEN - 1, HEADER_LEN, full.len() - 1] {
        let err = recv_from(full[..cut].to_vec()).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Truncated { .. }),
            "cut {cut}: {err:?}"
        );
    }
    assert!(recv_from(full).is_ok());
}

#[test]
fn malformed_payloads_are_refused() {
    let frame = |t: MessageType, payload: &[u8]| {
        let mut b = Header::new(t, payload.len() as u64).to_bytes().to_vec();
        b.extend_from_slice(payload);
        b
    };
    let mut bad_desc = super::description();
    bad_desc.vcpus = 0;
    let cases = vec![
        frame(MessageType::ZeroRanges, &[0; 17]),
        frame(MessageType::ZeroRanges, &[0; 16]), // zero-length range
        frame(
            MessageType::ZeroRanges,
            &[[0xff; 8], [2, 0, 0, 0, 0, 0, 0, 0]].concat(),
        ), // wraps
        frame(MessageType::Refuse, &[2, 0, 0xff, 0xfe]), // not UTF-8
        frame(MessageType::Refuse, &[5, 0, b'a']), // text longer than payload
        frame(MessageType::DeviceData, &[1, 0, b'd', 9]), // unknown phase
        frame(MessageType::Hello, &[1, 0]),
        frame(MessageType::IterationEnd, &[0; 15]),
        frame(MessageType::MemoryPages, &[0; 4]), // shorter than its gpa
        frame(
            MessageType::Description,
            &crate::state::encode(&bad_desc).unwrap(),
        ),
        frame(MessageType::Description, &[0xff; 64]),
    ];
    for bytes in cases {
        let err = recv_from(bytes.clone()).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Malformed { .. }),
            "{bytes:x?}: {err:?}"
        );
    }
}

#[test]
fn encoder_refuses_what_the_decoder_would() {
    let long = "x".repeat(crate::protocol::MAX_TEXT_LEN + 1);
    assert!(encode_frame(&Message::Abandon { reason: long }).is_err());
    let huge = Message::VcpuState {
        index: 0,
        data: vec![0; crate::protocol::MAX_VCPU_STATE as usize + 1],
    };
    assert!(matches!(
        encode_frame(&huge),
        Err(ProtocolError::TooLarge { .. })
    ));
    let mut ch = Channel::new(Vec::new());
    assert!(ch.send(&Message::MemoryPages { gpa: 0, len: 0 }).is_err());
}

#[test]
fn read_timeout_at_a_frame_boundary_is_recoverable() {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut rx = Channel::new(b);
    assert!(matches!(rx.recv(), Err(ProtocolError::Timeout)));
    let mut tx = Channel::new(a);
    tx.send(&Message::Ready { token: [7; 32] }).unwrap();
    assert_eq!(rx.recv().unwrap(), Message::Ready { token: [7; 32] });
    tx.get_mut().write_all(&[0x4d]).unwrap(); // one byte of a header, then silence
    assert!(matches!(rx.recv(), Err(ProtocolError::Io(_))));
}

/// A stream that hands out at most 100 bytes per read, as a busy socket does.
struct Trickle(Cursor<Vec<u8>>);

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(100);
        self.0.read(&mut buf[..n])
    }
}

impl vm_memory::ReadVolatile for Trickle {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        let mut tmp = [0u8; 100];
        let n = buf.len().min(100);
        let got = std::io::Read::read(&mut self.0, &mut tmp[..n])
            .map_err(vm_memory::VolatileMemoryError::IOError)?;
        buf.copy_from(&tmp[..got]);
        Ok(got)
    }
}

#[test]
fn short_reads_while_receiving_pages_are_retried() {
    let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let pattern: Vec<u8> = (0..0x10000u32).map(|i| (i % 251) as u8).collect();
    vm_memory::Bytes::write_slice(&src, &pattern, GuestAddress(0)).unwrap();
    let mut tx = Channel::new(Vec::new());
    tx.send_memory(&src, MemoryRange::new(0, 0x10000)).unwrap();
    let mut wire = tx.into_inner();
    let mut rx = Channel::new(Trickle(Cursor::new(wire.clone())));
    assert!(matches!(rx.recv().unwrap(), Message::MemoryPages { .. }));
    rx.recv_memory(&dst).unwrap();
    let mut got = vec![0u8; 0x10000];
    vm_memory::Bytes::read_slice(&dst, &mut got, GuestAddress(0)).unwrap();
    assert!(got == pattern);
    // Cut short: a typed error, not a hang or a panic.
    wire.truncate(wire.len() - 1);
    let mut rx = Channel::new(Trickle(Cursor::new(wire)));
    rx.recv().unwrap();
    assert!(matches!(
        rx.recv_memory(&dst),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn a_named_timeout_reads_as_timed_out_after_n_s() {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut rx = Channel::new(b).with_timeout(Duration::from_secs(7));
    let e = rx.recv().unwrap_err();
    assert!(matches!(e, ProtocolError::TimedOut(_)), "{e:?}");
    assert_eq!(e.to_string(), "timed out after 7 s");
    let mut tx = Channel::new(a);
    tx.get_mut().write_all(&[0x4d]).unwrap(); // inside a header: EAGAIN, same wording
    let e = rx.recv().unwrap_err().to_string();
    assert_eq!(e, "timed out after 7 s");
    assert!(!e.contains("os error"));
}

/// Writes `bytes` one at a time, `gap` apart, until the reader hangs up.
fn trickle(mut w: UnixStream, bytes: Vec<u8>, gap: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for b in bytes {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(gap);
        }
    })
}

#[test]
fn a_frame_trickled_inside_the_read_timeout_is_cut_off_at_its_deadline() {
    let (a, b) = UnixStream::pair().unwrap();
    let limit = Duration::from_millis(600);
    b.set_read_timeout(Some(limit)).unwrap();
    let mut rx = Channel::new(b).with_timeout(limit);
    // 24 header bytes + a reason, 150 ms apart: every read succeeds, the frame takes > 4 s.
    let msg = Message::Refuse {
        reason: "slowly".into(),
    };
    let (head, tail) = encode_frame(&msg).unwrap();
    let bytes = [head.as_slice(), tail].concat();
    let writer = trickle(a, bytes, Duration::from_millis(150));
    let start = Instant::now();
    let e = rx.recv().unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, ProtocolError::TimedOut(_)), "{e:?}");
    assert!(took < 2 * limit + Duration::from_millis(300), "{took:?}");
    drop(rx);
    writer.join().unwrap();
}

#[test]
fn page_data_trickled_inside_the_read_timeout_is_cut_off_too() {
    let (a, b) = UnixStream::pair().unwrap();
    let limit = Duration::from_millis(600);
    b.set_read_timeout(Some(limit)).unwrap();
    let mut rx = Channel::new(b).with_timeout(limit);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let (head, _) = encode_frame(&Message::MemoryPages {
        gpa: 0,
        len: 0x1000,
    })
    .unwrap();
    let mut tx = a.try_clone().unwrap();
    tx.write_all(&head).unwrap();
    let writer = trickle(a, vec![0x5a; 0x1000], Duration::from_millis(150));
    assert!(matches!(rx.recv().unwrap(), Message::MemoryPages { .. }));
    let e = rx.recv_memory(&mem).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert_eq!(e.to_string(), "timed out after 0.6 s");
    drop(rx);
    writer.join().unwrap();
}
