//! Live upgrade (docs/ARCHITECTURE.md §4.2, docs/PROTOCOL.md §6a): a real
//! `shadowback up` is told `upgrade` while guests do verified I/O through
//! it — a Xen-ring disk, a vhost-user disk whose client does *not*
//! reconnect (an EOF ends it with an error), and two vifs on a cable
//! carrying a TCP stream. The supervisor `execve`s the new binary in its
//! own place: no guest may see an error, an EOF or a reset, every backend
//! keeps its pid, and the `status` counters go on from where they were.
//!
//! An upgrade to a binary that cannot take over (missing, not
//! executable, or one whose `execve` fails after it answered the version
//! check) leaves the old supervisor serving, and a backend killed right
//! after an upgrade is recovered by the new binary.
#![deny(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::net::{run_stream, StreamParams, StreamReport, StreamRole};
use shadowback_guest::netfront::{NetFront, NetFrontConfig, NetFrontStats};
use shadowback_guest::workload::Report;
use shadowback_supervisor::DeviceStats;
use shadowback_testsupport::operator::{fault_kill, status};
use shadowback_testsupport::process::{alive, children, shadowback_up, ChildGuard, GuestProcess};
use shadowback_testsupport::temp::TempDir;
use shadowback_xenbus::protocol::{key, kind};
use shadowback_xenbus::{Message, SeqPacket};

const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const XEN: &str = "xa";
const VHOST: &str = "vb";

/// A `shadowback up` with a Xen-ring disk, a vhost-user disk and, if
/// `vifs`, two vifs on a cable.
struct Site {
    dir: TempDir,
    control: PathBuf,
    vhost: PathBuf,
    log: PathBuf,
    up: ChildGuard,
}

