//! The IoT API over HTTP (axum), the shapes of DESIGN.md §4.
//!
//! Every route but `/healthz` needs `Authorization: Bearer <token>`. Bodies are parsed by
//! hand from JSON values so that every refusal names the field: a 4xx answer is always
//! `{"error": "...", "field": "...", "reason": "..."}` and changes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use caas_protocol::{
    verifying_key_from_hex, FeatureFlag, FirmwareVersion, ParamKey, ParamValue, RequestId,
    ServiceId, Vin, MAX_FLAGS_PER_GRANT, MAX_PARAMS_PER_GRANT,
};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::campaign::{AbortWhen, Trip, DEFAULT_MIN_FINISHED, MAX_MIN_FINISHED};
use crate::engine::{Accepted, CancelTarget, Engine, Msg, NewRequest, Op, CANCELLED};
use crate::idempotency::{self, Claim, IdemKey};
use crate::metrics::Metrics;
use crate::store::RetiredRec;
use crate::store::{
    abort_when_mark, aborted_mark, campaign_request_id, cancel_mark, dec, dec_history, enc,
    iso_now, new_uuid, now_ms, AbortedRec, CampaignRec, GrantRec, HistoryEntry, RequestRec, Store,
    Ticket, VehicleRec, CAMPAIGN_PREFIX,
};

/// Largest request body on every route but `POST /campaigns`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest `POST /campaigns` body (room for 200,000 VINs).
pub const MAX_CAMPAIGN_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Most VINs in one campaign.
pub const MAX_CAMPAIGN_VINS: usize = 200_000;
/// Most history entries or tickets one page returns.
pub const MAX_PAGE: usize = 500;
/// Most refused VINs a campaign answer lists (the count is always complete).
const MAX_REFUSED_LISTED: usize = 100;
/// Longest platform name.
const MAX_PLATFORM_LEN: usize = 64;
/// Cars `GET /vehicles` reads statuses of at a time (one message to each shard).
pub(crate) const VEHICLE_SCAN_CHUNK: usize = 256;
/// Most cars one `GET /vehicles` call looks at. With a filter few cars pass, a page can then
/// end short of its limit, with `nextAfter` to go on from: no call reads the whole fleet.
pub const MAX_VEHICLES_SCANNED: usize = 20_000;

/// A refusal: HTTP status and the JSON body naming the field.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Short error text.
    pub error: String,
    /// The offending field (dotted path), if one.
    pub field: Option<String>,
    /// Why.
    pub reason: String,
    /// On a 500 from an activation or deactivation, the request's id: it may have been taken
    /// (its flush failed, but the engine may still carry it out), and
    /// `GET /ota/requests/{requestId}` tells.
    pub request_id: Option<String>,
}

impl ApiError {
    /// A refusal naming `field`.
    pub fn new(status: u16, error: &str, field: &str, reason: &str) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            field: Some(field.into()),
            reason: reason.into(),
            request_id: None,
        }
    }

    fn bad(field: &str, reason: impl std::fmt::Display) -> ApiError {
        ApiError::new(400, "invalid field", field, &reason.to_string())
    }

    /// A storage failure (500).
    pub fn storage(e: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: 500,
            error: "storage failure".into(),
            field: None,
            reason: e.to_string(),
            request_id: None,
        }
    }

    fn unavailable() -> ApiError {
        ApiError {
            status: 503,
            error: "shutting down".into(),
            field: None,
            reason: "the engine is stopping".into(),
            request_id: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(match self.request_id {
                None => json!({ "error": self.error, "field": self.field, "reason": self.reason }),
                Some(id) => {
                    json!({ "error": self.error, "field": self.field, "reason": self.reason,
                    "requestId": id })
                }
            }),
        )
            .into_response()
    }
}

/// What the handlers share.
pub(crate) struct AppState {
    pub(crate) engine: Engine,
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) api_token: String,
    /// The old token, also taken during a rotation.
    pub(crate) api_token_previous: Option<String>,
    pub(crate) key_id: String,
    pub(crate) public_key: String,
    /// Live counts of recent campaigns.
    pub(crate) campaigns: Arc<crate::campaign::CampaignBook>,
}

type St = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// The router with every route.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route("/ota/activate", post(activate))
        .route("/ota/deactivate", post(deactivate))
        .route("/ota/requests/{requestId}", get(get_request))
        .route("/ota/requests/{requestId}/cancel", post(cancel_request))
        .route("/vehicles", post(register).get(list_vehicles))
        .route("/vehicles/{vin}", delete(decommission))
        .route("/vehicles/{vin}/status", get(status))
        .route("/vehicles/{vin}/history", get(history))
        .route("/vehicles/{vin}/key", post(replace_key))
        .route(
            "/campaigns",
            post(campaign)
                .layer(DefaultBodyLimit::max(MAX_CAMPAIGN_BODY_BYTES))
                .get(list_campaigns),
        )
        .route("/campaigns/{campaignId}", get(get_campaign))
        .route("/campaigns/{campaignId}/cancel", post(cancel_campaign))
        .route("/campaigns/{campaignId}/requests", get(campaign_requests))
        .route("/support/tickets", get(tickets))
        .route("/keys", get(keys))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(authed)
        .fallback(no_route)
        // After every route is in: it only reaches the routes already added.
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// Liveness and readiness: 503 while the gateway cannot do its work (its store does not
/// flush, or its external broker is not connected); a webhook receiver that is down is the
/// receiver's trouble (callbacks wait in the outbox), so it is only reported.
async fn healthz(State(st): St) -> Response {
    let m = &st.metrics;
    let store_ok = m.store_failing.load(Relaxed) == 0;
    let broker_ok = m.broker_disconnected.load(Relaxed) == 0;
    let receiver_ok = m.webhook_receiver_down.load(Relaxed) == 0;
    let status = if store_ok && broker_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool, bad: &'static str| if ok { "ok" } else { bad };
    (
        status,
        Json(json!({
            "status": word(status == StatusCode::OK, "unavailable"),
            "store": word(store_ok, "failing"),
            "broker": word(broker_ok, "disconnected"),
            "webhookReceiver": word(receiver_ok, "down"),
        })),
    )
        .into_response()
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(
        404,
        "no such route",
        "path",
        &format!("nothing is served at {}; see GET /openapi.json", uri.path()),
    )
}

/// axum adds the route's `Allow` header to this answer.
async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        405,
        "method not allowed",
        "method",
        &format!(
            "{} does not answer {method}; see the Allow header",
            uri.path()
        ),
    )
}

/// A route's one path parameter, as text: the handler validates it, naming it, and a value
/// axum cannot even decode (not UTF-8 once percent-decoded) is refused in the same JSON shape.
struct PathText(String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(s)) => Ok(PathText(s)),
            Err(e) => Err(path_refusal(e)),
        }
    }
}

fn path_refusal(e: PathRejection) -> ApiError {
    let reason = e.body_text();
    // A route and its handler disagreeing on parameters is the gateway's fault, not the
    // caller's: no field to name.
    if e.status().is_server_error() {
        return ApiError {
            status: 500,
            error: "internal error".into(),
            field: None,
            reason,
            request_id: None,
        };
    }
    let field = match &e {
        // Route captures carry the names the OpenAPI document gives the parameters.
        PathRejection::FailedToDeserializePathParams(f) => match f.kind() {
            ErrorKind::ParseErrorAtKey { key, .. }
            | ErrorKind::InvalidUtf8InPathParam { key }
            | ErrorKind::DeserializeError { key, .. } => key.clone(),
            _ => "path".to_owned(),
        },
        _ => "path".to_owned(),
    };
    ApiError {
        status: e.status().as_u16(),
        error: "invalid path parameter".into(),
        field: Some(field),
        reason,
        request_id: None,
    }
}

