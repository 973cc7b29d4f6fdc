//! The gateway's settings: command line, `CAAS_GATEWAY_*` environment, TOML file, defaults.
//!
//! Precedence: command line, then environment, then the `--config` file, then the defaults
//! below. Every name is the same in all three places (`--attempt-timeout`,
//! `CAAS_GATEWAY_ATTEMPT_TIMEOUT`, `attempt-timeout = "60s"` in the file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;

/// The API token used when none is configured. Printed at start; never use it outside a laptop.
pub const DEV_API_TOKEN: &str = "dev-token";

/// PEM files for TLS: the CA that signs the other side's certificate, our certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate (PEM) that client (or broker) certificates must chain to.
    pub ca: PathBuf,
    /// Our certificate chain (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM).
    pub key: PathBuf,
}

/// The IoT API's TLS listener (`--https`): our certificate chain and key (PEM), and
/// optionally the CA whose client certificates callers must present.
#[derive(Debug, Clone)]
pub struct HttpsFiles {
    /// Our certificate chain (PEM), e.g. a server certificate from `caasctl certs init`.
    pub cert: PathBuf,
    /// Our private key (PEM).
    pub key: PathBuf,
    /// With it, a caller must present a client certificate this CA (PEM) signed, as well as
    /// the bearer token.
    pub client_ca: Option<PathBuf>,
}

/// How the gateway's log lines are written (to standard error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log collectors.
    Json,
}

/// The seed's retry policy: attempts, a timeout per attempt, backoff between attempts.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts before the request is given up (at least 1).
    pub attempts: u32,
    /// How long each attempt (and the final status probe) waits for the car's report.
    pub attempt_timeout: Duration,
    /// Pause after failed attempt `k` (1-based) is `backoff[min(k, len) - 1]`. There is no
    /// pause after the last attempt (the status probe follows its timeout), so with the
    /// defaults (4 attempts; 1, 5, 15, 30 min, the seed's intervals) the pauses are 1, 5 and
    /// 15 min, and 30 min serves every pause past the third when `attempts` is raised.
    pub backoff: Vec<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            attempt_timeout: Duration::from_secs(60),
            backoff: vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(900),
                Duration::from_secs(1800),
            ],
        }
    }
}

