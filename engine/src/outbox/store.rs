//! The outbox on disk: notifications appended to segment files in key order, and a log of what
//! the sender acknowledged.
//!
//! Why not an LSM tree (fjall held the outbox before): every entry is written once, read once
//! and removed once, oldest first. In an LSM tree each entry passes through the memtable and the
//! tree's journal, is flushed, and its removal is a tombstone that compactions carry until it
//! meets the entry; measured, the tree's worker took a fifth of the engine's throughput while the
//! sender kept up. Here an entry costs an append to a file, and a removal a bit in memory and a
//! few bytes of the acknowledgement log.
//!
//! Segments (`<number>.qob`, numbered from 1) start with [`SEGMENT_MAGIC`], then frames: length
//! (`u16`, little-endian), key (12 bytes, [`NotificationKey::to_bytes`]), payload
//! ([`Notification::encode`]), CRC32C of the three. Keys strictly ascend across the segments. A
//! frame with an empty payload is a *watermark*: it carries a journal position up to which
//! notifications were enqueued although none was (a rebuild of the views keeps it, see
//! [`crate::views::reindex`]). The watermark is the position of the newest frame. A segment is
//! sealed (fsynced) once it holds [`SEGMENT_BYTES`]; the newest is fsynced by [`Store::sync`]
//! (before each views snapshot), so after a power cut it may have lost frames after the last
//! snapshot, which the views then enqueue again. A damaged frame at the end of the newest
//! segment is such a loss and is cut off; one anywhere else is an error naming file and offset.
//!
//! Acknowledgements (`acks.log`, after [`ACKS_MAGIC`]) are records: a count (`u32`), the *floor*
//! (every key below it is acknowledged), the acknowledged keys at or above the floor, CRC32C.
//! The sender acknowledges mostly in order, so a record is usually a floor alone. The last whole
//! record's floor and the keys of all records at or above it are what is acknowledged; a torn
//! last record is lost (those messages are sent again: delivery is at least once). The log is
//! rewritten as one record once it passes [`ACKS_REWRITE_AT`]. Segments wholly below the floor
//! are removed, the newest excepted.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Notification, NotificationKey};

/// A segment is sealed and the next begun once it holds this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// What every segment file starts with: the name and the format version.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"QPKOBX\x00\x01";
/// What the acknowledgement log starts with.
pub(crate) const ACKS_MAGIC: [u8; 8] = *b"QPKACK\x00\x01";
const HEADER_LEN: u64 = 8;
/// A frame's bytes besides its payload: length (2), key (12), CRC32C (4).
const FRAME_OVERHEAD: usize = 18;
/// Frames between two entries of a segment's sparse index: a lookup by key reads at most this
/// many frames (~4 KB) past its mark; the marks take under 1 % of what they index.
const MARK_EVERY: u64 = 32;
/// The acknowledgement log is rewritten as one record once it is this long.
const ACKS_REWRITE_AT: u64 = 4 * 1024 * 1024;
/// Bytes read from a segment at a time, at most (more than any frame), and at first.
const READ_CHUNK: usize = 256 * 1024;
const FIRST_READ: usize = 16 * 1024;
/// The key index of a watermark frame.
const WATERMARK_INDEX: u32 = u32::MAX;
/// How far behind a segment's end its write-back is started. Left to itself the kernel lets
/// seconds of frames pile up dirty and writes them in bursts that the journal's `fdatasync`s
/// queue behind; started at once, the pages would leave the cache before the sender reads them.
const WRITEBACK_LAG: u64 = 16 * 1024 * 1024;
const WRITEBACK_CHUNK: u64 = 1024 * 1024;
const ACKS_FILE: &str = "acks.log";
const ACKS_TEMP: &str = "acks.log.tmp";
const SEGMENT_SUFFIX: &str = ".qob";

fn damaged(path: &Path, offset: u64, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("outbox {}: {what} at offset {offset}", path.display()),
    )
}

/// Notifications framed for [`Store::append`], in ascending key order.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    bytes: Vec<u8>,
    count: usize,
    first: Option<NotificationKey>,
    last: Option<NotificationKey>,
}

impl Frames {
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
        self.first = None;
        self.last = None;
    }

    /// Notifications framed (watermarks included).
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Adds a notification after the ones before it (its key must be above theirs).
    pub(crate) fn push(&mut self, key: NotificationKey, notification: &Notification) {
        let start = self.frame_start(key);
        notification.encode_into(&mut self.bytes);
        self.frame_end(start);
    }

    /// Adds an entry as an earlier store kept it (an encoded [`Notification`]).
    pub(crate) fn push_encoded(&mut self, key: NotificationKey, payload: &[u8]) {
        let start = self.frame_start(key);
        self.bytes.extend_from_slice(&payload[..payload.len().min(usize::from(u16::MAX))]);
        self.frame_end(start);
    }

    /// Adds a watermark at `position`.
    fn push_watermark(&mut self, position: u64) {
        let start = self.frame_start(NotificationKey { position, index: WATERMARK_INDEX });
        self.frame_end(start);
    }

    fn frame_start(&mut self, key: NotificationKey) -> usize {
        debug_assert!(self.last.is_none_or(|last| last < key), "outbox frames out of order");
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes.extend_from_slice(&key.to_bytes());
        self.first.get_or_insert(key);
        self.last = Some(key);
        self.count += 1;
        start
    }

    fn frame_end(&mut self, start: usize) {
        let payload = self.bytes.len() - start - (FRAME_OVERHEAD - 4);
        // A notification is about a hundred bytes; nothing encodes near the limit.
        let length = u16::try_from(payload).unwrap_or(u16::MAX);
        self.bytes[start..start + 2].copy_from_slice(&length.to_le_bytes());
        let crc = crc32c::crc32c(&self.bytes[start..]);
        self.bytes.extend_from_slice(&crc.to_le_bytes());
    }
}

