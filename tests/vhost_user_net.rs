//! vhost-user-net (docs/ARCHITECTURE.md §8.1): a guest on a native
//! vhost-user-net client (`VhostUserNet`, the test playing VMM and driver)
//! streams TCP over a supervisor's `[[nic]] vhost_user` socket, through
//! the vif's cable, to a guest on netfront attached to the other end —
//! while the test kills the vhost-user side's data plane with `fault kill`
//! on the control socket, as an operator would. The stream must never
//! reset, every byte must arrive once and in order, every transmit head
//! and every receive buffer must be used exactly once, and the link in
//! the config space stays up (the supervisor answers it, not a backend).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::net::{run_stream, StreamParams, StreamReport, StreamRole};
use shadowback_guest::netfront::{NetFront, NetFrontConfig, NetFrontStats};
use shadowback_guest::vhost_user::{VhostUserNet, VhostUserNetOptions, VhostUserNetStats};
use shadowback_supervisor::SupervisorThread;
use shadowback_testsupport::harness::supervisor_from_toml;
use shadowback_testsupport::operator::{fault_kill, stats_of};
use shadowback_testsupport::temp::TempDir;

mod netback_common;

const MIB: u64 = 1 << 20;

fn params(address: Ipv4Addr, peer: Ipv4Addr, bytes: u64) -> StreamParams {
    StreamParams {
        port: 5001,
        seed: 77,
        bytes,
        stall_timeout: Duration::from_secs(30),
        ..StreamParams::between(address, peer)
    }
}

/// A supervisor with vif `vnet` (vhost-user, cable to `vif`) and `vif`
/// (netif), and the vhost-user socket's path.
fn start(dir: &TempDir) -> (SupervisorThread, std::path::PathBuf, std::path::PathBuf) {
    start_with(
        dir,
        "cable = \"vif\"",
        "[[nic]]\nname = \"vif\"\ncable = \"vnet\"\n",
    )
}

/// A supervisor with vif `vnet` (vhost-user) on `wire` (a `cable` or `tap`
/// line), then `more` config; the control and vhost-user sockets' paths.
fn start_with(
    dir: &TempDir,
    wire: &str,
    more: &str,
) -> (SupervisorThread, std::path::PathBuf, std::path::PathBuf) {
    let socket = dir.join("control.sock");
    let vhost = dir.join("vnet.sock");
    let toml = format!(
        "socket = \"{}\"\n[[nic]]\nname = \"vnet\"\n{wire}\nvhost_user = \"{}\"\n{more}",
        socket.display(),
        vhost.display()
    );
    (supervisor_from_toml(dir, &toml), socket, vhost)
}

