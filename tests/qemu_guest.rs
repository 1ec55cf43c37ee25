//! A real Linux guest (Debian's 6.1 kernel, virtio_blk, under QEMU TCG) on
//! shadowback's vhost-user-blk export (one, two and four virtqueues, one
//! test each), with the data-plane process SIGKILLed two dozen times while
//! the guest keeps 32 O_DIRECT requests in flight;
//! and with the supervisor itself killed and restarted (QEMU reconnects),
//! or upgraded in place (QEMU notices nothing).
//!
//! The run is `scripts/guest/run-shadowback.sh` (docs/GUEST.md): it starts
//! `shadowback up` with one vhost-user disk, boots the guest built by
//! `scripts/guest/build-image.sh` (run by `scripts/install-test-deps.sh`),
//! injects the kills through the supervisor (`shadowback fault … kill`),
//! and reads the guest's verdict, the console, the supervisor's counters and
//! the image itself. A missing guest image fails the test; it never skips.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

const EXE: &str = env!("CARGO_BIN_EXE_shadowback");
const KILLS: u32 = 24;
/// The brief's floor: at least this many kills must really have happened.
const MIN_KILLS: u64 = 20;

/// One QEMU guest at a time. The harness runs tests in parallel, and the
/// runs could share the machine (each has its own run dir, sockets and
/// image), but each guest keeps a host core busy (TCG runs all its vCPUs on
/// one host thread) and its supervisor and data plane want another: two or
/// three guests at once on the CI machine's 2 cores starve each other. A
/// test would then measure whatever the other tests happen to be doing
/// (fewer requests in flight per kill, a different interleaving), and a
/// failure would not reproduce by running it alone. Load is what
/// `scripts/guest/stress.sh` is for.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The guest cache, as `scripts/guest/common.sh` computes it.
fn guest_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHADOWBACK_GUEST_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .expect("neither HOME nor XDG_CACHE_HOME is set");
    base.join("shadowback/guest")
}

const IMAGE_MISSING: &str = "the QEMU guest image is not built: run scripts/install-test-deps.sh \
     (or scripts/guest/build-image.sh); see docs/GUEST.md";

/// A guest that passed but printed no per-queue counts runs an image built
/// from older scripts: say so, rather than fail an assertion on the counts.
fn assert_image_current(fields: &HashMap<String, String>, counts: &str, t: &str) {
    let passed = fields.get("verdict").map(String::as_str) == Some("PASS");
    let missing = fields.get(counts).is_none_or(|v| v == "none");
    assert!(
        !(passed && missing),
        "the guest printed no per-queue counts ({counts}): its image predates them; \
         rebuild it with scripts/guest/build-image.sh\n{t}"
    );
}

/// The `key=value` fields of the script's `RESULT …` line.
fn result_fields(stdout: &str) -> Option<HashMap<String, String>> {
    let line = stdout.lines().rev().find(|l| l.starts_with("RESULT "))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn number(fields: &HashMap<String, String>, key: &str, transcript: &str) -> u64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RESULT has no numeric {key}\n{transcript}"))
}

/// The script's output for a failure message: stdout, and the tail of stderr.
fn transcript(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(120)..].join("\n");
    format!(
        "--- exit status: {}\n--- stdout:\n{}--- stderr (last 120 lines):\n{tail}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    )
}

/// One run of `scripts/guest/run-shadowback.sh` with `args`: its `RESULT`
/// fields, a transcript for failure messages, and its output.
fn run_guest(args: &[&str]) -> (HashMap<String, String>, String, Output) {
    let script = repo().join("scripts/guest/run-shadowback.sh");
    // A failed test poisons the lock; the next guest may still run.
    let _one = ONE_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .args(["--timeout", "150"])
        .env("SHADOWBACK_BIN", EXE)
        .output()
        .expect("run scripts/guest/run-shadowback.sh");
    eprintln!(
        "run-shadowback.sh {}: {:.1} s",
        args.join(" "),
        start.elapsed().as_secs_f64()
    );
    match out.status.code() {
        Some(3) => panic!("{IMAGE_MISSING}\n{}", transcript(&out)),
        Some(4) => panic!(
            "`shadowback up` did not serve the vhost-user disk\n{}",
            transcript(&out)
        ),
        _ => {}
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields = result_fields(&stdout)
        .unwrap_or_else(|| panic!("no RESULT line from the run\n{}", transcript(&out)));
    let t = transcript(&out);
    (fields, t, out)
}

/// What the guest saw: its verdict, no broken virtqueue, no I/O error, and
/// every block of the image as the guest last wrote it.
fn assert_guest_clean(fields: &HashMap<String, String>, t: &str) {
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("verdict"), "PASS", "guest verdict\n{t}");
    assert_eq!(
        number(fields, "not_a_head", t),
        0,
        "`is not a head` in the guest\n{t}"
    );
    assert_eq!(number(fields, "io_errors", t), 0, "guest I/O errors\n{t}");
    assert_eq!(get("host_check"), "PASS", "host check of the image\n{t}");
    assert!(
        number(fields, "host_blocks", t) > 0,
        "host check read nothing\n{t}"
    );
    assert_eq!(
        number(fields, "host_bad", t),
        0,
        "stale or corrupt blocks\n{t}"
    );
}

