//! One virtual car: the real agent core driven over its own MQTT connection.
//!
//! The driver follows the core's contract (see `caas_agent`): after every `handle_*` it
//! drains `poll_action` and carries each action out before the next — `Persist` into an
//! in-memory record (the stand-in for sled), `SetFeature` into a small table of lines,
//! `Ack` as the MQTT PUBACK of the frame being handled (manual acks), `Publish` on the car's
//! report topic — then sleeps until `poll_timeout` or the next frame.
//!
//! The connection is a car's, as the Linux runtime makes it: client id = VIN, persistent
//! session (`clean_session = false`), TCP_NODELAY, manual acks, retained `offline` last
//! will and a retained `online` on connect, a QoS 1 subscription to the command topic.
//!
//! Faults are injected around the core, never inside it: a dropped command is acknowledged
//! and never shown to the core; a refused one makes the store fail (the core then reports
//! `STORAGE_FAILED` and does not acknowledge); a corrupted frame has one byte flipped; a
//! reconnect storm drops the TCP connection without DISCONNECT (so the broker publishes the
//! last will) and reconnects.
//!
//! A command's PUBACK and its report leave in one write: the driver hands them to the event
//! loop's own MQTT state (which numbers, tracks and resends them exactly as it does for the
//! client's requests) and flushes once ([`OUT_CAP`] packets at most), where the client's
//! request channel wrote each on its own turn of the event loop. That channel still carries
//! everything else, and a report that would pass the in-flight window.
//!
//! **Every PUBACK goes straight to the socket**, on the connection its publish came in on,
//! right when the core (or a fault) acknowledges it: never through the request channel. The
//! channel is bounded, and the event loop turns to it only after it has handed out every
//! incoming packet it read and resent what an earlier connection left (while the network
//! delay sleeps in this task, it turns to nothing). After a broker restart the car has its
//! own publishes to resend and the broker a backlog of commands to redeliver: the channel
//! filled with the backlog's PUBACKs and reports, the rest were dropped, the broker kept
//! those commands and sent them all again at the next reconnect, and again (a car of a soak
//! on Mosquitto acknowledged nothing for the rest of the run). Writing PUBACKs directly keeps
//! them all, in the order the publishes came, and needs no other queue: a PUBACK changes none
//! of the client's outgoing state (packet ids, in-flight window, resends), so it may pass
//! whatever waits in the channel or in the resends. A report the channel has no room for is
//! still dropped (counted in `client_queue_full`): the gateway's retry of the command is
//! answered again, as the core answers a redelivered command with the same report.
//!
//! Per-car memory is the core (~9 KiB), the MQTT client's state and buffers, and a few
//! hundred bytes here; nothing grows with time (the pending-request queue of the MQTT client
//! is bounded by [`CLIENT_QUEUE`], the packets of one drain by [`OUT_CAP`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caas_agent::{Action, Agent, Catalog, Config, MAX_TRUSTED_KEYS};
use caas_protocol::{
    parse_frame, topics, FirmwareVersion, FrameKind, Outcome, Report, SigningKey, TrustedKey, Vin,
};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet,
    PubAck, PubRec, Publish, QoS, Request,
};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};

use crate::faults::CarFaults;
use crate::stats::{bump, FleetStats};

