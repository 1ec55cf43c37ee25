//! vhost-user-net with several queue pairs (docs/ARCHITECTURE.md §8.1):
//! the native client (`VhostUserNet`, the test playing VMM and driver)
//! acks `VIRTIO_NET_F_MQ`, sets up every pair of a `[[nic]] queues = 4`
//! vif and uses three (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`), while several
//! verifying TCP connections run over it and the test kills the data
//! plane with `fault kill`. Every connection must end with every byte
//! once, in order, no reset; every used element must name a buffer in
//! flight; every transmit buffer is answered; the fourth pair carries
//! nothing; and more than one pair carries frames. Through a TAP in a
//! fresh network namespace (one TAP queue per pair, the fourth detached
//! so the kernel steers no flow to it: a flow that went there would
//! stall) and over a cable to a netfront guest (every pair shares the
//! cable, received frames fanned out by flow).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::net::{
    run_streams, StreamParams, StreamPattern, StreamReport, StreamRole, StreamVerifier,
};
use shadowback_guest::netfront::{NetFront, NetFrontConfig};
use shadowback_guest::vhost_user::{VhostUserNet, VhostUserNetOptions, VhostUserNetStats};
use shadowback_supervisor::DeviceStats;
use shadowback_supervisor::SupervisorThread;
use shadowback_testsupport::harness::supervisor_from_toml;
use shadowback_testsupport::operator::{fault_kill, stats_of};
use shadowback_testsupport::temp::TempDir;

const MIB: u64 = 1 << 20;
/// Pairs the vif has, and pairs the driver uses.
const DEVICE_PAIRS: u16 = 4;
const USED_PAIRS: u16 = 3;

fn start(dir: &TempDir, wire: &str, more: &str) -> (SupervisorThread, PathBuf, PathBuf) {
    let socket = dir.join("control.sock");
    let vhost = dir.join("vnet.sock");
    let toml = format!(
        "socket = \"{}\"\n[[nic]]\nname = \"vnet\"\n{wire}\nqueues = {DEVICE_PAIRS}\n\
         vhost_user = \"{}\"\n{more}",
        socket.display(),
        vhost.display()
    );
    (supervisor_from_toml(dir, &toml), socket, vhost)
}

fn stream(address: Ipv4Addr, peer: Ipv4Addr, port: u16, bytes: u64) -> StreamParams {
    StreamParams {
        port,
        seed: u64::from(port),
        bytes,
        stall_timeout: Duration::from_secs(30),
        ..StreamParams::between(address, peer)
    }
}

fn mq_options() -> VhostUserNetOptions {
    VhostUserNetOptions {
        queue_pairs: USED_PAIRS,
        ..VhostUserNetOptions::default()
    }
}

/// Kills `vnet`'s data plane every 120–210 ms until `done`, at most
/// `max_kills` times; returns the kills.
fn kill_until(socket: &Path, done: &AtomicBool, max_kills: u32) -> u32 {
    let started = Instant::now();
    while !stats_of(socket, "vnet").connected && started.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(10));
    }
    let mut kills = 0;
    let mut next = Instant::now() + Duration::from_millis(150);
    while !done.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(300) {
        thread::sleep(Duration::from_millis(5));
        if kills < max_kills && Instant::now() >= next {
            // A kill refused while the last one's instance is replaced is
            // no kill of its own: not counted.
            if fault_kill(socket, "vnet") {
                kills += 1;
            }
            next = Instant::now() + Duration::from_millis(120 + u64::from(kills) * 37 % 90);
        }
    }
    kills
}

fn assert_streams(who: &str, reports: &[StreamReport], bytes: u64) {
    for r in reports {
        eprintln!("{who}: {}", serde_json::to_string(r).unwrap());
        assert!(r.passed(), "{who}: {r:#?}");
        assert_eq!((r.bytes, r.resets), (bytes, 0), "{who}");
    }
}

/// The driver's counters: nothing on the pair not in use, frames on more
/// than one pair, each used element a buffer in flight.
fn assert_pairs(stats: &VhostUserNetStats) {
    let used = usize::from(USED_PAIRS);
    assert_eq!(stats.bad_used, 0, "{stats:?}");
    assert_eq!(
        (stats.pair_rx[used], stats.pair_tx[used]),
        (0, 0),
        "a pair not in use carried frames: {stats:?}"
    );
    let busy_rx = stats.pair_rx[..used].iter().filter(|&&n| n > 0).count();
    let busy_tx = stats.pair_tx[..used].iter().filter(|&&n| n > 0).count();
    assert!(
        busy_rx > 1 && busy_tx > 1,
        "one pair carried everything: {stats:?}"
    );
}

/// Waits until the supervisor counted a recovery for every kill (the
/// guests stay connected meanwhile: a kill just before the last byte
/// would otherwise find no session to recover), then lets the guests go.
fn recovered(socket: &Path, kills: u32, release: &AtomicBool) -> DeviceStats {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = stats_of(socket, "vnet");
    while s.recoveries < u64::from(kills) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        s = stats_of(socket, "vnet");
    }
    release.store(true, Ordering::Release);
    eprintln!("vnet: {s:?}");
    s
}

