#!/usr/bin/env bash
# Stress run of the real-guest data-plane kill test (not CI): runs
# run-shadowback.sh --queues Q --kills 24 --kill-every 0.4 again and again
# while other work keeps every host core busy, and stops at the first
# failure, keeping that run's directory (image, config, console, supervisor
# and kill logs).
#
# The load, started before the first run and stopped at exit (also on
# Ctrl-C / SIGTERM), in a session of its own: one CPU burner per core, and a
# disk-heavy job on a temporary file next to the run images (fio random 4 KiB
# O_DIRECT read/write if fio is installed, else a dd write/read loop). The
# load also stops by itself once this script is gone (it polls our pid).
#
# Each run passes only if run-shadowback.sh exits 0 (guest PASS, no "is not
# a head", no I/O error, host check PASS, no QEMU vhost-user complaint, all
# kills injected) and, as tests/qemu_guest.rs asserts, Linux drives Q
# queues, every one carried requests (queues_used), crashes >= kills,
# recoveries >= kills and given_up == 0.
#
# Prints one line per run (queues, verdict, kills, replayed, …) and finally
# "N passed, M failed"; exits 0 only if every run passed, 1 on a failure,
# 3 if the guest image is not built (as the run scripts do).
#
# Usage: scripts/guest/stress.sh [--runs N] [--queues LIST] [--kills N]
#            [--kill-every S] [--timeout S] [--burners N] [--no-load]
#   --runs N        runs (20)
#   --queues LIST   comma-separated queue counts, cycled through (1,2,4)
#   --kills N       data-plane kills per run (24), --kill-every S (0.4)
#   --timeout S     per run (150), as run-shadowback.sh --timeout
#   --burners N     CPU burners (default: one per core, nproc)
#   --no-load       no burners and no disk job
# Environment: SHADOWBACK_BIN (default target/release/shadowback: build it
# with cargo build --release), RUST_LOG, and common.sh's
# SHADOWBACK_GUEST_CACHE, SHADOWBACK_QEMU. Per-run stdout/stderr and the
# summary go to $SHADOWBACK_GUEST_CACHE/stress.XXXXXX (kept).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
. "$HERE/common.sh"

RUNS=20; QUEUES=1,2,4; KILLS=24; KILL_EVERY=0.4; TIMEOUT=150; BURNERS=""; LOAD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --runs)       RUNS=$2; shift 2 ;;
        --queues)     QUEUES=$2; shift 2 ;;
        --kills)      KILLS=$2; shift 2 ;;
        --kill-every) KILL_EVERY=$2; shift 2 ;;
        --timeout)    TIMEOUT=$2; shift 2 ;;
        --burners)    BURNERS=$2; shift 2 ;;
        --no-load)    LOAD=0; shift ;;
        -h|--help)    sed -n '2,34p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
case "$RUNS" in ''|*[!0-9]*|0) die "--runs wants a number from 1" ;; esac
case "$KILLS" in ''|*[!0-9]*) die "--kills wants a number" ;; esac
IFS=, read -r -a QLIST <<< "$QUEUES"
[ ${#QLIST[@]} -gt 0 ] || die "--queues wants a list such as 1,2,4"
for q in "${QLIST[@]}"; do
    case "$q" in ''|*[!0-9]*|0) die "--queues: $q is not a queue count" ;; esac
done
BURNERS=${BURNERS:-$(nproc)}
case "$BURNERS" in ''|*[!0-9]*) die "--burners wants a number" ;; esac

require_guest_image
export SHADOWBACK_BIN=${SHADOWBACK_BIN:-$REPO/target/release/shadowback}
[ -x "$SHADOWBACK_BIN" ] || die "$SHADOWBACK_BIN not found: run cargo build --release (or set SHADOWBACK_BIN)"

C=$SHADOWBACK_GUEST_CACHE
OUT=$(mktemp -d "$C/stress.XXXXXX")
LOAD_DIR=""; LOAD_PID=""; CHILD=""; CHILD_ERR=""

# --- the load ---------------------------------------------------------------
# A session of its own (setsid): its process group is stopped as a whole,
# fio and dd included; the leader writes its pid (= the group id) to a file.
LOAD_SCRIPT='
parent=$1; burners=$2; dir=$3; engine=$4
echo $$ > "$dir/pgid"
for _ in $(seq "$burners"); do
    ( while kill -0 "$parent" 2>/dev/null; do i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; done ) &
