//! Statements over the views' account history: pages of lines with an opaque, stable cursor,
//! accounting exports (CSV and JSON, one row per operation), and a spending summary by category.
//!
//! Every query names an account and a window of booked time `[from_ns, to_ns)`
//! ([`StatementQuery`]). [`page`] returns lines ([`HistoryEntry`], each with its
//! `balance_after`) and a [`Cursor`] to the next page; [`operations`] groups the legs of one
//! operation (principal, fee, commission: consecutive lines with the same `user_data`) into an
//! [`OperationRow`], which [`write_csv`] and [`write_json`] write; [`spending`] sums outflows per
//! [`Category`]. Money is written as decimals through [`crate::money`], never as floats.
//!
//! This module owns the statement formats (CSV columns, JSON keys, the cursor's encoding), as
//! the journal module owns rkyv: domain types derive no serde.

use std::io::Write;

use crate::ids::{AccountId, TransferId};
use crate::money::{Amount, Currency};
use crate::views::{HistoryEntry, LineKind, LinePosition, Views};
use crate::wallet::codes;

/// Lines one page holds at most; a larger page length is cut to it.
pub const PAGE_LEN_MAX: usize = 1_000;
/// Characters in an encoded cursor: 28 bytes in hexadecimal.
const CURSOR_LEN: usize = 56;

/// Why a statement could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The views store failed.
    #[error("views store: {0}")]
    Store(#[from] crate::views::ReadError),
    /// The cursor is not one this module issued.
    #[error(transparent)]
    Cursor(#[from] ParseCursorError),
    /// The cursor was issued for another account's statement.
    #[error("the cursor belongs to another account's statement")]
    CursorAccount,
    /// A sum too large for an amount (beyond `i64` minor units).
    #[error("an amount of {0} minor units is beyond what a statement can show")]
    AmountOutOfRange(i128),
    /// Writing the CSV failed.
    #[error("csv: {0}")]
    Csv(#[from] csv::Error),
    /// Writing the JSON failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The writer failed.
    #[error("write: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a cursor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseCursorError {
    /// Not the length of a cursor.
    #[error("a cursor has {CURSOR_LEN} characters, this one {0}")]
    Length(usize),
    /// A character that is not a lowercase hexadecimal digit.
    #[error("a cursor is lowercase hexadecimal")]
    NotHex,
    /// Well formed but not issued here (altered or truncated and padded).
    #[error("the cursor's checksum does not match: it was not issued by this service")]
    Checksum,
}

/// Where the next page of an account's statement starts: after the line at `position`.
/// Opaque to callers as text ([`Cursor::encode`]); stable, since a line's position never
/// changes and a line appended later sorts after every existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The account whose statement the cursor pages.
    pub account: AccountId,
    /// The last line returned.
    pub position: LinePosition,
}

impl Cursor {
    /// The cursor as text: account, booked time and line number, then a CRC32C of them, in
    /// lowercase hexadecimal.
    pub fn encode(&self) -> String {
        let mut bytes = [0_u8; 28];
        bytes[..8].copy_from_slice(&self.account.0.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.position.booked_at.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.position.line.to_be_bytes());
        let crc = crc32c::crc32c(&bytes[..24]);
        bytes[24..].copy_from_slice(&crc.to_be_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`Cursor::encode`]'s text.
    pub fn decode(text: &str) -> Result<Cursor, ParseCursorError> {
        if text.len() != CURSOR_LEN {
            return Err(ParseCursorError::Length(text.chars().count()));
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(ParseCursorError::NotHex),
        };
        let mut bytes = [0_u8; 28];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        let u64_at = |i: usize| {
            let mut word = [0_u8; 8];
            word.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(word)
        };
        let mut crc = [0_u8; 4];
        crc.copy_from_slice(&bytes[24..]);
        if crc32c::crc32c(&bytes[..24]) != u32::from_be_bytes(crc) {
            return Err(ParseCursorError::Checksum);
        }
        Ok(Cursor {
            account: AccountId(u64_at(0)),
            position: LinePosition { booked_at: u64_at(8), line: u64_at(16) },
        })
    }
}

/// An account's statement window, and optionally the operation codes to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementQuery {
    /// Whose statement.
    pub account: AccountId,
    /// Lines booked at or after this time (ns since the epoch)...
    pub from_ns: u64,
    /// ...and before this one.
    pub to_ns: u64,
    /// Only these operation codes; empty keeps all. [`page`] and [`spending`] filter lines by
    /// their code; [`operations`] and the exports filter rows by their principal's code, so
    /// that an operation keeps its fee.
    pub codes: Vec<u16>,
}

impl StatementQuery {
    /// Every line of `account` booked in `[from_ns, to_ns)`.
    pub fn new(account: AccountId, from_ns: u64, to_ns: u64) -> StatementQuery {
        StatementQuery { account, from_ns, to_ns, codes: Vec::new() }
    }

    /// The same window, keeping only `codes`.
    pub fn with_codes(self, codes: &[u16]) -> StatementQuery {
        StatementQuery { codes: codes.to_vec(), ..self }
    }

    fn keeps(&self, code: u16) -> bool {
        self.codes.is_empty() || self.codes.contains(&code)
    }

    fn lines(&self, views: &Views, start: LinePosition) -> crate::views::Lines {
        views.lines(self.account, start.max(LinePosition::at(self.from_ns)), self.to_ns)
    }
}

/// One page of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementPage {
    /// Oldest first.
    pub lines: Vec<HistoryEntry>,
    /// The cursor of the next page, or `None` if the window had no more lines when this page
    /// was read.
    pub next: Option<String>,
}

