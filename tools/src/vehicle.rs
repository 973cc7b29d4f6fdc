//! `caasctl vehicle list|status|history|rekey|decommission`: the fleet and a car's state and
//! history from the gateway's IoT API, the replacement of a car's public key, and a car taken
//! out of the fleet.
//!
//! - `GET /vehicles?limit=N[&after=VIN][&connectivity=C][&serviceStatus=S]` answers, in VIN
//!   order, `{vehicles:[ITEM], nextAfter}`, where ITEM is a status answer (below) with the
//!   car's `platform`, `publicKey` and `registeredAt`, and `nextAfter` is the `after` cursor
//!   of the next page, `null` on the last one. The gateway looks at a bounded number of cars
//!   a call, so a filtered page may be short, even empty, with a `nextAfter`.
//! - `GET /vehicles/{vin}/status` answers (DESIGN.md §4)
//!   `{vin, connectivity, lastSeen, activeServices:[{serviceId, activationDate, status}],
//!   diagnostics:{errorCodes, firmwareVersion, networkSignalStrength}}`.
//! - `GET /vehicles/{vin}/history?limit=N[&before=CURSOR]` answers, newest first,
//!   `{vin, entries:[{id, timestamp, type, seq?, requestId?, detail}], nextBefore}`, where
//!   `type` is `REQUEST`, `COMMAND`, `REPORT`, `RESULT`, `PRESENCE`, `KEY_REPLACED`,
//!   `DECOMMISSIONED` or `REGISTERED` and
//!   `nextBefore` is the `before` cursor of the next (older) page, `null` on the last one.
//! - `POST /vehicles/{vin}/key {publicKey, previousPublicKey}` answers the car's record
//!   `{vin, publicKey, platform, firmwareVersion, registeredAt}` with its new key.
//! - `DELETE /vehicles/{vin}` answers `{vin, decommissionedAt, requestsFailed, withdrawalSeq}`
//!   (a repeat: the same car and time, `requestsFailed` 0).
//!
//! They are rendered from the JSON generically around the fields named here, so a field the
//! gateway adds (or a small difference in shape) is shown rather than breaking the tool.

use caas_protocol::{verifying_key_to_hex, VerifyingKey, Vin};
use serde_json::{json, Value};

use crate::gateway::{listing_path, page_path, Gateway};
use crate::http::{Client, HttpError};
use crate::table::{
    field, json_cell, key_values, list_items, listing_text, objects_table, other_fields, spread,
};

/// The `connectivity` values `GET /vehicles` filters on.
pub const CONNECTIVITY_STATES: [&str; 3] = ["ONLINE", "OFFLINE", "LIMITED"];
/// The service `status` values `GET /vehicles` filters on (`serviceStatus`), in the order a
/// car's services are counted in the SERVICES column.
pub const SERVICE_STATES: [&str; 3] = ["ACTIVE", "PENDING", "ERROR"];

/// The columns of the vehicles table, as (field, header) of the rows [`vehicle_row`] makes.
const VEHICLE_COLUMNS: [(&str, &str); 6] = [
    ("vin", "VIN"),
    ("connectivity", "CONNECTIVITY"),
    ("lastSeen", "LAST SEEN"),
    ("services", "SERVICES"),
    ("diagnostics.firmwareVersion", "FIRMWARE"),
    ("platform", "PLATFORM"),
];

/// Fields of a listed car that its row leaves out, so that a row fits a terminal (a public
/// key alone is 64 digits): `--json` shows them all, e.g. the `publicKey` that `vehicle rekey
/// --previous-public-key` names, and `vehicle status VIN` the diagnostics. `activeServices`
/// is in the row, counted.
const VEHICLE_FIELDS_NOT_IN_ROW: [&str; 5] = [
    "activeServices",
    "publicKey",
    "registeredAt",
    "diagnostics.errorCodes",
    "diagnostics.networkSignalStrength",
];

/// Which page of the fleet to ask for.
#[derive(Debug, Clone, Copy)]
pub struct VehiclePage<'a> {
    /// Most cars on the page.
    pub limit: u32,
    /// After this car (the previous page's `nextAfter`).
    pub after: Option<&'a Vin>,
    /// Only cars in this connectivity state (one of [`CONNECTIVITY_STATES`]).
    pub connectivity: Option<&'a str>,
    /// Only cars with a service in this state (one of [`SERVICE_STATES`]).
    pub service_status: Option<&'a str>,
}

impl Gateway {
    /// `GET /vehicles?limit=N[&after=VIN][&connectivity=C][&serviceStatus=S]`.
    pub fn vehicles(&self, client: &Client, page: &VehiclePage<'_>) -> Result<Value, HttpError> {
        let params = [
            ("after", page.after.map(Vin::as_str)),
            ("connectivity", page.connectivity),
            ("serviceStatus", page.service_status),
        ];
        self.get_json(client, &listing_path("/vehicles", page.limit, &params))
    }

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

