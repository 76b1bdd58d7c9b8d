//! Where account history lives: an append-only log of 64-byte slots holding lines, each naming
//! the previous line of its account, and a fjall tree of pages, one key per [`PAGE_LINES`] lines
//! of an account. A transfer's first line (the debit's) takes two slots; its second line (the
//! credit's) takes one, right after, and shares the first's body (id, reference, amount, code,
//! currency, kind, time): a line is addressed by its first slot. Each account's running state (balance, line count, its last line, how many of its
//! lines are paged) is kept in memory and saved with the tail's position in a snapshot file.
//!
//! Why not one sled key per line, as before: sled 0.34 copies a whole leaf on each insert, and
//! lines from random wallets land in random leaves of a tree that only grows. Profiled, the views
//! sustained about 15k transfers/s of history that way. Here a line costs an append to a file
//! and a map update; sled takes one write per [`PAGE_LINES`] lines of an account.
//!
//! Reading an account's lines in a window: the pages whose lines may fall in it come from a sled
//! range scan, and each page is read by following the back links from its last line; the lines
//! after the last page (fewer than [`PAGE_LINES`]) are read back from the running state's last
//! line.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use super::{Found, HistoryEntry, Tail, decode_history, decode_transfer, encode_history, encode_transfer};
use crate::ids::AccountId;
use crate::journal::frame::{self, FrameRead};

/// The log is made of slots of this many bytes; a line's index is the index of its first slot.
pub(super) const SLOT_LEN: u64 = 64;
const SLOT_BYTES: usize = 64;
const _: () = assert!(SLOT_BYTES as u64 == SLOT_LEN);
/// A whole line, two slots: marker (1), back link (8), key (24), value (77), padding, CRC32C (4).
const FULL_BYTES: usize = 2 * SLOT_BYTES;
/// Slots of a whole line.
pub(super) const FULL_SLOTS: u64 = 2;
/// The second line of a transfer, one slot: marker (1), back link (8), account (8), booked
/// time (8), line number (8), balance after (16), padding, CRC32C (4). Its transfer's id,
/// reference, amount, code, currency, kind and times are those of the whole line in the two
/// slots before it (the transfer's first line, whose account is this line's other account).
/// A transfer's two lines thus take 192 bytes instead of 256: the history is the views'
/// largest write, more than the journal's.
const SIBLING_BYTES: usize = SLOT_BYTES;
const FULL: u8 = 0xF1;
const SIBLING: u8 = 0x5B;
/// Lines of an account per page. The lines after an account's last page are read through
/// their back links, so a read walks at most this many lines beyond its window.
pub(super) const PAGE_LINES: u64 = 64;
const FULL_CRC_AT: usize = FULL_BYTES - 4;
const SIBLING_CRC_AT: usize = SIBLING_BYTES - 4;
const SNAPSHOT_VERSION: u8 = 1;
const SNAPSHOT_FILE: &str = "history.snapshot";
const LOG_FILE: &str = "history.log";

/// An account's running state in the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Running {
    /// Posted balance after the last line: credits less debits, minor units.
    pub balance: i128,
    /// Lines so far.
    pub lines: u64,
    /// The last line's booked time.
    pub booked_at: u64,
    /// The log index of the last line, plus one (0: no line yet).
    pub last: u64,
    /// How many of the first lines are in sealed pages.
    pub sealed: u64,
    /// The booked time of the first line after the sealed ones.
    pub open_from: u64,
}

const RUNNING_LEN: usize = 16 + 5 * 8;

impl Running {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.balance.to_le_bytes());
        for field in [self.lines, self.booked_at, self.last, self.sealed, self.open_from] {
            out.extend_from_slice(&field.to_le_bytes());
        }
    }

    fn decode(bytes: &[u8]) -> Option<Running> {
        let u64_at = |i: usize| bytes.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
        Some(Running {
            balance: i128::from_le_bytes(bytes.get(..16)?.try_into().ok()?),
            lines: u64_at(16)?,
            booked_at: u64_at(24)?,
            last: u64_at(32)?,
            sealed: u64_at(40)?,
            open_from: u64_at(48)?,
        })
    }

    /// Lines after the last sealed page.
    pub fn open_lines(&self) -> u64 {
        self.lines.saturating_sub(self.sealed)
    }
}

/// A line as the log holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoredLine {
    /// The log index of the account's previous line, plus one (0: the first line).
    pub prev: u64,
    pub account: AccountId,
    pub entry: HistoryEntry,
}

