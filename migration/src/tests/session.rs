//! Handshake and two-phase end between a source and a destination thread.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use super::description;
use crate::MigrationError;
use crate::protocol::{Channel, DestTimings, Message, ProtocolError, ReturnPath, features};
use crate::session::{
    EndError, abandon, dest_confirm, dest_handshake, dest_ready, source_end, source_handshake,
};

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
        assert_eq!(ch.recv().unwrap(), Message::Complete);
        dest_ready(&mut ch).unwrap();
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
    ch.send(&Message::Complete).unwrap();
    let mut acks = Vec::new();
    let t = source_end(&mut ch, &rp, Duration::from_secs(5), |d| acks.push(d)).unwrap();
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
        assert_eq!(ch.recv().unwrap(), Message::Complete);
        abandon(&mut ch, "device state did not load");
    });
    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    ch.send(&Message::Complete).unwrap();
    let err = source_end(&mut ch, &rp, Duration::from_secs(5), |_| {}).unwrap_err();
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
        dest_ready(&mut ch).unwrap();
        ch // keep the socket open, never confirm
    });
    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    let err = source_end(&mut ch, &rp, Duration::from_millis(100), |_| {}).unwrap_err();
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
