//! Statements and notifications end to end: the wallet domain over a real engine with its views
//! on, a manual clock, and two shards so that P2Ps and cash-outs cross them. The views' running
//! balances are checked against the ledger's posted balances; pages, exports and the spending
//! summary against the history they are read from; the outbox against the operations that fed it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::clock::ManualClock;
use engine::domain::{AgentKind, CustomerAuth, agent_commission, agent_float, channels, system};
use engine::ids::{home_shard, wallet_shard};
use engine::journal::JournalState;
use engine::money::{Amount, Zero};
use engine::msisdn::Msisdn;
use engine::outbox::{MoneyKind, MoneyNotice, Notification, NotificationKey, Outbox};
use engine::secret::{Pin, ServerSecret};
use engine::statement::{self, Category, Direction, StatementError, StatementQuery};
use engine::tariff::Tariff;
use engine::views::{HistoryEntry, LineKind, Views};
use engine::wallet::{Actor, Limits, WalletState, codes};
use engine::{
    AccountId, Currency, Domain, DomainConfig, Engine, EngineConfig, ShardId, Transfer, TransferFlags,
    TransferId, TransferResult,
};
use qepik_tests::block_on;

const NS: u64 = 1_000_000_000;
/// 2026-11-23 00:00 UTC.
const START_NS: u64 = 1_795_392_000 * NS;
const SHARDS: u16 = 2;
const AGENT: u64 = 7;
const P2P_FEE: Tariff = Tariff { fixed: 10, percent_bps: 50, min: 20, max: 500 };

/// An engine with views and its domain on one data directory, with a manual clock.
struct World {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    engine: Engine,
    domain: Domain,
    next_op: std::cell::Cell<u128>,
    next_number: std::cell::Cell<u64>,
    pin: Pin,
}

fn start(dir: &std::path::Path, clock: &Arc<ManualClock>) -> anyhow::Result<(Engine, Domain)> {
    let mut config = EngineConfig::new(dir);
    config.shard_count = SHARDS;
    config.views = true;
    config.clock = clock.clone();
    let engine = Engine::open(config)?;
    let mut domain_config = DomainConfig::new(Arc::new(ServerSecret::from_bytes(&[9u8; 32])?));
    for tier in &mut domain_config.policy.tiers {
        tier.limits = vec![(Currency::Azn as u8, Limits::NONE)];
    }
    domain_config.step_up_above = u64::MAX;
    domain_config.tariffs.set(codes::P2P, P2P_FEE)?;
    domain_config.tariffs.set(codes::CASH_OUT, Tariff { fixed: 0, percent_bps: 100, min: 50, max: 1_000 })?;
    domain_config.commissions.set(codes::CASH_OUT, Tariff { fixed: 0, percent_bps: 40, min: 10, max: 0 })?;
    domain_config.commissions.set(codes::CASH_IN, Tariff { fixed: 5, percent_bps: 20, min: 0, max: 0 })?;
    let domain = block_on(Domain::open(engine.clone(), domain_config))?;
    Ok((engine, domain))
}

