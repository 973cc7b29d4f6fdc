//! The QEMU scenario: signed frames in, and what must come out of each step.

use std::path::Path;

use caas_firmware_board::transport::{bench, OutKind, StepHeader, StepKind};
use caas_protocol::{
    open_report, seal_command, Command, CommandBody, DesiredState, Grant, Outcome, RejectCode,
    SigningKey, TrustedKey, Vin, MAX_COMMAND_FRAME_SIZE,
};

use crate::qemu::{read_records, Qemu, Record};

/// The scenario's base time (Unix seconds).
const T0: u64 = 1_700_000_000;
/// Instructions `cortex_m::asm::delay(2_000_000)` executes (the firmware's calibration:
/// `1 + 2_000_000 / 2` loop iterations of two instructions).
const CALIBRATION_INSTRUCTIONS: f64 = 4_000_002.0;
/// The QEMU board's flash image: two 4 KiB sectors (the A/B slots).
const FLASH_SIZE: usize = 8192;

/// Feature lines, as the firmware numbers them (bit i = line i).
const POWER_BOOST: u32 = 1 << 0;
const AUTOPILOT: u32 = 1 << 1;
const SNOW_MODE: u32 = 1 << 2;
const HEATED_SEATS: u32 = 1 << 3;

struct Keys {
    gateway: SigningKey,
    rogue_gateway: SigningKey,
    car: SigningKey,
    vin: Vin,
    other_vin: Vin,
}

impl Keys {
    fn new() -> Self {
        Keys {
            gateway: SigningKey::from_bytes(&[0x11; 32]),
            rogue_gateway: SigningKey::from_bytes(&[0x22; 32]),
            car: SigningKey::from_bytes(&[0x33; 32]),
            vin: parse_vin("WVWZZZ1JZXW000001"),
            other_vin: parse_vin("WVWZZZ1JZXW000002"),
        }
    }

    fn provision(&self) -> Vec<u8> {
        let mut p = self.vin.as_str().as_bytes().to_vec();
        p.extend_from_slice(&self.car.to_bytes());
        p.extend_from_slice(self.gateway.verifying_key().as_bytes());
        p
    }
}

fn parse_vin(s: &str) -> Vin {
    match s.parse() {
        Ok(v) => v,
        Err(e) => panic!("the scenario's VIN {s} is invalid: {e}"),
    }
}

/// A grant: service id, flags, end time.
fn grant(service: &str, flags: &[&str], ends_at: Option<u64>) -> Grant {
    let mut g = Grant::new(
        service
            .parse()
            .unwrap_or_else(|e| panic!("service id {service}: {e}")),
    );
    for f in flags {
        let flag = f.parse().unwrap_or_else(|e| panic!("flag {f}: {e}"));
        g.flags
            .push(flag)
            .unwrap_or_else(|_| panic!("too many flags"));
    }
    g.ends_at = ends_at;
    g
}

fn set_state(vin: Vin, seq: u64, issued_at: u64, not_after: u64, grants: Vec<Grant>) -> Command {
    let mut desired = DesiredState::default();
    for g in grants {
        desired
            .grants
            .push(g)
            .unwrap_or_else(|_| panic!("too many grants"));
    }
    Command {
        vin,
        seq,
        issued_at,
        not_after,
        body: CommandBody::SetState(desired),
    }
}

fn seal(cmd: &Command, key: &SigningKey) -> Vec<u8> {
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    match seal_command(cmd, key, &mut buf) {
        Ok(frame) => frame.to_vec(),
        Err(e) => panic!("the scenario's command does not seal: {e}"),
    }
}

