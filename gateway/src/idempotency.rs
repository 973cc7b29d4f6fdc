//! Idempotency keys on the POSTs that start work (`POST /ota/activate`, `/ota/deactivate`,
//! `/campaigns`), after the IETF httpapi `Idempotency-Key` header draft.
//!
//! The CaaS core's HTTP client cannot tell a request the gateway never received from one
//! whose answer it lost (a timeout, a dropped connection): sending it again would make a
//! second activation, a second callback and, for the backend, a second charge. With a key,
//! a repeat gets the first request back (same `requestId` or `campaignId`, its current
//! status, header `Idempotent-Replayed: true`) and changes nothing; the same key on a
//! different request is refused (422). A key is claimed in the store with one atomic
//! compare-and-swap, so two copies racing through different shards cannot both create, and
//! it is made durable in the same flush as the request it names (a 2xx answer, first or
//! repeated, is only given once both are on disk). Keys are kept as long as requests, the
//! retention (`--retention`), and then pruned: an index by time (the store's
//! `idempotency_times`) lets the pruner read only the keys past it, not every key.

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::store::{dec, enc, Store};

/// The request header carrying the key.
pub(crate) const HEADER: &str = "idempotency-key";
/// The answer header set on a repeat.
pub(crate) const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest key accepted (bytes, quotes excluded).
pub(crate) const MAX_KEY_LEN: usize = 255;

/// A request's key, as the store indexes it, and what the request asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdemKey {
    /// Where the key lives in the idempotency tree: a hash of the key alone, so one key
    /// names one request whatever the route or car (a reuse elsewhere is caught).
    slot: [u8; 32],
    /// A hash of the route and the parsed body: what a repeat must match.
    fingerprint: [u8; 32],
}

/// A claimed key, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdemRec {
    /// The request (or campaign) id the key names.
    target: [u8; 16],
    fingerprint: [u8; 32],
    /// When the key was first used (Unix ms): pruned past the retention.
    created_ms: u64,
}

/// What [`claim`] found.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The key is new and now names the target given; `written` undoes it ([`release`]).
    New { written: Vec<u8> },
    /// The key already names `target` for the same request.
    Repeat { target: [u8; 16], current: Vec<u8> },
    /// The key already names another request.
    Mismatch,
}

/// Reads the key of a request to `route` whose parsed body is `body`; `None` without the
/// header. The value may be a bare token or a quoted string (the draft's sf-string).
pub(crate) fn from_headers(
    headers: &HeaderMap,
    route: &str,
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<IdemKey>, ApiError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |reason: &str| ApiError::new(400, "invalid header", "Idempotency-Key", reason);
    if values.next().is_some() {
        return Err(bad("give the header once"));
    }
    let text = value.to_str().map_err(|_| bad("must be printable ASCII"))?;
    let key = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(bad(&format!("1 to {MAX_KEY_LEN} characters")));
    }
    if !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(bad("must be printable ASCII"));
    }
    let slot = Sha256::new()
        .chain_update(b"caas idempotency key\0")
        .chain_update(key.as_bytes())
        .finalize()
        .into();
    // The parsed body, written back out: its keys in one order (a serde_json map sorts
    // them), so a repeat that lays its JSON out differently still matches.
    let canonical = serde_json::to_vec(body).map_err(|e| bad(&e.to_string()))?;
    let fingerprint = Sha256::new()
        .chain_update(route.as_bytes())
        .chain_update(b"\0")
        .chain_update(&canonical)
        .finalize()
        .into();
    Ok(Some(IdemKey { slot, fingerprint }))
}

/// The answer to a key used for another request.
pub(crate) fn mismatch() -> ApiError {
    ApiError::new(
        422,
        "idempotency key reused",
        "Idempotency-Key",
        "this key was used for a different request (another route, car or body); use a new key",
    )
}

/// The key of `slot`'s entry in the time index: when it was claimed, then the slot, so that
/// the keys claimed before a time sort below that time's 8 bytes.
fn time_key(created_ms: u64, slot: &[u8; 32]) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&created_ms.to_be_bytes());
    k[8..].copy_from_slice(slot);
    k
}

