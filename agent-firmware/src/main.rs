//! # caas-agent-firmware: the CaaS agent core on a Cortex-M4 ECU, run in QEMU
//!
//! A `#![no_std]` `#![no_main]` binary for `thumbv7em-none-eabihf` (QEMU `mps2-an386`) that
//! runs the agent core (`caas-agent`, the same state machine as the Linux agent and the
//! simulator) unchanged. What it adds is thin:
//!
//! - the board ([`caas_firmware_board`]): feature lines on `embedded-hal` output pins (here
//!   recording pins whose state is written out for the host test), the agent's persisted
//!   record in NOR flash through `embedded-storage` (A/B slots that survive a power cut at
//!   any write point), and the transport seam (a UART to the modem on hardware);
//! - the QEMU stand-ins ([`semi`], [`flash`]): host files through semihosting for the
//!   provisioning data, the scenario of incoming frames, the flash image and the output
//!   (reports, line states, benchmarks, the stack's high-water mark).
//!
//! The driver loop is the core's contract: after every `handle_*`, drain `poll_action`,
//! carrying out each action (persist synchronously, then lines, then acks, then reports)
//! before the next; call `handle_timeout` when `poll_timeout` comes due.
//!
//! **RAM.** The budget is 16 KiB for statics and stack together. The one agent (about 7 KiB:
//! its frame buffer, the applied grants in compact form, the keys) is built once in `main`'s
//! frame with `Agent::unbooted` (returned in place, no copy) and booted again in place at
//! every power-on with `Agent::reboot_from_buffer`, after the store loaded the record
//! straight into the agent's own buffer: there is never a second agent nor a second record
//! buffer. Frames are received into that buffer too (`Agent::handle_buffered_frame`). The
//! peak is the Ed25519 signature check (about 7.3 KiB of stack) above that; the core
//! verifies before it decodes anything and reads commands in place, so nothing else is
//! stacked on it (README.md, "Budget").
//!
//! **Ed25519.** The core verifies with `ed25519-dalek` (through `caas-protocol`, built with
//! `default-features = false`: no precomputed tables, the `u32` field backend). It is the
//! same code the gateway and the Linux agent run, and its `verify_strict` refuses malleable
//! signatures and small-order keys; with `sha2`'s compact SHA-512 the whole firmware takes
//! about 44 KiB of the 64 KiB flash budget (`scripts/firmware-test.sh` measures it). The
//! smaller alternative, `ed25519-compact`, would only be worth it with its `opt_size`
//! feature, and would mean a second implementation of the same checks.
//!
//! The QEMU files, relative to QEMU's working directory (the host tool writes them):
//! `provision.bin` (VIN, car secret key, gateway public key), `flash.bin` (the NOR image),
//! `scenario.bin` (steps in) and `out.bin` (records out); formats in
//! [`caas_firmware_board::transport`].
#![no_std]
#![no_main]
#![deny(unsafe_code)]

mod flash;
mod measure;
mod semi;

use caas_agent::{Action, Agent, BootStatus, Catalog, Config, FeatureLines};
use caas_firmware_board::lines::{PinLines, RecordingPin};
use caas_firmware_board::store::SlotStore;
use caas_firmware_board::transport::{
    bench, out_header, OutKind, StepHeader, StepKind, Transport, STEP_HEADER_SIZE,
};
use caas_protocol::{
    open_command_view, parse_frame, BodyView, CommandView, ErrorCode, FeatureFlag, FirmwareVersion,
    FrameKind, Param, SigningKey, TrustedKey, VerifyingKey, Vin,
};
use cortex_m_rt::entry;
use cortex_m_semihosting::debug;

use crate::flash::FileFlash;
use crate::semi::{mode, HostError, HostFile};

/// The platform's optional features, in feature-line order (line i = bit i).
const OPTIONAL_FEATURES: [&str; 4] = [
    "power_boost",
    "highway_autopilot",
    "snow_mode",
    "heated_seats",
];
/// The base platform: no command may touch these.
const BASE_FEATURES: &[&str] = &["abs", "esc", "airbag"];
/// Reported in every report's diagnostics.
const FIRMWARE_VERSION: &str = "fw-m4-0.1.0";
/// Diagnostic code when a feature line could not be driven.
const ERR_LINE_FAULT: &str = "LINE_FAULT";
/// Bytes of `provision.bin`: VIN, car secret key seed, gateway public key.
const PROVISION_SIZE: usize = 17 + 32 + 32;
/// `cortex_m::asm::delay` argument used to calibrate SysTick ticks against instructions:
/// cortex-m 0.7.10 runs `n + 1` iterations of `subs; bne`, i.e. 4,000,002 instructions.
const CALIBRATION_DELAY: u32 = 2_000_000;