/// The query string's parameters; one axum cannot parse is refused naming the query.
struct QueryMap(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<HashMap<String, String>>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(QueryMap(q)),
            Err(e) => Err(ApiError {
                status: e.status().as_u16(),
                error: "invalid query".into(),
                field: Some("query".into()),
                reason: e.body_text(),
                request_id: None,
            }),
        }
    }
}

async fn auth(State(st): St, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let response = authorized(&st, req, next).await;
    let route = route.as_ref().map(axum::extract::MatchedPath::as_str);
    st.metrics.count_response(route, response.status().as_u16());
    response
}

/// The route's answer when the request carries a token in force, else 401.
async fn authorized(st: &AppState, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes());
    let is = |token: &str| given.is_some_and(|t| constant_time_eq(t, token.as_bytes()));
    let current = is(&st.api_token);
    // Both compared whatever the first gave, so the time taken does not tell which matched.
    let previous = st.api_token_previous.as_deref().is_some_and(is);
    if previous && !current {
        st.metrics.previous_token_uses.fetch_add(1, Relaxed);
    }
    if !current && !previous {
        st.metrics.unauthorized.fetch_add(1, Relaxed);
        return ApiError::new(
            401,
            "unauthorized",
            "Authorization",
            "send Authorization: Bearer <api token>",
        )
        .into_response();
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------- body parsing ----------

fn parse_body(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                413,
                "body too large",
                "body",
                &format!("the body limit is {limit} bytes"),
            )
        } else {
            ApiError::new(400, "unreadable body", "body", &e.body_text())
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(400, "malformed JSON", "body", &e.to_string()))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::new(
            400,
            "malformed JSON",
            "body",
            "expected a JSON object",
        )),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn no_unknown(m: &Map<String, Value>, allowed: &[&str], path: &str) -> Result<(), ApiError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::new(
            400,
            "unknown field",
            &join(path, k),
            "not part of this request",
        )),
        None => Ok(()),
    }
}

fn opt_str<'a>(
    m: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<Option<&'a str>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(&join(path, name), "must be a string")),
    }
}

fn req_str<'a>(m: &'a Map<String, Value>, name: &str, path: &str) -> Result<&'a str, ApiError> {
    opt_str(m, name, path)?
        .ok_or_else(|| ApiError::new(400, "missing field", &join(path, name), "required"))
}

fn parse_vin(s: &str, field: &str) -> Result<Vin, ApiError> {
    s.parse::<Vin>().map_err(|e| ApiError::bad(field, e))
}

fn parse_service(m: &Map<String, Value>) -> Result<String, ApiError> {
    let s = req_str(m, "serviceId", "")?;
    ServiceId::new(s).map_err(|e| {
        ApiError::bad(
            "serviceId",
            format!("service id {e} (1-32 of A-Z a-z 0-9 _ - . :)"),
        )
    })?;
    Ok(s.to_owned())
}

fn parse_iso(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// Validates `configuration` and `duration` into a grant (seq and request filled later).
fn parse_grant(m: &Map<String, Value>, service_id: &str) -> Result<GrantRec, ApiError> {
    let config = match m.get("configuration") {
        Some(Value::Object(c)) => c,
        Some(_) => return Err(ApiError::bad("configuration", "must be an object")),
        None => {
            return Err(ApiError::new(
                400,
                "missing field",
                "configuration",
                "required",
            ))
        }
    };
    no_unknown(config, &["featureFlags", "parameters"], "configuration")?;
    let flags = match config.get("featureFlags") {
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::bad(
                "configuration.featureFlags",
                "must be an array of strings",
            ))
        }
        None => {
            return Err(ApiError::new(
                400,
                "missing field",
                "configuration.featureFlags",
                "required",
            ))
        }
    };
    if flags.is_empty() || flags.len() > MAX_FLAGS_PER_GRANT {
        return Err(ApiError::bad(
            "configuration.featureFlags",
            format!("1 to {MAX_FLAGS_PER_GRANT} feature flags"),
        ));
    }
    let mut out_flags = Vec::new();
    for (i, f) in flags.iter().enumerate() {
        let field = format!("configuration.featureFlags[{i}]");
        let s = f
            .as_str()
            .ok_or_else(|| ApiError::bad(&field, "must be a string"))?;
        FeatureFlag::new(s)
            .map_err(|e| ApiError::bad(&field, format!("feature flag {e} (1-32 of a-z 0-9 _)")))?;
        if out_flags.iter().any(|x| x == s) {
            return Err(ApiError::bad(&field, "listed twice"));
        }
        out_flags.push(s.to_owned());
    }
    let mut params = Vec::new();
    match config.get("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            if p.len() > MAX_PARAMS_PER_GRANT {
                return Err(ApiError::bad(
                    "configuration.parameters",
                    format!("at most {MAX_PARAMS_PER_GRANT} parameters"),
                ));
            }
            for (k, v) in p {
                let field = format!("configuration.parameters.{k}");
                ParamKey::new(k).map_err(|e| {
                    ApiError::bad(
                        &field,
                        format!("parameter name {e} (1-24 of A-Z a-z 0-9 _)"),
                    )
                })?;
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(ApiError::bad(&field, "must be a string, number or boolean")),
                };
                ParamValue::new(&text).map_err(|e| {
                    ApiError::bad(&field, format!("value {e} (0-24 printable ASCII)"))
                })?;
                params.push((k.clone(), text));
            }
        }
        Some(_) => {
            return Err(ApiError::bad(
                "configuration.parameters",
                "must be an object",
            ))
        }
    }
    let duration = match m.get("duration") {
        Some(Value::Object(d)) => d,
        Some(_) => return Err(ApiError::bad("duration", "must be an object")),
        None => return Err(ApiError::new(400, "missing field", "duration", "required")),
    };
    no_unknown(duration, &["type", "expiryDate", "autoRenewal"], "duration")?;
    let kind = req_str(duration, "type", "duration")?;
    let expiry = match opt_str(duration, "expiryDate", "duration")? {
        Some(s) => {
            let t = parse_iso(s)
                .ok_or_else(|| ApiError::bad("duration.expiryDate", "not an ISO-8601 timestamp"))?;
            if t <= now_ms() / 1000 {
                return Err(ApiError::bad("duration.expiryDate", "is in the past"));
            }
            Some(t)
        }
        None => None,
    };
    match duration.get("autoRenewal") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => return Err(ApiError::bad("duration.autoRenewal", "must be a boolean")),
    }
    let ends_at = match kind {
        "TEMPORARY" => Some(expiry.ok_or_else(|| {
            ApiError::new(
                400,
                "missing field",
                "duration.expiryDate",
                "required for a TEMPORARY duration",
            )
        })?),
        "PERMANENT" => {
            if expiry.is_some() {
                return Err(ApiError::bad(
                    "duration.expiryDate",
                    "a PERMANENT duration has no expiry",
                ));
            }
            None
        }
        // A subscription runs until withdrawn; an expiryDate, if given, ends the current period.
        "SUBSCRIPTION" => expiry,
        _ => {
            return Err(ApiError::bad(
                "duration.type",
                "must be TEMPORARY, PERMANENT or SUBSCRIPTION",
            ))
        }
    };
    Ok(GrantRec {
        service_id: service_id.to_owned(),
        flags: out_flags,
        params,
        ends_at,
        request_id: String::new(),
        seq: 0,
        activation_date: String::new(),
    })
}

