//! `caasctl vehicle status|history|rekey`: a car's state and history from the gateway's IoT
//! API, and the replacement of its public key.
//!
//! - `GET /vehicles/{vin}/status` answers (DESIGN.md §4)
//!   `{vin, connectivity, lastSeen, activeServices:[{serviceId, activationDate, status}],
//!   diagnostics:{errorCodes, firmwareVersion, networkSignalStrength}}`.
//! - `GET /vehicles/{vin}/history?limit=N[&before=CURSOR]` answers, newest first,
//!   `{vin, entries:[{id, timestamp, type, seq?, requestId?, detail}], nextBefore}`, where
//!   `type` is `REQUEST`, `COMMAND`, `REPORT`, `RESULT`, `PRESENCE` or `KEY_REPLACED` and
//!   `nextBefore` is the `before` cursor of the next (older) page, `null` on the last one.
//! - `POST /vehicles/{vin}/key {publicKey, previousPublicKey}` answers the car's record
//!   `{vin, publicKey, platform, firmwareVersion, registeredAt}` with its new key.
//!
//! Both are rendered from the JSON generically around the fields named here, so a field the
//! gateway adds (or a small difference in shape) is shown rather than breaking the tool.

use caas_protocol::{verifying_key_to_hex, VerifyingKey, Vin};
use serde_json::{json, Value};

use crate::gateway::{page_path, Gateway};
use crate::http::{Client, HttpError};
use crate::table::{field, json_cell, key_values, list_items, objects_table, other_fields};

impl Gateway {
    /// `GET /vehicles/{vin}/status`.
    pub fn status(&self, client: &Client, vin: &Vin) -> Result<Value, HttpError> {
        self.get_json(client, &format!("/vehicles/{vin}/status"))
    }

    /// `GET /vehicles/{vin}/history?limit=N[&before=CURSOR]`.
    pub fn history(
        &self,
        client: &Client,
        vin: &Vin,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Value, HttpError> {
        let path = page_path(&format!("/vehicles/{vin}/history"), limit, before);
        self.get_json(client, &path)
    }

    /// `POST /vehicles/{vin}/key`: `key` replaces `previous`, the key the car has now.
    pub fn replace_key(
        &self,
        client: &Client,
        vin: &Vin,
        key: &VerifyingKey,
        previous: &VerifyingKey,
    ) -> Result<Value, HttpError> {
        let body = json!({
            "publicKey": verifying_key_to_hex(key).as_str(),
            "previousPublicKey": verifying_key_to_hex(previous).as_str(),
        });
        self.post_json_body(client, &format!("/vehicles/{vin}/key"), &body)
    }
}

/// The readable form of a key replacement's answer (the car's record).
pub fn rekey_text(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{v}\n");
    };
    let mut pairs = vec![
        ("VIN", field(obj, "vin")),
        ("Public key", field(obj, "publicKey")),
        ("Platform", field(obj, "platform")),
        ("Firmware", field(obj, "firmwareVersion")),
        ("Registered", field(obj, "registeredAt")),
    ];
    const KNOWN: [&str; 5] = [
        "vin",
        "publicKey",
        "platform",
        "firmwareVersion",
        "registeredAt",
    ];
    pairs.extend(other_fields(obj, &KNOWN));
    let mut out = key_values(&pairs);
    out.push_str("Reports are believed only when signed with this key.\n");
    out
}

/// The readable form of a status answer.
pub fn status_text(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{v}\n");
    };
    let diag = obj.get("diagnostics").and_then(Value::as_object);
    let d = |k: &str| diag.map_or_else(|| "-".to_owned(), |m| field(m, k));
    let signal = match diag.and_then(|m| m.get("networkSignalStrength")) {
        Some(Value::Number(n)) => format!("{n}%"),
        Some(other) => json_cell(other),
        None => "-".to_owned(),
    };
    let mut pairs = vec![
        ("VIN", field(obj, "vin")),
        ("Connectivity", field(obj, "connectivity")),
        ("Last seen", field(obj, "lastSeen")),
        ("Firmware", d("firmwareVersion")),
        ("Signal", signal),
        ("Error codes", d("errorCodes")),
    ];
    const KNOWN: [&str; 5] = [
        "vin",
        "connectivity",
        "lastSeen",
        "diagnostics",
        "activeServices",
    ];
    pairs.extend(other_fields(obj, &KNOWN));
    if let Some(diag) = diag {
        const KNOWN_DIAG: [&str; 3] = ["errorCodes", "firmwareVersion", "networkSignalStrength"];
        pairs.extend(other_fields(diag, &KNOWN_DIAG));
    }
    let mut out = key_values(&pairs);
    let services: &[Value] = obj
        .get("activeServices")
        .and_then(Value::as_array)
        .map_or(&[], |a| a);
    out.push_str(&format!("\nActive services: {}\n", services.len()));
    if !services.is_empty() {
        out.push_str(&objects_table(
            services,
            &[
                ("serviceId", "SERVICE"),
                ("status", "STATUS"),
                ("activationDate", "ACTIVATED"),
            ],
        ));
    }
    out
}

