//! Prometheus counters, gauges and histograms (activation latency, store flush time), all
//! lock-free atomics.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// The IoT API's routes as `caas_http_responses_total` names them (axum's matched paths),
/// in the order of [`Metrics::http_responses`]; a route missing here counts as `other`.
pub(crate) const API_ROUTES: [&str; 17] = [
    "/ota/activate",
    "/ota/deactivate",
    "/ota/requests/{requestId}",
    "/ota/requests/{requestId}/cancel",
    "/vehicles",
    "/vehicles/{vin}",
    "/vehicles/{vin}/status",
    "/vehicles/{vin}/history",
    "/vehicles/{vin}/key",
    "/campaigns",
    "/campaigns/{campaignId}",
    "/campaigns/{campaignId}/cancel",
    "/campaigns/{campaignId}/requests",
    "/support/tickets",
    "/keys",
    "/metrics",
    "/openapi.json",
];
/// The status classes counted, in the order of each route's counters.
const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

/// Every metric the gateway exports at `GET /metrics`.
#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) requests_created: AtomicU64,
    pub(crate) requests_completed: AtomicU64,
    pub(crate) requests_failed: AtomicU64,
    pub(crate) requests_in_flight: AtomicI64,
    pub(crate) attempts: AtomicU64,
    pub(crate) probes: AtomicU64,
    pub(crate) commands_published: AtomicU64,
    /// Commands not handed to the external broker's client because it was disconnected: its
    /// reconnection re-sends every state not yet confirmed (mqtt.rs).
    pub(crate) commands_deferred: AtomicU64,
    pub(crate) reports_verified: AtomicU64,
    pub(crate) reports_refused: AtomicU64,
    pub(crate) reports_forged: AtomicU64,
    /// Messages from an external broker shed because the engine was behind (mqtt.rs).
    pub(crate) inbound_shed: AtomicU64,
    /// Records removed from the store past the retention (lib.rs `prune_forever`).
    pub(crate) pruned: AtomicU64,
    /// Requests and campaigns answered from an earlier one with the same idempotency key.
    pub(crate) idempotent_replays: AtomicU64,
    /// Requests authorised by the old API token (`--api-token-previous`).
    pub(crate) previous_token_uses: AtomicU64,
    /// Cars whose public key was replaced (`POST /vehicles/{vin}/key`).
    pub(crate) keys_replaced: AtomicU64,
    /// Cars taken out of the fleet (`DELETE /vehicles/{vin}`; a repeat does not count).
    pub(crate) vehicles_decommissioned: AtomicU64,
    /// Requests ended by a cancel (`POST /ota/requests/{id}/cancel`, `/campaigns/{id}/cancel`).
    pub(crate) requests_cancelled: AtomicU64,
    /// Campaigns stopped by their `abortWhen` rule (counted once, when the abort is recorded).
    pub(crate) campaigns_aborted: AtomicU64,
    pub(crate) connected_cars: AtomicI64,
    /// Cars the gateway knows (registered, or loaded from the store at start).
    pub(crate) cars_registered: AtomicI64,
    pub(crate) tickets: AtomicU64,
    pub(crate) webhook_deliveries: AtomicU64,
    pub(crate) webhook_failures: AtomicU64,
    /// 1 while the webhook receiver looks down (the sender only probes it).
    pub(crate) webhook_receiver_down: AtomicU64,
    /// 1 while the newest store flush failed (requests are then answered 500).
    pub(crate) store_failing: AtomicU64,
    /// 1 while the gateway has no connection to its external broker (always 0 embedded).
    pub(crate) broker_disconnected: AtomicU64,
    /// When the gateway last connected to its external broker (Unix ms; 0 embedded): until
    /// an attempt timeout after that, timed-out attempts do not count (engine.rs).
    pub(crate) broker_connected_at_ms: AtomicU64,
    pub(crate) flushes: AtomicU64,
    /// Bytes of heap the warmer faulted in ahead of need (heap.rs).
    pub(crate) heap_prefaulted_bytes: AtomicU64,
    /// mTLS handshakes refused because the car's certificate is revoked (tlsfront.rs).
    pub(crate) revoked_refused: AtomicU64,
    /// Car connections closed because a newer revocation list revoked their certificate.
    pub(crate) revoked_closed: AtomicU64,
    /// Revocation list files that could not be loaded (the list in force stays).
    pub(crate) crl_failures: AtomicU64,
    /// Certificates the revocation list in force revokes.
    pub(crate) crl_entries: AtomicU64,
    /// When the IoT API's TLS certificate in force expires (Unix seconds; 0 without --https).
    pub(crate) https_cert_expires_at: AtomicU64,
    /// When the mTLS front's certificate in force expires (Unix seconds; 0 without --mqtts).
    pub(crate) mqtts_cert_expires_at: AtomicU64,
    /// External broker client TLS sets loaded again at a reconnection after a file changed.
    pub(crate) broker_tls_reloads: AtomicU64,
    /// Changed external broker client TLS sets that did not load (the one in force stays).
    pub(crate) broker_tls_reload_failures: AtomicU64,
    /// mTLS front certificate sets loaded again after a file changed (tlsfront.rs).
    pub(crate) mqtts_cert_reloads: AtomicU64,
    /// Changed mTLS front certificate sets that did not load (the one in force stays).
    pub(crate) mqtts_cert_reload_failures: AtomicU64,
    /// IoT API responses by route ([`API_ROUTES`], then `other`) and status class
    /// ([`STATUS_CLASSES`]).
    http_responses: [[AtomicU64; 3]; API_ROUTES.len() + 1],
    /// IoT API calls refused for a missing or wrong token (a guessing caller shows here).
    pub(crate) unauthorized: AtomicU64,
    /// IoT API TLS handshakes that failed or timed out (https.rs).
    pub(crate) https_handshake_failures: AtomicU64,
    /// IoT API certificate sets loaded again after a file changed.
    pub(crate) https_reloads: AtomicU64,
    /// Changed IoT API certificate sets that did not load (the one in force stays).
    pub(crate) https_reload_failures: AtomicU64,
    /// Cars found ahead of the store's seq, whose state went again above their own
    /// (engine.rs `resync_seq`).
    pub(crate) seq_resyncs: AtomicU64,
    latency: Histogram,
    accept_time: Histogram,
    callback_time: Histogram,
    flush_time: Histogram,
}

