#!/usr/bin/env python3
"""Reproduction: a failed change changes nothing.

With the car unreachable, a renewal of an active service and a deactivation of another both
end FAILED (NO_CONFIRMATION). Both services must stay as they were: listed while the car is
away, and ACTIVE once it is back and has taken the newest command. Gateways before 4aa1aed
withdrew the renewed service's paid grant with the failed renewal, and carried out the failed
deactivation once the car was back.

usage: repro_failed_change.py --bin DIR [--dir DIR] [--http P --mqtt P --hook P]
Exit status 0 when the gateway behaves as above, 1 otherwise.
"""
import sys
from minirig import Rig, parse_args

args = parse_args(__doc__.splitlines()[0])
r = Rig(args, [], cars=1)
try:
    vin = r.vins[0]
    for svc, flag in (("autopilot", "highway_autopilot"), ("heated-seats", "heated_seats")):
        rid = r.activate(vin, svc, [flag])
        r.expect(f"{svc} activated", r.callback(rid) == ("ACTIVATED", None), r.callback(rid, 0))

    r.stop_fleet()
    renewal = r.activate(vin, "autopilot", ["highway_autopilot"], {"type": "SUBSCRIPTION", "autoRenewal": True})
    removal = r.deactivate(vin, "heated-seats")
    for what, rid in (("renewal", renewal), ("deactivation", removal)):
        cb = r.callback(rid, 60)
        r.expect(f"the {what} fails with NO_CONFIRMATION", cb == ("FAILED", "NO_CONFIRMATION"), cb)
    got = [s for s, _ in r.services(vin)]
    r.expect("both services still listed while the car is away", got == ["autopilot", "heated-seats"],
             r.services(vin))

    r.start_fleet([], 1, provision=False)
    want = [("autopilot", "ACTIVE"), ("heated-seats", "ACTIVE")]
    try:
        r.wait_until("the car has caught up", 20, lambda: r.services(vin) == want)
    except SystemExit:
        pass
    got = r.services(vin)
    r.expect("both services ACTIVE once the car is back", got == want, got)
    rc = r.finish("a failed change changes nothing")
finally:
    r.close()
sys.exit(rc)
