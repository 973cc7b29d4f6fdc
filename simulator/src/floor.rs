//! The machine's floor under `caas-sim bench`'s latency row: bare round trips that do none of
//! the system's work, timed at the same rate on the same machine while the fleet is
//! connected.
//!
//! An activation crosses the broker twice (the signed command to the car, its report back)
//! and HTTP twice (the POST, the callback), with two store flushes and four Ed25519
//! operations on the way. These measure the transports and the disk alone:
//!
//! - [`mqtt_round_trips`]: one client publishes a command-sized message (QoS 1), a second
//!   client subscribed to it publishes it back on another topic (QoS 1), the first times its
//!   return: two broker hops, no signing, no store;
//! - [`http_round_trips`]: `GET /healthz` of the gateway on a keep-alive connection;
//! - [`disk_flushes`]: a 4 KiB write and `fdatasync` in a file written out ahead, in the
//!   gateway's data directory: what a store flush costs the disk, without the store.
//!
//! If the floor's own p99 is over the latency target, no work on the system's path can meet
//! the target on this machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::stats::{new_histogram, record, Percentiles};

/// Round trips in flight at most; a send that would exceed it is skipped (and counted).
pub const MAX_IN_FLIGHT: u64 = 512;
/// Bytes of each MQTT round trip's payload: about a signed command's.
const PAYLOAD: usize = 208;
/// How long to wait for the round trips still in flight after the last send.
const DRAIN: Duration = Duration::from_secs(2);
/// Longest wait for the first round trip to come back before the timed ones start.
const WARM_UP: Duration = Duration::from_secs(10);
/// MQTT client request queue (rumqttc's channel) per client.
const CLIENT_QUEUE: usize = 1024;

/// What a floor run measured.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Floor {
    /// Round-trip times.
    pub latency: Percentiles,
    /// Sends skipped because [`MAX_IN_FLIGHT`] were outstanding, or the client's queue was
    /// full.
    pub skipped: u64,
    /// Round trips sent that did not come back (in time, or at all).
    pub lost: u64,
}

/// Times MQTT round trips (two broker hops) through the broker at `addr` (`HOST:PORT`, a
/// plain listener) at `rate` a second for `duration`.
pub async fn mqtt_round_trips(addr: &str, rate: f64, duration: Duration) -> Result<Floor> {
    let (host, port) = crate::fleet::split_host_port(addr)?;
    let run = format!("{:08x}", rand::random::<u32>());
    // The two topics the embedded broker keeps a burst of (gateway/src/mqtt.rs): one floor
    // run at a time per broker (the bench starts a broker per column).
    let [ping_topic, pong_topic] = caas_protocol::topics::BENCH_TOPICS;
    let (pinger, mut ping_loop) = client(&format!("caas-bench-ping-{run}"), &host, port);
    let (echo, mut echo_loop) = client(&format!("caas-bench-echo-{run}"), &host, port);
    pinger
        .subscribe(pong_topic, QoS::AtLeastOnce)
        .await
        .context("subscribing the pinger")?;
    echo.subscribe(ping_topic, QoS::AtLeastOnce)
        .await
        .context("subscribing the echo")?;
    until_subscribed(&mut ping_loop).await?;
    until_subscribed(&mut echo_loop).await?;

    let echo_task = tokio::spawn(async move {
        while let Ok(event) = echo_loop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                // Full queue: this round trip is lost, and shows as a missing sample.
                let _ = echo.try_publish(pong_topic, QoS::AtLeastOnce, false, p.payload);
            }
        }
    });
    let epoch = Instant::now();
    // Pings sent before this (ns from `epoch`) are warm-up: a broker may take a moment to
    // route a new subscription, so the timed pings start after the first one came back.
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let warm = Arc::new(AtomicU64::new(0));
    let returned = Arc::new(AtomicU64::new(0));
    let (stop, mut stopped) = watch::channel(false);
    let (counted, from, warmed) = (returned.clone(), measure_from.clone(), warm.clone());
    let ping_task = tokio::spawn(async move {
        let mut h = new_histogram();
        loop {
            tokio::select! {
                event = ping_loop.poll() => match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => match sent_at(&p.payload) {
                        Some(sent) if sent.as_nanos() >= u128::from(from.load(Ordering::Relaxed)) => {
                            record(&mut h, epoch.elapsed().saturating_sub(sent));
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(_) => {
                            warmed.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    },
                    Ok(_) => {}
                    Err(_) => break,
                },
                _ = stopped.changed() => break,
            }
        }
        h
    });

    let warm_end = Instant::now() + WARM_UP;
    while warm.load(Ordering::Relaxed) == 0 {
        if Instant::now() > warm_end {
            ping_task.abort();
            echo_task.abort();
            bail!("no round trip came back in {WARM_UP:?}");
        }
        let _ = pinger.try_publish(ping_topic, QoS::AtLeastOnce, false, ping(epoch));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    measure_from.store(start, Ordering::Relaxed);
    let mut skipped = 0;
    let mut sent = 0u64;
    let mut pace = Pacer::new(rate, duration);
    while pace.next().await {
        // Saturating: a QoS 1 redelivery can bring one back twice.
        if sent.saturating_sub(returned.load(Ordering::Relaxed)) >= MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        match pinger.try_publish(ping_topic, QoS::AtLeastOnce, false, ping(epoch)) {
            Ok(()) => sent += 1,
            Err(_) => skipped += 1,
        }
    }
    let drain_end = Instant::now() + DRAIN;
    while returned.load(Ordering::Relaxed) < sent && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(true);
    let h: Histogram<u64> = ping_task.await.context("the pinger's event loop")?;
    echo_task.abort();
    let lost = sent.saturating_sub(returned.load(Ordering::Relaxed));
    Ok(Floor {
        latency: Percentiles::of(&h),
        skipped,
        lost,
    })
}

/// Times `GET {base}/healthz` round trips at `rate` a second for `duration`, each on a
/// pooled keep-alive connection.
pub async fn http_round_trips(base: &str, rate: f64, duration: Duration) -> Result<Floor> {
    crate::init_crypto();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(MAX_IN_FLIGHT as usize)
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let url = format!("{base}/healthz");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = 0;
    let mut h = new_histogram();
    let mut failed = 0u64;
    let mut pace = Pacer::new(rate, duration);
    while pace.next().await {
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let (http, url) = (http.clone(), url.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            let ok = match http.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            ok.then(|| t0.elapsed())
        });
        while let Some(done) = tasks.try_join_next() {
            tally(&mut h, &mut failed, done);
        }
    }
    // Every request has its own 10 s timeout, so this ends.
    while let Some(done) = tasks.join_next().await {
        tally(&mut h, &mut failed, done);
    }
    if h.is_empty() && failed > 0 {
        bail!("GET {url}: all {failed} requests failed");
    }
    Ok(Floor {
        latency: Percentiles::of(&h),
        skipped,
        lost: failed,
    })
}

