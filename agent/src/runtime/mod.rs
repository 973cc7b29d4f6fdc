//! The Linux runtime (feature `std`): the agent core driven by tokio, rumqttc and sled.
//!
//! It only moves bytes and time; every decision is the core's. Two tasks:
//!
//! * the **connection** task polls the rumqttc event loop, forwards what arrives to the
//!   agent task over a bounded channel ([`EVENT_QUEUE`]) and, when the broker is
//!   unreachable, waits with jittered exponential backoff ([`Backoff`]) before trying again:
//!   it never spins;
//! * the **agent** task owns the [`Agent`], hands it frames and timer ticks, and carries out
//!   its actions: `Persist` into sled (flushed), `SetFeature` as a log line and the optional
//!   `--hook`, `Ack` as the MQTT PUBACK (manual acks: only after persist and apply), and
//!   `Publish` on the car's report topic.
//!
//! Acknowledgements are never dropped for want of room: rumqttc hands out every incoming
//! packet it has read (and resends its own pending publishes) before it takes requests
//! from its channel, so a redelivered backlog after a broker restart fills that channel
//! with acks and reports while the agent is still handling the backlog. An ack that finds
//! the channel full is owed ([`OWED_ACKS`]) and queued again, in order, before the next
//! event and every [`ACK_RETRY`] until it goes; the agent task never waits on the channel
//! (the connection task, blocked handing it the next frame, would never drain it). Had the
//! ack been dropped, the broker would keep the command and redeliver the whole backlog at
//! every reconnect, for ever.
//!
//! MQTT: client id = VIN, persistent session (`clean_session = false`) so the broker
//! redelivers whatever was not acknowledged, retained last will `offline` and a retained
//! `online` on every connect at the presence topic, the command topic subscribed with QoS 1
//! after every connect, a status report after every connect (re-sync), TCP_NODELAY.

pub mod cli;
pub mod diag;
pub mod settings;
pub mod store;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use caas_protocol::{topics, FeatureClass, FeatureFlag, Param, PlatformFeatures, TrustedKey, Vin};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet, Publish, QoS,
    Transport,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{Action, Agent, BootStatus, Config, FeatureCatalog};
pub use settings::Settings;
use store::Store;

/// Requests (publishes, acks, subscribes) rumqttc may hold for the connection; when full,
/// a report is dropped (the next one carries the same state) rather than block the agent,
/// and an ack is owed (see [`OWED_ACKS`]).
pub const REQUEST_QUEUE: usize = 64;
/// Acknowledgements owed on the current connection because [`REQUEST_QUEUE`] was full, as
/// packet ids (2 bytes each). A broker cannot have more unacknowledged publishes to one
/// client than there are packet ids, so a well-behaved one never fills it; past it an ack
/// is dropped and the broker redelivers.
pub const OWED_ACKS: usize = u16::MAX as usize;
/// How often owed acknowledgements are queued again while no event arrives.
pub const ACK_RETRY: Duration = Duration::from_millis(10);
/// Events waiting between the connection task and the agent task.
pub const EVENT_QUEUE: usize = 16;
/// Largest incoming MQTT packet accepted. Above the protocol's frame maximum on purpose:
/// an oversized command reaches the agent, which refuses it as `TOO_LARGE` and acks it,
/// instead of the connection failing on it forever.
pub const MAX_INCOMING_PACKET: usize = 64 * 1024;
/// MQTT keep-alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Longest wait of the reconnect backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait of the reconnect backoff.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Time a `--hook` run may take.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep of the agent task without a timer check (so a changed wall clock is
/// noticed within this time).
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(30);
/// Diagnostic code added when the `--hook` fails.
pub const ERR_HOOK_FAILED: &str = "HOOK_FAILED";

/// Installs the one rustls crypto provider (ring) for the process. Call it first thing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The platform's feature catalogue from the settings.
#[derive(Debug, Clone)]
pub struct OwnedCatalog {
    /// Switchable.
    pub optional: Vec<FeatureFlag>,
    /// Base platform.
    pub base: Vec<FeatureFlag>,
}