/// The vhost-user side: connects, runs `role`, waits for every transmit
/// head to be answered.
fn vhost_guest(
    vhost: &Path,
    role: StreamRole,
    p: StreamParams,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<(StreamReport, VhostUserNetStats, bool)> {
    let vhost = vhost.to_path_buf();
    thread::spawn(move || {
        let mut dev = VhostUserNet::connect(&vhost, &VhostUserNetOptions::default())
            .expect("vhost-user-net connect");
        let link_up = dev.link_up();
        let report = run_stream(&mut dev, role, &p);
        done.store(true, Ordering::Release);
        let left = dev.settle(Duration::from_secs(10)).expect("settle");
        assert_eq!(left, 0, "transmit heads never answered");
        (report, dev.stats(), link_up)
    })
}

fn netfront_guest(
    socket: &Path,
    role: StreamRole,
    p: StreamParams,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<(StreamReport, NetFrontStats)> {
    let mut front = NetFront::attach(socket, &NetFrontConfig::new("vif"))
        .expect("attach through the supervisor");
    thread::spawn(move || {
        let report = run_stream(&mut front, role, &p);
        done.store(true, Ordering::Release);
        let stats = front.stats();
        front.detach().expect("a clean close");
        (report, stats)
    })
}

fn assert_passed(who: &str, report: &StreamReport, bytes: u64) {
    eprintln!("{who}: {}", serde_json::to_string(report).unwrap());
    assert!(report.passed(), "{who}: {report:#?}");
    assert_eq!(report.bytes, bytes, "{who}");
    assert_eq!(report.resets, 0, "{who}: the connection reset");
}

/// Runs a stream of `bytes` from the vhost-user guest (`vnet_sends`) or to
/// it, killing `vnet`'s backend every 40–110 ms until the stream ends or
/// `max_kills` were done; returns the kills.
fn stream_with_kills(bytes: u64, vnet_sends: bool, max_kills: u32) -> u32 {
    let dir = TempDir::new("vhost-user-net");
    let (sup, socket, vhost) = start(&dir);
    let a = Ipv4Addr::new(10, 9, 2, 1);
    let b = Ipv4Addr::new(10, 9, 2, 2);
    let (vrole, frole) = if vnet_sends {
        (StreamRole::Sender, StreamRole::Receiver)
    } else {
        (StreamRole::Receiver, StreamRole::Sender)
    };
    let done = Arc::new(AtomicBool::new(false));
    // Listener first: the receiver listens, the sender connects.
    let (vguest, fguest) = if vnet_sends {
        let f = netfront_guest(&socket, frole, params(b, a, bytes), done.clone());
        let v = vhost_guest(&vhost, vrole, params(a, b, bytes), done.clone());
        (v, f)
    } else {
        let v = vhost_guest(&vhost, vrole, params(a, b, bytes), done.clone());
        let f = netfront_guest(&socket, frole, params(b, a, bytes), done.clone());
        (v, f)
    };
    let mut kills = 0u32;
    let started = Instant::now();
    // Give the vhost-user session time to start before the first kill.
    while !stats_of(&socket, "vnet").connected && started.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(10));
    }
    while !done.load(Ordering::Acquire)
        && kills < max_kills
        && started.elapsed() < Duration::from_secs(300)
    {
        thread::sleep(Duration::from_millis(40 + u64::from(kills) * 37 % 70));
        if done.load(Ordering::Acquire) {
            break;
        }
        // A kill refused because the last one's instance is still being
        // replaced would be no kill of its own: not counted.
        if fault_kill(&socket, "vnet") {
            kills += 1;
        }
    }
    let (vreport, vstats, link_up) = vguest.join().expect("vhost-user guest");
    let (freport, fstats) = fguest.join().expect("netfront guest");
    eprintln!("kills={kills} vhost-user={vstats:?} netfront={fstats:?}");
    assert!(link_up, "the config space showed the link down");
    assert_passed("vhost-user", &vreport, bytes);
    assert_passed("netfront", &freport, bytes);
    assert_eq!(vreport.checksum, freport.checksum);
    assert_eq!(
        vstats.bad_used, 0,
        "a head used twice, or never made available"
    );
    assert_eq!(
        (fstats.tx_bad_responses, fstats.rx_bad_responses),
        (0, 0),
        "netfront: {fstats:?}"
    );
    // `fault kill` returns once the signal is sent; the supervisor counts
    // the death when it reaps the process, which the last kill may not
    // have reached yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = stats_of(&socket, "vnet");
    while s.recoveries < u64::from(kills) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        s = stats_of(&socket, "vnet");
    }
    eprintln!("vnet: {s:?}");
    assert!(s.recoveries >= u64::from(kills), "{s:?} for {kills} kills");
    // One pair: at a death at most the frame being written is taken and
    // not logged, and a count is never repeated (docs/ARCHITECTURE.md §8.1).
    assert!(
        s.rx_dropped_in_crash <= u64::from(kills),
        "{s:?} for {kills} kills"
    );
    assert_eq!((s.failed_takeovers, s.given_up), (0, false), "{s:?}");
    sup.stop().expect("supervisor stop");
    kills
}

#[test]
fn a_vhost_user_net_guest_streams_to_a_netif_guest() {
    stream_with_kills(4 * MIB, true, 0);
}

#[test]
fn a_vhost_user_net_stream_survives_fifty_kills_of_its_data_plane() {
    const MIN_KILLS: u32 = 50;
    let kills = stream_with_kills(64 * MIB, true, MIN_KILLS + 10);
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the stream ended"
    );
}

