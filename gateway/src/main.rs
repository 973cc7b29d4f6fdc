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
    /// Check the settings `serve` would start with (the same flags, environment and file),
    /// loading every certificate, key and list, without starting: 0 when they would start
    /// (warnings printed, such as a certificate expiring within 30 days), 1 when not.
    Check(caas_gateway::config::ServeArgs),
}

fn main() {
    let code = match Cli::parse().command {
        Command::Serve(args) => caas_gateway::serve_main(args),
        Command::Check(args) => caas_gateway::check_main(args),
    };
    std::process::exit(code);
}
