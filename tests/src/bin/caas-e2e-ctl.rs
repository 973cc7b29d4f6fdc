//! `caasctl`'s command line, built as part of the end-to-end tests (see `Cargo.toml`).
fn main() -> std::process::ExitCode {
    caasctl::cli::main()
}