impl Site {
    fn start(tag: &str, vifs: bool) -> Self {
        let dir = TempDir::new(tag);
        let control = dir.join("control.sock");
        let vhost = dir.join("vb.sock");
        let mut text = format!("socket = {control:?}\n");
        for (name, vhost_user) in [(XEN, None), (VHOST, Some(&vhost))] {
            let image = dir.join(format!("{name}.img"));
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(16 << 20))
                .expect("image");
            text.push_str(&format!(
                "[[disk]]\nname = {name:?}\npath = {image:?}\nstandby = true\n"
            ));
            if let Some(sock) = vhost_user {
                text.push_str(&format!("vhost_user = {sock:?}\n"));
            }
        }
        if vifs {
            text.push_str(
                "[[nic]]\nname = \"vifa\"\ncable = \"vifb\"\n\
                 [[nic]]\nname = \"vifb\"\ncable = \"vifa\"\n",
            );
        }
        let config = dir.join("shadowback.toml");
        std::fs::write(&config, text).expect("config");
        let log = dir.join("up.log");
        let up = shadowback_up(&config, &log);
        let site = Site {
            dir,
            control,
            vhost,
            log,
            up,
        };
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !site.serving() {
            assert!(
                Instant::now() < deadline,
                "shadowback up did not come up:\n{}",
                site.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
        site
    }

    /// Every device has its backend and standby.
    fn serving(&self) -> bool {
        SeqPacket::connect(&self.control).is_ok()
            && status(&self.control)
                .iter()
                .all(|(_, s)| s.pid.is_some() && s.standby_pid.is_some())
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stats(&self) -> Vec<(String, DeviceStats)> {
        status(&self.control)
    }

    /// A Xen-ring guest on `XEN` for `seconds`.
    fn xen_guest(&self, seconds: u32) -> GuestProcess {
        let mut cmd = GuestProcess::command();
        cmd.arg("--socket")
            .arg(&self.control)
            .args(["--device", XEN, "--qd", "16", "--seed", "3"])
            .args(["--duration", &seconds.to_string()]);
        GuestProcess::start(cmd)
    }

    /// A vhost-user guest on `VHOST` for `seconds`, without `--reconnect`:
    /// an EOF is an error.
    fn vhost_guest(&self, seconds: u32) -> GuestProcess {
        GuestProcess::spawn(
            &self.vhost,
            &[
                "--qd",
                "16",
                "--seed",
                "5",
                "--duration",
                &seconds.to_string(),
            ],
        )
    }
}

/// `upgrade` on the control socket; the new binary's `upgraded`, or the
/// old one's `error` text.
fn upgrade(socket: &Path, binary: Option<&Path>) -> Result<Message, String> {
    let control = SeqPacket::connect(socket).expect("control socket");
    let mut msg = Message::new(kind::UPGRADE);
    if let Some(b) = binary {
        msg.set(key::BINARY, b.display());
    }
    control.send(&msg, &[]).expect("send upgrade");
    let (reply, _) = control
        .recv_timeout(STEP_TIMEOUT)
        .expect("control socket")
        .expect("an answer to upgrade");
    match reply.kind() {
        kind::UPGRADED => Ok(reply),
        _ => Err(format!("{reply:?}")),
    }
}

fn assert_clean(who: &str, report: &Result<Report, String>, site: &Site) -> u64 {
    let r = report
        .as_ref()
        .unwrap_or_else(|e| panic!("{who}: {e}\n{}", site.logs()));
    eprintln!("{who}: {} ops, p99 {:?} µs", r.ops, r.lat_us);
    assert!(r.ops > 0, "{who}: no I/O: {r:?}");
    assert_eq!(
        (
            r.lost,
            r.duplicates,
            r.verify_failures,
            r.io_errors,
            r.stale_reads
        ),
        (0, 0, 0, 0, 0),
        "{who}: lost, duplicated, wrong, failed or stale: {r:?}\n{}",
        site.logs()
    );
    r.ops
}

fn stream_params(address: Ipv4Addr, peer: Ipv4Addr, bytes: u64) -> StreamParams {
    StreamParams {
        port: 5001,
        seed: 99,
        bytes,
        stall_timeout: Duration::from_secs(30),
        ..StreamParams::between(address, peer)
    }
}

/// A netfront on `vif` of the supervisor at `socket` running `role`.
fn vif_guest(
    socket: &Path,
    vif: &str,
    role: StreamRole,
    p: StreamParams,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<(StreamReport, NetFrontStats)> {
    let mut front =
        NetFront::attach(socket, &NetFrontConfig::new(vif)).expect("attach through the supervisor");
    thread::spawn(move || {
        let report = run_stream(&mut front, role, &p);
        done.store(true, Ordering::Release);
        let stats = front.stats();
        front.detach().expect("a clean close after the upgrades");
        (report, stats)
    })
}

/// One end of a stream: its report and the netfront's counters.
type Side = thread::JoinHandle<(StreamReport, NetFrontStats)>;

/// A TCP stream of `bytes` from a netfront on `vifa` (at `a`) to one on
/// `vifb` (at `b`); `done` turns true once either side is through.
fn vif_stream(site: &Site, a: Ipv4Addr, b: Ipv4Addr, bytes: u64) -> (Arc<AtomicBool>, Side, Side) {
    let done = Arc::new(AtomicBool::new(false));
    let receiver = vif_guest(
        &site.control,
        "vifb",
        StreamRole::Receiver,
        stream_params(b, a, bytes),
        done.clone(),
    );
    let sender = vif_guest(
        &site.control,
        "vifa",
        StreamRole::Sender,
        stream_params(a, b, bytes),
        done.clone(),
    );
    (done, sender, receiver)
}

/// Backend and standby pid of every device.
fn pids(stats: &[(String, DeviceStats)]) -> Vec<(String, Option<u32>, Option<u32>)> {
    stats
        .iter()
        .map(|(n, s)| (n.clone(), s.pid, s.standby_pid))
        .collect()
}

#[test]
fn upgrades_under_load_keep_every_guest_connected_and_every_backend_running() {
    const UPGRADES: usize = 3;
    const STREAM: u64 = 12 << 20;
    let mut site = Site::start("upgrade-load", true);
    let xen = site.xen_guest(6);
    let vhost = site.vhost_guest(6);
    let (a, b) = (Ipv4Addr::new(10, 7, 1, 1), Ipv4Addr::new(10, 7, 1, 2));
    let (done, sender, receiver) = vif_stream(&site, a, b, STREAM);
    thread::sleep(Duration::from_millis(800));
    let supervisor = site.up.pid();
    let before = site.stats();
    assert!(
        before.iter().all(|(_, s)| s.connected),
        "not every guest is connected: {before:?}"
    );
    let mut last = before.clone();
    let mut streaming_upgrades = 0;
    for n in 0..UPGRADES {
        let streaming = !done.load(Ordering::Acquire);
        let reply = upgrade(&site.control, None)
            .unwrap_or_else(|e| panic!("upgrade {n}: {e}\n{}", site.logs()));
        assert_eq!(
            reply.get(key::PID),
            Some(supervisor.to_string().as_str()),
            "the new binary runs in the same process"
        );
        let now = site.stats();
        assert_eq!(
            pids(&now),
            pids(&before),
            "upgrade {n}: a backend was replaced\n{}",
            site.logs()
        );
        for ((name, s), (_, was)) in now.iter().zip(&last) {
            // A vif's guest detaches once its stream is through.
            if streaming || !name.starts_with("vif") {
                assert!(s.connected, "upgrade {n}: {name} lost its guest: {s:?}");
            }
            assert!(
                s.io.requests >= was.io.requests,
                "upgrade {n}: {name}'s counters went back: {was:?} -> {s:?}"
            );
        }
        last = now;
        streaming_upgrades += usize::from(streaming);
        assert!(
            site.up.child().try_wait().expect("try_wait").is_none(),
            "the supervisor exited:\n{}",
            site.logs()
        );
        thread::sleep(Duration::from_millis(600));
    }
    let xen_ops = assert_clean("xen guest", &xen.finish(STEP_TIMEOUT), &site);
    let vhost_ops = assert_clean("vhost-user guest", &vhost.finish(STEP_TIMEOUT), &site);
    let (tx, tx_front) = sender.join().expect("sender");
    let (rx, rx_front) = receiver.join().expect("receiver");
    for (who, report, front) in [("sender", &tx, &tx_front), ("receiver", &rx, &rx_front)] {
        assert!(report.passed(), "{who}: {report:#?}");
        assert_eq!(report.resets, 0, "{who}: the TCP connection reset");
        assert_eq!(
            (front.tx_bad_responses, front.rx_bad_responses),
            (0, 0),
            "{who}: {front:?}"
        );
    }
    assert_eq!(tx.checksum, rx.checksum, "the stream arrived changed");
    assert!(
        streaming_upgrades > 0,
        "the stream ended before the first upgrade"
    );
    let after = site.stats();
    for ((name, s), (_, was)) in after.iter().zip(&before) {
        assert_eq!(
            (s.crashes, s.hangs, s.recoveries),
            (0, 0, 0),
            "{name}: a backend failed: {s:?}\n{}",
            site.logs()
        );
        assert!(
            s.io.requests > was.io.requests,
            "{name}: no requests counted after the upgrades: {was:?} -> {s:?}"
        );
    }
    let log = site.logs();
    assert_eq!(
        log.matches("took over from the previous binary").count(),
        UPGRADES,
        "{log}"
    );
    // Once, when the guest closed its socket at the end of its run.
    assert_eq!(
        log.matches("vhost-user frontend disconnected").count(),
        1,
        "a VMM connection ended early:\n{log}"
    );
    eprintln!(
        "{UPGRADES} upgrades: xen {xen_ops} ops, vhost-user {vhost_ops} ops, \
         {streaming_upgrades} during the stream"
    );
    drop(site.dir);
}

/// A shell script that answers `--state-version` like a shadowback and
/// then makes itself non-executable: it passes the check, and the
/// `execve` that follows fails.
fn self_disabling_binary(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("vanishing-shadowback");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nchmod a-x \"$0\"\necho {}\n",
            shadowback_supervisor::upgrade::STATE_VERSION
        ),
    )
    .expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn an_upgrade_that_cannot_exec_leaves_the_old_supervisor_serving() {
    use std::os::unix::fs::PermissionsExt;
    let mut site = Site::start("upgrade-fail", false);
    let xen = site.xen_guest(4);
    let vhost = site.vhost_guest(4);
    thread::sleep(Duration::from_millis(500));
    let before = pids(&site.stats());
    let missing = site.dir.join("no-such-binary");
    let plain = site.dir.join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\necho 1\n").expect("file");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let old = site.dir.join("old-shadowback");
    std::fs::write(&old, "#!/bin/sh\necho 0\n").expect("file");
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let vanishing = self_disabling_binary(site.dir.path());
    for (binary, why) in [
        (&missing, "no-such-binary"),
        (&plain, "Permission denied"),
        (&old, "reads state versions"),
        // Past the pause: the exec itself fails and everything resumes.
        (&vanishing, "exec"),
    ] {
        let err = upgrade(&site.control, Some(binary))
            .err()
            .unwrap_or_else(|| panic!("an upgrade to {} succeeded", binary.display()));
        assert!(err.contains(why), "{}: {err}", binary.display());
        assert_eq!(pids(&site.stats()), before, "{}", binary.display());
    }
    assert!(
        site.logs().contains("resumed after a failed upgrade"),
        "the exec failure did not pause and resume:\n{}",
        site.logs()
    );
    // Still serving: the guests finish clean, a new client is answered,
    // and a good upgrade goes through.
    assert_clean("xen guest", &xen.finish(STEP_TIMEOUT), &site);
    assert_clean("vhost-user guest", &vhost.finish(STEP_TIMEOUT), &site);
    let probe = SeqPacket::connect(&site.control).expect("control socket");
    probe.send(&Message::probe(XEN), &[]).expect("probe");
    let (answer, _) = probe
        .recv_timeout(STEP_TIMEOUT)
        .expect("control socket")
        .expect("an answer to probe");
    assert_eq!(answer.kind(), kind::BACKEND, "{answer:?}");
    upgrade(&site.control, None).unwrap_or_else(|e| panic!("{e}\n{}", site.logs()));
    assert!(site.up.child().try_wait().expect("try_wait").is_none());
}

#[test]
fn a_backend_killed_right_after_an_upgrade_is_recovered_by_the_new_binary() {
    const STREAM: u64 = 8 << 20;
    let mut site = Site::start("upgrade-kill", true);
    let xen = site.xen_guest(5);
    let vhost = site.vhost_guest(5);
    // A vif's takeover starts its new instance from the session the new
    // binary rebuilt: the netif rings, the wire and the device state area.
    let (a, b) = (Ipv4Addr::new(10, 7, 2, 1), Ipv4Addr::new(10, 7, 2, 2));
    let (_, sender, receiver) = vif_stream(&site, a, b, STREAM);
    thread::sleep(Duration::from_millis(500));
    let before = site.stats();
    for round in 0..2 {
        upgrade(&site.control, None).unwrap_or_else(|e| panic!("{e}\n{}", site.logs()));
        for dev in [XEN, VHOST, "vifa"] {
            assert!(fault_kill(&site.control, dev), "round {round}: {dev}");
        }
        thread::sleep(Duration::from_millis(700));
    }
    assert_clean("xen guest", &xen.finish(STEP_TIMEOUT), &site);
    assert_clean("vhost-user guest", &vhost.finish(STEP_TIMEOUT), &site);
    let (tx, _) = sender.join().expect("sender");
    let (rx, _) = receiver.join().expect("receiver");
    for (who, report) in [("sender", &tx), ("receiver", &rx)] {
        assert!(report.passed(), "{who}: {report:#?}\n{}", site.logs());
        assert_eq!(report.resets, 0, "{who}: the TCP connection reset");
    }
    assert_eq!(tx.checksum, rx.checksum, "the stream arrived changed");
    let after = site.stats();
    for dev in [XEN, VHOST, "vifa"] {
        let find = |list: &[(String, DeviceStats)]| {
            list.iter()
                .find(|(n, _)| n == dev)
                .map(|(_, s)| s.clone())
                .expect("listed")
        };
        let (s, was) = (find(&after), find(&before));
        assert!(
            s.recoveries >= 2,
            "{dev}: the kills after the upgrades were not recovered: {s:?}"
        );
        // The backend the first upgraded binary started survived the
        // second upgrade (it was forked by the thread that execs:
        // `PR_SET_PDEATHSIG` follows the forking thread).
        assert_eq!(
            s.crashes, 2,
            "{dev}: a backend died besides the two kills: {s:?}"
        );
        assert_ne!(s.pid, was.pid, "{dev}: still the killed backend");
        assert!(!s.given_up, "{dev}: {s:?}");
    }
    // Backends of every binary die with the supervisor (`PR_SET_PDEATHSIG`
    // follows the thread that forked them, which the execs kept).
    let backends = children(site.up.pid());
    assert!(backends.len() >= 6, "backends: {backends:?}");
    site.up.sigkill();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while backends.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "backends outlived their supervisor: {:?}",
            backends.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(20));
    }
}
