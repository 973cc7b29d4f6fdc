//! `caasctl gateway stats`: the gateway's health at a glance, read from its Prometheus text
//! (`GET /metrics`): request counts, cars, reports, callbacks, and where a request's time goes
//! (the stage histograms: count, mean and the bucket bounds under which half and 99% fell).
//!
//! Only the samples named here are read; a metric the gateway does not export shows as `-`
//! and one it adds is ignored, so the tool works against older and newer gateways.

use serde_json::{json, Map, Value};

use crate::gateway::Gateway;
use crate::http::{Client, HttpError};
use crate::table::{key_values, render};

/// Most lines of a `/metrics` text read (the gateway exports ~100; the bound keeps a
/// misbehaving server from making the tool hold a huge map).
pub const MAX_METRIC_LINES: usize = 10_000;

/// The counters and gauges shown, as (label, sample name).
const COUNTS: [(&str, &str); 16] = [
    ("requests created", "caas_requests_total{state=\"created\"}"),
    (
        "requests completed",
        "caas_requests_total{state=\"completed\"}",
    ),
    ("requests failed", "caas_requests_total{state=\"failed\"}"),
    ("  of them cancelled", "caas_requests_cancelled_total"),
    ("requests in flight", "caas_requests_in_flight"),
    ("command attempts", "caas_attempts_total"),
    ("cars registered", "caas_cars_registered"),
    ("cars connected", "caas_connected_cars"),
    ("reports verified", "caas_reports_verified_total"),
    ("reports forged (ignored)", "caas_reports_forged_total"),
    ("callbacks delivered", "caas_webhook_deliveries_total"),
    ("callback attempts failed", "caas_webhook_failures_total"),
    ("support tickets", "caas_support_tickets_total"),
    (
        "repeats answered (idempotency key)",
        "caas_idempotent_replays_total",
    ),
    (
        "uses of the previous API token",
        "caas_api_previous_token_uses_total",
    ),
    (
        "calls refused for a bad token",
        "caas_api_unauthorized_total",
    ),
];

/// The listeners' certificate expiry gauges shown, as (label, gauge name): the Unix time the
/// certificate in force expires, 0 when the listener is off.
const CERTIFICATES: [(&str, &str); 2] = [
    (
        "IoT API TLS certificate",
        "caas_https_cert_expires_at_seconds",
    ),
    ("MQTT TLS certificate", "caas_mqtts_cert_expires_at_seconds"),
];

/// A certificate's expiry from its gauge: the time, the whole days left (negative once
/// expired) and whether it has expired; `None` when not exported or its listener is off.
fn expiry(at: Option<f64>, now: time::OffsetDateTime) -> Option<(String, i64, bool)> {
    let at = at.filter(|v| *v > 0.0)?;
    let when = time::OffsetDateTime::from_unix_timestamp(at as i64).ok()?;
    let date = when
        .format(&time::format_description::well_known::Rfc3339)
        .ok()?;
    Some((date, (when - now).whole_days(), when <= now))
}

fn expiry_text(at: Option<f64>, now: time::OffsetDateTime) -> String {
    match expiry(at, now) {
        None => "-".to_owned(),
        Some((date, _, true)) => format!("EXPIRED {date}"),
        Some((date, days, false)) => format!("{date} ({days} days left)"),
    }
}

/// The stage histograms shown, as (label, histogram name).
const STAGES: [(&str, &str); 4] = [
    ("answered (arrival → durable 2xx)", "caas_accept_seconds"),
    (
        "car's report (arrival → report)",
        "caas_activation_latency_seconds",
    ),
    (
        "callback (final → receiver's 2xx)",
        "caas_callback_delivery_seconds",
    ),
    ("store flush", "caas_store_flush_seconds"),
];

impl Gateway {
    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self, client: &Client) -> Result<String, HttpError> {
        self.get_text(client, "/metrics")
    }
}

/// The samples of a Prometheus text: (name with labels, value), in order.
fn samples(text: &str) -> Vec<(&str, f64)> {
    text.lines()
        .take(MAX_METRIC_LINES)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim(), value.trim().parse().ok()?))
        })
        .collect()
}

fn sample(all: &[(&str, f64)], name: &str) -> Option<f64> {
    all.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The bucket bound under which a share of a histogram's observations fell.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    /// Nothing observed yet.
    NoData,
    /// At most this many seconds.
    AtMost(f64),
    /// Above the largest finite bucket.
    AboveBuckets,
}