fn assert_recovered(s: &DeviceStats, kills: u32) {
    assert!(s.recoveries >= u64::from(kills), "{s:?} for {kills} kills");
    assert_eq!((s.failed_takeovers, s.given_up), (0, false), "{s:?}");
}

/// Holds a guest's connection until the test has counted the recoveries
/// (or a minute has passed).
fn hold_until(release: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !release.load(Ordering::Acquire) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
}

/// Three pairs of four through a TAP: four Linux sockets stream to the
/// guest and the guest streams to two Linux sockets, while the data plane
/// is killed.
#[test]
fn tcp_connections_over_three_pairs_of_a_tap_survive_kills() {
    use shadowback_testsupport::netns::{enter_fresh_netns, set_ipv4_24};
    const TAP: &str = "sbvmq0";
    const BYTES: u64 = 6 * MIB;
    const MIN_KILLS: u32 = 5;
    let linux = Ipv4Addr::new(10, 81, 0, 1);
    let guest = Ipv4Addr::new(10, 81, 0, 2);
    const INTO_GUEST: [u16; 4] = [6001, 6002, 6003, 6004];
    const OUT_OF_GUEST: [u16; 2] = [6101, 6102];
    let outcome = thread::spawn(move || {
        enter_fresh_netns();
        let dir = TempDir::new("vhost-user-net-mq-tap");
        let (sup, socket, vhost) = start(&dir, &format!("tap = \"{TAP}\""), "");
        set_ipv4_24(TAP, linux);
        // The Linux listeners the guest streams to, each checking what
        // arrives.
        let readers: Vec<_> = OUT_OF_GUEST
            .iter()
            .map(|&port| {
                let listener = TcpListener::bind(SocketAddrV4::new(linux, port)).unwrap();
                thread::spawn(move || linux_reader(listener, port, BYTES))
            })
            .collect();
        let done = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let guest_side = {
            let done = done.clone();
            let release = release.clone();
            thread::spawn(move || {
                let mut dev = VhostUserNet::connect(&vhost, &mq_options()).expect("connect");
                assert_eq!(dev.pairs(), usize::from(USED_PAIRS));
                let mut work: Vec<(StreamRole, StreamParams)> = INTO_GUEST
                    .iter()
                    .map(|&p| (StreamRole::Receiver, stream(guest, linux, p, BYTES)))
                    .collect();
                work.extend(
                    OUT_OF_GUEST
                        .iter()
                        .map(|&p| (StreamRole::Sender, stream(guest, linux, p, BYTES))),
                );
                let reports = run_streams(&mut dev, &work);
                done.store(true, Ordering::Release);
                let left = dev.settle(Duration::from_secs(10)).expect("settle");
                hold_until(&release);
                (reports, dev.stats(), left)
            })
        };
        let writers: Vec<_> = INTO_GUEST
            .iter()
            .map(|&port| {
                thread::spawn(move || linux_writer(SocketAddrV4::new(guest, port), port, BYTES))
            })
            .collect();
        let kills = kill_until(&socket, &done, MIN_KILLS + 5);
        let s = recovered(&socket, kills, &release);
        let (reports, stats, left) = guest_side.join().expect("guest");
        let written: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        let read: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        // The kernel's view: as many TAP queues attached as pairs in use
        // (tun sizes the interface's queues by its attached fds).
        let tap_queues = std::fs::read_dir(format!("/sys/class/net/{TAP}/queues"))
            .expect("TAP queues in sysfs")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("tx-"))
            })
            .count();
        sup.stop().expect("supervisor stop");
        (reports, stats, left, kills, written, read, tap_queues, s)
    })
    .join()
    .expect("the namespace thread panicked");
    let (reports, stats, left, kills, written, read, tap_queues, s) = outcome;
    assert_recovered(&s, kills);
    assert_eq!(
        tap_queues,
        usize::from(USED_PAIRS),
        "TAP queues attached: only those of the pairs in use"
    );
    eprintln!("kills={kills} guest={stats:?}");
    assert_streams("guest", &reports, BYTES);
    for w in written {
        assert_eq!(w, Ok(()), "a Linux writer");
    }
    // The guest's senders follow its receivers in `reports`.
    for ((port, r), sent) in OUT_OF_GUEST
        .iter()
        .zip(read)
        .zip(&reports[INTO_GUEST.len()..])
    {
        assert_eq!(r, Ok((BYTES, sent.checksum)), "the Linux reader on {port}");
    }
    assert_eq!(left, 0, "transmit buffers never answered");
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the streams ended"
    );
    assert_pairs(&stats);
}