    /// `DELETE /vehicles/{vin}`: the car leaves the fleet.
    pub fn decommission(&self, client: &Client, vin: &Vin) -> Result<Value, HttpError> {
        self.delete_json(client, &format!("/vehicles/{vin}"))
    }
}

/// A car's services counted by state, e.g. `2 active, 1 error`: the states of
/// [`SERVICE_STATES`] first, any other in the order met; `none` for no service.
fn services_summary(services: &Value) -> Value {
    let Some(services) = services.as_array() else {
        // Not the list this tool knows: shown as it came.
        return services.clone();
    };
    let mut counts: Vec<(String, usize)> = SERVICE_STATES
        .iter()
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    for service in services {
        let state = service
            .get("status")
            .map(json_cell)
            .filter(|s| s != "-")
            .unwrap_or_else(|| "unknown".to_owned());
        match counts.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => counts.push((state, 1)),
        }
    }
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {}", s.to_lowercase()))
        .collect();
    if parts.is_empty() {
        Value::from("none")
    } else {
        Value::from(parts.join(", "))
    }
}

/// One listed car as a row of the vehicles table: its diagnostics spread into
/// `diagnostics.*` fields, its services counted into `services`, without the fields of
/// [`VEHICLE_FIELDS_NOT_IN_ROW`]; any field the gateway added is kept under its name.
fn vehicle_row(car: &Value) -> Value {
    let mut row = spread(car, "diagnostics");
    if let Some(obj) = row.as_object_mut() {
        if let Some(services) = obj.get("activeServices") {
            let summary = services_summary(services);
            obj.insert("services".to_owned(), summary);
        }
        obj.retain(|k, _| !VEHICLE_FIELDS_NOT_IN_ROW.contains(&k.as_str()));
    }
    row
}

