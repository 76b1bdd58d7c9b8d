use super::*;
use crate::account::AccountKind;

const NOW: u64 = 1_700_000_000_000_000_000;

fn wallet(id: u64) -> Account {
    Account::new(
        AccountId(id),
        Currency::Azn,
        AccountKind::WALLET,
        AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
    )
}

fn issuance(id: u64) -> Account {
    Account::new(AccountId(id), Currency::Azn, AccountKind::EMONEY_ISSUANCE, AccountFlags::empty())
}

/// One shard holding a funded wallet 1 (1000), an empty wallet 2, and issuance account 9.
fn ledger() -> Ledger {
    let mut ledger = Ledger::new(ShardId(0), 1);
    let mut log = Vec::new();
    for account in [wallet(1), wallet(2), issuance(9)] {
        assert_eq!(ledger.create_account(account, NOW, &mut log), CreateAccountResult::Ok);
    }
    assert_eq!(
        submit(&mut ledger, &[Transfer::new(100, AccountId(9), AccountId(1), 1000)]),
        [TransferResult::Ok]
    );
    ledger
}

fn submit(ledger: &mut Ledger, batch: &[Transfer]) -> Vec<TransferResult> {
    submit_at(ledger, batch, NOW)
}

fn submit_at(ledger: &mut Ledger, batch: &[Transfer], now: u64) -> Vec<TransferResult> {
    let mut outcomes = Vec::new();
    let mut log = Vec::new();
    ledger.submit(batch, now, &mut outcomes, &mut log);
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Outcome::Done(result) => result,
            other => panic!("single-shard ledger answered {other:?}"),
        })
        .collect()
}

fn balance(ledger: &Ledger, id: u64) -> i128 {
    ledger.account(AccountId(id)).map_or(0, Account::balance_posted)
}

#[test]
fn posts_and_refuses_overdraft_exactly_at_the_boundary() {
    let mut ledger = ledger();
    assert_eq!(
        submit(&mut ledger, &[Transfer::new(1, AccountId(1), AccountId(2), 1001)]),
        [TransferResult::ExceedsCredits]
    );
    assert_eq!(
        submit(&mut ledger, &[Transfer::new(1, AccountId(1), AccountId(2), 1000)]),
        [TransferResult::Ok]
    );
    assert_eq!((balance(&ledger, 1), balance(&ledger, 2)), (0, 1000));
    assert!(ledger.totals()[&Currency::Azn].balanced());
}

#[test]
fn same_id_same_body_is_idempotent_other_body_is_refused() {
    let mut ledger = ledger();
    let transfer = Transfer::new(1, AccountId(1), AccountId(2), 10);
    assert_eq!(submit(&mut ledger, &[transfer, transfer]), [TransferResult::Ok, TransferResult::Ok]);
    assert_eq!(balance(&ledger, 2), 10);
    let other = Transfer { amount: 11, ..transfer };
    assert_eq!(submit(&mut ledger, &[other]), [TransferResult::ExistsWithDifferentBody]);
}

#[test]
fn stateless_checks_come_first_in_enum_order() {
    let mut ledger = ledger();
    let t = Transfer::new(0, AccountId(1), AccountId(1), 0);
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::IdMustNotBeZero]);
    let t = Transfer::new(5, AccountId(1), AccountId(1), 0);
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::AccountsMustBeDifferent]);
    let t = Transfer::new(5, AccountId(1), AccountId(2), 0);
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::AmountMustNotBeZero]);
    let t = Transfer { flags: TransferFlags(64), ..Transfer::new(5, AccountId(1), AccountId(2), 1) };
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::UnknownFlags]);
    let t = Transfer { timeout_s: 5, ..Transfer::new(5, AccountId(1), AccountId(2), 1) };
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::TimeoutReservedForPendingTransfer]);
    let t = Transfer::new(5, AccountId(1), AccountId(77), 1);
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::CreditAccountNotFound]);
    let t = Transfer { currency: Currency::Usd, ..Transfer::new(5, AccountId(1), AccountId(2), 1) };
    assert_eq!(submit(&mut ledger, &[t]), [TransferResult::CurrencyMismatch]);
}