/// Appends one whole line ([`FULL_SLOTS`] slots) to `out`.
pub(super) fn encode_line(out: &mut Vec<u8>, prev: u64, account: AccountId, entry: &HistoryEntry) {
    let start = out.len();
    out.resize(start + FULL_BYTES, 0);
    let line = &mut out[start..];
    line[0] = FULL;
    line[1..9].copy_from_slice(&prev.to_le_bytes());
    line[9..33].copy_from_slice(&super::history_key(account, entry.position()));
    line[33..33 + super::HISTORY_VALUE_LEN].copy_from_slice(&encode_history(entry));
    let crc = crc32c::crc32c(&line[..FULL_CRC_AT]);
    line[FULL_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// Appends the second line of a transfer (one slot) to `out`, right after its first line: what
/// the two share is read from that one.
pub(super) fn encode_sibling(out: &mut Vec<u8>, prev: u64, account: AccountId, entry: &HistoryEntry) {
    let start = out.len();
    out.resize(start + SIBLING_BYTES, 0);
    let line = &mut out[start..];
    line[0] = SIBLING;
    line[1..9].copy_from_slice(&prev.to_le_bytes());
    line[9..17].copy_from_slice(&account.0.to_le_bytes());
    line[17..25].copy_from_slice(&entry.booked_at.to_le_bytes());
    line[25..33].copy_from_slice(&entry.line.to_le_bytes());
    line[33..49].copy_from_slice(&entry.balance_after.to_le_bytes());
    let crc = crc32c::crc32c(&line[..SIBLING_CRC_AT]);
    line[SIBLING_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// The whole line at the front of `bytes`, if its marker, checksum and fields hold.
pub(super) fn decode_line(bytes: &[u8]) -> Option<StoredLine> {
    if *bytes.first()? != FULL {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(FULL_CRC_AT..FULL_BYTES)?.try_into().ok()?);
    if crc32c::crc32c(bytes.get(..FULL_CRC_AT)?) != crc {
        return None;
    }
    let key = bytes.get(9..33)?;
    Some(StoredLine {
        prev: u64::from_le_bytes(bytes.get(1..9)?.try_into().ok()?),
        account: AccountId(u64::from_be_bytes(key.get(..8)?.try_into().ok()?)),
        entry: decode_history(key, bytes.get(33..33 + super::HISTORY_VALUE_LEN)?)?,
    })
}

/// The sibling line at the front of `bytes`, completed from `first`, the whole line before it,
/// if its marker and checksum hold and it is the other side of `first`'s transfer.
pub(super) fn decode_sibling(bytes: &[u8], first: &StoredLine) -> Option<StoredLine> {
    if *bytes.first()? != SIBLING {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(SIBLING_CRC_AT..SIBLING_BYTES)?.try_into().ok()?);
    if crc32c::crc32c(bytes.get(..SIBLING_CRC_AT)?) != crc {
        return None;
    }
    let u64_at = |i: usize| bytes.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
    let account = AccountId(u64_at(9)?);
    if first.entry.other_account != account {
        return None;
    }
    Some(StoredLine {
        prev: u64_at(1)?,
        account,
        entry: HistoryEntry {
            booked_at: u64_at(17)?,
            line: u64_at(25)?,
            balance_after: i128::from_le_bytes(bytes.get(33..49)?.try_into().ok()?),
            other_account: first.account,
            debit: !first.entry.debit,
            ..first.entry
        },
    })
}

/// A page's value in the pages tree: the log index of its last line plus one, and its length.
pub(super) fn encode_page(last: u64, count: u64) -> [u8; 16] {
    let mut out = [0_u8; 16];
    out[..8].copy_from_slice(&last.to_be_bytes());
    out[8..].copy_from_slice(&count.to_be_bytes());
    out
}

pub(super) fn decode_page(value: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(value.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(value.get(8..16)?.try_into().ok()?),
    ))
}

/// How much of the log accumulates before its write-back is started ([`HistoryLog::write_at`]).
const WRITEBACK_CHUNK: u64 = 1024 * 1024;

/// The log file of lines. Written by the tail thread only, at the end it knows; read by anyone.
#[derive(Debug)]
pub(super) struct HistoryLog {
    file: File,
    path: PathBuf,
}

fn damaged(path: &Path, index: u64, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("history log {}: line {index} {what}; `qepik reindex` rebuilds it", path.display()),
    )
}

impl HistoryLog {
    pub fn open(dir: &Path) -> io::Result<HistoryLog> {
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        Ok(HistoryLog { file, path })
    }

    /// Whole slots in the file.
    pub fn lines(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len() / SLOT_LEN)
    }

    /// Cuts the log to its first `slots` slots.
    pub fn truncate(&self, slots: u64) -> io::Result<()> {
        self.file.set_len(slots.saturating_mul(SLOT_LEN))
    }

    /// Writes encoded lines from slot `first` on.
    ///
    /// Each time the log grows past a [`WRITEBACK_CHUNK`] boundary, the kernel is asked to
    /// start writing the chunks just completed. Left to itself it lets tens of seconds of lines
    /// pile up in the page cache and writes them in bursts of hundreds of MB, which the
    /// journal's `fdatasync`s then queue behind for up to seconds.
    pub fn write_at(&self, first: u64, bytes: &[u8]) -> io::Result<()> {
        let start = first.saturating_mul(SLOT_LEN);
        self.file.write_all_at(bytes, start)?;
        let end = start.saturating_add(bytes.len() as u64);
        let (from, to) = (start / WRITEBACK_CHUNK * WRITEBACK_CHUNK, end / WRITEBACK_CHUNK * WRITEBACK_CHUNK);
        if let Some(len) = std::num::NonZeroU64::new(to - from) {
            // Advice only: on Linux it starts write-back of the range's dirty pages and returns.
            let _advisory = rustix::fs::fadvise(&self.file, from, Some(len), rustix::fs::Advice::DontNeed);
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The line whose first slot is `index`: a whole line, or a sibling completed from the
    /// whole line in the two slots before it. One read for a whole line, two for a sibling.
    pub fn read(&self, index: u64) -> io::Result<StoredLine> {
        let past_end = || damaged(&self.path, index, "is past the end of the file");
        let mut bytes = [0_u8; FULL_BYTES + SIBLING_BYTES];
        // Up to a whole line: a sibling at the end of the file has only its one slot.
        let mut got = 0;
        while got < FULL_BYTES {
            match self.file.read_at(&mut bytes[got..FULL_BYTES], index.saturating_mul(SLOT_LEN) + got as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if got < SIBLING_BYTES {
            return Err(past_end());
        }
        if bytes[0] != SIBLING {
            if got < FULL_BYTES {
                return Err(past_end());
            }
            return decode_line(&bytes).ok_or_else(|| damaged(&self.path, index, "fails its checksum"));
        }
        let Some(first) = index.checked_sub(FULL_SLOTS) else {
            return Err(damaged(&self.path, index, "is a second line with no first before it"));
        };
        bytes.copy_within(..SIBLING_BYTES, FULL_BYTES);
        self.file.read_exact_at(&mut bytes[..FULL_BYTES], first.saturating_mul(SLOT_LEN))?;
        let whole = decode_line(&bytes).ok_or_else(|| damaged(&self.path, first, "fails its checksum"))?;
        decode_sibling(&bytes[FULL_BYTES..], &whole)
            .ok_or_else(|| damaged(&self.path, index, "fails its checksum or names another transfer's side"))
    }

    /// The `count` lines of `account` that end at log index `last - 1`, oldest first.
    pub fn chain(&self, account: AccountId, last: u64, count: u64) -> io::Result<Vec<HistoryEntry>> {
        let mut lines = Vec::with_capacity(usize::try_from(count.min(PAGE_LINES)).unwrap_or(0));
        let mut next = last;
        for _ in 0..count {
            let Some(index) = next.checked_sub(1) else {
                return Err(damaged(&self.path, last, "starts a chain shorter than its page"));
            };
            let line = self.read(index)?;
            if line.account != account {
                return Err(damaged(&self.path, index, "belongs to another account than its chain"));
            }
            lines.push(line.entry);
            next = line.prev;
        }
        lines.reverse();
        Ok(lines)
    }
}

/// What the tail thread restarts from: its own state ([`Tail`]: position, the log's length,
/// cross-shard transfers in flight, unresolved holds) and every account's running state.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub tail: Tail,
    pub running: FxHashMap<AccountId, Running>,
}

const FOUND_LEN: usize = super::TRANSFER_VALUE_LEN + 16;

fn u64_at(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let value = u64::from_le_bytes(bytes.get(*at..*at + 8)?.try_into().ok()?);
    *at += 8;
    Some(value)
}

fn u128_at(bytes: &[u8], at: &mut usize) -> Option<u128> {
    let value = u128::from_le_bytes(bytes.get(*at..*at + 16)?.try_into().ok()?);
    *at += 16;
    Some(value)
}

fn encode_found(out: &mut Vec<u8>, found: &Found) {
    out.extend_from_slice(&encode_transfer(&found.transfer, found.at));
    out.extend_from_slice(&found.from.to_le_bytes());
    out.extend_from_slice(&found.to.to_le_bytes());
}

fn found_at(bytes: &[u8], at: &mut usize) -> Option<Found> {
    let (transfer, when) = decode_transfer(bytes.get(*at..*at + super::TRANSFER_VALUE_LEN)?)?;
    *at += super::TRANSFER_VALUE_LEN;
    Some(Found { transfer, at: when, from: u64_at(bytes, at)?, to: u64_at(bytes, at)? })
}

impl Snapshot {
    fn encode(tail: &Tail, running: &FxHashMap<AccountId, Running>) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + running.len() * (8 + RUNNING_LEN));
        for field in [tail.applied, tail.log_lines, running.len() as u64] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        for (account, state) in running {
            out.extend_from_slice(&account.0.to_le_bytes());
            state.encode(&mut out);
        }
        out.extend_from_slice(&(tail.reserved.len() as u64).to_le_bytes());
        for (id, found) in &tail.reserved {
            out.extend_from_slice(&id.to_le_bytes());
            encode_found(&mut out, found);
        }
        out.extend_from_slice(&(tail.members.len() as u64).to_le_bytes());
        for (parent, chain) in &tail.members {
            out.extend_from_slice(&parent.to_le_bytes());
            out.extend_from_slice(&(chain.len() as u64).to_le_bytes());
            for found in chain {
                encode_found(&mut out, found);
            }
        }
        out.extend_from_slice(&(tail.holds.len() as u64).to_le_bytes());
        for (id, hold) in &tail.holds {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&encode_transfer(hold, 0));
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let at = &mut 0;
        let applied = u64_at(bytes, at)?;
        let log_lines = u64_at(bytes, at)?;
        // Counts are checked against the bytes left before anything is reserved for them.
        let count = |at: &mut usize, each: usize| -> Option<usize> {
            let n = usize::try_from(u64_at(bytes, at)?).ok()?;
            (n.checked_mul(each)? <= bytes.len().saturating_sub(*at)).then_some(n)
        };
        let n = count(at, 8 + RUNNING_LEN)?;
        let mut running = FxHashMap::default();
        running.reserve(n);
        for _ in 0..n {
            let account = AccountId(u64_at(bytes, at)?);
            running.insert(account, Running::decode(bytes.get(*at..*at + RUNNING_LEN)?)?);
            *at += RUNNING_LEN;
        }
        let n = count(at, 16 + FOUND_LEN)?;
        let mut reserved = FxHashMap::default();
        for _ in 0..n {
            let id = u128_at(bytes, at)?;
            reserved.insert(id, found_at(bytes, at)?);
        }
        let n = count(at, 24)?;
        let mut members = FxHashMap::default();
        for _ in 0..n {
            let parent = u128_at(bytes, at)?;
            let len = count(at, FOUND_LEN)?;
            let chain = (0..len).map(|_| found_at(bytes, at)).collect::<Option<Vec<_>>>()?;
            members.insert(parent, chain);
        }
        let n = count(at, 16 + super::TRANSFER_VALUE_LEN)?;
        let mut holds = FxHashMap::default();
        for _ in 0..n {
            let id = u128_at(bytes, at)?;
            let (hold, _) = decode_transfer(bytes.get(*at..*at + super::TRANSFER_VALUE_LEN)?)?;
            *at += super::TRANSFER_VALUE_LEN;
            holds.insert(id, hold);
        }
        let tail = Tail { applied, log_lines, reserved, members, holds, ..Tail::default() };
        (*at == bytes.len()).then_some(Snapshot { tail, running })
    }
}

/// Writes the snapshot atomically: a temporary file, fsync, rename, directory fsync.
pub(super) fn write_snapshot(
    dir: &Path,
    tail: &Tail,
    running: &FxHashMap<AccountId, Running>,
) -> io::Result<()> {
    let payload = Snapshot::encode(tail, running);
    if payload.len() >= u32::MAX as usize {
        return Err(io::Error::other(format!(
            "views snapshot of {} bytes does not fit one frame",
            payload.len()
        )));
    }
    crate::checkpoint::write_atomically(
        &dir.join(format!("{SNAPSHOT_FILE}.tmp")),
        &dir.join(SNAPSHOT_FILE),
        &[&frame::header(SNAPSHOT_VERSION, &payload), &payload],
        None,
    )
}

/// The snapshot in `dir`: `Ok(None)` if there is none, `Err` naming why one cannot be used.
pub(super) fn read_snapshot(dir: &Path) -> Result<Option<Snapshot>, String> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("{}: {error}", path.display())),
    };
    match frame::read_frame_max(&bytes, usize::MAX) {
        FrameRead::Frame { version: SNAPSHOT_VERSION, payload, .. } => {
            Snapshot::decode(payload).map(Some).ok_or_else(|| format!("{}: undecodable", path.display()))
        }
        FrameRead::Frame { version, .. } => Err(format!("{}: unknown version {version}", path.display())),
        FrameRead::Truncated => Err(format!("{}: truncated", path.display())),
        FrameRead::Corrupt(reason) => Err(format!("{}: {reason}", path.display())),
    }
}

