//! The supervisor serving vifs (docs/ARCHITECTURE.md §4, §11.6): a
//! `[[nic]]` config written by the test, guests attached through the
//! control socket with `NetFront::attach`, TCP streams between them (or
//! to a Linux socket behind a TAP) while the test injects `fault kill`
//! on the control socket, as an operator would. The guests must see a
//! stall only: no reset, every byte once and in order, every ring request
//! answered exactly once; `status` counts the recoveries. A vif's
//! `allow_uids` keep another tenant (a thread running as `nobody`) from
//! probing, connecting or seeing it (docs/PROTOCOL.md §1.2).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::net::{run_stream, StreamParams, StreamReport, StreamRole, StreamVerifier};
use shadowback_guest::netfront::{NetFront, NetFrontConfig, NetFrontStats};
use shadowback_supervisor::{Config, NicConfig, SupervisorThread};
use shadowback_testsupport::harness::{backend_command, supervisor_from_toml};
use shadowback_testsupport::netns::{enter_fresh_netns, set_ipv4_24};
use shadowback_testsupport::operator::{fault_kill, stats_of, status};
use shadowback_testsupport::temp::TempDir;
use shadowback_xenbus::protocol::kind;
use shadowback_xenbus::{Message, SeqPacket};

const MIB: u64 = 1 << 20;
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

fn params(address: Ipv4Addr, peer: Ipv4Addr, port: u16, bytes: u64) -> StreamParams {
    StreamParams {
        port,
        seed: 4242,
        bytes,
        stall_timeout: Duration::from_secs(30),
        ..StreamParams::between(address, peer)
    }
}

/// Runs `role` on a guest attached to `device` through the supervisor;
/// `done` is raised when the stream ends.
fn guest(
    socket: &Path,
    device: &str,
    role: StreamRole,
    p: StreamParams,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<(StreamReport, NetFrontStats)> {
    let mut front = NetFront::attach(socket, &NetFrontConfig::new(device))
        .expect("attach through the supervisor");
    thread::spawn(move || {
        let report = run_stream(&mut front, role, &p);
        done.store(true, Ordering::Release);
        let stats = front.stats();
        front.detach().expect("a clean close");
        (report, stats)
    })
}

fn assert_clean_front(who: &str, s: &NetFrontStats) {
    assert_eq!(
        s.tx_bad_responses, 0,
        "{who}: a TX request answered twice or never sent"
    );
    assert_eq!(
        s.rx_bad_responses, 0,
        "{who}: an RX buffer answered twice or never posted"
    );
}

fn assert_stream_passed(report: &StreamReport, bytes: u64) {
    eprintln!("{}", serde_json::to_string(report).unwrap());
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.bytes, bytes);
    assert_eq!(report.resets, 0, "the connection reset");
}

/// Writes `toml` as the config file and starts a supervisor on it.
fn start(dir: &TempDir, toml: &str) -> SupervisorThread {
    supervisor_from_toml(dir, toml)
}

