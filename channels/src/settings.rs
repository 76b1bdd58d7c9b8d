//! The live wallet rules (KYC tiers with their limits, tariffs, commissions) as administrators
//! and the server store see them, and who wins at start: the configuration file or the changes
//! administrators made since.
//!
//! Start with [`reconcile`] (the precedence rule) and [`change`] (one administrator's change:
//! checked, stored with who and when, then put in force). The JSON forms ([`TierJson`],
//! [`TariffJson`]) are the API's and the store's alike, and are read back through the same
//! checks as the configuration file (`engine::config`), so a value the file would refuse is
//! refused here too, with the field named.
//!
//! Precedence: the file's tiers, tariffs and commissions are fingerprinted (SHA-256 of their
//! JSON form). At start, if the store has live rules recorded for the same fingerprint, the file
//! has not changed since it was last applied and the live rules (with every administrator's
//! change) win; if the fingerprint differs, or the store has none, the file wins and becomes the
//! live rules. The file's other wallet settings (attempt limits, the day offset, TTLs) are not
//! changed over the API and always come from the file.

use axum::http::StatusCode;
use engine::config::{ConfigError, Count, LimitsText, TariffText};
use engine::tariff::{Tariff, TariffTable};
use engine::wallet::{Limits, Policy, Tier};
use engine::{Currency, Rules};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::store::Store;

/// Who changed the rules when the configuration file won at start (an administrator's key id
/// otherwise).
pub const CONFIG_FILE: &str = "configuration file";

/// A count limit as JSON: a whole number, or `"unlimited"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum CountJson {
    Number(u64),
    Text(String),
}

/// One tier's limits in one currency. Amounts are decimal text in the currency or
/// `"unlimited"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsJson {
    /// AZN, USD or EUR.
    pub currency: String,
    pub max_balance: String,
    pub max_per_operation: String,
    pub daily_amount: String,
    pub daily_count: CountJson,
    pub monthly_amount: String,
    pub monthly_count: CountJson,
}

/// A KYC tier: its name and its limits, one entry per currency (the code is in the path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierJson {
    pub name: String,
    pub limits: Vec<LimitsJson>,
}

/// A tariff or commission: `fixed + amount × percent_bps / 10 000`, raised to `min`, lowered
/// to `max` (absent or null: no maximum). Amounts are AZN decimal text; absent `fixed` and
/// `min` are 0.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TariffJson {
    #[serde(default)]
    pub fixed: Option<String>,
    /// Basis points: 50 is 0.5 %, at most 10 000.
    #[serde(default)]
    pub percent_bps: u32,
    #[serde(default)]
    pub min: Option<String>,
    #[serde(default)]
    pub max: Option<String>,
}

/// The live rules as the server store keeps them, with the fingerprint of the configuration
/// file's rules they descend from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRules {
    pub file_sha256: String,
    pub tiers: Vec<(u8, TierJson)>,
    pub tariffs: Vec<(u16, TariffJson)>,
    pub commissions: Vec<(u16, TariffJson)>,
}

/// One change of the rules: who, when, what, and the new value (null: removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsChange {
    pub at_s: u64,
    pub by: String,
    pub action: String,
    pub target: String,
    pub value: serde_json::Value,
}

fn limit_text(minor: u64) -> String {
    if minor == u64::MAX { "unlimited".to_owned() } else { crate::http::money(minor) }
}

fn count_json(count: u32) -> CountJson {
    if count == u32::MAX { CountJson::Text("unlimited".to_owned()) } else { CountJson::Number(count.into()) }
}

