//! `caasctl request show`, `caasctl campaign show` and `caasctl gateway tickets`: what became
//! of the activations and deactivations the gateway took, from its IoT API.
//!
//! - `GET /ota/requests/{requestId}` answers `{requestId, vin, action, serviceId, status,
//!   phase, attempts, seq, errorCode, createdAt, updatedAt, completedAt, campaignId}`, where
//!   `status` is `QUEUED`, `IN_PROGRESS`, `COMPLETED` or `FAILED` and `phase` is `SENDING`,
//!   `BACKOFF`, `PROBING` or `DONE`.
//! - `GET /campaigns/{campaignId}` answers `{campaignId, action, serviceId, total, createdAt,
//!   counts:{QUEUED, IN_PROGRESS, COMPLETED, FAILED}}`, where `total` is the VINs the
//!   campaign listed and the counts are its requests: a car refused when the campaign was
//!   posted (unknown, too busy...) has none, hence the label "Total VINs". A campaign posted
//!   with an `abortWhen` rule also has `abortWhen: {refusedPercent, minFinished}`, and once
//!   the rule stopped it, `abortedAt` and `abortReason` (null otherwise): shown when set.
//! - `GET /support/tickets?limit=N[&before=CURSOR][&vin=VIN]` answers, newest first,
//!   `{tickets:[{ticketId, requestId, vin, serviceId, action, createdAt, reason, attempts,
//!   connectivity, lastSeen, probeAnswered, expectedSeq, appliedSeq, diagnostics}],
//!   nextBefore}`: one ticket per request that ended `FAILED` unconfirmed after its retries;
//!   `nextBefore` is the `before` cursor of the next (older) page, `null` on the last one.
//!
//! As in [`crate::vehicle`], the readable forms are built around the fields named here and
//! show any other field too, so that a newer gateway's additions are seen, not lost.

use caas_protocol::{RequestId, Vin};
use serde_json::Value;

use crate::gateway::{listing_path, page_path, Gateway};
use crate::http::{Client, HttpError};
use crate::table::{
    field, key_values, labelled_fields, list_items, listing_text, other_fields, render, spread,
};

/// The lines of a request, as (field, label).
const REQUEST_FIELDS: [(&str, &str); 13] = [
    ("requestId", "Request"),
    ("vin", "VIN"),
    ("action", "Action"),
    ("serviceId", "Service"),
    ("status", "Status"),
    ("phase", "Phase"),
    ("attempts", "Attempts"),
    ("seq", "Seq"),
    ("errorCode", "Error code"),
    ("createdAt", "Created"),
    ("updatedAt", "Updated"),
    ("completedAt", "Completed"),
    ("campaignId", "Campaign"),
];

/// The lines of a campaign above its counts, as (field, label).
const CAMPAIGN_FIELDS: [(&str, &str); 6] = [
    ("campaignId", "Campaign"),
    ("action", "Action"),
    ("serviceId", "Service"),
    ("total", "Total VINs"),
    ("createdAt", "Created"),
    ("cancelledAt", "Cancelled"),
];

/// A campaign's abort rule and abort: shown only when set (most campaigns have neither).
const ABORT_FIELDS: [(&str, &str); 3] = [
    ("abortWhen", "Abort when"),
    ("abortedAt", "Aborted"),
    ("abortReason", "Abort reason"),
];

/// The columns of the campaigns table, as (field, header). `ABORTED` only when a campaign
/// of the page was aborted; the rule and the reason are too wide for a table (`campaign
/// show` has them).
const CAMPAIGN_COLUMNS: [(&str, &str); 7] = [
    ("campaignId", "CAMPAIGN"),
    ("createdAt", "CREATED"),
    ("action", "ACTION"),
    ("serviceId", "SERVICE"),
    ("total", "VINS"),
    ("cancelledAt", "CANCELLED"),
    ("abortedAt", "ABORTED"),
];

/// The columns of a campaign's requests, as (field, header).
const CAMPAIGN_REQUEST_COLUMNS: [(&str, &str); 8] = [
    ("requestId", "REQUEST"),
    ("vin", "VIN"),
    ("status", "STATUS"),
    ("phase", "PHASE"),
    ("attempts", "ATTEMPTS"),
    ("seq", "SEQ"),
    ("errorCode", "ERROR CODE"),
    ("updatedAt", "UPDATED"),
];

/// A campaign's request states in the order a request goes through them.
const STATES: [&str; 4] = ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"];

