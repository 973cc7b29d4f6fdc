//! # caasctl: the operator and technician CLI
//!
//! A thin binary over the `caasctl` library ([`caasctl::cli::main`]): it parses the command
//! line, runs the command and turns any error into one `error: ...` line on stderr and exit
//! status 1. See the library's documentation (and `caasctl --help`) for the commands.

fn main() -> std::process::ExitCode {
    caasctl::cli::main()
}
