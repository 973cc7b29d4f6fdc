#!/usr/bin/env bash
# Crash-and-fault soak of the gateway (on demand, not part of scripts/test.sh): see
# scripts/chaos/README.md. About 13 minutes with the defaults (10 min of chaos).
#
# Usage: scripts/chaos.sh [--bin DIR] [--repro] [rig flags...]
#   --bin DIR   caas-gateway and caas-sim from DIR (default: the repo's target/release, built
#               with `cargo build --release -p caas-gateway -p caas-sim` when missing)
#   --repro     run the two reproductions (repro_*.py) instead of the soak; of the flags
#               below they take only --http, --mqtt and --hook
#   rig flags   passed to scripts/chaos/rig.py, e.g. --chaos 300 --seed 7 (rig.py --help);
#               --broker mosquitto [--broker-port N] [--broker-kill-share X] runs the gateway
#               and the cars on a Mosquitto 2 the rig starts (and kills), not the embedded one
# The run directory is target/chaos/<timestamp> unless --rundir is given. The last line is
# the verdict; the exit status is 0 only when every invariant held.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
here="$root/scripts/chaos"
bin="" repro=0 rundir="" rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --bin=*) bin="${1#--bin=}"; shift ;;
    --repro) repro=1; shift ;;
    --rundir) rundir="$2"; shift 2 ;;
    --rundir=*) rundir="${1#--rundir=}"; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exec python3 "$here/rig.py" --help ;;
    *) rest+=("$1"); shift ;;
  esac
done

if [ -z "$bin" ]; then
  bin="$root/target/release"
  if [ ! -x "$bin/caas-gateway" ] || [ ! -x "$bin/caas-sim" ]; then
    echo "chaos: building the release binaries (cargo build --release -p caas-gateway -p caas-sim)"
    (cd "$root" && cargo build --release -p caas-gateway -p caas-sim)
  elif [ -n "$(find "$root/gateway/src" "$root/simulator/src" "$root/protocol/src" -newer "$bin/caas-gateway" -name '*.rs' -print -quit)" ]; then
    # A soak of an older build passes or fails for the wrong code; say so rather than build
    # behind the caller's back (a release build takes minutes).
    echo "chaos: warning: sources are newer than $bin/caas-gateway;" \
         "run cargo build --release -p caas-gateway -p caas-sim first" >&2
  fi
fi
for exe in caas-gateway caas-sim; do
  [ -x "$bin/$exe" ] || { echo "chaos: $bin/$exe not found" >&2; exit 2; }
done
bin="$(cd "$bin" && pwd)"
rundir="${rundir:-$root/target/chaos/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$rundir"
rundir="$(cd "$rundir" && pwd)"

if [ "$repro" = 1 ]; then
  rc=0
  for r in "$here"/repro_*.py; do
    name="$(basename "$r" .py)"
    echo "== $name"
    python3 "$r" --bin "$bin" --dir "$rundir/$name" "${rest[@]}" || rc=1
  done
  if [ $rc = 0 ]; then echo "chaos: PASS: every reproduction behaves as documented ($rundir)"
  else echo "chaos: FAIL: a reproduction failed ($rundir)"; fi
  exit $rc
fi

echo "chaos: binaries $bin, run dir $rundir"
set +e
python3 "$here/rig.py" --bin "$bin" --rundir "$rundir" "${rest[@]}" 2>&1 | tee "$rundir/rig.out"
rc=${PIPESTATUS[0]}
set -e
verdict="$(grep '^VERDICT: ' "$rundir/check.txt" 2>/dev/null | tail -1 || true)"
case "$rc" in
  0) echo "chaos: PASS: ${verdict#VERDICT: PASS: } ($rundir)" ;;
  1) echo "chaos: FAIL: ${verdict#VERDICT: FAIL: } (details: $rundir/check.txt)" ;;
  *) echo "chaos: FAIL: the rig or the checker did not finish (rig exit $rc; see $rundir/rig.out" \
          "and $rundir/check.txt)"; rc=2 ;;
esac
exit "$rc"
