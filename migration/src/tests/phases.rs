//! Every message is valid only in its phase: the source, driven against a scripted fake
//! destination, fails before Go (so the guest stays with it) on anything out of place.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::description;
use crate::MigrationError;
use crate::dirty::{DirtyLog, RamSlot};
use crate::precopy::{
    DeviceHooks, Link, NoDevices, PrecopyEnd, PrecopyOptions, final_pass, run_precopy,
};
use crate::protocol::{Channel, DestTimings, Message, MessageType, ReturnPath};
use crate::protocol::{Nonce, RunState};
use crate::session::{EndError, dest_handshake, source_end, source_handshake};
use crate::stats::MigrationStats;

const WAIT: Duration = Duration::from_secs(5);

/// A destination that accepts the handshake, then sends `script` at once (before reading
/// anything more), then, if `answer` is set, echoes `Complete`'s token in a `Ready` and what
/// it sends after that. Returns every message type it read after the handshake.
fn fake_destination(
    b: UnixStream,
    script: Vec<Message>,
    answer: Option<Vec<Message>>,
) -> thread::JoinHandle<Vec<MessageType>> {
    thread::spawn(move || {
        let mut ch = Channel::new(b);
        dest_handshake(&mut ch, 0, |_| Ok(())).unwrap();
        for m in &script {
            ch.send(m).unwrap();
        }
        let mut seen = Vec::new();
        loop {
            let msg = match ch.recv() {
                Ok(Message::MemoryPages { .. }) => {
                    ch.discard_pending().unwrap();
                    seen.push(MessageType::MemoryPages);
                    continue;
                }
                Ok(m) => m,
                Err(_) => return seen,
            };
            seen.push(msg.message_type());
            if let (Message::Complete { token }, Some(after)) = (&msg, &answer) {
                let _ = ch.send(&Message::Ready { token: *token });
                for m in after {
                    ch.send(m).unwrap();
                }
            }
        }
    })
}

/// The source's handshake and end phase with no memory; returns the end's outcome and what
/// the fake destination read.
fn end_against(
    script: Vec<Message>,
    answer: Option<Vec<Message>>,
    mut on_ack: impl FnMut(String) -> Result<(), MigrationError>,
) -> (Result<DestTimings, EndError>, Vec<MessageType>) {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = fake_destination(b, script, answer);
    let mut ch = Channel::new(a);
    source_handshake(&mut ch, &description(), 0).unwrap();
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    // Let the scripted messages arrive first, as from a destination that sends them early.
    thread::sleep(Duration::from_millis(50));
    let end = source_end(&mut ch, &rp, WAIT, RunState::Running, &mut on_ack);
    let _ = ch.get_ref().shutdown(std::net::Shutdown::Both);
    drop(ch);
    drop(rp);
    (end, dest.join().unwrap())
}

fn assert_before_go(end: Result<DestTimings, EndError>, seen: &[MessageType], what: &str) {
    match end {
        Err(EndError::BeforeGo(e)) => assert!(e.to_string().contains(what), "{e}"),
        other => panic!("expected a failure before go, got {other:?}"),
    }
    assert!(!seen.contains(&MessageType::Go), "{seen:?}");
}

#[test]
fn a_ready_sent_before_complete_is_not_the_switchover_ready() {
    let early = Message::Ready { token: [0; 32] };
    let (end, seen) = end_against(vec![early], None, |_| Ok(()));
    assert_before_go(end, &seen, "out of phase");
}

#[test]
fn a_ready_with_another_token_is_refused_even_after_complete() {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        dest_handshake(&mut ch, 0, |_| Ok(())).unwrap();
        let Message::Complete { token } = ch.recv().unwrap() else {
            panic!("expected Complete")
        };
        let mut other: Nonce = token;
        other[0] ^= 1;
        ch.send(&Message::Ready { token: other }).unwrap();
        ch.recv().map(|m| m.message_type()).ok()
    });
    let mut ch = Channel::new(a);
    source_handshake(&mut ch, &description(), 0).unwrap();
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    let end = source_end(&mut ch, &rp, WAIT, RunState::Running, |_| Ok(()));
    assert!(matches!(end, Err(EndError::BeforeGo(_))), "{end:?}");
    let _ = ch.get_ref().shutdown(std::net::Shutdown::Both);
    drop(ch);
    assert_eq!(
        dest.join().unwrap(),
        None,
        "nothing (no Go) after the bad Ready"
    );
}

