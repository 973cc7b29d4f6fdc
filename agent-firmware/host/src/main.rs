//! # caas-firmware-host: the host side of the firmware test
//!
//! `scripts/firmware-test.sh` builds the firmware (`agent-firmware/`, thumbv7em) and then
//! runs this tool, which:
//!
//! 1. makes the keys (gateway, this car, another gateway) and signs the scenario's command
//!    frames with `caas-protocol`, exactly as the gateway does;
//! 2. writes the QEMU files (`provision.bin`, a blank `flash.bin`, `scenario.bin`) and runs
//!    the firmware in `qemu-system-arm -machine mps2-an386` with `-icount shift=0`, twice
//!    over the same flash image (the second run is a cold reboot);
//! 3. checks QEMU's exit status, verifies every report with the car's public key, and
//!    checks each report's outcome and the feature lines after each step;
//! 4. reads the ELF's section headers and the painted stack's high-water mark, prints the
//!    size report and the instructions-per-command benchmark, and fails when the budget
//!    (flash ≤ 64 KiB, RAM = statics + stack ≤ 16 KiB) is exceeded.
//!
//! Usage: `caas-firmware-host --elf <firmware ELF> --work <scratch dir> [--qemu <binary>]
//! [--timeout-secs <n>]`. Exit status 0 when everything passed.
#![forbid(unsafe_code)]

mod budget;
mod qemu;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Flash budget in bytes (code, read-only data and the initial values of `.data`).
pub(crate) const FLASH_BUDGET: u64 = 64 * 1024;
/// RAM budget in bytes (`.data` + `.bss` + the stack's high-water mark).
pub(crate) const RAM_BUDGET: u64 = 16 * 1024;
struct Args {
    elf: PathBuf,
    work: PathBuf,
    qemu: String,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut elf = None;
    let mut work = None;
    let mut qemu = "qemu-system-arm".to_string();
    let mut timeout = Duration::from_secs(120);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--elf" => elf = Some(PathBuf::from(value()?)),
            "--work" => work = Some(PathBuf::from(value()?)),
            "--qemu" => qemu = value()?,
            "--timeout-secs" => {
                let v = value()?;
                timeout = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--timeout-secs: not a number: {v}"))?,
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        elf: elf.ok_or("--elf <firmware ELF> is required")?,
        work: work.ok_or("--work <scratch dir> is required")?,
        qemu,
        timeout,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("caas-firmware-host: {e}");
            eprintln!("usage: caas-firmware-host --elf <ELF> --work <dir> [--qemu <bin>] [--timeout-secs <n>]");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let sizes = budget::sections(&args.elf)?;
    let qemu = qemu::Qemu {
        binary: args.qemu.clone(),
        elf: args.elf.clone(),
        timeout: args.timeout,
    };
    let results = scenario::run_all(&qemu, &args.work)?;
    let report = budget::Report {
        sizes,
        stack_high_water: results.stack_high_water,
        painted: results.painted,
    };
    report.print();
    results.print_stack();
    results.print_bench();
    let budget = report.check();
    let checks = results.check();
    println!("{}", results.summary_line());
    if let Err(e) = &checks {
        eprintln!("{e}");
    }
    budget?;
    checks
}