#[test]
fn two_vifs_on_a_cable_carry_a_tcp_stream_through_twenty_kills() {
    const BYTES: u64 = 16 * MIB;
    const MIN_KILLS: u32 = 20;
    let dir = TempDir::new("sup-net-cable");
    let socket = dir.join("control.sock");
    let sup = start(
        &dir,
        &format!(
            "socket = \"{}\"\n\
             [[nic]]\nname = \"vifa\"\ncable = \"vifb\"\n\
             [[nic]]\nname = \"vifb\"\ncable = \"vifa\"\n",
            socket.display()
        ),
    );
    let a = Ipv4Addr::new(10, 9, 1, 1);
    let b = Ipv4Addr::new(10, 9, 1, 2);
    let done = Arc::new(AtomicBool::new(false));
    let receiver = guest(
        &socket,
        "vifb",
        StreamRole::Receiver,
        params(b, a, 5001, BYTES),
        done.clone(),
    );
    let sender = guest(
        &socket,
        "vifa",
        StreamRole::Sender,
        params(a, b, 5001, BYTES),
        done.clone(),
    );
    for vif in ["vifa", "vifb"] {
        assert!(stats_of(&socket, vif).connected, "{vif} is not connected");
    }
    // A kill every 25-95 ms, alternating sides, MIN_KILLS + 20 times at
    // most; each can cost the stream a retransmission timeout (a frame
    // inside the dead process is lost, as on any NIC).
    let mut kills = [0u64; 2];
    let started = Instant::now();
    while !done.load(Ordering::Acquire)
        && kills.iter().sum::<u64>() < u64::from(MIN_KILLS + 20)
        && started.elapsed() < Duration::from_secs(300)
    {
        let n = kills.iter().sum::<u64>();
        thread::sleep(Duration::from_millis(25 + n * 37 % 70));
        if done.load(Ordering::Acquire) {
            break;
        }
        let side = (n % 2) as usize;
        if fault_kill(&socket, ["vifa", "vifb"][side]) {
            kills[side] += 1;
        }
    }
    let (tx, tx_front) = sender.join().expect("sender");
    let (rx, rx_front) = receiver.join().expect("receiver");
    eprintln!("kills={kills:?} sender={tx_front:?} receiver={rx_front:?}");
    assert_stream_passed(&tx, BYTES);
    assert_stream_passed(&rx, BYTES);
    assert_eq!(tx.checksum, rx.checksum);
    assert_eq!(rx.first_mismatch, None);
    assert_clean_front("sender", &tx_front);
    assert_clean_front("receiver", &rx_front);
    assert!(
        kills.iter().sum::<u64>() >= u64::from(MIN_KILLS),
        "only {kills:?} kills before the stream ended"
    );
    for (vif, killed) in ["vifa", "vifb"].into_iter().zip(kills) {
        let s = stats_of(&socket, vif);
        eprintln!("{vif}: {s:?}");
        assert!(
            s.recoveries >= killed,
            "{vif}: {} recoveries for {killed} kills",
            s.recoveries
        );
        assert!(s.crashes >= killed, "{vif}: {s:?}");
        assert_eq!((s.failed_takeovers, s.given_up), (0, false), "{vif}: {s:?}");
        assert!(s.pid.is_some(), "{vif}: no backend after the run");
    }
    // The receiver's side held posted RX buffers at every kill.
    assert!(stats_of(&socket, "vifb").rx_buffers_recovered > 0);
    sup.stop().expect("supervisor stop");
}

#[test]
fn a_vif_on_a_tap_streams_to_a_linux_socket_through_kills_with_carrier_up() {
    const TAP: &str = "sbnic0";
    const BYTES: u64 = 16 * MIB;
    const MIN_KILLS: u64 = 10;
    let linux = Ipv4Addr::new(10, 78, 0, 1);
    let guest_addr = Ipv4Addr::new(10, 78, 0, 2);
    let outcome = thread::spawn(move || {
        enter_fresh_netns();
        let dir = TempDir::new("sup-net-tap");
        let socket = dir.join("control.sock");
        // The supervisor's thread starts in this namespace: it creates
        // the TAP here.
        let sup = start(
            &dir,
            &format!(
                "socket = \"{}\"\n[[nic]]\nname = \"viftap\"\ntap = \"{TAP}\"\n",
                socket.display()
            ),
        );
        set_ipv4_24(TAP, linux);
        let carrier_path = format!("/sys/class/net/{TAP}/carrier");
        let carrier = || std::fs::read_to_string(&carrier_path).map(|s| s.trim().to_string());
        assert_eq!(carrier().expect("the TAP in sysfs"), "1");

        let listener = TcpListener::bind(SocketAddrV4::new(linux, 5002)).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let sender = guest(
            &socket,
            "viftap",
            StreamRole::Sender,
            params(guest_addr, linux, 5002, BYTES),
            done.clone(),
        );
        let reader = thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("the guest connects");
            conn.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut verifier = StreamVerifier::new(4242);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match conn.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => r.expect("read from the guest"),
                };
                if n == 0 {
                    break;
                }
                verifier.feed(&buf[..n]);
            }
            (
                verifier.bytes(),
                verifier.checksum(),
                verifier.first_mismatch(),
            )
        });
        let mut kills = 0u64;
        let mut samples = 0u64;
        let mut carrier_down = Vec::new();
        let started = Instant::now();
        let mut next_kill = Instant::now() + Duration::from_millis(100);
        while !done.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(300) {
            thread::sleep(Duration::from_millis(5));
            match carrier() {
                Ok(c) if c == "1" => {}
                other => carrier_down.push(format!("{:?}: {other:?}", started.elapsed())),
            }
            samples += 1;
            if kills < MIN_KILLS + 10 && Instant::now() >= next_kill {
                if fault_kill(&socket, "viftap") {
                    kills += 1;
                }
                next_kill = Instant::now() + Duration::from_millis(60 + kills * 37 % 90);
            }
        }
        let (report, front) = sender.join().expect("sender");
        let linux_side = reader.join().expect("reader");
        let stats = stats_of(&socket, "viftap");
        let after = carrier();
        sup.stop().expect("supervisor stop");
        (
            report,
            front,
            linux_side,
            stats,
            kills,
            samples,
            carrier_down,
            after,
        )
    })
    .join()
    .expect("the namespace thread panicked");
    let (report, front, (bytes, crc, mismatch), stats, kills, samples, down, after) = outcome;
    eprintln!("kills={kills} samples={samples} front={front:?} stats={stats:?}");
    assert_stream_passed(&report, BYTES);
    assert_eq!((bytes, crc, mismatch), (BYTES, report.checksum, None));
    assert_clean_front("guest", &front);
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the stream ended"
    );
    assert!(samples > kills, "the carrier was sampled {samples} times");
    assert!(down.is_empty(), "the TAP lost its carrier: {down:?}");
    assert_eq!(after.as_deref().ok(), Some("1"));
    assert!(stats.recoveries >= kills, "{stats:?}");
    assert_eq!(stats.failed_takeovers, 0, "{stats:?}");
}

