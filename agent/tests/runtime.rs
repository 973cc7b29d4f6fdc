//! The `caas-agent` binary against a real broker (rumqttd, embedded in the test on a free
//! port), real key files, a real sled store, real processes and the diagnostic endpoint; and
//! (`redelivery_backlog`) against a scripted MQTT peer that redelivers a backlog.
#![cfg(feature = "std")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use caas_protocol::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const VIN: &str = "WVWZZZ1JZXW000001";
/// Upper bound for anything to happen; tests never assert durations.
const PATIENCE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker() -> u16 {
    start_broker_with_tls(None).0
}

/// A broker with a plain listener and, given `(ca, cert, key)` PEM paths, a TLS listener
/// that requires client certificates (their O is the tenant: `/tenants/{O}/...` only).
/// Returns (plain port, TLS port).
fn start_broker_with_tls(tls: Option<(&Path, &Path, &Path)>) -> (u16, u16) {
    let port = free_port();
    let tls_port = free_port();
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: 64 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut servers = std::collections::HashMap::new();
    if let Some((ca, cert, key)) = tls {
        let s = |p: &Path| p.display().to_string();
        servers.insert(
            "tls".to_string(),
            rumqttd::ServerSettings {
                name: "tls".into(),
                listen: format!("127.0.0.1:{tls_port}").parse().unwrap(),
                tls: Some(rumqttd::TlsConfig::Rustls {
                    capath: Some(s(ca)),
                    certpath: s(cert),
                    keypath: s(key),
                }),
                next_connection_delay_ms: 1,
                connections: connections.clone(),
            },
        );
    }
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    servers.insert("v4".to_string(), server);
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(servers),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    let deadline = Instant::now() + PATIENCE;
    let ports = if tls.is_some() {
        vec![port, tls_port]
    } else {
        vec![port]
    };
    for p in ports {
        while TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (port, tls_port)
}

fn vin() -> Vin {
    VIN.parse().unwrap()
}

/// A car's files: keys, data directory, hook log.
struct CarFiles {
    dir: tempfile::TempDir,
    gateway: SigningKey,
    device_pub: VerifyingKey,
    diag_port: u16,
}

impl CarFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let gateway = SigningKey::from_bytes(&[11; 32]);
        let device = SigningKey::from_bytes(&[12; 32]);
        files::write_verifying_key(&dir.path().join("gateway.pub"), &gateway.verifying_key())
            .unwrap();
        files::write_signing_key(&dir.path().join("device.key"), &device).unwrap();
        let hook = dir.path().join("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n",
                dir.path().join("hook.log").display()
            ),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        CarFiles {
            dir,
            gateway,
            device_pub: device.verifying_key(),
            diag_port: free_port(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn args(&self, broker_port: u16) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            "run".into(),
            "--vin".into(),
            VIN.into(),
            "--broker".into(),
            format!("mqtt://127.0.0.1:{broker_port}"),
            "--gateway-key".into(),
            p("gateway.pub"),
            "--device-key".into(),
            p("device.key"),
            "--data".into(),
            p("data"),
            "--hook".into(),
            p("hook.sh"),
            "--diag".into(),
            format!("127.0.0.1:{}", self.diag_port),
        ]
    }

    fn spawn(&self, broker_port: u16, env: &[(&str, &str)]) -> Child {
        self.spawn_with(broker_port, &[], env)
    }

    fn spawn_with(&self, broker_port: u16, extra: &[String], env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("agent.log"))
            .unwrap();
        let mut cmd = Process::new(env!("CARGO_BIN_EXE_caas-agent"));
        cmd.args(self.args(broker_port))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }

    fn hook_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("hook.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// `GET /status` from the diagnostic endpoint, waiting until it answers.
    fn status(&self) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.diag_port)) {
                s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut resp = String::new();
                s.read_to_string(&mut resp).unwrap();
                assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
                assert!(resp.contains("Content-Type: application/json"));
                let body = resp.split("\r\n\r\n").nth(1).unwrap();
                return serde_json::from_str(body).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "diagnostic endpoint never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The gateway's side of the broker: publishes commands, collects reports and presence.
struct Gateway {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    car_key: TrustedKey,
}

#[allow(clippy::large_enum_variant)] // test-only, short-lived
enum Seen {
    Report(Report),
    Presence(String),
}

impl Gateway {
    async fn connect(port: u16, car_key: VerifyingKey) -> Self {
        let mut opts = MqttOptions::new(format!("test-gateway-{port}"), "127.0.0.1", port);
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        client
            .subscribe(topics::ALL_REPORTS, QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe(topics::ALL_PRESENCE, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Gateway {
            client,
            rx,
            car_key: TrustedKey::new(car_key),
        }
    }

    async fn next(&mut self) -> Seen {
        let (topic, payload) = tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("nothing arrived from the car in time")
            .expect("gateway connection task ended");
        match topics::parse_topic(&topic) {
            Some((v, topics::TopicKind::Report)) => {
                assert_eq!(v, vin());
                let report = open_report(&payload, &self.car_key)
                    .expect("report verifies with the car's public key");
                assert_eq!(report.vin, vin());
                Seen::Report(report)
            }
            Some((_, topics::TopicKind::Presence)) => {
                Seen::Presence(String::from_utf8(payload).unwrap())
            }
            _ => panic!("unexpected topic {topic}"),
        }
    }

    /// Reports until one has the wanted outcome; returns every report seen, that one last.
    async fn reports_until(&mut self, want: impl Fn(&Outcome) -> bool) -> Vec<Report> {
        let mut seen = Vec::new();
        loop {
            if let Seen::Report(r) = self.next().await {
                let done = want(&r.outcome);
                seen.push(r);
                if done {
                    return seen;
                }
            }
        }
    }

    async fn presence_until(&mut self, want: &str) {
        loop {
            if let Seen::Presence(p) = self.next().await {
                if p == want {
                    return;
                }
            }
        }
    }

    async fn send(&self, frame: Vec<u8>) {
        self.client
            .publish(
                topics::command_topic(&vin()).as_str(),
                QoS::AtLeastOnce,
                false,
                frame,
            )
            .await
            .unwrap();
    }
}

fn boost(seq: u64, vin: Vin) -> Command {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    boost_until(seq, vin, now + 86_400)
}

fn boost_until(seq: u64, vin: Vin, ends_at: u64) -> Command {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut g = Grant::new("power-boost".parse().unwrap());
    g.flags.push("power_boost".parse().unwrap()).unwrap();
    g.params
        .push(Param {
            key: "boostPercent".parse().unwrap(),
            value: "15".parse().unwrap(),
        })
        .unwrap();
    g.ends_at = Some(ends_at);
    let mut desired = DesiredState::default();
    desired.grants.push(g).unwrap();
    Command {
        vin,
        seq,
        issued_at: now,
        not_after: now + 600,
        body: CommandBody::SetState(desired),
    }
}

fn query(nonce: u64) -> Command {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Command {
        vin: vin(),
        seq: 0,
        issued_at: now,
        not_after: now + 600,
        body: CommandBody::QueryStatus { nonce },
    }
}

fn seal(cmd: &Command, key: &SigningKey) -> Vec<u8> {
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    seal_command(cmd, key, &mut buf).unwrap().to_vec()
}

fn kill9(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_command_is_applied_acknowledged_once_and_reported() {
    let port = start_broker();
    let car = CarFiles::new();
    let mut gw = Gateway::connect(port, car.device_pub).await;
    let mut agent = car.spawn(port, &[]);
    gw.presence_until("online").await;
    gw.reports_until(|o| matches!(o, Outcome::Periodic { .. }))
        .await;

    gw.send(seal(&boost(1, vin()), &car.gateway)).await;
    let reports = gw
        .reports_until(|o| *o == Outcome::Applied { seq: 1 })
        .await;
    let applied = reports.last().unwrap();
    assert_eq!(applied.applied_seq, 1);
    assert_eq!(applied.active.len(), 1);
    assert_eq!(applied.active[0].service_id.as_str(), "power-boost");
    assert_eq!(car.hook_lines(), vec!["power_boost on boostPercent=15"]);

    let status = car.status();
    let mut keys: Vec<&str> = status
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "activeGrants",
            "appliedSeq",
            "carTime",
            "connectivity",
            "errorCodes",
            "firmwareVersion",
            "lastRejection",
            "vin"
        ]
    );
    assert_eq!(status["vin"], VIN);
    assert_eq!(status["appliedSeq"], 1);
    assert_eq!(status["connectivity"], "ONLINE");
    assert_eq!(status["lastRejection"], serde_json::Value::Null);
    assert_eq!(status["errorCodes"], serde_json::json!([]));
    assert!(status["carTime"].as_str().unwrap().ends_with('Z'));
    let grant = &status["activeGrants"][0];
    assert_eq!(grant["serviceId"], "power-boost");
    assert_eq!(grant["flags"], serde_json::json!(["power_boost"]));
    assert_eq!(
        grant["parameters"],
        serde_json::json!({"boostPercent": "15"})
    );
    assert!(grant["endsAt"].as_str().unwrap().ends_with('Z'));

    // Kill -9: the broker publishes the last will. Restart on the same persistent session:
    // had the command not been acknowledged, the broker would redeliver it now, before the
    // query below, and the car would report `Applied` for it again.
    kill9(&mut agent);
    gw.presence_until("offline").await;
    let mut agent = car.spawn(port, &[]);
    gw.presence_until("online").await;
    gw.send(seal(&query(9), &car.gateway)).await;
    let reports = gw
        .reports_until(|o| *o == Outcome::Status { nonce: 9 })
        .await;
    assert!(
        reports
            .iter()
            .all(|r| !matches!(r.outcome, Outcome::Applied { .. })),
        "the command was redelivered, so it had not been acknowledged: {reports:?}"
    );
    assert_eq!(
        reports.last().unwrap().applied_seq,
        1,
        "the state survived the kill"
    );
    kill9(&mut agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_replayed_and_other_car_commands_are_refused_with_their_code() {
    let port = start_broker();
    let car = CarFiles::new();
    let mut gw = Gateway::connect(port, car.device_pub).await;
    let mut agent = car.spawn(port, &[]);
    gw.presence_until("online").await;
    gw.send(seal(&boost(1, vin()), &car.gateway)).await;
    gw.reports_until(|o| *o == Outcome::Applied { seq: 1 })
        .await;
    gw.send(seal(&boost(2, vin()), &car.gateway)).await;
    gw.reports_until(|o| *o == Outcome::Applied { seq: 2 })
        .await;

    let mut tampered = seal(&boost(3, vin()), &car.gateway);
    tampered[FRAME_HEADER_SIZE + 20] ^= 1;
    gw.send(tampered).await;
    let r = gw
        .reports_until(|o| matches!(o, Outcome::Rejected { .. }))
        .await;
    assert_eq!(
        r.last().unwrap().outcome,
        Outcome::Rejected {
            seq: 0,
            code: RejectCode::BadSignature
        }
    );

    gw.send(seal(&boost(1, vin()), &car.gateway)).await;
    let r = gw
        .reports_until(|o| matches!(o, Outcome::Rejected { .. }))
        .await;
    assert_eq!(
        r.last().unwrap().outcome,
        Outcome::Rejected {
            seq: 1,
            code: RejectCode::Replay
        }
    );

    gw.send(seal(
        &boost(3, "WVWZZZ1JZXW000002".parse().unwrap()),
        &car.gateway,
    ))
    .await;
    let r = gw
        .reports_until(|o| matches!(o, Outcome::Rejected { .. }))
        .await;
    assert_eq!(
        r.last().unwrap().outcome,
        Outcome::Rejected {
            seq: 3,
            code: RejectCode::WrongVin
        }
    );

    let stranger = SigningKey::from_bytes(&[99; 32]);
    gw.send(seal(&boost(3, vin()), &stranger)).await;
    let r = gw
        .reports_until(|o| matches!(o, Outcome::Rejected { .. }))
        .await;
    assert_eq!(
        r.last().unwrap().outcome,
        Outcome::Rejected {
            seq: 0,
            code: RejectCode::UnknownKey
        }
    );
    assert_eq!(r.last().unwrap().applied_seq, 2, "nothing changed");

    let status = car.status();
    assert_eq!(status["appliedSeq"], 2);
    assert_eq!(
        status["lastRejection"],
        serde_json::json!({"seq": 0, "code": "UNKNOWN_KEY"})
    );
    // Two applied commands switched the feature on twice (the second refreshes its
    // parameters); the four refusals switched nothing.
    assert_eq!(car.hook_lines().len(), 2);
    let log = car.log();
    assert!(
        log.contains("command refused") && log.contains("code=REPLAY"),
        "{log}"
    );
    assert!(log.contains("command applied"), "{log}");
    kill9(&mut agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_receive_and_persist_leaves_the_command_unacknowledged() {
    let port = start_broker();
    let car = CarFiles::new();
    let mut gw = Gateway::connect(port, car.device_pub).await;
    let mut agent = car.spawn(port, &[("CAAS_AGENT_CRASH_BEFORE_PERSIST", "1")]);
    gw.presence_until("online").await;
    gw.send(seal(&boost(1, vin()), &car.gateway)).await;
    let status = wait_exit(&mut agent);
    assert!(!status.success(), "the test hook aborts the agent");
    gw.presence_until("offline").await;
    assert!(
        car.hook_lines().is_empty(),
        "nothing was applied before the crash"
    );

    // Restarted: the broker redelivers the unacknowledged command, which is applied once.
    let mut agent = car.spawn(port, &[]);
    let reports = gw
        .reports_until(|o| *o == Outcome::Applied { seq: 1 })
        .await;
    assert!(reports.iter().all(|r| r.applied_seq <= 1));
    gw.send(seal(&query(5), &car.gateway)).await;
    let reports = gw
        .reports_until(|o| *o == Outcome::Status { nonce: 5 })
        .await;
    assert!(
        reports
            .iter()
            .all(|r| !matches!(r.outcome, Outcome::Applied { .. })),
        "{reports:?}"
    );
    assert_eq!(
        car.hook_lines(),
        vec!["power_boost on boostPercent=15"],
        "applied exactly once"
    );
    assert_eq!(car.status()["appliedSeq"], 1);
    kill9(&mut agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_with_backoff_and_the_car_reports_offline() {
    let car = CarFiles::new();
    let port = free_port(); // nothing listens here
    let mut agent = car.spawn(port, &[]);
    let deadline = Instant::now() + PATIENCE;
    while car.log().matches("broker unreachable; retrying").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "no retries logged:\n{}",
            car.log()
        );
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent gave up:\n{}",
            car.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(car.log().contains("retry_in_ms"));
    assert_eq!(car.status()["connectivity"], "OFFLINE");
    let raw = |req: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", car.diag_port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    };
    assert!(raw("GET /secrets HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    assert!(raw("POST /status HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
    kill9(&mut agent);
}

fn run_expecting_error(args: &[String]) -> String {
    let out = Process::new(env!("CARGO_BIN_EXE_caas-agent"))
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    stderr
}

#[test]
fn bad_configuration_gets_one_clear_line_and_a_nonzero_exit() {
    let car = CarFiles::new();
    let mut args = car.args(1883);
    let i = args.iter().position(|a| a == "--device-key").unwrap();
    args[i + 1] = car.path("missing.key").display().to_string();
    let err = run_expecting_error(&args);
    assert!(
        err.starts_with("caas-agent: --device-key ") && err.contains("missing.key"),
        "{err}"
    );

    let mut args = car.args(1883);
    args[2] = "WVWZZZ1JZXW00000I".into();
    let err = run_expecting_error(&args);
    assert!(
        err.contains("--vin") && err.contains("not allowed in a VIN"),
        "{err}"
    );

    let mut args = car.args(1883);
    args[4] = "http://127.0.0.1:1883".into();
    assert!(run_expecting_error(&args).contains("mqtt://HOST:PORT"));

    let mut args = car.args(1883);
    let i = args.iter().position(|a| a == "--diag").unwrap();
    args[i + 1] = "0.0.0.0:7070".into();
    assert!(run_expecting_error(&args).contains("loopback"));
}

#[test]
fn options_come_from_a_config_file_and_the_environment() {
    let car = CarFiles::new();
    let p = |n: &str| car.path(n).display().to_string();
    std::fs::write(
        car.path("agent.toml"),
        format!(
            "vin = \"{VIN}\"\nbroker = \"mqtt://127.0.0.1:1\"\ngateway-key = [\"gateway.pub\"]\ndata = \"data\"\n"
        ),
    )
    .unwrap();
    // The VIN, broker, gateway key and data directory from the file, the device key and a
    // non-loopback diagnostic address from the environment: the refusal of the latter
    // proves the environment was read, the data directory proves the file was.
    let out = Process::new(env!("CARGO_BIN_EXE_caas-agent"))
        .args(["run", "--config", &p("agent.toml")])
        .env("CAAS_AGENT_DEVICE_KEY", p("device.key"))
        .env("CAAS_AGENT_DIAG", "192.0.2.1:7070")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("--diag 192.0.2.1:7070") && stderr.contains("loopback"),
        "{stderr}"
    );
    assert!(
        Path::new(&p("data")).is_dir(),
        "relative paths in the file are relative to it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_trusted_reports_are_periodic_and_a_grant_ends_on_time() {
    let port = start_broker();
    let car = CarFiles::new();
    let next = SigningKey::from_bytes(&[13; 32]);
    files::write_verifying_key(&car.path("gateway-next.pub"), &next.verifying_key()).unwrap();
    let mut gw = Gateway::connect(port, car.device_pub).await;
    let extra = [
        "--gateway-key".into(),
        car.path("gateway-next.pub").display().to_string(),
    ];
    let extra = [&extra[..], &["--report-interval".into(), "1".into()]].concat();
    let mut agent = car.spawn_with(port, &extra, &[]);
    gw.presence_until("online").await;

    // Signed with the next key of a rotation: trusted, since both keys are configured.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    gw.send(seal(&boost_until(1, vin(), now + 2), &next)).await;
    gw.reports_until(|o| *o == Outcome::Applied { seq: 1 })
        .await;
    gw.send(seal(&boost(2, vin()), &car.gateway)).await;
    gw.reports_until(|o| *o == Outcome::Applied { seq: 2 })
        .await;
    gw.send(seal(&boost_until(3, vin(), now + 2), &next)).await;
    gw.reports_until(|o| *o == Outcome::Applied { seq: 3 })
        .await;

    // Periodic reports flow, each counting the reports before it.
    let reports = gw
        .reports_until(|o| matches!(o, Outcome::Periodic { counter } if *counter >= 6))
        .await;
    let counters: Vec<u64> = reports
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Periodic { counter } => Some(counter),
            _ => None,
        })
        .collect();
    assert!(counters.windows(2).all(|w| w[0] < w[1]), "{counters:?}");
    // The temporary grant ends by the car's own timer: the hook switches it off and the
    // reports stop listing it.
    let deadline = Instant::now() + PATIENCE;
    while !car.hook_lines().contains(&"power_boost off".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the grant never ended: {:?}",
            car.hook_lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..30 {
        let r = gw
            .reports_until(|o| matches!(o, Outcome::Periodic { .. }))
            .await;
        if r.last().unwrap().active.is_empty() {
            break;
        }
    }
    let r = gw
        .reports_until(|o| matches!(o, Outcome::Periodic { .. }))
        .await;
    assert!(r.last().unwrap().active.is_empty(), "{r:?}");
    assert!(r.last().unwrap().car_time >= now + 2);
    assert_eq!(car.status()["activeGrants"], serde_json::json!([]));
    assert_eq!(car.status()["appliedSeq"], 3);
    kill9(&mut agent);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate for the car
/// (CN = O = VIN, the tenant rumqttd enforces), written as PEM files into `dir`.
fn write_test_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "caas test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    let car_key = KeyPair::generate().unwrap();
    let mut car = CertificateParams::new(Vec::<String>::new()).unwrap();
    car.distinguished_name.push(DnType::CommonName, VIN);
    car.distinguished_name.push(DnType::OrganizationName, VIN);
    car.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let car_cert = car.signed_by(&car_key, &ca_cert, &ca_key).unwrap();
    for (name, pem) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert.pem()),
        ("server.key", server_key.serialize_pem()),
        ("car.pem", car_cert.pem()),
        ("car-tls.key", car_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_speaks_mqtts_with_its_client_certificate() {
    caas_agent::runtime::install_crypto_provider();
    let car = CarFiles::new();
    write_test_pki(car.dir.path());
    let (plain, tls) = start_broker_with_tls(Some((
        &car.path("ca.pem"),
        &car.path("server.pem"),
        &car.path("server.key"),
    )));
    let mut gw = Gateway::connect(plain, car.device_pub).await;
    let mut args = car.args(tls);
    args[4] = format!("mqtts://127.0.0.1:{tls}");
    for (flag, file) in [
        ("--ca", "ca.pem"),
        ("--cert", "car.pem"),
        ("--key", "car-tls.key"),
    ] {
        args.push(flag.into());
        args.push(car.path(file).display().to_string());
    }
    let log = std::fs::File::create(car.path("agent.log")).unwrap();
    let mut agent = Process::new(env!("CARGO_BIN_EXE_caas-agent"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    gw.presence_until("online").await;
    gw.send(seal(&boost(1, vin()), &car.gateway)).await;
    gw.reports_until(|o| *o == Outcome::Applied { seq: 1 })
        .await;
    assert_eq!(car.status()["connectivity"], "ONLINE");
    kill9(&mut agent);

    // Without its client certificate the car cannot get in.
    let args = args[..args.len() - 4].to_vec();
    let log = std::fs::File::create(car.path("agent-nocert.log")).unwrap();
    let mut agent = Process::new(env!("CARGO_BIN_EXE_caas-agent"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = std::fs::read_to_string(car.path("agent-nocert.log")).unwrap_or_default();
        if log.matches("broker unreachable; retrying").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill9(&mut agent);
}

mod redelivery_backlog {
    //! The agent handed a backlog of redelivered QoS 1 commands acknowledges every one, in
    //! order.
    //!
    //! The broker here is a scripted MQTT 3.1.1 peer on a local socket, so the run is the same
    //! every time; the agent under test is the real `caas-agent` binary (its runtime, rumqttc
    //! client and sled store). The first connection takes the agent's SUBSCRIBE and its `online`
    //! publish and acknowledges neither, then drops; so the agent comes back with publishes of
    //! its own to resend (rumqttc's `pending`). The second connection resumes the session and
    //! sends, in one write with the CONNACK, a backlog of [`BACKLOG`] validly signed commands
    //! (flagged as redeliveries), more than the agent's request channel holds
    //! ([`caas_agent::runtime::REQUEST_QUEUE`]), as Mosquitto does after a restart. The test
    //! then waits for a PUBACK for each, in the order they were sent.
    //!
    //! This guards against what the fleet simulator's car had (fixed in the simulator in
    //! 57fbbea): acknowledgements queued with `try_ack` into the client's bounded channel were
    //! dropped when it was full, while the event loop was busy handing out the backlog, so the
    //! broker kept the commands and resent them at every reconnect, for ever.
    //!
    //! The packets are encoded and decoded by hand (only the few this exchange needs): the
    //! agent crate does not depend on `bytes`, which rumqttc's own codec takes.

    use super::{boost, seal, CarFiles, VIN};
    use std::time::{Duration, Instant};

    use caas_agent::runtime::REQUEST_QUEUE;
    use caas_protocol::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Commands in the redelivered backlog: more than twice the client's request channel.
    const BACKLOG: u16 = 150;
    /// Longest the test waits for one step.
    const STEP: Duration = Duration::from_secs(30);

    /// The packets of MQTT 3.1.1 this exchange uses, as the agent sends them.
    #[derive(Debug)]
    enum Packet {
        Connect { clean_session: bool },
        Publish { qos: u8, pkid: u16 },
        PubAck { pkid: u16 },
        Subscribe { pkid: u16 },
        PingReq,
        Other,
    }

    fn pkid_at(body: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([body[at], body[at + 1]])
    }

    /// Decodes one packet from the front of `buf`, removing it; `None` when incomplete.
    fn decode(buf: &mut Vec<u8>) -> Option<Packet> {
        let first = *buf.first()?;
        let (mut len, mut shift, mut at) = (0usize, 0u32, 1usize);
        loop {
            let b = *buf.get(at)?;
            len |= usize::from(b & 0x7f) << shift;
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            assert!(shift <= 21, "malformed remaining length");
        }
        if buf.len() < at + len {
            return None;
        }
        let body: Vec<u8> = buf[at..at + len].to_vec();
        buf.drain(..at + len);
        Some(match first >> 4 {
            1 => {
                // Protocol name (length-prefixed), level, then the connect flags.
                let name = usize::from(pkid_at(&body, 0));
                Packet::Connect {
                    clean_session: body[2 + name + 1] & 0x02 != 0,
                }
            }
            3 => {
                let qos = (first >> 1) & 0x03;
                let topic = usize::from(pkid_at(&body, 0));
                let pkid = if qos > 0 {
                    pkid_at(&body, 2 + topic)
                } else {
                    0
                };
                Packet::Publish { qos, pkid }
            }
            4 => Packet::PubAck {
                pkid: pkid_at(&body, 0),
            },
            8 => Packet::Subscribe {
                pkid: pkid_at(&body, 0),
            },
            12 => Packet::PingReq,
            _ => Packet::Other,
        })
    }

    fn remaining_length(out: &mut Vec<u8>, mut len: usize) {
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.push(b);
            if len == 0 {
                return;
            }
        }
    }

    fn connack(session_present: bool) -> Vec<u8> {
        vec![0x20, 2, u8::from(session_present), 0]
    }

    fn puback(pkid: u16) -> Vec<u8> {
        let [hi, lo] = pkid.to_be_bytes();
        vec![0x40, 2, hi, lo]
    }

    fn suback(pkid: u16) -> Vec<u8> {
        let [hi, lo] = pkid.to_be_bytes();
        vec![0x90, 3, hi, lo, 1]
    }

    /// A QoS 1 publish flagged as a redelivery (DUP).
    fn redelivered_publish(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(topic.len()).unwrap().to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload);
        let mut out = vec![0x30 | 0x08 | 0x02];
        remaining_length(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }

    /// One connection of the scripted broker.
    struct Peer {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Peer {
        /// The next packet from the agent; `None` when it closed the connection or `until` passed.
        async fn next(&mut self, until: Instant) -> Option<Packet> {
            loop {
                if let Some(p) = decode(&mut self.buf) {
                    return Some(p);
                }
                let left = until.checked_duration_since(Instant::now())?;
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                    _ => return None,
                }
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.expect("write to agent");
        }
    }

    async fn accept(listener: &TcpListener) -> Peer {
        let (stream, _) = tokio::time::timeout(STEP, listener.accept())
            .await
            .expect("agent connects in time")
            .expect("accept");
        let mut peer = Peer {
            stream,
            buf: Vec::new(),
        };
        match peer.next(Instant::now() + STEP).await {
            Some(Packet::Connect { clean_session }) => {
                assert!(!clean_session, "the agent keeps its session")
            }
            other => panic!("expected CONNECT, got {other:?}"),
        }
        peer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivered_backlog_is_acknowledged_in_full_and_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let car = CarFiles::new();
        let mut agent = car.spawn(port, &[]);
        let vin: Vin = VIN.parse().unwrap();
        let command_topic = topics::command_topic(&vin).as_str().to_string();

        // First connection: take the agent's SUBSCRIBE and a publish of its own, acknowledge
        // nothing, drop the connection.
        let mut first = accept(&listener).await;
        first.send(&connack(false)).await;
        let until = Instant::now() + STEP;
        let (mut subscribed, mut published) = (false, false);
        while !(subscribed && published) {
            match first.next(until).await {
                Some(Packet::Subscribe { .. }) => subscribed = true,
                Some(Packet::Publish { qos: 1, .. }) => published = true,
                Some(_) => {}
                None => panic!(
                    "agent sent no SUBSCRIBE and publish on its first connection:\n{}",
                    car.log()
                ),
            }
        }
        drop(first);

        // Second connection: the session is resumed and the backlog comes at once. Each
        // command is new (seqs 1..=BACKLOG), so each is persisted, applied, acknowledged and
        // reported: an ack and a report per command.
        let mut second = accept(&listener).await;
        let mut burst = connack(true);
        for pkid in 1..=BACKLOG {
            let frame = seal(&boost(u64::from(pkid), super::vin()), &car.gateway);
            burst.extend(redelivered_publish(&command_topic, pkid, &frame));
        }
        assert!(usize::from(BACKLOG) > 2 * REQUEST_QUEUE);
        second.send(&burst).await;

        // Every command is acknowledged, in the order sent; the agent's own publishes and
        // subscriptions are acknowledged as a broker would.
        let mut acked = Vec::new();
        let until = Instant::now() + STEP;
        while acked.len() < usize::from(BACKLOG) {
            match second.next(until).await {
                Some(Packet::PubAck { pkid }) => acked.push(pkid),
                Some(Packet::Publish { qos: 1, pkid }) => second.send(&puback(pkid)).await,
                Some(Packet::Subscribe { pkid }) => second.send(&suback(pkid)).await,
                Some(Packet::PingReq) => second.send(&[0xd0, 0]).await,
                Some(_) => {}
                None => break,
            }
        }
        agent.kill().unwrap();
        agent.wait().unwrap();
        let log = car.log();
        let expected: Vec<u16> = (1..=BACKLOG).collect();
        assert_eq!(
            acked,
            expected,
            "PUBACKs for the backlog ({} acks could not be queued)",
            log.matches("could not queue the ack").count()
        );
    }
}