impl RetryPolicy {
    /// The pause after failed attempt `attempt` (1-based).
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) as usize - 1).min(self.backoff.len().saturating_sub(1));
        self.backoff
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Everything the gateway needs to run. [`Config::default`] serves on loopback only.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address (port 0 picks a free port).
    pub http: SocketAddr,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// No plain HTTP listener (`--no-http`): the IoT API only on [`Config::https`].
    pub no_http: bool,
    /// The IoT API over TLS, on this address, with [`Config::https_files`].
    pub https: Option<SocketAddr>,
    /// The certificate and key of [`Config::https`].
    pub https_files: Option<HttpsFiles>,
    /// Embedded broker's plain MQTT listener (port 0 picks a free port); `None` for none.
    pub mqtt: Option<SocketAddr>,
    /// Embedded broker's TLS listener with client certificates (needs `tls`).
    pub mqtts: Option<SocketAddr>,
    /// TLS files: server side for `mqtts`, client side for an `mqtts://` external broker.
    pub tls: Option<TlsFiles>,
    /// The CA's certificate revocation list (PEM) for `mqtts`: revoked car certificates are
    /// refused, and the file is read again when it changes (see `tlsfront`).
    pub tls_crl: Option<PathBuf>,
    /// External broker URL (`mqtt://host:port` or `mqtts://host:port`) instead of the embedded one.
    pub broker: Option<String>,
    /// Data directory (sled database, signing key).
    pub data: PathBuf,
    /// Signing key file (64 hex digits); generated when absent. Default `DATA/signing.key`.
    pub signing_key: Option<PathBuf>,
    /// Where callbacks are POSTed; `None` records results without calling anyone.
    pub webhook_url: Option<String>,
    /// CA certificates (PEM) trusted for an `https://` webhook URL besides the public roots
    /// (a receiver with a certificate from a private CA).
    pub webhook_ca: Option<PathBuf>,
    /// HMAC-SHA256 key of the callback signature.
    pub webhook_secret: String,
    /// The old callback key, while the receiver moves to a new one: each callback is also
    /// signed with it, in `X-CaaS-Signature-Previous`, so a receiver still on the old key
    /// keeps taking callbacks. Give the new key as `webhook_secret` and the old one here,
    /// switch the receiver, then drop this.
    pub webhook_secret_previous: Option<String>,
    /// Bearer token every route but `/healthz` requires.
    pub api_token: String,
    /// A second token taken as well, while clients move to a new one: give the new token as
    /// `api_token` and the old one here, switch the clients, and drop this once
    /// `caas_api_previous_token_uses_total` stops growing.
    pub api_token_previous: Option<String>,
    /// Retry policy of activations and deactivations.
    pub retry: RetryPolicy,
    /// How long a signed command stays valid (its `not_after - issued_at`).
    pub command_ttl: Duration,
    /// How long final requests, campaigns and support tickets are kept after they were made;
    /// older ones are removed from the store in the background, so that it does not grow
    /// for ever (at 1,000 requests a second, tens of GB a day). A request in flight, or
    /// final with its callback not yet delivered, is kept whatever its age.
    pub retention: Duration,
    /// Engine shards (threads owning disjoint sets of cars), at least 1; by default half the
    /// cores ([`default_threads`]).
    pub shards: usize,
    /// Embedded broker routers (cars are spread over them by VIN), at least 1; by default half
    /// the cores ([`default_threads`]). Our rumqttd patch looks exact filters up, so a
    /// router's matching no longer grows with the square of its cars; more routers only
    /// spread the routing over threads.
    pub broker_shards: usize,
    /// Requests an external broker's client holds before a flusher waits for it: our commands
    /// (MQTT publishes), queued by the engine's flushers while the client writes them out
    /// ([`crate::mqtt::OUT_QUEUE`] by default, at least 1). While the broker is away they are
    /// deferred instead ([`crate::mqtt::Publisher::publish`]).
    pub broker_queue: usize,
    /// Worker threads of the binary's async runtime (the IoT API, the embedded broker's car
    /// connections, the MQTT client), at least 1; by default one per core ([`cores`]). Only
    /// `caas-gateway serve` reads it: a program embedding the gateway with [`crate::start`]
    /// runs it on its own runtime. On 2 cores one worker against two gave the same
    /// 19,000-car campaigns (1.69-1.90 s against 1.64-1.76 s, gateway CPU per car 88-106 µs
    /// against 87-95 µs; 3 rounds of `caas-sim bench`, alternating), though a scratch rig
    /// without callbacks had shown 8% less gateway CPU per car with one. Tried again with six
    /// alternated pairs: one worker switched context half as often and used 7% less CPU per
    /// activation at 1,000/s (0.86-1.00×), but campaigns were no faster (2.09 / 2.22 s against
    /// 2.08 / 2.16 s, first / repeat), and with one worker anything that holds it (a slow
    /// store read in a handler) holds every car's connection, so the default stays.
    pub runtime_threads: usize,
    /// Most memory sled keeps as its page cache, in MiB: past it pages are evicted and read
    /// back from disk when needed. 128 MiB holds a 19,000-car campaign's working set; a
    /// bigger cache only kept growing the process (each new MiB zeroed by the kernel), and
    /// 19,000-car campaigns ran ~4% less gateway CPU with 128 MiB than with sled's 1 GiB.
    pub store_cache_mb: u64,
    /// Heap faulted in ahead of need, in MiB ([`crate::heap`]): `None` sizes it from the
    /// fleet, `Some(0)` turns it off.
    pub heap_reserve_mb: Option<u64>,
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default number of engine shards and of broker routers: half the cores, at least 1.
/// The gateway's other threads (the async runtime's workers, one per core; the callback
/// senders; sled's IO threads) need cores too, and more busy threads than cores only add
/// context switches and cut the batches a shard commits and verifies at once into smaller
/// ones. On 2 cores, 2 + 2 against 4 + 4 took 19,000-car campaigns 2.13 s against 2.19 s
/// (repeats) and 2.18 s against 2.27 s (first after a start), with ~6% less gateway CPU (9
/// campaigns each, alternating); then 1 + 1 against 2 + 2 took them 1.70-1.85 s against
/// 1.84-2.04 s with 87-98 µs of gateway CPU per car against 103-116 µs (2 rounds of 2
/// campaigns, alternating), and one shard alone (2 routers) used 7% less gateway CPU per
/// activation at 3,000 activations/s with 35% fewer store flushes.
pub fn default_threads() -> usize {
    (cores() / 2).max(1)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log_format: LogFormat::Text,
            no_http: false,
            https: None,
            https_files: None,
            mqtt: Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
            mqtts: None,
            tls: None,
            tls_crl: None,
            broker: None,
            data: PathBuf::from("./data/gateway"),
            signing_key: None,
            webhook_url: None,
            webhook_ca: None,
            webhook_secret: String::new(),
            webhook_secret_previous: None,
            api_token: DEV_API_TOKEN.to_owned(),
            api_token_previous: None,
            retry: RetryPolicy::default(),
            command_ttl: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(30 * 24 * 3600),
            shards: default_threads(),
            broker_shards: default_threads(),
            broker_queue: crate::mqtt::OUT_QUEUE,
            runtime_threads: cores(),
            store_cache_mb: 128,
            heap_reserve_mb: None,
        }
    }
}

