//! `caas-gateway check`: what `serve` would start with, checked without starting it.
//!
//! An operator changing a production gateway's settings (a renewed certificate, a new
//! webhook, a moved data directory) wants to know before the restart whether the new
//! settings start at all, since a gateway that does not start leaves the whole fleet without
//! commands. This reads the same flags, environment and file as `serve`, checks the
//! combinations, loads every certificate, key, CA and revocation list the listeners and
//! clients would, reads the signing key if it exists, and reports each certificate's expiry:
//! an expired one is an error, one within [`EXPIRY_WARNING`] a warning. It opens no socket
//! and writes nothing (the store is not opened: `serve` holds it while running).
//!
//! The same expiry is served while running, as gauges of the Unix time each listener's
//! certificate expires (`caas_https_cert_expires_at_seconds`,
//! `caas_mqtts_cert_expires_at_seconds`), so monitoring can warn ahead of it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

use crate::config::Config;

/// A certificate expiring within this is reported as a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the check found: the lines to print, and how many of them are warnings.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per setting or file checked, `warning: ...` for the warnings.
    pub lines: Vec<String>,
    /// Lines that are warnings.
    pub warnings: usize,
}

impl Report {
    fn say(&mut self, line: String) {
        self.lines.push(line);
    }

    fn warn(&mut self, line: String) {
        self.lines.push(format!("warning: {line}"));
        self.warnings += 1;
    }
}

/// When the first certificate of the PEM file `path` expires (Unix seconds).
pub(crate) fn expires_at(path: &Path) -> anyhow::Result<u64> {
    let certs = crate::tlsfront::read_certs(path)?;
    let first = certs
        .first()
        .ok_or_else(|| anyhow!("no certificate in {}", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
    Ok(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0))
}

/// Checks the certificate of `what` at `path`: an error once expired, a warning within
/// [`EXPIRY_WARNING`].
fn check_expiry(report: &mut Report, what: &str, path: &Path, now: u64) -> anyhow::Result<()> {
    let at = expires_at(path)?;
    let when = crate::store::iso_ms(at.saturating_mul(1000));
    if at <= now {
        bail!("{what} {} expired at {when}", path.display());
    }
    let left = Duration::from_secs(at - now);
    let days = left.as_secs() / 86_400;
    if left < EXPIRY_WARNING {
        report.warn(format!(
            "{what} {} expires at {when}, in {days} days",
            path.display()
        ));
    } else {
        report.say(format!(
            "{what} {} valid until {when} ({days} days)",
            path.display()
        ));
    }
    Ok(())
}

/// Checks `config` as `serve` would start with it.
pub fn check(config: &Config) -> anyhow::Result<Report> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    config.validate()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut r = Report::default();

    if !config.no_http {
        if config.http.ip().is_loopback() {
            r.say(format!("IoT API over HTTP on {} (loopback)", config.http));
        } else {
            r.warn(format!(
                "the IoT API is served in the clear on {}: --https and --no-http serve it \
                 over TLS only",
                config.http
            ));
        }
    }
    if let (Some(addr), Some(files)) = (config.https, &config.https_files) {
        crate::https::load(files)?;
        let callers = match &files.client_ca {
            Some(ca) => format!("callers need a certificate from {}", ca.display()),
            None => "no client certificate asked".to_owned(),
        };
        r.say(format!("IoT API over TLS on {addr}; {callers}"));
        check_expiry(&mut r, "IoT API certificate", &files.cert, now)?;
    }

    match &config.broker {
        Some(url) => {
            if url.starts_with("mqtts://") {
                crate::mqtt::client_tls(config)?;
                if let Some(tls) = &config.tls {
                    check_expiry(&mut r, "broker client certificate", &tls.cert, now)?;
                }
            }
            r.say(format!("external broker {url}"));
        }
        None => {
            match config.mqtt {
                Some(addr) => r.say(format!("embedded broker, plain MQTT on {addr}")),
                None => r.say("embedded broker, no plain MQTT listener".to_owned()),
            }
            if let (Some(addr), Some(tls)) = (config.mqtts, &config.tls) {
                let front = crate::tlsfront::FrontTls::load(tls, config.tls_crl.as_deref())?;
                let revocation = match &config.tls_crl {
                    Some(crl) => format!(
                        "revocation list {} ({} revoked)",
                        crl.display(),
                        front.revoked_count()
                    ),
                    None => "no revocation list".to_owned(),
                };
                r.say(format!("MQTT over mutual TLS on {addr}; {revocation}"));
                check_expiry(&mut r, "MQTT TLS certificate", &tls.cert, now)?;
            }
        }
    }

    let key_path = config.signing_key_path();
    if key_path.exists() {
        let key = caas_protocol::files::read_signing_key(&key_path)
            .with_context(|| format!("signing key {}", key_path.display()))?;
        r.say(format!(
            "signing key {} (key id {})",
            key_path.display(),
            caas_protocol::KeyId::of(&key.verifying_key())
        ));
    } else {
        r.warn(format!(
            "no signing key at {}: serve generates a new one, which no car trusts yet",
            key_path.display()
        ));
    }
    if config.data.join("db").exists() {
        r.say(format!("store {}", config.data.join("db").display()));
    } else {
        r.say(format!(
            "no store in {}: serve starts an empty one",
            config.data.display()
        ));
    }

    match &config.webhook_url {
        Some(url) => {
            let trusted = match &config.webhook_ca {
                Some(ca) => {
                    let roots = crate::webhook::read_roots(ca)?;
                    format!(", trusting {} ({} certificates)", ca.display(), roots.len())
                }
                None => String::new(),
            };
            r.say(format!("callbacks to {url}{trusted}"));
        }
        None => r.warn("no --webhook-url: no callback is sent".to_owned()),
    }
    if config.api_token == crate::config::DEV_API_TOKEN {
        r.warn("the development API token (set --api-token)".to_owned());
    }
    let backoff: Vec<String> = config
        .retry
        .backoff
        .iter()
        .map(|d| format!("{}s", d.as_secs_f64()))
        .collect();
    r.say(format!(
        "retries: {} attempts of {}s, backoff {}",
        config.retry.attempts,
        config.retry.attempt_timeout.as_secs_f64(),
        backoff.join(",")
    ));
    Ok(r)
}
