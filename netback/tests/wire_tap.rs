//! The TAP wire (docs/ARCHITECTURE.md §11.4), on real interfaces in a
//! fresh network namespace per test: frames written to the TAP arrive as
//! UDP datagrams and back, offloads reach the device, and the interface
//! keeps its carrier across backend processes killed and restarted while
//! the supervisor holds its fd (and loses it once nobody does).
//!
//! Needs root and /dev/net/tun (CI runs as root); without them the tests
//! fail, saying so, rather than skip.

mod common;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{parse_udp, recv_wait, udp_frame, unique, Backend, ParsedUdp, Udp};
use nix::sched::{setns, CloneFlags};
use shadowback_netback::wire::{
    DropReason, Offloads, SendOutcome, Tap, TapConfig, TapMode, VnetHeader, VnetHeaderLen, Wire,
    WireError,
};

#[test]
fn backend_child_entry() {
    common::run_child_if_asked();
}

const HOST_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_PORT: u16 = 7777;
const GUEST_PORT: u16 = 4000;

fn require_root_and_tun() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the TAP tests need root (CAP_NET_ADMIN, network namespaces); run them as root"
    );
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "the TAP tests need /dev/net/tun (modprobe tun)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Self {
        require_root_and_tun();
        let name = unique("sbwns");
        run(Command::new("ip").args(["netns", "add", &name]));
        NetNs { name }
    }

    /// `ip -n NS ARGS…`
    fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `/sys/class/net/DEV/carrier` as the namespace sees it; `None` when
    /// it cannot be read (the interface is down or gone).
    fn carrier(&self, dev: &str) -> Option<u8> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{dev}/carrier"))
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Runs `f` on a thread that has entered the namespace: interfaces
    /// it opens and sockets it makes live there.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Addresses the host side of the TAP and fixes the guest's neighbour
/// entry (so no ARP is needed to reach it).
fn address(ns: &NetNs, dev: &str) {
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", dev]);
    ns.ip(&[
        "neigh",
        "replace",
        "10.77.0.2",
        "lladdr",
        "02:5b:00:00:00:02",
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
}

fn guest_to_host() -> Udp {
    Udp {
        src_mac: GUEST_MAC,
        dst_mac: HOST_MAC,
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
    }
}

fn with_header(hdr: VnetHeaderLen, h: VnetHeader, frame: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; hdr.bytes()];
    h.encode(&mut f, hdr).unwrap();
    f.extend_from_slice(frame);
    f
}

fn udp_socket() -> UdpSocket {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(HOST_IP), HOST_PORT)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

fn expect_datagram(sock: &UdpSocket, payload: &[u8]) {
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).expect("datagram from the guest");
    assert_eq!(&buf[..n], payload);
    assert_eq!(
        from,
        std::net::SocketAddr::from(SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), GUEST_PORT))
    );
}

/// Reads frames until a UDP datagram for the guest's port turns up
/// (IPv6 neighbour discovery and the like pass first); its header too.
fn recv_guest_udp(wire: &mut Wire) -> (VnetHeader, ParsedUdp) {
    let hdr = wire.header_len();
    let mut buf = vec![0u8; wire.recv_buf_len()];
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Some(n) = recv_wait(
        wire,
        &mut buf,
        deadline.saturating_duration_since(Instant::now()),
    ) {
        let h = VnetHeader::decode(&buf, hdr).unwrap();
        if let Some(udp) = parse_udp(&buf[hdr.bytes()..n]) {
            if udp.dst_port == GUEST_PORT {
                return (h, udp);
            }
        }
    }
    panic!("no UDP frame for the guest came out of the TAP");
}

/// Like [`recv_guest_udp`], through a backend process.
fn backend_recv_guest_udp(backend: &mut Backend, hdr: VnetHeaderLen) -> ParsedUdp {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let Some(frame) = backend.recv(500) else {
            continue;
        };
        if let Some(udp) = parse_udp(&frame[hdr.bytes()..]) {
            if udp.dst_port == GUEST_PORT {
                return udp;
            }
        }
    }
    panic!("the backend read no UDP frame for the guest");
}