/// What one report must say.
#[derive(Debug, Clone)]
enum Expect {
    /// A periodic/after-boot status report.
    Periodic,
    /// This exact outcome, with these active services (when given).
    Outcome(Outcome, Option<Vec<&'static str>>),
}

/// One scenario step and what must come out of it.
struct Step {
    name: &'static str,
    kind: StepKind,
    now: u64,
    body: Vec<u8>,
    reports: Vec<Expect>,
    lines: u32,
    acks: usize,
    /// Whether its command-handling benchmark counts (a valid `SetState`).
    bench: bool,
}

impl Step {
    fn frame(
        name: &'static str,
        now: u64,
        body: Vec<u8>,
        reports: Vec<Expect>,
        lines: u32,
    ) -> Self {
        let bench = matches!(
            reports.last(),
            Some(Expect::Outcome(Outcome::Applied { .. }, Some(_)))
        );
        Step {
            name,
            kind: StepKind::Frame,
            now,
            body,
            reports,
            lines,
            acks: 1,
            bench,
        }
    }
    fn tick(name: &'static str, now: u64, reports: Vec<Expect>, lines: u32) -> Self {
        Step {
            name,
            kind: StepKind::Tick,
            now,
            body: Vec::new(),
            reports,
            lines,
            acks: 0,
            bench: false,
        }
    }
    fn control(name: &'static str, kind: StepKind, now: u64) -> Self {
        Step {
            name,
            kind,
            now,
            body: Vec::new(),
            reports: Vec::new(),
            lines: 0,
            acks: 0,
            bench: false,
        }
    }
    /// Steps after which the firmware writes a lines record.
    fn reports_lines(&self) -> bool {
        !matches!(self.kind, StepKind::Reboot | StepKind::End)
    }
}

fn applied(seq: u64, active: Vec<&'static str>) -> Expect {
    Expect::Outcome(Outcome::Applied { seq }, Some(active))
}
fn rejected(seq: u64, code: RejectCode) -> Expect {
    Expect::Outcome(Outcome::Rejected { seq, code }, None)
}
/// A refusal for what some grants switch, naming them (bit `i` for the `i`-th grant).
fn grants_refused(seq: u64, code: RejectCode, grants: u8) -> Expect {
    Expect::Outcome(Outcome::GrantsRefused { seq, code, grants }, None)
}

/// The first power-on: commands good and bad, a grant ending, a warm reboot.
fn first_run(k: &Keys) -> Vec<Step> {
    let winter_end = T0 + 600;
    let cmd1 = set_state(
        k.vin,
        1,
        T0,
        T0 + 3600,
        vec![
            grant("perf", &["power_boost"], None),
            grant("winter", &["snow_mode"], Some(winter_end)),
        ],
    );
    let frame1 = seal(&cmd1, &k.gateway);
    let grants2 = || {
        vec![
            grant("perf", &["power_boost"], None),
            grant("winter", &["snow_mode"], Some(winter_end)),
            grant("seats", &["heated_seats"], None),
        ]
    };
    let frame2 = seal(
        &set_state(k.vin, 2, T0 + 20, T0 + 3600, grants2()),
        &k.gateway,
    );
    let mut tampered = seal(
        &set_state(k.vin, 2, T0 + 10, T0 + 3600, grants2()),
        &k.gateway,
    );
    // Flip one payload bit (past the 19-byte header): the signature no longer covers it.
    tampered[40] ^= 0x01;
    let other_car = seal(
        &set_state(k.other_vin, 3, T0 + 50, T0 + 3600, vec![]),
        &k.gateway,
    );
    let expired = seal(&set_state(k.vin, 3, T0, T0 + 60, vec![]), &k.gateway);
    let rogue = seal(
        &set_state(k.vin, 3, T0 + 110, T0 + 3600, vec![]),
        &k.rogue_gateway,
    );
    let base = seal(
        &set_state(
            k.vin,
            3,
            T0 + 120,
            T0 + 3600,
            vec![
                grant("perf", &["power_boost"], None),
                grant("x", &["abs"], None),
            ],
        ),
        &k.gateway,
    );
    let query = seal(
        &Command {
            vin: k.vin,
            seq: 3,
            issued_at: T0 + 140,
            not_after: T0 + 3600,
            body: CommandBody::QueryStatus { nonce: 77 },
        },
        &k.gateway,
    );
    let oversized = vec![0xA5u8; MAX_COMMAND_FRAME_SIZE + 1];
    let mut grants3 = grants2();
    grants3.push(grant("autopilot", &["highway_autopilot"], None));
    let frame3 = seal(
        &set_state(k.vin, 3, T0 + 150, T0 + 3600, grants3),
        &k.gateway,
    );

    let both = POWER_BOOST | SNOW_MODE;
    let three = POWER_BOOST | SNOW_MODE | HEATED_SEATS;
    let four = three | AUTOPILOT;
    let after_end = POWER_BOOST | HEATED_SEATS | AUTOPILOT;
    vec![
        Step::frame(
            "valid command turns its lines on",
            T0,
            frame1.clone(),
            vec![Expect::Periodic, applied(1, vec!["perf", "winter"])],
            both,
        ),
        Step::frame(
            "tampered command",
            T0 + 10,
            tampered,
            vec![rejected(0, RejectCode::BadSignature)],
            both,
        ),
        Step::frame(
            "second command adds a line",
            T0 + 20,
            frame2.clone(),
            vec![applied(2, vec!["perf", "winter", "seats"])],
            three,
        ),
        Step::frame(
            "replayed older command",
            T0 + 30,
            frame1.clone(),
            vec![rejected(1, RejectCode::Replay)],
            three,
        ),
        Step::frame(
            "re-delivered newest command is answered, not re-applied",
            T0 + 40,
            frame2.clone(),
            vec![Expect::Outcome(Outcome::Applied { seq: 2 }, None)],
            three,
        ),
        Step::frame(
            "other car's command",
            T0 + 50,
            other_car,
            vec![rejected(3, RejectCode::WrongVin)],
            three,
        ),
        Step::frame(
            "expired command",
            T0 + 100,
            expired,
            vec![rejected(3, RejectCode::Expired)],
            three,
        ),
        Step::frame(
            "unknown gateway key",
            T0 + 110,
            rogue,
            vec![rejected(0, RejectCode::UnknownKey)],
            three,
        ),
        Step::frame(
            "base-platform feature",
            T0 + 120,
            base,
            // The second grant is the one refused.
            vec![grants_refused(3, RejectCode::BasePlatformFeature, 0b10)],
            three,
        ),
        Step::frame(
            "oversized frame",
            T0 + 130,
            oversized,
            vec![rejected(0, RejectCode::TooLarge)],
            three,
        ),
        Step::frame(
            "status query",
            T0 + 140,
            query,
            vec![Expect::Outcome(Outcome::Status { nonce: 77 }, None)],
            three,
        ),
        Step {
            kind: StepKind::FailNextWrite,
            ..Step::tick("storage fault injected", T0 + 150, vec![], three)
        },
        Step {
            acks: 0,
            ..Step::frame(
                "command whose persist fails is refused and not acknowledged",
                T0 + 160,
                frame3.clone(),
                vec![rejected(3, RejectCode::StorageFailed)],
                three,
            )
        },
        Step::frame(
            "its redelivery after the fault is applied",
            T0 + 170,
            frame3,
            vec![applied(3, vec!["perf", "winter", "seats", "autopilot"])],
            four,
        ),
        Step::tick(
            "temporary grant ends at its end time",
            winter_end,
            vec![],
            after_end,
        ),
        Step::control("warm reboot", StepKind::Reboot, winter_end + 10),
        Step::tick(
            "after reboot the lines come back from flash",
            winter_end + 20,
            vec![Expect::Periodic],
            after_end,
        ),
        Step::frame(
            "replay after reboot",
            winter_end + 30,
            frame1,
            vec![rejected(1, RejectCode::Replay)],
            after_end,
        ),
        Step {
            body: frame2,
            ..Step::tick(
                "benchmark: verify one command",
                winter_end + 40,
                vec![],
                after_end,
            )
        }
        .with_kind(StepKind::BenchVerify),
        Step::control("end", StepKind::End, winter_end + 50),
    ]
}

impl Step {
    fn with_kind(mut self, kind: StepKind) -> Self {
        self.kind = kind;
        self
    }
}

/// The second power-on over the same flash image: a cold boot.
fn second_run(k: &Keys) -> Vec<Step> {
    let t = T0 + 700;
    let withdraw = seal(&set_state(k.vin, 4, t + 10, t + 3600, vec![]), &k.gateway);
    let older = seal(
        &set_state(
            k.vin,
            3,
            T0 + 150,
            t + 3600,
            vec![grant("perf", &["power_boost"], None)],
        ),
        &k.gateway,
    );
    let future = seal(
        &set_state(k.vin, 5, t + 100_000, t + 200_000, vec![]),
        &k.gateway,
    );
    let (largest, largest_ids) = largest_command(k, 6, t + 40);
    vec![
        Step::tick(
            "cold boot restores the lines from flash",
            t,
            vec![Expect::Periodic],
            POWER_BOOST | HEATED_SEATS | AUTOPILOT,
        ),
        Step::frame(
            "withdrawing every grant",
            t + 10,
            withdraw,
            vec![applied(4, vec![])],
            0,
        ),
        Step::frame(
            "older command after the cold boot",
            t + 20,
            older,
            vec![rejected(3, RejectCode::Replay)],
            0,
        ),
        Step::frame(
            "command issued in the future",
            t + 30,
            future,
            vec![rejected(5, RejectCode::IssuedInFuture)],
            0,
        ),
        Step::frame(
            "the largest command this platform can get (8 grants, 32 flags, 32 parameters)",
            t + 40,
            largest,
            vec![applied(6, largest_ids)],
            POWER_BOOST | AUTOPILOT | SNOW_MODE | HEATED_SEATS,
        ),
        Step::control("end", StepKind::End, t + 50),
    ]
}

/// A command with every list at its bound and every id and parameter at its longest, over
/// the platform's four optional features (so the frame is about 2.5 KiB, not the protocol's
/// 3.3 KiB maximum, which needs 32-byte flag names): the agent keeps, stores, switches and
/// reports it all; its stack is measured like every step's.
fn largest_command(k: &Keys, seq: u64, now: u64) -> (Vec<u8>, Vec<&'static str>) {
    const FLAGS: [&str; 4] = [
        "power_boost",
        "highway_autopilot",
        "snow_mode",
        "heated_seats",
    ];
    let mut ids = Vec::new();
    let mut grants = Vec::new();
    for i in 0..caas_protocol::MAX_GRANTS {
        let id: &'static str = Box::leak(format!("{i}{}", "s".repeat(31)).into_boxed_str());
        let mut g = grant(id, &FLAGS, Some(now + 86_400 * 365));
        for j in 0..caas_protocol::MAX_PARAMS_PER_GRANT {
            let param = caas_protocol::Param {
                key: format!("{j}{}", "k".repeat(23))
                    .parse()
                    .unwrap_or_else(|e| panic!("parameter name: {e}")),
                value: "v"
                    .repeat(24)
                    .parse()
                    .unwrap_or_else(|e| panic!("parameter value: {e}")),
            };
            g.params
                .push(param)
                .unwrap_or_else(|_| panic!("too many parameters"));
        }
        ids.push(id);
        grants.push(g);
    }
    let frame = seal(&set_state(k.vin, seq, now, now + 3600, grants), &k.gateway);
    (frame, ids)
}

/// What the runs measured and how the checks went.
pub(crate) struct Results {
    pub(crate) stack_high_water: u64,
    pub(crate) painted: u64,
    instructions_per_tick: f64,
    verify_ticks: Vec<u64>,
    command_ticks: Vec<u64>,
    /// The deepest stack of each step (and boot), in bytes.
    step_stack: Vec<(String, u32)>,
    /// The deepest stack during `open_command_view` alone (verify, then read in place), and
    /// during the in-place read alone (after the signature), in bytes.
    verify_stack: Option<u64>,
    in_place_stack: Option<u64>,
    /// The Ed25519 check alone: ticks, and the deepest stack.
    signature_ticks: Vec<u64>,
    signature_stack: Option<u64>,
    /// The same with ed25519-compact (firmware feature `compare-ed25519-compact`).
    compact_ticks: Vec<u64>,
    compact_stack: Option<u64>,
    checks: usize,
    failures: Vec<String>,
}

impl Results {
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.failures.push(what());
        }
    }

    /// Prints the benchmark lines (measurements, not assertions).
    pub(crate) fn print_bench(&self) {
        let instr = |t: u64| (t as f64 * self.instructions_per_tick).round() as u64;
        let line = |what: &str, ticks: &[u64]| {
            if ticks.is_empty() {
                println!("  {what:<58} (not measured)");
                return;
            }
            let min = ticks.iter().copied().map(instr).min().unwrap_or(0);
            let max = ticks.iter().copied().map(instr).max().unwrap_or(0);
            let mean = ticks.iter().copied().map(instr).sum::<u64>() / ticks.len() as u64;
            println!(
                "  {what:<58} mean {mean:>9}  min {min:>9}  max {max:>9}  (n={})",
                ticks.len()
            );
        };
        println!(
            "guest instructions (QEMU -icount shift=0, SysTick calibrated to {:.2} instr/tick)",
            self.instructions_per_tick
        );
        line(
            "Ed25519 verify_strict alone (SHA-512 included)",
            &self.signature_ticks,
        );
        if !self.compact_ticks.is_empty() {
            line(
                "the same check with ed25519-compact (opt_size)",
                &self.compact_ticks,
            );
        }
        line(
            "open_command_view: Ed25519 verify_strict + in-place read",
            &self.verify_ticks,
        );
        line(
            "whole SetState: verify, check, persist, lines, sign report",
            &self.command_ticks,
        );
    }

    /// Prints the deepest stack of each step.
    pub(crate) fn print_stack(&self) {
        println!(
            "stack high-water per step (bytes below the top of the stack, main's frame included)"
        );
        for (name, bytes) in &self.step_stack {
            println!("  {bytes:>6}  {name}");
        }
        if let Some(sig) = self.signature_stack {
            println!("  {sig:>6}  Ed25519 verify_strict alone (SHA-512 included)");
        }
        if let Some(sig) = self.compact_stack {
            println!("  {sig:>6}  the same check with ed25519-compact (opt_size)");
        }
        if let (Some(verify), Some(in_place)) = (self.verify_stack, self.in_place_stack) {
            println!("  {verify:>6}  open_command_view alone (verify, then read in place)");
            println!(
                "  {in_place:>6}  the in-place read alone (CommandView::parse, grant by grant)"
            );
        }
    }

    /// A closing line in the plain "N passed, N failed" form.
    pub(crate) fn summary_line(&self) -> String {
        format!(
            "firmware-qemu: {} passed, {} failed",
            self.checks - self.failures.len(),
            self.failures.len()
        )
    }

    /// Fails with every failed check.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "QEMU scenario: {} check(s) failed:\n  {}",
                self.failures.len(),
                self.failures.join("\n  ")
            ))
        }
    }
}