#[test]
fn a_resumed_before_ready_fails_before_go() {
    let early = Message::Resumed(DestTimings::default());
    let (end, seen) = end_against(vec![early], None, |_| Ok(()));
    assert_before_go(end, &seen, "Resumed");
}

#[test]
fn an_accept_or_hello_ack_out_of_the_handshake_fails_before_go() {
    let (end, seen) = end_against(vec![Message::Accept], None, |_| Ok(()));
    assert_before_go(end, &seen, "Accept");
}

#[test]
fn a_late_ack_for_an_unknown_device_fails_before_go() {
    let ack = Message::DeviceAck {
        device: "ghost".into(),
    };
    let (end, seen) = end_against(vec![ack], Some(vec![]), |d| NoDevices.acked(&d));
    assert_before_go(end, &seen, "ghost");
}

#[test]
fn a_repeated_ack_fails_before_go() {
    let ack = || Message::DeviceAck {
        device: "dev0".into(),
    };
    let mut acked = false;
    let once = |d: String| {
        if d != "dev0" || std::mem::replace(&mut acked, true) {
            return Err(crate::precopy::unknown_ack(&d));
        }
        Ok(())
    };
    let (end, seen) = end_against(vec![ack(), ack()], Some(vec![]), once);
    assert_before_go(end, &seen, "dev0");
}

#[test]
fn a_well_ordered_end_still_completes() {
    let resumed = Message::Resumed(DestTimings {
        state_load_us: 3,
        resume_us: 1,
    });
    let (end, seen) = end_against(vec![], Some(vec![resumed]), |_| Ok(()));
    assert_eq!(end.unwrap().state_load_us, 3);
    assert_eq!(seen, vec![MessageType::Complete, MessageType::Go]);
}

/// Pre-copy of a small RAM with no devices, against a destination that sends `script` right
/// after the handshake; then the final pass and end phase if pre-copy let it get there.
fn precopy_against(script: Vec<Message>) -> Result<(), String> {
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let mut log = DirtyLog::new(RamSlot::of_memory(&mem));
    let (a, b) = UnixStream::pair().unwrap();
    let resumed = Message::Resumed(DestTimings::default());
    let dest = fake_destination(b, script, Some(vec![resumed]));
    let mut ch = Channel::new(a);
    source_handshake(&mut ch, &description(), 0).unwrap();
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    thread::sleep(Duration::from_millis(50));
    let mut stats = MigrationStats::new(0x4_0000);
    let opts = PrecopyOptions::default();
    let mut run = || -> Result<(), String> {
        let link = Link {
            ch: &mut ch,
            rp: &rp,
            cancel: None,
        };
        let end = run_precopy(
            &mem,
            &mut log,
            link,
            &opts,
            &mut NoDevices,
            &mut stats,
            |_| {},
        )
        .map_err(|e| e.to_string())?;
        let PrecopyEnd::SwitchOver { pending, .. } = end else {
            return Err(format!("{end:?}"));
        };
        final_pass(&mem, &mut log, &mut ch, &pending, &opts.send, &mut stats)
            .map_err(|e| e.to_string())?;
        source_end(&mut ch, &rp, WAIT, RunState::Running, |d| {
            NoDevices.acked(&d)
        })
        .map(drop)
        .map_err(|e| e.to_string())
    };
    let out = run();
    let _ = ch.get_ref().shutdown(std::net::Shutdown::Both);
    drop(ch);
    let seen = dest.join().unwrap();
    if out.is_err() {
        assert!(!seen.contains(&MessageType::Go), "{seen:?}");
    }
    out
}

#[test]
fn precopy_fails_on_an_ack_for_a_device_that_is_not_migrating() {
    let ack = Message::DeviceAck {
        device: "ghost".into(),
    };
    let err = precopy_against(vec![ack]).unwrap_err();
    assert!(
        err.contains("ghost") && err.contains("out of phase"),
        "{err}"
    );
}

#[test]
fn precopy_fails_on_an_early_ready() {
    let err = precopy_against(vec![Message::Ready { token: [9; 32] }]).unwrap_err();
    assert!(err.contains("Ready"), "{err}");
}

#[test]
fn precopy_with_a_well_behaved_destination_reaches_go() {
    precopy_against(vec![]).unwrap();
}
