//! The wallet domain over the [`Engine`]: registration, PINs, OTPs, agents, and the operations
//! customers and agents perform (P2P, cash-in, cash-out), each built as one linked chain of
//! ledger transfers (principal, fee, commission) and submitted with the customer's
//! authorization to the wallet's shard. Channels (HTTP, USSD) call this, never the ledger.
//!
//! Secrets cross this layer once: a PIN or code is turned into a keyed tag here
//! ([`ServerSecret`]) and only the tag goes further.

use std::sync::Arc;

use crate::account::{Account, AccountFlags, AccountKind, CreateAccountResult};
use crate::engine::{Engine, EngineError};
use crate::ids::{AccountId, TransferId};
use crate::money::Currency;
use crate::msisdn::{Msisdn, MsisdnError, NumberingPlan};
use crate::secret::{OneTimeCode, Pin, SecretError, ServerSecret};
use crate::tariff::{TariffError, TariffTable};
use crate::transfer::{Transfer, TransferFlags, TransferResult};
use crate::wallet::{
    Actor, Authorization, Policy, Profile, Tag, WalletRefusal, WalletReply, WalletRequest, WalletView, codes,
};

/// System accounts, spread over every shard.
pub mod system {
    use crate::ids::AccountId;
    /// Fees collected; commissions are paid from it.
    pub const FEE_INCOME: AccountId = AccountId::spread(1);
    /// The issuer's liability for e-money in circulation: debited when e-money is issued.
    pub const EMONEY_ISSUANCE: AccountId = AccountId::spread(2);
    /// Cash-by-code holds and their redemptions, owed to the ATM networks and post offices
    /// that paid the cash, settled from their registers.
    pub const ATM_CLEARING: AccountId = AccountId::spread(3);
}

/// OTPs live at most this long, whatever the configuration says.
pub const OTP_TTL_MAX_S: u32 = 300;
const OTP_DIGITS: u32 = 6;

/// What the domain needs besides the engine.
#[derive(Debug)]
pub struct DomainConfig {
    pub secret: Arc<ServerSecret>,
    pub plan: NumberingPlan,
    pub policy: Policy,
    /// Customer fees per operation code.
    pub tariffs: TariffTable,
    /// Agent commissions per operation code, paid from fee income.
    pub commissions: TariffTable,
    /// Operations above this amount (minor units) need an OTP as well as the PIN.
    pub step_up_above: u64,
    pub otp_ttl_s: u32,
    /// The accounts a new wallet gets.
    pub currencies: Vec<Currency>,
}

impl DomainConfig {
    pub fn new(secret: Arc<ServerSecret>) -> DomainConfig {
        DomainConfig {
            secret,
            plan: NumberingPlan::azerbaijan(),
            policy: Policy::default(),
            tariffs: TariffTable::new(),
            commissions: TariffTable::new(),
            step_up_above: 500 * 100,
            otp_ttl_s: OTP_TTL_MAX_S,
            currencies: vec![Currency::Azn],
        }
    }
}

/// Why an operation was refused. Every variant has a stable machine code ([`OpError::code`]);
/// none carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Msisdn(#[from] MsisdnError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Tariff(#[from] TariffError),
    #[error("{0}")]
    Wallet(WalletRefusal),
    /// A tier limit refused the operation; `remaining` is what is left under that limit (minor
    /// units, or operations for the count limits) as the wallet's shard sees it now.
    #[error("{result}: {remaining} remaining")]
    Limit { result: TransferResult, remaining: u64 },
    #[error("refused: {0}")]
    Refused(TransferResult),
    #[error("amount must be positive")]
    ZeroAmount,
    /// An account the operation needed could not be created (it exists with other fields).
    #[error("account creation refused: {0:?}")]
    AccountCreation(CreateAccountResult),
    #[error("the customer's PIN or OTP is required")]
    AuthenticationRequired,
    #[error("the OTP lifetime must be 1..={OTP_TTL_MAX_S} s")]
    OtpTtl,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl OpError {
    pub fn code(&self) -> &'static str {
        match self {
            OpError::Msisdn(e) => e.code(),
            OpError::Secret(e) => e.code(),
            OpError::Tariff(e) => e.code(),
            OpError::Wallet(r) => r.code(),
            OpError::Limit { result, .. } | OpError::Refused(result) => result.code(),
            OpError::ZeroAmount => "amount_must_not_be_zero",
            OpError::AccountCreation(_) => "account_creation_refused",
            OpError::AuthenticationRequired => "authentication_required",
            OpError::OtpTtl => "otp_ttl",
            OpError::Engine(_) => "engine_unavailable",
        }
    }
}

