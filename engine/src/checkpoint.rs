//! Checkpoints: every shard's state at a journal position, so recovery replays only what came
//! after. Written to a temporary file, fsynced, renamed into place, and the directory fsynced,
//! so a crash leaves either the old checkpoint or the new one, never half of one.
//!
//! The final transfers (millions, and only ever more) are not in the checkpoint file: each
//! checkpoint first writes those added since the one before as a done segment
//! (`done-<sequence>.qds`, same atomic write), and lists every segment its state needs. A
//! checkpoint thus writes, and a shard hands over, only what is new. Segments stay as long as
//! the journal does; recovery reads the listed ones in order.

use std::fs::{self, File};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use crate::journal::frame::{self, FrameRead};
use crate::journal::record::{
    self, AccountChunks, CHECKPOINT_VERSION, CHECKPOINT_VERSION_V4, CHECKPOINT_VERSION_V5,
    CHECKPOINT_VERSION_V6, CHECKPOINT_VERSION_V7, FORMAT_VERSION_V3, WalCheckpoint, WalCheckpointHead,
    WalDoneSegment, WalDoneSegmentHead, WalShardState, WalletChunks,
};

/// Done segments keep layout 7's frames: their format did not change with layout 8 (which
/// moved the wallets out of the checkpoint's head).
const DONE_SEGMENT_VERSION: u8 = CHECKPOINT_VERSION_V7;

/// Checkpoints written before they had a layout version of their own carry the journal's
/// version 3; the journal has moved on since, so the number is fixed here. Version 4 held the
/// final transfers inline, version 5 CRC body hashes. Recovery passes over all three and
/// replays the journal. Version 6 (one rkyv frame) is read and upgraded in memory.
const OLDER_CHECKPOINT_VERSIONS: [u8; 3] = [FORMAT_VERSION_V3, CHECKPOINT_VERSION_V4, CHECKPOINT_VERSION_V5];

