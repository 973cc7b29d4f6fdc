//! The command line, the TOML file and the environment, resolved into [`Settings`].
//!
//! Precedence: a flag on the command line, then its environment variable
//! (`CAAS_AGENT_<NAME>`), then the key of the same name in the `--config` TOML file, then
//! the default. Every problem is reported as one line naming the option and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use caas_protocol::{files, FeatureFlag, FirmwareVersion, SigningKey, VerifyingKey, Vin};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::MAX_TRUSTED_KEYS;

/// Default seconds between periodic status reports.
pub const DEFAULT_REPORT_INTERVAL_SECS: u64 = 300;
/// Default address of the diagnostic endpoint (loopback only).
pub const DEFAULT_DIAG_ADDR: &str = "127.0.0.1:7070";
/// Optional features of the default platform (the seed's catalogue).
pub const DEFAULT_OPTIONAL_FEATURES: &[&str] = caas_protocol::catalog::SEED_OPTIONAL_FEATURES;
/// Base-platform features of the default platform: no command may touch them.
pub const DEFAULT_BASE_FEATURES: &[&str] = caas_protocol::catalog::SEED_BASE_FEATURES;
/// Test hook: when this environment variable is `1`, the agent aborts right after
/// receiving a command frame, before handing it to the core (so before persisting and
/// acknowledging it). Used by the crash-recovery integration test; never set it in a car.
pub const CRASH_BEFORE_PERSIST_ENV: &str = "CAAS_AGENT_CRASH_BEFORE_PERSIST";

const RUN_AFTER_HELP: &str = "\
Precedence: command line, then the CAAS_AGENT_* environment variables, then the --config
TOML file (keys named like the long options), then the defaults.

Key files: one line of 64 hex digits (public keys for --gateway-key, the secret seed for
--device-key), as `caasctl` writes them.

MQTT: client id = VIN, persistent session; subscribes /tenants/VIN/cmd (QoS 1); publishes
signed reports on /tenants/VIN/report (QoS 1); presence `online` (retained) on every connect
and `offline` as the retained last will at /tenants/VIN/presence. A command is acknowledged
only after its state is flushed to --data and the features are switched.

Diagnostics: `curl http://127.0.0.1:7070/status` or `caasctl local status --agent 127.0.0.1:7070`.
Logs go to stderr; filter with RUST_LOG (default: info).
Exit status: 0 after SIGINT/SIGTERM; 2 for bad configuration (one line on stderr). An
unreachable broker is not fatal: the agent retries with jittered exponential backoff (up to 30 s).
Test hook (never in a car): CAAS_AGENT_CRASH_BEFORE_PERSIST=1 makes the agent abort right after
a command arrives, before it is persisted or acknowledged.";

/// The car agent for Linux telematics units: verifies signed feature commands from the
/// gateway over MQTT, persists them, switches features and answers with signed reports.
#[derive(Debug, Parser)]
#[command(name = "caas-agent", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Connect to the broker and run the agent until SIGINT/SIGTERM.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
}