/// The columns of the tickets table, as (field, header); the diagnostics are spread into
/// `diagnostics.*` columns so that a cell holds one value, not a JSON object.
const TICKET_COLUMNS: [(&str, &str); 16] = [
    ("ticketId", "TICKET"),
    ("createdAt", "CREATED"),
    ("vin", "VIN"),
    ("serviceId", "SERVICE"),
    ("action", "ACTION"),
    ("requestId", "REQUEST"),
    ("attempts", "ATTEMPTS"),
    ("expectedSeq", "SEQ"),
    ("appliedSeq", "APPLIED SEQ"),
    ("connectivity", "CONNECTIVITY"),
    ("lastSeen", "LAST SEEN"),
    ("probeAnswered", "PROBE ANSWERED"),
    ("diagnostics.firmwareVersion", "FIRMWARE"),
    ("diagnostics.networkSignalStrength", "SIGNAL"),
    ("diagnostics.errorCodes", "ERROR CODES"),
    ("reason", "REASON"),
];

impl Gateway {
    /// `GET /ota/requests/{requestId}`.
    pub fn request(&self, client: &Client, id: &RequestId) -> Result<Value, HttpError> {
        self.get_json(client, &format!("/ota/requests/{id}"))
    }

    /// `POST /ota/requests/{requestId}/cancel`: the request, ended.
    pub fn cancel_request(&self, client: &Client, id: &RequestId) -> Result<Value, HttpError> {
        self.post_json(client, &format!("/ota/requests/{id}/cancel"))
    }

    /// `POST /campaigns/{campaignId}/cancel`: the campaign, with `cancelledNow`.
    pub fn cancel_campaign(&self, client: &Client, id: &RequestId) -> Result<Value, HttpError> {
        self.post_json(client, &format!("/campaigns/{id}/cancel"))
    }

    /// `GET /campaigns?limit=N[&before=CURSOR]`.
    pub fn campaigns(
        &self,
        client: &Client,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Value, HttpError> {
        self.get_json(client, &page_path("/campaigns", limit, before))
    }

    /// `GET /campaigns/{campaignId}/requests?limit=N[&after=CURSOR][&status=S]`.
    pub fn campaign_requests(
        &self,
        client: &Client,
        id: &RequestId,
        page: &CampaignRequestsPage<'_>,
    ) -> Result<Value, HttpError> {
        let params = [("after", page.after), ("status", page.status)];
        let path = listing_path(&format!("/campaigns/{id}/requests"), page.limit, &params);
        self.get_json(client, &path)
    }

    /// `GET /campaigns/{campaignId}`.
    pub fn campaign(&self, client: &Client, id: &RequestId) -> Result<Value, HttpError> {
        self.get_json(client, &format!("/campaigns/{id}"))
    }

    /// `GET /support/tickets?limit=N[&before=CURSOR][&vin=VIN]`.
    pub fn tickets(&self, client: &Client, page: &TicketPage<'_>) -> Result<Value, HttpError> {
        let params = [("before", page.before), ("vin", page.vin.map(Vin::as_str))];
        self.get_json(
            client,
            &listing_path("/support/tickets", page.limit, &params),
        )
    }
}

/// Which page of the support tickets to ask for.
#[derive(Debug, Clone, Copy)]
pub struct TicketPage<'a> {
    /// Most tickets on the page.
    pub limit: u32,
    /// Older than this cursor (the previous page's `nextBefore`).
    pub before: Option<&'a str>,
    /// Only this car's.
    pub vin: Option<&'a Vin>,
}

