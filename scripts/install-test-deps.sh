#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine:
#  - libxen-dev: Xen's public headers, for the ABI test (ring/tests/xen_abi.rs)
#  - gcc: compiles that test's C side
#  - fio: optional baseline row of `shadowback bench blk`
# Idempotent: installs only what is missing, runs `apt-get update` once if needed.
set -euo pipefail

need=()
[ -f /usr/include/xen/io/ring.h ] || need+=(libxen-dev)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v fio >/dev/null 2>&1 || need+=(fio)

if [ ${#need[@]} -eq 0 ]; then
  echo "install-test-deps: nothing to install"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-test-deps: need root or sudo to install: ${need[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-test-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