done
if [ -n "$engine" ]; then
    ( while kill -0 "$parent" 2>/dev/null; do
        fio --name=stress-load --filename="$dir/fio.dat" --size=512M --rw=randrw --bs=4k \
            --direct=1 --ioengine="$engine" --iodepth=16 --time_based --runtime=10 \
            --output=/dev/null || sleep 1
      done ) &
else
    ( while kill -0 "$parent" 2>/dev/null; do
        dd if=/dev/zero of="$dir/dd.dat" bs=1M count=512 oflag=direct conv=fsync status=none || sleep 1
        dd if="$dir/dd.dat" of=/dev/null bs=1M iflag=direct status=none || sleep 1
      done ) &
fi
wait
'
DISK_JOB="dd write/read loop (no fio)"; ENGINE=""
if command -v fio > /dev/null; then
    ENGINE=psync
    fio --enghelp 2>/dev/null | grep -qw libaio && ENGINE=libaio
    DISK_JOB="fio randrw 4k O_DIRECT $ENGINE iodepth 16"
fi
start_load() {
    LOAD_DIR=$(mktemp -d "$C/stress-load.XXXXXX")
    setsid --wait bash -c "$LOAD_SCRIPT" stress-load "$$" "$BURNERS" "$LOAD_DIR" "$ENGINE" \
        < /dev/null > "$OUT/load.log" 2>&1 &
    LOAD_PID=$!
    for _ in $(seq 50); do [ -s "$LOAD_DIR/pgid" ] && break; sleep 0.1; done
    [ -s "$LOAD_DIR/pgid" ] || die "the load did not start (see $OUT/load.log)"
}
load_alive() { kill -0 -- "-$(cat "$LOAD_DIR/pgid")" 2>/dev/null; }
stop_load() {
    [ -n "$LOAD_DIR" ] || return 0
    local pg
    pg=$(cat "$LOAD_DIR/pgid" 2>/dev/null || true)
    if [ -n "$pg" ]; then
        kill -TERM -- "-$pg" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 -- "-$pg" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pg" 2>/dev/null || true
    fi
    [ -n "$LOAD_PID" ] && wait "$LOAD_PID" 2>/dev/null
    rm -rf "$LOAD_DIR"; LOAD_DIR=""; LOAD_PID=""
}
cleanup() {
    set +e
    stop_load
    if [ -n "$CHILD" ]; then
        # run-shadowback.sh stops its QEMU, supervisor and injector on
        # SIGTERM, but only once QEMU exits (bash runs the trap after the
        # foreground pipeline): so QEMU too, by its pid file in the run dir.
        kill -TERM "$CHILD" 2>/dev/null
        local rd
        rd=$(sed -n 's/.*supervisor: .* up \(.*\)\/shadowback\.toml (pid.*/\1/p' "$CHILD_ERR" 2>/dev/null | tail -1)
        [ -n "$rd" ] && [ -s "$rd/qemu.pid" ] && kill -KILL "$(cat "$rd/qemu.pid")" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --- the runs -----------------------------------------------------------------
say() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< " $2"; }
num() { case "$1" in ''|*[!0-9]*) echo -1 ;; *) echo "$1" ;; esac; }

REV=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
say "stress: $RUNS runs, queues $QUEUES, --kills $KILLS --kill-every $KILL_EVERY, binary $SHADOWBACK_BIN ($REV)"
if [ $LOAD = 1 ]; then
    start_load
    say "load: $BURNERS CPU burners + $DISK_JOB on $LOAD_DIR ($(nproc) cores)"
else
    say "load: none (--no-load)"
fi
say "logs: $OUT"
say "$(printf '%4s %2s %-7s %5s %8s %3s %8s %7s %5s %6s  %s' \
    run q verdict kills replayed gq crashes lat_max loadavg secs note)"