impl World {
    fn open() -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let clock = Arc::new(ManualClock::new(START_NS));
        let (engine, domain) = start(dir.path(), &clock)?;
        let world = World {
            dir,
            clock,
            engine,
            domain,
            next_op: std::cell::Cell::new(1 << 80),
            next_number: std::cell::Cell::new(2_000_000),
            pin: Pin::parse("1357")?,
        };
        block_on(world.domain.create_agent(AGENT, AgentKind::Agent))?;
        block_on(world.domain.fund_agent(world.op(), AGENT, 100_000_000))?;
        Ok(world)
    }

    /// Shuts the engine down and lets go of it (and of its views' sled lock).
    fn close(self) -> (tempfile::TempDir, Arc<ManualClock>) {
        self.engine.shutdown();
        (self.dir, self.clock)
    }

    /// Closes the engine and opens the same directory again, with a new domain.
    fn restart(self) -> anyhow::Result<World> {
        self.restart_after(|_| Ok(()))
    }

    /// As [`World::restart`], doing `meanwhile` to the data directory while the engine is down.
    fn restart_after(
        self,
        meanwhile: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<World> {
        let (next_op, next_number) = (self.next_op.get(), self.next_number.get());
        let (dir, clock) = self.close();
        meanwhile(dir.path())?;
        let (engine, domain) = start(dir.path(), &clock)?;
        Ok(World {
            dir,
            clock,
            engine,
            domain,
            next_op: std::cell::Cell::new(next_op),
            next_number: std::cell::Cell::new(next_number),
            pin: Pin::parse("1357")?,
        })
    }

    fn op(&self) -> u128 {
        let op = self.next_op.get() + 1;
        self.next_op.set(op);
        op
    }

    /// A registered wallet (with [`World::pin`]) on a shard that `wanted` accepts.
    fn wallet(&self, wanted: impl Fn(ShardId) -> bool) -> anyhow::Result<Msisdn> {
        for _ in 0..10_000 {
            let n = self.next_number.get();
            self.next_number.set(n + 1);
            let msisdn = self.domain.msisdn(&format!("+994 55 {n:07}"))?;
            if wanted(wallet_shard(msisdn.get(), SHARDS)) {
                block_on(self.domain.register(msisdn, Some(&self.pin), 1, Actor::customer(msisdn.get())))?;
                return Ok(msisdn);
            }
        }
        anyhow::bail!("no number on a wanted shard")
    }

    fn auth(&self) -> CustomerAuth<'_> {
        CustomerAuth { pin: Some(&self.pin), otp: None, channel: channels::APP }
    }

    /// A P2P one second after the last operation; returns the op and the fee.
    fn p2p(&self, from: Msisdn, to: Msisdn, amount: u64) -> anyhow::Result<(u128, u64)> {
        self.clock.advance_s(1);
        let op = self.op();
        let receipt = block_on(self.domain.p2p(op, from, to, amount, self.auth()))?;
        Ok((op, receipt.fee))
    }

    fn cash_in(&self, to: Msisdn, amount: u64) -> anyhow::Result<u128> {
        self.clock.advance_s(1);
        let op = self.op();
        block_on(self.domain.cash_in(op, AGENT, to, amount))?;
        Ok(op)
    }

    fn cash_out(&self, from: Msisdn, amount: u64) -> anyhow::Result<(u128, u64)> {
        self.clock.advance_s(1);
        let op = self.op();
        let receipt = block_on(self.domain.cash_out(op, AGENT, from, amount, self.auth()))?;
        Ok((op, receipt.fee))
    }

    fn submit(&self, transfers: Vec<Transfer>) -> anyhow::Result<Vec<TransferResult>> {
        self.clock.advance_s(1);
        Ok(self.engine.submit_blocking(transfers)?)
    }

    fn views(&self) -> anyhow::Result<&Views> {
        self.engine.views().context("views are on")
    }

    /// Waits until the views have applied everything durable.
    fn caught_up(&self) -> anyhow::Result<&Views> {
        let views = self.views()?;
        qepik_tests::block_on(self.engine.settle())?;
        anyhow::ensure!(
            views.wait_for(self.engine.journal().durable(), Duration::from_secs(30)),
            "views behind: {:?}",
            views.error()
        );
        Ok(views)
    }

    fn posted(&self, id: AccountId) -> anyhow::Result<i128> {
        let account = block_on(self.engine.lookup_accounts(&[id]))?.pop().flatten().context("no account")?;
        Ok(account.balance_posted())
    }
}

fn account(msisdn: Msisdn) -> AccountId {
    AccountId::wallet(msisdn.get(), Currency::Azn)
}

/// A cash-by-code hold on a wallet (ATM clearing is spread, so it stays on the wallet's shard).
fn hold(id: u128, from: AccountId, amount: u64, timeout_s: u32, op: u128) -> Transfer {
    Transfer {
        flags: TransferFlags::PENDING,
        timeout_s,
        code: codes::CASH_CODE,
        user_data: op,
        ..Transfer::new(id, from, system::ATM_CLEARING, amount)
    }
}

/// Posts (`amount` 0: all of it) or voids a hold; the resolving transfer has no code or
/// reference of its own.
fn resolve(id: u128, held: &Transfer, amount: u64, flag: TransferFlags) -> Transfer {
    Transfer {
        flags: flag,
        pending_id: held.id,
        ..Transfer::new(id, held.debit_account_id, held.credit_account_id, amount)
    }
}

fn history(views: &Views, id: AccountId) -> anyhow::Result<Vec<HistoryEntry>> {
    Ok(views.history(id, 0, usize::MAX)?)
}