impl PlatformFeatures for OwnedCatalog {
    fn classify(&self, flag: &FeatureFlag) -> FeatureClass {
        if self.base.contains(flag) {
            FeatureClass::Base
        } else if self.optional.contains(flag) {
            FeatureClass::Optional
        } else {
            FeatureClass::Unknown
        }
    }
}

impl FeatureCatalog for OwnedCatalog {
    fn optional_index(&self, flag: &FeatureFlag) -> Option<usize> {
        if self.base.contains(flag) {
            return None;
        }
        self.optional.iter().position(|f| f == flag)
    }

    fn optional_name(&self, index: usize) -> Option<&str> {
        self.optional.get(index).map(|f| f.as_str())
    }
}

/// Jittered exponential backoff: each wait is a random time between half and all of the
/// current step, and the step doubles up to [`MAX_BACKOFF`].
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { step: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(MAX_BACKOFF);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Back to the first step (after a successful connect).
    pub fn reset(&mut self) {
        self.step = MIN_BACKOFF;
    }
}

/// The wall clock in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix seconds as ISO-8601 UTC (`2026-11-22T13:00:00Z`).
pub fn iso8601(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "invalid".into())
}

enum NetEvent {
    Connected,
    Disconnected(String),
    Frame(Publish),
}

fn mqtt_options(settings: &Settings) -> anyhow::Result<MqttOptions> {
    let vin = settings.vin;
    let mut opts = MqttOptions::new(
        vin.as_str(),
        settings.broker.host.clone(),
        settings.broker.port,
    );
    opts.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET)
        .set_last_will(LastWill::new(
            topics::presence_topic(&vin).as_str(),
            topics::PRESENCE_OFFLINE,
            QoS::AtLeastOnce,
            topics::PRESENCE_RETAIN,
        ));
    if let Some(tls) = &settings.tls {
        opts.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(tls)?)),
        ));
    }
    Ok(opts)
}

