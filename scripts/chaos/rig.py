#!/usr/bin/env python3
"""Crash-and-fault soak: a gateway, two simulated fleets with faults, a webhook receiver that
fails and hangs, and a load driver; the gateway is killed (-9) or stopped (SIGTERM) at random
moments and restarted on the same store. After the chaos phase the driver stops, faults stop,
the gateway settles, and check.py verifies the invariants (see README.md).

usage: rig.py --bin DIR --rundir DIR [--chaos 600] [--settle 150] [--seed N] ...
With --broker mosquitto the gateway and the cars use a Mosquitto 2 the rig starts (and, with
--broker-kill-share, kills -9 and restarts on its persistence) instead of the embedded broker.
Exit status: 0 when every invariant holds, 1 on a violation, 2 when the rig itself failed.
Every process it starts is listed in RUNDIR/pids and stopped by pid at the end.
"""
import argparse, json, os, random, shutil, signal, socket, subprocess, sys, threading, time
import urllib.request

from promtext import parse_metrics

HERE = os.path.dirname(os.path.abspath(__file__))

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--bin", required=True, help="directory holding caas-gateway and caas-sim")
ap.add_argument("--rundir", required=True, help="logs, records and the gateway's store go here")
ap.add_argument("--chaos", type=float, default=600, help="seconds of chaos (default 600)")
ap.add_argument("--settle", type=float, default=150,
                help="seconds without faults before the check; must cover the longest retry "
                     "chain (attempts, outbox backoff) and the fleets' delayed cars (default 150)")
ap.add_argument("--seed", type=int, default=None)
# Side ports, so a soak does not collide with a gateway on the defaults (8080/1883).
ap.add_argument("--http", type=int, default=18080)
ap.add_argument("--mqtt", type=int, default=18830)
ap.add_argument("--hook", type=int, default=18090)
ap.add_argument("--rate", type=float, default=12, help="single requests per second")
ap.add_argument("--cars-a", type=int, default=200)
ap.add_argument("--cars-b", type=int, default=100)
ap.add_argument("--kill-min", type=float, default=5, help="seconds between stops, low end")
ap.add_argument("--kill-max", type=float, default=20, help="seconds between stops, high end")
ap.add_argument("--term-share", type=float, default=0.2, help="share of stops that are SIGTERM")
ap.add_argument("--quick-kill-share", type=float, default=0.0,
                help="share of stops 0.3-2 s after a start (recovery interrupted)")
ap.add_argument("--campaign-max", type=int, default=40, help="most cars in one campaign")
ap.add_argument("--campaign-every", type=float, default=30, help="mean seconds between campaigns")
ap.add_argument("--decommission-every", type=float, default=30,
                help="mean seconds between the driver's decommissionings of a random car (DELETE "
                     "/vehicles/{vin}), each registered again 2-10 s later; 0: never (default 30)")
ap.add_argument("--scrap-share", type=float, default=0.15,
                help="share of the decommissioned cars not registered again (default 0.15)")
ap.add_argument("--receiver-down-share", type=float, default=0.15,
                help="chance, per stop, that the webhook receiver also goes down for 10-25 s")
ap.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded",
                help="the gateway's embedded broker (--mqtt port), or a Mosquitto 2 the rig starts "
                     "on --broker-port with persistence in the run directory (default embedded)")
ap.add_argument("--broker-port", type=int, default=18831, help="Mosquitto's port (mosquitto mode)")
ap.add_argument("--mosquitto", default=None,
                help="the mosquitto binary (default: from PATH, else /usr/sbin/mosquitto)")
ap.add_argument("--broker-max-inflight", type=int, default=1000,
                help="Mosquitto's max_inflight_messages, for every client, the gateway too (default 1000, as the bench's "
                     "broker; gateway/mosquitto/mosquitto.conf ships 100)")
ap.add_argument("--broker-max-queued", type=int, default=100000,
                help="Mosquitto's max_queued_messages per client, beyond those in flight; more are "
                     "dropped (default 100000, as the bench's broker; the shipped config has 1000)")
ap.add_argument("--broker-log-all", action="store_true",
                help="Mosquitto logs every packet (log_type all: each PUBLISH, PUBACK, SUBSCRIBE "
                     "with its client, topic and flags), to trace a lost command; some MB a run")
