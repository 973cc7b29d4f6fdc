//! `caas-gateway serve`: the fleet command gateway as a process (see the library docs).
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "caas-gateway",
    version,
    about = "CaaS fleet command gateway: IoT API, activation engine, MQTT fan-out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the IoT API and the MQTT fan-out (loopback only unless told otherwise).
    Serve(caas_gateway::config::ServeArgs),
}

fn main() {
    let Command::Serve(args) = Cli::parse().command;
    std::process::exit(caas_gateway::serve_main(args));
}
