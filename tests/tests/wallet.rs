//! The wallet domain end to end: [`Domain`] over a real engine on a temporary data directory, with
//! a manual clock wherever days, OTP lifetimes or send windows matter. Every test that moves money
//! ends by checking that debits equal credits.

use std::cell::Cell;
use std::fmt::Debug;
use std::sync::{Arc, Barrier};

use anyhow::Context;
use engine::clock::ManualClock;
use engine::domain::{AgentKind, CustomerAuth, Receipt, agent_commission, agent_float, channels, system};
use engine::ids::{home_shard, wallet_shard};
use engine::msisdn::{Msisdn, MsisdnError};
use engine::secret::{OneTimeCode, Pin, ServerSecret};
use engine::tariff::Tariff;
use engine::wallet::{
    Actor, Limits, Outflow, Policy, Profile, WalletAccountView, WalletRefusal, WalletState, WalletView, codes,
};
use engine::{
    Account, AccountId, Currency, Domain, DomainConfig, Engine, EngineConfig, OpError, ShardId, TransferId,
    TransferResult,
};
use qepik_tests::block_on;

pub(crate) const NS: u64 = 1_000_000_000;
/// 2026-11-23 00:00 UTC, 04:00 in Baku (UTC+4): local midnight is 20 hours later.
pub(crate) const START_NS: u64 = 1_795_392_000 * NS;
pub(crate) const STAFF: u64 = 42;
pub(crate) const AGENT: u64 = 7;
/// The P2P tariff of the tests that charge one: 0.10 AZN + 0.5 %, at least 0.20, at most 5.00.
pub(crate) const P2P_FEE: Tariff = Tariff { fixed: 10, percent_bps: 50, min: 20, max: 500 };

pub(crate) type Configure = fn(&mut DomainConfig) -> anyhow::Result<()>;

/// An engine and its domain on one data directory, with the clock, operation ids and phone
/// numbers a test draws from.
pub(crate) struct World {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) clock: Arc<ManualClock>,
    shards: u16,
    configure: Configure,
    views: bool,
    pub(crate) engine: Engine,
    pub(crate) domain: Domain,
    next_op: Cell<u128>,
    next_number: Cell<u64>,
}

impl World {
    pub(crate) fn open(shards: u16, configure: Configure) -> anyhow::Result<World> {
        World::open_with(shards, configure, false)
    }

    /// [`World::open`], with the sled views running if `views`.
    pub(crate) fn open_with(shards: u16, configure: Configure, views: bool) -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let clock = Arc::new(ManualClock::new(START_NS));
        let (engine, domain) = start(dir.path(), &clock, shards, configure, views)?;
        Ok(World {
            dir,
            clock,
            shards,
            configure,
            views,
            engine,
            domain,
            next_op: Cell::new(1 << 64),
            next_number: Cell::new(1_000_000),
        })
    }

    /// Shuts the engine down and opens the same directory again, with a new domain.
    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        self.engine.shutdown();
        let (engine, domain) = start(self.dir.path(), &self.clock, self.shards, self.configure, self.views)?;
        self.engine = engine;
        self.domain = domain;
        Ok(())
    }

    /// A fresh operation id.
    pub(crate) fn op(&self) -> u128 {
        let op = self.next_op.get() + 1;
        self.next_op.set(op);
        op
    }

    /// A fresh number whose wallet would live on a shard that `wanted` accepts.
    pub(crate) fn number(&self, wanted: impl Fn(ShardId) -> bool) -> anyhow::Result<Msisdn> {
        for _ in 0..10_000 {
            let n = self.next_number.get();
            self.next_number.set(n + 1);
            let msisdn = self.domain.msisdn(&format!("+994 55 {n:07}"))?;
            if wanted(wallet_shard(msisdn.get(), self.shards)) {
                return Ok(msisdn);
            }
        }
        anyhow::bail!("no number on a wanted shard")
    }

    /// Registers a fresh wallet (tier 0) on a shard that `wanted` accepts.
    pub(crate) fn wallet(
        &self,
        pin: Option<&Pin>,
        wanted: impl Fn(ShardId) -> bool,
    ) -> anyhow::Result<Msisdn> {
        let msisdn = self.number(wanted)?;
        block_on(self.domain.register(msisdn, pin, 1, Actor::customer(msisdn.get())))?;
        Ok(msisdn)
    }

    /// Creates agent [`AGENT`] with `float` on its float account.
    pub(crate) fn agent(&self, float: u64) -> anyhow::Result<()> {
        block_on(self.domain.create_agent(AGENT, AgentKind::Agent))?;
        block_on(self.domain.fund_agent(self.op(), AGENT, float))?;
        Ok(())
    }

    pub(crate) fn cash_in(&self, to: Msisdn, amount: u64) -> Result<Receipt, OpError> {
        block_on(self.domain.cash_in(self.op(), AGENT, to, amount))
    }

    pub(crate) fn p2p(
        &self,
        from: Msisdn,
        to: Msisdn,
        amount: u64,
        auth: CustomerAuth<'_>,
    ) -> Result<Receipt, OpError> {
        block_on(self.domain.p2p(self.op(), from, to, amount, auth))
    }

    pub(crate) fn account(&self, id: AccountId) -> anyhow::Result<Account> {
        block_on(self.engine.lookup_accounts(&[id]))?
            .pop()
            .flatten()
            .with_context(|| format!("no account {id}"))
    }

    /// Checks posted balances exactly, and that nothing is left pending.
    pub(crate) fn check_balances(&self, expected: &[(AccountId, i128)]) -> anyhow::Result<()> {
        let mut found = Vec::new();
        for (id, _) in expected {
            let account = self.account(*id)?;
            found.push((*id, account.balance_posted(), account.debits_pending, account.credits_pending));
        }
        let expected: Vec<(AccountId, i128, u64, u64)> =
            expected.iter().map(|(id, balance)| (*id, *balance, 0, 0)).collect();
        assert_eq!(found, expected, "(account, posted balance, debits pending, credits pending)");
        Ok(())
    }

    pub(crate) fn assert_balanced(&self) -> anyhow::Result<()> {
        let totals = self.engine.totals()?;
        assert!(!totals.is_empty() && totals.values().all(|t| t.balanced()), "unbalanced: {totals:?}");
        Ok(())
    }

    pub(crate) fn view(&self, msisdn: Msisdn) -> anyhow::Result<WalletView> {
        Ok(block_on(self.domain.wallet(msisdn))?)
    }

    pub(crate) fn views(&self, wallets: &[Msisdn]) -> anyhow::Result<Vec<WalletView>> {
        wallets.iter().map(|m| self.view(*m)).collect()
    }

    pub(crate) fn azn(&self, msisdn: Msisdn) -> anyhow::Result<WalletAccountView> {
        let view = self.view(msisdn)?;
        view.accounts.iter().find(|a| a.account.currency == Currency::Azn).copied().context("no AZN account")
    }

    pub(crate) fn outflow(&self, msisdn: Msisdn) -> anyhow::Result<Outflow> {
        Ok(self.azn(msisdn)?.outflow)
    }

    pub(crate) fn state(&self, msisdn: Msisdn) -> anyhow::Result<WalletState> {
        Ok(self.view(msisdn)?.state)
    }
}

