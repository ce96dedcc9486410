//! The fixed exchanges at both ends of a migration: handshake with the VM description, and
//! the two-phase end (source Complete → destination Ready → source Go → destination Resumed).
//!
//! Every message is valid only in its phase: the destination's `Description` must echo its
//! session nonce (a replayed recording cannot), and its `Ready` must echo the token of the
//! source's `Complete` (an early `Ready` cannot).
//!
//! The rule the end phase protects: before `Go`, any failure leaves the guest with the source
//! (which resumes it); after `Go`, the destination may already be running it, so the source
//! must never resume on its own. [`EndError`] says which side of that line a failure fell on.

use std::io::{Read, Write};
use std::time::Duration;

use crate::MigrationError;
use crate::description::VmDescription;
use crate::protocol::{
    Channel, DestTimings, Message, MessageType, Nonce, PROTOCOL_VERSION, ProtocolError, ReturnPath,
    RunState, fresh_nonce,
};

/// Source: `Hello` → `HelloAck`, then `Description` → `Accept`. Returns the granted features.
pub fn source_handshake<S: Read + Write>(
    ch: &mut Channel<S>,
    desc: &VmDescription,
    features: u64,
) -> Result<u64, MigrationError> {
    ch.send(&Message::Hello {
        version: PROTOCOL_VERSION.into(),
        features,
    })?;
    let (granted, session) = match ch.recv()? {
        Message::HelloAck {
            features: f,
            session,
            ..
        } => (f & features, session),
        other => return Err(ProtocolError::unexpected("HelloAck", other).into()),
    };
    ch.send(&Message::Description {
        session,
        desc: desc.clone(),
    })?;
    match ch.recv()? {
        Message::Accept => Ok(granted),
        other => Err(ProtocolError::unexpected("Accept", other).into()),
    }
}

/// Destination: answers `Hello` granting the intersection of features, then receives the
/// description and asks `check` whether this side can take the VM (compare with the local
/// configuration, build the paused VM). A refusal goes back with its reason, and is returned.
pub fn dest_handshake<S, F>(
    ch: &mut Channel<S>,
    features: u64,
    check: F,
) -> Result<(VmDescription, u64), MigrationError>
where
    S: Read + Write,
    F: FnOnce(&VmDescription) -> Result<(), String>,
{
    let (desc, granted) = dest_hello(ch, features)?;
    dest_answer(ch, &desc, check)?;
    Ok((desc, granted))
}

/// Destination, first half of the handshake: `Hello` → `HelloAck` with a fresh session nonce,
/// then the `Description`, which must echo that nonce (a replayed recording carries another
/// one and is refused here, before any VM is built). Everything here is sized and paced by a peer nobody has vetted yet, so a caller bounds it
/// with one deadline. A frame that cannot be decoded (a malformed or oversized description,
/// garbage) is answered with a `Refuse` naming the problem, best effort, before the error.
pub fn dest_hello<S: Read + Write>(
    ch: &mut Channel<S>,
    features: u64,
) -> Result<(VmDescription, u64), MigrationError> {
    let granted = match ch.recv() {
        Ok(Message::Hello { features: f, .. }) => f & features,
        Ok(other) => return Err(refuse(ch, ProtocolError::unexpected("Hello", other))),
        Err(e) => return Err(refuse(ch, e)),
    };
    let nonce = fresh_nonce().map_err(ProtocolError::from)?;
    ch.send(&Message::HelloAck {
        version: PROTOCOL_VERSION.into(),
        features: granted,
        session: nonce,
    })?;
    match ch.recv() {
        Ok(Message::Description { session, desc }) if session == nonce => Ok((desc, granted)),
        Ok(Message::Description { .. }) => Err(refuse(ch, ProtocolError::WrongSession)),
        Ok(other) => Err(refuse(ch, ProtocolError::unexpected("Description", other))),
        Err(e) => Err(refuse(ch, e)),
    }
}

/// Destination, second half: `check` the description, then `Accept` or `Refuse` with its
/// reason (which is returned as the error).
pub fn dest_answer<S, F>(
    ch: &mut Channel<S>,
    desc: &VmDescription,
    check: F,
) -> Result<(), MigrationError>
where
    S: Read + Write,
    F: FnOnce(&VmDescription) -> Result<(), String>,
{
    if let Err(reason) = check(desc) {
        ch.send(&Message::Refuse {
            reason: reason.clone(),
        })?;
        return Err(ProtocolError::Refused(reason).into());
    }
    ch.send(&Message::Accept)?;
    Ok(())
}

