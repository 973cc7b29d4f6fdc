//! `caas-sim bench`: TODO
use clap::Args;
/// `caas-sim bench` flags.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {}
/// Runs it.
pub async fn bench_main(_a: BenchArgs) -> anyhow::Result<i32> {
    Ok(2)
}
