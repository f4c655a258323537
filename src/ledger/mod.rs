//! The ledger: accounts, transfers, and the writer that turns events into entries.
//!
//! Accounts are per tenant, so writers for different tenants never touch the same
//! balance row. A balance is debits minus credits; every transfer moves a positive
//! amount from one account to another, so the balances of a currency sum to zero.

pub mod accounts;
pub mod dead_letters;
pub mod provider_settlement;
pub mod state;
pub mod store;
pub mod writer;

pub use writer::{Inbound, Outcome, Writer};
