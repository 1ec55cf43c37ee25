//! The supervisor itself dies (docs/ARCHITECTURE.md §8): a real `shadowback up` is
//! SIGKILLed and started again on the same configuration, like systemd
//! would, while a vhost-user guest with `--reconnect` (QEMU's chardev
//! `reconnect`, replayed by the native client) keeps many requests in
//! flight.
//!
//! - Backends die with their supervisor (`PR_SET_PDEATHSIG`), even stopped
//!   ones that would never read the EOF of their control socket.
//! - A new supervisor does not touch an image while anyone else holds its
//!   lock (a dead supervisor's backends and their last writes).
//! - Across several supervisor restarts the guest sees no error, no lost or
//!   duplicated completion and no wrong data. Every other restart is aimed:
//!   the data plane stops itself right after marking a request in flight in
//!   the VMM's in-flight region (`SHADOWBACK_CRASH_AT=stop:region-begin.2`),
//!   the supervisor is SIGKILLed then, and the next supervisor's data plane
//!   must resubmit from that region; the others fall at random instants.
//!
//! It drives only processes (`shadowback_testsupport::process`).
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowback_testsupport::process::{alive, children, shadowback_bin, ChildGuard};
use shadowback_testsupport::temp::TempDir;
use shadowback_testsupport::wait_for_state;

const IMAGE_MIB: u64 = 32;
/// How long any one step (a supervisor starting, a process exiting, the
/// guest making progress) may take before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn wait_dead(pids: &[u32], what: &str) {
    wait_for_state(
        STEP_TIMEOUT,
        &format!("{what}: processes outliving their supervisor to die"),
        || {
            pids.iter()
                .copied()
                .filter(|&p| alive(p))
                .collect::<Vec<u32>>()
        },
        Vec::is_empty,
    );
}

/// One disk and the `shadowback up` configuration exporting it.
struct Site {
    dir: TempDir,
    config: PathBuf,
    control: PathBuf,
    vhost: PathBuf,
    image: PathBuf,
    device: String,
    /// `shadowback up` processes started so far (names their logs).
    ups: u32,
}

