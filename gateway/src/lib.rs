//! # caas-gateway: the fleet command gateway
//!
//! Sits between the CaaS core and the cars (DESIGN.md §1): it serves the IoT API over HTTP
//! ([`api`]; HTTP/1.1 and HTTP/2), and over TLS with optional client certificates for a core
//! on another machine (`--https`, module `https`), keeps a durable activation engine (sled
//! with group commits, per-car desired state, retries, support tickets, signed webhooks from
//! an outbox), signs every command with `caas-protocol` and fans them out over MQTT: an
//! embedded rumqttd broker by default (plain listener, plus an mTLS listener with per-car
//! isolation through our own TLS front) or an external broker such as Mosquitto 2.
//!
//! Run it as `caas-gateway serve` (see [`config::ServeArgs`]; `caas-gateway check` checks the
//! same settings without starting, [`preflight`]) or embed it:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let mut config = caas_gateway::Config::default();
//! config.http = "127.0.0.1:0".parse()?;
//! config.mqtt = Some("127.0.0.1:0".parse()?);
//! config.data = "/tmp/gw-data".into();
//! let gw = caas_gateway::start(config).await?;
//! println!("HTTP on {}, MQTT on {:?}", gw.http_addr(), gw.mqtt_addr());
//! gw.shutdown().await;
//! # Ok(()) }
//! ```
// One unsafe call, allowed where it is: setting an option of the allocator (heap.rs).
#![deny(unsafe_code)]

pub mod api;
mod campaign;
pub mod config;
mod engine;
pub mod heap;
mod https;
mod idempotency;
mod listener;
mod metrics;
mod mqtt;
mod openapi;
pub mod preflight;
mod store;
mod tlsfront;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use caas_protocol::{files, verifying_key_to_hex, KeyId, RequestId};

pub use config::{Config, HttpsFiles, LogFormat, RetryPolicy, TlsFiles, DEV_API_TOKEN};
pub use engine::MAX_IN_FLIGHT_PER_CAR;

use engine::{Engine, Msg, Shared};
use store::{dec, RequestRec, Store};

/// A running gateway. Dropping it does not stop it: call [`Gateway::shutdown`].
pub struct Gateway {
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    mqtt_addr: Option<SocketAddr>,
    mqtts_addr: Option<SocketAddr>,
    public_key: String,
    key_id: String,
    engine: Engine,
    store: Store,
    /// The IoT API's servers (plain, TLS) and what stops each.
    http: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The store's pruner and what stops it between two of its steps.
    pruner: (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    heap: Option<heap::Warmer>,
    /// The callback senders (one per lane) and what stops each (it tells the engine what it
    /// delivered first).
    webhook: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl Gateway {
    /// Where the IoT API listens: the plain listener, or with `--no-http` the TLS one.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the IoT API listens over TLS (`--https`), if it does.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The embedded broker's plain MQTT listener, if any.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The embedded broker's mTLS listener, if any.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.mqtts_addr
    }

    /// The command-signing public key (64 hex digits) cars must trust.
    pub fn public_key_hex(&self) -> &str {
        &self.public_key
    }

    /// The key id of the signing key (16 hex digits).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Stops accepting HTTP, lets the engine commit its last batch, flushes sled.
    /// (The embedded broker's threads end with the process.)
    pub async fn shutdown(mut self) {
        drop(self.heap.take());
        stop_all(std::mem::take(&mut self.http)).await;
        stop_all(std::mem::take(&mut self.webhook)).await;
        for t in self.tasks.drain(..) {
            stop_within(t, Duration::ZERO).await;
        }
        // Stopped between steps, so that no step on a blocking thread keeps the store open.
        let (stop, pruner) = self.pruner;
        let _ = stop.send(());
        stop_within(pruner, Duration::from_secs(5)).await;
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.stop()).await;
        let _ = self.store.db.flush_async().await;
        tracing::info!("gateway stopped");
    }
}

/// Serves the IoT API on `listener` until the returned sender fires (then lets the requests
/// under way finish).
fn serve_api<L>(
    listener: L,
    app: axum::Router,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server");
        }
    });
    (stop_tx, task)
}

/// Records looked at per pruning step (one blocking task of a few milliseconds).
const PRUNE_STEP: usize = 1_024;