ap.add_argument("--broker-kill-share", type=float, default=0.0,
                help="share of the gateway stops at which Mosquitto is also killed (-9) and restarted "
                     "on its persistence after 0-3 s: half with the gateway's stop, half 0.3-2 s after "
                     "its restart, so the running gateway reconnects (mosquitto mode only; default 0)")
args = ap.parse_args()
MOSQ = args.broker == "mosquitto"
if args.broker_kill_share and not MOSQ:
    sys.exit("rig: --broker-kill-share needs --broker mosquitto")
MOSQ_BIN = None
if MOSQ:
    MOSQ_BIN = args.mosquitto or shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if not MOSQ_BIN or not os.access(MOSQ_BIN, os.X_OK):
        sys.exit("rig: mosquitto not found (scripts/install-deps.sh installs it; or --mosquitto PATH)")
BIN = os.path.abspath(args.bin)
for exe in ("caas-gateway", "caas-sim"):
    if not os.access(os.path.join(BIN, exe), os.X_OK):
        sys.exit(f"rig: {BIN}/{exe} not found (cargo build --release -p caas-gateway -p caas-sim)")

seed = args.seed if args.seed is not None else random.randrange(1 << 30)
rnd = random.Random(seed)
run = os.path.abspath(args.rundir)
os.makedirs(run, exist_ok=True)
# Throwaway credentials: the gateway, the store and the receiver exist only for this run.
TOKEN = "chaos-token"
SECRET = "chaos-secret"
BASE = f"http://127.0.0.1:{args.http}"
DATA = os.path.join(run, "gwdata")

events = open(os.path.join(run, "events.jsonl"), "a", buffering=1)
ev_lock = threading.Lock()  # the broker's restarts report from their own thread


def ev(kind, **kw):
    kw.update({"ev": kind, "t": time.time()})
    with ev_lock:
        events.write(json.dumps(kw) + "\n")
        print(time.strftime("%H:%M:%S"), kind, {k: v for k, v in kw.items() if k not in ("ev", "t")},
              flush=True)


with open(os.path.join(run, "config.json"), "w") as f:
    json.dump({"seed": seed, "args": vars(args), "token": TOKEN, "secret": SECRET, "base": BASE},
              f, indent=1)

procs = {}


def note_pid(name, p):
    with ev_lock:
        procs[name] = p
        with open(os.path.join(run, "pids"), "a") as f:
            f.write(f"{name} {p.pid}\n")