/// Capacity of each car's MQTT request channel: the subscription, the `online` presence and
/// the reports that cannot be written directly (a handled frame queues at most the core's
/// `MAX_PENDING_REPORTS`). PUBACKs never go through it (see the module docs). The event loop
/// drains it only when no incoming packet is buffered, so a backlog of commands can fill it:
/// a report that finds it full is dropped and counted.
pub const CLIENT_QUEUE: usize = 16;
/// Most unacknowledged QoS 1 publishes a car keeps in flight.
pub const CAR_INFLIGHT: u16 = 8;
/// Largest MQTT packet a car accepts or sends (a command frame is well under 2 KiB).
pub const CAR_MAX_PACKET: usize = 8 * 1024;
/// Shortest pause before the core's same timer deadline is handled again.
pub const MIN_TIMER_REPEAT: Duration = Duration::from_millis(100);
/// Most packets one drain of the core queues for one write (a PUBACK and the core's pending
/// reports, at most `caas_agent::MAX_PENDING_REPORTS`); more go through the client's queue.
pub const OUT_CAP: usize = 1 + caas_agent::MAX_PENDING_REPORTS;
/// Longest a car waits for its socket to take a write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two reconnect attempts.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// The seed catalogue's optional features: any of them can be granted (kept in
/// `caas_protocol::catalog` so the agent runtime, the gateway and the simulator agree).
pub const SEED_OPTIONAL: &[&str] = caas_protocol::catalog::SEED_OPTIONAL_FEATURES;
/// The base platform: features every car was sold with, which no command may touch.
pub const SEED_BASE: &[&str] = caas_protocol::catalog::SEED_BASE_FEATURES;
/// The simulated platform's name, as registered with `POST /vehicles`.
pub const SEED_PLATFORM: &str = "sim-platform-v1";

/// The seed platform's catalogue.
pub fn seed_catalog() -> Catalog<'static> {
    Catalog {
        optional: SEED_OPTIONAL,
        base: SEED_BASE,
    }
}

/// A car's key, derived from the fleet seed and its index (so worker processes and the
/// parent agree on keys without passing them around).
pub fn car_key(seed: u64, index: u64) -> SigningKey {
    let digest = Sha256::new()
        .chain_update(b"caas-sim car key")
        .chain_update(seed.to_le_bytes())
        .chain_update(index.to_le_bytes())
        .finalize();
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&digest);
    SigningKey::from_bytes(&bytes)
}

/// The VIN of car `index` with a 6-character prefix (`SMV` + 3 run characters):
/// prefix, then the index as 11 decimal digits.
pub fn car_vin(prefix: &str, index: u64) -> Result<Vin, String> {
    let text = format!("{prefix}{index:011}");
    text.parse()
        .map_err(|e| format!("VIN `{text}` from prefix `{prefix}`: {e}"))
}

/// A random 6-character VIN prefix for a run (`SMV` and three VIN characters).
pub fn random_prefix() -> String {
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    let tail: String = (0..3)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect();
    format!("SMV{tail}")
}

/// What every car of one fleet (process) shares.
pub struct FleetContext {
    /// Broker addresses (host, port); car `i` uses entry `i % len`. Several addresses of one
    /// broker (e.g. 127.0.0.1 and 127.0.0.2 for a broker on 0.0.0.0) multiply the ephemeral
    /// ports available, which are counted per (source, destination) pair.
    pub brokers: Vec<(String, u16)>,
    /// Gateway keys the cars trust.
    pub trusted: heapless::Vec<TrustedKey, MAX_TRUSTED_KEYS>,
    /// The platform's catalogue.
    pub platform: Catalog<'static>,
    /// Firmware version reported.
    pub firmware: FirmwareVersion,
    /// Seconds between periodic reports (0: none).
    pub report_interval_secs: u64,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Counters and histograms.
    pub stats: Arc<FleetStats>,
    /// Bounds concurrent connection attempts.
    pub connect_gate: Arc<Semaphore>,
    /// Paces first connections.
    pub pacer: Pacer,
    /// Share of command frames to corrupt.
    pub corrupt: f64,
    /// Delay before handling a command.
    pub net_delay: Option<Duration>,
    /// Turns `true` to stop every car.
    pub shutdown: watch::Receiver<bool>,
    /// When the fleet started.
    pub epoch: Instant,
}