/// The account's history is numbered from 1 without gaps, ordered, each balance is the one
/// before plus the line's change, and the last is the ledger's posted balance.
fn check_running(w: &World, views: &Views, id: AccountId) -> anyhow::Result<Vec<HistoryEntry>> {
    let lines = history(views, id)?;
    let mut balance = 0_i128;
    for (index, line) in lines.iter().enumerate() {
        anyhow::ensure!(line.line == u64::try_from(index)? + 1, "{id}: line {index} is {line:?}");
        balance += line.posted_change();
        anyhow::ensure!(line.balance_after == balance, "{id}: {line:?} after {balance}");
    }
    for pair in lines.windows(2) {
        anyhow::ensure!(pair[0].position() < pair[1].position(), "{id}: {pair:?}");
    }
    let posted = w.posted(id)?;
    anyhow::ensure!(balance == posted, "{id}: views {balance}, ledger {posted}");
    anyhow::ensure!(views.balance(id) == (posted, u64::try_from(lines.len())?), "{id}: running state");
    Ok(lines)
}

/// A decimal as the exports write it, back in minor units.
fn minor(text: &str) -> anyhow::Result<i128> {
    let (sign, digits) = match text.strip_prefix('-') {
        Some(digits) => (-1, digits),
        None => (1, text),
    };
    Ok(sign * i128::from(Amount::parse(digits, Currency::Azn, Zero::Allowed)?.minor()))
}

/// Every operation kind on wallet `a`: cash-in, P2Ps on one shard and across, a cash-out across
/// shards, holds posted in part and in full, voided and expired, and refusals. Returns the
/// wallets and the spending the test expects of `a` (category, count, total).
struct Workload {
    a: Msisdn,
    b: Msisdn,
    c: Msisdn,
    spent: Vec<(Category, u64, u128)>,
}

fn workload(w: &World) -> anyhow::Result<Workload> {
    let float_shard = home_shard(agent_float(AGENT), SHARDS);
    let a = w.wallet(|s| s != float_shard)?;
    let b = w.wallet(|s| s == wallet_shard(a.get(), SHARDS))?;
    let c = w.wallet(|s| s != wallet_shard(a.get(), SHARDS))?;
    w.cash_in(a, 500_000)?;
    w.cash_in(c, 200_000)?;
    let (_, fee_local) = w.p2p(a, b, 1_000)?;
    let (_, fee_far) = w.p2p(a, c, 20_000)?;
    w.p2p(c, a, 5_000)?;
    let (_, fee_out) = w.cash_out(a, 30_000)?;
    // Refused: more than `a` has, and a wrong PIN. Neither reaches the views.
    let refused = block_on(w.domain.p2p(w.op(), a, c, 10_000_000, w.auth()));
    anyhow::ensure!(refused.is_err(), "an overdraft went through");

    let wallet = account(a);
    let op = w.op();
    let partial = hold(op, wallet, 4_000, 0, op);
    let full = hold(w.op(), wallet, 1_000, 0, op + 100);
    let voided = hold(w.op(), wallet, 700, 0, op + 200);
    let expiring = hold(w.op(), wallet, 600, 30, op + 300);
    let ok = [TransferResult::Ok];
    anyhow::ensure!(w.submit(vec![partial, full, voided, expiring])? == [TransferResult::Ok; 4]);
    anyhow::ensure!(w.submit(vec![resolve(w.op(), &partial, 2_500, TransferFlags::POST_PENDING)])? == ok);
    anyhow::ensure!(w.submit(vec![resolve(w.op(), &full, 0, TransferFlags::POST_PENDING)])? == ok);
    anyhow::ensure!(w.submit(vec![resolve(w.op(), &voided, 0, TransferFlags::VOID_PENDING)])? == ok);
    // Past its timeout: the lookup is the shard's next message, and the shard expires holds first.
    w.clock.advance_s(31);
    let a_account = block_on(w.engine.lookup_accounts(&[wallet]))?.pop().flatten().context("no a")?;
    anyhow::ensure!(a_account.debits_pending == 0, "{a_account:?}");
    w.p2p(b, a, 300)?;
    let spent = vec![
        (Category::Transfers, 2, 21_000),
        (Category::CashOut, 1, 30_000),
        (Category::CashByCode, 2, 3_500),
        (Category::Fees, 3, u128::from(fee_local + fee_far + fee_out)),
    ];
    Ok(Workload { a, b, c, spent })
}

