//! The journal: the write-ahead log every state change goes through before anyone hears of it.
//!
//! An append-only sequence of segment files named by the byte position they start at
//! (`00000000000000000000.wal`, ...). Each holds frames ([`frame`]) of rkyv records ([`record`]):
//! a [`record::WalRecord::Meta`] first, then shard batches. Positions are global byte offsets.
//!
//! One writer thread ([`spawn_writer`]) does group commit: it drains every batch the shards have
//! queued, writes them with one `write`, makes them durable with one `fdatasync`, and only then
//! hands back their completions (the replies). A failed `fdatasync` is never retried: the page
//! cache may have dropped the dirty pages, so a retry could report success for lost data (the
//! "fsyncgate" lesson). The writer marks the journal failed and stops; the engine stops with it.
//!
//! [`scan`] reads records back for recovery, the views and `check`: a torn tail is reported (and
//! truncated when asked), corruption anywhere else is an error naming the segment and offset.

pub mod frame;
pub mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::Receiver;

use self::frame::FrameRead;
use self::record::{FORMAT_VERSION, RecordError, WalRecord};

const SEGMENT_SUFFIX: &str = ".wal";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal io error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("journal corrupt in segment {segment} at offset {offset}: {reason}")]
    Corrupt { segment: PathBuf, offset: u64, reason: String },
    #[error("journal was written with {found} shards but the engine is configured with {expected}")]
    ShardCountMismatch { found: u16, expected: u16 },
    #[error(
        "journal fdatasync failed on {path}: {source}; refusing to continue (no retry after a failed sync)"
    )]
    SyncFailed { path: PathBuf, source: io::Error },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

/// Upper bounds (µs) of the `fdatasync` latency buckets.
pub const SYNC_BUCKETS_US: [u64; 11] =
    [250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000];

/// Shared between the writer and readers: how far the journal is durable, and its health.
#[derive(Debug, Default)]
pub struct JournalState {
    durable: AtomicU64,
    failed: AtomicBool,
    lock: Mutex<()>,
    advanced: Condvar,
    pub syncs: AtomicU64,
    pub sync_ns_total: AtomicU64,
    /// `fdatasync` durations: counts at or below each of [`SYNC_BUCKETS_US`], then above all.
    pub sync_buckets: [AtomicU64; SYNC_BUCKETS_US.len() + 1],
    pub bytes_written: AtomicU64,
    pub batches_written: AtomicU64,
}

impl JournalState {
    pub fn new(durable: u64) -> Arc<JournalState> {
        let state = JournalState::default();
        state.durable.store(durable, Ordering::Release);
        Arc::new(state)
    }

    /// Every byte before this position is durable.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn advance(&self, position: u64) {
        self.durable.store(position, Ordering::Release);
        let _guard = self.lock.lock();
        self.advanced.notify_all();
    }

    /// Marks the journal failed from outside the writer (a shard that panicked): every caller
    /// then gets `Stopped`.
    pub fn mark_failed(&self) {
        self.fail();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        let _guard = self.lock.lock();
        self.advanced.notify_all();
    }

    /// Blocks until the durable position passes `position`, the journal fails, or `timeout`.
    pub fn wait_past(&self, position: u64, timeout: std::time::Duration) -> u64 {
        let guard = self.lock.lock().unwrap_or_else(|poison| poison.into_inner());
        if self.durable() > position || self.failed() {
            return self.durable();
        }
        let _unused = self.advanced.wait_timeout(guard, timeout);
        self.durable()
    }
}

/// What a shard hands the writer: encoded frames, and what to do once they are durable.
#[derive(Debug)]
pub struct JournalBatch<T> {
    pub frames: Vec<u8>,
    pub completion: T,
    /// Cross-shard credit steps this batch's shard forwarded, less those it applied. The writer
    /// keeps the running sum: while it is above zero a credit step is on its way to the journal,
    /// and a small group waits for it (see [`WriterConfig::linger`]).
    pub credits_due: i32,
}

/// How long a small group waits for a credit step on its way (the default of
/// [`WriterConfig::linger`]), so that a lone cross-shard transfer's reserve and credit share one
/// `fdatasync` instead of taking two in a row.
pub const LINGER_MAX: std::time::Duration = std::time::Duration::from_micros(200);
/// Groups at least this large do not wait: under load the next group fills while this one
/// syncs, and waiting would only add latency.
pub const LINGER_GROUP_MAX: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub dir: PathBuf,
    pub shard_count: u16,
    /// A segment is closed and a new one started once it reaches this many bytes.
    pub segment_len_max: u64,
    /// One group commit writes at most about this many bytes.
    pub group_len_max: usize,
    /// How long a group under [`LINGER_GROUP_MAX`] bytes waits for a credit step that is on its
    /// way (see [`JournalBatch::credits_due`]); [`LINGER_MAX`] by default.
    pub linger: std::time::Duration,
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}{SEGMENT_SUFFIX}"))
}

