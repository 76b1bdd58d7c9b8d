//! Journal append + fdatasync: one group commit of a batch of N transfer records, as the writer
//! thread does it, on the real disk under a temporary directory.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_channel::bounded;
use engine::journal::{JournalBatch, JournalState, WriterConfig, spawn_writer};
use engine::ledger::Command;
use engine::shard::encode_batch;
use engine::{AccountId, ShardId, Transfer};

fn append(c: &mut Criterion) {
    // As `qepik` does (engine::memory): the figures are the server's.
    let _ = engine::memory::disable_transparent_huge_pages();
    let mut group = c.benchmark_group("journal_append_fdatasync");
    group.sample_size(20);
    for batch_len in [1_usize, 100, 1_000, 8_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = JournalState::new(0);
        let (tx, rx) = bounded::<JournalBatch<crossbeam_channel::Sender<()>>>(16);
        let config = WriterConfig {
            dir: dir.path().to_path_buf(),
            shard_count: 1,
            segment_len_max: 256 * 1024 * 1024,
            group_len_max: 8 * 1024 * 1024,
            linger: engine::journal::LINGER_MAX,
        };
        let writer =
            spawn_writer(config, 0, rx, Arc::clone(&state), |_, done: crossbeam_channel::Sender<()>| {
                let _ = done.send(());
            })
            .expect("writer");
        let commands: Vec<Command> = (0..batch_len)
            .map(|i| Command::Transfer(Transfer::new(i as u128 + 1, AccountId(1), AccountId(2), 100)))
            .collect();
        group.throughput(Throughput::Elements(batch_len as u64));
        let mut encoder = engine::journal::record::BatchEncoder::default();
        group.bench_function(format!("batch_{batch_len}"), |b| {
            b.iter(|| {
                let mut frames = Vec::new();
                encode_batch(&mut encoder, ShardId(0), 1, &commands, &mut frames);
                let (done_tx, done_rx) = bounded(1);
                tx.send(JournalBatch { frames, completion: done_tx, credits_due: 0 }).expect("send");
                done_rx.recv().expect("durable");
            });
        });
        drop(tx);
        let _ = writer.join();
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
