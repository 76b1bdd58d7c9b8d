//! The notification outbox: messages for customers (OTPs; money sent, received, cashed out;
//! wallet blocked) that the SMS sender drains, in append-only files ([`store`]). It is a view
//! fed from the durable journal by the views' pass ([`crate::views`]), so an entry exists only
//! for a change that was committed, and a pass applied again after a crash appends nothing
//! twice (an append skips keys at or below the newest one there).
//!
//! Keys ([`NotificationKey`]) come from the journal: the position after the record that caused
//! the notification and its index among that record's notifications. The outbox is thus ordered
//! like the journal, and its keys are the same however often a record is applied. The watermark
//! (the position of the newest entry) survives [`crate::views::reindex`], so a rebuild enqueues
//! only records past it and never re-sends what was delivered and acknowledged.
//!
//! A reader takes [`Outbox::oldest`] entries, sends them, and [`Outbox::ack`]s what was sent
//! (an unacknowledged entry is sent again after a restart: delivery is at least once). It may
//! acknowledge an OTP past its expiry without sending it ([`Notification::expired`]): the code
//! would be refused anyway. An OTP entry carries the nonce, never the code; the sender derives
//! the code with [`crate::Domain::otp_for_delivery`].
//!
//! Money notifications come one per operation per wallet: the legs of one operation (principal
//! and fee) touching one wallet are consecutive in one journal record and are merged.

mod store;

use std::io;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use store::{Frames, Store};

use crate::ids::{AccountId, TransferId};
use crate::money::Currency;
use crate::views::HistoryEntry;
use crate::wallet::codes;

/// Where a notification sits in the outbox: the journal position after the record that caused
/// it, then its place among that record's notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotificationKey {
    /// The journal position after the causing record.
    pub position: u64,
    /// The notification's index among the record's.
    pub index: u32,
}

impl NotificationKey {
    /// The key as stored: big-endian, so byte order is key order.
    pub fn to_bytes(self) -> [u8; 12] {
        let mut out = [0_u8; 12];
        out[..8].copy_from_slice(&self.position.to_be_bytes());
        out[8..].copy_from_slice(&self.index.to_be_bytes());
        out
    }

    /// The first key after this one.
    pub fn next(self) -> NotificationKey {
        match self.index.checked_add(1) {
            Some(index) => NotificationKey { position: self.position, index },
            None => NotificationKey { position: self.position.saturating_add(1), index: 0 },
        }
    }

    /// The key [`NotificationKey::to_bytes`] stored, if `bytes` is one.
    pub fn from_bytes(bytes: &[u8]) -> Option<NotificationKey> {
        let bytes: [u8; 12] = bytes.try_into().ok()?;
        let mut reader = Reader(&bytes);
        Some(NotificationKey {
            position: u64::from_be_bytes(reader.take()?),
            index: u32::from_be_bytes(reader.take()?),
        })
    }
}

/// What happened to a wallet's money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MoneyKind {
    /// The wallet paid (a P2P, a merchant, a bill).
    Sent = 1,
    /// The wallet received (a P2P, a cash-in, a refund).
    Received = 2,
    /// The wallet cashed out (at an agent, or a cash-by-code redeemed).
    CashedOut = 3,
}

impl MoneyKind {
    fn from_u8(value: u8) -> Option<MoneyKind> {
        Some(match value {
            1 => MoneyKind::Sent,
            2 => MoneyKind::Received,
            3 => MoneyKind::CashedOut,
            _ => return None,
        })
    }
}

/// A posted operation as one wallet saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoneyNotice {
    /// Sent, received or cashed out, by the principal leg's direction and code.
    pub kind: MoneyKind,
    /// The wallet's number.
    pub msisdn: u64,
    /// The wallet's account.
    pub account: AccountId,
    /// The account's currency.
    pub currency: Currency,
    /// The principal amount, minor units.
    pub amount: u64,
    /// The fee legs of the same operation that touched the wallet, minor units.
    pub fee: u64,
    /// The principal's operation code.
    pub code: u16,
    /// The principal's other account.
    pub counterparty: AccountId,
    /// The operation reference (`user_data`); 0 for a transfer without one.
    pub reference: u128,
    /// The principal transfer.
    pub transfer_id: TransferId,
    /// The wallet account's posted balance after the operation, minor units.
    pub balance_after: i128,
    /// When the views booked it (ns since the epoch).
    pub at: u64,
}