/// The journal's segments, oldest first, as (start position, path).
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(error) => return Err(io_error(dir)(error)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if let Ok(start) = stem.parse::<u64>() {
            found.push((start, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Whether a scan may cut a torn tail off the last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailRepair {
    Truncate,
    ReportOnly,
}

/// What a scan found at the end of the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEnd {
    /// The position after the last valid record: where the next append goes.
    pub position: u64,
    /// Bytes of torn tail found after it (and truncated, if asked).
    pub torn_bytes: u64,
    /// The shard count the segments were written with, if any segment was read.
    pub shard_count: Option<u16>,
}

/// Reads every record at or after `from`, in order, calling `visit(position, record)` where
/// `position` is the record's end. Stops at the first error `visit` returns.
pub fn scan<E: From<JournalError>>(
    dir: &Path,
    from: u64,
    repair: TailRepair,
    mut visit: impl FnMut(u64, WalRecord) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let segments = segments(dir)?;
    let mut end = ScanEnd { position: from, torn_bytes: 0, shard_count: None };
    let last = segments.len().saturating_sub(1);
    for (index, (start, path)) in segments.iter().enumerate() {
        let next_start = segments.get(index + 1).map(|(s, _)| *s);
        if next_start.is_some_and(|next| next <= from) {
            continue;
        }
        let bytes = fs::read(path).map_err(io_error(path))?;
        let mut offset = usize::try_from(from.saturating_sub(*start)).unwrap_or(usize::MAX);
        // The meta record at the start is read even when `from` is past it.
        if let FrameRead::Frame { version, payload, .. } = frame::read_frame(&bytes)
            && let Ok(WalRecord::Meta { shard_count }) = record::decode_record(version, payload)
        {
            end.shard_count = Some(shard_count);
        }
        // The end of the group the scan is in: damage before it is inside that group.
        let mut group_end = 0_usize;
        while offset < bytes.len() {
            let corrupt = |reason: String| JournalError::Corrupt {
                segment: path.clone(),
                offset: offset as u64,
                reason,
            };
            match frame::read_frame(&bytes[offset..]) {
                FrameRead::Frame { version, payload, len } if version == frame::GROUP_VERSION => {
                    let body = frame::group_body_len(version, payload).unwrap_or(0);
                    group_end = offset
                        .saturating_add(len)
                        .saturating_add(usize::try_from(body).unwrap_or(usize::MAX));
                    offset += len;
                    end.position = start + offset as u64;
                }
                FrameRead::Frame { version, payload, len } => {
                    let record = record::decode_record(version, payload).map_err(|error| match error {
                        RecordError::Version(_) => corrupt(error.to_string()),
                        _ => corrupt(format!("undecodable record: {error}")),
                    })?;
                    offset += len;
                    let position = start + offset as u64;
                    end.position = position;
                    visit(position, record)?;
                }
                // The room the writer keeps written with zeros ahead of its last group: the end
                // of the log, when it starts where a group would (inside a group, it is a torn
                // one). Only the last segment has any: a segment is cut to its length and synced
                // before the next one is made.
                _ if index == last
                    && offset >= group_end
                    && bytes[offset..].iter().all(|byte| *byte == 0) =>
                {
                    break;
                }
                damage => {
                    let reason = match damage {
                        FrameRead::Corrupt(reason) => reason,
                        _ => "incomplete record",
                    };
                    // A hole inside the last group (written, never synced whole) is a torn tail
                    // even with valid-looking frames after it inside that group. A group header
                    // that is all zeros is a write that never reached the disk: over the zeros
                    // written ahead of it, the last write's pages may land out of order, its
                    // header's lost and frames of its body there; that is a torn tail unless a
                    // later group follows. Any other damage with a valid frame after it is
                    // corruption (a flipped bit in the last synced group's header, say).
                    let after = if offset < group_end { group_end } else { offset + 1 };
                    let rest = bytes.get(after..).unwrap_or(&[]);
                    let header_lost = offset >= group_end
                        && bytes
                            .get(offset..offset + frame::GROUP_HEADER_LEN)
                            .is_some_and(|header| header.iter().all(|byte| *byte == 0));
                    let later = if header_lost {
                        frame::any_valid_group_header(rest)
                    } else {
                        frame::any_valid_frame(rest)
                    };
                    let tail = index == last && !later;
                    if !tail {
                        return Err(corrupt(reason.to_string()).into());
                    }
                    end.torn_bytes = (bytes.len() - offset) as u64;
                    if repair == TailRepair::Truncate {
                        let file = OpenOptions::new().write(true).open(path).map_err(io_error(path))?;
                        file.set_len(offset as u64).map_err(io_error(path))?;
                        file.sync_all().map_err(io_error(path))?;
                        tracing::warn!(
                            segment = %path.display(), offset, torn_bytes = end.torn_bytes,
                            "truncated a torn journal tail"
                        );
                    }
                    break;
                }
            }
        }
        end.position = end.position.max(start + offset.min(bytes.len()) as u64);
    }
    Ok(end)
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| JournalError::SyncFailed { path: dir.to_path_buf(), source })
}

struct SegmentFile {
    file: File,
    path: PathBuf,
    start: u64,
    /// The segment's length in the log: where the next group is written.
    len: u64,
    /// The file's length on disk: `len`, or more once zeros were written ahead of it.
    file_len: u64,
}

impl SegmentFile {
    /// Opens the segment that `position` falls in for writing at `position`, or starts a new one
    /// there. What lies after `position` in that file (the zeros written ahead of the last
    /// write, or a torn tail recovery reported) is cut off first, so that no byte of an old
    /// write can ever be read after a new one.
    fn open(config: &WriterConfig, position: u64) -> Result<SegmentFile, JournalError> {
        fs::create_dir_all(&config.dir).map_err(io_error(&config.dir))?;
        let existing = segments(&config.dir)?.into_iter().rev().find(|(start, _)| *start <= position);
        if let Some((start, path)) = existing {
            let file = OpenOptions::new().write(true).open(&path).map_err(io_error(&path))?;
            let file_len = file.metadata().map_err(io_error(&path))?.len();
            let len = position - start;
            if file_len >= len && len > 0 {
                if file_len > len {
                    file.set_len(len).map_err(io_error(&path))?;
                }
                // What recovery read may have come from the page cache of a process that died
                // before its fdatasync: make it durable before anything is answered from it.
                file.sync_all().map_err(|source| JournalError::SyncFailed { path: path.clone(), source })?;
                sync_dir(&config.dir)?;
                return Ok(SegmentFile { file, path, start, len, file_len: len });
            }
        }
        SegmentFile::create(config, position)
    }

    fn create(config: &WriterConfig, start: u64) -> Result<SegmentFile, JournalError> {
        let path = segment_path(&config.dir, start);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let meta =
            record::encode_record(&WalRecord::Meta { shard_count: config.shard_count }).map_err(|error| {
                JournalError::Io { path: path.clone(), source: io::Error::other(error.to_string()) }
            })?;
        let mut frame_bytes = Vec::new();
        frame::write_frame(&mut frame_bytes, FORMAT_VERSION, &meta);
        file.write_all(&frame_bytes).map_err(io_error(&path))?;
        file.sync_data().map_err(|source| JournalError::SyncFailed { path: path.clone(), source })?;
        sync_dir(&config.dir)?;
        let len = frame_bytes.len() as u64;
        Ok(SegmentFile { file, path, start, len, file_len: len })
    }

    fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Cuts the zeros written ahead off a segment the writer leaves, so that only the last
    /// segment ever has any. A crash before this is done is harmless: the next segment is made
    /// only after it, so this one is still the last, whose trailing zeros [`scan`] reads as the
    /// log's end. The length is the file's own, not `file_len`: a write of zeros that failed
    /// half-way may have grown the file past what the writer counted.
    fn close(self) -> Result<(), JournalError> {
        let on_disk = self.file.metadata().map_err(io_error(&self.path))?.len();
        if on_disk > self.len {
            self.file.set_len(self.len).map_err(io_error(&self.path))?;
            self.file
                .sync_all()
                .map_err(|source| JournalError::SyncFailed { path: self.path.clone(), source })?;
        }
        Ok(())
    }
}

/// How far ahead of the last write the zeroer keeps the last segment written with zeros and
/// durable (at most to the segment's maximum length); it is asked for more when less than half
/// of it is left. A group written over durable zeros changes neither the file's length nor its
/// block map, so its `fdatasync` writes the data alone; one that extends the file also writes
/// the inode, a second I/O round trip (`ext4_write_inode` under `ext4_sync_file`: ~125 against
/// ~85 µs a sync on this machine's disk, bench/RESULTS.md). Every journal byte is written twice
/// (zeros, then the record), off the writer's path.
pub const ZERO_AHEAD: u64 = 8 * 1024 * 1024;
/// Zeros are written from this far past the last write at the nearest, so that the next groups
/// do not wait for the zeroer (a group that would reach into its range waits for it).
pub const ZERO_MARGIN: u64 = 1024 * 1024;
/// A writer starts zeroing ahead once it has written this much into the segment it opened (any
/// segment it rolls to is zeroed from the start): an engine that writes little writes no zeros.
pub const ZERO_START: u64 = 1024 * 1024;

/// How a zero job ended (its failed syncs are errors instead).
#[derive(Debug)]
enum Zeroed {
    /// Zeros durable over the whole range: the offset it ends at.
    All(u64),
    /// A write of zeros failed (a full disk, say) at this offset, to which they are durable.
    /// No record is lost by that: the zeroing stops, and the writer appends as before (should
    /// zeros it half wrote fail to reach the disk later, the writer's next sync says so).
    Stopped(u64, io::Error),
}

/// A range of a segment file for the zeroer to fill with zeros and make durable.
struct ZeroJob {
    path: PathBuf,
    from: u64,
    to: u64,
}

/// The writer's side of the zeroer thread: at most one job outstanding.
struct Zeroer {
    jobs: Option<crossbeam_channel::Sender<ZeroJob>>,
    done: Receiver<Result<Zeroed, JournalError>>,
    /// The range of the job in progress, if any.
    pending: Option<(u64, u64)>,
    /// A write of zeros failed: no more jobs for as long as this writer runs.
    stopped: bool,
    /// How far the job in progress has written zeros and made them durable.
    progress: Arc<Progress>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How far the zeroer's job has got: the offset its zeros are durable up to, and whether the
/// job has ended (its outcome is then in the zeroer's `done` channel).
#[derive(Debug, Default)]
struct Progress {
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl Progress {
    fn set(&self, zeroed: u64, ended: bool) {
        *self.state.lock().unwrap_or_else(|poison| poison.into_inner()) = (zeroed, ended);
        self.changed.notify_all();
    }
}

impl Zeroer {
    fn spawn() -> Result<Zeroer, JournalError> {
        let (jobs, receiver) = crossbeam_channel::bounded::<ZeroJob>(1);
        let (finished, done) = crossbeam_channel::bounded(1);
        let progress = Arc::new(Progress::default());
        let shared = Arc::clone(&progress);
        let thread = std::thread::Builder::new()
            .name("qepik-journal-zero".into())
            .spawn(move || {
                // Should this thread panic, a writer waiting on its progress hears that it ended
                // (and then finds its outcome channel closed: the journal fails).
                struct EndOnPanic<'a>(&'a Progress);
                impl Drop for EndOnPanic<'_> {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            let zeroed = self.0.state.lock().unwrap_or_else(|poison| poison.into_inner()).0;
                            self.0.set(zeroed, true);
                        }
                    }
                }
                let _guard = EndOnPanic(&shared);
                for job in receiver {
                    let outcome = zero(&job, &shared);
                    // Ended before the outcome is sent: a writer woken by this waits for the
                    // outcome on the channel, and the next job's start (set by the writer once
                    // it took this outcome) is never overwritten by this one's end.
                    let zeroed = shared.state.lock().unwrap_or_else(|poison| poison.into_inner()).0;
                    shared.set(zeroed, true);
                    if finished.send(outcome).is_err() {
                        break;
                    }
                }
            })
            .map_err(io_error(&PathBuf::from("qepik-journal-zero thread")))?;
        Ok(Zeroer { jobs: Some(jobs), done, pending: None, stopped: false, progress, thread: Some(thread) })
    }

    /// Makes sure the writer may write up to file offset `end` of `segment`: waits while the
    /// job in progress has not yet made its zeros durable that far (a step of [`ZERO_STEP`] at
    /// most, unless the write reaches past the whole job), and takes the job's outcome in
    /// once it has ended.
    fn clear_to(&mut self, segment: &mut SegmentFile, end: u64) -> Result<(), JournalError> {
        let Some((from, to)) = self.pending else {
            return Ok(());
        };
        if end <= from {
            return self.settle(segment, false);
        }
        if end < to {
            let mut state = self.progress.state.lock().unwrap_or_else(|poison| poison.into_inner());
            while state.0 < end && !state.1 {
                state = self.progress.changed.wait(state).unwrap_or_else(|poison| poison.into_inner());
            }
            if !state.1 {
                // The zeros up to `end` are durable; the job goes on past it.
                return Ok(());
            }
        }
        self.settle(segment, true)
    }

    /// Asks for `segment`'s room ahead of its last write to be topped up, if it runs low, no
    /// job is in progress, and the segment's length has reached `active_from`.
    fn top_up(&mut self, segment: &SegmentFile, config: &WriterConfig, active_from: u64) {
        if self.stopped
            || self.pending.is_some()
            || segment.len < active_from
            || segment.file_len.saturating_sub(segment.len) >= ZERO_AHEAD / 2
        {
            return;
        }
        let from = segment.file_len.max(segment.len + ZERO_MARGIN);
        let to = (segment.len + ZERO_AHEAD).min(config.segment_len_max);
        if to <= from {
            return;
        }
        let job = ZeroJob { path: segment.path.clone(), from, to };
        self.progress.set(from, false);
        if self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok()) {
            self.pending = Some((from, to));
        }
    }

    /// Takes the outcome of the job in progress into `segment`: waiting for it if `wait` (a write
    /// is about to reach into its range, or the segment is left), else only if it has finished.
    /// A failure fails the journal: a write-back error of the file may have hit its records too.
    fn settle(&mut self, segment: &mut SegmentFile, wait: bool) -> Result<(), JournalError> {
        let Some((_, to)) = self.pending else {
            return Ok(());
        };
        let outcome = if wait {
            self.done.recv().ok()
        } else {
            match self.done.try_recv() {
                Ok(outcome) => Some(outcome),
                Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                Err(crossbeam_channel::TryRecvError::Disconnected) => None,
            }
        };
        self.pending = None;
        match outcome {
            Some(Ok(Zeroed::All(zeroed))) => {
                debug_assert_eq!(zeroed, to);
                segment.file_len = segment.file_len.max(zeroed);
                Ok(())
            }
            Some(Ok(Zeroed::Stopped(zeroed, error))) => {
                tracing::warn!(
                    segment = %segment.path.display(), offset = zeroed, %error,
                    "writing zeros ahead of the journal failed; the journal appends without them from here"
                );
                self.stopped = true;
                segment.file_len = segment.file_len.max(zeroed);
                Ok(())
            }
            Some(Err(error)) => Err(error),
            None => Err(JournalError::Io {
                path: segment.path.clone(),
                source: io::Error::other("the journal's zeroer thread stopped"),
            }),
        }
    }
}