/// Removes what is older than `retention` from the store ([`store::prune`]): a pass at start
/// and then every quarter of the retention (at least every 10 minutes), in steps of
/// [`PRUNE_STEP`] records, each on a blocking thread, until `stop` fires.
async fn prune_forever(
    store: Store,
    metrics: Arc<metrics::Metrics>,
    retention: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(600));
    loop {
        let cutoff_ms = store::now_ms().saturating_sub(retention.as_millis() as u64);
        for kind in store::Prunable::ALL {
            let mut from = Vec::new();
            loop {
                let (s, f) = (store.clone(), from);
                let step = tokio::task::spawn_blocking(move || {
                    store::prune(&s, kind, cutoff_ms, &f, PRUNE_STEP)
                })
                .await;
                let next = match step {
                    Ok(Ok((removed, next))) => {
                        metrics.pruned.fetch_add(removed as u64, Relaxed);
                        next
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, ?kind, "pruning the store");
                        None
                    }
                    Err(_) => None,
                };
                if !matches!(
                    stop.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                ) {
                    return;
                }
                match next {
                    Some(key) => from = key,
                    None => break,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return,
        }
    }
}

/// Tells every task of `tasks` to stop, then gives each up to 5 s to do so.
async fn stop_all(
    tasks: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
) {
    let mut stopping = Vec::new();
    for (stop, task) in tasks {
        let _ = stop.send(());
        stopping.push(task);
    }
    for task in stopping {
        stop_within(task, Duration::from_secs(5)).await;
    }
}

/// Lets `task` end by itself within `grace`, then aborts it, and returns once it is gone (so
/// nothing it holds, such as the database, outlives the gateway's shutdown).
async fn stop_within(mut task: tokio::task::JoinHandle<()>, grace: Duration) {
    if tokio::time::timeout(grace, &mut task).await.is_ok() {
        return;
    }
    task.abort();
    let _ = task.await;
}

