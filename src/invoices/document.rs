//! The invoice document: lines from the accruals, rounding, totals, the content hash, and
//! the JSON, CSV and HTML renderings (pure).

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::accrue::{Accrued, LineKey, CLASSES, KINDS};

/// Decimal places of a currency's minor unit (ISO 4217). Currencies not listed have two.
pub fn minor_units(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

/// THE rounding rule, applied once per invoice line and nowhere else: round the line's
/// full-precision amount to the currency's minor unit, halves to the even neighbour
/// (banker's rounding: 0.125 → 0.12, 0.135 → 0.14, −0.125 → −0.12; in JPY 2.5 → 2,
/// 3.5 → 4). Ties are split evenly, so over many lines the residue does not drift one way.
pub fn round_line(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(minor_units(currency), RoundingStrategy::MidpointNearestEven)
}

/// One accrued row as read from the projection.
#[derive(Clone, Debug)]
pub struct AccrualRow {
    pub key: LineKey,
    pub totals: Accrued,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InvoiceLine {
    pub kind: String,
    /// For a late line: the month the usage belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_from: Option<String>,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_class: Option<String>,
    /// The schedule, commitment, reservation or adjustment event the line is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The price book and term versions the line was priced under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<String>,
    #[schema(value_type = String)]
    pub quantity: Decimal,
    /// `tokens` or `requests` or `items`.
    pub unit: String,
    /// Per million tokens (usage lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub unit_price_per_mtok: Option<Decimal>,
    /// Full precision, as the ledger holds it.
    #[schema(value_type = String)]
    pub amount_exact: Decimal,
    /// `amount_exact` rounded by the invoice rounding rule.
    #[schema(value_type = String)]
    pub amount: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invoice {
    /// `null` on a draft.
    pub number: Option<String>,
    /// `draft` or `finalized`.
    pub status: String,
    pub tenant_id: String,
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    pub lines: Vec<InvoiceLine>,
    /// The sum of the rounded lines: what is due.
    #[schema(value_type = String)]
    pub total: Decimal,
    /// The sum of the lines at full precision.
    #[schema(value_type = String)]
    pub total_exact: Decimal,
    /// total − total_exact: what rounding each line once left.
    #[schema(value_type = String)]
    pub rounding_residue: Decimal,
    pub rounding_rule: String,
    /// Every price book and term version the lines were priced under.
    pub versions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalized_at: Option<DateTime<Utc>>,
    /// sha256 (hex) of the stored document (the invoice without this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

fn kind_rank(k: &str) -> usize {
    KINDS.iter().position(|x| *x == k).unwrap_or(KINDS.len())
}

fn class_rank(c: &str) -> usize {
    CLASSES
        .iter()
        .position(|x| *x == c)
        .unwrap_or(CLASSES.len())
}

fn describe(k: &LineKey, description: &str) -> String {
    let on = |p: &str, m: &str| format!("{m} ({p})");
    let d = match k.kind.as_str() {
        "usage" => format!(
            "{} — {} tokens{}",
            on(&k.provider, &k.model),
            k.class.replace('_', " "),
            if k.name == "long_context" {
                ", long context"
            } else {
                ""
            }
        ),
        "batch_discount" => format!("Batch discount {}% — {}", k.name, on(&k.provider, &k.model)),
        "reservation_covered" => format!(
            "Covered by reservation {} — {}",
            k.name,
            on(&k.provider, &k.model)
        ),
        "tier_discount" => format!("Volume tier discount — {}", k.name),
        "tier_credit" => format!(
            "Volume tier credit (earlier units at the reached tier) — {}",
            k.name
        ),
        "commitment_covered" => format!("Usage covered by committed spend — {}", k.name),
        "commitment_overage" => format!(
            "Overage past committed spend — {} (quantity: usage above at the on-demand price; amount: the overage rate's difference)",
            k.name
        ),
        "commitment_drawdown" => format!("Committed spend drawdown — {}", k.name),
        "commitment_true_up" => format!("Committed spend true-up (unused) — {}", k.name),
        "commitment_difference" => format!("Committed spend billed beyond drawdown — {}", k.name),
        "reservation_fee" => format!("Reserved throughput fee — {}", k.name),
        "adjustment" => format!("Adjustment: {description}"),
        other => other.to_string(),
    };
    if k.origin.is_empty() {
        d
    } else {
        format!("Late usage from {}: {d}", k.origin)
    }
}

fn some(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Build an invoice from its accrued lines: one line per accrual, in a stable order (lines
/// of the period, then late lines by month; by kind, provider, model, class, rate), each
/// rounded once; the total is the sum of the rounded lines.
pub fn build(tenant: &str, period: &str, currency: &str, mut rows: Vec<AccrualRow>) -> Invoice {
    rows.sort_by(|a, b| {
        let (x, y) = (&a.key, &b.key);
        (
            &x.origin,
            kind_rank(&x.kind),
            &x.provider,
            &x.model,
            class_rank(&x.class),
            x.unit_price,
            &x.name,
            &x.refs,
        )
            .cmp(&(
                &y.origin,
                kind_rank(&y.kind),
                &y.provider,
                &y.model,
                class_rank(&y.class),
                y.unit_price,
                &y.name,
                &y.refs,
            ))
    });
    let mut versions: Vec<String> = rows
        .iter()
        .flat_map(|r| r.key.refs.split(' '))
        .filter(|v| !v.is_empty() && !v.starts_with("corrects:") && !v.starts_with("request:"))
        .map(str::to_string)
        .collect();
    versions.sort();
    versions.dedup();
    let mut lines: Vec<InvoiceLine> = Vec::with_capacity(rows.len());
    for r in &rows {
        let k = &r.key;
        let line =
            |class: Option<usize>, quantity: Decimal, rate: Option<Decimal>, amount: Decimal| {
                let mut key = k.clone();
                if let Some(i) = class {
                    key.class = CLASSES[i].into();
                }
                InvoiceLine {
                    kind: key.kind.clone(),
                    late_from: some(&key.origin),
                    description: describe(&key, &r.totals.description),
                    provider: some(&key.provider),
                    model: some(&key.model),
                    token_class: some(&key.class),
                    name: some(&key.name),
                    versions: some(&key.refs),
                    quantity: quantity.normalize(),
                    unit: match key.kind.as_str() {
                        "usage" | "reservation_covered" => "tokens",
                        "tier_discount" => "tier units",
                        "commitment_overage" => "overage usage",
                        "batch_discount"
                        | "commitment_covered"
                        | "commitment_drawdown"
                        | "tier_credit" => "requests",
                        _ => "items",
                    }
                    .into(),
                    unit_price_per_mtok: rate.map(|p| p.normalize()),
                    amount_exact: amount.normalize(),
                    amount: round_line(amount, currency),
                }
            };
        if k.kind == "usage" {
            // one line per token class
            for (i, c) in r.totals.classes.iter().enumerate() {
                if !c.tokens.is_zero() || !c.amount.is_zero() {
                    lines.push(line(Some(i), c.tokens, c.rate, c.amount));
                }
            }
        } else {
            lines.push(line(None, r.totals.quantity, k.unit_price, r.totals.amount));
        }
    }
    let total: Decimal = lines.iter().map(|l| l.amount).sum();
    let total_exact: Decimal = lines.iter().map(|l| l.amount_exact).sum();
    let start = crate::pricing::tiers::period_start(period).unwrap_or_default();
    let end = crate::pricing::tiers::period_end(period).unwrap_or_default();
    Invoice {
        number: None,
        status: "draft".into(),
        tenant_id: tenant.into(),
        period: period.into(),
        period_start: start,
        period_end: end,
        currency: currency.into(),
        total: total.normalize(),
        total_exact: total_exact.normalize(),
        rounding_residue: (total - total_exact).normalize(),
        rounding_rule: format!(
            "each line rounded once to {} decimal place(s) ({currency} minor unit), halves to even; total = sum of rounded lines",
            minor_units(currency)
        ),
        lines,
        versions,
        close_event_id: None,
        close_seq: None,
        finalized_at: None,
        content_hash: None,
    }
}

/// The stored form of a finalised invoice (without its hash) and its sha256 (hex).
pub fn seal(inv: &Invoice) -> (String, String) {
    let mut doc = inv.clone();
    doc.content_hash = None;
    let text = serde_json::to_string(&doc).expect("invoice serialises");
    let hash = hex::encode(Sha256::digest(text.as_bytes()));
    (text, hash)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row per line (RFC 4180), with the invoice's identity on every row.
pub fn to_csv(inv: &Invoice) -> String {
    let mut out = String::from(
        "invoice_number,tenant_id,period,currency,line,kind,late_from,description,provider,model,token_class,name,versions,quantity,unit,unit_price_per_mtok,amount_exact,amount\r\n",
    );
    let o = |x: &Option<String>| x.clone().unwrap_or_default();
    for (i, l) in inv.lines.iter().enumerate() {
        let row = [
            o(&inv.number),
            inv.tenant_id.clone(),
            inv.period.clone(),
            inv.currency.clone(),
            (i + 1).to_string(),
            l.kind.clone(),
            o(&l.late_from),
            l.description.clone(),
            o(&l.provider),
            o(&l.model),
            o(&l.token_class),
            o(&l.name),
            o(&l.versions),
            l.quantity.to_string(),
            l.unit.clone(),
            l.unit_price_per_mtok
                .map(|p| p.to_string())
                .unwrap_or_default(),
            l.amount_exact.to_string(),
            l.amount.to_string(),
        ];
        let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A printable, self-contained HTML page.
pub fn to_html(inv: &Invoice) -> String {
    let title = match &inv.number {
        Some(n) => format!("Invoice {n}"),
        None => format!("Draft invoice {}", inv.period),
    };
    let mut rows = String::new();
    for l in &inv.lines {
        rows.push_str(&format!(
            "<tr{}><td>{}</td><td class=n>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td></tr>\n",
            if l.late_from.is_some() { " class=late" } else { "" },
            esc(&l.description),
            esc(&l.quantity.to_string()),
            esc(&l.unit),
            l.unit_price_per_mtok.map(|p| esc(&p.to_string())).unwrap_or_default(),
            esc(&l.amount.to_string()),
        ));
    }
    format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{t}</title>\n<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ccc;padding:4px 8px;text-align:left}}.n{{text-align:right}}.late td{{font-style:italic}}@media print{{body{{margin:0}}}}</style></head>\n<body>\n<h1>{t}</h1>\n<p>Tenant: {tenant}<br>Period: {period} ({start} to {end}, UTC)<br>Status: {status}{fin}</p>\n<table>\n<thead><tr><th>Description</th><th class=n>Quantity</th><th>Unit</th><th class=n>Unit price / 1M tokens</th><th class=n>Amount ({cur})</th></tr></thead>\n<tbody>\n{rows}</tbody>\n<tfoot><tr><th colspan=4>Total ({cur})</th><th class=n>{total}</th></tr></tfoot>\n</table>\n<p><small>{rule}. Rounding residue {residue}.{hash}</small></p>\n</body></html>\n",
        t = esc(&title),
        tenant = esc(&inv.tenant_id),
        period = esc(&inv.period),
        start = inv.period_start.format("%Y-%m-%d"),
        end = inv.period_end.format("%Y-%m-%d"),
        status = esc(&inv.status),
        fin = inv
            .finalized_at
            .map(|f| format!("<br>Finalised: {}", f.to_rfc3339()))
            .unwrap_or_default(),
        cur = esc(&inv.currency),
        total = esc(&inv.total.to_string()),
        rule = esc(&inv.rounding_rule),
        residue = esc(&inv.rounding_residue.to_string()),
        hash = inv
            .content_hash
            .as_deref()
            .map(|h| format!(" Content hash sha256:{}", esc(h)))
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounding_golden_values_on_exact_midpoints() {
        // (amount, currency, rounded)
        let cases = [
            ("0.125", "USD", "0.12"),
            ("0.135", "USD", "0.14"),
            ("0.005", "USD", "0.00"),
            ("0.015", "USD", "0.02"),
            ("-0.125", "USD", "-0.12"),
            ("-0.135", "USD", "-0.14"),
            ("2.675", "EUR", "2.68"),
            ("0.1250000000001", "USD", "0.13"),
            ("0.1249999999999", "USD", "0.12"),
            ("2.5", "JPY", "2"),
            ("3.5", "JPY", "4"),
            ("-2.5", "JPY", "-2"),
            ("1234.4999", "JPY", "1234"),
            ("0.0005", "KWD", "0.000"),
            ("0.0015", "KWD", "0.002"),
        ];
        for (a, c, want) in cases {
            assert_eq!(round_line(d(a), c), d(want), "{a} {c}");
        }
        assert_eq!(minor_units("JPY"), 0);
        assert_eq!(minor_units("USD"), 2);
        assert_eq!(minor_units("BHD"), 3);
    }

    fn row(kind: &str, amount: &str) -> AccrualRow {
        let key = LineKey {
            kind: kind.into(),
            origin: String::new(),
            provider: "openai".into(),
            model: "gpt-4o".into(),
            class: String::new(),
            unit_price: None,
            name: String::new(),
            refs: "cost:1 markup:2".into(),
        };
        let mut totals = Accrued {
            quantity: Decimal::ONE,
            amount: d(amount),
            ..Accrued::default()
        };
        if kind == "usage" {
            totals.classes[0] = super::super::accrue::ClassTotals {
                tokens: Decimal::from(1000),
                amount: d(amount),
                rate: Some(d("2.5")),
            };
        }
        AccrualRow { key, totals }
    }

    #[test]
    fn total_is_the_sum_of_rounded_lines_and_the_residue_is_reported() {
        let rows = vec![
            row("usage", "0.125"),
            row("batch_discount", "-0.015"),
            row("adjustment", "1.005"),
        ];
        let inv = build("t", "2026-10", "USD", rows);
        // 0.12 - 0.02 + 1.00
        assert_eq!(inv.total, d("1.10"));
        assert_eq!(inv.total_exact, d("1.115"));
        assert_eq!(inv.rounding_residue, d("-0.015"));
        assert_eq!(inv.lines[0].kind, "usage");
        assert_eq!(inv.versions, vec!["cost:1", "markup:2"]);
        let jpy = build(
            "t",
            "2026-10",
            "JPY",
            vec![row("usage", "2.5"), row("usage", "3.5")],
        );
        assert_eq!(jpy.total, d("6"));
        let (text, hash) = seal(&inv);
        assert_eq!(hash, hex::encode(Sha256::digest(text.as_bytes())));
        let csv = to_csv(&inv);
        assert_eq!(csv.lines().count(), 4);
        assert!(to_html(&inv).contains("Draft invoice 2026-10"));
    }
}