/// Connects to the guest's listener on `to` (retrying until it listens)
/// and writes `bytes` of the pattern seeded `seed`.
fn linux_writer(to: SocketAddrV4, seed: u16, bytes: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match TcpStream::connect_timeout(&to.into(), Duration::from_secs(2)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("the guest never listened on {to}: {e}")),
        }
    };
    // A guest that stops reading fails the test, never hangs it.
    let limit = Some(Duration::from_secs(40));
    conn.set_write_timeout(limit).unwrap();
    conn.set_read_timeout(limit).unwrap();
    let pattern = StreamPattern::new(u64::from(seed));
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(buf.len() as u64) as usize;
        pattern.fill(at, &mut buf[..n]);
        conn.write_all(&buf[..n])
            .map_err(|e| format!("write at {at}: {e}"))?;
        at += n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    // Held until the guest has read everything and closed.
    let _ = conn.read_to_end(&mut Vec::new());
    Ok(())
}

/// Accepts one connection and checks `bytes` of the pattern seeded
/// `seed` arrive before the FIN: `(bytes, checksum)`.
fn linux_reader(listener: TcpListener, seed: u16, bytes: u64) -> Result<(u64, u32), String> {
    let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let mut verifier = StreamVerifier::new(u64::from(seed));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => verifier.feed(&buf[..n]),
            Err(e) => return Err(format!("read at {}: {e}", verifier.bytes())),
        }
    }
    if let Some(m) = verifier.first_mismatch() {
        return Err(format!("data mismatch: {m}"));
    }
    if verifier.bytes() != bytes {
        return Err(format!("{} bytes of {bytes}", verifier.bytes()));
    }
    Ok((verifier.bytes(), verifier.checksum()))
}

/// Three pairs of four on a cable to a netfront guest: three connections
/// each way, the vhost-user side's data plane killed throughout. The
/// pairs share the cable; what arrives is fanned out by flow.
#[test]
fn tcp_connections_over_three_pairs_on_a_cable_survive_kills() {
    const BYTES: u64 = 4 * MIB;
    const MIN_KILLS: u32 = 8;
    let dir = TempDir::new("vhost-user-net-mq-cable");
    let (sup, socket, vhost) = start(
        &dir,
        "cable = \"vif\"",
        "[[nic]]\nname = \"vif\"\ncable = \"vnet\"\n",
    );
    let a = Ipv4Addr::new(10, 9, 7, 1);
    let b = Ipv4Addr::new(10, 9, 7, 2);
    // Ports 7001-7003: the vhost-user guest sends; 7101-7103: it receives.
    let vwork: Vec<(StreamRole, StreamParams)> = (7001..7004)
        .map(|p| (StreamRole::Sender, stream(a, b, p, BYTES)))
        .chain((7101..7104).map(|p| (StreamRole::Receiver, stream(a, b, p, BYTES))))
        .collect();
    let fwork: Vec<(StreamRole, StreamParams)> = (7001..7004)
        .map(|p| (StreamRole::Receiver, stream(b, a, p, BYTES)))
        .chain((7101..7104).map(|p| (StreamRole::Sender, stream(b, a, p, BYTES))))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let mut front = NetFront::attach(&socket, &NetFrontConfig::new("vif")).expect("netfront");
    let fguest = {
        let done = done.clone();
        thread::spawn(move || {
            let reports = run_streams(&mut front, &fwork);
            done.store(true, Ordering::Release);
            let stats = front.stats();
            front.detach().expect("a clean close");
            (reports, stats)
        })
    };
    let vguest = {
        let done = done.clone();
        let release = release.clone();
        let vhost = vhost.clone();
        thread::spawn(move || {
            let mut dev = VhostUserNet::connect(&vhost, &mq_options()).expect("connect");
            let reports = run_streams(&mut dev, &vwork);
            done.store(true, Ordering::Release);
            let left = dev.settle(Duration::from_secs(10)).expect("settle");
            hold_until(&release);
            (reports, dev.stats(), left)
        })
    };
    let kills = kill_until(&socket, &done, MIN_KILLS + 8);
    let s = recovered(&socket, kills, &release);
    let (vreports, vstats, left) = vguest.join().expect("vhost-user guest");
    let (freports, fstats) = fguest.join().expect("netfront guest");
    eprintln!("kills={kills} vhost-user={vstats:?} netfront={fstats:?}");
    assert_streams("vhost-user", &vreports, BYTES);
    assert_streams("netfront", &freports, BYTES);
    for (v, f) in vreports.iter().zip(&freports) {
        assert_eq!(v.checksum, f.checksum, "the two ends of one connection");
    }
    assert_eq!(
        (fstats.tx_bad_responses, fstats.rx_bad_responses),
        (0, 0),
        "netfront: {fstats:?}"
    );
    assert_eq!(left, 0, "transmit buffers never answered");
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the streams ended"
    );
    assert_pairs(&vstats);
    assert_recovered(&s, kills);
    sup.stop().expect("supervisor stop");
}
