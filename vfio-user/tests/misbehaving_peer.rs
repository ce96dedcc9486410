//! A fake server thread that breaks the protocol in one way per test: the client must answer
//! each with a clear error, never hang past its timeout, and never panic.

mod common;

use common::*;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use vfio_user::{
    Client, ClientOptions, Command, DeviceInfo, Error, Header, IrqInfo, MAX_MSG_SIZE, RegionAccess,
    RegionCap, RegionInfo, recv_message, send_message,
};

fn device_info_payload() -> Vec<u8> {
    DeviceInfo {
        argsz: 16,
        flags: 3,
        num_regions: 9,
        num_irqs: 5,
    }
    .encode()
}

#[test]
fn wrong_reply_id_then_connection_refuses_further_use() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        let mut h = Header::reply_to(&m.header, 16).unwrap();
        h.id = h.id.wrapping_add(7);
        send_message(&s, &h, &device_info_payload(), &[]).unwrap();
    });
    let e = c.device_info().unwrap_err();
    assert!(matches!(e, Error::ReplyMismatch { .. }), "{e}");
    assert!(e.to_string().contains("reply mismatch"));
    assert!(matches!(c.device_info(), Err(Error::Broken(_))));
    t.join().unwrap();
}

#[test]
fn wrong_reply_command() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        let mut h = Header::reply_to(&m.header, 16).unwrap();
        h.command = Command::DeviceGetIrqInfo as u16;
        send_message(&s, &h, &device_info_payload(), &[]).unwrap();
    });
    assert!(matches!(c.device_info(), Err(Error::ReplyMismatch { .. })));
    t.join().unwrap();
}

#[test]
fn error_reply_carries_errno_and_keeps_connection() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        let h = Header::error_reply_to(&m.header, libc::EINVAL);
        send_message(&s, &h, &[], &[]).unwrap();
        let m = recv(&s);
        reply(&s, &m.header, &device_info_payload());
    });
    let e = c.device_info().unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(c.device_info().unwrap().num_regions, 9);
    t.join().unwrap();
}

#[test]
fn header_smaller_than_itself() {
    let (c, t) = fake(|mut s| {
        let m = recv(&s);
        let mut b = Header::reply_to(&m.header, 0).unwrap().encode();
        b[4..8].copy_from_slice(&4u32.to_le_bytes());
        s.write_all(&b).unwrap();
    });
    assert!(matches!(c.device_info(), Err(Error::Malformed(_))));
    t.join().unwrap();
}

#[test]
fn oversized_reply_refused_without_waiting_for_it() {
    let (c, t) = fake(|mut s| {
        let m = recv(&s);
        let mut h = Header::reply_to(&m.header, 0).unwrap();
        h.size = u32::MAX;
        s.write_all(&h.encode()).unwrap();
        // Keep the socket open: the client must not wait for 4 GiB that never comes.
        thread::sleep(TIMEOUT * 2);
    });
    let start = Instant::now();
    assert!(matches!(c.device_info(), Err(Error::TooLarge { .. })));
    assert!(start.elapsed() < TIMEOUT);
    t.join().unwrap();
}

#[test]
fn reply_longer_than_the_command_allows() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        reply(&s, &m.header, &[0u8; 1000]);
    });
    assert!(matches!(c.device_info(), Err(Error::TooLarge { .. })));
    t.join().unwrap();
}

#[test]
fn truncated_and_absurd_payloads() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        reply(&s, &m.header, &[0u8; 8]);
    });
    assert!(matches!(c.device_info(), Err(Error::Malformed(_))));
    t.join().unwrap();

    let (c, t) = fake(|s| {
        let m = recv(&s);
        let i = IrqInfo {
            argsz: 16,
            flags: 1,
            index: 2,
            count: 1_000_000,
        };
        reply(&s, &m.header, &i.encode());
    });
    assert!(matches!(c.irq_info(2), Err(Error::Malformed(_))));
    t.join().unwrap();
}

#[test]
fn region_read_reply_must_match_request() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        let (mut a, _) = RegionAccess::decode(&m.payload, false).unwrap();
        a.offset += 4;
        reply(&s, &m.header, &a.encode(&vec![0; a.count as usize]));
    });
    let mut buf = [0u8; 4];
    assert!(matches!(
        c.region_read(0, 0, &mut buf),
        Err(Error::Malformed(_))
    ));
    t.join().unwrap();

    let (c, t) = fake(|s| {
        let m = recv(&s);
        let (a, _) = RegionAccess::decode(&m.payload, false).unwrap();
        // Claims the right count but carries fewer bytes.
        reply(&s, &m.header, &a.encode(&[1]));
    });
    assert!(matches!(
        c.region_read(0, 0, &mut buf),
        Err(Error::Malformed(_))
    ));
    t.join().unwrap();
}