/// Starts the gateway: opens the data directory, loads state, starts the broker (or connects
/// to the external one), re-publishes every car's newest command, and serves HTTP.
pub async fn start(config: Config) -> anyhow::Result<Gateway> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    config.validate()?;
    // Before anything is opened: a certificate that does not load stops the start.
    let api_tls = config.https_files.as_ref().map(https::load).transpose()?;
    let webhook_roots = match &config.webhook_ca {
        Some(path) => webhook::read_roots(path)?,
        None => Vec::new(),
    };
    raise_open_file_limit();
    survive_file_size_limit();
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("creating {}", config.data.display()))?;
    let key = files::load_or_generate(&config.signing_key_path())
        .with_context(|| format!("signing key {}", config.signing_key_path().display()))?;
    let public_key = verifying_key_to_hex(&key.verifying_key()).to_string();
    let key_id = KeyId::of(&key.verifying_key()).to_string();
    let store = Store::open(&config.data.join("db"), config.store_cache_mb)
        .context("opening the database")?;
    let metrics = Arc::new(metrics::Metrics::default());
    let metrics_for_pruner = metrics.clone();
    let heap = heap::Warmer::start(
        heap::Reserve::from_setting(config.heap_reserve_mb, config.broker.is_none()),
        metrics.clone(),
    );
    // The embedded routers start before the engine, whose flushers publish into them.
    let (broker, publisher) = mqtt::prepare(&config, &metrics)?;
    let (handoff, inboxes) = match config.webhook_url {
        Some(_) => {
            let (h, i) = webhook::handoff(&store);
            (Some(h), Some(i))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        store: store.clone(),
        metrics: metrics.clone(),
        retry: config.retry.clone(),
        command_ttl: config.command_ttl,
        key,
        out: publisher,
        webhook: handoff,
        key_owners: engine::KeyOwners::default(),
    });
    let engine = Engine::start(shared, config.shards)?;
    // Campaigns whose abort rule trips are cancelled by one task, started below once the
    // API's state exists; trips made while loading wait in the queue.
    let (trips_tx, trips_rx) = tokio::sync::mpsc::channel(campaign::TRIP_QUEUE);
    let campaigns = Arc::new(campaign::CampaignBook::new(trips_tx));
    load_state(&store, &engine, &campaigns).await?;

    let mut tasks = Vec::new();
    let mut mqtt_addr = None;
    let mut mqtts_addr = None;
    match broker {
        mqtt::Broker::External(external) => {
            tasks.push(mqtt::start_external(
                external,
                engine.clone(),
                metrics.clone(),
            ));
        }
        mqtt::Broker::Embedded(embedded) => {
            let acceptors = Arc::new(embedded.attach(&engine, &metrics));
            if let Some(listen) = config.mqtt {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("MQTT listener {listen}"))?;
                mqtt_addr = Some(listener.local_addr()?);
                if config.mqtts.is_some() {
                    tracing::warn!(%listen, "the plain MQTT listener has no client authentication \
                    beside the certificate-checked one; --no-mqtt closes it");
                }
                tasks.push(tokio::spawn(tlsfront::serve_plain(
                    listener,
                    acceptors.clone(),
                )));
            }
            if let (Some(listen), Some(tls)) = (config.mqtts, &config.tls) {
                let front = tlsfront::FrontTls::load(tls, config.tls_crl.as_deref())?;
                metrics
                    .crl_entries
                    .store(front.revoked_count() as u64, Relaxed);
                metrics
                    .mqtts_cert_expires_at
                    .store(preflight::expires_at(&tls.cert).unwrap_or(0), Relaxed);
                let (front_tx, front) = tokio::sync::watch::channel(Arc::new(front));
                let front_tx = Arc::new(front_tx);
                if let Some(crl) = &config.tls_crl {
                    tasks.push(tokio::spawn(tlsfront::watch_crl(
                        tls.clone(),
                        crl.clone(),
                        front_tx.clone(),
                        metrics.clone(),
                    )));
                }
                tasks.push(tokio::spawn(tlsfront::watch_certs(
                    tls.clone(),
                    config.tls_crl.clone(),
                    front_tx,
                    metrics.clone(),
                )));
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("MQTT TLS listener {listen}"))?;
                mqtts_addr = Some(listener.local_addr()?);
                tasks.push(tokio::spawn(tlsfront::serve(
                    listener,
                    front,
                    acceptors.clone(),
                    metrics.clone(),
                )));
            }
            engine.broadcast(|| Msg::RepublishAll { only_behind: false });
        }
    }
    let mut webhook_tasks = Vec::new();
    if let (Some(url), Some(inboxes)) = (&config.webhook_url, inboxes) {
        for inbox in inboxes {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let lane = inbox.lane();
            let task = webhook::spawn(
                lane,
                webhook::run(
                    store.clone(),
                    metrics.clone(),
                    engine.clone(),
                    webhook::Receiver {
                        url: url.clone(),
                        secret: config.webhook_secret.clone(),
                        previous_secret: config.webhook_secret_previous.clone(),
                        roots: webhook_roots.clone(),
                    },
                    inbox,
                    stop_rx,
                ),
            )
            .context("starting the webhook senders")?;
            webhook_tasks.push((stop_tx, task));
        }
    }

    let state = Arc::new(api::AppState {
        engine: engine.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        api_token: config.api_token.clone(),
        api_token_previous: config.api_token_previous.clone(),
        key_id: key_id.clone(),
        public_key: public_key.clone(),
        campaigns,
    });
    tasks.push(tokio::spawn(api::run_aborts(state.clone(), trips_rx)));
    let app = api::router(state);
    let mut http = Vec::new();
    let mut http_addr = None;
    if !config.no_http {
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("HTTP listener {}", config.http))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the IoT API is served in the clear beyond this machine: \
                its token and requests can be read and replayed on the way; --https and \
                --no-http serve it over TLS only");
        }
        http_addr = Some(addr);
        let listener = listener::BoundedListener::new(
            listener,
            listener::MAX_HTTP_CONNECTIONS,
            listener::HTTP_IDLE_TIMEOUT,
        );
        http.push(serve_api(listener, app.clone()));
    }
    let mut https_addr = None;
    if let (Some(listen), Some(files), Some(api_tls)) = (config.https, &config.https_files, api_tls)
    {
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("HTTPS listener {listen}"))?;
        metrics
            .https_cert_expires_at
            .store(preflight::expires_at(&files.cert).unwrap_or(0), Relaxed);
        let (config_tx, config_rx) = tokio::sync::watch::channel(api_tls);
        let (listener, acceptor) = https::listen(tcp, config_rx, metrics.clone())?;
        https_addr = Some(axum::serve::Listener::local_addr(&listener)?);
        tasks.push(acceptor);
        tasks.push(tokio::spawn(https::watch_files(
            files.clone(),
            config_tx,
            metrics.clone(),
        )));
        http.push(serve_api(listener, app));
    }
    let Some(http_addr) = http_addr.or(https_addr) else {
        bail!("no IoT API listener (--no-http needs --https)");
    };
    let (pruner_stop, pruner_stopped) = tokio::sync::oneshot::channel();
    let pruner = tokio::spawn(prune_forever(
        store.clone(),
        metrics_for_pruner,
        config.retention,
        pruner_stopped,
    ));
    tracing::info!(%http_addr, ?https_addr, ?mqtt_addr, ?mqtts_addr, broker = ?config.broker, key_id = %key_id, "gateway started");
    Ok(Gateway {
        http_addr,
        https_addr,
        mqtt_addr,
        mqtts_addr,
        public_key,
        key_id,
        engine,
        store,
        http,
        tasks,
        pruner: (pruner_stop, pruner),
        heap,
        webhook: webhook_tasks,
    })
}