async fn ask<T>(
    engine: &Engine,
    vin: &Vin,
    msg: Msg,
    rx: oneshot::Receiver<T>,
) -> Result<T, ApiError> {
    engine
        .shard(vin)
        .send_async(msg)
        .await
        .map_err(|_| ApiError::unavailable())?;
    rx.await.map_err(|_| ApiError::unavailable())
}

fn request_answer(rec: &RequestRec, replayed: bool) -> Response {
    let answer = Json(
        json!({ "requestId": rec.request_id, "status": rec.status, "timestamp": rec.created_at }),
    );
    replay_marked(StatusCode::ACCEPTED, answer, replayed)
}

/// An answer, with `Idempotent-Replayed: true` if it is a repeat's.
fn replay_marked(status: StatusCode, answer: Json<Value>, replayed: bool) -> Response {
    if replayed {
        let mark = [(
            idempotency::REPLAYED_HEADER,
            HeaderValue::from_static("true"),
        )];
        (status, mark, answer).into_response()
    } else {
        (status, answer).into_response()
    }
}

/// Hands a single request (received at `received`) to its car's shard and answers once it
/// is durable.
async fn submit(
    st: &AppState,
    vin: Vin,
    op: Op,
    idempotency: Option<IdemKey>,
    received: Instant,
) -> ApiResult {
    let req = NewRequest {
        vin,
        op,
        request_id: RequestId(new_uuid()),
        campaign_id: None,
        campaign: None,
        created_ms: now_ms(),
        received,
        idempotency: idempotency.map(Box::new),
    };
    let request_id = req.request_id;
    let (tx, rx) = oneshot::channel();
    let Accepted { rec, replayed } = ask(&st.engine, &vin, Msg::Request { req, resp: tx }, rx)
        .await?
        .map_err(|e| match e.status {
            500 => ApiError {
                request_id: Some(request_id.to_string()),
                ..e
            },
            _ => e,
        })?;
    st.metrics.observe_accept(received.elapsed().as_secs_f64());
    Ok(request_answer(&rec, replayed))
}

async fn activate(
    State(st): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let received = Instant::now();
    let m = parse_body(body, MAX_BODY_BYTES)?;
    no_unknown(&m, &["vin", "serviceId", "configuration", "duration"], "")?;
    let vin = parse_vin(req_str(&m, "vin", "")?, "vin")?;
    let service = parse_service(&m)?;
    let grant = parse_grant(&m, &service)?;
    let key = idempotency::from_headers(&headers, "activate", &m)?;
    submit(&st, vin, Op::Activate(grant), key, received).await
}

async fn deactivate(
    State(st): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let received = Instant::now();
    let m = parse_body(body, MAX_BODY_BYTES)?;
    no_unknown(&m, &["vin", "serviceId"], "")?;
    let vin = parse_vin(req_str(&m, "vin", "")?, "vin")?;
    let service = parse_service(&m)?;
    let key = idempotency::from_headers(&headers, "deactivate", &m)?;
    submit(&st, vin, Op::Deactivate(service), key, received).await
}

fn request_view(rec: &RequestRec) -> Value {
    json!({
        "requestId": rec.request_id,
        "vin": rec.vin,
        "action": rec.action,
        "serviceId": rec.service_id,
        "status": rec.status,
        "phase": rec.phase,
        "attempts": rec.attempts,
        "seq": rec.seq,
        "errorCode": rec.error_code,
        "createdAt": rec.created_at,
        "updatedAt": rec.updated_at,
        "completedAt": rec.completed_at,
        "campaignId": rec.campaign_id,
    })
}

/// A history entry as `GET /vehicles/{vin}/history` shows it (no `seq` or `requestId` key
/// on entries that have none).
fn history_view(e: HistoryEntry) -> Value {
    let mut v = json!({
        "id": e.id,
        "timestamp": e.timestamp,
        "type": e.kind,
        "detail": e.detail,
    });
    if let Some(seq) = e.seq {
        v["seq"] = json!(seq);
    }
    if let Some(rid) = e.request_id {
        v["requestId"] = json!(rid);
    }
    v
}

async fn get_request(State(st): St, PathText(id): PathText) -> ApiResult {
    let (_, rec) = load_request(&st, &id)?;
    Ok(Json(request_view(&rec)).into_response())
}

/// The request `id` names, as the store has it (400 for a malformed id, 404 for none).
fn load_request(st: &AppState, id: &str) -> Result<(RequestId, RequestRec), ApiError> {
    let rid: RequestId = id.parse().map_err(|e| ApiError::bad("requestId", e))?;
    let v = st.store.requests.get(rid.0).map_err(ApiError::storage)?;
    let rec: RequestRec = v.and_then(|v| dec(&v)).ok_or_else(|| {
        ApiError::new(
            404,
            "unknown request",
            "requestId",
            "no request with this id",
        )
    })?;
    Ok((rid, rec))
}

fn is_final(rec: &RequestRec) -> bool {
    matches!(rec.status.as_str(), "COMPLETED" | "FAILED")
}

/// `POST /ota/requests/{requestId}/cancel`: a request still in flight ends FAILED with
/// `CANCELLED`, as if its retries had run out (its grant withdrawn in a newer command, what
/// it replaced put back, a FAILED callback: no charge), answered with its state once that is
/// durable. A final request is not changed: 409, or 200 if a cancel ended it.
async fn cancel_request(State(st): St, PathText(id): PathText) -> ApiResult {
    let (rid, rec) = load_request(&st, &id)?;
    if !is_final(&rec) {
        let vin = parse_vin(&rec.vin, "vin")?;
        let (tx, rx) = oneshot::channel();
        let target = CancelTarget::Request(rid);
        ask(&st.engine, &vin, Msg::Cancel { target, resp: tx }, rx).await??;
    }
    let (_, rec) = load_request(&st, &id)?;
    if rec.error_code.as_deref() == Some(CANCELLED) {
        return Ok(Json(request_view(&rec)).into_response());
    }
    Err(ApiError::new(
        409,
        "request is final",
        "requestId",
        match rec.status.as_str() {
            "COMPLETED" => "it completed before the cancel (the car confirmed it)",
            _ => "it failed before the cancel",
        },
    ))
}

async fn register(State(st): St, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let m = parse_body(body, MAX_BODY_BYTES)?;
    no_unknown(&m, &["vin", "publicKey", "platform", "firmwareVersion"], "")?;
    let vin = parse_vin(req_str(&m, "vin", "")?, "vin")?;
    let key_text = req_str(&m, "publicKey", "")?;
    let key = verifying_key_from_hex(key_text).map_err(|e| ApiError::bad("publicKey", e))?;
    let platform = req_str(&m, "platform", "")?;
    if platform.is_empty()
        || platform.len() > MAX_PLATFORM_LEN
        || !platform
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ApiError::bad(
            "platform",
            format!("1-{MAX_PLATFORM_LEN} of A-Z a-z 0-9 _ - ."),
        ));
    }
    let fw = opt_str(&m, "firmwareVersion", "")?;
    if let Some(f) = fw {
        FirmwareVersion::new(f)
            .map_err(|e| ApiError::bad("firmwareVersion", format!("firmware version {e}")))?;
    }
    let rec = VehicleRec {
        vin: vin.to_string(),
        public_key: key_text.trim().to_ascii_lowercase(),
        platform: platform.to_owned(),
        firmware_version: fw.map(str::to_owned),
        registered_at: iso_now(),
    };
    let (tx, rx) = oneshot::channel();
    let created = ask(
        &st.engine,
        &vin,
        Msg::Register {
            rec: rec.clone(),
            vin,
            key,
            resp: tx,
        },
        rx,
    )
    .await??;
    let stored: VehicleRec = st
        .store
        .vehicles
        .get(vin.as_bytes())
        .map_err(ApiError::storage)?
        .and_then(|v| dec(&v))
        .unwrap_or(rec);
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(stored)).into_response())
}

