#!/usr/bin/env bash
# A real Linux guest (virtio_net) on shadowback's vhost-user-net export,
# sending a checksummed TCP stream to a server in a network namespace
# through the vif's TAP, while the vif's data plane is SIGKILLed.
#
# Creates a network namespace, starts `shadowback up` inside it with one
# vif (vif0: a TAP the supervisor creates, served over vhost-user), gives the
# TAP 10.0.2.1/24, listens there with busybox nc, boots the test guest of
# build-image.sh under QEMU (TCG) with virtio-net-pci on the vhost-user
# socket and sb.net=10.0.2.15,10.0.2.1,5001,MIB, and has the supervisor kill
# the vif's data plane --kills N times (one every --kill-every S) once the
# guest starts sending. Afterwards: the guest's verdict and sha256 against
# the server's, the guest's carrier samples and "Link is Down" count, the
# TAP's carrier as the namespace saw it, the average frame the TAP took
# from the backend (beyond 1514 bytes: the guest's TCP super-frames,
# HOST_TSO4, reached the TAP whole), the supervisor's counters.
#
# Exits 0 on PASS, 1 on FAIL, 2 on timeout / no verdict, 3 if the guest
# image is not built, 4 if the supervisor did not come up. Needs root (ip
# netns, TAP). Prints `RESULT key=value ...` last.
#
# QEMU 7.2 (TCG) segfaults in vhost_net_start (msix_set_vector_notifiers)
# with vhost-user-net and MSI-X, so the device has vectors=0 (INTx).
#
# --queues N: a vif of N queue pairs (`queues = N`, a multi-queue TAP),
# QEMU's `-netdev vhost-user,queues=N` and `virtio-net-pci,mq=on`, and N
# guest CPUs (virtio_net uses min(CPUs, pairs) pairs, one per CPU);
# --conns M sends the data over M connections at once, connection I from
# guest CPU I mod N, so the flows leave on every pair (XPS) and their ACKs
# come back on it (the TAP steers a flow to the queue it came from). The
# guest's per-queue packet counters (ethtool statistics) are in RESULT:
# rx_queues_used / tx_queues_used count the queues that carried any.
#
# Usage: scripts/guest/run-net.sh [--kills N (12)] [--kill-every S (0.2)] [--mib N (64)]
#            [--queues N (1)] [--conns M (1)] [--timeout S] [--keep]
# Environment: SHADOWBACK_BIN (default target/release/shadowback if built,
# else target/debug/shadowback), RUST_LOG for the supervisor (warn), and
# common.sh's SHADOWBACK_GUEST_CACHE, SHADOWBACK_QEMU.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
. "$HERE/common.sh"

KILLS=12; KILL_EVERY=0.2; MIB=64; TIMEOUT=170; KEEP=0; QUEUES=1; CONNS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --kills)      KILLS=$2; shift 2 ;;
        --kill-every) KILL_EVERY=$2; shift 2 ;;
        --mib)        MIB=$2; shift 2 ;;
        --timeout)    TIMEOUT=$2; shift 2 ;;
        --queues)     QUEUES=$2; shift 2 ;;
        --conns)      CONNS=$2; shift 2 ;;
        --keep)       KEEP=1; shift ;;
        -h|--help)    sed -n '2,38p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
case "$QUEUES" in [1-7]) ;; *) die "--queues wants 1 to 7" ;; esac
case "$CONNS" in ''|*[!0-9]*|0) die "--conns wants a number from 1" ;; esac
[ $((MIB % CONNS)) = 0 ] || die "--mib must be a multiple of --conns"
require_guest_image
BIN=$(shadowback_bin "$REPO")
command -v busybox > /dev/null || die "busybox not found (build-image.sh installs busybox-static)"

C=$SHADOWBACK_GUEST_CACHE
RUN=$(mktemp -d "$C/net.XXXXXX")
LOG=$RUN/console.log; VSOCK=$RUN/vif0.sock; CTL=$RUN/control.sock; CFG=$RUN/shadowback.toml
NS=sbnet-$$; TAP=sbvu$$; TAP=${TAP:0:15}
SUP_PID=""; SERVER_PID=""; KILLER_PID=""; CARRIER_PID=""; RUN_OK=0
cleanup() {
    for p in $KILLER_PID $CARRIER_PID $SERVER_PID; do kill "$p" 2>/dev/null || true; done
    if [ -n "$SUP_PID" ]; then
        kill -TERM "$SUP_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SUP_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SUP_PID" 2>/dev/null || true
    fi
    ip netns del "$NS" 2>/dev/null || true
    if [ $RUN_OK = 1 ] && [ $KEEP = 0 ]; then rm -rf "$RUN"; else log "logs kept in $RUN"; fi
}
trap cleanup EXIT
ip netns add "$NS" || die "ip netns add failed (root needed)"
nsx() { ip netns exec "$NS" "$@"; }
nsx ip link set lo up