#[test]
fn a_vhost_user_net_guest_receives_through_twenty_kills() {
    const MIN_KILLS: u32 = 20;
    let kills = stream_with_kills(16 * MIB, false, MIN_KILLS + 10);
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the stream ended"
    );
}

/// A test frame to `dst` from the netfront guest, carrying `tag`.
fn tagged_frame(dst: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[2, 0x77, 0, 0, 0, 1]);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
    f.push(tag);
    f.resize(60, 0);
    f
}

/// Receives on `dev` until the frame tagged `last` arrives; returns every
/// tag received.
fn tags_until(dev: &mut VhostUserNet, last: u8) -> Vec<u8> {
    use shadowback_guest::net::FrameDevice;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tags = Vec::new();
    let mut buf = Vec::new();
    while Instant::now() < deadline {
        if dev.recv(&mut buf).expect("receive") {
            if buf.len() >= 15 && buf[12..14] == 0x88b5u16.to_be_bytes() {
                tags.push(buf[14]);
                if buf[14] == last {
                    return tags;
                }
            }
        } else {
            thread::sleep(Duration::from_millis(1));
        }
    }
    panic!("frame {last} never arrived; got {tags:?}");
}

/// What the driver sets on the control queue — its MAC, promiscuity off,
/// a multicast table — is the device's, not the backend's: after the data
/// plane is killed the next instance filters exactly as the dead one did.
/// Hostile commands get `VIRTIO_NET_ERR` and change nothing.
#[test]
fn control_queue_state_survives_a_kill_of_the_data_plane() {
    use shadowback_guest::net::FrameDevice;
    let dir = TempDir::new("vhost-user-net-ctrl");
    let (sup, socket, vhost) = start(&dir);
    let opts = VhostUserNetOptions {
        control_queue: true,
        ..VhostUserNetOptions::default()
    };
    let mut dev = VhostUserNet::connect(&vhost, &opts).expect("vhost-user-net connect");
    let mut front = NetFront::attach(&socket, &NetFrontConfig::new("vif")).expect("netfront");
    let old_mac = dev.mac();
    let new_mac = [2, 0x5b, 0, 0, 0, 0x42];
    let joined = [0x33, 0x33, 0, 0, 0, 1];
    let other_group = [0x33, 0x33, 0, 0, 0, 2];
    let mut tables = 0u32.to_le_bytes().to_vec(); // no unicast entry
    tables.extend_from_slice(&1u32.to_le_bytes());
    tables.extend_from_slice(&joined);
    // class MAC (1): ADDR_SET (1), TABLE_SET (0); class RX (0): PROMISC (0).
    assert_eq!(dev.config_mac().expect("GET_CONFIG"), old_mac);
    assert!(dev.control(1, 1, &new_mac).expect("MAC_ADDR_SET"));
    // The config space shows the MAC the driver set (the supervisor
    // answers GET_CONFIG from the device state area).
    assert_eq!(dev.config_mac().expect("GET_CONFIG"), new_mac);
    assert!(dev.control(1, 0, &tables).expect("MAC_TABLE_SET"));
    assert!(dev.control(0, 0, &[0]).expect("promiscuous off"));
    // Hostile or unsupported: refused, the state unchanged.
    assert!(!dev.control(9, 9, &[1; 40]).expect("unknown class"));
    assert!(!dev.control(1, 1, &[1, 2, 3]).expect("short MAC"));
    let mut lying = u32::MAX.to_le_bytes().to_vec();
    lying.extend_from_slice(&[0; 8]);
    assert!(!dev
        .control(1, 0, &lying)
        .expect("table longer than its bytes"));
    assert!(!dev
        .control(4, 0, &2u16.to_le_bytes())
        .expect("MQ not offered"));

    let send_round = |front: &mut NetFront, round: u8| {
        let base = round * 10;
        for (dst, tag) in [
            (new_mac, base + 1),
            (old_mac, base + 2),
            (joined, base + 3),
            (other_group, base + 4),
            ([0xff; 6], base + 5),
            (new_mac, base + 9),
        ] {
            front.send(&tagged_frame(dst, tag)).expect("netfront send");
        }
    };
    let expected = |round: u8| -> Vec<u8> { [1, 3, 5, 9].iter().map(|t| round * 10 + t).collect() };
    send_round(&mut front, 1);
    assert_eq!(tags_until(&mut dev, 19), expected(1), "before the kill");

    for round in 2..5u8 {
        let before = stats_of(&socket, "vnet").recoveries;
        assert!(fault_kill(&socket, "vnet"), "kill {round}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while stats_of(&socket, "vnet").recoveries <= before {
            assert!(Instant::now() < deadline, "no recovery after kill {round}");
            thread::sleep(Duration::from_millis(10));
        }
        send_round(&mut front, round);
        assert_eq!(
            tags_until(&mut dev, round * 10 + 9),
            expected(round),
            "after kill {}",
            round - 1
        );
        assert_eq!(
            dev.config_mac().expect("GET_CONFIG"),
            new_mac,
            "after a kill"
        );
    }
    // The driver can still change it, and that holds too.
    assert!(dev.control(0, 0, &[1]).expect("promiscuous on"));
    assert!(fault_kill(&socket, "vnet"));
    send_round(&mut front, 6);
    assert_eq!(tags_until(&mut dev, 69), vec![61, 62, 63, 64, 65, 69]);
    assert_eq!(dev.stats().bad_used, 0);
    front.detach().expect("a clean close");
    sup.stop().expect("supervisor stop");
}

