//! The broker side: a kill -9 of the gateway process, Mosquitto as the external broker
//! (plain, and mTLS with the shipped configuration), per-car isolation on the embedded
//! broker's mTLS listener, an idle TCP socket that must not stall other cars, and the
//! process keeping its heap reserve resident.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_gateway(data: &Path, http: u16, mqtt: u16, hook: &Webhook) -> Proc {
    spawn_gateway_with(data, http, mqtt, hook, &[], &[])
}

fn spawn_gateway_with(
    data: &Path,
    http: u16,
    mqtt: u16,
    hook: &Webhook,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_caas-gateway"))
        .args([
            "serve",
            "--http",
            &format!("127.0.0.1:{http}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
        ])
        .arg("--data")
        .arg(data)
        .args([
            "--api-token",
            TOKEN,
            "--webhook-url",
            &hook.url,
            "--webhook-secret",
            SECRET,
        ])
        .args([
            "--attempts",
            "4",
            "--attempt-timeout",
            "2s",
            "--backoff",
            "1s,1s,1s",
        ])
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

async fn wait_healthy(http: u16) {
    let end = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{http}/healthz");
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < end, "gateway did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_survives_kill_9_after_its_2xx() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (http, mqtt) = (free_port(), free_port());
    let mut gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    api.register(1).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    // SIGKILL right after the 2xx: nothing but the flushed database survives.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let (s, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(r["status"], "IN_PROGRESS");
    let (_, keys) = api.get("/keys").await;
    let key = keys["keys"][0]["publicKey"].as_str().unwrap().to_owned();
    let car = TestCar::start(
        1,
        &key,
        CarOpts {
            host: "127.0.0.1".into(),
            port: mqtt,
            tls: None,
            mode: Mode::Obey,
        },
    )
    .await;
    let cb = hook.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    assert_eq!(
        car.seen.lock().unwrap().grants,
        vec!["power-boost".to_string()]
    );
    drop(gw);
}

/// The process's resident size, from `/proc`.
#[cfg(target_os = "linux")]
fn resident_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024
}

/// The heap reserve is faulted in and stays resident: the warmer frees what it touched once
/// the reserve is reached, and the allocator, told to keep freed pages, does not hand them
/// back to the kernel. The environment asks mimalloc to purge at once, so the pages would go
/// if the gateway did not override that.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_reserve_is_faulted_in_and_stays_resident() {
    const RESERVE_MIB: u64 = 192;
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (http, mqtt) = (free_port(), free_port());
    let reserve = RESERVE_MIB.to_string();
    let gw = spawn_gateway_with(
        dir.path(),
        http,
        mqtt,
        &hook,
        &["--heap-reserve-mb", &reserve],
        &[("MIMALLOC_PURGE_DELAY", "0")],
    );
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    let pid = gw.0.id();
    let end = Instant::now() + Duration::from_secs(60);
    while resident_mib(pid) < RESERVE_MIB {
        assert!(
            Instant::now() < end,
            "resident {} MiB, reserve {RESERVE_MIB} MiB",
            resident_mib(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prefaulted = api.metric("caas_heap_prefaulted_bytes_total").await;
    assert!(prefaulted > 0.0, "the warmer faulted nothing in");
    // With the gateway allocating (mimalloc purges from its allocation paths), the pages
    // are still there.
    let busy_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < busy_until {
        api.get_text("/metrics").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resident = resident_mib(pid);
    assert!(
        resident >= RESERVE_MIB * 95 / 100,
        "resident {resident} MiB after the reserve of {RESERVE_MIB} MiB was reached"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_in_flight_at_kill_9_is_sent_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    hook.hold.store(true, Ordering::SeqCst);
    let (http, mqtt) = (free_port(), free_port());
    let mut gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    api.register(1).await;
    let (_, keys) = api.get("/keys").await;
    let key = keys["keys"][0]["publicKey"].as_str().unwrap().to_owned();
    let opts = |port| CarOpts {
        host: "127.0.0.1".into(),
        port,
        tls: None,
        mode: Mode::Obey,
    };
    let car = TestCar::start(1, &key, opts(mqtt)).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    // The request completes; its callback's first try hangs at the receiver.
    let end = Instant::now() + Duration::from_secs(20);
    while hook.held.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < end, "no callback reached the receiver");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(r["status"], "COMPLETED");
    // SIGKILL with the callback in flight: it was never filed in the outbox, only the car's
    // record still lists the request.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    drop(car);
    // Let the cut-off POST's handler finish, so only a new POST can add a callback.
    hook.hold.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = hook.for_request(&id).len();
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let end = Instant::now() + Duration::from_secs(20);
    while hook.for_request(&id).len() == before {
        assert!(
            Instant::now() < end,
            "the callback was not sent after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cbs = hook.for_request(&id);
    assert!(cbs
        .iter()
        .all(|c| c.body["status"] == "ACTIVATED" && c.signature_ok));
    drop(gw);
}

fn mosquitto_or_skip() -> bool {
    if mosquitto_bin().is_none() {
        eprintln!(
            "\n*** SKIPPED: mosquitto is not installed (scripts/install-deps.sh installs it) ***\n"
        );
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_through_mosquitto() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("m.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let _m = start_mosquitto(&conf, port).await;
    let hook = Webhook::start(0).await;
    let mut c = config(&dir.path().join("gw"), Some(&hook));
    c.mqtt = None;
    c.broker = Some(format!("mqtt://127.0.0.1:{port}"));
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    api.register(1).await;
    let car = TestCar::start(
        1,
        gw.public_key_hex(),
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: None,
            mode: Mode::Obey,
        },
    )
    .await;
    car.wait_connected().await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    assert!(cb.signature_ok);
    let (s, b) = api
        .post(
            "/ota/deactivate",
            &serde_json::json!({"vin": vin(1).to_string(), "serviceId": "power-boost"}),
        )
        .await;
    assert_eq!(s, 202);
    let cb = hook
        .wait(b["requestId"].as_str().unwrap(), Duration::from_secs(15))
        .await;
    assert_eq!(cb.body["status"], "DEACTIVATED");
    gw.shutdown().await;
}

/// A raw client with `tls` that subscribes to `sub` and publishes `publish`; counts what it
/// receives on `sub` and its connection errors.
fn intruder(
    name: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    sub: String,
    publish: Option<(String, Vec<u8>)>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut el) = AsyncClient::new(opts, 16);
    let got = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let (g, e) = (got.clone(), errors.clone());
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(sub.clone(), QoS::AtLeastOnce);
                    if let Some((t, p)) = &publish {
                        let _ = client.try_publish(t.clone(), QoS::AtLeastOnce, false, p.clone());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == sub => {
                    g.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => {
                    e.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    (got, errors, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mtls_isolates_cars_and_an_idle_socket_stalls_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hook = Webhook::start(0).await;
    let mut c = config(&dir.path().join("gw"), Some(&hook));
    c.mqtts = Some("127.0.0.1:0".parse().unwrap());
    c.tls = Some(pki.tls_files());
    let gw = caas_gateway::start(c).await.unwrap();
    let port = gw.mqtts_addr().unwrap().port();
    let api = Api::new(gw.http_addr());
    api.register(1).await;
    api.register(2).await;

    // An idle TCP connection on the TLS port, held open for the whole test.
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();

    let car2 = TestCar::start(
        2,
        gw.public_key_hex(),
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: Some(pki.car(2)),
            mode: Mode::Obey,
        },
    )
    .await;
    car2.wait_connected().await;

    // Car 1's certificate tries to read car 2's commands, and to forge car 2's report.
    let forged = report(
        &vin(2),
        &car_key(1),
        99,
        caas_protocol::Outcome::Applied { seq: 99 },
    );
    let (got, errors, task) = intruder(
        "intruder",
        port,
        pki.car(1),
        caas_protocol::topics::command_topic(&vin(2)).to_string(),
        Some((
            caas_protocol::topics::report_topic(&vin(2)).to_string(),
            forged,
        )),
    );

    let id = api.activate(2, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    wait_until("the intruder to be cut off", Duration::from_secs(5), || {
        errors.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(
        got.load(Ordering::SeqCst),
        0,
        "car 1 must not read car 2's commands"
    );
    assert_eq!(
        api.metric("caas_reports_forged_total").await,
        0.0,
        "the forged report never reached the gateway"
    );

    // A certificate whose Organization is not a VIN is refused too.
    pki.issue("nobody", &[], "nobody", Some("ACME"), false);
    let (_, errs, t2) = intruder(
        "nobody",
        port,
        pki.client_config("nobody"),
        "/tenants/+/cmd".into(),
        None,
    );
    wait_until(
        "the certificate without a VIN to be refused",
        Duration::from_secs(5),
        || errs.load(Ordering::SeqCst) > 0,
    )
    .await;
    task.abort();
    t2.abort();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_shipped_mtls_config_isolates_cars() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.issue("gateway", &[], "caas-gateway", None, false);
    let port = free_port();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("mosquitto");
    let conf = std::fs::read_to_string(shipped.join("mosquitto.conf"))
        .unwrap()
        .replace("@PORT@", &port.to_string())
        .replace("@CERTS@", dir.path().to_str().unwrap())
        .replace("@ACL@", shipped.join("acl").to_str().unwrap());
    let conf_path = dir.path().join("mosquitto.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let _m = start_mosquitto(&conf_path, port).await;

    let hook = Webhook::start(0).await;
    let mut c = config(&dir.path().join("gw"), Some(&hook));
    c.mqtt = None;
    c.broker = Some(format!("mqtts://127.0.0.1:{port}"));
    c.tls = Some(caas_gateway::TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("gateway.pem"),
        key: dir.path().join("gateway.key"),
    });
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    api.register(2).await;
    let car2 = TestCar::start(
        2,
        gw.public_key_hex(),
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: Some(pki.car(2)),
            mode: Mode::Obey,
        },
    )
    .await;
    car2.wait_connected().await;
    let forged = report(
        &vin(2),
        &car_key(1),
        99,
        caas_protocol::Outcome::Applied { seq: 99 },
    );
    let (got, _errors, task) = intruder(
        "intruder",
        port,
        pki.car(1),
        caas_protocol::topics::command_topic(&vin(2)).to_string(),
        Some((
            caas_protocol::topics::report_topic(&vin(2)).to_string(),
            forged,
        )),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = api.activate(2, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        got.load(Ordering::SeqCst),
        0,
        "the ACL keeps car 1 out of car 2's commands"
    );
    assert_eq!(
        api.metric("caas_reports_forged_total").await,
        0.0,
        "the ACL drops car 1's publish on car 2's topic"
    );
    task.abort();
    gw.shutdown().await;
}