/// Tells a peer whose frame this side could not take why (unless the connection itself is
/// the problem, or the peer already said no), and returns the error.
fn refuse<S: Write>(ch: &mut Channel<S>, e: ProtocolError) -> MigrationError {
    let tell = !(e.is_timeout()
        || matches!(
            e,
            ProtocolError::Closed
                | ProtocolError::Io(_)
                | ProtocolError::Refused(_)
                | ProtocolError::Abandoned(_)
        ));
    if tell {
        let reason = e.to_string();
        if let Err(send) = ch.send(&Message::Refuse { reason }) {
            log::debug!("could not send Refuse: {send}");
        }
    }
    e.into()
}

/// A failed end phase, split by whether `Go` had been sent.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    /// The destination never got `Go`: resume the guest on the source.
    #[error("switchover failed before go (source keeps the guest): {0}")]
    BeforeGo(MigrationError),
    /// `Go` went out but `Resumed` did not come back: the guest may run on the destination;
    /// the source must stay paused and report.
    #[error("no confirmation after go (guest state unknown, source stays paused): {0}")]
    AfterGo(MigrationError),
}

/// Source, with all state sent: sends `Complete` with a fresh token, waits for the `Ready`
/// that echoes it, sends `Go` telling the destination whether to run the guest, and waits for
/// `Resumed`. Late `DeviceAck`s go to `on_ack`, whose error (an unknown or repeated device)
/// fails the migration before Go; so does any other message. Each wait is bounded by
/// `timeout`.
pub fn source_end<S: Write>(
    ch: &mut Channel<S>,
    rp: &ReturnPath,
    timeout: Duration,
    guest: RunState,
    mut on_ack: impl FnMut(String) -> Result<(), MigrationError>,
) -> Result<DestTimings, EndError> {
    let timed = |e: ProtocolError| match e {
        ProtocolError::Timeout => ProtocolError::TimedOut(timeout),
        e => e,
    };
    let before = |e: ProtocolError| EndError::BeforeGo(timed(e).into());
    let token = fresh_nonce().map_err(|e| before(e.into()))?;
    ch.send(&Message::Complete { token }).map_err(before)?;
    loop {
        match rp.recv_timeout(timeout).map_err(before)? {
            Message::Ready { token: t } if t == token => break,
            Message::Ready { .. } => return Err(before(early_ready())),
            Message::DeviceAck { device } => on_ack(device).map_err(EndError::BeforeGo)?,
            other => return Err(before(ProtocolError::unexpected("Ready", other))),
        }
    }
    ch.send(&Message::Go { guest }).map_err(before)?;
    let after = |e: ProtocolError| EndError::AfterGo(timed(e).into());
    match rp.recv_timeout(timeout).map_err(after)? {
        Message::Resumed(t) => Ok(t),
        other => Err(after(ProtocolError::unexpected("Resumed", other))),
    }
}

fn early_ready() -> ProtocolError {
    ProtocolError::out_of_phase(
        MessageType::Ready,
        "it does not answer this Complete (sent before it?)",
    )
}

/// Destination, with everything loaded: sends `Ready` echoing the `token` of the source's
/// `Complete` and waits for `Go`, which says whether the guest runs (an operator's pause on
/// the source is kept). An error (or the source's `Abandon`) means: discard the VM. The wait
/// is bounded by the socket's read timeout, which the caller sets.
pub fn dest_ready<S: Read + Write>(
    ch: &mut Channel<S>,
    token: Nonce,
) -> Result<RunState, MigrationError> {
    ch.send(&Message::Ready { token })?;
    match ch.recv()? {
        Message::Go { guest } => Ok(guest),
        other => Err(ProtocolError::unexpected("Go", other).into()),
    }
}

/// Destination, vCPUs running: confirms with its timings for the source's statistics.
pub fn dest_confirm<S: Write>(ch: &mut Channel<S>, t: DestTimings) -> Result<(), MigrationError> {
    ch.send(&Message::Resumed(t))?;
    Ok(())
}

/// Tells the peer the migration is off; best effort, since the connection may be the reason.
pub fn abandon<S: Write>(ch: &mut Channel<S>, reason: &str) {
    let reason: String = reason
        .chars()
        .take(crate::protocol::MAX_TEXT_LEN / 4)
        .collect();
    if let Err(e) = ch.send(&Message::Abandon { reason }) {
        log::debug!("could not send Abandon: {e}");
    }
}