#[test]
fn balance_after_follows_the_ledger_through_holds_expiry_and_cross_shard_operations() -> anyhow::Result<()> {
    let w = World::open()?;
    let Workload { a, b, c, .. } = workload(&w)?;
    let views = w.caught_up()?;
    for id in [
        account(a),
        account(b),
        account(c),
        agent_float(AGENT),
        agent_commission(AGENT),
        system::FEE_INCOME,
        system::ATM_CLEARING,
        system::EMONEY_ISSUANCE,
    ] {
        check_running(&w, views, id)?;
    }
    // `a`'s holds: placed, then posted in part (2_500 of 4_000) and in full (a post of 0), voided
    // and expired; only the posts moved its balance. The resolving transfers had no code or
    // reference: their lines carry the hold's.
    let lines = history(views, account(a))?;
    let holds: Vec<(LineKind, u64, u16)> =
        lines.iter().filter(|l| l.code == codes::CASH_CODE).map(|l| (l.kind, l.amount, l.code)).collect();
    let cash = codes::CASH_CODE;
    assert_eq!(
        holds,
        [
            (LineKind::Pending, 4_000, cash),
            (LineKind::Pending, 1_000, cash),
            (LineKind::Pending, 700, cash),
            (LineKind::Pending, 600, cash),
            (LineKind::HoldPosted, 2_500, cash),
            (LineKind::HoldPosted, 1_000, cash),
            (LineKind::HoldVoided, 700, cash),
            (LineKind::HoldExpired, 600, cash),
        ]
    );
    assert!(lines.iter().filter(|l| l.code == cash).all(|l| l.user_data != 0 && l.debit));
    assert!(lines.iter().all(|l| l.pending == (l.kind == LineKind::Pending)));
    // The cross-shard P2P's principal and fee, booked together on the payer's statement.
    let far: Vec<&HistoryEntry> = lines.iter().filter(|l| l.other_account == account(c) && l.debit).collect();
    let fee =
        lines.iter().find(|l| l.user_data == far[0].user_data && l.code == codes::FEE).context("fee")?;
    assert_eq!(
        (far.len(), far[0].amount, fee.booked_at, fee.line),
        (1, 20_000, far[0].booked_at, far[0].line + 1)
    );
    Ok(())
}

#[test]
fn pages_return_every_line_once_in_order_while_lines_are_appended() -> anyhow::Result<()> {
    let w = World::open()?;
    let float_shard = home_shard(agent_float(AGENT), SHARDS);
    let a = w.wallet(|s| s != float_shard)?;
    let b = w.wallet(|s| s == wallet_shard(a.get(), SHARDS))?;
    let c = w.wallet(|s| s != wallet_shard(a.get(), SHARDS))?;
    w.cash_in(a, 1_000_000)?;
    for i in 0..12 {
        w.p2p(a, if i % 2 == 0 { b } else { c }, 1_000 + i)?;
    }
    let query = StatementQuery::new(account(a), START_NS, u64::MAX);
    let views = w.caught_up()?;

    // Page through while appending: two more operations after each of the first pages.
    let mut paged: Vec<HistoryEntry> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = statement::page(views, &query, cursor.as_deref(), 5)?;
        anyhow::ensure!(page.lines.len() <= 5);
        paged.extend(page.lines);
        pages += 1;
        if pages <= 4 {
            w.p2p(a, b, 77)?;
            w.p2p(c, a, 55)?;
            w.caught_up()?;
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
        anyhow::ensure!(pages < 100, "paging does not end");
    }
    let all = history(views, account(a))?;
    anyhow::ensure!(paged == all, "paged {} lines of {}", paged.len(), all.len());
    // 1 cash-in + 12 P2Ps with fees + 4 × (a P2P with fee + a P2P in).
    assert_eq!(all.len(), 1 + 24 + 4 * 3);

    // A window in the middle, paged by 4: exactly the lines booked in it.
    let (from, to) = (all[9].booked_at, all[20].booked_at);
    let window = StatementQuery::new(account(a), from, to);
    let (mut paged, mut cursor) = (Vec::new(), None);
    loop {
        let page = statement::page(views, &window, cursor.as_deref(), 4)?;
        paged.extend(page.lines);
        let Some(next) = page.next else { break };
        cursor = Some(next);
    }
    let expected: Vec<HistoryEntry> =
        all.iter().filter(|l| l.booked_at >= from && l.booked_at < to).copied().collect();
    assert!(!expected.is_empty() && expected.len() < all.len());
    assert_eq!(paged, expected);

    // A code filter: only fee lines, all of them.
    let fees = statement::page(views, &query.clone().with_codes(&[codes::FEE]), None, 1_000)?;
    let expected: Vec<HistoryEntry> = all.iter().filter(|l| l.code == codes::FEE).copied().collect();
    assert_eq!(fees.lines, expected);
    assert_eq!((fees.lines.len(), fees.next), (12 + 4, None));

    // Cursors are checked: garbage, and another account's.
    let garbage = statement::page(views, &query, Some("not-a-cursor"), 5);
    assert!(matches!(garbage, Err(StatementError::Cursor(_))), "{garbage:?}");
    let first = statement::page(views, &query, None, 1)?;
    let other = StatementQuery::new(account(b), START_NS, u64::MAX);
    let foreign = statement::page(views, &other, first.next.as_deref(), 5);
    assert!(matches!(foreign, Err(StatementError::CursorAccount)), "{foreign:?}");
    Ok(())
}