/// A page of at most `page_len` lines (1 to [`PAGE_LEN_MAX`]) of the statement, starting
/// after `cursor` (from the window's start without one). Paging a window with the cursors this
/// returns yields each line exactly once, in order, however many lines are appended meanwhile.
pub fn page(
    views: &Views,
    query: &StatementQuery,
    cursor: Option<&str>,
    page_len: usize,
) -> Result<StatementPage, StatementError> {
    let page_len = page_len.clamp(1, PAGE_LEN_MAX);
    let start = match cursor {
        None => LinePosition::at(query.from_ns),
        Some(text) => {
            let cursor = Cursor::decode(text)?;
            if cursor.account != query.account {
                return Err(StatementError::CursorAccount);
            }
            cursor.position.next()
        }
    };
    let mut lines: Vec<HistoryEntry> = Vec::with_capacity(page_len);
    let mut next = None;
    for line in query.lines(views, start) {
        let line = line?;
        if !query.keeps(line.code) {
            continue;
        }
        // A line past a full page: the page ends, and the next one starts after its last line.
        if lines.len() == page_len {
            next = lines
                .last()
                .map(|last| Cursor { account: query.account, position: last.position() }.encode());
            break;
        }
        lines.push(line);
    }
    Ok(StatementPage { lines, next })
}

/// Which way the principal of an operation moved money, seen from the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The account was credited.
    In,
    /// The account was debited.
    Out,
}

impl Direction {
    /// `in` or `out`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// One operation as seen from one account: its principal leg with the fee and commission legs
/// of the same operation that touched the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationRow {
    /// When the operation was booked (its lines share the time).
    pub booked_at: u64,
    /// The operation reference (`user_data`); 0 for a transfer without one.
    pub reference: u128,
    /// The principal leg.
    pub transfer_id: TransferId,
    /// The principal leg's code.
    pub code: u16,
    /// Posted, a hold placed, or a hold posted, voided or expired.
    pub kind: LineKind,
    /// The principal leg's direction.
    pub direction: Direction,
    /// The account's currency.
    pub currency: Currency,
    /// The principal amount (with any other non-fee leg of the operation), minor units.
    pub gross: u128,
    /// Fee legs that touched the account.
    pub fee: u128,
    /// Commission legs that touched the account.
    pub commission: u128,
    /// What the operation did to the account's posted balance (signed): the sum of its legs'
    /// changes, so that the nets of a statement add up to its balance change.
    pub net: i128,
    /// The other account of the principal leg.
    pub counterparty: AccountId,
    /// The account's posted balance after the operation.
    pub balance_after: i128,
}

