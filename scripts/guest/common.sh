# Shared settings and steps for scripts/guest/*.sh (sourced, not executed).
# Everything built or downloaded lives in the cache dir, never in the repo.
SHADOWBACK_GUEST_CACHE=${SHADOWBACK_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shadowback/guest}
# Kernel package: default = whatever bookworm's linux-image-amd64 points at
# (a 6.1.0-N-amd64 package); override with e.g. linux-image-6.1.0-56-amd64.
SHADOWBACK_KERNEL_PKG=${SHADOWBACK_KERNEL_PKG:-}
# QEMU system emulator.  Default: $cache/qemu/bin/qemu-system-x86_64, a wrapper
# around bookworm's qemu-system-x86 7.2 unpacked with dpkg -x (see docs/GUEST.md
# for why it is not apt-installed).  Set to a path to use another QEMU.
SHADOWBACK_QEMU=${SHADOWBACK_QEMU:-$SHADOWBACK_GUEST_CACHE/qemu/bin/qemu-system-x86_64}
# qemu-storage-daemon (the reference backend of run-qsd.sh): the installed one
# (qemu-utils >= 8.0 ships it), else 7.2's from the unpacked qemu-system-common.
SHADOWBACK_QSD=${SHADOWBACK_QSD:-$(command -v qemu-storage-daemon || echo "$SHADOWBACK_GUEST_CACHE/qemu/bin/qemu-storage-daemon")}
# Host build of guest-io.c: `guest-io check` verifies the image after a run.
GUEST_IO_HOST=$SHADOWBACK_GUEST_CACHE/bin/guest-io

# The shadowback binary a run uses: $SHADOWBACK_BIN, else the release or
# debug build in the repo at $1; dies if there is none.
shadowback_bin() {
    local b=${SHADOWBACK_BIN:-}
    if [ -z "$b" ]; then
        for b in "$1/target/release/shadowback" "$1/target/debug/shadowback" ""; do
            [ -n "$b" ] && [ -x "$b" ] && break
        done
    fi
    [ -n "$b" ] && [ -x "$b" ] || die "shadowback binary not found: set SHADOWBACK_BIN or run cargo build"
    echo "$b"
}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Every file a run needs from build-image.sh; a missing one is an error that
# says how to build it (callers exit 3 so a test can tell it from a FAIL).
require_guest_image() {
    local f missing=()
    for f in "$SHADOWBACK_GUEST_CACHE/vmlinuz" "$SHADOWBACK_GUEST_CACHE/initramfs.cpio.gz" \
             "$SHADOWBACK_QEMU" "$GUEST_IO_HOST"; do
        [ -e "$f" ] || missing+=("$f")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "error: guest image missing: ${missing[*]}"
        log "error: build it with scripts/install-test-deps.sh (or scripts/guest/build-image.sh)"
        exit 3
    fi
}