#[test]
fn bad_nic_configs_are_refused_before_anything_starts() {
    let dir = TempDir::new("sup-net-bad");
    let socket = dir.join("control.sock");
    for (nics, says) in [
        ("[[nic]]\nname = \"a\"\ncable = \"nobody\"\n", "unknown nic"),
        (
            "[[nic]]\nname = \"a\"\ncable = \"b\"\n[[nic]]\nname = \"b\"\ntap = \"t0\"\n",
            "does not name",
        ),
        ("[[nic]]\nname = \"a\"\ntap = \"t0\"\nmac = \"01:00:5e:00:00:01\"\n", "multicast"),
        ("[[nic]]\nname = \"a\"\ntap = \"t0\"\nmtu = 40\n", "mtu 40"),
        ("[[nic]]\nname = \"a\"\n", "exactly one"),
        (
            "[[disk]]\nname = \"a\"\npath = \"/nonexistent\"\n[[nic]]\nname = \"a\"\ntap = \"t0\"\n",
            "disk's too",
        ),
    ] {
        let text = format!("socket = \"{}\"\n{nics}", socket.display());
        let path = dir.join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let err = Config::from_file(&path).expect_err(&text).to_string();
        assert!(err.contains(says), "{text}\n=> {err} (wanted {says:?})");
    }
    // A config built in code is validated by the supervisor too, before
    // it binds its socket or makes any wire.
    for (nics, says) in [
        (vec![NicConfig::cable("a", "nobody")], "unknown nic"),
        (
            vec![NicConfig {
                mtu: 40,
                ..NicConfig::tap("a", "t0")
            }],
            "mtu 40",
        ),
    ] {
        let cfg = Config {
            socket: socket.clone(),
            disks: Vec::new(),
            nics,
            control: Default::default(),
            backend: Default::default(),
            standby: Default::default(),
            limits: Default::default(),
            metrics: Default::default(),
        };
        let err = SupervisorThread::start(cfg, backend_command())
            .err()
            .expect("the supervisor refused it")
            .to_string();
        assert!(err.contains(says), "{err} (wanted {says:?})");
        assert!(!socket.exists(), "a refused config left its socket");
    }
}