impl Drop for Zeroer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ignored = thread.join();
        }
    }
}

/// Zeros are written and made durable this much at a time: the writer's `fdatasync` writes back
/// every dirty page of the file, so it never waits behind more than one step of zeros.
const ZERO_STEP: usize = 256 * 1024;

/// Writes zeros over `job`'s range through a file description of its own (so that a write-back
/// error reaches the writer's next `fdatasync` too) and makes them durable, a step at a time.
fn zero(job: &ZeroJob, progress: &Progress) -> Result<Zeroed, JournalError> {
    use std::os::unix::fs::FileExt;
    let file = match OpenOptions::new().write(true).open(&job.path) {
        Ok(file) => file,
        Err(error) => return Ok(Zeroed::Stopped(job.from, error)),
    };
    let zeros = vec![0_u8; ZERO_STEP];
    let mut at = job.from;
    while at < job.to {
        let n = usize::try_from(job.to - at).unwrap_or(usize::MAX).min(zeros.len());
        // A failed write loses nothing (what it wrote is zeros past the log's end); a failed
        // sync may stand for a failed write-back of the writer's pages too, and fails the
        // journal like the writer's own.
        if let Err(error) = file.write_all_at(&zeros[..n], at) {
            return Ok(Zeroed::Stopped(at, error));
        }
        file.sync_data().map_err(|source| JournalError::SyncFailed { path: job.path.clone(), source })?;
        at += n as u64;
        progress.set(at, false);
    }
    Ok(Zeroed::All(job.to))
}

