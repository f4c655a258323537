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

/// Lanes of the projections every tenant adds to (`provider_period_costs`,
/// `provider_usage_minutes`): a key's row is split by tenant so that writer tasks on
/// different tenants never wait on each other's row lock.
pub const LANES: u8 = 16;

/// A tenant's routing byte: the first byte of sha256(tenant id). Writer tasks take tenants
/// by it (mod the task count) and the shared projections' lane is it mod [`LANES`], so
/// with a task count dividing 16 each lane belongs to one task. SQL computes the same:
/// `get_byte(sha256(convert_to(tenant_id, 'UTF8')), 0)`.
pub fn tenant_byte(tenant: &str) -> u8 {
    use sha2::Digest;
    sha2::Sha256::digest(tenant.as_bytes())[0]
}

/// The lane of a tenant's rows in the shared projections.
pub fn lane(tenant: &str) -> i16 {
    i16::from(tenant_byte(tenant) % LANES)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lanes_follow_the_writer_partition() {
        // with a task count dividing 16, a lane's tenants all go to one task
        for k in [1usize, 2, 4, 8, 16] {
            let mut owner = std::collections::HashMap::new();
            for i in 0..500 {
                let t = format!("tenant-{i}");
                let task = super::tenant_byte(&t) as usize % k;
                assert_eq!(
                    *owner.entry(super::lane(&t)).or_insert(task),
                    task,
                    "k = {k}"
                );
            }
        }
        // sha256("acme") starts with 0x82 (checked against Postgres' sha256())
        assert_eq!(super::tenant_byte("acme"), 0x82);
    }
}
