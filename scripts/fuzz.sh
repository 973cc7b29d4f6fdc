#!/usr/bin/env bash
# Runs the protocol's decode+verify fuzz target (a benchmark-style job, not part of the
# default test run). Installs cargo-fuzz when missing; needs the nightly toolchain.
# Usage: scripts/fuzz.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/../protocol"
secs="${1:-60}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# fuzz/seeds holds a valid command and report (signed with the target's keys): mutations of
# them reach the signature checks, which random bytes almost never do.
mkdir -p fuzz/corpus/decode_verify
cargo +nightly fuzz run decode_verify fuzz/corpus/decode_verify fuzz/seeds/decode_verify -- \
  -max_total_time="$secs" -max_len=4096
