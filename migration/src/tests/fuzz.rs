//! Property tests on the destination's decoder: arbitrary input never panics and always ends
//! in a message or a typed error, read from memory or through a real mutual-TLS connection;
//! every valid message survives a round trip.

use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;

use crate::description::{CpuidEntry, DeviceDescription, MigrationCaps, VmDescription};
use crate::protocol::{
    Channel, DestTimings, DevicePhase, Header, Message, MessageType, ProtocolError, RunState,
    encode_frame,
};
use crate::ranges::{MemoryRange, PAGE_SIZE};

/// Drains a stream the way the destination does; returns how many messages decoded.
fn drain(bytes: Vec<u8>) -> usize {
    drain_channel(Channel::new(Cursor::new(bytes)))
}

/// Certificates for the TLS cases, made once for all of them.
fn tls_certs() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        super::tls::certs(dir.path(), false);
        dir
    })
    .path()
}

/// `bytes` sent by an authenticated source over a fresh mutual-TLS loopback connection,
/// drained by the destination's side of it.
fn drain_tls(bytes: Vec<u8>) -> usize {
    let dir = tls_certs();
    let (cli, srv) = super::tls::handshake(&dir.join("source"), &dir.join("destination"));
    let (mut cli, srv) = (cli.expect("client TLS"), srv.expect("server TLS"));
    let writer = std::thread::spawn(move || {
        // The destination may hang up on garbage before it has read everything.
        let _ = cli.write_all(&bytes).and_then(|()| cli.flush());
        let _ = cli.shutdown();
    });
    let n = drain_channel(Channel::new(srv));
    writer.join().expect("writer");
    n
}

fn drain_channel<S: Read>(mut ch: Channel<S>) -> usize {
    let mut n = 0;
    loop {
        match ch.recv() {
            Ok(Message::MemoryPages { .. }) => {
                if ch.discard_pending().is_err() {
                    return n;
                }
            }
            Ok(_) => {}
            Err(ProtocolError::Closed) => return n,
            Err(_) => return n,
        }
        n += 1;
    }
}

fn text() -> impl Strategy<Value = String> {
    let chars = vec!['a', 'z', '0', ' ', '-', '✓', 'é'];
    proptest::collection::vec(proptest::sample::select(chars), 0..40)
        .prop_map(|v| v.into_iter().collect())
}

fn blob() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

fn description() -> impl Strategy<Value = VmDescription> {
    let ram = proptest::collection::vec((0u64..64, 1u64..64), 1..4).prop_map(|gaps| {
        let mut at = 0;
        gaps.into_iter()
            .map(|(gap, len)| {
                let r = MemoryRange::new((at + gap) * PAGE_SIZE, len * PAGE_SIZE);
                at += gap + len;
                r
            })
            .collect::<Vec<_>>()
    });
    let cpuid = proptest::collection::vec(any::<[u32; 7]>(), 0..6).prop_map(|v| {
        v.into_iter()
            .map(|e| CpuidEntry {
                function: e[0],
                index: e[1],
                flags: e[2],
                eax: e[3],
                ebx: e[4],
                ecx: e[5],
                edx: e[6],
            })
            .collect::<Vec<_>>()
    });
    let devices = proptest::collection::vec((text(), any::<[bool; 4]>()), 0..4).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (kind, c))| DeviceDescription {
                id: format!("dev{i}"),
                kind,
                caps: MigrationCaps {
                    stop_copy: c[0],
                    p2p: c[1],
                    pre_copy: c[2],
                    dirty_tracking: c[3],
                },
            })
            .collect::<Vec<_>>()
    });
    (ram, 1u32..=64, cpuid, devices).prop_map(|(ram, vcpus, cpuid, devices)| VmDescription {
        ram,
        vcpus,
        cpuid,
        devices,
    })
}

fn message() -> impl Strategy<Value = Message> {
    let phase = prop_oneof![Just(DevicePhase::PreCopy), Just(DevicePhase::StopCopy)];
    let range = (any::<u32>(), 1u64..1 << 40)
        .prop_map(|(p, len)| MemoryRange::new(u64::from(p) * 4096, len));
    prop_oneof![
        (any::<u16>(), any::<u64>())
            .prop_map(|(version, features)| Message::Hello { version, features }),
        (any::<u16>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(version, features, session)| {
            Message::HelloAck {
                version,
                features,
                session,
            }
        }),
        (any::<[u8; 32]>(), description())
            .prop_map(|(session, desc)| Message::Description { session, desc }),
        Just(Message::Accept),
        text().prop_map(|reason| Message::Refuse { reason }),
        proptest::collection::vec(range, 0..20).prop_map(Message::ZeroRanges),
        (any::<u64>(), any::<u64>())
            .prop_map(|(iteration, pages)| Message::IterationEnd { iteration, pages }),
        (text(), phase, blob()).prop_map(|(device, phase, data)| Message::DeviceData {
            device,
            phase,
            data
        }),
        text().prop_map(|device| Message::DeviceAck { device }),
        (any::<u32>(), blob()).prop_map(|(index, data)| Message::VcpuState { index, data }),
        blob().prop_map(|data| Message::VmState { data }),
        (text(), blob()).prop_map(|(device, data)| Message::DeviceState { device, data }),
        any::<[u8; 32]>().prop_map(|token| Message::Complete { token }),
        any::<[u8; 32]>().prop_map(|token| Message::Ready { token }),
        Just(Message::Go {
            guest: RunState::Running
        }),
        Just(Message::Go {
            guest: RunState::Paused
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(state_load_us, resume_us)| Message::Resumed(
            DestTimings {
                state_load_us,
                resume_us
            }
        )),
        text().prop_map(|reason| Message::Abandon { reason }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        drain(bytes);
    }

    /// Random bytes rarely pass the magic check, so also feed valid headers of every type
    /// with arbitrary payloads, which exercises each payload decoder.
    #[test]
    fn arbitrary_payloads_never_panic(
        t in 0usize..MessageType::ALL.len(),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        declared_extra in 0u64..4,
    ) {
        let msg_type = MessageType::ALL[t];
        let len = (payload.len() as u64 + declared_extra).min(msg_type.max_payload());
        let mut bytes = Header::new(msg_type, len).to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        drain(bytes);
    }

    /// Through TLS the decoder sees exactly what it sees from memory: the same number of
    /// messages before the same kind of end, never a panic or a hang.
    #[test]
    fn arbitrary_frames_through_tls_decode_as_in_memory(
        t in 0usize..MessageType::ALL.len(),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let msg_type = MessageType::ALL[t];
        let len = (payload.len() as u64).min(msg_type.max_payload());
        let mut bytes = Header::new(msg_type, len).to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(drain_tls(bytes.clone()), drain(bytes));
    }

    #[test]
    fn valid_messages_round_trip(msgs in proptest::collection::vec(message(), 1..6)) {
        let mut bytes = Vec::new();
        for m in &msgs {
            let (head, tail) = encode_frame(m).expect("valid message encodes");
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(tail);
        }
        let mut ch = Channel::new(Cursor::new(bytes));
        for m in msgs {
            prop_assert_eq!(ch.recv().expect("decodes"), m);
        }
        prop_assert!(matches!(ch.recv(), Err(ProtocolError::Closed)));
    }
}
