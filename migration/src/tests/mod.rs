//! Cross-module tests: protocol round trips and refusals, decoder fuzzing, memory transfer
//! between two guest memories, and the session exchanges.

mod fuzz;
mod memory;
mod phases;
mod precopy;
mod protocol;
mod session;
mod throughput;
mod tls;

use crate::protocol::{DestTimings, DevicePhase, Message, RunState};
use crate::ranges::MemoryRange;

/// The description the protocol and session tests send: description.rs's own sample.
pub(crate) use crate::description::tests::sample as description;

/// One of every message that `Channel::send` carries (all but `MemoryPages`).
pub(crate) fn every_message() -> Vec<Message> {
    vec![
        Message::Hello {
            version: 1,
            features: 3,
        },
        Message::HelloAck {
            version: 1,
            features: 1,
            session: [0x5c; 32],
        },
        Message::Description {
            session: [0xc5; 32],
            desc: description(),
        },
        Message::Accept,
        Message::Refuse {
            reason: "CPUID leaf 0x7 differs ✗".into(),
        },
        Message::ZeroRanges(vec![
            MemoryRange::new(0, 4096),
            MemoryRange::new(1 << 32, 1 << 20),
        ]),
        Message::ZeroRanges(vec![]),
        Message::IterationEnd {
            iteration: 7,
            pages: 12345,
        },
        Message::DeviceData {
            device: "sampledev0".into(),
            phase: DevicePhase::PreCopy,
            data: (0..=255).collect(),
        },
        Message::DeviceData {
            device: "sampledev0".into(),
            phase: DevicePhase::StopCopy,
            data: vec![],
        },
        Message::DeviceAck {
            device: "sampledev0".into(),
        },
        Message::VcpuState {
            index: 1,
            data: vec![0xab; 4000],
        },
        Message::VmState {
            data: vec![1, 2, 3],
        },
        Message::DeviceState {
            device: "serial0".into(),
            data: vec![0x5a; 3 << 20],
        },
        Message::Complete { token: [1; 32] },
        Message::Ready { token: [2; 32] },
        Message::Go {
            guest: RunState::Running,
        },
        Message::Go {
            guest: RunState::Paused,
        },
        Message::Resumed(DestTimings {
            state_load_us: 1200,
            resume_us: 80,
        }),
        Message::Abandon {
            reason: "timeout".into(),
        },
    ]
}