impl Config {
    /// The signing key path actually used.
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key
            .clone()
            .unwrap_or_else(|| self.data.join("signing.key"))
    }

    /// Checks combinations that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.retry.attempts == 0 {
            bail!("--attempts must be at least 1");
        }
        if self.retry.backoff.is_empty() {
            bail!("--backoff needs at least one duration");
        }
        match (self.https.is_some(), self.https_files.is_some()) {
            (true, false) => bail!("--https needs --https-cert and --https-key"),
            (false, true) => bail!("--https-cert, --https-key and --https-client-ca need --https"),
            _ => {}
        }
        if self.no_http && self.https.is_none() {
            bail!("--no-http needs --https: the IoT API would have no listener");
        }
        if self.webhook_ca.is_some() && self.webhook_url.is_none() {
            bail!("--webhook-ca needs --webhook-url");
        }
        if self.mqtts.is_some() && self.tls.is_none() {
            bail!("--mqtts needs --tls-ca, --tls-cert and --tls-key");
        }
        if self.tls_crl.is_some() && self.mqtts.is_none() {
            bail!(
                "--tls-crl is for the embedded broker's --mqtts listener (an external broker \
                 checks revocation itself: Mosquitto's crlfile)"
            );
        }
        if let Some(url) = &self.broker {
            let (scheme, _) = split_broker_url(url)?;
            if scheme == "mqtts" && self.tls.is_none() {
                bail!("an mqtts:// broker needs --tls-ca, --tls-cert and --tls-key");
            }
        }
        if self.broker_shards == 0 {
            bail!("broker shards must be at least 1");
        }
        if self.broker_queue == 0 {
            bail!("broker queue must be at least 1");
        }
        if self.runtime_threads == 0 {
            bail!("runtime threads must be at least 1");
        }
        if self.store_cache_mb == 0 {
            bail!("store cache must be at least 1 MiB");
        }
        if self.shards == 0 {
            bail!("shards must be at least 1");
        }
        if self.retention.is_zero() {
            bail!("--retention must be above zero");
        }
        if self.api_token.trim().is_empty() {
            bail!("--api-token must not be empty");
        }
        if let Some(previous) = &self.api_token_previous {
            if previous.trim().is_empty() || *previous == self.api_token {
                bail!("--api-token-previous must be the old token: not empty, not --api-token");
            }
        }
        if let Some(url) = &self.webhook_url {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| anyhow!("--webhook-url {url:?}: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                bail!("--webhook-url {url:?}: the scheme must be http or https");
            }
            // With an empty key anyone could sign a callback the backend would accept as
            // ours (and charge on).
            if self.webhook_secret.is_empty() {
                bail!("--webhook-url needs --webhook-secret (the callbacks' HMAC key)");
            }
        }
        if let Some(previous) = &self.webhook_secret_previous {
            if previous.is_empty() || *previous == self.webhook_secret {
                bail!(
                    "--webhook-secret-previous must be the old callback key: not empty, not \
                     --webhook-secret"
                );
            }
        }
        Ok(())
    }
}

