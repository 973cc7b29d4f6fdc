#!/usr/bin/env bash
# The one command that runs every test (README "Test"). It installs what the tests need when
# it is missing, idempotently, then runs formatting, lints, the no_std builds, the workspace
# tests and the firmware's QEMU tests. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# A full disk shows up late and cryptically (the linker dies with a "Bus error"), so say so
# first: a clean run's builds take ~7 GiB (the workspace's tests and lints 6.4 GiB, the
# firmware's 0.6 GiB, measured on a fresh clone).
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ "${free_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
  printf 'warning: only %s MiB free on this disk; a clean run needs ~7 GiB for its builds\n' \
    "$((${free_kib:-0} / 1024))" >&2
fi

step "installing what the tests need (idempotent)"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "no_std builds for thumbv7em-none-eabihf"
cargo build -p caas-protocol --target thumbv7em-none-eabihf --no-default-features
cargo build -p caas-agent --target thumbv7em-none-eabihf --no-default-features

step "cargo test --workspace"
cargo test --workspace

if [ -f agent-firmware/Cargo.toml ]; then
  step "agent-firmware: build, QEMU scenario, size budget"
  scripts/firmware-test.sh
fi
