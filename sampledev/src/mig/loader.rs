//! The RESUMING side: takes the stream in any chunking, checks every record as it completes
//! and stages the state; nothing touches the device until `finish` (the RESUMING → STOP arc)
//! found the stream whole and valid.

use crate::bitset::DenseBits;
use crate::mig::snapshot::Snapshot;
use crate::mig::stream::{
    Chain, END_WORDS, HEADER_WORDS, MAGIC, MAX_PAYLOAD, RECORD_HEADER, RecordHeader, Tag, VERSION,
    record_sum, words,
};
use crate::options::IrqMode;
use crate::state::{InternalState, STATE_PAGE_SIZE};

/// Staged state: every word, and which pages the stream has covered.
struct Staged {
    words: Vec<u64>,
    covered: DenseBits,
}

pub struct Loader {
    /// The probe state tells the expected size and page layout; its content is unused.
    layout: InternalState,
    /// The interrupt of the device being restored; its config space must match.
    irq: IrqMode,
    /// Bytes of an incomplete record.
    buf: Vec<u8>,
    staged: Option<Staged>,
    snapshot: Option<Snapshot>,
    chain: Chain,
    ended: bool,
    failed: Option<String>,
}

impl Loader {
    pub fn new(state_size: u64, irq: IrqMode) -> Loader {
        Loader {
            layout: InternalState::new(state_size, 0),
            irq,
            buf: Vec::new(),
            staged: None,
            snapshot: None,
            chain: Chain::default(),
            ended: false,
            failed: None,
        }
    }

    /// Takes more stream bytes. An error poisons the session: the stream is refused.
    pub fn write(&mut self, data: &[u8]) -> Result<(), String> {
        if let Some(why) = &self.failed {
            return Err(format!("stream already refused: {why}"));
        }
        let r = self.take(data);
        if let Err(why) = &r {
            self.failed = Some(why.clone());
        }
        r
    }

    fn take(&mut self, data: &[u8]) -> Result<(), String> {
        if self.ended && !data.is_empty() {
            return Err("data after the end record".into());
        }
        // Taken out so that records can be read from it while `self` is updated.
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(data);
        let mut at = 0;
        while buf.len() - at >= RECORD_HEADER as usize {
            let h = RecordHeader::parse(&buf[at..]);
            if h.len > MAX_PAYLOAD || !h.len.is_multiple_of(8) {
                return Err(format!("record with a {}-byte payload", h.len));
            }
            let end = at + (RECORD_HEADER + h.len) as usize;
            if buf.len() < end {
                break;
            }
            self.record(&h, &buf[at + RECORD_HEADER as usize..end])?;
            at = end;
        }
        buf.drain(..at);
        self.buf = buf;
        if self.ended && !self.buf.is_empty() {
            return Err("data after the end record".into());
        }
        Ok(())
    }

    fn record(&mut self, h: &RecordHeader, payload: &[u8]) -> Result<(), String> {
        if record_sum(h.tag, h.arg, words(payload)) != h.sum {
            return Err(format!(
                "checksum mismatch in record {}",
                self.chain.records
            ));
        }
        let tag = Tag::from_u32(h.tag).ok_or_else(|| format!("unknown record tag {}", h.tag))?;
        if tag != Tag::Header && self.staged.is_none() {
            return Err("stream does not start with a header".into());
        }
        let w: Vec<u64> = words(payload).collect();
        match tag {
            Tag::Header => self.header(&w)?,
            Tag::Page => self.page(h.arg, &w)?,
            Tag::Device => self.device(&w)?,
            Tag::End => return self.end(&w),
        }
        self.chain.add(h.sum, RECORD_HEADER + h.len);
        Ok(())
    }