fn read_pem_certs(
    path: &std::path::Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn tls_config(tls: &settings::TlsFiles) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_pem_certs(&tls.ca).context("--ca")? {
        roots
            .add(cert)
            .with_context(|| format!("--ca {}: unusable CA certificate", tls.ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS setup")?
    .with_root_certificates(roots);
    Ok(match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_pem_certs(cert).context("--cert")?;
            let pem = std::fs::read(key).with_context(|| format!("--key {}", key.display()))?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .ok()
                .flatten()
                .ok_or_else(|| anyhow!("--key {}: no PEM private key in it", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| {
                    format!(
                        "--cert/--key {}: the key does not fit the certificate",
                        key.display()
                    )
                })?
        }
    })
}

/// Polls the MQTT event loop forever, forwarding connects, disconnects and publishes.
async fn drive_connection(mut eventloop: EventLoop, events: mpsc::Sender<NetEvent>) {
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);
    let mut backoff = Backoff::default();
    loop {
        let forward = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                Some(NetEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(NetEvent::Frame(p)),
            Ok(_) => None,
            Err(e) => {
                let wait = backoff.next_wait();
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unreachable; retrying");
                if events
                    .send(NetEvent::Disconnected(e.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(wait).await;
                None
            }
        };
        if let Some(ev) = forward {
            if events.send(ev).await.is_err() {
                return;
            }
        }
    }
}

/// Runs the agent until `shutdown` completes. Fails (with one clear line) only at startup:
/// the store cannot be opened, the diagnostic address cannot be bound, TLS files are bad.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let store = Store::open(&settings.data_dir)?;
    let stored = store.load()?;
    let mut trusted_keys = heapless::Vec::new();
    for k in &settings.gateway_keys {
        // A car verifies every command with these keys: tables make that a quarter cheaper.
        trusted_keys
            .push(TrustedKey::with_tables(*k))
            .map_err(|_| anyhow!("too many gateway keys"))?;
    }
    let config = Config {
        vin: settings.vin,
        trusted_keys,
        device_key: settings.device_key.clone(),
        platform: OwnedCatalog {
            optional: settings.optional_features.clone(),
            base: settings.base_features.clone(),
        },
        firmware_version: settings.firmware_version.clone(),
        report_interval_secs: settings.report_interval_secs,
    };
    let agent = Box::new(Agent::new(config, stored.as_deref(), unix_now()));
    match agent.boot_status() {
        BootStatus::Fresh => info!(vin = %settings.vin, "no stored state: starting fresh"),
        BootStatus::Restored => {
            info!(vin = %settings.vin, applied_seq = agent.state().applied_seq, "state restored")
        }
        BootStatus::SafeState => {
            let codes: Vec<&str> = agent
                .diagnostics()
                .error_codes
                .iter()
                .map(|c| c.as_str())
                .collect();
            error!(vin = %settings.vin, ?codes, "stored state unusable: booted to the safe state (no optional features)")
        }
    }
    let status = Arc::new(Mutex::new(view(&agent, false)));
    if let Some(addr) = settings.diag {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow!("--diag {addr}: cannot listen: {e}"))?;
        info!(addr = %listener.local_addr().unwrap_or(addr), "diagnostic endpoint: GET /status");
        tokio::spawn(diag::serve(listener, status.clone()));
    }
    let (client, eventloop) = AsyncClient::new(mqtt_options(&settings)?, REQUEST_QUEUE);
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let connection = tokio::spawn(drive_connection(eventloop, tx));
    info!(broker = %format!("{}:{}", settings.broker.host, settings.broker.port), tls = settings.broker.tls, "connecting");
    let mut runner = Runner {
        agent,
        settings,
        store,
        client,
        status,
        online: false,
        pending_ack: None,
        owed_acks: VecDeque::new(),
    };
    runner.drain().await;
    tokio::select! {
        () = runner.event_loop(rx) => {}
        () = shutdown => info!("shutting down"),
    }
    // Say goodbye explicitly: a clean disconnect does not fire the last will.
    let vin = runner.settings.vin;
    if runner.online {
        let _ = runner.client.try_publish(
            topics::presence_topic(&vin).as_str(),
            QoS::AtLeastOnce,
            topics::PRESENCE_RETAIN,
            topics::PRESENCE_OFFLINE,
        );
        let _ = runner.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
    }
    Ok(())
}

struct Runner {
    agent: Box<Agent<OwnedCatalog>>,
    settings: Settings,
    store: Store,
    client: AsyncClient,
    status: Arc<Mutex<diag::StatusView>>,
    online: bool,
    /// The command frame being handled, until the agent says to acknowledge it.
    pending_ack: Option<Publish>,
    /// Acks for this connection that found the request channel full, oldest first, as
    /// (QoS, packet id); at most [`OWED_ACKS`]. Emptied on a disconnect: the broker
    /// redelivers those publishes on the next connection, where the ids may be reused.
    owed_acks: VecDeque<(QoS, u16)>,
}

impl Runner {
    async fn event_loop(&mut self, mut rx: mpsc::Receiver<NetEvent>) {
        let vin: Vin = self.settings.vin;
        let command_topic = topics::command_topic(&vin);
        loop {
            self.flush_owed_acks();
            let sleep = self.timer_sleep();
            let owing = !self.owed_acks.is_empty();
            tokio::select! {
                ev = rx.recv() => match ev {
                    None => return,
                    Some(NetEvent::Connected) => {
                        self.online = true;
                        info!("connected; subscribing and re-syncing");
                        if let Err(e) = self.client.try_subscribe(command_topic.as_str(), QoS::AtLeastOnce) {
                            warn!(error = %e, "could not queue the subscription");
                        }
                        let _ = self.client.try_publish(
                            topics::presence_topic(&vin).as_str(),
                            QoS::AtLeastOnce,
                            topics::PRESENCE_RETAIN,
                            topics::PRESENCE_ONLINE,
                        );
                        self.agent.handle_connected(unix_now());
                    }
                    Some(NetEvent::Disconnected(reason)) => {
                        if self.online {
                            warn!(%reason, "disconnected");
                        }
                        if !self.owed_acks.is_empty() {
                            warn!(owed = self.owed_acks.len(), "disconnected with acks owed; the broker will redeliver");
                            self.owed_acks.clear();
                        }
                        self.online = false;
                    }
                    Some(NetEvent::Frame(publish)) => {
                        if publish.topic != command_topic.as_str() {
                            debug!(topic = %publish.topic, "ignoring a message on another topic");
                            self.ack(&publish);
                            continue;
                        }
                        if self.settings.crash_before_persist {
                            error!("{} is set: aborting before persisting the command", settings::CRASH_BEFORE_PERSIST_ENV);
                            std::process::abort();
                        }
                        let payload = publish.payload.clone();
                        self.pending_ack = Some(publish);
                        self.agent.handle_frame(&payload, unix_now());
                    }
                },
                () = tokio::time::sleep(sleep) => self.agent.handle_timeout(unix_now()),
                // Only to queue owed acks again, at the top of the loop.
                () = tokio::time::sleep(ACK_RETRY), if owing => continue,
            }
            self.drain().await;
        }
    }

    /// Queues the ack for `publish` behind any owed ones; owes it if the channel is full.
    fn ack(&mut self, publish: &Publish) {
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        self.flush_owed_acks();
        if self.owed_acks.is_empty() && self.client.try_ack(publish).is_ok() {
            return;
        }
        if self.owed_acks.len() >= OWED_ACKS {
            warn!(
                pkid = publish.pkid,
                "could not queue the ack (too many owed); the broker will redeliver"
            );
            return;
        }
        if self.owed_acks.is_empty() {
            debug!(pkid = publish.pkid, "request queue full: the ack is owed");
        }
        self.owed_acks.push_back((publish.qos, publish.pkid));
    }

    /// Queues owed acks, oldest first, until the request channel is full again.
    fn flush_owed_acks(&mut self) {
        while let Some(&(qos, pkid)) = self.owed_acks.front() {
            let mut ack = Publish::new("", qos, Vec::new());
            ack.pkid = pkid;
            if self.client.try_ack(&ack).is_err() {
                return;
            }
            self.owed_acks.pop_front();
        }
    }

    fn timer_sleep(&self) -> Duration {
        let Some(at) = self.agent.poll_timeout() else {
            return MAX_TIMER_SLEEP;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(at)
            .saturating_sub(now)
            .min(MAX_TIMER_SLEEP)
    }

    /// Carries out every action the agent has, in its order.
    async fn drain(&mut self) {
        let report_topic = topics::report_topic(&self.settings.vin);
        while let Some(action) = self.agent.poll_action() {
            match action {
                Action::Persist(bytes) => {
                    let bytes = bytes.to_vec();
                    if let Err(e) = self.store.save(bytes).await {
                        error!(error = %format!("{e:#}"), "persist failed: the command is refused and not acknowledged");
                        self.agent.persist_failed();
                    }
                }
                Action::SetFeature { flag, on, params } => {
                    let flag = flag.clone();
                    let params: Vec<Param> = params.to_vec();
                    self.switch(&flag, on, &params).await;
                }
                Action::Ack => match self.pending_ack.take() {
                    Some(publish) if self.online => self.ack(&publish),
                    _ => debug!("nothing to acknowledge on this connection"),
                },
                Action::Publish(frame) => {
                    log_report(frame);
                    if !self.online {
                        debug!("offline: report not sent (a fresh one follows the reconnect)");
                        continue;
                    }
                    let frame = frame.to_vec();
                    if let Err(e) = self.client.try_publish(
                        report_topic.as_str(),
                        QoS::AtLeastOnce,
                        caas_protocol::topics::REPORT_RETAIN,
                        frame,
                    ) {
                        warn!(error = %e, "could not queue the report");
                    }
                }
            }
        }
        // A frame the agent did not acknowledge (its persist failed) stays unacknowledged,
        // so the broker redelivers it.
        self.pending_ack = None;
        let snapshot = view(&self.agent, self.online);
        match self.status.lock() {
            Ok(mut s) => *s = snapshot,
            Err(p) => *p.into_inner() = snapshot,
        }
    }

    async fn switch(&mut self, flag: &FeatureFlag, on: bool, params: &[Param]) {
        let kv: Vec<String> = params
            .iter()
            .map(|p| format!("{}={}", p.key, p.value))
            .collect();
        info!(feature = %flag, on, params = %kv.join(","), "feature switched");
        let Some(hook) = &self.settings.hook else {
            return;
        };
        let mut cmd = tokio::process::Command::new(hook);
        cmd.arg(flag.as_str())
            .arg(if on { "on" } else { "off" })
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if on {
            cmd.args(&kv);
        }
        let outcome = match tokio::time::timeout(HOOK_TIMEOUT, cmd.status()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(format!("exited with {s}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("did not finish within {HOOK_TIMEOUT:?}")),
        };
        match outcome {
            Ok(()) => self.agent.clear_error_code(ERR_HOOK_FAILED),
            Err(why) => {
                error!(hook = %hook.display(), feature = %flag, on, %why, "feature hook failed");
                if let Ok(code) = ERR_HOOK_FAILED.parse() {
                    self.agent.add_error_code(code);
                }
            }
        }
    }
}

/// One log line per report the car sends, from its own (already signed) bytes.
fn log_report(frame: &[u8]) {
    let report = caas_protocol::parse_frame(frame, caas_protocol::FrameKind::Report)
        .ok()
        .and_then(|raw| postcard::from_bytes::<caas_protocol::Report>(raw.payload).ok());
    let Some(report) = report else { return };
    let active = report.active.len();
    match report.outcome {
        caas_protocol::Outcome::Applied { seq } => info!(seq, active, "command applied; reporting"),
        caas_protocol::Outcome::Rejected { seq, code } => {
            warn!(seq, %code, "command refused; reporting")
        }
        caas_protocol::Outcome::GrantsRefused { seq, code, grants } => {
            warn!(seq, %code, grants = format_args!("{grants:#010b}"), "command refused for some of its grants; reporting")
        }
        caas_protocol::Outcome::Status { nonce } => info!(nonce, active, "status query answered"),
        caas_protocol::Outcome::Periodic { counter } => debug!(counter, active, "status report"),
    }
}

fn view(agent: &Agent<OwnedCatalog>, online: bool) -> diag::StatusView {
    diag::StatusView {
        vin: agent.config().vin.to_string(),
        applied_seq: agent.state().applied_seq,
        car_time: iso8601(agent.trusted_time()),
        connectivity: if online { "ONLINE" } else { "OFFLINE" }.into(),
        firmware_version: agent.diagnostics().firmware_version.to_string(),
        active_grants: agent
            .active_grants()
            .map(|g| diag::GrantView {
                service_id: g.service_id.to_string(),
                flags: g.flags.iter().map(|f| f.to_string()).collect(),
                parameters: g
                    .params
                    .iter()
                    .map(|p| (p.key.to_string(), p.value.to_string()))
                    .collect::<BTreeMap<_, _>>(),
                ends_at: g.ends_at.map(iso8601),
            })
            .collect(),
        last_rejection: agent
            .last_rejection()
            .map(|(seq, code)| diag::RejectionView {
                seq,
                code: code.as_str().to_string(),
            }),
        error_codes: agent
            .diagnostics()
            .error_codes
            .iter()
            .map(|c| c.to_string())
            .collect(),
    }
}