/// A tier as JSON, limits formatted as the GET shows them.
pub fn tier_json(tier: &Tier) -> TierJson {
    let limits = tier
        .limits
        .iter()
        .map(|(currency, l): &(u8, Limits)| LimitsJson {
            currency: Currency::from_u8(*currency).map_or("?", |c| c.code()).to_owned(),
            max_balance: limit_text(l.max_balance),
            max_per_operation: limit_text(l.max_per_operation),
            daily_amount: limit_text(l.daily_amount),
            daily_count: count_json(l.daily_count),
            monthly_amount: limit_text(l.monthly_amount),
            monthly_count: count_json(l.monthly_count),
        })
        .collect();
    TierJson { name: tier.name.clone(), limits }
}

pub fn tariff_json(tariff: &Tariff) -> TariffJson {
    TariffJson {
        fixed: Some(crate::http::money(tariff.fixed)),
        percent_bps: tariff.percent_bps,
        min: Some(crate::http::money(tariff.min)),
        max: (tariff.max > 0).then(|| crate::http::money(tariff.max)),
    }
}

/// A configuration check's refusal as the API's: 422 naming the field.
fn invalid(error: ConfigError) -> ApiError {
    ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", &error.path, error.problem.to_string())
}

fn count(path: &str, count: &CountJson) -> Result<Count, ApiError> {
    match count {
        CountJson::Number(n) => Ok(Count::Number(i64::try_from(*n).unwrap_or(i64::MAX))),
        CountJson::Text(text) if text.trim() == "unlimited" => Ok(Count::Unlimited),
        CountJson::Text(_) => Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            path,
            "a whole number such as 100, or \"unlimited\"",
        )),
    }
}

/// Checks a tier: a name, at least one currency's limits, each currency once, each limit
/// sensible (positive, and none that another makes unreachable).
pub fn tier(code: u8, json: &TierJson) -> Result<Tier, ApiError> {
    let name = engine::config::tier_name("name", &json.name).map_err(invalid)?;
    if json.limits.is_empty() {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "limits",
            "at least one currency's limits: a tier without them would limit nothing",
        ));
    }
    let mut limits: Vec<(u8, Limits)> = Vec::new();
    for (index, entry) in json.limits.iter().enumerate() {
        let path = format!("limits[{index}]");
        let currency: Currency = entry.currency.parse().map_err(|e: engine::money::ParseCurrencyError| {
            ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                &format!("{path}.currency"),
                e.to_string(),
            )
        })?;
        if limits.iter().any(|(c, _)| *c == currency as u8) {
            return Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                &format!("{path}.currency"),
                format!("{currency} is listed twice"),
            ));
        }
        let text = LimitsText {
            max_balance: &entry.max_balance,
            max_per_operation: &entry.max_per_operation,
            daily_amount: &entry.daily_amount,
            daily_count: count(&format!("{path}.daily_count"), &entry.daily_count)?,
            monthly_amount: &entry.monthly_amount,
            monthly_count: count(&format!("{path}.monthly_count"), &entry.monthly_count)?,
        };
        limits.push((currency as u8, engine::config::limits(&path, &text, currency).map_err(invalid)?));
    }
    Ok(Tier { code, name, limits })
}

/// Checks a tariff: amounts, `min` and `fixed` not above `max`, the percentage within 100 %
/// (`Tariff::validate`).
pub fn tariff(json: &TariffJson) -> Result<Tariff, ApiError> {
    let text = TariffText {
        fixed: json.fixed.as_deref(),
        percent_bps: json.percent_bps,
        min: json.min.as_deref(),
        max: json.max.as_deref(),
    };
    engine::config::tariff("", &text).map_err(invalid)
}

/// An operation a tariff can price, from the path: `p2p`, `cash_out`, … or its code number.
pub fn operation(text: &str) -> Result<u16, ApiError> {
    engine::config::operation("operation", text).map_err(invalid)
}

/// The stored form of `rules`.
pub fn stored(rules: &Rules, file_sha256: &str) -> StoredRules {
    let table = |t: &TariffTable| t.iter().map(|(code, tariff)| (code, tariff_json(tariff))).collect();
    StoredRules {
        file_sha256: file_sha256.to_owned(),
        tiers: rules.policy.tiers.iter().map(|t| (t.code, tier_json(t))).collect(),
        tariffs: table(&rules.tariffs),
        commissions: table(&rules.commissions),
    }
}