fn start(
    dir: &std::path::Path,
    clock: &Arc<ManualClock>,
    shards: u16,
    configure: Configure,
    views: bool,
) -> anyhow::Result<(Engine, Domain)> {
    let mut config = EngineConfig::new(dir);
    config.shard_count = shards;
    config.views = views;
    config.clock = clock.clone();
    let engine = Engine::open(config)?;
    let mut domain_config = DomainConfig::new(Arc::new(ServerSecret::from_bytes(&[7u8; 32])?));
    configure(&mut domain_config)?;
    let domain = block_on(Domain::open(engine.clone(), domain_config))?;
    Ok((engine, domain))
}

pub(crate) fn default_config(_: &mut DomainConfig) -> anyhow::Result<()> {
    Ok(())
}

pub(crate) fn any(_: ShardId) -> bool {
    true
}

pub(crate) fn wallet_account(msisdn: Msisdn) -> AccountId {
    AccountId::wallet(msisdn.get(), Currency::Azn)
}

pub(crate) fn with_pin(pin: &Pin) -> CustomerAuth<'_> {
    CustomerAuth { pin: Some(pin), otp: None, channel: channels::USSD }
}

pub(crate) fn with_pin_and_otp<'a>(pin: &'a Pin, otp: &'a OneTimeCode) -> CustomerAuth<'a> {
    CustomerAuth { pin: Some(pin), otp: Some(otp), channel: channels::APP }
}

fn profile() -> Profile {
    Profile {
        document_type: "ID".into(),
        document_number: "AZE5550001".into(),
        first_name: "Aysel".into(),
        last_name: "Mammadova".into(),
        birth_date: "1990-04-12".into(),
    }
}

/// A six-digit code other than `code`.
pub(crate) fn wrong_code(code: &OneTimeCode) -> anyhow::Result<OneTimeCode> {
    let digits = if code.expose() == "000000" { "000001" } else { "000000" };
    Ok(OneTimeCode::parse(digits, 6)?)
}

/// An operation's answer in a form tests compare exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not refused: the operation went through.
    None,
    Limit(TransferResult, u64),
    Refused(TransferResult),
    Wallet(WalletRefusal),
    Msisdn(MsisdnError),
    /// Anything else, by its code.
    Other(&'static str),
}

pub(crate) fn refusal<T>(result: Result<T, OpError>) -> Refusal {
    match result {
        Ok(_) => Refusal::None,
        Err(OpError::Limit { result, remaining }) => Refusal::Limit(result, remaining),
        Err(OpError::Refused(result)) => Refusal::Refused(result),
        Err(OpError::Wallet(refusal)) => Refusal::Wallet(refusal),
        Err(OpError::Msisdn(error)) => Refusal::Msisdn(error),
        Err(other) => Refusal::Other(other.code()),
    }
}