/// Claims `key` for `target`, atomically: of two requests racing with one key, one gets
/// [`Claim::New`] and the other sees it.
pub(crate) fn claim(
    store: &Store,
    key: &IdemKey,
    target: [u8; 16],
    now_ms: u64,
) -> Result<Claim, ApiError> {
    let rec = IdemRec {
        target,
        fingerprint: key.fingerprint,
        created_ms: now_ms,
    };
    let written = enc(&rec);
    match store
        .idempotency
        .compare_and_swap(key.slot, None as Option<&[u8]>, Some(written.as_slice()))
        .map_err(ApiError::storage)?
    {
        Ok(()) => {
            index(store, now_ms, key)?;
            Ok(Claim::New { written })
        }
        Err(found) => {
            let current = found.current.map(|v| v.to_vec()).unwrap_or_default();
            match dec::<IdemRec>(&current) {
                Some(old) if old.fingerprint != key.fingerprint => Ok(Claim::Mismatch),
                Some(old) => Ok(Claim::Repeat {
                    target: old.target,
                    current,
                }),
                // Unreadable: nothing it names can be found, so the caller takes it over.
                None => Ok(Claim::Repeat {
                    target: [0; 16],
                    current,
                }),
            }
        }
    }
}

/// Points a key whose request is nowhere to be found (the key reached the disk and its
/// request did not, or the request was pruned first) at `target` instead. Fails with 409 if
/// another request took it over meanwhile.
pub(crate) fn take_over(
    store: &Store,
    key: &IdemKey,
    current: &[u8],
    target: [u8; 16],
    now_ms: u64,
) -> Result<Vec<u8>, ApiError> {
    let written = enc(&IdemRec {
        target,
        fingerprint: key.fingerprint,
        created_ms: now_ms,
    });
    match store
        .idempotency
        .compare_and_swap(key.slot, Some(current), Some(written.as_slice()))
        .map_err(ApiError::storage)?
    {
        // The old time's index entry stays: pruning it finds the key claimed later and
        // leaves it to this one.
        Ok(()) => {
            index(store, now_ms, key)?;
            Ok(written)
        }
        Err(_) => Err(ApiError::new(
            409,
            "request in progress",
            "Idempotency-Key",
            "another request with this key is being handled; retry",
        )),
    }
}

/// Frees a key claimed for a request that was then refused (a 4xx changes nothing), unless
/// it was claimed again since.
pub(crate) fn release(store: &Store, key: &IdemKey, written: &[u8]) {
    let freed = store
        .idempotency
        .compare_and_swap(key.slot, Some(written), None as Option<&[u8]>);
    if let (Ok(Ok(())), Some(rec)) = (freed, dec::<IdemRec>(written)) {
        let _ = store
            .idempotency_times
            .remove(time_key(rec.created_ms, &key.slot));
    }
}

fn index(store: &Store, created_ms: u64, key: &IdemKey) -> Result<(), ApiError> {
    store
        .idempotency_times
        .insert(time_key(created_ms, &key.slot), &[])
        .map(|_| ())
        .map_err(ApiError::storage)
}

/// Whether a stored key entry is past `cutoff_ms` (an unreadable one always is).
fn expired(value: &[u8], cutoff_ms: u64) -> bool {
    dec::<IdemRec>(value).is_none_or(|r| r.created_ms < cutoff_ms)
}