#[entry]
fn main() -> ! {
    let status = match run() {
        Ok(()) => debug::EXIT_SUCCESS,
        Err(fault) => {
            if let Ok(mut err) = cortex_m_semihosting::hio::hstderr() {
                let _ = err.write_all(fault.message().as_bytes());
            }
            debug::EXIT_FAILURE
        }
    };
    debug::exit(status);
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Why the firmware stopped before the scenario ended.
#[derive(Debug)]
enum Fault {
    /// A host file could not be opened, read or written.
    Host,
    /// `provision.bin` is malformed.
    Provision,
    /// The flash image is unusable.
    Flash,
    /// The scenario is malformed.
    Scenario,
}

impl Fault {
    /// A line for QEMU's console (no `core::fmt`: it would cost flash).
    fn message(&self) -> &'static str {
        match self {
            Fault::Host => "firmware: a semihosting file operation failed\n",
            Fault::Provision => "firmware: provision.bin is malformed\n",
            Fault::Flash => "firmware: flash.bin or the board is unusable\n",
            Fault::Scenario => "firmware: scenario.bin is malformed\n",
        }
    }
}

impl From<HostError> for Fault {
    fn from(_: HostError) -> Self {
        Fault::Host
    }
}

/// The output file: reports (the modem link's sending side) and the test's records.
struct OutFile(HostFile);

impl OutFile {
    fn record(&mut self, kind: OutKind, body: &[u8]) -> Result<(), HostError> {
        let len = u16::try_from(body.len()).map_err(|_| HostError)?;
        self.0.write_all(&out_header(kind, len))?;
        self.0.write_all(body)
    }
}

/// The QEMU stand-in for the modem link: frames come from the scenario file (the body of
/// the current `Frame` step), reports go to the output file.
struct Link {
    scenario: HostFile,
    out: OutFile,
    /// Bytes of the current step's frame not yet received.
    pending: usize,
}

impl Transport for Link {
    type Error = HostError;

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, HostError> {
        let len = core::mem::take(&mut self.pending);
        if len == 0 {
            return Ok(None);
        }
        match buf.get_mut(..len) {
            Some(frame) => self.scenario.read_exact(frame)?,
            None => skip(&mut self.scenario, len)?,
        }
        Ok(Some(len))
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), HostError> {
        self.out.record(OutKind::Report, frame)
    }
}

/// The agent's [`FeatureLines`] on the board's pins.
struct Lines {
    pins: PinLines<RecordingPin, { OPTIONAL_FEATURES.len() }>,
    fault: bool,
}

impl FeatureLines for Lines {
    fn set_feature(&mut self, flag: &FeatureFlag, on: bool, _params: &[Param]) {
        // The core only switches optional features, which all have a line; an unknown one
        // or a pin error is a board fault the next reports carry.
        if !matches!(self.pins.set(flag.as_str(), on), Ok(true)) {
            self.fault = true;
        }
    }
}

type Store = SlotStore<FileFlash>;

/// The deepest stack seen over the whole run (each step re-paints the stack).
struct StackWatch {
    max: u32,
}

impl StackWatch {
    /// The stack used since the last reading, which then starts afresh.
    fn take(&mut self) -> u32 {
        let used = measure::stack_high_water();
        self.max = self.max.max(used);
        measure::repaint();
        used
    }
}

/// Everything around the agent: the board's parts and the QEMU stand-ins.
struct Board {
    store: Store,
    link: Link,
    lines: Lines,
    stack: StackWatch,
    /// Steps done so far, over all boots.
    step: u16,
}

fn run() -> Result<(), Fault> {
    let (mut board, provision) = setup()?;
    // The one agent (about 7 KiB), built once here and booted again in place at every
    // power-on (`boot_agent`), so there is never a second one nor a second record buffer.
    let mut agent = new_agent(&provision);
    // Each pass is one power-on: the agent boots from flash; `Reboot` steps end a pass.
    while boot_and_run(&mut board, &mut agent)? {
        // A reboot loses the lines' state as the ECU would: the new agent starts them off.
        board.lines.pins.apply(0).map_err(|_| Fault::Flash)?;
    }
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&board.stack.max.to_le_bytes());
    body[4..].copy_from_slice(&measure::window_size().to_le_bytes());
    board.link.out.record(OutKind::Stack, &body)?;
    Ok(())
}

