//! What a subscriber can do over USSD, as a state machine per session: the screens, the inputs
//! they take, and the wallet operations behind them. Transport-free: the session actor feeds it
//! the subscriber's text and sends back the [`Screen`] it returns.
//!
//! Money moves only at the PIN-confirmed last step of a flow; a session dropped before it moves
//! nothing. The outcome of that step is kept per number (the "last operation" item), so a
//! subscriber whose final screen was lost can see it on redial.

use std::sync::Arc;

use engine::domain::{CustomerAuth, channels};
use engine::money::{Amount, Currency, Zero};
use engine::msisdn::Msisdn;
use engine::secret::Pin;
use engine::wallet::{Actor, WalletRefusal, codes};
use engine::{AccountId, OpError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::menu::{self, GUEST_ITEMS, MAIN_ITEMS, Texts};
use crate::http::AppState;

/// What the session answers: the text of one page and whether the dialogue ends with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    pub text: String,
    pub end: bool,
}

/// The outcome of a subscriber's last money-moving operation, kept in the server store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastOperation {
    pub at_s: u64,
    /// `send` or `cash_code`.
    pub kind: String,
    pub amount: u64,
    pub fee: u64,
    pub to: Option<u64>,
    /// `None` when done; the refusal's code otherwise.
    pub refused: Option<String>,
}

enum Step {
    Guest,
    Main,
    Language,
    RegisterPin,
    RegisterRepeat(Pin),
    BalancePin,
    SendNumber,
    SendAmount {
        to: Msisdn,
    },
    SendConfirm {
        to: Msisdn,
        amount: u64,
        fee: u64,
    },
    SendPin {
        to: Msisdn,
        amount: u64,
        fee: u64,
    },
    CashAmount,
    CashPin {
        amount: u64,
    },
    StatementPin,
    OldPin,
    NewPin(Pin),
    RepeatPin(Pin, Pin),
    /// A long last screen being paged; any other input ends the dialogue.
    Closing,
}

/// One subscriber's dialogue.
pub struct Flow {
    app: Arc<AppState>,
    service_code: Arc<str>,
    msisdn: Msisdn,
    language: u8,
    step: Step,
    pages: Vec<String>,
    page: usize,
    /// Operation ids of this dialogue derive from it and a counter.
    seed: [u8; 16],
    operations: u32,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow").field("msisdn", &self.msisdn.get()).finish_non_exhaustive()
    }
}

fn money(minor: u64) -> String {
    format!("{} AZN", crate::http::money(minor))
}

