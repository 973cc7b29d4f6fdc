//! The agent state machine: frames and time in, actions out.

use caas_protocol::{
    check_command_view, encode_report_payload, open_command_view, refused_grants,
    sign_report_in_place, ActiveService, BodyView, CheckContext, CommandView, Diagnostics,
    ErrorCode, FeatureClass, FeatureFlag, FirmwareVersion, Grant, Outcome, Param, PlatformFeatures,
    RejectCode, Report, SigningKey, TrustedKey, Vin, FRAME_HEADER_SIZE, MAX_COMMAND_FRAME_SIZE,
    MAX_ERROR_CODES, MAX_FLAGS_PER_GRANT, MAX_GRANTS, MAX_REPORT_FRAME_SIZE, MAX_SIGNAL_STRENGTH,
};
use heapless::{Deque, Vec};

use crate::record::{
    command_record_in_place, flag_name, load_record, write_record, AppliedGrants, AppliedState,
    Loaded, RecordError, MAX_PERSISTED_SIZE,
};

/// Most gateway keys a car trusts at once: the current one, the next one during a rotation,
/// and one spare (each costs about 200 bytes of RAM).
pub const MAX_TRUSTED_KEYS: usize = 3;
/// Most feature lines on at once: every flag of every grant.
pub const MAX_LINES: usize = MAX_GRANTS * MAX_FLAGS_PER_GRANT;
/// Most reports waiting for [`Agent::poll_action`]; when a driver lets more pile up, the
/// oldest is dropped (every report carries the whole current state, so the newest suffices).
pub const MAX_PENDING_REPORTS: usize = 4;
/// When nothing else has been written for this long (seconds of trusted time), the agent
/// writes its record again just to keep the trusted clock fresh on the store. Hourly keeps
/// flash wear negligible and bounds what a clock rolled back across a reboot can gain.
pub const TIME_PERSIST_INTERVAL_SECS: u64 = 3600;
/// Size of the agent's one output buffer, shared by received frames
/// ([`Agent::frame_buffer`]), persisted records and sealed reports.
pub const AGENT_BUFFER_SIZE: usize = max3(
    MAX_COMMAND_FRAME_SIZE,
    MAX_PERSISTED_SIZE,
    MAX_REPORT_FRAME_SIZE,
);

const fn max3(a: usize, b: usize, c: usize) -> usize {
    let ab = if a > b { a } else { b };
    if ab > c {
        ab
    } else {
        c
    }
}

/// Diagnostic code: the stored record did not checksum or decode; booted to the safe state.
pub const ERR_STATE_CORRUPT: &str = "STATE_CORRUPT";
/// Diagnostic code: the stored record has a version this build does not read; safe state.
pub const ERR_STATE_VERSION: &str = "STATE_VERSION";
/// Diagnostic code: the stored record belongs to another VIN; safe state.
pub const ERR_STATE_WRONG_VIN: &str = "STATE_WRONG_VIN";
/// Diagnostic code: a stored grant named a feature this platform no longer has as optional;
/// that grant was dropped.
pub const ERR_STATE_FEATURES: &str = "STATE_FEATURES";
/// Diagnostic code: the platform reported a failed persist ([`Agent::persist_failed`]).
pub const ERR_PERSIST_FAILED: &str = "PERSIST_FAILED";

/// A platform's feature catalogue as two lists of names, usable in `const` context.
///
/// Flags in `optional` may be switched by commands, flags in `base` are the platform the
/// car was sold with and no command may touch them; anything else is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Catalog<'a> {
    /// Feature flags commands may switch on and off.
    pub optional: &'a [&'a str],
    /// Feature flags of the base platform.
    pub base: &'a [&'a str],
}

impl PlatformFeatures for Catalog<'_> {
    fn classify(&self, flag: &FeatureFlag) -> FeatureClass {
        if self.base.contains(&flag.as_str()) {
            FeatureClass::Base
        } else if self.optional.contains(&flag.as_str()) {
            FeatureClass::Optional
        } else {
            FeatureClass::Unknown
        }
    }
}

/// A platform catalogue whose optional features are numbered, so the agent keeps grant
/// flags and feature lines as numbers (2 bytes) instead of names (36 bytes each: the lines
/// alone would take over 1 KiB of a microcontroller's RAM).
///
/// The numbering must agree with [`PlatformFeatures::classify`]: `optional_index` is `Some`
/// exactly for the flags classified [`FeatureClass::Optional`] (numbers below 65,536; a
/// feature numbered beyond that cannot be switched), and `optional_name` gives the name back.
/// It only has to be stable while the agent runs: records store names.
pub trait FeatureCatalog: PlatformFeatures {
    /// The number of `flag` among the optional features; `None` when it is not one.
    fn optional_index(&self, flag: &FeatureFlag) -> Option<usize>;
    /// The name of optional feature number `index`.
    fn optional_name(&self, index: usize) -> Option<&str>;
}

