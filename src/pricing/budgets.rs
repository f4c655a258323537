//! Budgets (pure): spend limits per tenant, API key or tag value, per calendar period
//! (UTC), with alert thresholds and an action at the limit.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    /// All of the tenant's usage.
    Tenant,
    /// One API key (`scope_value` = the key id).
    ApiKey,
    /// Usage tagged `key=value` (`scope_value` = "key=value").
    Tag,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    /// ISO week, Monday to Sunday (UTC).
    Week,
    Month,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Alert only.
    Alert,
    /// Deny authorisations that would exceed the limit.
    Block,
    /// Route to `downgrade_class` instead when the limit would be exceeded.
    Downgrade,
}

/// One immutable version of a budget; versions share its `name`.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Budget {
    pub id: i64,
    pub tenant_id: String,
    pub name: String,
    pub effective_from: DateTime<Utc>,
    /// False: this version retires the budget.
    pub active: bool,
    pub scope: BudgetScope,
    pub scope_value: String,
    pub period: BudgetPeriod,
    /// The limit per period, in the tenant's currency.
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Percentages of `amount` at which an alert fact is recorded.
    #[schema(value_type = Vec<String>)]
    pub thresholds: Vec<Decimal>,
    pub action: BudgetAction,
    pub downgrade_class: Option<String>,
}

pub fn default_thresholds() -> Vec<Decimal> {
    vec![Decimal::from(50), Decimal::from(80), Decimal::from(100)]
}

/// The period an instant falls in: `2026-11-24`, `2026-W48` or `2026-11` (UTC).
pub fn period_key(p: BudgetPeriod, at: DateTime<Utc>) -> String {
    match p {
        BudgetPeriod::Day => at.format("%Y-%m-%d").to_string(),
        BudgetPeriod::Week => {
            let w = at.iso_week();
            format!("{:04}-W{:02}", w.year(), w.week())
        }
        BudgetPeriod::Month => format!("{:04}-{:02}", at.year(), at.month()),
    }
}

/// The instants a period starts and ends (exclusive): calendar-aligned in UTC.
pub fn period_bounds(p: BudgetPeriod, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let day = at.date_naive();
    let start = match p {
        BudgetPeriod::Day => day,
        BudgetPeriod::Week => {
            day - chrono::Duration::days(day.weekday().num_days_from_monday() as i64)
        }
        BudgetPeriod::Month => day.with_day(1).expect("first of month"),
    };
    let end = match p {
        BudgetPeriod::Day => start + chrono::Duration::days(1),
        BudgetPeriod::Week => start + chrono::Duration::days(7),
        BudgetPeriod::Month => start
            .checked_add_months(chrono::Months::new(1))
            .expect("next month"),
    };
    let utc = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    (utc(start), utc(end))
}

/// Share of a period that must have passed before a forecast is made: earlier, one
/// request's spend says little about the period's burn rate.
pub const FORECAST_MIN_ELAPSED_PERCENT: i64 = 5;

impl Budget {
    /// When spend `spent` at `at`, continuing at the period's average rate so far
    /// (spent / time elapsed), reaches the limit — if that is before the period ends and
    /// the limit is not reached yet. Computed from the event's time, never the clock.
    pub fn forecast(&self, at: DateTime<Utc>, spent: Decimal) -> Option<DateTime<Utc>> {
        if spent <= Decimal::ZERO || spent >= self.amount {
            return None;
        }
        let (start, end) = period_bounds(self.period, at);
        let elapsed = (at - start).num_microseconds()?;
        let length = (end - start).num_microseconds()?;
        if elapsed <= 0 || elapsed * 100 < length * FORECAST_MIN_ELAPSED_PERCENT {
            return None;
        }
        // elapsed x limit / spent, in whole microseconds (rounded down)
        let reach = (Decimal::from(elapsed).checked_mul(self.amount)? / spent).floor();
        let reach: i64 = reach.try_into().ok()?;
        let when = start + chrono::Duration::microseconds(reach);
        (when < end).then_some(when)
    }

    pub fn check(&self) -> Result<(), String> {
        super::check_term_name(&self.name)?;
        match self.scope {
            BudgetScope::Tenant if !self.scope_value.is_empty() => {
                return Err("scope `tenant` takes no scope_value".into())
            }
            BudgetScope::ApiKey if self.scope_value.is_empty() => {
                return Err("scope `api_key` needs the key id as scope_value".into())
            }
            BudgetScope::Tag => match self.scope_value.split_once('=') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() => {}
                _ => return Err("scope `tag` needs scope_value \"key=value\"".into()),
            },
            _ => {}
        }
        if self.amount <= Decimal::ZERO || self.amount > super::MAX_TERM_AMOUNT {
            return Err(format!(
                "amount must be positive and at most {}",
                super::MAX_TERM_AMOUNT
            ));
        }
        if self.thresholds.len() > 10 {
            return Err("at most 10 thresholds".into());
        }
        let mut prev = Decimal::ZERO;
        for t in &self.thresholds {
            if *t <= prev || *t > Decimal::from(1000) {
                return Err("thresholds are increasing percentages in (0, 1000]".into());
            }
            prev = *t;
        }
        match (self.action, &self.downgrade_class) {
            (BudgetAction::Downgrade, None) => {
                Err("action `downgrade` needs a downgrade_class".into())
            }
            (BudgetAction::Alert | BudgetAction::Block, Some(_)) => {
                Err("downgrade_class is only for action `downgrade`".into())
            }
            _ => Ok(()),
        }
    }

    /// Whether a request with this key and these tags counts toward the budget.
    pub fn matches(&self, api_key_id: Option<&str>, tags: &BTreeMap<String, String>) -> bool {
        match self.scope {
            BudgetScope::Tenant => true,
            BudgetScope::ApiKey => api_key_id == Some(self.scope_value.as_str()),
            BudgetScope::Tag => self
                .scope_value
                .split_once('=')
                .is_some_and(|(k, v)| tags.get(k).is_some_and(|x| x == v)),
        }
    }

    /// The thresholds crossed going from `before` to `after` spent.
    pub fn crossed(&self, before: Decimal, after: Decimal) -> Vec<Decimal> {
        thresholds_crossed(self.amount, &self.thresholds, before, after)
    }
}

