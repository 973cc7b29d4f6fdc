//! A small client of the gateway's IoT API (JSON, camelCase, Bearer token).
//!
//! Answers are read as `serde_json::Value` where the simulator only needs a field or two, so
//! a gateway that adds fields does not break it.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Longest the client waits for one HTTP answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An IoT API client.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
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
        crate::init_crypto();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
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
}