/// The readable form of a history page; `vin` is used in the hint for the next page.
pub fn history_text(v: &Value, vin: &Vin, limit: u32) -> String {
    let items = list_items(v, "entries");
    let mut out = format!("History of {vin}: {} entries, newest first\n", items.len());
    if !items.is_empty() {
        out.push_str(&objects_table(
            items,
            &[
                ("timestamp", "TIME"),
                ("type", "TYPE"),
                ("seq", "SEQ"),
                ("requestId", "REQUEST"),
                ("detail", "DETAIL"),
                ("id", "ID"),
            ],
        ));
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if k == "vin" || val.is_array() {
                continue;
            }
            if k == "nextBefore" {
                if !val.is_null() {
                    out.push_str(&format!(
                        "Older entries: caasctl vehicle history {vin} --limit {limit} --before {}\n",
                        json_cell(val)
                    ));
                }
            } else {
                out.push_str(&format!("{k}: {}\n", json_cell(val)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_renders_known_and_unknown_fields() {
        let v = json!({
            "vin": "WVWZZZ1JZXW000001", "connectivity": "ONLINE", "lastSeen": "2026-11-22T13:00:00Z",
            "activeServices": [{"serviceId": "power-boost", "activationDate": "2026-11-01T00:00:00Z", "status": "ACTIVE"}],
            "diagnostics": {"errorCodes": [], "firmwareVersion": "2.4.1", "networkSignalStrength": 80},
            "region": "eu"
        });
        let t = status_text(&v);
        assert!(t.contains("Signal        80%"), "{t}");
        assert!(t.contains("region        eu"), "{t}");
        assert!(
            t.contains("power-boost  ACTIVE  2026-11-01T00:00:00Z"),
            "{t}"
        );
    }

    #[test]
    fn a_key_replacement_shows_the_cars_record() {
        let key = "ab".repeat(32);
        let v = json!({"vin": "WVWZZZ1JZXW000001", "publicKey": key, "platform": "mqb-evo",
            "firmwareVersion": null, "registeredAt": "2026-11-01T00:00:00Z"});
        let t = rekey_text(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "VIN         WVWZZZ1JZXW000001", "{t}");
        assert_eq!(lines[1], format!("Public key  {key}"), "{t}");
        assert_eq!(lines[3], "Firmware    -", "{t}");
        assert_eq!(lines[4], "Registered  2026-11-01T00:00:00Z", "{t}");
    }

    #[test]
    fn history_renders_the_gateway_entries_and_the_next_page() {
        let vin: Vin = "WVWZZZ1JZXW000001".parse().unwrap();
        let gw = json!({"vin": vin.as_str(), "entries": [
            {"id": "9", "timestamp": "t9", "type": "REPORT", "seq": 3, "detail": "applied seq 3"},
            {"id": "8", "timestamp": "t8", "type": "PRESENCE", "detail": "online"},
            {"id": "7", "timestamp": "t7", "type": "COMMAND", "seq": 3, "requestId": "r1", "detail": "attempt 2 (re-sent)"}],
            "nextBefore": "7"});
        let t = history_text(&gw, &vin, 3);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            format!("History of {vin}: 3 entries, newest first")
        );
        assert_eq!(
            lines[1], "TIME  TYPE      SEQ  REQUEST  DETAIL               ID",
            "{t}"
        );
        assert_eq!(
            lines[2], "t9    REPORT    3    -        applied seq 3        9",
            "{t}"
        );
        assert_eq!(
            lines[3], "t8    PRESENCE  -    -        online               8",
            "{t}"
        );
        assert_eq!(
            lines[4], "t7    COMMAND   3    r1       attempt 2 (re-sent)  7",
            "{t}"
        );
        assert!(t.contains("--limit 3 --before 7"), "{t}");
        let last = json!({"vin": vin.as_str(), "entries": [], "nextBefore": null});
        let t = history_text(&last, &vin, 3);
        assert!(t.contains("0 entries") && !t.contains("--before"), "{t}");
        // A list under another name, or a bare list, is still shown, with its own fields.
        let other = json!({"vin": vin.as_str(), "log": [{"seq": 1, "what": "x"}]});
        assert!(history_text(&other, &vin, 5).contains("SEQ  what"));
        let bare = json!([{"type": "COMMAND", "seq": 1, "timestamp": "t0"}]);
        assert!(history_text(&bare, &vin, 5).contains("1 entries"));
    }
}