#[test]
fn holds_post_partially_void_and_expire() {
    let mut ledger = ledger();
    let hold = Transfer {
        flags: TransferFlags::PENDING,
        timeout_s: 60,
        ..Transfer::new(1, AccountId(1), AccountId(2), 600)
    };
    assert_eq!(submit(&mut ledger, &[hold]), [TransferResult::Ok]);
    // The hold counts against what the wallet may still spend.
    assert_eq!(
        submit(&mut ledger, &[Transfer::new(2, AccountId(1), AccountId(2), 401)]),
        [TransferResult::ExceedsCredits]
    );
    let post = Transfer {
        flags: TransferFlags::POST_PENDING,
        pending_id: TransferId(1),
        ..Transfer::new(3, AccountId(1), AccountId(2), 250)
    };
    assert_eq!(submit(&mut ledger, &[post]), [TransferResult::Ok]);
    assert_eq!((balance(&ledger, 1), balance(&ledger, 2)), (750, 250));
    let account = ledger.account(AccountId(1)).copied().expect("wallet");
    assert_eq!(account.debits_pending, 0, "a partial post releases the remainder");
    let void = Transfer { id: TransferId(4), flags: TransferFlags::VOID_PENDING, ..post };
    assert_eq!(submit(&mut ledger, &[void]), [TransferResult::PendingTransferAlreadyPosted]);

    let hold = Transfer { id: TransferId(5), ..hold };
    assert_eq!(submit(&mut ledger, &[hold]), [TransferResult::Ok]);
    let mut log = Vec::new();
    assert_eq!(ledger.expire(NOW + 59 * NS_PER_S, &mut log), 0);
    assert_eq!(ledger.expire(NOW + 60 * NS_PER_S, &mut log), 1);
    assert_eq!(log, [Command::Expire(TransferId(5))]);
    assert_eq!(ledger.account(AccountId(1)).map(|a| a.debits_pending), Some(0));
    let post = Transfer { id: TransferId(6), pending_id: TransferId(5), ..post };
    assert_eq!(
        submit_at(&mut ledger, &[post], NOW + 61 * NS_PER_S),
        [TransferResult::PendingTransferExpired]
    );
    assert!(ledger.totals()[&Currency::Azn].balanced());
}

#[test]
fn linked_chain_commits_or_fails_as_one() {
    let mut ledger = ledger();
    let a = Transfer { flags: TransferFlags::LINKED, ..Transfer::new(1, AccountId(1), AccountId(2), 500) };
    let b = Transfer::new(2, AccountId(1), AccountId(9), 501);
    assert_eq!(
        submit(&mut ledger, &[a, b]),
        [TransferResult::LinkedEventFailed, TransferResult::ExceedsCredits]
    );
    assert_eq!((balance(&ledger, 1), balance(&ledger, 2)), (1000, 0));
    assert!(ledger.transfer_state(TransferId(1)).is_none());
    let b = Transfer { amount: 500, ..b };
    assert_eq!(submit(&mut ledger, &[a, b]), [TransferResult::Ok, TransferResult::Ok]);
    assert_eq!(balance(&ledger, 1), 0);
    let open = Transfer { id: TransferId(3), ..a };
    assert_eq!(submit(&mut ledger, &[open]), [TransferResult::LinkedEventChainOpen]);
}

#[test]
fn replay_of_the_log_rebuilds_the_same_state() {
    let mut ledger = Ledger::new(ShardId(0), 1);
    let mut log = Vec::new();
    for account in [wallet(1), wallet(2), issuance(9)] {
        ledger.create_account(account, NOW, &mut log);
    }
    let batch = [
        Transfer::new(100, AccountId(9), AccountId(1), 1000),
        Transfer {
            flags: TransferFlags::PENDING,
            timeout_s: 1,
            ..Transfer::new(1, AccountId(1), AccountId(2), 300)
        },
        Transfer { flags: TransferFlags::LINKED, ..Transfer::new(2, AccountId(1), AccountId(2), 100) },
        Transfer::new(3, AccountId(2), AccountId(9), 50),
    ];
    let mut outcomes = Vec::new();
    ledger.submit(&batch, NOW, &mut outcomes, &mut log);
    ledger.expire(NOW + 2 * NS_PER_S, &mut log);
    let mut replayed = Ledger::new(ShardId(0), 1);
    replayed.replay(&log, NOW).expect("replay");
    let mut a: Vec<_> = ledger.accounts().copied().collect();
    let mut b: Vec<_> = replayed.accounts().copied().collect();
    a.sort_by_key(|x| x.id);
    b.sort_by_key(|x| x.id);
    assert_eq!(a, b);
}