# "reconnect=1" for QEMU < 9.2, "reconnect-ms=1000" after (9.2 deprecates the former).
qemu_reconnect_opt() {
    local v
    v=$("$SHADOWBACK_QEMU" --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    set -- $v
    if [ "${1:-0}" -gt 9 ] || { [ "${1:-0}" -eq 9 ] && [ "${2:-0}" -ge 2 ]; }; then
        echo reconnect-ms=1000
    else
        echo reconnect=1
    fi
}

# Microseconds since the epoch, from bash's clock (no fork).
now_us() { local t=${EPOCHREALTIME/./}; echo "$((10#$t))"; }

# Prefixes console lines with host seconds since $STAMP_T0 (microseconds).
stamp() {
    local line t
    while IFS= read -r line; do
        t=${EPOCHREALTIME/./}; t=$((10#$t - STAMP_T0))
        printf '[%4d.%03d] %s\n' $((t / 1000000)) $((t / 1000 % 1000)) "${line%$'\r'}"
    done
}

# QEMU's -accel for every test guest: TCG with one host thread for all
# vCPUs (thread=single: they run round-robin). With a host thread per vCPU
# (MTTCG, the default) a guest of more vCPUs than the host has free cores
# stalls on itself: a vCPU spinning for the others' answer to an IPI
# (smp_call_function_many_cond, e.g. from text_poke_bp_batch while booting)
# waits for host threads the host does not run, and the guest's soft-lockup
# detector fires ("CPU#0 stuck for 26s ... 104s") before any I/O. Round-robin
# on one thread, every vCPU gets its turn whatever the host's load; a starved
# host makes the guest slower, not stuck. docs/ARCHITECTURE.md §8.1.
tcg_accel() { echo tcg,thread=single; }

# boot_guest SOCK CHARDEV_EXTRA APPEND TIMEOUT LOG PIDFILE
# Boots the test guest under TCG against the vhost-user-blk socket SOCK, with
# guest RAM in a shared memfd (vhost-user needs the backend to map it), and
# writes the time-stamped serial console (and QEMU's own stderr) to LOG.
# SB_SMP (guest CPUs, 1) and SB_BLK_OPTS (extra vhost-user-blk-pci options)
# are optional. Returns QEMU's exit status (124 = timeout).
boot_guest() {
    local sock=$1 extra=$2 append=$3 timeout=$4 logf=$5 pidf=$6 chardev
    chardev="socket,id=c0,path=$sock${extra:+,$extra}"
    QEMU_CMD=("$SHADOWBACK_QEMU" -accel "$(tcg_accel)" -m 512 -smp "${SB_SMP:-1}"
        -object memory-backend-memfd,id=mem,size=512M,share=on
        -machine q35,memory-backend=mem
        -chardev "$chardev" -device "vhost-user-blk-pci,chardev=c0${SB_BLK_OPTS:+,$SB_BLK_OPTS}"
        -nic none -kernel "$SHADOWBACK_GUEST_CACHE/vmlinuz"
        -initrd "$SHADOWBACK_GUEST_CACHE/initramfs.cpio.gz" -append "$append"
        -nographic -no-reboot -pidfile "$pidf")
    log "qemu: ${QEMU_CMD[*]}"
    log "console log: $logf"
    STAMP_T0=$(now_us)
    local rc
    set +e
    timeout --kill-after=5 "$timeout" "${QEMU_CMD[@]}" < /dev/null 2>&1 | stamp > "$logf"
    rc=${PIPESTATUS[0]}
    set -e
    BOOT_T1=$(now_us)
    return "$rc"
}

# guest_append ROUNDS DURATION WORKERS DEPTH BLOCKS TIMEOUT -> kernel command line
# (the guest's watchdog gives up 20 s before the host's timeout).
guest_append() {
    local t=${6%.*} gt
    gt=$(( t > 40 ? t - 20 : t / 2 ))
    echo "console=ttyS0 panic=-1 sb.timeout=$gt sb.rounds=$1 sb.duration=$2 sb.workers=$3 sb.depth=$4 sb.blocks=$5"
}

# analyze_run LOG IMAGE QEMU_RC KILLS KILLS_FAILED [EXTRA_RESULT_FIELDS]
# After QEMU exited: shows the interesting console lines, counts the bad
# kernel and QEMU messages, checks the image on the host against the guest's
# "final" lines, and prints
#   RESULT verdict=… kills=… not_a_head=… io_errors=… qemu_vhost_errors=…
#          host_check=… … lat_p50_us=… lat_p99_us=… lat_max_us=…
#   SHADOWBACK-GUEST: PASS …   (or FAIL …, or "no verdict")
# Sets RUN_OK=1 only if the guest said PASS, no bad message appeared and the
# host check passed.
analyze_run() {
    local logf=$1 img=$2 qrc=$3 kills=$4 kfail=$5 extra=${6:-}
    grep -E 'SHADOWBACK-GUEST|GUEST-IO|is not a head|I/O error|blk_update_request|vhost|virtio_blk|Kernel panic|qemu-system' \
        "$logf" | grep -v 'GUEST-IO: progress' | head -80 >&2 || true
    local nohead ioerr qerr verdict rounds host="skipped" hostline="" blocks=0 hblocks=0 hbad=0
    # Kernel lines reach the console directly and again through the init's
    # dmesg report: count each (kernel time stamp + text) once.
    kmsgs() { { grep -E "$1" "$logf" || true; } | sed 's/^\[ *[0-9.]*\] //' | sort -u | wc -l; }
    nohead=$(kmsgs 'is not a head')
    ioerr=$(kmsgs 'I/O error|blk_update_request')
    # QEMU's own complaints about the vhost-user connection (EOF, reconnect,
    # ring restore): a backend restart the VMM noticed.
    qerr=$(grep -E '^\[ *[0-9.]*\] qemu-system-x86_64: ' "$logf" | grep -ciE 'vhost|end-of-file|msg fds|disconnect' || true)
    verdict=$(grep -o 'SHADOWBACK-GUEST: \(PASS\|FAIL\).*' "$logf" | tail -1 || true)
    rounds=$(sed -n 's/.*GUEST-IO: final worker=[0-9]* round=\(-\{0,1\}[0-9]*\) blocks=\([0-9]*\).*/\1/p' "$logf" | tr '\n' ' ' || true)
    blocks=$(sed -n 's/.*GUEST-IO: final worker=[0-9]* round=-\{0,1\}[0-9]* blocks=\([0-9]*\).*/\1/p' "$logf" | head -1 || true)
    if [ -n "$rounds" ] && [ -n "$blocks" ] && [ -e "$img" ]; then
        # shellcheck disable=SC2086 # one argument per worker
        if hostline=$("$GUEST_IO_HOST" check "$img" "$blocks" $rounds); then
            host=PASS
        else
            host=FAIL
        fi
        log "host check of $img (rounds per worker: $rounds): $hostline"
        hblocks=$(sed -n 's/.* blocks=\([0-9]*\).*/\1/p' <<< "$hostline")
        hbad=$(sed -n 's/.* bad=\([0-9]*\).*/\1/p' <<< "$hostline")
    else
        log "host check skipped: no 'GUEST-IO: final' lines in the console (the workload did not finish)"
    fi
    local lat p50 p99 max o100 o1s
    lat=$(grep -o 'GUEST-IO: latency_us .*' "$logf" | tail -1 || true)
    p50=$(sed -n 's/.* p50=\([0-9]*\).*/\1/p' <<< "$lat"); p99=$(sed -n 's/.* p99=\([0-9]*\).*/\1/p' <<< "$lat")
    max=$(sed -n 's/.* max=\([0-9]*\).*/\1/p' <<< "$lat"); o100=$(sed -n 's/.* over_100ms=\([0-9]*\).*/\1/p' <<< "$lat")
    o1s=$(sed -n 's/.* over_1s=\([0-9]*\).*/\1/p' <<< "$lat")
    # The virtqueues Linux drives ("virtio_blk virtio0: 2/0/0 default/read/poll queues").
    local gq
    gq=$(sed -n 's/.*virtio_blk [^:]*: \([0-9]*\)\/[0-9]*\/[0-9]* default\/read\/poll queues.*/\1/p' "$logf" | head -1 || true)
    # The interrupts of each virtqueue during the workload ("queue
    # interrupts q0=N q1=N ..."): queues_used counts those with at least a
    # quarter of an even share. The workers are pinned a CPU each, so every
    # queue gets about the same; an idle queue still gets one per recovery
    # (the new data plane signals every queue), far below that.
    local qirq used=0 qi nq=0 sum=0
    qirq=$(grep -o 'SHADOWBACK-GUEST: queue interrupts.*' "$logf" | tail -1 | cut -d' ' -f4- || true)
    for qi in $qirq; do nq=$((nq + 1)); sum=$((sum + ${qi#*=})); done
    for qi in $qirq; do
        if [ $(( ${qi#*=} * 4 * nq )) -ge "$sum" ] && [ "${qi#*=}" -gt 0 ]; then used=$((used + 1)); fi
    done
    qirq=$(tr ' ' ',' <<< "$qirq" | sed 's/,*$//')
    local init ready done v=NONE
    init=$(sed -n 's/^\[ *\([0-9.]*\)\] SHADOWBACK-GUEST: init at.*/\1/p' "$logf" | head -1 || true)
    ready=$(sed -n 's/^\[ *\([0-9.]*\)\] SHADOWBACK-GUEST: \/dev\/.* ready at.*/\1/p' "$logf" | head -1 || true)
    done=$(sed -n 's/^\[ *\([0-9.]*\)\] SHADOWBACK-GUEST: workload done.*/\1/p' "$logf" | head -1 || true)
    local total=$(( (BOOT_T1 - STAMP_T0) / 1000 ))
    log "timings (host s since QEMU start): init=${init:-?} disk-ready=${ready:-?} workload-done=${done:-?} total=$((total / 1000)).$(printf %03d $((total % 1000))) qemu-rc=$qrc"
    case "$verdict" in *PASS*) v=PASS ;; *FAIL*) v=FAIL ;; esac
    echo "RESULT verdict=$v kills=$kills kills_failed=$kfail not_a_head=$nohead io_errors=$ioerr" \
         "qemu_vhost_errors=$qerr host_check=$host host_blocks=${hblocks:-0} host_bad=${hbad:-0}" \
         "lat_p50_us=${p50:-?} lat_p99_us=${p99:-?} lat_max_us=${max:-?} over_100ms=${o100:-?} over_1s=${o1s:-?}" \
         "guest_queues=${gq:-?} queues_used=$used queue_irqs=${qirq:-none} boot_s=${init:-?} workload_done_s=${done:-?} qemu_rc=$qrc${extra:+ $extra}"
    echo "${verdict:-SHADOWBACK-GUEST: no verdict (qemu rc=$qrc)}"
    RUN_OK=0
    if [ $v = PASS ] && [ "$nohead" -eq 0 ] && [ "$ioerr" -eq 0 ] && [ $host = PASS ]; then RUN_OK=1; fi
}