#[test]
fn unexpected_fds_are_refused_and_closed() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        let h = Header::reply_to(&m.header, 16).unwrap();
        let fds = [s.as_fd(), s.as_fd(), s.as_fd()];
        send_message(&s, &h, &device_info_payload(), &fds).unwrap();
    });
    assert!(matches!(c.device_info(), Err(Error::TooManyFds { .. })));
    t.join().unwrap();
}

#[test]
fn silent_server_times_out() {
    let (c, t) = fake(|s| {
        let _m = recv(&s);
        thread::sleep(TIMEOUT * 3);
    });
    let start = Instant::now();
    let e = c.device_info().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.is_device_lost());
    assert!(start.elapsed() < TIMEOUT * 2);
    t.join().unwrap();
}

#[test]
fn closed_server_is_device_lost() {
    let (c, t) = fake(|s| {
        let _m = recv(&s);
        drop(s);
    });
    let e = c.device_info().unwrap_err();
    assert!(matches!(e, Error::DeviceLost), "{e}");
    assert!(matches!(c.reset(), Err(Error::DeviceLost)));
    t.join().unwrap();
}

#[test]
fn bad_version_replies() {
    for case in 0..3 {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || match case {
            0 => answer_version(&b, 1, good_caps()),
            1 => {
                let m = recv(&b);
                reply(&b, &m.header, b"\0\0\x01\0{\"capabilities\":[}\0");
            }
            _ => drop(b),
        });
        let r = Client::from_stream(a, ClientOptions { timeout: TIMEOUT });
        let e = r.err().expect("negotiation must fail");
        match case {
            0 => assert!(matches!(e, Error::Version { major: 1, .. }), "{e}"),
            1 => assert!(matches!(e, Error::Malformed(_)), "{e}"),
            _ => assert!(matches!(e, Error::DeviceLost), "{e}"),
        }
        t.join().unwrap();
    }
}

#[test]
fn server_commands_are_refused_while_waiting() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        // A DMA_READ from the server before the reply: the client must refuse it.
        let h = Header::request(99, Command::DmaRead, 16).unwrap();
        send_message(&s, &h, &[0; 16], &[]).unwrap();
        let refusal = recv(&s);
        assert!(refusal.header.error && refusal.header.id == 99);
        reply(&s, &m.header, &device_info_payload());
    });
    assert_eq!(c.device_info().unwrap().num_irqs, 5);
    t.join().unwrap();
}

#[test]
fn region_info_capabilities_and_growth() {
    let (c, t) = fake(|s| {
        let info = RegionInfo {
            index: 9,
            flags: 3,
            size: 0x1000,
            offset: 0,
            caps: vec![RegionCap::Type {
                region_type: 3,
                subtype: 1,
            }],
            fd: None,
        };
        let full = info.encode();
        // First answer: only the fixed part, with argsz saying more is needed.
        let m = recv(&s);
        let mut short = full[..32].to_vec();
        short[0..4].copy_from_slice(&4096u32.to_le_bytes());
        reply(&s, &m.header, &short);
        let m = recv(&s);
        assert_eq!(
            u32::from_le_bytes(m.payload[0..4].try_into().unwrap()),
            4096
        );
        reply(&s, &m.header, &full);
    });
    let r = c.region_info(9).unwrap();
    assert_eq!(r.caps.len(), 1);
    assert!(r.fd.is_none());
    t.join().unwrap();

    let (c, t) = fake(|s| {
        let m = recv(&s);
        let mut p = RegionInfo {
            index: 3,
            flags: 3,
            size: 0,
            offset: 0,
            caps: vec![],
            fd: None,
        }
        .encode();
        p[8..12].copy_from_slice(&4u32.to_le_bytes());
        reply(&s, &m.header, &p);
    });
    assert!(matches!(c.region_info(3), Err(Error::Malformed(_))));
    t.join().unwrap();
}

#[test]
fn concurrent_callers_each_get_their_own_reply() {
    let (c, t) = fake(|s| {
        // Echo: each read returns its offset's low byte.
        while let Ok(Some(m)) = recv_message(&s, MAX_MSG_SIZE, 0, None) {
            let (a, _) = RegionAccess::decode(&m.payload, false).unwrap();
            let data = vec![a.offset as u8; a.count as usize];
            reply(&s, &m.header, &a.encode(&data));
        }
    });
    thread::scope(|sc| {
        for i in 0..4u64 {
            let c = &c;
            sc.spawn(move || {
                for j in 0..50u64 {
                    let off = i * 64 + j;
                    let mut b = [0u8; 8];
                    c.region_read(0, off, &mut b).unwrap();
                    assert_eq!(b, [off as u8; 8]);
                }
            });
        }
    });
    drop(c);
    t.join().unwrap();
}
