//! Checkpoints: every shard's state at a journal position, so recovery replays only what came
//! after. Written to a temporary file, fsynced, renamed into place, and the directory fsynced,
//! so a crash leaves either the old checkpoint or the new one, never half of one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::journal::frame::{self, FrameRead};
use crate::journal::record::{self, CHECKPOINT_VERSION, FORMAT_VERSION_V3, WalCheckpoint};

/// Checkpoints written before they had a layout version of their own carry the journal's
/// version 3; the journal has moved on since, so the number is fixed here.
const OLDER_CHECKPOINT_VERSION: u8 = FORMAT_VERSION_V3;

const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".qcp";
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
        FrameRead::Frame { version, .. } if version == OLDER_CHECKPOINT_VERSION => {
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

/// Writes `parts`, one after the other, to `path` so that a crash leaves either the old file or
/// the whole new one: into `temp`, fsync, rename over `path`, fsync the directory.
pub(crate) fn write_atomically(temp: &Path, path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut file = File::create(temp)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    drop(file);
    fs::rename(temp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Writes `checkpoint` atomically and removes all but the newest [`KEEP`].
pub fn write(dir: &Path, checkpoint: &WalCheckpoint) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let sequence = list(dir)?.last().map_or(1, |(n, _)| n + 1);
    let path = dir.join(format!("{PREFIX}{sequence:020}{SUFFIX}"));
    let temp = dir.join(format!("{PREFIX}{sequence:020}{SUFFIX}.tmp"));
    let payload = record::encode_checkpoint(checkpoint)
        .map_err(|error| CheckpointError::Corrupt { path: path.clone(), reason: error.to_string() })?;
    if payload.len() >= u32::MAX as usize {
        return Err(CheckpointError::Corrupt {
            path,
            reason: format!("state of {} bytes does not fit one checkpoint frame", payload.len()),
        });
    }
    let header = frame::header(CHECKPOINT_VERSION, &payload);
    write_atomically(&temp, &path, &[&header, &payload]).map_err(io(&path))?;
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

    #[test]
    fn a_checkpoint_round_trips_with_ids_of_both_halves() -> Result<(), Box<dyn std::error::Error>> {
        let mut ledger = Ledger::new(ShardId(0), 1);
        let mut log = Vec::new();
        for id in [1, 2] {
            let account =
                Account::new(AccountId(id), Currency::Azn, AccountKind::WALLET, AccountFlags::empty());
            ledger.create_account(account, 1, &mut log);
        }
        // Ids with bits in both 64-bit halves, in the low half only, and at the top.
        let ids = [(7_u128 << 64) | 5, 9, u128::MAX - 3];
        let transfers: Vec<Transfer> =
            ids.iter().map(|id| Transfer::new(*id, AccountId(1), AccountId(2), 10)).collect();
        let mut outcomes: Vec<Outcome> = Vec::new();
        ledger.submit(&transfers, 2, &mut outcomes, &mut log);
        let dir = tempfile::tempdir()?;
        let state = WalShardState::capture(&ledger, 3);
        write(dir.path(), &WalCheckpoint { shard_count: 1, shards: vec![state] })?;
        let loaded = load_latest(dir.path())?.ok_or("no checkpoint")?;
        let mut restored = Ledger::new(ShardId(0), 1);
        loaded.shards[0].restore_into(&mut restored)?;
        for id in ids {
            assert_eq!(restored.transfer_state(TransferId(id)), ledger.transfer_state(TransferId(id)));
            assert!(restored.transfer_state(TransferId(id)).is_some(), "{id:x}");
        }
        assert_eq!(restored.account(AccountId(2)), ledger.account(AccountId(2)));
        Ok(())
    }

    #[test]
    fn an_older_layout_is_passed_over_and_an_unknown_one_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, OLDER_CHECKPOINT_VERSION, b"a checkpoint of the journal's layout");
        fs::write(file(dir.path(), 1), &bytes)?;
        assert!(load_latest(dir.path())?.is_none());
        let mut bytes = Vec::new();
        frame::write_frame(&mut bytes, CHECKPOINT_VERSION + 1, b"from a newer build");
        fs::write(file(dir.path(), 2), &bytes)?;
        assert!(matches!(load_latest(dir.path()), Err(CheckpointError::Corrupt { .. })));
        Ok(())
    }
}
