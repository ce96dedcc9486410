//! The migration stream: a sequence of records, each `{u32 tag; u32 len; u64 arg; u64 sum}`
//! followed by `len` bytes (a multiple of 8) of little-endian words. `sum` covers tag, arg,
//! len and the payload; the END record carries the count, byte length and chained sums of
//! all records before it, so truncation, loss, reordering and corruption are all detected.
//!
//! ```text
//! HEADER  arg 0     payload: magic, version, state size, page size
//! PAGE    arg page  payload: the page's state words (4 KiB; the last page may be shorter)
//! DEVICE  arg 0     payload: registers, config space, MSI-X, seed, waiting DMA (snapshot.rs)
//! END     arg 0     payload: records, bytes, chain
//! ```
//! Pre-copy sends HEADER and every PAGE (the initial data), then PAGE records of pages that
//! changed after they were sent; STOP_COPY adds the remaining pages, DEVICE and END.

use crate::pattern::{DIGEST_SEED, mix_word};

pub const MAGIC: u64 = u64::from_le_bytes(*b"SDVMIGv1");
pub const VERSION: u64 = 1;
pub const RECORD_HEADER: u64 = 24;
/// Largest payload a loader accepts; a page record is at most 4 KiB.
pub const MAX_PAYLOAD: u64 = 64 * 1024;
pub const HEADER_WORDS: usize = 4;
pub const END_WORDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Tag {
    Header = 1,
    Page = 2,
    Device = 3,
    End = 4,
}

impl Tag {
    pub fn from_u32(v: u32) -> Option<Tag> {
        [Tag::Header, Tag::Page, Tag::Device, Tag::End]
            .into_iter()
            .find(|t| *t as u32 == v)
    }
}

/// Size in the stream of a record with `words` payload words.
pub fn record_len(words: u64) -> u64 {
    RECORD_HEADER + words * 8
}

/// The checksum of a record.
pub fn record_sum(tag: u32, arg: u64, words: impl IntoIterator<Item = u64>) -> u64 {
    let mut n = 0u64;
    let h = words.into_iter().fold(
        mix_word(mix_word(DIGEST_SEED, u64::from(tag)), arg),
        |h, w| {
            n += 1;
            mix_word(h, w)
        },
    );
    mix_word(h, n * 8)
}

/// Appends a record to `out`; returns its checksum.
pub fn put_record(out: &mut Vec<u8>, tag: Tag, arg: u64, words: impl Iterator<Item = u64>) -> u64 {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER as usize]);
    let mut h = mix_word(mix_word(DIGEST_SEED, tag as u64), arg);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
        h = mix_word(h, w);
    }
    let len = (out.len() - start) as u64 - RECORD_HEADER;
    let sum = mix_word(h, len);
    let hdr = &mut out[start..start + RECORD_HEADER as usize];
    hdr[0..4].copy_from_slice(&(tag as u32).to_le_bytes());
    // Payloads are bounded by MAX_PAYLOAD.
    hdr[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    hdr[8..16].copy_from_slice(&arg.to_le_bytes());
    hdr[16..24].copy_from_slice(&sum.to_le_bytes());
    sum
}

/// A record header as read from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub tag: u32,
    pub len: u64,
    pub arg: u64,
    pub sum: u64,
}

impl RecordHeader {
    /// Parses the first 24 bytes of `b` (the caller has checked there are that many).
    pub fn parse(b: &[u8]) -> RecordHeader {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        RecordHeader {
            tag: u32::from_le_bytes(b[0..4].try_into().unwrap_or([0; 4])),
            len: u64::from(u32::from_le_bytes(b[4..8].try_into().unwrap_or([0; 4]))),
            arg: u64_at(8),
            sum: u64_at(16),
        }
    }
}

/// Little-endian words of a payload whose length is a multiple of 8.
pub fn words(payload: &[u8]) -> impl Iterator<Item = u64> + '_ {
    payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
}

/// Running account of the records of a stream, checked by END.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub records: u64,
    pub bytes: u64,
    pub value: u64,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            records: 0,
            bytes: 0,
            value: DIGEST_SEED,
        }
    }
}

impl Chain {
    pub fn add(&mut self, sum: u64, record_len: u64) {
        self.records += 1;
        self.bytes += record_len;
        self.value = mix_word(self.value, sum);
    }

    pub fn to_words(self) -> [u64; END_WORDS] {
        [self.records, self.bytes, self.value]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let mut out = vec![];
        let sum = put_record(&mut out, Tag::Page, 7, [1u64, 2, 3].into_iter());
        assert_eq!(out.len() as u64, record_len(3));
        let h = RecordHeader::parse(&out);
        assert_eq!((h.tag, h.len, h.arg, h.sum), (Tag::Page as u32, 24, 7, sum));
        assert_eq!(record_sum(h.tag, h.arg, words(&out[24..])), sum);
        out[30] ^= 1;
        assert_ne!(record_sum(h.tag, h.arg, words(&out[24..])), sum);
    }
}
