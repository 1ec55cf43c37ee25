# Shared settings for scripts/guest/*.sh (sourced, not executed).
# Everything built or downloaded lives in the cache dir, never in the repo.
SHADOWBACK_GUEST_CACHE=${SHADOWBACK_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shadowback/guest}
# Kernel package: default = whatever bookworm's linux-image-amd64 points at
# (a 6.1.0-N-amd64 package); override with e.g. linux-image-6.1.0-56-amd64.
SHADOWBACK_KERNEL_PKG=${SHADOWBACK_KERNEL_PKG:-}
# QEMU system emulator.  Default: $cache/qemu/bin/qemu-system-x86_64, a wrapper
# around bookworm's qemu-system-x86 7.2 unpacked with dpkg -x (see docs/GUEST.md
# for why it is not apt-installed).  Set to a path to use another QEMU.
SHADOWBACK_QEMU=${SHADOWBACK_QEMU:-$SHADOWBACK_GUEST_CACHE/qemu/bin/qemu-system-x86_64}
SHADOWBACK_QSD=${SHADOWBACK_QSD:-$(command -v qemu-storage-daemon || echo /usr/bin/qemu-storage-daemon)}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