const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".qcp";
const SEGMENT_PREFIX: &str = "done-";
const SEGMENT_SUFFIX: &str = ".qds";
/// How much of a checkpoint is written between two syncs (see [`write_atomically`]).
const WRITE_CHUNK: usize = 1 << 20;
/// How many checkpoints stay on disk; older ones are removed (the journal itself is kept).
const KEEP: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(error) => return Err(io(dir)(error)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(sequence) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((sequence, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest checkpoint in `dir`, if any.
///
/// Read a frame at a time: the head, then each shard's account chunks, so that the file is never
/// in memory beside what it decodes to.
pub fn load_latest(dir: &Path) -> Result<Option<WalCheckpoint>, CheckpointError> {
    let Some((_, path)) = list(dir)?.pop() else {
        return Ok(None);
    };
    let mut reader = FrameFile::open(&path)?;
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.clone(), reason };
    let mut buffer = Vec::new();
    let (version, head) = match reader.next(&mut buffer)? {
        (CHECKPOINT_VERSION, payload) => (
            CHECKPOINT_VERSION,
            record::decode_checkpoint_head(payload).map_err(|error| corrupt(error.to_string()))?,
        ),
        (CHECKPOINT_VERSION_V7, payload) => (
            CHECKPOINT_VERSION_V7,
            record::decode_checkpoint_head_v7(payload).map_err(|error| corrupt(error.to_string()))?.upgrade(),
        ),
        (CHECKPOINT_VERSION_V6, payload) => {
            let old = record::decode_checkpoint_v6(payload).map_err(|error| corrupt(error.to_string()))?;
            reader.end()?;
            return old.upgrade().map(Some).map_err(|error| corrupt(error.to_string()));
        }
        (version, _) if OLDER_CHECKPOINT_VERSIONS.contains(&version) => {
            // The journal is never cut, so replaying it whole stands in for this checkpoint;
            // the next one is written in the current layout.
            tracing::warn!(path = %path.display(), version, "checkpoint of an older layout; replaying the journal from its start");
            return Ok(None);
        }
        (version, _) => return Err(corrupt(format!("unknown version {version}"))),
    };
    let WalCheckpointHead { shard_count, shards: heads, accounts, wallets, segments } = head;
    if accounts.len() != heads.len() || wallets.len() != heads.len() {
        return Err(corrupt(format!(
            "{} account and {} wallet counts for {} shards",
            accounts.len(),
            wallets.len(),
            heads.len()
        )));
    }
    // Each shard's account chunks, shard after shard, then each shard's wallet chunks.
    let mut chunks_of = |count: u32, what: &str| -> Result<Vec<Vec<u8>>, CheckpointError> {
        let mut chunks = Vec::new();
        for _ in 0..count {
            match reader.next(&mut buffer)? {
                (found, payload) if found == version => chunks.push(payload.to_vec()),
                (found, _) => return Err(corrupt(format!("{what} chunk of version {found}"))),
            }
        }
        Ok(chunks)
    };
    let mut account_chunks = Vec::with_capacity(heads.len());
    for (count, chunk_count) in accounts {
        account_chunks.push(AccountChunks::from_chunks(chunks_of(chunk_count, "account")?, count));
    }
    let mut shards = Vec::with_capacity(heads.len());
    for ((head, accounts), (count, chunk_count)) in heads.into_iter().zip(account_chunks).zip(wallets) {
        let wallets = WalletChunks::from_chunks(chunks_of(chunk_count, "wallet")?, count);
        shards.push(WalShardState { head, accounts, wallets });
    }
    reader.end()?;
    Ok(Some(WalCheckpoint { shard_count, shards, segments }))
}

/// A checkpoint or done segment file read one frame after another.
struct FrameFile<'a> {
    path: &'a Path,
    reader: BufReader<File>,
    /// Bytes not read yet: a frame's length may not ask for more.
    left: u64,
    offset: u64,
}

impl<'a> FrameFile<'a> {
    fn open(path: &'a Path) -> Result<Self, CheckpointError> {
        let file = File::open(path).map_err(io(path))?;
        let left = file.metadata().map_err(io(path))?.len();
        Ok(FrameFile { path, reader: BufReader::with_capacity(1 << 16, file), left, offset: 0 })
    }

    /// The next frame's version and payload; a file that ends early or a damaged frame is an
    /// error naming the file and offset.
    fn next<'b>(&mut self, buffer: &'b mut Vec<u8>) -> Result<(u8, &'b [u8]), CheckpointError> {
        let corrupt = |reason: &str, offset: u64| CheckpointError::Corrupt {
            path: self.path.to_path_buf(),
            reason: format!("{reason} at offset {offset}"),
        };
        let len_max = usize::try_from(self.left).unwrap_or(usize::MAX);
        match frame::read_frame_from(&mut self.reader, buffer, len_max).map_err(io(self.path))? {
            FrameRead::Frame { version, payload, len } => {
                self.offset += len as u64;
                self.left = self.left.saturating_sub(len as u64);
                Ok((version, payload))
            }
            FrameRead::Truncated => Err(corrupt("truncated", self.offset)),
            FrameRead::Corrupt(reason) => Err(corrupt(reason, self.offset)),
        }
    }

    /// Checks that nothing follows the last frame expected.
    fn end(self) -> Result<(), CheckpointError> {
        if self.left == 0 {
            return Ok(());
        }
        Err(CheckpointError::Corrupt {
            path: self.path.to_path_buf(),
            reason: format!("{} bytes after the last frame, at offset {}", self.left, self.offset),
        })
    }
}

/// How fast a background file write may go, so that it never takes the disk from the
/// journal's syncs; `hurry` set (say, at shutdown) lifts the limit.
#[derive(Debug, Clone, Copy)]
pub struct Pace<'a> {
    pub bytes_per_s: u64,
    pub hurry: &'a std::sync::atomic::AtomicBool,
}

/// Writes `parts`, one after the other, to `path` so that a crash leaves either the old file or
/// the whole new one (see [`AtomicFile`]).
pub(crate) fn write_atomically(
    temp: &Path,
    path: &Path,
    parts: &[&[u8]],
    pace: Option<Pace<'_>>,
) -> std::io::Result<()> {
    let mut file = AtomicFile::create(temp, path, pace)?;
    for part in parts {
        file.write(part)?;
    }
    file.commit()
}