/// Spaces out events to at most one per interval (first connections).
pub struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    /// At most `per_sec` events per second (0: unpaced).
    pub fn new(per_sec: u32) -> Self {
        let interval = if per_sec == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(1.0 / f64::from(per_sec))
        };
        Pacer {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for the next slot.
    pub async fn wait(&self) {
        if self.interval.is_zero() {
            return;
        }
        let slot = match self.next.lock() {
            Ok(mut next) => {
                let now = Instant::now();
                let slot = (*next).max(now);
                *next = slot + self.interval;
                slot
            }
            Err(_) => return,
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// What the outside (the demo, the tests) can see of and change in one car while it runs.
#[derive(Default)]
pub struct CarShared {
    /// The car drops commands until this many milliseconds after the fleet epoch
    /// (`u64::MAX`: for ever; 0: not at all).
    pub drop_until_ms: AtomicU64,
    /// The car's store fails (the refuse fault).
    pub refuse: AtomicBool,
    /// The car's state after its last handled event.
    pub snapshot: Mutex<CarSnapshot>,
    /// Wakes the car to drop its connection and reconnect (as a storm does).
    pub reconnect: tokio::sync::Notify,
}

/// A car's state as last seen by its driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarSnapshot {
    /// Connected to the broker now.
    pub connected: bool,
    /// The newest applied command's seq.
    pub applied_seq: u64,
    /// The feature lines switched on.
    pub lines_on: Vec<String>,
    /// Command frames received.
    pub commands: u64,
    /// The last rejection code reported, if any.
    pub last_rejection: Option<String>,
}

impl CarShared {
    /// Shared state for a car with `faults`.
    pub fn new(faults: &CarFaults) -> Self {
        let drop_until_ms = match faults.drop {
            None => 0,
            Some(None) => u64::MAX,
            Some(Some(d)) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        };
        CarShared {
            drop_until_ms: AtomicU64::new(drop_until_ms),
            refuse: AtomicBool::new(faults.refuse),
            snapshot: Mutex::new(CarSnapshot::default()),
            reconnect: tokio::sync::Notify::new(),
        }
    }

    /// A copy of the snapshot.
    pub fn snapshot(&self) -> CarSnapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Makes the car drop every command from now on (`true`) or answer again (`false`).
    pub fn set_silent(&self, silent: bool) {
        self.drop_until_ms
            .store(if silent { u64::MAX } else { 0 }, Ordering::Relaxed);
    }
}

/// One car to run.
pub struct CarSpec {
    /// Its VIN.
    pub vin: Vin,
    /// Its report-signing key.
    pub key: SigningKey,
    /// Its faults.
    pub faults: CarFaults,
    /// What the outside sees of it.
    pub shared: Arc<CarShared>,
    /// Which of the fleet's broker addresses it uses (modulo their number).
    pub broker_slot: usize,
}

struct Driver {
    agent: Agent<Catalog<'static>>,
    store: Vec<u8>,
    client: AsyncClient,
    report_topic: String,
    /// The frame being handled, acknowledged on the core's `Ack`.
    current: Option<Publish>,
    /// Packets the last drain queued, written together by [`write_out`] (at most [`OUT_CAP`]):
    /// the frame's PUBACK always, reports only while `direct` holds.
    out: Vec<Request>,
    /// The connection is up with nothing left from an earlier one to resend: the drain may
    /// queue packets in `out` instead of the client's request channel.
    direct: bool,
    shared: Arc<CarShared>,
    ctx: Arc<FleetContext>,
    lines_changed: bool,
}

impl Driver {
    /// Drains the core's actions. `in_command`: the actions follow a received command, so a
    /// refusing car fails its store.
    fn drain(&mut self, in_command: bool) -> bool {
        let stats = &self.ctx.stats;
        let refuse = in_command && self.shared.refuse.load(Ordering::Relaxed);
        let mut published = false;
        loop {
            let mut failed = false;
            let Some(action) = self.agent.poll_action() else {
                break;
            };
            match action {
                Action::Persist(bytes) => {
                    if refuse {
                        failed = true;
                    } else {
                        self.store.clear();
                        self.store.extend_from_slice(bytes);
                    }
                }
                Action::SetFeature { .. } => self.lines_changed = true,
                Action::Ack => {
                    // Owed on this connection whatever the channel holds: written by
                    // `write_out` (one frame, one PUBACK, and it comes before the frame's
                    // reports, so `out` stays within `OUT_CAP`).
                    if let Some(p) = self.current.take() {
                        owe_ack(&mut self.out, stats, &p);
                    }
                }
                Action::Publish(frame) => {
                    classify_report(frame, stats);
                    if self.direct && self.out.len() < OUT_CAP {
                        let mut p = Publish::new(
                            self.report_topic.as_str(),
                            QoS::AtLeastOnce,
                            frame.to_vec(),
                        );
                        p.retain = topics::REPORT_RETAIN;
                        self.out.push(Request::Publish(p));
                        bump(&stats.reports);
                        published = true;
                        continue;
                    }
                    match self.client.try_publish(
                        self.report_topic.as_str(),
                        QoS::AtLeastOnce,
                        topics::REPORT_RETAIN,
                        frame.to_vec(),
                    ) {
                        Ok(()) => {
                            bump(&stats.reports);
                            published = true;
                        }
                        Err(_) => bump(&stats.client_queue_full),
                    }
                }
            }
            if failed {
                bump(&stats.persists_refused);
                self.agent.persist_failed();
            }
        }
        // A frame the core did not acknowledge (its store failed) stays unacknowledged: the
        // broker redelivers it after a reconnect.
        self.current = None;
        // Each drain that may skip the channel is allowed anew, right before it.
        self.direct = false;
        self.update_snapshot();
        published
    }

    fn update_snapshot(&mut self) {
        if let Ok(mut s) = self.shared.snapshot.lock() {
            s.applied_seq = self.agent.state().applied_seq;
            if self.lines_changed {
                s.lines_on = self
                    .agent
                    .lines_on()
                    .iter()
                    .map(|f| f.as_str().to_string())
                    .collect();
                self.lines_changed = false;
            }
            s.last_rejection = self
                .agent
                .last_rejection()
                .map(|(_, c)| c.as_str().to_string());
        }
    }

    fn set_connected(&self, on: bool) {
        if let Ok(mut s) = self.shared.snapshot.lock() {
            s.connected = on;
        }
    }
}

/// Queues the acknowledgement of `p` in `out` for [`write_out`], which writes it on the
/// connection `p` came in on.
fn owe_ack(out: &mut Vec<Request>, stats: &FleetStats, p: &Publish) {
    if let Some(ack) = ack_request(p) {
        out.push(ack);
    }
    bump(&stats.acks);
}

/// The acknowledgement of a received publish, as `AsyncClient::try_ack` makes it.
fn ack_request(p: &Publish) -> Option<Request> {
    match p.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(Request::PubAck(PubAck::new(p.pkid))),
        QoS::ExactlyOnce => Some(Request::PubRec(PubRec::new(p.pkid))),
    }
}

/// Whether packets may skip the client's request channel: connected, nothing from an earlier
/// connection waiting to be resent, no packet-id collision held by the event loop.
fn can_write_direct(ev: &EventLoop) -> bool {
    ev.network.is_some() && ev.pending.is_empty() && ev.state.collision.is_none()
}

/// Writes what the drain queued in `d.out` through the event loop's own state and
/// connection, with one flush: a command's PUBACK and its report leave in one write, where
/// the client's request channel wrote and flushed each on its own turn of the event loop (two
/// system calls and two more turns per command). The state records each publish exactly as
/// the event loop does (packet id, in flight until acknowledged, resent after a reconnect).
/// A publish that would pass the in-flight window, or collide, goes through the channel
/// instead, whose flow control then holds it. A PUBACK is always written here, resends
/// pending or not (see the module docs). `false`: the connection failed.
async fn write_out(d: &mut Driver, ev: &mut EventLoop) -> bool {
    if d.out.is_empty() {
        return true;
    }
    let Some(network) = ev.network.as_mut() else {
        // Not reachable (a publish is acknowledged before the event loop is polled again,
        // and the drain was allowed only while connected), but if it were: a PUBACK goes
        // with its connection (the broker resends the publish on the next one), the reports
        // go to the channel, kept for the next connection.
        for req in d.out.drain(..) {
            if let Request::Publish(p) = req {
                let _ = d.client.try_publish(p.topic, p.qos, p.retain, p.payload);
            }
        }
        return false;
    };
    let mut wrote = false;
    let mut failed = false;
    for req in d.out.drain(..) {
        if let Request::Publish(p) = &req {
            if ev.state.inflight() >= CAR_INFLIGHT || ev.state.collision.is_some() {
                if d.client
                    .try_publish(p.topic.as_str(), p.qos, p.retain, p.payload.clone())
                    .is_err()
                {
                    bump(&d.ctx.stats.client_queue_full);
                }
                continue;
            }
        }
        // After a failed write the rest is still recorded in the state: its publishes are
        // resent after the reconnect, as the channel's would be.
        match ev.state.handle_outgoing_packet(req) {
            Ok(Some(packet)) if !failed => {
                failed = network.write(packet).await.is_err();
                wrote = true;
            }
            Ok(_) => {}
            Err(_) => failed = true,
        }
    }
    // The state queued `Outgoing` events for the event loop to hand out: these packets are
    // ours and already counted (incoming events stay queued).
    ev.state.events.retain(|e| !matches!(e, Event::Outgoing(_)));
    !failed
        && (!wrote
            || matches!(
                tokio::time::timeout(WRITE_TIMEOUT, network.flush()).await,
                Ok(Ok(()))
            ))
}

/// Counts a report by its outcome (the car's own frame: no need to verify it).
fn classify_report(frame: &[u8], stats: &FleetStats) {
    let Ok(raw) = parse_frame(frame, FrameKind::Report) else {
        return;
    };
    let Ok(report) = postcard::from_bytes::<Report>(raw.payload) else {
        return;
    };
    match report.outcome {
        Outcome::Applied { .. } => bump(&stats.applied),
        Outcome::Status { .. } => bump(&stats.status),
        Outcome::Periodic { .. } => bump(&stats.periodic),
        Outcome::Rejected { code, .. } | Outcome::GrantsRefused { code, .. } => {
            stats.rejected(code.as_str())
        }
    }
}

fn instant_of_unix(deadline: u64) -> Instant {
    let now = crate::unix_now();
    Instant::now() + Duration::from_secs(deadline.saturating_sub(now))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Runs one car until the fleet shuts down.
pub async fn run_car(spec: CarSpec, ctx: Arc<FleetContext>) {
    let vin = spec.vin;
    let mut shutdown = ctx.shutdown.clone();
    // The loop's wake-ups live as long as the car, armed once and re-armed only when they
    // fire or their deadline moves, rather than made anew (timer entries and waiter lists
    // taken and dropped) on every turn: a car turns its loop several times per command.
    let mut stop = std::pin::pin!(shutdown.changed());
    if let Some(wait) = spec.faults.offline_for {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.as_mut() => return,
        }
    }
    let command_topic = topics::command_topic(&vin).as_str().to_string();
    let presence_topic = topics::presence_topic(&vin).as_str().to_string();
    let (host, port) = ctx
        .brokers
        .get(spec.broker_slot % ctx.brokers.len().max(1))
        .cloned()
        .unwrap_or_else(|| ("127.0.0.1".to_string(), 1883));
    let mut opts = MqttOptions::new(vin.as_str(), host, port);
    opts.set_keep_alive(ctx.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(CAR_INFLIGHT)
        .set_max_packet_size(CAR_MAX_PACKET, CAR_MAX_PACKET)
        .set_last_will(LastWill::new(
            presence_topic.as_str(),
            topics::PRESENCE_OFFLINE,
            QoS::AtLeastOnce,
            topics::PRESENCE_RETAIN,
        ));
    let (client, mut eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);

    let config = Config {
        vin,
        trusted_keys: ctx.trusted.clone(),
        device_key: spec.key,
        platform: ctx.platform,
        firmware_version: ctx.firmware.clone(),
        report_interval_secs: ctx.report_interval_secs,
    };
    let agent = Agent::new(config, None, crate::unix_now());
    let mut d = Driver {
        agent,
        store: Vec::new(),
        client,
        report_topic: topics::report_topic(&vin).as_str().to_string(),
        current: None,
        out: Vec::with_capacity(OUT_CAP),
        direct: false,
        shared: spec.shared,
        ctx: ctx.clone(),
        lines_changed: true,
    };
    d.drain(false);

    let stats = ctx.stats.clone();
    let shared = d.shared.clone();
    let mut first = true;
    let mut failures: u32 = 0;
    let mut last_deadline: Option<u64> = None;
    let mut next_storm = spec.faults.storm_every.map(|e| Instant::now() + jitter(e));
    let mut core_timer = std::pin::pin!(tokio::time::sleep_until(far_future().into()));
    // What `core_timer` is set for: the core's deadline and whether it is a repeat.
    let mut core_timer_for: Option<(Option<u64>, bool)> = None;
    let mut storm_timer = std::pin::pin!(tokio::time::sleep_until(
        next_storm.unwrap_or_else(far_future).into()
    ));
    let mut reconnect = std::pin::pin!(shared.reconnect.notified());
    loop {
        if eventloop.network.is_none() {
            // Connecting: bounded concurrency, paced the first time.
            let Ok(permit) = ctx.connect_gate.clone().acquire_owned().await else {
                return;
            };
            if first {
                ctx.pacer.wait().await;
            }
            let t0 = Instant::now();
            let res = tokio::select! {
                r = eventloop.poll() => r,
                _ = stop.as_mut() => return,
            };
            drop(permit);
            match res {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    stats.record_connect(t0.elapsed());
                    bump(&stats.connects);
                    bump(&stats.connected);
                    if first {
                        bump(&stats.ever_connected);
                        first = false;
                    }
                    failures = 0;
                    d.set_connected(true);
                    on_connected(&mut d, &command_topic, &presence_topic);
                }
                Ok(_) => {}
                Err(e) => {
                    bump(&stats.connect_errors);
                    failures = failures.saturating_add(1);
                    eventloop.network = None;
                    if !backoff(failures, stop.as_mut(), &e).await {
                        return;
                    }
                }
            }
            continue;
        }

        // Time is in whole seconds: a deadline that is already due and was just handled
        // waits a little, so a core that asks again within the same second is not spun on.
        let deadline = d.agent.poll_timeout();
        let repeat = deadline.is_some() && deadline == last_deadline;
        if core_timer_for != Some((deadline, repeat)) {
            let mut timeout_at = deadline.map(instant_of_unix).unwrap_or_else(far_future);
            if repeat {
                timeout_at = timeout_at.max(Instant::now() + MIN_TIMER_REPEAT);
            }
            core_timer.as_mut().reset(timeout_at.into());
            core_timer_for = Some((deadline, repeat));
        }
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if !on_publish(&mut d, &mut eventloop, p, &command_topic).await {
                        eventloop.clean();
                        lost(&mut d, &stats);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    lost(&mut d, &stats);
                    failures = failures.saturating_add(1);
                    if !backoff(failures, stop.as_mut(), &e).await {
                        return;
                    }
                }
            },
            _ = core_timer.as_mut() => {
                // Fired: armed again on the next turn, whatever the core asks then.
                core_timer_for = None;
                last_deadline = deadline;
                d.agent.handle_timeout(crate::unix_now());
                d.direct = can_write_direct(&eventloop);
                d.drain(false);
                if !write_out(&mut d, &mut eventloop).await {
                    eventloop.clean();
                    lost(&mut d, &stats);
                }
            }
            _ = storm_timer.as_mut() => {
                // Drop the TCP connection without DISCONNECT: the broker sends the last will.
                eventloop.clean();
                bump(&stats.storm_drops);
                lost(&mut d, &stats);
                next_storm = spec.faults.storm_every.map(|e| Instant::now() + jitter(e));
                storm_timer
                    .as_mut()
                    .reset(next_storm.unwrap_or_else(far_future).into());
                let pause = Duration::from_millis(rand::thread_rng().gen_range(50..500));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.as_mut() => return,
                }
            }
            _ = reconnect.as_mut() => {
                reconnect.set(shared.reconnect.notified());
                eventloop.clean();
                lost(&mut d, &stats);
            }
            _ = stop.as_mut() => {
                let _ = d.client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
        }
    }
}

