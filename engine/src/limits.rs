//! Every limit of the engine in one place, with the relations between them checked at compile time.

/// Shards at most; the default is one per core.
pub const SHARD_COUNT_MAX: usize = 256;
/// Messages a shard drains into one batch at most.
pub const SHARD_BATCH_LEN_MAX: usize = 8_192;
/// A journal segment is closed and a new one started at this size.
pub const SEGMENT_LEN_MAX: u64 = 256 * 1024 * 1024;
/// Bytes written by one group commit at most (the writer stops draining past it).
pub const GROUP_LEN_MAX: usize = 8 * 1024 * 1024;
/// Shard batches queued for the journal writer at most; a full queue blocks the shards, which
/// is the back-pressure that keeps memory bounded when the disk is slower than the load.
pub const JOURNAL_QUEUE_LEN_MAX: usize = 1_024;
/// Journal growth between two automatic checkpoints: recovery replays at most about this much
/// (measured: ~3 s per GiB on this project's 2-core machine).
pub const CHECKPOINT_EVERY_BYTES: u64 = 1024 * 1024 * 1024;
/// How fast a checkpoint is written: a tenth of this machine's disk (~600 MB/s), so that a
/// checkpoint of ~220 MB (1M accounts, one GiB of journal's final transfers) takes ~3 s in
/// the background instead of a 0.4 s burst the journal's syncs wait behind.
pub const CHECKPOINT_WRITE_BYTES_PER_S: u64 = 64 * 1024 * 1024;
/// Transfers (journal commands) one shard batch holds at most: about 8 MiB of frame, far below
/// the journal's 64 MiB record limit.
pub const SHARD_BATCH_TRANSFERS_MAX: usize = 65_536;
/// Transfers in one submission at most.
pub const SUBMIT_LEN_MAX: usize = 8_190;

const _: () = assert!(GROUP_LEN_MAX as u64 <= SEGMENT_LEN_MAX);
// A batch of the largest messages: SUBMIT_LEN_MAX over the transfer bound, then one more
// submission, at ~130 bytes a command, must fit a journal record.
const _: () =
    assert!((SHARD_BATCH_TRANSFERS_MAX + SUBMIT_LEN_MAX) * 256 <= crate::journal::frame::RECORD_LEN_MAX);
const _: () = assert!(SUBMIT_LEN_MAX <= u32::MAX as usize);
const _: () = assert!(SHARD_COUNT_MAX <= u16::MAX as usize);
