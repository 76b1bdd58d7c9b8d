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
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::journal::frame::{self, FrameRead};
use crate::journal::record::{
    self, CHECKPOINT_VERSION, CHECKPOINT_VERSION_V4, CHECKPOINT_VERSION_V5, FORMAT_VERSION_V3, WalCheckpoint,
    WalDoneSegment,
};

/// Checkpoints written before they had a layout version of their own carry the journal's
/// version 3; the journal has moved on since, so the number is fixed here. Version 4 held the
/// final transfers inline. Recovery passes over both and replays the journal.
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
pub fn load_latest(dir: &Path) -> Result<Option<WalCheckpoint>, CheckpointError> {
    let Some((_, path)) = list(dir)?.pop() else {
        return Ok(None);
    };
    let bytes = fs::read(&path).map_err(io(&path))?;
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.clone(), reason };
    match frame::read_frame_max(&bytes, usize::MAX) {
        FrameRead::Frame { version, payload, .. } if version == CHECKPOINT_VERSION => {
            record::decode_checkpoint(payload).map(Some).map_err(|error| corrupt(error.to_string()))
        }
        FrameRead::Frame { version, .. } if OLDER_CHECKPOINT_VERSIONS.contains(&version) => {
            // The journal is never cut, so replaying it whole stands in for this checkpoint;
            // the next one is written in the current layout.
            tracing::warn!(path = %path.display(), version, "checkpoint of an older layout; replaying the journal from its start");
            Ok(None)
        }
        FrameRead::Frame { version, .. } => Err(corrupt(format!("unknown version {version}"))),
        FrameRead::Truncated => Err(corrupt("truncated".into())),
        FrameRead::Corrupt(reason) => Err(corrupt(reason.into())),
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
/// the whole new one: into `temp`, fsync, rename over `path`, fsync the directory.
///
/// The bytes go out [`WRITE_CHUNK`] at a time, the kernel asked to start writing each chunk
/// back at once, and with a `pace`, no faster than it allows. A checkpoint is hundreds of MB:
/// written at once, it sits in the page cache until the final sync sends all of it in one
/// burst, and the journal's `fdatasync`s wait behind that burst.
pub(crate) fn write_atomically(
    temp: &Path,
    path: &Path,
    parts: &[&[u8]],
    pace: Option<Pace<'_>>,
) -> std::io::Result<()> {
    let mut file = File::create(temp)?;
    let started = std::time::Instant::now();
    let mut written: u64 = 0;
    for part in parts {
        for chunk in part.chunks(WRITE_CHUNK) {
            file.write_all(chunk)?;
            if let Some(len) = std::num::NonZeroU64::new(chunk.len() as u64) {
                // Advice only: on Linux it starts write-back of the range's dirty pages and returns.
                let _advisory = rustix::fs::fadvise(&file, written, Some(len), rustix::fs::Advice::DontNeed);
            }
            written += chunk.len() as u64;
            if let Some(pace) = pace
                && !pace.hurry.load(std::sync::atomic::Ordering::Acquire)
            {
                let due = std::time::Duration::from_secs_f64(written as f64 / pace.bytes_per_s.max(1) as f64);
                if let Some(early) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(early);
                }
            }
        }
    }
    file.sync_all()?;
    drop(file);
    fs::rename(temp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{sequence:020}{SEGMENT_SUFFIX}"))
}

/// Reads done segment `sequence`, as a checkpoint of `shard_count` shards lists it.
pub fn load_segment(dir: &Path, sequence: u64, shard_count: u16) -> Result<WalDoneSegment, CheckpointError> {
    let path = segment_path(dir, sequence);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Corrupt {
                path,
                reason: "missing: the newest checkpoint lists this done segment; without it, remove the \
                         checkpoints directory to recover by replaying the whole journal"
                    .into(),
            });
        }
        Err(error) => return Err(io(&path)(error)),
    };
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.clone(), reason };
    let segment = match frame::read_frame_max(&bytes, usize::MAX) {
        FrameRead::Frame { version, payload, .. } if version == CHECKPOINT_VERSION => {
            record::decode_done_segment(payload).map_err(|error| corrupt(error.to_string()))?
        }
        FrameRead::Frame { version, .. } => return Err(corrupt(format!("unknown version {version}"))),
        FrameRead::Truncated => return Err(corrupt("truncated".into())),
        FrameRead::Corrupt(reason) => return Err(corrupt(reason.into())),
    };
    if segment.sequence != sequence || segment.shards.len() != usize::from(shard_count) {
        return Err(corrupt(format!(
            "holds segment {} of {} shards where segment {sequence} of {shard_count} was expected",
            segment.sequence,
            segment.shards.len()
        )));
    }
    Ok(segment)
}

fn encode_framed<T>(
    path: &Path,
    value: &T,
    encode: impl FnOnce(&T) -> Result<rkyv::util::AlignedVec, rkyv::rancor::Error>,
) -> Result<([u8; frame::HEADER_LEN + 1], rkyv::util::AlignedVec), CheckpointError> {
    let payload = encode(value)
        .map_err(|error| CheckpointError::Corrupt { path: path.to_path_buf(), reason: error.to_string() })?;
    if payload.len() >= u32::MAX as usize {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{} bytes do not fit one frame", payload.len()),
        });
    }
    Ok((frame::header(CHECKPOINT_VERSION, &payload), payload))
}

/// Writes `segment` (the final transfers added since the last checkpoint) and then
/// `checkpoint`, whose `segments` list the ones before and gain this one; each atomically.
/// Removes all checkpoints but the newest [`KEEP`]. On an error neither counts as written:
/// the caller keeps the segment's entries for the next attempt, which writes them under the
/// same sequence number.
///
/// The checkpoint's shard states are dropped (`checkpoint.shards` left empty) once encoded,
/// before the paced writes: with 10M accounts they are ~600 MB, held beside their encoding for
/// the tens of seconds the files take to write.
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
    let encoded = encode_framed(&path, &*checkpoint, record::encode_checkpoint);
    checkpoint.shards = Vec::new();
    let written = encoded.and_then(|(checkpoint_header, checkpoint_payload)| {
        let (header, payload) = encode_framed(&segment_file, &*segment, record::encode_done_segment)?;
        let segment_temp = segment_file.with_extension("qds.tmp");
        write_atomically(&segment_temp, &segment_file, &[&header, &payload], pace)
            .map_err(io(&segment_file))?;
        drop(payload);
        write_atomically(&temp, &path, &[&checkpoint_header, &checkpoint_payload], pace).map_err(io(&path))
    });
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
        loaded.shards[0].restore_into(&mut restored)?;
        for sequence in loaded.segments {
            let segment = load_segment(dir, sequence, 1)?;
            restored.restore_done(record::done_entries(&segment.shards[0]))?;
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
        assert!(load_segment(dir.path(), 1, 1).is_ok());
        assert!(matches!(load_segment(dir.path(), 1, 2), Err(CheckpointError::Corrupt { .. })));
        fs::copy(segment_path(dir.path(), 1), segment_path(dir.path(), 2))?;
        assert!(matches!(load_segment(dir.path(), 2, 1), Err(CheckpointError::Corrupt { .. })));
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
}