fn lost(d: &mut Driver, stats: &FleetStats) {
    bump(&stats.disconnects);
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    d.set_connected(false);
}

/// Sleeps before the next reconnect; `false` when the fleet is shutting down.
async fn backoff<F: std::future::Future>(
    failures: u32,
    stop: std::pin::Pin<&mut F>,
    _e: &ConnectionError,
) -> bool {
    let base = Duration::from_millis(250u64.saturating_mul(1 << failures.min(5)));
    let wait = jitter(base.min(MAX_RECONNECT_BACKOFF));
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop => false,
    }
}

/// `d` ± 25%, so cars do not move in lockstep.
fn jitter(d: Duration) -> Duration {
    let f = rand::thread_rng().gen_range(0.75..1.25);
    d.mul_f64(f)
}

fn on_connected(d: &mut Driver, command_topic: &str, presence_topic: &str) {
    if d.client
        .try_subscribe(command_topic, QoS::AtLeastOnce)
        .is_err()
        || d.client
            .try_publish(
                presence_topic,
                QoS::AtLeastOnce,
                topics::PRESENCE_RETAIN,
                topics::PRESENCE_ONLINE,
            )
            .is_err()
    {
        bump(&d.ctx.stats.client_queue_full);
    }
    d.agent.handle_connected(crate::unix_now());
    d.drain(false);
}