/// A message for a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// An OTP to deliver. The code is derived from `nonce` under the server secret by the
    /// sender ([`crate::Domain::otp_for_delivery`]); past `expires_at` it may be dropped.
    Otp {
        /// The number to send it to.
        msisdn: u64,
        /// What the code is derived from.
        nonce: u128,
        /// When the OTP stops being accepted (ns since the epoch).
        expires_at: u64,
    },
    /// Money sent, received or cashed out.
    Money(MoneyNotice),
    /// The wallet was blocked (by wrong PINs or by staff).
    Blocked {
        /// The wallet's number.
        msisdn: u64,
        /// Which block ([`crate::wallet::WalletState::PIN_BLOCKED`] or `STAFF_BLOCKED`).
        flag: u8,
        /// When (ns since the epoch).
        at: u64,
    },
}

const TAG_OTP: u8 = 1;
const TAG_MONEY: u8 = 2;
const TAG_BLOCKED: u8 = 3;

impl Notification {
    /// The number the notification goes to.
    pub fn msisdn(&self) -> u64 {
        match self {
            Notification::Otp { msisdn, .. } | Notification::Blocked { msisdn, .. } => *msisdn,
            Notification::Money(notice) => notice.msisdn,
        }
    }

    /// Whether the notification is not worth sending at `now_ns`: an OTP past its expiry. The
    /// reader may acknowledge such an entry without sending it.
    pub fn expired(&self, now_ns: u64) -> bool {
        matches!(self, Notification::Otp { expires_at, .. } if now_ns >= *expires_at)
    }

    /// The stored form: a tag byte, then the fields big-endian.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(104);
        self.encode_into(&mut out);
        out
    }

    /// [`Notification::encode`], appended to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Notification::Otp { msisdn, nonce, expires_at } => {
                out.push(TAG_OTP);
                out.extend_from_slice(&msisdn.to_be_bytes());
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&expires_at.to_be_bytes());
            }
            Notification::Money(n) => {
                out.push(TAG_MONEY);
                out.push(n.kind as u8);
                out.extend_from_slice(&n.msisdn.to_be_bytes());
                out.extend_from_slice(&n.account.0.to_be_bytes());
                out.push(n.currency as u8);
                out.extend_from_slice(&n.amount.to_be_bytes());
                out.extend_from_slice(&n.fee.to_be_bytes());
                out.extend_from_slice(&n.code.to_be_bytes());
                out.extend_from_slice(&n.counterparty.0.to_be_bytes());
                out.extend_from_slice(&n.reference.to_be_bytes());
                out.extend_from_slice(&n.transfer_id.0.to_be_bytes());
                out.extend_from_slice(&n.balance_after.to_be_bytes());
                out.extend_from_slice(&n.at.to_be_bytes());
            }
            Notification::Blocked { msisdn, flag, at } => {
                out.push(TAG_BLOCKED);
                out.extend_from_slice(&msisdn.to_be_bytes());
                out.push(*flag);
                out.extend_from_slice(&at.to_be_bytes());
            }
        }
    }

    /// The notification [`Notification::encode`] stored, if `bytes` is one (whole).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Notification> {
        let mut r = Reader(bytes);
        let [tag] = r.take()?;
        let notification = match tag {
            TAG_OTP => Notification::Otp {
                msisdn: u64::from_be_bytes(r.take()?),
                nonce: u128::from_be_bytes(r.take()?),
                expires_at: u64::from_be_bytes(r.take()?),
            },
            TAG_MONEY => {
                let [kind] = r.take()?;
                let kind = MoneyKind::from_u8(kind)?;
                let msisdn = u64::from_be_bytes(r.take()?);
                let account = AccountId(u64::from_be_bytes(r.take()?));
                let [currency] = r.take()?;
                Notification::Money(MoneyNotice {
                    kind,
                    msisdn,
                    account,
                    currency: Currency::from_u8(currency)?,
                    amount: u64::from_be_bytes(r.take()?),
                    fee: u64::from_be_bytes(r.take()?),
                    code: u16::from_be_bytes(r.take()?),
                    counterparty: AccountId(u64::from_be_bytes(r.take()?)),
                    reference: u128::from_be_bytes(r.take()?),
                    transfer_id: TransferId(u128::from_be_bytes(r.take()?)),
                    balance_after: i128::from_be_bytes(r.take()?),
                    at: u64::from_be_bytes(r.take()?),
                })
            }
            TAG_BLOCKED => {
                let msisdn = u64::from_be_bytes(r.take()?);
                let [flag] = r.take()?;
                Notification::Blocked { msisdn, flag, at: u64::from_be_bytes(r.take()?) }
            }
            _ => return None,
        };
        r.0.is_empty().then_some(notification)
    }
}