/// Starts the group-commit writer at `position` (the end found by recovery's scan). It runs
/// until every sender of `batches` is gone, then returns; `on_durable` gets each batch's
/// completion, with the position after it, once its frames are durable.
pub fn spawn_writer<T: Send + 'static>(
    config: WriterConfig,
    position: u64,
    batches: Receiver<JournalBatch<T>>,
    state: Arc<JournalState>,
    mut on_durable: impl FnMut(u64, T) + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<(), JournalError>>, JournalError> {
    let mut segment = SegmentFile::open(&config, position)?;
    state.advance(segment.end());
    let mut zeroer = Zeroer::spawn()?;
    let mut active_from = segment.len + ZERO_START;
    std::thread::Builder::new()
        .name("qepik-journal".into())
        .spawn(move || {
            let mut buffer: Vec<u8> = Vec::with_capacity(config.group_len_max * 2);
            let mut completions: Vec<(u64, T)> = Vec::new();
            let mut credits_due = 0_i64;
            while let Ok(first) = batches.recv() {
                // Room for the group header, filled in once the group's length is known.
                buffer.clear();
                buffer.resize(frame::GROUP_HEADER_LEN, 0);
                let mut push = |batch: JournalBatch<T>, buffer: &mut Vec<u8>| {
                    buffer.extend_from_slice(&batch.frames);
                    completions.push((buffer.len() as u64, batch.completion));
                    i64::from(batch.credits_due)
                };
                credits_due += push(first, &mut buffer);
                let mut linger_until = None;
                while buffer.len() < config.group_len_max {
                    let next = match batches.try_recv() {
                        Ok(batch) => batch,
                        Err(_) if credits_due > 0 && buffer.len() < LINGER_GROUP_MAX => {
                            let until = *linger_until.get_or_insert_with(|| Instant::now() + config.linger);
                            match batches.recv_deadline(until) {
                                Ok(batch) => batch,
                                Err(_) => break,
                            }
                        }
                        Err(_) => break,
                    };
                    credits_due += push(next, &mut buffer);
                }
                let body_len = (buffer.len() - frame::GROUP_HEADER_LEN) as u64;
                if body_len == 0 {
                    // Only completions (lookups, checkpoint marks): nothing to write.
                    buffer.clear();
                    for (offset, _) in completions.iter_mut() {
                        *offset = 0;
                    }
                } else {
                    frame::write_group_header(&mut buffer, body_len);
                }
                let group_start = segment.end();
                // Never write where the zeroer is still writing zeros.
                let end = segment.len + buffer.len() as u64;
                if let Err(error) = zeroer
                    .clear_to(&mut segment, end)
                    .and_then(|()| write_group(&mut segment, &buffer, &state))
                {
                    tracing::error!(%error, "journal write failed; the engine stops");
                    state.fail();
                    return Err(error);
                }
                state.advance(segment.end());
                for (offset, completion) in completions.drain(..) {
                    on_durable(group_start + offset, completion);
                }
                if segment.len >= config.segment_len_max {
                    let next = zeroer
                        .settle(&mut segment, true)
                        .and_then(|()| {
                            let end = segment.end();
                            segment.close()?;
                            SegmentFile::create(&config, end)
                        })
                        .inspect_err(|_| state.fail())?;
                    segment = next;
                    active_from = 0;
                }
                zeroer.top_up(&segment, &config, active_from);
            }
            Ok(())
        })
        .map_err(io_error(&PathBuf::from("qepik-journal thread")))
}