PASSED=0; FAILED=0
for i in $(seq "$RUNS"); do
    q=${QLIST[$(( (i - 1) % ${#QLIST[@]} ))]}
    t0=$(now_us)
    CHILD_ERR=$OUT/run-$i.err
    bash "$HERE/run-shadowback.sh" --queues "$q" --kills "$KILLS" --kill-every "$KILL_EVERY" \
        --timeout "$TIMEOUT" --keep > "$OUT/run-$i.out" 2> "$CHILD_ERR" &
    CHILD=$!
    rc=0; wait "$CHILD" || rc=$?; CHILD=""
    secs=$(( ($(now_us) - t0) / 100000 )); secs="$((secs / 10)).$((secs % 10))"
    res=$(grep '^RESULT ' "$OUT/run-$i.out" | tail -1 || true)
    rundir=$(sed -n 's/.*run directory kept: //p' "$OUT/run-$i.err" | tail -1)
    verdict=$(field verdict "$res"); kills=$(field kills "$res"); replayed=$(field replayed "$res")
    gq=$(field guest_queues "$res"); crashes=$(field crashes "$res")
    recov=$(field recoveries "$res"); given=$(field given_up "$res")
    max=$(field lat_max_us "$res")
    case "$max" in ''|*[!0-9]*) ;; *) max="$((max / 1000))ms" ;; esac
    why=()
    [ "$rc" -eq 0 ] || why+=("run-shadowback.sh exit $rc")
    [ -n "$res" ] || why+=("no RESULT line")
    [ "$gq" = "$q" ] || why+=("guest_queues=${gq:-?} (want $q)")
    qu=$(field queues_used "$res")
    [ "$qu" = "$q" ] || why+=("queues_used=${qu:-?} (want $q: queue_irqs=$(field queue_irqs "$res"))")
    [ "$(num "$crashes")" -ge "$(num "$kills")" ] || why+=("crashes=${crashes:-?} < kills=${kills:-?}")
    [ "$(num "$recov")" -ge "$(num "$kills")" ] || why+=("recoveries=${recov:-?} < kills=${kills:-?}")
    [ "$given" = 0 ] || why+=("given_up=${given:-?}")
    if [ $LOAD = 1 ] && ! load_alive; then why+=("the load died (see $OUT/load.log)"); fi
    la=$(cut -d' ' -f1 /proc/loadavg)
    note=${why[*]:-}
    say "$(printf '%4s %2s %-7s %5s %8s %3s %8s %7s %5s %6s  %s' \
        "$i" "$q" "${verdict:-NONE}" "${kills:-?}" "${replayed:-?}" "${gq:-?}" "${crashes:-?}" \
        "${max:-?}" "$la" "$secs" "$note")"
    if [ ${#why[@]} -eq 0 ]; then
        PASSED=$((PASSED + 1))
        # Only a directory run-shadowback.sh made in the cache.
        case "$rundir" in "$C"/run.*) rm -rf "$rundir" ;; esac
        continue
    fi
    FAILED=$((FAILED + 1))
    say ""
    say "run $i FAILED ($note)"
    say "  ${res:-no RESULT line}"
    say "  run directory (kept): ${rundir:-? (see $OUT/run-$i.err)}"
    say "  run-shadowback.sh stdout/stderr: $OUT/run-$i.out $OUT/run-$i.err"
    if [ -n "$rundir" ] && [ -e "$rundir/console.log" ]; then
        say "  guest (mismatches, errors, verdict; first 40):"
        grep -E 'GUEST-IO: (verify mismatch|.* error|io_submit|bogus|blocks=)|is not a head|I/O error|SHADOWBACK-GUEST: (PASS|FAIL)|qemu-system' \
            "$rundir/console.log" | head -40 | sed 's/^/    /' | tee -a "$OUT/summary.txt" || true
    fi
    grep -E 'HOST-CHECK|host check' "$OUT/run-$i.err" | head -20 | sed 's/^/    /' | tee -a "$OUT/summary.txt" || true
    if [ -n "$rundir" ] && [ -e "$rundir/supervisor.log" ]; then
        say "  supervisor warnings and errors (besides the injected kills; first 40):"
        sed 's/\x1b\[[0-9;]*m//g' "$rundir/supervisor.log" | grep -E ' (WARN|ERROR) ' \
            | grep -vE 'fault requested|injecting a fault|backend failed .*signal: 9 \(SIGKILL\)' \
            | head -40 | sed 's/^/    /' | tee -a "$OUT/summary.txt" || true
    fi
    say "stopping at the first failure"
    break
done
say "$PASSED passed, $FAILED failed$( [ $((PASSED + FAILED)) -lt "$RUNS" ] && echo ", $((RUNS - PASSED - FAILED)) not run")"
[ "$FAILED" -eq 0 ]