/// Splits `mqtt://host:port` into its scheme and `host:port`.
pub(crate) fn split_broker_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("broker URL {url:?} is not scheme://host:port"))?;
    if scheme != "mqtt" && scheme != "mqtts" {
        bail!("broker URL scheme must be mqtt or mqtts, not {scheme:?}");
    }
    let rest = rest.trim_end_matches('/');
    if !rest.contains(':') {
        bail!("broker URL {url:?} needs a port");
    }
    Ok((scheme, rest))
}

/// Parses `500ms`, `2s`, `1m`, `1h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 60s"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(24 * 3600)),
        _ => bail!("{text:?}: unit must be ms, s, m, h or d"),
    })
}

/// Parses a comma-separated list of durations (`1m,5m,15m,30m`).
pub fn parse_duration_list(text: &str) -> anyhow::Result<Vec<Duration>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_duration)
        .collect()
}

/// `caas-gateway serve` options; each also reads `CAAS_GATEWAY_<NAME>` and the config file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// HTTP listen address [default: 127.0.0.1:8080]
    #[arg(long, env = "CAAS_GATEWAY_HTTP")]
    pub http: Option<SocketAddr>,
    /// Log lines as readable text or as one JSON object per line [default: text]
    #[arg(long, value_enum, env = "CAAS_GATEWAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// No plain HTTP listener: the IoT API only over TLS (--https)
    #[arg(long, env = "CAAS_GATEWAY_NO_HTTP", conflicts_with = "http")]
    #[serde(default)]
    pub no_http: bool,
    /// The IoT API over TLS on this address too (needs --https-cert and --https-key)
    #[arg(long, env = "CAAS_GATEWAY_HTTPS")]
    pub https: Option<SocketAddr>,
    /// Certificate chain (PEM) of --https; read again when the file changes
    #[arg(long, env = "CAAS_GATEWAY_HTTPS_CERT")]
    pub https_cert: Option<PathBuf>,
    /// Private key (PEM) of --https; read again when the file changes
    #[arg(long, env = "CAAS_GATEWAY_HTTPS_KEY")]
    pub https_key: Option<PathBuf>,
    /// Callers of --https must present a client certificate this CA (PEM) signed, besides
    /// the API token
    #[arg(long, env = "CAAS_GATEWAY_HTTPS_CLIENT_CA")]
    pub https_client_ca: Option<PathBuf>,
    /// Embedded broker's plain MQTT listener [default: 127.0.0.1:1883]
    #[arg(long, env = "CAAS_GATEWAY_MQTT")]
    pub mqtt: Option<SocketAddr>,
    /// No plain MQTT listener: with --mqtts, cars connect only with their certificates
    /// (the plain listener has no client authentication, so any local process could read
    /// commands or claim cars' presence on it)
    #[arg(long, env = "CAAS_GATEWAY_NO_MQTT", conflicts_with = "mqtt")]
    #[serde(default)]
    pub no_mqtt: bool,
    /// Embedded broker's TLS listener with client certificates (cert O = VIN)
    #[arg(long, env = "CAAS_GATEWAY_MQTTS")]
    pub mqtts: Option<SocketAddr>,
    /// Use an external broker instead: mqtt://host:port or mqtts://host:port
    #[arg(long, env = "CAAS_GATEWAY_BROKER")]
    pub broker: Option<String>,
    /// CA certificate (PEM)
    #[arg(long, env = "CAAS_GATEWAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Our certificate (PEM)
    #[arg(long, env = "CAAS_GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Our private key (PEM)
    #[arg(long, env = "CAAS_GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA's certificate revocation list (PEM, `caasctl certs revoke`) for --mqtts:
    /// revoked car certificates are refused, and the file is read again when it changes
    #[arg(long, env = "CAAS_GATEWAY_TLS_CRL")]
    pub tls_crl: Option<PathBuf>,
    /// Data directory [default: ./data/gateway]
    #[arg(long, env = "CAAS_GATEWAY_DATA")]
    pub data: Option<PathBuf>,
    /// Signing key file, generated when absent [default: DATA/signing.key]
    #[arg(long, env = "CAAS_GATEWAY_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Callback URL
    #[arg(long, env = "CAAS_GATEWAY_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// CA certificates (PEM) trusted for an https:// --webhook-url, besides the public roots
    #[arg(long, env = "CAAS_GATEWAY_WEBHOOK_CA")]
    pub webhook_ca: Option<PathBuf>,
    /// Callback HMAC secret
    #[arg(long, env = "CAAS_GATEWAY_WEBHOOK_SECRET")]
    pub webhook_secret: Option<String>,
    /// The old callback HMAC secret during a rotation: callbacks are signed with it too, in
    /// X-CaaS-Signature-Previous (drop it once the receiver has the new one)
    #[arg(long, env = "CAAS_GATEWAY_WEBHOOK_SECRET_PREVIOUS")]
    pub webhook_secret_previous: Option<String>,
    /// API bearer token [default: dev-token]
    #[arg(long, env = "CAAS_GATEWAY_API_TOKEN")]
    pub api_token: Option<String>,
    /// The old API token, still taken during a rotation (drop it once
    /// caas_api_previous_token_uses_total stops growing)
    #[arg(long, env = "CAAS_GATEWAY_API_TOKEN_PREVIOUS")]
    pub api_token_previous: Option<String>,
    /// Attempts per request [default: 4]
    #[arg(long, env = "CAAS_GATEWAY_ATTEMPTS")]
    pub attempts: Option<u32>,
    /// Timeout per attempt [default: 60s]
    #[arg(long, env = "CAAS_GATEWAY_ATTEMPT_TIMEOUT")]
    pub attempt_timeout: Option<String>,
    /// Backoff between attempts [default: 1m,5m,15m,30m]
    #[arg(long, env = "CAAS_GATEWAY_BACKOFF")]
    pub backoff: Option<String>,
    /// Validity of a signed command [default: 24h]
    #[arg(long, env = "CAAS_GATEWAY_COMMAND_TTL")]
    pub command_ttl: Option<String>,
    /// How long final requests, campaigns and support tickets are kept [default: 30d]
    #[arg(long, env = "CAAS_GATEWAY_RETENTION")]
    pub retention: Option<String>,
    /// Engine shards [default: half the cores, at least 1]
    #[arg(long, env = "CAAS_GATEWAY_SHARDS")]
    pub shards: Option<usize>,
    /// Embedded broker routers, cars spread over them by VIN [default: half the cores, at least 1]
    #[arg(long, env = "CAAS_GATEWAY_BROKER_SHARDS")]
    pub broker_shards: Option<usize>,
    /// Commands an external broker's client holds before the engine waits for it [default: 65536]
    #[arg(long, env = "CAAS_GATEWAY_BROKER_QUEUE")]
    pub broker_queue: Option<usize>,
    /// Async runtime worker threads (IoT API, car connections) [default: one per core]
    #[arg(long, env = "CAAS_GATEWAY_RUNTIME_THREADS")]
    pub runtime_threads: Option<usize>,
    /// The store's page cache, MiB [default: 128]
    #[arg(long, env = "CAAS_GATEWAY_STORE_CACHE_MB")]
    pub store_cache_mb: Option<u64>,
    /// Heap faulted in ahead of need, MiB (at most half of RAM); 0 turns it off [default: 64
    /// MiB plus 40 KiB per car (12 KiB with an external broker), at most a quarter of RAM]
    #[arg(long, env = "CAAS_GATEWAY_HEAP_RESERVE_MB")]
    pub heap_reserve_mb: Option<u64>,
    /// TOML file with the same names (kebab-case)
    #[arg(long, env = "CAAS_GATEWAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

