//! `caas-agent`: the car agent for Linux telematics units (see `caas-agent run --help`).
//!
//! Exit status: 0 after SIGINT/SIGTERM, 2 for bad configuration (one line on stderr). The
//! program is the library's [`caas_agent::runtime::cli::main`].

fn main() -> std::process::ExitCode {
    caas_agent::runtime::cli::main()
}