/// `POST /vehicles/{vin}/key`: a technician replaced the car's telematics unit, which holds
/// its signing key. `previousPublicKey` must be the key the car has now, so a mistyped VIN
/// or a second technician's stale call replaces no key; a repeat of a replacement that
/// succeeded (its `publicKey` already the car's) answers the same and changes nothing.
/// Answered with the car's record, the new key in it, once that is durable.
async fn replace_key(
    State(st): St,
    PathText(vin): PathText,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let vin = parse_vin(&vin, "vin")?;
    let m = parse_body(body, MAX_BODY_BYTES)?;
    no_unknown(&m, &["publicKey", "previousPublicKey"], "")?;
    let key = verifying_key_from_hex(req_str(&m, "publicKey", "")?)
        .map_err(|e| ApiError::bad("publicKey", e))?;
    let previous = verifying_key_from_hex(req_str(&m, "previousPublicKey", "")?)
        .map_err(|e| ApiError::bad("previousPublicKey", e))?;
    let (tx, rx) = oneshot::channel();
    let msg = Msg::ReplaceKey {
        vin,
        key,
        previous,
        resp: tx,
    };
    let rec = ask(&st.engine, &vin, msg, rx).await??;
    Ok(Json(rec).into_response())
}

/// `GET /vehicles?limit=&after=&connectivity=&serviceStatus=`: the registered cars in VIN
/// order, a page at a time (`after`: the previous page's `nextAfter`), each as
/// `GET /vehicles/{vin}/status` shows it with its `platform`, `publicKey` and `registeredAt`;
/// `connectivity` keeps the cars in that state, `serviceStatus` those with a service in
/// that state (which cars have a service in ERROR?). At most [`MAX_VEHICLES_SCANNED`] cars
/// are looked at a call: a filtered page may end short, even empty, with `nextAfter`.
async fn list_vehicles(State(st): St, QueryMap(q): QueryMap) -> ApiResult {
    let limit = page_limit(&q, 100)?;
    only_params(&q, &["limit", "after", "connectivity", "serviceStatus"])?;
    let mut cursor = q.get("after").map(|s| parse_vin(s, "after")).transpose()?;
    let connectivity = one_of(&q, "connectivity", &["ONLINE", "OFFLINE", "LIMITED"])?;
    let service_status = one_of(&q, "serviceStatus", &["ACTIVE", "PENDING", "ERROR"])?;
    let wanted = |status: &Value| {
        connectivity.is_none_or(|c| status["connectivity"] == c)
            && service_status.is_none_or(|s| {
                status["activeServices"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|service| service["status"] == s))
            })
    };
    let mut page = Vec::new();
    let mut scanned = 0;
    // One car past the page tells whether another page follows.
    while page.len() <= limit {
        let chunk = vehicles_after(&st.store, cursor.as_ref(), VEHICLE_SCAN_CHUNK)?;
        let Some((last, _)) = chunk.last() else {
            break;
        };
        cursor = Some(*last);
        scanned += chunk.len();
        let statuses = statuses_of(&st.engine, &chunk).await?;
        for ((_, rec), status) in chunk.into_iter().zip(statuses) {
            let Some(mut status) = status.filter(|s| wanted(s)) else {
                continue;
            };
            status["platform"] = json!(rec.platform);
            status["publicKey"] = json!(rec.public_key);
            status["registeredAt"] = json!(rec.registered_at);
            page.push(status);
        }
        if page.len() <= limit && scanned >= MAX_VEHICLES_SCANNED {
            // Cut short: the client goes on from the last car looked at.
            let next = cursor.map(|v| v.to_string());
            return Ok(Json(json!({"vehicles": page, "nextAfter": next})).into_response());
        }
    }
    let (page, more) = split_page(page, limit);
    let next = more
        .then(|| page.last().map(|s| s["vin"].clone()))
        .flatten();
    Ok(Json(json!({"vehicles": page, "nextAfter": next})).into_response())
}

/// The query parameter `name`, which must be one of `allowed` if given.
fn one_of<'a>(
    q: &HashMap<String, String>,
    name: &str,
    allowed: &[&'a str],
) -> Result<Option<&'a str>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => match allowed.iter().find(|a| **a == v.as_str()) {
            Some(a) => Ok(Some(*a)),
            None => Err(ApiError::bad(
                name,
                format!("one of {}", allowed.join(", ")),
            )),
        },
    }
}

/// Up to `n` registered cars after `after` (from the first without it), in VIN order.
fn vehicles_after(
    store: &Store,
    after: Option<&Vin>,
    n: usize,
) -> Result<Vec<(Vin, VehicleRec)>, ApiError> {
    use std::ops::Bound::{Excluded, Unbounded};
    let range = match after {
        Some(vin) => store
            .vehicles
            .range::<&[u8], _>((Excluded(&vin.as_bytes()[..]), Unbounded)),
        None => store.vehicles.iter(),
    };
    let mut out = Vec::with_capacity(n);
    for item in range {
        let (key, v) = item.map_err(ApiError::storage)?;
        let vin = std::str::from_utf8(&key)
            .ok()
            .and_then(|k| k.parse::<Vin>().ok());
        if let (Some(vin), Some(rec)) = (vin, dec::<VehicleRec>(&v)) {
            out.push((vin, rec));
            if out.len() == n {
                break;
            }
        }
    }
    Ok(out)
}

/// The statuses of `cars`, in their order (`None` for a car no shard holds), one message to
/// each shard that holds some of them.
async fn statuses_of(
    engine: &Engine,
    cars: &[(Vin, VehicleRec)],
) -> Result<Vec<Option<Value>>, ApiError> {
    let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); engine.shard_count()];
    for (i, (vin, _)) in cars.iter().enumerate() {
        by_shard[engine.shard_index(vin)].push(i);
    }
    // Every shard is asked before any answer is awaited, so they look their cars up at once.
    let mut waits = Vec::new();
    for (shard, at) in by_shard.into_iter().enumerate() {
        if at.is_empty() {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        let vins = at.iter().map(|&i| cars[i].0).collect();
        engine
            .shard_at(shard)
            .send_async(Msg::Statuses { vins, resp: tx })
            .await
            .map_err(|_| ApiError::unavailable())?;
        waits.push((at, rx));
    }
    let mut out = vec![None; cars.len()];
    for (at, rx) in waits {
        let statuses = rx.await.map_err(|_| ApiError::unavailable())?;
        for (i, status) in at.into_iter().zip(statuses) {
            out[i] = status;
        }
    }
    Ok(out)
}

