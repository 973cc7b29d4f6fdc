#!/usr/bin/env python3
"""Webhook receiver for the soak: verifies each callback's HMAC and timestamp, records every
callback as one JSON line, and sometimes answers 500 or hangs so that the gateway's outbox
has to retry.

usage: receiver.py PORT SECRET OUTFILE [--fail 0.1] [--hang 0.05] [--hang-max 4]

receiver.mode, next to OUTFILE, switches the faults at run time without a restart (the rig
writes it): 'ok' turns them off so the settle phase can drain the outbox, 'down' answers
every callback 500 (a receiver outage), anything else is the normal fault mix.
"""
import argparse, hashlib, hmac, json, os, random, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("secret")
ap.add_argument("out")
ap.add_argument("--fail", type=float, default=0.10)
ap.add_argument("--hang", type=float, default=0.05)
ap.add_argument("--hang-max", type=float, default=4.0)
args = ap.parse_args()

lock = threading.Lock()
out = open(args.out, "a", buffering=1)
mode_file = os.path.join(os.path.dirname(os.path.abspath(args.out)), "receiver.mode")
seq = [0]


def receiver_mode():
    try:
        with open(mode_file) as f:
            return f.read().strip()
    except OSError:
        return "chaos"


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        t0 = time.time()
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        ts = self.headers.get("X-CaaS-Timestamp")
        sig = self.headers.get("X-CaaS-Signature")
        good = None
        if ts is not None and sig is not None:
            mac = hmac.new(args.secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            good = hmac.compare_digest(sig, "sha256=" + mac)
        ts_ok = None
        try:
            ts_ok = abs(int(ts) - time.time()) < 300
        except Exception:
            ts_ok = False
        try:
            js = json.loads(body)
        except Exception:
            js = None
        action = "ok"
        mode = receiver_mode()
        if mode == "down":
            action = "500"
        elif mode != "ok":
            r = random.random()
            if r < args.fail:
                action = "500"
            elif r < args.fail + args.hang:
                action = "hang"
        if action == "hang":
            time.sleep(random.uniform(0.5, args.hang_max))
        code = 500 if action == "500" else 200
        with lock:
            seq[0] += 1
            rec = {"n": seq[0], "t": t0, "path": self.path, "sigOk": good, "tsOk": ts_ok,
                   "ts": ts, "sig": sig, "body": body.decode("utf-8", "replace"), "json": js,
                   "answer": code, "action": action}
            out.write(json.dumps(rec) + "\n")
        resp = b'{"ok":true}' if code == 200 else b'{"error":"chaos"}'
        try:
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(resp)))
            self.end_headers()
            self.wfile.write(resp)
        except Exception:
            pass


class S(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


srv = S(("127.0.0.1", args.port), H)
print(f"receiver on {args.port}", flush=True)
srv.serve_forever()
