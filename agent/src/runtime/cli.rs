//! The whole `caas-agent` program, callable from the library: the binary is only a call to
//! [`main`], and the end-to-end tests (`caas-tests`) build it under another name too
//! (`caas-e2e-agent`), since a package's tests can only run binaries of their own package.

use std::process::ExitCode;

use clap::Parser;

use super::settings::{Cli, CliCommand, Settings};
use super::{install_crypto_provider, run};

/// Parses the process's command line and runs the agent until SIGINT/SIGTERM.
///
/// Exit status: 0 after SIGINT/SIGTERM, 2 for bad configuration (one line on stderr).
pub fn main() -> ExitCode {
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
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caas-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caas-agent: {e:#}");
            ExitCode::from(2)
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