#[test]
fn csv_and_json_exports_and_the_spending_summary_add_up() -> anyhow::Result<()> {
    let w = World::open()?;
    let Workload { a, c, spent, .. } = workload(&w)?;
    let views = w.caught_up()?;
    let query = StatementQuery::new(account(a), 0, u64::MAX);
    let rows = statement::operations(views, &query)?;

    let mut csv_bytes = Vec::new();
    let written = statement::write_csv(views, &query, &mut csv_bytes)?;
    assert_eq!(written, rows.len());
    let mut reader = csv::Reader::from_reader(csv_bytes.as_slice());
    assert_eq!(reader.headers()?.iter().collect::<Vec<_>>(), statement::CSV_HEADER);
    let records: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>()?;
    assert_eq!(records.len(), rows.len());
    let column = |name: &str| statement::CSV_HEADER.iter().position(|h| *h == name).context("column");
    let (net, balance, gross, fee) =
        (column("net")?, column("balance_after")?, column("gross")?, column("fee")?);
    let (operation, counterparty, status) =
        (column("operation")?, column("counterparty")?, column("status")?);
    let mut sum = 0;
    for record in &records {
        sum += minor(&record[net])?;
        assert_eq!(minor(&record[balance])?, sum, "{record:?}");
    }
    let posted = w.posted(account(a))?;
    assert_eq!(sum, posted);
    // The cross-shard P2P is one row with its fee, named by the counterparty's number.
    let p2p = records
        .iter()
        .find(|r| &r[operation] == "p2p" && r[counterparty] == format!("+{}", c.get()))
        .context("no P2P to c")?;
    let (g, f) = (minor(&p2p[gross])?, minor(&p2p[fee])?);
    assert_eq!((g, minor(&p2p[net])?, &p2p[column("direction")?]), (20_000, -(g + f), "out"));
    assert!(f > 0);
    assert_eq!(p2p[column("reference")?].len(), 32);
    assert!(p2p[column("time")?].starts_with("2026-11-23T00:00:") && p2p[column("time")?].ends_with('Z'));
    // The holds: 4 placed, 2 posted, 1 voided, 1 expired, each its own row; only posts moved money.
    let statuses: Vec<&str> =
        records.iter().filter(|r| &r[operation] == "cash_by_code").map(|r| &r[status]).collect();
    assert_eq!(statuses.len(), 8, "{statuses:?}");

    // JSON: the same rows, with the same fields.
    let mut json_bytes = Vec::new();
    assert_eq!(statement::write_json(views, &query, &mut json_bytes)?, rows.len());
    let json: serde_json::Value = serde_json::from_slice(&json_bytes)?;
    assert_eq!(json["account"], format!("+{}", a.get()));
    let operations = json["operations"].as_array().context("operations")?;
    assert_eq!(operations.len(), records.len());
    for (object, record) in operations.iter().zip(&records) {
        for (key, value) in statement::CSV_HEADER.iter().zip(record) {
            match &object[*key] {
                serde_json::Value::String(text) => assert_eq!(text, value, "{key}"),
                serde_json::Value::Number(n) => assert_eq!(n.to_string(), value, "{key}"),
                serde_json::Value::Null => assert_eq!(value, "", "{key}"),
                other => anyhow::bail!("{key}: {other}"),
            }
        }
    }

    // Filtered by code: P2P rows only, each still with its fee.
    let p2ps = statement::operations(views, &query.clone().with_codes(&[codes::P2P]))?;
    assert_eq!(p2ps.len(), 4);
    assert!(p2ps.iter().all(|r| r.code == codes::P2P));
    assert!(p2ps.iter().filter(|r| r.direction == Direction::Out).all(|r| r.fee > 0));

    // Spending: outflows by category, fees apart.
    let summary = statement::spending(views, &query)?;
    let found: Vec<(Category, u64, u128)> =
        summary.categories.iter().map(|c| (c.category, c.count, c.total)).collect();
    assert_eq!(found, spent);
    assert_eq!(summary.total, spent.iter().map(|s| s.2).sum::<u128>());
    assert_eq!(summary.currency, Some(Currency::Azn));
    Ok(())
}

