//! # caas-agent: the agent that runs in each car
//!
//! This crate is two things:
//!
//! * **The core** ([`Agent`]): one deterministic state machine that decides what a car does
//!   with a command. It is `no_std`, allocation-free and sans-IO: it never reads a clock, a
//!   socket or a disk. Time comes in as an argument, effects come out as values (`handle_*`
//!   in, `poll_*` out, in the style of `quinn-proto`). The Linux runtime below, the Cortex-M4
//!   firmware (`agent-firmware/`) and the fleet simulator (`simulator/`) all run it
//!   unchanged. Build it for a microcontroller with
//!   `cargo build -p caas-agent --target thumbv7em-none-eabihf --no-default-features`.
//! * **The Linux runtime** (feature `std`, module `runtime`, binary `caas-agent`): tokio,
//!   rumqttc and sled around the core. See the binary's `--help`.
//!
//! ## The core's contract
//!
//! ```text
//!   Agent::new(config, stored record, now)
//!        │
//!        ▼            handle_frame(bytes, now)       poll_action() ──► Persist(record bytes)
//!   ┌─────────┐ ◄──── handle_timeout(now)                          ──► SetFeature{flag,on,params}
//!   │  Agent  │ ◄──── handle_connected(now)                        ──► Ack
//!   └─────────┘ ◄──── persist_failed()               poll_timeout() ─► Publish(report frame)
//! ```
//!
//! **Time.** Every `now` is the driver's wall clock in Unix seconds (UTC). The agent keeps a
//! *trusted time* that never goes back: it advances by the local clock's forward steps,
//! never below the local clock, and jumps forward to the issue time of every verified
//! command for this car. A clock turned back therefore never makes an ended grant active
//! again, while the car runs or across a reboot (the trusted time is in the stored record,
//! refreshed at least every [`TIME_PERSIST_INTERVAL_SECS`] and whenever a grant ends).
//! [`Agent::poll_timeout`] answers on the driver's clock.
//!
//! **Driving it.** After *every* `handle_*` call (and after `new`), call
//! [`Agent::poll_action`] until it returns `None`, carrying out each action before asking
//! for the next one, then sleep until [`Agent::poll_timeout`] (or the next frame) and call
//! [`Agent::handle_timeout`]. Call [`Agent::handle_connected`] after every (re)connect of
//! the transport, so the gateway receives a fresh report.
//!
//! **Action order.** For one frame the actions come in this order:
//! 1. `Persist(bytes)`: a new state to store (a [`PersistedState`] record, at most
//!    [`MAX_PERSISTED_SIZE`] bytes). **Persisting is synchronous by contract**: the write
//!    must be durable (flushed, programmed) before the driver calls the agent again. If it
//!    failed, the very next call must be [`Agent::persist_failed`]: nothing of that state
//!    takes effect, the command is refused with `STORAGE_FAILED` and *not* acknowledged,
//!    so the broker redelivers it. Any other call means "stored".
//! 2. `SetFeature { flag, on, params }`: first every line that goes off, then every line
//!    that goes on (after an applied command: every active line again, since parameters
//!    may have changed). Forward them to the platform's [`FeatureLines`] (GPIO lines on
//!    the microcontroller, a hook on Linux). At boot the agent assumes every optional line
//!    is off and switches on what the stored record grants.
//! 3. `Ack`: acknowledge the frame to the transport (MQTT PUBACK). One per handled frame,
//!    except a command whose persist failed. Never before its `Persist` and `SetFeature`s.
//! 4. `Publish(bytes)`: a report signed with the car's key, for the car's report topic.
//!
//! The `&[u8]`/`&FeatureFlag` in an action borrow the agent's one internal buffer and
//! state, so use (or copy) them before polling again.
//!
//! **Rules for a command frame** (all through `caas_protocol::open_command_view` and
//! `caas_protocol::check_command_view`, which read the command in place and give the same
//! verdicts as `open_command` and `check_command`): the signature must verify against one of
//! the trusted gateway keys (up to [`MAX_TRUSTED_KEYS`], so keys rotate without downtime);
//! the VIN must
//! be this car's; a `SetState`'s seq must be above the last applied one (replay and
//! rollback); the command must not have expired at the trusted time nor be issued more
//! than `MAX_FUTURE_SKEW_SECS` ahead of it; its grants must name only optional features of
//! the platform (never a base-platform one, never an unknown one). A `SetState` that
//! passes replaces the whole set of grants at once (all or none). A re-delivery of the
//! last applied seq is acknowledged and answered with the same `Applied` report, without
//! applying anything again. A `QueryStatus` is answered with `Outcome::Status { nonce }`.
//! Every refusal is acknowledged, reported as `Outcome::Rejected { seq, code }` (seq 0 if
//! the frame could not be read) and changes nothing else; a refusal for what some grants
//! switch (an unknown or base-platform feature) names them instead, as
//! `Outcome::GrantsRefused { seq, code, grants }` (bit `i` for the command's `i`-th grant),
//! so the gateway can fail just those.
//!
//! **Boot.** [`Agent::new`] takes the stored record (`None` if there is none). A record
//! that is corrupt, of another version or for another VIN is not used: the car boots in
//! the safe state (no optional feature on, base platform untouched) and every report says
//! why in `diagnostics.errorCodes` ([`ERR_STATE_CORRUPT`], [`ERR_STATE_VERSION`],
//! [`ERR_STATE_WRONG_VIN`]). Stores use [`PersistedState::encode`]/[`PersistedState::decode`]
//! to read or write records themselves (e.g. to provision or inspect one).
//!
//! **Platforms.** The agent takes its feature catalogue as a [`FeatureCatalog`]: the
//! platform's classification of flags (optional, base, unknown) with the optional features
//! numbered, so grants and lines are kept as 2-byte numbers rather than 36-byte names.
//! [`Catalog`] (two lists of names) is one.
//!
//! **Size.** An `Agent` holds one buffer of [`AGENT_BUFFER_SIZE`] bytes (frames in, records
//! and reports out), the applied grants in a compact form ([`AppliedState`]: flags as
//! catalogue numbers, no decoded command kept), its configuration and small bookkeeping:
//! about 7 KiB on a Cortex-M4 (checked at compile time on 32-bit targets). It never holds a
//! whole decoded `Command` (3.6 KiB): it verifies a frame before decoding anything, reads it
//! in place, and turns it into the record that applies it inside the same buffer. A
//! microcontroller receives frames straight into that buffer ([`Agent::frame_buffer`],
//! [`Agent::handle_buffered_frame`]), builds its one agent with [`Agent::unbooted`] (no
//! temporary copy) and boots it in place from the record its store loaded into the same
//! buffer ([`Agent::reboot_from_buffer`]). It owns everything it uses (no globals, no
//! allocation), so it is `Send` when the platform type is, and ten thousand of them fit in a
//! simulator.
//!
//! ```
//! use caas_agent::{Action, Agent, Catalog, Config};
//! use caas_protocol::*;
//!
//! let gateway = SigningKey::from_bytes(&[1; 32]);
//! let vin: Vin = "WVWZZZ1JZXW000001".parse().unwrap();
//! let mut trusted_keys = heapless::Vec::new();
//! trusted_keys.push(TrustedKey::new(gateway.verifying_key())).unwrap();
//! let config = Config {
//!     vin,
//!     trusted_keys,
//!     device_key: SigningKey::from_bytes(&[2; 32]),
//!     platform: Catalog { optional: &["power_boost"], base: &["abs"] },
//!     firmware_version: "1.0.0".parse().unwrap(),
//!     report_interval_secs: 300,
//! };
//! let now = 1_700_000_000;
//! let mut agent = Agent::new(config, None, now);
//!
//! let mut grant = Grant::new("boost".parse().unwrap());
//! grant.flags.push("power_boost".parse().unwrap()).unwrap();
//! let mut desired = DesiredState::default();
//! desired.grants.push(grant).unwrap();
//! let cmd = Command { vin, seq: 1, issued_at: now, not_after: now + 60,
//!                     body: CommandBody::SetState(desired) };
//! let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
//! agent.handle_frame(seal_command(&cmd, &gateway, &mut buf).unwrap(), now);
//!
//! let mut stored = Vec::new();
//! while let Some(action) = agent.poll_action() {
//!     match action {
//!         Action::Persist(bytes) => stored = bytes.to_vec(), // write + flush here
//!         Action::SetFeature { flag, on, .. } => assert!(flag.as_str() == "power_boost" && on),
//!         Action::Ack => {}                                  // PUBACK here
//!         Action::Publish(_report) => {}                     // publish here
//!     }
//! }
//! assert_eq!(agent.state().applied_seq, 1);
//! assert_eq!(agent.lines_on().iter().next().unwrap().as_str(), "power_boost");
//! assert_eq!(caas_agent::PersistedState::decode(&stored).unwrap().applied_seq, 1);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

#[cfg(all(test, not(feature = "std")))]
extern crate std;

mod machine;
mod record;
#[cfg(feature = "std")]
pub mod runtime;

pub use machine::{
    Action, Agent, BootStatus, Catalog, Config, FeatureCatalog, FeatureLines, LinesOn,
    AGENT_BUFFER_SIZE, ERR_PERSIST_FAILED, ERR_STATE_CORRUPT, ERR_STATE_FEATURES,
    ERR_STATE_VERSION, ERR_STATE_WRONG_VIN, MAX_LINES, MAX_PENDING_REPORTS, MAX_TRUSTED_KEYS,
    TIME_PERSIST_INTERVAL_SECS,
};
pub use record::{
    AppliedGrant, AppliedState, PersistedState, RecordError, MAX_PERSISTED_SIZE, PERSISTED_VERSION,
};