/// A file written so that a crash leaves either the old file at `path` or the whole new one:
/// into `temp`, fsync, rename over `path`, fsync the directory ([`AtomicFile::commit`]).
///
/// The kernel is asked to start writing back every [`WRITE_CHUNK`] at once, and with a `pace`,
/// the writes go no faster than it allows. A checkpoint is hundreds of MB: written at once, it
/// sits in the page cache until the final sync sends all of it in one burst, and the journal's
/// `fdatasync`s wait behind that burst.
pub(crate) struct AtomicFile<'a> {
    file: File,
    temp: PathBuf,
    path: PathBuf,
    pace: Option<Pace<'a>>,
    started: std::time::Instant,
    written: u64,
    /// Where write-back was last asked to start from.
    advised: u64,
}

impl<'a> AtomicFile<'a> {
    pub(crate) fn create(temp: &Path, path: &Path, pace: Option<Pace<'a>>) -> std::io::Result<Self> {
        Ok(AtomicFile {
            file: File::create(temp)?,
            temp: temp.to_path_buf(),
            path: path.to_path_buf(),
            pace,
            started: std::time::Instant::now(),
            written: 0,
            advised: 0,
        })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for chunk in bytes.chunks(WRITE_CHUNK) {
            self.file.write_all(chunk)?;
            self.written += chunk.len() as u64;
            if self.written - self.advised >= WRITE_CHUNK as u64 {
                if let Some(len) = std::num::NonZeroU64::new(self.written - self.advised) {
                    // Advice only: on Linux it starts write-back of the range's dirty pages and returns.
                    let _advisory = rustix::fs::fadvise(
                        &self.file,
                        self.advised,
                        Some(len),
                        rustix::fs::Advice::DontNeed,
                    );
                }
                self.advised = self.written;
                self.wait_for_pace();
            }
        }
        Ok(())
    }

    /// One frame: its header, then `payload` from where it is. A payload the frame's 32-bit
    /// length cannot state is an error here, not a file that cannot be read back.
    pub(crate) fn frame(&mut self, version: u8, payload: &[u8]) -> std::io::Result<()> {
        if payload.len() >= u32::MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a frame of {} bytes does not fit a 32-bit length", payload.len()),
            ));
        }
        self.write(&frame::header(version, payload))?;
        self.write(payload)
    }

    fn wait_for_pace(&self) {
        if let Some(pace) = self.pace
            && !pace.hurry.load(std::sync::atomic::Ordering::Acquire)
        {
            let due =
                std::time::Duration::from_secs_f64(self.written as f64 / pace.bytes_per_s.max(1) as f64);
            if let Some(early) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(early);
            }
        }
    }

    pub(crate) fn commit(self) -> std::io::Result<()> {
        self.file.sync_all()?;
        drop(self.file);
        fs::rename(&self.temp, &self.path)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{sequence:020}{SEGMENT_SUFFIX}"))
}

/// Reads done segment `sequence`, as a checkpoint of `shard_count` shards lists it, handing
/// each chunk of final transfers to `restore` with its shard's index, in the order written.
pub fn load_segment(
    dir: &Path,
    sequence: u64,
    shard_count: u16,
    mut restore: impl FnMut(usize, &[[u64; 3]]) -> Result<(), String>,
) -> Result<(), CheckpointError> {
    let path = segment_path(dir, sequence);
    let mut reader = match FrameFile::open(&path) {
        Err(CheckpointError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Corrupt {
                path,
                reason: "missing: the newest checkpoint lists this done segment; without it, remove the \
                         checkpoints directory to recover by replaying the whole journal"
                    .into(),
            });
        }
        opened => opened?,
    };
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.clone(), reason };
    let mismatch = |found: u64, shards: usize| {
        corrupt(format!(
            "holds segment {found} of {shards} shards where segment {sequence} of {shard_count} was expected"
        ))
    };
    let mut buffer = Vec::new();
    let head = match reader.next(&mut buffer)? {
        (DONE_SEGMENT_VERSION, payload) => {
            record::decode_done_segment_head(payload).map_err(|error| corrupt(error.to_string()))?
        }
        (CHECKPOINT_VERSION_V6, payload) => {
            let segment = record::decode_done_segment(payload).map_err(|error| corrupt(error.to_string()))?;
            if segment.sequence != sequence || segment.shards.len() != usize::from(shard_count) {
                return Err(mismatch(segment.sequence, segment.shards.len()));
            }
            for (shard, chunks) in segment.shards.iter().enumerate() {
                for chunk in chunks {
                    restore(shard, chunk).map_err(&corrupt)?;
                }
            }
            return reader.end();
        }
        (version, _) => return Err(corrupt(format!("unknown version {version}"))),
    };
    if head.sequence != sequence || head.chunks.len() != usize::from(shard_count) {
        return Err(mismatch(head.sequence, head.chunks.len()));
    }
    for (shard, &chunks) in head.chunks.iter().enumerate() {
        for _ in 0..chunks {
            let entries = match reader.next(&mut buffer)? {
                (DONE_SEGMENT_VERSION, payload) => {
                    record::decode_done_chunk(payload).map_err(|error| corrupt(error.to_string()))?
                }
                (version, _) => return Err(corrupt(format!("done chunk of version {version}"))),
            };
            restore(shard, &entries).map_err(&corrupt)?;
        }
    }
    reader.end()
}

