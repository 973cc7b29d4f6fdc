#!/usr/bin/env python3
"""Invariants over a soak run, read from the driver's and the receiver's records and the
gateway's API. The gateway must still be up and settled (rig.py runs this at the end).

usage: check.py RUNDIR [BASE_URL]
Writes RUNDIR/check.json (every violation in full) and prints the report, the violations
(up to 8 of each) and a verdict line. Exit status 0: every invariant holds; 1: a violation.
Keys starting with a digit are invariants (see README.md); 'note_' keys are only reported.
"""
import bisect, collections, glob, json, os, re, sys, time, urllib.request, datetime
from concurrent.futures import ThreadPoolExecutor

from promtext import parse_metrics

run = sys.argv[1]
cfg = json.load(open(os.path.join(run, "config.json")))
BASE, TOKEN = cfg["base"], cfg["token"]
if len(sys.argv) > 2:
    BASE = sys.argv[2]


def get(path):
    req = urllib.request.Request(BASE + path, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            try:
                return r.status, json.loads(raw)
            except Exception:
                return r.status, raw.decode()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except Exception:
            return e.code, raw.decode("utf-8", "replace")


def metrics():
    st, txt = get("/metrics")
    return parse_metrics(txt)


def load_jsonl(p):
    out = []
    if not os.path.exists(p):
        return out
    for line in open(p):
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except Exception:
                pass
    return out


driver = load_jsonl(os.path.join(run, "driver.jsonl"))
cbs = load_jsonl(os.path.join(run, "callbacks.jsonl"))
events = load_jsonl(os.path.join(run, "events.jsonl"))
report = {}
violations = collections.defaultdict(list)

# ---------- driver answers ----------
answered = {}          # requestId -> driver record (2xx)
err500_ids = {}        # requestId -> record (500 carrying a requestId)
unknown = []           # connection errors on POST /ota/*
by_status = collections.Counter()
camps = []
for r in driver:
    if r.get("type") == "request":
        st = r["status"]
        by_status[st if st is not None else "conn-error"] += 1
        if st is not None and 200 <= st < 300:
            answered[r["resp"]["requestId"]] = r
        elif st is not None and st >= 500:
            rid = r["resp"].get("requestId") if isinstance(r["resp"], dict) else None
            if rid:
                err500_ids[rid] = r
            else:
                unknown.append(r)  # a 5xx without an id: outcome unknown too
        elif st is None:
            unknown.append(r)
    elif r.get("type") == "campaign":
        camps.append(r)
report["driver"] = {"requests": sum(by_status.values()), "by_status": {str(k): v for k, v in by_status.items()},
                    "accepted": len(answered), "err500_with_id": len(err500_ids), "unknown_outcome": len(unknown),
                    "campaigns": len(camps),
                    "campaigns_2xx": sum(1 for c in camps if c["status"] and 200 <= c["status"] < 300)}


# ---------- campaign request ids ----------
def campaign_request_id(cid, index):
    b = bytes.fromhex(cid.replace("-", ""))
    b = b[:10] + index.to_bytes(6, "big")
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


camp_req = {}  # requestId -> (campaignId, vin, action, service)
for c in camps:
    if c["status"] and 200 <= c["status"] < 300:
        cid = c["resp"]["campaignId"]
        for i, vin in enumerate(c["body"]["vins"]):
            camp_req[campaign_request_id(cid, i)] = (cid, vin, c["body"]["action"], c["body"]["serviceId"])

# ---------- callbacks ----------
by_rid = collections.defaultdict(list)
bad_sig = []
for c in cbs:
    if not c.get("sigOk") or not c.get("tsOk"):
        bad_sig.append(c)
    js = c.get("json")
    if not isinstance(js, dict) or "requestId" not in js:
        violations["1_callback_malformed"].append(c)
        continue
    by_rid[js["requestId"]].append(c)
report["callbacks"] = {"total": len(cbs), "distinct_requests": len(by_rid),
                       "answered_500": sum(1 for c in cbs if c["answer"] == 500),
                       "hung": sum(1 for c in cbs if c["action"] == "hang"),
                       "repeats": sum(len(v) - 1 for v in by_rid.values())}
for c in bad_sig:
    violations["1_bad_signature"].append({"n": c["n"], "body": c["body"], "sig": c["sig"], "ts": c["ts"]})

FINAL = {"ACTIVATED", "DEACTIVATED", "FAILED"}
for rid, lst in by_rid.items():
    sts = {(c["json"].get("status"), c["json"].get("errorCode")) for c in lst}
    bodies_status = {c["json"].get("status") for c in lst}
    if len(bodies_status) > 1:
        violations["1_conflicting_callbacks"].append(
            {"requestId": rid, "callbacks": [(c["n"], c["t"], c["body"]) for c in lst]})
    elif len(sts) > 1:
        violations["1_conflicting_errorCode"].append(
            {"requestId": rid, "callbacks": [(c["n"], c["t"], c["body"]) for c in lst]})
    for c in lst:
        if c["json"].get("status") not in FINAL:
            violations["1_non_final_callback_status"].append(c["body"])

# 1: every 2xx requestId has a final callback
for rid, r in answered.items():
    if rid not in by_rid:
        violations["1_accepted_without_callback"].append({"requestId": rid, "vin": r["vin"], "kind": r["kind"],
                                                          "serviceId": r["serviceId"], "t1": r["t1"]})
# campaign requests that were accepted: checked below with their GET
# 2: callbacks for ids never answered
never = []
for rid in by_rid:
    if rid in answered or rid in camp_req:
        continue
    never.append(rid)

# ---------- request records ----------
all_ids = set(answered) | set(err500_ids) | set(by_rid) | set(camp_req)


def fetch_req(rid):
    return rid, get(f"/ota/requests/{rid}")


reqs = {}
with ThreadPoolExecutor(6) as ex:
    for rid, (st, js) in ex.map(fetch_req, sorted(all_ids)):
        reqs[rid] = (st, js)

explained_unknown, explained_500, unexplained = [], [], []
unk_index = collections.defaultdict(list)
for r in unknown:
    unk_index[(r["vin"], r["kind"].upper(), r["serviceId"])].append(r)
for rid in never:
    st, js = reqs.get(rid, (None, None))
    if rid in err500_ids:
        explained_500.append(rid)
        continue
    if st == 200:
        key = (js["vin"], js["action"], js["serviceId"])
        if unk_index.get(key):
            explained_unknown.append(rid)
            continue
        if js.get("campaignId") and any(c["status"] is None or c["status"] >= 500 for c in camps):
            explained_unknown.append(rid)
            continue
    unexplained.append({"requestId": rid, "get": js, "callbacks": [c["body"] for c in by_rid[rid]]})
report["callbacks_for_unanswered"] = {"for_unknown_outcome_posts": len(explained_unknown),
                                      "for_500_with_id": len(explained_500),
                                      "unexplained": len(unexplained)}
for u in unexplained:
    violations["2_callback_for_unseen_request"].append(u)

# 500s with id: the request may or may not have been taken
e500 = {"taken": 0, "not_found": 0}
for rid in err500_ids:
    st, js = reqs[rid]
    if st == 200:
        e500["taken"] += 1
        if rid not in by_rid:
            violations["1_500_taken_but_no_callback"].append({"requestId": rid, "get": js})
    else:
        e500["not_found"] += 1
report["err500_with_id"] = e500

# 3: GET agrees with the callbacks
status_of = {"ACTIVATED": "COMPLETED", "DEACTIVATED": "COMPLETED", "FAILED": "FAILED"}
for rid, lst in by_rid.items():
    st, js = reqs.get(rid, (None, None))
    if st != 200:
        violations["3_callback_but_request_unknown"].append({"requestId": rid, "get": [st, js]})
        continue
    cb = lst[-1]["json"]
    want = status_of.get(cb.get("status"))
    if js["status"] != want or js["phase"] != "DONE":
        violations["3_get_disagrees_with_callback"].append({"requestId": rid, "get": js, "callback": cb})
        continue
    if cb["status"] != "FAILED":
        exp = "ACTIVATED" if js["action"] == "ACTIVATE" else "DEACTIVATED"
        if cb["status"] != exp:
            violations["3_callback_status_wrong_for_action"].append({"requestId": rid, "get": js, "callback": cb})
    if (cb.get("errorCode") or None) != (js.get("errorCode") or None):
        violations["3_errorCode_differs"].append({"requestId": rid, "get": js, "callback": cb})
    if cb.get("vin") != js["vin"]:
        violations["3_vin_differs"].append({"requestId": rid, "get": js, "callback": cb})
# every known request is final
nonfinal = []
for rid, (st, js) in reqs.items():
    if st == 200 and js["phase"] != "DONE":
        nonfinal.append(js)
for js in nonfinal:
    violations["6_request_not_final_after_settle"].append(js)
# accepted campaign requests: each has a callback
camp_missing = []
for rid, (cid, vin, action, svc) in camp_req.items():
    st, js = reqs[rid]
    if st != 200:
        continue  # refused by the campaign (409/429) or never accepted
    if rid not in by_rid:
        violations["1_campaign_request_without_callback"].append({"requestId": rid, "get": js})

# ---------- 5: campaigns ----------
camp_results = []
for c in camps:
    if not (c["status"] and 200 <= c["status"] < 300):
        continue
    cid = c["resp"]["campaignId"]
    st, js = get(f"/campaigns/{cid}")
    mine = {"COMPLETED": 0, "FAILED": 0, "IN_PROGRESS": 0, "QUEUED": 0}
    nreq = 0
    for i, vin in enumerate(c["body"]["vins"]):
        rid = campaign_request_id(cid, i)
        rst, rjs = reqs[rid]
        if rst != 200:
            continue
        nreq += 1
        lst = by_rid.get(rid)
        if lst:
            mine["FAILED" if lst[-1]["json"]["status"] == "FAILED" else "COMPLETED"] += 1
        else:
            mine["IN_PROGRESS"] += 1
    counts = js.get("counts") if isinstance(js, dict) else None
    ok = counts is not None and all(int(counts.get(k, 0)) == v for k, v in mine.items())
    accepted = c["resp"]["accepted"]
    camp_results.append({"campaignId": cid, "counts": counts, "fromCallbacks": mine, "accepted": accepted,
                         "requestsFound": nreq})
    if not ok:
        violations["5_campaign_counts_disagree"].append(camp_results[-1])
    if accepted != nreq:
        violations["5_campaign_accepted_vs_requests"].append(camp_results[-1])
report["campaigns_checked"] = len(camp_results)

# ---------- 10: campaigns that stop themselves ----------
# A campaign's abortWhen is kept as given (kills and all). One that stopped itself says why,
# with counts that hold its rule. One that did not stop, and was not cancelled by hand, does
# not end with counts that hold it (noted only: a kill after its last request ended and
# before the trip was acted on leaves nothing in flight to re-check at the next start).
# A refusal is a FAILED request whose code the car's signed report gave.
NOT_REFUSALS = {"NO_CONFIRMATION", "CANCELLED", "DECOMMISSIONED", "UNKNOWN_KEY", None}
aborts = {"rules": 0, "aborted": 0}
for c in camps:
    rule = c["body"].get("abortWhen")
    if not rule or not (c["status"] and 200 <= c["status"] < 300):
        continue
    aborts["rules"] += 1
    cid = c["resp"]["campaignId"]
    st, js = get(f"/campaigns/{cid}")
    want = {"refusedPercent": rule["refusedPercent"], "minFinished": rule.get("minFinished", 20)}
    if st != 200 or js.get("abortWhen") != want:
        violations["10_abort_rule_lost"].append({"campaignId": cid, "want": want, "get": [st, js]})
        continue
    finished = refused = 0
    for i, _ in enumerate(c["body"]["vins"]):
        rst, rjs = reqs[campaign_request_id(cid, i)]
        if rst != 200 or rjs.get("status") not in ("COMPLETED", "FAILED"):
            continue
        finished += 1
        if rjs["status"] == "FAILED" and rjs.get("errorCode") not in NOT_REFUSALS:
            refused += 1
    holds = lambda f, r: f >= want["minFinished"] and r * 100 >= want["refusedPercent"] * f
    if js.get("abortedAt"):
        aborts["aborted"] += 1
        m = re.match(r"(\d+) of (\d+) finished", js.get("abortReason") or "")
        if not m or not holds(int(m.group(2)), int(m.group(1))):
            violations["10_abort_reason_breaks_rule"].append(
                {"campaignId": cid, "abortWhen": want, "abortReason": js.get("abortReason")})
        if js.get("cancelledAt") is None:
            violations["10_aborted_but_not_cancelled"].append({"campaignId": cid, "get": js})
    elif js.get("cancelledAt") is None and holds(finished, refused):
        violations["note_abort_rule_holds_but_not_aborted"].append(
            {"campaignId": cid, "finished": finished, "refused": refused, "abortWhen": want})
report["aborts"] = aborts

# ---------- 8: cancels ----------
# A cancel answered 200 is durable: that request ended FAILED with CANCELLED, or that
# campaign stays cancelled (kills and all). A 409 says the request ended otherwise first:
# it must not end CANCELLED unless another cancel of it may have done that. Anything but
# 200, 409, a 5xx from a gateway going down, or no answer at all is wrong.
cancels = [r for r in driver if r.get("type") == "cancel"]
by_answer = collections.Counter(str(r["status"]) for r in cancels)
report["cancels"] = {"sent": len(cancels), "by_status": dict(by_answer)}
maybe_cancelled = {r["id"] for r in cancels if r["status"] != 409}
for r in cancels:
    st = r["status"]
    if st is not None and st not in (200, 409) and st < 500:
        violations["8_cancel_unexpected_answer"].append(r)
        continue
    if r["target"] == "request" and st in (200, 409):
        gst, gjs = reqs.get(r["id"]) or get(f"/ota/requests/{r['id']}")
        code = gjs.get("errorCode") if isinstance(gjs, dict) else None
        if gst != 200:
            violations["8_cancelled_request_unknown"].append({"cancel": r, "get": [gst, gjs]})
        elif st == 200 and (gjs["status"], code) != ("FAILED", "CANCELLED"):
            violations["8_cancel_200_but_not_cancelled"].append({"cancel": r, "get": gjs})
        elif st == 409 and code == "CANCELLED" and r["id"] not in maybe_cancelled:
            violations["8_cancel_409_but_cancelled"].append({"cancel": r, "get": gjs})
    elif r["target"] == "campaign" and st == 200:
        gst, gjs = get(f"/campaigns/{r['id']}")
        if gst != 200 or gjs.get("cancelledAt") != r["resp"].get("cancelledAt"):
            violations["8_campaign_cancel_lost"].append({"cancel": r, "get": [gst, gjs]})

# ---------- 4: vehicle status vs outcomes ----------
vins = []
for f in sorted(glob.glob(os.path.join(run, "vins-*.txt"))):
    vins += [l.strip() for l in open(f) if l.strip()]
faults = {}
for f in sorted(glob.glob(os.path.join(run, "faults-*.txt"))):
    for l in open(f):
        p = l.split()
        if len(p) >= 2:
            faults[p[0]] = p[1]

# every request the gateway knows per car, from our ids and the car's history
per_car = collections.defaultdict(dict)
for rid, (st, js) in reqs.items():
    if st == 200:
        per_car[js["vin"]][rid] = js


history_status = {}  # vin -> the HTTP status of its history's first page


def fetch_car(vin):
    st, status = get(f"/vehicles/{vin}/status")
    hist, before, first = [], None, None
    for _ in range(20):
        q = f"/vehicles/{vin}/history?limit=500" + (f"&before={before}" if before else "")
        hs, h = get(q)
        first = first or hs
        if hs != 200:
            break
        hist += h["entries"]
        before = h.get("nextBefore")
        if not before:
            break
    return vin, st, status, hist, first


cars = {}
with ThreadPoolExecutor(6) as ex:
    for vin, st, status, hist, hs in ex.map(fetch_car, vins):
        cars[vin] = (st, status, hist)
        history_status[vin] = hs

# requests seen only in history (accepted, never answered, never called back)
extra = []
for vin, (st, status, hist) in cars.items():
    for e in hist:
        rid = e.get("requestId")
        if e["type"] == "REQUEST" and rid and rid not in per_car[vin]:
            gs, gj = get(f"/ota/requests/{rid}")
            if gs == 200:
                per_car[vin][rid] = gj
                reqs[rid] = (gs, gj)
                extra.append(gj)
                if gj["phase"] == "DONE" and rid not in by_rid:
                    violations["1_history_request_without_callback"].append(gj)
report["requests_only_in_history"] = len(extra)


def parse_iso(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


# ---------- 11: decommissionings and registrations again ----------
# The driver's DELETE /vehicles/{vin} and POST /vehicles, per car in its order, and what the
# cars' histories say (DECOMMISSIONED with the withdrawal's seq, REGISTERED with it and the
# decommissioning's time). A DELETE answered 200 is durable: the car is out until a
# registration answered 2xx, no request of it is taken meanwhile, and the registration after
# it makes a new car (201). One answered with a connection error or a 5xx has an unknown
# outcome, as a POST's: the history tells whether it happened.
DECOM = "DECOMMISSIONED"
vehicle_ops = collections.defaultdict(list)
for r in driver:
    if r.get("type") in ("decommission", "register"):
        vehicle_ops[r["vin"]].append(r)
for lst in vehicle_ops.values():
    lst.sort(key=lambda r: r["n"])


def is_2xx(r):
    return r["status"] is not None and 200 <= r["status"] < 300


def not_sent(r):
    """A connection refused: nothing reached the gateway, so nothing was done."""
    return r["status"] is None and (r.get("err") or "").startswith("ConnectionRefusedError")


def outcome_unknown(r):
    return not not_sent(r) and (r["status"] is None or r["status"] >= 500)


def end_state(vin):
    """'registered', 'retired' or 'unknown' after the driver's last DELETE or POST /vehicles."""
    state = "registered"
    for r in vehicle_ops.get(vin, []):
        if r["type"] == "decommission":
            if r["status"] == 200:
                state = "retired"
            elif outcome_unknown(r) and state != "retired":
                state = "unknown"
        elif is_2xx(r):
            state = "registered"
        elif outcome_unknown(r) and state != "registered":
            state = "unknown"
    return state


withdrawals = {}    # vin -> {withdrawal seq: (decommissioning time, exact?)}
registered_again = collections.defaultdict(dict)  # vin -> {withdrawal seq: REGISTERED's time}
uncertain = set()   # cars with a decommissioning whose withdrawal seq is not known here
reg_seq_bad = []
for vin in vins:
    st, status, hist = cars[vin]
    ws = {}
    ordered = sorted(hist, key=lambda e: int(e["id"]))
    last_decom_seq = None
    for e in ordered:
        if e["type"] == "DECOMMISSIONED" and e.get("seq") is not None:
            ws.setdefault(e["seq"], (parse_iso(e["timestamp"]), False))
            last_decom_seq = e["seq"]
        elif e["type"] == "REGISTERED" and e.get("seq") is not None:
            m = re.search(r"decommissioning at (\S+Z):", e.get("detail") or "")
            if m:
                ws[e["seq"]] = (parse_iso(m.group(1)), True)
            else:
                ws.setdefault(e["seq"], (parse_iso(e["timestamp"]), False))
            registered_again[vin][e["seq"]] = parse_iso(e["timestamp"])
            if last_decom_seq is not None and e["seq"] != last_decom_seq:
                reg_seq_bad.append({"vin": vin, "registered": e, "decommissionedSeq": last_decom_seq})
    for r in vehicle_ops.get(vin, []):
        if r["type"] == "decommission" and r["status"] == 200 and isinstance(r["resp"], dict) \
                and isinstance(r["resp"].get("withdrawalSeq"), int) and r["resp"].get("decommissionedAt"):
            ws[r["resp"]["withdrawalSeq"]] = (parse_iso(r["resp"]["decommissionedAt"]), True)
    withdrawals[vin] = ws
    # A DELETE with an unknown outcome that no known withdrawal matches (by time), and that
    # the next registration does not show as not taken (a first answer 200: still registered).
    lst = vehicle_ops.get(vin, [])
    for i, r in enumerate(lst):
        if r["type"] != "decommission" or not outcome_unknown(r):
            continue
        if any(r["t0"] - 2 <= at <= r["t1"] + 2 for at, _ in ws.values()):
            continue
        nxt = next((q for q in lst[i + 1:] if not not_sent(q)), None)
        if nxt is not None and nxt["type"] == "register" and nxt["status"] == 200:
            continue
        if nxt is None and cars[vin][0] == 200:
            continue  # no registration after it, and the car is registered: not taken
        uncertain.add(vin)
for x in reg_seq_bad:
    violations["11_registered_seq_not_the_withdrawal"].append(x)


def withdrawal_above(vin, seq):
    """The first known withdrawal above `seq` of `vin`: (seq, time, exact?) or None."""
    above = [w for w in withdrawals.get(vin, {}) if w > seq]
    if not above:
        return None
    w = min(above)
    return (w,) + withdrawals[vin][w]


ISO_EXACT = lambda a, b: abs(a - b) < 0.0015
decom_report = {"sent": 0, "answered_200": 0, "unknown_outcome": 0, "refused_connection": 0,
                "scrap": 0, "registration_attempts": 0, "registered_201": 0, "registered_200": 0,
                "registration_unknown_outcome": 0, "registration_refused_connection": 0, "requests_failed_decommissioned": 0,
                "requests_answered_404": 0, "cars_retired_at_end": 0,
                "cars_uncertain": len(uncertain)}
for vin, lst in vehicle_ops.items():
    st_end, status_end, _ = cars.get(vin, (None, None, None))
    for i, r in enumerate(lst):
        if r["type"] == "register":
            decom_report["registration_attempts"] += 1
            if not_sent(r):
                decom_report["registration_refused_connection"] += 1
            elif r["status"] == 201:
                decom_report["registered_201"] += 1
            elif r["status"] == 200:
                decom_report["registered_200"] += 1
            elif outcome_unknown(r):
                decom_report["registration_unknown_outcome"] += 1
            else:
                violations["11_register_unexpected_answer"].append(r)
            continue
        decom_report["sent"] += 1
        decom_report["scrap"] += bool(r.get("scrap"))
        if not_sent(r):
            decom_report["refused_connection"] += 1
            continue
        if outcome_unknown(r):
            decom_report["unknown_outcome"] += 1
            continue
        if r["status"] != 200:
            violations["11_delete_unexpected_answer"].append(r)
            continue
        decom_report["answered_200"] += 1
        resp = r["resp"] if isinstance(r["resp"], dict) else {}
        w = resp.get("withdrawalSeq")
        if resp.get("vin") != vin or not isinstance(w, int) or not resp.get("decommissionedAt") \
                or not isinstance(resp.get("requestsFailed"), int):
            violations["11_delete_answer_malformed"].append(r)
            continue
        # Durable: the history has it, when it reaches back that far.
        hist = cars[vin][2]
        oldest = min((parse_iso(e["timestamp"]) for e in hist), default=None)
        if history_status.get(vin) == 200 and oldest is not None and oldest < r["t0"] and \
                not any(e["type"] == "DECOMMISSIONED" and e.get("seq") == w for e in hist):
            violations["11_decommissioning_not_in_history"].append({"delete": r, "oldestEntry": oldest})
        # The registration after it (its first attempt opens the window in which the car is
        # surely out) makes the car anew: 201, unless an attempt before had an unknown outcome.
        regs_after = []
        for q in lst[i + 1:]:
            if q["type"] != "register":
                break
            if not not_sent(q):
                regs_after.append(q)
        window_end = regs_after[0]["t0"] if regs_after else float("inf")
        for q in regs_after:
            if outcome_unknown(q):
                break
            if q["status"] == 200:
                violations["11_registered_again_but_was_not_decommissioned"].append(
                    {"delete": r, "register": q})
            break
        # No request of it taken while it was surely out; the withdrawal's seq is above every
        # request taken before the DELETE and below every one taken after it.
        for rid, a in answered.items():
            if a["vin"] != vin:
                continue
            rs_, rj = reqs.get(rid, (None, None))
            seq = rj.get("seq") if rs_ == 200 and isinstance(rj, dict) else None
            if a["t0"] > r["t1"] and a["t1"] < window_end:
                violations["11_accepted_while_decommissioned"].append(
                    {"delete": r, "request": a["resp"], "kind": a["kind"], "t0": a["t0"], "t1": a["t1"]})
            if seq is None:
                continue
            if a["t1"] < r["t0"] and seq >= w:
                violations["11_withdrawal_seq_not_above_earlier_requests"].append(
                    {"delete": r, "requestId": rid, "seq": seq})
            if a["t0"] > r["t1"] and seq <= w:
                violations["11_request_after_decommissioning_not_above_withdrawal"].append(
                    {"delete": r, "requestId": rid, "seq": seq})
        for c in camps:
            if not (is_2xx(c) and c["t0"] > r["t1"] and c["t1"] < window_end) or vin not in c["body"]["vins"]:
                continue
            rid = campaign_request_id(c["resp"]["campaignId"], c["body"]["vins"].index(vin))
            if reqs.get(rid, (None,))[0] == 200:
                violations["11_accepted_while_decommissioned"].append(
                    {"delete": r, "campaignId": c["resp"]["campaignId"], "requestId": rid})
        # requestsFailed: the car's requests this decommissioning failed (seq between the
        # withdrawal before and this one), when every withdrawal of the car is known.
        if vin not in uncertain:
            prev = max((x for x in withdrawals[vin] if x < w), default=0)
            n = sum(1 for j in per_car[vin].values()
                    if prev < j["seq"] < w and j.get("errorCode") == DECOM)
            if n != resp["requestsFailed"]:
                violations["11_requests_failed_count_differs"].append(
                    {"delete": r, "requestsFailed": resp["requestsFailed"], "found": n})
    # The history stays readable.
    if history_status.get(vin) != 200:
        violations["11_history_unreadable"].append({"vin": vin, "status": history_status.get(vin)})
    # The end: out (404 naming the decommissioning) or registered, as the driver left it.
    want = end_state(vin)
    gone = st_end == 404 and isinstance(status_end, dict) and status_end.get("error") == "vehicle decommissioned"
    if want == "retired":
        decom_report["cars_retired_at_end"] += 1
        if not gone:
            violations["11_decommissioned_car_not_out"].append(
                {"vin": vin, "status": [st_end, status_end], "ops": lst})
    elif want == "registered" and st_end != 200:
        violations["11_registered_car_not_back"].append({"vin": vin, "status": [st_end, status_end], "ops": lst})
    elif want == "unknown" and gone:
        decom_report["cars_retired_at_end"] += 1
decom_report["requests_answered_404"] = sum(
    1 for r in driver if r.get("type") == "request" and r["status"] == 404)

# Every request of a car below a withdrawal: final before it (COMPLETED no later than the
# decommissioning), or FAILED; FAILED DECOMMISSIONED only by a decommissioning, at its time.
for vin in vins:
    for rid, j in per_car[vin].items():
        above = withdrawal_above(vin, j["seq"])
        code = j.get("errorCode")
        if code == DECOM:
            decom_report["requests_failed_decommissioned"] += 1
        # A request stamped (createdAt, when the API took it in, or its campaign was) after a
        # registration again reached the car's shard after it: its seq is above the
        # withdrawal. (Stamped while the car was out says nothing: it may have reached the
        # shard after the registration; the driver's answers check that window, above.)
        created = parse_iso(j["createdAt"])
        for w in withdrawals.get(vin, {}):
            back = registered_again[vin].get(w)
            if back is not None and created > back + 0.05 and j["seq"] <= w:
                violations["11_request_after_registration_not_above_withdrawal"].append(
                    {"request": j, "withdrawalSeq": w, "registeredAgain": back})
        if above is None:
            if code == DECOM and vin not in uncertain:
                violations["11_decommissioned_code_without_decommissioning"].append(j)
            continue
        w, at, exact = above
        done = parse_iso(j["completedAt"]) if j.get("completedAt") else None
        if j["status"] == "COMPLETED" and done is not None and done > at + 0.0015:
            violations["11_completed_after_its_decommissioning"].append(
                {"request": j, "withdrawalSeq": w, "decommissionedAt": at})
        if code == DECOM and vin not in uncertain and done is not None and \
                not (ISO_EXACT(done, at) if exact else abs(done - at) < 1):
            violations["11_decommissioned_code_at_another_time"].append(
                {"request": j, "withdrawalSeq": w, "decommissionedAt": at})
report["decommissionings"] = decom_report


# the grant end of each activation (from the driver's bodies / campaigns)
ends = {}
for rid, r in answered.items():
    if r["kind"] == "activate":
        d = r["body"]["duration"]
        ends[rid] = parse_iso(d["expiryDate"]) if d.get("expiryDate") else None
now = time.time()
mism, pending_left, status_err = [], [], []
decided = undecided = 0
for vin in vins:
    st, status, hist = cars[vin]
    if st != 200:
        # A car out of the fleet at the end answers 404: 11 holds it to the driver's records.
        if not (st == 404 and end_state(vin) != "registered"):
            status_err.append((vin, st, status))
        continue
    shown = {s["serviceId"]: s["status"] for s in status["activeServices"]}
    for s, v in shown.items():
        if v == "PENDING":
            pending_left.append({"vin": vin, "service": s, "faults": faults.get(vin)})
    # A decommissioning's withdrawal ended every grant issued before it (its seq is above
    # theirs), and a car registered again starts with none: only the requests above its
    # last withdrawal count. A car with a decommissioning whose seq is unknown is skipped.
    if vin in uncertain:
        undecided += len({j["serviceId"] for j in per_car[vin].values()} | set(shown))
        continue
    last_w = max(withdrawals.get(vin, {}), default=0)
    rs = sorted((j for j in per_car[vin].values() if j["seq"] > last_w), key=lambda j: j["seq"])
    services = {j["serviceId"] for j in rs} | set(shown)
    for svc in services:
        seqd = [j for j in rs if j["serviceId"] == svc]
        # A FAILED change leaves the service as it was before it (its own grant withdrawn, the
        # one it replaced or removed put back), so the last COMPLETED change decides.
        expected = False
        for j in seqd:
            if j["status"] != "COMPLETED":
                continue
            if j["action"] == "DEACTIVATE":
                expected = False
                continue
            rid = j["requestId"]
            if rid in ends:
                end = ends[rid]
            elif rid in camp_req:
                end = None  # campaigns here are PERMANENT
            else:
                end = "unknown"  # its POST's answer was lost: its duration is unknown here
            if end == "unknown":
                expected = None
            elif end is None or end > now + 5:
                expected = True
            elif end < now - 5:
                expected = False
            else:
                expected = None  # expiring right now: either answer is right
        if expected is None:
            undecided += 1
            continue
        decided += 1
        got = shown.get(svc) == "ACTIVE"
        if got != expected:
            mism.append({"vin": vin, "service": svc, "shown": shown.get(svc), "expected":
                         "ACTIVE" if expected else None, "faults": faults.get(vin),
                         "requests": [(j["seq"], j["action"], j["status"], j.get("errorCode"),
                                       j["requestId"]) for j in seqd]})
report["services_checked"] = {"cars": sum(1 for v in vins if cars[v][0] == 200) - (
                                  len(uncertain & {v for v in vins if cars[v][0] == 200})),
                              "services": decided,
                              "undecided": undecided}
conn = collections.Counter()
for vin in vins:
    st, status, hist = cars[vin]
    if st == 200:
        conn[status["connectivity"]] += 1
        if status["connectivity"] != "ONLINE":
            # A car with faults may rightly be LIMITED ('silent': drops every command) or
            # OFFLINE (in a reconnect storm) at the end; a car without faults may not.
            key = "7_fault_free_car_not_online" if faults.get(vin, "-") == "-" else \
                "note_faulty_car_not_online"
            violations[key].append(
                {"vin": vin, "connectivity": status["connectivity"], "lastSeen": status["lastSeen"],
                 "faults": faults.get(vin)})
report["connectivity_end"] = dict(conn)

# ---------- 9: the fleet listing ----------
# GET /vehicles, page after page, holds every registered car once, in VIN order, each with
# the connectivity and services its own status shows (a car whose status moved between the
# two reads is read again before it counts).
listed, after = [], None
for _ in range(1000):
    q = "/vehicles?limit=97" + (f"&after={after}" if after else "")
    ls, page = get(q)
    if ls != 200:
        violations["9_vehicle_listing_failed"].append({"get": q, "status": ls, "body": page})
        break
    listed += page["vehicles"]
    after = page.get("nextAfter")
    if not after:
        break
listed_vins = [v["vin"] for v in listed]
# The fleet at the end: the cars out of it (decommissioned and not registered again, by the
# driver's records, or with an unknown outcome and their status saying so) are not listed.
registered_at_end = sorted(v for v in set(vins) if not (
    end_state(v) == "retired" or (end_state(v) == "unknown" and cars[v][0] == 404)))
if listed_vins != registered_at_end:
    violations["9_vehicle_listing_not_the_fleet"].append(
        {"listed": len(listed_vins), "distinct": len(set(listed_vins)), "fleet": len(registered_at_end),
         "in_order": listed_vins == sorted(listed_vins),
         "missing": sorted(set(registered_at_end) - set(listed_vins))[:20],
         "not_in_fleet": sorted(set(listed_vins) - set(registered_at_end))[:20]})


def shown_of(status):
    return (status["connectivity"],
            sorted((s["serviceId"], s["status"]) for s in status["activeServices"]))


def listing_entry(i):
    """Listed car i read again: the one-car page after its predecessor in the listing."""
    q = "/vehicles?limit=1" + (f"&after={listed[i - 1]['vin']}" if i > 0 else "")
    ls, page = get(q)
    return page["vehicles"][0] if ls == 200 and page.get("vehicles") else None


for i, item in enumerate(listed):
    st, status, _ = cars.get(item["vin"], (None, None, None))
    if st != 200 or shown_of(item) == shown_of(status):
        continue
    # The listing and the status are two reads: a car that moved between them (a storm car
    # flapping online and offline) is read again, both ways, a few times before it counts.
    for _ in range(3):
        again = listing_entry(i)
        st, status = get(f"/vehicles/{item['vin']}/status")
        if again is None or st != 200:
            continue
        item = again
        if shown_of(item) == shown_of(status):
            break
    if st == 200 and shown_of(item) != shown_of(status):
        listed_conn, listed_services = shown_of(item)
        status_conn, status_services = shown_of(status)
        # Only the connectivity differs, of a car whose faults make it flap: noted, as 7 does.
        key = "note_faulty_car_listing_connectivity" if (
            listed_services == status_services and faults.get(item["vin"], "-") != "-") \
            else "9_vehicle_listing_vs_status"
        violations[key].append(
            {"vin": item["vin"], "listed": shown_of(item), "status": shown_of(status),
             "faults": faults.get(item["vin"])})
report["vehicles_listed"] = len(listed)
for m in mism:
    violations["4_status_vs_outcomes"].append(m)
for p in pending_left:
    violations["4_pending_left_after_settle"].append(p)
for s in status_err:
    violations["4_status_error"].append(s)

# ---------- 6: restarts, in flight, quiet ----------
starts = [e for e in events if e["ev"] == "gateway-up"]
fails = [e for e in events if e["ev"] in ("gateway-start-failed", "gateway-start-timeout",
                                           "gateway-term-timeout", "gateway-restart-failed")]
terms = [e for e in events if e["ev"] == "gateway-terminated"]
kills = [e for e in events if e["ev"] == "gateway-killed"]
for e in fails:
    violations["6_restart_failed"].append(e)
for e in terms:
    if e["rc"] != 0:
        violations["6_sigterm_nonzero_exit"].append(e)
m1 = metrics()
n_cb1 = sum(1 for _ in open(os.path.join(run, "callbacks.jsonl")))
time.sleep(20)
m2 = metrics()
n_cb2 = sum(1 for _ in open(os.path.join(run, "callbacks.jsonl")))
keys = ["caas_requests_in_flight", "caas_attempts_total", "caas_webhook_deliveries_total",
        "caas_webhook_failures_total", "caas_status_probes_total", "caas_commands_published_total",
        "caas_support_tickets_total", "caas_connected_cars", "caas_cars_registered",
        "caas_reports_forged_total", "caas_reports_refused_total", "caas_webhook_receiver_down"]
report["metrics_end"] = {k: m2.get(k) for k in keys}
if m2.get("caas_requests_in_flight", 0) != 0:
    violations["6_in_flight_not_zero"].append(m2.get("caas_requests_in_flight"))
for k in ["caas_attempts_total", "caas_webhook_deliveries_total", "caas_webhook_failures_total",
          "caas_status_probes_total"]:
    if m2.get(k) != m1.get(k):
        violations["6_still_active"].append({k: [m1.get(k), m2.get(k)]})
if n_cb2 != n_cb1:
    violations["6_callbacks_still_arriving"].append([n_cb1, n_cb2])
report["restarts"] = {"starts": len(starts), "kills": len(kills), "terms": len(terms),
                      "start_secs_max": max((e["secs"] for e in starts), default=None),
                      "term_secs_max": max((e["secs"] for e in terms), default=None)}
# --broker mosquitto: the broker's kills (-9) and starts, and its failed starts
broker_kills = [e for e in events if e["ev"] == "broker-killed"]
broker_starts = [e for e in events if e["ev"] == "broker-up"]
if broker_starts:
    report["restarts"]["broker_kills"] = len(broker_kills)
    report["restarts"]["broker_starts"] = len(broker_starts)
for e in events:
    if e["ev"] in ("broker-start-failed", "broker-start-timeout", "broker-restart-failed"):
        violations["6_broker_restart_failed"].append(e)

# ---------- logs ----------
pat = re.compile(r"panick|panic|ERROR|WARN", re.I)
logsum = collections.Counter()
samples = {}
for f in sorted(glob.glob(os.path.join(run, "gw-*.log"))):
    for line in open(f, errors="replace"):
        if pat.search(line):
            key = re.sub(r"\x1b\[[0-9;]*m", "", line)
            key = re.sub(r"^\S+\s+", "", key).strip()
            key = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", key)
            key = re.sub(r"\b[A-HJ-NPR-Z0-9]{17}\b", "<vin>", key)
            key = re.sub(r"\d+(\.\d+)?", "N", key)[:200]
            logsum[key] += 1
            samples.setdefault(key, f"{os.path.basename(f)}: {line.strip()[:300]}")
        if "panic" in line.lower():
            violations["6_log_panic"].append(f"{os.path.basename(f)}: {line.strip()[:300]}")
report["log_lines"] = [{"count": n, "sample": samples[k]} for k, n in logsum.most_common(40)]

# Repeated callbacks are allowed (delivery is at least once), but after a 2xx answer a repeat
# should only follow a gateway stop that lost the record of that answer.
stops = sorted(e["t"] for e in events if e["ev"] in ("gateway-killed", "gateway-terminated"))
after_ok = with_stop = 0
for rid, lst in by_rid.items():
    lst = sorted(lst, key=lambda c: c["t"])
    ok = [c for c in lst if c["answer"] == 200]
    if not ok:
        continue
    for c in lst:
        if c["t"] <= ok[0]["t"]:
            continue
        after_ok += 1
        i = bisect.bisect_right(stops, ok[0]["t"] - 0.5)
        if i < len(stops) and stops[i] <= c["t"]:
            with_stop += 1
report["callbacks"]["repeats_after_a_2xx"] = {"total": after_ok, "gateway_stop_between": with_stop}
if after_ok - with_stop:
    violations["note_repeat_after_2xx_without_stop"].append(after_ok - with_stop)

report["violations"] = {k: len(v) for k, v in violations.items()}
json.dump({"report": report, "violations": violations}, open(os.path.join(run, "check.json"), "w"), indent=1,
          default=str)
print(json.dumps(report, indent=1, default=str))
for k, v in violations.items():
    print(f"\n== {k}: {len(v)}")
    for x in v[:8]:
        print("  ", json.dumps(x, default=str)[:1500])

failed = sorted(k for k in violations if not k.startswith("note_"))
d = report["driver"]
summary = (f"{d['requests']} requests ({d['accepted']} accepted, {d['unknown_outcome']} unknown outcome), "
           f"{d['campaigns_2xx']} campaigns, {report['callbacks']['total']} callbacks for "
           f"{report['callbacks']['distinct_requests']} requests, "
           f"{report['restarts']['kills']} kills + {report['restarts']['terms']} SIGTERMs"
           + (f", {len(broker_kills)} broker kills" if broker_starts else "")
           + f", {decom_report['sent']} decommissionings ({decom_report['answered_200']} answered 200), "
           f"{decom_report['registered_201'] + decom_report['registered_200']} registrations again answered 2xx")
if failed:
    print("\nVERDICT: FAIL: " + ", ".join(f"{k}={len(violations[k])}" for k in failed) + "; " + summary)
    sys.exit(1)
print("\nVERDICT: PASS: every invariant holds; " + summary)
