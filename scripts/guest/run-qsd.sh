#!/usr/bin/env bash
# Reference run: qemu-storage-daemon exports a fresh raw image as a
# vhost-user-blk export; QEMU (TCG) boots the test guest built by
# build-image.sh against it; the guest's verifying workload prints
# "SHADOWBACK-GUEST: PASS blocks=N" or "... FAIL ..." on the serial console.
# Exits 0 on PASS, 1 on FAIL, 2 on timeout / no verdict.
#
# Usage: scripts/guest/run-qsd.sh [--kill-every SECONDS] [--rounds N]
#            [--workers N] [--depth N] [--blocks N] [--image-mib N]
#            [--timeout SECONDS]   (whole run; the guest gives up on a stuck
#                                   workload 20 s earlier and reports FAIL)
#            [--log FILE]
#   --kill-every S  SIGKILL and restart qemu-storage-daemon every S seconds
#                   (fractions allowed) once the workload has started; QEMU's
#                   chardev then reconnects (reconnect=1, or reconnect-ms=1000
#                   on QEMU >= 9.2).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

KILL_EVERY=""; ROUNDS=4; WORKERS=2; DEPTH=16; BLOCKS=1024; IMAGE_MIB=256; TIMEOUT=300; LOG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --kill-every) KILL_EVERY=$2; shift 2 ;;
        --rounds)     ROUNDS=$2; shift 2 ;;
        --workers)    WORKERS=$2; shift 2 ;;
        --depth)      DEPTH=$2; shift 2 ;;
        --blocks)     BLOCKS=$2; shift 2 ;;
        --image-mib)  IMAGE_MIB=$2; shift 2 ;;
        --timeout)    TIMEOUT=$2; shift 2 ;;
        --log)        LOG=$2; shift 2 ;;
        -h|--help)    sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done

C=$SHADOWBACK_GUEST_CACHE
KERNEL=$C/vmlinuz; INITRD=$C/initramfs.cpio.gz; QEMU=$SHADOWBACK_QEMU; QSD=$SHADOWBACK_QSD
[ -e "$KERNEL" ] && [ -e "$INITRD" ] && [ -x "$QEMU" ] || die "run scripts/guest/build-image.sh first"
[ -x "$QSD" ] || die "qemu-storage-daemon not found (package qemu-utils)"

