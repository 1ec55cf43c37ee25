//! Run-time device management and QoS (issue 13, items 1 and 5) against a
//! real `shadowback up` with real `shadowback blkback` processes, driven
//! by the `shadowback disk` command-line client (docs/PROTOCOL.md §6a).
//!
//! - A disk is added (validated like the config file), used by a guest,
//!   refused removal while attached, grown and shrunk (the guest reads the
//!   new `sectors` from `changed`), removed with `--force` under I/O (the
//!   guest's requests fail, nothing hangs, the backends are reaped) and
//!   added again on the same image; a [`Bystander`] on another disk does
//!   verified I/O throughout and sees nothing.
//! - A vhost-user frontend that set up a backend channel is sent
//!   `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on a resize, and `GET_CONFIG`
//!   then shows the new capacity.
//! - A disk's IOPS limit holds within what its token bucket allows, a
//!   `disk set` changes it at run time, and the changed limit survives a
//!   SIGKILL of the backend (the spare that takes over is told it when it
//!   adopts the disk). Throttling is never taken for a hang.
#![deny(unsafe_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_testsupport::blockio::*;
use shadowback_testsupport::harness::*;
use shadowback_testsupport::process::{shadowback_up, ChildGuard};
use shadowback_testsupport::temp::*;
use shadowback_testsupport::REPLY_TIMEOUT;

const EXE: &str = env!("CARGO_BIN_EXE_shadowback");
const MIB: u64 = 1 << 20;