/// Calibrates the tick counter, opens the QEMU files and the flash store, and reads and checks
/// `provision.bin`. Not inlined: its temporaries are gone before the agent runs.
#[inline(never)]
fn setup() -> Result<(Board, Provision), Fault> {
    if let Some(p) = cortex_m::Peripherals::take() {
        measure::start_ticks(p.SYST);
    }
    let mut out = OutFile(HostFile::open(b"out.bin\0", mode::WRITE)?);

    let before = measure::ticks();
    cortex_m::asm::delay(CALIBRATION_DELAY);
    let ticks = measure::ticks() - before;
    bench_record(&mut out, 0, ticks)?;

    let mut provision = [0u8; PROVISION_SIZE];
    HostFile::open(b"provision.bin\0", mode::READ)?.read_exact(&mut provision)?;
    let provision = Provision::parse(&provision)?;
    let flash = FileFlash::new(HostFile::open(b"flash.bin\0", mode::READ_WRITE)?)
        .map_err(|_| Fault::Flash)?;
    let pins = PinLines::new(OPTIONAL_FEATURES.map(|name| (name, RecordingPin::default())))
        .map_err(|_| Fault::Flash)?;
    let board = Board {
        store: Store::new(flash, 0, flash::SECTOR as u32).map_err(|_| Fault::Flash)?,
        link: Link {
            scenario: HostFile::open(b"scenario.bin\0", mode::READ)?,
            out,
            pending: 0,
        },
        lines: Lines { pins, fault: false },
        stack: StackWatch { max: 0 },
        step: 0,
    };
    Ok((board, provision))
}

/// `provision.bin` (VIN, car secret key seed, gateway public key), checked. The keys stay
/// bytes (64, not the 400-odd of parsed keys) for as long as this lives.
struct Provision {
    vin: Vin,
    seed: [u8; 32],
    gateway: [u8; 32],
    firmware_version: FirmwareVersion,
}

impl Provision {
    fn parse(bytes: &[u8; PROVISION_SIZE]) -> Result<Self, Fault> {
        let vin = Vin::from_bytes(&bytes[..17]).map_err(|_| Fault::Provision)?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[17..49]);
        let mut gateway = [0u8; 32];
        gateway.copy_from_slice(&bytes[49..81]);
        VerifyingKey::from_bytes(&gateway).map_err(|_| Fault::Provision)?;
        Ok(Provision {
            vin,
            seed,
            gateway,
            firmware_version: FIRMWARE_VERSION.parse().map_err(|_| Fault::Provision)?,
        })
    }

    /// The agent's configuration. Infallible, so the agent can be built straight into its
    /// place ([`new_agent`]): the gateway key was checked by [`Provision::parse`] (were it
    /// unreadable, the car would trust no key and refuse every command).
    fn config(&self) -> Config<Catalog<'static>> {
        let mut trusted_keys = heapless::Vec::new();
        if let Ok(key) = VerifyingKey::from_bytes(&self.gateway) {
            // Cannot fail: one key, room for MAX_TRUSTED_KEYS.
            let _ = trusted_keys.push(TrustedKey::new(key));
        }
        Config {
            vin: self.vin,
            trusted_keys,
            device_key: SigningKey::from_bytes(&self.seed),
            platform: Catalog {
                optional: &OPTIONAL_FEATURES,
                base: BASE_FEATURES,
            },
            firmware_version: self.firmware_version.clone(),
            report_interval_secs: 0,
        }
    }
}