#[test]
fn statements_survive_a_restart_and_a_reindex() -> anyhow::Result<()> {
    let w = World::open()?;
    let Workload { a, b, c, .. } = workload(&w)?;
    let accounts = [account(a), account(b), account(c), system::FEE_INCOME, agent_float(AGENT)];
    let views = w.caught_up()?;
    let before: Vec<Vec<HistoryEntry>> =
        accounts.iter().map(|id| history(views, *id)).collect::<Result<_, _>>()?;
    let w = w.restart()?;
    let views = w.caught_up()?;
    let after: Vec<Vec<HistoryEntry>> =
        accounts.iter().map(|id| history(views, *id)).collect::<Result<_, _>>()?;
    assert_eq!(after, before);
    // Running balances go on from where they were.
    w.p2p(a, c, 1_234)?;
    w.cash_out(c, 2_000)?;
    let views = w.caught_up()?;
    let mut expected = Vec::new();
    for id in accounts {
        expected.push(check_running(&w, views, id)?);
    }
    let csv_before = {
        let mut out = Vec::new();
        statement::write_csv(views, &StatementQuery::new(account(a), 0, u64::MAX), &mut out)?;
        out
    };
    let (dir, _clock) = w.close();

    // Rebuilt from the journal alone (the views see nothing durable, so only the reindex writes).
    let reached = engine::views::reindex(dir.path())?;
    let views = Views::open(&dir.path().join("views"), &dir.path().join("journal"), JournalState::new(0))?;
    assert_eq!(views.applied(), reached);
    let rebuilt: Vec<Vec<HistoryEntry>> =
        accounts.iter().map(|id| history(&views, *id)).collect::<Result<_, _>>()?;
    assert_eq!(rebuilt, expected);
    let mut csv_after = Vec::new();
    statement::write_csv(&views, &StatementQuery::new(account(a), 0, u64::MAX), &mut csv_after)?;
    assert_eq!(csv_after, csv_before);
    views.stop();
    Ok(())
}

/// The transfer ids the views index for a refused operation: none.
#[test]
fn a_refused_operation_leaves_no_line() -> anyhow::Result<()> {
    let w = World::open()?;
    let a = w.wallet(|_| true)?;
    let b = w.wallet(|_| true)?;
    w.cash_in(a, 1_000)?;
    let op = w.op();
    let refused = block_on(w.domain.p2p(op, a, b, 5_000, w.auth()));
    assert!(refused.is_err());
    let views = w.caught_up()?;
    assert!(views.transfer(TransferId(op))?.is_none());
    assert!(history(views, account(a))?.iter().all(|l| l.user_data != op));
    assert!(history(views, account(b))?.is_empty());
    Ok(())
}

// The notification outbox.

/// Every entry waiting, oldest first.
fn waiting(outbox: &Outbox) -> anyhow::Result<Vec<(NotificationKey, Notification)>> {
    Ok(outbox.oldest(usize::MAX)?)
}

/// Acknowledges every entry waiting.
fn drain(outbox: &Outbox) -> anyhow::Result<()> {
    let keys: Vec<NotificationKey> = waiting(outbox)?.into_iter().map(|(key, _)| key).collect();
    Ok(outbox.ack(&keys)?)
}

fn money(entry: &(NotificationKey, Notification)) -> anyhow::Result<MoneyNotice> {
    match entry.1 {
        Notification::Money(notice) => Ok(notice),
        other => anyhow::bail!("not a money notice: {other:?}"),
    }
}