/// The live rules from their stored form, on top of the file's `policy` (its attempt limits
/// and day offset). Checked as an administrator's input is: a damaged record fails the start.
pub fn from_stored(stored: &StoredRules, policy: &Policy) -> Result<Rules, ApiError> {
    let mut tiers = Vec::new();
    for (code, json) in &stored.tiers {
        tiers.push(tier(*code, json)?);
    }
    let table = |rows: &[(u16, TariffJson)]| -> Result<TariffTable, ApiError> {
        let mut table = TariffTable::new();
        for (code, json) in rows {
            table.set(*code, tariff(json)?).map_err(ApiError::internal)?;
        }
        Ok(table)
    };
    Ok(Rules {
        policy: Policy { tiers, ..policy.clone() },
        tariffs: table(&stored.tariffs)?,
        commissions: table(&stored.commissions)?,
    })
}

/// The fingerprint of a configuration file's tiers, tariffs and commissions.
pub fn fingerprint(rules: &Rules) -> String {
    let canonical = serde_json::to_vec(&stored(rules, "")).unwrap_or_default();
    crate::http::auth::sha256_hex(&canonical)
}

/// Which rules are in force from this start: the file's (`file`, with the demo's tariffs if
/// any) or the live ones in the store. See the module's documentation for the rule. Logs which
/// source won, and records the file's rules as live (with a change entry) when the file wins.
pub fn reconcile(store: &Store, file: Rules) -> anyhow::Result<Rules> {
    let file_sha256 = fingerprint(&file);
    let recorded = store.rules()?;
    match recorded {
        Some(live) if live.file_sha256 == file_sha256 => {
            let rules = from_stored(&live, &file.policy).map_err(|e| {
                anyhow::anyhow!(
                    "the server store's live wallet rules: {}: {}",
                    e.field.unwrap_or_default(),
                    e.message
                )
            })?;
            tracing::info!(
                source = "server store",
                changed_by_admins = rules != file,
                "wallet rules: the configuration file's tiers, tariffs and commissions are unchanged since they \
                 were applied; the live rules (with administrators' changes) stay in force"
            );
            Ok(rules)
        }
        recorded => {
            let reason = if recorded.is_some() {
                "the configuration file's tiers, tariffs or commissions changed since they were applied: they \
                 replace the live rules"
            } else {
                "first start with this store: the configuration file's rules become the live rules"
            };
            tracing::info!(source = "configuration file", "wallet rules: {reason}");
            let change = SettingsChange {
                at_s: crate::http::auth::now_s(),
                by: CONFIG_FILE.to_owned(),
                action: "apply_configuration_file".to_owned(),
                target: file_sha256.clone(),
                value: json!(null),
            };
            store.put_rules(&stored(&file, &file_sha256), &change)?;
            Ok(file)
        }
    }
}

