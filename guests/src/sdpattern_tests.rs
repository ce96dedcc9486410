//! Checks the guests' copy of sampledev's formulas (`programs/sdpattern.rs`) against values
//! computed with `sampledev::pattern` itself (copied here, so that this crate does not
//! depend on the device's).

use crate::sdpattern::*;

#[test]
fn splitmix64_matches_sampledev() {
    assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    assert_eq!(splitmix64(1), 0x910a_2dec_8902_5cc1);
}

#[test]
fn fill_word_matches_sampledev() {
    let cases = [
        (0x0, 0, 0xe220_a839_7b1d_cdaf),
        (0x5eed, 1, 0x50a0_d55d_8bf4_5801),
        (0x1234_5678_9abc_def0, 7, 0x378c_97e4_50a7_313f),
        (u64::MAX, 8191, 0xd453_64e7_3b7a_fd19),
    ];
    for (seed, word, want) in cases {
        assert_eq!(fill_word(seed, word), want, "fill_word({seed:#x}, {word})");
    }
}

#[test]
fn state_word_matches_sampledev() {
    assert_eq!(state_word(0x5eed, 0), 0x09f1_fd9d_03f0_a9b4);
    assert_eq!(state_word(0x5eed, 131_071), 0x4cb9_37fb_9bf5_6db0);
    assert_eq!(state_word(42, 3), 0xaa56_fe60_ce59_360a);
}

/// sampledev's InternalState with 64 words and seed 0x5eed after operations 1..=40.
const AFTER_40_OPS: [(u64, u64); 4] = [
    (0, 0x2367_50c1_4343_655f),
    (1, 0x9f4d_1e94_c46d_f200),
    (17, 0xd634_0139_89eb_9785),
    (63, 0x0728_2671_62a8_ddb6),
];
/// `checksum_step` folded over all 64 words of that state, in order.
const AFTER_40_OPS_FOLD: u64 = 0x0a90_8ca3_17e1_fdd0;

#[test]
fn state_model_follows_the_device() {
    let (mut known, mut values) = ([0u64; 1], [0u64; 64]);
    let mut model = StateModel::new(0x5eed, 64, &mut known, &mut values);
    assert_eq!(model.tracked(), 64);
    for op in 1..=40 {
        model.apply(op);
    }
    for (index, want) in AFTER_40_OPS {
        assert_eq!(model.expected(index), Some(want), "word {index}");
    }
    let fold = (0..64).fold(0, |s, i| checksum_step(s, model.expected(i).unwrap()));
    assert_eq!(fold, AFTER_40_OPS_FOLD);
    assert_eq!(model.expected(64), None);
}

#[test]
fn partly_tracked_state_agrees_on_what_it_tracks() {
    // A word's evolution depends only on that word, so tracking a prefix loses nothing there.
    let (mut known, mut values) = ([0u64; 1], [0u64; 32]);
    let mut model = StateModel::new(0x5eed, 64, &mut known, &mut values);
    assert_eq!(model.tracked(), 32);
    for op in 1..=40 {
        model.apply(op);
    }
    for (index, want) in AFTER_40_OPS.into_iter().filter(|&(i, _)| i < 32) {
        assert_eq!(model.expected(index), Some(want), "word {index}");
    }
    assert_eq!(model.expected(63), None);
}

#[test]
fn buffer_seeds_differ_between_rounds_and_buffers() {
    let mut seen = std::collections::HashSet::new();
    for round in 1..=50 {
        for buf in 0..64 {
            assert!(
                seen.insert(buffer_seed(round, buf)),
                "round {round} buf {buf}"
            );
        }
    }
}