/// Reads what a packet socket on the TAP has queued, without waiting, and
/// appends the number of each numbered test frame of `len` bytes (after the
/// kernel's 10-byte virtio-net header) to `seen`; other frames are skipped.
fn read_numbered_frames(sock: &impl AsFd, buf: &mut [u8], len: usize, seen: &mut Vec<u32>) {
    loop {
        match nix::sys::socket::recv(
            sock.as_fd().as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) if n == 10 + len && buf[10 + 12..10 + 14] == [0x88, 0xb5] => {
                seen.push(netback_common::check_frame(&buf[10..n]));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// A Linux TCP socket streams to a vhost-user-net guest through a TAP
/// with TCP segmentation negotiated (GUEST_TSO4 and GUEST_CSUM, HOST_TSO4
/// and CSUM): the TAP hands the backend super-frames, which reach the
/// guest whole over merged receive buffers, partial checksums and all,
/// while its data plane is killed. The data is checked byte for byte.
#[test]
fn tcp_super_frames_from_a_tap_reach_a_vhost_user_net_guest_through_kills() {
    use shadowback_guest::net::StreamPattern;
    use shadowback_testsupport::netns::{enter_fresh_netns, set_ipv4_24};
    use std::io::Write;
    use std::net::{SocketAddrV4, TcpStream};
    const TAP: &str = "sbvtso0";
    const BYTES: u64 = 16 * MIB;
    const MIN_KILLS: u32 = 5;
    let linux = Ipv4Addr::new(10, 79, 0, 1);
    let guest_addr = Ipv4Addr::new(10, 79, 0, 2);
    let outcome = thread::spawn(move || {
        enter_fresh_netns();
        let dir = TempDir::new("vhost-user-net-tso");
        // The supervisor's thread starts in this namespace: it creates
        // the TAP here.
        let (sup, socket, vhost) = start_with(&dir, &format!("tap = \"{TAP}\""), "");
        set_ipv4_24(TAP, linux);
        let tap_stat = |name: &str| -> u64 {
            std::fs::read_to_string(format!("/sys/class/net/{TAP}/statistics/{name}"))
                .expect("TAP statistics")
                .trim()
                .parse()
                .unwrap()
        };
        let done = Arc::new(AtomicBool::new(false));
        let guest = {
            let done = done.clone();
            let vhost = vhost.clone();
            thread::spawn(move || {
                let opts = VhostUserNetOptions {
                    offloads: true,
                    ..VhostUserNetOptions::default()
                };
                let mut dev = VhostUserNet::connect(&vhost, &opts).expect("vhost-user-net connect");
                let p = StreamParams {
                    port: 5003,
                    ..params(guest_addr, linux, BYTES)
                };
                let report = run_stream(&mut dev, StreamRole::Receiver, &p);
                done.store(true, Ordering::Release);
                (report, dev.stats())
            })
        };
        // The Linux side connects once the guest listens.
        let writer = thread::spawn(move || {
            let to = SocketAddrV4::new(guest_addr, 5003);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut conn = loop {
                match TcpStream::connect_timeout(&to.into(), Duration::from_secs(2)) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("connect: {e}");
                        thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("the guest never listened: {e}"),
                }
            };
            // A guest that stops reading fails the test, never hangs it.
            let limit = Some(Duration::from_secs(40));
            conn.set_write_timeout(limit).unwrap();
            conn.set_read_timeout(limit).unwrap();
            let pattern = StreamPattern::new(77);
            let mut buf = vec![0u8; 256 * 1024];
            let mut at = 0u64;
            while at < BYTES {
                let n = (BYTES - at).min(buf.len() as u64) as usize;
                pattern.fill(at, &mut buf[..n]);
                if let Err(e) = conn.write_all(&buf[..n]) {
                    return Err(format!("write at {at}: {e}"));
                }
                at += n as u64;
            }
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            // Hold the socket until the guest has read everything.
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut conn, &mut rest);
            Ok(())
        });
        let mut kills = 0u32;
        let started = Instant::now();
        while !stats_of(&socket, "vnet").connected && started.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(10));
        }
        let mut next_kill = Instant::now() + Duration::from_millis(200);
        while !done.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(300) {
            thread::sleep(Duration::from_millis(5));
            if kills < MIN_KILLS + 5 && Instant::now() >= next_kill {
                if fault_kill(&socket, "vnet") {
                    kills += 1;
                }
                next_kill =
                    Instant::now() + Duration::from_millis(150 + u64::from(kills) * 37 % 90);
            }
        }
        let (report, stats) = guest.join().expect("guest");
        let written = writer.join().expect("writer");
        let tap_frames = tap_stat("tx_packets");
        let tap_bytes = tap_stat("tx_bytes");
        let s = stats_of(&socket, "vnet");
        sup.stop().expect("supervisor stop");
        (report, stats, kills, tap_frames, tap_bytes, s, written)
    })
    .join()
    .expect("the namespace thread panicked");
    let (report, stats, kills, tap_frames, tap_bytes, s, written) = outcome;
    eprintln!("kills={kills} guest={stats:?} tap: {tap_frames} frames {tap_bytes} bytes; {s:?}");
    assert_passed("vhost-user guest", &report, BYTES);
    assert_eq!(written, Ok(()), "the Linux side");
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the stream ended"
    );
    assert!(
        stats.rx_gso > 0 && stats.rx_partial_csum >= stats.rx_gso,
        "no TCP super-frame reached the guest: {stats:?}"
    );
    // The kernel handed the TAP's reader frames beyond the MTU.
    assert!(
        tap_bytes / tap_frames.max(1) > 1514,
        "{tap_bytes} bytes in {tap_frames} frames"
    );
    assert_eq!(stats.bad_used, 0);
    assert_eq!((s.failed_takeovers, s.given_up), (0, false), "{s:?}");
}

