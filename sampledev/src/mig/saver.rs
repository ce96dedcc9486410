//! The saving side of a data session (PRE_COPY, PRE_COPY_P2P, STOP_COPY): produces the stream
//! lazily, a record at a time, as the client reads. Pre-copy sends the header and every page
//! (the initial bytes), then pages that changed after being sent (the dirty bytes); once
//! stopped, the rest, the device record and the end record.

use vfio_user::PrecopyInfo;

use crate::core::Core;
use crate::mig::snapshot::{SNAPSHOT_WORDS, Snapshot};
use crate::mig::stream::{
    Chain, END_WORDS, HEADER_WORDS, MAGIC, Tag, VERSION, put_record, record_len,
};
use crate::state::{InternalState, NoMemory, STATE_PAGE_SIZE};

pub struct Saver {
    /// In STOP_COPY: the device no longer changes, and the stream can end.
    stopped: bool,
    /// Generated, not yet read: `out[pos..]`.
    out: Vec<u8>,
    pos: usize,
    header_done: bool,
    /// Next page of the initial pass.
    next_page: u64,
    /// Initial bytes not read yet; they come first in the stream.
    initial_left: u64,
    finished: bool,
    chain: Chain,
    corrupt: bool,
}

fn page_len(s: &InternalState, p: u64) -> u64 {
    record_len(s.page_words(p).end - s.page_words(p).start)
}

/// Bytes of the page records `from..` of the initial pass.
fn pages_from(s: &InternalState, from: u64) -> u64 {
    let pages = s.pages();
    if from >= pages {
        return 0;
    }
    (pages - 1 - from) * record_len(STATE_PAGE_SIZE / 8) + page_len(s, pages - 1)
}

const HEADER_LEN: u64 = RECORD_HEADER_LEN + HEADER_WORDS as u64 * 8;
const RECORD_HEADER_LEN: u64 = crate::mig::stream::RECORD_HEADER;
const TAIL_LEN: u64 = RECORD_HEADER_LEN * 2 + (SNAPSHOT_WORDS + END_WORDS) as u64 * 8;

impl Saver {
    /// A session starting now; the state starts recording which pages change. Even when
    /// stopped: a client that writes the STATE window in STOP_COPY (which the uAPI tells it
    /// not to) still gets a stream that matches the device.
    pub fn new(core: &mut Core, stopped: bool, corrupt: bool) -> Result<Saver, NoMemory> {
        core.state.start_tracking()?;
        Ok(Saver {
            stopped,
            out: Vec::new(),
            pos: 0,
            header_done: false,
            next_page: 0,
            initial_left: HEADER_LEN + pages_from(&core.state, 0),
            finished: false,
            chain: Chain::default(),
            corrupt,
        })
    }

    /// PRE_COPY(_P2P) → STOP_COPY: same session, the stream may now end.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Stream bytes of a whole session started now with no pre-copy (MIG_DATA_SIZE outside
    /// a session).
    pub fn full_size(core: &Core) -> u64 {
        HEADER_LEN + pages_from(&core.state, 0) + TAIL_LEN
    }

    /// Up to `max` next bytes; empty when nothing is available now (pre-copy) or ever
    /// (stopped and finished).
    pub fn read(&mut self, core: &mut Core, max: usize) -> Vec<u8> {
        if self.pos > 0 {
            self.out.drain(..self.pos);
            self.pos = 0;
        }
        while self.out.len() < max && self.produce(core) {}
        let n = max.min(self.out.len());
        let data = self.out[..n].to_vec();
        self.pos = n;
        self.initial_left -= (n as u64).min(self.initial_left);
        data
    }

    /// Appends the next record; false when there is none now.
    fn produce(&mut self, core: &mut Core) -> bool {
        if !self.header_done {
            let hdr = [MAGIC, VERSION, core.state.size(), STATE_PAGE_SIZE];
            self.record(Tag::Header, 0, hdr.into_iter());
            self.header_done = true;
        } else if self.next_page < core.state.pages() {
            // Captured now: a change from here on makes it dirty again.
            core.state.take_changed(self.next_page);
            self.page(&core.state, self.next_page);
            self.next_page += 1;
        } else if let Some(p) = core.state.first_changed_below(self.next_page) {
            core.state.take_changed(p);
            self.page(&core.state, p);
        } else if self.stopped && !self.finished {
            self.tail(core);
            self.finished = true;
        } else {
            return false;
        }
        true
    }

