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
use crate::ledger::TransferStatus;
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
    /// Money in transit of a reversal: every reversal passes through it and leaves it at zero.
    pub const REVERSALS: AccountId = AccountId::spread(4);
}

/// OTPs live at most this long, whatever the configuration says.
pub const OTP_TTL_MAX_S: u32 = 300;
const OTP_DIGITS: u32 = 6;

/// The wallet rules administrators change at run time: the tier table (inside the policy every
/// shard enforces) and the fee tables. A [`Domain`] holds the live ones behind an atomic pointer:
/// an operation loads them once (a few atomic instructions) and prices itself with that
/// snapshot; [`RulesEditor::apply`] swaps in new ones for the next operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub policy: Policy,
    /// Customer fees per operation code.
    pub tariffs: TariffTable,
    /// Agent commissions per operation code, paid from fee income.
    pub commissions: TariffTable,
}

impl Rules {
    /// Every tariff and commission valid.
    pub fn validate(&self) -> Result<(), TariffError> {
        self.tariffs.iter().chain(self.commissions.iter()).try_for_each(|(_, tariff)| tariff.validate())
    }
}

/// What the domain needs besides the engine. `policy`, `tariffs` and `commissions` are the
/// rules the domain opens with; the live ones are [`Domain::rules`].
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
    /// How long a cash-by-code stays redeemable before its hold voids itself.
    pub cash_code_ttl_s: u32,
    /// How long after posting staff may reverse an operation.
    pub reversal_window_s: u64,
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
            cash_code_ttl_s: 30 * 60,
            reversal_window_s: 7 * 24 * 3600,
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
    #[error("the cash-code lifetime must be 1 s or more")]
    CashCodeTtl,
    #[error("only ATM networks and post offices redeem cash codes")]
    NotARedeemer,
    #[error("no such operation")]
    OperationNotFound,
    /// The operation is posted but the views have not indexed it yet: retry shortly.
    #[error("the operation is not indexed yet; retry")]
    NotIndexedYet,
    #[error("operations of this kind cannot be reversed")]
    NotReversible,
    #[error("the reversal window of {window_s} s has passed")]
    ReversalWindowPassed { window_s: u64 },
    #[error("the views are not running")]
    ViewsUnavailable,
    #[error("views: {0}")]
    Views(String),
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
            OpError::CashCodeTtl => "cash_code_ttl",
            OpError::NotARedeemer => "not_a_redeemer",
            OpError::OperationNotFound => "operation_not_found",
            OpError::NotIndexedYet => "not_indexed_yet",
            OpError::NotReversible => "not_reversible",
            OpError::ReversalWindowPassed { .. } => "reversal_window_passed",
            OpError::ViewsUnavailable => "views_unavailable",
            OpError::Views(_) => "views_error",
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

/// A cash-by-code issued: what the customer takes to an ATM or a post office, with the
/// amount. The code is shown to the customer once and kept nowhere: the ledger holds only the
/// hold, whose id is a keyed tag of the number and the code.
#[derive(Debug)]
pub struct CashCode {
    pub code: OneTimeCode,
    pub hold: TransferId,
    pub amount: u64,
    pub fee: u64,
    pub expires_in_s: u32,
}

/// Digits of a cash code: with the number, the amount and [`Policy::code_attempts_max`]
/// guesses per wallet before its codes are cancelled (3 by default), a guessing attack on one
/// wallet succeeds about once in 33 million.
pub const CASH_CODE_DIGITS: u32 = 8;

/// The id of the reversal of operation `op`: one per operation, so that it is never reversed
/// twice.
pub fn reversal_id(op: u128) -> TransferId {
    leg_id(op, 0x40)
}

/// An OTP issued: the nonce the notification outbox derives the code from, and its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtpIssued {
    pub nonce: u128,
    pub expires_in_s: u32,
}

pub use crate::wallet::leg_id;

