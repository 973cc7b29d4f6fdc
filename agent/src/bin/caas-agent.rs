//! `caas-agent`: the car agent for Linux telematics units (see `caas-agent run --help`).
//!
//! Exit status: 0 after SIGINT/SIGTERM, 2 for bad configuration (one line on stderr).

use clap::Parser;

use caas_agent::runtime::settings::{Cli, CliCommand, Settings};
use caas_agent::runtime::{install_crypto_provider, run};

fn main() -> std::process::ExitCode {
    install_crypto_provider();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let CliCommand::Run(args) = cli.command;
    let settings = match args.merge_config_file().and_then(Settings::resolve) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("caas-agent: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caas-agent: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caas-agent: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