/// Writes `segment` (the final transfers added since the last checkpoint) and then
/// `checkpoint`, whose `segments` list the ones before and gain this one; each atomically,
/// each a frame at a time. Removes all checkpoints but the newest [`KEEP`]. On an error neither
/// counts as written: the caller keeps the segment's entries for the next attempt, which writes
/// them under the same sequence number.
///
/// The checkpoint's shard states are consumed (`checkpoint.shards` left empty): each chunk of
/// accounts is freed once written, so the memory a checkpoint holds shrinks as it is written.
pub fn write(
    dir: &Path,
    checkpoint: &mut WalCheckpoint,
    segment: &mut WalDoneSegment,
    pace: Option<Pace<'_>>,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let sequence = list(dir)?.last().map_or(1, |(n, _)| n + 1);
    let path = dir.join(format!("{PREFIX}{sequence:020}{SUFFIX}"));
    let temp = dir.join(format!("{PREFIX}{sequence:020}{SUFFIX}.tmp"));
    let segment_file = segment_path(dir, sequence);
    segment.sequence = sequence;
    checkpoint.segments.push(sequence);
    let shards = std::mem::take(&mut checkpoint.shards);
    let written = write_segment(&segment_file, segment, pace)
        .and_then(|()| write_checkpoint(&temp, &path, checkpoint, shards, pace));
    if let Err(error) = written {
        checkpoint.segments.pop();
        return Err(error);
    }
    let all = list(dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(KEEP)) {
        fs::remove_file(old).map_err(io(old))?;
    }
    Ok(path)
}

fn encoded<T>(path: &Path, encoding: Result<T, rkyv::rancor::Error>) -> Result<T, CheckpointError> {
    encoding.map_err(|error| CheckpointError::Corrupt { path: path.to_path_buf(), reason: error.to_string() })
}

fn write_segment(
    path: &Path,
    segment: &WalDoneSegment,
    pace: Option<Pace<'_>>,
) -> Result<(), CheckpointError> {
    let temp = path.with_extension("qds.tmp");
    let chunks = segment
        .shards
        .iter()
        .map(|chunks| u32::try_from(chunks.len()))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|error| CheckpointError::Corrupt { path: path.to_path_buf(), reason: error.to_string() })?;
    let head = encoded(
        path,
        record::encode_done_segment_head(&WalDoneSegmentHead { sequence: segment.sequence, chunks }),
    )?;
    let mut file = AtomicFile::create(&temp, path, pace).map_err(io(path))?;
    file.frame(DONE_SEGMENT_VERSION, &head).map_err(io(path))?;
    let mut payload = Vec::new();
    for chunk in segment.shards.iter().flatten() {
        payload.clear();
        record::encode_done_chunk(chunk, &mut payload);
        file.frame(DONE_SEGMENT_VERSION, &payload).map_err(io(path))?;
    }
    file.commit().map_err(io(path))
}

