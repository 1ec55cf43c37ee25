#!/usr/bin/env bash
# A real Linux guest on shadowback's vhost-user-blk export, with data-plane
# kills during the workload.
#
# Writes a config for `shadowback up` with one disk (vd0, a fresh raw image)
# exported over vhost-user, starts the supervisor, boots the test guest of
# build-image.sh under QEMU (TCG) against the vhost-user socket, and, with
# --kills N, has the supervisor SIGKILL the disk's data-plane process N times
# during the workload (`shadowback fault --socket CTL vd0 kill`, one every
# --kill-every S). Afterwards: the guest's verdict, the console scanned for
# "is not a head" / I/O errors and for QEMU's vhost-user complaints (the VMM
# must not notice a data-plane restart), the image checked on the host
# against the guest's last round, and the supervisor's counters.
#
# --fault supervisor-kill SIGKILLs `shadowback up` itself instead and starts
# it again on the same config (the socket path is reused), like a service
# manager would: QEMU gets the chardev option reconnect=1, sees the socket
# hang up and reconnects, re-sending SET_INFLIGHT_FD with the region it
# kept and SET_VRING_BASE = used->idx; the new data plane resubmits what the
# region marks in flight. QEMU does notice this (disconnect / "ring restore
# failed" messages, by design): those are counted but not a failure; the
# guest must still see no error and the host check must pass. Give it a
# --kill-every of a few seconds (QEMU reconnects once per second).
#
# --fault upgrade runs `shadowback upgrade` instead (docs/ARCHITECTURE.md
# §4.2): the supervisor execs its binary in place and keeps QEMU's
# connection, so QEMU must notice nothing (as for data-plane kills) and the
# guest's slowest request says how long the upgrades stalled it.
#
# Exits 0 on PASS (guest PASS, no bad message, host check passed, no QEMU
# vhost-user error, all N kills done), 1 on FAIL, 2 on timeout / no verdict,
# 3 if the guest image is not built, 4 if the supervisor did not come up.
#
# Usage: scripts/guest/run-shadowback.sh [--kills N] [--kill-every S]
#            [--fault kill|hang|spin|supervisor-kill|upgrade] [--rounds N | --duration S]
#            [--workers N] [--depth N] [--blocks N] [--image-mib N]
#            [--timeout S] [--log FILE] [--keep] [--reconnect] [--queues N]
#   --kills N       data-plane faults to inject (0); they start when the
#                   guest's workload starts, one every --kill-every S (0.4)
#   --duration S    the guest runs whole rounds for S s; default with --kills:
#                   N x S + 8, so every kill lands in the workload; else
#                   --rounds N (4) rounds
#   --timeout S     whole run (180); the guest's watchdog gives up 20 s earlier
#   --reconnect     give QEMU's chardev reconnect=1 (not needed: the
#                   supervisor keeps the vhost-user connection across kills)
#   --keep          keep the run directory (image, config, logs) even on PASS
#   --queues N      virtqueues (1): num_queues in the config, num-queues on
#                   QEMU's device, N guest CPUs so Linux uses them all, and
#                   (without --workers) N workers, one on each CPU
#   --workers N     workload processes (default: 2, or --queues if more)
# Environment: SHADOWBACK_BIN (default target/release/shadowback if built,
# else target/debug/shadowback), RUST_LOG for the supervisor (warn), and
# common.sh's SHADOWBACK_GUEST_CACHE, SHADOWBACK_QEMU.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
. "$HERE/common.sh"