/// What [`tx_to_a_tap`] saw.
struct TapTx {
    kills: u32,
    s: shadowback_supervisor::DeviceStats,
}

/// Numbered frames from the native client to vif `vnet` on a TAP, as
/// fast as its transmit buffers come back, while the test kills the data
/// plane `min_kills` times (more until a kill found frames to send again),
/// the first instance running with `first_env`; then until 1000 more
/// frames arrived. A packet socket on the TAP must see every frame, the
/// first time in order (a frame sent again comes after the ones already
/// out), every transmit buffer must be answered exactly once, and the
/// duplicates no more than the supervisor reports possible
/// (`tx-maybe-duplicated`).
fn tx_to_a_tap(tag: &str, min_kills: u32, first_env: &[(&str, &str)]) -> TapTx {
    use shadowback_testsupport::harness::backend_command_with_env;
    use shadowback_testsupport::netns::enter_fresh_netns;
    const TAP: &str = "sbvtxb0";
    const LEN: usize = 600;
    let env: Vec<(String, String)> = first_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let tag = tag.to_string();
    let outcome = thread::spawn(move || {
        enter_fresh_netns();
        let dir = TempDir::new(&tag);
        let socket = dir.join("control.sock");
        let vhost = dir.join("vnet.sock");
        let toml = format!(
            "socket = \"{}\"\n[[nic]]\nname = \"vnet\"\ntap = \"{TAP}\"\nvhost_user = \"{}\"\n",
            socket.display(),
            vhost.display()
        );
        let path = dir.join("shadowback.toml");
        std::fs::write(&path, toml).unwrap();
        let cfg = shadowback_supervisor::Config::from_file(&path).expect("the test's config");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sup = SupervisorThread::start(cfg, backend_command_with_env(&env))
            .expect("start the supervisor");
        let sock = netback_common::packet_socket(TAP);
        // Room for every frame a loaded machine keeps the reader from.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))
            .expect("SO_RCVBUFFORCE");
        let stop = Arc::new(AtomicBool::new(false));
        // Frames the reader has taken from the packet socket: the sender
        // stays at most READ_AHEAD frames ahead of it, so a reader the
        // machine keeps from running cannot make the socket drop frames
        // (≈ 2 KiB each in its buffer: 8 MiB of the 64).
        const READ_AHEAD: usize = 4096;
        let read_so_far = Arc::new(AtomicUsize::new(0));
        let sender = {
            let stop = stop.clone();
            let read_so_far = read_so_far.clone();
            thread::spawn(move || {
                let mut dev = VhostUserNet::connect(&vhost, &VhostUserNetOptions::default())
                    .expect("vhost-user-net connect");
                let mut sent = 0u32;
                let deadline = Instant::now() + Duration::from_secs(240);
                while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                    let ahead = (sent as usize).saturating_sub(read_so_far.load(Ordering::Acquire));
                    if ahead < READ_AHEAD && shadowback_guest::net::FrameDevice::can_send(&mut dev)
                    {
                        let f = netback_common::frame(sent, LEN);
                        shadowback_guest::net::FrameDevice::send(&mut dev, &f).expect("send");
                        sent += 1;
                    } else {
                        thread::sleep(Duration::from_micros(200));
                    }
                }
                let left = dev.settle(Duration::from_secs(20)).expect("settle");
                (sent, left, dev.stats())
            })
        };
        let (mut seen, mut buf) = (Vec::new(), vec![0u8; 4096]);
        let mut read = |seen: &mut Vec<u32>| {
            read_numbered_frames(&sock, &mut buf, LEN, seen);
            read_so_far.store(seen.len(), Ordering::Release);
        };
        let started = Instant::now();
        let mut kills = 0u32;
        // The first kill once frames flow.
        while seen.is_empty() && started.elapsed() < Duration::from_secs(30) {
            read(&mut seen);
            thread::sleep(Duration::from_millis(2));
        }
        let mut next_kill = Instant::now() + Duration::from_millis(50);
        // Until a kill found frames to send again, too.
        let replayed = |socket: &Path| stats_of(socket, "vnet").tx_replayed > 0;
        while (kills < min_kills || (min_kills > 0 && kills < 4 * min_kills && !replayed(&socket)))
            && started.elapsed() < Duration::from_secs(200)
        {
            read(&mut seen);
            thread::sleep(Duration::from_millis(2));
            if Instant::now() >= next_kill {
                if fault_kill(&socket, "vnet") {
                    kills += 1;
                }
                next_kill = Instant::now() + Duration::from_millis(40 + u64::from(kills) * 37 % 70);
            }
        }
        // Frames after the last recovery too.
        let before = seen.len();
        while seen.len() < before + 1000 && started.elapsed() < Duration::from_secs(220) {
            read(&mut seen);
            thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Release);
        let (sent, left, stats) = sender.join().expect("sender");
        let quiet = Instant::now() + Duration::from_millis(500);
        while Instant::now() < quiet {
            read(&mut seen);
            thread::sleep(Duration::from_millis(5));
        }
        let s = stats_of(&socket, "vnet");
        let socket_drops = netback_common::packet_drops(&sock);
        sup.stop().expect("supervisor stop");
        (kills, sent, left, stats, seen, s, socket_drops)
    })
    .join()
    .expect("the namespace thread panicked");
    let (kills, sent, left, stats, seen, s, socket_drops) = outcome;
    // Not the backend's: frames the test's own reader lost.
    assert_eq!(socket_drops, 0, "the test's packet socket dropped frames");
    assert_eq!((s.failed_takeovers, s.given_up), (0, false), "{s:?}");
    assert_eq!(left, 0, "transmit buffers never answered");
    assert_eq!(
        stats.bad_used, 0,
        "a transmit buffer answered twice or never made available"
    );
    assert_eq!(stats.tx_full, 0, "the sender dropped a frame itself");
    // First sightings: every frame, in the order sent.
    let mut first = Vec::with_capacity(seen.len());
    let mut at_least_once = vec![false; sent as usize];
    for &seq in &seen {
        let slot = at_least_once
            .get_mut(seq as usize)
            .unwrap_or_else(|| panic!("frame {seq} was never sent"));
        if !std::mem::replace(slot, true) {
            first.push(seq);
        }
    }
    let dups = (seen.len() - first.len()) as u64;
    eprintln!(
        "kills={kills} sent={sent} seen={} dups={dups} maybe_dup={} replayed={} crashes={} recoveries={}",
        seen.len(),
        s.tx_maybe_duplicated,
        s.tx_replayed,
        s.crashes,
        s.recoveries,
    );
    assert_eq!(
        first,
        (0..sent).collect::<Vec<_>>(),
        "a frame lost or out of order"
    );
    assert!(
        dups <= s.tx_maybe_duplicated,
        "{dups} duplicates, {} reported possible",
        s.tx_maybe_duplicated
    );
    TapTx { kills, s }
}