fn borrowed(fds: &[std::os::fd::OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// `connect` for a vif with `fds`; returns the supervisor's answer.
fn raw_connect(socket: &Path, msg: &Message, fds: &[BorrowedFd<'_>]) -> Message {
    let control = SeqPacket::connect(socket).expect("control socket");
    control.send(msg, fds).unwrap();
    let (reply, _) = control
        .recv_timeout(REPLY_TIMEOUT)
        .expect("control socket")
        .expect("an answer to connect");
    reply
}

#[test]
fn hostile_vif_connects_are_refused_and_the_vif_stays_usable() {
    let dir = TempDir::new("sup-net-hostile");
    let socket = dir.join("control.sock");
    let sup = start(
        &dir,
        &format!(
            "socket = \"{}\"\n\
             [[nic]]\nname = \"vifa\"\ncable = \"vifb\"\nstandby = false\n\
             [[nic]]\nname = \"vifb\"\ncable = \"vifa\"\nstandby = false\n",
            socket.display()
        ),
    );
    let front = NetFront::new(NetFrontConfig::new("vifa")).unwrap();
    let fds = front.fds().unwrap();
    let good = front.connect_request();
    let mut gso = good.clone();
    gso.features.gso_tcpv4 = true;
    let mut split = good.clone();
    split.split_event_channels = true;
    let swapped = [&fds[1], &fds[0], &fds[2]].map(|f| f.try_clone().unwrap());
    let no_event = [&fds[0], &fds[0], &fds[2]].map(|f| f.try_clone().unwrap());
    let cases: [(&str, Message, Vec<BorrowedFd<'_>>); 5] = [
        ("two fds", good.to_message(), borrowed(&fds[..2])),
        ("5 fds expected", split.to_message(), borrowed(&fds)),
        ("an offload not offered", gso.to_message(), borrowed(&fds)),
        (
            "an eventfd as the region",
            good.to_message(),
            borrowed(&swapped),
        ),
        (
            "the region as an eventfd",
            good.to_message(),
            borrowed(&no_event),
        ),
    ];
    for (what, msg, fds) in cases {
        let reply = raw_connect(&socket, &msg, &fds);
        assert_eq!(reply.kind(), kind::ERROR, "{what}: {reply:?}");
        assert_eq!(reply.get("code"), Some("EINVAL"), "{what}: {reply:?}");
    }
    let s = stats_of(&socket, "vifa");
    assert_eq!((s.connected, s.crashes), (false, 0), "{s:?}");
    // A vif's probe answers the vif's keys; the vif still attaches.
    drop(front);
    let front = NetFront::attach(&socket, &NetFrontConfig::new("vifa")).expect("attach");
    assert!(stats_of(&socket, "vifa").connected);
    assert_eq!(
        front.config().mac,
        NicConfig::cable("vifa", "vifb").mac_addr().unwrap()
    );
    // The device is taken while attached.
    let again = NetFront::attach(&socket, &NetFrontConfig::new("vifa"));
    assert!(again.is_err(), "a second guest attached the same vif");
    front.detach().expect("close");
    sup.stop().expect("supervisor stop");
}

/// The uid and gid of another tenant (`nobody`).
const NOBODY: u32 = 65534;

/// Runs `f` on a thread of its own whose uid and gid are `id`: the raw
/// syscalls change that thread's credentials only (glibc's wrappers would
/// change every thread of the process), and `SO_PEERCRED` reports those
/// of the thread that connects.
#[allow(
    unsafe_code,
    reason = "setresgid/setresuid of one thread; no wrapper does that"
)]
fn on_thread_as<T: Send + 'static>(id: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        // SAFETY: both syscalls take integers only and change the
        // credentials of this thread, which ends with `f`.
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, id, id, id) };
        assert_eq!(rc, 0, "setresgid: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, id, id, id) };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread of another uid panicked")
}

/// The devices `status` lists to the calling thread.
fn status_devices(socket: &Path) -> Vec<String> {
    status(socket).into_iter().map(|(name, _)| name).collect()
}

#[test]
fn a_vif_is_used_only_by_the_peers_its_allow_lists_name() {
    let dir = TempDir::new("sup-net-tenants");
    let socket = dir.join("control.sock");
    let sup = start(
        &dir,
        &format!(
            "socket = \"{}\"\n\
             [[nic]]\nname = \"vifa\"\ncable = \"vifb\"\nstandby = false\nallow_uids = [{NOBODY}]\n\
             [[nic]]\nname = \"vifb\"\ncable = \"vifa\"\nstandby = false\n",
            socket.display()
        ),
    );
    // The socket's mode is the first gate; the allow lists the second.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let at = socket.clone();
    let (probed, connected, seen, own) = on_thread_as(NOBODY, move || {
        let probed = NetFront::attach(&at, &NetFrontConfig::new("vifb"))
            .map(|f| f.detach())
            .err()
            .map(|e| e.to_string());
        // `connect` straight away, without a probe.
        let front = NetFront::new(NetFrontConfig::new("vifb")).unwrap();
        let fds = front.fds().unwrap();
        let connected = raw_connect(&at, &front.connect_request().to_message(), &borrowed(&fds));
        let seen = status_devices(&at);
        let own = NetFront::attach(&at, &NetFrontConfig::new("vifa"))
            .map_err(|e| e.to_string())
            .and_then(|f| f.detach().map_err(|e| e.to_string()));
        (probed, connected, seen, own)
    });
    let probed = probed.expect("nobody attached vifb");
    assert!(probed.contains("EACCES"), "{probed}");
    assert_eq!(
        (connected.kind(), connected.get("code")),
        (kind::ERROR, Some("EACCES")),
        "{connected:?}"
    );
    assert_eq!(seen, ["vifa"], "nobody's status");
    own.expect("nobody attaches the vif allowed to it");
    let s = stats_of(&socket, "vifb");
    assert_eq!((s.connected, s.crashes), (false, 0), "{s:?}");
    // Its owner still attaches it, and sees both.
    let front = NetFront::attach(&socket, &NetFrontConfig::new("vifb")).expect("root attaches");
    assert_eq!(status_devices(&socket), ["vifa", "vifb"]);
    front.detach().expect("close");
    sup.stop().expect("supervisor stop");
}