/// Whether a leg is a fee or commission companion rather than an operation of its own.
fn companion(code: u16) -> bool {
    matches!(code, codes::FEE | codes::COMMISSION)
}

/// Groups consecutive lines into operations: lines join the row before them when they share a
/// non-zero `user_data`, a kind and a booked time (the legs of one operation are applied in one
/// journal record, one after the other).
#[derive(Debug, Default)]
struct Grouper {
    lines: Vec<HistoryEntry>,
}

impl Grouper {
    /// Adds a line; returns the row it closed, if it started a new one.
    fn push(&mut self, line: HistoryEntry) -> Option<OperationRow> {
        let joins = self.lines.first().is_some_and(|first| {
            line.user_data != 0
                && first.user_data == line.user_data
                && first.kind == line.kind
                && first.booked_at == line.booked_at
        });
        let closed = if joins { None } else { self.finish() };
        self.lines.push(line);
        closed
    }

    /// The row of the lines so far, if any.
    fn finish(&mut self) -> Option<OperationRow> {
        let lines = std::mem::take(&mut self.lines);
        let principal = lines.iter().position(|l| !companion(l.code)).unwrap_or(0);
        let (first, last) = (lines.get(principal)?, lines.last()?);
        let mut row = OperationRow {
            booked_at: first.booked_at,
            reference: first.user_data,
            transfer_id: first.transfer_id,
            code: first.code,
            kind: first.kind,
            direction: if first.debit { Direction::Out } else { Direction::In },
            currency: first.currency,
            gross: 0,
            fee: 0,
            commission: 0,
            net: 0,
            counterparty: first.other_account,
            balance_after: last.balance_after,
        };
        for (index, line) in lines.iter().enumerate() {
            let amount = u128::from(line.amount);
            match line.code {
                codes::FEE if index != principal => row.fee += amount,
                codes::COMMISSION if index != principal => row.commission += amount,
                _ => row.gross += amount,
            }
            row.net += line.posted_change();
        }
        Some(row)
    }
}

/// Groups lines (in history order) into operation rows.
pub fn group(lines: impl IntoIterator<Item = HistoryEntry>) -> Vec<OperationRow> {
    let mut grouper = Grouper::default();
    let mut rows: Vec<OperationRow> = lines.into_iter().filter_map(|line| grouper.push(line)).collect();
    rows.extend(grouper.finish());
    rows
}

/// Calls `visit` with each operation row of the window, oldest first.
fn each_operation(
    views: &Views,
    query: &StatementQuery,
    mut visit: impl FnMut(&OperationRow) -> Result<(), StatementError>,
) -> Result<usize, StatementError> {
    let mut grouper = Grouper::default();
    let mut count = 0;
    let mut emit = |row: Option<OperationRow>| -> Result<(), StatementError> {
        match row {
            Some(row) if query.keeps(row.code) => {
                count += 1;
                visit(&row)
            }
            _ => Ok(()),
        }
    };
    for line in query.lines(views, LinePosition::default()) {
        emit(grouper.push(line?))?;
    }
    emit(grouper.finish())?;
    Ok(count)
}

/// The window's operations, oldest first.
pub fn operations(views: &Views, query: &StatementQuery) -> Result<Vec<OperationRow>, StatementError> {
    let mut rows = Vec::new();
    each_operation(views, query, |row| {
        rows.push(*row);
        Ok(())
    })?;
    Ok(rows)
}