impl ServeArgs {
    /// Fills what the command line and environment left unset from `--config`, then defaults.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let file: ServeArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let a = self.merge(file);
        let d = Config::default();
        let tls = match (a.tls_ca, a.tls_cert, a.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
            (None, None, None) => None,
            _ => bail!("--tls-ca, --tls-cert and --tls-key go together"),
        };
        if a.no_http && a.http.is_some() {
            bail!("--no-http and --http contradict each other");
        }
        let https_files = match (a.https_cert, a.https_key, a.https_client_ca) {
            (Some(cert), Some(key), client_ca) => Some(HttpsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            _ => bail!("--https-cert and --https-key go together (--https-client-ca needs both)"),
        };
        if a.no_mqtt && a.mqtt.is_some() {
            bail!("--no-mqtt and --mqtt contradict each other");
        }
        let mut retry = RetryPolicy::default();
        if let Some(n) = a.attempts {
            retry.attempts = n;
        }
        if let Some(t) = &a.attempt_timeout {
            retry.attempt_timeout = parse_duration(t).context("--attempt-timeout")?;
        }
        if let Some(b) = &a.backoff {
            retry.backoff = parse_duration_list(b).context("--backoff")?;
        }
        let config = Config {
            http: a.http.unwrap_or(d.http),
            log_format: a.log_format.unwrap_or(d.log_format),
            no_http: a.no_http,
            https: a.https,
            https_files,
            // An external broker replaces the embedded one, listeners included.
            mqtt: if a.broker.is_some() || a.no_mqtt {
                a.mqtt
            } else {
                a.mqtt.or(d.mqtt)
            },
            mqtts: a.mqtts,
            tls,
            tls_crl: a.tls_crl,
            broker: a.broker,
            data: a.data.unwrap_or(d.data),
            signing_key: a.signing_key,
            webhook_url: a.webhook_url,
            webhook_ca: a.webhook_ca,
            webhook_secret: a.webhook_secret.unwrap_or_default(),
            webhook_secret_previous: a.webhook_secret_previous,
            api_token: a.api_token.unwrap_or(d.api_token),
            api_token_previous: a.api_token_previous,
            retry,
            command_ttl: match &a.command_ttl {
                Some(t) => parse_duration(t).context("--command-ttl")?,
                None => d.command_ttl,
            },
            retention: match &a.retention {
                Some(t) => parse_duration(t).context("--retention")?,
                None => d.retention,
            },
            shards: a.shards.unwrap_or(d.shards),
            broker_shards: a.broker_shards.unwrap_or(d.broker_shards),
            broker_queue: a.broker_queue.unwrap_or(d.broker_queue),
            runtime_threads: a.runtime_threads.unwrap_or(d.runtime_threads),
            store_cache_mb: a.store_cache_mb.unwrap_or(d.store_cache_mb),
            heap_reserve_mb: a.heap_reserve_mb,
        };
        config.validate()?;
        Ok(config)
    }

