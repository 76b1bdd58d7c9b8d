//! Torn and corrupt journals. A crash can leave the last record of the last segment half
//! written; recovery must cut it off and keep everything before it. Damage anywhere else is not
//! a crash but corruption, and the engine must refuse to open, naming the segment and offset.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::ids::home_shard;
use engine::journal::frame::{FrameRead, read_frame};
use engine::journal::record::{WalRecord, decode_record};
use engine::ledger::Command;
use engine::{AccountId, Engine, EngineConfig, Transfer, TransferId, TransferResult};
use qepik_tests::{ISSUANCE, block_on, slow, world};

const SHARDS: u16 = 2;
const WALLETS: u64 = 8;
/// Small segments, so that the journal has several and "the last segment" means something.
const SEGMENT_LEN_MAX: u64 = 2_048;

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shard_count = SHARDS;
    config.views = false;
    config.segment_len_max = SEGMENT_LEN_MAX;
    config
}

/// One journal record as found on disk, with the transfers it posts.
#[derive(Debug, Clone)]
struct Frame {
    start: usize,
    end: usize,
    posted: Vec<Transfer>,
}

#[derive(Debug)]
struct Journal {
    /// (path, frames) per segment, oldest first.
    segments: Vec<(PathBuf, Vec<Frame>)>,
}

impl Journal {
    fn read(dir: &Path) -> anyhow::Result<Journal> {
        let mut segments = Vec::new();
        for (_, path) in engine::journal::segments(&dir.join("journal"))? {
            let bytes = fs::read(&path)?;
            let mut frames = Vec::new();
            let mut offset = 0;
            // The last segment may end in zeros the writer wrote ahead of its next group.
            while offset < bytes.len() && bytes[offset..].iter().any(|byte| *byte != 0) {
                let FrameRead::Frame { version, payload, len } = read_frame(&bytes[offset..]) else {
                    anyhow::bail!("{} is damaged at {offset}", path.display());
                };
                // Group headers (one per group commit) are frames that hold no record.
                if version == engine::journal::frame::GROUP_VERSION {
                    frames.push(Frame { start: offset, end: offset + len, posted: Vec::new() });
                    offset += len;
                    continue;
                }
                let mut posted = Vec::new();
                if let WalRecord::Batch { commands, .. } = decode_record(version, payload)? {
                    for command in &commands {
                        match Command::try_from(command)? {
                            Command::Transfer(t) => posted.push(t),
                            Command::CreateAccount(_) => {}
                            other => anyhow::bail!("this test writes only local transfers: {other:?}"),
                        }
                    }
                }
                frames.push(Frame { start: offset, end: offset + len, posted });
                offset += len;
            }
            segments.push((path, frames));
        }
        Ok(Journal { segments })
    }

    fn last(&self) -> anyhow::Result<&(PathBuf, Vec<Frame>)> {
        self.segments.last().context("no segment")
    }

    /// Transfers in the segments before the last: present whatever happens to the last one.
    fn settled(&self) -> Vec<Transfer> {
        let earlier = &self.segments[..self.segments.len().saturating_sub(1)];
        earlier.iter().flat_map(|(_, frames)| frames).flat_map(|f| f.posted.clone()).collect()
    }

    fn all(&self) -> Vec<Transfer> {
        self.segments.iter().flat_map(|(_, frames)| frames).flat_map(|f| f.posted.clone()).collect()
    }
}

/// Writes the journal: a funded world, then local transfers one submission (one record) each,
/// until there are three segments or more and the last holds at least `records` transfer records.
fn write_journal(dir: &Path, records: usize) -> anyhow::Result<Journal> {
    let pairs: Vec<(u64, u64)> = (1..=WALLETS)
        .flat_map(|a| (1..=WALLETS).map(move |b| (a, b)))
        .filter(|(a, b)| a != b && home_shard(AccountId(*a), SHARDS) == home_shard(AccountId(*b), SHARDS))
        .collect();
    anyhow::ensure!(!pairs.is_empty(), "no two wallets share a shard");
    let mut id = 0_u64;
    let mut count = 30;
    loop {
        let engine = Engine::open(config(dir))?;
        if id == 0 {
            world(&engine, WALLETS, 1_000)?;
        }
        for _ in 0..count {
            id += 1;
            let (a, b) = pairs[usize::try_from(id)? % pairs.len()];
            let transfer = Transfer::new(u128::from(id), AccountId(a), AccountId(b), 1 + id % 7);
            anyhow::ensure!(engine.submit_blocking(vec![transfer])? == [TransferResult::Ok]);
        }
        engine.shutdown();
        let journal = Journal::read(dir)?;
        let (_, frames) = journal.last()?;
        if journal.segments.len() >= 3 && frames.iter().filter(|f| !f.posted.is_empty()).count() >= records {
            return Ok(journal);
        }
        count = 4;
    }
}