fn write_scenario(path: &Path, steps: &[Step]) -> Result<(), String> {
    let mut bytes = Vec::new();
    for s in steps {
        let len =
            u16::try_from(s.body.len()).map_err(|_| format!("step {}: body too long", s.name))?;
        bytes.extend_from_slice(
            &StepHeader {
                kind: s.kind,
                now: s.now,
                len,
            }
            .encode(),
        );
        bytes.extend_from_slice(&s.body);
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs both power-ons and checks every step.
pub(crate) fn run_all(qemu: &Qemu, work: &Path) -> Result<Results, String> {
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let keys = Keys::new();
    let write = |name: &str, bytes: &[u8]| {
        let p = work.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))
    };
    write("provision.bin", &keys.provision())?;
    write("flash.bin", &[0xFF; FLASH_SIZE])?;

    let mut results = Results {
        stack_high_water: 0,
        painted: 0,
        instructions_per_tick: 0.0,
        verify_ticks: Vec::new(),
        command_ticks: Vec::new(),
        step_stack: Vec::new(),
        verify_stack: None,
        in_place_stack: None,
        signature_ticks: Vec::new(),
        signature_stack: None,
        compact_ticks: Vec::new(),
        compact_stack: None,
        checks: 0,
        failures: Vec::new(),
    };
    // The first power-on starts from blank flash and reboots once (warm); the second is a
    // cold boot over the same flash.
    let runs: [(&str, Vec<Step>, &[&str]); 2] = [
        (
            "first power-on",
            first_run(&keys),
            &["boot: fresh", "boot: restored"],
        ),
        ("cold reboot", second_run(&keys), &["boot: restored"]),
    ];
    for (run, steps, boots) in runs {
        write_scenario(&work.join("scenario.bin"), &steps)?;
        let _ = std::fs::remove_file(work.join("out.bin"));
        let (status, console) = qemu.run(work)?;
        results.expect(status == 0, || {
            format!("{run}: QEMU exit status {status}, console: {console}")
        });
        let records = read_records(&work.join("out.bin"))?;
        check_run(run, &keys, &steps, boots, &records, &mut results);
        println!(
            "QEMU run \"{run}\": {} steps, {} output records, exit status {status}",
            steps.len(),
            records.len()
        );
    }
    Ok(results)
}