/// `queues` virtqueues and as many guest CPUs, so Linux drives them all,
/// with a workload process pinned to each CPU, so every queue carries
/// requests; the data plane SIGKILLed [`KILLS`] times, 0.4 s apart, during
/// the workload. The vCPUs share one host thread (`tcg_accel` in
/// `scripts/guest/common.sh`): with a thread each, a loaded host left a
/// 4-vCPU guest stuck in its own IPIs while booting.
fn data_plane_kills(queues: u64) {
    let (fields, t, out) = run_guest(&[
        "--queues",
        &queues.to_string(),
        "--kills",
        &KILLS.to_string(),
        "--kill-every",
        "0.4",
    ]);
    assert_image_current(&fields, "queue_irqs", &t);
    assert_guest_clean(&fields, &t);
    assert_eq!(
        number(&fields, "qemu_vhost_errors", &t),
        0,
        "QEMU noticed the data-plane restarts (vhost-user EOF/reconnect)\n{t}"
    );

    // From the guest's "virtio_blk virtio0: N/0/0 default/read/poll queues".
    assert_eq!(
        number(&fields, "guest_queues", &t),
        queues,
        "Linux drives all {queues} virtqueues\n{t}"
    );
    // Each virtqueue completed requests while the data plane was being
    // killed: the guest's interrupt count per queue (a worker pinned to
    // each guest CPU, a CPU per queue), `queue_irqs` for the numbers.
    assert_eq!(
        number(&fields, "queues_used", &t),
        queues,
        "not every virtqueue carried requests\n{t}"
    );
    let kills = number(&fields, "kills", &t);
    assert!(kills >= MIN_KILLS, "only {kills} kills injected\n{t}");
    // The supervisor's own count: each injected kill is a dead data plane
    // followed by a takeover, and none of them made it give up.
    let crashes = number(&fields, "crashes", &t);
    assert!(
        crashes >= kills,
        "{kills} kills but {crashes} crashes counted\n{t}"
    );
    let recoveries = number(&fields, "recoveries", &t);
    assert!(
        recoveries >= kills,
        "{kills} kills but {recoveries} recoveries\n{t}"
    );
    assert_eq!(
        number(&fields, "given_up", &t),
        0,
        "the supervisor gave up\n{t}"
    );
    assert!(out.status.success(), "the script failed\n{t}");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
}

#[test]
fn linux_guest_survives_data_plane_kills_over_vhost_user_1_queue() {
    data_plane_kills(1);
}

#[test]
fn linux_guest_survives_data_plane_kills_over_vhost_user_2_queues() {
    data_plane_kills(2);
}

#[test]
fn linux_guest_survives_data_plane_kills_over_vhost_user_4_queues() {
    data_plane_kills(4);
}

/// The supervisor itself SIGKILLed (its data planes die with it) and
/// restarted while the guest runs: QEMU (chardev `reconnect=1`) reconnects
/// and hands its in-flight region back, the new data plane resubmits what
/// was in flight, and the guest sees a stall of about a second, no error.
#[test]
fn linux_guest_survives_supervisor_restarts() {
    const RESTARTS: u64 = 3;
    let (fields, t, out) = run_guest(&[
        "--fault",
        "supervisor-kill",
        "--kills",
        &RESTARTS.to_string(),
        "--kill-every",
        "3",
    ]);
    assert_guest_clean(&fields, &t);
    let restarts = number(&fields, "kills", &t);
    assert!(restarts >= RESTARTS, "only {restarts} restarts\n{t}");
    assert!(out.status.success(), "the script failed\n{t}");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
}

