//! A small client of the gateway's IoT API (JSON, camelCase, Bearer token).
//!
//! Answers are read as `serde_json::Value` where the simulator only needs a field or two, so
//! a gateway that adds fields does not break it.
//!
//! The two calls a load run makes thousands of times a second, `POST /ota/activate` and
//! `POST /ota/deactivate`, go straight over hyper's HTTP/1.1 connections kept alive in a
//! small pool (when the base URL is plain `http://HOST:PORT`): the body is written from
//! borrowed fields and the answer read for its `requestId` only. Through reqwest the same
//! request cost the driver about twice the CPU (URL parsing, header maps, a pool keyed by
//! URL, a timer and a task per request). Everything else goes through reqwest.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest the client waits for one HTTP answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most idle keep-alive connections the activation path keeps for reuse (a load run has at
/// most `scenario::MAX_IN_FLIGHT` requests out, so it never needs more than that many).
pub const MAX_IDLE_CONNECTIONS: usize = crate::scenario::MAX_IN_FLIGHT;
/// Largest answer body the activation path reads (an answer is about 100 bytes).
pub const MAX_ANSWER: usize = 64 * 1024;

/// An IoT API client.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    fast: Option<Arc<Fast>>,
}

/// Keep-alive HTTP/1.1 connections to the gateway for the activation POSTs.
struct Fast {
    addr: SocketAddr,
    host: HeaderValue,
    auth: HeaderValue,
    /// Idle connections, at most [`MAX_IDLE_CONNECTIONS`] (more are closed when returned).
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Fast {
    /// `None` unless `base` is `http://HOST:PORT` (no path, no TLS) and resolves.
    fn new(base: &str, token: &str) -> Option<Fast> {
        let authority = base.strip_prefix("http://")?;
        if authority.is_empty() || authority.contains('/') {
            return None;
        }
        let addr = authority.to_socket_addrs().ok()?.next()?;
        Some(Fast {
            addr,
            host: HeaderValue::from_str(authority).ok()?,
            auth: HeaderValue::from_str(&format!("Bearer {token}")).ok()?,
            idle: Mutex::new(Vec::new()),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        // The connection's driver: ends when the connection closes or its sender is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(c) = idle.pop() {
            if c.is_ready() {
                return Some(c);
            }
        }
        None
    }

    fn give_back(&self, c: SendRequest<Full<Bytes>>) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE_CONNECTIONS {
                idle.push(c);
            }
        }
    }

    fn request(&self, path: &'static str, body: Bytes) -> hyper::Request<Full<Bytes>> {
        let mut req = hyper::Request::new(Full::new(body));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = hyper::Uri::from_static(path);
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(AUTHORIZATION, self.auth.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        req
    }

    /// POSTs `body` to `path`; the answer's body if 2xx.
    async fn post(&self, base: &str, path: &'static str, body: Vec<u8>) -> Result<Bytes> {
        let body = Bytes::from(body);
        let attempt = async {
            let mut req = self.request(path, body);
            // An idle connection the gateway closed meanwhile hands the request back unsent:
            // it then goes out once on a new connection.
            let (mut conn, mut reused) = match self.take_idle() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let resp = loop {
                match conn.try_send_request(req).await {
                    Ok(r) => break r,
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => {
                            req = unsent;
                            conn = self.connect().await?;
                            reused = false;
                        }
                        _ => return Err(anyhow::Error::new(e.into_error())),
                    },
                }
            };
            let status = resp.status();
            let answer = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the answer: {e}"))?
                .to_bytes();
            self.give_back(conn);
            Ok::<_, anyhow::Error>((status, answer))
        };
        let (status, answer) = tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .map_err(|_| anyhow!("{path}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("{path}: gateway at {base} unreachable"))?;
        if !status.is_success() {
            bail!(
                "{path}: HTTP {status}: {}",
                String::from_utf8_lossy(&answer)
                    .chars()
                    .take(300)
                    .collect::<String>()
            );
        }
        Ok(answer)
    }
}

/// `POST /ota/activate`'s body, written from borrowed fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ActivateBody<'a> {
    vin: &'a str,
    service_id: &'a str,
    configuration: ConfigurationBody<'a>,
    duration: DurationBody,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigurationBody<'a> {
    feature_flags: &'a [String],
    parameters: &'a serde_json::Map<String, Value>,
}

/// The IoT API's `duration` object (the same shape as [`Lasting::to_json`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DurationBody {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_renewal: Option<bool>,
}

impl From<&Lasting> for DurationBody {
    fn from(l: &Lasting) -> Self {
        match l {
            Lasting::Temporary(end) => DurationBody {
                kind: "TEMPORARY",
                expiry_date: Some(iso8601(*end)),
                auto_renewal: None,
            },
            Lasting::Permanent => DurationBody {
                kind: "PERMANENT",
                expiry_date: None,
                auto_renewal: None,
            },
            Lasting::Subscription { auto_renewal } => DurationBody {
                kind: "SUBSCRIPTION",
                expiry_date: None,
                auto_renewal: Some(*auto_renewal),
            },
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeactivateBody<'a> {
    vin: &'a str,
    service_id: &'a str,
}

/// An accepted request's answer, read for its id only.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    request_id: String,
}

/// The request id of an answer: the common shape read directly, any other through `Value`.
fn request_id_in(answer: &[u8]) -> Result<String> {
    if let Ok(a) = serde_json::from_slice::<Accepted>(answer) {
        return Ok(a.request_id);
    }
    let v = serde_json::from_slice(answer)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(answer).into_owned()));
    request_id_of(&v)
}

