//! Cash-by-code and reversals end to end: [`Domain`] over a real engine with a manual clock.
//! A code's hold, its redemption by an ATM network, guessing, expiry, cancellation, restarts;
//! reversals of P2P and cash-in with their fees and commissions, the window, and "never twice".

use std::time::Duration;

use engine::domain::{AgentKind, CashCode, agent_commission, agent_float, reversal_id, system};
use engine::msisdn::Msisdn;
use engine::secret::{OneTimeCode, Pin};
use engine::tariff::Tariff;
use engine::wallet::{WalletRefusal, codes};
use engine::{DomainConfig, OpError, TransferResult};
use qepik_tests::block_on;

use crate::wallet::{
    AGENT, P2P_FEE, Refusal, STAFF, World, any, default_config, race, refusal, wallet_account, with_pin,
};

/// The ATM network and the post office of these tests.
const ATM: u64 = 900;
const POST: u64 = 901;
/// A cash code's fee: 0.50 flat. The redeemer's commission: 0.20 flat.
const CODE_FEE: Tariff = Tariff { fixed: 50, percent_bps: 0, min: 0, max: 0 };
const CODE_COMMISSION: Tariff = Tariff { fixed: 20, percent_bps: 0, min: 0, max: 0 };

fn cash_config(config: &mut DomainConfig) -> anyhow::Result<()> {
    config.tariffs.set(codes::CASH_CODE, CODE_FEE)?;
    config.commissions.set(codes::CASH_CODE, CODE_COMMISSION)?;
    Ok(())
}

/// A world with an ATM network, a post office, an agent with float, and one funded wallet.
fn cash_world(shards: u16) -> anyhow::Result<(World, Msisdn, Pin)> {
    let world = World::open(shards, cash_config)?;
    block_on(world.domain.create_agent(ATM, AgentKind::AtmNetwork))?;
    block_on(world.domain.create_agent(POST, AgentKind::PostOffice))?;
    world.agent(1_000_000)?;
    let pin = Pin::parse("4321")?;
    let customer = world.wallet(Some(&pin), any)?;
    world.cash_in(customer, 20_000)?;
    Ok((world, customer, pin))
}

fn issue(world: &World, msisdn: Msisdn, pin: &Pin, amount: u64) -> Result<CashCode, OpError> {
    block_on(world.domain.issue_cash_code(world.op(), msisdn, amount, with_pin(pin)))
}

fn redeem(world: &World, reference: u128, msisdn: Msisdn, code: &OneTimeCode, amount: u64) -> Refusal {
    refusal(block_on(world.domain.redeem_cash_code(reference, ATM, 3, msisdn, code, amount)))
}

/// An eight-digit code other than `code`, different for each `n`.
fn other_code(code: &OneTimeCode, n: u32) -> anyhow::Result<OneTimeCode> {
    let value: u32 = code.expose().parse()?;
    Ok(OneTimeCode::parse(&format!("{:08}", (value + 1 + n) % 100_000_000), 8)?)
}

fn invalid(remaining: u8) -> Refusal {
    Refusal::Wallet(WalletRefusal::CodeInvalid { remaining })
}

#[test]
fn a_code_holds_and_its_redemption_posts_once() -> anyhow::Result<()> {
    let (world, customer, pin) = cash_world(4)?;
    let wallet = wallet_account(customer);
    let code = issue(&world, customer, &pin, 5_000)?;
    assert_eq!((code.amount, code.fee, code.expires_in_s), (5_000, 50, 1800));
    assert_eq!(code.code.expose().len(), 8);
    let held = world.account(wallet)?;
    assert_eq!((held.balance_posted(), held.debits_pending), (20_000, 5_050));
    // The hold counts toward the day's outflow as an operation.
    let outflow = world.outflow(customer)?;
    assert_eq!((outflow.day_amount, outflow.day_count), (5_050, 1));

    let reference = world.op();
    assert_eq!(redeem(&world, reference, customer, &code.code, 5_000), Refusal::None);
    // A retry of the same redemption answers the same, and posts nothing more.
    assert_eq!(redeem(&world, reference, customer, &code.code, 5_000), Refusal::None);
    // The used code under a new reference is a wrong guess.
    assert_eq!(redeem(&world, world.op(), customer, &code.code, 5_000), invalid(2));
    world.check_balances(&[
        (wallet, 20_000 - 5_050),
        (system::ATM_CLEARING, 5_000),
        (agent_commission(ATM), 20),
    ])?;
    let status = block_on(world.domain.operation_status(reference))?.expect("the redemption is known");
    assert_eq!(status.state, engine::TransferState::Posted);
    world.assert_balanced()
}