fn check_run(
    run: &str,
    keys: &Keys,
    steps: &[Step],
    expected_boots: &[&str],
    records: &[Record],
    r: &mut Results,
) {
    let car = TrustedKey::new(keys.car.verifying_key());
    let with_lines: Vec<&Step> = steps.iter().filter(|s| s.reports_lines()).collect();
    let mut segment: Vec<&Record> = Vec::new();
    let mut seen_steps = 0usize;
    let mut saw_stack = false;
    let dump = std::env::var_os("CAAS_FW_DUMP").is_some();
    let mut boots = Vec::new();
    for rec in records {
        if dump {
            let detail = match rec.kind {
                OutKind::Report => format!(
                    "{:?}",
                    open_report(&rec.body, &car).map(|r| (r.applied_seq, r.outcome))
                ),
                _ => format!("{:02x?}", rec.body),
            };
            eprintln!("{run}: {:?} {detail}", rec.kind);
        }
        match rec.kind {
            OutKind::Lines => {
                let idx = usize::from(u16::from_le_bytes([rec.body[0], rec.body[1]]));
                let lines =
                    u32::from_le_bytes([rec.body[2], rec.body[3], rec.body[4], rec.body[5]]);
                let stack =
                    u32::from_le_bytes([rec.body[6], rec.body[7], rec.body[8], rec.body[9]]);
                let Some(step) = with_lines.get(idx) else {
                    r.expect(false, || {
                        format!("{run}: lines record for unknown step {idx}")
                    });
                    continue;
                };
                r.expect(idx == seen_steps, || {
                    format!("{run}: step {idx} out of order")
                });
                r.step_stack.push((format!("{run}: {}", step.name), stack));
                check_step(run, keys, &car, step, &segment, lines, r);
                segment.clear();
                seen_steps += 1;
            }
            OutKind::Stack => {
                saw_stack = true;
                let hw = u64::from(u32::from_le_bytes([
                    rec.body[0],
                    rec.body[1],
                    rec.body[2],
                    rec.body[3],
                ]));
                let painted = u64::from(u32::from_le_bytes([
                    rec.body[4],
                    rec.body[5],
                    rec.body[6],
                    rec.body[7],
                ]));
                r.stack_high_water = r.stack_high_water.max(hw);
                r.painted = painted;
            }
            OutKind::Log => boots.push(String::from_utf8_lossy(&rec.body).into_owned()),
            OutKind::Boot => {
                let stack =
                    u32::from_le_bytes([rec.body[0], rec.body[1], rec.body[2], rec.body[3]]);
                r.step_stack.push((
                    format!("{run}: boot (record loaded into the agent, reboot_from_buffer, first actions)"),
                    stack,
                ));
            }
            OutKind::Bench if rec.body.first() == Some(&0) => {
                let ticks = u64::from_le_bytes(rec.body[1..9].try_into().unwrap_or([0; 8]));
                if ticks > 0 {
                    r.instructions_per_tick = CALIBRATION_INSTRUCTIONS / ticks as f64;
                }
            }
            _ => segment.push(rec),
        }
    }
    r.expect(seen_steps == with_lines.len(), || {
        format!(
            "{run}: the firmware finished {seen_steps} of {} steps",
            with_lines.len()
        )
    });
    r.expect(boots == expected_boots, || {
        format!("{run}: boots {boots:?}, expected {expected_boots:?} (never a safe-state boot)")
    });
    r.expect(saw_stack, || {
        format!("{run}: no stack measurement (the firmware did not reach its end)")
    });
}

