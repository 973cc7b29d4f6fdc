//! The gateway end to end at fleet scale, in one process: a real gateway (embedded broker),
//! N cars on real MQTT connections (verify with the gateway key, sign reports with their
//! own), a real webhook receiver. Prints a table; no assertions.
//!
//! Rows: for N cars and a number of broker routers, the time to connect the fleet, the first
//! campaign (POST to the last car's confirming report, counted by the gateway), a repeat
//! campaign, then single activations at full speed (64 concurrent HTTP clients): rate and
//! POST-to-callback latency percentiles.
//!
//! Run: `cargo bench -p caas-gateway --bench gateway_fleet` (`CAAS_BENCH_CARS=1000,4000`,
//! `CAAS_BENCH_ROUTERS=1,32`). The file-descriptor limit caps N (four sockets per car).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caas_protocol::*;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

const TOKEN: &str = "bench";

fn vin(n: usize) -> Vin {
    format!("WVWZZZ1JZXW{n:06}").parse().unwrap()
}

fn key(n: usize) -> SigningKey {
    let mut seed = [9u8; 32];
    seed[..8].copy_from_slice(&(n as u64).to_be_bytes());
    SigningKey::from_bytes(&seed)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn spawn_car(n: usize, port: u16, gw: TrustedKey, connected: Arc<AtomicUsize>) {
    let vin = vin(n);
    let key = key(n);
    let mut opts = MqttOptions::new(vin.to_string(), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_last_will(LastWill::new(
        topics::presence_topic(&vin).as_str(),
        topics::PRESENCE_OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = AsyncClient::new(opts, 16);
    let mut net = el.network_options();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    tokio::spawn(async move {
        let mut applied = 0u64;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(topics::command_topic(&vin).as_str(), QoS::AtLeastOnce)
                        .await;
                    let _ = client
                        .publish(
                            topics::presence_topic(&vin).as_str(),
                            QoS::AtLeastOnce,
                            true,
                            topics::PRESENCE_ONLINE,
                        )
                        .await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    connected.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(cmd) = open_command(&p.payload, &[gw]) else {
                        continue;
                    };
                    let outcome = match cmd.body {
                        CommandBody::SetState(_) if cmd.seq > applied => {
                            applied = cmd.seq;
                            Outcome::Applied { seq: cmd.seq }
                        }
                        CommandBody::SetState(_) => Outcome::Applied { seq: applied },
                        CommandBody::QueryStatus { nonce } => Outcome::Status { nonce },
                    };
                    let r = Report {
                        vin,
                        applied_seq: applied,
                        car_time: now(),
                        outcome,
                        active: heapless::Vec::new(),
                        diagnostics: Diagnostics {
                            firmware_version: "1.0.0".parse().unwrap(),
                            error_codes: heapless::Vec::new(),
                            signal_strength: 70,
                        },
                    };
                    let mut buf = [0u8; MAX_REPORT_FRAME_SIZE];
                    let frame = seal_report(&r, &key, &mut buf).unwrap().to_vec();
                    let _ = client
                        .publish(
                            topics::report_topic(&vin).as_str(),
                            QoS::AtLeastOnce,
                            false,
                            frame,
                        )
                        .await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    });
}

async fn completed(http: &reqwest::Client, base: &str) -> f64 {
    metric(http, base, "caas_requests_total{state=\"completed\"}").await
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn campaign(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    action: &str,
) -> (Duration, Duration) {
    let before = completed(http, base).await;
    let vins: Vec<String> = (0..n).map(|i| vin(i).to_string()).collect();
    let mut body = json!({"vins": vins, "action": action, "serviceId": "autopilot"});
    if action == "ACTIVATE" {
        body["configuration"] = json!({"featureFlags": ["highway_autopilot"]});
        body["duration"] = json!({"type": "PERMANENT"});
    }
    let t = Instant::now();
    let r = http
        .post(format!("{base}/campaigns"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let accepted = t.elapsed();
    let end = Instant::now() + Duration::from_secs(600);
    while completed(http, base).await < before + n as f64 {
        assert!(Instant::now() < end, "campaign did not complete");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (accepted, t.elapsed())
}

async fn run(n: usize, routers: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    // Webhook receiver: requestId -> arrival time.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let a = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let a = a.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap();
                a.lock()
                    .unwrap()
                    .insert(v["requestId"].as_str().unwrap().to_owned(), Instant::now());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let config = caas_gateway::Config {
        http: "127.0.0.1:0".parse().unwrap(),
        mqtt: Some("127.0.0.1:0".parse().unwrap()),
        data: dir.path().to_path_buf(),
        api_token: TOKEN.into(),
        webhook_url: Some(hook),
        webhook_secret: "s".into(),
        broker_shards: routers,
        ..Default::default()
    };
    let gw = caas_gateway::start(config).await.unwrap();
    let base = format!("http://{}", gw.http_addr());
    let http = reqwest::Client::new();
    let gw_key = TrustedKey::new(verifying_key_from_hex(gw.public_key_hex()).unwrap());
    // Provision the fleet.
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut js = tokio::task::JoinSet::new();
    for i in 0..n {
        let (http, base, permit) = (
            http.clone(),
            base.clone(),
            sem.clone().acquire_owned().await.unwrap(),
        );
        js.spawn(async move {
            let _p = permit;
            let body = json!({"vin": vin(i).to_string(), "publicKey": verifying_key_to_hex(&key(i).verifying_key()).as_str(), "platform": "bench"});
            let r = http.post(format!("{base}/vehicles")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
            assert!(r.status().is_success());
        });
    }
    while js.join_next().await.is_some() {}
    let connected = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    for i in 0..n {
        spawn_car(i, gw.mqtt_addr().unwrap().port(), gw_key, connected.clone());
    }
    while connected.load(Ordering::SeqCst) < n {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "fleet did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acc1, first) = campaign(&http, &base, n, "ACTIVATE").await;
    let (_, second) = campaign(&http, &base, n, "DEACTIVATE").await;

    // Single activations, 64 concurrent clients, for ~3 s worth of requests.
    let clients = list("CAAS_BENCH_CLIENTS", "64")
        .first()
        .copied()
        .unwrap_or(64)
        .max(1);
    let total = list("CAAS_BENCH_REQUESTS", "0")
        .first()
        .copied()
        .filter(|t| *t > 0)
        .unwrap_or(3 * n.min(4000));
    let sent: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let flushes_before = metric(&http, &base, "caas_store_flushes_total").await;
    let t = Instant::now();
    let mut js = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..clients {
        let (http, base, sent, next) = (http.clone(), base.clone(), sent.clone(), next.clone());
        js.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= total {
                    return;
                }
                let car = k % n;
                let service = format!("svc-{}", k / n % 4);
                let body = json!({"vin": vin(car).to_string(), "serviceId": service,
                    "configuration": {"featureFlags": ["power_boost"]}, "duration": {"type": "PERMANENT"}});
                let start = Instant::now();
                let r = http.post(format!("{base}/ota/activate")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
                let v: Value = r.json().await.unwrap();
                sent.lock().unwrap().push((v["requestId"].as_str().unwrap().to_owned(), start));
            }
        });
    }
    while js.join_next().await.is_some() {}
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let got = {
            let a = arrivals.lock().unwrap();
            sent.lock()
                .unwrap()
                .iter()
                .filter(|(id, _)| a.contains_key(id))
                .count()
        };
        if got >= total || Instant::now() > end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t.elapsed();
    let flushes = metric(&http, &base, "caas_store_flushes_total").await - flushes_before;
    let mut lat: Vec<Duration> = {
        let a = arrivals.lock().unwrap();
        sent.lock()
            .unwrap()
            .iter()
            .filter_map(|(id, s)| a.get(id).map(|t| t.duration_since(*s)))
            .collect()
    };
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    gw.shutdown().await;
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    format!(
        "| {n} | {routers} | {} | {} ({} to 202) | {} | {:.0}/s ({:.0} flushes/s) | {} | {} |",
        ms(connect),
        ms(first),
        ms(acc1),
        ms(second),
        lat.len() as f64 / elapsed.as_secs_f64(),
        flushes / elapsed.as_secs_f64(),
        ms(pct(0.5)),
        ms(pct(0.99)),
    )
}

fn list(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn main() {
    // Each configuration runs in a child process: a gateway's broker threads and its cars'
    // sockets live until the process ends.
    if let Ok(one) = std::env::var("CAAS_BENCH_ONE") {
        let (n, routers) = one.split_once(',').unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        println!(
            "{}",
            rt.block_on(run(n.parse().unwrap(), routers.parse().unwrap()))
        );
        std::process::exit(0);
    }
    println!("| cars | broker routers | connect fleet | 1st campaign | 2nd campaign | activations (CAAS_BENCH_CLIENTS, default 64) | p50 POST→callback | p99 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let me = std::env::current_exe().unwrap();
    for n in list("CAAS_BENCH_CARS", "1000,4000") {
        for routers in list("CAAS_BENCH_ROUTERS", "1,32") {
            let out = std::process::Command::new(&me)
                .env("CAAS_BENCH_ONE", format!("{n},{routers}"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().find(|l| l.starts_with('|')) {
                Some(line) => println!("{line}"),
                None => println!(
                    "| {n} | {routers} | failed: {} |",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ),
            }
        }
    }
}