/// How long an activation lasts (the IoT API's `duration`).
#[derive(Debug, Clone, PartialEq)]
pub enum Lasting {
    /// Until this Unix time.
    Temporary(u64),
    /// For the car's life.
    Permanent,
    /// A monthly subscription.
    Subscription {
        /// Renews by itself.
        auto_renewal: bool,
    },
}

impl Lasting {
    /// The JSON `duration` object.
    pub fn to_json(&self) -> Value {
        match self {
            Lasting::Temporary(end) => {
                json!({"type": "TEMPORARY", "expiryDate": iso8601(*end)})
            }
            Lasting::Permanent => json!({"type": "PERMANENT"}),
            Lasting::Subscription { auto_renewal } => {
                json!({"type": "SUBSCRIPTION", "autoRenewal": auto_renewal})
            }
        }
    }
}

/// ISO-8601 UTC text of a Unix time.
pub fn iso8601(unix: u64) -> String {
    let t = i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

impl Api {
    /// A client of the gateway at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, token: &str) -> Result<Self> {
        Api::with_ca(base, token, None)
    }

    /// [`Api::new`] that also trusts the CA certificates (PEM) in `ca`, for a gateway serving
    /// the IoT API over TLS with a private CA's certificate.
    pub fn with_ca(base: &str, token: &str, ca: Option<&std::path::Path>) -> Result<Self> {
        crate::init_crypto();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256);
        if let Some(path) = ca {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|r| !r.is_empty())
                .with_context(|| format!("{}: no PEM certificate in it", path.display()))?;
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder.build().context("building the HTTP client")?;
        let base = base.trim_end_matches('/').to_string();
        Ok(Api {
            fast: Fast::new(&base, token).map(Arc::new),
            base,
            token: token.to_string(),
            http,
        })
    }

    /// The gateway's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{what}: gateway at {} unreachable", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{what}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(url).json(body), path).await
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(url), path).await
    }

    /// `GET /healthz`: whether the gateway answers 2xx.
    pub async fn healthy(&self) -> bool {
        let url = format!("{}/healthz", self.base);
        matches!(self.http.get(url).timeout(Duration::from_secs(2)).send().await,
                 Ok(r) if r.status().is_success())
    }

    /// `GET /keys`: the gateway's command-signing public key (64 hex digits).
    pub async fn gateway_key(&self) -> Result<caas_protocol::VerifyingKey> {
        let v = self.get("/keys").await?;
        find_key_hex(&v)
            .ok_or_else(|| anyhow!("GET /keys: no 64-hex-digit public key in {v}"))
            .and_then(|hex| {
                caas_protocol::verifying_key_from_hex(&hex).map_err(|e| anyhow!("GET /keys: {e}"))
            })
    }

    /// `POST /vehicles`. A car already registered (409) counts as registered.
    pub async fn register_vehicle(
        &self,
        vin: &str,
        public_key_hex: &str,
        platform: &str,
        firmware: &str,
    ) -> Result<()> {
        let body = json!({"vin": vin, "publicKey": public_key_hex,
                          "platform": platform, "firmwareVersion": firmware});
        let url = format!("{}/vehicles", self.base);
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST /vehicles: gateway at {} unreachable", self.base))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        bail!(
            "POST /vehicles {vin}: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        )
    }

    /// `POST /ota/activate`; returns the request id.
    pub async fn activate(
        &self,
        vin: &str,
        service_id: &str,
        flags: &[String],
        params: &serde_json::Map<String, Value>,
        lasting: &Lasting,
    ) -> Result<String> {
        if let Some(fast) = &self.fast {
            let body = serde_json::to_vec(&ActivateBody {
                vin,
                service_id,
                configuration: ConfigurationBody {
                    feature_flags: flags,
                    parameters: params,
                },
                duration: lasting.into(),
            })?;
            let answer = fast.post(&self.base, "/ota/activate", body).await?;
            return request_id_in(&answer);
        }
        let body = json!({
            "vin": vin,
            "serviceId": service_id,
            "configuration": {"featureFlags": flags, "parameters": params},
            "duration": lasting.to_json(),
        });
        let v = self.post("/ota/activate", &body).await?;
        request_id_of(&v)
    }

    /// `POST /ota/deactivate`; returns the request id.
    pub async fn deactivate(&self, vin: &str, service_id: &str) -> Result<String> {
        if let Some(fast) = &self.fast {
            let body = serde_json::to_vec(&DeactivateBody { vin, service_id })?;
            let answer = fast.post(&self.base, "/ota/deactivate", body).await?;
            return request_id_in(&answer);
        }
        let v = self
            .post(
                "/ota/deactivate",
                &json!({"vin": vin, "serviceId": service_id}),
            )
            .await?;
        request_id_of(&v)
    }

    /// `GET /ota/requests/{id}`.
    pub async fn request(&self, id: &str) -> Result<Value> {
        self.get(&format!("/ota/requests/{id}")).await
    }

    /// `POST /ota/requests/{id}/cancel`: the request, ended (FAILED, `CANCELLED`).
    pub async fn cancel_request(&self, id: &str) -> Result<Value> {
        self.post(&format!("/ota/requests/{id}/cancel"), &json!({}))
            .await
    }

    /// `GET /vehicles/{vin}/status`.
    pub async fn vehicle_status(&self, vin: &str) -> Result<Value> {
        self.get(&format!("/vehicles/{vin}/status")).await
    }

    /// `GET /vehicles/{vin}/history`.
    pub async fn history(&self, vin: &str) -> Result<Value> {
        self.get(&format!("/vehicles/{vin}/history")).await
    }

    /// `POST /campaigns`; returns the campaign id.
    pub async fn campaign(
        &self,
        vins: &[String],
        activate: bool,
        service_id: &str,
        flags: &[String],
        lasting: &Lasting,
    ) -> Result<String> {
        let mut body = json!({
            "vins": vins,
            "action": if activate { "ACTIVATE" } else { "DEACTIVATE" },
            "serviceId": service_id,
        });
        if activate {
            body["configuration"] = json!({"featureFlags": flags, "parameters": {}});
            body["duration"] = lasting.to_json();
        }
        let v = self.post("/campaigns", &body).await?;
        ["campaignId", "id"]
            .iter()
            .find_map(|k| v.get(k).and_then(value_text))
            .or_else(|| value_text(&v))
            .ok_or_else(|| anyhow!("POST /campaigns: no campaign id in {v}"))
    }

    /// `GET /campaigns/{id}`.
    pub async fn campaign_status(&self, id: &str) -> Result<Value> {
        self.get(&format!("/campaigns/{id}")).await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("{}/metrics", self.base);
        Ok(self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await?
            .text()
            .await?)
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn request_id_of(v: &Value) -> Result<String> {
    v.get("requestId")
        .and_then(value_text)
        .ok_or_else(|| anyhow!("no requestId in the gateway's answer {v}"))
}

/// The first 64-hex-digit string in a JSON value (the shape of `GET /keys` may vary: a bare
/// string, `{publicKey}`, `{keys:[..]}`...).
pub fn find_key_hex(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| t.to_string())
        }
        Value::Array(items) => items.iter().find_map(find_key_hex),
        Value::Object(map) => ["publicKey", "public_key", "key", "current"]
            .iter()
            .filter_map(|k| map.get(*k))
            .chain(map.values())
            .find_map(find_key_hex),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hex_is_found_in_any_shape() {
        let k = "ab".repeat(32);
        assert_eq!(find_key_hex(&json!(k)), Some(k.clone()));
        assert_eq!(
            find_key_hex(&json!({"keyId": "x", "publicKey": k})),
            Some(k.clone())
        );
        assert_eq!(
            find_key_hex(&json!({"keys": [{"id": 1, "publicKey": k}]})),
            Some(k.clone())
        );
        assert_eq!(find_key_hex(&json!({"publicKey": "abc"})), None);
    }

    #[test]
    fn durations_are_the_api_shapes() {
        assert_eq!(
            Lasting::Temporary(0).to_json(),
            json!({"type": "TEMPORARY", "expiryDate": "1970-01-01T00:00:00Z"})
        );
        assert_eq!(Lasting::Permanent.to_json()["type"], "PERMANENT");
    }

    #[test]
    fn borrowed_bodies_are_the_json_bodies() {
        for l in [
            Lasting::Temporary(86_400),
            Lasting::Permanent,
            Lasting::Subscription {
                auto_renewal: false,
            },
        ] {
            let flags = vec!["power_boost".to_string()];
            let params = serde_json::Map::new();
            let borrowed = serde_json::to_value(ActivateBody {
                vin: "V",
                service_id: "power-boost",
                configuration: ConfigurationBody {
                    feature_flags: &flags,
                    parameters: &params,
                },
                duration: (&l).into(),
            })
            .unwrap();
            let built = json!({
                "vin": "V",
                "serviceId": "power-boost",
                "configuration": {"featureFlags": flags, "parameters": params},
                "duration": l.to_json(),
            });
            assert_eq!(borrowed, built);
        }
        assert_eq!(
            request_id_in(br#"{"requestId":"r-1","status":"QUEUED"}"#).unwrap(),
            "r-1"
        );
        assert_eq!(request_id_in(br#"{"requestId":42}"#).unwrap(), "42");
        assert!(request_id_in(b"{}").is_err());
    }

    #[test]
    fn only_plain_http_bases_take_the_fast_path() {
        assert!(Fast::new("http://127.0.0.1:8080", "t").is_some());
        assert!(Fast::new("https://127.0.0.1:8080", "t").is_none());
        assert!(Fast::new("http://127.0.0.1:8080/api", "t").is_none());
    }
}
