//! `caas-agent`'s command line, built as part of the end-to-end tests (see `Cargo.toml`).
fn main() -> std::process::ExitCode {
    caas_agent::runtime::cli::main()
}