/// Reads fixed-size fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_at_checked(N)?;
        self.0 = rest;
        head.try_into().ok()
    }
}

/// Whether a leg accompanies an operation (its fee or commission) rather than being one.
fn companion(code: u16) -> bool {
    matches!(code, codes::FEE | codes::COMMISSION)
}

/// A notification of the record being applied, money ones still gathering their legs.
#[derive(Debug)]
enum Draft {
    Ready(Notification),
    Money(Box<MoneyDraft>),
}

/// One operation's legs on one wallet so far, summed as they come.
#[derive(Debug)]
struct MoneyDraft {
    msisdn: u64,
    account: AccountId,
    /// The first leg: it names the operation (reference and direction) and stands for the
    /// principal if every leg is a fee or commission.
    first: HistoryEntry,
    /// The first leg that is not a fee or commission.
    principal: Option<HistoryEntry>,
    /// The amounts of the legs that are not fees or commissions, and of those that are.
    amounts: u64,
    companions: u64,
    balance_after: i128,
}

impl MoneyDraft {
    fn new(msisdn: u64, account: AccountId, line: &HistoryEntry) -> MoneyDraft {
        let mut draft = MoneyDraft {
            msisdn,
            account,
            first: *line,
            principal: None,
            amounts: 0,
            companions: 0,
            balance_after: line.balance_after,
        };
        draft.add(line);
        draft
    }

    fn add(&mut self, line: &HistoryEntry) {
        // Legs of one operation are each a u64; their sum cannot pass one only by a bug.
        if companion(line.code) {
            self.companions = self.companions.saturating_add(line.amount);
        } else {
            self.amounts = self.amounts.saturating_add(line.amount);
            self.principal.get_or_insert(*line);
        }
        self.balance_after = line.balance_after;
    }

    /// The legs as one notice: the principal is the first leg that is not a fee or commission
    /// (or the first leg), the fee the companions beside it.
    fn notice(&self) -> MoneyNotice {
        let (principal, amount, fee) = match &self.principal {
            Some(principal) => (principal, self.amounts, self.companions),
            None => (&self.first, self.first.amount, self.companions.saturating_sub(self.first.amount)),
        };
        let kind = match (principal.debit, principal.code) {
            (true, codes::CASH_OUT | codes::CASH_CODE) => MoneyKind::CashedOut,
            (true, _) => MoneyKind::Sent,
            (false, _) => MoneyKind::Received,
        };
        MoneyNotice {
            kind,
            msisdn: self.msisdn,
            account: self.account,
            currency: principal.currency,
            amount,
            fee,
            code: principal.code,
            counterparty: principal.other_account,
            reference: principal.user_data,
            transfer_id: principal.transfer_id,
            balance_after: self.balance_after,
            at: principal.booked_at,
        }
    }
}

/// The notifications of one journal record, in the order they arose: the views' pass fills it
/// while applying the record and takes it at the record's end.
#[derive(Debug, Default)]
pub(crate) struct RecordNotices {
    drafts: Vec<Draft>,
    /// The money draft of each (wallet account, reference, direction) in `drafts`, by index:
    /// a record holds thousands of operations, and a leg finds its operation's draft in one
    /// probe instead of a scan.
    by_operation: rustc_hash::FxHashMap<(AccountId, u128, bool), usize>,
}

impl RecordNotices {
    /// Adds a notification that needs no merging.
    pub(crate) fn push(&mut self, notification: Notification) {
        self.drafts.push(Draft::Ready(notification));
    }