fn write_group(segment: &mut SegmentFile, buffer: &[u8], state: &JournalState) -> Result<(), JournalError> {
    if !buffer.is_empty() {
        use std::os::unix::fs::FileExt;
        segment.file.write_all_at(buffer, segment.len).map_err(io_error(&segment.path))?;
        segment.file_len = segment.file_len.max(segment.len + buffer.len() as u64);
        let started = Instant::now();
        segment
            .file
            .sync_data()
            .map_err(|source| JournalError::SyncFailed { path: segment.path.clone(), source })?;
        let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        state.sync_ns_total.fetch_add(elapsed, Ordering::Relaxed);
        let bucket = SYNC_BUCKETS_US
            .iter()
            .position(|bound| elapsed <= bound * 1_000)
            .unwrap_or(SYNC_BUCKETS_US.len());
        state.sync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        state.syncs.fetch_add(1, Ordering::Relaxed);
        state.bytes_written.fetch_add(buffer.len() as u64, Ordering::Relaxed);
        segment.len += buffer.len() as u64;
    }
    state.batches_written.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Reads the whole records between positions `from` (a record boundary) and `to` (at most the
/// durable end), without reading whole segments: how the views tail the journal. A record cut
/// by `to` is left for the next call. Returns each record with the position after it, and the
/// position reached (after the last whole record, or a segment's opening meta record).
pub fn read_range(dir: &Path, from: u64, to: u64) -> Result<(Vec<(u64, WalRecord)>, u64), JournalError> {
    read_range_with(dir, from, to, &mut Vec::new())
}

/// [`read_range`] reading through `bytes`, a buffer kept by the caller between calls: a tail
/// that reads megabytes a pass would otherwise have the kernel zero fresh pages for each one.
pub fn read_range_with(
    dir: &Path,
    from: u64,
    to: u64,
    bytes: &mut Vec<u8>,
) -> Result<(Vec<(u64, WalRecord)>, u64), JournalError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut records = Vec::new();
    let mut position = from;
    if from >= to {
        return Ok((records, position));
    }
    let all = segments(dir)?;
    for (index, (start, path)) in all.iter().enumerate() {
        let segment_end = all.get(index + 1).map_or(u64::MAX, |(next, _)| *next);
        if segment_end <= position || *start >= to {
            continue;
        }
        let mut file = File::open(path).map_err(io_error(path))?;
        let mut offset_in_file = position.max(*start) - start;
        if offset_in_file == 0 {
            let mut header = [0_u8; frame::HEADER_LEN];
            file.read_exact(&mut header).map_err(io_error(path))?;
            let len = u64::from(u32::from_le_bytes([header[4], header[5], header[6], header[7]]));
            offset_in_file = frame::HEADER_LEN as u64 + len;
            if start + offset_in_file > to {
                break;
            }
            position = start + offset_in_file;
        }
        let read_to = to.min(segment_end);
        let want = (read_to - start).saturating_sub(offset_in_file);
        file.seek(SeekFrom::Start(offset_in_file)).map_err(io_error(path))?;
        bytes.clear();
        bytes.resize(usize::try_from(want).unwrap_or(0), 0);
        file.read_exact(bytes).map_err(io_error(path))?;
        let mut offset = 0;
        while offset < bytes.len() {
            let corrupt = |reason: String| JournalError::Corrupt {
                segment: path.clone(),
                offset: offset_in_file + offset as u64,
                reason,
            };
            match frame::read_frame(&bytes[offset..]) {
                FrameRead::Frame { version: frame::GROUP_VERSION, len, .. } => {
                    offset += len;
                    position = start + offset_in_file + offset as u64;
                }
                FrameRead::Frame { version, payload, len } => {
                    let record = record::decode_record(version, payload)
                        .map_err(|error| corrupt(format!("undecodable record: {error}")))?;
                    offset += len;
                    position = start + offset_in_file + offset as u64;
                    records.push((position, record));
                }
                FrameRead::Truncated if read_to < segment_end => return Ok((records, position)),
                FrameRead::Truncated => return Err(corrupt("incomplete record inside the journal".into())),
                FrameRead::Corrupt(reason) => return Err(corrupt(reason.into())),
            }
        }
        if read_to >= to {
            break;
        }
    }
    Ok((records, position))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(shard: u16) -> Vec<u8> {
        let bytes = record::encode_record(&WalRecord::Batch { shard, timestamp: 1, commands: Vec::new() })
            .map(|bytes| bytes.to_vec())
            .unwrap_or_default();
        let mut framed = Vec::new();
        frame::write_frame(&mut framed, FORMAT_VERSION, &bytes);
        framed
    }

    /// A segment: meta, then groups of records; returns the bytes and each record's start.
    fn segment(groups: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let meta = record::encode_record(&WalRecord::Meta { shard_count: 1 })
            .map(|b| b.to_vec())
            .unwrap_or_default();
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, FORMAT_VERSION, &meta);
        let mut starts = Vec::new();
        for records in groups {
            let body: Vec<Vec<u8>> = (0..*records).map(|_| record(0)).collect();
            let body_len: usize = body.iter().map(Vec::len).sum();
            let mut header = vec![0_u8; frame::GROUP_HEADER_LEN];
            frame::write_group_header(&mut header, body_len as u64);
            bytes.extend_from_slice(&header);
            for framed in body {
                starts.push(bytes.len());
                bytes.extend_from_slice(&framed);
            }
        }
        (bytes, starts)
    }

    fn scan_dir(bytes: &[u8]) -> (Result<ScanEnd, JournalError>, usize, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(segment_path(dir.path(), 0), bytes).expect("write");
        let mut visited = 0;
        let end = scan::<JournalError>(dir.path(), 0, TailRepair::Truncate, |_, record| {
            if matches!(record, WalRecord::Batch { .. }) {
                visited += 1;
            }
            Ok(())
        });
        (end, visited, dir)
    }

    /// The sending end of a test writer, what it reports durable as (position, batch number),
    /// and its state.
    type TestWriter = (
        crossbeam_channel::Sender<JournalBatch<u32>>,
        crossbeam_channel::Receiver<(u64, u32)>,
        Arc<JournalState>,
    );

    /// A writer with a long linger.
    fn lingering_writer(dir: &Path) -> TestWriter {
        let config = WriterConfig {
            dir: dir.to_path_buf(),
            shard_count: 1,
            segment_len_max: 1 << 30,
            group_len_max: 1 << 20,
            linger: std::time::Duration::from_secs(30),
        };
        let (batches, receiver) = crossbeam_channel::unbounded();
        let (done, durable) = crossbeam_channel::unbounded();
        let state = JournalState::new(0);
        spawn_writer(config, 0, receiver, Arc::clone(&state), move |position, number| {
            let _ignored = done.send((position, number));
        })
        .expect("writer");
        (batches, durable, state)
    }

    #[test]
    fn a_small_group_waits_for_a_credit_step_on_its_way_and_syncs_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (batches, durable, state) = lingering_writer(dir.path());
        let syncs_at_start = state.syncs.load(Ordering::Relaxed);
        batches.send(JournalBatch { frames: record(0), completion: 1, credits_due: 1 }).expect("send");
        // The reserve's batch is not durable alone: its group waits for the credit.
        let waited = durable.recv_timeout(std::time::Duration::from_millis(300));
        assert!(waited.is_err(), "the group synced before its credit step arrived: {waited:?}");
        batches.send(JournalBatch { frames: record(1), completion: 2, credits_due: -1 }).expect("send");
        let timeout = std::time::Duration::from_secs(20);
        let (first, second) = (durable.recv_timeout(timeout), durable.recv_timeout(timeout));
        assert!(matches!((first, second), (Ok((_, 1)), Ok((_, 2)))));
        assert_eq!(state.syncs.load(Ordering::Relaxed) - syncs_at_start, 1, "one fdatasync for both");
    }

    #[test]
    fn a_group_with_no_credit_step_due_does_not_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (batches, durable, _state) = lingering_writer(dir.path());
        batches.send(JournalBatch { frames: record(0), completion: 1, credits_due: 0 }).expect("send");
        // Far less than the 30 s linger: a group waits only for a credit step on its way.
        let durable = durable.recv_timeout(std::time::Duration::from_secs(10));
        assert!(matches!(durable, Ok((_, 1))), "{durable:?}");
    }

    /// Writes `batches` batches of `per_batch` records through a writer with segments of
    /// `segment_len_max` bytes, waits for the writer (and its zeroer) to finish, and returns the
    /// durable end.
    fn write_records(dir: &Path, from: u64, segment_len_max: u64, batches: usize, per_batch: usize) -> u64 {
        let config = WriterConfig {
            dir: dir.to_path_buf(),
            shard_count: 1,
            segment_len_max,
            group_len_max: 1 << 20,
            linger: std::time::Duration::from_millis(1),
        };
        let (sender, receiver) = crossbeam_channel::unbounded();
        let state = JournalState::new(from);
        let writer = spawn_writer(config, from, receiver, Arc::clone(&state), |_, ()| {}).expect("writer");
        for _ in 0..batches {
            let frames: Vec<u8> = (0..per_batch).flat_map(|_| record(0)).collect();
            sender.send(JournalBatch { frames, completion: (), credits_due: 0 }).expect("send");
        }
        drop(sender);
        writer.join().expect("writer thread").expect("writer");
        state.durable()
    }

    fn count_records(dir: &Path) -> (ScanEnd, usize) {
        let mut records = 0;
        let end = scan::<JournalError>(dir, 0, TailRepair::Truncate, |_, record| {
            if matches!(record, WalRecord::Batch { .. }) {
                records += 1;
            }
            Ok(())
        })
        .expect("scan");
        (end, records)
    }

    #[test]
    fn zeros_written_ahead_end_the_log_and_are_cut_when_the_writer_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Past ZERO_START, so that the zeroer has run.
        let per_batch = 1_000;
        let batches = usize::try_from(ZERO_START * 3).unwrap_or(0) / (per_batch * record(0).len()) + 1;
        let durable = write_records(dir.path(), 0, 1 << 30, batches, per_batch);
        let path = segment_path(dir.path(), 0);
        let file_len = fs::metadata(&path).expect("segment").len();
        assert!(file_len > durable, "no zeros ahead: file {file_len}, log {durable}");
        let bytes = fs::read(&path).expect("read");
        assert!(bytes[usize::try_from(durable).unwrap_or(0)..].iter().all(|b| *b == 0));
        let (end, records) = count_records(dir.path());
        assert_eq!((end.position, end.torn_bytes, records), (durable, 0, batches * per_batch));
        assert_eq!(fs::metadata(&path).expect("segment").len(), file_len, "a clean end is not cut");
        // Reopened, the writer cuts the zeros off before writing after the last record.
        let durable = write_records(dir.path(), durable, 1 << 30, 1, 3);
        assert_eq!(fs::metadata(&path).expect("segment").len(), durable);
        let (end, records) = count_records(dir.path());
        assert_eq!((end.position, end.torn_bytes, records), (durable, 0, batches * per_batch + 3));
    }

    #[test]
    fn a_write_into_the_zeroers_range_waits_only_until_its_end_is_zeroed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = WriterConfig {
            dir: dir.path().to_path_buf(),
            shard_count: 1,
            segment_len_max: 1 << 30,
            group_len_max: 1 << 20,
            linger: std::time::Duration::from_millis(1),
        };
        let mut segment = SegmentFile::create(&config, 0).expect("segment");
        let mut zeroer = Zeroer::spawn().expect("zeroer");
        zeroer.top_up(&segment, &config, 0);
        let (from, to) = zeroer.pending.expect("a job for a fresh segment");
        assert_eq!((from, to), (segment.len + ZERO_MARGIN, segment.len + ZERO_AHEAD));
        // A write ending one step into the job: once allowed, its range is durable zeros.
        let end = from + ZERO_STEP as u64;
        zeroer.clear_to(&mut segment, end).expect("cleared");
        let zeroed = zeroer.progress.state.lock().expect("progress").0;
        assert!(zeroer.pending.is_none() || zeroed >= end, "allowed to {end} with zeros durable to {zeroed}");
        // A write past the whole job waits for all of it and takes its outcome.
        zeroer.clear_to(&mut segment, to + 1).expect("cleared");
        assert!(zeroer.pending.is_none());
        assert_eq!(segment.file_len, to);
        let bytes = fs::read(&segment.path).expect("read");
        assert_eq!(bytes.len() as u64, to);
        assert!(bytes[usize::try_from(from).unwrap_or(0)..].iter().all(|byte| *byte == 0));
    }

    #[test]
    fn a_failed_write_of_zeros_stops_the_zeroing_and_fails_nothing() {
        // `/dev/full` answers every write with ENOSPC, as a full disk does.
        let full = PathBuf::from("/dev/full");
        let progress = Progress::default();
        let outcome = zero(&ZeroJob { path: full.clone(), from: 0, to: 1 << 20 }, &progress);
        assert!(matches!(outcome, Ok(Zeroed::Stopped(0, _))), "{outcome:?}");
        // Through the zeroer: the writer is cleared, and no job is asked for again.
        let config = WriterConfig {
            dir: PathBuf::from("/dev"),
            shard_count: 1,
            segment_len_max: 1 << 30,
            group_len_max: 1 << 20,
            linger: std::time::Duration::from_millis(1),
        };
        let file = OpenOptions::new().write(true).open(&full).expect("/dev/full");
        let mut segment = SegmentFile { file, path: full, start: 0, len: 100, file_len: 100 };
        let mut zeroer = Zeroer::spawn().expect("zeroer");
        zeroer.top_up(&segment, &config, 0);
        assert!(zeroer.pending.is_some());
        zeroer.clear_to(&mut segment, ZERO_AHEAD * 2).expect("a failed zero write is no failure");
        assert!(zeroer.stopped && zeroer.pending.is_none());
        zeroer.top_up(&segment, &config, 0);
        assert!(zeroer.pending.is_none(), "no more jobs once a write of zeros failed");
    }

    #[test]
    fn a_segment_left_is_cut_to_its_length_even_past_what_the_writer_counted() {
        // A write of zeros that failed half-way can grow the file past the writer's count.
        let dir = tempfile::tempdir().expect("tempdir");
        let config = WriterConfig {
            dir: dir.path().to_path_buf(),
            shard_count: 1,
            segment_len_max: 1 << 30,
            group_len_max: 1 << 20,
            linger: std::time::Duration::from_millis(1),
        };
        let segment = SegmentFile::create(&config, 0).expect("segment");
        let (path, len) = (segment.path.clone(), segment.len);
        OpenOptions::new().write(true).open(&path).expect("open").set_len(len + 4096).expect("grow");
        assert_eq!(segment.file_len, len, "the writer did not count the growth");
        segment.close().expect("closed");
        assert_eq!(fs::metadata(&path).expect("segment").len(), len);
    }

    #[test]
    fn a_segment_left_for_the_next_keeps_no_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Segments of 4 MiB: every one is rolled to from the start, so each is zeroed ahead.
        let durable = write_records(dir.path(), 0, 4 << 20, 300, 1_000);
        let all = segments(dir.path()).expect("segments");
        assert!(all.len() >= 3, "{} segments", all.len());
        for pair in all.windows(2) {
            let len = fs::metadata(&pair[0].1).expect("segment").len();
            assert_eq!(pair[0].0 + len, pair[1].0, "{} keeps bytes past its end", pair[0].1.display());
        }
        let (end, records) = count_records(dir.path());
        assert_eq!((end.torn_bytes, records), (0, 300_000));
        // A last group that filled its segment leaves a new one holding only its meta record.
        let last_start = all.last().map_or(0, |(start, _)| *start);
        assert!(end.position == durable || (durable == last_start && end.position > durable), "{end:?}");
    }

    #[test]
    fn a_group_torn_into_zeros_is_a_torn_tail_and_garbage_after_zeros_is_cut() {
        // The last group's header made it, the end of its body did not: zeros from there on.
        let (mut bytes, starts) = segment(&[1, 2]);
        let cut = starts[2] + 5;
        bytes.truncate(cut);
        bytes.resize(cut + 4096, 0);
        let (end, visited, dir) = scan_dir(&bytes);
        let end = end.expect("a torn last group must not stop start-up");
        assert_eq!(visited, 2, "the torn record is not replayed");
        assert_eq!((end.position, end.torn_bytes), (starts[2] as u64, (bytes.len() - starts[2]) as u64));
        let len = fs::metadata(segment_path(dir.path(), 0)).expect("segment").len();
        assert_eq!(len, starts[2] as u64, "a torn tail is cut");
        // Zeros after the last whole group, then a stray byte: not an end, a torn tail.
        let (mut bytes, _) = segment(&[1]);
        let whole = bytes.len();
        bytes.resize(whole + 4096, 0);
        bytes[whole + 1000] = 7;
        let (end, visited, dir) = scan_dir(&bytes);
        let end = end.expect("stray bytes with no record after them are a torn tail");
        assert_eq!((visited, end.position, end.torn_bytes), (1, whole as u64, 4096));
        let len = fs::metadata(segment_path(dir.path(), 0)).expect("segment").len();
        assert_eq!(len, whole as u64);
    }

    #[test]
    fn a_last_group_whose_header_was_lost_over_zeros_is_a_torn_tail() {
        // The last write's first page (its group header) never reached the disk, pages of its
        // body did: zeros where the header was, whole frames after them, zeros to the end.
        let (mut bytes, starts) = segment(&[1, 3]);
        let header = starts[1] - frame::GROUP_HEADER_LEN;
        bytes[header..starts[1] + 4].fill(0);
        bytes.resize(bytes.len() + 8192, 0);
        let (end, visited, _dir) = scan_dir(&bytes);
        let end = end.expect("a torn last group must not stop start-up");
        assert_eq!(visited, 1, "only the first, whole group is replayed");
        assert_eq!((end.position, end.torn_bytes), (header as u64, (bytes.len() - header) as u64));
        // A flipped bit in the last group's header, its body whole after it: corruption (that
        // group was synced), not a tail to cut.
        let (mut bytes, starts) = segment(&[1, 3]);
        bytes[starts[1] - frame::GROUP_HEADER_LEN + 9] ^= 4;
        let (end, _, _dir) = scan_dir(&bytes);
        assert!(matches!(end, Err(JournalError::Corrupt { .. })), "{end:?}");
        // A later group after the damage makes it corruption in the middle.
        let (mut bytes, starts) = segment(&[1, 1, 1]);
        let header = starts[1] - frame::GROUP_HEADER_LEN;
        bytes[header..starts[1] + 4].fill(0);
        let (end, _, _dir) = scan_dir(&bytes);
        assert!(matches!(end, Err(JournalError::Corrupt { .. })), "{end:?}");
    }

    #[test]
    fn zeros_at_the_end_of_a_segment_before_the_last_are_corruption() {
        // A closed segment is cut to its length before the next is made: zeros where its last
        // records were are lost records, not an end.
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut first, starts) = segment(&[1, 1]);
        let lost = starts[1] - frame::GROUP_HEADER_LEN;
        first[lost..].fill(0);
        fs::write(segment_path(dir.path(), 0), &first).expect("write");
        let (second, _) = segment(&[1]);
        fs::write(segment_path(dir.path(), first.len() as u64), &second).expect("write");
        let end = scan::<JournalError>(dir.path(), 0, TailRepair::Truncate, |_, _| Ok(()));
        assert!(matches!(end, Err(JournalError::Corrupt { .. })), "{end:?}");
    }

    #[test]
    fn a_hole_inside_the_last_group_is_a_torn_tail() {
        let (mut bytes, starts) = segment(&[1, 2]);
        // The last group's first record lost a page; its second record looks whole.
        let hole = starts[1] + 3;
        bytes[hole..hole + 4].fill(0);
        let (end, visited, _dir) = scan_dir(&bytes);
        let end = end.expect("a torn last group must not stop start-up");
        assert_eq!(visited, 1, "only the record of the first, whole group is replayed");
        assert_eq!(end.position, starts[1] as u64);
        assert_eq!(end.torn_bytes, (bytes.len() - starts[1]) as u64);
    }

    #[test]
    fn a_hole_before_a_later_group_is_corruption() {
        let (mut bytes, starts) = segment(&[2, 1]);
        let hole = starts[0] + 3;
        bytes[hole..hole + 4].fill(0);
        let (end, _, _dir) = scan_dir(&bytes);
        match end {
            Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, starts[0] as u64),
            other => panic!("expected corruption, got {other:?}"),
        }
    }
}
