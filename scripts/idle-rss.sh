#!/bin/sh
# Memory of the backends of N idle disks, for comparing two builds of
# shadowback (e.g. before and after the standby pool, docs/ARCHITECTURE.md
# §7.5): starts `SHADOWBACK up` with N disks on one small image, waits
# until the number of backend processes has been steady for a second, and
# sums their VmRSS and Pss from /proc. `bench blk --devices` reports the
# same figures for the build it is, with a load phase after.
#
# Usage: scripts/idle-rss.sh SHADOWBACK N
set -eu
bin=$1
n=$2
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
truncate -s 64M "$dir/disk.img"
{
    echo "socket = \"$dir/control.sock\""
    i=0
    while [ "$i" -lt "$n" ]; do
        printf '[[disk]]\nname = "disk%s"\npath = "%s/disk.img"\ncache = "writeback"\n' "$i" "$dir"
        i=$((i + 1))
    done
} >"$dir/config.toml"
RUST_LOG=warn "$bin" up "$dir/config.toml" 2>"$dir/log" &
pid=$!

backends() {
    for p in $(pgrep -P "$pid"); do
        if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q ' blkback '; then
            echo "$p"
        fi
    done
}

last=-1
steady=0
tries=0
while [ "$steady" -lt 10 ]; do
    sleep 0.1
    count=$(backends | wc -l)
    if [ "$count" -eq "$last" ] && [ "$count" -ge "$n" ]; then
        steady=$((steady + 1))
    else
        steady=0
    fi
    last=$count
    tries=$((tries + 1))
    if [ "$tries" -gt 600 ]; then
        echo "backends did not settle; log:" >&2
        cat "$dir/log" >&2
        exit 1
    fi
done
rss=0
pss=0
for p in $(backends); do
    r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status")
    s=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")
    rss=$((rss + r))
    pss=$((pss + s))
done
echo "disks=$n backends=$last rss_kib=$rss pss_kib=$pss rss_kib_per_disk=$((rss / n)) pss_kib_per_disk=$((pss / n))"
