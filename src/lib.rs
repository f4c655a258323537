//! tokenledger: the billing and usage ledger behind an LLM API aggregator.

pub mod api;
pub mod app;
pub mod authorize;
pub mod bench;
pub mod bench_invoices;
pub mod bench_router;
pub mod bench_terms;
pub mod bench_webhooks;
pub mod bus;
pub mod catalog;
pub mod db;
pub mod engine;
pub mod events;
pub mod invoices;
pub mod ledger;
pub mod loadgen;
pub mod pricing;
pub mod projections;
pub mod router;
pub mod settings;
pub mod telemetry;
pub mod webhooks;
