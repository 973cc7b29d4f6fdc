#!/usr/bin/env bash
# Installs what the tests need, only when missing: the thumbv7em-none-eabihf Rust target,
# rustfmt/clippy, qemu-system-arm (firmware tests) and mosquitto (external-broker tests).
set -euo pipefail

if ! rustup target list --installed 2>/dev/null | grep -qx thumbv7em-none-eabihf; then
  rustup target add thumbv7em-none-eabihf
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "$component"
  fi
done

missing=()
command -v qemu-system-arm >/dev/null 2>&1 || missing+=(qemu-system-arm)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