/// Transmit frames to a TAP leave in batches (docs/ARCHITECTURE.md §8.1):
/// a kill can come after a batch's write and before its answers.
/// [`tx_to_a_tap`] through ≥ 8 `fault kill`s.
#[test]
fn tx_batches_to_a_tap_survive_kills_with_every_duplicate_reported() {
    const MIN_KILLS: u32 = 8;
    let o = tx_to_a_tap("vhost-user-net-txb", MIN_KILLS, &[]);
    assert!(o.kills >= MIN_KILLS, "only {} kills", o.kills);
    assert!(o.s.recoveries >= u64::from(o.kills), "{:?}", o.s);
    assert!(o.s.tx_replayed > 0, "no kill found a frame to send again");
}

/// The first data-plane instance of a vhost-user-net vif on a TAP aborts at
/// each crash point of the shadow log a serving instance reaches (begin,
/// consume, complete, free, the first publication; the others run only in
/// a recovering instance, which the shadow crate's model tests sweep), on
/// an early occurrence — inside the first batch, before the instance ever
/// published, so its successor replays serially (a suspected crash loop,
/// docs/ARCHITECTURE.md §7.5) — and one deep in the stream;
/// [`tx_to_a_tap`]'s checks hold, and the point fired exactly once and was
/// recovered.
#[test]
fn every_crash_point_of_a_vhost_user_net_vif_is_recovered() {
    use shadowback_shadow::{CrashPoint, Transition};
    let served = [
        Transition::Begin,
        Transition::Consume,
        Transition::Complete,
        Transition::Free,
        Transition::Published,
    ];
    let mut fired = 0;
    for point in CrashPoint::all().filter(|p| served.contains(&p.transition)) {
        // Begin and the first publication happen once per instance and log.
        let nths = match point.transition {
            Transition::Begin | Transition::Published => &[1][..],
            _ => &[5, 300][..],
        };
        for nth in nths {
            let spec = format!("{point}@{nth}");
            eprintln!("crash point {spec}");
            let o = tx_to_a_tap("vhost-user-net-crash", 0, &[("SHADOWBACK_CRASH_AT", &spec)]);
            assert_eq!(
                (o.s.crashes, o.s.recoveries),
                (1, 1),
                "{spec}: the point fired once and was recovered: {:?}",
                o.s
            );
            fired += 1;
        }
    }
    assert!(fired >= 20, "only {fired} crash points");
}