/// `caas-gateway serve` (and `caas-sim gateway serve`, the same program): logging, the
/// runtime, the gateway until SIGINT or SIGTERM. Returns the process's exit code. Call it
/// first thing in `main`, while no other thread runs ([`heap::retain_freed_memory`]).
pub fn serve_main(args: config::ServeArgs) -> i32 {
    heap::retain_freed_memory();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("caas-gateway: {e:#}");
            return 2;
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rumqttd=warn,sled=warn")
            }),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: in a file or a collector they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        config::LogFormat::Text => logs.init(),
        config::LogFormat::Json => logs.json().init(),
    }
    if config.api_token == DEV_API_TOKEN {
        eprintln!(
            "caas-gateway: using the development API token {DEV_API_TOKEN:?} (set --api-token)"
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caas-gateway: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(config, shutdown_signal())) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("caas-gateway: {e:#}");
            1
        }
    }
}

/// `caas-gateway check`: the settings `serve` would start with, checked and reported without
/// starting ([`preflight`]). Returns the process's exit code: 0 when they would start
/// (warnings printed), 1 when they would not, 2 when the settings themselves do not parse.
pub fn check_main(args: config::ServeArgs) -> i32 {
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("caas-gateway: {e:#}");
            return 2;
        }
    };
    match preflight::check(&config) {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            let plural = if report.warnings == 1 { "" } else { "s" };
            println!(
                "ok: serve would start with these settings ({} warning{plural})",
                report.warnings
            );
            0
        }
        Err(e) => {
            eprintln!("caas-gateway: {e:#}");
            1
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown signal received");
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown signal received");
}

/// Starts the gateway, runs until `shutdown` resolves, then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let gw = start(config).await?;
    shutdown.await;
    gw.shutdown().await;
    Ok(())
}

/// Each connected car holds one file descriptor, and a Linux process often starts with a
/// soft limit of 1,024 open files under a much higher hard limit: the gateway takes the hard
/// limit, and says what it has, since past it new cars and HTTP clients wait unaccepted in
/// the listen queue.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "open file limit"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
}

/// A file-size limit (`ulimit -f`, a quota) reached by the store's log would otherwise kill
/// the process with SIGXFSZ (and a core dump) in the middle of a write, with nothing logged.
/// With the signal caught, that write fails with EFBIG like any other storage error: the
/// request in hand is answered 500 with its requestId, `/healthz` turns 503 ("store":
/// "failing"), the log says why, and everything answered 2xx before is on disk.
fn survive_file_size_limit() {
    use tokio::signal::unix::{signal, SignalKind};
    // The handler stays installed after the stream is dropped; the signal is then ignored.
    let xfsz = SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    if let Err(e) = signal(xfsz) {
        tracing::warn!("cannot catch SIGXFSZ: {e}");
    }
}

