#!/usr/bin/env python3
"""Load driver for the soak: activations and deactivations at a modest rate on random cars
and services, plus a campaign now and then. Every answer, including a connection error (the
outcome of that POST is unknown), goes to RUNDIR/driver.jsonl for the checker.

Now and then it cancels a request it made a moment ago, or its newest campaign
(--cancel-share of the requests it sends, default 0.04). Some campaigns carry an abortWhen
rule, and some of those name a feature every car refuses, so they stop themselves.

About every --decommission-every seconds (default 30; 0: never) it takes a car out of the
fleet (DELETE /vehicles/{vin}) and, 2-10 s later, registers it again (POST /vehicles, the
same VIN and the same public key, as the listing showed them before the first one), asking
again after a connection error or a 5xx; --scrap-share of those cars (default 0.15) stay
out. Half of the cars it picks had a request accepted in the last 3 s, which may still be in
flight; the others are any car. The other requests go on aiming at every car, so a
decommissioned one is sent requests it refuses.

usage: driver.py BASE_URL TOKEN RUNDIR --vins F [F..] [--rate 12] [--campaign-every 30]
                 [--decommission-every 30] [--scrap-share 0.15]
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
ap.add_argument("--decommission-every", type=float, default=30.0)
ap.add_argument("--scrap-share", type=float, default=0.15)
args = ap.parse_args()

rnd = random.Random(args.seed)
# The decommissionings draw from their own generator, so a seed's requests and campaigns are
# drawn as they were without them.
drnd = random.Random(None if args.seed is None else args.seed + 7919)
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
# The cars of the newest accepted requests, with when: half the decommissionings take one of
# those answered in the last 3 s, which may still be in flight (a delayed or silent car).
recent_vins = []


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
        remember(recent_vins, (t1, vin), 50)
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


# ---------- decommissioning and registering again ----------
# Each car's registration (public key, platform, firmware) as the listing shows it before
# the first decommissioning; the same key registers the car again.
fleet_lock = threading.Lock()
registration_lock = threading.Lock()  # held while the listing is read, once
registration = {}
cycling = set()    # cars between their DELETE and their registration again
scrapped = set()   # cars decommissioned for good
decom_threads = []


def load_registrations():
    """GET /vehicles page by page, again until it answers whole (the gateway may be down)."""
    deadline = time.time() + 60
    while time.time() < deadline and not stop.is_set():
        got, after = {}, None
        while True:
            st, js, err = call("GET", "/vehicles?limit=500" + (f"&after={after}" if after else ""))
            if st != 200 or not isinstance(js, dict):
                break
            for v in js.get("vehicles", []):
                got[v["vin"]] = {"publicKey": v["publicKey"], "platform": v["platform"],
                                 "firmwareVersion": (v.get("diagnostics") or {}).get("firmwareVersion")}
            after = js.get("nextAfter")
            if not after:
                return got
        time.sleep(1)
    return None


def one_decommission(vin, scrap, pause):
    """DELETE /vehicles/{vin}; unless `scrap`, after `pause` s (at once once the driver is
    told to stop) POST /vehicles with the car's registration, asked again after a connection
    error or a 5xx. A DELETE answered so has an unknown outcome, as a POST has; the
    registration follows all the same (a 200 then says the car was still registered)."""
    try:
        with registration_lock:
            if not registration:
                registration.update(load_registrations() or {})
            reg = registration.get(vin)
        if reg is None:
            record({"type": "decommission-skipped", "vin": vin, "t": time.time(),
                    "why": "its registration is not known (the listing did not answer)"})
            return
        t0 = time.time()
        st, js, err = call("DELETE", f"/vehicles/{vin}")
        record({"type": "decommission", "vin": vin, "scrap": scrap, "t0": t0, "t1": time.time(),
                "status": st, "resp": js, "err": err})
        believed[vin] = set()  # a new set: a worker may be reading the old one
        if scrap:
            with fleet_lock:
                scrapped.add(vin)
            return
        stop.wait(pause)
        body = {"vin": vin, "publicKey": reg["publicKey"], "platform": reg["platform"]}
        if reg.get("firmwareVersion"):
            body["firmwareVersion"] = reg["firmwareVersion"]
        stopped_at = None
        for attempt in range(1, 61):
            t0 = time.time()
            st, js, err = call("POST", "/vehicles", body)
            record({"type": "register", "vin": vin, "attempt": attempt, "t0": t0, "t1": time.time(),
                    "status": st, "resp": js, "err": err})
            if st is not None and st < 500:
                return
            if stop.is_set():
                stopped_at = stopped_at or time.time()
                if time.time() - stopped_at > 20:  # the rig waits 60 s for the driver
                    return
            time.sleep(1)
    finally:
        with fleet_lock:
            cycling.discard(vin)


def start_decommission():
    with recent_lock:
        busy = sorted({v for t, v in recent_vins if t > time.time() - 3})
    with fleet_lock:
        free = [v for v in vins if v not in cycling and v not in scrapped]
        busy = [v for v in busy if v not in cycling and v not in scrapped]
        if not free:
            return
        vin = drnd.choice(busy if busy and drnd.random() < 0.5 else free)
        cycling.add(vin)
    scrap = drnd.random() < args.scrap_share
    t = threading.Thread(target=one_decommission, args=(vin, scrap, drnd.uniform(2, 10)), daemon=True)
    t.start()
    decom_threads.append(t)


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
next_decom = (time.time() + drnd.uniform(5, args.decommission_every)
              if args.decommission_every > 0 else float("inf"))
interval = 1.0 / args.rate
t_next = time.time()
while not stop.is_set():
    now = time.time()
    if now < t_next:
        time.sleep(min(t_next - now, 0.2))
        continue
    if now >= next_decom:
        next_decom = now + drnd.uniform(0.5, 1.5) * args.decommission_every
        start_decommission()
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
for t in decom_threads:
    t.join(timeout=45)
record({"type": "driver-stopped", "t": time.time()})