fn write_checkpoint(
    temp: &Path,
    path: &Path,
    checkpoint: &WalCheckpoint,
    shards: Vec<WalShardState>,
    pace: Option<Pace<'_>>,
) -> Result<(), CheckpointError> {
    let mut heads = Vec::with_capacity(shards.len());
    let (mut account_counts, mut wallet_counts) = (Vec::new(), Vec::new());
    let (mut accounts, mut wallets) = (Vec::new(), Vec::new());
    let chunk_count = |chunks: &[Vec<u8>]| {
        u32::try_from(chunks.len())
            .map_err(|error| CheckpointError::Corrupt { path: path.to_path_buf(), reason: error.to_string() })
    };
    for WalShardState { mut head, accounts: mut account_chunks, wallets: mut wallet_chunks } in shards {
        // A state upgraded from an older layout holds its wallets whole: chunk them too.
        if !head.wallets.is_empty() {
            let mut scratch = Vec::new();
            for wallet in std::mem::take(&mut head.wallets) {
                wallet_chunks.push(&wallet, &mut scratch);
            }
        }
        let taken = account_chunks.take_chunks();
        account_counts.push((account_chunks.count(), chunk_count(&taken)?));
        accounts.push(taken);
        let taken = wallet_chunks.take_chunks();
        wallet_counts.push((wallet_chunks.count(), chunk_count(&taken)?));
        wallets.push(taken);
        heads.push(head);
    }
    let head = WalCheckpointHead {
        shard_count: checkpoint.shard_count,
        shards: heads,
        accounts: account_counts,
        wallets: wallet_counts,
        segments: checkpoint.segments.clone(),
    };
    let head = encoded(path, record::encode_checkpoint_head(&head))?;
    let mut file = AtomicFile::create(temp, path, pace).map_err(io(path))?;
    file.frame(CHECKPOINT_VERSION, &head).map_err(io(path))?;
    drop(head);
    for chunk in accounts.into_iter().flatten().chain(wallets.into_iter().flatten()) {
        // Each chunk is freed once written: the checkpoint's memory shrinks as its file grows.
        file.frame(CHECKPOINT_VERSION, &chunk).map_err(io(path))?;
    }
    file.commit().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::{Account, AccountFlags, AccountKind};
    use crate::ids::{AccountId, ShardId, TransferId};
    use crate::journal::record::WalShardState;
    use crate::ledger::{Ledger, Outcome};
    use crate::money::Currency;
    use crate::transfer::Transfer;

    fn file(dir: &Path, sequence: u64) -> PathBuf {
        dir.join(format!("{PREFIX}{sequence:020}{SUFFIX}"))
    }

    fn restore(dir: &Path) -> Result<Ledger, Box<dyn std::error::Error>> {
        let loaded = load_latest(dir)?.ok_or("no checkpoint")?;
        let mut restored = Ledger::new(ShardId(0), 1);
        for state in loaded.shards {
            state.restore_into(&mut restored)?;
        }
        for sequence in loaded.segments {
            load_segment(dir, sequence, 1, |_, chunk| {
                restored.restore_done(record::done_entries(chunk)).map_err(|error| error.to_string())
            })?;
        }
        Ok(restored)
    }

    fn take(ledger: &mut Ledger, segments: Vec<u64>) -> (WalCheckpoint, WalDoneSegment) {
        let (state, done) = WalShardState::capture(ledger, 3);
        (
            WalCheckpoint { shard_count: 1, shards: vec![state], segments },
            WalDoneSegment { sequence: 0, shards: vec![done] },
        )
    }

    #[test]
    fn checkpoints_chain_their_done_segments_with_ids_of_both_halves()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut ledger = Ledger::new(ShardId(0), 1);
        let mut log = Vec::new();
        for id in [1, 2] {
            let account =
                Account::new(AccountId(id), Currency::Azn, AccountKind::WALLET, AccountFlags::empty());
            ledger.create_account(account, 1, &mut log);
        }
        // Ids with bits in both 64-bit halves, in the low half only, and at the top.
        let first = [(7_u128 << 64) | 5, 9, u128::MAX - 3];
        let second = [(1_u128 << 127) | 11, 12];
        let transfers = |ids: &[u128]| -> Vec<Transfer> {
            ids.iter().map(|id| Transfer::new(*id, AccountId(1), AccountId(2), 10)).collect()
        };
        let mut outcomes: Vec<Outcome> = Vec::new();
        ledger.submit(&transfers(&first), 2, &mut outcomes, &mut log);
        let dir = tempfile::tempdir()?;
        let (mut checkpoint, mut segment) = take(&mut ledger, Vec::new());
        assert_eq!(segment.shards[0].iter().map(Vec::len).sum::<usize>(), first.len());
        write(dir.path(), &mut checkpoint, &mut segment, None)?;
        assert_eq!(checkpoint.segments, [1]);
        assert!(checkpoint.shards.is_empty(), "the shard states are dropped once encoded");
        // The second checkpoint hands over only what came after the first, and lists both.
        ledger.submit(&transfers(&second), 2, &mut outcomes, &mut log);
        let (mut checkpoint, mut segment) = take(&mut ledger, checkpoint.segments);
        assert_eq!(segment.shards[0].iter().map(Vec::len).sum::<usize>(), second.len());
        write(dir.path(), &mut checkpoint, &mut segment, None)?;
        assert_eq!(checkpoint.segments, [1, 2]);
        let restored = restore(dir.path())?;
        for id in first.iter().chain(&second).copied() {
            assert_eq!(restored.transfer_state(TransferId(id)), ledger.transfer_state(TransferId(id)));
            assert!(restored.transfer_state(TransferId(id)).is_some(), "{id:x}");
        }
        assert_eq!(restored.account(AccountId(2)), ledger.account(AccountId(2)));
        // A listed segment that is gone is an error that says so, not a ledger without it.
        fs::remove_file(segment_path(dir.path(), 1))?;
        let error = restore(dir.path()).err().ok_or("restored without its first segment")?;
        assert!(error.to_string().contains("missing"), "{error}");
        Ok(())
    }

    #[test]
    fn a_segment_of_another_sequence_or_shard_count_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut ledger = Ledger::new(ShardId(0), 1);
        let (mut checkpoint, mut segment) = take(&mut ledger, Vec::new());
        write(dir.path(), &mut checkpoint, &mut segment, None)?;
        let ignore = |_: usize, _: &[[u64; 3]]| Ok(());
        assert!(load_segment(dir.path(), 1, 1, ignore).is_ok());
        assert!(matches!(load_segment(dir.path(), 1, 2, ignore), Err(CheckpointError::Corrupt { .. })));
        fs::copy(segment_path(dir.path(), 1), segment_path(dir.path(), 2))?;
        assert!(matches!(load_segment(dir.path(), 2, 1, ignore), Err(CheckpointError::Corrupt { .. })));
        Ok(())
    }

    #[test]
    fn an_older_layout_is_passed_over_and_an_unknown_one_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, FORMAT_VERSION_V3, b"a checkpoint of the journal's layout");
        fs::write(file(dir.path(), 1), &bytes)?;
        assert!(load_latest(dir.path())?.is_none());
        let mut bytes = Vec::new();
        frame::write_frame(
            &mut bytes,
            CHECKPOINT_VERSION_V4,
            b"a checkpoint with its final transfers inline",
        );
        fs::write(file(dir.path(), 2), &bytes)?;
        assert!(load_latest(dir.path())?.is_none());
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, CHECKPOINT_VERSION_V5, b"a checkpoint holding CRC body hashes");
        fs::write(file(dir.path(), 3), &bytes)?;
        assert!(load_latest(dir.path())?.is_none());
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, CHECKPOINT_VERSION + 1, b"from a newer build");
        fs::write(file(dir.path(), 4), &bytes)?;
        assert!(matches!(load_latest(dir.path()), Err(CheckpointError::Corrupt { .. })));
        Ok(())
    }

    /// Distinct ids of every width: the low bits are `n`, and one high bit more each time.
    fn wide(n: u64) -> u64 {
        n | 1 << (20 + n % 40)
    }

    /// A ledger with ids and balances of many widths, and final transfers.
    fn busy_ledger() -> Ledger {
        let mut ledger = Ledger::new(ShardId(0), 1);
        let mut log = Vec::new();
        for id in 1..=300_u64 {
            let kind = if id % 3 == 0 { AccountKind::WALLET } else { AccountKind(7) };
            let account = Account::new(AccountId(wide(id)), Currency::Azn, kind, AccountFlags::empty());
            ledger.create_account(account, 1_000 + id, &mut log);
        }
        let mut outcomes: Vec<Outcome> = Vec::new();
        let transfers: Vec<Transfer> = (1..=299_u64)
            .map(|id| {
                let (debit, credit) = (wide(id), wide(id + 1));
                Transfer::new(u128::from(id) << 70 | 1, AccountId(debit), AccountId(credit), id * 1_000_003)
            })
            .collect();
        ledger.submit(&transfers, 5_000, &mut outcomes, &mut log);
        // Wallets, one in five with a PIN and one in seven sent an OTP.
        for n in 0..2_000_u64 {
            let msisdn = 994_500_000_000 + n * 7_919;
            let pin = (n % 5 == 0).then_some(crate::wallet::Tag([n.to_le_bytes()[0]; 32]));
            let register = crate::wallet::WalletRequest::Register {
                msisdn,
                currencies: vec![Currency::Azn],
                tier: 0,
                pin,
                language: (n % 3) as u8,
                actor: crate::wallet::Actor::system(),
            };
            let reply = ledger.wallet_request(register, 6_000 + n, &mut log);
            assert!(matches!(reply, crate::wallet::WalletReply::Done), "{reply:?}");
            if n % 7 == 0 {
                let issue = crate::wallet::WalletRequest::IssueOtp {
                    msisdn,
                    nonce: u128::from(n),
                    tag: crate::wallet::Tag([9; 32]),
                    ttl_s: 300,
                };
                let reply = ledger.wallet_request(issue, 7_000 + n, &mut log);
                assert!(matches!(reply, crate::wallet::WalletReply::Done), "{reply:?}");
            }
        }
        ledger
    }

    fn sorted_wallets(ledger: &Ledger) -> Vec<crate::wallet::WalletState> {
        let mut wallets: Vec<_> = ledger.wallets().collect();
        wallets.sort_by_key(|wallet| wallet.msisdn);
        wallets
    }

    #[test]
    fn a_checkpoint_is_read_back_whole_and_damage_anywhere_is_named() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let mut ledger = busy_ledger();
        let (mut checkpoint, mut segment) = take(&mut ledger, Vec::new());
        let path = write(dir.path(), &mut checkpoint, &mut segment, None)?;
        let restored = restore(dir.path())?;
        let sorted = |ledger: &Ledger| {
            let mut accounts: Vec<Account> = ledger.accounts().copied().collect();
            accounts.sort_by_key(|account| account.id);
            accounts
        };
        assert_eq!(sorted(&restored), sorted(&ledger));
        assert_eq!(sorted(&ledger).len(), 300 + 2_000);
        assert_eq!(sorted_wallets(&restored), sorted_wallets(&ledger));
        assert_eq!(sorted_wallets(&ledger).len(), 2_000);
        assert!(sorted_wallets(&ledger).iter().any(|wallet| wallet.otp.is_some()));
        let whole = fs::read(&path)?;
        // Every cut and a flipped bit in every frame: an error, never a smaller ledger.
        for cut in (0..whole.len()).step_by(7) {
            fs::write(&path, &whole[..cut])?;
            let error = load_latest(dir.path()).err().ok_or(format!("cut at {cut} read"))?;
            assert!(error.to_string().contains("offset"), "cut at {cut}: {error}");
        }
        for byte in (0..whole.len()).step_by(97) {
            let mut damaged = whole.clone();
            damaged[byte] ^= 0x10;
            fs::write(&path, &damaged)?;
            assert!(load_latest(dir.path()).is_err(), "flip at {byte} went unseen");
        }
        let mut longer = whole.clone();
        longer.extend_from_slice(b"trailing");
        fs::write(&path, &longer)?;
        let error = load_latest(dir.path()).err().ok_or("trailing bytes read")?;
        assert!(error.to_string().contains("after the last frame"), "{error}");
        Ok(())
    }

    #[test]
    fn a_damaged_done_segment_is_named() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut ledger = busy_ledger();
        let (mut checkpoint, mut segment) = take(&mut ledger, Vec::new());
        write(dir.path(), &mut checkpoint, &mut segment, None)?;
        let path = segment_path(dir.path(), 1);
        let whole = fs::read(&path)?;
        for cut in (0..whole.len()).step_by(5) {
            fs::write(&path, &whole[..cut])?;
            let error = restore(dir.path()).err().ok_or(format!("cut at {cut} restored"))?;
            assert!(error.to_string().contains("offset"), "cut at {cut}: {error}");
        }
        Ok(())
    }

    /// Checkpoints of layout 6 (one rkyv frame), and their done segments, are still read: an
    /// upgraded server starts from its last checkpoint, not from the start of the journal.
    #[test]
    fn a_checkpoint_of_layout_6_is_read() -> Result<(), Box<dyn std::error::Error>> {
        use crate::journal::record::{WalAccount, WalCheckpointV6, WalShardStateV6};
        let dir = tempfile::tempdir()?;
        let mut ledger = busy_ledger();
        let (state, done) = WalShardState::capture(&mut ledger, 9_000);
        let accounts: Vec<WalAccount> = ledger.accounts().map(WalAccount::from).collect();
        let head = state.head;
        let old = WalCheckpointV6 {
            shard_count: 1,
            shards: vec![WalShardStateV6 {
                position: head.position,
                timestamp: head.timestamp,
                accounts,
                transfers: head.transfers,
                credits: head.credits,
                policy: head.policy,
                wallets: ledger.wallets().collect(),
                outflow: head.outflow,
            }],
            segments: vec![1],
        };
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, CHECKPOINT_VERSION_V6, &record::encode_checkpoint_v6(&old)?);
        fs::write(file(dir.path(), 1), &bytes)?;
        let segment = WalDoneSegment { sequence: 1, shards: vec![done] };
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, CHECKPOINT_VERSION_V6, &record::encode_done_segment_v6(&segment)?);
        fs::write(segment_path(dir.path(), 1), &bytes)?;
        let restored = restore(dir.path())?;
        for account in ledger.accounts() {
            assert_eq!(restored.account(account.id), Some(account));
        }
        assert_eq!(restored.account_count(), ledger.account_count());
        assert_eq!(sorted_wallets(&restored), sorted_wallets(&ledger));
        for id in 1..=299_u128 {
            let id = TransferId(id << 70 | 1);
            assert!(ledger.transfer_state(id).is_some());
            assert_eq!(restored.transfer_state(id), ledger.transfer_state(id));
        }
        Ok(())
    }

    /// Checkpoints of layout 7 (the wallets whole in the head frame) are still read, and the
    /// next checkpoint written from what they restore is layout 8.
    #[test]
    fn a_checkpoint_of_layout_7_is_read() -> Result<(), Box<dyn std::error::Error>> {
        use crate::journal::record::WalCheckpointHeadV7;
        let dir = tempfile::tempdir()?;
        let mut ledger = busy_ledger();
        let (mut state, done) = WalShardState::capture(&mut ledger, 9_000);
        let mut head = state.head.clone();
        head.wallets = ledger.wallets().collect();
        let chunks = state.accounts.take_chunks();
        let old = WalCheckpointHeadV7 {
            shard_count: 1,
            shards: vec![head],
            accounts: vec![(state.accounts.count(), u32::try_from(chunks.len())?)],
            segments: vec![1],
        };
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, CHECKPOINT_VERSION_V7, &record::encode_checkpoint_head_v7(&old)?);
        for chunk in &chunks {
            frame::write_frame(&mut bytes, CHECKPOINT_VERSION_V7, chunk);
        }
        fs::write(file(dir.path(), 1), &bytes)?;
        let mut segment = WalDoneSegment { sequence: 1, shards: vec![done] };
        write_segment(&segment_path(dir.path(), 1), &segment, None)?;
        let mut restored = restore(dir.path())?;
        assert_eq!(restored.account_count(), ledger.account_count());
        assert_eq!(sorted_wallets(&restored), sorted_wallets(&ledger));
        // Written again: layout 8, the same wallets.
        let (mut checkpoint, _) = take(&mut restored, vec![1]);
        segment.shards = vec![Vec::new()];
        write(dir.path(), &mut checkpoint, &mut segment, None)?;
        let newest = fs::read(file(dir.path(), 2))?;
        assert!(matches!(
            frame::read_frame_max(&newest, usize::MAX),
            FrameRead::Frame { version: CHECKPOINT_VERSION, .. }
        ));
        assert_eq!(sorted_wallets(&restore(dir.path())?), sorted_wallets(&ledger));
        Ok(())
    }
}
