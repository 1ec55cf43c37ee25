#!/bin/busybox sh
# /init of the shadowback test guest (copied into the initramfs by build-image.sh).
# Kernel command line knobs: sb.rounds=N (default 4), sb.duration=S (run whole
# rounds for S seconds instead of sb.rounds; 0 = off, the default),
# sb.workers=N (processes, default 2), sb.depth=N (AIO batch per worker,
# default 16; requests in flight = workers x depth), sb.blocks=N (4 KiB
# blocks per worker, default 1024),
# sb.sched=none|mq-deadline (I/O scheduler, default none: the plugged batch
# goes to virtio-blk in one go), sb.timeout=S (give up on a stuck workload
# after S s and report FAIL; 0 = never, the default), sb.dev=/dev/vda,
# sb.shell=1 (drop to a shell instead of powering off),
# sb.net=GUEST_IP,SERVER_IP,PORT,MIB[,CONNS] (a TCP transfer over eth0
# instead; below).
# With more than one CPU, worker W runs on CPU W mod the CPUs (GUEST_IO_PIN):
# blk-mq submits on the virtqueue mapped to the submitting CPU, so a worker
# per CPU puts requests on every virtqueue; each queue's interrupts (its
# MSI-X vector's) during the workload are reported after it.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "SHADOWBACK-GUEST: init at $(cut -d' ' -f1 /proc/uptime)s kernel $(uname -r)"