    fn header(&mut self, w: &[u64]) -> Result<(), String> {
        if self.staged.is_some() {
            return Err("second header record".into());
        }
        let want = [MAGIC, VERSION, self.layout.size(), STATE_PAGE_SIZE];
        if w.len() != HEADER_WORDS || w[..2] != want[..2] {
            return Err("not a sampledev migration stream of version 1".into());
        }
        if w[2..] != want[2..] {
            return Err(format!(
                "stream is for {} bytes of state in {}-byte pages; this device has {}",
                w[2],
                w[3],
                self.layout.size()
            ));
        }
        let n = self.layout.word_count() as usize;
        let mut words = Vec::new();
        words
            .try_reserve_exact(n)
            .map_err(|_| format!("cannot stage {} bytes of state", self.layout.size()))?;
        words.resize(n, 0);
        let covered = DenseBits::new(self.layout.pages()).ok_or("cannot track pages")?;
        self.staged = Some(Staged { words, covered });
        Ok(())
    }

    fn page(&mut self, p: u64, w: &[u64]) -> Result<(), String> {
        let range = self.layout.page_words(p);
        let staged = self.staged.as_mut().ok_or("page before header")?;
        if p >= self.layout.pages() || w.len() as u64 != range.end - range.start {
            return Err(format!("page record {p} of {} words", w.len()));
        }
        staged.words[range.start as usize..range.end as usize].copy_from_slice(w);
        staged.covered.set(p);
        Ok(())
    }

    fn device(&mut self, w: &[u64]) -> Result<(), String> {
        if self.snapshot.is_some() {
            return Err("second device record".into());
        }
        self.snapshot = Some(Snapshot::from_words(w, self.layout.size(), self.irq)?);
        Ok(())
    }

    fn end(&mut self, w: &[u64]) -> Result<(), String> {
        if w.len() != END_WORDS || w != self.chain.to_words() {
            return Err(format!(
                "end record {w:?} does not match the {} records received",
                self.chain.records
            ));
        }
        self.ended = true;
        Ok(())
    }

    /// The validated result: the device record and the state to install.
    pub fn finish(self) -> Result<(Snapshot, InternalState), String> {
        if let Some(why) = self.failed {
            return Err(why);
        }
        if !self.ended {
            return Err(format!(
                "stream truncated: no end record after {} records",
                self.chain.records
            ));
        }
        let (Some(staged), Some(snap)) = (self.staged, self.snapshot) else {
            return Err("stream lacks the header or the device record".into());
        };
        let pages = self.layout.pages();
        if let Some(p) = (0..pages).find(|&p| !staged.covered.get(p)) {
            return Err(format!("stream never carried page {p}"));
        }
        let state = InternalState::from_words(snap.seed, staged.words);
        Ok((snap, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Core;
    use crate::mig::saver::Saver;

    fn stream(core: &mut Core, corrupt: bool) -> Vec<u8> {
        let mut s = Saver::new(core, true, corrupt).unwrap();
        let mut all = vec![];
        loop {
            let d = s.read(core, 1000);
            if d.is_empty() {
                return all;
            }
            all.extend(d);
        }
    }

    #[test]
    fn any_chunking_loads_and_damage_is_refused() {
        let mut core = Core::new(2 * 4096 + 16);
        core.state.set_word(5, 55).unwrap();
        core.regs.counter = 9;
        let s = stream(&mut core, false);
        for chunk in [1, 7, 24, 4096, s.len()] {
            let mut l = Loader::new(core.state.size(), core.irq());
            s.chunks(chunk).for_each(|c| l.write(c).unwrap());
            let (snap, state) = l.finish().unwrap();
            assert_eq!((snap.regs.counter, state.word(5)), (9, 55));
            assert_eq!(state.digest(), core.state.digest());
        }
        let mut l = Loader::new(core.state.size(), core.irq());
        l.write(&s[..s.len() - 1]).unwrap();
        assert!(l.finish().unwrap_err().contains("truncated"));
        let bad = stream(&mut core, true);
        let mut l = Loader::new(core.state.size(), core.irq());
        assert!(l.write(&bad).unwrap_err().contains("checksum"));
        assert!(l.write(&[]).is_err());
        let mut other = Loader::new(4096, IrqMode::Msix);
        assert!(other.write(&s).unwrap_err().contains("bytes of state"));
        let mut l = Loader::new(core.state.size(), core.irq());
        let mut extra = s.clone();
        extra.extend_from_slice(&[0; 24]);
        assert!(l.write(&extra).is_err());
    }
}