#[test]
fn only_atm_networks_and_post_offices_redeem() -> anyhow::Result<()> {
    let (world, customer, pin) = cash_world(2)?;
    let code = issue(&world, customer, &pin, 1_000)?;
    let by_agent = block_on(world.domain.redeem_cash_code(world.op(), AGENT, 1, customer, &code.code, 1_000));
    assert_eq!(refusal(by_agent), Refusal::Other("not_a_redeemer"));
    let by_post = block_on(world.domain.redeem_cash_code(world.op(), POST, 1, customer, &code.code, 1_000));
    assert_eq!(refusal(by_post), Refusal::None);
    world.check_balances(&[(agent_commission(POST), 20), (agent_commission(ATM), 0)])?;
    world.assert_balanced()
}

#[test]
fn guessing_cancels_every_live_code() -> anyhow::Result<()> {
    let (world, customer, pin) = cash_world(4)?;
    let wallet = wallet_account(customer);
    let first = issue(&world, customer, &pin, 2_000)?;
    let second = issue(&world, customer, &pin, 3_000)?;
    assert_eq!(world.account(wallet)?.debits_pending, 5_100);
    // The right code with the wrong amount is a wrong guess too.
    assert_eq!(redeem(&world, world.op(), customer, &first.code, 2_001), invalid(2));
    assert_eq!(redeem(&world, world.op(), customer, &other_code(&first.code, 0)?, 2_000), invalid(1));
    // The third wrong guess (the default limit) cancels both codes.
    assert_eq!(redeem(&world, world.op(), customer, &other_code(&first.code, 9)?, 2_000), invalid(0));
    // Both holds are void: the money is back and the codes are dead.
    world.check_balances(&[(wallet, 20_000), (system::ATM_CLEARING, 0), (system::FEE_INCOME, 0)])?;
    assert_eq!(world.outflow(customer)?.day_amount, 0);
    assert_eq!(redeem(&world, world.op(), customer, &second.code, 3_000), invalid(2));
    // A new code works, and the count started again.
    let third = issue(&world, customer, &pin, 1_000)?;
    assert_eq!(redeem(&world, world.op(), customer, &third.code, 1_000), Refusal::None);
    world.assert_balanced()
}

#[test]
fn racing_redemptions_of_one_code_pay_once() -> anyhow::Result<()> {
    let (world, customer, pin) = cash_world(4)?;
    let code = issue(&world, customer, &pin, 4_000)?;
    let digits = code.code.expose().to_owned();
    let domain = world.domain.clone();
    let base = world.op() << 8;
    let answers = race(10, |i| {
        let (domain, digits) = (domain.clone(), digits.clone());
        Box::new(move || {
            let code = OneTimeCode::parse(&digits, 8).map_err(|e| e.to_string())?;
            let reference = base + i as u128;
            block_on(domain.redeem_cash_code(reference, ATM, 1, customer, &code, 4_000))
                .map(|_| ())
                .map_err(|e| e.code().to_owned())
        })
    })?;
    let won = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(won, 1, "{answers:?}");
    assert!(
        answers.iter().all(|a| a.is_ok() || a.as_ref().err().map(String::as_str) == Some("code_invalid"))
    );
    world.check_balances(&[(wallet_account(customer), 20_000 - 4_050), (system::ATM_CLEARING, 4_000)])?;
    world.assert_balanced()
}

