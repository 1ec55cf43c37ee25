#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine:
#  - libxen-dev: Xen's public headers, for the ABI test (ring/tests/xen_abi.rs)
#  - gcc: compiles that test's C side (and the guest workload)
#  - g++: libfuzzer-sys compiles libFuzzer (C++) for the long fuzz runs of
#    scripts/fuzz.sh (docs/FUZZING.md); `cargo test` does not need it
#  - fio: optional baseline row of `shadowback bench blk`
#  - qemu-utils: qemu-storage-daemon, the reference vhost-user-blk backend of
#    scripts/guest/run-qsd.sh (an installed qemu-utils of any version, e.g.
#    10.0 from bookworm-backports, is kept as it is)
#  - the QEMU test guest (tests/qemu_guest.rs): scripts/guest/build-image.sh
#    fetches a Debian kernel and QEMU 7.2 with `apt-get download`, unpacks
#    them into ~/.cache/shadowback/guest (not installed) and builds the
#    initramfs; cached, so a second run takes a few seconds.
# Idempotent: installs only what is missing, runs `apt-get update` at most once
# (only when something has to be installed or downloaded). Fails, saying
# why, if anything cannot be had: the QEMU test needs the guest image.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -f /usr/include/xen/io/ring.h ] || need+=(libxen-dev)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v fio >/dev/null 2>&1 || need+=(fio)
# `ip netns` for the TAP tests in network namespaces.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ! command -v qemu-storage-daemon >/dev/null 2>&1 \
   && ! dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q 'install ok installed'; then
  need+=(qemu-utils)
fi

guest_needs_apt=0
scripts/guest/build-image.sh --needs-apt && guest_needs_apt=1

SUDO=""
if { [ ${#need[@]} -gt 0 ] || [ $guest_needs_apt = 1 ]; } && [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "install-test-deps: need root or sudo for apt-get (packages: ${need[*]:-none};" \
         "guest image needs apt: $guest_needs_apt)" >&2
    exit 1
  }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive

if [ ${#need[@]} -gt 0 ] || [ $guest_needs_apt = 1 ]; then
  echo "install-test-deps: apt-get update"
  $SUDO apt-get update -qq
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${need[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
else
  echo "install-test-deps: no packages to install"
fi

echo "install-test-deps: building the QEMU test guest (scripts/guest/build-image.sh)"
# Runs as the invoking user (the cache is theirs); it calls apt-get only for
# packages still missing, which needs root.
if ! SHADOWBACK_APT_UPDATED=$guest_needs_apt scripts/guest/build-image.sh; then
  echo "install-test-deps: error: building the QEMU test guest failed (see above);" \
       "tests/qemu_guest.rs cannot run without it" >&2
  exit 1
fi
if command -v qemu-storage-daemon >/dev/null 2>&1; then
  echo "install-test-deps: qemu-storage-daemon: $(qemu-storage-daemon --version | head -1)"
else
  echo "install-test-deps: qemu-storage-daemon: not in PATH (qemu-utils < 8.0);" \
       "run-qsd.sh uses QEMU 7.2's from the guest cache"
fi