/// Hands every stored car, then each car's unfinished requests, then the cars' held grants
/// (kept by a shard only while their requests are in flight), to their shards. A campaign
/// with an abort rule and requests in flight is counted again from the store, refusals
/// included, and its requests carry those counts ([`campaign::rearm`]).
async fn load_state(
    store: &Store,
    engine: &Engine,
    campaigns: &Arc<campaign::CampaignBook>,
) -> anyhow::Result<()> {
    let store = store.clone();
    let engine = engine.clone();
    let book = campaigns.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        // Each campaign with requests in flight, looked up once: at most one entry per
        // campaign in the store (bounded by the retention), dropped once loaded.
        let mut rearmed: HashMap<String, Option<Arc<campaign::CampaignCounts>>> = HashMap::new();
        let mut cars = 0usize;
        let mut pending = 0usize;
        // A final request whose callback already waits in the outbox (a try failed) is sent
        // from there; its car's record may still list it if the crash came before that
        // record was written again, and sending it from both would deliver it twice.
        let mut in_outbox = std::collections::HashSet::new();
        for item in store.outbox.iter() {
            let (_, v) = item?;
            if let Some(entry) = dec::<store::OutboxEntry>(&v) {
                in_outbox.insert(entry.request_id);
            }
        }
        for item in store.vehicles.iter() {
            let (k, v) = item?;
            let Some(rec) = dec(&v) else { continue };
            let car: Option<store::CarRec> = store.cars.get(&k)?.and_then(|c| dec(&c));
            let Some(vin) = vin_of_key(&k) else {
                continue;
            };
            let unfinished = car.as_ref().map(|c| c.pending.clone()).unwrap_or_default();
            let shard = engine.shard(&vin);
            let _ = shard.send(Msg::Load { rec, car });
            cars += 1;
            for id in unfinished {
                let Some(rid) = parse_request_id(&id) else {
                    continue;
                };
                let Some(req) = store.requests.get(rid)?.and_then(|v| dec::<RequestRec>(&v)) else {
                    continue;
                };
                if req.phase == "DONE" && in_outbox.contains(&req.request_id) {
                    continue;
                }
                let campaign = match &req.campaign_id {
                    Some(c) if req.phase != "DONE" => rearmed
                        .entry(c.clone())
                        .or_insert_with(|| campaign::rearm(&store, &book, c))
                        .clone(),
                    _ => None,
                };
                let _ = shard.send(Msg::LoadPending { rec: req, campaign });
                pending += 1;
            }
        }
        // Decommissioned cars: only their callbacks still under way when they were taken out
        // are sent again (from the outbox if a try already failed). A tombstone whose VIN is
        // registered is what a crash left of a decommissioning that was never answered (the
        // registration's end is its last write) or of a registration again (its first): the
        // registered car holds the truth, so the tombstone goes; a car record beside a
        // tombstone is what a crash left of the decommissioning's last write.
        for item in store.retired.iter() {
            let (k, v) = item?;
            let Some(vin) = vin_of_key(&k) else {
                continue;
            };
            if store.vehicles.contains_key(&k)? {
                store.retired.remove(&k)?;
                continue;
            }
            store.cars.remove(&k)?;
            let Some(tomb) = dec::<store::RetiredRec>(&v) else {
                tracing::warn!(%vin, "stored tombstone is unreadable; skipped");
                continue;
            };
            if tomb.awaiting.is_empty() {
                continue;
            }
            let mut awaiting = Vec::new();
            for id in &tomb.awaiting {
                let Some(rid) = parse_request_id(id) else {
                    continue;
                };
                let Some(req) = store.requests.get(rid)?.and_then(|v| dec::<RequestRec>(&v)) else {
                    continue;
                };
                if req.phase == "DONE" && !in_outbox.contains(&req.request_id) {
                    awaiting.push(req);
                }
            }
            let _ = engine.shard(&vin).send(Msg::LoadRetired { vin, awaiting });
        }
        // One scan: the tree holds only cars whose refusal is still being sorted out.
        for item in store.held.iter() {
            let (k, v) = item?;
            let Some(vin) = vin_of_key(&k) else {
                continue;
            };
            let Some(held) = dec::<Vec<String>>(&v) else {
                tracing::warn!(%vin, "stored held grants are unreadable; skipped");
                continue;
            };
            let _ = engine.shard(&vin).send(Msg::LoadHeld { vin, held });
        }
        tracing::info!(cars, pending, "state loaded");
        Ok(())
    })
    .await?
}

/// Parses a request id (UUID text), for callers of the lib API.
pub fn parse_request_id(s: &str) -> Option<[u8; 16]> {
    s.parse::<RequestId>().ok().map(|r| r.0)
}

/// The VIN a store tree keys a car's record by; `None` for a key that is not one.
fn vin_of_key(key: &[u8]) -> Option<caas_protocol::Vin> {
    std::str::from_utf8(key).ok()?.parse().ok()
}