/// The name of an operation code, as exports write it.
pub fn code_name(code: u16) -> &'static str {
    match code {
        codes::P2P => "p2p",
        codes::CASH_IN => "cash_in",
        codes::CASH_OUT => "cash_out",
        codes::CASH_CODE => "cash_by_code",
        codes::MERCHANT_PAYMENT => "merchant_payment",
        codes::BILL_PAYMENT => "bill_payment",
        codes::ISSUANCE => "issuance",
        codes::FEE => "fee",
        codes::COMMISSION => "commission",
        codes::REVERSAL => "reversal",
        codes::REFUND => "refund",
        _ => "other",
    }
}

/// What money was spent on: one category per operation code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// P2P transfers to other wallets.
    Transfers,
    /// Cash taken out at an agent.
    CashOut,
    /// Cash by code (ATM or post office).
    CashByCode,
    /// Merchant payments.
    MerchantPayments,
    /// Bill payments.
    Bills,
    /// Fees paid.
    Fees,
    /// Commissions paid (by fee income).
    Commissions,
    /// Cash-ins (by an agent's float).
    CashIn,
    /// E-money issued (by the issuance account).
    Issuance,
    /// Reversals taken back by staff.
    Reversals,
    /// Refunds paid (by a merchant).
    Refunds,
    /// Any other code.
    Other,
}

impl Category {
    /// A stable machine name.
    pub fn name(self) -> &'static str {
        match self {
            Category::Transfers => "transfers",
            Category::CashOut => "cash_out",
            Category::CashByCode => "cash_by_code",
            Category::MerchantPayments => "merchant_payments",
            Category::Bills => "bills",
            Category::Fees => "fees",
            Category::Commissions => "commissions",
            Category::CashIn => "cash_in",
            Category::Issuance => "issuance",
            Category::Reversals => "reversals",
            Category::Refunds => "refunds",
            Category::Other => "other",
        }
    }
}

/// The category of an operation code.
pub fn category(code: u16) -> Category {
    match code {
        codes::P2P => Category::Transfers,
        codes::CASH_OUT => Category::CashOut,
        codes::CASH_CODE => Category::CashByCode,
        codes::MERCHANT_PAYMENT => Category::MerchantPayments,
        codes::BILL_PAYMENT => Category::Bills,
        codes::FEE => Category::Fees,
        codes::COMMISSION => Category::Commissions,
        codes::CASH_IN => Category::CashIn,
        codes::ISSUANCE => Category::Issuance,
        codes::REVERSAL => Category::Reversals,
        codes::REFUND => Category::Refunds,
        _ => Category::Other,
    }
}

/// Outflows of one category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CategorySpending {
    /// The category.
    pub category: Category,
    /// Legs debited (a fee leg counts under [`Category::Fees`], apart from its operation).
    pub count: u64,
    /// Minor units posted out.
    pub total: u128,
}

/// An account's posted outflows over a window, by category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendingSummary {
    /// The account's currency, if the window has any outflow.
    pub currency: Option<Currency>,
    /// Categories with outflows, in [`Category`] order.
    pub categories: Vec<CategorySpending>,
    /// Every category together.
    pub total: u128,
}

/// Sums the posted debits of the window (plain transfers and posted holds; holds still open,
/// voided or expired moved nothing) by the category of their code.
pub fn spending(views: &Views, query: &StatementQuery) -> Result<SpendingSummary, StatementError> {
    let mut sums: std::collections::BTreeMap<Category, (u64, u128)> = std::collections::BTreeMap::new();
    let mut currency = None;
    for line in query.lines(views, LinePosition::default()) {
        let line = line?;
        if !line.debit || !line.kind.moves_posted() || !query.keeps(line.code) {
            continue;
        }
        currency = Some(line.currency);
        let sum = sums.entry(category(line.code)).or_default();
        sum.0 += 1;
        sum.1 += u128::from(line.amount);
    }
    let categories: Vec<CategorySpending> = sums
        .into_iter()
        .map(|(category, (count, total))| CategorySpending { category, count, total })
        .collect();
    let total = categories.iter().map(|c| c.total).sum();
    Ok(SpendingSummary { currency, categories, total })
}