/// Kinds of agent; each kind's float account carries its own account kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    Agent,
    Kiosk,
    PostOffice,
    AtmNetwork,
}

impl AgentKind {
    fn float_kind(self) -> AccountKind {
        match self {
            AgentKind::Agent => AccountKind::AGENT_FLOAT,
            AgentKind::Kiosk => AccountKind::KIOSK_FLOAT,
            AgentKind::PostOffice => AccountKind::POST_OFFICE_FLOAT,
            AgentKind::AtmNetwork => AccountKind::ATM_NETWORK_FLOAT,
        }
    }
}

/// An agent's float (cash it has paid in as e-money) and its commission account.
pub fn agent_float(agent: u64) -> AccountId {
    AccountId::agent(agent, false, Currency::Azn)
}

/// Spread, so that any shard can pay a commission without leaving itself.
pub fn agent_commission(agent: u64) -> AccountId {
    AccountId::spread(AccountId::agent(agent, true, Currency::Azn).0)
}

/// How a customer authorises an operation.
#[derive(Debug)]
pub struct CustomerAuth<'a> {
    pub pin: Option<&'a Pin>,
    pub otp: Option<&'a OneTimeCode>,
    /// The channel code journaled with the evidence (see [`channels`]).
    pub channel: u8,
}

/// Channel codes journaled with a customer's evidence.
pub mod channels {
    pub const USSD: u8 = 1;
    pub const API: u8 = 2;
    pub const APP: u8 = 3;
    pub const AGENT_TERMINAL: u8 = 4;
    pub const POST_OFFICE: u8 = 5;
}

/// What an accepted operation posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub id: TransferId,
    pub amount: u64,
    pub fee: u64,
    pub commission: u64,
}

/// An OTP issued: the nonce the notification outbox derives the code from, and its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtpIssued {
    pub nonce: u128,
    pub expires_in_s: u32,
}

/// The id of leg `leg` (1: fee, 2: commission) of operation `op`, derived so that a retried
/// operation names the same legs. Leg 0 is the operation's own id.
pub fn leg_id(op: u128, leg: u8) -> TransferId {
    if leg == 0 {
        return TransferId(op);
    }
    let mixed = op.rotate_left(64) ^ u128::from(leg).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    TransferId(mixed | 1)
}

/// The wallet domain. Cheap to clone.
#[derive(Clone)]
pub struct Domain {
    engine: Engine,
    config: Arc<DomainConfig>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").finish_non_exhaustive()
    }
}