impl Site {
    /// `vhost_user`: export the disk on a vhost-user socket too.
    fn new(tag: &str, vhost_user: bool) -> Self {
        let dir = TempDir::new(tag);
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_MIB << 20))
            .expect("image");
        let control = dir.path().join("control.sock");
        let vhost = dir.path().join("disk.vhost.sock");
        let device = format!("{tag}-{}", std::process::id());
        let cache = match shadowback_supervisor::CacheMode::best_for(&image) {
            shadowback_supervisor::CacheMode::None => "none",
            shadowback_supervisor::CacheMode::Writeback => "writeback",
        };
        let mut text = format!(
            "socket = {control:?}\n\n[[disk]]\nname = {device:?}\npath = {image:?}\n\
             cache = {cache:?}\nstandby = true\n"
        );
        if vhost_user {
            // The restarts hold a data plane stopped until its supervisor
            // is killed (`stop_at`): the hang watchdog must not replace it
            // first, which would answer what it held.
            text.push_str(&format!(
                "vhost_user = {vhost:?}\nqueue_size = 256\nhang_timeout_ms = 3600000\n"
            ));
        }
        let config = dir.path().join("shadowback.toml");
        std::fs::write(&config, text).expect("config");
        Site {
            dir,
            config,
            control,
            vhost,
            image,
            device,
            ups: 0,
        }
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("up-{n}.log"))
    }

    /// Starts `shadowback up` (its backends log their attach statistics to
    /// the same file) without waiting for it. `stop_at`: its first data
    /// plane stops itself at that crash point (`SHADOWBACK_CRASH_AT=stop:…`).
    fn spawn_up(&mut self, stop_at: Option<&str>) -> ChildGuard {
        self.ups += 1;
        let log = std::fs::File::create(self.log_path(self.ups)).expect("log file");
        let mut cmd = Command::new(shadowback_bin());
        if let Some(point) = stop_at {
            cmd.env("SHADOWBACK_CRASH_AT", format!("stop:{point}"));
        }
        ChildGuard::spawn(
            cmd.arg("up")
                .arg(&self.config)
                .env("RUST_LOG", "warn,shadowback_dataplane=info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
    }

    /// Starts `shadowback up` and waits until it serves the disk.
    fn up(&mut self, stop_at: Option<&str>) -> ChildGuard {
        let mut up = self.spawn_up(stop_at);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(s) = self.status() {
                if s.pid != 0 && s.standby_pid != 0 {
                    return up;
                }
            }
            if let Some(status) = up.child().try_wait().expect("try_wait") {
                panic!("shadowback up exited early ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "shadowback up did not come up:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `shadowback status --json` for the disk, if the supervisor answers.
    fn status(&self) -> Option<Status> {
        let out = Command::new(shadowback_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.control)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let dev = list
            .as_array()?
            .iter()
            .find(|d| d["device"].as_str() == Some(self.device.as_str()))?;
        Some(Status {
            pid: u32::try_from(dev["pid"].as_u64()?).ok()?,
            standby_pid: u32::try_from(dev["standby-pid"].as_u64()?).ok()?,
        })
    }

    /// Every `shadowback up` log so far, for failure messages.
    fn logs(&self) -> String {
        (1..=self.ups)
            .map(|n| {
                let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                format!("--- up-{n}.log (last 40 lines)\n{tail}\n")
            })
            .collect()
    }

    /// Requests each `shadowback up` generation's data planes resubmitted
    /// at their first attach — from the in-flight region, since a new
    /// supervisor's shadow logs are fresh (the backend's `virtio device
    /// attached` line, `replayed` of its `RecoveryStats`).
    fn replayed_per_generation(&self) -> Vec<u64> {
        (1..=self.ups)
            .map(|n| {
                let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
                text.lines()
                    .filter(|l| l.contains("virtio device attached"))
                    .filter_map(|l| number_after(l, "replayed: "))
                    .sum()
            })
            .collect()
    }
}

/// The device's line of `shadowback status --json`.
#[derive(Clone, Copy, Debug)]
struct Status {
    pid: u32,
    standby_pid: u32,
}

/// The decimal number right after the first `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn backends_die_with_their_supervisor_even_when_stopped() {
    let mut site = Site::new("pdeath", false);
    for round in 0..2 {
        let mut up = site.up(None);
        let s = site.status().expect("status");
        let backends = [s.pid, s.standby_pid];
        assert!(
            backends.iter().all(|&p| alive(p)),
            "round {round}: backends {backends:?} are not running"
        );
        // Stopped processes never read their control socket's EOF: only
        // the kernel's parent-death signal can end them.
        for &p in &backends {
            kill(Pid::from_raw(p as i32), Signal::SIGSTOP).expect("SIGSTOP a backend");
        }
        up.sigkill();
        wait_dead(&backends, &format!("round {round}"));
        // The next round's supervisor takes the image's lock again: the
        // dead one's backends have let go of it.
    }
}

#[test]
#[allow(unsafe_code, reason = "`libc::flock`")]
fn a_supervisor_waits_for_the_images_previous_users() {
    use std::os::fd::AsRawFd;
    let mut site = Site::new("imglock", false);
    // Another user of the image holds its lock (as a dead supervisor's
    // backends do until their last write has landed).
    let holder = std::fs::File::open(&site.image).expect("open image");
    // SAFETY: flock on a descriptor `holder` owns and keeps open.
    let rc = unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_SH) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    let mut up = site.spawn_up(None);
    // Whatever time it is given, it starts no backend while the lock is
    // held (the control socket answers only once every disk is up).
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        up.child().try_wait().expect("try_wait").is_none(),
        "shadowback up gave up early:\n{}",
        site.logs()
    );
    let started = children(up.pid());
    assert!(
        started.is_empty(),
        "backends {started:?} were started while another process held the image:\n{}",
        site.logs()
    );
    drop(holder);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while site.status().is_none_or(|s| s.pid == 0) {
        assert!(
            Instant::now() < deadline,
            "shadowback up did not start once the image was free:\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And while it serves the image, a second supervisor cannot.
    let mut other = Site::new("imglock2", false);
    let text = std::fs::read_to_string(&other.config)
        .expect("config")
        .replace(&format!("{:?}", other.image), &format!("{:?}", site.image));
    std::fs::write(&other.config, text).expect("config");
    let mut second = other.spawn_up(None);
    let status = second.wait(STEP_TIMEOUT, "a second supervisor on a served image");
    assert!(
        !status.success(),
        "a second supervisor exported an image in use:\n{}",
        other.logs()
    );
    assert!(
        other.logs().contains("in use by another process"),
        "the second supervisor's error does not say why:\n{}",
        other.logs()
    );
    up.sigkill();
}

/// The guest's JSON lines, read on a thread.
struct GuestOutput {
    /// Progress lines that saw completions since the previous one.
    busy_ticks: Arc<AtomicU64>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

fn read_guest(child: &mut Child) -> GuestOutput {
    let stdout = child.stdout.take().expect("guest stdout");
    let busy_ticks = Arc::new(AtomicU64::new(0));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (ticks, l) = (busy_ticks.clone(), lines.clone());
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["event"] == "progress" && v["ops_per_s"].as_f64().is_some_and(|r| r > 0.0) {
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            }
            l.lock().unwrap().push(line);
        }
    });
    GuestOutput {
        busy_ticks,
        lines,
        reader,
    }
}

/// Waits for more than `after` busy progress ticks (about two a second
/// while the guest works).
fn wait_progress(out: &GuestOutput, site: &Site, guest_log: &Path, after: u64, what: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while out.busy_ticks.load(Ordering::Relaxed) <= after {
        if out.reader.is_finished() {
            let lines = out.lines.lock().unwrap();
            panic!(
                "{what}: the guest exited\n--- guest stdout (last 5 lines):\n{}\n--- guest stderr:\n{}\n{}",
                lines[lines.len().saturating_sub(5)..].join("\n"),
                std::fs::read_to_string(guest_log).unwrap_or_default(),
                site.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the guest made no progress\n--- guest stderr:\n{}\n{}",
            std::fs::read_to_string(guest_log).unwrap_or_default(),
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Gaps between consecutive completions (ns), largest first.
fn largest_gaps(stamps_file: &Path, n: usize) -> Vec<u64> {
    let bytes = std::fs::read(stamps_file).unwrap_or_default();
    let mut stamps: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    stamps.sort_unstable();
    let mut gaps: Vec<u64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    gaps.truncate(n);
    gaps
}

/// Supervisor restarts under load: the even ones aimed, the odd ones at
/// a random instant.
const RESTARTS: u32 = 6;

/// Whether the restart numbered `restart` is aimed: its supervisor's data
/// plane stops itself with a request certainly in flight (see
/// [`aimed_stop`]) and the supervisor is killed only then. Whether a kill
/// at a random instant finds requests in flight is a matter of timing
/// (under load about one in ten did: the debug-build guest is often the
/// slower side, leaving the data plane idle between batches), so only the
/// aimed ones prove the resubmission from the in-flight region.
fn aimed(restart: u32) -> bool {
    restart.is_multiple_of(2)
}

/// The crash point an aimed restart's data plane stops at: right after it
/// marked a head in flight in the VMM's region (`region-begin.2`: counter,
/// then `inflight = 1`), on its `nth` consumption — more than the guest's
/// queue depth, so by then the guest saw completions of this supervisor,
/// and different each time, so the stop falls at another phase of the
/// workload.
fn aimed_stop(restart: u32) -> String {
    format!("region-begin.2@{}", 200 + 130 * (restart % 5))
}

/// Whether `pid` is stopped (state `T` in `/proc/PID/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..].trim_start().chars().next()?;
            Some(state == 'T')
        })
        .unwrap_or(false)
}

#[test]
fn supervisor_restarts_under_load_are_invisible_to_a_reconnecting_vhost_user_guest() {
    let mut site = Site::new("restart", true);
    let mut up = site.up(aimed(0).then(|| aimed_stop(0)).as_deref());
    let stop = site.dir.path().join("stop");
    let stamps = site.dir.path().join("completions.bin");
    let guest_log = site.dir.path().join("guest.log");
    let mut guest = ChildGuard::spawn(
        Command::new(shadowback_bin())
            .args(["guest", "blk", "--transport", "vhost-user", "--reconnect"])
            .arg("--socket")
            .arg(&site.vhost)
            // Flushes (fsync) keep the data plane's requests in flight
            // longer, so that kills find some to resubmit.
            .args(["--qd", "48", "--duration", "1", "--max-kib", "128"])
            .args(["--flush-percent", "10"])
            .args(["--seed", "7"])
            .arg("--stop-file")
            .arg(&stop)
            .arg("--completions-file")
            .arg(&stamps)
            .env("RUST_LOG", "warn,shadowback_guest=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&guest_log).expect("guest log")),
    );
    let out = read_guest(guest.child());
    let guest_stderr = || std::fs::read_to_string(&guest_log).unwrap_or_default();
    let mut restarts = 0;
    while restarts < RESTARTS {
        let s = site.status().expect("status before the kill");
        if aimed(restarts) {
            // The data plane stops itself once it has consumed its share;
            // the guest keeps its other requests queued meanwhile.
            let deadline = Instant::now() + STEP_TIMEOUT;
            while !stopped(s.pid) {
                assert!(
                    !out.reader.is_finished() && Instant::now() < deadline,
                    "restart {restarts}: the data plane {} did not stop at {}\n\
                     --- guest stderr:\n{}\n{}",
                    s.pid,
                    aimed_stop(restarts),
                    guest_stderr(),
                    site.logs()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            // Two busy ticks: the first one's interval may have begun
            // before the previous kill.
            let seen = out.busy_ticks.load(Ordering::Relaxed);
            wait_progress(
                &out,
                &site,
                &guest_log,
                seen + 1,
                &format!("before restart {restarts}"),
            );
            // Somewhere in the middle of the load, never at the same phase.
            std::thread::sleep(Duration::from_millis(300 + 170 * u64::from(restarts % 5)));
        }
        up.sigkill();
        wait_dead(&[s.pid, s.standby_pid], &format!("restart {restarts}"));
        restarts += 1;
        let next = (restarts < RESTARTS && aimed(restarts)).then(|| aimed_stop(restarts));
        up = site.up(next.as_deref());
    }
    // The last supervisor serves until the end.
    let seen = out.busy_ticks.load(Ordering::Relaxed);
    wait_progress(&out, &site, &guest_log, seen + 1, "after the last restart");
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, b"").expect("stop file");
    let status = guest.wait(Duration::from_secs(180), "the guest");
    out.reader.join().expect("reader thread");
    let lines = out.lines.lock().unwrap().clone();
    let transcript = format!(
        "--- guest stdout (last 10 lines):\n{}\n--- guest stderr:\n{}\n{}",
        lines[lines.len().saturating_sub(10)..].join("\n"),
        guest_stderr(),
        site.logs()
    );
    let report = lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "report")
        .map(|v| v["report"].clone())
        .unwrap_or_else(|| panic!("the guest gave no report ({status})\n{transcript}"));
    let n = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("report has no {k}: {report}\n{transcript}"))
    };
    assert!(n("ops") > 0, "no I/O was done: {report}");
    assert_eq!(n("lost"), 0, "lost completions: {report}\n{transcript}");
    assert_eq!(
        n("duplicates"),
        0,
        "duplicate completions: {report}\n{transcript}"
    );
    assert_eq!(
        n("verify_failures"),
        0,
        "wrong data: {report}\n{transcript}"
    );
    assert_eq!(n("io_errors"), 0, "I/O errors: {report}\n{transcript}");
    // Every segment of the run ends with a whole-image check, and so does
    // the run.
    let checked = n("sectors_verified_final");
    assert!(
        checked >= IMAGE_MIB * 2048 && checked % (IMAGE_MIB * 2048) == 0,
        "the final checks did not cover the whole image: {report}\n{transcript}"
    );
    assert!(status.success(), "guest exit: {status}\n{transcript}");
    let reconnects = guest_stderr()
        .lines()
        .filter(|l| l.contains("vhost-user reconnected"))
        .count();
    assert!(
        reconnects >= restarts as usize,
        "{reconnects} reconnects for {restarts} supervisor restarts\n{transcript}"
    );
    let replayed = site.replayed_per_generation();
    // The first supervisor had nothing to recover; every one that followed
    // an aimed restart had at least the request its predecessor's data
    // plane stopped at.
    assert_eq!(replayed[0], 0, "replays per supervisor: {replayed:?}");
    for restart in (0..restarts).filter(|&r| aimed(r)) {
        assert!(
            replayed[restart as usize + 1] > 0,
            "restart {restart} killed the supervisor while its data plane held a request, \
             and the next data plane resubmitted nothing from the in-flight region \
             (replays per supervisor: {replayed:?})\n{transcript}"
        );
    }
    let gaps: Vec<String> = largest_gaps(&stamps, restarts as usize)
        .iter()
        .map(|g| format!("{:.1} ms", *g as f64 / 1e6))
        .collect();
    eprintln!(
        "{restarts} supervisor restarts: {} ops, {reconnects} reconnects, replayed per \
         supervisor {replayed:?}, largest completion gaps {gaps:?}",
        n("ops")
    );
}