#[test]
fn codes_expire_and_can_be_cancelled() -> anyhow::Result<()> {
    let (world, customer, pin) = cash_world(2)?;
    let wallet = wallet_account(customer);
    let cancelled = issue(&world, customer, &pin, 1_000)?;
    // Cancelling needs the code: a wrong one counts.
    let wrong =
        block_on(world.domain.cancel_cash_code(world.op(), customer, &other_code(&cancelled.code, 0)?));
    assert_eq!(refusal(wrong), invalid(2));
    block_on(world.domain.cancel_cash_code(world.op(), customer, &cancelled.code))?;
    assert_eq!(redeem(&world, world.op(), customer, &cancelled.code, 1_000), invalid(1));

    let expiring = issue(&world, customer, &pin, 2_000)?;
    world.clock.advance_s(1_799);
    let _ = world.view(customer)?;
    assert_eq!(world.account(wallet)?.debits_pending, 2_050, "still held a second before expiry");
    world.clock.advance_s(1);
    // Any request lets the shard notice the time; the hold then voids itself.
    let _ = world.view(customer)?;
    assert_eq!(
        redeem(&world, world.op(), customer, &expiring.code, 2_000),
        Refusal::Wallet(WalletRefusal::CodeExpired)
    );
    world.check_balances(&[(wallet, 20_000), (system::ATM_CLEARING, 0), (system::FEE_INCOME, 0)])?;
    assert_eq!(world.outflow(customer)?.day_amount, 0);
    world.assert_balanced()
}

#[test]
fn codes_and_guesses_survive_a_restart() -> anyhow::Result<()> {
    let (mut world, customer, pin) = cash_world(4)?;
    let code = issue(&world, customer, &pin, 3_000)?;
    assert_eq!(redeem(&world, world.op(), customer, &other_code(&code.code, 0)?, 3_000), invalid(2));
    world.restart()?;
    assert_eq!(world.state(customer)?.code_failures, 1);
    assert_eq!(world.account(wallet_account(customer))?.debits_pending, 3_050);
    assert_eq!(redeem(&world, world.op(), customer, &other_code(&code.code, 1)?, 3_000), invalid(1));
    world.restart()?;
    assert_eq!(redeem(&world, world.op(), customer, &code.code, 3_000), Refusal::None);
    world.check_balances(&[(wallet_account(customer), 20_000 - 3_050), (system::ATM_CLEARING, 3_000)])?;
    world.assert_balanced()
}

#[test]
fn a_code_needs_the_pin_and_room_under_the_limits() -> anyhow::Result<()> {
    let (world, customer, _) = cash_world(2)?;
    let wrong = Pin::parse("0000")?;
    let refused = issue(&world, customer, &wrong, 1_000);
    assert_eq!(refusal(refused), Refusal::Refused(TransferResult::PinInvalid));
    let pin = Pin::parse("4321")?;
    // More than the wallet holds.
    assert_eq!(
        refusal(issue(&world, customer, &pin, 20_000)),
        Refusal::Refused(TransferResult::ExceedsCredits)
    );
    assert_eq!(world.account(wallet_account(customer))?.debits_pending, 0);
    world.assert_balanced()
}

#[test]
fn no_code_reaches_the_data_directory() -> anyhow::Result<()> {
    let (mut world, customer, pin) = cash_world(2)?;
    let codes: Vec<String> = (0..5)
        .map(|_| issue(&world, customer, &pin, 100).map(|c| c.code.expose().to_owned()))
        .collect::<Result<_, _>>()?;
    world.restart()?;
    world.engine.checkpoint()?;
    let mut files = Vec::new();
    let mut stack = vec![world.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() { stack.push(path) } else { files.push(path) }
        }
    }
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file)?;
        for code in &codes {
            let found = bytes.windows(code.len()).any(|w| w == code.as_bytes());
            assert!(!found, "a cash code is in {}", file.display());
        }
    }
    Ok(())
}

/// Waits until the views have indexed everything durable.
fn indexed(world: &World) -> anyhow::Result<()> {
    let views = world.engine.views().ok_or_else(|| anyhow::anyhow!("views off"))?;
    qepik_tests::block_on(world.engine.settle())?;
    anyhow::ensure!(views.wait_for(world.engine.journal().durable(), Duration::from_secs(20)), "views lag");
    Ok(())
}

fn fee_config(config: &mut DomainConfig) -> anyhow::Result<()> {
    config.tariffs.set(codes::P2P, P2P_FEE)?;
    config.tariffs.set(codes::CASH_IN, Tariff { fixed: 100, percent_bps: 0, min: 0, max: 0 })?;
    config.commissions.set(codes::CASH_IN, Tariff { fixed: 30, percent_bps: 0, min: 0, max: 0 })?;
    Ok(())
}