    fn record(&mut self, tag: Tag, arg: u64, words: impl Iterator<Item = u64>) {
        let start = self.out.len();
        let sum = put_record(&mut self.out, tag, arg, words);
        self.chain.add(sum, (self.out.len() - start) as u64);
    }

    fn page(&mut self, state: &InternalState, p: u64) {
        self.record(Tag::Page, p, state.page_words(p).map(|i| state.word(i)));
    }

    fn tail(&mut self, core: &Core) {
        let start = self.out.len();
        self.record(
            Tag::Device,
            0,
            Snapshot::capture(core).to_words().into_iter(),
        );
        let end = self.chain.to_words();
        put_record(&mut self.out, Tag::End, 0, end.into_iter());
        if self.corrupt {
            // After the checksum: a byte of DMA_SRC in the device record.
            let at = start + RECORD_HEADER_LEN as usize + 8;
            self.out[at] ^= 0x40;
            log::warn!("--corrupt-stream: flipped a bit of the STOP_COPY data");
        }
    }

    /// Bytes of pages already sent that changed since.
    fn dirty_page_bytes(&self, s: &InternalState) -> u64 {
        let n = s.changed_below(self.next_page);
        let full = n * record_len(STATE_PAGE_SIZE / 8);
        let last = s.pages() - 1;
        if last < self.next_page && s.is_changed(last) {
            full - record_len(STATE_PAGE_SIZE / 8) + page_len(s, last)
        } else {
            full
        }
    }

    fn unread(&self) -> u64 {
        (self.out.len() - self.pos) as u64
    }

    pub fn precopy_info(&self, core: &Core) -> PrecopyInfo {
        let beyond_initial = self.unread() - self.unread().min(self.initial_left);
        PrecopyInfo {
            initial_bytes: self.initial_left,
            dirty_bytes: beyond_initial + self.dirty_page_bytes(&core.state),
        }
    }

    /// Bytes still to come if the device stopped now; exact once stopped.
    pub fn remaining(&self, core: &Core) -> u64 {
        let header = if self.header_done { 0 } else { HEADER_LEN };
        let tail = if self.finished { 0 } else { TAIL_LEN };
        self.unread()
            + header
            + pages_from(&core.state, self.next_page)
            + self.dirty_page_bytes(&core.state)
            + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut Saver, core: &mut Core) -> Vec<u8> {
        let mut all = vec![];
        loop {
            let d = s.read(core, 5000);
            if d.is_empty() {
                return all;
            }
            all.extend(d);
        }
    }

    #[test]
    fn precopy_then_stop_accounts_exactly() {
        let mut core = Core::new(3 * 4096 + 64);
        let mut s = Saver::new(&mut core, false, false).unwrap();
        let initial = s.precopy_info(&core).initial_bytes;
        assert_eq!(initial, HEADER_LEN + 3 * record_len(512) + record_len(8));
        let first = drain(&mut s, &mut core);
        assert_eq!(first.len() as u64, initial);
        assert_eq!(s.precopy_info(&core), PrecopyInfo::default());
        core.state.set_word(3 * 512 + 1, 7).unwrap();
        assert_eq!(s.precopy_info(&core).dirty_bytes, record_len(8));
        s.stop();
        let left = s.remaining(&core);
        assert_eq!(drain(&mut s, &mut core).len() as u64, left);
        assert_eq!(s.remaining(&core), 0);
        assert_eq!(Saver::full_size(&core), initial + TAIL_LEN);
    }

    #[test]
    fn change_in_stop_copy_is_still_sent() {
        let mut core = Core::new(2 * 4096);
        let mut s = Saver::new(&mut core, true, false).unwrap();
        let first = s.read(&mut core, 200);
        core.state.set_word(1, 11).unwrap();
        let mut stream = first;
        stream.extend(drain(&mut s, &mut core));
        let mut l = crate::mig::loader::Loader::new(2 * 4096, crate::options::IrqMode::Msix);
        l.write(&stream).unwrap();
        assert_eq!(l.finish().unwrap().1.word(1), 11);
    }
}