impl FeatureCatalog for Catalog<'_> {
    fn optional_index(&self, flag: &FeatureFlag) -> Option<usize> {
        if self.base.contains(&flag.as_str()) {
            return None;
        }
        self.optional.iter().position(|f| *f == flag.as_str())
    }

    fn optional_name(&self, index: usize) -> Option<&str> {
        self.optional.get(index).copied()
    }
}

/// The platform's feature lines: GPIO pins on the microcontroller, a hook on Linux, a
/// table in the simulator. Drivers forward [`Action::SetFeature`] here (see
/// [`Action::apply_to`]).
pub trait FeatureLines {
    /// Switches `flag` on (with `params`, which are empty when switching off) or off.
    /// Switching an optional feature must not fail from the core's point of view: a line
    /// that could not be driven is the platform's fault to report, with
    /// [`Agent::add_error_code`].
    fn set_feature(&mut self, flag: &FeatureFlag, on: bool, params: &[Param]);
}

/// What a car needs to know to run the agent. Cheap to clone when `P` is.
#[derive(Clone)]
pub struct Config<P> {
    /// This car.
    pub vin: Vin,
    /// The gateway keys commands may be signed with (two during a rotation).
    pub trusted_keys: Vec<TrustedKey, MAX_TRUSTED_KEYS>,
    /// The car's own key; it signs every report.
    pub device_key: SigningKey,
    /// The platform's feature catalogue (e.g. [`Catalog`]).
    pub platform: P,
    /// Reported in every report's diagnostics.
    pub firmware_version: FirmwareVersion,
    /// Seconds between periodic status reports; 0 for none.
    pub report_interval_secs: u64,
}

/// How the agent found its stored state at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootStatus {
    /// No record was stored: a car that never applied a command.
    Fresh,
    /// The record was read and is in force.
    Restored,
    /// The record was refused (corrupt, unknown version or another VIN): safe state, and
    /// the reason is in the diagnostics' error codes.
    SafeState,
}

/// An effect the driver must carry out, in the order [`Agent::poll_action`] returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Store these bytes durably (replacing the previous record) before calling the agent
    /// again; if that fails, call [`Agent::persist_failed`] next.
    Persist(&'a [u8]),
    /// Switch a feature line (see [`FeatureLines`]).
    SetFeature {
        /// The feature.
        flag: &'a FeatureFlag,
        /// On or off.
        on: bool,
        /// The grant's parameters when switching on; empty when switching off.
        params: &'a [Param],
    },
    /// Acknowledge the oldest received, not yet acknowledged frame to the transport (an
    /// MQTT PUBACK). Never returned before the state that frame changed was persisted.
    Ack,
    /// Publish this signed report frame on the car's report topic.
    Publish(&'a [u8]),
}

impl Action<'_> {
    /// Forwards a [`Action::SetFeature`] to `lines`; returns whether it was one.
    pub fn apply_to<L: FeatureLines + ?Sized>(&self, lines: &mut L) -> bool {
        match *self {
            Action::SetFeature { flag, on, params } => {
                lines.set_feature(flag, on, params);
                true
            }
            _ => false,
        }
    }
}

/// What happens once a staged record is durable (or is not).
#[derive(Debug, Clone, Copy)]
struct FollowUp {
    /// The record came from this command (`Some(seq)`); `None` for a time-driven write.
    command_seq: Option<u64>,
    /// Re-send every active line after committing (their parameters may have changed).
    refresh: bool,
    /// Report to publish after committing.
    outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Idle,
    /// A record is in `buf[..len]` and the `Persist` action has not been returned yet.
    Staged {
        len: usize,
        follow: FollowUp,
    },
    /// `Persist` was returned; the driver is writing it (or has written it).
    Written {
        len: usize,
        follow: FollowUp,
    },
}

#[derive(Debug, Clone, Copy)]
struct SyncCursor {
    refresh: bool,
    grant: u8,
    flag: u8,
}

/// The car's clock as the agent trusts it. It never goes back: a local clock turned back
/// only stops contributing until it moves forward again, and verified commands pull it
/// forward to their issue time.
#[derive(Debug, Clone, Copy)]
struct TrustedClock {
    trusted: u64,
    last_local: u64,
}

impl TrustedClock {
    fn advance(&mut self, now: u64) {
        if now > self.last_local {
            self.trusted = self.trusted.saturating_add(now - self.last_local);
        }
        self.last_local = now;
        self.trusted = self.trusted.max(now);
    }

    /// A trusted instant expressed on the driver's clock.
    fn to_local(self, t: u64) -> u64 {
        t.saturating_sub(self.trusted - self.last_local.min(self.trusted))
    }
}