/// The thresholds (percentages of `amount`) crossed going from `before` to `after`:
/// those with before < amount × t / 100 <= after.
pub fn thresholds_crossed(
    amount: Decimal,
    thresholds: &[Decimal],
    before: Decimal,
    after: Decimal,
) -> Vec<Decimal> {
    thresholds
        .iter()
        .filter(|t| {
            // amounts and thresholds are capped, so this cannot overflow; if it could,
            // the threshold is simply never reached
            let at = amount.checked_mul(**t).map(|x| x / Decimal::ONE_HUNDRED);
            at.is_some_and(|at| before < at && at <= after)
        })
        .copied()
        .collect()
}

/// A budget a charge counted toward; stored in the breakdown so rebuild can sum spend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetCount {
    pub budget: String,
    /// The budget version in force.
    pub version: i64,
    pub period: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            id: 1,
            tenant_id: "t".into(),
            name: "b".into(),
            effective_from: DateTime::<Utc>::MIN_UTC,
            active: true,
            scope: BudgetScope::Tag,
            scope_value: "project=bot".into(),
            period: BudgetPeriod::Week,
            amount: Decimal::from(10),
            thresholds: default_thresholds(),
            action: BudgetAction::Block,
            downgrade_class: None,
        }
    }

    #[test]
    fn periods_are_calendar_aligned() {
        let at: DateTime<Utc> = "2026-01-01T10:00:00Z".parse().unwrap();
        assert_eq!(period_key(BudgetPeriod::Day, at), "2026-01-01");
        assert_eq!(period_key(BudgetPeriod::Week, at), "2026-W01");
        assert_eq!(period_key(BudgetPeriod::Month, at), "2026-01");
        let at: DateTime<Utc> = "2027-01-01T10:00:00Z".parse().unwrap();
        assert_eq!(period_key(BudgetPeriod::Week, at), "2026-W53");
    }

    #[test]
    fn thresholds_cross_once_each() {
        let b = budget();
        assert_eq!(b.crossed(Decimal::ZERO, Decimal::from(4)), vec![]);
        assert_eq!(
            b.crossed(Decimal::from(4), Decimal::from(8)),
            vec![Decimal::from(50), Decimal::from(80)]
        );
        assert_eq!(b.crossed(Decimal::from(8), Decimal::from(9)), vec![]);
        assert_eq!(
            b.crossed(Decimal::from(9), Decimal::from(10)),
            vec![Decimal::from(100)]
        );
        assert_eq!(b.crossed(Decimal::from(10), Decimal::from(30)), vec![]);
    }

    #[test]
    fn bounds_and_forecasts() {
        let at: DateTime<Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        let (s, e) = period_bounds(BudgetPeriod::Week, at);
        assert_eq!(s.to_rfc3339(), "2026-11-23T00:00:00+00:00");
        assert_eq!(e.to_rfc3339(), "2026-11-30T00:00:00+00:00");
        let (s, e) = period_bounds(BudgetPeriod::Month, "2026-12-31T23:59:59Z".parse().unwrap());
        assert_eq!(
            (s.to_rfc3339(), e.to_rfc3339()),
            (
                "2026-12-01T00:00:00+00:00".into(),
                "2027-01-01T00:00:00+00:00".into()
            )
        );
        let mut b = budget();
        // week budget of 10: 2.5 days in with 5 spent reaches 10 after 5 days (Saturday)
        let at: DateTime<Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        assert_eq!(
            b.forecast(at, Decimal::from(5)).unwrap().to_rfc3339(),
            "2026-11-28T00:00:00+00:00"
        );
        // 2 spent: 12.5 days, past the week's end
        assert!(b.forecast(at, Decimal::from(2)).is_none());
        // reached already, or too early in the period
        assert!(b.forecast(at, Decimal::from(10)).is_none());
        assert!(b
            .forecast("2026-11-23T01:00:00Z".parse().unwrap(), Decimal::from(5))
            .is_none());
        b.period = BudgetPeriod::Day;
        assert!(b
            .forecast("2026-11-23T06:00:00Z".parse().unwrap(), Decimal::from(5))
            .is_some());
    }

    #[test]
    fn scope_matching_and_checks() {
        let b = budget();
        let mut tags = BTreeMap::new();
        assert!(!b.matches(None, &tags));
        tags.insert("project".to_string(), "bot".to_string());
        assert!(b.matches(Some("k"), &tags));
        assert!(b.check().is_ok());
        let mut x = b.clone();
        x.scope_value = "project".into();
        assert!(x.check().is_err());
        let mut x = b.clone();
        x.action = BudgetAction::Downgrade;
        assert!(x.check().is_err());
        x.downgrade_class = Some("auto:budget".into());
        assert!(x.check().is_ok());
        let mut x = b.clone();
        x.thresholds = vec![Decimal::from(80), Decimal::from(50)];
        assert!(x.check().is_err());
    }
}
