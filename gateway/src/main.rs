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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rumqttd=warn,sled=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Command::Serve(args) = cli.command;
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("caas-gateway: {e:#}");
            std::process::exit(2);
        }
    };
    if config.api_token == caas_gateway::DEV_API_TOKEN {
        eprintln!(
            "caas-gateway: using the development API token {:?} (set --api-token)",
            caas_gateway::DEV_API_TOKEN
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caas-gateway: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(caas_gateway::run(config, shutdown_signal())) {
        eprintln!("caas-gateway: {e:#}");
        std::process::exit(1);
    }
}