ROUNDS=4; DURATION=0; WORKERS=2; DEPTH=16; BLOCKS=1024; SCHED=none; WTIMEOUT=0; DEV=/dev/vda; SHELL_AT_END=0; NET=
for a in $(cat /proc/cmdline); do
    case "$a" in
        sb.rounds=*)  ROUNDS=${a#*=} ;;
        sb.duration=*) DURATION=${a#*=} ;;
        sb.workers=*) WORKERS=${a#*=} ;;
        sb.timeout=*) WTIMEOUT=${a#*=} ;;
        sb.sched=*)   SCHED=${a#*=} ;;
        sb.depth=*)   DEPTH=${a#*=} ;;
        sb.blocks=*)  BLOCKS=${a#*=} ;;
        sb.dev=*)     DEV=${a#*=} ;;
        sb.shell=*)   SHELL_AT_END=${a#*=} ;;
        sb.net=*)     NET=${a#*=} ;;
    esac
done

finish() {
    echo "SHADOWBACK-GUEST: $1"
    if [ "$SHELL_AT_END" = 1 ]; then exec sh; fi
    [ "${STUCK:-0}" = 1 ] || sync   # sync would hang behind stuck requests
    poweroff -f
}
# Kernel messages that mean the device or the data path broke: a used-ring
# entry that is no descriptor head (virtio_ring marks the queue broken), and
# failed block requests (blk_update_request / "I/O error, dev vda").
dmesg_report() {
    NOHEAD=$(dmesg | grep -c 'is not a head')
    IOERR=$(dmesg | grep -cE 'I/O error|blk_update_request')
    if [ $NOHEAD -gt 0 ] || [ $IOERR -gt 0 ]; then
        dmesg | grep -E 'is not a head|I/O error|blk_update_request' | head -20
    fi
}

for m in $(cat /etc/modules); do
    insmod /lib/modules/$m.ko || finish "FAIL insmod $m"
done

# sb.net=GUEST_IP,SERVER_IP,PORT,MIB[,CONNS]: no disk; send MIB MiB of random
# data over TCP (busybox nc) to SERVER_IP on eth0 (virtio-net), with its
# sha256, while /sys/class/net/eth0/carrier is sampled every 50 ms. CONNS
# (default 1) connections at once, to ports PORT.. PORT+CONNS-1, MIB/CONNS
# MiB each (the sha256 is that of the parts in port order); connection I
# runs on CPU I mod the CPUs, so with multiqueue (one queue pair per CPU,
# virtio_net's XPS) the flows leave on every transmit queue. Afterwards the
# driver's per-queue packet counters (NETSTAT lines, guest-io netstats).
if [ -n "$NET" ]; then
    OLDIFS=$IFS; IFS=,; set -- $NET; IFS=$OLDIFS
    GIP=$1; SIP=$2; PORT=$3; MIB=$4; CONNS=${5:-1}
    NCPU=$(nproc)
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    [ -e /sys/class/net/eth0 ] || finish "FAIL no eth0 (modules: $(cat /etc/modules | tr '\n' ' '))"
    ip link set lo up
    ip addr add "$GIP/24" dev eth0
    ip link set eth0 up
    PART=$((MIB / CONNS)); i=0
    while [ $i -lt "$CONNS" ]; do
        dd if=/dev/urandom of=/tmp/data.$i bs=1048576 count="$PART" 2>/dev/null; i=$((i + 1))
    done
    SUM=$(i=0; while [ $i -lt "$CONNS" ]; do cat /tmp/data.$i; i=$((i + 1)); done | sha256sum | cut -d' ' -f1)
    echo "SHADOWBACK-GUEST: net queues $(ls /sys/class/net/eth0/queues | tr '\n' ' ')cpus $NCPU"
    ( while :; do
          [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = 1 ] || echo down >> /tmp/carrier
          sleep 0.05
      done ) &
    SAMPLER=$!
    echo "SHADOWBACK-GUEST: net sending $((PART * CONNS)) MiB to $SIP:$PORT over $CONNS connections at $(cut -d' ' -f1 /proc/uptime)s sha256=$SUM"
    T0=$(cut -d' ' -f1 /proc/uptime)
    i=0; PIDS=
    while [ $i -lt "$CONNS" ]; do
        ( taskset -c $((i % NCPU)) nc "$SIP" $((PORT + i)) < /tmp/data.$i; echo $? > /tmp/rc.$i ) &
        PIDS="$PIDS $!"; i=$((i + 1))
    done
    wait $PIDS
    RC=0; i=0
    while [ $i -lt "$CONNS" ]; do
        [ "$(cat /tmp/rc.$i 2>/dev/null)" = 0 ] || RC="$RC,$i:$(cat /tmp/rc.$i 2>/dev/null)"; i=$((i + 1))
    done
    T1=$(cut -d' ' -f1 /proc/uptime)
    /bin/guest-io netstats eth0
    kill $SAMPLER 2>/dev/null
    DOWN=$(cat /tmp/carrier 2>/dev/null | wc -l)
    LINKDOWN=$(dmesg | grep -c 'Link is Down')
    dmesg | grep -iE 'virtio_net|eth0|Link is' | tail -5
    [ "$RC" = 0 ] || finish "FAIL nc exited $RC bytes=$((PART * CONNS * 1048576)) carrier_down=$DOWN link_down=$LINKDOWN"
    finish "PASS net bytes=$((PART * CONNS * 1048576)) sha256=$SUM seconds=$(awk -v a=$T0 -v b=$T1 'BEGIN{print b-a}') carrier_down=$DOWN link_down=$LINKDOWN"
fi

i=0
while [ ! -b "$DEV" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b "$DEV" ] || finish "FAIL no block device $DEV (modules: $(cat /etc/modules | tr '\n' ' '))"
SECTORS=$(cat /sys/class/block/${DEV##*/}/size)
echo "$SCHED" > /sys/block/${DEV##*/}/queue/scheduler 2>/dev/null
echo "SHADOWBACK-GUEST: scheduler $(cat /sys/block/${DEV##*/}/queue/scheduler), nr_requests $(cat /sys/block/${DEV##*/}/queue/nr_requests)"
echo "SHADOWBACK-GUEST: $DEV ready at $(cut -d' ' -f1 /proc/uptime)s, $((SECTORS / 2048)) MiB;" \
     "workload: $WORKERS workers x depth $DEPTH, $BLOCKS blocks/worker x" \
     "$([ "$DURATION" -gt 0 ] && echo "rounds for ${DURATION}s" || echo "$ROUNDS rounds"), O_DIRECT AIO 4 KiB"
NEED=$((WORKERS * BLOCKS * 8))
[ "$SECTORS" -ge "$NEED" ] || finish "FAIL disk too small: $SECTORS sectors < $NEED"

[ "$(nproc)" -gt 1 ] && export GUEST_IO_PIN=1
echo "SHADOWBACK-GUEST: cpus $(nproc), queue -> cpus:" \
     "$(for q in /sys/block/${DEV##*/}/mq/*; do echo "${q##*/}:$(cat $q/cpu_list)"; done | tr '\n' ' ')"
# Interrupts per virtqueue (virtio_blk's vectors are "virtioN-req.Q"), all
# CPUs added, one "Q N" line each.
queue_irqs() {
    awk '$NF ~ /-req\.[0-9]+$/ {
        n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        q = $NF; sub(/.*-req\./, "", q); print q, n }' /proc/interrupts
}
queue_irqs > /tmp/irqs.before
/bin/guest-io "$DEV" "$WORKERS" "$DEPTH" "$BLOCKS" "$ROUNDS" "$DURATION" > /tmp/io.out 2> /tmp/io.err &
IOPID=$!
T=0
while kill -0 $IOPID 2>/dev/null; do
    sleep 1; T=$((T + 1))
    if [ "$WTIMEOUT" -gt 0 ] && [ $T -ge "$WTIMEOUT" ]; then
        STUCK=1; dmesg_report
        head -20 /tmp/io.err
        tail -2 /tmp/io.out
        echo "SHADOWBACK-GUEST: now $(cut -d' ' -f1 /proc/uptime)s uptime"
        finish "FAIL workload not finished after ${T}s (sb.timeout; see the last progress line) dmesg_not_a_head=$NOHEAD dmesg_io_error=$IOERR"
    fi
done
wait $IOPID
RC=$?
cat /tmp/io.err | head -40
grep -v progress /tmp/io.out
BLK=$(sed -n 's/^GUEST-IO: blocks=\([0-9]*\).*/\1/p' /tmp/io.out)
echo "SHADOWBACK-GUEST: workload done at $(cut -d' ' -f1 /proc/uptime)s"
# The interrupts of each virtqueue during the workload (not boot's own
# reads). An idle queue still gets one per data-plane recovery (the new data
# plane signals every queue): analyze_run in common.sh allows for that.
queue_irqs > /tmp/irqs.after
echo "SHADOWBACK-GUEST: queue interrupts" $(awk 'NR == FNR { b[$1] = $2; next }
    { printf "q%s=%d ", $1, $2 - b[$1] }' /tmp/irqs.before /tmp/irqs.after)

dmesg_report
if [ $RC -eq 0 ] && [ $NOHEAD -eq 0 ] && [ $IOERR -eq 0 ]; then
    finish "PASS blocks=$BLK"
else
    finish "FAIL rc=$RC $(grep "GUEST-IO: blocks" /tmp/io.out) dmesg_not_a_head=$NOHEAD dmesg_io_error=$IOERR"
fi