#[test]
fn cross_shard_transfer_reserves_credits_and_finalizes() {
    let shards = 2_u16;
    let (debit_id, credit_id) = (1..)
        .flat_map(|a| (1..50).map(move |b| (a, b)))
        .find(|(a, b)| matches!(route(AccountId(*a), AccountId(*b), shards), Route::Cross { .. }))
        .expect("two accounts on different shards");
    let home = |id| usize::from(crate::ids::home_shard(AccountId(id), shards).0);
    let mut ledgers = vec![Ledger::new(ShardId(0), shards), Ledger::new(ShardId(1), shards)];
    let mut log = Vec::new();
    let mut fund = wallet(debit_id);
    fund.credits_posted = 100;
    ledgers[home(debit_id)].restore(1, vec![fund], vec![], vec![]);
    ledgers[home(credit_id)].create_account(wallet(credit_id), NOW, &mut log);
    // Balance the funding with a spread issuance account so totals stay exact.
    let transfer = Transfer::new(7, AccountId(debit_id), AccountId(credit_id), 60);
    let mut outcomes = Vec::new();
    ledgers[home(debit_id)].submit(&[transfer], NOW, &mut outcomes, &mut log);
    assert!(matches!(outcomes[0], Outcome::Forward { .. }));
    // A duplicate while in flight waits.
    outcomes.clear();
    ledgers[home(debit_id)].submit(&[transfer], NOW, &mut outcomes, &mut log);
    assert_eq!(outcomes[0], Outcome::Wait);
    // A crash now: recovery voids the reserve, since no credit step is on record.
    let mut crashed = ledgers.clone_for_test();
    let (logs, _) = resolve_in_flight(&mut crashed);
    assert_eq!(
        logs[home(debit_id)],
        [Command::Finalize { id: TransferId(7), result: TransferResult::Interrupted }]
    );
    assert_eq!(crashed[home(debit_id)].account(AccountId(debit_id)).map(|a| a.debits_pending), Some(0));
    // The normal path.
    assert_eq!(ledgers[home(credit_id)].credit(&transfer, &mut log), TransferResult::Ok);
    let mut crashed = ledgers.clone_for_test();
    let (logs, forgets) = resolve_in_flight(&mut crashed);
    assert_eq!(logs[home(debit_id)], [Command::Finalize { id: TransferId(7), result: TransferResult::Ok }]);
    assert_eq!(forgets[home(credit_id)].len(), 1);
    // Another transfer reusing the id, from another payer to the same payee shard, is refused
    // at the credit step instead of being answered with the first one's result.
    let reuse = Transfer { amount: 5, ..transfer };
    assert_eq!(ledgers[home(credit_id)].credit(&reuse, &mut log), TransferResult::ExistsWithDifferentBody);
    assert!(ledgers[home(debit_id)].finalize(TransferId(7), TransferResult::Ok, &mut log));
    ledgers[home(credit_id)].forget(TransferId(7), engine_hash(&reuse), &mut log);
    assert_eq!(ledgers[home(credit_id)].credit_steps().count(), 1, "a forget for another body is ignored");
    ledgers[home(credit_id)].forget(TransferId(7), engine_hash(&transfer), &mut log);
    assert_eq!(ledgers[home(credit_id)].credit_steps().count(), 0);
    assert_eq!(ledgers[home(debit_id)].account(AccountId(debit_id)).map(Account::balance_posted), Some(40));
    assert_eq!(ledgers[home(credit_id)].account(AccountId(credit_id)).map(Account::balance_posted), Some(60));
}

fn engine_hash(transfer: &Transfer) -> u64 {
    body_hash(transfer)
}

trait CloneForTest {
    fn clone_for_test(&self) -> Vec<Ledger>;
}