/// Runs `work(i)` on `threads` threads released together; returns the answers in thread order.
pub(crate) fn race<T: Send + 'static>(
    threads: usize,
    work: impl Fn(usize) -> Box<dyn FnOnce() -> T + Send>,
) -> anyhow::Result<Vec<T>> {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (barrier, job) = (barrier.clone(), work(i));
            std::thread::spawn(move || {
                barrier.wait();
                job()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|handle| handle.join().map_err(|_| anyhow::anyhow!("a racing thread panicked")))
        .collect()
}

fn limits_of(policy: &Policy, tier: u8) -> anyhow::Result<Limits> {
    Ok(policy.tier(tier).with_context(|| format!("no tier {tier}"))?.limits(Currency::Azn))
}

fn debug<T: Debug>(value: T) -> String {
    format!("{value:?}")
}

#[test]
fn msisdn_forms_name_one_wallet_and_bad_numbers_have_stable_codes() -> anyhow::Result<()> {
    let w = World::open(2, default_config)?;
    let forms = ["+994 50 123 45 67", "994501234567", "0501234567"];
    let parsed: Vec<Msisdn> = forms.iter().map(|form| w.domain.msisdn(form)).collect::<Result<_, _>>()?;
    let m = parsed[0];
    assert_eq!(parsed, [m; 3]);
    assert_eq!(m.get(), 994_501_234_567);
    assert_eq!(m.to_string(), "+994501234567");

    let pin = Pin::parse("2468")?;
    block_on(w.domain.register(m, Some(&pin), 1, Actor::customer(m.get())))?;
    for form in forms {
        let view = w.view(w.domain.msisdn(form)?)?;
        assert_eq!(view.state.msisdn, 994_501_234_567);
        assert_eq!(view.state.tier, 0);
        let accounts: Vec<AccountId> = view.accounts.iter().map(|a| a.account.id).collect();
        assert_eq!(accounts, [AccountId::wallet(994_501_234_567, Currency::Azn)]);
        // Registering again, under any form of the number, is refused.
        let again = block_on(w.domain.register(w.domain.msisdn(form)?, None, 1, Actor::customer(m.get())));
        let error = again.expect_err("registered twice");
        assert_eq!(error.code(), "wallet_exists");
        assert_eq!(refusal::<()>(Err(error)), Refusal::Wallet(WalletRefusal::Exists));
    }
    // The second registration changed nothing: the PIN is still the first one.
    assert_eq!(refusal(block_on(w.domain.verify_pin(m, &pin))), Refusal::None);

    let bad = [
        ("+994 40 123 45 67", MsisdnError::UnknownOperatorPrefix, "msisdn_unknown_operator_prefix"),
        ("05012345", MsisdnError::WrongLength { expected: 9, got: 7 }, "msisdn_wrong_length"),
        ("0501234567x", MsisdnError::InvalidCharacter { position: 10 }, "msisdn_invalid_character"),
    ];
    for (input, expected, code) in bad {
        let error = w.domain.msisdn(input).expect_err("a bad number");
        assert_eq!(error.code(), code, "{input}");
        // The message never repeats the number, which is personal data.
        assert!(!error.to_string().contains("12345"), "{input}: {error}");
        assert_eq!(refusal::<()>(Err(error)), Refusal::Msisdn(expected), "{input}");
    }
    let stranger = w.domain.msisdn("0551112233")?;
    assert_eq!(refusal(block_on(w.domain.wallet(stranger))), Refusal::Wallet(WalletRefusal::NotFound));
    Ok(())
}

/// A policy whose tiers limit nothing, for tests about fees.
fn unlimited(config: &mut DomainConfig) -> anyhow::Result<()> {
    for tier in &mut config.policy.tiers {
        tier.limits = vec![(Currency::Azn as u8, Limits::NONE)];
    }
    config.step_up_above = u64::MAX;
    config.tariffs.set(codes::P2P, P2P_FEE)?;
    Ok(())
}

#[test]
fn p2p_charges_its_fee_once_on_both_routes_and_a_blocked_receiver_moves_nothing() -> anyhow::Result<()> {
    const SHARDS: u16 = 4;
    let w = World::open(SHARDS, unlimited)?;
    w.agent(10_000_000)?;
    let pin = Pin::parse("1357")?;
    let sender = w.wallet(Some(&pin), any)?;
    let home = wallet_shard(sender.get(), SHARDS);
    let near = w.wallet(Some(&pin), |s| s == home)?;
    let far = w.wallet(Some(&pin), |s| s != home)?;
    let blocked_near = w.wallet(Some(&pin), |s| s == home)?;
    let blocked_far = w.wallet(Some(&pin), |s| s != home)?;
    w.cash_in(sender, 1_000_000)?;
    let balances = |sent: i128, received: [i128; 4], fees: i128| {
        vec![
            (wallet_account(sender), 1_000_000 - sent),
            (wallet_account(near), received[0]),
            (wallet_account(far), received[1]),
            (wallet_account(blocked_near), received[2]),
            (wallet_account(blocked_far), received[3]),
            (system::FEE_INCOME, fees),
        ]
    };

    // (amount, fee): raised to the minimum; 15.495 rounded down; 15.5 rounded half up; plain;
    // lowered to the maximum.
    let cases = [(1_000, 20), (3_099, 25), (3_100, 26), (19_999, 110), (150_000, 500)];
    let (mut sent, mut received, mut fees) = (0_i128, [0_i128; 4], 0_i128);
    let mut done = Vec::new();
    for (slot, to) in [near, far].into_iter().enumerate() {
        for (amount, fee) in cases {
            let op = w.op();
            let receipt = block_on(w.domain.p2p(op, sender, to, amount, with_pin(&pin)))?;
            assert_eq!(receipt, Receipt { id: TransferId(op), amount, fee, commission: 0 });
            sent += i128::from(amount + fee);
            received[slot] += i128::from(amount);
            fees += i128::from(fee);
            w.check_balances(&balances(sent, received, fees))?;
            done.push((op, to, amount, receipt));
        }
    }
    w.assert_balanced()?;

    // A receiver blocked by staff: refused on either route, and nothing moved, the sender's
    // counters included. The refused id is free again: once unblocked, the same op goes through.
    for (slot, blocked) in [(2, blocked_near), (3, blocked_far)] {
        block_on(w.domain.block(blocked, STAFF))?;
        let before = w.outflow(sender)?;
        let op = w.op();
        let answer = refusal(block_on(w.domain.p2p(op, sender, blocked, 5_000, with_pin(&pin))));
        assert_eq!(answer, Refusal::Refused(TransferResult::CreditWalletBlocked));
        w.check_balances(&balances(sent, received, fees))?;
        assert_eq!(w.outflow(sender)?, before);

        block_on(w.domain.unblock(blocked, STAFF))?;
        let receipt = block_on(w.domain.p2p(op, sender, blocked, 5_000, with_pin(&pin)))?;
        assert_eq!(receipt, Receipt { id: TransferId(op), amount: 5_000, fee: 35, commission: 0 });
        sent += 5_035;
        received[slot] += 5_000;
        fees += 35;
        w.check_balances(&balances(sent, received, fees))?;
        let after = w.outflow(sender)?;
        assert_eq!(
            (after.day_amount, after.day_count),
            (before.day_amount + 5_035, before.day_count + 1),
            "{before:?} {after:?}"
        );
    }
    w.assert_balanced()?;

    // Retries answer with the same receipt and post nothing: the same-shard ones first, then
    // the cross-shard ones.
    let expected = balances(sent, received, fees);
    for (op, to, amount, receipt) in done {
        let again = block_on(w.domain.p2p(op, sender, to, amount, with_pin(&pin)))?;
        assert_eq!(again, receipt);
        let route = if to == near { "same shard" } else { "cross shard" };
        let slot = usize::from(to != near);
        // Regression: the retry of a finished cross-shard chain was forwarded to the credit shard
        // as a new credit step, which posted the credit again.
        assert_eq!(
            w.account(wallet_account(to))?.balance_posted(),
            received[slot],
            "{route}: retrying P2P {op} of {amount} credited the receiver again"
        );
        w.check_balances(&expected)?;
        w.assert_balanced()?;
    }
    Ok(())
}

#[test]
fn tier_limits_hold_at_their_boundaries_and_days_reset_at_baku_midnight() -> anyhow::Result<()> {
    use TransferResult::{LimitDailyAmount, LimitMaxBalance, LimitMonthlyAmount, LimitPerOperation};
    let w = World::open(2, default_config)?;
    w.agent(10_000_000)?;
    let pin = Pin::parse("2580")?;
    let auth = || with_pin(&pin);
    let a = w.wallet(Some(&pin), any)?;
    let home = wallet_shard(a.get(), 2);
    let b = w.wallet(Some(&pin), |s| s != home)?;
    let c = w.wallet(Some(&pin), |s| s == home)?;
    let tier0 = limits_of(&Policy::default(), 0)?;
    let tier1 = limits_of(&Policy::default(), 1)?;
    assert_eq!(
        tier0,
        Limits {
            max_balance: 30_000,
            max_per_operation: 20_000,
            daily_amount: 30_000,
            daily_count: 20,
            monthly_amount: 100_000,
            monthly_count: 100,
        }
    );
    assert_eq!(w.azn(a)?.limits, tier0);

    // The maximum balance: one qəpik over is refused with the room left; exactly to it passes.
    assert_eq!(refusal(w.cash_in(a, 30_001)), Refusal::Limit(LimitMaxBalance, 30_000));
    assert_eq!(w.cash_in(a, 30_000)?.amount, 30_000);
    assert_eq!(refusal(w.cash_in(a, 1)), Refusal::Limit(LimitMaxBalance, 0));

    // Per operation.
    assert_eq!(refusal(w.p2p(a, b, 20_001, auth())), Refusal::Limit(LimitPerOperation, 20_000));
    assert_eq!(w.p2p(a, b, 20_000, auth())?.amount, 20_000);

    // The day's amount: with 20_000 sent today, 10_000 remain.
    w.cash_in(a, 20_000)?;
    assert_eq!(refusal(w.p2p(a, c, 10_001, auth())), Refusal::Limit(LimitDailyAmount, 10_000));
    assert_eq!(w.p2p(a, c, 10_000, auth())?.amount, 10_000);
    assert_eq!(refusal(w.p2p(a, c, 1, auth())), Refusal::Limit(LimitDailyAmount, 0));
    let today = w.outflow(a)?;
    assert_eq!(
        (today.day_amount, today.day_count, today.month_amount, today.month_count),
        (30_000, 2, 30_000, 2)
    );
    w.check_balances(&[
        (wallet_account(a), 20_000),
        (wallet_account(b), 20_000),
        (wallet_account(c), 10_000),
    ])?;

    // 19:59:59 UTC is 23:59:59 in Baku: still today. One second later the day starts afresh;
    // the month goes on.
    w.clock.advance_s(20 * 3600 - 1);
    assert_eq!(refusal(w.p2p(a, c, 1, auth())), Refusal::Limit(LimitDailyAmount, 0));
    w.clock.advance_s(1);
    assert_eq!(
        w.outflow(a)?,
        Outflow {
            day: today.day + 1,
            day_amount: 0,
            day_count: 0,
            month: today.month,
            month_amount: 30_000,
            month_count: 2,
        }
    );

    // 20_000 on each of three days (November 24th to 26th), then on the 27th the month's
    // 100_000 binds before the day's 30_000.
    let mut receivers = Vec::new();
    for day in 0..3 {
        if day > 0 {
            w.clock.advance_s(86_400);
            w.cash_in(a, 20_000)?;
        }
        let receiver = w.wallet(None, any)?;
        assert_eq!(w.p2p(a, receiver, 20_000, auth())?.amount, 20_000);
        receivers.push(receiver);
    }
    w.clock.advance_s(86_400);
    w.cash_in(a, 20_000)?;
    let last = w.wallet(None, any)?;
    assert_eq!(refusal(w.p2p(a, last, 10_001, auth())), Refusal::Limit(LimitMonthlyAmount, 10_000));
    assert_eq!(w.p2p(a, last, 10_000, auth())?.amount, 10_000);
    assert_eq!(refusal(w.p2p(a, last, 1, auth())), Refusal::Limit(LimitMonthlyAmount, 0));
    let o = w.outflow(a)?;
    assert_eq!((o.day_amount, o.day_count, o.month_amount, o.month_count), (10_000, 1, 100_000, 6));

    // Identified by staff: tier 1's limits apply at once, to the same counters.
    block_on(w.domain.identify(a, 1, profile(), STAFF))?;
    let view = w.view(a)?;
    assert_eq!(view.state.tier, 1);
    assert_eq!(view.accounts.first().map(|a| a.limits), Some(tier1));
    assert_eq!(w.cash_in(a, 40_000)?.amount, 40_000, "above tier 0's maximum balance");
    assert_eq!(w.p2p(a, last, 5_000, auth())?.amount, 5_000, "above tier 0's month");
    let big = w.wallet(None, any)?;
    assert_eq!(w.p2p(a, big, 25_000, auth())?.amount, 25_000, "above tier 0's maximum per operation");
    let o = w.outflow(a)?;
    assert_eq!((o.day_amount, o.day_count, o.month_amount, o.month_count), (40_000, 3, 130_000, 8));

    let mut expected = vec![
        (wallet_account(a), 20_000),
        (wallet_account(b), 20_000),
        (wallet_account(c), 10_000),
        (wallet_account(last), 15_000),
        (wallet_account(big), 25_000),
        (agent_float(AGENT), 10_000_000 - 150_000),
    ];
    expected.extend(receivers.iter().map(|r| (wallet_account(*r), 20_000)));
    w.check_balances(&expected)?;
    w.assert_balanced()
}

#[test]
fn a_wallet_whose_tier_left_the_policy_gets_the_strictest_limits_not_none() -> anyhow::Result<()> {
    use TransferResult::LimitPerOperation;
    let mut w = World::open(2, default_config)?;
    w.agent(10_000_000)?;
    let pin = Pin::parse("2580")?;
    let a = w.wallet(Some(&pin), any)?;
    let b = w.wallet(Some(&pin), any)?;
    block_on(w.domain.identify(a, 2, profile(), STAFF))?;
    w.cash_in(a, 100_000)?;
    let tier0 = limits_of(&Policy::default(), 0)?;
    // A configuration without tier 2: `a` keeps its tier code, and gets the strictest limits.
    let mut without = Policy::default();
    without.tiers.retain(|t| t.code != 2);
    block_on(w.engine.set_policy(without.clone()))?;
    w.restart()?;
    block_on(w.engine.set_policy(without))?;
    assert_eq!(w.view(a)?.state.tier, 2);
    assert_eq!(w.azn(a)?.limits.max_per_operation, tier0.max_per_operation);
    let over = tier0.max_per_operation + 1;
    assert_eq!(
        refusal(w.p2p(a, b, over, with_pin(&pin))),
        Refusal::Limit(LimitPerOperation, tier0.max_per_operation)
    );
    // Tier 2 back: its limits again.
    block_on(w.engine.set_policy(Policy::default()))?;
    assert_eq!(w.p2p(a, b, over, with_pin(&pin))?.amount, over);
    w.assert_balanced()
}

/// The `remaining` of a refusal by the receiver's maximum balance is what the receiver may still
/// take, as [`OpError::Limit`] documents ("what is left under that limit"), on either route.
#[test]
fn a_p2p_refused_for_the_receivers_maximum_balance_reports_the_receivers_room() -> anyhow::Result<()> {
    let w = World::open(2, default_config)?;
    w.agent(1_000_000)?;
    let pin = Pin::parse("2580")?;
    let sender = w.wallet(Some(&pin), any)?;
    let home = wallet_shard(sender.get(), 2);
    let near = w.wallet(None, |s| s == home)?;
    let far = w.wallet(None, |s| s != home)?;
    w.cash_in(sender, 15_000)?;
    w.cash_in(near, 20_000)?;
    w.cash_in(far, 20_000)?;
    let mut answers = Vec::new();
    for to in [near, far] {
        let before = w.outflow(sender)?;
        answers.push(refusal(w.p2p(sender, to, 10_001, with_pin(&pin))));
        // Nothing moved, and the sender's counters are as they were.
        assert_eq!(w.outflow(sender)?, before);
        w.check_balances(&[(wallet_account(sender), 15_000), (wallet_account(to), 20_000)])?;
    }
    w.assert_balanced()?;
    // The receivers have 10_000 of room each; the sender, 15_000.
    // Regression: `remaining` was computed from the sender's wallet (15_000 of room).
    let receivers_room = Refusal::Limit(TransferResult::LimitMaxBalance, 10_000);
    assert_eq!(answers, [receivers_room.clone(), receivers_room], "remaining is the receiver's room");
    Ok(())
}

fn racing_policy(config: &mut DomainConfig) -> anyhow::Result<()> {
    let tier = config.policy.tiers.first_mut().context("tier 0")?;
    tier.limits = vec![(
        Currency::Azn as u8,
        Limits {
            max_balance: 1_000_000,
            max_per_operation: 100_000,
            daily_amount: 30_000,
            daily_count: 100,
            monthly_amount: 1_000_000,
            monthly_count: 1_000,
        },
    )];
    Ok(())
}

#[test]
fn thirty_racing_p2ps_stop_exactly_at_the_daily_limit() -> anyhow::Result<()> {
    const SHARDS: u16 = 4;
    const THREADS: usize = 30;
    const AMOUNT: u64 = 2_000;
    let w = World::open(SHARDS, racing_policy)?;
    let daily = w.azn(w.wallet(None, any)?)?.limits.daily_amount;
    assert_eq!(daily, 30_000);
    w.agent(1_000_000)?;
    let sender = w.wallet(Some(&Pin::parse("9753")?), any)?;
    // Twice the day's limit: the balance cannot be what binds.
    w.cash_in(sender, 2 * daily)?;
    let receivers: Vec<Msisdn> =
        (0..SHARDS).map(|shard| w.wallet(None, |s| s == ShardId(shard))).collect::<Result<_, _>>()?;
    let ops: Vec<(u128, Msisdn)> = (0..THREADS).map(|i| (w.op(), receivers[i % receivers.len()])).collect();

    let answers = race(THREADS, |i| {
        let (domain, (op, to)) = (w.domain.clone(), ops[i]);
        Box::new(move || -> anyhow::Result<Result<Receipt, OpError>> {
            let pin = Pin::parse("9753")?;
            Ok(block_on(domain.p2p(op, sender, to, AMOUNT, with_pin(&pin))))
        })
    })?
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;

    let expected_passed = usize::try_from(daily / AMOUNT)?;
    assert_eq!(expected_passed, 15);
    let passed: Vec<usize> = (0..THREADS).filter(|i| answers[*i].is_ok()).collect();
    assert_eq!(passed.len(), expected_passed, "{answers:?}");
    let refusals: Vec<Refusal> = answers.into_iter().filter(Result::is_err).map(refusal).collect();
    assert_eq!(
        refusals,
        vec![Refusal::Limit(TransferResult::LimitDailyAmount, 0); THREADS - expected_passed]
    );

    let account = w.account(wallet_account(sender))?;
    assert_eq!((account.debits_posted, account.debits_pending), (15 * AMOUNT, 0));
    let outflow = w.outflow(sender)?;
    assert_eq!((outflow.day_amount, outflow.day_count), (daily, 15));
    let mut expected = vec![(wallet_account(sender), i128::from(daily))];
    for receiver in &receivers {
        let got = passed.iter().filter(|i| ops[**i].1 == *receiver).count();
        expected.push((wallet_account(*receiver), i128::try_from(got)? * i128::from(AMOUNT)));
    }
    w.check_balances(&expected)?;
    w.assert_balanced()
}

#[test]
fn wrong_pins_block_the_wallet_until_staff_unblock_it() -> anyhow::Result<()> {
    use WalletRefusal::{Blocked, PinInvalid};
    let w = World::open(2, default_config)?;
    w.agent(1_000_000)?;
    let (right, wrong, new) = (Pin::parse("4321")?, Pin::parse("1234")?, Pin::parse("86420")?);
    let a = w.wallet(Some(&right), any)?;
    let b = w.wallet(Some(&right), any)?;
    w.cash_in(a, 10_000)?;
    let verify = |pin: &Pin| refusal(block_on(w.domain.verify_pin(a, pin)));
    let counted = || -> anyhow::Result<(u8, u8)> {
        let state = w.state(a)?;
        Ok((state.pin_failures, state.flags))
    };

    // Three wrong PINs in a row (the default `pin_attempts_max`) block the wallet.
    assert_eq!(Policy::default().pin_attempts_max, 3);
    assert_eq!(verify(&wrong), Refusal::Wallet(PinInvalid { remaining: 2 }));
    assert_eq!(verify(&wrong), Refusal::Wallet(PinInvalid { remaining: 1 }));
    assert_eq!(verify(&wrong), Refusal::Wallet(PinInvalid { remaining: 0 }));
    assert_eq!(counted()?, (3, WalletState::PIN_BLOCKED));
    // Blocked, the right PIN does not help, and a wrong one is no longer counted.
    assert_eq!(verify(&right), Refusal::Wallet(Blocked));
    assert_eq!(verify(&wrong), Refusal::Wallet(Blocked));
    assert_eq!(
        refusal(w.p2p(a, b, 100, with_pin(&right))),
        Refusal::Refused(TransferResult::AuthWalletBlocked)
    );
    assert_eq!(counted()?, (3, WalletState::PIN_BLOCKED));
    w.check_balances(&[(wallet_account(a), 10_000), (wallet_account(b), 0)])?;

    block_on(w.domain.unblock(a, STAFF))?;
    assert_eq!(counted()?, (0, 0));
    assert_eq!(verify(&right), Refusal::None);
    assert_eq!(w.p2p(a, b, 100, with_pin(&right))?.amount, 100);

    // A right PIN resets the count.
    assert_eq!(verify(&wrong), Refusal::Wallet(PinInvalid { remaining: 2 }));
    assert_eq!(verify(&wrong), Refusal::Wallet(PinInvalid { remaining: 1 }));
    assert_eq!(verify(&right), Refusal::None);
    assert_eq!(counted()?, (0, 0));
    assert_eq!(verify(&wrong), Refusal::Wallet(PinInvalid { remaining: 2 }));
    // A P2P with a wrong PIN counts as one more and moves nothing.
    assert_eq!(refusal(w.p2p(a, b, 100, with_pin(&wrong))), Refusal::Refused(TransferResult::PinInvalid));
    assert_eq!(counted()?, (2, 0));
    assert_eq!(verify(&right), Refusal::None);
    assert_eq!(counted()?, (0, 0));

    // Changing the PIN checks the old one, and counts a wrong one.
    let change = |old: &Pin| refusal(block_on(w.domain.change_pin(a, Some(old), &new)));
    assert_eq!(change(&wrong), Refusal::Wallet(PinInvalid { remaining: 2 }));
    assert_eq!(counted()?, (1, 0));
    assert_eq!(change(&right), Refusal::None);
    assert_eq!(counted()?, (0, 0));
    assert_eq!(verify(&right), Refusal::Wallet(PinInvalid { remaining: 2 }));
    assert_eq!(verify(&new), Refusal::None);
    assert_eq!(refusal(w.p2p(a, b, 100, with_pin(&right))), Refusal::Refused(TransferResult::PinInvalid));
    assert_eq!(w.p2p(a, b, 100, with_pin(&new))?.amount, 100);

    w.check_balances(&[(wallet_account(a), 9_800), (wallet_account(b), 200)])?;
    w.assert_balanced()
}

#[test]
fn ten_racing_wrong_pins_count_exactly_up_to_the_block_and_move_nothing() -> anyhow::Result<()> {
    const SHARDS: u16 = 4;
    const THREADS: usize = 10;
    let w = World::open(SHARDS, default_config)?;
    w.agent(1_000_000)?;
    let payer = w.wallet(Some(&Pin::parse("4321")?), any)?;
    let home = wallet_shard(payer.get(), SHARDS);
    let payee = w.wallet(None, |s| s != home)?;
    w.cash_in(payer, 10_000)?;
    let ops: Vec<u128> = (0..THREADS).map(|_| w.op()).collect();

    // Half the threads check the wrong PIN, half send money with it.
    let answers = race(THREADS, |i| {
        let (domain, op) = (w.domain.clone(), ops[i]);
        Box::new(move || -> anyhow::Result<Refusal> {
            let wrong = Pin::parse("1234")?;
            Ok(if i % 2 == 0 {
                refusal(block_on(domain.verify_pin(payer, &wrong)))
            } else {
                refusal(block_on(domain.p2p(op, payer, payee, 100, with_pin(&wrong))))
            })
        })
    })?
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;

    let mut remaining = Vec::new();
    let (mut invalid, mut blocked) = (0, 0);
    for answer in &answers {
        match answer {
            Refusal::Wallet(WalletRefusal::PinInvalid { remaining: left }) => {
                remaining.push(*left);
                invalid += 1;
            }
            Refusal::Refused(TransferResult::PinInvalid) => invalid += 1,
            Refusal::Wallet(WalletRefusal::Blocked) | Refusal::Refused(TransferResult::AuthWalletBlocked) => {
                blocked += 1
            }
            other => anyhow::bail!("unexpected answer {other:?} in {answers:?}"),
        }
    }
    assert_eq!((invalid, blocked), (3, 7), "{answers:?}");
    // The checks that saw a count saw distinct ones: the shard counted them one at a time.
    let seen = remaining.len();
    remaining.sort_unstable();
    remaining.dedup();
    assert!(remaining.len() == seen && remaining.iter().all(|r| *r <= 2), "{answers:?}");
    let state = w.state(payer)?;
    assert_eq!((state.pin_failures, state.flags), (3, WalletState::PIN_BLOCKED));
    w.check_balances(&[(wallet_account(payer), 10_000), (wallet_account(payee), 0)])?;
    assert_eq!(w.account(wallet_account(payer))?.debits_posted, 0);
    w.assert_balanced()
}

#[test]
fn wallet_state_survives_restarts_with_and_without_a_checkpoint() -> anyhow::Result<()> {
    use WalletRefusal::{Blocked, PinInvalid};
    let mut w = World::open(2, |config| {
        config.tariffs.set(codes::P2P, P2P_FEE)?;
        Ok(())
    })?;
    w.agent(1_000_000)?;
    let (right, wrong) = (Pin::parse("5678")?, Pin::parse("8765")?);
    let sender = w.wallet(Some(&right), any)?;
    let home = wallet_shard(sender.get(), 2);
    let receiver = w.wallet(Some(&right), |s| s != home)?;
    let tries = w.wallet(Some(&right), any)?;
    let locked = w.wallet(Some(&right), any)?;
    let frozen = w.wallet(Some(&right), any)?;
    let known = w.wallet(Some(&right), any)?;
    let wallets = [sender, receiver, tries, locked, frozen, known];
    let accounts: Vec<AccountId> = wallets
        .iter()
        .map(|m| wallet_account(*m))
        .chain([agent_float(AGENT), system::FEE_INCOME, system::EMONEY_ISSUANCE])
        .collect();
    let snapshot = |w: &World| -> anyhow::Result<(Vec<WalletView>, Vec<Account>)> {
        let found: Vec<Account> = accounts.iter().map(|id| w.account(*id)).collect::<Result<_, _>>()?;
        Ok((w.views(&wallets)?, found))
    };

    w.cash_in(sender, 20_000)?;
    w.p2p(sender, receiver, 3_000, with_pin(&right))?;
    w.p2p(sender, receiver, 1_000, with_pin(&right))?;
    for _ in 0..2 {
        block_on(w.domain.verify_pin(tries, &wrong)).expect_err("a wrong PIN");
    }
    for _ in 0..3 {
        block_on(w.domain.verify_pin(locked, &wrong)).expect_err("a wrong PIN");
    }
    block_on(w.domain.block(frozen, STAFF))?;
    block_on(w.domain.identify(known, 1, profile(), STAFF))?;
    block_on(w.domain.set_language(known, 2))?;
    let otp = block_on(w.domain.request_otp(sender))?;

    let o = w.outflow(sender)?;
    // Fees 25 and 20 count toward the amounts, not the operations.
    assert_eq!((o.day_amount, o.day_count, o.month_amount, o.month_count), (4_045, 2, 4_045, 2));
    assert_eq!(w.state(tries)?.pin_failures, 2);
    assert_eq!((w.state(locked)?.pin_failures, w.state(locked)?.flags), (3, WalletState::PIN_BLOCKED));
    assert_eq!(w.state(frozen)?.flags, WalletState::STAFF_BLOCKED);
    assert_eq!((w.state(known)?.tier, w.state(known)?.language), (1, 2));
    assert!(w.state(sender)?.otp.is_some());

    // 1. From the journal alone.
    let before = snapshot(&w)?;
    w.restart()?;
    assert!(!w.engine.recovery_report().checkpoint_loaded);
    assert_eq!(snapshot(&w)?, before);
    w.assert_balanced()?;
    // And they behave as before: one more wrong PIN blocks `tries`, `locked` stays blocked,
    // `frozen` takes nothing, the OTP is still good, and the day's counters still bind.
    assert_eq!(
        refusal(block_on(w.domain.verify_pin(tries, &wrong))),
        Refusal::Wallet(PinInvalid { remaining: 0 })
    );
    assert_eq!(refusal(block_on(w.domain.verify_pin(tries, &right))), Refusal::Wallet(Blocked));
    assert_eq!(refusal(block_on(w.domain.verify_pin(locked, &right))), Refusal::Wallet(Blocked));
    assert_eq!(
        refusal(w.p2p(sender, frozen, 100, with_pin(&right))),
        Refusal::Refused(TransferResult::CreditWalletBlocked)
    );
    let code = w.domain.otp_for_delivery(sender, otp.nonce);
    assert_eq!(refusal(block_on(w.domain.verify_otp(sender, &code))), Refusal::None);
    w.cash_in(sender, 10_000)?;
    assert_eq!(w.p2p(sender, receiver, 20_000, with_pin(&right))?.fee, 110);
    w.cash_in(sender, 10_000)?;
    // 4_045 + 20_110 counted: 5_845 remain of the day's 30_000.
    assert_eq!(
        refusal(w.p2p(sender, receiver, 5_846, with_pin(&right))),
        Refusal::Limit(TransferResult::LimitDailyAmount, 5_845)
    );

    // 2. From a checkpoint and the journal after it.
    block_on(w.domain.unblock(frozen, STAFF))?;
    w.engine.checkpoint()?;
    assert_eq!(w.p2p(sender, receiver, 5_000, with_pin(&right))?.fee, 35);
    block_on(w.domain.unblock(locked, STAFF))?;
    block_on(w.domain.verify_pin(locked, &wrong)).expect_err("a wrong PIN");
    block_on(w.domain.verify_pin(known, &wrong)).expect_err("a wrong PIN");
    block_on(w.domain.block(receiver, STAFF))?;
    let before = snapshot(&w)?;
    w.restart()?;
    assert!(w.engine.recovery_report().checkpoint_loaded);
    assert_eq!(snapshot(&w)?, before);
    w.assert_balanced()?;

    // 3. From a checkpoint with nothing after it.
    w.engine.checkpoint()?;
    w.restart()?;
    assert_eq!(snapshot(&w)?, before);
    let o = w.outflow(sender)?;
    assert_eq!((o.day_amount, o.day_count), (4_045 + 20_110 + 5_035, 4));
    assert_eq!((w.state(locked)?.pin_failures, w.state(locked)?.flags), (1, 0));
    assert_eq!((w.state(known)?.pin_failures, w.state(known)?.tier), (1, 1));
    assert_eq!(w.state(receiver)?.flags, WalletState::STAFF_BLOCKED);
    assert_eq!(w.state(frozen)?.flags, 0);
    assert_eq!(
        refusal(w.p2p(sender, receiver, 100, with_pin(&right))),
        Refusal::Refused(TransferResult::CreditWalletBlocked)
    );
    w.check_balances(&[
        (wallet_account(sender), 20_000 - 4_045 + 10_000 - 20_110 + 10_000 - 5_035),
        (wallet_account(receiver), 4_000 + 20_000 + 5_000),
        (system::FEE_INCOME, 45 + 110 + 35),
    ])?;
    w.assert_balanced()
}

#[test]
fn otps_are_used_once_die_after_five_wrong_codes_expire_and_are_rate_limited() -> anyhow::Result<()> {
    use WalletRefusal::{OtpExpired, OtpInvalid, OtpNotIssued, OtpRateLimited};
    let w = World::open(2, default_config)?;
    let m = w.wallet(None, any)?;
    let verify = |code: &OneTimeCode| refusal(block_on(w.domain.verify_otp(m, code)));
    assert_eq!(verify(&OneTimeCode::parse("123456", 6)?), Refusal::Wallet(OtpNotIssued));

    // 1st send, at 0 s: good once.
    let issued = block_on(w.domain.request_otp(m))?;
    assert_eq!(issued.expires_in_s, 300);
    let code = w.domain.otp_for_delivery(m, issued.nonce);
    assert_eq!(verify(&code), Refusal::None);
    assert_eq!(verify(&code), Refusal::Wallet(OtpNotIssued));

    // 2nd send, at 10 s: two checks of the fresh code at once, one wins.
    w.clock.advance_s(10);
    let nonce = block_on(w.domain.request_otp(m))?.nonce;
    let answers = race(2, |_| {
        let domain = w.domain.clone();
        Box::new(move || refusal(block_on(domain.verify_otp(m, &domain.otp_for_delivery(m, nonce)))))
    })?;
    let mut sorted = answers.clone();
    sorted.sort_by_key(|answer| *answer != Refusal::None);
    assert_eq!(sorted, [Refusal::None, Refusal::Wallet(OtpNotIssued)], "{answers:?}");

    // 3rd send, at 20 s: five wrong codes kill it; the right one comes too late.
    w.clock.advance_s(10);
    let code = w.domain.otp_for_delivery(m, block_on(w.domain.request_otp(m))?.nonce);
    let wrong = wrong_code(&code)?;
    for remaining in (0..5).rev() {
        assert_eq!(verify(&wrong), Refusal::Wallet(OtpInvalid { remaining }));
    }
    assert_eq!(verify(&code), Refusal::Wallet(OtpNotIssued));

    // A 4th send within 600 s of the 1st is refused until the 1st leaves the window.
    w.clock.advance_s(100);
    assert_eq!(
        refusal(block_on(w.domain.request_otp(m))),
        Refusal::Wallet(OtpRateLimited { retry_after_s: 480 })
    );
    w.clock.advance_s(479);
    assert_eq!(
        refusal(block_on(w.domain.request_otp(m))),
        Refusal::Wallet(OtpRateLimited { retry_after_s: 1 })
    );
    w.clock.advance_s(1);
    let issued = block_on(w.domain.request_otp(m))?;
    let code = w.domain.otp_for_delivery(m, issued.nonce);

    // Alive until its 300 s are up, expired from then on.
    w.clock.advance_s(299);
    assert_eq!(verify(&wrong_code(&code)?), Refusal::Wallet(OtpInvalid { remaining: 4 }));
    w.clock.advance_s(1);
    assert_eq!(verify(&code), Refusal::Wallet(OtpExpired));

    // A new code replaces the old.
    let newer = w.domain.otp_for_delivery(m, block_on(w.domain.request_otp(m))?.nonce);
    if newer.expose() != code.expose() {
        assert_eq!(verify(&code), Refusal::Wallet(OtpInvalid { remaining: 4 }));
    }
    assert_eq!(verify(&newer), Refusal::None);
    Ok(())
}

fn step_up_above_5_000(config: &mut DomainConfig) -> anyhow::Result<()> {
    config.step_up_above = 5_000;
    config.tariffs.set(codes::P2P, P2P_FEE)?;
    Ok(())
}

#[test]
fn amounts_above_the_step_up_threshold_need_an_otp_as_well_as_the_pin() -> anyhow::Result<()> {
    let w = World::open(2, step_up_above_5_000)?;
    w.agent(1_000_000)?;
    let pin = Pin::parse("3141")?;
    let a = w.wallet(Some(&pin), any)?;
    let home = wallet_shard(a.get(), 2);
    let b = w.wallet(None, |s| s != home)?;
    w.cash_in(a, 20_000)?;
    let unchanged = |sent: i128, fees: i128| {
        w.check_balances(&[
            (wallet_account(a), 20_000 - sent - fees),
            (wallet_account(b), sent),
            (system::FEE_INCOME, fees),
        ])
    };

    assert_eq!(refusal(w.p2p(a, b, 5_001, with_pin(&pin))), Refusal::Refused(TransferResult::StepUpRequired));
    unchanged(0, 0)?;
    let issued = block_on(w.domain.request_otp(a))?;
    let otp = w.domain.otp_for_delivery(a, issued.nonce);
    assert_eq!(
        refusal(w.p2p(a, b, 5_001, with_pin_and_otp(&pin, &wrong_code(&otp)?))),
        Refusal::Refused(TransferResult::OtpInvalid)
    );
    unchanged(0, 0)?;
    // 5_001 × 0.5 % = 25.005 → 25, plus 10.
    let receipt = w.p2p(a, b, 5_001, with_pin_and_otp(&pin, &otp))?;
    assert_eq!((receipt.amount, receipt.fee), (5_001, 35));
    unchanged(5_001, 35)?;
    // The OTP is used up.
    assert_eq!(
        refusal(w.p2p(a, b, 5_001, with_pin_and_otp(&pin, &otp))),
        Refusal::Refused(TransferResult::OtpInvalid)
    );
    // At the threshold the PIN is enough, though the fee takes the debit above it.
    let receipt = w.p2p(a, b, 5_000, with_pin(&pin))?;
    assert_eq!((receipt.amount, receipt.fee), (5_000, 35));
    unchanged(10_001, 70)?;
    w.assert_balanced()
}

fn cash_tariffs(config: &mut DomainConfig) -> anyhow::Result<()> {
    config.tariffs.set(codes::CASH_OUT, Tariff { fixed: 0, percent_bps: 100, min: 50, max: 1_000 })?;
    config.commissions.set(codes::CASH_OUT, Tariff { fixed: 0, percent_bps: 40, min: 10, max: 0 })?;
    config.commissions.set(codes::CASH_IN, Tariff { fixed: 5, percent_bps: 20, min: 0, max: 0 })?;
    Ok(())
}

#[test]
fn cash_in_and_cash_out_pay_the_agent_its_commission_from_the_fee() -> anyhow::Result<()> {
    const SHARDS: u16 = 2;
    let w = World::open(SHARDS, cash_tariffs)?;
    w.agent(1_000_000)?;
    let pin = Pin::parse("2718")?;
    let wrong = Pin::parse("8172")?;
    let float_shard = home_shard(agent_float(AGENT), SHARDS);
    let near = w.wallet(Some(&pin), |s| s == float_shard)?;
    let far = w.wallet(Some(&pin), |s| s != float_shard)?;
    let check = |wallets: i128, float: i128, commission: i128, fees: i128| {
        w.check_balances(&[
            (wallet_account(near), wallets),
            (wallet_account(far), wallets),
            (agent_float(AGENT), float),
            (agent_commission(AGENT), commission),
            (system::FEE_INCOME, fees),
        ])
    };

    // Cash-in of 10_000: no customer fee; the commission is 5 + 10_000 × 0.2 % = 25, paid from
    // fee income.
    for to in [near, far] {
        let op = w.op();
        let receipt = block_on(w.domain.cash_in(op, AGENT, to, 10_000))?;
        assert_eq!(receipt, Receipt { id: TransferId(op), amount: 10_000, fee: 0, commission: 25 });
    }
    check(10_000, 1_000_000 - 20_000, 50, -50)?;

    // Cash-out of 5_050: the fee is 1 % = 50.5 → 51 (half up, above the 50 minimum); the
    // commission 0.4 % = 20.2 → 20. A wrong PIN moves nothing.
    for from in [near, far] {
        let refused = block_on(w.domain.cash_out(w.op(), AGENT, from, 5_050, with_pin(&wrong)));
        assert_eq!(refusal(refused), Refusal::Refused(TransferResult::PinInvalid));
    }
    check(10_000, 1_000_000 - 20_000, 50, -50)?;
    for from in [near, far] {
        let op = w.op();
        let receipt = block_on(w.domain.cash_out(op, AGENT, from, 5_050, with_pin(&pin)))?;
        assert_eq!(receipt, Receipt { id: TransferId(op), amount: 5_050, fee: 51, commission: 20 });
    }
    check(10_000 - 5_101, 1_000_000 - 20_000 + 2 * 5_050, 50 + 40, -50 + 2 * (51 - 20))?;
    let o = w.outflow(far)?;
    assert_eq!((o.day_amount, o.day_count), (5_101, 1));
    w.assert_balanced()
}

#[test]
fn pins_never_reach_the_journal_or_debug_output() -> anyhow::Result<()> {
    const PIN: &str = "739164";
    let mut w = World::open(2, |config| {
        config.tariffs.set(codes::CASH_OUT, Tariff { fixed: 30, ..Tariff::FREE })?;
        Ok(())
    })?;
    w.agent(1_000_000)?;
    let pin = Pin::parse(PIN)?;
    let other = Pin::parse("739165")?;
    let a = w.wallet(Some(&pin), any)?;
    let b = w.wallet(Some(&pin), any)?;
    w.cash_in(a, 10_000)?;
    block_on(w.domain.verify_pin(a, &pin))?;
    let wrong = block_on(w.domain.verify_pin(a, &other)).expect_err("a wrong PIN");
    w.p2p(a, b, 1_000, with_pin(&pin))?;
    let refused = w.p2p(a, b, 1_000, with_pin(&other)).expect_err("a wrong PIN");
    block_on(w.domain.cash_out(w.op(), AGENT, a, 2_000, with_pin(&pin)))?;
    block_on(w.domain.change_pin(b, Some(&pin), &other))?;
    block_on(w.domain.reset_pin(b, &pin, STAFF))?;
    block_on(w.domain.identify(a, 1, profile(), STAFF))?;
    let otp = w.domain.otp_for_delivery(a, block_on(w.domain.request_otp(a))?.nonce);
    block_on(w.domain.verify_otp(a, &otp))?;
    let malformed = OpError::from(Pin::parse("7391640").expect_err("seven digits"));

    // Debug output masks it, alone and inside what carries it.
    assert_eq!(debug(&pin), "Pin(****)");
    let auth = with_pin(&pin);
    let printed = [
        debug(&pin),
        debug(&auth),
        debug(w.domain.config()),
        debug(&w.domain),
        debug(&wrong),
        wrong.to_string(),
        debug(&refused),
        refused.to_string(),
        debug(&malformed),
        malformed.to_string(),
    ];
    for text in &printed {
        assert!(!text.contains(PIN) && !text.contains("739165") && !text.contains(otp.expose()), "{text}");
    }
    assert!(debug(w.domain.config()).contains("ServerSecret(..)"));

    // Nor any file of the data directory: the journal, or a checkpoint.
    w.engine.checkpoint()?;
    w.engine.shutdown();
    let mut files = Vec::new();
    let mut dirs = vec![w.dir.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() { dirs.push(path) } else { files.push(path) }
        }
    }
    let journal = w.dir.path().join("journal");
    let mut journal_bytes = 0;
    let mut profile_seen = false;
    for file in &files {
        let bytes = std::fs::read(file)?;
        if file.starts_with(&journal) {
            journal_bytes += bytes.len();
        }
        // (The code is random: it could be part of the document number by chance.)
        let code = Some(otp.expose()).filter(|code| !"AZE5550001".contains(code));
        for secret in [Some(PIN), Some("739165"), code].into_iter().flatten() {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret} in {}", file.display());
        }
        // The scan can see text: the identification documents are journaled as they are.
        profile_seen |= bytes.windows(10).any(|w| w == b"AZE5550001");
    }
    assert!(journal_bytes > 0 && profile_seen, "{files:?}");
    w.restart()?;
    w.assert_balanced()
}