/// Live upgrades of the supervisor (docs/ARCHITECTURE.md §4.2) while the
/// guest runs: the binary is exec'd in place, QEMU's vhost-user
/// connection stays up, so QEMU notices nothing (no reconnect, no
/// message), the guest sees no error, and no request of the guest's takes
/// a second (a restart costs QEMU's reconnect period, about a second: the
/// test above). The slowest request is printed (`lat_max_us`); the stall
/// distribution is `shadowback bench upgrade`'s.
#[test]
fn linux_guest_does_not_notice_supervisor_upgrades() {
    const UPGRADES: u64 = 8;
    let (fields, t, out) = run_guest(&[
        "--fault",
        "upgrade",
        "--kills",
        &UPGRADES.to_string(),
        "--kill-every",
        "0.5",
    ]);
    assert_guest_clean(&fields, &t);
    let upgrades = number(&fields, "kills", &t);
    assert!(upgrades >= UPGRADES, "only {upgrades} upgrades\n{t}");
    assert_eq!(
        number(&fields, "qemu_vhost_errors", &t),
        0,
        "QEMU noticed an upgrade (vhost-user EOF/reconnect)\n{t}"
    );
    assert_eq!(
        (
            number(&fields, "crashes", &t),
            number(&fields, "recoveries", &t)
        ),
        (0, 0),
        "an upgrade replaced the data plane\n{t}"
    );
    assert_eq!(
        number(&fields, "over_1s", &t),
        0,
        "a guest request took over 1 s across {upgrades} upgrades\n{t}"
    );
    assert!(out.status.success(), "the script failed\n{t}");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
}