impl CloneForTest for Vec<Ledger> {
    fn clone_for_test(&self) -> Vec<Ledger> {
        self.iter()
            .map(|l| {
                let mut copy = Ledger::new(l.shard, l.shard_count);
                copy.restore(
                    l.accounts.len(),
                    l.accounts.iter().map(|slot| slot.0),
                    l.open.values().copied().collect(),
                    l.credits.iter().map(|(k, v)| (*k, *v)).collect(),
                );
                copy.restore_done(l.done.iter().map(Ok::<_, ()>)).expect("infallible");
                copy
            })
            .collect()
    }
}

#[test]
fn a_chain_that_fails_after_posting_a_hold_restores_the_hold_and_its_timeout() {
    let mut ledger = ledger();
    let hold = Transfer {
        flags: TransferFlags::PENDING,
        timeout_s: 60,
        ..Transfer::new(1, AccountId(1), AccountId(2), 300)
    };
    assert_eq!(submit(&mut ledger, &[hold]), [TransferResult::Ok]);
    let post = Transfer {
        flags: TransferFlags::POST_PENDING.union(TransferFlags::LINKED),
        pending_id: TransferId(1),
        ..Transfer::new(2, AccountId(1), AccountId(2), 0)
    };
    let too_much = Transfer::new(3, AccountId(1), AccountId(9), 10_000);
    assert_eq!(
        submit(&mut ledger, &[post, too_much]),
        [TransferResult::LinkedEventFailed, TransferResult::ExceedsCredits]
    );
    assert_eq!(ledger.transfer_state(TransferId(1)), Some(TransferState::Pending));
    assert_eq!(ledger.transfer_state(TransferId(2)), None);
    let mut log = Vec::new();
    assert_eq!(ledger.expire(NOW + 60 * NS_PER_S, &mut log), 1, "the hold still expires");
    assert_eq!(ledger.account(AccountId(1)).map(|a| a.debits_pending), Some(0));
}

#[test]
fn final_transfers_are_remembered_by_body_hash() {
    let mut ledger = ledger();
    let transfer = Transfer { user_data: 7, ..Transfer::new(1, AccountId(1), AccountId(2), 10) };
    assert_eq!(submit(&mut ledger, &[transfer]), [TransferResult::Ok]);
    assert_eq!(submit(&mut ledger, &[transfer]), [TransferResult::Ok]);
    for other in [
        Transfer { user_data: 8, ..transfer },
        Transfer { code: 1, ..transfer },
        Transfer { credit_account_id: AccountId(9), ..transfer },
    ] {
        assert_eq!(submit(&mut ledger, &[other]), [TransferResult::ExistsWithDifferentBody]);
    }
    assert_eq!(balance(&ledger, 2), 10);
}