async fn status(State(st): St, PathText(vin): PathText) -> ApiResult {
    let vin = parse_vin(&vin, "vin")?;
    let (tx, rx) = oneshot::channel();
    let v = ask(&st.engine, &vin, Msg::Status { vin, resp: tx }, rx).await?;
    match v {
        Some(v) => Ok(Json(v).into_response()),
        // Only for a car its shard does not hold: the tombstone says why it is gone.
        None => match st.store.retired_car(vin.as_bytes()) {
            Ok(Some(tomb)) => Err(decommissioned_car(&tomb)),
            _ => Err(unknown_car()),
        },
    }
}

/// The 404 for a car taken out of the fleet.
fn decommissioned_car(tomb: &RetiredRec) -> ApiError {
    ApiError::new(
        404,
        "vehicle decommissioned",
        "vin",
        &format!(
            "this car was decommissioned at {} (its history is kept); register it again \
             (POST /vehicles) to bring it back",
            tomb.decommissioned_at
        ),
    )
}

/// `DELETE /vehicles/{vin}`: the car leaves the fleet (scrapped, written off, out of the
/// programme). Its requests in flight end FAILED with `DECOMMISSIONED` (no charge), one last
/// command withdraws its grants, its registration ends and its key is free; its history
/// stays, and a tombstone keeps its seq so that a registration again goes on above it.
/// Answered once durable; a repeat answers the same car and time with `requestsFailed` 0
/// and changes nothing.
async fn decommission(State(st): St, PathText(vin): PathText) -> ApiResult {
    let vin = parse_vin(&vin, "vin")?;
    let (tx, rx) = oneshot::channel();
    let tomb = ask(&st.engine, &vin, Msg::Decommission { vin, resp: tx }, rx).await??;
    Ok(Json(json!({
        "vin": tomb.vin,
        "decommissionedAt": tomb.decommissioned_at,
        "requestsFailed": tomb.requests_failed,
        "withdrawalSeq": tomb.seq,
    }))
    .into_response())
}

/// The 404 for a VIN no car was registered with.
pub(crate) fn unknown_car() -> ApiError {
    ApiError::new(
        404,
        "unknown car",
        "vin",
        "no vehicle with this VIN is registered",
    )
}

/// `Ok` when a car is registered with `vin`, or was and has been decommissioned (what it
/// left, its history and tickets, stays readable), else [`unknown_car`].
fn registered(st: &AppState, vin: &Vin) -> Result<(), ApiError> {
    let known = st
        .store
        .vehicles
        .contains_key(vin.as_bytes())
        .and_then(|now| Ok(now || st.store.retired.contains_key(vin.as_bytes())?));
    match known {
        Ok(true) => Ok(()),
        Ok(false) => Err(unknown_car()),
        Err(e) => Err(ApiError::storage(e)),
    }
}

/// 400 naming the first query parameter not in `allowed`.
fn only_params(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::new(
            400,
            "unknown parameter",
            k,
            &format!("only {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn page_limit(q: &HashMap<String, String>, default: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(ApiError::bad(
                "limit",
                format!("an integer from 1 to {MAX_PAGE}"),
            )),
        },
    }
}

async fn history(State(st): St, PathText(vin): PathText, QueryMap(q): QueryMap) -> ApiResult {
    let vin = parse_vin(&vin, "vin")?;
    let limit = page_limit(&q, 50)?;
    let before = match q.get("before") {
        None => u64::MAX,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad("before", "an entry id from a previous page"))?,
    };
    only_params(&q, &["limit", "before"])?;
    registered(&st, &vin)?;
    // The car's shard holds its newest entries for up to a second before writing them.
    let (tx, rx) = oneshot::channel();
    ask(&st.engine, &vin, Msg::WriteHistory { vin, resp: tx }, rx).await?;
    let mut lo = vin.as_bytes().to_vec();
    lo.extend_from_slice(&0u64.to_be_bytes());
    let mut hi = vin.as_bytes().to_vec();
    hi.extend_from_slice(&before.to_be_bytes());
    let mut entries = Vec::new();
    // A value holds one batch's entries, all at or after its key's id: those of a value just
    // below `before` that are not below it were on an earlier page.
    let older = |e: &HistoryEntry| e.id.parse::<u64>().is_ok_and(|id| id < before);
    'pages: for item in st.store.history.range(lo..hi).rev() {
        let (_, v) = item.map_err(ApiError::storage)?;
        let Some(group) = dec_history(&v) else {
            continue;
        };
        for e in group.into_iter().rev().filter(older) {
            entries.push(history_view(e));
            if entries.len() == limit {
                break 'pages;
            }
        }
    }
    let next = if entries.len() == limit {
        entries
            .last()
            .and_then(|e| e["id"].as_str().map(str::to_owned))
    } else {
        None
    };
    Ok(
        Json(json!({ "vin": vin.to_string(), "entries": entries, "nextBefore": next }))
            .into_response(),
    )
}

