//! # caasctl: the operator and technician CLI
//!
//! A thin binary over the `caasctl` library: it parses the command line, runs the command
//! and turns any error into one `error: ...` line on stderr and exit status 1. See the
//! library's documentation (and `caasctl --help`) for the commands.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = caasctl::cli::Cli::parse();
    match caasctl::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the cause chain holds; causes a message already quotes are
            // not repeated.
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&text);
                }
            }
            eprintln!("error: {}", msg.replace(['\n', '\r'], " "));
            std::process::ExitCode::FAILURE
        }
    }
}