/// One car's agent: a deterministic state machine with no I/O (see the crate docs for the
/// contract). About 6.9 KiB on a Cortex-M4: one 3.3 KiB buffer, the applied grants in their
/// compact form (2.4 KiB), the configuration (keys) and small bookkeeping.
pub struct Agent<P> {
    config: Config<P>,
    state: AppliedState,
    persisted_time: u64,
    clock: TrustedClock,
    boot: BootStatus,
    /// The feature lines the platform has been told to switch on (optional-feature numbers).
    lines: Vec<u16, MAX_LINES>,
    /// The flag of the `SetFeature` being returned.
    line_flag: Option<FeatureFlag>,
    sync: Option<SyncCursor>,
    stage: Stage,
    acks: u16,
    reports: Deque<Outcome, MAX_PENDING_REPORTS>,
    next_report: Option<u64>,
    reports_sent: u64,
    last_rejection: Option<(u64, RejectCode)>,
    diagnostics: Diagnostics,
    buf: [u8; AGENT_BUFFER_SIZE],
}

/// The lines an agent has switched on ([`Agent::lines_on`]), named by the platform.
pub struct LinesOn<'a, P> {
    lines: &'a [u16],
    platform: &'a P,
}

impl<'a, P: FeatureCatalog> LinesOn<'a, P> {
    /// The lines, in the order they were switched on.
    pub fn iter(&self) -> impl Iterator<Item = FeatureFlag> + 'a {
        let platform = self.platform;
        self.lines
            .iter()
            .filter_map(move |&i| flag_name(platform, i))
    }

    /// How many lines are on.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is on.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Whether the line named `flag` is on.
    pub fn contains(&self, flag: &str) -> bool {
        self.lines
            .iter()
            .any(|&i| self.platform.optional_name(usize::from(i)) == Some(flag))
    }
}

/// A frame opened and checked: what the agent does next, without borrowing the buffer.
enum Opened {
    /// The command in force came again.
    Redelivered { seq: u64 },
    /// A command for the car-side rules' verdict.
    Checked {
        seq: u64,
        issued_at: u64,
        verdict: Result<(), RejectCode>,
        /// The grants a feature refusal is for ([`caas_protocol::refused_grants`]).
        refused_grants: u8,
        body: OpenedBody,
    },
}

enum OpenedBody {
    Query {
        nonce: u64,
    },
    /// A `SetState` whose `count` grants start at `buf[first..]`.
    Set {
        first: usize,
        count: usize,
    },
}