impl Domain {
    /// Creates the system accounts (idempotently) and makes `config.policy` every shard's.
    pub async fn open(engine: Engine, config: DomainConfig) -> Result<Domain, OpError> {
        if config.otp_ttl_s == 0 || config.otp_ttl_s > OTP_TTL_MAX_S {
            return Err(OpError::OtpTtl);
        }
        for tariff in config.tariffs.iter().chain(config.commissions.iter()) {
            tariff.1.validate()?;
        }
        let system = [
            (system::FEE_INCOME, AccountKind::FEE_INCOME),
            (system::EMONEY_ISSUANCE, AccountKind::EMONEY_ISSUANCE),
            (system::ATM_CLEARING, AccountKind::ATM_CLEARING),
        ];
        let accounts =
            system.iter().map(|(id, kind)| azn_account(*id, *kind, AccountFlags::empty())).collect();
        check_created(engine.create_accounts(accounts).await?)?;
        engine.set_policy(config.policy.clone()).await?;
        Ok(Domain { engine, config: Arc::new(config) })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn config(&self) -> &DomainConfig {
        &self.config
    }

    /// Normalises a number to E.164 under the configured numbering plan.
    pub fn msisdn(&self, input: &str) -> Result<Msisdn, OpError> {
        Ok(Msisdn::parse(input, &self.config.plan)?)
    }

    fn pin_tag(&self, msisdn: Msisdn, pin: &Pin) -> Tag {
        Tag(self.config.secret.pin_tag(msisdn.get(), pin).0)
    }

    async fn request(&self, request: WalletRequest) -> Result<WalletReply, OpError> {
        match self.engine.wallet_request(request).await? {
            WalletReply::Refused(refusal) => Err(OpError::Wallet(refusal)),
            reply => Ok(reply),
        }
    }

    /// Quick self-registration: the lowest tier, with a PIN if given.
    pub async fn register(
        &self,
        msisdn: Msisdn,
        pin: Option<&Pin>,
        language: u8,
        actor: Actor,
    ) -> Result<(), OpError> {
        let pin = pin.map(|pin| self.pin_tag(msisdn, pin));
        let tier = self.config.policy.tiers.first().map_or(0, |t| t.code);
        let currencies = self.config.currencies.clone();
        self.request(WalletRequest::Register { msisdn: msisdn.get(), currencies, tier, pin, language, actor })
            .await
            .map(drop)
    }

    /// Full identification by staff: the documents are journaled and the tier raised.
    pub async fn identify(
        &self,
        msisdn: Msisdn,
        tier: u8,
        profile: Profile,
        staff: u64,
    ) -> Result<(), OpError> {
        let actor = Actor::staff(staff);
        self.request(WalletRequest::Identify { msisdn: msisdn.get(), tier, profile, actor }).await.map(drop)
    }

    pub async fn update_profile(
        &self,
        msisdn: Msisdn,
        profile: Profile,
        actor: Actor,
    ) -> Result<(), OpError> {
        self.request(WalletRequest::UpdateProfile { msisdn: msisdn.get(), profile, actor }).await.map(drop)
    }

    /// The customer changes their PIN (the old one is checked and a wrong one counted).
    pub async fn change_pin(&self, msisdn: Msisdn, old: Option<&Pin>, new: &Pin) -> Result<(), OpError> {
        let old = old.map(|pin| self.pin_tag(msisdn, pin));
        let new = self.pin_tag(msisdn, new);
        let actor = Actor::customer(msisdn.get());
        self.request(WalletRequest::SetPin { msisdn: msisdn.get(), old, new, actor }).await.map(drop)
    }

    /// Staff set a new PIN (after checking identity in person).
    pub async fn reset_pin(&self, msisdn: Msisdn, new: &Pin, staff: u64) -> Result<(), OpError> {
        let new = self.pin_tag(msisdn, new);
        let actor = Actor::staff(staff);
        self.request(WalletRequest::SetPin { msisdn: msisdn.get(), old: None, new, actor }).await.map(drop)
    }

    /// Checks a PIN; a wrong one counts toward the block, across every channel.
    pub async fn verify_pin(&self, msisdn: Msisdn, pin: &Pin) -> Result<(), OpError> {
        let pin = self.pin_tag(msisdn, pin);
        self.request(WalletRequest::VerifyPin { msisdn: msisdn.get(), pin }).await.map(drop)
    }

    pub async fn block(&self, msisdn: Msisdn, staff: u64) -> Result<(), OpError> {
        self.request(WalletRequest::Block { msisdn: msisdn.get(), actor: Actor::staff(staff) })
            .await
            .map(drop)
    }

    pub async fn unblock(&self, msisdn: Msisdn, staff: u64) -> Result<(), OpError> {
        self.request(WalletRequest::Unblock { msisdn: msisdn.get(), actor: Actor::staff(staff) })
            .await
            .map(drop)
    }

    pub async fn set_language(&self, msisdn: Msisdn, language: u8) -> Result<(), OpError> {
        self.request(WalletRequest::SetLanguage { msisdn: msisdn.get(), language }).await.map(drop)
    }

    /// The wallet, its accounts, limits and today's counters.
    pub async fn wallet(&self, msisdn: Msisdn) -> Result<WalletView, OpError> {
        match self.request(WalletRequest::Get { msisdn: msisdn.get() }).await? {
            WalletReply::Found(view) => Ok(*view),
            _ => Err(OpError::Wallet(WalletRefusal::NotFound)),
        }
    }

    /// Issues an OTP (rate-limited per number). The code is not returned: whoever delivers it
    /// derives it from the nonce with [`Domain::otp_for_delivery`].
    pub async fn request_otp(&self, msisdn: Msisdn) -> Result<OtpIssued, OpError> {
        let nonce: u128 = rand::random();
        let code = self.config.secret.derive_code("otp", msisdn.get(), nonce, OTP_DIGITS);
        let tag = Tag(self.config.secret.code_tag("otp", msisdn.get(), &code).0);
        let ttl_s = self.config.otp_ttl_s;
        self.request(WalletRequest::IssueOtp { msisdn: msisdn.get(), nonce, tag, ttl_s }).await?;
        Ok(OtpIssued { nonce, expires_in_s: ttl_s })
    }

    /// The code of an issued OTP, for the SMS that carries it.
    pub fn otp_for_delivery(&self, msisdn: Msisdn, nonce: u128) -> OneTimeCode {
        self.config.secret.derive_code("otp", msisdn.get(), nonce, OTP_DIGITS)
    }

    fn otp_tag(&self, msisdn: Msisdn, code: &OneTimeCode) -> Tag {
        Tag(self.config.secret.code_tag("otp", msisdn.get(), code).0)
    }

    /// Checks and uses up an OTP (a login, say). Of two concurrent checks of one code, one wins.
    pub async fn verify_otp(&self, msisdn: Msisdn, code: &OneTimeCode) -> Result<(), OpError> {
        let tag = self.otp_tag(msisdn, code);
        self.request(WalletRequest::VerifyOtp { msisdn: msisdn.get(), tag }).await.map(drop)
    }

    /// Creates an agent's float and commission accounts.
    pub async fn create_agent(&self, agent: u64, kind: AgentKind) -> Result<(), OpError> {
        let float =
            azn_account(agent_float(agent), kind.float_kind(), AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS);
        let commission =
            azn_account(agent_commission(agent), AccountKind::AGENT_COMMISSION, AccountFlags::empty());
        check_created(self.engine.create_accounts(vec![float, commission]).await?)
    }

    /// E-money issued to an agent's float against cash or a bank deposit it paid in.
    pub async fn fund_agent(&self, op: u128, agent: u64, amount: u64) -> Result<Receipt, OpError> {
        positive(amount)?;
        let t = leg(op, 0, system::EMONEY_ISSUANCE, agent_float(agent), amount, codes::ISSUANCE);
        let results = self.engine.submit(vec![t]).await?;
        first_refusal(&results)?;
        Ok(Receipt { id: t.id, amount, fee: 0, commission: 0 })
    }

    /// Sends money from one wallet to another: principal and fee as one linked chain, checked
    /// against the sender's tier (and the receiver's maximum balance) on the way.
    pub async fn p2p(
        &self,
        op: u128,
        from: Msisdn,
        to: Msisdn,
        amount: u64,
        auth: CustomerAuth<'_>,
    ) -> Result<Receipt, OpError> {
        let (debit, credit) =
            (AccountId::wallet(from.get(), Currency::Azn), AccountId::wallet(to.get(), Currency::Azn));
        let (chain, fee) = self.payment_chain(op, debit, credit, amount, codes::P2P)?;
        let authorization = self.authorization(from, &auth)?;
        let results = self.engine.submit_authorized(authorization, chain).await?;
        self.outcome(from, to, &results).await?;
        Ok(Receipt { id: TransferId(op), amount, fee, commission: 0 })
    }

    /// The linked chain of a payment of `code` from `debit` to `credit` and the payer's fee
    /// under the tariff of `code`, and that fee. `p2p` submits it with the customer's
    /// authorization; the load tool submits such chains in batches.
    pub fn payment_chain(
        &self,
        op: u128,
        debit: AccountId,
        credit: AccountId,
        amount: u64,
        code: u16,
    ) -> Result<(Vec<Transfer>, u64), OpError> {
        positive(amount)?;
        let fee = self.config.tariffs.fee(code, amount)?;
        let mut chain = vec![leg(op, 0, debit, credit, amount, code)];
        if fee > 0 {
            chain.push(leg(op, 1, debit, system::FEE_INCOME, fee, codes::FEE));
        }
        Ok((link(chain), fee))
    }

    /// An agent takes cash and credits the wallet from its float; a customer fee (if the tariff
    /// has one) is kept from the amount, and the agent earns its commission from fee income.
    pub async fn cash_in(&self, op: u128, agent: u64, to: Msisdn, amount: u64) -> Result<Receipt, OpError> {
        positive(amount)?;
        let fee = self.config.tariffs.fee(codes::CASH_IN, amount)?;
        let commission = self.config.commissions.fee(codes::CASH_IN, amount)?;
        let credited = amount.checked_sub(fee).filter(|c| *c > 0).ok_or(OpError::ZeroAmount)?;
        let float = agent_float(agent);
        let mut chain =
            vec![leg(op, 0, float, AccountId::wallet(to.get(), Currency::Azn), credited, codes::CASH_IN)];
        if fee > 0 {
            chain.push(leg(op, 1, float, system::FEE_INCOME, fee, codes::FEE));
        }
        if commission > 0 {
            chain.push(leg(
                op,
                2,
                system::FEE_INCOME,
                agent_commission(agent),
                commission,
                codes::COMMISSION,
            ));
        }
        let results = self.engine.submit(link(chain)).await?;
        self.outcome(to, to, &results).await?;
        Ok(Receipt { id: TransferId(op), amount: credited, fee, commission })
    }

    /// The customer, in front of an agent, cashes out: confirmed by their PIN (or OTP).
    pub async fn cash_out(
        &self,
        op: u128,
        agent: u64,
        from: Msisdn,
        amount: u64,
        auth: CustomerAuth<'_>,
    ) -> Result<Receipt, OpError> {
        positive(amount)?;
        let fee = self.config.tariffs.fee(codes::CASH_OUT, amount)?;
        let commission = self.config.commissions.fee(codes::CASH_OUT, amount)?;
        let wallet = AccountId::wallet(from.get(), Currency::Azn);
        let mut chain = vec![leg(op, 0, wallet, agent_float(agent), amount, codes::CASH_OUT)];
        if fee > 0 {
            chain.push(leg(op, 1, wallet, system::FEE_INCOME, fee, codes::FEE));
        }
        if commission > 0 {
            chain.push(leg(
                op,
                2,
                system::FEE_INCOME,
                agent_commission(agent),
                commission,
                codes::COMMISSION,
            ));
        }
        let authorization = self.authorization(from, &auth)?;
        let results = self.engine.submit_authorized(authorization, link(chain)).await?;
        self.outcome(from, from, &results).await?;
        Ok(Receipt { id: TransferId(op), amount, fee, commission })
    }

    /// The customer's proof, as tags. An operation without a PIN or an OTP is refused here:
    /// the ledger would otherwise take the absence of proof for a trusted caller.
    fn authorization(&self, msisdn: Msisdn, auth: &CustomerAuth<'_>) -> Result<Authorization, OpError> {
        if auth.pin.is_none() && auth.otp.is_none() {
            return Err(OpError::AuthenticationRequired);
        }
        Ok(Authorization {
            msisdn: msisdn.get(),
            pin: auth.pin.map(|pin| self.pin_tag(msisdn, pin)),
            otp: auth.otp.map(|code| self.otp_tag(msisdn, code)),
            channel: auth.channel,
            step_up_above: self.config.step_up_above,
        })
    }

    /// Turns a chain's results into the operation's answer; a limit refusal says how much
    /// remains under the limit that refused it (the payer's outflow limits, the payee's maximum
    /// balance).
    async fn outcome(&self, payer: Msisdn, payee: Msisdn, results: &[TransferResult]) -> Result<(), OpError> {
        use TransferResult as R;
        let Err(result) = first_refusal(results) else {
            return Ok(());
        };
        let OpError::Refused(result) = result else {
            return Err(result);
        };
        let remaining = match result {
            R::LimitPerOperation
            | R::LimitDailyAmount
            | R::LimitDailyCount
            | R::LimitMonthlyAmount
            | R::LimitMonthlyCount
            | R::LimitMaxBalance => {
                let view = self.wallet(if result == R::LimitMaxBalance { payee } else { payer }).await?;
                let Some(account) = view.accounts.iter().find(|a| a.account.currency == Currency::Azn) else {
                    return Err(OpError::Refused(result));
                };
                let (l, o) = (&account.limits, &account.outflow);
                match result {
                    R::LimitPerOperation => l.max_per_operation,
                    R::LimitDailyAmount => l.daily_amount.saturating_sub(o.day_amount),
                    R::LimitDailyCount => u64::from(l.daily_count.saturating_sub(o.day_count)),
                    R::LimitMonthlyAmount => l.monthly_amount.saturating_sub(o.month_amount),
                    R::LimitMonthlyCount => u64::from(l.monthly_count.saturating_sub(o.month_count)),
                    _ => account.room_to_receive(),
                }
            }
            _ => return Err(OpError::Refused(result)),
        };
        Err(OpError::Limit { result, remaining })
    }
}

fn positive(amount: u64) -> Result<(), OpError> {
    if amount == 0 { Err(OpError::ZeroAmount) } else { Ok(()) }
}

fn azn_account(id: AccountId, kind: AccountKind, flags: AccountFlags) -> Account {
    Account::new(id, Currency::Azn, kind, flags)
}

fn check_created(results: Vec<CreateAccountResult>) -> Result<(), OpError> {
    match results.into_iter().find(|r| !matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists)) {
        None => Ok(()),
        Some(result) => Err(OpError::AccountCreation(result)),
    }
}