cat > "$CFG" <<EOF
socket = "$CTL"
[[nic]]
name = "vif0"
tap = "$TAP"
vhost_user = "$VSOCK"
queues = $QUEUES
EOF
RUST_LOG=${RUST_LOG:-warn} ip netns exec "$NS" "$BIN" up "$CFG" > "$RUN/supervisor.log" 2>&1 &
SUP_PID=$!
i=0
until [ -S "$VSOCK" ] && [ -S "$CTL" ]; do
    kill -0 "$SUP_PID" 2>/dev/null || { sed 's/^/    /' "$RUN/supervisor.log" >&2; echo "RESULT verdict=NONE error=supervisor-exited"; exit 4; }
    sleep 0.05; i=$((i+1))
    [ $i -lt 200 ] || { echo "RESULT verdict=NONE error=supervisor-no-socket"; exit 4; }
done
nsx ip addr add 10.0.2.1/24 dev "$TAP"
nsx ip link set "$TAP" up
# busybox nc shuts its sending side down when its stdin ends, and the
# guest's nc stops when the server's side ends: the server's stdin is a
# FIFO this script holds open and never writes.
mkfifo "$RUN/hold"
for i in $(seq 0 $((CONNS - 1))); do
    nsx busybox nc -l -p $((5001 + i)) < "$RUN/hold" > "$RUN/received.$i" &
    SERVER_PID+=" $!"
done
exec 9> "$RUN/hold"
# The TAP's carrier, as the namespace sees it, every 20 ms.
( while :; do
      [ "$(nsx cat "/sys/class/net/$TAP/carrier" 2>/dev/null)" = 1 ] || echo "down $EPOCHREALTIME" >> "$RUN/tap-carrier"
      sleep 0.02
  done ) &
CARRIER_PID=$!

# --- the fault injector: once the guest sends --------------------------------
(
    trap 'exit 0' TERM
    until grep -q 'SHADOWBACK-GUEST: net sending' "$LOG" 2>/dev/null; do sleep 0.05; done
    n=0; bad=0
    while [ $n -lt "$KILLS" ] && [ $bad -le "$KILLS" ]; do
        sleep "$KILL_EVERY"
        grep -q 'SHADOWBACK-GUEST: \(PASS\|FAIL\)' "$LOG" && break
        if out=$("$BIN" fault --socket "$CTL" vif0 kill 2>&1); then
            n=$((n+1)); echo "[injector] kill #$n at $EPOCHREALTIME: $out" >> "$RUN/kills.log"
        else
            bad=$((bad+1)); echo "[injector] refused at $EPOCHREALTIME: $out" >> "$RUN/kills.log"
        fi
    done
) &
KILLER_PID=$!

# --- the guest -----------------------------------------------------------------
MQ_OPT=""; [ "$QUEUES" -gt 1 ] && MQ_OPT=",mq=on"
QEMU_CMD=("$SHADOWBACK_QEMU" -accel "$(tcg_accel)" -m 512 -smp "$QUEUES"
    -object memory-backend-memfd,id=mem,size=512M,share=on
    -machine q35,memory-backend=mem
    -chardev "socket,id=n0,path=$VSOCK"
    -netdev "vhost-user,id=net0,chardev=n0,queues=$QUEUES"
    -device "virtio-net-pci,netdev=net0,mac=52:54:00:5b:00:01,vectors=0$MQ_OPT"
    -kernel "$C/vmlinuz" -initrd "$C/initramfs.cpio.gz"
    -append "console=ttyS0 quiet panic=-1 sb.net=10.0.2.15,10.0.2.1,5001,$MIB,$CONNS"
    -nographic -no-reboot)
log "qemu: ${QEMU_CMD[*]}"
STAMP_T0=$(now_us)
set +e
timeout --kill-after=5 "$TIMEOUT" "${QEMU_CMD[@]}" < /dev/null 2>&1 | stamp > "$LOG"
QRC=${PIPESTATUS[0]}
set -e
kill "$KILLER_PID" 2>/dev/null || true; wait "$KILLER_PID" 2>/dev/null || true; KILLER_PID=""
kill "$CARRIER_PID" 2>/dev/null || true; wait "$CARRIER_PID" 2>/dev/null || true; CARRIER_PID=""
for p in $SERVER_PID; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill "$p" 2>/dev/null || true
done
SERVER_PID=""