impl<P: FeatureCatalog> Agent<P> {
    /// Boots from the stored record (`None` when nothing was ever stored) at local time
    /// `now` (Unix seconds). A record that is corrupt, of an unknown version or for another
    /// VIN is not used: the car starts with no optional feature on and reports why in its
    /// diagnostics (`STATE_CORRUPT`, `STATE_VERSION`, `STATE_WRONG_VIN`). The first actions
    /// switch on the features the record grants and, if some grants ended while the car was
    /// off, persist their removal.
    ///
    /// This returns a 7 KiB value; a microcontroller builds its agent once (in a `static` or
    /// its main frame) and boots it again in place with [`Agent::reboot_from_buffer`].
    pub fn new(config: Config<P>, persisted: Option<&[u8]>, now: u64) -> Self {
        let mut agent = Agent::unbooted(config);
        let stored = persisted.map(|bytes| match agent.buf.get_mut(..bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                bytes.len()
            }
            // Longer than any record: refused as corrupt.
            None => usize::MAX,
        });
        agent.boot(stored, now);
        agent
    }

    /// An agent that has not read its store yet: nothing applied, nothing to do, its clock
    /// at 0 (it behaves as `Agent::new(config, None, 0)`). Built as it is returned, with no
    /// temporary copy, so a microcontroller can make its one agent with this (in a `static`
    /// or its main frame) and then boot it in place with [`Agent::reboot_from_buffer`].
    pub fn unbooted(config: Config<P>) -> Self {
        Agent {
            persisted_time: 0,
            state: AppliedState {
                applied_seq: 0,
                trusted_time: 0,
                grants: Vec::new(),
            },
            clock: TrustedClock {
                trusted: 0,
                last_local: 0,
            },
            boot: BootStatus::Fresh,
            lines: Vec::new(),
            line_flag: None,
            sync: None,
            stage: Stage::Idle,
            acks: 0,
            reports: Deque::new(),
            next_report: match config.report_interval_secs {
                0 => None,
                i => Some(i),
            },
            reports_sent: 0,
            last_rejection: None,
            diagnostics: Diagnostics {
                firmware_version: config.firmware_version.clone(),
                error_codes: Vec::new(),
                signal_strength: 0,
            },
            config,
            buf: [0; AGENT_BUFFER_SIZE],
        }
    }

    /// Boots this agent again, in place, with the same configuration: the same as
    /// `*self = Agent::new(config, stored, now)` where the stored record is the first
    /// `stored_len` bytes of [`Agent::frame_buffer`] (`None`: nothing stored). A
    /// microcontroller loads its record straight into that buffer, and neither builds a
    /// second agent nor keeps a second buffer. A length beyond the buffer counts as a
    /// corrupt record.
    pub fn reboot_from_buffer(&mut self, stored_len: Option<usize>, now: u64) {
        self.diagnostics.error_codes.clear();
        self.diagnostics.signal_strength = 0;
        self.lines.clear();
        self.line_flag = None;
        self.sync = None;
        self.stage = Stage::Idle;
        self.acks = 0;
        self.reports.clear();
        self.reports_sent = 0;
        self.last_rejection = None;
        self.boot(stored_len, now);
    }

    /// The boot itself, from the record in `buf[..stored]`, over freshly reset bookkeeping.
    fn boot(&mut self, stored: Option<usize>, now: u64) {
        let mut error: Option<&str> = None;
        let mut dropped = false;
        self.state.applied_seq = 0;
        self.state.trusted_time = 0;
        self.state.grants.clear();
        self.boot = match stored {
            None => BootStatus::Fresh,
            Some(len) => match self.load_buffered(len) {
                Ok(Loaded::Restored { dropped: d }) => {
                    dropped = d;
                    BootStatus::Restored
                }
                Ok(Loaded::WrongVin) => {
                    error = Some(ERR_STATE_WRONG_VIN);
                    BootStatus::SafeState
                }
                Err(e) => {
                    error = Some(match e {
                        RecordError::UnknownVersion(_) => ERR_STATE_VERSION,
                        _ => ERR_STATE_CORRUPT,
                    });
                    BootStatus::SafeState
                }
            },
        };
        self.clock = TrustedClock {
            trusted: self.state.trusted_time.max(now),
            last_local: now,
        };
        self.next_report = match self.config.report_interval_secs {
            0 => None,
            i => Some(self.clock.trusted.saturating_add(i)),
        };
        // With nothing (usable) stored there is no time on the store to refresh yet.
        self.persisted_time = match self.boot {
            BootStatus::Restored => self.state.trusted_time,
            _ => self.clock.trusted,
        };
        if let Some(code) = error {
            self.add_error_code_str(code);
        }
        // A record written by a firmware with another catalogue must not switch on a base
        // feature or an unknown line: such grants were dropped (and the drop is persisted).
        if dropped {
            self.add_error_code_str(ERR_STATE_FEATURES);
        }
        self.start_sync(false);
        if dropped || self.has_ended_grants() {
            self.stage_time_record();
        }
    }

    /// Handles one received command frame at local time `now`. Drain [`Agent::poll_action`]
    /// before handing over the next frame. The frame is copied into the agent's buffer
    /// first (a microcontroller receives it there directly: [`Agent::handle_buffered_frame`]).
    pub fn handle_frame(&mut self, frame: &[u8], now: u64) {
        self.enter(now);
        match self.buf.get_mut(..frame.len()) {
            Some(dst) => {
                dst.copy_from_slice(frame);
                self.handle_buffered(frame.len());
            }
            // Longer than the largest command frame.
            None => self.refuse(0, RejectCode::TooLarge),
        }
    }

    /// Like [`Agent::handle_frame`] for a frame the driver received into
    /// [`Agent::frame_buffer`] (its first `len` bytes), which saves a microcontroller a
    /// second 3 KiB buffer. A `len` beyond the buffer is refused as `TOO_LARGE`.
    pub fn handle_buffered_frame(&mut self, len: usize, now: u64) {
        self.enter(now);
        self.handle_buffered(len);
    }

    /// The buffer a driver may receive a frame into before calling
    /// [`Agent::handle_buffered_frame`], or load the stored record into before
    /// [`Agent::reboot_from_buffer`]. Only valid between a drained [`Agent::poll_action`]
    /// and that call: the agent reuses it for records and reports.
    pub fn frame_buffer(&mut self) -> &mut [u8; AGENT_BUFFER_SIZE] {
        self.settle_stage();
        &mut self.buf
    }

    /// The same buffer, read-only and as it is: the frame last received into it, or the
    /// record or report the agent last wrote there. For a driver that inspects a frame
    /// before handing it over (the firmware's benchmarks).
    pub fn buffer(&self) -> &[u8; AGENT_BUFFER_SIZE] {
        &self.buf
    }

    fn handle_buffered(&mut self, len: usize) {
        let (seq, issued_at, verdict, refused_grants, body) = match self.open(len) {
            Err(code) => return self.refuse(0, code),
            // A re-delivery of the command in force (the broker's redelivery, or its
            // retained copy after a reconnect): acknowledge it and say again that it is
            // applied.
            Ok(Opened::Redelivered { seq }) => {
                self.acks = self.acks.saturating_add(1);
                return self.push_report(Outcome::Applied { seq });
            }
            Ok(Opened::Checked {
                seq,
                issued_at,
                verdict,
                refused_grants,
                body,
            }) => (seq, issued_at, verdict, refused_grants, body),
        };
        // A verified command for this car issued within the allowed skew proves the time
        // is at least its issue time.
        if !matches!(
            verdict,
            Err(RejectCode::WrongVin | RejectCode::IssuedInFuture)
        ) {
            self.clock.trusted = self.clock.trusted.max(issued_at);
        }
        if let Err(code) = verdict {
            return self.refuse_grants(seq, code, refused_grants);
        }
        match body {
            OpenedBody::Query { nonce } => {
                self.acks = self.acks.saturating_add(1);
                self.push_report(Outcome::Status { nonce });
            }
            OpenedBody::Set { first, count } => {
                let follow = FollowUp {
                    command_seq: Some(seq),
                    refresh: true,
                    outcome: Some(Outcome::Applied { seq }),
                };
                // The frame becomes the record that applies it, in the same buffer.
                match command_record_in_place(
                    &mut self.buf,
                    &self.config.vin,
                    seq,
                    self.clock.trusted,
                    first,
                    count,
                ) {
                    Ok(len) => self.stage = Stage::Staged { len, follow },
                    // Cannot happen (the buffer holds the largest record); refuse rather
                    // than acknowledge something that was not stored.
                    Err(_) => self.fail_persist(follow),
                }
            }
        }
    }

    /// Verifies the frame in `buf[..len]`, reads it in place and applies the car-side
    /// rules. Not inlined, and each step returns before the next: Ed25519's stack, the
    /// in-place decode's and the checks' are never on the stack together.
    #[inline(never)]
    fn open(&self, len: usize) -> Result<Opened, RejectCode> {
        let frame = self.buf.get(..len).ok_or(RejectCode::TooLarge)?;
        let view = open_command_view(frame, &self.config.trusted_keys)?;
        let body = match &view.body {
            BodyView::QueryStatus { nonce } => OpenedBody::Query { nonce: *nonce },
            BodyView::SetState(desired) => {
                if view.vin == self.config.vin
                    && view.seq != 0
                    && view.seq == self.state.applied_seq
                {
                    return Ok(Opened::Redelivered { seq: view.seq });
                }
                let grants = desired.grants();
                OpenedBody::Set {
                    first: FRAME_HEADER_SIZE + desired.grants_offset() + grants.count_len(),
                    count: grants.len(),
                }
            }
        };
        let verdict = self.check(&view);
        let refused_grants = match verdict {
            Err(RejectCode::UnknownFeature | RejectCode::BasePlatformFeature) => {
                self.refused_grants(&view)
            }
            _ => 0,
        };
        Ok(Opened::Checked {
            seq: view.seq,
            issued_at: view.issued_at,
            verdict,
            refused_grants,
            body,
        })
    }

    /// Which grants of a command refused for a feature are to blame, so the report can
    /// name them. Not inlined, like [`Agent::check`]: it decodes the grants again, one at a
    /// time, only on such a refusal.
    #[inline(never)]
    fn refused_grants(&self, view: &CommandView<'_>) -> u8 {
        match &view.body {
            BodyView::SetState(desired) => {
                refused_grants(desired.grants().iter(), &self.config.platform)
            }
            BodyView::QueryStatus { .. } => 0,
        }
    }

    /// The car-side rules. Not inlined: the grants it decodes one at a time are temporaries
    /// of this frame, not of [`Agent::open`]'s, which is on the stack during Ed25519.
    #[inline(never)]
    fn check(&self, view: &CommandView<'_>) -> Result<(), RejectCode> {
        let ctx = CheckContext {
            vin: &self.config.vin,
            last_applied_seq: self.state.applied_seq,
            now: self.clock.trusted,
            platform: &self.config.platform,
        };
        check_command_view(view, &ctx)
    }

    /// Handles the passing of time: ends grants whose end time came (even with no network),
    /// sends the periodic report and refreshes the stored trusted time. Call it when the
    /// time [`Agent::poll_timeout`] named has come (calling it early or often is harmless).
    pub fn handle_timeout(&mut self, now: u64) {
        self.enter(now);
        if matches!(self.stage, Stage::Idle)
            && (self.has_ended_grants()
                || self.clock.trusted
                    >= self
                        .persisted_time
                        .saturating_add(TIME_PERSIST_INTERVAL_SECS))
        {
            self.stage_time_record();
        }
        if self.sync.is_none() {
            self.start_sync(self.has_ended_grants());
        }
        if let Some(next) = self.next_report {
            if self.clock.trusted >= next {
                self.push_report(Outcome::Periodic { counter: 0 });
                self.next_report = Some(
                    self.clock
                        .trusted
                        .saturating_add(self.config.report_interval_secs),
                );
            }
        }
    }

    /// Tells the agent the transport (re)connected: it queues a status report so the
    /// gateway re-syncs, and restarts the periodic report timer.
    pub fn handle_connected(&mut self, now: u64) {
        self.enter(now);
        self.push_report(Outcome::Periodic { counter: 0 });
        if self.config.report_interval_secs > 0 {
            self.next_report = Some(
                self.clock
                    .trusted
                    .saturating_add(self.config.report_interval_secs),
            );
        }
    }

    /// Tells the agent that storing the last [`Action::Persist`] failed. Call it before any
    /// other call; nothing of that record takes effect: a command is refused with
    /// `STORAGE_FAILED` and not acknowledged (so the transport redelivers it), and
    /// `PERSIST_FAILED` joins the diagnostics. Ignored when no persist is outstanding.
    pub fn persist_failed(&mut self) {
        if let Stage::Written { follow, .. } = self.stage {
            self.stage = Stage::Idle;
            self.fail_persist(follow);
        }
    }

    /// The next effect to carry out, or `None` when there is nothing to do. Order: a
    /// `Persist` always comes first and nothing the persisted state affects (feature lines,
    /// acks, reports) comes before it is done; then `SetFeature`s (all offs, then ons),
    /// then `Ack`s, then `Publish`es.
    pub fn poll_action(&mut self) -> Option<Action<'_>> {
        self.commit_written();
        if let Stage::Staged { len, follow } = self.stage {
            self.stage = Stage::Written { len, follow };
            return Some(Action::Persist(&self.buf[..len]));
        }
        let mut line = None;
        while let Some(step) = self.sync.is_some().then(|| self.next_line_step()).flatten() {
            let (index, on, grant) = match step {
                LineStep::Off(index) => (index, false, None),
                LineStep::On { grant, flag } => {
                    (self.state.grants[grant].flags[flag], true, Some(grant))
                }
            };
            // Always a name: the number came from this catalogue.
            self.line_flag = flag_name(&self.config.platform, index);
            if self.line_flag.is_some() {
                line = Some((on, grant));
                break;
            }
        }
        if let Some((on, grant)) = line {
            let params = match grant {
                Some(g) => &self.state.grants[g].params[..],
                None => &[],
            };
            return Some(Action::SetFeature {
                flag: self.line_flag.as_ref()?,
                on,
                params,
            });
        }
        if self.acks > 0 {
            self.acks -= 1;
            return Some(Action::Ack);
        }
        while let Some(outcome) = self.reports.pop_front() {
            if let Some(len) = self.seal(outcome) {
                return Some(Action::Publish(&self.buf[..len]));
            }
        }
        None
    }

    /// When (on the driver's clock, Unix seconds) to call [`Agent::handle_timeout`]: the
    /// earliest of the next grant end, the next periodic report and the next trusted-time
    /// refresh. `None` when nothing is scheduled.
    pub fn poll_timeout(&self) -> Option<u64> {
        let now = self.clock.trusted;
        let grant_end = self
            .state
            .grants
            .iter()
            .filter_map(|g| g.ends_at)
            .filter(|&e| e > now)
            .min();
        let refresh = self
            .persisted_time
            .saturating_add(TIME_PERSIST_INTERVAL_SECS);
        let at = [grant_end, self.next_report, Some(refresh)]
            .into_iter()
            .flatten()
            .min()?;
        Some(self.clock.to_local(at))
    }

    /// Adds a diagnostic error code to every following report (at most
    /// [`MAX_ERROR_CODES`]; further codes are dropped, a code already present is kept once).
    pub fn add_error_code(&mut self, code: ErrorCode) {
        let codes = &mut self.diagnostics.error_codes;
        if !codes.contains(&code) {
            let _ = codes.push(code);
        }
    }

    /// Removes a diagnostic error code (e.g. once the fault it names has cleared).
    pub fn clear_error_code(&mut self, code: &str) {
        self.diagnostics.error_codes.retain(|c| c.as_str() != code);
    }

    /// Sets the network signal strength the reports carry (clamped to 0-100).
    pub fn set_signal_strength(&mut self, percent: u8) {
        self.diagnostics.signal_strength = percent.min(MAX_SIGNAL_STRENGTH);
    }

    /// The committed state (what the store holds once pending actions are done), in the
    /// agent's compact form. [`Agent::active_grants`] gives the grants in force by name.
    pub fn state(&self) -> &AppliedState {
        &self.state
    }

    /// The grants in force at the trusted time, decoded back to [`Grant`]s (flags named by
    /// the platform). Each item is built on the fly (432 bytes on a 32-bit target).
    pub fn active_grants(&self) -> impl Iterator<Item = Grant> + '_ {
        let now = self.clock.trusted;
        self.state
            .grants
            .iter()
            .filter(move |g| g.is_active_at(now))
            .map(|g| g.to_grant(&self.config.platform))
    }

    /// The feature lines the platform has been told to switch on, so far.
    pub fn lines_on(&self) -> LinesOn<'_, P> {
        LinesOn {
            lines: &self.lines,
            platform: &self.config.platform,
        }
    }

    /// The car's trusted time (Unix seconds): never behind the newest verified command, and
    /// never going back when the local clock does.
    pub fn trusted_time(&self) -> u64 {
        self.clock.trusted
    }

    /// The newest refusal since boot: the command's seq (0 if unreadable) and why.
    pub fn last_rejection(&self) -> Option<(u64, RejectCode)> {
        self.last_rejection
    }

    /// The diagnostics every report carries.
    pub fn diagnostics(&self) -> &Diagnostics {
        &self.diagnostics
    }

    /// How the stored state was found at boot.
    pub fn boot_status(&self) -> BootStatus {
        self.boot
    }

    /// The configuration the agent runs with.
    pub fn config(&self) -> &Config<P> {
        &self.config
    }

    /// How many reports the agent has handed out for publishing since boot.
    pub fn reports_sent(&self) -> u64 {
        self.reports_sent
    }

    // ---- internals ----

    fn enter(&mut self, now: u64) {
        self.settle_stage();
        self.clock.advance(now);
    }

    /// Resolves a staged record before anything else happens: a `Persist` the driver was
    /// given counts as done (that is the contract), one it was never given is dropped with
    /// everything that depended on it (its frame stays unacknowledged and comes again).
    /// Loads the record in `buf[..len]` into the state (at boot, and to check a write).
    fn load_buffered(&mut self, len: usize) -> Result<Loaded, RecordError> {
        match self.buf.get(..len) {
            Some(bytes) => load_record(
                bytes,
                &self.config.vin,
                &self.config.platform,
                &mut self.state,
            ),
            None => Err(RecordError::Corrupt),
        }
    }

    fn settle_stage(&mut self) {
        if let Stage::Staged { .. } = self.stage {
            self.stage = Stage::Idle;
        }
        self.commit_written();
    }

    fn commit_written(&mut self) {
        match self.stage {
            Stage::Idle | Stage::Staged { .. } => {}
            Stage::Written { len, follow } => {
                self.stage = Stage::Idle;
                match self.load_buffered(len) {
                    Ok(Loaded::Restored { .. }) => {
                        self.persisted_time = self.state.trusted_time;
                        self.start_sync(follow.refresh);
                        if follow.command_seq.is_some() {
                            self.acks = self.acks.saturating_add(1);
                        }
                        if let Some(outcome) = follow.outcome {
                            self.push_report(outcome);
                        }
                    }
                    // Only a bug could get here (the bytes are our own, checked before
                    // anything was taken from them); do not apply what may not be what was
                    // stored.
                    Ok(Loaded::WrongVin) | Err(_) => self.fail_persist(follow),
                }
            }
        }
    }

    fn fail_persist(&mut self, follow: FollowUp) {
        self.add_error_code_str(ERR_PERSIST_FAILED);
        match follow.command_seq {
            Some(seq) => {
                self.last_rejection = Some((seq, RejectCode::StorageFailed));
                self.push_report(Outcome::Rejected {
                    seq,
                    code: RejectCode::StorageFailed,
                });
            }
            // Ending grants must still switch their lines off.
            None => self.start_sync(follow.refresh),
        }
    }

    fn refuse(&mut self, seq: u64, code: RejectCode) {
        self.refuse_grants(seq, code, 0);
    }

    /// A refusal, naming the refused grants when it is for some (`grants` not 0).
    fn refuse_grants(&mut self, seq: u64, code: RejectCode, grants: u8) {
        self.last_rejection = Some((seq, code));
        self.acks = self.acks.saturating_add(1);
        self.push_report(match grants {
            0 => Outcome::Rejected { seq, code },
            grants => Outcome::GrantsRefused { seq, code, grants },
        });
    }

    fn push_report(&mut self, outcome: Outcome) {
        if self.reports.is_full() {
            self.reports.pop_front();
        }
        let _ = self.reports.push_back(outcome);
    }

    fn add_error_code_str(&mut self, code: &str) {
        if let Ok(code) = ErrorCode::new(code) {
            self.add_error_code(code);
        }
    }

    fn has_ended_grants(&self) -> bool {
        self.state
            .grants
            .iter()
            .any(|g| !g.is_active_at(self.clock.trusted))
    }

    /// Stages the current state with ended grants dropped and the trusted time refreshed.
    fn stage_time_record(&mut self) {
        let grants = AppliedGrants {
            grants: &self.state.grants,
            active_at: Some(self.clock.trusted),
            platform: &self.config.platform,
        };
        // When a grant ends, a flag it shared with a later grant stays on but takes that
        // grant's parameters: re-send the lines that stay on.
        let follow = FollowUp {
            command_seq: None,
            refresh: self.has_ended_grants(),
            outcome: None,
        };
        match write_record(
            &mut self.buf,
            &self.config.vin,
            self.state.applied_seq,
            self.clock.trusted,
            &grants,
        ) {
            Ok(len) => self.stage = Stage::Staged { len, follow },
            Err(_) => self.fail_persist(follow),
        }
    }

    fn start_sync(&mut self, refresh: bool) {
        let refresh = refresh || self.sync.is_some_and(|s| s.refresh);
        self.sync = Some(SyncCursor {
            refresh,
            grant: 0,
            flag: 0,
        });
    }

    fn wanted(&self, flag: u16) -> bool {
        let now = self.clock.trusted;
        self.state
            .grants
            .iter()
            .any(|g| g.is_active_at(now) && g.flags.contains(&flag))
    }

    /// The next line change: first every line that must go off, then every active flag
    /// that must go on (all of them on a refresh, since parameters may have changed). A
    /// flag granted twice takes the parameters of the first grant naming it.
    fn next_line_step(&mut self) -> Option<LineStep> {
        if let Some(i) = self.lines.iter().position(|&f| !self.wanted(f)) {
            return Some(LineStep::Off(self.lines.swap_remove(i)));
        }
        let mut cursor = self.sync?;
        let now = self.clock.trusted;
        while let Some(g) = self.state.grants.get(usize::from(cursor.grant)) {
            let gi = usize::from(cursor.grant);
            let fi = usize::from(cursor.flag);
            let Some(&flag) = g.flags.get(fi).filter(|_| g.is_active_at(now)) else {
                cursor.grant += 1;
                cursor.flag = 0;
                continue;
            };
            cursor.flag += 1;
            let first_grant = self.state.grants[..gi]
                .iter()
                .any(|e| e.is_active_at(now) && e.flags.contains(&flag));
            let repeated = g.flags[..fi].contains(&flag);
            if first_grant || repeated {
                continue;
            }
            let is_on = self.lines.contains(&flag);
            if is_on && !cursor.refresh {
                continue;
            }
            if !is_on {
                // Cannot overflow: distinct active flags are at most MAX_LINES.
                let _ = self.lines.push(flag);
            }
            self.sync = Some(cursor);
            return Some(LineStep::On {
                grant: gi,
                flag: fi,
            });
        }
        self.sync = None;
        None
    }

    /// Seals a report into the buffer: encoded in one call, signed in the next, so the
    /// `Report` value (about 640 bytes) is off the stack while Ed25519 signs.
    fn seal(&mut self, outcome: Outcome) -> Option<usize> {
        let payload = self.encode_report(outcome)?;
        let len = sign_report_in_place(payload, &self.config.device_key, &mut self.buf)
            .ok()?
            .len();
        self.reports_sent += 1;
        Some(len)
    }

    #[inline(never)]
    fn encode_report(&mut self, outcome: Outcome) -> Option<usize> {
        let outcome = match outcome {
            Outcome::Periodic { .. } => Outcome::Periodic {
                counter: self.reports_sent,
            },
            other => other,
        };
        let now = self.clock.trusted;
        let mut active = Vec::new();
        for g in self.state.grants.iter().filter(|g| g.is_active_at(now)) {
            // Cannot overflow: both lists are bounded by MAX_GRANTS.
            let _ = active.push(ActiveService {
                service_id: g.service_id.clone(),
                ends_at: g.ends_at,
            });
        }
        let report = Report {
            vin: self.config.vin,
            applied_seq: self.state.applied_seq,
            car_time: now,
            outcome,
            active,
            diagnostics: self.diagnostics.clone(),
        };
        encode_report_payload(&report, &mut self.buf).ok()
    }
}

enum LineStep {
    /// This line goes off (it has left `lines`).
    Off(u16),
    On {
        grant: usize,
        flag: usize,
    },
}

const _: () = assert!(
    MAX_ERROR_CODES >= 2,
    "room for a state error and a persist error"
);
// The sync cursor indexes grants and flags with u8.
const _: () = assert!(MAX_GRANTS < u8::MAX as usize);
const _: () = assert!(MAX_FLAGS_PER_GRANT < u8::MAX as usize);
// The firmware's whole RAM budget is 16 KiB, and Ed25519 alone needs about 7.8 KiB of stack:
// the agent (its one frame buffer, the compact grants, the keys) must stay near 7 KiB.
// Checked on every 32-bit build.
#[cfg(target_pointer_width = "32")]
const _: () = assert!(core::mem::size_of::<Agent<Catalog<'static>>>() <= 7 * 1024);