fn leg(op: u128, n: u8, debit: AccountId, credit: AccountId, amount: u64, code: u16) -> Transfer {
    Transfer {
        id: leg_id(op, n),
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        currency: Currency::Azn,
        pending_id: TransferId(0),
        user_data: op,
        timeout_s: 0,
        code,
        flags: TransferFlags::empty(),
    }
}

/// Marks every transfer but the last as linked: one chain.
fn link(mut chain: Vec<Transfer>) -> Vec<Transfer> {
    let last = chain.len().saturating_sub(1);
    for t in &mut chain[..last] {
        t.flags = t.flags.union(TransferFlags::LINKED);
    }
    chain
}

/// The refusal that explains a chain's failure: the first result that is neither `Ok` nor the
/// echo of another member's failure.
fn first_refusal(results: &[TransferResult]) -> Result<(), OpError> {
    if results.iter().all(|r| r.is_ok()) {
        return Ok(());
    }
    let cause = results
        .iter()
        .find(|r| !r.is_ok() && **r != TransferResult::LinkedEventFailed)
        .or_else(|| results.iter().find(|r| !r.is_ok()))
        .copied()
        .unwrap_or(TransferResult::LinkedEventFailed);
    Err(OpError::Refused(cause))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leg_ids_differ_and_repeat() {
        let op = 0x1234_5678_9abc_def0_1122_3344_5566_7788;
        assert_eq!(leg_id(op, 0), TransferId(op));
        assert_ne!(leg_id(op, 1), leg_id(op, 2));
        assert_ne!(leg_id(op, 1), TransferId(op));
        assert_eq!(leg_id(op, 1), leg_id(op, 1));
        assert_ne!(leg_id(op, 1), leg_id(op + 1, 1));
    }

    #[test]
    fn chains_are_linked_but_the_last() {
        let t = leg(1, 0, AccountId(1), AccountId(2), 5, codes::P2P);
        let chain = link(vec![t, t, t]);
        assert!(chain[0].flags.contains(TransferFlags::LINKED));
        assert!(chain[1].flags.contains(TransferFlags::LINKED));
        assert!(!chain[2].flags.contains(TransferFlags::LINKED));
        assert_eq!(link(vec![t]).len(), 1);
        assert!(link(Vec::new()).is_empty());
    }

    #[test]
    fn the_cause_is_not_the_echo() {
        use TransferResult::*;
        let refusal = first_refusal(&[LinkedEventFailed, ExceedsCredits]).expect_err("refused");
        assert!(matches!(refusal, OpError::Refused(ExceedsCredits)));
        assert!(first_refusal(&[Ok, Ok]).is_ok());
    }
}