/// A fresh copy of `from`'s data directory in `to`.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        fs::remove_dir_all(to)?;
    }
    fs::create_dir_all(to.join("journal"))?;
    for entry in fs::read_dir(from.join("journal"))? {
        let entry = entry?;
        fs::copy(entry.path(), to.join("journal").join(entry.file_name()))?;
    }
    Ok(())
}

/// Opens `dir` and checks that exactly `present` of `all` are there, with the balances they
/// add up to, and that debits equal credits.
fn check_present(engine: &Engine, all: &[Transfer], present: &[Transfer]) -> anyhow::Result<()> {
    let ids: Vec<TransferId> = all.iter().map(|t| t.id).collect();
    let found = block_on(engine.lookup_transfers(&ids))?;
    let present_ids: std::collections::HashSet<TransferId> = present.iter().map(|t| t.id).collect();
    for (transfer, stored) in all.iter().zip(&found) {
        let expected = present_ids.contains(&transfer.id);
        anyhow::ensure!(
            stored.is_some() == expected,
            "transfer {} should be {}",
            transfer.id,
            if expected { "present" } else { "absent" }
        );
    }
    let mut balances: HashMap<AccountId, i128> = HashMap::new();
    for t in present {
        *balances.entry(t.debit_account_id).or_default() -= i128::from(t.amount);
        *balances.entry(t.credit_account_id).or_default() += i128::from(t.amount);
    }
    let mut accounts: Vec<AccountId> = (1..=WALLETS).map(AccountId).collect();
    accounts.push(ISSUANCE);
    for (id, account) in accounts.iter().zip(block_on(engine.lookup_accounts(&accounts))?) {
        let balance = account.map_or(0, |a| a.balance_posted());
        let expected = balances.get(id).copied().unwrap_or(0);
        anyhow::ensure!(balance == expected, "account {id}: {balance}, expected {expected}");
    }
    let totals = engine.totals()?;
    anyhow::ensure!(totals.values().all(|t| t.balanced()), "unbalanced: {totals:?}");
    Ok(())
}

/// The single-bit flips tried in a record: one per byte (a different bit each time), or every
/// bit of every byte when slow.
fn flips(frame: &Frame) -> Vec<(usize, u32)> {
    let every = slow();
    (frame.start..frame.end)
        .flat_map(|byte| {
            let one = u32::try_from(byte % 8).unwrap_or(0);
            (0..8).filter(move |bit| every || *bit == one).map(move |bit| (byte, bit))
        })
        .collect()
}