#[test]
fn an_issued_otp_is_enqueued_with_a_nonce_whose_code_is_accepted() -> anyhow::Result<()> {
    let w = World::open()?;
    let a = w.wallet(|_| true)?;
    let outbox = w.views()?.outbox();
    let issued = block_on(w.domain.request_otp(a))?;
    w.caught_up()?;
    let entries = waiting(&outbox)?;
    let otps: Vec<(u64, u128, u64)> = entries
        .iter()
        .filter_map(|(_, n)| match n {
            Notification::Otp { msisdn, nonce, expires_at } => Some((*msisdn, *nonce, *expires_at)),
            _ => None,
        })
        .collect();
    assert_eq!(otps, [(a.get(), issued.nonce, START_NS + u64::from(issued.expires_in_s) * NS)]);
    let otp = entries.iter().find(|(_, n)| matches!(n, Notification::Otp { .. })).context("otp")?.1;
    assert!(!otp.expired(START_NS) && otp.expired(START_NS + u64::from(issued.expires_in_s) * NS));
    // The sender derives the code from the nonce; the wallet accepts it (once).
    let code = w.domain.otp_for_delivery(a, issued.nonce);
    block_on(w.domain.verify_otp(a, &code))?;
    assert!(block_on(w.domain.verify_otp(a, &code)).is_err());
    Ok(())
}

#[test]
fn operations_enqueue_one_notice_per_wallet_and_a_refused_one_nothing() -> anyhow::Result<()> {
    let w = World::open()?;
    let float_shard = home_shard(agent_float(AGENT), SHARDS);
    let a = w.wallet(|s| s != float_shard)?;
    let b = w.wallet(|s| s == wallet_shard(a.get(), SHARDS))?;
    let c = w.wallet(|s| s != wallet_shard(a.get(), SHARDS))?;
    let mut outbox = w.views()?.outbox();
    let op_in = w.cash_in(a, 100_000)?;
    w.caught_up()?;
    let entries = waiting(&outbox)?;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let cash_in = money(&entries[0])?;
    assert_eq!(
        (cash_in.kind, cash_in.msisdn, cash_in.amount, cash_in.reference),
        (MoneyKind::Received, a.get(), 100_000, op_in)
    );
    // The async reader was told.
    {
        let mut changed = std::pin::pin!(outbox.changed());
        let polled = changed.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        assert!(matches!(polled, std::task::Poll::Ready(true)), "{polled:?}");
    }
    drain(&outbox)?;

    // Across shards and on one: a sent notice with the fee for the payer, a received one for the
    // payee, and their balances as the ledger has them.
    for payee in [c, b] {
        let (op, fee) = w.p2p(a, payee, 20_000)?;
        w.caught_up()?;
        let entries = waiting(&outbox)?;
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert!(entries[0].0 < entries[1].0);
        let (sent, received) = (money(&entries[0])?, money(&entries[1])?);
        assert_eq!(
            (sent.kind, sent.msisdn, sent.amount, sent.fee, sent.counterparty, sent.reference, sent.code),
            (MoneyKind::Sent, a.get(), 20_000, fee, account(payee), op, codes::P2P)
        );
        assert_eq!(
            (received.kind, received.msisdn, received.amount, received.fee, received.counterparty),
            (MoneyKind::Received, payee.get(), 20_000, 0, account(a))
        );
        assert_eq!(sent.balance_after, w.posted(account(a))?);
        assert_eq!(received.balance_after, w.posted(account(payee))?);
        drain(&outbox)?;
        assert!(outbox.is_empty()?);
    }

    // Refused: an overdraft and a wrong PIN enqueue nothing.
    assert!(block_on(w.domain.p2p(w.op(), a, c, 10_000_000, w.auth())).is_err());
    let wrong = Pin::parse("9999")?;
    let auth = CustomerAuth { pin: Some(&wrong), otp: None, channel: channels::USSD };
    assert!(block_on(w.domain.p2p(w.op(), a, c, 100, auth)).is_err());
    w.caught_up()?;
    assert!(outbox.is_empty()?, "{:?}", waiting(&outbox)?);
    assert!(!outbox.wait(Duration::from_millis(20))?);

    // A cash-out across shards is cashed out, with its fee; a staff block is a notice too.
    let (op, fee) = w.cash_out(a, 5_050)?;
    block_on(w.domain.block(c, 42))?;
    w.caught_up()?;
    assert!(outbox.wait(Duration::from_secs(1))?);
    let entries = waiting(&outbox)?;
    assert_eq!(entries.len(), 2, "{entries:?}");
    let out = money(&entries[0])?;
    assert_eq!((out.kind, out.amount, out.fee, out.reference), (MoneyKind::CashedOut, 5_050, fee, op));
    assert_eq!(out.balance_after, w.posted(account(a))?);
    assert!(matches!(
        entries[1].1,
        Notification::Blocked { msisdn, flag: WalletState::STAFF_BLOCKED, .. } if msisdn == c.get()
    ));
    Ok(())
}