RUN=$(mktemp -d "$C/run.XXXXXX")
LOG=${LOG:-$RUN/console.log}
IMG=$RUN/disk.raw; SOCK=$RUN/vhost.sock
QSD_PID=""; KILLER_PID=""
cleanup() {
    set +e
    [ -n "$KILLER_PID" ] && kill "$KILLER_PID" 2>/dev/null && wait "$KILLER_PID" 2>/dev/null
    if [ -s "$RUN/qemu.pid" ]; then kill -9 "$(cat "$RUN/qemu.pid")" 2>/dev/null; fi
    if [ -s "$RUN/qsd.pid" ]; then
        p=$(cat "$RUN/qsd.pid"); kill -TERM "$p" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    fi
    rm -f "$IMG" "$SOCK"   # logs stay in $RUN
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s "${IMAGE_MIB}M" "$IMG"

QSD_ARGS=(--blockdev driver=file,node-name=file0,filename="$IMG",cache.direct=on,aio=threads)
NODE=file0
start_qsd() {
    rm -f "$SOCK"
    "$QSD" "${QSD_ARGS[@]}" \
        --export type=vhost-user-blk,id=exp0,node-name=$NODE,writable=on,num-queues=1,addr.type=unix,addr.path="$SOCK" \
        >> "$RUN/qsd.log" 2>&1 &
    echo $! > "$RUN/qsd.pid"
    disown $!   # no "Killed" job notices from bash on every --kill-every
    local i=0
    until [ -S "$SOCK" ]; do
        sleep 0.05; i=$((i+1)); [ $i -lt 200 ] || die "qemu-storage-daemon did not create $SOCK (see $RUN/qsd.log)"
    done
}
start_qsd

QVER=$("$QEMU" --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
set -- $QVER
if [ "$1" -gt 9 ] || { [ "$1" -eq 9 ] && [ "$2" -ge 2 ]; }; then RECONNECT=reconnect-ms=1000; else RECONNECT=reconnect=1; fi
CHARDEV="socket,id=c0,path=$SOCK"
[ -n "$KILL_EVERY" ] && CHARDEV="$CHARDEV,$RECONNECT"

GUEST_TIMEOUT=$(( ${TIMEOUT%.*} > 40 ? ${TIMEOUT%.*} - 20 : ${TIMEOUT%.*} / 2 ))
APPEND="console=ttyS0 panic=-1 sb.timeout=$GUEST_TIMEOUT sb.rounds=$ROUNDS sb.workers=$WORKERS sb.depth=$DEPTH sb.blocks=$BLOCKS"
QEMU_CMD=("$QEMU" -accel tcg -m 512 -smp 1
    -object memory-backend-memfd,id=mem,size=512M,share=on
    -machine q35,memory-backend=mem
    -chardev "$CHARDEV" -device vhost-user-blk-pci,chardev=c0
    -nic none -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
    -nographic -no-reboot -pidfile "$RUN/qemu.pid")
log "qsd: $("$QSD" --version | head -1): ${QSD_ARGS[*]} --export type=vhost-user-blk,id=exp0,node-name=$NODE,writable=on,num-queues=1,addr.type=unix,addr.path=$SOCK"
log "qemu: ${QEMU_CMD[*]}"
log "console log: $LOG"

# Console lines are prefixed with host seconds since QEMU start.
T0=$EPOCHREALTIME
stamp() {
    local line
    while IFS= read -r line; do
        printf '[%8.3f] %s\n' "$(bc <<< "$EPOCHREALTIME - $T0" 2>/dev/null || echo 0)" "${line%$'\r'}"
    done
}
command -v bc > /dev/null || stamp() { local line; while IFS= read -r line; do printf '[%s] %s\n' "$(date +%T.%N | cut -c1-12)" "${line%$'\r'}"; done; }

if [ -n "$KILL_EVERY" ]; then
    (
        trap 'exit 0' TERM
        until grep -q 'SHADOWBACK-GUEST: .* workload:' "$LOG" 2>/dev/null; do sleep 0.1; done
        n=0
        while :; do
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

set +e
timeout --kill-after=5 "$TIMEOUT" "${QEMU_CMD[@]}" < /dev/null 2>&1 | stamp > "$LOG"
QRC=${PIPESTATUS[0]}
T1=$EPOCHREALTIME
set -e

KILLS=$(grep -c killer "$RUN/kills.log" 2>/dev/null || true)
grep -E 'SHADOWBACK-GUEST|GUEST-IO|is not a head|I/O error|vhost|virtio_blk|Kernel panic' "$LOG" | head -60 >&2 || true
if [ -s "$RUN/qsd.log" ]; then log "qemu-storage-daemon log:"; head -20 "$RUN/qsd.log" >&2; fi
INIT=$(sed -n 's/^\[ *\([0-9.]*\)\] SHADOWBACK-GUEST: init at.*/\1/p' "$LOG" | head -1)
READY=$(sed -n 's/^\[ *\([0-9.]*\)\] SHADOWBACK-GUEST: \/dev\/.* ready at.*/\1/p' "$LOG" | head -1)
DONE=$(sed -n 's/^\[ *\([0-9.]*\)\] SHADOWBACK-GUEST: workload done.*/\1/p' "$LOG" | head -1)
log "timings (host s since QEMU start): init=${INIT:-?} disk-ready=${READY:-?} workload-done=${DONE:-?} total=$(bc <<< "$T1 - $T0" 2>/dev/null || echo ?) qemu-rc=$QRC qsd-kills=${KILLS:-0}"
VERDICT=$(grep -o 'SHADOWBACK-GUEST: \(PASS\|FAIL\).*' "$LOG" | tail -1 || true)
echo "${VERDICT:-SHADOWBACK-GUEST: no verdict (qemu rc=$QRC, timeout=${TIMEOUT}s)}"
case "$VERDICT" in
    *PASS*) exit 0 ;;
    *FAIL*) exit 1 ;;
    *) exit 2 ;;
esac
