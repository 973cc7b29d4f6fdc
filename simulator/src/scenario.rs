//! `caas-sim run`: TODO
use clap::Args;
/// `caas-sim run` flags.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {}
/// Runs it.
pub async fn run_main(_a: RunArgs) -> anyhow::Result<i32> {
    Ok(2)
}