fn signed(minor: i128) -> String {
    format!("{} AZN", crate::http::balance(minor))
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `2026-11-23 12:00` from seconds since the epoch (UTC).
fn short_time(at_s: u64) -> String {
    let text = engine::statement::rfc3339(at_s.saturating_mul(1_000_000_000));
    text.get(..16).unwrap_or(&text).replace('T', " ")
}

/// The inputs after the service code in a dial string: `*150*2*0551234567#` → `["2", "0551234567"]`.
pub fn shortcut(service_code: &str, dialled: &str) -> Vec<String> {
    let prefix = service_code.trim_end_matches('#');
    let Some(rest) = dialled.trim().strip_prefix(prefix) else {
        return Vec::new();
    };
    rest.trim_end_matches('#').split('*').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

impl Flow {
    /// A dial: the menu for the number (or the shortcut's screen), in the subscriber's language.
    pub async fn dial(
        app: Arc<AppState>,
        service_code: Arc<str>,
        msisdn: Msisdn,
        dialled: &str,
    ) -> (Flow, Screen) {
        let mut flow = Flow {
            app,
            service_code,
            msisdn,
            language: 0,
            step: Step::Guest,
            pages: Vec::new(),
            page: 0,
            seed: rand::random(),
            operations: 0,
        };
        let inputs = shortcut(&flow.service_code, dialled);
        // A shortcut goes straight to its screen: the menu it passes through is not rendered.
        let mut screen = match flow.app.domain.wallet(msisdn).await {
            Ok(view) => {
                flow.language = view.state.language;
                if inputs.is_empty() {
                    flow.main_menu(None)
                } else {
                    flow.step = Step::Main;
                    Screen { text: String::new(), end: false }
                }
            }
            Err(OpError::Wallet(WalletRefusal::NotFound)) => {
                flow.language = flow.app.store.ussd_language(msisdn.get()).unwrap_or(0);
                if inputs.is_empty() {
                    flow.guest_menu(None)
                } else {
                    flow.step = Step::Guest;
                    Screen { text: String::new(), end: false }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "ussd: wallet lookup failed");
                let text = flow.texts().fill("unavailable", &[]);
                return (flow, Screen { text, end: true });
            }
        };
        for input in inputs {
            if screen.end {
                break;
            }
            screen = flow.answer(&input).await;
        }
        (flow, screen)
    }

    fn texts(&self) -> &'static Texts {
        menu::texts(self.language)
    }

    /// Shows `text` (paged if long) and moves to `step`.
    fn show(&mut self, step: Step, text: String, end: bool) -> Screen {
        self.pages = menu::pages(&text, self.texts());
        self.page = 0;
        let first = self.pages[0].clone();
        if end && self.pages.len() > 1 {
            self.step = Step::Closing;
            return Screen { text: first, end: false };
        }
        self.step = step;
        Screen { text: first, end }
    }

    fn end(&mut self, text: String) -> Screen {
        self.show(Step::Closing, text, true)
    }

    fn with_notice(&self, notice: Option<String>, screen: String) -> String {
        match notice {
            Some(notice) => format!("{notice}\n{screen}"),
            None => screen,
        }
    }

    fn main_menu(&mut self, notice: Option<String>) -> Screen {
        let text = self.with_notice(notice, self.texts().menu("main_title", &MAIN_ITEMS));
        self.show(Step::Main, text, false)
    }

    fn guest_menu(&mut self, notice: Option<String>) -> Screen {
        let text = self.with_notice(notice, self.texts().menu("guest_title", &GUEST_ITEMS));
        self.show(Step::Guest, text, false)
    }

    fn ask(&mut self, step: Step, key: &str, notice: Option<&str>) -> Screen {
        let texts = self.texts();
        let prompt = texts.fill(key, &[]);
        let text = match notice {
            Some(notice) => format!("{}\n{prompt}", texts.fill(notice, &[])),
            None => prompt,
        };
        self.show(step, text, false)
    }

    fn refusal(&self, error: &OpError) -> String {
        let texts = self.texts();
        match error {
            OpError::Wallet(WalletRefusal::PinInvalid { remaining }) => {
                texts.error("pin_invalid", &[("remaining", &remaining.to_string())])
            }
            OpError::Limit { result, remaining } => {
                let counts = matches!(
                    result,
                    engine::TransferResult::LimitDailyCount | engine::TransferResult::LimitMonthlyCount
                );
                let left = if counts { remaining.to_string() } else { money(*remaining) };
                texts.error("limit", &[("remaining", &left)])
            }
            OpError::Engine(_) | OpError::Views(_) | OpError::ViewsUnavailable => {
                texts.fill("unavailable", &[])
            }
            other => texts.error(other.code(), &[]),
        }
    }

    /// [`Flow::refusal`], with the attempts left after a wrong PIN on a transfer (the ledger's
    /// refusal does not carry them; the wallet's counter does).
    async fn explain(&self, error: &OpError) -> String {
        if matches!(error, OpError::Refused(engine::TransferResult::PinInvalid))
            && let Ok(view) = self.app.domain.wallet(self.msisdn).await
        {
            let max = self.app.domain.rules().policy.pin_attempts_max;
            let remaining = max.saturating_sub(view.state.pin_failures);
            return self.refusal(&OpError::Wallet(WalletRefusal::PinInvalid { remaining }));
        }
        self.refusal(error)
    }

    fn next_operation(&mut self) -> u128 {
        self.operations += 1;
        let digest = Sha256::new()
            .chain_update(b"ussd-operation")
            .chain_update(self.seed)
            .chain_update(self.operations.to_be_bytes())
            .finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        u128::from_be_bytes(id)
    }

    /// Keeps the outcome for "last operation" (a store write, on a blocking thread), before the
    /// screen that reports the outcome is answered: a subscriber who dials "last operation"
    /// right after must see this one. (It was written after the answer, and under load the
    /// next session could still read the operation before.)
    async fn remember(&self, last: LastOperation) {
        let (app, msisdn) = (self.app.clone(), self.msisdn.get());
        let written = tokio::task::spawn_blocking(move || {
            app.store.put_ussd_last(msisdn, &last).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|joined| Err(joined.to_string()));
        if let Err(error) = written {
            tracing::warn!(%error, "ussd: keeping the last operation");
        }
    }

    /// The subscriber's answer to the current screen.
    pub async fn answer(&mut self, input: &str) -> Screen {
        let input = input.trim();
        if self.pages.len() > 1 {
            if input == "0" && self.page + 1 < self.pages.len() {
                self.page += 1;
                // The last page of a closing screen ends the dialogue.
                let end = matches!(self.step, Step::Closing) && self.page + 1 == self.pages.len();
                return Screen { text: self.pages[self.page].clone(), end };
            }
            if input == "00" && self.page > 0 {
                self.page -= 1;
                return Screen { text: self.pages[self.page].clone(), end: false };
            }
        }
        let step = std::mem::replace(&mut self.step, Step::Closing);
        match step {
            Step::Closing => Screen { text: self.texts().fill("main_title", &[]), end: true },
            Step::Guest => match input {
                "1" => self.ask(Step::RegisterPin, "ask_new_pin", None),
                "2" => self.language_menu(),
                _ => {
                    let notice = self.texts().fill("invalid_choice", &[]);
                    self.guest_menu(Some(notice))
                }
            },
            Step::Main => match input {
                "1" => self.ask(Step::BalancePin, "ask_pin", None),
                "2" => self.ask(Step::SendNumber, "ask_number", None),
                "3" => self.ask(Step::CashAmount, "ask_amount", None),
                "4" => self.ask(Step::StatementPin, "ask_pin", None),
                "5" => self.ask(Step::OldPin, "ask_old_pin", None),
                "6" => self.language_menu(),
                "7" => {
                    let text = self.last_operation();
                    self.end(text)
                }
                _ => {
                    let notice = self.texts().fill("invalid_choice", &[]);
                    self.main_menu(Some(notice))
                }
            },
            Step::Language => self.choose_language(input).await,
            Step::RegisterPin => match Pin::parse(input) {
                Ok(pin) => self.ask(Step::RegisterRepeat(pin), "ask_repeat_pin", None),
                Err(_) => self.ask(Step::RegisterPin, "ask_new_pin", Some("invalid_pin")),
            },
            Step::RegisterRepeat(pin) => {
                if !bool::from(pin.expose().as_bytes().ct_eq(input.as_bytes())) {
                    let text = self.texts().fill("pins_differ", &[]);
                    return self.end(text);
                }
                let (msisdn, language) = (self.msisdn, self.language);
                let result = self
                    .app
                    .domain
                    .register(msisdn, Some(&pin), language, Actor::customer(msisdn.get()))
                    .await;
                let text = match result {
                    Ok(()) => self.texts().fill(
                        "registered",
                        &[("msisdn", &msisdn.to_string()), ("service", &self.service_code)],
                    ),
                    Err(error) => self.refusal(&error),
                };
                self.end(text)
            }
            Step::BalancePin => {
                let Ok(pin) = Pin::parse(input) else {
                    return self.ask(Step::BalancePin, "ask_pin", Some("invalid_pin"));
                };
                let text = match self.balance(&pin).await {
                    Ok(text) => text,
                    Err(error) => self.refusal(&error),
                };
                self.end(text)
            }
            Step::SendNumber => match self.app.domain.msisdn(input) {
                Ok(to) => self.ask(Step::SendAmount { to }, "ask_amount", None),
                Err(_) => self.ask(Step::SendNumber, "ask_number", Some("invalid_number")),
            },
            Step::SendAmount { to } => {
                let Some(amount) = parse_amount(input) else {
                    return self.ask(Step::SendAmount { to }, "ask_amount", Some("invalid_amount"));
                };
                let fee = match self.app.domain.rules().tariffs.fee(codes::P2P, amount) {
                    Ok(fee) => fee,
                    Err(error) => {
                        let text = self.refusal(&OpError::Tariff(error));
                        return self.end(text);
                    }
                };
                self.confirm(to, amount, fee, None)
            }
            Step::SendConfirm { to, amount, fee } => match input {
                "1" => self.ask(Step::SendPin { to, amount, fee }, "ask_pin", None),
                "2" => {
                    let text = self.texts().fill("cancelled", &[]);
                    self.end(text)
                }
                _ => {
                    let notice = self.texts().fill("invalid_choice", &[]);
                    self.confirm(to, amount, fee, Some(notice))
                }
            },
            Step::SendPin { to, amount, fee } => {
                let Ok(pin) = Pin::parse(input) else {
                    return self.ask(Step::SendPin { to, amount, fee }, "ask_pin", Some("invalid_pin"));
                };
                let op = self.next_operation();
                let auth = CustomerAuth { pin: Some(&pin), otp: None, channel: channels::USSD };
                let result = self.app.domain.p2p(op, self.msisdn, to, amount, auth).await;
                let mut last = LastOperation {
                    at_s: now_s(),
                    kind: "send".into(),
                    amount,
                    fee,
                    to: Some(to.get()),
                    refused: None,
                };
                let text = match result {
                    Ok(receipt) => {
                        last.fee = receipt.fee;
                        self.texts().fill(
                            "sent",
                            &[
                                ("amount", &money(amount)),
                                ("to", &to.to_string()),
                                ("fee", &money(receipt.fee)),
                            ],
                        )
                    }
                    Err(error) => {
                        last.refused = Some(error.code().to_owned());
                        self.explain(&error).await
                    }
                };
                self.remember(last).await;
                self.end(text)
            }
            Step::CashAmount => match parse_amount(input) {
                Some(amount) => self.ask(Step::CashPin { amount }, "ask_pin", None),
                None => self.ask(Step::CashAmount, "ask_amount", Some("invalid_amount")),
            },
            Step::CashPin { amount } => {
                let Ok(pin) = Pin::parse(input) else {
                    return self.ask(Step::CashPin { amount }, "ask_pin", Some("invalid_pin"));
                };
                let op = self.next_operation();
                let auth = CustomerAuth { pin: Some(&pin), otp: None, channel: channels::USSD };
                let result = self.app.domain.issue_cash_code(op, self.msisdn, amount, auth).await;
                let mut last = LastOperation {
                    at_s: now_s(),
                    kind: "cash_code".into(),
                    amount,
                    fee: 0,
                    to: None,
                    refused: None,
                };
                let text = match result {
                    Ok(code) => {
                        last.fee = code.fee;
                        let minutes = (code.expires_in_s / 60).to_string();
                        self.texts().fill(
                            "cash_code",
                            &[
                                ("code", code.code.expose()),
                                ("amount", &money(code.amount)),
                                ("fee", &money(code.fee)),
                                ("minutes", &minutes),
                            ],
                        )
                    }
                    Err(error) => {
                        last.refused = Some(error.code().to_owned());
                        self.explain(&error).await
                    }
                };
                self.remember(last).await;
                self.end(text)
            }
            Step::StatementPin => {
                let Ok(pin) = Pin::parse(input) else {
                    return self.ask(Step::StatementPin, "ask_pin", Some("invalid_pin"));
                };
                let text = match self.app.domain.verify_pin(self.msisdn, &pin).await {
                    Ok(()) => {
                        // The statement shows every operation the customer was told about.
                        crate::current_views(&self.app.engine).await;
                        self.mini_statement()
                    }
                    Err(error) => self.refusal(&error),
                };
                self.end(text)
            }
            Step::OldPin => match Pin::parse(input) {
                Ok(old) => self.ask(Step::NewPin(old), "ask_new_pin", None),
                Err(_) => self.ask(Step::OldPin, "ask_old_pin", Some("invalid_pin")),
            },
            Step::NewPin(old) => match Pin::parse(input) {
                Ok(new) => self.ask(Step::RepeatPin(old, new), "ask_repeat_pin", None),
                Err(_) => self.ask(Step::NewPin(old), "ask_new_pin", Some("invalid_pin")),
            },
            Step::RepeatPin(old, new) => {
                if !bool::from(new.expose().as_bytes().ct_eq(input.as_bytes())) {
                    let text = self.texts().fill("pins_differ", &[]);
                    return self.end(text);
                }
                let text = match self.app.domain.change_pin(self.msisdn, Some(&old), &new).await {
                    Ok(()) => self.texts().fill("pin_changed", &[]),
                    Err(error) => self.refusal(&error),
                };
                self.end(text)
            }
        }
    }

    fn language_menu(&mut self) -> Screen {
        let text = self.texts().language_menu();
        self.show(Step::Language, text, false)
    }

    async fn choose_language(&mut self, input: &str) -> Screen {
        let chosen =
            input.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).and_then(|i| menu::LANGUAGES.get(i));
        let Some(&language) = chosen else {
            let notice = self.texts().fill("invalid_choice", &[]);
            let text = format!("{notice}\n{}", self.texts().language_menu());
            return self.show(Step::Language, text, false);
        };
        let stored = match self.app.domain.set_language(self.msisdn, language).await {
            Ok(()) => Ok(()),
            Err(OpError::Wallet(WalletRefusal::NotFound)) => {
                self.app.store.put_ussd_language(self.msisdn.get(), language).map_err(|e| e.to_string())
            }
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = stored {
            tracing::warn!(%error, "ussd: keeping the language");
            let text = self.texts().fill("unavailable", &[]);
            return self.end(text);
        }
        self.language = language;
        let text = self.texts().fill("language_set", &[]);
        self.end(text)
    }

    fn confirm(&mut self, to: Msisdn, amount: u64, fee: u64, notice: Option<String>) -> Screen {
        let text = self.texts().fill(
            "confirm_send",
            &[("amount", &money(amount)), ("to", &to.to_string()), ("fee", &money(fee))],
        );
        let text = self.with_notice(notice, text);
        self.show(Step::SendConfirm { to, amount, fee }, text, false)
    }

    async fn balance(&self, pin: &Pin) -> Result<String, OpError> {
        self.app.domain.verify_pin(self.msisdn, pin).await?;
        let view = self.app.domain.wallet(self.msisdn).await?;
        let account = view.accounts.iter().find(|a| a.account.currency == Currency::Azn);
        let (balance, available) =
            account.map_or((0, 0), |a| (a.account.balance_posted(), a.account.balance_available()));
        Ok(self.texts().fill("balance", &[("balance", &signed(balance)), ("available", &signed(available))]))
    }

    /// The last five lines of the wallet's statement, newest first.
    fn mini_statement(&self) -> String {
        let texts = self.texts();
        let Some(views) = self.app.engine.views() else {
            return texts.fill("unavailable", &[]);
        };
        let account = AccountId::wallet(self.msisdn.get(), Currency::Azn);
        let now = self.app.engine.now_ns();
        let lines = views.lines(account, engine::views::LinePosition::at(0), now.saturating_add(1));
        let mut rows = Vec::new();
        for line in lines.rev().take(5) {
            let Ok(line) = line else {
                return texts.fill("unavailable", &[]);
            };
            let when = engine::statement::rfc3339(line.booked_at);
            let sign = if line.debit { "-" } else { "+" };
            rows.push(format!(
                "{} {}{}",
                when.get(5..10).unwrap_or(&when),
                sign,
                crate::http::money(line.amount)
            ));
        }
        if rows.is_empty() {
            return texts.fill("statement_empty", &[]);
        }
        format!("{}\n{}", texts.fill("statement_title", &[]), rows.join("\n"))
    }

    fn last_operation(&self) -> String {
        let texts = self.texts();
        let last = match self.app.store.ussd_last(self.msisdn.get()) {
            Ok(Some(last)) => last,
            Ok(None) => return texts.fill("last_none", &[]),
            Err(error) => {
                tracing::warn!(%error, "ussd: reading the last operation");
                return texts.fill("unavailable", &[]);
            }
        };
        let time = short_time(last.at_s);
        let to = last
            .to
            .and_then(|to| Msisdn::from_u64(to, &self.app.domain.config().plan).ok())
            .map(|m| m.to_string())
            .unwrap_or_default();
        let (amount, fee) = (money(last.amount), money(last.fee));
        match &last.refused {
            None if last.kind == "send" => {
                texts.fill("last_sent", &[("time", &time), ("amount", &amount), ("to", &to), ("fee", &fee)])
            }
            None => texts.fill("last_cash_code", &[("time", &time), ("amount", &amount), ("fee", &fee)]),
            Some(code) => {
                let operation = texts.fill(if last.kind == "send" { "op_send" } else { "op_cash_code" }, &[]);
                let reason = texts.error(code, &[("remaining", "?")]);
                texts.fill(
                    "last_failed",
                    &[("time", &time), ("operation", &operation), ("amount", &amount), ("reason", &reason)],
                )
            }
        }
    }
}

fn parse_amount(input: &str) -> Option<u64> {
    let amount = Amount::parse(&input.replace(',', "."), Currency::Azn, Zero::Rejected).ok()?;
    u64::try_from(amount.minor()).ok().filter(|&a| a > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortcuts_follow_the_service_code() {
        assert_eq!(shortcut("*150#", "*150#"), Vec::<String>::new());
        assert_eq!(shortcut("*150#", "*150*2*0551234567*10#"), vec!["2", "0551234567", "10"]);
        assert_eq!(shortcut("*150#", "*151*2#"), Vec::<String>::new());
    }

    #[test]
    fn amounts_take_a_comma_or_a_point() {
        assert_eq!(parse_amount("12.50"), Some(1250));
        assert_eq!(parse_amount("12,5"), Some(1250));
        assert_eq!(parse_amount("0"), None);
        assert_eq!(parse_amount("1.234"), None);
        assert_eq!(parse_amount("-1"), None);
        assert_eq!(parse_amount("abc"), None);
    }
}