/// A frame at the front of some bytes.
enum Parsed<'a> {
    Frame {
        key: NotificationKey,
        payload: &'a [u8],
        len: usize,
    },
    /// Fewer bytes than the frame says it has.
    Short,
    /// The checksum or the key does not hold.
    Bad,
}

fn parse(bytes: &[u8]) -> Parsed<'_> {
    let Some(length) = bytes.get(..2) else { return Parsed::Short };
    let payload_len = usize::from(u16::from_le_bytes([length[0], length[1]]));
    let len = FRAME_OVERHEAD + payload_len;
    let Some(frame) = bytes.get(..len) else { return Parsed::Short };
    let (body, crc) = frame.split_at(len - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Parsed::Bad;
    }
    match NotificationKey::from_bytes(&body[2..14]) {
        Some(key) => Parsed::Frame { key, payload: &body[14..], len },
        None => Parsed::Bad,
    }
}

/// Why a walk over frames ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// At the end given.
    End,
    /// The visitor asked to stop at the frame at this offset.
    Visitor(u64),
    /// The frame at this offset is damaged or cut short.
    Damaged(u64),
}

/// Calls `visit(offset, key, payload)` with each frame of `file` from `from` up to `end`, in
/// order, until it returns false.
fn walk(
    file: &File,
    from: u64,
    end: u64,
    mut visit: impl FnMut(u64, NotificationKey, &[u8]) -> bool,
) -> io::Result<Stop> {
    // Most walks stop after a few frames: the reads start small and grow.
    let mut size = FIRST_READ;
    let mut buffer = Vec::new();
    let mut at = from;
    while at < end {
        let left = end - at;
        let n = usize::try_from(left).map_or(size, |left| left.min(size));
        buffer.resize(n, 0);
        file.read_exact_at(&mut buffer, at)?;
        let mut i = 0;
        while i < n {
            match parse(&buffer[i..]) {
                Parsed::Frame { key, payload, len } => {
                    if !visit(at + i as u64, key, payload) {
                        return Ok(Stop::Visitor(at + i as u64));
                    }
                    i += len;
                }
                // A frame longer than this read: read again, as much as any frame can be.
                Parsed::Short if i == 0 && (n as u64) < left && size < READ_CHUNK => break,
                // Cut short by the end.
                Parsed::Short if i == 0 => return Ok(Stop::Damaged(at)),
                Parsed::Short => break,
                Parsed::Bad => return Ok(Stop::Damaged(at + i as u64)),
            }
        }
        at += i as u64;
        size = (size * 2).min(READ_CHUNK);
    }
    Ok(Stop::End)
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    file: File,
    /// Bytes of whole frames, the header included: where the next frame goes.
    len: u64,
    /// Every [`MARK_EVERY`]th frame's key and offset, the first included.
    marks: Vec<(NotificationKey, u64)>,
    frames: u64,
    last: Option<NotificationKey>,
    /// Where write-back was last started up to.
    written_back: u64,
}

impl Segment {
    fn path(dir: &Path, number: u64) -> PathBuf {
        dir.join(format!("{number:020}{SEGMENT_SUFFIX}"))
    }

    fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let path = Segment::path(dir, number);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        file.write_all_at(&SEGMENT_MAGIC, 0)?;
        file.sync_data()?;
        File::open(dir)?.sync_all()?;
        Ok(Segment {
            number,
            path,
            file,
            len: HEADER_LEN,
            marks: Vec::new(),
            frames: 0,
            last: None,
            written_back: 0,
        })
    }

    /// Opens a segment and reads its frames. The newest segment's damaged tail is cut off; in
    /// any other, damage is an error. `after` is the key every frame must be above.
    fn open(path: PathBuf, number: u64, newest: bool, after: Option<NotificationKey>) -> io::Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let size = file.metadata()?.len();
        let mut magic = [0_u8; 8];
        if size < HEADER_LEN && newest {
            // Cut short while it was being created: nothing was ever written after its header.
            file.set_len(0)?;
            file.write_all_at(&SEGMENT_MAGIC, 0)?;
        } else {
            file.read_exact_at(&mut magic, 0)?;
            if magic != SEGMENT_MAGIC {
                return Err(damaged(&path, 0, "not an outbox segment of this release"));
            }
        }
        let mut segment = Segment {
            number,
            path,
            file,
            len: HEADER_LEN,
            marks: Vec::new(),
            frames: 0,
            last: None,
            written_back: 0,
        };
        let mut previous = after;
        let mut disorder = None;
        let mut noted = Vec::new();
        let stop = walk(&segment.file, HEADER_LEN, size.max(HEADER_LEN), |offset, key, _| {
            if previous.is_some_and(|previous| key <= previous) {
                disorder = Some(offset);
                return false;
            }
            previous = Some(key);
            noted.push((key, offset));
            true
        })?;
        for (key, offset) in noted {
            segment.note(key, offset);
        }
        let end = match (stop, disorder) {
            (Stop::End, _) => size.max(HEADER_LEN),
            (Stop::Visitor(offset), Some(_)) => {
                return Err(damaged(&segment.path, offset, "a frame whose key is not above the one before"));
            }
            (Stop::Visitor(offset) | Stop::Damaged(offset), _) if newest => {
                tracing::warn!(
                    segment = %segment.path.display(),
                    offset,
                    dropped = size - offset,
                    "outbox: a damaged tail is cut off; the views enqueue what it held again"
                );
                segment.file.set_len(offset)?;
                offset
            }
            (Stop::Visitor(offset) | Stop::Damaged(offset), _) => {
                return Err(damaged(&segment.path, offset, "a damaged frame"));
            }
        };
        segment.len = end;
        segment.written_back = end;
        Ok(segment)
    }

    /// Records a frame just added at `offset`.
    fn note(&mut self, key: NotificationKey, offset: u64) {
        if self.frames.is_multiple_of(MARK_EVERY) {
            self.marks.push((key, offset));
        }
        self.frames += 1;
        self.last = Some(key);
    }

    fn first(&self) -> Option<NotificationKey> {
        self.marks.first().map(|(key, _)| *key)
    }

    /// Where to start reading for the first frame at or above `key`: the mark at or below it.
    fn start_for(&self, key: NotificationKey) -> u64 {
        let after = self.marks.partition_point(|(mark, _)| *mark <= key);
        after.checked_sub(1).map_or(HEADER_LEN, |i| self.marks[i].1)
    }
}

/// A place in the segments: an index into them and an offset in that segment.
type Place = (usize, u64);

/// The store's state, behind one lock: the views thread appends, the sender reads and
/// acknowledges.
#[derive(Debug)]
struct State {
    dir: PathBuf,
    segment_bytes: u64,
    /// Oldest first; the last is the one appended to.
    segments: Vec<Segment>,
    /// The newest frame's key.
    last: Option<NotificationKey>,
    /// The first frame not known to be acknowledged (or the end).
    head: Place,
    /// Every key below it is acknowledged.
    floor: NotificationKey,
    /// Acknowledged keys at or above the floor.
    acked: BTreeSet<NotificationKey>,
    acks: File,
    acks_len: u64,
    /// The log's length at which it is rewritten: `rewrite_base` ([`ACKS_REWRITE_AT`]), or
    /// twice what the last rewrite left if that was more (many keys held above the floor).
    rewrite_at: u64,
    rewrite_base: u64,
}

/// The outbox's files. See the module documentation.
#[derive(Debug)]
pub(crate) struct Store {
    state: Mutex<State>,
}

impl Store {
    /// Opens (or creates) the outbox in `dir`.
    pub(crate) fn open(dir: &Path) -> io::Result<Store> {
        Store::open_with(dir, SEGMENT_BYTES)
    }