/// Options of `caas-agent run`. Each can also be given as the environment variable named
/// below, or as a key of the same name in the `--config` TOML file (e.g.
/// `gateway-key = ["gw.pub", "gw-next.pub"]`); relative paths in the file are relative
/// to the file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// A TOML file with any of these options.
    #[arg(long, env = "CAAS_AGENT_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// This car's VIN (17 characters, ISO 3779). Also the MQTT client id. Required.
    #[arg(long, env = "CAAS_AGENT_VIN", value_name = "VIN")]
    pub vin: Option<String>,

    /// The MQTT broker: mqtt://HOST:PORT (plain TCP, default port 1883) or
    /// mqtts://HOST:PORT (TLS, default port 8883; needs --ca). Required.
    #[arg(long, env = "CAAS_AGENT_BROKER", value_name = "URL")]
    pub broker: Option<String>,

    /// A trusted gateway public key file (64 hex digits). Repeat it (or separate with
    /// commas in the environment) to trust the next key during a rotation; at most 3.
    /// Required.
    #[arg(
        long = "gateway-key",
        env = "CAAS_AGENT_GATEWAY_KEY",
        value_name = "FILE",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub gateway_key: Vec<PathBuf>,

    /// This car's secret key file (64 hex digits); it signs every report. Required.
    #[arg(
        long = "device-key",
        env = "CAAS_AGENT_DEVICE_KEY",
        value_name = "FILE"
    )]
    pub device_key: Option<PathBuf>,

    /// Directory for the agent's durable state (a sled database); created if missing.
    /// Required.
    #[arg(long, env = "CAAS_AGENT_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// CA certificate (PEM) that signed the broker's certificate (mqtts only).
    #[arg(long, env = "CAAS_AGENT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// This car's client certificate (PEM) for mutual TLS (mqtts only; with --key).
    #[arg(long, env = "CAAS_AGENT_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// The client certificate's private key (PEM) (mqtts only; with --cert).
    #[arg(long, env = "CAAS_AGENT_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Seconds between periodic signed status reports (0: none) [default: 300].
    #[arg(
        long = "report-interval",
        env = "CAAS_AGENT_REPORT_INTERVAL",
        value_name = "SECS"
    )]
    pub report_interval: Option<u64>,

    /// Firmware version reported in diagnostics [default: this binary's version].
    #[arg(
        long = "firmware-version",
        env = "CAAS_AGENT_FIRMWARE_VERSION",
        value_name = "VERSION"
    )]
    pub firmware_version: Option<String>,

    /// Feature flags commands may switch (comma-separated)
    /// [default: the seed catalogue, caas_protocol::catalog::SEED_OPTIONAL_FEATURES].
    #[arg(
        long = "optional-features",
        env = "CAAS_AGENT_OPTIONAL_FEATURES",
        value_name = "FLAGS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub optional_features: Vec<String>,

    /// Base-platform feature flags no command may touch (comma-separated)
    /// [default: abs,esc,airbags,headlights,basic_audio,climate].
    #[arg(
        long = "base-features",
        env = "CAAS_AGENT_BASE_FEATURES",
        value_name = "FLAGS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub base_features: Vec<String>,

    /// Program run on every feature switch, as `CMD FLAG on|off [KEY=VALUE...]` (no shell;
    /// the parameters only when switching on). It must exit 0 within 10 s; otherwise the
    /// agent logs it and reports HOOK_FAILED in its diagnostics. Without it the agent only
    /// logs the switch.
    #[arg(long, env = "CAAS_AGENT_HOOK", value_name = "CMD")]
    pub hook: Option<PathBuf>,

    /// Loopback address of the diagnostic HTTP endpoint (`GET /status` answers the car's
    /// state as JSON, for a technician with physical access), or `off`
    /// [default: 127.0.0.1:7070].
    #[arg(long, env = "CAAS_AGENT_DIAG", value_name = "ADDR")]
    pub diag: Option<String>,
}