/// Handles a received publish; `false` when writing the answer failed (connection lost).
async fn on_publish(d: &mut Driver, ev: &mut EventLoop, p: Publish, command_topic: &str) -> bool {
    let stats = d.ctx.stats.clone();
    if p.topic != command_topic {
        // Not ours to handle; acknowledge so the broker does not hold it.
        owe_ack(&mut d.out, &stats, &p);
        return write_out(d, ev).await;
    }
    bump(&stats.commands_received);
    if let Ok(mut s) = d.shared.snapshot.lock() {
        s.commands += 1;
    }
    let elapsed_ms = u64::try_from(d.ctx.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    if elapsed_ms < d.shared.drop_until_ms.load(Ordering::Relaxed) {
        bump(&stats.commands_dropped);
        owe_ack(&mut d.out, &stats, &p);
        return write_out(d, ev).await;
    }
    if let Some(delay) = d.ctx.net_delay {
        tokio::time::sleep(delay).await;
    }
    let t0 = Instant::now();
    let corrupt = d.ctx.corrupt > 0.0 && rand::thread_rng().gen_bool(d.ctx.corrupt);
    let payload = p.payload.clone();
    d.current = Some(p);
    if corrupt && !payload.is_empty() {
        bump(&stats.frames_corrupted);
        let mut bytes = payload.to_vec();
        let i = rand::thread_rng().gen_range(0..bytes.len());
        bytes[i] ^= 0x5a;
        d.agent.handle_frame(&bytes, crate::unix_now());
    } else {
        d.agent.handle_frame(&payload, crate::unix_now());
    }
    d.direct = can_write_direct(ev);
    let published = d.drain(true);
    let written = write_out(d, ev).await;
    if published && written {
        stats.record_handle(t0.elapsed());
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vins_and_keys_are_deterministic() {
        let v = car_vin("SMVABC", 42).unwrap();
        assert_eq!(v.as_str(), "SMVABC00000000042");
        assert!(car_vin("SMVIOQ", 1).is_err());
        assert_eq!(car_key(1, 2).to_bytes(), car_key(1, 2).to_bytes());
        assert_ne!(car_key(1, 2).to_bytes(), car_key(1, 3).to_bytes());
        let p = random_prefix();
        assert!(car_vin(&p, 99_999_999_999).is_ok());
    }
}