#[test]
fn a_reversal_unwinds_principal_fee_and_commission_once() -> anyhow::Result<()> {
    let world = World::open_with(4, fee_config, true)?;
    world.agent(1_000_000)?;
    let pin = Pin::parse("1111")?;
    // Payer and payee on different shards: the reversal crosses back.
    let payer = world.wallet(Some(&pin), |s| s.0 == 0)?;
    let payee = world.wallet(None, |s| s.0 == 1)?;
    let cash_in_op = world.op();
    block_on(world.domain.cash_in(cash_in_op, AGENT, payer, 10_100))?;
    let op = world.op();
    let receipt = block_on(world.domain.p2p(op, payer, payee, 4_000, with_pin(&pin)))?;
    assert_eq!(receipt.fee, 30);
    indexed(&world)?;
    let (payer_account, payee_account) = (wallet_account(payer), wallet_account(payee));
    world.check_balances(&[(payer_account, 10_000 - 4_030), (payee_account, 4_000)])?;

    let reversal = block_on(world.domain.reverse(op, STAFF))?;
    assert_eq!((reversal.id, reversal.amount, reversal.fee), (reversal_id(op), 4_000, 30));
    world.check_balances(&[(payer_account, 10_000), (payee_account, 0)])?;
    // Never twice: a second reversal answers the first and moves nothing.
    block_on(world.domain.reverse(op, STAFF))?;
    world.check_balances(&[(payer_account, 10_000), (payee_account, 0)])?;

    // A cash-in with fee and commission: the agent takes back the wallet's money and returns
    // the commission; fee income ends where it started.
    let fee_income_before = world.account(system::FEE_INCOME)?.balance_posted();
    block_on(world.domain.reverse(cash_in_op, STAFF))?;
    world.check_balances(&[(payer_account, 0), (agent_commission(AGENT), 0)])?;
    assert_eq!(world.account(system::FEE_INCOME)?.balance_posted(), fee_income_before - 100 + 30);
    assert_eq!(world.account(agent_float(AGENT))?.balance_posted(), 1_000_000);
    // A reversal is not reversed.
    indexed(&world)?;
    assert_eq!(
        refusal(block_on(world.domain.reverse(reversal_id(op).0, STAFF))),
        Refusal::Other("not_reversible")
    );
    world.assert_balanced()
}

#[test]
fn reversals_have_a_window_and_need_the_money_back() -> anyhow::Result<()> {
    let world = World::open_with(2, default_config, true)?;
    world.agent(1_000_000)?;
    let pin = Pin::parse("2222")?;
    let payer = world.wallet(Some(&pin), any)?;
    let payee = world.wallet(None, any)?;
    world.cash_in(payer, 10_000)?;
    let spent = world.op();
    block_on(world.domain.p2p(spent, payer, payee, 6_000, with_pin(&pin)))?;
    let late = world.op();
    block_on(world.domain.p2p(late, payer, payee, 1_000, with_pin(&pin)))?;
    // The payee spends it: the reversal of `spent` cannot take it back.
    let third = world.wallet(None, any)?;
    let payee_pin = Pin::parse("3333")?;
    block_on(world.domain.reset_pin(payee, &payee_pin, STAFF))?;
    block_on(world.domain.p2p(world.op(), payee, third, 6_500, with_pin(&payee_pin)))?;
    indexed(&world)?;
    assert_eq!(
        refusal(block_on(world.domain.reverse(spent, STAFF))),
        Refusal::Refused(TransferResult::ExceedsCredits)
    );
    world.check_balances(&[(wallet_account(payee), 500), (wallet_account(payer), 3_000)])?;
    assert_eq!(
        refusal(block_on(world.domain.reverse(world.op(), STAFF))),
        Refusal::Other("operation_not_found")
    );
    world.clock.advance_s(7 * 24 * 3600 + 1);
    assert!(matches!(
        block_on(world.domain.reverse(late, STAFF)),
        Err(OpError::ReversalWindowPassed { window_s: 604_800 })
    ));
    world.assert_balanced()
}