KILLS=0; KILL_EVERY=0.4; FAULT=kill; ROUNDS=4; DURATION=""; WORKERS=""; DEPTH=16; BLOCKS=1024
IMAGE_MIB=256; TIMEOUT=180; LOG=""; KEEP=0; RECONNECT=0; QUEUES=1
while [ $# -gt 0 ]; do
    case "$1" in
        --kills)      KILLS=$2; shift 2 ;;
        --kill-every) KILL_EVERY=$2; shift 2 ;;
        --fault)      FAULT=$2; shift 2 ;;
        --rounds)     ROUNDS=$2; shift 2 ;;
        --duration)   DURATION=$2; shift 2 ;;
        --workers)    WORKERS=$2; shift 2 ;;
        --depth)      DEPTH=$2; shift 2 ;;
        --blocks)     BLOCKS=$2; shift 2 ;;
        --image-mib)  IMAGE_MIB=$2; shift 2 ;;
        --timeout)    TIMEOUT=$2; shift 2 ;;
        --log)        LOG=$2; shift 2 ;;
        --keep)       KEEP=1; shift ;;
        --reconnect)  RECONNECT=1; shift ;;
        --queues)     QUEUES=$2; shift 2 ;;
        -h|--help)    sed -n '2,53p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
case "$KILLS" in ''|*[!0-9]*) die "--kills wants a number" ;; esac
case "$QUEUES" in ''|*[!0-9]*|0) die "--queues wants a number from 1" ;; esac
# boot_guest (common.sh) reads these.
SB_SMP=$QUEUES; SB_BLK_OPTS="num-queues=$QUEUES"
# A worker per guest CPU (at least 2): the guest pins worker W to CPU W, so
# every virtqueue carries requests.
[ -n "$WORKERS" ] || WORKERS=$(( QUEUES > 2 ? QUEUES : 2 ))
case "$FAULT" in
    kill|hang|spin|upgrade) ;;
    supervisor-kill) RECONNECT=1 ;;
    *) die "--fault wants kill, hang, spin, supervisor-kill or upgrade" ;;
esac
if [ -z "$DURATION" ]; then
    if [ "$KILLS" -gt 0 ]; then
        DURATION=$(awk -v n="$KILLS" -v s="$KILL_EVERY" 'BEGIN { d = n * s + 8; printf "%d", (d == int(d)) ? d : int(d) + 1 }')
    else
        DURATION=0
    fi
fi

require_guest_image
BIN=$(shadowback_bin "$REPO")