async fn campaign(
    State(st): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let received = Instant::now();
    let m = parse_body(body, MAX_CAMPAIGN_BODY_BYTES)?;
    no_unknown(
        &m,
        &[
            "vins",
            "action",
            "serviceId",
            "configuration",
            "duration",
            "abortWhen",
        ],
        "",
    )?;
    let vins = match m.get("vins") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad("vins", "must be an array of VINs")),
        None => return Err(ApiError::new(400, "missing field", "vins", "required")),
    };
    if vins.is_empty() || vins.len() > MAX_CAMPAIGN_VINS {
        return Err(ApiError::bad(
            "vins",
            format!("1 to {MAX_CAMPAIGN_VINS} VINs"),
        ));
    }
    let mut parsed = Vec::with_capacity(vins.len());
    let mut seen = HashSet::with_capacity(vins.len());
    for (i, v) in vins.iter().enumerate() {
        let field = format!("vins[{i}]");
        let s = v
            .as_str()
            .ok_or_else(|| ApiError::bad(&field, "must be a string"))?;
        let vin = parse_vin(s, &field)?;
        if !seen.insert(vin) {
            return Err(ApiError::bad(&field, "listed twice"));
        }
        parsed.push(vin);
    }
    let service = parse_service(&m)?;
    let action = req_str(&m, "action", "")?;
    let op = match action {
        "ACTIVATE" => Op::Activate(parse_grant(&m, &service)?),
        "DEACTIVATE" => {
            if let Some(k) = ["configuration", "duration"]
                .into_iter()
                .find(|k| m.contains_key(*k))
            {
                return Err(ApiError::new(
                    400,
                    "unknown field",
                    k,
                    "not part of a DEACTIVATE campaign",
                ));
            }
            Op::Deactivate(service.clone())
        }
        _ => return Err(ApiError::bad("action", "must be ACTIVATE or DEACTIVATE")),
    };
    let abort = parse_abort_when(&m)?;
    let key = idempotency::from_headers(&headers, "campaign", &m)?;
    let mut cid = RequestId(new_uuid());
    let created = now_ms();
    let mut rec = CampaignRec {
        campaign_id: cid.to_string(),
        action: action.to_owned(),
        service_id: service,
        total: parsed.len(),
        created_at: iso_now(),
    };
    // A campaign made here and then given up (a repeat's, or a failed write) leaves nothing.
    let forget = |store: &Store, cid: &RequestId| {
        let _ = store.campaigns.remove(cid.0);
        let _ = store.campaigns.remove(abort_when_mark(cid));
    };
    // The rule before the record: whoever finds the record (a racing copy, a start) finds
    // its rule too. Made durable by the shards' flushes, with the record.
    if let Some(a) = &abort {
        st.store
            .campaigns
            .insert(abort_when_mark(&cid), enc(a))
            .map_err(ApiError::storage)?;
    }
    if let Err(e) = st.store.campaigns.insert(cid.0, enc(&rec)) {
        forget(&st.store, &cid);
        return Err(ApiError::storage(e));
    }
    let replayed = match &key {
        Some(key) => match campaign_of_key(&st.store, key, cid, created) {
            Ok(None) => false,
            Ok(Some(earlier)) => {
                forget(&st.store, &cid);
                cid = earlier.0;
                rec = earlier.1;
                st.metrics.idempotent_replays.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                forget(&st.store, &cid);
                return Err(e);
            }
        },
        None => false,
    };
    // A repeat's requests count where its first's do, if the book still keeps them (else
    // GET counts them from the store). With an abort rule, a book that lost them (a
    // restart) counts them from the store again, so that what the repeat makes is counted
    // by the rule too.
    let counts = match replayed {
        false => Some(st.campaigns.open(&rec.campaign_id, abort)),
        true => match st.campaigns.get(&rec.campaign_id) {
            Some(live) => Some(live),
            None if abort.is_some() => {
                let (store, book, id) = (
                    st.store.clone(),
                    st.campaigns.clone(),
                    rec.campaign_id.clone(),
                );
                tokio::task::spawn_blocking(move || crate::campaign::rearm(&store, &book, &id))
                    .await
                    .map_err(ApiError::storage)?
            }
            None => None,
        },
    };
    let n = st.engine.shard_count();
    let mut per_shard: Vec<Vec<NewRequest>> = (0..n).map(|_| Vec::new()).collect();
    for (index, vin) in (0u64..).zip(parsed) {
        per_shard[st.engine.shard_index(&vin)].push(NewRequest {
            vin,
            op: op.clone(),
            request_id: RequestId(campaign_request_id(&cid.0, index)),
            campaign_id: Some(rec.campaign_id.clone()),
            campaign: counts.clone(),
            created_ms: created,
            received,
            idempotency: None,
        });
    }
    // A cancelled campaign's parts make none of their requests (its shards look at the
    // mark): not those a crash left unmade, nor those of a cancel while this was accepted.
    let mut waits = Vec::new();
    for (i, reqs) in per_shard.into_iter().enumerate() {
        if reqs.is_empty() {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        st.engine
            .shard_at(i)
            .send_async(Msg::Batch {
                reqs,
                // With a key, a copy of this campaign may be on its way too (or have been
                // cut short by a crash): its requests are made once, by whichever comes first.
                fill_in: key.is_some(),
                resp: tx,
            })
            .await
            .map_err(|_| ApiError::unavailable())?;
        waits.push(rx);
    }
    let mut accepted = 0;
    let mut not_made = 0;
    let mut refused = Vec::new();
    let mut refused_count = 0;
    for rx in waits {
        let part = rx.await.map_err(|_| ApiError::unavailable())?;
        accepted += part.accepted;
        not_made += part.not_made;
        refused_count += part.refused.len();
        for (vin, reason) in part.refused {
            if refused.len() < MAX_REFUSED_LISTED {
                refused.push(json!({ "vin": vin, "reason": reason }));
            }
        }
    }
    let answer = Json(json!({
        "campaignId": rec.campaign_id,
        "total": rec.total,
        "accepted": accepted,
        "refusedCount": refused_count,
        "refused": refused,
        "notMade": not_made,
        "timestamp": rec.created_at,
    }));
    Ok(replay_marked(StatusCode::ACCEPTED, answer, replayed))
}

/// A campaign's `abortWhen` (`null` reads as not given, as for the other optional fields):
/// `{refusedPercent: 1..=100, minFinished?: 1..=100000 (default 20)}`, integers.
fn parse_abort_when(m: &Map<String, Value>) -> Result<Option<AbortWhen>, ApiError> {
    let a = match m.get("abortWhen") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(a)) => a,
        Some(_) => {
            return Err(ApiError::bad(
                "abortWhen",
                "must be an object {refusedPercent, minFinished}",
            ))
        }
    };
    no_unknown(a, &["refusedPercent", "minFinished"], "abortWhen")?;
    let int = |name: &str, max: u32| -> Result<Option<u32>, ApiError> {
        let field = join("abortWhen", name);
        match a.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=max).contains(n))
                .map(Some)
                .ok_or_else(|| ApiError::bad(&field, format!("an integer from 1 to {max}"))),
        }
    };
    let refused_percent = int("refusedPercent", 100)?.ok_or_else(|| {
        ApiError::new(400, "missing field", "abortWhen.refusedPercent", "required")
    })?;
    let min_finished = int("minFinished", MAX_MIN_FINISHED)?.unwrap_or(DEFAULT_MIN_FINISHED);
    Ok(Some(AbortWhen {
        refused_percent,
        min_finished,
    }))
}

/// Claims `key` for the new campaign `cid` (its record already stored, so that a copy
/// racing with this one finds it); `Some`: the key names an earlier campaign, this one.
fn campaign_of_key(
    store: &Store,
    key: &IdemKey,
    cid: RequestId,
    created_ms: u64,
) -> Result<Option<(RequestId, CampaignRec)>, ApiError> {
    match idempotency::claim(store, key, cid.0, created_ms)? {
        Claim::New { .. } => Ok(None),
        Claim::Mismatch => Err(idempotency::mismatch()),
        Claim::Repeat { target, current } => {
            let earlier = store
                .campaigns
                .get(target)
                .map_err(ApiError::storage)?
                .and_then(|v| dec::<CampaignRec>(&v));
            match earlier {
                Some(rec) => Ok(Some((RequestId(target), rec))),
                None => {
                    idempotency::take_over(store, key, &current, cid.0, created_ms)?;
                    Ok(None)
                }
            }
        }
    }
}

async fn get_campaign(State(st): St, PathText(id): PathText) -> ApiResult {
    let (cid, rec) = load_campaign(&st, &id)?;
    Ok(Json(campaign_view(&st, cid, &rec).await?).into_response())
}

/// `POST /campaigns/{campaignId}/cancel`: every request of the campaign still in flight
/// ends as a cancelled request does (`POST /ota/requests/{requestId}/cancel`); those the
/// cars confirmed stay as they are. The campaign is marked cancelled (`cancelledAt`), so a
/// repeat of its POST with its idempotency key makes none of the requests a crash may
/// have left unmade. Answered with the campaign and how many requests this call ended,
/// once that is durable; cancelling again ends what is left (usually nothing).
async fn cancel_campaign(State(st): St, PathText(id): PathText) -> ApiResult {
    let (cid, rec) = load_campaign(&st, &id)?;
    let ended = end_campaign(&st, &cid, &rec).await?;
    let mut view = campaign_view(&st, cid, &rec).await?;
    view["cancelledNow"] = json!(ended);
    Ok(Json(view).into_response())
}