impl RunArgs {
    /// Fills every option not given on the command line or in the environment from the
    /// `--config` file, if there is one.
    pub fn merge_config_file(mut self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--config {}", path.display()))?;
        let file: RunArgs = toml::from_str(&text).map_err(|e| {
            anyhow!(
                "--config {}: {}",
                path.display(),
                e.message().lines().next().unwrap_or("invalid TOML")
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        self.vin = self.vin.or(file.vin);
        self.broker = self.broker.or(file.broker);
        if self.gateway_key.is_empty() {
            self.gateway_key = file.gateway_key.into_iter().map(rel).collect();
        }
        self.device_key = self.device_key.or(file.device_key.map(rel));
        self.data = self.data.or(file.data.map(rel));
        self.ca = self.ca.or(file.ca.map(rel));
        self.cert = self.cert.or(file.cert.map(rel));
        self.key = self.key.or(file.key.map(rel));
        self.report_interval = self.report_interval.or(file.report_interval);
        self.firmware_version = self.firmware_version.or(file.firmware_version);
        if self.optional_features.is_empty() {
            self.optional_features = file.optional_features;
        }
        if self.base_features.is_empty() {
            self.base_features = file.base_features;
        }
        self.hook = self.hook.or(file.hook.map(rel));
        self.diag = self.diag.or(file.diag);
        Ok(self)
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerAddr {
    /// Parses `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            bail!("--broker {url:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT");
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| anyhow!("--broker {url:?}: port {p:?} is not a number 1-65535"))?,
            ),
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            bail!("--broker {url:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT");
        }
        Ok(BrokerAddr {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

/// TLS files for `mqtts://`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate and key (PEM), for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Everything the runtime needs, validated.
#[derive(Clone)]
pub struct Settings {
    /// This car.
    pub vin: Vin,
    /// The broker.
    pub broker: BrokerAddr,
    /// TLS files when the broker is `mqtts://`.
    pub tls: Option<TlsFiles>,
    /// Trusted gateway keys.
    pub gateway_keys: Vec<VerifyingKey>,
    /// The car's report-signing key.
    pub device_key: SigningKey,
    /// State directory.
    pub data_dir: PathBuf,
    /// Seconds between periodic reports (0: none).
    pub report_interval_secs: u64,
    /// Reported firmware version.
    pub firmware_version: FirmwareVersion,
    /// Switchable features.
    pub optional_features: Vec<FeatureFlag>,
    /// Base-platform features.
    pub base_features: Vec<FeatureFlag>,
    /// Feature switch hook.
    pub hook: Option<PathBuf>,
    /// Diagnostic endpoint address, `None` when off.
    pub diag: Option<SocketAddr>,
    /// The [`CRASH_BEFORE_PERSIST_ENV`] test hook.
    pub crash_before_persist: bool,
}

fn required<T>(value: Option<T>, flag: &str, env: &str) -> anyhow::Result<T> {
    value.ok_or_else(|| {
        anyhow!(
            "missing {flag} (or {env}, or `{}` in the --config file)",
            &flag[2..]
        )
    })
}

fn flags(list: Vec<String>, default: &[&str], option: &str) -> anyhow::Result<Vec<FeatureFlag>> {
    let list: Vec<String> = if list.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        list
    };
    list.iter()
        .map(|s| {
            FeatureFlag::new(s.trim())
                .map_err(|e| anyhow!("{option}: feature flag {s:?} {e} (use [a-z0-9_])"))
        })
        .collect()
}

impl Settings {
    /// Validates the merged options, reading the key files.
    pub fn resolve(args: RunArgs) -> anyhow::Result<Self> {
        let vin_text = required(args.vin, "--vin", "CAAS_AGENT_VIN")?;
        let vin: Vin = vin_text
            .trim()
            .parse()
            .map_err(|e| anyhow!("--vin {vin_text:?}: {e}"))?;
        let broker = BrokerAddr::parse(&required(args.broker, "--broker", "CAAS_AGENT_BROKER")?)?;
        let tls = match (broker.tls, args.ca, args.cert, args.key) {
            (false, None, None, None) => None,
            (false, ..) => bail!("--ca, --cert and --key only apply to an mqtts:// broker"),
            (true, None, ..) => bail!(
                "missing --ca (or CAAS_AGENT_CA): an mqtts:// broker needs the CA certificate"
            ),
            (true, Some(ca), None, None) => Some(TlsFiles { ca, client: None }),
            (true, Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca,
                client: Some((cert, key)),
            }),
            (true, Some(_), ..) => {
                bail!("--cert and --key go together (the client certificate and its key)")
            }
        };
        if let Some(t) = &tls {
            for p in std::iter::once(&t.ca).chain(t.client.iter().flat_map(|(c, k)| [c, k])) {
                if !p.is_file() {
                    bail!("TLS file {} does not exist", p.display());
                }
            }
        }
        if args.gateway_key.is_empty() {
            bail!("missing --gateway-key (or CAAS_AGENT_GATEWAY_KEY, or `gateway-key` in the --config file)");
        }
        if args.gateway_key.len() > MAX_TRUSTED_KEYS {
            bail!(
                "--gateway-key given {} times; at most {MAX_TRUSTED_KEYS} keys are trusted at once",
                args.gateway_key.len()
            );
        }
        let gateway_keys = args
            .gateway_key
            .iter()
            .map(|p| files::read_verifying_key(p).map_err(|e| anyhow!("--gateway-key {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let device_key_path = required(args.device_key, "--device-key", "CAAS_AGENT_DEVICE_KEY")?;
        let device_key =
            files::read_signing_key(&device_key_path).map_err(|e| anyhow!("--device-key {e}"))?;
        let data_dir = required(args.data, "--data", "CAAS_AGENT_DATA")?;
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| anyhow!("--data {}: {e}", data_dir.display()))?;
        let report_interval_secs = args.report_interval.unwrap_or(DEFAULT_REPORT_INTERVAL_SECS);
        let fw = args
            .firmware_version
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
        let firmware_version = FirmwareVersion::new(&fw)
            .map_err(|e| anyhow!("--firmware-version {fw:?}: {e} (1-24 printable ASCII)"))?;
        let optional_features = flags(
            args.optional_features,
            DEFAULT_OPTIONAL_FEATURES,
            "--optional-features",
        )?;
        let base_features = flags(args.base_features, DEFAULT_BASE_FEATURES, "--base-features")?;
        if let Some(f) = optional_features.iter().find(|f| base_features.contains(f)) {
            bail!("feature {f} is both optional and base-platform; it can only be one");
        }
        let diag_text = args.diag.unwrap_or_else(|| DEFAULT_DIAG_ADDR.to_string());
        let diag = if diag_text == "off" {
            None
        } else {
            let addr: SocketAddr = diag_text
                .parse()
                .map_err(|_| anyhow!("--diag {diag_text:?}: expected IP:PORT on loopback (e.g. 127.0.0.1:7070) or off"))?;
            if !addr.ip().is_loopback() {
                bail!("--diag {addr}: the diagnostic endpoint only listens on loopback (127.0.0.1 or ::1)");
            }
            Some(addr)
        };
        if let Some(hook) = &args.hook {
            if !hook.is_file() {
                bail!("--hook {}: no such file", hook.display());
            }
        }
        Ok(Settings {
            vin,
            broker,
            tls,
            gateway_keys,
            device_key,
            data_dir,
            report_interval_secs,
            firmware_version,
            optional_features,
            base_features,
            hook: args.hook,
            diag,
            crash_before_persist: std::env::var(CRASH_BEFORE_PERSIST_ENV).is_ok_and(|v| v == "1"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            BrokerAddr::parse("mqtt://localhost:1884").unwrap(),
            BrokerAddr {
                tls: false,
                host: "localhost".into(),
                port: 1884
            }
        );
        assert_eq!(
            BrokerAddr::parse("mqtts://broker.example").unwrap().port,
            8883
        );
        assert_eq!(BrokerAddr::parse("mqtt://[::1]:1883").unwrap().host, "::1");
        assert!(BrokerAddr::parse("http://x:1").is_err());
        assert!(BrokerAddr::parse("mqtt://x:99999").is_err());
        assert!(BrokerAddr::parse("mqtt://").is_err());
    }

    #[test]
    fn missing_and_malformed_options_get_one_clear_line() {
        let err = Settings::resolve(RunArgs::default())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "missing --vin (or CAAS_AGENT_VIN, or `vin` in the --config file)"
        );
        let args = RunArgs {
            vin: Some("NOTAVIN".into()),
            ..RunArgs::default()
        };
        let err = Settings::resolve(args).err().unwrap().to_string();
        assert_eq!(
            err,
            "--vin \"NOTAVIN\": a VIN has 17 characters, this one has 7"
        );
        let args = RunArgs {
            vin: Some("WVWZZZ1JZXW000001".into()),
            broker: Some("mqtt://127.0.0.1:1883".into()),
            gateway_key: vec!["/nonexistent/gw.pub".into()],
            ..RunArgs::default()
        };
        let err = Settings::resolve(args).err().unwrap().to_string();
        assert!(
            err.starts_with("--gateway-key /nonexistent/gw.pub: "),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn the_config_file_fills_what_the_command_line_left_out() {
        let dir = std::env::temp_dir().join(format!("caas-agent-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "vin = \"WVWZZZ1JZXW000009\"\nbroker = \"mqtt://h:1\"\ngateway-key = [\"a.pub\", \"/abs/b.pub\"]\ndiag = \"off\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path.clone()),
            broker: Some("mqtt://cli:2".into()),
            ..RunArgs::default()
        };
        let merged = args.merge_config_file().unwrap();
        assert_eq!(merged.vin.as_deref(), Some("WVWZZZ1JZXW000009"));
        assert_eq!(
            merged.broker.as_deref(),
            Some("mqtt://cli:2"),
            "the command line wins"
        );
        assert_eq!(
            merged.gateway_key,
            vec![dir.join("a.pub"), PathBuf::from("/abs/b.pub")]
        );
        assert_eq!(merged.diag.as_deref(), Some("off"));
        std::fs::write(&path, "vin = 3\n").unwrap();
        let err = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        }
        .merge_config_file()
        .err()
        .unwrap();
        assert!(err.to_string().contains("agent.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
