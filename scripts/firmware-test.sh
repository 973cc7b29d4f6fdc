#!/usr/bin/env bash
# The firmware's tests (scripts/test.sh calls this when agent-firmware/Cargo.toml exists):
#   1. rustfmt and clippy over agent-firmware/ (it is outside the host workspace, so the root
#      checks do not see it);
#   2. the board layer's host tests, among them the power-cut tests (>10,000 cuts: the flash
#      store alone, and the real agent core over it);
#   3. the release firmware build for thumbv7em-none-eabihf;
#   4. the QEMU scenario (two power-ons over one flash image), whose reports are verified
#      with the car's key, then the size report: .text/.rodata/.data/.bss, the painted
#      stack's high-water mark, guest instructions per command; it fails over budget
#      (flash 64 KiB, RAM = statics + stack 16 KiB), with no waiver.
# Idempotent; needs only what scripts/install-deps.sh installs. Targets go to
# agent-firmware/target (or $FIRMWARE_TARGET_DIR), never the host workspace's.
set -euo pipefail
cd "$(dirname "$0")/../agent-firmware"

step() { printf '\n==> %s\n' "$*"; }

if ! command -v qemu-system-arm >/dev/null 2>&1 \
  || ! rustup target list --installed 2>/dev/null | grep -qx thumbv7em-none-eabihf; then
  ../scripts/install-deps.sh
fi

export CARGO_TARGET_DIR="${FIRMWARE_TARGET_DIR:-$PWD/target}"
HOST=x86_64-unknown-linux-gnu
# The firmware's .cargo/config.toml makes thumbv7em the default target in this folder; the
# host-side members always get --target "$HOST".

step "agent-firmware: rustfmt"
# Only our packages: `--all` would also reach the path dependencies (agent/, protocol/).
cargo fmt -p caas-agent-firmware -p caas-firmware-board -p caas-firmware-host -- --check

step "agent-firmware: clippy (firmware for thumbv7em, board and host tool for the host)"
cargo clippy --release -p caas-agent-firmware -- -D warnings
cargo clippy -p caas-firmware-board -p caas-firmware-host --all-targets --target "$HOST" -- -D warnings

step "agent-firmware: board layer tests on the host (feature lines, flash store power cuts)"
cargo test -p caas-firmware-board --target "$HOST" -- --nocapture

step "agent-firmware: release build (thumbv7em-none-eabihf)"
cargo build --release -p caas-agent-firmware
cargo build -p caas-firmware-host --target "$HOST"

step "agent-firmware: QEMU scenario, reports, size budget"
"$CARGO_TARGET_DIR/$HOST/debug/caas-firmware-host" \
  --elf "$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/caas-agent-firmware" \
  --work "$CARGO_TARGET_DIR/qemu-scenario" \
  --timeout-secs 120