/// One step of pruning keys claimed before `cutoff_ms` ([`crate::store::prune`]'s
/// contract): reads up to `budget` entries of the time index from `from` on, drops each, and
/// with it the key it names unless that key was claimed again since. Returns the keys
/// removed and where to go on (`None`: the cutoff is reached).
pub(crate) fn prune(
    store: &Store,
    cutoff_ms: u64,
    from: &[u8],
    budget: usize,
) -> sled::Result<(usize, Option<Vec<u8>>)> {
    let bound = cutoff_ms.to_be_bytes();
    let mut removed = 0;
    for (seen, item) in store.idempotency_times.range(from..&bound[..]).enumerate() {
        let (k, _) = item?;
        if seen == budget {
            return Ok((removed, Some(k.to_vec())));
        }
        if let Some(slot) = k.get(8..) {
            if let Some(v) = store.idempotency.get(slot)? {
                if expired(&v, cutoff_ms)
                    && store
                        .idempotency
                        .compare_and_swap(slot, Some(v), None as Option<&[u8]>)?
                        .is_ok()
                {
                    removed += 1;
                }
            }
        }
        store.idempotency_times.remove(&k)?;
    }
    Ok((removed, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    fn key(value: &str, route: &str, body: serde_json::Value) -> Result<IdemKey, ApiError> {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_str(value).expect("test header"));
        let serde_json::Value::Object(m) = body else {
            panic!("test body is an object")
        };
        from_headers(&h, route, &m).map(|k| k.expect("header given"))
    }

    #[test]
    fn a_key_names_one_request_and_a_different_body_or_route_is_a_mismatch() {
        let body = json!({"vin": "V1", "serviceId": "s"});
        let a = key("k-1", "activate", body.clone()).expect("valid");
        // Quoted (sf-string) and bare are the same key; the body's key order does not matter.
        let quoted = key(
            "\"k-1\"",
            "activate",
            json!({"serviceId": "s", "vin": "V1"}),
        );
        assert_eq!(quoted.expect("valid"), a);
        let other_body = key("k-1", "activate", json!({"vin": "V2", "serviceId": "s"}));
        let other_route = key("k-1", "deactivate", body);
        for k in [other_body.expect("valid"), other_route.expect("valid")] {
            assert_eq!(k.slot, a.slot);
            assert_ne!(k.fingerprint, a.fingerprint);
        }

        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 16).expect("store");
        let Ok(Claim::New { written }) = claim(&store, &a, [1; 16], 10) else {
            panic!("a new key is claimed")
        };
        match claim(&store, &a, [2; 16], 20) {
            Ok(Claim::Repeat { target, .. }) => assert_eq!(target, [1; 16]),
            other => panic!("a repeat names the first request: {other:?}"),
        }
        let v2 = key("k-1", "activate", json!({"vin": "V2", "serviceId": "s"}));
        assert!(matches!(
            claim(&store, &v2.expect("valid"), [3; 16], 30),
            Ok(Claim::Mismatch)
        ));
        // A refused request frees its key (and its place in the time index); a repeat then
        // starts afresh.
        release(&store, &a, &written);
        assert_eq!(store.idempotency_times.len(), 0);
        assert!(matches!(
            claim(&store, &a, [4; 16], 40),
            Ok(Claim::New { .. })
        ));
        let stored = store
            .idempotency
            .get(a.slot)
            .expect("read")
            .expect("claimed");
        assert!(!expired(&stored, 40));
        assert!(expired(&stored, 41));

        // Pruning reads the time index only up to the cutoff: a key claimed at 40 stays at
        // cutoff 40 and goes at 41, in steps of the budget.
        let b = key("k-2", "activate", json!({})).expect("valid");
        assert!(matches!(
            claim(&store, &b, [5; 16], 45),
            Ok(Claim::New { .. })
        ));
        assert_eq!(prune(&store, 40, &[], 10).expect("prune"), (0, None));
        assert_eq!(store.idempotency.len(), 2);
        let (removed, next) = prune(&store, 50, &[], 1).expect("prune");
        assert_eq!(removed, 1);
        let next = next.expect("one step of one entry left the second");
        assert_eq!(prune(&store, 50, &next, 10).expect("prune"), (1, None));
        assert_eq!(
            (store.idempotency.len(), store.idempotency_times.len()),
            (0, 0)
        );
    }

    #[test]
    fn a_bad_header_names_the_field() {
        let body = json!({});
        for bad in ["", "\"\"", "é", &"x".repeat(MAX_KEY_LEN + 1)] {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(bad) {
                h.insert(HEADER, v);
            } else {
                h.insert(
                    HEADER,
                    HeaderValue::from_bytes(bad.as_bytes()).expect("bytes"),
                );
            }
            let serde_json::Value::Object(m) = body.clone() else {
                panic!("object")
            };
            let e = from_headers(&h, "activate", &m).expect_err(bad);
            assert_eq!(
                (e.status, e.field.as_deref()),
                (400, Some("Idempotency-Key")),
                "{bad}"
            );
        }
        let mut h = HeaderMap::new();
        h.append(HEADER, HeaderValue::from_static("a"));
        h.append(HEADER, HeaderValue::from_static("b"));
        let m = serde_json::Map::new();
        assert_eq!(
            from_headers(&h, "activate", &m).expect_err("twice").status,
            400
        );
        assert!(from_headers(&HeaderMap::new(), "activate", &m)
            .expect("no header")
            .is_none());
    }
}
