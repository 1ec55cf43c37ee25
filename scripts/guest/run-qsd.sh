#!/usr/bin/env bash
# Reference run: qemu-storage-daemon exports a fresh raw image as a
# vhost-user-blk export; QEMU (TCG) boots the test guest built by
# build-image.sh against it; the guest's verifying workload prints
# "SHADOWBACK-GUEST: PASS blocks=N" or "... FAIL ..." on the serial console;
# the host then checks the image against the guest's last round.
# Same guest, workload and checks as run-shadowback.sh, so the two compare.
# Exits 0 on PASS (guest PASS, no "is not a head" / I/O error on the console,
# host check passed), 1 on FAIL, 2 on timeout / no verdict, 3 if the guest
# image is not built.
#
# Usage: scripts/guest/run-qsd.sh [--kill-every SECONDS] [--kills N]
#            [--rounds N | --duration S] [--workers N] [--depth N] [--blocks N]
#            [--image-mib N] [--timeout SECONDS] [--log FILE] [--keep]
#   --kill-every S  SIGKILL and restart qemu-storage-daemon every S seconds
#                   (fractions allowed) once the workload has started; QEMU's
#                   chardev then reconnects (reconnect=1, or reconnect-ms=1000
#                   on QEMU >= 9.2).  --kills N stops after N kills.
#   --duration S    the guest runs whole rounds for S s (instead of --rounds)
#   --timeout S     whole run (300); the guest's watchdog gives up 20 s earlier
#   --keep          keep the run directory (image, logs) even on PASS
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

KILL_EVERY=""; MAX_KILLS=0; ROUNDS=4; DURATION=0; WORKERS=2; DEPTH=16; BLOCKS=1024
IMAGE_MIB=256; TIMEOUT=300; LOG=""; KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --kill-every) KILL_EVERY=$2; shift 2 ;;
        --kills)      MAX_KILLS=$2; shift 2 ;;
        --rounds)     ROUNDS=$2; shift 2 ;;
        --duration)   DURATION=$2; shift 2 ;;
        --workers)    WORKERS=$2; shift 2 ;;
        --depth)      DEPTH=$2; shift 2 ;;
        --blocks)     BLOCKS=$2; shift 2 ;;
        --image-mib)  IMAGE_MIB=$2; shift 2 ;;
        --timeout)    TIMEOUT=$2; shift 2 ;;
        --log)        LOG=$2; shift 2 ;;
        --keep)       KEEP=1; shift ;;
        -h|--help)    sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done

require_guest_image
QSD=$SHADOWBACK_QSD
[ -x "$QSD" ] || die "qemu-storage-daemon not found (package qemu-utils; or run scripts/guest/build-image.sh)"

C=$SHADOWBACK_GUEST_CACHE
RUN=$(mktemp -d "$C/run.XXXXXX")
LOG=${LOG:-$RUN/console.log}
IMG=$RUN/disk.raw; SOCK=$RUN/vhost.sock
KILLER_PID=""; RUN_OK=0
cleanup() {
    set +e
    [ -n "$KILLER_PID" ] && kill "$KILLER_PID" 2>/dev/null && wait "$KILLER_PID" 2>/dev/null
    if [ -s "$RUN/qemu.pid" ]; then kill -9 "$(cat "$RUN/qemu.pid")" 2>/dev/null; fi
    if [ -s "$RUN/qsd.pid" ]; then
        p=$(cat "$RUN/qsd.pid"); kill -TERM "$p" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    fi
    rm -f "$SOCK"
    if [ $KEEP = 0 ] && [ $RUN_OK = 1 ] && [ "$LOG" = "$RUN/console.log" ]; then
        rm -rf "$RUN"
    else
        rm -f "$IMG"; [ $KEEP = 1 ] && log "run directory kept: $RUN"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s "${IMAGE_MIB}M" "$IMG"

QSD_ARGS=(--blockdev driver=file,node-name=file0,filename="$IMG",cache.direct=on,aio=threads
          --export type=vhost-user-blk,id=exp0,node-name=file0,writable=on,num-queues=1,addr.type=unix,addr.path="$SOCK")
start_qsd() {
    rm -f "$SOCK"
    "$QSD" "${QSD_ARGS[@]}" >> "$RUN/qsd.log" 2>&1 &
    echo $! > "$RUN/qsd.pid"
    disown $!   # no "Killed" job notices from bash on every --kill-every
    local i=0
    until [ -S "$SOCK" ]; do
        sleep 0.05; i=$((i+1)); [ $i -lt 200 ] || die "qemu-storage-daemon did not create $SOCK (see $RUN/qsd.log)"
    done
}
start_qsd
log "qsd: $("$QSD" --version | head -1): ${QSD_ARGS[*]}"

EXTRA=""
[ -n "$KILL_EVERY" ] && EXTRA=$(qemu_reconnect_opt)

if [ -n "$KILL_EVERY" ]; then
    (
        trap 'exit 0' TERM
        until grep -q 'SHADOWBACK-GUEST: .* workload:' "$LOG" 2>/dev/null; do sleep 0.1; done
        n=0
        while [ "$MAX_KILLS" = 0 ] || [ $n -lt "$MAX_KILLS" ]; do
            sleep "$KILL_EVERY"
            grep -q 'SHADOWBACK-GUEST: \(PASS\|FAIL\)' "$LOG" && break
            pid=$(cat "$RUN/qsd.pid")
            kill -9 "$pid" 2>/dev/null; while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
            n=$((n+1)); log "kill-every: SIGKILLed qemu-storage-daemon pid $pid (#$n), restarting"
            echo "[killer] kill #$n pid $pid at $EPOCHREALTIME" >> "$RUN/kills.log"
            start_qsd
        done
    ) &
    KILLER_PID=$!
fi

APPEND=$(guest_append "$ROUNDS" "$DURATION" "$WORKERS" "$DEPTH" "$BLOCKS" "$TIMEOUT")
QRC=0
boot_guest "$SOCK" "$EXTRA" "$APPEND" "$TIMEOUT" "$LOG" "$RUN/qemu.pid" || QRC=$?
if [ -n "$KILLER_PID" ]; then kill "$KILLER_PID" 2>/dev/null || true; wait "$KILLER_PID" 2>/dev/null || true; KILLER_PID=""; fi

KILLS=$(grep -c killer "$RUN/kills.log" 2>/dev/null || true)
if [ -s "$RUN/qsd.log" ]; then log "qemu-storage-daemon log (first lines):"; head -20 "$RUN/qsd.log" >&2; fi
analyze_run "$LOG" "$IMG" "$QRC" "${KILLS:-0}" 0 "backend=qemu-storage-daemon"
[ $RUN_OK = 1 ] && exit 0
grep -q 'SHADOWBACK-GUEST: \(PASS\|FAIL\)' "$LOG" && exit 1
exit 2
