//! `caasctl local status`: the car agent's loopback diagnostic endpoint, for a technician
//! with physical access to the car.
//!
//! The agent serves `GET http://ADDR/status` (default `127.0.0.1:7070`) with this JSON
//! (the contract between the agent and this tool):
//!
//! ```json
//! {"vin": "WVWZZZ1JZXW000001", "appliedSeq": 3, "carTime": "2026-11-22T13:00:00Z",
//!  "connectivity": "ONLINE", "firmwareVersion": "2.4.1",
//!  "activeGrants": [{"serviceId": "power-boost", "flags": ["power_boost"],
//!                    "parameters": {"boostPercent": "15"}, "endsAt": "2026-12-22T00:00:00Z"}],
//!  "lastRejection": {"seq": 7, "code": "REPLAY"},
//!  "errorCodes": []}
//! ```
//!
//! `endsAt` and `lastRejection` may be `null`. Fields this tool does not know are shown
//! as they are, so an agent that adds one does not break it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::http::{trim_base, Client, HttpError};
use crate::table::{json_cell, key_values, render};

/// Where the agent's diagnostic endpoint listens by default.
pub const DEFAULT_AGENT_ADDR: &str = "127.0.0.1:7070";

/// The agent's status, as its diagnostic endpoint serves it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The car.
    pub vin: String,
    /// The newest applied command's sequence number.
    pub applied_seq: u64,
    /// The car's trusted clock, ISO-8601.
    #[serde(default)]
    pub car_time: Option<String>,
    /// `ONLINE` or `OFFLINE` (its MQTT connection).
    #[serde(default)]
    pub connectivity: Option<String>,
    /// Firmware version.
    #[serde(default)]
    pub firmware_version: Option<String>,
    /// The grants in force.
    #[serde(default)]
    pub active_grants: Vec<AgentGrant>,
    /// The newest refused command, if any.
    #[serde(default)]
    pub last_rejection: Option<LastRejection>,
    /// Active diagnostic codes.
    #[serde(default)]
    pub error_codes: Vec<String>,
    /// Anything else the agent sent.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One grant in force in the car.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentGrant {
    /// The catalog's service id.
    pub service_id: String,
    /// The feature flags it switches on.
    #[serde(default)]
    pub flags: Vec<String>,
    /// Its parameters (values are strings, numbers are shown as they come).
    #[serde(default)]
    pub parameters: BTreeMap<String, Value>,
    /// When it ends, ISO-8601; `None` for permanent.
    #[serde(default)]
    pub ends_at: Option<String>,
}

/// The newest command the car refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LastRejection {
    /// Its sequence number (0 when it could not be read).
    pub seq: u64,
    /// The rejection code, e.g. `REPLAY`.
    pub code: String,
}

/// `http://ADDR/status` for `ADDR` given as `host:port` or as a base URL.
pub fn status_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}/status", trim_base(addr))
    } else {
        format!("http://{addr}/status")
    }
}

/// Fetches the agent's status JSON as served (for `--json`) and parsed.
pub fn fetch_status(client: &Client, addr: &str) -> Result<(Value, AgentStatus), HttpError> {
    let url = status_url(addr);
    let raw = client.get_json(&url, None)?;
    let parsed =
        serde_json::from_value::<AgentStatus>(raw.clone()).map_err(|e| HttpError::Body {
            url: url.clone(),
            reason: format!("not the agent's status shape ({e})"),
        })?;
    Ok((raw, parsed))
}

fn or_dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".to_owned())
}

impl AgentStatus {
    /// The readable form: the car's fields, then a table of the grants in force.
    pub fn to_text(&self) -> String {
        let mut pairs = vec![
            ("VIN", self.vin.clone()),
            ("Applied seq", self.applied_seq.to_string()),
            ("Car time", or_dash(&self.car_time)),
            ("Connectivity", or_dash(&self.connectivity)),
            ("Firmware", or_dash(&self.firmware_version)),
            (
                "Error codes",
                if self.error_codes.is_empty() {
                    "-".into()
                } else {
                    self.error_codes.join(", ")
                },
            ),
            (
                "Last rejection",
                self.last_rejection
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |r| format!("{} (seq {})", r.code, r.seq)),
            ),
        ];
        for (k, v) in &self.other {
            pairs.push((k.as_str(), json_cell(v)));
        }
        let mut out = key_values(&pairs);
        out.push_str(&format!("\nActive grants: {}\n", self.active_grants.len()));
        if !self.active_grants.is_empty() {
            let rows: Vec<Vec<String>> = self
                .active_grants
                .iter()
                .map(|g| {
                    let params: Vec<String> = g
                        .parameters
                        .iter()
                        .map(|(k, v)| format!("{k}={}", json_cell(v)))
                        .collect();
                    vec![
                        g.service_id.clone(),
                        if g.flags.is_empty() {
                            "-".into()
                        } else {
                            g.flags.join(", ")
                        },
                        if params.is_empty() {
                            "-".into()
                        } else {
                            params.join(" ")
                        },
                        g.ends_at.clone().unwrap_or_else(|| "permanent".to_owned()),
                    ]
                })
                .collect();
            out.push_str(&render(
                &["SERVICE", "FLAGS", "PARAMETERS", "ENDS AT"],
                &rows,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_urls() {
        assert_eq!(status_url("127.0.0.1:7070"), "http://127.0.0.1:7070/status");
        assert_eq!(
            status_url("http://127.0.0.1:7070/"),
            "http://127.0.0.1:7070/status"
        );
    }

    #[test]
    fn the_contract_shape_parses_and_renders() {
        let v = serde_json::json!({
            "vin": "WVWZZZ1JZXW000001", "appliedSeq": 3, "carTime": "2026-11-22T13:00:00Z",
            "connectivity": "OFFLINE", "firmwareVersion": "2.4.1",
            "activeGrants": [{"serviceId": "power-boost", "flags": ["power_boost"],
                              "parameters": {"boostPercent": "15"}, "endsAt": null}],
            "lastRejection": {"seq": 7, "code": "REPLAY"}, "errorCodes": ["E1"], "uptime": 5
        });
        let s: AgentStatus = serde_json::from_value(v).unwrap();
        let text = s.to_text();
        assert!(text.contains("Last rejection  REPLAY (seq 7)"), "{text}");
        assert!(
            text.contains("power-boost  power_boost  boostPercent=15  permanent"),
            "{text}"
        );
        assert!(text.contains("uptime"), "{text}");
    }
}
