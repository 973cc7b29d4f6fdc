"""A small fresh setup for the reproductions: one gateway, the soak's webhook receiver (no
faults) and a small fleet, on their own ports and in their own directory."""
import argparse, json, os, signal, subprocess, sys, tempfile, time, urllib.error, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN, SECRET = "chaos-token", "chaos-secret"


def parse_args(doc):
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--bin", required=True, help="directory holding caas-gateway and caas-sim")
    ap.add_argument("--dir", default=None, help="run directory (default: a new temporary one)")
    # Not the soak's ports, so a reproduction can run beside a soak.
    ap.add_argument("--http", type=int, default=18280)
    ap.add_argument("--mqtt", type=int, default=19030)
    ap.add_argument("--hook", type=int, default=18290)
    return ap.parse_args()


class Rig:
    def __init__(self, args, fleet_args, cars=1):
        self.bin = os.path.abspath(args.bin)
        self.dir = os.path.abspath(args.dir) if args.dir else tempfile.mkdtemp(prefix="caas-repro-")
        os.makedirs(self.dir, exist_ok=True)
        self.http, self.mqtt, self.hook = args.http, args.mqtt, args.hook
        self.base = f"http://127.0.0.1:{self.http}"
        self.gw = self.fleet = None
        self.n = 0
        self.failures = []
        with open(os.path.join(self.dir, "receiver.mode"), "w") as f:
            f.write("ok")
        self.rx = subprocess.Popen([sys.executable, os.path.join(HERE, "receiver.py"), str(self.hook), SECRET,
                                    os.path.join(self.dir, "callbacks.jsonl")],
                                   stdout=open(os.path.join(self.dir, "receiver.log"), "w"),
                                   stderr=subprocess.STDOUT)
        time.sleep(0.4)
        try:
            self.start_gw()
            self.start_fleet(fleet_args, cars)
        except BaseException:
            self.close()
            raise

    def start_fleet(self, fleet_args, cars, provision=True):
        vins_file = os.path.join(self.dir, "vins.txt")
        # The same seed and prefix give the same cars, keys included, when a fleet comes back.
        cmd = [f"{self.bin}/caas-sim", "fleet", "--gateway", self.base, "--api-token", TOKEN,
               "--mqtt", f"127.0.0.1:{self.mqtt}", "--cars", str(cars), "--vin-prefix", "SMVRPR",
               "--seed", "5", "--no-progress", "--threads", "1"] + list(fleet_args)
        cmd += ["--vins-out", vins_file] if provision else ["--no-provision"]
        self.fleet = subprocess.Popen(cmd, stdout=open(os.path.join(self.dir, "fleet.log"), "a"),
                                      stderr=subprocess.STDOUT)
        if provision:
            for _ in range(100):
                time.sleep(0.2)
                if os.path.exists(vins_file) and open(vins_file).read().count("\n") >= cars:
                    break
            self.vins = [l.strip() for l in open(vins_file) if l.strip()]
        self.wait_until("the cars are connected", 20,
                        lambda: all(self.status(v).get("connectivity") == "ONLINE" for v in self.vins))

    def stop_fleet(self):
        self.fleet.send_signal(signal.SIGTERM)
        self.fleet.wait(timeout=20)

    def start_gw(self):
        self.n += 1
        cmd = [f"{self.bin}/caas-gateway", "serve", "--http", f"127.0.0.1:{self.http}",
               "--mqtt", f"127.0.0.1:{self.mqtt}", "--data", os.path.join(self.dir, "gwdata"),
               "--webhook-url", f"http://127.0.0.1:{self.hook}/hook", "--webhook-secret", SECRET,
               "--api-token", TOKEN, "--attempts", "3", "--attempt-timeout", "3s",
               "--backoff", "1s,2s", "--heap-reserve-mb", "0", "--store-cache-mb", "32"]
        self.gw = subprocess.Popen(cmd, stdout=open(os.path.join(self.dir, f"gw-{self.n}.log"), "w"),
                                   stderr=subprocess.STDOUT,
                                   env=dict(os.environ, RUST_LOG="info,rumqttd=warn,sled=warn"))
        for _ in range(200):
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=0.5)
                return
            except Exception:
                if self.gw.poll() is not None:
                    break
                time.sleep(0.05)
        raise SystemExit(f"the gateway did not start (see {self.dir}/gw-{self.n}.log)")

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def activate(self, vin, svc, flags, dur=None):
        st, js = self.call("POST", "/ota/activate", {
            "vin": vin, "serviceId": svc, "configuration": {"featureFlags": flags, "parameters": {}},
            "duration": dur or {"type": "PERMANENT"}})
        self.expect(f"POST /ota/activate {svc} answers 202", st == 202, js)
        return js.get("requestId")

    def deactivate(self, vin, svc):
        st, js = self.call("POST", "/ota/deactivate", {"vin": vin, "serviceId": svc})
        self.expect(f"POST /ota/deactivate {svc} answers 202", st == 202, js)
        return js.get("requestId")

    def status(self, vin):
        st, js = self.call("GET", f"/vehicles/{vin}/status")
        return js if st == 200 else {}

    def services(self, vin):
        return sorted((s["serviceId"], s["status"]) for s in self.status(vin).get("activeServices", []))

    def callback(self, rid, timeout=40):
        """The first callback for request `rid` (status, errorCode), or None after `timeout`."""
        p = os.path.join(self.dir, "callbacks.jsonl")
        end = time.time() + timeout
        while time.time() < end:
            if os.path.exists(p):
                for line in open(p):
                    js = json.loads(line).get("json") or {}
                    if js.get("requestId") == rid:
                        return js.get("status"), js.get("errorCode")
            time.sleep(0.2)
        return None

    def wait_until(self, what, timeout, cond):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return True
            time.sleep(0.2)
        raise SystemExit(f"timed out waiting until {what}")

    def expect(self, what, ok, got=None):
        print(("ok   " if ok else "FAIL ") + what + ("" if ok or got is None else f": got {got}"), flush=True)
        if not ok:
            self.failures.append(what)

    def history(self, vin, n=40):
        st, h = self.call("GET", f"/vehicles/{vin}/history?limit={n}")
        return [f"{e['timestamp'][11:23]} {e['type']:8} seq={e.get('seq')} {(e.get('requestId') or '')[-12:]} "
                f"{e['detail']}" for e in reversed(h.get("entries", []))]

    def finish(self, name):
        """Prints the verdict and the car's history when something failed; returns the exit status."""
        if self.failures:
            for line in self.history(self.vins[0]):
                print("  ", line)
            print(f"VERDICT: FAIL: {name}: {len(self.failures)} expectation(s) not met; run dir {self.dir}")
            return 1
        print(f"VERDICT: PASS: {name}; run dir {self.dir}")
        return 0

    def close(self):
        for p in (self.fleet, self.gw):
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.rx.send_signal(signal.SIGTERM)
        self.rx.wait()
