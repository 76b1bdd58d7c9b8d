//! Ledger apply, in memory, one core: how many transfers a shard's state machine applies per
//! second, for batches whose accounts all live on the shard and for batches that cross shards.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::ledger::{Command, Ledger, Outcome};
use engine::{Account, AccountFlags, AccountId, AccountKind, Currency, ShardId, Transfer, TransferResult};

// The allocator the `qepik` and `loadtest` binaries run with: it backs large tables with
// transparent huge pages, which a ledger of a million accounts needs to keep TLB misses down.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNTS: u64 = 1_000_000;
const BATCH: usize = 8_190;
const NOW: u64 = 1_700_000_000_000_000_000;
/// Remembered transfers past which the apply bench starts again from a funded ledger.
const RESET_AT: usize = 5_000_000;
/// Final transfers the bench's ledger reserves room for: what a ledger grown by doubling has
/// once it holds RESET_AT (its tables the same size), so that none grows in a timed round.
/// (Until 2026-12-06 the bench reserved 16M: tables three times the size a ledger holding 5M
/// has, their misses spread over three times the memory.)
const RESERVED: usize = 6_000_000;

fn funded_ledger(shard_count: u16) -> Ledger {
    funded_ledger_with(Ledger::with_capacity(ShardId(0), shard_count, 1_100_000, RESERVED))
}

fn funded_ledger_with(mut ledger: Ledger) -> Ledger {
    let shard_count = ledger.shard_count();
    let mut log = Vec::new();
    let issuance = AccountId::spread(1);
    ledger.create_account(
        Account::new(issuance, Currency::Azn, AccountKind::EMONEY_ISSUANCE, AccountFlags::empty()),
        NOW,
        &mut log,
    );
    let mut funding = Vec::new();
    for id in 1..=ACCOUNTS {
        if engine::ids::home_shard(AccountId(id), shard_count) != ShardId(0) {
            continue;
        }
        ledger.create_account(
            Account::new(
                AccountId(id),
                Currency::Azn,
                AccountKind::WALLET,
                AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            ),
            NOW,
            &mut log,
        );
        funding.push(Transfer::new(u128::from(id) << 64, issuance, AccountId(id), 1_000_000_000));
    }
    let mut outcomes = Vec::new();
    for chunk in funding.chunks(BATCH) {
        ledger.submit(chunk, NOW, &mut outcomes, &mut log);
    }
    ledger
}

/// Pseudo-random wallet pairs on shard 0 (or any shard, for the cross-shard case).
fn batches(ledger: &Ledger, cross: bool, count: usize) -> Vec<Vec<Transfer>> {
    let shards = ledger.shard_count();
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut id: u128 = 1;
    (0..count)
        .map(|_| {
            (0..BATCH)
                .map(|_| {
                    loop {
                        let debit = AccountId(next() % ACCOUNTS + 1);
                        let credit = AccountId(next() % ACCOUNTS + 1);
                        let debit_home = engine::ids::home_shard(debit, shards) == ShardId(0);
                        let credit_home = engine::ids::home_shard(credit, shards) == ShardId(0);
                        if debit != credit && debit_home && (credit_home != cross) {
                            id += 1;
                            break Transfer::new(id, debit, credit, 1 + next() % 100);
                        }
                    }
                })
                .collect()
        })
        .collect()
}

fn apply(c: &mut Criterion) {
    // As `qepik` does (engine::memory): the figures are the server's.
    let _ = engine::memory::disable_transparent_huge_pages();
    let mut group = c.benchmark_group("ledger_apply");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    for (name, shards, cross) in [("same_shard", 1_u16, false), ("cross_shard_reserve", 2, true)] {
        let mut ledger = funded_ledger(shards);
        let work = batches(&ledger, cross, 64);
        let mut round = 0_usize;
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(BATCH);
        let mut log: Vec<Command> = Vec::with_capacity(BATCH);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Untimed: a fresh ledger once this one remembers RESET_AT transfers, so
                    // that its tables never outgrow what was reserved (a doubling, or the
                    // kernel zeroing fresh pages for it, would land in the timed rounds).
                    if ledger.transfer_count() > RESET_AT {
                        ledger = funded_ledger(shards);
                    }
                    round += 1;
                    // Fresh ids each round so every transfer is new work, not an idempotent hit.
                    let offset = (round as u128) << 96;
                    let batch: Vec<Transfer> = work[round % work.len()]
                        .iter()
                        .map(|t| Transfer { id: engine::TransferId(t.id.0 | offset), ..*t })
                        .collect();
                    outcomes.clear();
                    log.clear();
                    let start = Instant::now();
                    ledger.submit(&batch, NOW, &mut outcomes, &mut log);
                    timed += start.elapsed();
                    // Untimed: the credit shard's answer, so that reserves do not pile up in
                    // flight as they never do in the engine.
                    if cross {
                        for transfer in &batch {
                            ledger.finalize(transfer.id, TransferResult::Ok, &mut log);
                        }
                    }
                }
                timed
            });
        });
    }
    group.finish();
}

/// What a checkpoint stops a shard for: copying its state (half of a million accounts, two
/// million final transfers) into the checkpoint's record, on the shard's own thread.
fn capture(c: &mut Criterion) {
    let _ = engine::memory::disable_transparent_huge_pages();
    let mut group = c.benchmark_group("checkpoint_capture");
    group.sample_size(10);
    // Grown as the engine grows it (no table reserved up front), so that the copy walks tables
    // of the engine's shape.
    let mut ledger = funded_ledger_with(Ledger::new(ShardId(0), 2));
    let mut outcomes = Vec::new();
    let mut log = Vec::new();
    for batch in batches(&ledger, false, 190) {
        outcomes.clear();
        log.clear();
        ledger.submit(&batch, NOW, &mut outcomes, &mut log);
    }
    group.throughput(Throughput::Elements(u64::try_from(ledger.account_count()).unwrap_or(u64::MAX)));
    // A capture copies the accounts and hands over the final transfers added since the last
    // one: the first iteration takes the 2M, every later one what is left, none.
    group.bench_function("500k_accounts_2m_transfers", |b| {
        b.iter(|| engine::journal::record::WalShardState::capture(&mut ledger, NOW));
    });
    group.finish();
}

criterion_group!(benches, apply, capture);
criterion_main!(benches);