fn keys_of(fields: &[(&'static str, &str)]) -> Vec<&'static str> {
    fields.iter().map(|(k, _)| *k).collect()
}

/// The readable form of a request answer.
pub fn request_text(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{v}\n");
    };
    let mut pairs = labelled_fields(obj, &REQUEST_FIELDS);
    pairs.extend(other_fields(obj, &keys_of(&REQUEST_FIELDS)));
    let mut out = key_values(&pairs);
    // A campaign's request is one car of many: the operator's next question is the rest.
    if let Some(Value::String(cid)) = obj.get("campaignId") {
        out.push_str(&format!("Its campaign: caasctl campaign show {cid}\n"));
    }
    out
}

/// The readable form of a campaign answer: its fields, then its requests counted by state.
pub fn campaign_text(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{v}\n");
    };
    let counts = obj.get("counts").and_then(Value::as_object);
    let mut shown = keys_of(&CAMPAIGN_FIELDS);
    shown.extend(keys_of(&ABORT_FIELDS));
    if counts.is_some() {
        shown.push("counts");
    }
    let mut pairs = labelled_fields(obj, &CAMPAIGN_FIELDS);
    for (key, label) in ABORT_FIELDS {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(rule) if key == "abortWhen" => pairs.push((label, abort_rule_text(rule))),
            Some(_) => pairs.push((label, field(obj, key))),
        }
    }
    pairs.extend(other_fields(obj, &shown));
    let mut out = key_values(&pairs);
    if let Some(counts) = counts {
        let mut rows: Vec<Vec<String>> = STATES
            .iter()
            .map(|s| vec![(*s).to_owned(), field(counts, s)])
            .collect();
        rows.extend(
            other_fields(counts, &STATES)
                .into_iter()
                .map(|(k, v)| vec![k.to_owned(), v]),
        );
        out.push_str("\nRequests by state:\n");
        out.push_str(&render(&["STATE", "COUNT"], &rows));
    }
    out
}

/// `{refusedPercent: 30, minFinished: 20}` as "30% of at least 20 finished requests refused
/// by their cars"; another shape as it is.
fn abort_rule_text(rule: &Value) -> String {
    match (
        rule.get("refusedPercent").and_then(Value::as_u64),
        rule.get("minFinished").and_then(Value::as_u64),
    ) {
        (Some(p), Some(m)) => {
            format!("{p}% of at least {m} finished requests refused by their cars")
        }
        _ => crate::table::json_cell(rule),
    }
}

/// A listed campaign without its abort rule and reason, and without `abortedAt` while it is
/// unset: a page of campaigns none of which was aborted keeps its columns.
fn without_unset_abort(item: &Value) -> Value {
    let mut item = item.clone();
    if let Some(obj) = item.as_object_mut() {
        obj.remove("abortWhen");
        obj.remove("abortReason");
        if obj.get("abortedAt").is_some_and(Value::is_null) {
            obj.remove("abortedAt");
        }
    }
    item
}

/// The readable form of a tickets answer; `page` is what was asked for, repeated in the
/// command that shows the next page.
pub fn tickets_text(v: &Value, page: &TicketPage<'_>) -> String {
    let items: Vec<Value> = list_items(v, "tickets")
        .iter()
        .map(|t| spread(t, "diagnostics"))
        .collect();
    let vin = page.vin.map(|v| format!(" --vin {v}")).unwrap_or_default();
    let title = ("Support tickets", "newest first");
    let mut out = listing_text(v, &items, title, &TICKET_COLUMNS, "nextBefore", |next| {
        format!(
            "Older tickets: caasctl gateway tickets --limit {}{vin} --before {next}",
            page.limit
        )
    });
    // A gateway without paging lists only its newest tickets: a full page may hide more.
    let pages = v.get("nextBefore").is_some();
    if !pages && u32::try_from(items.len()).is_ok_and(|n| n >= page.limit) {
        out.push_str(&format!(
            "Older tickets may exist (this gateway has no cursor past its newest {})\n",
            page.limit
        ));
    }
    out
}

/// The readable form of a campaigns page (`GET /campaigns`); `limit` is the page size
/// asked for, repeated in the command that shows the next page.
pub fn campaigns_text(v: &Value, limit: u32) -> String {
    let items: Vec<Value> = list_items(v, "campaigns")
        .iter()
        .map(without_unset_abort)
        .collect();
    let title = ("Campaigns", "newest first");
    listing_text(v, &items, title, &CAMPAIGN_COLUMNS, "nextBefore", |next| {
        format!("Older campaigns: caasctl campaign list --limit {limit} --before {next}")
    })
}

/// Which page of a campaign's requests to ask for.
#[derive(Debug, Clone, Copy)]
pub struct CampaignRequestsPage<'a> {
    /// Most requests on the page.
    pub limit: u32,
    /// After this cursor (the previous page's `nextAfter`).
    pub after: Option<&'a str>,
    /// Only requests in this state.
    pub status: Option<&'a str>,
}

