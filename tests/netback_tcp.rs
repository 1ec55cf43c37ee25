//! guest ↔ netback ↔ cable ↔ netback ↔ guest: one TCP connection between
//! two guest processes' network stacks (smoltcp over the test netfront)
//! while the test, acting as the supervisor, SIGKILLs either backend over
//! and over. The connection must never reset, every byte must arrive
//! once and in order (a position-dependent pattern with a CRC on both
//! sides), and every TX request must get exactly one response
//! (docs/ARCHITECTURE.md §11.6).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowback_guest::net::{run_stream, StreamParams, StreamReport, StreamRole};
use shadowback_guest::netfront::{NetFront, NetFrontConfig, NetFrontStats};
use shadowback_netback::wire::{cable_pair, CableConfig};
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::netif::{MacAddr, NetConnectRequest};

mod netback_common;
use netback_common::{attach_message, NetbackProcess};

const MIB: u64 = 1 << 20;
const STREAM_BYTES: u64 = 64 * MIB;
const MIN_KILLS: u32 = 50;

/// What the supervisor holds for one vif: the guest's descriptors, its
/// end of the cable and the two shadow logs.
struct Vif {
    connect: NetConnectRequest,
    guest_fds: Vec<OwnedFd>,
    cable: OwnedFd,
    tx_log: ShadowLog,
    rx_log: ShadowLog,
    backend: NetbackProcess,
}

impl Vif {
    fn new(front: &NetFront, cable: OwnedFd) -> Self {
        let vif = Vif {
            connect: front.connect_request(),
            guest_fds: front.fds().unwrap(),
            cable,
            tx_log: ShadowLog::create(256).unwrap(),
            rx_log: ShadowLog::create(256).unwrap(),
            backend: NetbackProcess::spawn(&[]),
        };
        vif.attach(false);
        vif
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = self.guest_fds.iter().map(|f| f.as_fd()).collect();
        fds.extend([
            self.cable.as_fd(),
            self.tx_log.file().as_fd(),
            self.rx_log.file().as_fd(),
        ]);
        fds
    }

    fn attach(&self, recover: bool) {
        let msg = attach_message(self.connect.clone(), recover, false);
        self.backend.attach(&msg, &self.fds());
    }

    /// SIGKILL the backend and hand the vif to a fresh one.
    fn kill_and_replace(&mut self) {
        self.backend.kill_in_place();
        self.backend = NetbackProcess::spawn(&[]);
        self.attach(true);
    }
}

fn params(address: Ipv4Addr, peer: Ipv4Addr) -> StreamParams {
    StreamParams {
        seed: 4242,
        bytes: STREAM_BYTES,
        stall_timeout: Duration::from_secs(30),
        ..StreamParams::between(address, peer)
    }
}

fn front(mac: u8, split_event_channels: bool) -> NetFront {
    let mut cfg = NetFrontConfig::new("vif0");
    cfg.mac = MacAddr([2, 0, 0, 0, 0, mac]);
    cfg.split_event_channels = split_event_channels;
    NetFront::new(cfg).unwrap()
}

#[test]
fn a_tcp_stream_survives_fifty_backend_kills() {
    let a_addr = Ipv4Addr::new(10, 9, 0, 1);
    let b_addr = Ipv4Addr::new(10, 9, 0, 2);
    let [cable_a, cable_b] = cable_pair(CableConfig::default()).unwrap();
    // One event channel on A; TX and RX channels of their own on B
    // (`split-event-channels`).
    let front_a = front(1, false);
    let front_b = front(2, true);
    let mut vifs = [Vif::new(&front_a, cable_a), Vif::new(&front_b, cable_b)];
    let done = Arc::new(AtomicBool::new(false));
    let side = |mut front: NetFront, role, p: StreamParams, done: Arc<AtomicBool>| {
        std::thread::spawn(move || -> (StreamReport, NetFrontStats) {
            let report = run_stream(&mut front, role, &p);
            done.store(true, Ordering::Release);
            (report, front.stats())
        })
    };
    let receiver = side(
        front_b,
        StreamRole::Receiver,
        params(b_addr, a_addr),
        done.clone(),
    );
    let sender = side(
        front_a,
        StreamRole::Sender,
        params(a_addr, b_addr),
        done.clone(),
    );
    // A kill every 60–160 ms, either side, MIN_KILLS + 10 times (each kill
    // can cost the stream a TCP retransmission timeout: a frame inside the
    // dead process is lost, as on any NIC), then the stream runs out.
    let mut kills = 0u32;
    let started = Instant::now();
    while !done.load(Ordering::Acquire)
        && kills < MIN_KILLS + 10
        && started.elapsed() < Duration::from_secs(300)
    {
        std::thread::sleep(Duration::from_millis(60 + u64::from(kills * 37 % 100)));
        if done.load(Ordering::Acquire) {
            break;
        }
        vifs[(kills % 2) as usize].kill_and_replace();
        kills += 1;
    }
    let (tx, tx_stats) = sender.join().expect("sender");
    let (rx, rx_stats) = receiver.join().expect("receiver");
    eprintln!("sender {}", serde_json::to_string(&tx).unwrap());
    eprintln!("receiver {}", serde_json::to_string(&rx).unwrap());
    eprintln!("kills={kills} sender_front={tx_stats:?} receiver_front={rx_stats:?}");
    assert!(tx.passed(), "{tx:#?}");
    assert!(rx.passed(), "{rx:#?}");
    assert_eq!((tx.bytes, rx.bytes), (STREAM_BYTES, STREAM_BYTES));
    assert_eq!(tx.checksum, rx.checksum);
    assert_eq!(rx.first_mismatch, None);
    assert_eq!((tx.resets, rx.resets), (0, 0), "the connection reset");
    for (who, s) in [("sender", tx_stats), ("receiver", rx_stats)] {
        assert_eq!(
            s.tx_bad_responses, 0,
            "{who}: a TX request answered twice or never sent"
        );
        assert_eq!(
            s.rx_bad_responses, 0,
            "{who}: an RX buffer answered twice or never posted"
        );
        assert_eq!(s.tx_errors, 0, "{who}: TX requests failed");
    }
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills before the stream ended: lower the interval"
    );
    for vif in &mut vifs {
        vif.backend.kill_in_place();
    }
}
