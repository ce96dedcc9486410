//! Handshake and two-phase end between a source and a destination thread.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use super::description;
use crate::MigrationError;
use crate::protocol::{
    Channel, DestTimings, Message, ProtocolError, ReturnPath, RunState, features,
};
use crate::session::{
    EndError, abandon, dest_confirm, dest_handshake, dest_ready, source_end, source_handshake,
};

const SECS_5: Duration = Duration::from_secs(5);

#[test]
fn handshake_grants_common_features_and_end_phase_confirms() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        let local = description();
        let (desc, granted) = dest_handshake(&mut ch, features::SWITCHOVER_ACK, |d| {
            d.check_compatible(&local).map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(desc, description());
        ch.send(&Message::DeviceAck {
            device: "sampledev0".into(),
        })
        .unwrap();
        let Message::Complete { token } = ch.recv().unwrap() else {
            panic!("expected Complete")
        };
        assert_eq!(dest_ready(&mut ch, token).unwrap(), RunState::Paused);
        let t = DestTimings {
            state_load_us: 10,
            resume_us: 2,
        };
        dest_confirm(&mut ch, t).unwrap();
        granted
    });
    let mut ch = Channel::new(a);
    let granted = source_handshake(&mut ch, &description(), features::ALL).unwrap();
    assert_eq!(granted, features::SWITCHOVER_ACK);
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    let mut acks = Vec::new();
    let t = source_end(
        &mut ch,
        &rp,
        Duration::from_secs(5),
        RunState::Paused,
        |d| {
            acks.push(d);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(t.state_load_us, 10);
    assert_eq!(acks, vec!["sampledev0".to_string()]);
    assert_eq!(dest.join().unwrap(), features::SWITCHOVER_ACK);
}

#[test]
fn incompatible_description_is_refused_with_its_reason() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        let mut local = description();
        local.vcpus = 8;
        dest_handshake(&mut ch, 0, |d| {
            d.check_compatible(&local).map_err(|e| e.to_string())
        })
    });
    let mut ch = Channel::new(a);
    let err = source_handshake(&mut ch, &description(), 0).unwrap_err();
    match err {
        MigrationError::Protocol(ProtocolError::Refused(r)) => assert!(r.contains("vCPUs"), "{r}"),
        e => panic!("{e:?}"),
    }
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn abandon_before_go_keeps_the_guest_on_the_source() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        assert!(matches!(ch.recv().unwrap(), Message::Complete { .. }));
        abandon(&mut ch, "device state did not load");
    });
    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    let err = source_end(&mut ch, &rp, SECS_5, RunState::Running, |_| Ok(())).unwrap_err();
    assert!(matches!(
        err,
        EndError::BeforeGo(MigrationError::Protocol(ProtocolError::Abandoned(_)))
    ));
    dest.join().unwrap();
}

#[test]
fn silence_after_go_is_reported_as_after_go() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        let Message::Complete { token } = ch.recv().unwrap() else {
            panic!("expected Complete")
        };
        dest_ready(&mut ch, token).unwrap();
        ch // keep the socket open, never confirm
    });
    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    let short = Duration::from_millis(100);
    let err = source_end(&mut ch, &rp, short, RunState::Running, |_| Ok(())).unwrap_err();
    assert!(matches!(err, EndError::AfterGo(_)), "{err:?}");
    drop(dest.join().unwrap());
}

/// What a source sees when the destination cannot decode its description.
fn refusal_of(frame: Vec<u8>) -> (String, MigrationError) {
    use std::io::{Read, Write};
    let (mut a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        crate::session::dest_hello(&mut ch, features::ALL).unwrap_err()
    });
    let mut ch = Channel::new(a.try_clone().unwrap());
    ch.send(&Message::Hello {
        version: 1,
        features: 0,
    })
    .unwrap();
    assert!(matches!(ch.recv().unwrap(), Message::HelloAck { .. }));
    a.write_all(&frame).unwrap();
    let err = dest.join().unwrap();
    let reply = ch.recv();
    let mut rest = Vec::new();
    let _ = a.read_to_end(&mut rest);
    match reply {
        Ok(Message::Refuse { reason }) => (reason, err),
        other => panic!("expected Refuse, got {other:?}"),
    }
}

#[test]
fn a_malformed_description_is_refused_with_a_reason() {
    use crate::protocol::{Header, MessageType};
    let mut frame = Header::new(MessageType::Description, 5).to_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 5]);
    let (reason, err) = refusal_of(frame);
    assert!(reason.contains("Description"), "{reason}");
    assert!(err.to_string().contains("Description"), "{err}");
    // A header announcing more than a description may hold: refused before any payload.
    let mut big = Header::new(MessageType::Description, 1).to_bytes();
    big[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (reason, _) = refusal_of(big.to_vec());
    assert!(reason.contains("exceeds its limit"), "{reason}");
}

/// A stream that keeps a copy of everything written to it: a recording of the source.
struct Recorder {
    inner: UnixStream,
    wrote: Vec<u8>,
}

impl std::io::Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.wrote.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_recorded_handshake_replayed_into_another_session_is_refused_before_any_vm() {
    use std::io::Write;
    // The original migration: accepted.
    let (a, b) = UnixStream::pair().unwrap();
    let first = thread::spawn(move || dest_handshake(&mut Channel::new(b), 0, |_| Ok(())));
    let mut ch = Channel::new(Recorder {
        inner: a,
        wrote: Vec::new(),
    });
    source_handshake(&mut ch, &description(), 0).unwrap();
    first.join().unwrap().unwrap();
    let recording = ch.into_inner().wrote;

    // The same bytes into a second destination session.
    let (mut a, b) = UnixStream::pair().unwrap();
    let second = thread::spawn(move || {
        dest_handshake(&mut Channel::new(b), 0, |_| {
            panic!("a replayed description must not get as far as building a VM")
        })
    });
    a.write_all(&recording).unwrap();
    let mut ch = Channel::new(a);
    assert!(matches!(ch.recv().unwrap(), Message::HelloAck { .. }));
    match ch.recv().unwrap() {
        Message::Refuse { reason } => assert!(reason.contains("session"), "{reason}"),
        other => panic!("expected Refuse, got {other:?}"),
    }
    let err = second.join().unwrap().unwrap_err();
    assert!(
        matches!(err, MigrationError::Protocol(ProtocolError::WrongSession)),
        "{err:?}"
    );
}

#[test]
fn every_session_gets_a_fresh_nonce() {
    let nonce = || {
        let (a, b) = UnixStream::pair().unwrap();
        let dest = thread::spawn(move || {
            let _ = crate::session::dest_hello(&mut Channel::new(b), 0);
        });
        let mut ch = Channel::new(a);
        ch.send(&Message::Hello {
            version: 2,
            features: 0,
        })
        .unwrap();
        let Message::HelloAck { session, .. } = ch.recv().unwrap() else {
            panic!("expected HelloAck")
        };
        drop(ch);
        dest.join().unwrap();
        session
    };
    let (x, y) = (nonce(), nonce());
    assert_ne!(x, y);
    assert_ne!(x, [0; 32]);
}