/// The host-side check that the test above relies on is able to fail: it
/// accepts an image the workload wrote, and rejects one block of it
/// corrupted, a stale round, and a workload that did not finish (round -1).
#[test]
fn host_image_check_rejects_stale_and_corrupt_blocks() {
    let checker = guest_cache().join("bin/guest-io");
    assert!(
        checker.exists(),
        "{IMAGE_MISSING} ({} is missing)",
        checker.display()
    );
    // On disk, not tmpfs: the workload uses O_DIRECT.
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qemu-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let img = dir.join("disk.raw");
    let file = std::fs::File::create(&img).expect("image");
    file.set_len(2 * 64 * 4096).expect("size the image");
    drop(file);
    let run = |args: &[&str]| {
        let out = Command::new(&checker)
            .args(args)
            .output()
            .expect("run guest-io");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let img_s = img.to_str().expect("utf-8 path");

    // Two workers x 64 blocks x 3 rounds, 16 in flight each: the last round is 2.
    let (ok, out) = run(&[img_s, "2", "16", "64", "3"]);
    assert!(ok, "workload on a file failed: {out}");
    assert!(out.contains("final worker=0 round=2 blocks=64"), "{out}");
    let (ok, out) = run(&["check", img_s, "64", "2", "2"]);
    assert!(ok && out.contains("blocks=128 ok=128 bad=0"), "{out}");

    let (ok, out) = run(&["check", img_s, "64", "2", "1"]);
    assert!(
        !ok && out.contains("bad=64"),
        "a stale round must fail: {out}"
    );
    let (ok, out) = run(&["check", img_s, "64", "-1", "2"]);
    assert!(
        !ok && out.contains("bad=64"),
        "an unfinished worker must fail: {out}"
    );

    // One flipped byte in worker 1's 10th block.
    let mut data = std::fs::read(&img).expect("read image");
    data[(64 + 10) * 4096 + 100] ^= 0x40;
    std::fs::write(&img, &data).expect("write image");
    let (ok, out) = run(&["check", img_s, "64", "2", "2"]);
    assert!(
        !ok && out.contains("ok=127 bad=1"),
        "a corrupt block must fail: {out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One run of `scripts/guest/run-net.sh` with `args`, and the checks every
/// run must pass: `mib` MiB received with the guest's sha256, the guest's
/// carrier (sampled every 50 ms) and the TAP's (every 20 ms) up throughout,
/// no "Link is Down" in the guest's kernel log, QEMU noticing nothing, the
/// guest's TCP super-frames reaching the TAP whole, at least `min_kills`
/// kills and as many recoveries. Returns the `RESULT` fields.
fn net_guest(args: &[&str], mib: u64, min_kills: u64) -> (HashMap<String, String>, String) {
    let script = repo().join("scripts/guest/run-net.sh");
    let _one = ONE_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .args(["--mib", &mib.to_string(), "--timeout", "150"])
        .env("SHADOWBACK_BIN", EXE)
        .output()
        .expect("run scripts/guest/run-net.sh");
    eprintln!(
        "run-net.sh {}: {:.1} s",
        args.join(" "),
        start.elapsed().as_secs_f64()
    );
    let t = transcript(&out);
    match out.status.code() {
        Some(3) => panic!("{IMAGE_MISSING}\n{t}"),
        Some(4) => panic!("`shadowback up` did not serve the vif\n{t}"),
        _ => {}
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields = result_fields(&stdout).unwrap_or_else(|| panic!("no RESULT line\n{t}"));
    assert_image_current(&fields, "tx_q0", &t);
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("verdict"), "PASS", "verdict\n{t}");
    assert_eq!(
        number(&fields, "bytes", &t),
        mib << 20,
        "bytes received\n{t}"
    );
    assert_eq!(get("guest_sum"), get("server_sum"), "sha256 differs\n{t}");
    assert_eq!(number(&fields, "link_down", &t), 0, "Link is Down\n{t}");
    assert_eq!(
        number(&fields, "guest_carrier_down", &t),
        0,
        "guest carrier\n{t}"
    );
    assert_eq!(
        number(&fields, "tap_carrier_down", &t),
        0,
        "TAP carrier\n{t}"
    );
    assert_eq!(
        number(&fields, "qemu_vhost_errors", &t),
        0,
        "QEMU noticed\n{t}"
    );
    // The guest negotiated HOST_TSO4: its TCP super-frames reached the
    // TAP whole (an Ethernet frame of the 1500-byte MTU is 1514 bytes).
    let avg = number(&fields, "tap_rx_avg", &t);
    assert!(
        avg > 1514,
        "no TCP super-frame reached the TAP (avg {avg})\n{t}"
    );
    let kills = number(&fields, "kills", &t);
    assert!(kills >= min_kills, "only {kills} kills injected\n{t}");
    assert!(
        number(&fields, "recoveries", &t) >= kills,
        "{kills} kills, fewer recoveries\n{t}"
    );
    assert!(out.status.success(), "the script failed\n{t}");
    eprintln!("{}", stdout.trim_end());
    (fields, t)
}

/// A real Linux guest on a vif's vhost-user-net export (virtio_net, a TAP
/// in a network namespace, `scripts/guest/run-net.sh`): 128 MiB over TCP
/// to a server behind the TAP while the vif's data plane is SIGKILLed 12
/// times, one kill every 100 ms (with TSO the transfer takes about 5 s),
/// with the checks of [`net_guest`].
#[test]
fn linux_guest_streams_over_vhost_user_net_through_data_plane_kills() {
    net_guest(&["--kills", "12", "--kill-every", "0.1"], 128, 10);
}

/// The same over two queue pairs (issue 10 item 2): `[[nic]] queues = 2`
/// on a multi-queue TAP, QEMU's `-netdev vhost-user,queues=2` and
/// `virtio-net-pci,mq=on`, two guest CPUs (virtio_net enables a pair per
/// CPU). 128 MiB over four TCP connections at once, each sent from one
/// of the CPUs so the flows leave on both transmit queues (XPS) and their
/// ACKs come back on both receive queues, while the data plane is
/// SIGKILLed at least 10 times, 50 ms apart (and a `fault kill` each):
/// the transfer takes 3–4 s under two CPU burners, room for the kills
/// (32 MiB took 0.6–2.3 s, and a stream of 0.6 s ended after 9 kills). Both pairs must have carried packets
/// each way (the guest driver's per-queue counters) and the TAP must have
/// both queues attached at the end.
#[test]
fn linux_guest_streams_over_vhost_user_net_2_queue_pairs_through_data_plane_kills() {
    let args = [
        "--queues",
        "2",
        "--conns",
        "4",
        "--kills",
        "10",
        "--kill-every",
        "0.05",
    ];
    let (fields, t) = net_guest(&args, 128, 10);
    assert_eq!(number(&fields, "pairs", &t), 2, "pairs\n{t}");
    assert_eq!(
        number(&fields, "tap_queues", &t),
        2,
        "TAP queues attached\n{t}"
    );
    for dir in ["tx", "rx"] {
        assert_eq!(
            number(&fields, &format!("{dir}_queues_used"), &t),
            2,
            "not both {dir} queues carried packets\n{t}"
        );
    }
}
