//! Counters, HDR latency histograms and the fleet report.
//!
//! Cars bump atomic counters and record latencies into two shared histograms (behind a
//! mutex: a record is a few nanoseconds, far below the cost of the signature checks around
//! it). Histograms are bounded by construction: 3 significant digits up to one hour.
//! Worker processes send their histograms to the parent serialised (HDR V2 + base64) so the
//! merged percentiles are exact.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram records, in microseconds (one hour); larger values saturate.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A new latency histogram (microseconds, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; fall back to auto-resizing otherwise.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable_histogram())
}

fn unreachable_histogram() -> Histogram<u64> {
    // `Histogram::new(3)` only fails for more than 5 significant digits.
    match Histogram::new(2) {
        Ok(h) => h,
        Err(_) => std::process::abort(),
    }
}

/// Records `d` into `h`, saturating at [`MAX_LATENCY_US`].
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros())
        .unwrap_or(MAX_LATENCY_US)
        .clamp(1, MAX_LATENCY_US);
    h.saturating_record(us);
}

/// Shared live counters of one fleet (one process).
#[derive(Default)]
pub struct FleetStats {
    /// Cars with a live MQTT session now.
    pub connected: AtomicU64,
    /// Cars that connected at least once.
    pub ever_connected: AtomicU64,
    /// Successful (re)connections.
    pub connects: AtomicU64,
    /// Failed connection attempts.
    pub connect_errors: AtomicU64,
    /// Connections lost or dropped (including storms).
    pub disconnects: AtomicU64,
    /// Connections dropped on purpose by the reconnect storm.
    pub storm_drops: AtomicU64,
    /// Command frames received.
    pub commands_received: AtomicU64,
    /// Command frames dropped by the drop fault (acknowledged, never handed to the core).
    pub commands_dropped: AtomicU64,
    /// Command frames corrupted before the core saw them.
    pub frames_corrupted: AtomicU64,
    /// Stores failed on purpose by the refuse fault.
    pub persists_refused: AtomicU64,
    /// PUBACKs sent on the core's `Ack`.
    pub acks: AtomicU64,
    /// Reports published.
    pub reports: AtomicU64,
    /// Requests the MQTT client could not queue (its bounded channel was full).
    pub client_queue_full: AtomicU64,
    /// `Applied` reports.
    pub applied: AtomicU64,
    /// `Status` reports.
    pub status: AtomicU64,
    /// `Periodic` reports.
    pub periodic: AtomicU64,
    /// `Rejected` reports by code.
    pub rejected: Mutex<BTreeMap<String, u64>>,
    /// Frame received → report published, per command.
    pub handle_latency: Mutex<Option<Histogram<u64>>>,
    /// TCP connect → CONNACK.
    pub connect_latency: Mutex<Option<Histogram<u64>>>,
}

/// Bumps a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn with_hist(slot: &Mutex<Option<Histogram<u64>>>, f: impl FnOnce(&mut Histogram<u64>)) {
    if let Ok(mut guard) = slot.lock() {
        f(guard.get_or_insert_with(new_histogram));
    }
}

impl FleetStats {
    /// Records a command's handling time.
    pub fn record_handle(&self, d: Duration) {
        with_hist(&self.handle_latency, |h| record(h, d));
    }

    /// Records a connection's time to CONNACK.
    pub fn record_connect(&self, d: Duration) {
        with_hist(&self.connect_latency, |h| record(h, d));
    }

    /// Counts a rejection.
    pub fn rejected(&self, code: &str) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(code.to_string()).or_default() += 1;
        }
    }

    /// A snapshot of the counters (no histograms, no timing).
    pub fn counters(&self) -> Counters {
        Counters {
            connected: load(&self.connected),
            ever_connected: load(&self.ever_connected),
            connects: load(&self.connects),
            connect_errors: load(&self.connect_errors),
            disconnects: load(&self.disconnects),
            storm_drops: load(&self.storm_drops),
            commands_received: load(&self.commands_received),
            commands_dropped: load(&self.commands_dropped),
            frames_corrupted: load(&self.frames_corrupted),
            persists_refused: load(&self.persists_refused),
            acks: load(&self.acks),
            reports: load(&self.reports),
            client_queue_full: load(&self.client_queue_full),
            applied: load(&self.applied),
            status: load(&self.status),
            periodic: load(&self.periodic),
            rejected: self.rejected.lock().map(|m| m.clone()).unwrap_or_default(),
        }
    }

    /// Serialised histograms for a parent process.
    pub fn histograms(&self) -> (String, String) {
        let ser = |slot: &Mutex<Option<Histogram<u64>>>| {
            slot.lock()
                .ok()
                .and_then(|g| g.as_ref().map(encode_histogram))
                .unwrap_or_default()
        };
        (ser(&self.handle_latency), ser(&self.connect_latency))
    }
}

