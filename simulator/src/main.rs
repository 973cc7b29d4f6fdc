//! The `caas-sim` binary: `fleet`, `run`, `demo`, `bench` (see the `caas_sim` library docs).
fn main() {
    std::process::exit(caas_sim::cli::main());
}
