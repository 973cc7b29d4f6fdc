//! Test support: a real gateway, a real webhook receiver, test cars on real MQTT connections.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    dead_code,
    unreachable_pub
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caas_protocol::*;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, Transport};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token";
pub const SECRET: &str = "s3cret";
/// The callback key being rotated out, in the tests of a key rotation.
pub const OLD_SECRET: &str = "old-s3cret";

pub fn vin(n: u32) -> Vin {
    format!("WVWZZZ1JZXW{n:06}").parse().unwrap()
}

pub fn car_key(n: u32) -> SigningKey {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&n.to_be_bytes());
    SigningKey::from_bytes(&seed)
}

/// A callback the receiver got, with whether its signature verified.
#[derive(Debug, Clone)]
pub struct Callback {
    pub body: Value,
    pub signature_ok: bool,
    /// With `X-CaaS-Signature-Previous` (a key rotation), whether it is [`OLD_SECRET`]'s.
    pub previous_signature_ok: Option<bool>,
}

/// A tiny axum server that records callbacks; answers 500 to the first `fail_first`.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub got: Arc<Mutex<Vec<Callback>>>,
    /// While set, callbacks are held unanswered (counted in `held`) until it is cleared.
    pub hold: Arc<AtomicBool>,
    pub held: Arc<AtomicU64>,
}

impl Webhook {
    pub async fn start(fail_first: u64) -> Webhook {
        Webhook::start_on(fail_first, None).await
    }

    /// A receiver over TLS with `tls` (its URL `https://127.0.0.1:PORT/hook`).
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Webhook {
        Webhook::start_on(0, Some(tls)).await
    }