/// A Prometheus histogram over [`LATENCY_BUCKETS`].
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, secs: f64) {
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "{name}_bucket{{le=\"{le}\"}} {}",
                self.buckets[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {count}");
    }
}

impl Metrics {
    /// Records one request's POST-to-completion latency.
    pub(crate) fn observe_latency(&self, secs: f64) {
        self.latency.observe(secs);
    }

    /// Counts one IoT API response of `route` (a matched path) with `status`.
    pub(crate) fn count_response(&self, route: Option<&str>, status: u16) {
        let class = match status / 100 {
            2 => 0,
            4 => 1,
            5 => 2,
            _ => return,
        };
        let at = route
            .and_then(|r| API_ROUTES.iter().position(|known| *known == r))
            .unwrap_or(API_ROUTES.len());
        self.http_responses[at][class].fetch_add(1, Relaxed);
    }

    /// Records how long one single request took from its arrival to its durable answer.
    pub(crate) fn observe_accept(&self, secs: f64) {
        self.accept_time.observe(secs);
    }

    /// Records how long one callback took from its request's final state to its 2xx.
    pub(crate) fn observe_callback(&self, secs: f64) {
        self.callback_time.observe(secs);
    }

    /// Records how long one store flush took (the wait every durable answer includes).
    pub(crate) fn observe_flush(&self, secs: f64) {
        self.flush_time.observe(secs);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, labels: &[(&str, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, v) in labels {
                if l.is_empty() {
                    let _ = writeln!(s, "{name} {v}");
                } else {
                    let _ = writeln!(s, "{name}{{{l}}} {v}");
                }
            }
        };
        counter(
            "caas_requests_total",
            "IoT API requests by final state (created counts every accepted request).",
            &[
                ("state=\"created\"", self.requests_created.load(Relaxed)),
                ("state=\"completed\"", self.requests_completed.load(Relaxed)),
                ("state=\"failed\"", self.requests_failed.load(Relaxed)),
            ],
        );
        let mut responses = Vec::with_capacity(self.http_responses.len() * 3);
        for (at, counts) in self.http_responses.iter().enumerate() {
            let route = API_ROUTES.get(at).copied().unwrap_or("other");
            for (class, count) in STATUS_CLASSES.iter().zip(counts) {
                responses.push((
                    format!("route=\"{route}\",code=\"{class}\""),
                    count.load(Relaxed),
                ));
            }
        }
        let responses: Vec<(&str, u64)> = responses.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        counter(
            "caas_http_responses_total",
            "IoT API responses by route and status class (every route but /healthz).",
            &responses,
        );
        counter(
            "caas_api_unauthorized_total",
            "IoT API calls refused 401 for a missing or wrong token.",
            &[("", self.unauthorized.load(Relaxed))],
        );
        counter(
            "caas_attempts_total",
            "Command delivery attempts (first sends and retries).",
            &[("", self.attempts.load(Relaxed))],
        );
        counter(
            "caas_status_probes_total",
            "Status queries sent after the last attempt.",
            &[("", self.probes.load(Relaxed))],
        );
        counter(
            "caas_commands_published_total",
            "Signed commands published.",
            &[("", self.commands_published.load(Relaxed))],
        );
        counter(
            "caas_commands_deferred_total",
            "Signed commands not handed to the external broker while it was disconnected (its reconnection re-sends every state not yet confirmed).",
            &[("", self.commands_deferred.load(Relaxed))],
        );
        counter(
            "caas_reports_verified_total",
            "Reports whose signature verified with the car's key.",
            &[("", self.reports_verified.load(Relaxed))],
        );
        counter(
            "caas_reports_refused_total",
            "Verified reports saying the car refused a command.",
            &[("", self.reports_refused.load(Relaxed))],
        );
        counter("caas_reports_forged_total", "Reports that failed verification (bad signature, wrong VIN, unknown car) and were ignored.", &[("", self.reports_forged.load(Relaxed))]);
        counter(
            "caas_inbound_shed_total",
            "Reports and presence messages from an external broker shed because the engine was behind (the request retries).",
            &[("", self.inbound_shed.load(Relaxed))],
        );
        counter(
            "caas_store_pruned_total",
            "Final requests, campaigns, support tickets and idempotency keys removed from the store past the retention (--retention).",
            &[("", self.pruned.load(Relaxed))],
        );
        counter(
            "caas_idempotent_replays_total",
            "POSTs answered with the request or campaign an earlier one with the same Idempotency-Key made (nothing new created).",
            &[("", self.idempotent_replays.load(Relaxed))],
        );
        counter(
            "caas_requests_cancelled_total",
            "Requests in flight ended FAILED with CANCELLED by a cancel of the request or its campaign (their grants withdrawn, no charge).",
            &[("", self.requests_cancelled.load(Relaxed))],
        );
        counter(
            "caas_campaigns_aborted_total",
            "Campaigns cancelled by their abortWhen rule: too many of their finished requests refused by the cars.",
            &[("", self.campaigns_aborted.load(Relaxed))],
        );
        counter(
            "caas_vehicle_keys_replaced_total",
            "Cars whose public key was replaced (a new telematics unit): reports signed with the old key are refused since.",
            &[("", self.keys_replaced.load(Relaxed))],
        );
        counter(
            "caas_vehicles_decommissioned_total",
            "Cars taken out of the fleet (DELETE /vehicles/{vin}): their requests in flight failed DECOMMISSIONED, their grants withdrawn, their registration ended.",
            &[("", self.vehicles_decommissioned.load(Relaxed))],
        );
        counter(
            "caas_api_previous_token_uses_total",
            "Requests authorised by the old API token (--api-token-previous): a rotation is done once it stops growing.",
            &[("", self.previous_token_uses.load(Relaxed))],
        );
        counter(
            "caas_support_tickets_total",
            "Support tickets opened.",
            &[("", self.tickets.load(Relaxed))],
        );
        counter(
            "caas_webhook_deliveries_total",
            "Callbacks answered 2xx.",
            &[("", self.webhook_deliveries.load(Relaxed))],
        );
        counter(
            "caas_webhook_failures_total",
            "Callback attempts that failed (will be retried).",
            &[("", self.webhook_failures.load(Relaxed))],
        );
        counter(
            "caas_store_flushes_total",
            "sled flushes (one per engine batch that must be durable).",
            &[("", self.flushes.load(Relaxed))],
        );
        counter(
            "caas_heap_prefaulted_bytes_total",
            "Heap faulted in ahead of need by the warmer (see --heap-reserve-mb).",
            &[("", self.heap_prefaulted_bytes.load(Relaxed))],
        );
        counter(
            "caas_vehicle_seq_resyncs_total",
            "Cars whose signed report showed a seq above the newest the store issued (a restored or lost store): the seq jumped above the car's and the whole state went again.",
            &[("", self.seq_resyncs.load(Relaxed))],
        );
        counter(
            "caas_mqtts_revoked_refused_total",
            "Car TLS handshakes refused because the car's certificate is revoked (--tls-crl).",
            &[("", self.revoked_refused.load(Relaxed))],
        );
        counter(
            "caas_mqtts_revoked_closed_total",
            "Car connections closed because a changed revocation list revoked their certificate.",
            &[("", self.revoked_closed.load(Relaxed))],
        );
        counter(
            "caas_mqtts_crl_failures_total",
            "Revocation list files that could not be loaded (the list in force stays in force).",
            &[("", self.crl_failures.load(Relaxed))],
        );
        counter(
            "caas_broker_tls_reloads_total",
            "The external broker client's CA, certificate and key loaded again at a reconnection after their files changed.",
            &[("", self.broker_tls_reloads.load(Relaxed))],
        );
        counter(
            "caas_broker_tls_reload_failures_total",
            "Changed external broker client TLS files that did not load (the ones in force stay in force).",
            &[("", self.broker_tls_reload_failures.load(Relaxed))],
        );
        counter(
            "caas_mqtts_cert_reloads_total",
            "The MQTT TLS listener's CA, certificate and key loaded again after their files changed.",
            &[("", self.mqtts_cert_reloads.load(Relaxed))],
        );
        counter(
            "caas_mqtts_cert_reload_failures_total",
            "Changed MQTT TLS listener files that did not load (the ones in force stay in force).",
            &[("", self.mqtts_cert_reload_failures.load(Relaxed))],
        );
        counter(
            "caas_https_handshake_failures_total",
            "IoT API TLS handshakes that failed or timed out (--https).",
            &[("", self.https_handshake_failures.load(Relaxed))],
        );
        counter(
            "caas_https_cert_reloads_total",
            "IoT API certificate and key loaded again after their files changed.",
            &[("", self.https_reloads.load(Relaxed))],
        );
        counter(
            "caas_https_cert_reload_failures_total",
            "Changed IoT API certificate files that did not load (the ones in force stay in force).",
            &[("", self.https_reload_failures.load(Relaxed))],
        );
        let _ = writeln!(s, "# HELP caas_webhook_receiver_down 1 while the webhook receiver looks down (failures in a row; one callback at a time probes it).\n# TYPE caas_webhook_receiver_down gauge\ncaas_webhook_receiver_down {}", self.webhook_receiver_down.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_store_failing 1 while the newest store flush failed.\n# TYPE caas_store_failing gauge\ncaas_store_failing {}", self.store_failing.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_broker_disconnected 1 while the external broker is not connected.\n# TYPE caas_broker_disconnected gauge\ncaas_broker_disconnected {}", self.broker_disconnected.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_requests_in_flight Requests not yet final.\n# TYPE caas_requests_in_flight gauge\ncaas_requests_in_flight {}", self.requests_in_flight.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_connected_cars Cars whose presence is online.\n# TYPE caas_connected_cars gauge\ncaas_connected_cars {}", self.connected_cars.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_cars_registered Cars the gateway knows.\n# TYPE caas_cars_registered gauge\ncaas_cars_registered {}", self.cars_registered.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_https_cert_expires_at_seconds When the IoT API's TLS certificate in force expires (Unix time; 0 without --https).\n# TYPE caas_https_cert_expires_at_seconds gauge\ncaas_https_cert_expires_at_seconds {}", self.https_cert_expires_at.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_mqtts_cert_expires_at_seconds When the MQTT TLS listener's certificate in force expires (Unix time; 0 without --mqtts).\n# TYPE caas_mqtts_cert_expires_at_seconds gauge\ncaas_mqtts_cert_expires_at_seconds {}", self.mqtts_cert_expires_at.load(Relaxed));
        let _ = writeln!(s, "# HELP caas_mqtts_crl_entries Certificates the revocation list in force revokes.\n# TYPE caas_mqtts_crl_entries gauge\ncaas_mqtts_crl_entries {}", self.crl_entries.load(Relaxed));
        self.latency.render(
            &mut s,
            "caas_activation_latency_seconds",
            "Time from the POST's arrival to the car's confirming report.",
        );
        self.accept_time.render(
            &mut s,
            "caas_accept_seconds",
            "Time from a single activation's or deactivation's arrival to its durable 2xx answer.",
        );
        self.callback_time.render(
            &mut s,
            "caas_callback_delivery_seconds",
            "Time from a request's final state to its callback's 2xx (campaigns' and retries included).",
        );
        self.flush_time.render(
            &mut s,
            "caas_store_flush_seconds",
            "Time one store flush took (every durable answer waits for one).",
        );
        s
    }
}