#[test]
fn a_torn_tail_is_cut_at_every_offset() -> anyhow::Result<()> {
    let original = tempfile::tempdir()?;
    let journal = write_journal(original.path(), 4)?;
    let (last_path, frames) = journal.last()?;
    let file_name = last_path.file_name().context("segment name")?;
    let len = frames.last().context("empty segment")?.end;
    let meta_end = frames[0].end;
    // The last three records (and the segment's opening meta record); all of it when slow.
    let first_cut = if slow() { meta_end } else { frames[frames.len() - 3].start };
    let all = journal.all();
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path().join("data");
    for cut in (0..meta_end).chain(first_cut..len) {
        copy_dir(original.path(), &dir)?;
        let segment = dir.join("journal").join(file_name);
        fs::OpenOptions::new().write(true).open(&segment)?.set_len(u64::try_from(cut)?)?;
        let mut present = journal.settled();
        present.extend(frames.iter().filter(|f| f.end <= cut).flat_map(|f| f.posted.clone()));
        let boundary = frames.iter().map(|f| f.end).filter(|end| *end <= cut).max().unwrap_or(0);
        let engine = Engine::open(config(&dir)).with_context(|| format!("open after a cut at {cut}"))?;
        anyhow::ensure!(
            engine.recovery_report().torn_bytes == u64::try_from(cut - boundary)?,
            "cut at {cut}: {:?}",
            engine.recovery_report()
        );
        check_present(&engine, &all, &present).with_context(|| format!("cut at {cut} of {len}"))?;
        // The journal goes on from the cut: a new transfer lands and survives a reopen.
        if cut % 5 == 0 {
            let transfer = Transfer::new(1 << 64, ISSUANCE, AccountId(1), 5);
            anyhow::ensure!(engine.submit_blocking(vec![transfer])? == [TransferResult::Ok]);
            engine.shutdown();
            drop(engine);
            let engine =
                Engine::open(config(&dir)).with_context(|| format!("reopen after a cut at {cut}"))?;
            anyhow::ensure!(engine.recovery_report().torn_bytes == 0, "{:?}", engine.recovery_report());
            let mut all = all.clone();
            all.push(transfer);
            present.push(transfer);
            check_present(&engine, &all, &present).with_context(|| format!("append after a cut at {cut}"))?;
        }
    }
    Ok(())
}

#[test]
fn a_damaged_last_record_is_a_torn_tail() -> anyhow::Result<()> {
    let original = tempfile::tempdir()?;
    let journal = write_journal(original.path(), 4)?;
    let (last_path, frames) = journal.last()?;
    let file_name = last_path.file_name().context("segment name")?;
    let last = frames.last().context("empty segment")?;
    let all = journal.all();
    let present: Vec<Transfer> = all.iter().filter(|t| !last.posted.contains(t)).copied().collect();
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path().join("data");
    for (byte, bit) in flips(last) {
        copy_dir(original.path(), &dir)?;
        let segment = dir.join("journal").join(file_name);
        let mut bytes = fs::read(&segment)?;
        bytes[byte] ^= 1 << bit;
        fs::write(&segment, &bytes)?;
        let engine = Engine::open(config(&dir)).with_context(|| format!("open after a flip at {byte}"))?;
        anyhow::ensure!(
            engine.recovery_report().torn_bytes == u64::try_from(last.end - last.start)?,
            "flip at {byte}: {:?}",
            engine.recovery_report()
        );
        check_present(&engine, &all, &present).with_context(|| format!("flip at {byte}"))?;
    }
    Ok(())
}

#[test]
fn damage_before_valid_records_refuses_to_open() -> anyhow::Result<()> {
    let original = tempfile::tempdir()?;
    let journal = write_journal(original.path(), 4)?;
    let (last_path, last_frames) = journal.last()?;
    let (first_path, first_frames) = journal.segments.first().context("no segment")?;
    // The last record but one of the last segment, and the last record of the first segment:
    // neither is a tail, since valid records (or segments) follow.
    let cases = [
        (last_path, &last_frames[last_frames.len() - 2]),
        (first_path, first_frames.last().context("empty segment")?),
    ];
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path().join("data");
    for (path, frame) in cases {
        let file_name = path.file_name().context("segment name")?;
        for (byte, bit) in flips(frame) {
            copy_dir(original.path(), &dir)?;
            let segment = dir.join("journal").join(file_name);
            let mut bytes = fs::read(&segment)?;
            bytes[byte] ^= 1 << bit;
            fs::write(&segment, &bytes)?;
            let Err(error) = Engine::open(config(&dir)) else {
                anyhow::bail!("opened despite a flip at {byte} of {}", segment.display());
            };
            let message = error.to_string();
            anyhow::ensure!(
                message.contains(&*file_name.to_string_lossy())
                    && message.contains(&format!("offset {}", frame.start)),
                "flip at {byte} of {}: {message}",
                segment.display()
            );
            // Refusing must not have repaired anything.
            anyhow::ensure!(fs::read(&segment)? == bytes, "the damaged segment was changed");
        }
    }
    Ok(())
}