/// A `shadowback up` child process, its log in a file; SIGKILLed on drop.
struct Up {
    child: ChildGuard,
    control: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl Up {
    /// `disks`: `(name, MiB, more [[disk]] lines)`.
    fn start(tag: &str, disks: &[(&str, u64, &str)]) -> Self {
        let dir = TempDir::new(tag);
        let control = dir.path().join("control.sock");
        let mut text = format!("socket = {control:?}\n");
        for (name, mib, lines) in disks {
            let image = dir.path().join(format!("{name}.img"));
            make_image(&image, mib * MIB);
            text.push_str(&format!(
                "\n[[disk]]\nname = {name:?}\npath = {image:?}\ncache = {:?}\n{lines}\n",
                cache_name(&image)
            ));
        }
        let config = dir.path().join("shadowback.toml");
        std::fs::write(&config, text).expect("config");
        let log = dir.path().join("up.log");
        let child = shadowback_up(&config, &log);
        let up = Up {
            child,
            control,
            log,
            dir,
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while up.cli(&["disk", "list"]).map(|l| l.lines().count()) != Ok(disks.len() + 1) {
            assert!(
                Instant::now() < deadline,
                "shadowback up did not come up\n{}",
                up.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        up
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- shadowback up log (last 40 lines)\n{tail}")
    }

    /// `shadowback ARGS --socket CONTROL`: its stdout, or its stderr if it
    /// failed; killed after a minute (the `disk` commands' own bound: a
    /// removal waits for the kernel to let go of the dead backends'
    /// io_uring, seconds on a loaded host).
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut child = Command::new(EXE)
            .args(args)
            .arg("--socket")
            .arg(&self.control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shadowback");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("shadowback {args:?} did not finish\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().expect("output");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// [`cli`](Self::cli) that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        self.cli(args)
            .unwrap_or_else(|e| panic!("shadowback {args:?}: {e}\n{}", self.log_tail()))
    }

    /// `status --json` of `device`, `None` if it is not listed.
    fn device(&self, device: &str) -> Option<serde_json::Value> {
        let out = self.ok(&["status", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        list.as_array()
            .expect("a list")
            .iter()
            .find(|d| d["device"].as_str() == Some(device))
            .cloned()
    }

    fn counter(&self, device: &str, key: &str) -> u64 {
        self.device(device)
            .and_then(|d| d[key].as_u64())
            .unwrap_or_else(|| panic!("{device}: no {key}\n{}", self.log_tail()))
    }

    fn guest(&self, device: &str) -> BlkFront {
        let mut cfg = BlkFrontConfig::new(device);
        cfg.max_request_bytes = 64 * 1024;
        BlkFront::attach(&self.control, &cfg)
            .unwrap_or_else(|e| panic!("guest attaches {device}: {e}\n{}", self.log_tail()))
    }

    fn sigterm(mut self) {
        kill(Pid::from_raw(self.child.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
        let status = self
            .child
            .wait(REPLY_TIMEOUT, "shadowback up after SIGTERM");
        assert!(status.success(), "{status}\n{}", self.log_tail());
    }

    /// `fault DEVICE kill`, then waits for the takeover to be counted.
    fn kill_and_recover(&self, device: &str) {
        let before = self.counter(device, "recoveries");
        self.ok(&["fault", device, "kill"]);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while self.counter(device, "recoveries") <= before {
            assert!(
                Instant::now() < deadline,
                "no takeover\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `disk add` of `NAME.img` in the run's directory (made, 8 MiB, if it
    /// is not there) with `more` keys; the image's path.
    fn add(&self, name: &str, more: &[&str]) -> PathBuf {
        let image = self.dir.path().join(format!("{name}.img"));
        if !image.exists() {
            make_image(&image, 8 * MIB);
        }
        let mut args = vec![
            "disk".to_string(),
            "add".to_string(),
            format!("name={name}"),
            format!("path={}", image.display()),
            format!("cache={}", cache_name(&image)),
        ];
        args.extend(more.iter().map(|m| m.to_string()));
        self.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        image
    }
}

fn cache_name(image: &Path) -> &'static str {
    match cache_for(image) {
        shadowback_supervisor::CacheMode::None => "none",
        shadowback_supervisor::CacheMode::Writeback => "writeback",
    }
}

/// Whether process `pid` is gone (reaped, or never ours).
fn gone(pid: u64) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

impl Up {
    /// Pids of the processes serving `device` for this supervisor (its
    /// children run with `--device DEVICE`), zombies included.
    fn backends_of(&self, device: &str) -> Vec<u32> {
        let parent = self.child.pid().to_string();
        let wanted = format!("--device\0{device}\0");
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // pid (comm) state ppid …: the ppid follows the last ')'.
                let ppid = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1));
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                ppid == Some(parent.as_str()) && String::from_utf8_lossy(&cmdline).contains(&wanted)
            })
            .collect()
    }
}

#[test]
fn disks_are_added_resized_and_removed_while_another_keeps_serving() {
    let up = Up::start("dm-life", &[("keep", 16, "")]);
    let bystander = Bystander::start(up.guest("keep"), 7);

    // Added: validated as the file is, by its parser.
    let image = up.dir.path().join("new.img");
    make_image(&image, 8 * MIB);
    let path = format!("path={}", image.display());
    let cache = format!("cache={}", cache_name(&image));
    for (bad, says) in [
        (vec!["name=keep", &path, &cache], "used twice"),
        (vec!["name=new", &path, "colour=1"], "colour"),
        (
            vec!["name=new", &path, "max_ring_page_order=9"],
            "max_ring_page_order",
        ),
        (
            vec!["name=new", &path, "iops_burst=5"],
            "iops_burst without iops_limit",
        ),
        (vec!["name=new path=x"], "missing field `path`"),
    ] {
        let mut args = vec!["disk", "add"];
        args.extend(bad.iter().copied());
        let err = up.cli(&args).expect_err("refused");
        assert!(err.contains(says), "{bad:?}: {err}");
    }
    up.ok(&["disk", "add", "name=new", &path, &cache]);
    let list = up.ok(&["disk", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("new ") && l.contains(&(8 * MIB).to_string())),
        "{list}"
    );
    let mut guest = up.guest("new");
    verified_io(&mut guest, 0, 1).expect("I/O on the added disk");
    bystander.progressing("after the add");

    // Attached: not removed without --force.
    let err = up.cli(&["disk", "remove", "new"]).expect_err("refused");
    assert!(err.contains("attached"), "{err}");

    // Grown: the guest learns the size from `changed` and writes there.
    let old_sectors = 8 * MIB / 512;
    up.ok(&["disk", "resize", "new", "16M"]);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 16 * MIB);
    verified_io(&mut guest, old_sectors + 1000, 2).expect("I/O past the old end");
    assert_eq!(guest.refresh_capacity().unwrap(), 2 * old_sectors);
    bystander.progressing("after the growth");

    // Shrunk: the end is gone for the guest.
    up.ok(&["disk", "resize", "new", "4M"]);
    assert!(read(&mut guest, old_sectors / 2 + 8, 8).is_err());
    assert_eq!(guest.refresh_capacity().unwrap(), old_sectors / 2);
    verified_io(&mut guest, 100, 3).expect("I/O inside the new end");

    // Removed under I/O: the guest's requests fail, nothing hangs.
    let pid = up.counter("new", "pid");
    // The pool's spare (docs/ARCHITECTURE.md §7.5): shared, not the disk's.
    let spare = up.counter("new", "standby-pid");
    assert_ne!(spare, 0, "a spare is ready");
    let failed = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let worker = {
        let (failed, rounds) = (failed.clone(), rounds.clone());
        std::thread::spawn(move || {
            for round in 0.. {
                if verified_io(&mut guest, 8 * (round % 64), round).is_err() {
                    failed.store(true, Ordering::Relaxed);
                    return;
                }
                rounds.store(round + 1, Ordering::Relaxed);
            }
        })
    };
    while rounds.load(Ordering::Relaxed) < 3 {
        assert!(
            !worker.is_finished(),
            "the worker failed before the removal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    up.ok(&["disk", "remove", "new", "--force"]);
    let deadline = Instant::now() + 2 * REPLY_TIMEOUT;
    while !worker.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the guest of a removed disk hangs"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    worker.join().expect("worker");
    assert!(failed.load(Ordering::Relaxed));
    assert!(up.device("new").is_none(), "a removed disk is in status");
    assert!(
        gone(pid),
        "backend {pid} of the removed disk is still there"
    );
    assert!(!gone(spare), "the pool's spare went with a removed disk");
    assert_eq!(up.counter("keep", "standby-pid"), spare);
    bystander.progressing("after the removal");

    // The same name and image again: lock and fence were let go.
    up.add("new", &[]);
    let mut again = up.guest("new");
    verified_io(&mut again, 200, 4).expect("I/O on the disk added again");
    again.detach().expect("detach");
    up.ok(&["disk", "remove", "new"]);

    // A vif or unknown name is not a disk to remove.
    let err = up.cli(&["disk", "remove", "nothing"]).expect_err("refused");
    assert!(err.contains("ENOENT"), "{err}");
    let (guest, rounds) = bystander.finish("disk management");
    assert!(rounds > 0);
    guest.detach().expect("bystander detaches");
    assert_eq!(up.counter("keep", "crashes"), 0);
    up.sigterm();
}

/// A supervisor whose file names no disk that may use a spare starts an
/// empty standby pool; the first such disk added at run time gets the
/// pool its default size, and a spare takes its backend's place after a
/// kill (docs/ARCHITECTURE.md §7.5).
#[test]
fn a_disk_added_at_run_time_gets_a_spare_from_the_pool() {
    let up = Up::start("dm-pool", &[("plain", 8, "standby = false")]);
    assert_eq!(up.counter("plain", "pool-size"), 0);
    up.add("spared", &[]);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while up.counter("spared", "standby-pid") == 0 {
        assert!(
            Instant::now() < deadline,
            "no spare for the added disk\n{}",
            up.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(up.counter("spared", "pool-size"), 1);
    let spare = up.counter("spared", "standby-pid");
    let mut guest = up.guest("spared");
    verified_io(&mut guest, 0, 1).expect("I/O before the kill");
    up.ok(&["fault", "spared", "kill"]);
    verified_io(&mut guest, 64, 2).expect("I/O after the kill");
    assert_eq!(up.counter("spared", "pid"), spare, "the spare took over");
    assert_eq!(up.counter("spared", "standby-takeovers"), 1);
    guest.detach().expect("detach");
    up.sigterm();
}

#[test]
fn two_operators_cannot_race_on_one_name() {
    let up = Up::start("dm-race", &[("keep", 8, "")]);
    let image = up.dir.path().join("twice.img");
    make_image(&image, 4 * MIB);
    let path = format!("path={}", image.display());
    let cache = format!("cache={}", cache_name(&image));
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| up.cli(&["disk", "add", "name=twice", &path, &cache])))
            .collect();
        runs.into_iter().map(|r| r.join().expect("cli")).collect()
    });
    let added = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(added, 1, "{results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(err.contains("EBUSY") || err.contains("used twice"), "{err}");
    }
    let list = up.ok(&["disk", "list"]);
    assert_eq!(list.lines().filter(|l| l.starts_with("twice ")).count(), 1);
    up.sigterm();
}

#[test]
fn a_vhost_user_frontend_is_told_of_a_resize() {
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
    use vhost::VhostBackend;

    let up = Up::start("dm-vhost", &[("v", 8, "")]);
    let vsock = up.dir.path().join(format!("{}.sock", unique_name("dmv")));
    // A second disk with a vhost-user socket, added at run time.
    up.add("vu", &[&format!("vhost_user={}", vsock.display())]);

    let stream = UnixStream::connect(&vsock).expect("vhost-user socket");
    let mut fe = Frontend::from_stream(stream, 1);
    let features = fe.get_features().expect("GET_FEATURES");
    fe.set_features(features & (1 << 32 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()))
        .expect("SET_FEATURES");
    let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let wanted = VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG;
    assert!(offered.contains(wanted), "{offered:?}");
    fe.set_protocol_features(wanted)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_owner().expect("SET_OWNER");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    fe.set_backend_request_fd(&theirs)
        .expect("SET_BACKEND_REQ_FD");
    let capacity = |fe: &mut Frontend| {
        let (_, bytes) = fe
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
            .expect("GET_CONFIG");
        u64::from_le_bytes(bytes[..8].try_into().unwrap())
    };
    assert_eq!(capacity(&mut fe), 8 * MIB / 512);

    up.ok(&["disk", "resize", "vu", "12M"]);
    ours.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut header = [0u8; 12];
    (&ours)
        .read_exact(&mut header)
        .unwrap_or_else(|e| panic!("no config-change message: {e}\n{}", up.log_tail()));
    let request = u32::from_le_bytes(header[..4].try_into().unwrap());
    assert_eq!(request, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    assert_eq!(capacity(&mut fe), 12 * MIB / 512);
    drop(fe);
    up.sigterm();
}

/// Counts QD1 reads on `guest` as fast as the disk answers them, until
/// `stop`.
fn reader(
    mut guest: BlkFront,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<BlkFront, String>> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            read(&mut guest, 8 * (done.load(Ordering::Relaxed) % 256), 8)?;
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(guest)
    })
}

/// Requests completed over `window`, counted from the reader's next
/// completion (a reader that has not started yet is not a slow disk).
fn completed_over(done: &AtomicU64, window: Duration) -> u64 {
    let first = done.load(Ordering::Relaxed);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while done.load(Ordering::Relaxed) == first {
        assert!(
            Instant::now() < deadline,
            "no request completed in {REPLY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let from = done.load(Ordering::Relaxed);
    std::thread::sleep(window);
    done.load(Ordering::Relaxed) - from
}

/// The most requests a bucket of `iops`, `burst` admits in `window`:
/// `burst + iops × window`, the window taken 0.2 s longer for the
/// counting's own edges (a request admitted just before the window whose
/// answer lands in it).
fn most(iops: u64, burst: u64, window: Duration) -> u64 {
    burst + (iops as f64 * (window.as_secs_f64() + 0.2)) as u64
}

#[test]
fn a_qos_limit_holds_changes_at_run_time_and_survives_a_takeover() {
    let up = Up::start(
        "dm-qos",
        &[
            ("q", 16, "iops_limit = 200\niops_burst = 20"),
            ("free", 16, ""),
        ],
    );
    let window = Duration::from_secs(2);

    // The unlimited disk first: what the limit is measured against.
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let free = reader(up.guest("free"), stop.clone(), done.clone());
    let unlimited = completed_over(&done, window);
    stop.store(true, Ordering::Relaxed);
    free.join()
        .expect("reader")
        .expect("reads")
        .detach()
        .unwrap();

    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let worker = reader(up.guest("q"), stop.clone(), done.clone());
    let limited = completed_over(&done, window);
    assert!(
        limited <= most(200, 20, window) && limited > 0,
        "200 IOPS, burst 20: {limited} requests in {window:?} (unlimited: {unlimited})"
    );
    assert!(
        unlimited > 2 * most(200, 20, window),
        "the unlimited disk did {unlimited}: too slow to tell the limit from it"
    );

    // Changed at run time.
    up.ok(&["disk", "set", "q", "iops_limit=50", "iops_burst=5"]);
    std::thread::sleep(Duration::from_millis(300));
    let slower = completed_over(&done, window);
    assert!(
        slower <= most(50, 5, window) && slower > 0,
        "50 IOPS: {slower} requests in {window:?}"
    );

    // A SIGKILLed backend's replacement keeps the changed limit.
    up.kill_and_recover("q");
    std::thread::sleep(Duration::from_millis(300));
    let after = completed_over(&done, window);
    assert!(
        after <= most(50, 5, window) && after > 0,
        "50 IOPS after a takeover: {after} requests in {window:?}"
    );

    // Slower than the hang watchdog's 100 ms: each request waits 250 ms
    // on the ring, and the backend is not called hung for it.
    up.ok(&["disk", "set", "q", "iops_limit=4", "iops_burst=1"]);
    std::thread::sleep(Duration::from_millis(300));
    let crawl = completed_over(&done, window);
    assert!(
        crawl <= most(4, 1, window) && crawl > 0,
        "4 IOPS: {crawl} requests in {window:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let guest = worker.join().expect("reader").expect("reads");
    guest.detach().expect("detach");
    assert_eq!(up.counter("q", "hangs"), 0, "throttling taken for a hang");
    assert_eq!(up.counter("q", "crashes"), 1);
    let list = up.ok(&["disk", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("q ") && l.contains(" 4 ")),
        "{list}"
    );
    up.sigterm();
}

#[test]
fn a_disk_removed_during_a_takeover_is_fenced_and_can_come_back() {
    let up = Up::start("dm-takeover", &[("keep", 16, ""), ("victim", 8, "")]);
    let bystander = Bystander::start(up.guest("keep"), 11);
    for round in 0..3u64 {
        let mut guest = up.guest("victim");
        verified_io(&mut guest, 0, round).expect("I/O before the removal");
        let pid = up.counter("victim", "pid");
        let standby = up.counter("victim", "standby-pid");
        let worker = std::thread::spawn(move || {
            for i in 0.. {
                if verified_io(&mut guest, 8 * (i % 32), i).is_err() {
                    return;
                }
            }
        });
        // The kill and the removal race: the task serves the removal
        // before, during or after the takeover the kill starts.
        up.ok(&["fault", "victim", "kill"]);
        up.ok(&["disk", "remove", "victim", "--force"]);
        let deadline = Instant::now() + 2 * REPLY_TIMEOUT;
        while !worker.is_finished() {
            assert!(Instant::now() < deadline, "round {round}: the guest hangs");
            std::thread::sleep(Duration::from_millis(10));
        }
        worker.join().expect("worker");
        assert!(up.device("victim").is_none());
        assert!(gone(pid), "round {round}: backend {pid} is still there");
        // The spare adopted the disk (and went with it) or, when the
        // removal came first, is still the pool's.
        assert!(
            gone(standby) || up.counter("keep", "standby-pid") == standby,
            "round {round}: spare {standby} neither went nor stayed in the pool"
        );
        let left = up.backends_of("victim");
        assert!(left.is_empty(), "round {round}: backends {left:?} are left");
        assert!(
            !up.backends_of("keep").is_empty(),
            "the other disk's backends"
        );
        up.add("victim", &[]);
    }
    bystander.progressing("after the removals");
    let (guest, _) = bystander.finish("removals during takeovers");
    guest.detach().expect("detach");
    assert_eq!(up.counter("keep", "crashes"), 0);
    up.sigterm();
}

/// A live upgrade (docs/ARCHITECTURE.md §4.2) keeps what was changed at
/// run time: a disk added, its QoS limit changed and its image grown go on
/// as they were under the new binary, the spare the pool started for it
/// before the upgrade is the one that takes over a SIGKILL after it (the
/// new binary owns both the pool and the recovery), the limit holds on
/// that spare, and the disk can still be removed. A [`Bystander`] on a
/// disk of the file does verified I/O throughout.
#[test]
fn a_disk_added_at_run_time_keeps_its_size_limit_and_spare_across_an_upgrade() {
    let up = Up::start("dm-upgrade", &[("keep", 16, "standby = false")]);
    let bystander = Bystander::start(up.guest("keep"), 13);
    up.add("late", &["iops_limit=200", "iops_burst=20"]);
    up.ok(&["disk", "set", "late", "iops_limit=50", "iops_burst=5"]);
    up.ok(&["disk", "resize", "late", "12M"]);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while up.counter("late", "standby-pid") == 0 {
        assert!(Instant::now() < deadline, "no spare\n{}", up.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    let spare = up.counter("late", "standby-pid");
    let serving = up.counter("late", "pid");
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let worker = reader(up.guest("late"), stop.clone(), done.clone());
    completed_over(&done, Duration::from_millis(200));

    let answer = up.ok(&["upgrade"]);
    assert!(
        answer.contains(&format!("pid {}", up.child.pid())),
        "{answer}"
    );
    assert!(
        up.log_tail().contains("took over from the previous binary"),
        "{}",
        up.log_tail()
    );
    assert_eq!(
        (up.counter("late", "pid"), up.counter("late", "standby-pid")),
        (serving, spare),
        "the upgrade replaced a backend or the spare"
    );
    assert_eq!(
        up.counter("late", "connected"),
        1,
        "the guest lost the disk\n{}",
        up.log_tail()
    );

    // The new binary's recovery, with the spare the old one started.
    up.kill_and_recover("late");
    assert_eq!(up.counter("late", "pid"), spare, "the spare took over");
    assert_eq!(up.counter("late", "standby-takeovers"), 1);
    std::thread::sleep(Duration::from_millis(300));
    let window = Duration::from_secs(2);
    let limited = completed_over(&done, window);
    assert!(
        limited <= most(50, 5, window) && limited > 0,
        "50 IOPS after the upgrade and a takeover: {limited} requests in {window:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let guest = worker.join().expect("reader").expect("reads");
    guest.detach().expect("detach");
    // A guest attaching now is shown the new binary's idea of the size.
    let mut fresh = up.guest("late");
    let sectors = fresh.refresh_capacity().expect("capacity");
    assert_eq!(sectors, 12 * MIB / 512, "the capacity");
    verified_io(&mut fresh, sectors - 256, 3).expect("I/O at the grown end");
    fresh.detach().expect("detach");
    let list = up.ok(&["disk", "list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("late "))
        .unwrap_or_else(|| panic!("{list}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (cols[1], cols[3]),
        ((12 * MIB).to_string().as_str(), "50"),
        "size and limit after the upgrade: {list}"
    );

    up.ok(&["disk", "remove", "late"]);
    assert!(up.device("late").is_none(), "still listed after removal");
    let (guest, rounds) = bystander.finish("the disk of the file");
    assert!(rounds > 0);
    guest.detach().expect("bystander detaches");
    up.sigterm();
}