/// A crash after the views' last snapshot makes them apply the records after it again: with the
/// outbox as the operating system kept it, nothing is enqueued twice; with the outbox as the
/// disk kept it after a power cut (its newest segment as of that snapshot), what it lost is
/// enqueued again, the same entries under the same keys.
#[test]
fn after_a_crash_the_views_enqueue_again_exactly_what_the_outbox_lost() -> anyhow::Result<()> {
    let w = World::open()?;
    let Workload { a, c, .. } = workload(&w)?;
    w.caught_up()?;
    // A clean stop saves a snapshot and fsyncs the outbox: the files as they were then.
    let saved = std::cell::RefCell::new(Vec::new());
    let views = |dir: &std::path::Path| dir.join("views");
    let files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        vec![views(dir).join("history.snapshot"), views(dir).join("outbox/00000000000000000001.qob")]
    };
    let w = w.restart_after(|dir| {
        for file in files(dir) {
            saved.borrow_mut().push((file.clone(), std::fs::read(&file)?));
        }
        Ok(())
    })?;
    w.caught_up()?;
    let before = waiting(&w.views()?.outbox())?;
    // Three more P2Ps (two notices each), applied and enqueued after that snapshot.
    for amount in [101, 102, 103] {
        w.p2p(a, c, amount)?;
    }
    w.caught_up()?;
    let after = waiting(&w.views()?.outbox())?;
    assert_eq!(after.len(), before.len() + 6, "{after:?}");
    assert_eq!(after[..before.len()], before[..]);
    // The crash: the views restart from the old snapshot; the outbox is as it was left.
    let w = w.restart_after(|dir| {
        let (snapshot, bytes) = &saved.borrow()[0];
        assert_eq!(*snapshot, files(dir)[0]);
        Ok(std::fs::write(snapshot, bytes)?)
    })?;
    w.caught_up()?;
    assert_eq!(waiting(&w.views()?.outbox())?, after);
    // The power cut: the outbox lost its frames after that snapshot too.
    let w = w.restart_after(|dir| {
        for (file, bytes) in saved.borrow().iter() {
            std::fs::write(file, bytes)?;
        }
        assert!(std::fs::metadata(&files(dir)[1])?.len() > 8);
        Ok(())
    })?;
    w.caught_up()?;
    assert_eq!(waiting(&w.views()?.outbox())?, after);
    Ok(())
}

#[test]
fn unacknowledged_notices_survive_a_restart_and_a_reindex_sends_nothing_twice() -> anyhow::Result<()> {
    let w = World::open()?;
    let Workload { a, c, .. } = workload(&w)?;
    w.caught_up()?;
    let outbox = w.views()?.outbox();
    let entries = waiting(&outbox)?;
    assert!(entries.len() > 8, "{entries:?}");
    // Half delivered.
    let (delivered, kept) = entries.split_at(entries.len() / 2);
    outbox.ack(&delivered.iter().map(|(key, _)| *key).collect::<Vec<_>>())?;
    outbox.ack(&delivered.iter().map(|(key, _)| *key).collect::<Vec<_>>())?;
    assert_eq!(waiting(&outbox)?, kept);
    drop(outbox);

    let w = w.restart()?;
    w.caught_up()?;
    let outbox = w.views()?.outbox();
    assert_eq!(waiting(&outbox)?, kept);
    let (op, _) = w.p2p(a, c, 999)?;
    w.caught_up()?;
    let now = waiting(&outbox)?;
    assert_eq!(now.len(), kept.len() + 2);
    assert_eq!(&now[..kept.len()], kept);
    assert_eq!(money(&now[kept.len()])?.reference, op);
    drop(outbox);
    let (dir, _clock) = w.close();

    // The rebuild re-derives every statement but enqueues nothing already enqueued.
    engine::views::reindex(dir.path())?;
    let views = Views::open(&dir.path().join("views"), &dir.path().join("journal"), JournalState::new(0))?;
    assert_eq!(waiting(&views.outbox())?, now);
    views.stop();
    Ok(())
}