    /// Adds a posted line of wallet `account`: to the notification of the same operation (same
    /// non-zero reference and direction) if this record has one, or as a new one.
    pub(crate) fn money(&mut self, msisdn: u64, account: AccountId, line: &HistoryEntry) {
        if line.user_data != 0 {
            let key = (account, line.user_data, line.debit);
            if let Some(Draft::Money(draft)) =
                self.by_operation.get(&key).and_then(|index| self.drafts.get_mut(*index))
            {
                draft.add(line);
                return;
            }
            self.by_operation.insert(key, self.drafts.len());
        }
        self.drafts.push(Draft::Money(Box::new(MoneyDraft::new(msisdn, account, line))));
    }

    /// The record's notifications, in order; empties the collector.
    pub(crate) fn take(&mut self) -> Vec<Notification> {
        self.by_operation.clear();
        self.drafts
            .drain(..)
            .map(|draft| match draft {
                Draft::Ready(notification) => notification,
                Draft::Money(draft) => Notification::Money(draft.notice()),
            })
            .collect()
    }
}

/// The reading end of the outbox. Cheap to clone; every clone sees the same entries.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<Store>,
    enqueued: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    pub(crate) fn new(store: Arc<Store>, enqueued: tokio::sync::watch::Receiver<u64>) -> Outbox {
        Outbox { store, enqueued }
    }

    /// The oldest `n` entries not yet acknowledged, oldest first. An entry that cannot be decoded
    /// (written by a newer release) is skipped with a warning and left in place.
    pub fn oldest(&self, n: usize) -> io::Result<Vec<(NotificationKey, Notification)>> {
        self.store.read(None, n)
    }

    /// The oldest `n` entries from `from` on (from the oldest entry if `None`), oldest first:
    /// how a reader that remembers where it stopped reads only what came since.
    pub fn oldest_from(
        &self,
        from: Option<NotificationKey>,
        n: usize,
    ) -> io::Result<Vec<(NotificationKey, Notification)>> {
        self.store.read(from, n)
    }

    /// The entry at `key`, if it is still waiting (and can be decoded).
    pub fn get(&self, key: NotificationKey) -> io::Result<Option<Notification>> {
        self.store.get(key)
    }

    /// Acknowledges delivered (or deliberately dropped) entries: they are not read again.
    /// Acknowledging one twice, or one that is not there, changes nothing. The acknowledgement
    /// reaches the operating system before this returns (not the disk: after a power cut a few
    /// may be sent again).
    pub fn ack(&self, keys: &[NotificationKey]) -> io::Result<()> {
        self.store.ack(keys)
    }

    /// Entries waiting (counted by a read of each: for tests and metrics, not a hot loop).
    pub fn len(&self) -> io::Result<usize> {
        self.store.waiting()
    }

    /// Bytes of entries from the oldest one waiting to the newest (some of them may be
    /// acknowledged out of order), and the outbox's segment files: how far the sender is
    /// behind, without reading an entry (for metrics).
    pub fn backlog(&self) -> (u64, usize) {
        self.store.backlog()
    }

    /// Whether no entry is waiting.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.store.read(None, 1)?.is_empty())
    }

    /// Resolves when the views have enqueued entries since this handle last saw them; `false`
    /// once the views have stopped. The reader then calls [`Outbox::oldest`].
    pub async fn changed(&mut self) -> bool {
        self.enqueued.changed().await.is_ok()
    }

    /// Blocks until an entry is waiting or `timeout` passes, polling; returns whether one is.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        while self.is_empty()? {
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::LineKind;

    const PAYER: u64 = 994_501_234_567;

    fn line(code: u16, amount: u64, debit: bool, user_data: u128, balance_after: i128) -> HistoryEntry {
        HistoryEntry {
            timestamp: 10,
            booked_at: 11,
            line: 1,
            transfer_id: TransferId(user_data ^ u128::from(code)),
            other_account: AccountId::spread(5),
            amount,
            debit,
            code,
            pending: false,
            kind: LineKind::Posted,
            user_data,
            currency: Currency::Azn,
            balance_after,
        }
    }

    #[test]
    fn keys_sort_like_the_journal_and_round_trip() {
        let a = NotificationKey { position: 100, index: 7 };
        let b = NotificationKey { position: 101, index: 0 };
        assert!(a.to_bytes() < b.to_bytes() && a < b);
        assert_eq!(NotificationKey::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(NotificationKey::from_bytes(&[0; 11]), None);
    }

    #[test]
    fn notifications_round_trip_and_refuse_garbage() {
        let account = AccountId::wallet(PAYER, Currency::Azn);
        let notices = [
            Notification::Otp { msisdn: PAYER, nonce: u128::MAX - 3, expires_at: 99 },
            Notification::Blocked { msisdn: PAYER, flag: 2, at: 5 },
            Notification::Money(MoneyNotice {
                kind: MoneyKind::CashedOut,
                msisdn: PAYER,
                account,
                currency: Currency::Eur,
                amount: 5_050,
                fee: 51,
                code: codes::CASH_OUT,
                counterparty: AccountId(3),
                reference: 77,
                transfer_id: TransferId(78),
                balance_after: -1,
                at: 1_000,
            }),
        ];
        for notification in notices {
            let bytes = notification.encode();
            assert_eq!(Notification::decode(&bytes), Some(notification));
            assert_eq!(Notification::decode(&bytes[..bytes.len() - 1]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Notification::decode(&longer), None);
        }
        assert_eq!(Notification::decode(&[9, 1, 2]), None);
        assert_eq!(Notification::decode(&[]), None);
    }

    #[test]
    fn one_notice_per_operation_and_wallet() {
        let payer = AccountId::wallet(PAYER, Currency::Azn);
        let payee = AccountId::wallet(PAYER + 1, Currency::Azn);
        let mut notices = RecordNotices::default();
        // A P2P (principal then fee) for the payer, the payee's credit, then a transfer with no
        // reference, twice: those stay apart.
        notices.money(
            PAYER,
            payer,
            &HistoryEntry { other_account: payee, ..line(codes::P2P, 300, true, 1, 700) },
        );
        notices.money(
            PAYER + 1,
            payee,
            &HistoryEntry { other_account: payer, ..line(codes::P2P, 300, false, 1, 300) },
        );
        notices.money(PAYER, payer, &line(codes::FEE, 25, true, 1, 675));
        notices.push(Notification::Blocked { msisdn: PAYER, flag: 1, at: 11 });
        notices.money(PAYER, payer, &line(0, 5, true, 0, 670));
        notices.money(PAYER, payer, &line(0, 6, true, 0, 664));
        notices.money(PAYER, payer, &line(codes::CASH_OUT, 100, true, 2, 564));
        // A fee alone is its own principal; a fee before its principal is still the fee.
        notices.money(PAYER, payer, &line(codes::FEE, 7, true, 3, 557));
        notices.money(PAYER, payer, &line(codes::FEE, 2, true, 4, 555));
        notices.money(PAYER, payer, &line(codes::P2P, 50, true, 4, 505));
        let taken = notices.take();
        assert!(notices.take().is_empty());
        /// (msisdn, and for money: kind, amount, fee, balance after)
        type Seen = (u64, Option<(MoneyKind, u64, u64, i128)>);
        let kinds: Vec<Seen> = taken
            .iter()
            .map(|n| match n {
                Notification::Money(m) => (m.msisdn, Some((m.kind, m.amount, m.fee, m.balance_after))),
                other => (other.msisdn(), None),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (PAYER, Some((MoneyKind::Sent, 300, 25, 675))),
                (PAYER + 1, Some((MoneyKind::Received, 300, 0, 300))),
                (PAYER, None),
                (PAYER, Some((MoneyKind::Sent, 5, 0, 670))),
                (PAYER, Some((MoneyKind::Sent, 6, 0, 664))),
                (PAYER, Some((MoneyKind::CashedOut, 100, 0, 564))),
                (PAYER, Some((MoneyKind::Sent, 7, 0, 557))),
                (PAYER, Some((MoneyKind::Sent, 50, 2, 505))),
            ]
        );
        let Notification::Money(sent) = taken[0] else { panic!("{taken:?}") };
        assert_eq!((sent.counterparty, sent.reference, sent.code), (payee, 1, codes::P2P));
    }

    #[test]
    fn only_otps_expire() {
        let otp = Notification::Otp { msisdn: PAYER, nonce: 1, expires_at: 100 };
        assert!(!otp.expired(99));
        assert!(otp.expired(100));
        assert!(!Notification::Blocked { msisdn: PAYER, flag: 1, at: 0 }.expired(u64::MAX));
    }
}
