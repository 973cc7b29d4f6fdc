//! The OpenAPI 3 document served at `GET /openapi.json`. A test checks that every route the
//! router serves is in it and that the documented answers are the ones the server gives.

use serde_json::{json, Value};

fn ok(status: &str, desc: &str, schema: Value) -> Value {
    json!({ status: { "description": desc, "content": { "application/json": { "schema": schema } } } })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn errors(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert(
            (*c).to_owned(),
            json!({ "description": "refused; nothing changed", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }),
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

fn path_param(name: &str, desc: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" }, "description": desc })
}

fn query(name: &str, desc: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "schema": { "type": "string" }, "description": desc })
}

/// The document.
pub(crate) fn document() -> Value {
    let e = errors(&["400", "401", "404", "409", "413"]);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "CaaS IoT API (caas-gateway)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Activation and deactivation of car features over the air. Every route but /healthz needs `Authorization: Bearer <token>`. Bodies over 64 KiB (8 MiB for /campaigns) are refused with 413. Every 4xx body names the field. Results arrive as callbacks: POST <webhook-url> with body CallbackBody and headers X-CaaS-Timestamp (Unix seconds) and X-CaaS-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + \".\" + body)>, retried until 2xx."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error", "reason"], "properties": {
                    "error": { "type": "string" }, "field": { "type": "string", "nullable": true }, "reason": { "type": "string" } } },
                "Configuration": { "type": "object", "additionalProperties": false, "required": ["featureFlags"], "properties": {
                    "featureFlags": { "type": "array", "minItems": 1, "maxItems": 4, "items": { "type": "string", "pattern": "^[a-z0-9_]{1,32}$" } },
                    "parameters": { "type": "object", "maxProperties": 4, "additionalProperties": { "type": "string", "maxLength": 24 } } } },
                "Duration": { "type": "object", "additionalProperties": false, "required": ["type"], "properties": {
                    "type": { "type": "string", "enum": ["TEMPORARY", "PERMANENT", "SUBSCRIPTION"] },
                    "expiryDate": { "type": "string", "format": "date-time", "description": "required for TEMPORARY, in the future; not allowed for PERMANENT" },
                    "autoRenewal": { "type": "boolean" } } },
                "ActivateRequest": { "type": "object", "additionalProperties": false, "required": ["vin", "serviceId", "configuration", "duration"], "properties": {
                    "vin": { "type": "string", "pattern": "^[A-HJ-NPR-Z0-9]{17}$" },
                    "serviceId": { "type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,32}$" },
                    "configuration": r("Configuration"), "duration": r("Duration") } },
                "DeactivateRequest": { "type": "object", "additionalProperties": false, "required": ["vin", "serviceId"], "properties": {
                    "vin": { "type": "string" }, "serviceId": { "type": "string" } } },
                "RequestAccepted": { "type": "object", "required": ["requestId", "status", "timestamp"], "properties": {
                    "requestId": { "type": "string", "format": "uuid" },
                    "status": { "type": "string", "enum": ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"] },
                    "timestamp": { "type": "string", "format": "date-time" } } },
                "RequestState": { "type": "object", "properties": {
                    "requestId": { "type": "string" }, "vin": { "type": "string" },
                    "action": { "type": "string", "enum": ["ACTIVATE", "DEACTIVATE"] }, "serviceId": { "type": "string" },
                    "status": { "type": "string", "enum": ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"] },
                    "phase": { "type": "string", "enum": ["SENDING", "BACKOFF", "PROBING", "DONE"] },
                    "attempts": { "type": "integer" }, "seq": { "type": "integer" },
                    "errorCode": { "type": "string", "nullable": true },
                    "createdAt": { "type": "string" }, "updatedAt": { "type": "string" },
                    "completedAt": { "type": "string", "nullable": true }, "campaignId": { "type": "string", "nullable": true } } },
                "CallbackBody": { "type": "object", "required": ["requestId", "vin", "status", "timestamp"], "properties": {
                    "requestId": { "type": "string" }, "vin": { "type": "string" },
                    "status": { "type": "string", "enum": ["ACTIVATED", "DEACTIVATED", "FAILED"] },
                    "errorCode": { "type": "string", "description": "a car's refusal code (e.g. UNKNOWN_FEATURE) or NO_CONFIRMATION after the retries" },
                    "timestamp": { "type": "string", "format": "date-time" } } },
                "Vehicle": { "type": "object", "additionalProperties": false, "required": ["vin", "publicKey", "platform"], "properties": {
                    "vin": { "type": "string" }, "publicKey": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "Ed25519 public key of the car, hex" },
                    "platform": { "type": "string" }, "firmwareVersion": { "type": "string" }, "registeredAt": { "type": "string", "readOnly": true } } },
                "VehicleStatus": { "type": "object", "properties": {
                    "vin": { "type": "string" },
                    "connectivity": { "type": "string", "enum": ["ONLINE", "OFFLINE", "LIMITED"] },
                    "lastSeen": { "type": "string", "format": "date-time", "nullable": true },
                    "activeServices": { "type": "array", "items": { "type": "object", "properties": {
                        "serviceId": { "type": "string" }, "activationDate": { "type": "string" },
                        "status": { "type": "string", "enum": ["ACTIVE", "PENDING", "ERROR"] } } } },
                    "diagnostics": { "type": "object", "properties": {
                        "errorCodes": { "type": "array", "items": { "type": "string" } },
                        "firmwareVersion": { "type": "string", "nullable": true },
                        "networkSignalStrength": { "type": "integer", "minimum": 0, "maximum": 100, "nullable": true } } } } },
                "History": { "type": "object", "properties": {
                    "vin": { "type": "string" },
                    "entries": { "type": "array", "items": { "type": "object", "properties": {
                        "id": { "type": "string" }, "timestamp": { "type": "string" },
                        "type": { "type": "string", "enum": ["REQUEST", "COMMAND", "REPORT", "RESULT", "PRESENCE"] },
                        "seq": { "type": "integer" }, "requestId": { "type": "string" }, "detail": { "type": "string" } } } },
                    "nextBefore": { "type": "string", "nullable": true } } },
                "CampaignRequest": { "type": "object", "additionalProperties": false, "required": ["vins", "action", "serviceId"], "properties": {
                    "vins": { "type": "array", "minItems": 1, "maxItems": 200000, "items": { "type": "string" } },
                    "action": { "type": "string", "enum": ["ACTIVATE", "DEACTIVATE"] },
                    "serviceId": { "type": "string" },
                    "configuration": r("Configuration"), "duration": r("Duration") } },
                "CampaignAccepted": { "type": "object", "properties": {
                    "campaignId": { "type": "string" }, "total": { "type": "integer" }, "accepted": { "type": "integer" },
                    "refusedCount": { "type": "integer" },
                    "refused": { "type": "array", "maxItems": 100, "items": { "type": "object", "properties": { "vin": { "type": "string" }, "reason": { "type": "string" } } } },
                    "timestamp": { "type": "string" } } },
                "Campaign": { "type": "object", "properties": {
                    "campaignId": { "type": "string" }, "action": { "type": "string" }, "serviceId": { "type": "string" },
                    "total": { "type": "integer" }, "createdAt": { "type": "string" },
                    "counts": { "type": "object", "properties": {
                        "QUEUED": { "type": "integer" }, "IN_PROGRESS": { "type": "integer" },
                        "COMPLETED": { "type": "integer" }, "FAILED": { "type": "integer" } } } } },
                "Ticket": { "type": "object", "properties": {
                    "ticketId": { "type": "string" }, "requestId": { "type": "string" }, "vin": { "type": "string" },
                    "serviceId": { "type": "string" }, "action": { "type": "string" }, "createdAt": { "type": "string" },
                    "reason": { "type": "string" }, "attempts": { "type": "integer" }, "connectivity": { "type": "string" },
                    "lastSeen": { "type": "string", "nullable": true }, "probeAnswered": { "type": "boolean" },
                    "expectedSeq": { "type": "integer" }, "appliedSeq": { "type": "integer" },
                    "diagnostics": { "type": "object", "nullable": true } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/healthz": { "get": { "security": [], "summary": "Liveness", "responses": ok("200", "alive", json!({ "type": "object" })) } },
            "/ota/activate": { "post": { "summary": "Activate a service on a car", "requestBody": body(r("ActivateRequest")),
                "responses": merge(ok("202", "accepted and durable; the result comes as a callback", r("RequestAccepted")), e.clone()) } },
            "/ota/deactivate": { "post": { "summary": "Deactivate a service on a car", "requestBody": body(r("DeactivateRequest")),
                "responses": merge(ok("202", "accepted and durable; callback status DEACTIVATED or FAILED", r("RequestAccepted")), e.clone()) } },
            "/ota/requests/{requestId}": { "get": { "summary": "A request's state and attempts", "parameters": [path_param("requestId", "UUID")],
                "responses": merge(ok("200", "the request", r("RequestState")), e.clone()) } },
            "/vehicles": { "post": { "summary": "Provision a car (idempotent for the same key; 409 for another key)", "requestBody": body(r("Vehicle")),
                "responses": merge(merge(ok("201", "registered", r("Vehicle")), ok("200", "already registered with this key", r("Vehicle"))), e.clone()) } },
            "/vehicles/{vin}/status": { "get": { "summary": "Connectivity, services and diagnostics", "parameters": [path_param("vin", "VIN")],
                "responses": merge(ok("200", "the car's state", r("VehicleStatus")), e.clone()) } },
            "/vehicles/{vin}/history": { "get": { "summary": "Requests, commands, reports and results, newest first",
                "parameters": [path_param("vin", "VIN"), query("limit", "1-500, default 50"), query("before", "nextBefore of the previous page")],
                "responses": merge(ok("200", "one page", r("History")), e.clone()) } },
            "/campaigns": { "post": { "summary": "One activation or deactivation for many cars (up to 200,000 VINs)", "requestBody": body(r("CampaignRequest")),
                "responses": merge(ok("202", "accepted and durable; cars that cannot take it are listed as refused", r("CampaignAccepted")), e.clone()) } },
            "/campaigns/{campaignId}": { "get": { "summary": "A campaign's requests counted by state", "parameters": [path_param("campaignId", "UUID")],
                "responses": merge(ok("200", "counts", r("Campaign")), e.clone()) } },
            "/support/tickets": { "get": { "summary": "Support tickets, newest first", "parameters": [query("limit", "1-500, default 100")],
                "responses": merge(ok("200", "tickets", json!({ "type": "object", "properties": { "tickets": { "type": "array", "items": r("Ticket") } } })), e.clone()) } },
            "/keys": { "get": { "summary": "The gateway's command-signing public keys",
                "responses": merge(ok("200", "keys", json!({ "type": "object", "properties": { "keys": { "type": "array", "items": { "type": "object", "properties": {
                    "keyId": { "type": "string" }, "publicKey": { "type": "string" }, "algorithm": { "type": "string" } } } } } })), e.clone()) } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text exposition", "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": ok("200", "OpenAPI 3", json!({ "type": "object" })) } }
        }
    })
}
