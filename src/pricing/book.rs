//! The price book: immutable, effective-dated price versions and markup rules.

use super::budgets::Budget;
use super::commitments::Commitment;
use super::provider::ProviderCommitment;
use super::reservations::Reservation;
use super::routing::RoutingClass;
use super::tiers::TierSchedule;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// What the provider charges us.
    Cost,
    /// An explicit customer price (otherwise: cost x markup).
    Price,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Cost => "cost",
            Side::Price => "price",
        }
    }
}

/// Per-million-token rates for each token class; `None` falls back as documented
/// (cached input and cache write to input, reasoning to output).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RateSet {
    pub input: Option<Decimal>,
    pub cached_input: Option<Decimal>,
    pub cache_write: Option<Decimal>,
    pub output: Option<Decimal>,
    pub reasoning: Option<Decimal>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PriceVersion {
    pub id: i64,
    pub provider: String,
    pub model: String,
    /// Empty = any region.
    pub region: String,
    pub side: Side,
    pub currency: String,
    pub effective_from: DateTime<Utc>,
    pub base: RateSet,
    pub batch_discount: Decimal,
    pub long_context_threshold_tokens: Option<u64>,
    pub long: RateSet,
    /// The most output tokens the model produces, when known.
    pub max_output_tokens: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MarkupRule {
    pub id: i64,
    /// `None` = the global rule.
    pub tenant_id: Option<String>,
    pub percent: Decimal,
    pub effective_from: DateTime<Utc>,
}

type Key = (String, String, String, Side, String);

/// Every price version and markup rule, indexed for "which one is in force at t".
#[derive(Clone, Debug, Default)]
pub struct PriceBook {
    versions: HashMap<Key, Vec<PriceVersion>>,
    by_id: HashMap<i64, (Key, usize)>,
    global_markups: Vec<MarkupRule>,
    tenant_markups: HashMap<String, Vec<MarkupRule>>,
    markup_by_id: HashMap<i64, MarkupRule>,
    /// tenant -> that tenant's tier schedule versions, by (effective_from, id)
    tiers: HashMap<String, Vec<TierSchedule>>,
    /// tenant -> that tenant's budget versions, by (effective_from, id)
    budgets: HashMap<String, Vec<Budget>>,
    /// routing class versions, by (effective_from, id)
    classes: Vec<RoutingClass>,
    /// tenant -> commitment versions, by (effective_from, id)
    commitments: HashMap<String, Vec<Commitment>>,
    /// tenant -> reservation versions, by (effective_from, id)
    reservations: HashMap<String, Vec<Reservation>>,
    /// (provider, model) -> our reservation versions with the provider
    provider_reservations: HashMap<(String, String), Vec<Reservation>>,
    /// provider -> our commitment versions with it, by (effective_from, id)
    provider_commitments: HashMap<String, Vec<ProviderCommitment>>,
}

/// The last element whose `effective_from` is at or before `at` (slices sorted by it).
fn in_force<T>(items: &[T], at: DateTime<Utc>, from: impl Fn(&T) -> DateTime<Utc>) -> Option<&T> {
    let n = items.partition_point(|x| from(x) <= at);
    n.checked_sub(1).map(|i| &items[i])
}

impl PriceBook {
    pub fn new(mut versions: Vec<PriceVersion>, mut markups: Vec<MarkupRule>) -> PriceBook {
        versions.sort_by_key(|v| (v.effective_from, v.id));
        markups.sort_by_key(|m| (m.effective_from, m.id));
        let mut book = PriceBook::default();
        for v in versions {
            let key = (
                v.provider.clone(),
                v.model.clone(),
                v.region.clone(),
                v.side,
                v.currency.clone(),
            );
            let list = book.versions.entry(key.clone()).or_default();
            book.by_id.insert(v.id, (key, list.len()));
            list.push(v);
        }
        for m in markups {
            book.markup_by_id.insert(m.id, m.clone());
            match &m.tenant_id {
                None => book.global_markups.push(m),
                Some(t) => book.tenant_markups.entry(t.clone()).or_default().push(m),
            }
        }
        book
    }

    /// The same book with these tier schedule versions.
    pub fn with_tiers(mut self, mut schedules: Vec<TierSchedule>) -> PriceBook {
        schedules.sort_by_key(|s| (s.effective_from, s.id));
        self.tiers.clear();
        for s in schedules {
            self.tiers.entry(s.tenant_id.clone()).or_default().push(s);
        }
        self
    }

    /// The same book with these budget versions.
    pub fn with_budgets(mut self, mut budgets: Vec<Budget>) -> PriceBook {
        budgets.sort_by_key(|b| (b.effective_from, b.id));
        self.budgets.clear();
        for b in budgets {
            self.budgets.entry(b.tenant_id.clone()).or_default().push(b);
        }
        self
    }

    /// The same book with these commitment versions.
    pub fn with_commitments(mut self, mut list: Vec<Commitment>) -> PriceBook {
        list.sort_by_key(|c| (c.effective_from, c.id));
        self.commitments.clear();
        for c in list {
            self.commitments
                .entry(c.tenant_id.clone())
                .or_default()
                .push(c);
        }
        self
    }

    pub fn has_commitments(&self, tenant_id: &str) -> bool {
        self.commitments.contains_key(tenant_id)
    }

    /// The tenant's commitment in force at `at`: of the latest active version of each
    /// name, the first by name (a tenant has one commitment at a time).
    pub fn commitment_at(&self, tenant_id: &str, at: DateTime<Utc>) -> Option<&Commitment> {
        let list = self.commitments.get(tenant_id)?;
        let mut latest: std::collections::BTreeMap<&str, &Commitment> = Default::default();
        for c in list.iter().filter(|c| c.effective_from <= at) {
            latest.insert(c.name.as_str(), c);
        }
        latest.into_values().find(|c| c.active)
    }

    /// The latest version of a tenant's commitment `name` at `at`, active or not.
    pub fn commitment_version_at(
        &self,
        tenant_id: &str,
        name: &str,
        at: DateTime<Utc>,
    ) -> Option<&Commitment> {
        self.commitments
            .get(tenant_id)?
            .iter()
            .rev()
            .find(|c| c.name == name && c.effective_from <= at)
    }

    /// The same book with these reservation versions.
    pub fn with_reservations(mut self, mut list: Vec<Reservation>) -> PriceBook {
        list.sort_by_key(|r| (r.effective_from, r.id));
        self.reservations.clear();
        for r in list {
            self.reservations
                .entry(r.tenant_id.clone())
                .or_default()
                .push(r);
        }
        self
    }

    pub fn has_reservations(&self, tenant_id: &str) -> bool {
        self.reservations.contains_key(tenant_id)
    }

    /// The reservation covering this tenant's requests to (provider, model) at `at`: of
    /// the latest active version of each name that matches, the first by name.
    pub fn reservation_at(
        &self,
        tenant_id: &str,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> Option<&Reservation> {
        let list = self.reservations.get(tenant_id)?;
        let mut latest: std::collections::BTreeMap<&str, &Reservation> = Default::default();
        for r in list.iter().filter(|r| r.effective_from <= at) {
            latest.insert(r.name.as_str(), r);
        }
        latest
            .into_values()
            .find(|r| r.active && r.provider == provider && r.model == model)
    }

    /// Every version of a tenant's reservations, grouped by name (each in effective order).
    pub fn reservation_versions(
        &self,
        tenant_id: &str,
    ) -> std::collections::BTreeMap<&str, Vec<&Reservation>> {
        let mut out: std::collections::BTreeMap<&str, Vec<&Reservation>> = Default::default();
        for r in self.reservations.get(tenant_id).into_iter().flatten() {
            out.entry(r.name.as_str()).or_default().push(r);
        }
        out
    }

    /// Tenants with any reservation version.
    pub fn reserving_tenants(&self) -> impl Iterator<Item = &str> {
        self.reservations.keys().map(|k| k.as_str())
    }

    /// The same book with our provider reservation versions.
    pub fn with_provider_reservations(mut self, mut list: Vec<Reservation>) -> PriceBook {
        list.sort_by_key(|r| (r.effective_from, r.id));
        self.provider_reservations.clear();
        for r in list {
            self.provider_reservations
                .entry((r.provider.clone(), r.model.clone()))
                .or_default()
                .push(r);
        }
        self
    }

    /// Our reservation with the provider for this model in force at `at` (the latest
    /// version, if active).
    pub fn provider_reservation_at(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> Option<&Reservation> {
        self.provider_reservations
            .get(&(provider.to_string(), model.to_string()))?
            .iter()
            .rev()
            .find(|r| r.effective_from <= at)
            .filter(|r| r.active)
    }

    /// The same book with our provider commitment versions.
    pub fn with_provider_commitments(mut self, mut list: Vec<ProviderCommitment>) -> PriceBook {
        list.sort_by_key(|c| (c.effective_from, c.id));
        self.provider_commitments.clear();
        for c in list {
            self.provider_commitments
                .entry(c.provider.clone())
                .or_default()
                .push(c);
        }
        self
    }

    /// Our commitment versions with a provider, by (effective_from, id).
    pub fn provider_commitment_versions(&self, provider: &str) -> &[ProviderCommitment] {
        self.provider_commitments
            .get(provider)
            .map_or(&[], |v| v.as_slice())
    }

    /// Providers we have any commitment version with.
    pub fn committed_providers(&self) -> impl Iterator<Item = &str> {
        self.provider_commitments.keys().map(|k| k.as_str())
    }

    /// Whether usage of this model at `at` is counted per minute for our provider
    /// reservations: some version of one took effect at or before `at`.
    pub fn counts_provider_usage(&self, provider: &str, model: &str, at: DateTime<Utc>) -> bool {
        // every usage event asks: no allocation when there is nothing to find
        if self.provider_reservations.is_empty() {
            return false;
        }
        self.provider_reservations
            .get(&(provider.to_string(), model.to_string()))
            .and_then(|l| l.first())
            .is_some_and(|r| r.effective_from <= at)
    }

    /// The same book with these routing class versions.
    pub fn with_classes(mut self, mut classes: Vec<RoutingClass>) -> PriceBook {
        classes.sort_by_key(|c| (c.effective_from, c.id));
        self.classes = classes;
        self
    }

    /// The routing class in force for a tenant at `at`: the tenant's own version of the
    /// name if it has one in force, else the global one; none if retired.
    pub fn class_at(
        &self,
        tenant_id: &str,
        name: &str,
        at: DateTime<Utc>,
    ) -> Option<&RoutingClass> {
        let latest = |own: bool| {
            self.classes.iter().rev().find(|c| {
                c.name == name
                    && c.effective_from <= at
                    && (c.tenant_id.as_deref() == Some(tenant_id)) == own
                    && (own || c.tenant_id.is_none())
            })
        };
        latest(true).or_else(|| latest(false)).filter(|c| c.active)
    }

    /// Names of the classes in force for a tenant at `at`.
    pub fn class_names(&self, tenant_id: &str, at: DateTime<Utc>) -> Vec<String> {
        let mut names: Vec<String> = self
            .classes
            .iter()
            .filter(|c| c.tenant_id.is_none() || c.tenant_id.as_deref() == Some(tenant_id))
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names.retain(|n| self.class_at(tenant_id, n, at).is_some());
        names
    }

    /// Whether the tenant has any budget version at all.
    pub fn has_budgets(&self, tenant_id: &str) -> bool {
        self.budgets.contains_key(tenant_id)
    }

    /// The tenant's budgets in force at `at` (the latest version of each name, if it is
    /// active), by name.
    pub fn budgets_at(&self, tenant_id: &str, at: DateTime<Utc>) -> Vec<&Budget> {
        let Some(list) = self.budgets.get(tenant_id) else {
            return Vec::new();
        };
        let mut latest: std::collections::BTreeMap<&str, &Budget> = Default::default();
        for b in list.iter().filter(|b| b.effective_from <= at) {
            latest.insert(b.name.as_str(), b);
        }
        latest.into_values().filter(|b| b.active).collect()
    }

    /// Every version of the tenant's budgets (oldest first).
    pub fn budget_versions(&self, tenant_id: &str) -> &[Budget] {
        self.budgets.get(tenant_id).map_or(&[], |v| v.as_slice())
    }

    /// Whether the tenant has any tier schedule at all.
    pub fn has_tiers(&self, tenant_id: &str) -> bool {
        self.tiers.contains_key(tenant_id)
    }

    /// The tier schedule that prices a request of this tenant at `at`: of the schedules
    /// whose version in force matches the request, the most specific scope (model, then
    /// provider, then all), ties broken by name.
    pub fn tier_at(
        &self,
        tenant_id: &str,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> Option<&TierSchedule> {
        let list = self.tiers.get(tenant_id)?;
        let mut best: Option<&TierSchedule> = None;
        // the latest version of each name at `at`: the list is in effective order, so
        // walking it backwards the first version seen of a name is its latest
        for (i, s) in list.iter().enumerate().rev() {
            if s.effective_from > at
                || list[i + 1..]
                    .iter()
                    .any(|later| later.name == s.name && later.effective_from <= at)
            {
                continue;
            }
            if !s.matches(provider, model) {
                continue;
            }
            best = match best {
                Some(b)
                    if (b.scope, std::cmp::Reverse(&b.name))
                        >= (s.scope, std::cmp::Reverse(&s.name)) =>
                {
                    Some(b)
                }
                _ => Some(s),
            };
        }
        best
    }

    pub fn tier_by_id(&self, tenant_id: &str, id: i64) -> Option<&TierSchedule> {
        self.tiers.get(tenant_id)?.iter().find(|s| s.id == id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The version in force at `at` for this key: the region's own if it has one, else
    /// the any-region version.
    pub fn version_at(
        &self,
        provider: &str,
        model: &str,
        region: Option<&str>,
        side: Side,
        currency: &str,
        at: DateTime<Utc>,
    ) -> Option<&PriceVersion> {
        let lookup = |region: &str| {
            let key = (
                provider.to_string(),
                model.to_string(),
                region.to_string(),
                side,
                currency.to_string(),
            );
            self.versions
                .get(&key)
                .and_then(|list| in_force(list, at, |v| v.effective_from))
        };
        region
            .filter(|r| !r.is_empty())
            .and_then(lookup)
            .or_else(|| lookup(""))
    }

    /// The tenant's own markup rule in force at `at`, else the global one.
    pub fn markup_at(&self, tenant_id: &str, at: DateTime<Utc>) -> Option<&MarkupRule> {
        self.tenant_markups
            .get(tenant_id)
            .and_then(|list| in_force(list, at, |m| m.effective_from))
            .or_else(|| in_force(&self.global_markups, at, |m| m.effective_from))
    }

    pub fn version_by_id(&self, id: i64) -> Option<&PriceVersion> {
        let (key, idx) = self.by_id.get(&id)?;
        self.versions.get(key).map(|l| &l[*idx])
    }

    pub fn markup_by_id(&self, id: i64) -> Option<&MarkupRule> {
        self.markup_by_id.get(&id)
    }

    /// Every key's versions, each list in effective order.
    pub fn all_versions(&self) -> impl Iterator<Item = &[PriceVersion]> {
        self.versions.values().map(|v| v.as_slice())
    }

    /// Providers with a cost version for this model in force at `at`, in this currency
    /// (any region), sorted.
    pub fn providers_for(&self, model: &str, currency: &str, at: DateTime<Utc>) -> Vec<String> {
        let mut out: Vec<String> = self
            .versions
            .iter()
            .filter(|(k, list)| {
                k.1 == model
                    && k.3 == Side::Cost
                    && k.4 == currency
                    && in_force(list, at, |v| v.effective_from).is_some()
            })
            .map(|(k, _)| k.0.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether any version, at any time, exists for (provider, model, side, currency), in
    /// any region. The first price of a model may be dated back (nothing was charged for
    /// it before); a change to an existing one only takes effect in the future.
    pub fn has_any(&self, provider: &str, model: &str, side: Side, currency: &str) -> bool {
        self.versions
            .keys()
            .any(|k| k.0 == provider && k.1 == model && k.3 == side && k.4 == currency)
    }
}