C=$SHADOWBACK_GUEST_CACHE
RUN=$(mktemp -d "$C/run.XXXXXX")
LOG=${LOG:-$RUN/console.log}
IMG=$RUN/disk.raw; VSOCK=$RUN/vhost.sock; CTL=$RUN/control.sock; CFG=$RUN/shadowback.toml
SUP_PID=""; KILLER_PID=""; RUN_OK=0
# The live supervisor's pid: with --fault supervisor-kill the injector
# replaces it, so it is kept in a file.
SUP_PIDFILE=$RUN/supervisor.pid
start_supervisor() {
    RUST_LOG=${RUST_LOG:-warn} "$BIN" up "$CFG" >> "$RUN/supervisor.log" 2>&1 &
    echo $! > "$SUP_PIDFILE"
}
stop_supervisor() {
    [ -s "$SUP_PIDFILE" ] && SUP_PID=$(cat "$SUP_PIDFILE")
    [ -n "$SUP_PID" ] || return 0
    kill -TERM "$SUP_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SUP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SUP_PID" 2>/dev/null || true
    wait "$SUP_PID" 2>/dev/null || true
    SUP_PID=""; rm -f "$SUP_PIDFILE"
}
cleanup() {
    set +e
    [ -n "$KILLER_PID" ] && kill "$KILLER_PID" 2>/dev/null && wait "$KILLER_PID" 2>/dev/null
    if [ -s "$RUN/qemu.pid" ]; then kill -9 "$(cat "$RUN/qemu.pid")" 2>/dev/null; fi
    stop_supervisor
    if [ $KEEP = 0 ] && [ $RUN_OK = 1 ] && [ "$LOG" = "$RUN/console.log" ]; then
        rm -rf "$RUN"
    elif [ $KEEP = 1 ]; then
        log "run directory kept: $RUN"
    else
        rm -f "$IMG" "$VSOCK" "$CTL"; log "logs kept in $RUN"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s "${IMAGE_MIB}M" "$IMG"
cat > "$CFG" <<EOF
# written by scripts/guest/run-shadowback.sh
socket = "$CTL"

[[disk]]
name = "vd0"
path = "$IMG"
vhost_user = "$VSOCK"
num_queues = $QUEUES
cache = "none"
standby = true
shadow = true
EOF

# --- the supervisor ---------------------------------------------------------
start_supervisor
SUP_PID=$(cat "$SUP_PIDFILE")
log "supervisor: $BIN up $CFG (pid $SUP_PID, log $RUN/supervisor.log)"
i=0
until [ -S "$VSOCK" ] && [ -S "$CTL" ]; do
    if ! kill -0 "$SUP_PID" 2>/dev/null; then
        wait "$SUP_PID" 2>/dev/null && rc=0 || rc=$?
        SUP_PID=""; rm -f "$SUP_PIDFILE"
        log "error: shadowback up exited (status $rc) before serving $VSOCK:"
        sed 's/^/    /' "$RUN/supervisor.log" >&2
        echo "RESULT verdict=NONE error=supervisor-exited"
        exit 4
    fi
    sleep 0.05; i=$((i+1))
    if [ $i -ge 200 ]; then
        log "error: shadowback up did not create $VSOCK and $CTL within 10 s:"
        sed 's/^/    /' "$RUN/supervisor.log" >&2
        echo "RESULT verdict=NONE error=supervisor-no-socket"
        exit 4
    fi
done

# --- the fault injector -------------------------------------------------------
# Real SIGKILLs of the data-plane process, sent by the supervisor itself
# (`fault ... kill`), once the workload runs; a refused fault (e.g. no backend
# at that instant) is logged and retried at the next tick.
if [ "$KILLS" -gt 0 ]; then
    (
        trap 'exit 0' TERM
        until grep -q 'SHADOWBACK-GUEST: .* workload:' "$LOG" 2>/dev/null; do sleep 0.1; done
        n=0; bad=0
        while [ $n -lt "$KILLS" ] && [ $bad -le "$KILLS" ]; do
            sleep "$KILL_EVERY"
            grep -q 'SHADOWBACK-GUEST: \(PASS\|FAIL\)' "$LOG" && break
            if [ "$FAULT" = supervisor-kill ]; then
                # SIGKILL, wait until it is gone (its backends die with it),
                # start the next one on the same config.
                old=$(cat "$SUP_PIDFILE")
                kill -9 "$old" 2>/dev/null || true
                for _ in $(seq 200); do
                    st=$(awk '{ print $3 }' "/proc/$old/stat" 2>/dev/null || true)
                    [ -z "$st" ] || [ "$st" = Z ] && break
                    sleep 0.05
                done
                echo "=== supervisor $old killed at $EPOCHREALTIME; restarting" >> "$RUN/supervisor.log"
                start_supervisor
                n=$((n+1)); echo "[injector] $FAULT #$n at $EPOCHREALTIME: $old -> $(cat "$SUP_PIDFILE")" >> "$RUN/kills.log"
            elif [ "$FAULT" = upgrade ] && out=$("$BIN" upgrade --socket "$CTL" 2>&1); then
                n=$((n+1)); echo "[injector] $FAULT #$n at $EPOCHREALTIME: $out" >> "$RUN/kills.log"
            elif [ "$FAULT" != upgrade ] && out=$("$BIN" fault --socket "$CTL" vd0 "$FAULT" 2>&1); then
                n=$((n+1)); echo "[injector] $FAULT #$n at $EPOCHREALTIME: $out" >> "$RUN/kills.log"
            else
                bad=$((bad+1)); echo "[injector] refused at $EPOCHREALTIME: $out" >> "$RUN/kills.log"
            fi
        done
    ) &
    KILLER_PID=$!
fi

# --- the guest ------------------------------------------------------------------
EXTRA=""
[ $RECONNECT = 1 ] && EXTRA=$(qemu_reconnect_opt)
APPEND=$(guest_append "$ROUNDS" "$DURATION" "$WORKERS" "$DEPTH" "$BLOCKS" "$TIMEOUT")
QRC=0
boot_guest "$VSOCK" "$EXTRA" "$APPEND" "$TIMEOUT" "$LOG" "$RUN/qemu.pid" || QRC=$?
if [ -n "$KILLER_PID" ]; then kill "$KILLER_PID" 2>/dev/null || true; wait "$KILLER_PID" 2>/dev/null || true; KILLER_PID=""; fi

DONE_KILLS=$(grep -c "\] $FAULT #" "$RUN/kills.log" 2>/dev/null || true)
REFUSED=$(grep -c 'refused' "$RUN/kills.log" 2>/dev/null || true)
[ "${REFUSED:-0}" -eq 0 ] || { log "refused faults:"; grep refused "$RUN/kills.log" | head -5 >&2 || true; }

# --- the supervisor's view, then stop it ---------------------------------------
STATUS=""
SUP_PID=$(cat "$SUP_PIDFILE" 2>/dev/null || true)
if [ -n "$SUP_PID" ] && kill -0 "$SUP_PID" 2>/dev/null; then
    STATUS=$("$BIN" status --format keys --socket "$CTL" 2>&1) || log "shadowback status failed: $STATUS"
    log "shadowback status:"; sed 's/^/    /' <<< "$STATUS" >&2
else
    log "error: the supervisor died during the run (see $RUN/supervisor.log)"
fi
stat_of() { awk -v k="$1" '$1 == k { print $2; exit }' <<< "$STATUS"; }
EXTRA_RESULT="backend=shadowback crashes=$(stat_of crashes) hangs=$(stat_of hangs)"
EXTRA_RESULT+=" recoveries=$(stat_of recoveries) failed_takeovers=$(stat_of failed-takeovers)"
EXTRA_RESULT+=" given_up=$(stat_of given-up) replayed=$(stat_of replayed) last_total_us=$(stat_of last-total-us)"
stop_supervisor
if grep -qiE 'panic|error' "$RUN/supervisor.log"; then
    log "supervisor log (errors):"; grep -iE 'panic|error' "$RUN/supervisor.log" | head -20 >&2 || true
fi

analyze_run "$LOG" "$IMG" "$QRC" "${DONE_KILLS:-0}" "${REFUSED:-0}" "$EXTRA_RESULT"
QERR=$(grep -E '^\[ *[0-9.]*\] qemu-system-x86_64: ' "$LOG" | grep -ciE 'vhost|end-of-file|msg fds|disconnect' || true)
if [ "$FAULT" = supervisor-kill ]; then
    # The supervisor owns the vhost-user socket: QEMU sees each restart as a
    # disconnect and reconnects; only the guest's view counts here.
    log "QEMU vhost-user messages (expected with supervisor-kill): $QERR"
    grep -E '^\[ *[0-9.]*\] qemu-system-x86_64: ' "$LOG" | sort | uniq -c | sort -rn | head -8 >&2 || true
elif [ "$QERR" -gt 0 ]; then
    log "FAIL: QEMU noticed the vhost-user backend ($QERR messages)"; RUN_OK=0
fi
if [ "${DONE_KILLS:-0}" -lt "$KILLS" ]; then
    log "FAIL: only ${DONE_KILLS:-0} of $KILLS faults injected (workload too short? raise --duration)"; RUN_OK=0
fi
log "faults injected: ${DONE_KILLS:-0} of $KILLS ($FAULT every ${KILL_EVERY}s), refused: ${REFUSED:-0}"
[ $RUN_OK = 1 ] && exit 0
grep -q 'SHADOWBACK-GUEST: \(PASS\|FAIL\)' "$LOG" && exit 1
exit 2