DONE_KILLS=$(grep -c 'kill #' "$RUN/kills.log" 2>/dev/null || true)
VERDICT_LINE=$(grep -o 'SHADOWBACK-GUEST: \(PASS\|FAIL\).*' "$LOG" | tail -1 || true)
field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<< "$VERDICT_LINE"; }
RECEIVED_FILES=()
for i in $(seq 0 $((CONNS - 1))); do RECEIVED_FILES+=("$RUN/received.$i"); done
GUEST_SUM=$(field sha256); SERVER_SUM=$(cat "${RECEIVED_FILES[@]}" | sha256sum | cut -d' ' -f1)
RECEIVED=$(cat "${RECEIVED_FILES[@]}" | wc -c)
# The guest's per-queue packet counters ("NETSTAT rx_queue_0_packets N").
QSTATS=$(sed -n 's/.*NETSTAT \([rt]x\)_queue_\([0-9]*\)_packets \([0-9]*\).*/\1_q\2=\3/p' "$LOG" | sort -u | tr '\n' ' ')
used() { local n=0 kv; for kv in $QSTATS; do
    case "$kv" in "$1"_q*) [ "${kv#*=}" -gt 0 ] && n=$((n + 1)) ;; esac; done; echo $n; }
TAP_QUEUES=$(nsx ls "/sys/class/net/$TAP/queues" 2>/dev/null | grep -c '^rx-' || true)
TAP_DOWN=$(wc -l < "$RUN/tap-carrier" 2>/dev/null || echo 0)
TAP_RX_PACKETS=$(nsx cat "/sys/class/net/$TAP/statistics/rx_packets" 2>/dev/null || echo 0)
TAP_RX_BYTES=$(nsx cat "/sys/class/net/$TAP/statistics/rx_bytes" 2>/dev/null || echo 0)
TAP_RX_AVG=$((TAP_RX_BYTES / (TAP_RX_PACKETS > 0 ? TAP_RX_PACKETS : 1)))
STATUS=$("$BIN" status --format keys --socket "$CTL" 2>&1 || true)
stat_of() { awk -v k="$1" '$1 == k { print $2; exit }' <<< "$STATUS"; }
VHOST_ERRORS=$(grep -ciE 'vhost.*(error|fail)|Failed to' "$LOG" || true)
RESULT="kills=$DONE_KILLS bytes=$RECEIVED guest_sum=${GUEST_SUM:-none} server_sum=$SERVER_SUM"
RESULT+=" guest_carrier_down=$(field carrier_down) link_down=$(field link_down) tap_carrier_down=$TAP_DOWN"
RESULT+=" tap_rx_packets=$TAP_RX_PACKETS tap_rx_avg=$TAP_RX_AVG"
RESULT+=" seconds=$(field seconds) recoveries=$(stat_of recoveries) crashes=$(stat_of crashes)"
RESULT+=" failed_takeovers=$(stat_of failed-takeovers) tx_replayed=$(stat_of tx-replayed)"
RESULT+=" rx_buffers_recovered=$(stat_of rx-buffers-recovered) qemu_vhost_errors=$VHOST_ERRORS"
RESULT+=" pairs=$QUEUES conns=$CONNS tap_queues=$TAP_QUEUES rx_queues_used=$(used rx) tx_queues_used=$(used tx)"
RESULT+=" $QSTATS"
log "shadowback status:"; sed 's/^/    /' <<< "$STATUS" >&2
log "console tail:"; tail -15 "$LOG" | sed 's/^/    /' >&2
if [ -z "$VERDICT_LINE" ]; then
    echo "RESULT verdict=NONE qemu_rc=$QRC $RESULT"; exit 2
fi
if [[ "$VERDICT_LINE" == *PASS* ]] && [ "$GUEST_SUM" = "$SERVER_SUM" ] \
   && [ "$RECEIVED" -eq $((MIB * 1048576)) ] && [ "$(field link_down)" = 0 ] \
   && [ "$(field carrier_down)" = 0 ] && [ "$TAP_DOWN" = 0 ] && [ "$DONE_KILLS" -ge "$KILLS" ] \
   && [ "$VHOST_ERRORS" = 0 ]; then
    RUN_OK=1; echo "RESULT verdict=PASS $RESULT"; exit 0
fi
echo "RESULT verdict=FAIL $RESULT"; exit 1