    /// As [`Store::open`], sealing segments at `segment_bytes`.
    pub(crate) fn open_with(dir: &Path, segment_bytes: u64) -> io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(number) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|n| n.parse::<u64>().ok()) {
                numbers.push(number);
            }
        }
        numbers.sort_unstable();
        let mut segments: Vec<Segment> = Vec::with_capacity(numbers.len().max(1));
        for (i, number) in numbers.iter().enumerate() {
            let after = segments.iter().rev().find_map(|s| s.last);
            let newest = i + 1 == numbers.len();
            segments.push(Segment::open(Segment::path(dir, *number), *number, newest, after)?);
        }
        if segments.is_empty() {
            segments.push(Segment::create(dir, 1)?);
        }
        let last = segments.iter().rev().find_map(|s| s.last);
        let (acks, acks_len, floor, acked) = read_acks(dir)?;
        let mut state = State {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(HEADER_LEN + 1),
            segments,
            last,
            head: (0, HEADER_LEN),
            floor,
            acked,
            acks,
            acks_len,
            rewrite_at: ACKS_REWRITE_AT,
            rewrite_base: ACKS_REWRITE_AT,
        };
        state.head = state.seek(floor)?;
        state.advance()?;
        state.remove_behind()?;
        Ok(Store { state: Mutex::new(state) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The journal position up to which notifications are enqueued: the newest frame's.
    pub(crate) fn watermark(&self) -> u64 {
        self.state().last.map_or(0, |key| key.position)
    }

    /// Appends `frames`, but for any at or below the newest frame's key (already here).
    pub(crate) fn append(&self, frames: &Frames) -> io::Result<()> {
        let mut state = self.state();
        let (Some(first), Some(last)) = (frames.first, frames.last) else { return Ok(()) };
        let skip = match state.last {
            Some(newest) if last <= newest => return Ok(()),
            Some(newest) if first <= newest => {
                let mut skip = 0;
                while let Parsed::Frame { key, len, .. } = parse(&frames.bytes[skip..]) {
                    if key > newest {
                        break;
                    }
                    skip += len;
                }
                skip
            }
            _ => 0,
        };
        state.write(&frames.bytes[skip..])
    }

    /// Raises the watermark to `position` if it is below (a frame that enqueues nothing).
    pub(crate) fn raise_watermark(&self, position: u64) -> io::Result<()> {
        if position <= self.watermark() {
            return Ok(());
        }
        let mut frames = Frames::default();
        frames.push_watermark(position);
        self.append(&frames)
    }

    /// Makes the newest segment durable (the sealed ones are).
    pub(crate) fn sync(&self) -> io::Result<()> {
        let state = self.state();
        state.segments.last().map_or(Ok(()), |segment| segment.file.sync_data())
    }

    /// Up to `n` entries not acknowledged, oldest first, from key `from` on (from the oldest
    /// if `None`). An entry that cannot be decoded (written by a newer release) is skipped
    /// with a warning and left in place.
    pub(crate) fn read(
        &self,
        from: Option<NotificationKey>,
        n: usize,
    ) -> io::Result<Vec<(NotificationKey, Notification)>> {
        let state = self.state();
        let start = match from {
            Some(from) if from > state.floor => state.seek(from)?,
            _ => state.head,
        };
        let mut found = Vec::with_capacity(n.min(4096));
        if n == 0 {
            return Ok(found);
        }
        let from = from.unwrap_or(state.floor);
        state.visit(start, |key, payload| {
            if key >= from && !payload.is_empty() && state.waiting(key) {
                match Notification::decode(payload) {
                    Some(notification) => found.push((key, notification)),
                    None => tracing::warn!(?key, "outbox: an undecodable entry is skipped"),
                }
            }
            found.len() < n
        })?;
        Ok(found)
    }

    /// The entry at `key`, if it is still waiting.
    pub(crate) fn get(&self, key: NotificationKey) -> io::Result<Option<Notification>> {
        let state = self.state();
        if !state.waiting(key) || state.last.is_none_or(|last| key > last) {
            return Ok(None);
        }
        let mut found = None;
        state.visit(state.seek(key)?, |at, payload| {
            if at == key {
                found = Notification::decode(payload);
            }
            false
        })?;
        Ok(found)
    }

    /// Acknowledges entries: they are never read again. Acknowledging one twice, or a key
    /// that is not there, changes nothing. The record reaches the operating system before this
    /// returns (not the disk: after a power cut a few may be sent again).
    pub(crate) fn ack(&self, keys: &[NotificationKey]) -> io::Result<()> {
        let mut state = self.state();
        let Some(last) = state.last else { return Ok(()) };
        let mut fresh = Vec::new();
        for key in keys {
            if *key <= last && state.waiting(*key) && state.acked.insert(*key) {
                fresh.push(*key);
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        state.advance()?;
        fresh.retain(|key| state.acked.contains(key));
        let floor = state.floor;
        state.log_acks(floor, &fresh)?;
        state.remove_behind()
    }

    /// Entries waiting, counted by a read of every one (for tests and metrics, not a hot loop).
    pub(crate) fn waiting(&self) -> io::Result<usize> {
        let state = self.state();
        let mut count = 0;
        state.visit(state.head, |key, payload| {
            count += usize::from(!payload.is_empty() && state.waiting(key));
            true
        })?;
        Ok(count)
    }

    /// Bytes of frames from the oldest one not known to be acknowledged to the end, and the
    /// segment files: how far the sender is behind, cheaply (no frame is read).
    pub(crate) fn backlog(&self) -> (u64, usize) {
        let state = self.state();
        let (head, offset) = state.head;
        let bytes = state
            .segments
            .iter()
            .enumerate()
            .skip(head)
            .map(|(i, s)| s.len.saturating_sub(if i == head { offset } else { HEADER_LEN }))
            .sum();
        (bytes, state.segments.len())
    }

    /// Rewrites the acknowledgement log once it reaches `bytes` (for tests).
    #[cfg(test)]
    fn rewrite_acks_at(&self, bytes: u64) {
        let mut state = self.state();
        (state.rewrite_at, state.rewrite_base) = (bytes, bytes);
    }

    /// Segment files on disk (for tests).
    #[cfg(test)]
    fn segment_numbers(&self) -> Vec<u64> {
        self.state().segments.iter().map(|s| s.number).collect()
    }
}

impl State {
    /// Whether `key` is not acknowledged.
    fn waiting(&self, key: NotificationKey) -> bool {
        key >= self.floor && !self.acked.contains(&key)
    }

    /// The place of the first frame at or above `key`.
    fn seek(&self, key: NotificationKey) -> io::Result<Place> {
        let Some(i) = self.segments.iter().rposition(|s| s.first().is_some_and(|first| first <= key)) else {
            return Ok((0, HEADER_LEN));
        };
        let segment = &self.segments[i];
        match walk(&segment.file, segment.start_for(key), segment.len, |_, at, _| at < key)? {
            Stop::Visitor(offset) => Ok((i, offset)),
            Stop::End => Ok((i, segment.len)),
            Stop::Damaged(offset) => Err(damaged(&segment.path, offset, "a damaged frame")),
        }
    }

    /// Calls `visit(key, payload)` with each frame from `place` on, until it returns false.
    fn visit(&self, place: Place, mut visit: impl FnMut(NotificationKey, &[u8]) -> bool) -> io::Result<()> {
        self.visit_places(place, |_, key, payload| visit(key, payload)).map(|_| ())
    }

    /// As [`State::visit`], with each frame's place; returns the place of the frame it stopped
    /// at, or of the end.
    fn visit_places(
        &self,
        (mut i, mut offset): Place,
        mut visit: impl FnMut(Place, NotificationKey, &[u8]) -> bool,
    ) -> io::Result<(Place, Option<NotificationKey>)> {
        while let Some(segment) = self.segments.get(i) {
            let mut stopped_at = None;
            let stop = walk(&segment.file, offset, segment.len, |at, key, payload| {
                if visit((i, at), key, payload) {
                    true
                } else {
                    stopped_at = Some(key);
                    false
                }
            })?;
            match stop {
                Stop::Visitor(at) => return Ok(((i, at), stopped_at)),
                Stop::Damaged(at) => return Err(damaged(&segment.path, at, "a damaged frame")),
                Stop::End if i + 1 == self.segments.len() => return Ok(((i, segment.len), None)),
                Stop::End => (i, offset) = (i + 1, HEADER_LEN),
            }
        }
        Ok(((i, offset), None))
    }

    /// Moves the head over acknowledged frames (and watermarks), raising the floor to the first
    /// frame still waiting.
    fn advance(&mut self) -> io::Result<()> {
        let mut acked = std::mem::take(&mut self.acked);
        let floor = self.floor;
        let result = self.visit_places(self.head, |_, key, payload| {
            payload.is_empty() || key < floor || acked.remove(&key)
        });
        let ((place, stopped), result) = match result {
            Ok(found) => (found, Ok(())),
            Err(error) => (((self.head), None), Err(error)),
        };
        self.head = place;
        let reached = match stopped {
            Some(key) => key,
            None => self.last.map_or(floor, NotificationKey::next),
        };
        self.floor = floor.max(reached);
        self.acked = acked.split_off(&self.floor);
        result
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let needs_new = self
            .segments
            .last()
            .is_none_or(|s| s.len > HEADER_LEN && s.len + bytes.len() as u64 > self.segment_bytes);
        if needs_new {
            let number = self.segments.last().map_or(1, |s| s.number + 1);
            if let Some(sealed) = self.segments.last() {
                sealed.file.set_len(sealed.len)?;
                sealed.file.sync_data()?;
            }
            self.segments.push(Segment::create(&self.dir, number)?);
        }
        let Some(segment) = self.segments.last_mut() else { return Ok(()) };
        let start = segment.len;
        if let Err(error) = segment.file.write_all_at(bytes, start) {
            // Whatever part was written is overwritten by the next append.
            let _ = segment.file.set_len(start);
            return Err(error);
        }
        let mut at = 0;
        while let Parsed::Frame { key, len, .. } = parse(&bytes[at..]) {
            segment.note(key, start + at as u64);
            at += len;
        }
        segment.len = start + at as u64;
        self.last = segment.last.or(self.last);
        let to = segment.len.saturating_sub(WRITEBACK_LAG) / WRITEBACK_CHUNK * WRITEBACK_CHUNK;
        if let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(segment.written_back)) {
            // Advice only: on Linux it starts write-back of the range's dirty pages and returns.
            let _advisory = rustix::fs::fadvise(
                &segment.file,
                segment.written_back,
                Some(len),
                rustix::fs::Advice::DontNeed,
            );
            segment.written_back = to;
        }
        Ok(())
    }

    /// Appends an acknowledgement record, rewriting the log as one record once it is long.
    fn log_acks(&mut self, floor: NotificationKey, keys: &[NotificationKey]) -> io::Result<()> {
        let record = ack_record(floor, keys.iter());
        self.acks.write_all_at(&record, self.acks_len)?;
        self.acks_len += record.len() as u64;
        if self.acks_len < self.rewrite_at {
            return Ok(());
        }
        let temp = self.dir.join(ACKS_TEMP);
        let mut bytes = ACKS_MAGIC.to_vec();
        bytes.extend_from_slice(&ack_record(self.floor, self.acked.iter()));
        std::fs::write(&temp, &bytes)?;
        File::open(&temp)?.sync_data()?;
        std::fs::rename(&temp, self.dir.join(ACKS_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.acks = OpenOptions::new().read(true).write(true).open(self.dir.join(ACKS_FILE))?;
        self.acks_len = bytes.len() as u64;
        self.rewrite_at = self.rewrite_base.max(self.acks_len.saturating_mul(2));
        Ok(())
    }

    /// Removes the segments wholly behind the head, but never the newest.
    fn remove_behind(&mut self) -> io::Result<()> {
        // A head at a segment's end is at the start of the next.
        while self.head.0 + 1 < self.segments.len() && self.head.1 >= self.segments[self.head.0].len {
            self.head = (self.head.0 + 1, HEADER_LEN);
        }
        let behind = self.head.0;
        for segment in self.segments.drain(..behind) {
            std::fs::remove_file(&segment.path)?;
        }
        self.head.0 = 0;
        Ok(())
    }
}

fn ack_record<'a>(
    floor: NotificationKey,
    keys: impl ExactSizeIterator<Item = &'a NotificationKey>,
) -> Vec<u8> {
    let mut record = Vec::with_capacity(4 + 12 + keys.len() * 12 + 4);
    record.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_le_bytes());
    record.extend_from_slice(&floor.to_bytes());
    for key in keys {
        record.extend_from_slice(&key.to_bytes());
    }
    let crc = crc32c::crc32c(&record);
    record.extend_from_slice(&crc.to_le_bytes());
    record
}

/// Opens the acknowledgement log: the file, its length, the floor and the keys acknowledged
/// at or above it. A damaged or torn tail is cut off.
fn read_acks(dir: &Path) -> io::Result<(File, u64, NotificationKey, BTreeSet<NotificationKey>)> {
    let path = dir.join(ACKS_FILE);
    let _ = std::fs::remove_file(dir.join(ACKS_TEMP));
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    let bytes = std::fs::read(&path)?;
    let mut floor = NotificationKey { position: 0, index: 0 };
    let mut acked = BTreeSet::new();
    if bytes.len() < ACKS_MAGIC.len() {
        file.set_len(0)?;
        file.write_all_at(&ACKS_MAGIC, 0)?;
        return Ok((file, ACKS_MAGIC.len() as u64, floor, acked));
    }
    if bytes[..ACKS_MAGIC.len()] != ACKS_MAGIC {
        return Err(damaged(&path, 0, "not an outbox acknowledgement log of this release"));
    }
    let mut at = ACKS_MAGIC.len();
    while let Some(count) = bytes.get(at..at + 4) {
        let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let Some(len) = count.checked_mul(12).and_then(|keys| keys.checked_add(4 + 12 + 4)) else { break };
        let Some(record) = bytes.get(at..at + len) else { break };
        let (body, crc) = record.split_at(len - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            break;
        }
        let keys: Option<Vec<NotificationKey>> =
            body[4..].chunks_exact(12).map(NotificationKey::from_bytes).collect();
        let Some(keys) = keys else { break };
        floor = floor.max(keys[0]);
        acked.extend(keys[1..].iter().copied());
        at += len;
    }
    if at < bytes.len() {
        tracing::warn!(
            log = %path.display(),
            offset = at,
            dropped = bytes.len() - at,
            "outbox: a torn acknowledgement is cut off; what it acknowledged is sent again"
        );
        file.set_len(at as u64)?;
    }
    let acked = acked.split_off(&floor);
    Ok((file, at as u64, floor, acked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(position: u64, index: u32) -> NotificationKey {
        NotificationKey { position, index }
    }

    fn blocked(at: u64) -> Notification {
        Notification::Blocked { msisdn: 994_501_234_567, flag: 1, at }
    }

    fn frames(keys: &[NotificationKey]) -> Frames {
        let mut frames = Frames::default();
        for k in keys {
            frames.push(*k, &blocked(k.position));
        }
        frames
    }

    fn positions(found: &[(NotificationKey, Notification)]) -> Vec<u64> {
        found.iter().map(|(k, _)| k.position).collect()
    }

    #[test]
    fn entries_are_read_in_order_until_acknowledged_across_reopens() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        assert_eq!((store.watermark(), store.waiting()?), (0, 0));
        store.append(&frames(&[key(1, 0), key(2, 0), key(3, 0), key(3, 1), key(5, 0)]))?;
        assert_eq!(store.watermark(), 5);
        assert_eq!(positions(&store.read(None, 10)?), [1, 2, 3, 3, 5]);
        assert_eq!(positions(&store.read(None, 2)?), [1, 2]);
        // Out of order: the second and the fourth.
        store.ack(&[key(2, 0), key(3, 1)])?;
        assert_eq!(positions(&store.read(None, 10)?), [1, 3, 5]);
        assert_eq!(store.get(key(3, 1))?, None);
        assert_eq!(store.get(key(3, 0))?, Some(blocked(3)));
        assert_eq!(store.get(key(4, 0))?, None);
        // Reading on from where a reader stopped; a start below the floor is the floor.
        assert_eq!(positions(&store.read(Some(key(3, 0).next()), 10)?), [5]);
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(positions(&store.read(None, 10)?), [1, 3, 5]);
        store.ack(&[key(1, 0), key(3, 0)])?;
        assert_eq!(positions(&store.read(Some(key(0, 0)), 10)?), [5]);
        assert_eq!(store.waiting()?, 1);
        // Acknowledging twice, or what is not there (yet), changes nothing.
        store.ack(&[key(1, 0), key(6, 0), key(4, 0)])?;
        store.append(&frames(&[key(6, 0)]))?;
        assert_eq!(positions(&store.read(None, 10)?), [5, 6]);
        store.ack(&[key(5, 0), key(6, 0)])?;
        assert!(store.read(None, 10)?.is_empty());
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!((store.waiting()?, store.watermark()), (0, 6));
        Ok(())
    }

    #[test]
    fn an_append_again_adds_only_what_is_new_and_watermarks_enqueue_nothing() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.append(&frames(&[key(1, 0), key(2, 0)]))?;
        store.append(&frames(&[key(1, 0), key(2, 0), key(4, 0)]))?;
        store.append(&frames(&[key(2, 0)]))?;
        assert_eq!(positions(&store.read(None, 10)?), [1, 2, 4]);
        store.raise_watermark(9)?;
        store.raise_watermark(7)?;
        assert_eq!((store.watermark(), store.waiting()?), (9, 3));
        store.append(&frames(&[key(8, 0), key(10, 0)]))?;
        assert_eq!(positions(&store.read(None, 10)?), [1, 2, 4, 10]);
        store.ack(&[key(1, 0), key(2, 0), key(4, 0), key(10, 0)])?;
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!((store.waiting()?, store.watermark()), (0, 10));
        Ok(())
    }

    #[test]
    fn segments_roll_and_go_once_acknowledged() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open_with(dir.path(), 1_000)?;
        for position in 1..=100 {
            store.append(&frames(&[key(position, 0), key(position, 1)]))?;
        }
        let numbers = store.segment_numbers();
        assert!(numbers.len() > 5, "{numbers:?}");
        assert_eq!(store.waiting()?, 200);
        // Reads and lookups cross segments, and sparse marks inside them.
        assert_eq!(positions(&store.read(Some(key(50, 1)), 3)?), [50, 51, 51]);
        assert_eq!(store.get(key(77, 1))?, Some(blocked(77)));
        let (all, segments) = store.backlog();
        assert_eq!(segments, numbers.len());
        let half: Vec<_> = (1..=50).flat_map(|p| [key(p, 0), key(p, 1)]).collect();
        store.ack(&half)?;
        let (rest, fewer) = store.backlog();
        assert!(rest * 2 <= all + 200 && rest * 2 + 200 >= all && fewer < segments, "{all} {rest} {fewer}");
        let left = store.segment_numbers();
        assert!(left.len() < numbers.len() && left.last() == numbers.last(), "{left:?}");
        drop(store);
        let store = Store::open_with(dir.path(), 1_000)?;
        assert_eq!(store.read(None, 1)?.first().map(|(k, _)| *k), Some(key(51, 0)));
        assert_eq!(store.waiting()?, 100);
        let rest: Vec<_> = (51..=100).flat_map(|p| [key(p, 0), key(p, 1)]).collect();
        store.ack(&rest)?;
        assert_eq!(store.backlog(), (0, 1));
        // The newest segment stays: it holds the watermark.
        assert_eq!(store.segment_numbers(), numbers.last().copied().into_iter().collect::<Vec<_>>());
        drop(store);
        let store = Store::open_with(dir.path(), 1_000)?;
        assert_eq!((store.waiting()?, store.watermark()), (0, 100));
        Ok(())
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_before_it_is_an_error() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.append(&frames(&[key(1, 0), key(2, 0), key(3, 0)]))?;
        drop(store);
        let path = Segment::path(dir.path(), 1);
        let full = std::fs::read(&path)?;
        let frame = (full.len() - SEGMENT_MAGIC.len()) / 3;
        // Every cut inside the last frame loses that frame only.
        for cut in (full.len() - frame + 1)..full.len() {
            std::fs::write(&path, &full[..cut])?;
            let store = Store::open(dir.path())?;
            assert_eq!((positions(&store.read(None, 10)?), store.watermark()), (vec![1, 2], 2), "cut {cut}");
        }
        // A flipped bit in the last frame: the same.
        let mut flipped = full.clone();
        flipped[full.len() - 6] ^= 0x10;
        std::fs::write(&path, &flipped)?;
        assert_eq!(positions(&Store::open(dir.path())?.read(None, 10)?), [1, 2]);
        // Damage in a sealed segment halts the open, naming file and offset.
        std::fs::write(&path, &full)?;
        let store = Store::open_with(dir.path(), 1)?;
        store.append(&frames(&[key(4, 0)]))?;
        drop(store);
        let mut sealed = full;
        sealed[SEGMENT_MAGIC.len() + 3] ^= 1;
        std::fs::write(&path, &sealed)?;
        let error = Store::open(dir.path()).expect_err("damage before the tail");
        let message = error.to_string();
        assert!(message.contains("00000000000000000001.qob") && message.contains("offset 8"), "{message}");
        // A file that is not a segment, and an acknowledgement log that is not one.
        std::fs::write(&path, b"something else")?;
        assert!(Store::open(dir.path()).is_err());
        Ok(())
    }

    #[test]
    fn a_torn_acknowledgement_sends_again_only_what_it_held() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.append(&frames(&[key(1, 0), key(2, 0), key(3, 0)]))?;
        store.ack(&[key(1, 0)])?;
        store.ack(&[key(3, 0)])?;
        drop(store);
        let path = dir.path().join(ACKS_FILE);
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() - 1])?;
        let store = Store::open(dir.path())?;
        assert_eq!(positions(&store.read(None, 10)?), [2, 3]);
        drop(store);
        std::fs::write(&path, b"QPKACK\x00\x09")?;
        assert!(Store::open(dir.path()).is_err());
        Ok(())
    }

    #[test]
    fn a_long_acknowledgement_log_is_rewritten_without_losing_a_key() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.rewrite_acks_at(4_096);
        // In each run of 300 the first is held back while the rest are acknowledged (each kept
        // as a key above the floor), then acknowledged (and the floor passes them all). The last
        // run's first stays.
        let keys: Vec<_> = (1..=3_000).map(|p| key(p, 0)).collect();
        store.append(&frames(&keys))?;
        for (i, run) in keys.chunks(300).enumerate() {
            for chunk in run[1..].chunks(10) {
                store.ack(chunk)?;
            }
            if i < 9 {
                store.ack(&run[..1])?;
            }
        }
        // Kept whole it would hold every key (36 KB); rewritten, at most twice the largest set.
        let len = std::fs::metadata(dir.path().join(ACKS_FILE))?.len();
        assert!(len < 2 * 299 * 12 + 4_096, "{len}");
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(positions(&store.read(None, 10)?), [2_701]);
        store.ack(&[key(2_701, 0)])?;
        assert_eq!(store.waiting()?, 0);
        drop(store);
        assert_eq!(Store::open(dir.path())?.waiting()?, 0);
        Ok(())
    }

    /// A step of the model test.
    #[derive(Debug, Clone)]
    enum Step {
        /// Entries at the next positions: how many positions to skip before each, and how
        /// many entries each position has.
        Append(Vec<(u8, u8)>),
        /// A watermark this many positions past the newest.
        Watermark(u8),
        /// Acknowledge the waiting entries at these indexes (modulo), and a key that is not one.
        Ack(Vec<u16>, bool),
        /// Read `n` from the waiting entry at this index (modulo), or from the oldest.
        Read(Option<u16>, u8),
        /// Look up the waiting entry at this index (modulo).
        Get(u16),
        /// Drop the store and open it again.
        Reopen,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => proptest::collection::vec((0_u8..3, 1_u8..4), 1..12).prop_map(Step::Append),
            1 => (1_u8..5).prop_map(Step::Watermark),
            4 => (proptest::collection::vec(any::<u16>(), 0..10), any::<bool>()).prop_map(|(i, b)| Step::Ack(i, b)),
            2 => (proptest::option::of(any::<u16>()), 0_u8..20).prop_map(|(i, n)| Step::Read(i, n)),
            1 => any::<u16>().prop_map(Step::Get),
            1 => Just(Step::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// The store against a map of waiting entries, through appends, watermarks,
        /// acknowledgements in any order, reads, lookups and reopens, with segments small
        /// enough to roll every few appends and be removed as acknowledgements pass them.
        #[test]
        fn the_store_behaves_as_a_map_of_waiting_entries(steps in proptest::collection::vec(step(), 1..60)) {
            let dir = tempfile::tempdir().expect("temp dir");
            let open = || Store::open_with(dir.path(), 400).expect("open");
            let mut store = open();
            let mut model = std::collections::BTreeMap::<NotificationKey, Notification>::new();
            let mut newest = 0_u64;
            for step in steps {
                match step {
                    Step::Append(positions) => {
                        let mut batch = Frames::default();
                        for (skip, count) in positions {
                            newest += 1 + u64::from(skip);
                            for index in 0..u32::from(count) {
                                let key = key(newest, index);
                                let notification = blocked(newest * 10 + u64::from(index));
                                batch.push(key, &notification);
                                model.insert(key, notification);
                            }
                        }
                        store.append(&batch).expect("append");
                        // Appending the same again adds nothing.
                        store.append(&batch).expect("append again");
                    }
                    Step::Watermark(ahead) => {
                        newest += u64::from(ahead);
                        store.raise_watermark(newest).expect("watermark");
                    }
                    Step::Ack(indexes, bogus) => {
                        let waiting: Vec<NotificationKey> = model.keys().copied().collect();
                        let mut keys: Vec<NotificationKey> = if waiting.is_empty() {
                            Vec::new()
                        } else {
                            indexes.iter().map(|i| waiting[usize::from(*i) % waiting.len()]).collect()
                        };
                        if bogus {
                            keys.push(key(newest, 1_000));
                            keys.push(key(newest + 1, 0));
                        }
                        store.ack(&keys).expect("ack");
                        for key in &keys {
                            model.remove(key);
                        }
                    }
                    Step::Read(from, n) => {
                        let waiting: Vec<NotificationKey> = model.keys().copied().collect();
                        let from = from.filter(|_| !waiting.is_empty()).map(|i| waiting[usize::from(i) % waiting.len()]);
                        let expected: Vec<_> = model
                            .range(from.unwrap_or(key(0, 0))..)
                            .take(usize::from(n))
                            .map(|(k, v)| (*k, *v))
                            .collect();
                        proptest::prop_assert_eq!(store.read(from, usize::from(n)).expect("read"), expected);
                    }
                    Step::Get(index) => {
                        let waiting: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
                        if let Some((key, notification)) = waiting.get(usize::from(index) % waiting.len().max(1)) {
                            proptest::prop_assert_eq!(store.get(*key).expect("get"), Some(*notification));
                        }
                        proptest::prop_assert_eq!(store.get(key(newest + 1, 0)).expect("get"), None);
                    }
                    Step::Reopen => {
                        drop(store);
                        store = open();
                    }
                }
                let all: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
                proptest::prop_assert_eq!(store.read(None, usize::MAX).expect("read all"), all);
                proptest::prop_assert_eq!(store.waiting().expect("waiting"), model.len());
                proptest::prop_assert_eq!(store.watermark(), newest);
            }
            // A reopen removes nothing that is still needed: at most segments wholly behind
            // the floor (removed at acknowledgements and at open), never the newest.
            let numbers = store.segment_numbers();
            drop(store);
            let store = open();
            let reopened = store.segment_numbers();
            proptest::prop_assert!(!reopened.is_empty() && numbers.ends_with(&reopened), "{:?} then {:?}", numbers, reopened);
            let all: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
            proptest::prop_assert_eq!(store.read(None, usize::MAX).expect("read all"), all);
        }
    }
}