/// The counters of a fleet at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// Cars with a live session.
    pub connected: u64,
    /// Cars that connected at least once.
    pub ever_connected: u64,
    /// Successful (re)connections.
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Connections lost or dropped.
    pub disconnects: u64,
    /// Connections dropped by the storm.
    pub storm_drops: u64,
    /// Command frames received.
    pub commands_received: u64,
    /// Command frames dropped on purpose.
    pub commands_dropped: u64,
    /// Frames corrupted on purpose.
    pub frames_corrupted: u64,
    /// Stores failed on purpose.
    pub persists_refused: u64,
    /// Commands acknowledged (PUBACK).
    pub acks: u64,
    /// Reports published.
    pub reports: u64,
    /// MQTT client queue full.
    pub client_queue_full: u64,
    /// Applied reports.
    pub applied: u64,
    /// Status reports.
    pub status: u64,
    /// Periodic reports.
    pub periodic: u64,
    /// Rejected reports by code.
    pub rejected: BTreeMap<String, u64>,
}

impl Counters {
    /// Adds another process's counters.
    pub fn add(&mut self, o: &Counters) {
        self.connected += o.connected;
        self.ever_connected += o.ever_connected;
        self.connects += o.connects;
        self.connect_errors += o.connect_errors;
        self.disconnects += o.disconnects;
        self.storm_drops += o.storm_drops;
        self.commands_received += o.commands_received;
        self.commands_dropped += o.commands_dropped;
        self.frames_corrupted += o.frames_corrupted;
        self.persists_refused += o.persists_refused;
        self.acks += o.acks;
        self.reports += o.reports;
        self.client_queue_full += o.client_queue_full;
        self.applied += o.applied;
        self.status += o.status;
        self.periodic += o.periodic;
        for (k, v) in &o.rejected {
            *self.rejected.entry(k.clone()).or_default() += v;
        }
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Percentiles {
    /// Reads the percentiles of a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// `p50 1.2 ms, p90 ..` on one line.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".to_string();
        }
        format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// A histogram as base64 of its HDR V2 serialisation.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// The inverse of [`encode_histogram`]; `None` for anything that is not one.
pub fn decode_histogram(text: &str) -> Option<Histogram<u64>> {
    if text.is_empty() {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .ok()
}

/// The final report of `caas-sim fleet` (also written with `--report FILE.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetReport {
    /// Cars simulated.
    pub cars: u64,
    /// Worker processes used (1: this process only).
    pub workers: u64,
    /// Cars that connected at least once.
    pub cars_connected: u64,
    /// Seconds from the first connect attempt until every car (not held offline) connected.
    pub connect_secs: f64,
    /// Cars connected per second over that time.
    pub connect_rate_per_sec: f64,
    /// Seconds the fleet ran.
    pub run_secs: f64,
    /// The counters.
    pub counters: Counters,
    /// Frame received → report published, per command.
    pub handle_latency: Percentiles,
    /// TCP connect → CONNACK.
    pub connect_latency: Percentiles,
    /// Resident memory of the simulator's processes after connecting, in bytes.
    pub rss_bytes: u64,
    /// Memory per car, in bytes (resident memory growth after connecting / cars).
    pub memory_per_car_bytes: u64,
}

impl FleetReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let c = &self.counters;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("── fleet report ──".to_string());
        line(format!(
            "cars                 {} ({} worker process{})",
            self.cars,
            self.workers,
            if self.workers == 1 { "" } else { "es" }
        ));
        line(format!(
            "connected            {} in {:.1} s ({:.0} cars/s); {} connects, {} errors, {} disconnects ({} storm)",
            self.cars_connected,
            self.connect_secs,
            self.connect_rate_per_sec,
            c.connects,
            c.connect_errors,
            c.disconnects,
            c.storm_drops
        ));
        line(format!(
            "commands             {} received, {} acknowledged, {} dropped (fault), {} corrupted (fault), {} stores refused (fault)",
            c.commands_received, c.acks, c.commands_dropped, c.frames_corrupted, c.persists_refused
        ));
        let rejected: Vec<String> = c.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
        line(format!(
            "reports              {} published: applied {}, status {}, periodic {}, rejected {}",
            c.reports,
            c.applied,
            c.status,
            c.periodic,
            if rejected.is_empty() {
                "0".to_string()
            } else {
                rejected.join(", ")
            }
        ));
        line(format!(
            "command handling     {}",
            self.handle_latency.line()
        ));
        line(format!(
            "connect (to CONNACK) {}",
            self.connect_latency.line()
        ));
        line(format!(
            "memory               {:.1} MiB resident, {:.1} KiB per car",
            self.rss_bytes as f64 / 1048576.0,
            self.memory_per_car_bytes as f64 / 1024.0
        ));
        if c.client_queue_full > 0 {
            line(format!(
                "warning              {} MQTT requests found the client queue full",
                c.client_queue_full
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_serialisation_and_merge() {
        let mut h = new_histogram();
        for ms in 1..=100u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let text = encode_histogram(&h);
        let mut back = decode_histogram(&text).unwrap();
        assert_eq!(back.len(), 100);
        back.add(&h).unwrap();
        let p = Percentiles::of(&back);
        assert_eq!(p.count, 200);
        assert!((49.0..=51.0).contains(&p.p50_ms), "{p:?}");
        assert!(decode_histogram("not base64!").is_none());
    }

    #[test]
    fn counters_add_up() {
        let s = FleetStats::default();
        bump(&s.acks);
        s.rejected("REPLAY");
        let mut total = s.counters();
        total.add(&s.counters());
        assert_eq!(total.acks, 2);
        assert_eq!(total.rejected["REPLAY"], 2);
        let report = FleetReport {
            counters: total,
            ..FleetReport::default()
        };
        assert!(report.text().contains("REPLAY 2"));
    }
}