/// Boots the agent from flash and runs scenario steps until the end (`Ok(false)`) or a
/// reboot (`Ok(true)`).
fn boot_and_run(board: &mut Board, agent: &mut Agent<Catalog<'static>>) -> Result<bool, Fault> {
    let mut header = [0u8; STEP_HEADER_SIZE];
    board.link.scenario.read_exact(&mut header)?;
    let first = StepHeader::decode(&header).ok_or(Fault::Scenario)?;
    board.stack.take();
    boot_agent(&mut board.store, first.now, agent);
    drain(agent, board)?;
    agent.handle_connected(first.now);
    drain(agent, board)?;
    let boot_stack = board.stack.take();
    board
        .link
        .out
        .record(OutKind::Boot, &boot_stack.to_le_bytes())?;
    let status: &[u8] = match agent.boot_status() {
        BootStatus::Fresh => b"boot: fresh",
        BootStatus::Restored => b"boot: restored",
        BootStatus::SafeState => b"boot: safe state",
    };
    board.link.out.record(OutKind::Log, status)?;

    let mut next = Some(first);
    loop {
        let h = match next.take() {
            Some(h) => h,
            None => {
                board.link.scenario.read_exact(&mut header)?;
                StepHeader::decode(&header).ok_or(Fault::Scenario)?
            }
        };
        if agent.poll_timeout().is_some_and(|t| t <= h.now) {
            agent.handle_timeout(h.now);
            drain(agent, board)?;
        }
        let len = usize::from(h.len);
        match h.kind {
            StepKind::End | StepKind::Reboot => {
                if len != 0 {
                    return Err(Fault::Scenario);
                }
                return Ok(h.kind == StepKind::Reboot);
            }
            StepKind::Tick => {}
            StepKind::FailNextWrite => board.store.flash_mut().fail_next = true,
            StepKind::Frame => {
                board.link.pending = len;
                let Some(len) = board.link.recv(agent.frame_buffer())? else {
                    return Err(Fault::Scenario);
                };
                let before = measure::ticks();
                handle_frame(agent, len, h.now);
                drain(agent, board)?;
                let ticks = measure::ticks() - before;
                bench_record(&mut board.link.out, bench::HANDLE_COMMAND, ticks)?;
            }
            StepKind::BenchVerify => {
                let frame = agent.frame_buffer().get_mut(..len).ok_or(Fault::Scenario)?;
                board.link.scenario.read_exact(frame)?;
                board.stack.take();
                let (verified, ticks) = bench_verify(agent, len);
                let verify_stack = board.stack.take();
                bench_record(&mut board.link.out, bench::VERIFY, ticks)?;
                bench_record(
                    &mut board.link.out,
                    bench::VERIFY_STACK,
                    verify_stack.into(),
                )?;
                let (signature_ok, ticks) = bench_signature(agent, len);
                let signature_stack = board.stack.take();
                bench_record(&mut board.link.out, bench::SIGNATURE, ticks)?;
                bench_record(
                    &mut board.link.out,
                    bench::SIGNATURE_STACK,
                    signature_stack.into(),
                )?;
                #[cfg(feature = "compare-ed25519-compact")]
                {
                    let (ok, ticks) = bench_compact_signature(agent, len);
                    let stack = board.stack.take();
                    bench_record(&mut board.link.out, bench::COMPACT_SIGNATURE, ticks)?;
                    bench_record(
                        &mut board.link.out,
                        bench::COMPACT_SIGNATURE_STACK,
                        stack.into(),
                    )?;
                    if !ok {
                        return Err(Fault::Scenario);
                    }
                }
                let decoded = signature_ok && in_place_read(agent, len);
                let decode_stack = board.stack.take();
                bench_record(
                    &mut board.link.out,
                    bench::IN_PLACE_STACK,
                    decode_stack.into(),
                )?;
                if !verified || !decoded {
                    return Err(Fault::Scenario);
                }
            }
        }
        let mut body = [0u8; 10];
        body[..2].copy_from_slice(&board.step.to_le_bytes());
        body[2..6].copy_from_slice(&board.lines.pins.state().to_le_bytes());
        body[6..].copy_from_slice(&board.stack.take().to_le_bytes());
        board.link.out.record(OutKind::Lines, &body)?;
        board.step = board.step.wrapping_add(1);
    }
}

/// The one agent, not booted yet (`boot_agent` boots it), built straight into the caller's
/// place (`Agent::unbooted` makes no temporary copy). Not inlined: the configuration is a
/// temporary of this frame only.
#[inline(never)]
fn new_agent(provision: &Provision) -> Agent<Catalog<'static>> {
    Agent::unbooted(provision.config())
}

/// Loads the stored record into the agent's own buffer and boots the agent from it, in
/// place (a power-on). Not inlined: the boot's temporaries live in this frame only.
#[inline(never)]
fn boot_agent(store: &mut Store, now: u64, agent: &mut Agent<Catalog<'static>>) {
    let stored = match store.load(agent.frame_buffer()) {
        Ok(Some(n)) => Some(n),
        Ok(None) => None,
        // An unreadable store boots the safe state, as a corrupt record does.
        Err(_) => Some(0),
    };
    agent.reboot_from_buffer(stored, now);
}

/// The core's `handle_buffered_frame` behind a call boundary: its temporaries then live in
/// this frame while it runs, not in `main`'s for the whole run.
#[inline(never)]
fn handle_frame(agent: &mut Agent<Catalog<'static>>, len: usize, now: u64) {
    agent.handle_buffered_frame(len, now);
}

