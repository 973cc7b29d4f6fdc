//! The OpenAPI 3 document served at `GET /openapi.json`. A test checks that every route the
//! router serves is in it, that the answers the server gives validate against the documented
//! schemas, and that each route lists exactly the statuses it can answer.

use caas_protocol::{MAX_FLAGS_PER_GRANT, MAX_PARAMS_PER_GRANT};
use serde_json::{json, Value};

use crate::campaign::{DEFAULT_MIN_FINISHED, MAX_MIN_FINISHED};

use crate::api::{
    MAX_BODY_BYTES, MAX_CAMPAIGN_BODY_BYTES, MAX_CAMPAIGN_VINS, MAX_PAGE, MAX_VEHICLES_SCANNED,
};

/// ISO 3779: 17 of 0-9 and A-Z except I, O and Q.
const VIN_PATTERN: &str = "^[A-HJ-NPR-Z0-9]{17}$";
const SERVICE_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,32}$";

fn ok(status: &str, desc: &str, schema: Value) -> Value {
    json!({ status: { "description": desc, "content": { "application/json": { "schema": schema } } } })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// What each refusal means; the same for every route that can give it, so that a client
/// can handle a status once.
fn error_description(code: &str) -> &'static str {
    match code {
        "400" => "bad input: `field` names the field or parameter, `reason` says why; nothing changed",
        "401" => "no or wrong `Authorization: Bearer` token; nothing changed",
        "404" => "no such car, request or campaign (`field` says which; final requests and campaigns are removed once older than the gateway's retention, 30 days by default; a decommissioned car is no longer registered, and `reason` says since when); nothing changed",
        "409" => "conflicts with the car's state (`field` says which): another key for a known VIN, a previousPublicKey that is not the car's key, a service that is not active, or a car already holding its most services; or (`field` Idempotency-Key) another request with the same idempotency key being handled at this moment; or (`field` requestId) a cancel of a request that ended before it; nothing changed",
        "413" => "body over this route's size limit; nothing changed",
        "422" => "the Idempotency-Key was used for a different request (another route, car or body; `field` is Idempotency-Key); nothing changed",
        "429" => "too many of this car's requests in flight (`field` is vin); nothing changed, retry later",
        "500" => "storage failure (`field` is null); the request may not be durable: poll or retry",
        "503" => "the gateway is shutting down (`field` is null); retry against a running gateway",
        _ => "refused",
    }
}

fn errors(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert(
            (*c).to_owned(),
            json!({ "description": error_description(c), "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }),
        );
    }
    Value::Object(m)
}

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn body(schema: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema } } })
}

fn path_param(name: &str, desc: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "path", "required": true, "schema": schema, "description": desc })
}

fn query(name: &str, desc: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "schema": schema, "description": desc })
}

/// The `Idempotency-Key` header of the POSTs that start work.
fn idempotency_key() -> Value {
    json!({ "name": "Idempotency-Key", "in": "header", "required": false,
        "schema": { "type": "string", "minLength": 1, "maxLength": crate::idempotency::MAX_KEY_LEN },
        "description": "Makes a repeat safe: a POST with a key already used for the same route and body answers with the first one's request (or campaign), its current status and header `Idempotent-Replayed: true`, and creates nothing; on anything else, 422. A bare token or a quoted string, printable ASCII; kept as long as requests (the retention, 30 days by default)." })
}

/// A 202 that a repeat with an idempotency key gives too.
fn accepted(desc: &str, schema: Value) -> Value {
    json!({ "202": { "description": desc, "content": { "application/json": { "schema": schema } },
        "headers": { "Idempotent-Replayed": { "description": "`true` when this answers a repeat of an earlier POST with the same Idempotency-Key (nothing new was created)", "schema": { "type": "string", "enum": ["true"] } } } } })
}

fn limit(default: usize) -> Value {
    query(
        "limit",
        &format!("entries per page, 1-{MAX_PAGE}, default {default}"),
        json!({ "type": "integer", "minimum": 1, "maximum": MAX_PAGE }),
    )
}