/// One histogram: its count, mean (seconds) and the bounds under which 50% and 99% of the
/// observations fell.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Histogram {
    count: f64,
    mean: Option<f64>,
    p50: Bound,
    p99: Bound,
}

fn histogram(all: &[(&str, f64)], name: &str) -> Option<Histogram> {
    let count = sample(all, &format!("{name}_count"))?;
    let sum = sample(all, &format!("{name}_sum"))?;
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(Option<f64>, f64)> = all
        .iter()
        .filter_map(|(n, v)| {
            let le = n.strip_prefix(prefix.as_str())?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                None
            } else {
                Some(le.parse().ok()?)
            };
            Some((bound, *v))
        })
        .collect();
    let under = |q: f64| {
        if count <= 0.0 {
            return Bound::NoData;
        }
        match buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= q * count)
        {
            Some((Some(secs), _)) => Bound::AtMost(*secs),
            _ => Bound::AboveBuckets,
        }
    };
    Some(Histogram {
        count,
        mean: (count > 0.0).then(|| sum / count),
        p50: under(0.5),
        p99: under(0.99),
    })
}

fn ms(secs: f64) -> String {
    if secs < 0.01 {
        format!("{:.2} ms", secs * 1e3)
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

fn bound_text(b: Bound) -> String {
    match b {
        Bound::NoData => "-".into(),
        Bound::AtMost(secs) => format!("≤ {}", ms(secs)),
        Bound::AboveBuckets => "above the buckets".into(),
    }
}

fn count_text(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// The readable form of a `/metrics` text.
pub fn stats_text(text: &str) -> String {
    stats_text_at(text, time::OffsetDateTime::now_utc())
}

fn stats_text_at(text: &str, now: time::OffsetDateTime) -> String {
    let all = samples(text);
    let mut pairs: Vec<(&str, String)> = COUNTS
        .iter()
        .map(|(label, name)| (*label, count_text(sample(&all, name))))
        .collect();
    let down = sample(&all, "caas_webhook_receiver_down").map(|v| {
        if v > 0.0 {
            "down (probed once a second)".to_string()
        } else {
            "up".to_string()
        }
    });
    pairs.push(("webhook receiver", down.unwrap_or_else(|| "-".into())));
    for (label, name) in CERTIFICATES {
        pairs.push((label, expiry_text(sample(&all, name), now)));
    }
    let rows: Vec<Vec<String>> = STAGES
        .iter()
        .map(|(label, name)| match histogram(&all, name) {
            Some(h) => vec![
                label.to_string(),
                format!("{:.0}", h.count),
                h.mean.map_or_else(|| "-".into(), ms),
                bound_text(h.p50),
                bound_text(h.p99),
            ],
            None => vec![
                label.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        })
        .collect();
    format!(
        "{}\n{}",
        key_values(&pairs),
        render(&["stage", "count", "mean", "half", "99%"], &rows)
    )
}

/// The JSON form: `{counts: {label: n}, webhookReceiverDown, stages: {name: {count,
/// meanSeconds, p50AtMostSeconds, p99AtMostSeconds}}}` (`null` where not exported; a
/// percentile above the largest finite bucket is `"+Inf"`).
pub fn stats_json(text: &str) -> Value {
    stats_json_at(text, time::OffsetDateTime::now_utc())
}

fn stats_json_at(text: &str, now: time::OffsetDateTime) -> Value {
    let all = samples(text);
    let counts: Map<String, Value> = COUNTS
        .iter()
        .map(|(_, name)| (name.to_string(), json!(sample(&all, name))))
        .collect();
    let bound = |b: Bound| match b {
        Bound::NoData => Value::Null,
        Bound::AtMost(secs) => json!(secs),
        Bound::AboveBuckets => json!("+Inf"),
    };
    let stages: Map<String, Value> = STAGES
        .iter()
        .map(|(_, name)| {
            let v = match histogram(&all, name) {
                Some(h) => json!({
                    "count": h.count,
                    "meanSeconds": h.mean,
                    "p50AtMostSeconds": bound(h.p50),
                    "p99AtMostSeconds": bound(h.p99),
                }),
                None => Value::Null,
            };
            (name.to_string(), v)
        })
        .collect();
    let certificates: Map<String, Value> = CERTIFICATES
        .iter()
        .map(|(_, name)| {
            let v = match expiry(sample(&all, name), now) {
                Some((date, days, _)) => json!({"expiresAt": date, "daysLeft": days}),
                None => Value::Null,
            };
            (name.to_string(), v)
        })
        .collect();
    json!({
        "counts": counts,
        "webhookReceiverDown": sample(&all, "caas_webhook_receiver_down").map(|v| v > 0.0),
        "stages": stages,
        "certificates": certificates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP caas_accept_seconds x\n# TYPE caas_accept_seconds histogram\n\
        caas_accept_seconds_bucket{le=\"0.0005\"} 60\n\
        caas_accept_seconds_bucket{le=\"0.001\"} 98\n\
        caas_accept_seconds_bucket{le=\"0.002\"} 99\n\
        caas_accept_seconds_bucket{le=\"+Inf\"} 100\n\
        caas_accept_seconds_sum 0.06\ncaas_accept_seconds_count 100\n\
        caas_requests_total{state=\"created\"} 100\ncaas_webhook_receiver_down 1\n\
        caas_https_cert_expires_at_seconds 1767225600\ncaas_mqtts_cert_expires_at_seconds 0\n";

    #[test]
    fn a_histogram_gives_its_mean_and_the_buckets_half_and_99_percent_fell_under() {
        let all = samples(TEXT);
        let h = histogram(&all, "caas_accept_seconds").unwrap();
        assert_eq!(h.count, 100.0);
        assert!((h.mean.unwrap() - 0.0006).abs() < 1e-12);
        assert_eq!(h.p50, Bound::AtMost(0.0005));
        assert_eq!(h.p99, Bound::AtMost(0.002));
        assert_eq!(histogram(&all, "caas_store_flush_seconds"), None);
    }

    #[test]
    fn the_text_and_json_show_what_is_exported_and_a_dash_or_null_for_the_rest() {
        // The IoT API certificate expired on 2026-01-01; the MQTT listener is off.
        let after = time::OffsetDateTime::from_unix_timestamp(1_767_225_600 + 3_600).unwrap();
        let text = stats_text_at(TEXT, after);
        let https = text
            .lines()
            .find(|l| l.starts_with("IoT API TLS certificate"))
            .unwrap();
        assert!(
            https.contains("2026-01-01T00:00:00Z") && https.contains("EXPIRED"),
            "{https}"
        );
        let mqtts = text
            .lines()
            .find(|l| l.starts_with("MQTT TLS certificate"))
            .unwrap();
        assert!(mqtts.ends_with('-'), "{mqtts}");
        let before =
            time::OffsetDateTime::from_unix_timestamp(1_767_225_600 - 25 * 86_400).unwrap();
        let v = stats_json_at(TEXT, before);
        assert_eq!(
            v["certificates"]["caas_https_cert_expires_at_seconds"],
            json!({"expiresAt": "2026-01-01T00:00:00Z", "daysLeft": 25})
        );
        assert_eq!(
            v["certificates"]["caas_mqtts_cert_expires_at_seconds"],
            Value::Null
        );
        assert!(stats_text_at(TEXT, before).contains("2026-01-01T00:00:00Z (25 days left)"));
        let text = stats_text(TEXT);
        assert!(text.contains("requests created"), "{text}");
        assert!(text.contains("down (probed once a second)"), "{text}");
        let answered = text
            .lines()
            .find(|l| l.starts_with("answered"))
            .unwrap_or_default();
        assert!(
            answered.contains("100") && answered.contains("0.60 ms"),
            "{text}"
        );
        assert!(
            answered.contains("≤ 0.50 ms") && answered.contains("≤ 2.00 ms"),
            "{text}"
        );
        let flush = text.lines().find(|l| l.starts_with("store flush")).unwrap();
        assert!(flush.ends_with('-'), "{flush}");
        let v = stats_json(TEXT);
        assert_eq!(v["counts"]["caas_requests_total{state=\"created\"}"], 100.0);
        assert_eq!(v["counts"]["caas_connected_cars"], Value::Null);
        assert_eq!(v["webhookReceiverDown"], true);
        assert_eq!(
            v["stages"]["caas_accept_seconds"]["p99AtMostSeconds"],
            0.002
        );
        assert_eq!(v["stages"]["caas_store_flush_seconds"], Value::Null);
    }
}
