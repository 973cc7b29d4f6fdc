#!/usr/bin/env python3
"""Reproduction: a grant the car refuses (an unknown feature) fails only its own request.

A car sees an activation naming a feature it does not have together with another change of
its services in flight. The refusal must fail only the unknown feature's activation: a
deactivation beside it still completes, and a renewal of a paid service beside it completes
too (the car names the refused grant, and the gateway fails only that one; a car that names
none gets new grants refused together one at a time). Gateways before 4aa1aed failed the deactivation with UNKNOWN_FEATURE and
withdrew the renewed service; before 1f5c8f9 the renewal failed with UNKNOWN_FEATURE.

usage: repro_refused_grant.py --bin DIR [--dir DIR] [--http P --mqtt P --hook P]
Exit status 0 when the gateway behaves as above, 1 otherwise.
"""
import sys, time
from minirig import Rig, parse_args

args = parse_args(__doc__.splitlines()[0])
# The delay keeps the first command unanswered while the second change is posted, so the car
# refuses a command that carries both.
r = Rig(args, ["--net-delay", "600ms"], cars=1)
try:
    vin = r.vins[0]
    for svc, flag in (("autopilot", "highway_autopilot"), ("heated-seats", "heated_seats")):
        rid = r.activate(vin, svc, [flag])
        r.expect(f"{svc} activated", r.callback(rid) == ("ACTIVATED", None), r.callback(rid, 0))

    bad = r.activate(vin, "warp-drive", ["warp_drive"])
    time.sleep(0.2)
    removal = r.deactivate(vin, "heated-seats")
    cb = r.callback(bad)
    r.expect("the unknown feature fails with UNKNOWN_FEATURE", cb == ("FAILED", "UNKNOWN_FEATURE"), cb)
    cb = r.callback(removal)
    r.expect("the deactivation beside it completes", cb == ("DEACTIVATED", None), cb)

    bad = r.activate(vin, "warp-drive", ["warp_drive"])
    time.sleep(0.2)
    renewal = r.activate(vin, "autopilot", ["highway_autopilot"], {"type": "SUBSCRIPTION", "autoRenewal": True})
    cb = r.callback(bad)
    r.expect("the unknown feature fails with UNKNOWN_FEATURE", cb == ("FAILED", "UNKNOWN_FEATURE"), cb)
    cb = r.callback(renewal)
    r.expect("the renewal beside it completes", cb == ("ACTIVATED", None), cb)

    # A failed activation of a service the car does not have is listed as ERROR; only the
    # granted services count here.
    def granted():
        return [s for s in r.services(vin) if s[1] != "ERROR"]
    want = [("autopilot", "ACTIVE")]
    try:
        r.wait_until("the car's services settle", 20, lambda: granted() == want)
    except SystemExit:
        pass
    r.expect("autopilot still active, heated-seats gone, no warp-drive granted", granted() == want,
             r.services(vin))
    rc = r.finish("a refused grant fails only its own request")
finally:
    r.close()
sys.exit(rc)