def healthz(timeout=1.0):
    try:
        with urllib.request.urlopen(BASE + "/healthz", timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def metrics():
    req = urllib.request.Request(BASE + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return parse_metrics(r.read().decode())


gw_n = [0]
gw_proc = [None]


def start_gateway():
    gw_n[0] += 1
    n = gw_n[0]
    log = open(os.path.join(run, f"gw-{n:03d}.log"), "w")
    broker = (["--broker", f"mqtt://127.0.0.1:{args.broker_port}", "--no-mqtt"] if MOSQ else
              ["--mqtt", f"127.0.0.1:{args.mqtt}"])
    cmd = [f"{BIN}/caas-gateway", "serve", "--http", f"127.0.0.1:{args.http}"] + broker + [
           "--data", DATA,
           "--webhook-url", f"http://127.0.0.1:{args.hook}/hook", "--webhook-secret", SECRET,
           "--api-token", TOKEN, "--attempts", "3", "--attempt-timeout", "3s",
           "--backoff", "1s,2s", "--heap-reserve-mb", "0", "--store-cache-mb", "64"]
    # Short attempts and backoff make requests end FAILED often and within the settle phase;
    # no heap reserve, as prefaulting it on each of ~100 restarts would dominate the run.
    env = dict(os.environ, RUST_LOG="info,rumqttd=warn,sled=warn")
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    note_pid(f"gateway-{n}", p)
    gw_proc[0] = p
    return wait_up("gateway", p, n, t0, 60, lambda: healthz(0.5), 0.1)


def wait_up(what, p, n, t0, timeout, ready, every):
    """Waits until `ready()` (True) or process `p` exits or `timeout` s pass (False),
    logging `<what>-up`, `<what>-start-failed` or `<what>-start-timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            ev(f"{what}-start-failed", n=n, rc=p.returncode)
            return False
        if ready():
            ev(f"{what}-up", n=n, pid=p.pid, secs=round(time.time() - t0, 2))
            return True
        time.sleep(every)
    ev(f"{what}-start-timeout", n=n)
    return False


def stop_gateway(how):
    p = gw_proc[0]
    n = gw_n[0]
    if how == "kill":
        p.send_signal(signal.SIGKILL)
        p.wait()
        ev("gateway-killed", n=n, rc=p.returncode)
        return True
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    try:
        rc = p.wait(timeout=40)
        ev("gateway-terminated", n=n, rc=rc, secs=round(time.time() - t0, 2), ok=(rc == 0))
        return rc == 0
    except subprocess.TimeoutExpired:
        ev("gateway-term-timeout", n=n)
        p.send_signal(signal.SIGKILL)
        p.wait()
        return False


def stop_proc(name, sig=signal.SIGTERM, timeout=30):
    p = procs.get(name)
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()


def receiver_mode(mode):
    # Written whole and renamed, so the receiver never reads a half-written mode.
    tmp = os.path.join(run, "receiver.mode.tmp")
    with open(tmp, "w") as f:
        f.write(mode)
    os.replace(tmp, os.path.join(run, "receiver.mode"))


def restart_gateway():
    for _ in range(2):
        if start_gateway():
            return True
        # A start that timed out may still hold the ports and the store.
        if gw_proc[0].poll() is None:
            gw_proc[0].send_signal(signal.SIGKILL)
            gw_proc[0].wait()
        time.sleep(2)
    return False


class RigError(Exception):
    pass


# ---------- Mosquitto (--broker mosquitto) ----------
MOSQ_DIR = os.path.join(run, "mosquitto")
MOSQ_CONF = os.path.join(run, "mosquitto.conf")
mq_n = [0]
mq_proc = [None]
mq_restart = [None]  # the thread that restarts a killed broker, while one is pending


def write_mosquitto_conf():
    os.makedirs(MOSQ_DIR, exist_ok=True)
    lines = [
        f"listener {args.broker_port} 127.0.0.1",
        "allow_anonymous true",
        # Retained commands, retained presence and the cars' persistent sessions (they connect
        # with clean_session = false) survive a restart. Mosquitto writes its database only
        # every autosave_interval seconds and at a clean exit, so after a kill -9 it comes back
        # with the state of at most 1 s before.
        "persistence true",
        f"persistence_location {MOSQ_DIR}/",
        "autosave_interval 1",
        # Run as root (in a container), it would switch to the user 'mosquitto', who may not
        # write the run directory.
        *(["user root"] if os.geteuid() == 0 else []),
        # By default as the bench's broker (simulator/src/gateway_proc.rs): no cap a soak hits.
        # Every start of the gateway and every reconnect to its broker republish each car's
        # command (QoS 1, retained), and Mosquitto queues every copy in each session it holds
        # (the embedded broker keeps only a car's newest): a car that is slow or away comes
        # back to a backlog of up to inflight + queued commands (see README.md).
        f"max_inflight_messages {args.broker_max_inflight}",
        f"max_queued_messages {args.broker_max_queued}",
        "max_connections -1",
        "set_tcp_nodelay true",
        f"log_dest file {os.path.join(run, 'mosquitto.log')}",
        *(["log_type all"] if args.broker_log_all else
          ["log_type error", "log_type warning", "log_type notice", "log_type information"]),
        "connection_messages true",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    with open(MOSQ_CONF, "w") as f:
        f.write("\n".join(lines) + "\n")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_mosquitto():
    mq_n[0] += 1
    n = mq_n[0]
    # Its own log is mosquitto.log (log_dest file); this catches what it says before reading it.
    out = open(os.path.join(run, "mosquitto.out"), "a")
    t0 = time.time()
    p = subprocess.Popen([MOSQ_BIN, "-c", MOSQ_CONF], stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT)
    note_pid(f"mosquitto-{n}", p)
    mq_proc[0] = p
    return wait_up("broker", p, n, t0, 15, lambda: port_open(args.broker_port), 0.05)


def kill_broker_and_restart(gap):
    """Kills Mosquitto (-9) and restarts it on the same persistence after `gap` s, in a thread."""
    wait_broker_restart()
    p = mq_proc[0]
    p.send_signal(signal.SIGKILL)
    p.wait()
    ev("broker-killed", n=mq_n[0], restart_in=round(gap, 2))

    def later():
        time.sleep(gap)
        if not start_mosquitto():
            # Once more: a port the killed one held may linger for a moment.
            if mq_proc[0].poll() is None:
                mq_proc[0].send_signal(signal.SIGKILL)
                mq_proc[0].wait()
            time.sleep(1)
            if not start_mosquitto():
                ev("broker-restart-failed", n=mq_n[0])

    t = threading.Thread(target=later, daemon=True)
    t.start()
    mq_restart[0] = t


def wait_broker_restart():
    t = mq_restart[0]
    if t is not None:
        t.join()
        mq_restart[0] = None


def broker_ok():
    return not MOSQ or (mq_proc[0] is not None and mq_proc[0].poll() is None)


rc = 2
try:
    receiver_mode("chaos")
    rlog = open(os.path.join(run, "receiver.log"), "w")
    note_pid("receiver", subprocess.Popen(
        [sys.executable, os.path.join(HERE, "receiver.py"), str(args.hook), SECRET,
         os.path.join(run, "callbacks.jsonl")], stdout=rlog, stderr=subprocess.STDOUT))
    time.sleep(0.5)
    if procs["receiver"].poll() is not None:
        raise RigError(f"the webhook receiver did not start (port {args.hook} in use?)")
    # A gateway already on the HTTP port would answer /healthz for ours.
    for port, flag in [(args.http, "--http")] + ([] if MOSQ else [(args.mqtt, "--mqtt")]):
        if port_open(port):
            raise RigError(f"port {port} is in use ({flag})")
    if MOSQ:
        if port_open(args.broker_port):
            raise RigError(f"port {args.broker_port} is in use (--broker-port)")
        write_mosquitto_conf()
        if not start_mosquitto():
            raise RigError("mosquitto did not start (see mosquitto.log and mosquitto.out)")
    if not start_gateway():
        raise RigError("the gateway did not start (see gw-001.log)")

    fleets = {
        # A: most of the faults a car in the field has: offline at start, commands dropped
        # for ever ('silent'), refusals, reconnect storms, corrupted frames.
        "a": ["--cars", str(args.cars_a), "--vin-prefix", "SMVAAA", "--seed", str(seed % 1000 + 1),
              "--offline-at-start", "0.1", "--offline-for", "60s",
              "--drop-commands", "0.05",
              "--refuse", "0.03", "--storm", "0.06", "--storm-every", "12s", "--corrupt", "0.03"],
        # B: a network delay of half the attempt timeout, so confirmations race the retries,
        # plus commands dropped for the first 3 minutes and storms.
        "b": ["--cars", str(args.cars_b), "--vin-prefix", "SMVBBB", "--seed", str(seed % 1000 + 2),
              "--net-delay", "1500ms", "--drop-commands", "0.2", "--drop-for", "180s",
              "--storm", "0.05", "--storm-every", "25s"],
    }
    for name, extra in fleets.items():
        flog = open(os.path.join(run, f"fleet-{name}.log"), "w")
        cmd = [f"{BIN}/caas-sim", "fleet", "--gateway", BASE, "--api-token", TOKEN,
               "--mqtt", f"127.0.0.1:{args.broker_port if MOSQ else args.mqtt}", "--vins-out", os.path.join(run, f"vins-{name}.txt"),
               "--faults-out", os.path.join(run, f"faults-{name}.txt"),
               "--report", os.path.join(run, f"fleet-{name}.json"), "--no-progress",
               "--threads", "1", "--connect-rate", "200"] + extra
        note_pid(f"fleet-{name}", subprocess.Popen(cmd, stdout=flog, stderr=subprocess.STDOUT))
    # The driver needs the VINs; 85 % connected is enough, as fleet A keeps 10 % offline at first.
    t0 = time.time()
    want = args.cars_a + args.cars_b
    conn = -1
    while time.time() - t0 < 120:
        ok = all(os.path.exists(os.path.join(run, f"vins-{n}.txt")) and
                 sum(1 for _ in open(os.path.join(run, f"vins-{n}.txt"))) > 0 for n in fleets)
        try:
            conn = metrics().get("caas_connected_cars", 0)
        except Exception:
            conn = -1
        if ok and conn >= want * 0.85:
            break
        for n in fleets:
            if procs[f"fleet-{n}"].poll() is not None:
                raise RigError(f"fleet {n} exited (see fleet-{n}.log)")
        time.sleep(1)
    else:
        raise RigError(f"the fleets did not connect within 120 s ({conn} of {want})")
    ev("fleet-ready", connected=conn, secs=round(time.time() - t0, 1))

    dlog = open(os.path.join(run, "driver.log"), "w")
    note_pid("driver", subprocess.Popen(
        [sys.executable, os.path.join(HERE, "driver.py"), BASE, TOKEN, run, "--rate", str(args.rate),
         "--seed", str(seed), "--campaign-max", str(args.campaign_max),
         "--campaign-every", str(args.campaign_every),
         "--decommission-every", str(args.decommission_every), "--scrap-share", str(args.scrap_share),
         "--vins"] + [os.path.join(run, f"vins-{n}.txt") for n in fleets],
        stdout=dlog, stderr=subprocess.STDOUT))

    t_end = time.time() + args.chaos
    kills = terms = broker_kills = 0
    receiver_down_until = 0
    while time.time() < t_end:
        wait = rnd.uniform(args.kill_min, args.kill_max)
        if rnd.random() < args.quick_kill_share:
            wait = rnd.uniform(0.3, 2.0)
        if rnd.random() < args.receiver_down_share and time.time() > receiver_down_until:
            receiver_mode("down")
            receiver_down_until = time.time() + rnd.uniform(10, 25)
            ev("receiver-down", secs=round(receiver_down_until - time.time(), 1))
        sl_end = time.time() + wait
        while time.time() < sl_end:
            time.sleep(0.2)
            if receiver_down_until and time.time() > receiver_down_until:
                receiver_mode("chaos")
                receiver_down_until = 0
                ev("receiver-up")
        if time.time() >= t_end:
            break
        how = "term" if rnd.random() < args.term_share else "kill"
        if how == "term":
            terms += 1
        else:
            kills += 1
        # Drawn only when asked for, so the embedded mode's schedule for a seed is unchanged.
        broker_kill = None
        if args.broker_kill_share and rnd.random() < args.broker_kill_share:
            broker_kill = (rnd.choice(["with-stop", "after-start"]), rnd.uniform(0, 3),
                           rnd.uniform(0.3, 2.0))
            broker_kills += 1
        if broker_kill and broker_kill[0] == "with-stop":
            # The broker first: the gateway may see it go before it is stopped itself.
            kill_broker_and_restart(broker_kill[1])
        stop_gateway(how)
        # Sometimes at once (cars reconnect into a fresh broker), sometimes after a gap.
        time.sleep(rnd.choice([0, 0, 0.2, 1, 3]))
        if not restart_gateway():
            ev("gateway-restart-failed", n=gw_n[0])
            break
        if broker_kill and broker_kill[0] == "after-start":
            # While the gateway recovers (republishes, resends): it must reconnect by itself.
            time.sleep(broker_kill[2])
            kill_broker_and_restart(broker_kill[1])
    if MOSQ:
        wait_broker_restart()
    ev("chaos-done", kills=kills, terms=terms, starts=gw_n[0],
       **({"broker_kills": broker_kills, "broker_starts": mq_n[0]} if MOSQ else {}))
    if gw_proc[0].poll() is not None:
        raise RigError("the gateway is down after the chaos phase; the check needs it")
    if not broker_ok():
        raise RigError("mosquitto is down after the chaos phase; the check needs it")
    # The driver drains while the receiver still fails now and then; faults end only after.
    receiver_mode("chaos")
    stop_proc("driver", signal.SIGTERM, timeout=60)
    ev("driver-stopped")
    time.sleep(5)
    receiver_mode("ok")
    ev("settling", secs=args.settle)
    time.sleep(args.settle)
    ev("checking")
    with open(os.path.join(run, "check.txt"), "w") as out:
        r = subprocess.run([sys.executable, os.path.join(HERE, "check.py"), run],
                           stdout=out, stderr=subprocess.STDOUT)
    ev("checked", rc=r.returncode)
    rc = 0 if r.returncode == 0 else 1 if r.returncode == 1 else 2
except RigError as e:
    ev("rig-error", error=str(e))
finally:
    for name in ["driver", "fleet-a", "fleet-b"]:
        stop_proc(name, signal.SIGTERM, timeout=30)
    if gw_proc[0] is not None and gw_proc[0].poll() is None:
        stop_gateway("term")
    if MOSQ:
        wait_broker_restart()
        if mq_proc[0] is not None and mq_proc[0].poll() is None:
            mq_proc[0].send_signal(signal.SIGTERM)
            try:
                mq_proc[0].wait(timeout=10)
            except subprocess.TimeoutExpired:
                mq_proc[0].send_signal(signal.SIGKILL)
                mq_proc[0].wait()
    stop_proc("receiver", signal.SIGTERM, timeout=5)
    ev("rig-done", run=run, rc=rc)
sys.exit(rc)