/// Nanoseconds since the epoch as RFC 3339 UTC with milliseconds: `2026-11-23T08:05:09.120Z`.
pub fn rfc3339(ns: u64) -> String {
    let seconds = ns / 1_000_000_000;
    let millis = (ns % 1_000_000_000) / 1_000_000;
    let days = i64::try_from(seconds / 86_400).unwrap_or(i64::MAX);
    let of_day = seconds % 86_400;
    let (year, month, day) = crate::wallet::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

/// Minor units as a decimal of the currency (`-12.50`), through [`Amount`].
pub fn decimal(minor: i128, currency: Currency) -> Result<String, StatementError> {
    let minor = i64::try_from(minor).map_err(|_| StatementError::AmountOutOfRange(minor))?;
    Ok(Amount::from_minor(minor, currency).to_decimal().to_string())
}

fn unsigned_decimal(minor: u128, currency: Currency) -> Result<String, StatementError> {
    let minor = i128::try_from(minor).map_err(|_| StatementError::AmountOutOfRange(i128::MAX))?;
    decimal(minor, currency)
}

/// An account as a statement names it: a wallet by its number (`+994501234567`), any other
/// account by its id (`s1` for a spread system account).
pub fn account_name(account: AccountId) -> String {
    use crate::domain::system;
    if let Some(msisdn) = account.wallet_msisdn() {
        return format!("+{msisdn}");
    }
    if let Some((agent, commission)) = account.agent_number() {
        return if commission { format!("agent {agent} commission") } else { format!("agent {agent}") };
    }
    if let Some(merchant) = account.merchant_number() {
        return format!("merchant {merchant}");
    }
    match account {
        system::FEE_INCOME => "fee income".to_owned(),
        system::EMONEY_ISSUANCE => "e-money issuance".to_owned(),
        system::ATM_CLEARING => "ATM clearing".to_owned(),
        system::REVERSALS => "reversals".to_owned(),
        other => other.to_string(),
    }
}

/// The CSV header [`write_csv`] writes.
pub const CSV_HEADER: [&str; 14] = [
    "time",
    "reference",
    "transfer_id",
    "code",
    "operation",
    "status",
    "direction",
    "currency",
    "gross",
    "fee",
    "commission",
    "net",
    "counterparty",
    "balance_after",
];

/// A row's fields, in [`CSV_HEADER`] order.
pub fn csv_record(row: &OperationRow) -> Result<[String; 14], StatementError> {
    let c = row.currency;
    Ok([
        rfc3339(row.booked_at),
        reference(row.reference),
        row.transfer_id.to_string(),
        row.code.to_string(),
        code_name(row.code).to_owned(),
        row.kind.name().to_owned(),
        row.direction.name().to_owned(),
        c.code().to_owned(),
        unsigned_decimal(row.gross, c)?,
        unsigned_decimal(row.fee, c)?,
        unsigned_decimal(row.commission, c)?,
        decimal(row.net, c)?,
        account_name(row.counterparty),
        decimal(row.balance_after, c)?,
    ])
}

/// An operation reference as 32 hexadecimal digits, or empty for none.
fn reference(user_data: u128) -> String {
    if user_data == 0 { String::new() } else { format!("{user_data:032x}") }
}

/// Writes the window's operations as CSV with [`CSV_HEADER`]; returns the rows written.
pub fn write_csv(views: &Views, query: &StatementQuery, out: impl Write) -> Result<usize, StatementError> {
    let mut writer = csv::Writer::from_writer(out);
    writer.write_record(CSV_HEADER)?;
    let count = each_operation(views, query, |row| Ok(writer.write_record(csv_record(row)?)?))?;
    writer.flush()?;
    Ok(count)
}

/// A row as a JSON object with [`CSV_HEADER`]'s keys; amounts are decimal strings, the code a
/// number.
pub fn json_record(row: &OperationRow) -> Result<serde_json::Value, StatementError> {
    let fields = csv_record(row)?;
    let mut object = serde_json::Map::new();
    for (key, value) in CSV_HEADER.iter().zip(fields) {
        object.insert((*key).to_owned(), serde_json::Value::String(value));
    }
    object.insert("code".to_owned(), serde_json::Value::from(row.code));
    if row.reference == 0 {
        object.insert("reference".to_owned(), serde_json::Value::Null);
    }
    Ok(serde_json::Value::Object(object))
}

/// Writes the window's operations as one JSON object, `{"account", "from", "to",
/// "operations": [...]}`, streaming the rows; returns the rows written.
pub fn write_json(
    views: &Views,
    query: &StatementQuery,
    mut out: impl Write,
) -> Result<usize, StatementError> {
    write!(
        out,
        "{{\"account\":{},\"from\":{},\"to\":{},\"operations\":[",
        serde_json::Value::String(account_name(query.account)),
        serde_json::Value::String(rfc3339(query.from_ns)),
        serde_json::Value::String(rfc3339(query.to_ns)),
    )?;
    let mut first = true;
    let count = each_operation(views, query, |row| {
        if !first {
            out.write_all(b",")?;
        }
        first = false;
        serde_json::to_writer(&mut out, &json_record(row)?)?;
        Ok(())
    })?;
    out.write_all(b"]}")?;
    out.flush()?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(line: u64, code: u16, amount: u64, debit: bool, balance_after: i128) -> HistoryEntry {
        HistoryEntry {
            timestamp: 1_000,
            booked_at: 1_000,
            line,
            transfer_id: TransferId(u128::from(line)),
            other_account: AccountId::wallet(994_501_234_567, Currency::Azn),
            amount,
            debit,
            code,
            pending: false,
            kind: LineKind::Posted,
            user_data: 0xabc,
            currency: Currency::Azn,
            balance_after,
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused_clearly() {
        let cursor = Cursor {
            account: AccountId::wallet(994_501_234_567, Currency::Azn),
            position: LinePosition { booked_at: 1_795_392_000_123_456_789, line: 42 },
        };
        let text = cursor.encode();
        assert_eq!(text.len(), CURSOR_LEN);
        assert_eq!(Cursor::decode(&text), Ok(cursor));
        assert_eq!(Cursor::decode(""), Err(ParseCursorError::Length(0)));
        assert_eq!(Cursor::decode("next-page"), Err(ParseCursorError::Length(9)));
        assert_eq!(Cursor::decode(&"z".repeat(CURSOR_LEN)), Err(ParseCursorError::NotHex));
        assert_eq!(Cursor::decode(&text.to_uppercase()), Err(ParseCursorError::NotHex));
        // Multi-byte characters are refused without slicing through them.
        assert!(Cursor::decode(&"é".repeat(CURSOR_LEN / 2)).is_err());
        // One changed digit anywhere fails the checksum.
        for at in [0, 17, 40, CURSOR_LEN - 1] {
            let mut altered = text.clone().into_bytes();
            altered[at] = if altered[at] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(altered).expect("ascii");
            assert_eq!(Cursor::decode(&altered), Err(ParseCursorError::Checksum), "digit {at}");
        }
        let message = StatementError::from(ParseCursorError::Checksum).to_string();
        assert!(message.contains("not issued by this service"), "{message}");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_392_000 * 1_000_000_000), "2026-11-23T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400 * 1_000_000_000 + 86_399_999_999_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(1_709_251_199 * 1_000_000_000 + 5_000_000), "2024-02-29T23:59:59.005Z");
    }

    #[test]
    fn legs_of_one_operation_make_one_row() {
        // A P2P with its fee, then an unrelated credit, then a transfer without a reference.
        let fee =
            HistoryEntry { other_account: AccountId::spread(1), ..line(2, codes::FEE, 25, true, 9_675) };
        let lines = vec![
            line(1, codes::P2P, 300, true, 9_700),
            fee,
            HistoryEntry { user_data: 0xdef, ..line(3, codes::CASH_IN, 1_000, false, 10_675) },
            HistoryEntry { user_data: 0, ..line(4, 0, 5, true, 10_670) },
            HistoryEntry { user_data: 0, ..line(5, 0, 6, true, 10_664) },
        ];
        let rows = group(lines);
        assert_eq!(rows.len(), 4, "{rows:?}");
        let p2p = rows[0];
        assert_eq!(
            (p2p.code, p2p.gross, p2p.fee, p2p.net, p2p.balance_after),
            (codes::P2P, 300, 25, -325, 9_675)
        );
        assert_eq!(p2p.direction, Direction::Out);
        assert_eq!(p2p.transfer_id, TransferId(1));
        assert_eq!((rows[1].direction, rows[1].net, rows[1].fee), (Direction::In, 1_000, 0));
        assert_eq!((rows[2].net, rows[3].net), (-5, -6));
        // Fee income's view of a cash-out: the fee in, the commission out; no principal of its
        // own, so the first leg is.
        let income = group(vec![
            HistoryEntry { debit: false, ..line(1, codes::FEE, 100, false, 100) },
            line(2, codes::COMMISSION, 40, true, 60),
        ]);
        assert_eq!(income.len(), 1);
        assert_eq!((income[0].gross, income[0].commission, income[0].net), (100, 40, 60));
    }

    #[test]
    fn csv_rows_are_decimal_and_named() -> Result<(), StatementError> {
        let fee =
            HistoryEntry { other_account: AccountId::spread(1), ..line(2, codes::FEE, 25, true, 9_675) };
        let rows = group(vec![line(1, codes::P2P, 300, true, 9_700), fee]);
        let record = csv_record(&rows[0])?;
        assert_eq!(
            record,
            [
                "1970-01-01T00:00:00.000Z",
                "00000000000000000000000000000abc",
                "00000000000000000000000000000001",
                "1",
                "p2p",
                "posted",
                "out",
                "AZN",
                "3.00",
                "0.25",
                "0.00",
                "-3.25",
                "+994501234567",
                "96.75",
            ]
        );
        let mut out = Vec::new();
        {
            let mut writer = csv::Writer::from_writer(&mut out);
            writer.write_record(CSV_HEADER)?;
            writer.write_record(record)?;
        }
        let text = String::from_utf8(out).map_err(|e| std::io::Error::other(e.to_string()))?;
        assert!(text.starts_with("time,reference,transfer_id,code,operation,status,direction,currency,"));
        let json = json_record(&rows[0])?;
        assert_eq!(json["net"], "-3.25");
        assert_eq!(json["code"], 1);
        assert!(matches!(
            decimal(i128::from(i64::MAX) + 1, Currency::Azn),
            Err(StatementError::AmountOutOfRange(_))
        ));
        Ok(())
    }

    #[test]
    fn every_code_has_a_category() {
        let expected = [
            (codes::P2P, Category::Transfers),
            (codes::CASH_OUT, Category::CashOut),
            (codes::CASH_CODE, Category::CashByCode),
            (codes::MERCHANT_PAYMENT, Category::MerchantPayments),
            (codes::BILL_PAYMENT, Category::Bills),
            (codes::FEE, Category::Fees),
            (codes::COMMISSION, Category::Commissions),
            (codes::CASH_IN, Category::CashIn),
            (codes::ISSUANCE, Category::Issuance),
            (codes::REVERSAL, Category::Reversals),
            (codes::REFUND, Category::Refunds),
            (0, Category::Other),
            (999, Category::Other),
        ];
        for (code, wanted) in expected {
            assert_eq!(category(code), wanted, "code {code}");
        }
        assert_eq!(Category::MerchantPayments.name(), "merchant_payments");
        assert_eq!(code_name(codes::CASH_CODE), "cash_by_code");
    }
}