/// The wallet domain. Cheap to clone.
#[derive(Clone)]
pub struct Domain {
    engine: Engine,
    config: Arc<DomainConfig>,
    rules: Arc<arc_swap::ArcSwap<Rules>>,
    /// One rules change at a time, from reading the live rules to swapping in the new ones.
    rules_edit: Arc<tokio::sync::Mutex<()>>,
}

/// The right to change the live rules, held by one caller at a time (see [`Domain::edit_rules`]).
#[derive(Debug)]
pub struct RulesEditor<'a> {
    domain: &'a Domain,
    _turn: tokio::sync::MutexGuard<'a, ()>,
}

impl RulesEditor<'_> {
    /// The rules in force now; no other editor can change them while this one lives.
    pub fn current(&self) -> Arc<Rules> {
        self.domain.rules.load_full()
    }

    /// Puts `rules` in force: the policy is journaled on every shard (where it differs), then
    /// the next operation prices itself with the new fee tables.
    pub async fn apply(&self, rules: Rules) -> Result<(), OpError> {
        rules.validate()?;
        if rules.policy != self.domain.rules.load().policy {
            self.domain.engine.set_policy(rules.policy.clone()).await?;
        }
        self.domain.rules.store(Arc::new(rules));
        Ok(())
    }
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
        if config.cash_code_ttl_s == 0 {
            return Err(OpError::CashCodeTtl);
        }
        let rules = Rules {
            policy: config.policy.clone(),
            tariffs: config.tariffs.clone(),
            commissions: config.commissions.clone(),
        };
        rules.validate()?;
        let system = [
            (system::FEE_INCOME, AccountKind::FEE_INCOME),
            (system::EMONEY_ISSUANCE, AccountKind::EMONEY_ISSUANCE),
            (system::ATM_CLEARING, AccountKind::ATM_CLEARING),
            (system::REVERSALS, AccountKind::SUSPENSE),
        ];
        let accounts =
            system.iter().map(|(id, kind)| azn_account(*id, *kind, AccountFlags::empty())).collect();
        check_created(engine.create_accounts(accounts).await?)?;
        engine.set_policy(config.policy.clone()).await?;
        Ok(Domain {
            engine,
            config: Arc::new(config),
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(rules)),
            rules_edit: Arc::default(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The configuration the domain opened with (see [`Domain::rules`] for the live rules).
    pub fn config(&self) -> &DomainConfig {
        &self.config
    }

    /// The tiers, tariffs and commissions in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Waits for the turn to change the rules (one editor at a time).
    pub async fn edit_rules(&self) -> RulesEditor<'_> {
        RulesEditor { domain: self, _turn: self.rules_edit.lock().await }
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
        let tier = self.rules.load().policy.tiers.first().map_or(0, |t| t.code);
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

    /// Creates a merchant's account (it receives payments; it cannot go negative).
    pub async fn create_merchant(&self, merchant: u64) -> Result<(), OpError> {
        let account = Account::new(
            AccountId::merchant(merchant, Currency::Azn),
            Currency::Azn,
            AccountKind::MERCHANT,
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
        );
        check_created(self.engine.create_accounts(vec![account]).await?)
    }

    /// The customer pays a merchant (a QR payment): principal and the tariff's fee as one chain,
    /// under the customer's limits and authorization, coded [`codes::MERCHANT_PAYMENT`].
    pub async fn merchant_payment(
        &self,
        op: u128,
        from: Msisdn,
        merchant: u64,
        amount: u64,
        auth: CustomerAuth<'_>,
    ) -> Result<Receipt, OpError> {
        let debit = AccountId::wallet(from.get(), Currency::Azn);
        let credit = AccountId::merchant(merchant, Currency::Azn);
        let (chain, fee) = self.payment_chain(op, debit, credit, amount, codes::MERCHANT_PAYMENT)?;
        let authorization = self.authorization(from, &auth)?;
        let results = self.engine.submit_authorized(authorization, chain).await?;
        self.outcome(from, from, &results).await?;
        Ok(Receipt { id: TransferId(op), amount, fee, commission: 0 })
    }

    /// A merchant refunds a customer: a new transfer back (not a reversal: the original stays,
    /// its fee is not unwound), coded [`codes::REFUND`], citing the original payment in its user
    /// data. A credit to the wallet: its maximum balance applies, nothing else of the customer's.
    pub async fn refund(
        &self,
        op: u128,
        merchant: u64,
        to: Msisdn,
        amount: u64,
        original: u128,
    ) -> Result<Receipt, OpError> {
        positive(amount)?;
        let credit = AccountId::wallet(to.get(), Currency::Azn);
        let t = Transfer {
            user_data: original,
            ..leg(op, 0, AccountId::merchant(merchant, Currency::Azn), credit, amount, codes::REFUND)
        };
        let results = self.engine.submit(vec![t]).await?;
        self.outcome(to, to, &results).await?;
        Ok(Receipt { id: TransferId(op), amount, fee: 0, commission: 0 })
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
        let fee = self.rules.load().tariffs.fee(code, amount)?;
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
        let (fee, commission) = {
            let rules = self.rules.load();
            (rules.tariffs.fee(codes::CASH_IN, amount)?, rules.commissions.fee(codes::CASH_IN, amount)?)
        };
        let credited = amount.checked_sub(fee).filter(|c| *c > 0).ok_or(OpError::ZeroAmount)?;
        let float = agent_float(agent);
        let principal =
            leg(op, 0, float, AccountId::wallet(to.get(), Currency::Azn), credited, codes::CASH_IN);
        let chain = agent_chain(principal, float, fee, agent, commission);
        let results = self.engine.submit(chain).await?;
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
        let (fee, commission) = {
            let rules = self.rules.load();
            (rules.tariffs.fee(codes::CASH_OUT, amount)?, rules.commissions.fee(codes::CASH_OUT, amount)?)
        };
        let wallet = AccountId::wallet(from.get(), Currency::Azn);
        let principal = leg(op, 0, wallet, agent_float(agent), amount, codes::CASH_OUT);
        let chain = agent_chain(principal, wallet, fee, agent, commission);
        let authorization = self.authorization(from, &auth)?;
        let results = self.engine.submit_authorized(authorization, chain).await?;
        self.outcome(from, from, &results).await?;
        Ok(Receipt { id: TransferId(op), amount, fee, commission })
    }

    /// The id of the hold behind a cash code: a keyed tag of the number and the code, so that
    /// only someone holding both names it.
    fn code_hold(&self, msisdn: Msisdn, code: &OneTimeCode) -> TransferId {
        let tag = self.config.secret.code_tag("cash", msisdn.get(), code).0;
        let mut id = [0_u8; 16];
        id.copy_from_slice(&tag[..16]);
        TransferId(u128::from_be_bytes(id) | 1)
    }

    /// The customer asks for a cash code for `amount` (confirmed by PIN, or OTP): the amount and
    /// the fee are held on the wallet until the code is redeemed, cancelled, or expires. The
    /// code derives from `op` under the server secret, so a retry of the same operation shows
    /// the same code for the same hold, and no code is ever stored. (A code that happens to
    /// equal a live one of the wallet is refused as `exists_with_different_body`: retry under a
    /// new operation id.)
    pub async fn issue_cash_code(
        &self,
        op: u128,
        msisdn: Msisdn,
        amount: u64,
        auth: CustomerAuth<'_>,
    ) -> Result<CashCode, OpError> {
        positive(amount)?;
        let fee = self.rules.load().tariffs.fee(codes::CASH_CODE, amount)?;
        let authorization = self.authorization(msisdn, &auth)?;
        let code = self.config.secret.derive_code("cash", msisdn.get(), op, CASH_CODE_DIGITS);
        let hold = self.code_hold(msisdn, &code);
        let ttl_s = self.config.cash_code_ttl_s;
        let wallet = AccountId::wallet(msisdn.get(), Currency::Azn);
        let reference = op;
        let held = |id: TransferId, credit: AccountId, amount: u64, code: u16| Transfer {
            id,
            user_data: reference,
            timeout_s: ttl_s,
            flags: TransferFlags::PENDING,
            ..leg(0, 0, wallet, credit, amount, code)
        };
        let mut chain = vec![held(hold, system::ATM_CLEARING, amount, codes::CASH_CODE)];
        if fee > 0 {
            let fee_leg = leg_id(hold.0, crate::wallet::CODE_FEE_LEG);
            chain.push(held(fee_leg, system::FEE_INCOME, fee, codes::FEE));
        }
        let results = self.engine.submit_authorized(authorization, link(chain)).await?;
        self.outcome(msisdn, msisdn, &results).await?;
        Ok(CashCode { code, hold, amount, fee, expires_in_s: ttl_s })
    }

    /// An ATM network or a post office pays out a cash code: the hold is posted (to
    /// [`system::ATM_CLEARING`], owed to the redeemer: `user_data` names it and its device),
    /// the fee with it, and the redeemer earns its commission. `reference` is the redeemer's
    /// own id for the redemption: retrying it answers the first result. A wrong code or amount
    /// counts toward cancelling the wallet's codes.
    pub async fn redeem_cash_code(
        &self,
        reference: u128,
        redeemer: u64,
        device: u64,
        msisdn: Msisdn,
        code: &OneTimeCode,
        amount: u64,
    ) -> Result<Receipt, OpError> {
        positive(amount)?;
        let float = self.engine.lookup_accounts(&[agent_float(redeemer)]).await?;
        let kind = float.first().copied().flatten().map(|a| a.kind);
        if !matches!(kind, Some(AccountKind::ATM_NETWORK_FLOAT | AccountKind::POST_OFFICE_FLOAT)) {
            return Err(OpError::NotARedeemer);
        }
        let commission = self.rules.load().commissions.fee(codes::CASH_CODE, amount)?;
        let user_data = (u128::from(redeemer) << 64) | u128::from(device);
        let resolve = Transfer {
            user_data,
            ..leg(reference, 0, system::ATM_CLEARING, system::ATM_CLEARING, 0, codes::CASH_CODE)
        };
        let then = (commission > 0).then(|| Transfer {
            user_data,
            ..leg(reference, 2, system::FEE_INCOME, agent_commission(redeemer), commission, codes::COMMISSION)
        });
        let hold = self.code_hold(msisdn, code);
        let request =
            WalletRequest::ResolveCode { msisdn: msisdn.get(), hold, amount, cancel: false, resolve, then };
        let WalletReply::Transfers(results) = self.request(request).await? else {
            return Err(OpError::Refused(TransferResult::LinkedEventFailed));
        };
        first_refusal(&results)?;
        Ok(Receipt { id: TransferId(reference), amount, fee: 0, commission })
    }

    /// The customer cancels a cash code: its hold and fee are voided. Needs the code itself,
    /// and a wrong one counts like a wrong redemption.
    pub async fn cancel_cash_code(
        &self,
        reference: u128,
        msisdn: Msisdn,
        code: &OneTimeCode,
    ) -> Result<(), OpError> {
        let hold = self.code_hold(msisdn, code);
        let resolve = leg(reference, 0, system::ATM_CLEARING, system::ATM_CLEARING, 0, codes::CASH_CODE);
        let request = WalletRequest::ResolveCode {
            msisdn: msisdn.get(),
            hold,
            amount: 0,
            cancel: true,
            resolve,
            then: None,
        };
        let WalletReply::Transfers(results) = self.request(request).await? else {
            return Err(OpError::Refused(TransferResult::LinkedEventFailed));
        };
        first_refusal(&results)
    }

    /// Where a redemption (or any operation) stands, by its reference.
    pub async fn operation_status(&self, reference: u128) -> Result<Option<TransferStatus>, OpError> {
        Ok(self.engine.lookup_transfers(&[TransferId(reference)]).await?.into_iter().next().flatten())
    }

    /// Staff reverse a posted operation within the reversal window: the principal goes back,
    /// the fee is refunded and the agent's commission taken back, as one linked chain coded
    /// [`codes::REVERSAL`] citing `op` in its user data, with the staff member journaled. The
    /// payee's principal and the fee gather in [`system::REVERSALS`] on the payee's shard and
    /// leave it for the payer in one transfer, so that the chain crosses shards once and is
    /// all-or-nothing. An operation is reversed at most once: the reversal's id derives from
    /// `op`, and a second call answers the first.
    pub async fn reverse(&self, op: u128, staff: u64) -> Result<Receipt, OpError> {
        let views = self.engine.views().ok_or(OpError::ViewsUnavailable)?;
        // Every operation acknowledged before this call is durable: wait until the views have it.
        views.reached(self.engine.journal().durable()).await;
        let indexed = |id: TransferId| views.transfer(id).map_err(|e| OpError::Views(e.to_string()));
        let Some((_, principal, at)) = indexed(TransferId(op))? else {
            let known = self.operation_status(op).await?.is_some();
            return Err(if known { OpError::NotIndexedYet } else { OpError::OperationNotFound });
        };
        let reversible = matches!(
            principal.code,
            codes::P2P | codes::CASH_IN | codes::CASH_OUT | codes::MERCHANT_PAYMENT | codes::BILL_PAYMENT
        );
        if !reversible || !principal.flags.is_plain() {
            return Err(OpError::NotReversible);
        }
        let window_s = self.config.reversal_window_s;
        let age_ns = self.engine.now_ns().saturating_sub(at);
        if age_ns / 1_000_000_000 > window_s {
            return Err(OpError::ReversalWindowPassed { window_s });
        }
        let (payer, payee) = (principal.debit_account_id, principal.credit_account_id);
        let fee = indexed(leg_id(op, 1))?
            .map(|(_, t, _)| t)
            .filter(|t| t.user_data == op && t.code == codes::FEE && t.debit_account_id == payer);
        let commission = indexed(leg_id(op, 2))?
            .map(|(_, t, _)| t)
            .filter(|t| t.user_data == op && t.code == codes::COMMISSION);
        let fee_amount = fee.map_or(0, |t| t.amount);
        let back = principal.amount.checked_add(fee_amount).ok_or(OpError::NotReversible)?;
        let rev = reversal_id(op).0;
        let unwind = |n: u8, debit: AccountId, credit: AccountId, amount: u64| Transfer {
            user_data: op,
            currency: principal.currency,
            ..leg(rev, n, debit, credit, amount, codes::REVERSAL)
        };
        let mut chain = vec![unwind(1, payee, system::REVERSALS, principal.amount)];
        if let Some(fee) = fee {
            chain.push(unwind(2, fee.credit_account_id, system::REVERSALS, fee.amount));
        }
        if let Some(c) = commission {
            chain.push(unwind(3, c.credit_account_id, c.debit_account_id, c.amount));
        }
        chain.push(unwind(0, system::REVERSALS, payer, back));
        let results = self.engine.submit_as_staff(Actor::staff(staff), link(chain)).await?;
        first_refusal(&results)?;
        Ok(Receipt {
            id: TransferId(rev),
            amount: principal.amount,
            fee: fee_amount,
            commission: commission.map_or(0, |t| t.amount),
        })
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

/// An agent operation as one linked chain: its principal, the customer's fee (from `payer` to
/// fee income, leg 1), and the agent's commission (from fee income, leg 2).
fn agent_chain(
    principal: Transfer,
    payer: AccountId,
    fee: u64,
    agent: u64,
    commission: u64,
) -> Vec<Transfer> {
    let op = principal.id.0;
    let mut chain = vec![principal];
    if fee > 0 {
        chain.push(leg(op, 1, payer, system::FEE_INCOME, fee, codes::FEE));
    }
    if commission > 0 {
        chain.push(leg(op, 2, system::FEE_INCOME, agent_commission(agent), commission, codes::COMMISSION));
    }
    link(chain)
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