/// Removes the snapshot, so that the next open rebuilds the history from the journal.
pub(super) fn remove_snapshot(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(SNAPSHOT_FILE)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TransferId;
    use crate::money::Currency;
    use crate::transfer::{Transfer, TransferFlags};
    use crate::views::LineKind;

    fn entry(line: u64) -> HistoryEntry {
        HistoryEntry {
            timestamp: 5,
            booked_at: 7 + line,
            line,
            transfer_id: TransferId(u128::from(line) << 64 | 9),
            other_account: AccountId(3),
            amount: 100 * line,
            debit: line.is_multiple_of(2),
            code: 7,
            pending: false,
            kind: LineKind::Posted,
            user_data: 11,
            currency: Currency::Azn,
            balance_after: -(i128::from(line)),
        }
    }

    #[test]
    fn a_line_round_trips_and_a_flipped_bit_is_refused() {
        let mut bytes = Vec::new();
        encode_line(&mut bytes, 42, AccountId(77), &entry(3));
        assert_eq!(bytes.len() as u64, FULL_SLOTS * SLOT_LEN);
        let first = StoredLine { prev: 42, account: AccountId(77), entry: entry(3) };
        assert_eq!(decode_line(&bytes), Some(first));
        for bit in [0, 8 * 40 + 3, 8 * FULL_CRC_AT + 1] {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_line(&bad), None, "bit {bit}");
        }
        // The other side of the same transfer, in one slot after it.
        let other = HistoryEntry {
            booked_at: 99,
            line: 12,
            balance_after: 1 << 70,
            other_account: AccountId(77),
            debit: !entry(3).debit,
            ..entry(3)
        };
        let mut sibling = Vec::new();
        encode_sibling(&mut sibling, 7, entry(3).other_account, &other);
        assert_eq!(sibling.len() as u64, SLOT_LEN);
        let second = StoredLine { prev: 7, account: entry(3).other_account, entry: other };
        assert_eq!(decode_sibling(&sibling, &first), Some(second));
        assert_eq!(decode_line(&sibling), None, "a sibling is not a whole line");
        assert_eq!(decode_sibling(&bytes, &first), None, "a whole line is not a sibling");
        // A sibling of another transfer's line (its account is not that line's other side).
        let stranger =
            StoredLine { entry: HistoryEntry { other_account: AccountId(5), ..entry(3) }, ..first };
        assert_eq!(decode_sibling(&sibling, &stranger), None);
        for bit in [0, 8 * 20 + 1, 8 * SIBLING_CRC_AT + 2] {
            let mut bad = sibling.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_sibling(&bad, &first), None, "bit {bit}");
        }
    }

    #[test]
    fn siblings_read_back_through_their_first_line() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = HistoryLog::open(dir.path())?;
        // Three transfers between accounts 1 and 2, as a pass writes them: the debit's whole line,
        // then the credit's sibling. Account 1 pays in the first two, account 2 in the third.
        let mut bytes = Vec::new();
        let mut last = [0_u64; 3];
        let mut at = 0_u64;
        let mut expected: [Vec<HistoryEntry>; 3] = Default::default();
        for n in 0..3_u64 {
            let (debit, credit) = if n < 2 { (1_usize, 2_usize) } else { (2, 1) };
            let first = HistoryEntry {
                other_account: AccountId(credit as u64),
                debit: true,
                line: n + 1,
                ..entry(n)
            };
            encode_line(&mut bytes, last[debit], AccountId(debit as u64), &first);
            last[debit] = at + 1;
            at += FULL_SLOTS;
            let second = HistoryEntry {
                other_account: AccountId(debit as u64),
                debit: false,
                booked_at: 1_000 + n,
                line: n + 1,
                balance_after: 500 + i128::from(n),
                ..first
            };
            encode_sibling(&mut bytes, last[credit], AccountId(credit as u64), &second);
            last[credit] = at + 1;
            at += 1;
            expected[debit].push(first);
            expected[credit].push(second);
        }
        log.write_at(0, &bytes)?;
        assert_eq!(log.lines()?, 9);
        assert_eq!(log.chain(AccountId(1), last[1], 3)?, expected[1]);
        assert_eq!(log.chain(AccountId(2), last[2], 3)?, expected[2]);
        // A sibling at the very start has no first line to complete it.
        let mut lone = Vec::new();
        encode_sibling(&mut lone, 0, AccountId(2), &expected[2][0]);
        log.write_at(0, &lone)?;
        assert!(log.read(0).is_err());
        Ok(())
    }

    #[test]
    fn chains_read_back_oldest_first_and_refuse_a_stranger() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = HistoryLog::open(dir.path())?;
        // Two accounts interleaved: 1 at lines 0, 2, 4; 2 at 1, 3 (two slots each).
        let mut bytes = Vec::new();
        let mut last = [0_u64; 3];
        for index in 0..5_u64 {
            let account = if index % 2 == 0 { 1 } else { 2 };
            encode_line(&mut bytes, last[account], AccountId(account as u64), &entry(index));
            last[account] = index * FULL_SLOTS + 1;
        }
        log.write_at(0, &bytes)?;
        assert_eq!(log.lines()?, 10);
        assert_eq!(log.chain(AccountId(1), last[1], 3)?, vec![entry(0), entry(2), entry(4)]);
        assert_eq!(log.chain(AccountId(1), last[1], 2)?, vec![entry(2), entry(4)]);
        assert!(log.chain(AccountId(1), last[1], 4).is_err(), "longer than the chain");
        assert!(log.chain(AccountId(2), last[1], 1).is_err(), "another account's line");
        log.truncate(7)?;
        assert!(log.read(6).is_err(), "cut in its second slot");
        assert!(log.read(8).is_err(), "past the end");
        assert!(log.read(4).is_ok());
        Ok(())
    }

    #[test]
    fn the_snapshot_round_trips_and_refuses_damage() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(read_snapshot(dir.path()).map(|s| s.is_none()), Ok(true));
        let running: FxHashMap<_, _> = [(
            AccountId(5),
            Running { balance: -3, lines: 70, booked_at: 9, last: 12, sealed: 64, open_from: 8 },
        )]
        .into_iter()
        .collect();
        let transfer = Transfer {
            id: TransferId(7),
            debit_account_id: AccountId(1),
            credit_account_id: AccountId(2),
            amount: 10,
            pending_id: TransferId(0),
            user_data: 0,
            timeout_s: 0,
            code: 1,
            flags: TransferFlags::default(),
            currency: Currency::Azn,
        };
        let found = Found { transfer, at: 4, from: 100, to: 200 };
        let tail = Tail {
            applied: 1234,
            log_lines: 12,
            reserved: [(7_u128, found)].into_iter().collect(),
            members: [(7_u128, vec![found, Found { at: 5, ..found }])].into_iter().collect(),
            holds: [(8_u128, transfer)].into_iter().collect(),
            ..Tail::default()
        };
        write_snapshot(dir.path(), &tail, &running)?;
        let read =
            read_snapshot(dir.path()).map_err(io::Error::other)?.ok_or_else(|| io::Error::other("none"))?;
        assert_eq!((read.tail.applied, read.tail.log_lines), (1234, 12));
        assert_eq!(
            (read.running, read.tail.reserved, read.tail.members, read.tail.holds),
            (running, tail.reserved, tail.members, tail.holds)
        );
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = std::fs::read(&path)?;
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        std::fs::write(&path, &bytes)?;
        assert!(read_snapshot(dir.path()).is_err());
        remove_snapshot(dir.path())?;
        assert_eq!(read_snapshot(dir.path()).map(|s| s.is_none()), Ok(true));
        Ok(())
    }
}