/// The document.
pub(crate) fn document() -> Value {
    let vin = json!({ "type": "string", "pattern": VIN_PATTERN });
    let service = json!({ "type": "string", "pattern": SERVICE_PATTERN });
    let vin_param = path_param("vin", "VIN", vin.clone());
    let body_kib = MAX_BODY_BYTES / 1024;
    let campaign_mib = MAX_CAMPAIGN_BODY_BYTES / (1024 * 1024);
    // A campaign's abort rule and its abort as GET shows them: always present, null when
    // the campaign has no rule or was not aborted.
    let abort_when = json!({ "type": "object", "nullable": true, "required": ["refusedPercent", "minFinished"],
        "description": "the campaign's abortWhen as given, minFinished filled in; null without one",
        "properties": { "refusedPercent": { "type": "integer", "minimum": 1, "maximum": 100 },
            "minFinished": { "type": "integer", "minimum": 1, "maximum": MAX_MIN_FINISHED } } });
    let aborted_at = json!({ "type": "string", "format": "date-time", "nullable": true,
        "description": "when its abortWhen rule tripped and cancelled the campaign (cancelledAt is then set too); null if it did not" });
    let abort_reason = json!({ "type": "string", "nullable": true,
        "description": "why it was aborted, with the counts it tripped at, e.g. \"7 of 20 finished requests refused by their cars (35% \u{2265} 30%)\"; null if it was not" });
    // Built in three parts: one json! literal of the whole document passes the macro's
    // recursion limit.
    let mut schemas = json!({
                "Health": { "type": "object", "required": ["status", "store", "broker", "webhookReceiver"], "properties": {
                    "status": { "type": "string", "enum": ["ok", "unavailable"] },
                    "store": { "type": "string", "enum": ["ok", "failing"] },
                    "broker": { "type": "string", "enum": ["ok", "disconnected"] },
                    "webhookReceiver": { "type": "string", "enum": ["ok", "down"] } } },
                "Error": { "type": "object", "required": ["error", "field", "reason"], "properties": {
                    "error": { "type": "string" },
                    "field": { "type": "string", "nullable": true, "description": "the offending field (dotted path, e.g. configuration.featureFlags[0]), path or query parameter, or header; null for a failure of the gateway's own" },
                    "reason": { "type": "string" },
                    "requestId": { "type": "string", "format": "uuid", "description": "only on a 500 from an activation or deactivation: the request may have been taken (its flush failed, but the gateway may still carry it out); GET /ota/requests/{requestId} tells, and a later callback may carry this id" } } },
                "Configuration": { "type": "object", "additionalProperties": false, "required": ["featureFlags"], "properties": {
                    "featureFlags": { "type": "array", "minItems": 1, "maxItems": MAX_FLAGS_PER_GRANT, "uniqueItems": true, "items": { "type": "string", "pattern": "^[a-z0-9_]{1,32}$" } },
                    "parameters": { "type": "object", "nullable": true, "maxProperties": MAX_PARAMS_PER_GRANT,
                        "description": "names are 1-24 of A-Z a-z 0-9 _; a number or boolean value is sent to the car as its JSON text, and every value's text is 0-24 printable ASCII characters",
                        "additionalProperties": { "oneOf": [
                            { "type": "string", "maxLength": 24 },
                            { "type": "number" },
                            { "type": "boolean" } ] } } } },
                "Duration": { "type": "object", "additionalProperties": false, "required": ["type"], "properties": {
                    "type": { "type": "string", "enum": ["TEMPORARY", "PERMANENT", "SUBSCRIPTION"] },
                    "expiryDate": { "type": "string", "format": "date-time", "nullable": true, "description": "required for TEMPORARY, in the future; not allowed for PERMANENT" },
                    "autoRenewal": { "type": "boolean", "nullable": true } } },
                "ActivateRequest": { "type": "object", "additionalProperties": false, "required": ["vin", "serviceId", "configuration", "duration"], "properties": {
                    "vin": vin.clone(), "serviceId": service.clone(),
                    "configuration": r("Configuration"), "duration": r("Duration") } },
                "KeyReplacement": { "type": "object", "additionalProperties": false, "required": ["publicKey", "previousPublicKey"], "properties": {
                    "publicKey": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "Ed25519 public key of the car's new telematics unit, hex" },
                    "previousPublicKey": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "the key the car is registered with now, hex (the guard against a mistyped VIN or a concurrent replacement)" } } },
                "DeactivateRequest": { "type": "object", "additionalProperties": false, "required": ["vin", "serviceId"], "properties": {
                    "vin": vin.clone(), "serviceId": service.clone() } },
                "RequestAccepted": { "type": "object", "required": ["requestId", "status", "timestamp"], "properties": {
                    "requestId": { "type": "string", "format": "uuid" },
                    "status": { "type": "string", "enum": ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"] },
                    "timestamp": { "type": "string", "format": "date-time" } } },
                "RequestState": { "type": "object",
                    "required": ["requestId", "vin", "action", "serviceId", "status", "phase", "attempts", "seq", "errorCode", "createdAt", "updatedAt", "completedAt", "campaignId"],
                    "properties": {
                    "requestId": { "type": "string", "format": "uuid" }, "vin": { "type": "string" },
                    "action": { "type": "string", "enum": ["ACTIVATE", "DEACTIVATE"] }, "serviceId": { "type": "string" },
                    "status": { "type": "string", "enum": ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"] },
                    "phase": { "type": "string", "enum": ["SENDING", "BACKOFF", "PROBING", "DONE"] },
                    "attempts": { "type": "integer" }, "seq": { "type": "integer" },
                    "errorCode": { "type": "string", "nullable": true },
                    "createdAt": { "type": "string", "format": "date-time" }, "updatedAt": { "type": "string", "format": "date-time" },
                    "completedAt": { "type": "string", "format": "date-time", "nullable": true },
                    "campaignId": { "type": "string", "format": "uuid", "nullable": true } } },
                "CallbackBody": { "type": "object", "required": ["requestId", "vin", "status", "timestamp"], "properties": {
                    "requestId": { "type": "string" }, "vin": { "type": "string" },
                    "status": { "type": "string", "enum": ["ACTIVATED", "DEACTIVATED", "FAILED"] },
                    "errorCode": { "type": "string", "description": "a car's refusal code (e.g. UNKNOWN_FEATURE), NO_CONFIRMATION after the retries, CANCELLED, or DECOMMISSIONED (the car was taken out of the fleet)" },
                    "timestamp": { "type": "string", "format": "date-time" } } },
                "Decommissioned": { "type": "object", "additionalProperties": false, "required": ["vin", "decommissionedAt", "requestsFailed", "withdrawalSeq"], "properties": {
                    "vin": vin.clone(),
                    "decommissionedAt": { "type": "string", "format": "date-time", "description": "when the car was taken out of the fleet (the first call's time, also in a repeat's answer)" },
                    "requestsFailed": { "type": "integer", "minimum": 0, "description": "requests in flight this call ended FAILED with errorCode DECOMMISSIONED (0 in a repeat's answer)" },
                    "withdrawalSeq": { "type": "integer", "minimum": 1, "description": "seq of the last command, which withdrew every grant; a registration of the VIN again goes on above it" } } },
                "Vehicle": { "type": "object", "additionalProperties": false, "required": ["vin", "publicKey", "platform"], "properties": {
                    "vin": vin.clone(),
                    "publicKey": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "Ed25519 public key of the car, hex" },
                    "platform": { "type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$" },
                    "firmwareVersion": { "type": "string", "maxLength": 24, "nullable": true, "description": "null in answers when provisioning gave none" },
                    "registeredAt": { "type": "string", "format": "date-time", "readOnly": true } } },
                "VehicleStatus": { "type": "object", "required": ["vin", "connectivity", "lastSeen", "activeServices", "diagnostics"], "properties": {
                    "vin": { "type": "string" },
                    "connectivity": { "type": "string", "enum": ["ONLINE", "OFFLINE", "LIMITED"] },
                    "lastSeen": { "type": "string", "format": "date-time", "nullable": true },
                    "activeServices": { "type": "array", "items": { "type": "object", "required": ["serviceId", "activationDate", "status"], "properties": {
                        "serviceId": { "type": "string" }, "activationDate": { "type": "string", "format": "date-time" },
                        "status": { "type": "string", "enum": ["ACTIVE", "PENDING", "ERROR"] } } } },
                    "diagnostics": { "type": "object", "required": ["errorCodes", "firmwareVersion", "networkSignalStrength"], "properties": {
                        "errorCodes": { "type": "array", "items": { "type": "string" } },
                        "firmwareVersion": { "type": "string", "nullable": true },
                        "networkSignalStrength": { "type": "integer", "minimum": 0, "maximum": 100, "nullable": true } } } } },
                "History": { "type": "object", "required": ["vin", "entries", "nextBefore"], "properties": {
                    "vin": { "type": "string" },
                    "entries": { "type": "array", "items": { "type": "object", "required": ["id", "timestamp", "type", "detail"], "properties": {
                        "id": { "type": "string" }, "timestamp": { "type": "string", "format": "date-time" },
                        "type": { "type": "string", "enum": ["REQUEST", "COMMAND", "REPORT", "RESULT", "PRESENCE", "KEY_REPLACED", "DECOMMISSIONED", "REGISTERED"], "description": "REGISTERED: a decommissioned car registered again" },
                        "seq": { "type": "integer" }, "requestId": { "type": "string" }, "detail": { "type": "string" } } } },
                    "nextBefore": { "type": "string", "nullable": true } } },
                "CampaignRequest": { "type": "object", "description": "configuration and duration are required for ACTIVATE and not allowed for DEACTIVATE", "additionalProperties": false, "required": ["vins", "action", "serviceId"], "properties": {
                    "vins": { "type": "array", "minItems": 1, "maxItems": MAX_CAMPAIGN_VINS, "uniqueItems": true, "items": vin.clone() },
                    "action": { "type": "string", "enum": ["ACTIVATE", "DEACTIVATE"] },
                    "serviceId": service.clone(),
                    "configuration": r("Configuration"), "duration": r("Duration"),
                    "abortWhen": r("AbortWhen") } },
                "CampaignAccepted": { "type": "object", "required": ["campaignId", "total", "accepted", "refusedCount", "refused", "notMade", "timestamp"], "properties": {
                    "campaignId": { "type": "string", "format": "uuid" }, "total": { "type": "integer" }, "accepted": { "type": "integer" },
                    "refusedCount": { "type": "integer", "description": "cars that cannot take it: unknown, a service not active, too many services or too many requests in flight" },
                    "refused": { "type": "array", "maxItems": 100, "description": "the first of the refused cars", "items": { "type": "object", "required": ["vin", "reason"], "properties": { "vin": { "type": "string" }, "reason": { "type": "string" } } } },
                    "notMade": { "type": "integer", "description": "cars whose requests were not made because the campaign was cancelled before their turn (while it was being accepted, or before this repeat)" },
                    "timestamp": { "type": "string", "format": "date-time" } } },
                "CampaignSummary": { "type": "object", "required": ["campaignId", "action", "serviceId", "total", "createdAt", "cancelledAt", "abortWhen", "abortedAt", "abortReason"], "properties": {
                    "campaignId": { "type": "string", "format": "uuid" }, "action": { "type": "string", "enum": ["ACTIVATE", "DEACTIVATE"] }, "serviceId": { "type": "string" },
                    "total": { "type": "integer" }, "createdAt": { "type": "string", "format": "date-time" },
                    "cancelledAt": { "type": "string", "format": "date-time", "nullable": true },
                    "abortWhen": abort_when.clone(), "abortedAt": aborted_at.clone(), "abortReason": abort_reason.clone() } },
                "Campaign": { "type": "object", "required": ["campaignId", "action", "serviceId", "total", "createdAt", "cancelledAt", "abortWhen", "abortedAt", "abortReason", "counts"], "properties": {
                    "campaignId": { "type": "string", "format": "uuid" }, "action": { "type": "string", "enum": ["ACTIVATE", "DEACTIVATE"] }, "serviceId": { "type": "string" },
                    "total": { "type": "integer" }, "createdAt": { "type": "string", "format": "date-time" },
                    "cancelledAt": { "type": "string", "format": "date-time", "nullable": true, "description": "when the campaign was cancelled (POST /campaigns/{campaignId}/cancel), null if it was not" },
                    "abortWhen": abort_when, "abortedAt": aborted_at, "abortReason": abort_reason,
                    "cancelledNow": { "type": "integer", "description": "only in a cancel's answer: the requests this cancel ended" },
                    "counts": { "type": "object", "required": ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"], "properties": {
                        "QUEUED": { "type": "integer" }, "IN_PROGRESS": { "type": "integer" },
                        "COMPLETED": { "type": "integer" }, "FAILED": { "type": "integer" } } } } },
                "Ticket": { "type": "object",
                    "required": ["ticketId", "requestId", "vin", "serviceId", "action", "createdAt", "reason", "attempts", "connectivity", "lastSeen", "probeAnswered", "expectedSeq", "appliedSeq", "diagnostics"],
                    "properties": {
                    "ticketId": { "type": "string" }, "requestId": { "type": "string" }, "vin": { "type": "string" },
                    "serviceId": { "type": "string" }, "action": { "type": "string" }, "createdAt": { "type": "string" },
                    "reason": { "type": "string" }, "attempts": { "type": "integer" }, "connectivity": { "type": "string" },
                    "lastSeen": { "type": "string", "nullable": true }, "probeAnswered": { "type": "boolean" },
                    "expectedSeq": { "type": "integer" }, "appliedSeq": { "type": "integer" },
                    "diagnostics": { "type": "object", "nullable": true } } }
    });
    // A car in a `GET /vehicles` page: its status with its registration.
    // Apart: one more schema inside the `json!` above passes the macro's recursion limit.
    schemas["AbortWhen"] = json!({ "type": "object", "additionalProperties": false, "required": ["refusedPercent"],
                    "description": "Stop the campaign once its cars refuse it: the first time at least minFinished of its requests are final (COMPLETED or FAILED, any failure) and at least refusedPercent of those were refused by their cars, it is cancelled as POST /campaigns/{campaignId}/cancel does (requests still in flight end FAILED CANCELLED, with their grants withdrawn; requests not yet made are not made) and abortedAt and abortReason are recorded. A refusal is a request failed by its car's signed refusal of the command (errorCode a reject code such as UNKNOWN_FEATURE, BASE_PLATFORM_FEATURE, APPLY_FAILED, EXPIRED); NO_CONFIRMATION (an offline car out of attempts), UNKNOWN_KEY given after the attempts, CANCELLED and DECOMMISSIONED are not. Trips at most once, and not after a cancel by hand",
                    "properties": {
                    "refusedPercent": { "type": "integer", "minimum": 1, "maximum": 100, "description": "the share of finished requests refused, in percent, at or above which the campaign stops" },
                    "minFinished": { "type": "integer", "minimum": 1, "maximum": MAX_MIN_FINISHED, "default": DEFAULT_MIN_FINISHED, "description": "finished requests needed before the rule applies" } } });
    let mut listed = schemas["VehicleStatus"].clone();
    listed["properties"]["platform"] = schemas["Vehicle"]["properties"]["platform"].clone();
    listed["properties"]["publicKey"] = schemas["Vehicle"]["properties"]["publicKey"].clone();
    listed["properties"]["registeredAt"] = json!({ "type": "string", "format": "date-time" });
    if let Some(required) = listed["required"].as_array_mut() {
        required.extend([json!("platform"), json!("publicKey"), json!("registeredAt")]);
    }
    schemas["VehicleListed"] = listed;
    let paths = json!({
            "/healthz": { "get": { "security": [], "summary": "Liveness and readiness: 503 while the store does not flush or the external broker is not connected; a webhook receiver that is down is only reported (callbacks wait in the outbox)",
                "responses": merge(ok("200", "ready", r("Health")), json!({ "503": { "description": "not ready", "content": { "application/json": { "schema": r("Health") } } } })) } },
            "/ota/activate": { "post": { "summary": "Activate a service on a car", "requestBody": body(r("ActivateRequest")),
                "parameters": [idempotency_key()],
                "responses": merge(accepted("accepted and durable; the result comes as a callback", r("RequestAccepted")),
                    errors(&["400", "401", "404", "409", "413", "422", "429", "500", "503"])) } },
            "/ota/deactivate": { "post": { "summary": "Deactivate a service on a car", "requestBody": body(r("DeactivateRequest")),
                "parameters": [idempotency_key()],
                "responses": merge(accepted("accepted and durable; callback status DEACTIVATED or FAILED", r("RequestAccepted")),
                    errors(&["400", "401", "404", "409", "413", "422", "429", "500", "503"])) } },
            "/ota/requests/{requestId}": { "get": { "summary": "A request's state and attempts",
                "parameters": [path_param("requestId", "UUID", json!({ "type": "string", "format": "uuid" }))],
                "responses": merge(ok("200", "the request", r("RequestState")), errors(&["400", "401", "404", "500"])) } },
            "/ota/requests/{requestId}/cancel": { "post": { "summary": "End a request still in flight: FAILED with errorCode CANCELLED, its grant withdrawn (what it replaced put back) and a FAILED callback, so nothing is charged; answered once durable",
                "parameters": [path_param("requestId", "UUID", json!({ "type": "string", "format": "uuid" }))],
                "responses": merge(ok("200", "the request, cancelled (also for a repeat)", r("RequestState")), errors(&["400", "401", "404", "409", "500", "503"])) } },
            "/vehicles": { "post": { "summary": "Provision a car (idempotent for the same key; 409 naming publicKey for another key, or for a key another car is registered with: every car has a key of its own)", "requestBody": body(r("Vehicle")),
                "responses": merge(merge(ok("201", "registered", r("Vehicle")), ok("200", "already registered with this key", r("Vehicle"))),
                    errors(&["400", "401", "409", "413", "500", "503"])) },
                "get": { "summary": format!("The registered cars in VIN order, a page at a time, each with its status; filtered by connectivity or by a service's status. At most {MAX_VEHICLES_SCANNED} cars are looked at a call, so a filtered page may end short of its limit (even empty) with nextAfter to go on from"),
                "parameters": [limit(100), query("after", "nextAfter of the previous page (a VIN)", vin.clone()),
                    query("connectivity", "only cars in this state", json!({ "type": "string", "enum": ["ONLINE", "OFFLINE", "LIMITED"] })),
                    query("serviceStatus", "only cars with a service in this state (ERROR: a request of it failed)", json!({ "type": "string", "enum": ["ACTIVE", "PENDING", "ERROR"] }))],
                "responses": merge(ok("200", "one page", json!({ "type": "object", "required": ["vehicles", "nextAfter"], "properties": {
                    "vehicles": { "type": "array", "items": r("VehicleListed") }, "nextAfter": { "type": "string", "nullable": true } } })),
                    errors(&["400", "401", "500", "503"])) } },
            "/vehicles/{vin}": { "delete": { "summary": "Take a car out of the fleet (scrapped, written off, out of the programme): each of its requests in flight ends FAILED with errorCode DECOMMISSIONED and a FAILED callback (no charge); one last command with the next seq withdraws every grant (retained, so a unit that comes online later drops its features; the base platform is untouched); its registration ends (status 404, not listed, activations and campaigns refuse it as an unknown car, its reports are not believed) and its public key is free for another car. Its history stays readable. Its seq is kept: registered again (POST /vehicles), the car's commands go on above withdrawalSeq. Answered once durable; a repeat answers the same vin and decommissionedAt with requestsFailed 0 and changes nothing",
                "parameters": [vin_param.clone()],
                "responses": merge(ok("200", "decommissioned (or already)", r("Decommissioned")),
                    errors(&["400", "401", "404", "500", "503"])) } },
            "/vehicles/{vin}/key": { "post": { "summary": "Replace a car's public key (its telematics unit was replaced): from the answer on, only reports signed with the new key are believed; requests in flight complete when the new unit confirms them. A repeat (publicKey already the car's key) answers the same and changes nothing; 409 naming previousPublicKey unless it is the car's key now, and naming publicKey for a key another car is registered with; answered once durable",
                "parameters": [vin_param.clone()], "requestBody": body(r("KeyReplacement")),
                "responses": merge(ok("200", "the car's record with its new key", r("Vehicle")),
                    errors(&["400", "401", "404", "409", "413", "500", "503"])) } },
            "/vehicles/{vin}/status": { "get": { "summary": "Connectivity, services and diagnostics", "parameters": [vin_param.clone()],
                "responses": merge(ok("200", "the car's state", r("VehicleStatus")), errors(&["400", "401", "404", "503"])) } },
            "/vehicles/{vin}/history": { "get": { "summary": "Requests, commands, reports and results, newest first",
                "parameters": [vin_param, limit(50), query("before", "nextBefore of the previous page", json!({ "type": "string", "pattern": "^[0-9]+$" }))],
                "responses": merge(ok("200", "one page", r("History")), errors(&["400", "401", "404", "500", "503"])) } },
            "/campaigns": { "post": { "summary": format!("One activation or deactivation for many cars (up to {MAX_CAMPAIGN_VINS} VINs)"), "requestBody": body(r("CampaignRequest")),
                "parameters": [idempotency_key()],
                "responses": merge(accepted("accepted and durable; cars that cannot take it are counted and listed as refused", r("CampaignAccepted")),
                    errors(&["400", "401", "409", "413", "422", "500", "503"])) },
                "get": { "summary": "The campaigns, newest first, a page at a time, without their counts (GET /campaigns/{campaignId} has them)",
                    "parameters": [limit(50), query("before", "nextBefore of the previous page (a campaign id)", json!({ "type": "string", "format": "uuid" }))],
                    "responses": merge(ok("200", "one page", json!({ "type": "object", "required": ["campaigns", "nextBefore"], "properties": {
                        "campaigns": { "type": "array", "items": r("CampaignSummary") }, "nextBefore": { "type": "string", "nullable": true } } })),
                        errors(&["400", "401", "500"])) } },
            "/campaigns/{campaignId}": { "get": { "summary": "A campaign's requests counted by state",
                "parameters": [path_param("campaignId", "UUID", json!({ "type": "string", "format": "uuid" }))],
                "responses": merge(ok("200", "counts", r("Campaign")), errors(&["400", "401", "404", "500"])) } },
            "/campaigns/{campaignId}/requests": { "get": { "summary": "A campaign's requests in the order of its VIN list, a page at a time; status keeps those in one state",
                "parameters": [path_param("campaignId", "UUID", json!({ "type": "string", "format": "uuid" })), limit(100),
                    query("after", "nextAfter of the previous page (a request id of this campaign)", json!({ "type": "string", "format": "uuid" })),
                    query("status", "only requests in this state", json!({ "type": "string", "enum": ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"] }))],
                "responses": merge(ok("200", "one page", json!({ "type": "object", "required": ["campaignId", "requests", "nextAfter"], "properties": {
                    "campaignId": { "type": "string", "format": "uuid" }, "requests": { "type": "array", "items": r("RequestState") },
                    "nextAfter": { "type": "string", "nullable": true } } })), errors(&["400", "401", "404", "500"])) } },
            "/campaigns/{campaignId}/cancel": { "post": { "summary": "Cancel a campaign: each of its requests still in flight ends as a cancelled request does (those the cars confirmed stay); requests of it not yet made when it was being accepted are never made (its POST answers them as notMade), nor does a repeat of its POST with its Idempotency-Key make any; answered once durable",
                "parameters": [path_param("campaignId", "UUID", json!({ "type": "string", "format": "uuid" }))],
                "responses": merge(ok("200", "the campaign, with cancelledNow", r("Campaign")), errors(&["400", "401", "404", "500", "503"])) } },
            "/support/tickets": { "get": { "summary": "Support tickets, newest first, a page at a time",
                "parameters": [limit(100), query("before", "nextBefore of the previous page (a ticket id)", json!({ "type": "string", "pattern": "^(T-)?[0-9]+$" })),
                    query("vin", "only this car's tickets", vin.clone())],
                "responses": merge(ok("200", "one page", json!({ "type": "object", "required": ["tickets", "nextBefore"], "properties": {
                    "tickets": { "type": "array", "items": r("Ticket") }, "nextBefore": { "type": "string", "nullable": true } } })),
                    errors(&["400", "401", "404", "500"])) } },
            "/keys": { "get": { "summary": "The gateway's command-signing public keys",
                "responses": merge(ok("200", "keys", json!({ "type": "object", "required": ["keys"], "properties": { "keys": { "type": "array", "items": { "type": "object", "required": ["keyId", "publicKey", "algorithm"], "properties": {
                    "keyId": { "type": "string" }, "publicKey": { "type": "string" }, "algorithm": { "type": "string", "enum": ["Ed25519"] } } } } } })),
                    errors(&["401"])) } },
            "/metrics": { "get": { "summary": "Prometheus metrics",
                "responses": merge(json!({ "200": { "description": "text exposition", "content": { "text/plain": { "schema": { "type": "string" } } } } }), errors(&["401"])) } },
            "/openapi.json": { "get": { "summary": "This document",
                "responses": merge(ok("200", "OpenAPI 3", json!({ "type": "object", "required": ["openapi", "info", "paths"] })), errors(&["401"])) } }
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "CaaS IoT API (caas-gateway)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("Activation and deactivation of car features over the air. Every route but /healthz needs `Authorization: Bearer <token>`. Bodies over {body_kib} KiB ({campaign_mib} MiB for /campaigns) are refused with 413. Every 4xx and 5xx body is an Error naming the field: also 404 for a path that is not listed here, and 405 (with an Allow header) for a method a listed path does not answer. Results arrive as callbacks: POST <webhook-url> with body CallbackBody and headers X-CaaS-Timestamp (Unix seconds) and X-CaaS-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + \".\" + body)> (while the key is being rotated, also X-CaaS-Signature-Previous: the same with the old key), retried until 2xx.")
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas
        },
        "security": [{ "bearer": [] }],
        "paths": paths
    })
}
