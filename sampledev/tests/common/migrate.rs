//! Migration drivers over two clients, doing what a VMM does with the v2 protocol.

use vfio_user::{Client, MigData, MigState};

/// Reads pre-copy data until the device has none now (ENOMSG); returns the bytes read.
pub fn read_precopy(c: &Client, out: &mut Vec<u8>) -> usize {
    let before = out.len();
    loop {
        match c.mig_data_read(1 << 20).unwrap() {
            MigData::Bytes(b) => out.extend_from_slice(&b),
            MigData::NotNow => return out.len() - before,
            MigData::End => panic!("end of stream in pre-copy"),
        }
    }
}

/// Reads STOP_COPY data to the end of the stream.
pub fn read_to_end(c: &Client, out: &mut Vec<u8>) {
    loop {
        match c.mig_data_read(1 << 20).unwrap() {
            MigData::Bytes(b) => out.extend_from_slice(&b),
            MigData::End => return,
            MigData::NotNow => panic!("ENOMSG in STOP_COPY"),
        }
    }
}

/// The source's switchover: RUNNING_P2P-quiesce, STOP_COPY, read to the end, STOP.
pub fn stop_copy(src: &Client, stream: &mut Vec<u8>) {
    let now = src.get_mig_state().unwrap();
    let quiesced = if now == MigState::PreCopy {
        MigState::PreCopyP2p
    } else {
        MigState::RunningP2p
    };
    src.set_mig_state(quiesced).unwrap();
    src.set_mig_state(MigState::StopCopy).unwrap();
    read_to_end(src, stream);
    src.set_mig_state(MigState::Stop).unwrap();
}

/// The destination: RESUMING, the stream in `chunk`-byte writes, then STOP (which validates).
pub fn load(dst: &Client, stream: &[u8], chunk: usize) -> vfio_user::Result<()> {
    dst.set_mig_state(MigState::Resuming)?;
    for piece in stream.chunks(chunk) {
        dst.mig_data_write(piece)?;
    }
    dst.set_mig_state(MigState::Stop)
}

/// A whole v2 migration without pre-copy; leaves the destination RUNNING.
pub fn migrate_plain(src: &Client, dst: &Client) {
    let mut stream = Vec::new();
    stop_copy(src, &mut stream);
    load(dst, &stream, 1 << 20).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
}