fn check_step(
    run: &str,
    keys: &Keys,
    car: &TrustedKey,
    step: &Step,
    segment: &[&Record],
    lines: u32,
    r: &mut Results,
) {
    let at = |what: String| format!("{run}, step \"{}\": {what}", step.name);
    r.expect(lines == step.lines, || {
        at(format!("lines {lines:#06b}, expected {:#06b}", step.lines))
    });
    let acks = segment.iter().filter(|x| x.kind == OutKind::Ack).count();
    r.expect(acks == step.acks, || {
        at(format!("{acks} acks, expected {}", step.acks))
    });
    for rec in segment.iter().filter(|x| x.kind == OutKind::Bench) {
        let ticks = u64::from_le_bytes(rec.body[1..9].try_into().unwrap_or([0; 8]));
        match rec.body[0] {
            bench::VERIFY => r.verify_ticks.push(ticks),
            bench::HANDLE_COMMAND if step.bench => r.command_ticks.push(ticks),
            bench::VERIFY_STACK => r.verify_stack = Some(ticks),
            bench::IN_PLACE_STACK => r.in_place_stack = Some(ticks),
            bench::SIGNATURE => r.signature_ticks.push(ticks),
            bench::SIGNATURE_STACK => r.signature_stack = Some(ticks),
            bench::COMPACT_SIGNATURE => r.compact_ticks.push(ticks),
            bench::COMPACT_SIGNATURE_STACK => r.compact_stack = Some(ticks),
            _ => {}
        }
    }
    let reports: Vec<&&Record> = segment
        .iter()
        .filter(|x| x.kind == OutKind::Report)
        .collect();
    r.expect(reports.len() == step.reports.len(), || {
        at(format!(
            "{} reports, expected {}",
            reports.len(),
            step.reports.len()
        ))
    });
    for (rec, expect) in reports.iter().zip(&step.reports) {
        let report = match open_report(&rec.body, car) {
            Ok(report) => report,
            Err(code) => {
                r.expect(false, || {
                    at(format!(
                        "a report does not verify with the car's key: {code}"
                    ))
                });
                continue;
            }
        };
        r.expect(report.vin == keys.vin, || {
            at(format!("report for VIN {}", report.vin))
        });
        match expect {
            Expect::Periodic => {
                r.expect(matches!(report.outcome, Outcome::Periodic { .. }), || {
                    at(format!(
                        "outcome {:?}, expected a periodic report",
                        report.outcome
                    ))
                });
            }
            Expect::Outcome(outcome, active) => {
                r.expect(report.outcome == *outcome, || {
                    at(format!(
                        "outcome {:?}, expected {outcome:?}",
                        report.outcome
                    ))
                });
                if matches!(
                    outcome,
                    Outcome::Rejected {
                        code: RejectCode::StorageFailed,
                        ..
                    }
                ) {
                    let codes = &report.diagnostics.error_codes;
                    r.expect(codes.iter().any(|c| c.as_str() == "PERSIST_FAILED"), || {
                        at(format!("diagnostics {codes:?} lack PERSIST_FAILED"))
                    });
                }
                if let Some(active) = active {
                    let got: Vec<&str> = report
                        .active
                        .iter()
                        .map(|a| a.service_id.as_str())
                        .collect();
                    r.expect(got == *active, || {
                        at(format!("active services {got:?}, expected {active:?}"))
                    });
                }
            }
        }
    }
}