#[test]
fn a_chain_crossing_shards_posts_or_voids_as_one_and_replays() {
    let shards = 2_u16;
    let (a, b) = (1..)
        .flat_map(|a| (1..50).map(move |b| (a, b)))
        .find(|(a, b)| matches!(route(AccountId(*a), AccountId(*b), shards), Route::Cross { .. }))
        .expect("two accounts on different shards");
    let fee = AccountId::spread(77);
    let home = |id| usize::from(crate::ids::home_shard(AccountId(id), shards).0);
    let (da, db) = (home(a), home(b));
    let mut ledgers = vec![Ledger::new(ShardId(0), shards), Ledger::new(ShardId(1), shards)];
    let mut log = Vec::new();
    let mut funded = wallet(a);
    funded.credits_posted = 100;
    ledgers[da].restore(1, vec![funded], vec![], vec![]);
    ledgers[db].create_account(wallet(b), NOW, &mut log);
    for ledger in &mut ledgers {
        ledger.create_account(issuance(fee.0), NOW, &mut log);
    }
    let principal =
        Transfer { flags: TransferFlags::LINKED, ..Transfer::new(7, AccountId(a), AccountId(b), 60) };
    let fee_leg = Transfer::new(8, AccountId(a), fee, 5);
    let mut outcomes = Vec::new();
    let mut chain_log = Vec::new();
    ledgers[da].submit(&[principal, fee_leg], NOW, &mut outcomes, &mut chain_log);
    assert!(matches!(outcomes[0], Outcome::Forward { .. }), "{outcomes:?}");
    assert_eq!(outcomes[1], Outcome::Linked { parent: TransferId(7) });
    let payer = |l: &Ledger| l.account(AccountId(a)).copied().expect("payer");
    assert_eq!((payer(&ledgers[da]).debits_pending, payer(&ledgers[da]).debits_posted), (65, 0));
    // A retry of the whole chain while in flight waits for it.
    outcomes.clear();
    ledgers[da].submit(&[principal, fee_leg], NOW, &mut outcomes, &mut log);
    assert_eq!(outcomes, [Outcome::Wait, Outcome::Linked { parent: TransferId(7) }]);
    // The same chain overdrawing is refused whole, leaving nothing behind.
    let greedy = [
        Transfer { flags: TransferFlags::LINKED, ..Transfer::new(17, AccountId(a), AccountId(b), 30) },
        Transfer::new(18, AccountId(a), fee, 10),
    ];
    outcomes.clear();
    ledgers[da].submit(&greedy, NOW, &mut outcomes, &mut log);
    assert_eq!(
        outcomes,
        [Outcome::Done(TransferResult::LinkedEventFailed), Outcome::Done(TransferResult::ExceedsCredits)]
    );
    assert_eq!(payer(&ledgers[da]).debits_pending, 65);

    // A crash before the credit step: recovery voids the chain, the fee leg too.
    let mut crashed = ledgers.clone_for_test();
    let (finalizes, _) = resolve_in_flight(&mut crashed);
    assert_eq!(finalizes[da], [Command::Finalize { id: TransferId(7), result: TransferResult::Interrupted }]);
    assert_eq!((payer(&crashed[da]).debits_pending, payer(&crashed[da]).debits_posted), (0, 0));
    assert_eq!(crashed[da].transfer_state(TransferId(8)), None, "a voided member is not stored");
    let totals: Totals =
        crashed.iter().flat_map(|l| l.totals().into_values()).fold(Totals::default(), |mut t, s| {
            t.merge(&s);
            t
        });
    assert_eq!(totals.debits_pending, totals.credits_pending);

    // A refused credit step voids the chain; an accepted one posts it.
    let mut refused = ledgers.clone_for_test();
    refused[da].finalize(TransferId(7), TransferResult::CreditAccountBlocked, &mut log);
    assert_eq!((payer(&refused[da]).debits_pending, payer(&refused[da]).debits_posted), (0, 0));
    assert_eq!(refused[da].account(fee).map(|f| f.credits_pending), Some(0));
    assert_eq!(ledgers[db].credit(&principal, &mut log), TransferResult::Ok);
    let mut finalize_log = Vec::new();
    assert!(ledgers[da].finalize(TransferId(7), TransferResult::Ok, &mut finalize_log));
    assert_eq!((payer(&ledgers[da]).debits_pending, payer(&ledgers[da]).debits_posted), (0, 65));
    assert_eq!(ledgers[da].account(fee).map(Account::balance_posted), Some(5));
    assert_eq!(ledgers[da].transfer_state(TransferId(8)), Some(TransferState::Posted));

    // Replaying the debit shard's commands from its starting state reaches the same state.
    let mut replayed = Ledger::new(ShardId(u16::try_from(da).expect("shard")), shards);
    replayed.restore(1, vec![funded], vec![], vec![]);
    replayed.create_account(issuance(fee.0), NOW, &mut Vec::new());
    replayed.replay(&chain_log, NOW).expect("chain replays");
    replayed.replay(&finalize_log, NOW).expect("finalize replays");
    assert_eq!(replayed.account(AccountId(a)), ledgers[da].account(AccountId(a)));
    assert_eq!(replayed.account(fee), ledgers[da].account(fee));
    assert_eq!(replayed.transfer_state(TransferId(8)), Some(TransferState::Posted));
}