/// One administrator's change of the rules: `edit` changes a copy of the live rules (or
/// refuses); the result is stored durably with who and when, then put in force. Changes are
/// serialized. An edit that changes nothing records nothing.
///
/// The store is written first: if the engine then fails to take the policy (it is stopping),
/// the next start puts the stored rules in force, so an answered change is never lost.
pub async fn change(
    state: &AppState,
    by: &str,
    action: &str,
    target: &str,
    value: serde_json::Value,
    edit: impl FnOnce(&mut Rules) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let editor = state.domain.edit_rules().await;
    let current = editor.current();
    let mut rules = (*current).clone();
    edit(&mut rules)?;
    if rules == *current {
        return Ok(());
    }
    rules.validate().map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string()))?;
    let file_sha256 = state.store.rules()?.map(|r| r.file_sha256).unwrap_or_default();
    let change = SettingsChange {
        at_s: crate::http::auth::now_s(),
        by: by.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        value,
    };
    state.store.put_rules(&stored(&rules, &file_sha256), &change)?;
    editor.apply(rules).await?;
    tracing::info!(by, action, target, "wallet rules changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_per_operation: &str, daily_count: CountJson) -> LimitsJson {
        LimitsJson {
            currency: "AZN".into(),
            max_balance: "300.00".into(),
            max_per_operation: max_per_operation.into(),
            daily_amount: "300".into(),
            daily_count,
            monthly_amount: "unlimited".into(),
            monthly_count: CountJson::Text("unlimited".into()),
        }
    }

    fn field(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        match result {
            Ok(value) => panic!("accepted as {value:?}"),
            Err(error) => {
                assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY, "{error:?}");
                error.field.unwrap_or_default()
            }
        }
    }

    #[test]
    fn tiers_round_trip_through_json() {
        for tier in Policy::default().tiers {
            assert_eq!(super::tier(tier.code, &tier_json(&tier)).ok(), Some(tier));
        }
        let json = TierJson { name: " basic ".into(), limits: vec![limits("200.50", CountJson::Number(20))] };
        let tier = super::tier(7, &json).expect("a valid tier");
        assert_eq!((tier.code, tier.name.as_str()), (7, "basic"));
        let l = tier.limits(Currency::Azn);
        assert_eq!((l.max_per_operation, l.daily_amount, l.daily_count), (20_050, 30_000, 20));
        assert_eq!((l.monthly_amount, l.monthly_count), (u64::MAX, u32::MAX));
        assert_eq!(tier_json(&tier).limits[0].monthly_count, CountJson::Text("unlimited".into()));
    }

    #[test]
    fn bad_tiers_name_their_field() {
        let tier = |limits| TierJson { name: "basic".into(), limits };
        assert_eq!(field(super::tier(1, &tier(vec![]))), "limits");
        assert_eq!(field(super::tier(1, &TierJson { name: " ".into(), limits: vec![] })), "name");
        let ok = limits("200.00", CountJson::Number(20));
        assert_eq!(field(super::tier(1, &tier(vec![ok.clone(), ok.clone()]))), "limits[1].currency");
        let bad = LimitsJson { currency: "GBP".into(), ..ok.clone() };
        assert_eq!(field(super::tier(1, &tier(vec![bad]))), "limits[0].currency");
        // Per operation above the day's amount could never be reached.
        let bad = LimitsJson { currency: "USD".into(), ..limits("301.00", CountJson::Number(20)) };
        assert_eq!(field(super::tier(1, &tier(vec![ok.clone(), bad]))), "limits[1].max_per_operation");
        assert_eq!(
            field(super::tier(1, &tier(vec![limits("1.5.0", CountJson::Number(1))]))),
            "limits[0].max_per_operation"
        );
        assert_eq!(
            field(super::tier(1, &tier(vec![limits("0", CountJson::Number(1))]))),
            "limits[0].max_per_operation"
        );
        assert_eq!(
            field(super::tier(1, &tier(vec![limits("1", CountJson::Number(0))]))),
            "limits[0].daily_count"
        );
        let text = CountJson::Text("many".into());
        assert_eq!(field(super::tier(1, &tier(vec![limits("1", text)]))), "limits[0].daily_count");
        let float = LimitsJson { max_balance: "-5".into(), ..ok };
        assert_eq!(field(super::tier(1, &tier(vec![float]))), "limits[0].max_balance");
    }

    #[test]
    fn tariffs_are_checked_like_the_files() {
        let json =
            TariffJson { fixed: None, percent_bps: 50, min: Some("0.10".into()), max: Some("5".into()) };
        let tariff = super::tariff(&json).expect("valid");
        assert_eq!(tariff, Tariff { fixed: 0, percent_bps: 50, min: 10, max: 500 });
        assert_eq!(super::tariff(&tariff_json(&tariff)), Ok(tariff));
        assert_eq!(tariff_json(&Tariff::FREE).max, None);
        let bad = |json: TariffJson| field(super::tariff(&json));
        assert_eq!(bad(TariffJson { percent_bps: 10_001, ..Default::default() }), "percent_bps");
        assert_eq!(
            bad(TariffJson { min: Some("6".into()), max: Some("5".into()), ..Default::default() }),
            "min"
        );
        assert_eq!(
            bad(TariffJson { fixed: Some("6".into()), max: Some("5".into()), ..Default::default() }),
            "fixed"
        );
        assert_eq!(bad(TariffJson { max: Some("0".into()), ..Default::default() }), "max");
        assert_eq!(bad(TariffJson { fixed: Some("0.001".into()), ..Default::default() }), "fixed");
        assert_eq!(bad(TariffJson { min: Some("-1".into()), ..Default::default() }), "min");
    }

    #[test]
    fn operations_by_name_as_the_get_shows_them_or_by_code() {
        use engine::wallet::codes;
        assert_eq!(operation("p2p"), Ok(codes::P2P));
        assert_eq!(operation("cash_code"), Ok(codes::CASH_CODE));
        assert_eq!(operation("cash_by_code"), Ok(codes::CASH_CODE));
        assert_eq!(operation("3"), Ok(codes::CASH_OUT));
        assert_eq!(field(operation("fee")), "operation");
        assert_eq!(field(operation("100")), "operation");
        assert_eq!(field(operation("0")), "operation");
        assert_eq!(field(operation("teleport")), "operation");
    }

    #[test]
    fn stored_rules_round_trip_and_the_fingerprint_follows_the_rules() {
        let mut rules =
            Rules { policy: Policy::default(), tariffs: TariffTable::new(), commissions: TariffTable::new() };
        rules.tariffs.set(1, Tariff { fixed: 0, percent_bps: 50, min: 10, max: 500 }).expect("valid");
        rules.commissions.set(2, Tariff { fixed: 5, ..Tariff::FREE }).expect("valid");
        let stored = stored(&rules, "abc");
        let back = from_stored(&stored, &Policy { pin_attempts_max: 7, ..Policy::default() }).expect("valid");
        assert_eq!(back.policy.pin_attempts_max, 7, "the file's attempt limits stay the file's");
        assert_eq!(Rules { policy: Policy::default(), ..back }, rules);
        let before = fingerprint(&rules);
        assert_eq!(before, fingerprint(&rules.clone()));
        rules.tariffs.remove(1);
        assert_ne!(before, fingerprint(&rules));
    }

    #[test]
    fn reconcile_keeps_live_changes_until_the_file_changes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let file =
            Rules { policy: Policy::default(), tariffs: TariffTable::new(), commissions: TariffTable::new() };
        // First start: the file's rules.
        assert_eq!(reconcile(&store, file.clone())?, file);
        // An administrator's change, recorded as the live rules of the same file.
        let mut live = file.clone();
        live.tariffs.set(1, Tariff { fixed: 25, ..Tariff::FREE })?;
        let change = SettingsChange {
            at_s: 1,
            by: "admin_1".into(),
            action: "put_tariff".into(),
            target: "p2p".into(),
            value: json!(null),
        };
        store.put_rules(&stored(&live, &fingerprint(&file)), &change)?;
        // The same file again: the live rules win.
        assert_eq!(reconcile(&store, file.clone())?, live);
        // A changed file: it wins, and is recorded.
        let mut edited = file.clone();
        edited.commissions.set(2, Tariff { fixed: 3, ..Tariff::FREE })?;
        assert_eq!(reconcile(&store, edited.clone())?, edited);
        assert_eq!(reconcile(&store, edited.clone())?, edited);
        let changes = store.settings_changes(10)?;
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert_eq!(changes[0].by, CONFIG_FILE, "newest first");
        assert_eq!(changes[1].by, "admin_1");
        Ok(())
    }
}