/// Records a finished HTTP round trip, or counts it failed.
fn tally(
    h: &mut Histogram<u64>,
    failed: &mut u64,
    done: Result<Option<Duration>, tokio::task::JoinError>,
) {
    match done {
        Ok(Some(d)) => record(h, d),
        _ => *failed += 1,
    }
}

/// Ticks `rate` times a second for `duration` (late ticks catch up, as a fixed-rate load).
struct Pacer {
    tick: tokio::time::Interval,
    end: Instant,
}

impl Pacer {
    fn new(rate: f64, duration: Duration) -> Pacer {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Pacer {
            tick,
            end: Instant::now() + duration,
        }
    }

    /// Waits for the next send; `false` once the duration is over.
    async fn next(&mut self) -> bool {
        if Instant::now() >= self.end {
            return false;
        }
        self.tick.tick().await;
        true
    }
}

/// Bytes of the file [`disk_flushes`] writes into: written and synced first, so that each
/// timed flush is data only, as the store's log written out ahead makes its flushes.
const FLUSH_FILE: usize = 1 << 20;
/// Bytes per timed write.
const FLUSH_WRITE: usize = 4096;

/// Times a 4 KiB write and `fdatasync` in a scratch file in `dir` at `rate` a second for
/// `duration`, one at a time (as a store flushes); a flush that runs late delays the next,
/// as in the store. The file is removed afterwards.
pub async fn disk_flushes(dir: &std::path::Path, rate: f64, duration: Duration) -> Result<Floor> {
    let path = dir.join(format!("floor-flush-{:08x}.tmp", rand::random::<u32>()));
    let run = tokio::task::spawn_blocking(move || {
        let timed = time_flushes(&path, rate, duration);
        let _ = std::fs::remove_file(&path);
        timed
    });
    run.await.context("the flush timer")?
}

fn time_flushes(path: &std::path::Path, rate: f64, duration: Duration) -> Result<Floor> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(&vec![0u8; FLUSH_FILE])
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    let block = vec![0x5au8; FLUSH_WRITE];
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let start = Instant::now();
    let mut h = new_histogram();
    let mut n: u32 = 0;
    while start.elapsed() < duration {
        let due = start + interval * n;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let offset = (n as usize * FLUSH_WRITE) % FLUSH_FILE;
        let t0 = Instant::now();
        file.write_all_at(&block, offset as u64)
            .and_then(|()| file.sync_data())
            .with_context(|| format!("flushing {}", path.display()))?;
        record(&mut h, t0.elapsed());
        n = n.saturating_add(1);
    }
    Ok(Floor {
        latency: Percentiles::of(&h),
        skipped: 0,
        lost: 0,
    })
}

fn client(id: &str, host: &str, port: u16) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_inflight(MAX_IN_FLIGHT as u16);
    let (c, mut el) = AsyncClient::new(opts, CLIENT_QUEUE);
    let mut net = el.network_options();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    (c, el)
}

/// Drives `el` until its subscription is acknowledged (10 s at most).
async fn until_subscribed(el: &mut EventLoop) -> Result<()> {
    let wait = async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("MQTT: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .context("no subscription acknowledgement in 10 s")?
}

/// A round trip's payload: command-sized, its send time (ns from `epoch`) first.
fn ping(epoch: Instant) -> Vec<u8> {
    let mut payload = vec![0u8; PAYLOAD];
    let at = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    payload[..8].copy_from_slice(&at.to_le_bytes());
    payload
}

/// When a round trip's payload left (from the run's epoch), if it is one of ours.
fn sent_at(payload: &[u8]) -> Option<Duration> {
    let bytes: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(Duration::from_nanos(u64::from_le_bytes(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flushes_are_timed_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let floor = rt
            .block_on(disk_flushes(dir.path(), 200.0, Duration::from_millis(100)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(floor.latency.count >= 5, "{floor:?}");
        assert!(floor.latency.p50_ms > 0.0, "{floor:?}");
        let left = std::fs::read_dir(dir.path())
            .map(|d| d.count())
            .unwrap_or(1);
        assert_eq!(left, 0, "the scratch file is removed");
    }

    #[test]
    fn a_payload_carries_its_send_time() {
        let mut p = vec![0u8; PAYLOAD];
        p[..8].copy_from_slice(&1_500_000u64.to_le_bytes());
        assert_eq!(sent_at(&p), Some(Duration::from_micros(1500)));
        assert_eq!(sent_at(&p[..7]), None);
    }
}