    fn merge(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            http: self.http.or(file.http),
            log_format: self.log_format.or(file.log_format),
            no_http: self.no_http || file.no_http,
            https: self.https.or(file.https),
            https_cert: self.https_cert.or(file.https_cert),
            https_key: self.https_key.or(file.https_key),
            https_client_ca: self.https_client_ca.or(file.https_client_ca),
            mqtt: self.mqtt.or(file.mqtt),
            no_mqtt: self.no_mqtt || file.no_mqtt,
            mqtts: self.mqtts.or(file.mqtts),
            broker: self.broker.or(file.broker),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_crl: self.tls_crl.or(file.tls_crl),
            data: self.data.or(file.data),
            signing_key: self.signing_key.or(file.signing_key),
            webhook_url: self.webhook_url.or(file.webhook_url),
            webhook_ca: self.webhook_ca.or(file.webhook_ca),
            webhook_secret: self.webhook_secret.or(file.webhook_secret),
            webhook_secret_previous: self
                .webhook_secret_previous
                .or(file.webhook_secret_previous),
            api_token: self.api_token.or(file.api_token),
            api_token_previous: self.api_token_previous.or(file.api_token_previous),
            attempts: self.attempts.or(file.attempts),
            attempt_timeout: self.attempt_timeout.or(file.attempt_timeout),
            backoff: self.backoff.or(file.backoff),
            command_ttl: self.command_ttl.or(file.command_ttl),
            retention: self.retention.or(file.retention),
            shards: self.shards.or(file.shards),
            broker_shards: self.broker_shards.or(file.broker_shards),
            broker_queue: self.broker_queue.or(file.broker_queue),
            runtime_threads: self.runtime_threads.or(file.runtime_threads),
            store_cache_mb: self.store_cache_mb.or(file.store_cache_mb),
            heap_reserve_mb: self.heap_reserve_mb.or(file.heap_reserve_mb),
            config: self.config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(parse_duration_list("1m,5m").unwrap().len(), 2);
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "http = \"127.0.0.1:9999\"\nattempts = 2\nbackoff = \"1s,2s\"\nstore-cache-mb = 64\nheap-reserve-mb = 0\nruntime-threads = 3\nlog-format = \"json\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            attempts: Some(3),
            config: Some(path),
            ..Default::default()
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.http.port(), 9999);
        assert_eq!(c.retry.attempts, 3);
        assert_eq!(
            c.retry.backoff,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(c.retry.backoff_after(5), Duration::from_secs(2));
        assert_eq!(c.store_cache_mb, 64);
        assert_eq!(c.heap_reserve_mb, Some(0));
        assert_eq!(c.runtime_threads, 3);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            ServeArgs::default().into_config().unwrap().log_format,
            LogFormat::Text
        );
        assert_eq!(
            ServeArgs::default().into_config().unwrap().runtime_threads,
            cores()
        );
        assert_eq!(
            ServeArgs::default().into_config().unwrap().heap_reserve_mb,
            None
        );
        assert!(ServeArgs {
            store_cache_mb: Some(0),
            ..Default::default()
        }
        .into_config()
        .is_err());
        assert!(ServeArgs {
            runtime_threads: Some(0),
            ..Default::default()
        }
        .into_config()
        .is_err_and(|e| e.to_string().contains("runtime threads")));
        for url in ["not a url", "ftp://example.com/hook", "http://"] {
            let r = ServeArgs {
                webhook_url: Some(url.into()),
                webhook_secret: Some("s3cret".into()),
                ..Default::default()
            }
            .into_config()
            .and_then(|c| c.validate());
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.to_string().contains("--webhook-url")),
                "{url}: {r:?}"
            );
        }
        let hook = || ServeArgs {
            webhook_url: Some("https://backend.example/caas/webhooks/ota-status".into()),
            ..Default::default()
        };
        let unsigned = hook().into_config();
        assert!(
            unsigned
                .as_ref()
                .is_err_and(|e| e.to_string().contains("--webhook-secret")),
            "{unsigned:?}"
        );
        let ok = ServeArgs {
            webhook_secret: Some("s3cret".into()),
            ..hook()
        }
        .into_config()
        .and_then(|c| c.validate());
        assert!(ok.is_ok(), "{ok:?}");
        // During a rotation the old key signs too; it must be an old key, not the new one.
        for (previous, valid) in [("old-s3cret", true), ("s3cret", false), ("", false)] {
            let r = ServeArgs {
                webhook_secret: Some("s3cret".into()),
                webhook_secret_previous: Some(previous.into()),
                ..hook()
            }
            .into_config()
            .and_then(|c| c.validate());
            assert_eq!(r.is_ok(), valid, "{previous:?}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("--webhook-secret-previous"), "{e}");
            }
        }
        let closed = ServeArgs {
            no_mqtt: true,
            ..Default::default()
        }
        .into_config()
        .unwrap();
        assert_eq!(closed.mqtt, None, "--no-mqtt: no plain listener");
        assert_eq!(
            ServeArgs::default().into_config().unwrap().mqtt,
            Some("127.0.0.1:1883".parse().unwrap())
        );
        let both = dir.path().join("both.toml");
        std::fs::write(&both, "no-mqtt = true\nmqtt = \"127.0.0.1:1999\"\n").unwrap();
        assert!(ServeArgs {
            config: Some(both),
            ..Default::default()
        }
        .into_config()
        .is_err_and(|e| e.to_string().contains("--no-mqtt")));
        let rotating = dir.path().join("rotating.toml");
        std::fs::write(
            &rotating,
            "api-token = \"new\"\napi-token-previous = \"old\"\n",
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(rotating),
            ..Default::default()
        }
        .into_config()
        .unwrap();
        assert_eq!(
            (c.api_token.as_str(), c.api_token_previous.as_deref()),
            ("new", Some("old"))
        );
        for (token, previous) in [("same", "same"), ("new", " "), ("", "old")] {
            let r = ServeArgs {
                api_token: Some(token.into()),
                api_token_previous: Some(previous.into()),
                ..Default::default()
            }
            .into_config();
            assert!(
                r.is_err_and(|e| e.to_string().contains("--api-token")),
                "{token:?} {previous:?}"
            );
        }
    }

    #[test]
    fn the_tls_api_flags_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("https.toml");
        std::fs::write(
            &served,
            "https = \"0.0.0.0:8443\"\nhttps-cert = \"api.pem\"\nhttps-key = \"api.key\"\nno-http = true\n",
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(served),
            ..Default::default()
        }
        .into_config()
        .unwrap();
        assert_eq!(c.https, Some("0.0.0.0:8443".parse().unwrap()));
        assert!(c.no_http);
        let files = c.https_files.unwrap();
        assert_eq!(
            (files.cert.to_str(), files.key.to_str(), files.client_ca),
            (Some("api.pem"), Some("api.key"), None)
        );
        let https = || ServeArgs {
            https: Some("127.0.0.1:8443".parse().unwrap()),
            https_cert: Some("api.pem".into()),
            https_key: Some("api.key".into()),
            ..Default::default()
        };
        let refused = [
            (
                ServeArgs {
                    https_cert: None,
                    ..https()
                },
                "--https-cert",
            ),
            (
                ServeArgs {
                    https: None,
                    ..https()
                },
                "--https",
            ),
            (
                ServeArgs {
                    https: None,
                    https_cert: None,
                    https_key: None,
                    https_client_ca: Some("clients.pem".into()),
                    ..Default::default()
                },
                "--https-client-ca",
            ),
            (
                ServeArgs {
                    no_http: true,
                    ..Default::default()
                },
                "--no-http needs --https",
            ),
            (
                ServeArgs {
                    no_http: true,
                    http: Some("127.0.0.1:8080".parse().unwrap()),
                    ..https()
                },
                "--no-http and --http",
            ),
            (
                ServeArgs {
                    webhook_ca: Some("ca.pem".into()),
                    ..https()
                },
                "--webhook-ca needs --webhook-url",
            ),
        ];
        for (args, named) in refused {
            let r = args.into_config();
            assert!(
                r.as_ref().is_err_and(|e| e.to_string().contains(named)),
                "{named}: {r:?}"
            );
        }
        let mutual = ServeArgs {
            https_client_ca: Some("clients.pem".into()),
            ..https()
        }
        .into_config()
        .unwrap();
        assert_eq!(
            mutual.https_files.unwrap().client_ca,
            Some("clients.pem".into())
        );
        assert!(!https().into_config().unwrap().no_http, "plain HTTP stays");
    }

    #[test]
    fn a_bad_config_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "nope = 1\n").unwrap();
        assert!(ServeArgs {
            config: Some(bad),
            ..Default::default()
        }
        .into_config()
        .is_err());
    }
}