/// The readable form of a page of a campaign's requests
/// (`GET /campaigns/{campaignId}/requests`).
pub fn campaign_requests_text(
    v: &Value,
    campaign: &RequestId,
    page: &CampaignRequestsPage<'_>,
) -> String {
    let items = list_items(v, "requests");
    let status = page
        .status
        .map(|s| format!(" --status {s}"))
        .unwrap_or_default();
    let name = format!("Requests of campaign {campaign}");
    let title = (name.as_str(), "in the order of its VINs");
    listing_text(
        v,
        items,
        title,
        &CAMPAIGN_REQUEST_COLUMNS,
        "nextAfter",
        |next| {
            format!(
            "More requests: caasctl campaign requests {campaign} --limit {}{status} --after {next}",
            page.limit
        )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(t: &str) -> Vec<&str> {
        t.lines().collect()
    }

    #[test]
    fn a_request_shows_every_field_in_order_and_what_the_gateway_added() {
        let v = json!({
            "requestId": "0b6f3a52-9c1e-4d2a-8f00-1234567890ab", "vin": "WVWZZZ1JZXW000001",
            "action": "ACTIVATE", "serviceId": "power-boost", "status": "FAILED",
            "phase": "DONE", "attempts": 4, "seq": 7, "errorCode": "NO_CONFIRMATION",
            "createdAt": "2026-11-22T13:00:00Z", "updatedAt": "2026-11-22T13:52:00Z",
            "completedAt": "2026-11-22T13:52:00Z", "campaignId": null, "shard": 1
        });
        let t = request_text(&v);
        assert_eq!(
            lines(&t),
            [
                "Request     0b6f3a52-9c1e-4d2a-8f00-1234567890ab",
                "VIN         WVWZZZ1JZXW000001",
                "Action      ACTIVATE",
                "Service     power-boost",
                "Status      FAILED",
                "Phase       DONE",
                "Attempts    4",
                "Seq         7",
                "Error code  NO_CONFIRMATION",
                "Created     2026-11-22T13:00:00Z",
                "Updated     2026-11-22T13:52:00Z",
                "Completed   2026-11-22T13:52:00Z",
                "Campaign    -",
                "shard       1",
            ],
            "{t}"
        );
        // In flight, in a campaign: the missing end is a dash, and the campaign is one
        // command away.
        let v = json!({"requestId": "r", "status": "IN_PROGRESS", "phase": "BACKOFF",
                       "completedAt": null, "campaignId": "c-1"});
        let t = request_text(&v);
        assert!(t.contains("Completed   -\n"), "{t}");
        assert!(t.contains("Error code  -\n"), "{t}");
        assert!(
            t.ends_with("Its campaign: caasctl campaign show c-1\n"),
            "{t}"
        );
        assert_eq!(request_text(&json!("odd")), "\"odd\"\n");
    }

    #[test]
    fn a_campaign_shows_its_fields_and_a_count_per_state() {
        let v = json!({
            "campaignId": "c-1", "action": "ACTIVATE", "serviceId": "snow-mode", "total": 3,
            "createdAt": "2026-11-22T13:00:00Z",
            "counts": {"FAILED": 1, "COMPLETED": 2, "IN_PROGRESS": 0, "QUEUED": 0, "HELD": 5}
        });
        let t = campaign_text(&v);
        assert_eq!(
            lines(&t),
            [
                "Campaign    c-1",
                "Action      ACTIVATE",
                "Service     snow-mode",
                "Total VINs  3",
                "Created     2026-11-22T13:00:00Z",
                "Cancelled   -",
                "",
                "Requests by state:",
                "STATE        COUNT",
                "QUEUED       0",
                "IN_PROGRESS  0",
                "COMPLETED    2",
                "FAILED       1",
                "HELD         5",
            ],
            "{t}"
        );
        // A cancel's answer: when, and how many requests it ended.
        let mut cancelled = v.clone();
        cancelled["cancelledAt"] = json!("2026-11-22T13:05:00Z");
        cancelled["cancelledNow"] = json!(1);
        let t = campaign_text(&cancelled);
        assert!(t.contains("Cancelled     2026-11-22T13:05:00Z\n"), "{t}");
        assert!(t.contains("cancelledNow  1\n"), "{t}");
        // Counts in another shape are shown as a field rather than dropped.
        let t = campaign_text(&json!({"campaignId": "c-2", "counts": [1, 2]}));
        assert!(t.contains("counts      [1,2]"), "{t}");
        assert!(!t.contains("Requests by state"), "{t}");
    }

    #[test]
    fn a_campaign_shows_its_abort_rule_and_abort_only_when_set() {
        let v = json!({
            "campaignId": "c-1", "action": "ACTIVATE", "serviceId": "autopilot", "total": 30,
            "createdAt": "2026-11-22T13:00:00Z", "cancelledAt": "2026-11-22T13:01:00Z",
            "abortWhen": {"refusedPercent": 30, "minFinished": 20},
            "abortedAt": "2026-11-22T13:01:00Z",
            "abortReason": "7 of 20 finished requests refused by their cars (35% \u{2265} 30%)",
            "counts": {"QUEUED": 0, "IN_PROGRESS": 0, "COMPLETED": 13, "FAILED": 17}
        });
        let t = campaign_text(&v);
        let head: Vec<&str> = lines(&t).into_iter().take(9).collect();
        assert_eq!(
            head,
            [
                "Campaign      c-1",
                "Action        ACTIVATE",
                "Service       autopilot",
                "Total VINs    30",
                "Created       2026-11-22T13:00:00Z",
                "Cancelled     2026-11-22T13:01:00Z",
                "Abort when    30% of at least 20 finished requests refused by their cars",
                "Aborted       2026-11-22T13:01:00Z",
                "Abort reason  7 of 20 finished requests refused by their cars (35% \u{2265} 30%)",
            ],
            "{t}"
        );
        // A rule that did not trip: the rule only. No rule: none of the three.
        let mut ruled = v.clone();
        ruled["abortedAt"] = Value::Null;
        ruled["abortReason"] = Value::Null;
        let t = campaign_text(&ruled);
        assert!(t.contains("\nAbort when  "), "{t}");
        assert!(!t.contains("Aborted") && !t.contains("Abort reason"), "{t}");
        let mut plain = ruled.clone();
        plain["abortWhen"] = Value::Null;
        let t = campaign_text(&plain);
        assert!(!t.contains("bort"), "{t}");
        assert!(t.starts_with("Campaign    c-1\n"), "{t}");

        // Listed: an ABORTED column only on a page with an aborted campaign.
        // As GET /campaigns lists them: without counts.
        let listed = |c: &Value| {
            let mut c = c.clone();
            c.as_object_mut().unwrap().remove("counts");
            c
        };
        let (v, ruled, plain) = (listed(&v), listed(&ruled), listed(&plain));
        let page = |items: Value| json!({"campaigns": items, "nextBefore": null});
        let t = campaigns_text(&page(json!([plain.clone(), ruled.clone()])), 50);
        assert!(!t.contains("ABORTED") && !t.contains("bort"), "{t}");
        let t = campaigns_text(&page(json!([v.clone(), plain])), 50);
        let header = lines(&t)[1];
        let columns: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(
            columns[columns.len() - 2..],
            ["CANCELLED", "ABORTED"],
            "{t}"
        );
        assert!(!t.contains("refused"), "{t}");
    }

    #[test]
    fn tickets_are_a_table_with_the_diagnostics_spread_into_columns() {
        let v = json!({"tickets": [
            {"ticketId": "T-2", "requestId": "r-2", "vin": "WVWZZZ1JZXW000002",
             "serviceId": "snow-mode", "action": "ACTIVATE", "createdAt": "t2",
             "reason": "NO_CONFIRMATION: no confirmation after 2 attempts and a status query",
             "attempts": 2, "connectivity": "OFFLINE", "lastSeen": null, "probeAnswered": false,
             "expectedSeq": 1, "appliedSeq": 0,
             "diagnostics": {"errorCodes": [], "firmwareVersion": "1.0.0", "networkSignalStrength": null}},
            {"ticketId": "T-1", "requestId": "r-1", "vin": "WVWZZZ1JZXW000001",
             "serviceId": "power-boost", "action": "DEACTIVATE", "createdAt": "t1",
             "reason": "NO_CONFIRMATION", "attempts": 4, "connectivity": "ONLINE",
             "lastSeen": "t0", "probeAnswered": true, "expectedSeq": 9, "appliedSeq": 8,
             "diagnostics": {"errorCodes": ["E_BATT_LOW", "E_TPMS"], "firmwareVersion": "2.4.1",
                             "networkSignalStrength": 63, "modem": "lte"},
             "region": "eu"}
        ]});
        let t = tickets_text(&v, &page(20));
        let l = lines(&t);
        assert_eq!(l[0], "Support tickets: 2, newest first");
        let cells = |line: &str| -> Vec<String> {
            line.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let header = cells(l[1]);
        assert_eq!(
            header,
            [
                "TICKET",
                "CREATED",
                "VIN",
                "SERVICE",
                "ACTION",
                "REQUEST",
                "ATTEMPTS",
                "SEQ",
                "APPLIED SEQ",
                "CONNECTIVITY",
                "LAST SEEN",
                "PROBE ANSWERED",
                "FIRMWARE",
                "SIGNAL",
                "ERROR CODES",
                "REASON",
                "diagnostics.modem",
                "region"
            ],
            "{t}"
        );
        assert_eq!(
            cells(l[2]),
            [
                "T-2",
                "t2",
                "WVWZZZ1JZXW000002",
                "snow-mode",
                "ACTIVATE",
                "r-2",
                "2",
                "1",
                "0",
                "OFFLINE",
                "-",
                "false",
                "1.0.0",
                "-",
                "-",
                "NO_CONFIRMATION: no confirmation after 2 attempts and a status query",
                "-",
                "-"
            ],
            "{t}"
        );
        assert_eq!(
            cells(l[3]),
            [
                "T-1",
                "t1",
                "WVWZZZ1JZXW000001",
                "power-boost",
                "DEACTIVATE",
                "r-1",
                "4",
                "9",
                "8",
                "ONLINE",
                "t0",
                "true",
                "2.4.1",
                "63",
                "E_BATT_LOW, E_TPMS",
                "NO_CONFIRMATION",
                "lte",
                "eu"
            ],
            "{t}"
        );
        assert_eq!(l.len(), 4, "no hint under a page that is not full:\n{t}");
    }

    fn page(limit: u32) -> TicketPage<'static> {
        TicketPage {
            limit,
            before: None,
            vin: None,
        }
    }

    #[test]
    fn campaigns_are_a_table_and_a_full_page_names_the_next() {
        let v = json!({"campaigns": [
            {"campaignId": "c-2", "createdAt": "t2", "action": "ACTIVATE", "serviceId": "snow-mode",
             "total": 3, "cancelledAt": "t3"},
            {"campaignId": "c-1", "createdAt": "t1", "action": "DEACTIVATE", "serviceId": "radio",
             "total": 1, "cancelledAt": null}
        ], "nextBefore": "c-1"});
        let t = campaigns_text(&v, 2);
        assert_eq!(
            lines(&t),
            [
                "Campaigns: 2, newest first",
                "CAMPAIGN  CREATED  ACTION      SERVICE    VINS  CANCELLED",
                "c-2       t2       ACTIVATE    snow-mode  3     t3",
                "c-1       t1       DEACTIVATE  radio      1     -",
                "Older campaigns: caasctl campaign list --limit 2 --before c-1",
            ],
            "{t}"
        );
        let last = json!({"campaigns": [], "nextBefore": null});
        assert_eq!(campaigns_text(&last, 2), "Campaigns: 0, newest first\n");
    }

    #[test]
    fn a_page_with_older_tickets_names_the_command_for_the_next_one() {
        let one = json!({"tickets": [{"ticketId": "T-9", "reason": "x"}], "nextBefore": "T-9"});
        assert!(
            tickets_text(&one, &page(1))
                .ends_with("Older tickets: caasctl gateway tickets --limit 1 --before T-9\n"),
            "{}",
            tickets_text(&one, &page(1))
        );
        let vin: Vin = "WVWZZZ1JZXW000001".parse().unwrap();
        let of_car = TicketPage {
            vin: Some(&vin),
            ..page(1)
        };
        assert!(tickets_text(&one, &of_car)
            .ends_with("--limit 1 --vin WVWZZZ1JZXW000001 --before T-9\n"));
        // The last page says nothing more.
        let last = json!({"tickets": [{"ticketId": "T-1", "reason": "x"}], "nextBefore": null});
        assert_eq!(lines(&tickets_text(&last, &page(1))).len(), 3);
        // A gateway that does not page: a full page may hide older tickets.
        let full = json!({"tickets": vec![json!({"ticketId": "T"}); 5]});
        let t = tickets_text(&full, &page(5));
        assert!(t.starts_with("Support tickets: 5, newest first\n"), "{t}");
        assert!(
            t.ends_with("Older tickets may exist (this gateway has no cursor past its newest 5)\n"),
            "{t}"
        );
        let none = json!({"tickets": [], "nextBefore": null});
        assert_eq!(
            tickets_text(&none, &page(20)),
            "Support tickets: 0, newest first\n"
        );
        // A ticket without diagnostics has no diagnostics columns.
        let t = tickets_text(&last, &page(20));
        assert_eq!(lines(&t)[1], "TICKET  REASON", "{t}");
    }
}