    async fn start_on(fail_first: u64, tls: Option<Arc<rustls::ServerConfig>>) -> Webhook {
        use axum::http::HeaderMap;
        let got: Arc<Mutex<Vec<Callback>>> = Arc::default();
        let failures = Arc::new(AtomicU64::new(fail_first));
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let g = got.clone();
        let (h, hd) = (hold.clone(), held.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let g = g.clone();
                let failures = failures.clone();
                let (hold, held) = (h.clone(), hd.clone());
                async move {
                    if hold.load(Ordering::SeqCst) {
                        held.fetch_add(1, Ordering::SeqCst);
                        while hold.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    if failures.load(Ordering::SeqCst) > 0 {
                        failures.fetch_sub(1, Ordering::SeqCst);
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let ts = headers
                        .get("x-caas-timestamp")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let sig = headers
                        .get("x-caas-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let ok = !ts.is_empty()
                        && sig == caas_gateway::webhook::signature(SECRET, ts, &body);
                    let previous_signature_ok = headers.get("x-caas-signature-previous").map(|v| {
                        v.to_str().ok()
                            == Some(&caas_gateway::webhook::signature(OLD_SECRET, ts, &body))
                    });
                    g.lock().unwrap().push(Callback {
                        body: serde_json::from_str(&body).unwrap(),
                        signature_ok: ok,
                        previous_signature_ok,
                    });
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let url = match tls {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                tokio::spawn(async move {
                    axum::serve(TlsTestListener { tcp: l, acceptor }, app)
                        .await
                        .unwrap()
                });
                format!("https://{addr}/hook")
            }
            None => {
                tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
                format!("http://{addr}/hook")
            }
        };
        Webhook {
            url,
            got,
            hold,
            held,
        }
    }

    pub fn for_request(&self, id: &str) -> Vec<Callback> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.body["requestId"] == id)
            .cloned()
            .collect()
    }

    /// Waits (bounded) for the first callback of `id`.
    pub async fn wait(&self, id: &str, within: Duration) -> Callback {
        let end = Instant::now() + within;
        loop {
            if let Some(c) = self.for_request(id).into_iter().next() {
                return c;
            }
            assert!(
                Instant::now() < end,
                "no callback for {id} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A TLS listener for test servers: each handshake inline (one client at a time is enough
/// here), a failed one skipped.
pub struct TlsTestListener {
    pub tcp: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsTestListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

pub fn config(data: &Path, webhook: Option<&Webhook>) -> caas_gateway::Config {
    caas_gateway::Config {
        http: "127.0.0.1:0".parse().unwrap(),
        mqtt: Some("127.0.0.1:0".parse().unwrap()),
        data: data.to_path_buf(),
        api_token: TOKEN.into(),
        webhook_url: webhook.map(|w| w.url.clone()),
        webhook_secret: SECRET.into(),
        retry: caas_gateway::RetryPolicy {
            attempts: 2,
            attempt_timeout: Duration::from_secs(1),
            backoff: vec![Duration::from_millis(500)],
        },
        // As many shards as routers, as by default (each shard reads its router's reports);
        // several of each, so cars spread over them.
        shards: 2,
        broker_shards: 2,
        ..Default::default()
    }
}

/// The IoT API client.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// A client of the IoT API at `base` (e.g. `https://127.0.0.1:PORT`) with `http`.
    pub fn with_client(base: String, http: reqwest::Client) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api { base, http }
    }

    /// Sends `req` with the test token: the status and the JSON body (null if none).
    async fn answer(req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.bearer_auth(TOKEN).send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        Api::answer(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        Api::answer(req).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        Api::answer(self.http.delete(format!("{}{path}", self.base))).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Api::answer(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn register(&self, n: u32) {
        let (s, b) = self
            .post(
                "/vehicles",
                &json!({"vin": vin(n).to_string(), "publicKey": verifying_key_to_hex(&car_key(n).verifying_key()).as_str(), "platform": "mqb-evo", "firmwareVersion": "1.0.0"}),
            )
            .await;
        assert!(s == 201 || s == 200, "register: {s} {b}");
    }

    pub async fn activate(&self, n: u32, service: &str, flag: &str) -> String {
        let (s, b) = self
            .post("/ota/activate", &activation(n, service, flag))
            .await;
        assert_eq!(s, 202, "{b}");
        b["requestId"].as_str().unwrap().to_owned()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get_text("/metrics").await;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    }
}

pub fn activation(n: u32, service: &str, flag: &str) -> Value {
    json!({
        "vin": vin(n).to_string(),
        "serviceId": service,
        "configuration": {"featureFlags": [flag], "parameters": {"boostPercent": "15"}},
        "duration": {"type": "PERMANENT"}
    })
}

/// How a test car behaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Verify, apply, report.
    Obey,
    /// Receive and say nothing.
    Ignore,
}

/// What a test car saw.
#[derive(Default, Debug)]
pub struct Seen {
    pub set_states: Vec<Command>,
    pub queries: u32,
    pub applied_seq: u64,
    pub grants: Vec<String>,
}

/// A car on a real MQTT connection that verifies with the gateway key and signs reports.
pub struct TestCar {
    pub vin: Vin,
    pub seen: Arc<Mutex<Seen>>,
    pub ignore: Arc<AtomicBool>,
    /// While set (and not ignoring), the car applies commands but its reports are lost, so
    /// the gateway never learns what it applied.
    pub mute: Arc<AtomicBool>,
    pub client: AsyncClient,
    pub connected: Arc<AtomicBool>,
    pub errors: Arc<AtomicU64>,
    /// What the unit's agent persisted last (its flash): a unit started again with it
    /// ([`TestCar::start_with_flash`]) is the same unit rebooted.
    pub flash: Arc<Mutex<Option<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestCar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The test platform: these optional features, one base feature; anything else is unknown.
pub const CATALOG: caas_agent::Catalog<'static> = caas_agent::Catalog {
    optional: &[
        "power_boost",
        "snow_mode",
        "heated_seats",
        "highway_autopilot",
    ],
    base: &["base_abs"],
};

pub struct CarOpts {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub mode: Mode,
}

impl CarOpts {
    /// A car on the gateway's plain embedded listener.
    pub fn plain(gw: &caas_gateway::Gateway, mode: Mode) -> CarOpts {
        CarOpts {
            host: "127.0.0.1".into(),
            port: gw.mqtt_addr().expect("embedded broker").port(),
            tls: None,
            mode,
        }
    }
}

impl TestCar {
    pub async fn start(n: u32, gateway_key: &str, o: CarOpts) -> TestCar {
        TestCar::start_keyed(n, car_key(n), gateway_key, o).await
    }

    /// Car `n` signing its reports with `key` instead of its own [`car_key`]: a car whose
    /// telematics unit was replaced.
    pub async fn start_keyed(n: u32, key: SigningKey, gateway_key: &str, o: CarOpts) -> TestCar {
        TestCar::start_with_flash(n, key, gateway_key, o, None).await
    }

    /// Car `n` whose agent starts from `flash` (what an earlier run persisted), or empty.
    pub async fn start_with_flash(
        n: u32,
        key: SigningKey,
        gateway_key: &str,
        o: CarOpts,
        flash: Option<Vec<u8>>,
    ) -> TestCar {
        TestCar::start_on_platform(n, key, gateway_key, o, flash, CATALOG).await
    }

    /// Car `n` of a platform with these features (another model than [`CATALOG`]'s: its
    /// agent refuses a grant of a feature it lacks with `UNKNOWN_FEATURE`).
    pub async fn start_on_platform(
        n: u32,
        key: SigningKey,
        gateway_key: &str,
        o: CarOpts,
        flash: Option<Vec<u8>>,
        platform: caas_agent::Catalog<'static>,
    ) -> TestCar {
        let vin = vin(n);
        let gw = TrustedKey::new(verifying_key_from_hex(gateway_key).unwrap());
        let mut opts = MqttOptions::new(vin.to_string(), o.host.clone(), o.port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(true);
        opts.set_last_will(LastWill::new(
            topics::presence_topic(&vin).as_str(),
            topics::PRESENCE_OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(tls) = &o.tls {
            opts.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut el) = AsyncClient::new(opts, 64);
        let mut net = el.network_options();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let ignore = Arc::new(AtomicBool::new(o.mode == Mode::Ignore));
        let mute = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let flash = Arc::new(Mutex::new(flash));
        let persisted = flash.clone();
        let (s, ig, mu, c, cl, errs) = (
            seen.clone(),
            ignore.clone(),
            mute.clone(),
            connected.clone(),
            client.clone(),
            errors.clone(),
        );
        let mut config = caas_agent::Config {
            vin,
            trusted_keys: heapless::Vec::new(),
            device_key: key,
            platform,
            firmware_version: "1.0.0".parse().unwrap(),
            report_interval_secs: 0,
        };
        config.trusted_keys.push(gw).unwrap();
        let task = tokio::spawn(async move {
            let mut stored: Option<Vec<u8>> = persisted.lock().unwrap().clone();
            let mut agent = Box::new(caas_agent::Agent::new(
                config,
                stored.as_deref(),
                SystemTime_now(),
            ));
            agent.set_signal_strength(80);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.store(true, Ordering::SeqCst);
                        cl.subscribe(topics::command_topic(&vin).as_str(), QoS::AtLeastOnce)
                            .await
                            .unwrap();
                        cl.publish(
                            topics::presence_topic(&vin).as_str(),
                            QoS::AtLeastOnce,
                            true,
                            topics::PRESENCE_ONLINE,
                        )
                        .await
                        .unwrap();
                        agent.handle_connected(SystemTime_now());
                        for frame in drive(&mut agent, &mut stored) {
                            let _ = cl
                                .publish(
                                    topics::report_topic(&vin).as_str(),
                                    QoS::AtLeastOnce,
                                    false,
                                    frame,
                                )
                                .await;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic != topics::command_topic(&vin).as_str() {
                            continue;
                        }
                        // Observe what the gateway sent (the agent decides what to do with it).
                        if let Ok(cmd) = open_command(&p.payload, &[gw]) {
                            let mut seen = s.lock().unwrap();
                            match &cmd.body {
                                CommandBody::SetState(_) => seen.set_states.push(cmd.clone()),
                                CommandBody::QueryStatus { .. } => seen.queries += 1,
                            }
                        }
                        if ig.load(Ordering::SeqCst) {
                            continue;
                        }
                        agent.handle_frame(&p.payload, SystemTime_now());
                        let frames = drive(&mut agent, &mut stored);
                        persisted.lock().unwrap().clone_from(&stored);
                        {
                            let mut seen = s.lock().unwrap();
                            seen.applied_seq = agent.state().applied_seq;
                            seen.grants = agent
                                .active_grants()
                                .map(|g| g.service_id.to_string())
                                .collect();
                        }
                        if mu.load(Ordering::SeqCst) {
                            continue;
                        }
                        for frame in frames {
                            let _ = cl
                                .publish(
                                    topics::report_topic(&vin).as_str(),
                                    QoS::AtLeastOnce,
                                    false,
                                    frame,
                                )
                                .await;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        c.store(false, Ordering::SeqCst);
                        errs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        TestCar {
            vin,
            seen,
            ignore,
            mute,
            client,
            connected,
            errors,
            flash,
            task,
        }
    }

    /// Publishes presence `online` again on the live session (no reconnect, no resubscribe,
    /// so the broker redelivers no retained command): like a car whose session resumed.
    pub async fn announce_online(&self) {
        self.client
            .publish(
                topics::presence_topic(&self.vin).as_str(),
                QoS::AtLeastOnce,
                true,
                topics::PRESENCE_ONLINE,
            )
            .await
            .unwrap();
    }

    pub async fn wait_connected(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.connected.load(Ordering::SeqCst) {
            assert!(Instant::now() < end, "car {} did not connect", self.vin);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Carries out the agent's actions (persisting in memory); returns the reports to publish.
fn drive(
    agent: &mut caas_agent::Agent<caas_agent::Catalog<'static>>,
    stored: &mut Option<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(action) = agent.poll_action() {
        match action {
            caas_agent::Action::Persist(bytes) => *stored = Some(bytes.to_vec()),
            caas_agent::Action::Publish(frame) => out.push(frame.to_vec()),
            caas_agent::Action::SetFeature { .. } | caas_agent::Action::Ack => {}
        }
    }
    out
}

#[allow(non_snake_case)]
pub fn SystemTime_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn report(vin: &Vin, key: &SigningKey, applied: u64, outcome: Outcome) -> Vec<u8> {
    let r = Report {
        vin: *vin,
        applied_seq: applied,
        car_time: SystemTime_now(),
        outcome,
        active: heapless::Vec::new(),
        diagnostics: Diagnostics {
            firmware_version: "1.0.0".parse().unwrap(),
            error_codes: heapless::Vec::new(),
            signal_strength: 80,
        },
    };
    let mut buf = [0u8; MAX_REPORT_FRAME_SIZE];
    seal_report(&r, key, &mut buf).unwrap().to_vec()
}

/// Publishes a report of car `n`, signed with its key, on its report topic over `car`'s
/// connection: what the car would say, whatever its agent does.
pub async fn send_report(car: &TestCar, n: u32, applied: u64, outcome: Outcome) {
    send_report_signed(car, n, &car_key(n), applied, outcome).await;
}

/// Publishes a report of car `n` signed with `key`, over `car`'s connection.
pub async fn send_report_signed(
    car: &TestCar,
    n: u32,
    key: &SigningKey,
    applied: u64,
    outcome: Outcome,
) {
    car.client
        .publish(
            topics::report_topic(&vin(n)).as_str(),
            QoS::AtLeastOnce,
            false,
            report(&vin(n), key, applied, outcome),
        )
        .await
        .unwrap();
}

/// Car 1, made deaf, gets three new grants in one command, the oldest (warp) unknown to
/// it, and refuses that command without saying for which grant: (warp's, power boost's and
/// snow mode's request ids, the refused seq).
pub async fn three_grants_refused_together(api: &Api, car: &TestCar) -> ([String; 3], u64) {
    car.ignore.store(true, Ordering::SeqCst);
    let ids = [
        api.activate(1, "warp", "warp_drive").await,
        api.activate(1, "power-boost", "power_boost").await,
        api.activate(1, "snow-mode", "snow_mode").await,
    ];
    let refused = refuse_command_of(api, car, &ids[2]).await;
    (ids, refused)
}

/// Car 1 refuses, for an unknown feature, the command that carried request `id` (without
/// saying for which grant); that command's seq.
pub async fn refuse_command_of(api: &Api, car: &TestCar, id: &str) -> u64 {
    let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
    let refused = r["seq"].as_u64().unwrap();
    let applied = car.seen.lock().unwrap().applied_seq;
    let code = RejectCode::UnknownFeature;
    send_report(car, 1, applied, Outcome::Rejected { seq: refused, code }).await;
    refused
}

/// Car `n`'s history entries of `kind`, newest first.
pub async fn history_of(api: &Api, n: u32, kind: &str) -> Vec<Value> {
    let (s, h) = api
        .get(&format!("/vehicles/{}/history?limit=500", vin(n)))
        .await;
    assert_eq!(s, 200, "{h}");
    h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect()
}

/// Polls `GET /vehicles/{vin}/status` (bounded) until `pred` holds; returns that status.
pub async fn wait_status(
    api: &Api,
    n: u32,
    what: &str,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = std::time::Instant::now() + within;
    loop {
        let (s, st) = api.get(&format!("/vehicles/{}/status", vin(n))).await;
        assert_eq!(s, 200, "{st}");
        if pred(&st) {
            return st;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}; last status {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for each request's callback, which must say ACTIVATED.
pub async fn wait_activated(hook: &Webhook, ids: &[&String], within: Duration) {
    for id in ids {
        let cb = hook.wait(id, within).await;
        assert_eq!(cb.body["status"], "ACTIVATED", "{}", cb.body);
    }
}

/// The services the car holds now, sorted.
pub fn car_services(car: &TestCar) -> Vec<String> {
    let mut grants = car.seen.lock().unwrap().grants.clone();
    grants.sort();
    grants
}

/// The services a command grants, in its order (none for a status query).
pub fn granted(cmd: &Command) -> Vec<String> {
    match &cmd.body {
        CommandBody::SetState(d) => d.grants.iter().map(|g| g.service_id.to_string()).collect(),
        CommandBody::QueryStatus { .. } => Vec::new(),
    }
}

/// The commands setting a state that `car` saw, from the `from`th on: (seq, services granted).
pub fn states_seen(car: &TestCar, from: usize) -> Vec<(u64, Vec<String>)> {
    car.seen.lock().unwrap().set_states[from..]
        .iter()
        .map(|c| (c.seq, granted(c)))
        .collect()
}

/// Waits (bounded) until `car` has seen a state command whose seq `seq_ok` takes.
pub async fn wait_command(car: &TestCar, what: &str, seq_ok: impl Fn(u64) -> bool) {
    wait_until(what, Duration::from_secs(10), || {
        states_seen(car, 0).iter().any(|(seq, _)| seq_ok(*seq))
    })
    .await;
}

pub async fn wait_until<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port below Linux's ephemeral range (32768 and up), for a server restarted on the
/// same port: no other test's `free_port` and no outgoing connection can take it while the
/// server is down.
pub fn free_port_for_restarts() -> u16 {
    // Each call starts further on, so two tests of one process never get the same one.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::SeqCst);
    let start = ((u64::from(std::process::id()) + call * 97) % 10_000) as u16;
    (0..10_000u16)
        .map(|i| 20_000 + (start + i) % 10_000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 20000-29999")
}

/// Test PKI: a CA, a server certificate for 127.0.0.1/localhost, client certificates.
pub struct Pki {
    pub dir: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "caas test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_cert,
            ca_key,
        };
        pki.issue("server", &["127.0.0.1", "localhost"], "server", None, true);
        pki
    }

    /// Writes `{name}.pem` and `{name}.key`.
    pub fn issue(&self, name: &str, sans: &[&str], cn: &str, org: Option<&str>, server: bool) {
        self.issue_until(name, sans, cn, org, server, None);
    }

    /// [`Pki::issue`], valid until `not_after` when given (rcgen's far-off default if not).
    pub fn issue_until(
        &self,
        name: &str,
        sans: &[&str],
        cn: &str,
        org: Option<&str>,
        server: bool,
        not_after: Option<time::OffsetDateTime>,
    ) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if let Some(end) = not_after {
            p.not_before = end - time::Duration::days(400);
            p.not_after = end;
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    /// Writes `crl.pem`, the CA's revocation list number `number` naming the certificates
    /// `{name}.pem` of `revoked`, to a temporary name renamed into place (as an operator
    /// would), and returns its path.
    pub fn write_crl(&self, number: u64, revoked: &[&str]) -> PathBuf {
        use rcgen::{
            CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams,
            SerialNumber,
        };
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|name| {
                let pem = std::fs::read(self.dir.join(format!("{name}.pem"))).unwrap();
                let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
                let cert = pem.parse_x509().unwrap();
                RevokedCertParams {
                    serial_number: SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(30),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.ca_cert, &self.ca_key)
        .unwrap();
        let path = self.dir.join("crl.pem");
        let tmp = self.dir.join("crl.pem.tmp");
        std::fs::write(&tmp, crl.pem().unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    pub fn car(&self, n: u32) -> Arc<rustls::ClientConfig> {
        let v = vin(n).to_string();
        let name = format!("car{n}");
        self.issue(&name, &[], &v, Some(&v), false);
        self.client_config(&name)
    }

    /// The CA's certificate as the only root.
    pub fn roots(&self) -> rustls::RootCertStore {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut std::io::BufReader::new(
            std::fs::File::open(self.dir.join("ca.pem")).unwrap(),
        )) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    /// `{name}.pem` and `{name}.key`.
    fn pair(
        &self,
        name: &str,
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
            std::fs::File::open(self.dir.join(format!("{name}.pem"))).unwrap(),
        ))
        .map(|c| c.unwrap())
        .collect();
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
            std::fs::File::open(self.dir.join(format!("{name}.key"))).unwrap(),
        ))
        .unwrap()
        .unwrap();
        (certs, key)
    }

    pub fn client_config(&self, name: &str) -> Arc<rustls::ClientConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (certs, key) = self.pair(name);
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(self.roots())
                .with_client_auth_cert(certs, key)
                .unwrap(),
        )
    }

    /// The rustls server configuration of `{name}.pem` and `{name}.key` (no client auth).
    pub fn server_config(&self, name: &str) -> Arc<rustls::ServerConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (certs, key) = self.pair(name);
        Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        )
    }

    /// A client trusting the CA, with no certificate of its own.
    pub fn server_only_client(&self) -> Arc<rustls::ClientConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }

    /// The DER of `{name}.pem`'s (first) certificate.
    pub fn cert_der(&self, name: &str) -> Vec<u8> {
        self.pair(name).0[0].to_vec()
    }

    /// `c` with the embedded broker's mTLS listener on a free port, with this PKI's CA and
    /// server certificate.
    pub fn with_mqtts(&self, mut c: caas_gateway::Config) -> caas_gateway::Config {
        c.mqtts = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(self.tls_files());
        c
    }

    pub fn tls_files(&self) -> caas_gateway::TlsFiles {
        caas_gateway::TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server.key"),
        }
    }
}

/// Starts a gateway with an mTLS listener (`config` from [`Pki::with_mqtts`]): the gateway,
/// that listener's port and an API client.
pub async fn start_mqtts(config: caas_gateway::Config) -> (caas_gateway::Gateway, u16, Api) {
    let gw = caas_gateway::start(config).await.unwrap();
    let port = gw.mqtts_addr().unwrap().port();
    let api = Api::new(gw.http_addr());
    (gw, port, api)
}

/// The DER of the leaf certificate a TLS server on `port` presents to a new connection made
/// with `client`.
pub async fn presented_cert(port: u16, client: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(client);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("handshake within 10 s")
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Renews `{name}.pem`/`{name}.key` with a new server certificate for 127.0.0.1 and
/// localhost as an operator would: the new pair written beside, then renamed into place, key
/// first, a poll interval (2 s) apart, so the gateway also sees the mismatched pair between.
/// Returns the new certificate's DER.
pub async fn renew_server_cert(pki: &Pki, name: &str) -> Vec<u8> {
    pki.issue("renewed", &["127.0.0.1", "localhost"], "server", None, true);
    let renewed = pki.cert_der("renewed");
    std::fs::rename(
        pki.dir.join("renewed.key"),
        pki.dir.join(format!("{name}.key")),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::rename(
        pki.dir.join("renewed.pem"),
        pki.dir.join(format!("{name}.pem")),
    )
    .unwrap();
    renewed
}

/// Waits (15 s at most) until new connections on `port` are shown `renewed`; until then
/// they may only be shown `old`.
pub async fn wait_presented(
    port: u16,
    client: Arc<rustls::ClientConfig>,
    old: &[u8],
    renewed: &[u8],
) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let now = presented_cert(port, client.clone()).await;
        if now == renewed {
            return;
        }
        assert_eq!(now, old, "only the old or the renewed certificate");
        assert!(Instant::now() < end, "the renewed certificate never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The mosquitto binary, if installed.
pub fn mosquitto_bin() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/local/bin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// False (and says the test is skipped) when Mosquitto is not installed.
pub fn mosquitto_or_skip() -> bool {
    if mosquitto_bin().is_none() {
        eprintln!(
            "\n*** SKIPPED: mosquitto is not installed (scripts/install-deps.sh installs it) ***\n"
        );
        return false;
    }
    true
}

/// Mosquitto with the shipped mTLS configuration (`gateway/mosquitto/`) on `port`, its
/// certificates (`ca.pem`, `server.pem`, `server.key`, `crl.pem`) from `certs`.
pub async fn start_shipped_mosquitto(certs: &Path, port: u16) -> Mosquitto {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("mosquitto");
    let conf = std::fs::read_to_string(shipped.join("mosquitto.conf"))
        .unwrap()
        .replace("@PORT@", &port.to_string())
        .replace("@CERTS@", certs.to_str().unwrap())
        .replace("@ACL@", shipped.join("acl").to_str().unwrap());
    let conf_path = certs.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).unwrap();
    start_mosquitto(&conf_path, port).await
}

/// A mosquitto process killed on drop.
pub struct Mosquitto(pub std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn start_mosquitto(conf: &Path, port: u16) -> Mosquitto {
    let bin = mosquitto_bin().unwrap();
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let m = Mosquitto(child);
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "mosquitto did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m
}

/// A POST with an `Idempotency-Key`: status, body and whether it says it is a repeat.
pub async fn post_keyed(api: &Api, path: &str, key: &str, body: &Value) -> (u16, Value, bool) {
    let r = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null), replayed)
}

/// Registers car `n`, starts it obeying its commands on the plain listener, and waits until
/// it is connected.
pub async fn obeying_car(gw: &caas_gateway::Gateway, api: &Api, n: u32) -> TestCar {
    api.register(n).await;
    let car = TestCar::start(n, gw.public_key_hex(), CarOpts::plain(gw, Mode::Obey)).await;
    car.wait_connected().await;
    car
}

/// The services of a car's status (`GET /vehicles/{vin}/status`) with their state, sorted:
/// (serviceId, status).
pub fn services(status: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = status["activeServices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["serviceId"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}