/// The readable form of a page of the fleet (`GET /vehicles`); `page` is what was asked for,
/// repeated (with its filters) in the command that shows the next page.
pub fn vehicles_text(v: &Value, page: &VehiclePage<'_>) -> String {
    let rows: Vec<Value> = list_items(v, "vehicles").iter().map(vehicle_row).collect();
    let mut filters = String::new();
    let mut described = Vec::new();
    if let Some(c) = page.connectivity {
        filters.push_str(&format!(" --connectivity {c}"));
        described.push(c.to_owned());
    }
    if let Some(s) = page.service_status {
        filters.push_str(&format!(" --service-status {s}"));
        described.push(format!("with a service {s}"));
    }
    let name = if described.is_empty() {
        "Vehicles".to_owned()
    } else {
        format!("Vehicles {}", described.join(" "))
    };
    let title = (name.as_str(), "in VIN order");
    listing_text(v, &rows, title, &VEHICLE_COLUMNS, "nextAfter", |next| {
        let command = format!(
            "More vehicles: caasctl vehicle list --limit {}{filters} --after {next}",
            page.limit
        );
        if rows.is_empty() {
            // The gateway stopped looking before it found one (it looks at a bounded number
            // of cars a call): an empty page is not the end of the fleet.
            format!(
                "No car on this page matched; the cars after {next} are still to look at.\n\
                 {command}"
            )
        } else {
            command
        }
    })
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

/// The readable form of a decommissioning's answer.
pub fn decommission_text(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{v}\n");
    };
    let mut pairs = vec![
        ("VIN", field(obj, "vin")),
        ("Decommissioned", field(obj, "decommissionedAt")),
        ("Requests failed", field(obj, "requestsFailed")),
        ("Withdrawal seq", field(obj, "withdrawalSeq")),
    ];
    const KNOWN: [&str; 4] = ["vin", "decommissionedAt", "requestsFailed", "withdrawalSeq"];
    pairs.extend(other_fields(obj, &KNOWN));
    let mut out = key_values(&pairs);
    out.push_str(
        "The car is no longer registered: its requests in flight ended FAILED \
         (DECOMMISSIONED, no charge) and a last command withdrew its grants. Its history stays; \
         registered again (POST /vehicles), its commands go on above the withdrawal seq.\n",
    );
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

    fn fleet_page(limit: u32) -> VehiclePage<'static> {
        VehiclePage {
            limit,
            after: None,
            connectivity: None,
            service_status: None,
        }
    }

    #[test]
    fn a_fleet_page_is_a_row_per_car_with_its_services_counted_and_the_next_command() {
        let service = |id: &str, status: &str| json!({"serviceId": id, "activationDate": "2026-11-01T00:00:00Z", "status": status});
        let v = json!({"vehicles": [
            {"vin": "WVWZZZ1JZXW000001", "connectivity": "ONLINE", "lastSeen": "2026-11-22T13:00:00Z",
             "activeServices": [service("a", "ACTIVE"), service("b", "ERROR"), service("c", "ACTIVE"),
                                service("d", "PENDING")],
             "diagnostics": {"errorCodes": ["E_TPMS"], "firmwareVersion": "2.4.1", "networkSignalStrength": 80},
             "platform": "mqb-evo", "publicKey": "ab".repeat(32), "registeredAt": "2026-11-01T00:00:00Z"},
            {"vin": "WVWZZZ1JZXW000002", "connectivity": "OFFLINE", "lastSeen": null,
             "activeServices": [],
             "diagnostics": {"errorCodes": [], "firmwareVersion": null, "networkSignalStrength": null},
             "platform": "meb", "publicKey": "cd".repeat(32), "registeredAt": "2026-11-02T00:00:00Z"}
        ], "nextAfter": "WVWZZZ1JZXW000002"});
        let page = VehiclePage {
            connectivity: Some("ONLINE"),
            service_status: Some("ERROR"),
            ..fleet_page(2)
        };
        let t = vehicles_text(&v, &page);
        assert_eq!(
            t.lines().collect::<Vec<_>>(),
            [
                "Vehicles ONLINE with a service ERROR: 2, in VIN order",
                "VIN                CONNECTIVITY  LAST SEEN             SERVICES                      FIRMWARE  PLATFORM",
                "WVWZZZ1JZXW000001  ONLINE        2026-11-22T13:00:00Z  2 active, 1 pending, 1 error  2.4.1     mqb-evo",
                "WVWZZZ1JZXW000002  OFFLINE       -                     none                          -         meb",
                "More vehicles: caasctl vehicle list --limit 2 --connectivity ONLINE --service-status ERROR --after WVWZZZ1JZXW000002",
            ],
            "{t}"
        );
        // The last page ends with its table; a field the gateway adds is a column of its own.
        let last = json!({"vehicles": [{"vin": "WVWZZZ1JZXW000003", "connectivity": "LIMITED",
            "activeServices": [{"serviceId": "x", "status": "SUSPENDED"}, {"serviceId": "y"}],
            "diagnostics": {"firmwareVersion": "3.0", "modem": "lte"}, "region": "eu"}],
            "nextAfter": null});
        let t = vehicles_text(&last, &fleet_page(20));
        assert_eq!(
            t.lines().collect::<Vec<_>>(),
            [
                "Vehicles: 1, in VIN order",
                "VIN                CONNECTIVITY  SERVICES                FIRMWARE  diagnostics.modem  region",
                "WVWZZZ1JZXW000003  LIMITED       1 suspended, 1 unknown  3.0       lte                eu",
            ],
            "{t}"
        );
        // A filtered page the gateway cut short with no match still leads on.
        let empty = json!({"vehicles": [], "nextAfter": "WVWZZZ1JZXW020000"});
        let page = VehiclePage {
            connectivity: Some("LIMITED"),
            ..fleet_page(5)
        };
        assert_eq!(
            vehicles_text(&empty, &page),
            "Vehicles LIMITED: 0, in VIN order\n\
             No car on this page matched; the cars after WVWZZZ1JZXW020000 are still to look at.\n\
             More vehicles: caasctl vehicle list --limit 5 --connectivity LIMITED --after WVWZZZ1JZXW020000\n"
        );
        let none = json!({"vehicles": [], "nextAfter": null});
        assert_eq!(
            vehicles_text(&none, &fleet_page(5)),
            "Vehicles: 0, in VIN order\n"
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
    fn a_decommissioning_shows_the_car_the_time_and_what_it_ended() {
        let v = json!({"vin": "WVWZZZ1JZXW000001", "decommissionedAt": "2026-12-07T12:00:00Z",
            "requestsFailed": 2, "withdrawalSeq": 9});
        let t = decommission_text(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "VIN              WVWZZZ1JZXW000001", "{t}");
        assert_eq!(lines[1], "Decommissioned   2026-12-07T12:00:00Z", "{t}");
        assert_eq!(lines[2], "Requests failed  2", "{t}");
        assert_eq!(lines[3], "Withdrawal seq   9", "{t}");
        assert!(
            lines[4].starts_with("The car is no longer registered"),
            "{t}"
        );
        // A field the tool does not know is shown, not dropped; a shape it does not know
        // is printed as it came.
        let more = json!({"vin": "V", "decommissionedAt": "t", "requestsFailed": 0,
            "withdrawalSeq": 1, "reason": "scrapped"});
        assert!(decommission_text(&more).contains("scrapped"));
        assert_eq!(decommission_text(&json!([1])), "[1]\n");
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