/// Cancels campaign `cid`: marks it cancelled (once: a later cancel keeps the first time)
/// and ends each of its requests still in flight on every shard; how many that ended, once
/// durable. The one way a campaign is cancelled: `POST /campaigns/{campaignId}/cancel` and
/// the campaign's abort rule ([`run_aborts`]) both come here.
async fn end_campaign(
    st: &AppState,
    cid: &RequestId,
    rec: &CampaignRec,
) -> Result<usize, ApiError> {
    // Cancelled, it no longer trips its abort rule (its requests ending CANCELLED could
    // otherwise bring it to `minFinished`).
    if let Some(live) = st.campaigns.get(&rec.campaign_id) {
        live.disarm();
    }
    let mark = cancel_mark(cid);
    if !st
        .store
        .campaigns
        .contains_key(&mark)
        .map_err(ApiError::storage)?
    {
        // Made durable by the shards' flushes below (one store).
        st.store
            .campaigns
            .insert(&mark, enc(&iso_now()))
            .map_err(ApiError::storage)?;
    }
    let mut waits = Vec::new();
    for i in 0..st.engine.shard_count() {
        let (tx, rx) = oneshot::channel();
        let target = CancelTarget::Campaign(rec.campaign_id.clone());
        st.engine
            .shard_at(i)
            .send_async(Msg::Cancel { target, resp: tx })
            .await
            .map_err(|_| ApiError::unavailable())?;
        waits.push(rx);
    }
    let mut ended = 0;
    for rx in waits {
        ended += rx.await.map_err(|_| ApiError::unavailable())??;
    }
    Ok(ended)
}

/// Cancels the campaigns whose abort rule tripped ([`crate::campaign`]), one at a time, the
/// way `POST /campaigns/{campaignId}/cancel` does, after recording why (`abortedAt`,
/// `abortReason`). A task of its own, fed by a bounded queue
/// ([`crate::campaign::TRIP_QUEUE`]): a cancel waits for every shard, and the trip is made
/// on a shard's thread, which must not wait for itself.
pub(crate) async fn run_aborts(st: Arc<AppState>, mut trips: tokio::sync::mpsc::Receiver<Trip>) {
    while let Some(trip) = trips.recv().await {
        if let Err(e) = abort_campaign(&st, &trip).await {
            tracing::error!(campaign = %trip.campaign_id, status = e.status, reason = %e.reason,
                "campaign abort not done; tried again at its next request end or the next start");
            if e.status != 404 {
                if let Some(live) = st.campaigns.get(&trip.campaign_id) {
                    live.rearm();
                }
            }
        }
    }
}

/// Records campaign `trip`'s abort (unless recorded before: a restart after a trip whose
/// cancel may not have been carried out) and cancels it through [`end_campaign`]. A
/// campaign cancelled by hand is left as it is: the rule never trips after a cancel.
async fn abort_campaign(st: &AppState, trip: &Trip) -> Result<(), ApiError> {
    let (cid, rec) = load_campaign(st, &trip.campaign_id)?;
    let cancelled = cancelled_at(st, &cid)?.is_some();
    let recorded = st
        .store
        .campaigns
        .get(aborted_mark(&cid))
        .map_err(ApiError::storage)?
        .and_then(|v| dec::<AbortedRec>(&v));
    let aborted = match recorded {
        // Its cancel again: a kill may have cut it short; otherwise it ends nothing.
        Some(a) => a,
        None if cancelled => {
            if let Some(live) = st.campaigns.get(&rec.campaign_id) {
                live.disarm();
            }
            return Ok(());
        }
        None => {
            let a = AbortedRec {
                aborted_at: iso_now(),
                abort_reason: trip.when.reason(trip.finished, trip.refused),
            };
            // Before the cancel mark, made durable by the same flushes: a cancelled campaign
            // whose abort is recorded was cancelled by its rule.
            st.store
                .campaigns
                .insert(aborted_mark(&cid), enc(&a))
                .map_err(ApiError::storage)?;
            st.metrics.campaigns_aborted.fetch_add(1, Relaxed);
            a
        }
    };
    let ended = end_campaign(st, &cid, &rec).await?;
    tracing::warn!(campaign = %rec.campaign_id, reason = %aborted.abort_reason,
        requests_cancelled = ended, "campaign aborted by its abortWhen rule");
    Ok(())
}

/// `GET /campaigns?limit=&before=`: the campaigns, newest first, a page at a time (`before`:
/// the previous page's `nextBefore`, a campaign id; `null` on the last page), without their
/// counts (a read per request: `GET /campaigns/{campaignId}` has them).
async fn list_campaigns(State(st): St, QueryMap(q): QueryMap) -> ApiResult {
    let limit = page_limit(&q, 50)?;
    only_params(&q, &["limit", "before"])?;
    let before = match q.get("before") {
        None => None,
        Some(s) => Some(
            s.parse::<RequestId>()
                .map_err(|_| ApiError::bad("before", "a campaign id from a previous page"))?,
        ),
    };
    let range = match &before {
        Some(cid) => st.store.campaigns.range(..&cid.0[..]),
        None => st.store.campaigns.iter(),
    };
    let mut out = Vec::new();
    // Campaign ids are version 7 UUIDs, in time order; a cancel mark (a longer key) is not
    // a campaign.
    for item in range.rev() {
        let (key, v) = item.map_err(ApiError::storage)?;
        let (Ok(cid), Some(rec)) = (<[u8; 16]>::try_from(&key[..]), dec::<CampaignRec>(&v)) else {
            continue;
        };
        out.push((RequestId(cid), rec));
        if out.len() > limit {
            break;
        }
    }
    let (page, more) = split_page(out, limit);
    let next = page.last().filter(|_| more).map(|(cid, _)| cid.to_string());
    let mut campaigns = Vec::with_capacity(page.len());
    for (cid, rec) in &page {
        campaigns.push(campaign_summary(&st, cid, rec)?);
    }
    Ok(Json(json!({ "campaigns": campaigns, "nextBefore": next })).into_response())
}

/// A page of at most `limit` items from `items`, read one past the page: the page, and
/// whether another follows (so the last page is never an empty one).
fn split_page<T>(mut items: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let more = items.len() > limit;
    items.truncate(limit);
    (items, more)
}

/// When campaign `cid` was cancelled, if it was.
fn cancelled_at(st: &AppState, cid: &RequestId) -> Result<Option<String>, ApiError> {
    let v = st
        .store
        .campaigns
        .get(cancel_mark(cid))
        .map_err(ApiError::storage)?;
    Ok(v.and_then(|v| dec::<String>(&v)))
}

/// The campaign `id` names (400 for a malformed id, 404 for none).
fn load_campaign(st: &AppState, id: &str) -> Result<(RequestId, CampaignRec), ApiError> {
    let cid: RequestId = id.parse().map_err(|e| ApiError::bad("campaignId", e))?;
    let rec: CampaignRec = st
        .store
        .campaigns
        .get(cid.0)
        .map_err(ApiError::storage)?
        .and_then(|v| dec(&v))
        .ok_or_else(|| {
            ApiError::new(
                404,
                "unknown campaign",
                "campaignId",
                "no campaign with this id",
            )
        })?;
    Ok((cid, rec))
}

/// A campaign as `GET /campaigns/{campaignId}` shows it.
async fn campaign_view(
    st: &AppState,
    cid: RequestId,
    rec: &CampaignRec,
) -> Result<Value, ApiError> {
    let counts = match st.campaigns.get(&rec.campaign_id) {
        Some(live) => {
            let (in_progress, completed, failed) = live.snapshot();
            json!({"QUEUED": 0, "IN_PROGRESS": in_progress, "COMPLETED": completed, "FAILED": failed})
        }
        None => json!(campaign_counts_from_store(&st.store, cid).await?),
    };
    let mut view = campaign_summary(st, &cid, rec)?;
    view["counts"] = counts;
    Ok(view)
}