#[test]
fn frames_cross_the_tap_as_udp_datagrams_both_ways() {
    let ns = NetNs::new();
    ns.enter(|| {
        let mut cfg = TapConfig::new("sbtap%d", TapMode::Create);
        cfg.vnet_hdr = VnetHeaderLen::MergeableRx;
        cfg.mtu = Some(1400);
        cfg.mac = Some(HOST_MAC);
        let tap = Tap::open(&cfg).unwrap();
        assert!(tap.name().starts_with("sbtap"), "{}", tap.name());
        let link = ns.ip(&["-o", "link", "show", "dev", tap.name()]);
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains("02:5b:00:00:00:01"), "{link}");
        assert!(link.contains("UP"), "{link}");
        address(&ns, tap.name());
        let sock = udp_socket();
        let mut wire = tap.wire(0).unwrap();

        // Guest → host.
        let frame = udp_frame(&guest_to_host(), b"hello from the guest");
        let sent = with_header(VnetHeaderLen::MergeableRx, VnetHeader::plain(), &frame);
        assert_eq!(wire.send(&sent).unwrap(), SendOutcome::Sent);
        expect_datagram(&sock, b"hello from the guest");

        // Host → guest: without offloads the kernel completes checksums.
        sock.send_to(
            b"hello guest",
            SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), GUEST_PORT),
        )
        .unwrap();
        let (h, udp) = recv_guest_udp(&mut wire);
        assert_eq!(h.flags & 1, 0, "NEEDS_CSUM without csum offload: {h:?}");
        assert_eq!(udp.payload, b"hello guest");
        assert_eq!(udp.dst_mac, GUEST_MAC);
        assert_eq!((udp.src_ip, udp.dst_ip), (HOST_IP, GUEST_IP));
        assert!(udp.ip_checksum_ok && udp.udp_checksum_ok, "{udp:?}");
        assert_eq!(wire.stats().tx_frames, 1);
        assert!(wire.stats().rx_frames >= 1);

        // A TAP that is down takes no frames: dropped and counted.
        ns.ip(&["link", "set", "dev", tap.name(), "down"]);
        assert_eq!(
            wire.send(&sent).unwrap(),
            SendOutcome::Dropped(DropReason::LinkDown)
        );
        assert_eq!(wire.stats().tx_dropped_down, 1);
        tap.set_up().unwrap();
        assert_eq!(wire.send(&sent).unwrap(), SendOutcome::Sent);
        expect_datagram(&sock, b"hello from the guest");
    });
}

#[test]
fn offloads_are_accepted_and_reach_the_device() {
    let ns = NetNs::new();
    ns.enter(|| {
        let name = unique("sbo");
        let mut cfg = TapConfig::new(name.as_str(), TapMode::Create);
        cfg.mac = Some(HOST_MAC);
        cfg.offloads = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: false,
        };
        let tap = Tap::open(&cfg).expect("TUNSETOFFLOAD with csum, tso4, tso6, ecn");
        address(&ns, &name);
        let sock = udp_socket();
        let mut wire = tap.wire(0).unwrap();
        let to_guest = SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), GUEST_PORT);

        // With checksum offload the kernel leaves the UDP checksum to
        // the guest and says where it goes.
        sock.send_to(b"partial", to_guest).unwrap();
        let (h, udp) = recv_guest_udp(&mut wire);
        assert_eq!(h.flags & 1, 1, "no NEEDS_CSUM with csum offload: {h:?}");
        assert_eq!((h.csum_start, h.csum_offset), (34, 6));
        assert!(!udp.udp_checksum_ok, "checksum already complete: {udp:?}");
        assert_eq!(
            udp.udp_checksum,
            common::udp_partial_checksum(HOST_IP, GUEST_IP, 8 + 7)
        );

        // Turned off again, it completes the checksum itself.
        tap.set_offloads(Offloads::default()).unwrap();
        sock.send_to(b"complete", to_guest).unwrap();
        let (h, udp) = recv_guest_udp(&mut wire);
        assert_eq!(h.flags & 1, 0, "{h:?}");
        assert!(udp.udp_checksum_ok, "{udp:?}");

        // A guest's partial checksum is completed (or trusted) by the
        // kernel: the datagram arrives.
        let mut frame = udp_frame(&guest_to_host(), b"guest partial");
        let partial = common::udp_partial_checksum(GUEST_IP, HOST_IP, 8 + 13);
        frame[common::UDP_AT + 6..common::UDP_AT + 8].copy_from_slice(&partial.to_be_bytes());
        let h = VnetHeader {
            flags: 1,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHeader::plain()
        };
        let sent = with_header(VnetHeaderLen::Basic, h, &frame);
        assert_eq!(wire.send(&sent).unwrap(), SendOutcome::Sent);
        expect_datagram(&sock, b"guest partial");

        // Refused combinations never reach the kernel.
        let bad = Offloads {
            tso4: true,
            ..Offloads::default()
        };
        assert!(matches!(tap.set_offloads(bad), Err(WireError::Config(_))));
    });
}