/// Times `open_command_view` alone (verify, then read in place) on the frame in the agent's
/// buffer: `(verified, ticks)`.
#[inline(never)]
fn bench_verify(agent: &Agent<Catalog<'static>>, len: usize) -> (bool, u64) {
    let Some(frame) = agent.buffer().get(..len) else {
        return (false, 0);
    };
    let before = measure::ticks();
    let verified = open_command_view(frame, &agent.config().trusted_keys).is_ok();
    (verified, measure::ticks() - before)
}

/// Times the Ed25519 check alone (`verify_strict` over header and payload, with the SHA-512
/// it needs): `(verified, ticks)`.
#[inline(never)]
fn bench_signature(agent: &Agent<Catalog<'static>>, len: usize) -> (bool, u64) {
    let Some(key) = agent.config().trusted_keys.first().map(|k| &k.key) else {
        return (false, 0);
    };
    let Some(frame) = agent.buffer().get(..len) else {
        return (false, 0);
    };
    let before = measure::ticks();
    let verified = parse_frame(frame, FrameKind::Command).is_ok_and(|raw| raw.verify(key).is_ok());
    (verified, measure::ticks() - before)
}

/// [`bench_signature`] with ed25519-compact instead of ed25519-dalek.
#[cfg(feature = "compare-ed25519-compact")]
#[inline(never)]
fn bench_compact_signature(agent: &Agent<Catalog<'static>>, len: usize) -> (bool, u64) {
    let Some(key) = agent
        .config()
        .trusted_keys
        .first()
        .map(|k| k.key.to_bytes())
    else {
        return (false, 0);
    };
    let Some(frame) = agent.buffer().get(..len) else {
        return (false, 0);
    };
    let Ok(raw) = parse_frame(frame, FrameKind::Command) else {
        return (false, 0);
    };
    let key = ed25519_compact::PublicKey::new(key);
    let signature = ed25519_compact::Signature::new(raw.signature);
    let before = measure::ticks();
    let verified = key.verify(raw.signed, &signature).is_ok();
    (verified, measure::ticks() - before)
}

/// Reads the frame in the agent's buffer in place and decodes each of its grants, as the core
/// does once the signature has verified (the steps before verified this frame): `true` when
/// it holds grants.
#[inline(never)]
fn in_place_read(agent: &Agent<Catalog<'static>>, len: usize) -> bool {
    let Some(frame) = agent.buffer().get(..len) else {
        return false;
    };
    let Ok(raw) = parse_frame(frame, FrameKind::Command) else {
        return false;
    };
    match CommandView::parse(raw.payload) {
        Ok(CommandView {
            body: BodyView::SetState(desired),
            ..
        }) => {
            desired
                .grants()
                .iter()
                .filter(|g| !g.flags.is_empty())
                .count()
                > 0
        }
        _ => false,
    }
}

/// Carries out every pending action, in the order the core gives them.
fn drain(agent: &mut Agent<Catalog<'static>>, board: &mut Board) -> Result<(), Fault> {
    // Bounded: the core yields at most a persist, MAX_LINES line changes twice over, one
    // ack per frame and MAX_PENDING_REPORTS reports per call.
    for _ in 0..256 {
        let mut persist_failed = false;
        match agent.poll_action() {
            None => {
                if board.lines.fault {
                    board.lines.fault = false;
                    if let Ok(code) = ErrorCode::new(ERR_LINE_FAULT) {
                        agent.add_error_code(code);
                    }
                }
                return Ok(());
            }
            Some(Action::Persist(record)) => persist_failed = board.store.save(record).is_err(),
            Some(action @ Action::SetFeature { .. }) => {
                action.apply_to(&mut board.lines);
            }
            Some(Action::Ack) => board.link.out.record(OutKind::Ack, &[])?,
            Some(Action::Publish(frame)) => board.link.send(frame)?,
        }
        if persist_failed {
            agent.persist_failed();
        }
    }
    Err(Fault::Scenario)
}

fn skip(file: &mut HostFile, mut len: usize) -> Result<(), HostError> {
    let mut sink = [0u8; 64];
    while len > 0 {
        let n = len.min(sink.len());
        file.read_exact(&mut sink[..n])?;
        len -= n;
    }
    Ok(())
}

fn bench_record(out: &mut OutFile, what: u8, ticks: u64) -> Result<(), HostError> {
    let mut body = [0u8; 9];
    body[0] = what;
    body[1..].copy_from_slice(&ticks.to_le_bytes());
    out.record(OutKind::Bench, &body)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No formatting here: it would pull core::fmt's machinery into the flash budget. The
    // host test sees the failure exit and the missing records.
    debug::exit(debug::EXIT_FAILURE);
    #[allow(clippy::empty_loop)]
    loop {}
}