/// A campaign without its counts, as `GET /campaigns` lists it.
fn campaign_summary(st: &AppState, cid: &RequestId, rec: &CampaignRec) -> Result<Value, ApiError> {
    let mark = |key: Vec<u8>| st.store.campaigns.get(key).map_err(ApiError::storage);
    let abort_when = mark(abort_when_mark(cid))?.and_then(|v| dec::<AbortWhen>(&v));
    let aborted = mark(aborted_mark(cid))?.and_then(|v| dec::<AbortedRec>(&v));
    let (aborted_at, abort_reason) = aborted.map(|a| (a.aborted_at, a.abort_reason)).unzip();
    Ok(json!({
        "campaignId": rec.campaign_id,
        "action": rec.action,
        "serviceId": rec.service_id,
        "total": rec.total,
        "createdAt": rec.created_at,
        "cancelledAt": cancelled_at(st, cid)?,
        "abortWhen": abort_when.map(AbortWhen::to_json),
        "abortedAt": aborted_at,
        "abortReason": abort_reason,
    }))
}

/// `GET /campaigns/{campaignId}/requests?limit=&after=&status=`: the campaign's requests in
/// the order of its VIN list, a page at a time (`after`: the previous page's `nextAfter`, a
/// request id; `null` on the last page), each as `GET /ota/requests/{requestId}` shows it;
/// `status` keeps those in one state (which cars did it fail on?). A page reads the
/// campaign's requests until it is full: all of them at worst, with `status`.
async fn campaign_requests(
    State(st): St,
    PathText(id): PathText,
    QueryMap(q): QueryMap,
) -> ApiResult {
    let (cid, rec) = load_campaign(&st, &id)?;
    let limit = page_limit(&q, 100)?;
    only_params(&q, &["limit", "after", "status"])?;
    let after = match q.get("after") {
        None => None,
        Some(s) => match s.parse::<RequestId>() {
            Ok(rid) if rid.0[..CAMPAIGN_PREFIX] == cid.0[..CAMPAIGN_PREFIX] => Some(rid),
            _ => {
                return Err(ApiError::bad(
                    "after",
                    "a request id of this campaign from a previous page",
                ))
            }
        },
    };
    let status = one_of(
        &q,
        "status",
        &["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"],
    )?
    .map(str::to_owned);
    let store = st.store.clone();
    let campaign_id = rec.campaign_id;
    let (page, more) = tokio::task::spawn_blocking(move || {
        let mut page: Vec<RequestRec> = Vec::new();
        let mut take = |r: RequestRec| {
            let wanted = r.campaign_id.as_deref() == Some(campaign_id.as_str())
                && status.as_ref().is_none_or(|s| *s == r.status);
            if wanted {
                page.push(r);
            }
            // One past the page tells whether another page exists.
            page.len() > limit
        };
        // Campaigns of older stores list their requests in a tree of their own.
        let mut legacy_from = cid.0.to_vec();
        if let Some(a) = &after {
            legacy_from.extend_from_slice(&a.0);
            legacy_from.push(0);
        }
        let mut legacy = false;
        for item in store.campaign_reqs.range(legacy_from..) {
            let Ok(k) = item.map(|(k, _)| k) else {
                continue;
            };
            if !k.starts_with(&cid.0) {
                break;
            }
            legacy = true;
            let found = k
                .get(16..32)
                .and_then(|rid| store.requests.get(rid).ok().flatten())
                .and_then(|v| dec::<RequestRec>(&v));
            if found.is_some_and(&mut take) {
                break;
            }
        }
        if !legacy {
            let from = match &after {
                Some(a) => [&a.0[..], &[0]].concat(),
                None => cid.0[..CAMPAIGN_PREFIX].to_vec(),
            };
            for item in store.requests.range(from..) {
                let Ok((k, v)) = item else { continue };
                if !k.starts_with(&cid.0[..CAMPAIGN_PREFIX]) {
                    break;
                }
                if dec::<RequestRec>(&v).is_some_and(&mut take) {
                    break;
                }
            }
        }
        split_page(page, limit)
    })
    .await
    .map_err(ApiError::storage)?;
    let next = page.last().filter(|_| more).map(|r| r.request_id.clone());
    let requests: Vec<Value> = page.iter().map(request_view).collect();
    Ok(
        Json(json!({ "campaignId": cid.to_string(), "requests": requests, "nextAfter": next }))
            .into_response(),
    )
}

/// Counts a campaign's requests by state from the store (a read per request): for a
/// campaign the live book no longer keeps, e.g. one from before a restart.
async fn campaign_counts_from_store(
    store: &Store,
    cid: RequestId,
) -> Result<HashMap<String, usize>, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut counts: HashMap<String, usize> = ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        crate::campaign::for_each_request(&store, cid, |r| {
            *counts.entry(r.status).or_default() += 1
        });
        counts
    })
    .await
    .map_err(ApiError::storage)
}

/// Support tickets, newest first, a page at a time: `before` (the `nextBefore` of the
/// previous page, a ticket id; `null` on the last page) pages back, `vin` keeps one car's.
/// A page with `vin` reads the tickets until it is full, all of them at worst (they are
/// few: one a request that failed unconfirmed, and pruned with the retention).
async fn tickets(State(st): St, QueryMap(q): QueryMap) -> ApiResult {
    let limit = page_limit(&q, 100)?;
    only_params(&q, &["limit", "before", "vin"])?;
    let before = match q.get("before") {
        None => u64::MAX,
        Some(s) => s
            .strip_prefix("T-")
            .unwrap_or(s)
            .parse::<u64>()
            .map_err(|_| ApiError::bad("before", "a ticket id from a previous page"))?,
    };
    let vin = match q.get("vin") {
        None => None,
        Some(v) => {
            let vin = parse_vin(v, "vin")?;
            registered(&st, &vin)?;
            Some(vin.to_string())
        }
    };
    let mut out = Vec::new();
    for item in st.store.tickets.range(..before.to_be_bytes()).rev() {
        let (_, v) = item.map_err(ApiError::storage)?;
        let Some(t) = dec::<Ticket>(&v) else {
            continue;
        };
        if vin.as_ref().is_none_or(|vin| *vin == t.vin) {
            out.push(t);
            if out.len() > limit {
                break;
            }
        }
    }
    let (page, more) = split_page(out, limit);
    let next = page.last().filter(|_| more).map(|t| t.ticket_id.clone());
    Ok(Json(json!({ "tickets": page, "nextBefore": next })).into_response())
}

async fn keys(State(st): St) -> ApiResult {
    Ok(Json(json!({ "keys": [{ "keyId": st.key_id, "publicKey": st.public_key, "algorithm": "Ed25519" }] }))
        .into_response())
}

async fn metrics(State(st): St) -> ApiResult {
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response())
}

async fn openapi() -> ApiResult {
    Ok(Json(crate::openapi::document()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(e: ApiError) -> (u16, Value) {
        let r = e.into_response();
        let status = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_storage_failure_of_a_request_names_the_request_and_a_refusal_does_not() {
        let id = RequestId(new_uuid());
        let failed = ApiError {
            request_id: Some(id.to_string()),
            ..ApiError::storage("disk full")
        };
        let (status, body) = body_of(failed).await;
        assert_eq!(status, 500);
        assert_eq!(body["requestId"], id.to_string());
        assert_eq!(body["field"], Value::Null);
        let (status, body) = body_of(ApiError::bad("vin", "17 characters")).await;
        assert_eq!(status, 400);
        assert_eq!(body["field"], "vin");
        assert!(body.get("requestId").is_none(), "{body}");
    }
}
