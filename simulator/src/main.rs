//! The `caas-sim` binary: `fleet`, `run`, `demo`, `bench` (see the `caas_sim` library docs).

// The caas-gateway binary's allocator, so the gateway this binary runs (`caas-sim gateway
// serve`, for the demo and the benchmark) is the same program as `caas-gateway serve`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() {
    std::process::exit(caas_sim::cli::main());
}