#[test]
fn the_body_hash_is_xxh3_of_the_fixed_layout_and_stays_stable() {
    let t = Transfer {
        id: TransferId((7_u128 << 64) | 9),
        debit_account_id: AccountId(11),
        credit_account_id: AccountId(12),
        amount: 1_234,
        pending_id: TransferId(0),
        user_data: 0xABCD,
        timeout_s: 60,
        code: 100,
        flags: TransferFlags(0),
        currency: Currency::Azn,
    };
    // The layout in a plain byte buffer, hashed by the crate directly.
    let mut layout = [0_u8; 82];
    let bytes = &mut layout[1..];
    bytes[0..16].copy_from_slice(&t.id.0.to_le_bytes());
    bytes[16..24].copy_from_slice(&t.debit_account_id.0.to_le_bytes());
    bytes[24..32].copy_from_slice(&t.credit_account_id.0.to_le_bytes());
    bytes[32..40].copy_from_slice(&t.amount.to_le_bytes());
    bytes[40..56].copy_from_slice(&t.pending_id.0.to_le_bytes());
    bytes[56..72].copy_from_slice(&t.user_data.to_le_bytes());
    bytes[72..76].copy_from_slice(&t.timeout_s.to_le_bytes());
    bytes[76..78].copy_from_slice(&t.code.to_le_bytes());
    bytes[78..80].copy_from_slice(&t.flags.0.to_le_bytes());
    bytes[80] = t.currency as u8;
    assert_eq!(body_hash(&t), xxhash_rust::xxh3::xxh3_64(bytes));
    // Checkpoints store it: the value must not change between releases.
    assert_eq!(body_hash(&t), PINNED, "{:#x}", body_hash(&t));
    // Every field counts: a body differing in any one byte hashes differently.
    let mut seen = std::collections::HashSet::from([body_hash(&t)]);
    for other in [
        Transfer { amount: 1_235, ..t },
        Transfer { user_data: 0xABCE, ..t },
        Transfer { code: 101, ..t },
        Transfer { currency: Currency::Usd, ..t },
        Transfer { timeout_s: 61, ..t },
    ] {
        assert!(seen.insert(body_hash(&other)), "{other:?}");
    }
}

/// `body_hash` of the transfer above, since checkpoint layout 6 (xxh3).
const PINNED: u64 = 0x5d1e_5ab6_a9f1_7fd5;

/// A journal written by a build whose body hashes were CRC pairs holds forget records with
/// such hashes; replay recomputes the credit records' hashes with xxh3, and must still drop
/// them (a forget is journaled only when it matched).
#[test]
fn replay_drops_a_credit_record_whatever_hash_its_forget_carries() {
    let shards = 2;
    let (debit_id, credit_id) =
        (1_u64, (2..100).find(|id| home_of(*id, shards) != home_of(1, shards)).expect("id"));
    let credit_shard = home_of(credit_id, shards);
    let mut ledger = Ledger::new(ShardId(credit_shard), shards);
    let transfer = Transfer::new(7, AccountId(debit_id), AccountId(credit_id), 60);
    let commands = [
        Command::CreateAccount(wallet(credit_id)),
        Command::Credit(transfer),
        Command::Forget { id: transfer.id, body_hash: body_hash(&transfer) ^ 0x5A5A },
    ];
    ledger.replay(&commands, NOW).expect("replay");
    assert_eq!(ledger.credit_steps().count(), 0);
    assert_eq!(ledger.account(AccountId(credit_id)).map(Account::balance_posted), Some(60));
}

fn home_of(id: u64, shards: u16) -> u16 {
    crate::ids::home_shard(AccountId(id), shards).0
}

#[test]
fn the_done_log_keeps_the_order_added_and_undoes_across_a_chunk_boundary() {
    let mut table = DoneTable::default();
    let done = |n: u64| Done::new(n << 3, TransferState::Posted);
    let count = u128::try_from(DONE_LOG_CHUNK).expect("chunk") + 2;
    for id in 1..=count {
        table.insert(TransferId(id << 64 | 1), done(u64::try_from(id).expect("id")));
    }
    // The last two went into a second chunk; undo one of those and the last of the first.
    table.remove(&TransferId(count << 64 | 1));
    table.remove(&TransferId((count - 2) << 64 | 1));
    assert_eq!(table.len(), DONE_LOG_CHUNK);
    let log: Vec<[u64; 3]> = std::mem::take(&mut table.added).into_iter().flatten().collect();
    assert_eq!(log.len(), DONE_LOG_CHUNK);
    let ids: Vec<u128> = log.iter().map(|entry| crate::ids::from_halves([entry[0], entry[1]])).collect();
    let expected: Vec<u128> =
        (1..=count).filter(|id| *id != count && *id != count - 2).map(|id| id << 64 | 1).collect();
    assert_eq!(ids, expected);
    assert!(
        log.iter()
            .zip(&expected)
            .all(|(entry, id)| entry[2] == done(u64::try_from(id >> 64).expect("id")).bits())
    );
}