/// Waits until process `pid` is stopped (state `T` in `/proc/PID/stat`).
fn wait_stopped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state == Some("T") {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
    panic!("process {pid} never stopped");
}

/// With EVENT_IDX the driver kicks only a data plane that asked for it
/// (docs/ARCHITECTURE.md §8.1): a data plane frozen with SIGSTOP while
/// idle, before it could take a ring full of frames, gets one kick for all
/// of them (the first frame's). Then it is killed (SIGKILL): the next
/// instance sends them all and wakes the driver, which sleeps on the
/// transmit call it asked for with every buffer in flight. Every frame
/// reaches the TAP once, in order. (A kill while the data plane is busy,
/// every kick suppressed and none pending, is what the flooding kill
/// tests below hit: a new instance that waited for a kick would stall
/// them.)
#[test]
fn a_new_data_plane_sends_what_the_driver_did_not_kick_the_frozen_one_for() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use shadowback_guest::net::FrameDevice;
    use shadowback_testsupport::netns::enter_fresh_netns;
    const TAP: &str = "sbveidx0";
    const LEN: usize = 200;
    let (sent, kicks, stats, seen, s) = thread::spawn(move || {
        enter_fresh_netns();
        let dir = TempDir::new("vhost-user-net-eventidx");
        let (sup, socket, vhost) = start_with(&dir, &format!("tap = \"{TAP}\""), "");
        let sock = netback_common::packet_socket(TAP);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
            .expect("SO_RCVBUFFORCE");
        let mut seen: Vec<u32> = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut read = |seen: &mut Vec<u32>| read_numbered_frames(&sock, &mut buf, LEN, seen);
        let mut dev = VhostUserNet::connect(&vhost, &VhostUserNetOptions::default())
            .expect("vhost-user-net connect");
        // Frame 0 goes out and is answered: the data plane is idle again.
        dev.send(&netback_common::frame(0, LEN)).expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.is_empty() && Instant::now() < deadline {
            read(&mut seen);
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(seen, [0], "the first frame");
        assert_eq!(dev.settle(Duration::from_secs(10)).expect("settle"), 0);
        let pid = stats_of(&socket, "vnet").pid.expect("a data plane") as i32;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        wait_stopped(pid);
        let kicks_before = dev.stats().kicks;
        let mut sent = 1u32;
        while dev.can_send() {
            dev.send(&netback_common::frame(sent, LEN)).expect("send");
            sent += 1;
        }
        let kicks = dev.stats().kicks - kicks_before;
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL");
        // The driver sleeps on its transmit call until there is room.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dev.can_send() && Instant::now() < deadline {
            let fd = dev.tx_wait_fd().expect("a transmit call fd");
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            // Drains the calls (and whatever arrived).
            let mut sink = Vec::new();
            while dev.recv(&mut sink).expect("receive") {}
        }
        while seen.len() < sent as usize && Instant::now() < deadline {
            read(&mut seen);
            thread::sleep(Duration::from_millis(2));
        }
        let left = dev.settle(Duration::from_secs(10)).expect("settle");
        assert_eq!(left, 0, "transmit buffers never answered");
        thread::sleep(Duration::from_millis(200));
        read(&mut seen);
        let s = stats_of(&socket, "vnet");
        let stats = dev.stats();
        drop(dev);
        sup.stop().expect("supervisor stop");
        (sent, kicks, stats, seen, s)
    })
    .join()
    .expect("the namespace thread panicked");
    eprintln!(
        "sent={sent} kicks={kicks} seen={} crashes={} recoveries={}",
        seen.len(),
        s.crashes,
        s.recoveries
    );
    assert_eq!(
        sent,
        1 + u32::from(VhostUserNetOptions::default().queue_size),
        "a ring full of frames after the first"
    );
    assert!(
        kicks <= 1,
        "{kicks} kicks for frames the data plane never asked for"
    );
    assert_eq!(stats.bad_used, 0, "{stats:?}");
    assert_eq!(
        (s.crashes, s.recoveries, s.failed_takeovers),
        (1, 1, 0),
        "{s:?}"
    );
    assert_eq!(
        seen,
        (0..sent).collect::<Vec<_>>(),
        "every frame once, in order"
    );
}
