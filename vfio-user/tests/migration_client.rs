//! The client's migration methods against a scripted server: what each reply means, how
//! DMA log reports are split into messages, and which malformed replies are refused.

mod common;

use std::os::unix::net::UnixStream;

use common::*;
use vfio_user::vfio::*;
use vfio_user::{
    DeviceFeature, DmaLoggingReport, Error, Header, MigData, MigDataRead, MigState, MigStateData,
    encode_mig_data, encode_u64, send_message,
};

fn error_reply(s: &UnixStream, req: &Header, errno: i32) {
    send_message(s, &Header::error_reply_to(req, errno), &[], &[]).unwrap();
}

/// Answers one DEVICE_FEATURE with `data` under the request's flags.
fn feature_reply(s: &UnixStream, data: Vec<u8>) -> DeviceFeature {
    let m = recv(s);
    let f = DeviceFeature::decode(&m.payload).unwrap();
    let r = DeviceFeature {
        argsz: (8 + data.len()) as u32,
        flags: f.flags,
        data,
    };
    reply(s, &m.header, &r.encode());
    f
}

#[test]
fn feature_replies_and_their_meaning() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        error_reply(&s, &m.header, libc::ENOTTY);
        feature_reply(&s, encode_u64(VFIO_MIGRATION_P2P));
        feature_reply(
            &s,
            encode_u64(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P),
        );
        let set = feature_reply(&s, vec![]);
        assert_eq!(set.index(), VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
        assert_eq!(MigStateData::decode(&set.data).unwrap().device_state, 5);
        let bad = MigStateData {
            device_state: 9,
            data_fd: -1,
        };
        feature_reply(&s, bad.encode());
        let m = recv(&s);
        error_reply(&s, &m.header, libc::EINVAL);
    });
    assert_eq!(c.migration_features().unwrap(), None);
    assert!(matches!(c.migration_features(), Err(Error::Malformed(_))));
    let flags = c.migration_features().unwrap();
    assert_eq!(flags, Some(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P));
    c.set_mig_state(MigState::RunningP2p).unwrap();
    assert!(matches!(c.get_mig_state(), Err(Error::Malformed(_))));
    let probe = c.probe_feature(VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_SET);
    assert!(!probe.unwrap());
    t.join().unwrap();
}

#[test]
fn data_reads_end_not_now_and_oversize() {
    let (c, t) = fake(|s| {
        for answer in 0..4 {
            let m = recv(&s);
            let r = MigDataRead::decode(&m.payload).unwrap();
            assert_eq!(r.size, 4096, "bounded by the negotiated transfer size");
            match answer {
                0 => reply(&s, &m.header, &encode_mig_data(&[7; 100])),
                1 => error_reply(&s, &m.header, libc::ENOMSG),
                2 => reply(&s, &m.header, &encode_mig_data(&[])),
                _ => reply(&s, &m.header, &encode_mig_data(&[0; 4097])),
            }
        }
    });
    assert_eq!(
        c.mig_data_read(1 << 20).unwrap(),
        MigData::Bytes(vec![7; 100])
    );
    assert_eq!(c.mig_data_read(1 << 20).unwrap(), MigData::NotNow);
    assert_eq!(c.mig_data_read(1 << 20).unwrap(), MigData::End);
    assert!(matches!(
        c.mig_data_read(1 << 20),
        Err(Error::TooLarge { .. })
    ));
    t.join().unwrap();
}

#[test]
fn writes_are_split_to_the_transfer_size() {
    let (c, t) = fake(|s| {
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = recv(&s);
            got.extend_from_slice(vfio_user::decode_mig_data(&m.payload).unwrap());
            reply(&s, &m.header, &[]);
        }
        assert_eq!(got, (0..10000u32).map(|i| i as u8).collect::<Vec<_>>());
    });
    let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
    c.mig_data_write(&data).unwrap();
    t.join().unwrap();
}

/// Pages per report message with a 4096-byte transfer size: 4064 bitmap bytes, whole words.
const PAGES_PER_MSG: u64 = 508 * 64;

#[test]
fn reports_split_on_word_boundaries_and_concatenate() {
    let total = 2 * PAGES_PER_MSG + 100;
    let (c, t) = fake(move |s| {
        let mut next = 0x1000_0000u64;
        for _ in 0..3 {
            let m = recv(&s);
            let f = DeviceFeature::decode(&m.payload).unwrap();
            let (r, _) = DmaLoggingReport::decode(&f.data).unwrap();
            assert_eq!((r.iova, r.page_size), (next, 4096));
            next += r.length;
            // The first and last page of each piece are dirty.
            let pages = r.pages().unwrap();
            let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
            bitmap[0] |= 1;
            bitmap[((pages - 1) / 64) as usize] |= 1 << ((pages - 1) % 64);
            let mut data = r.encode();
            bitmap
                .iter()
                .for_each(|w| data.extend_from_slice(&w.to_le_bytes()));
            let out = DeviceFeature {
                argsz: (8 + data.len()) as u32,
                flags: f.flags,
                data,
            };
            reply(&s, &m.header, &out.encode());
        }
        assert_eq!(next, 0x1000_0000 + total * 4096);
    });
    let bitmap = c
        .dma_logging_report(0x1000_0000, total * 4096, 4096)
        .unwrap();
    assert_eq!(bitmap.len() as u64, total.div_ceil(64));
    let set: Vec<u64> = (0..total)
        .filter(|p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    let m = PAGES_PER_MSG;
    assert_eq!(set, [0, m - 1, m, 2 * m - 1, 2 * m, total - 1]);
    t.join().unwrap();
}

#[test]
fn report_with_a_wrong_echo_is_refused() {
    let (c, t) = fake(|s| {
        let m = recv(&s);
        let f = DeviceFeature::decode(&m.payload).unwrap();
        let (mut r, _) = DmaLoggingReport::decode(&f.data).unwrap();
        r.iova += 4096;
        let mut data = r.encode();
        data.extend_from_slice(&[0; 8]);
        let out = DeviceFeature {
            argsz: (8 + data.len()) as u32,
            flags: f.flags,
            data,
        };
        reply(&s, &m.header, &out.encode());
    });
    let e = c.dma_logging_report(0, 64 * 4096, 4096).unwrap_err();
    assert!(matches!(e, Error::Malformed(_)), "{e}");
    assert!(
        c.dma_logging_report(0, 4096, 3000).is_err(),
        "page size not a power of two"
    );
    t.join().unwrap();
}