#[test]
fn carrier_and_queued_frames_survive_backend_restarts() {
    let ns = NetNs::new();
    let name = unique("sbc");
    // An administrator's persistent TAP, adopted by the supervisor.
    ns.ip(&["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]);
    let hdr = VnetHeaderLen::Basic;
    let (tap, sock) = ns.enter(|| {
        let mut cfg = TapConfig::new(name.as_str(), TapMode::Adopt);
        cfg.mac = Some(HOST_MAC);
        let tap = Tap::open(&cfg).unwrap();
        address(&ns, &name);
        (tap, udp_socket())
    });
    assert_eq!(
        ns.carrier(&name),
        Some(1),
        "the supervisor's fd gives carrier"
    );

    // Backend 1 sends a frame, then is killed.
    let mut first = Backend::start(
        "backend_child_entry",
        "tap",
        hdr,
        tap.queue_fds()[0].as_fd(),
    );
    let frame = udp_frame(&guest_to_host(), b"from backend 1");
    assert_eq!(
        first.send(&with_header(hdr, VnetHeader::plain(), &frame)),
        "sent"
    );
    expect_datagram(&sock, b"from backend 1");
    first.kill();
    assert_eq!(ns.carrier(&name), Some(1), "carrier lost with the backend");

    // While no backend runs, a datagram for the guest waits in the TAP.
    sock.send_to(
        b"sent while no backend ran",
        SocketAddrV4::new(Ipv4Addr::from(GUEST_IP), GUEST_PORT),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));

    // Backend 2, given the same fd, reads it, sends, and exits.
    let mut second = Backend::start(
        "backend_child_entry",
        "tap",
        hdr,
        tap.queue_fds()[0].as_fd(),
    );
    let udp = backend_recv_guest_udp(&mut second, hdr);
    assert_eq!(udp.payload, b"sent while no backend ran");
    let frame = udp_frame(&guest_to_host(), b"from backend 2");
    assert_eq!(
        second.send(&with_header(hdr, VnetHeader::plain(), &frame)),
        "sent"
    );
    expect_datagram(&sock, b"from backend 2");
    assert!(second.exit().success());
    assert_eq!(ns.carrier(&name), Some(1), "carrier lost with the backend");
    let addr = ns.ip(&["-o", "addr", "show", "dev", &name]);
    assert!(addr.contains("10.77.0.1/24"), "address lost: {addr}");

    // Once the last fd closes, tun drops carrier: the check above can fail.
    drop(tap);
    assert_eq!(ns.carrier(&name), Some(0), "carrier without any fd");
}

#[test]
fn create_refuses_an_existing_name_and_adopt_a_missing_one() {
    let ns = NetNs::new();
    let name = unique("sbe");
    ns.ip(&["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]);
    ns.enter(|| {
        let err = Tap::open(&TapConfig::new(name.as_str(), TapMode::Create)).unwrap_err();
        assert!(
            matches!(err, WireError::AlreadyExists(ref n) if *n == name),
            "{err}"
        );
        let missing = unique("sbm");
        let err = Tap::open(&TapConfig::new(missing.as_str(), TapMode::Adopt)).unwrap_err();
        assert!(matches!(err, WireError::NotFound(_)), "{err}");
        // A single-queue interface cannot be adopted as multi-queue.
        let mut mq = TapConfig::new(name.as_str(), TapMode::Adopt);
        mq.queues = 2;
        assert!(matches!(
            Tap::open(&mq),
            Err(WireError::Ioctl {
                op: "TUNSETIFF",
                ..
            })
        ));
    });
}

#[test]
fn a_multi_queue_tap_has_one_fd_per_queue() {
    let ns = NetNs::new();
    ns.enter(|| {
        let name = unique("sbq");
        let mut cfg = TapConfig::new(name.as_str(), TapMode::Create);
        cfg.queues = 4;
        cfg.vnet_hdr = VnetHeaderLen::MergeableRx;
        cfg.mac = Some(HOST_MAC);
        let tap = Tap::open(&cfg).unwrap();
        assert_eq!(tap.queue_fds().len(), 4);
        address(&ns, &name);
        let sock = udp_socket();
        for q in 0..4 {
            let mut wire = tap.wire(q).unwrap();
            let payload = format!("queue {q}");
            let frame = udp_frame(&guest_to_host(), payload.as_bytes());
            let sent = with_header(VnetHeaderLen::MergeableRx, VnetHeader::plain(), &frame);
            assert_eq!(wire.send(&sent).unwrap(), SendOutcome::Sent);
            expect_datagram(&sock, payload.as_bytes());
        }
        // A backend framing with the wrong header length is refused.
        let dup = tap.queue_fds()[0].try_clone().unwrap();
        assert!(matches!(
            Wire::from_fd(
                shadowback_netback::wire::WireKind::Tap,
                dup,
                VnetHeaderLen::Basic
            ),
            Err(WireError::WrongFd { .. })
        ));
    });
}
