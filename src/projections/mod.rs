//! Read models derived from the record: request views, usage rollups, balances.
//! Updated in the append transaction (see `ledger::store`); rebuilt and verified here.

pub mod queries;
pub mod rebuild;
