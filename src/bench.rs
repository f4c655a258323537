//! `tokenledger bench`: figures for the pipeline against baselines measured in the same run.

use crate::settings::Settings;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Events per measurement.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
}

pub async fn run(_s: &Settings, _a: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
