#!/usr/bin/env python3
"""Load driver for the soak: activations and deactivations at a modest rate on random cars
and services, plus a campaign now and then. Every answer, including a connection error (the
outcome of that POST is unknown), goes to RUNDIR/driver.jsonl for the checker.

Now and then it cancels a request it made a moment ago, or its newest campaign
(--cancel-share of the requests it sends, default 0.04). Some campaigns carry an abortWhen
rule, and some of those name a feature every car refuses, so they stop themselves.

usage: driver.py BASE_URL TOKEN RUNDIR --vins F [F..] [--rate 12] [--campaign-every 30]
Stops on SIGTERM/SIGINT after what is in flight, so no answer goes unrecorded.
"""
import argparse, datetime, http.client, json, os, random, signal, threading, time, queue
from urllib.parse import urlparse

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("token")
ap.add_argument("rundir")
ap.add_argument("--vins", nargs="+", required=True)
ap.add_argument("--rate", type=float, default=12.0)
ap.add_argument("--campaign-every", type=float, default=30.0)
ap.add_argument("--workers", type=int, default=12)
ap.add_argument("--campaign-max", type=int, default=40)
ap.add_argument("--seed", type=int, default=None)
ap.add_argument("--cancel-share", type=float, default=0.04)
args = ap.parse_args()

rnd = random.Random(args.seed)
u = urlparse(args.base)
HOST, PORT = u.hostname, u.port

vins = []
for f in args.vins:
    with open(f) as fh:
        vins += [l.strip() for l in fh if l.strip()]

# Services: (serviceId, flags). "warp" names an unknown feature: the car refuses it.
SERVICES = [
    ("power-boost", ["power_boost"]),
    ("heated-seats", ["heated_seats"]),
    ("snow-mode", ["snow_mode"]),
    ("sport-mode", ["sport_mode"]),
    ("autopilot", ["highway_autopilot", "lane_keeping"]),
    ("premium-audio", ["premium_audio"]),
]
BAD_SERVICE = ("warp-drive", ["warp_drive"])

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
signal.signal(signal.SIGINT, lambda *a: stop.set())

log_lock = threading.Lock()
log = open(os.path.join(args.rundir, "driver.jsonl"), "a", buffering=1)
counter = [0]


def record(rec):
    with log_lock:
        counter[0] += 1
        rec["n"] = counter[0]
        log.write(json.dumps(rec) + "\n")


def iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def call(method, path, body=None, timeout=20):
    """-> (status or None, parsed json or text or None, error text or None)"""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {args.token}"}
        if data is not None:
            headers["content-type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        try:
            js = json.loads(raw)
        except Exception:
            js = raw.decode("utf-8", "replace")
        return r.status, js, None
    except Exception as e:  # connection refused/reset/timeout: unknown outcome if sent
        return None, None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


# What the driver believes each car may have (only to aim deactivations; 409s are fine).
believed = {v: set() for v in vins}
# The newest accepted requests and campaigns (at most 50 and 5), for the cancels to aim at.
recent_lock = threading.Lock()
recent_requests, recent_campaigns = [], []


def remember(lst, item, bound):
    with recent_lock:
        lst.append(item)
        del lst[:-bound]


def one_request():
    vin = rnd.choice(vins)
    have = believed.get(vin, set())
    if have and rnd.random() < 0.45:
        svc = rnd.choice(sorted(have))
        body = {"vin": vin, "serviceId": svc}
        kind = "deactivate"
    else:
        if rnd.random() < 0.03:
            svc, flags = BAD_SERVICE
        else:
            svc, flags = rnd.choice(SERVICES)
        r = rnd.random()
        now = time.time()
        if r < 0.4:
            dur = {"type": "PERMANENT"}
        elif r < 0.7:
            dur = {"type": "SUBSCRIPTION", "autoRenewal": True}
        elif r < 0.9:
            dur = {"type": "TEMPORARY", "expiryDate": iso(now + 86400)}
        else:  # short: expires during the run
            dur = {"type": "TEMPORARY", "expiryDate": iso(now + rnd.uniform(60, 240))}
        params = {"level": rnd.randint(1, 5)} if rnd.random() < 0.5 else {}
        body = {"vin": vin, "serviceId": svc,
                "configuration": {"featureFlags": flags, "parameters": params},
                "duration": dur}
        kind = "activate"
    t0 = time.time()
    st, js, err = call("POST", f"/ota/{kind}", body)
    t1 = time.time()
    rec = {"type": "request", "kind": kind, "vin": vin, "serviceId": body["serviceId"],
           "body": body, "t0": t0, "t1": t1, "status": st, "resp": js, "err": err}
    record(rec)
    if st and 200 <= st < 300:
        if isinstance(js, dict) and js.get("requestId"):
            remember(recent_requests, js["requestId"], 50)
        if kind == "activate":
            have.add(body["serviceId"])
        else:
            have.discard(body["serviceId"])
    elif st == 409 and kind == "deactivate":
        have.discard(body["serviceId"])


# A campaign's abortWhen: it stops itself once half of at least 5 finished requests were
# refused by their cars. Campaigns of the unknown feature (which every car refuses) trip it;
# the others carry it without tripping it.
ABORT_WHEN = {"refusedPercent": 50, "minFinished": 5}


def one_campaign():
    n = rnd.randint(10, max(10, min(args.campaign_max, len(vins))))
    cvins = rnd.sample(vins, n)
    svc, flags = rnd.choice(SERVICES)
    r = rnd.random()
    if r < 0.15:
        svc, flags = BAD_SERVICE
    if r < 0.7:
        body = {"vins": cvins, "action": "ACTIVATE", "serviceId": svc,
                "configuration": {"featureFlags": flags, "parameters": {}},
                "duration": {"type": "PERMANENT"}}
    else:
        body = {"vins": cvins, "action": "DEACTIVATE", "serviceId": svc}
    if r < 0.15 or rnd.random() < 0.3:
        body["abortWhen"] = dict(ABORT_WHEN)
    t0 = time.time()
    st, js, err = call("POST", "/campaigns", body, timeout=30)
    t1 = time.time()
    record({"type": "campaign", "body": body, "t0": t0, "t1": t1, "status": st, "resp": js,
            "err": err})
    if st and 200 <= st < 300 and isinstance(js, dict) and js.get("campaignId"):
        remember(recent_campaigns, js["campaignId"], 5)


def one_cancel():
    """Cancels a recent request (mostly) or campaign; the checker holds the gateway to the
    answer: a 200 means that request ended CANCELLED (or, for a campaign, it stays marked
    cancelled), a 409 that it had ended otherwise before."""
    with recent_lock:
        target = "campaign" if recent_campaigns and rnd.random() < 0.15 else "request"
        pool = recent_campaigns if target == "campaign" else recent_requests
        if not pool:
            return
        ident = rnd.choice(pool)
    path = f"/campaigns/{ident}/cancel" if target == "campaign" else f"/ota/requests/{ident}/cancel"
    t0 = time.time()
    st, js, err = call("POST", path, {})
    record({"type": "cancel", "target": target, "id": ident, "t0": t0, "t1": time.time(),
            "status": st, "resp": js, "err": err})


jobs = queue.Queue(maxsize=64)


def worker():
    while True:
        j = jobs.get()
        if j is None:
            return
        try:
            j()
        except Exception as e:
            record({"type": "driver-error", "err": repr(e)})


threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
for t in threads:
    t.start()

next_campaign = time.time() + rnd.uniform(5, args.campaign_every)
interval = 1.0 / args.rate
t_next = time.time()
while not stop.is_set():
    now = time.time()
    if now < t_next:
        time.sleep(min(t_next - now, 0.2))
        continue
    t_next += rnd.expovariate(1.0 / interval)
    if t_next < now - 2:  # do not build a backlog while the gateway is down
        t_next = now
    try:
        if now >= next_campaign:
            next_campaign = now + rnd.uniform(0.5, 1.5) * args.campaign_every
            jobs.put(one_campaign, timeout=1)
        elif rnd.random() < args.cancel_share:
            jobs.put(one_cancel, timeout=1)
        else:
            jobs.put(one_request, timeout=1)
    except queue.Full:
        record({"type": "skipped", "t": now})
for _ in threads:
    jobs.put(None)
for t in threads:
    t.join(timeout=40)
record({"type": "driver-stopped", "t": time.time()})
