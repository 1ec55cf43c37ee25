//! The network backend against a raw netif frontend, with the test acting
//! as the supervisor: it holds the guest region, the eventfds, the cable
//! and the two shadow logs, starts `shadowback netback` processes, hands
//! them the vif with `attach-net` (docs/PROTOCOL.md §6c) and SIGKILLs them
//! while frames move both ways. What must hold across every kill
//! (docs/ARCHITECTURE.md §11.6): every TX request is answered exactly once;
//! TX frames reach the wire in order, none lost, a duplicate only where the
//! backend reported one possible; every posted RX buffer is answered at most
//! once and RX frames arrive in order, uncorrupted, never twice.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use nix::sys::socket::MsgFlags;
use shadowback_netback::tapbatch::TX_BATCH;
use shadowback_netback::wire::{
    cable_pair, CableConfig, SendOutcome, Tap, TapConfig, TapMode, VnetHeader, VnetHeaderLen, Wire,
    WireError, WireKind,
};
use shadowback_ring::grant::GrantTable;
use shadowback_ring::netif::{
    NetifRx, NetifRxRequest, NetifTx, NetifTxRequest, NETIF_RSP_OKAY, NETTXF_MORE_DATA,
};
use shadowback_ring::sring::{FrontRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion};
use shadowback_shadow::ShadowLog;
use shadowback_testsupport::netns::enter_fresh_netns;
use shadowback_xenbus::netif::NetFeatures;
use shadowback_xenbus::Message;

mod netback_common;
use netback_common::{check_frame, frame, packet_socket, NetbackProcess, REPLY_TIMEOUT};

const RING: u32 = 256;
const GRANT_FRAMES: u32 = 2;
const TX_RING_FRAME: u32 = 2;
const RX_RING_FRAME: u32 = 3;
const TX_BUF_FRAME: u32 = 4;
const RX_BUF_FRAME: u32 = TX_BUF_FRAME + RING;
const PAGES: u32 = RX_BUF_FRAME + RING;
const TX_RING_GREF: u32 = 8;
const RX_RING_GREF: u32 = 9;
const TX_BUF_GREF: u32 = 10;
const RX_BUF_GREF: u32 = TX_BUF_GREF + RING;
const PAGE: u64 = 4096;

/// What outlives backend instances: the guest's side of the vif and what
/// the supervisor holds for it.
struct Vif {
    region: Arc<SharedRegion>,
    tx: FrontRing<NetifTx>,
    rx: FrontRing<NetifRx>,
    kick: EventChannel,
    notify: EventChannel,
    /// The backend's wire, lent to each instance: an end of a cable, or
    /// a TAP queue.
    wire: OwnedFd,
    wire_kind: &'static str,
    /// The far end: another vif's wire, played by the test, or what the
    /// TAP's interface receives.
    peer: Peer,
    tx_log: ShadowLog,
    rx_log: ShadowLog,
}

/// The far end of a vif's wire, as the test sees it: each frame is the
/// 10-byte virtio-net header and the Ethernet frame.
enum Peer {
    Cable(Wire),
    /// An `AF_PACKET` socket with `PACKET_VNET_HDR` on the TAP's
    /// interface, seeing the test's frames the backend writes to the TAP
    /// (the kernel's own frames, of other EtherTypes, are skipped).
    Tap {
        socket: OwnedFd,
        _tap: Tap,
    },
}

impl Peer {
    fn recv_buf_len(&self) -> usize {
        VnetHeaderLen::Basic.bytes() + 65535
    }

    fn send(&mut self, frame: &[u8]) -> Result<SendOutcome, WireError> {
        match self {
            Peer::Cable(w) => w.send(frame),
            Peer::Tap { .. } => panic!("the TAP runs carry TX frames only"),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        let socket = match self {
            Peer::Cable(w) => return w.recv(buf),
            Peer::Tap { socket, .. } => socket,
        };
        let hdr = VnetHeaderLen::Basic.bytes();
        loop {
            match nix::sys::socket::recv(socket.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) if n >= hdr + 14 && buf[hdr + 12..hdr + 14] == [0x88, 0xb5] => {
                    return Ok(Some(n))
                }
                Ok(_) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(e) => panic!("recv on the TAP's packet socket: {e}"),
            }
        }
    }
}

/// The wire of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WireType {
    Cable,
    /// A TAP in a fresh network namespace: the calling thread must be in
    /// one (root only).
    Tap,
}

/// A TAP with IPv6 off (no router solicitations of the kernel's own on
/// it) and a packet socket seeing what arrives on it, in the calling
/// thread's network namespace.
#[allow(
    unsafe_code,
    reason = "packet sockets; no wrapper in the test's dependencies"
)]
fn tap_peer() -> (OwnedFd, Peer) {
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    let tap = Tap::open(&TapConfig::new("sbrec%d", TapMode::Create)).unwrap();
    let wire = tap.queue_fds()[0].try_clone().unwrap();
    let socket = packet_socket(tap.name());
    // A whole TX ring of frames while the test is busy elsewhere.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
        .unwrap();
    (wire, Peer::Tap { socket, _tap: tap })
}

impl Vif {
    fn new() -> Self {
        Self::on(WireType::Cable)
    }

    fn on(wire_type: WireType) -> Self {
        let region = Arc::new(SharedRegion::create("nb-test", PAGES).unwrap());
        let gt = GrantTable::new(region.clone(), GRANT_FRAMES).unwrap();
        gt.grant(TX_RING_GREF, 0, TX_RING_FRAME, false).unwrap();
        gt.grant(RX_RING_GREF, 0, RX_RING_FRAME, false).unwrap();
        for i in 0..RING {
            gt.grant(TX_BUF_GREF + i, 0, TX_BUF_FRAME + i, true)
                .unwrap();
            gt.grant(RX_BUF_GREF + i, 0, RX_BUF_FRAME + i, false)
                .unwrap();
        }
        let pages =
            |frame: u32| RingPages::new(region.clone(), vec![u64::from(frame) * PAGE]).unwrap();
        let tx = FrontRing::<NetifTx>::init(pages(TX_RING_FRAME)).unwrap();
        let rx = FrontRing::<NetifRx>::init(pages(RX_RING_FRAME)).unwrap();
        let (wire, wire_kind, peer) = match wire_type {
            WireType::Cable => {
                let [wire, peer] = cable_pair(CableConfig::default()).unwrap();
                let peer = Wire::from_fd(WireKind::Cable, peer, VnetHeaderLen::Basic).unwrap();
                (wire, "cable", Peer::Cable(peer))
            }
            WireType::Tap => {
                let (wire, peer) = tap_peer();
                (wire, "tap", peer)
            }
        };
        Vif {
            region,
            tx,
            rx,
            kick: EventChannel::new().unwrap(),
            notify: EventChannel::new().unwrap(),
            wire,
            wire_kind,
            peer,
            tx_log: ShadowLog::create(RING).unwrap(),
            rx_log: ShadowLog::create(RING).unwrap(),
        }
    }

    fn attach_message(&self, recover: bool, blame: bool) -> Message {
        let features = NetFeatures {
            sg: true,
            ..NetFeatures::default()
        };
        let connect =
            netback_common::test_connect(GRANT_FRAMES, TX_RING_GREF, RX_RING_GREF, features);
        netback_common::attach_message_on(connect, self.wire_kind, true, recover, blame)
    }

    fn attach_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![
            self.region.file().as_fd(),
            self.kick_fd(),
            self.notify_fd(),
            self.wire.as_fd(),
            self.tx_log.file().as_fd(),
            self.rx_log.file().as_fd(),
        ]
    }

    fn kick_fd(&self) -> BorrowedFd<'_> {
        // SAFETY-free: EventChannel exposes its fd through AsFd.
        self.kick.as_fd()
    }

    fn notify_fd(&self) -> BorrowedFd<'_> {
        self.notify.as_fd()
    }
}

/// A netback process and what this test sends it.
struct Backend(NetbackProcess);

impl Backend {
    fn spawn(env: &[(&str, String)]) -> Self {
        Backend(NetbackProcess::spawn(env))
    }

    fn attach(&self, vif: &Vif, recover: bool, blame: bool) -> Message {
        self.0
            .attach(&vif.attach_message(recover, blame), &vif.attach_fds())
    }

    fn kill_in_place(&mut self) {
        self.0.kill_in_place();
    }
}

/// [`check_frame`] of a frame this test made: never under 60 bytes.
fn check_long_frame(f: &[u8]) -> u32 {
    assert!(f.len() >= 60, "short frame {}", f.len());
    check_frame(f)
}

fn frame_len(seq: u32) -> usize {
    60 + (seq as usize * 37) % 700
}

/// Drives the raw frontend and the peer; counts what the checks need.
#[derive(Default)]
struct Traffic {
    /// TX: next sequence number to post; id (slot) → seq in flight.
    tx_next: u32,
    tx_next_id: u16,
    /// Slots posted, and slots answered.
    tx_slots: u32,
    tx_out: HashMap<u16, u32>,
    tx_answered: u32,
    tx_bad: u32,
    /// Peer: next TX seq expected on the wire; duplicates seen.
    wire_next: u32,
    wire_dups: u32,
    /// How far back a duplicate can be: frames written and not answered
    /// when a backend died (1 on a cable, a batch on a TAP).
    dup_window: u32,
    /// RX: next seq the peer writes; next seq the guest expects.
    rx_sent: u32,
    rx_peer_drops: u32,
    rx_next: u32,
    rx_lost: u32,
    rx_received: u32,
    /// RX buffer ids posted and not yet answered.
    rx_posted: Vec<bool>,
    rx_bad: u32,
    /// The peer does not read the wire (a far end descheduled or stopped).
    peer_paused: bool,
}

impl Traffic {
    fn new(vif: &mut Vif) -> Self {
        let mut t = Traffic {
            rx_posted: vec![false; RING as usize],
            dup_window: match vif.wire_kind {
                "tap" => TX_BATCH as u32,
                _ => 1,
            },
            ..Traffic::default()
        };
        for id in 0..RING as u16 {
            t.post_rx(vif, id);
        }
        vif.rx.push_requests().unwrap();
        t
    }

    fn post_rx(&mut self, vif: &mut Vif, id: u16) {
        let req = NetifRxRequest {
            id,
            pad: 0,
            gref: RX_BUF_GREF + u32::from(id),
        };
        vif.rx.put_request(&req).unwrap();
        self.rx_posted[usize::from(id)] = true;
    }

    /// One round: post TX frames while slots are free (up to `tx_total`),
    /// feed RX frames into the peer (up to `rx_total`), reap both rings and
    /// the wire.
    fn step(&mut self, vif: &mut Vif, tx_total: u32, rx_total: u32) {
        let mut posted = false;
        loop {
            let seq = self.tx_next;
            // 1 to 3 slots per packet (NETTXF_more_data), so a crash can
            // land between the slots of one packet.
            let k = 1 + (seq % 3) as usize;
            if seq >= tx_total || self.tx_out.len() + k > RING as usize {
                break;
            }
            let f = frame(seq, frame_len(seq));
            let chunk = f.len() / (k + 1);
            let first = f.len() - chunk * (k - 1);
            let mut at = 0;
            for i in 0..k {
                let id = (0..RING as u16)
                    .map(|j| (self.tx_next_id.wrapping_add(j)) % RING as u16)
                    .find(|id| !self.tx_out.contains_key(id))
                    .unwrap();
                self.tx_next_id = id.wrapping_add(1);
                let len = if i == 0 { first } else { chunk };
                let page = u64::from(TX_BUF_FRAME + u32::from(id)) * PAGE;
                vif.region.write(page, &f[at..at + len]).unwrap();
                at += len;
                let req = NetifTxRequest {
                    gref: TX_BUF_GREF + u32::from(id),
                    offset: 0,
                    flags: if i + 1 < k { NETTXF_MORE_DATA } else { 0 },
                    id,
                    // The first slot's size is the whole packet's.
                    size: if i == 0 { f.len() as u16 } else { len as u16 },
                };
                vif.tx.put_request(&req).unwrap();
                self.tx_out.insert(id, seq);
                self.tx_slots += 1;
            }
            self.tx_next += 1;
            posted = true;
        }
        if posted && vif.tx.push_requests().unwrap() {
            vif.kick.notify().unwrap();
        }
        // RX: the peer sends a few frames per round.
        for _ in 0..8 {
            if self.rx_sent >= rx_total {
                break;
            }
            let f = frame(self.rx_sent, frame_len(self.rx_sent));
            let mut out = vec![0u8; VnetHeaderLen::Basic.bytes()];
            VnetHeader::plain()
                .encode(&mut out, VnetHeaderLen::Basic)
                .unwrap();
            out.extend(&f);
            match vif.peer.send(&out).unwrap() {
                SendOutcome::Sent => self.rx_sent += 1,
                SendOutcome::Dropped(_) => {
                    // The backend is down long enough for the cable to
                    // fill: the peer's loss, not the backend's. Retry.
                    self.rx_peer_drops += 1;
                    break;
                }
            }
        }
        self.reap(vif);
    }

    fn reap(&mut self, vif: &mut Vif) {
        let _ = vif.notify.drain();
        while let Some(rsp) = vif.tx.take_response().unwrap() {
            match self.tx_out.remove(&rsp.id) {
                Some(_) if rsp.status == NETIF_RSP_OKAY => self.tx_answered += 1,
                _ => self.tx_bad += 1,
            }
        }
        let mut buf = vec![0u8; vif.peer.recv_buf_len()];
        while !self.peer_paused {
            let Some(n) = vif.peer.recv(&mut buf).unwrap() else {
                break;
            };
            let seq = check_long_frame(&buf[VnetHeaderLen::Basic.bytes()..n]);
            if seq == self.wire_next {
                self.wire_next += 1;
            } else if seq < self.wire_next && self.wire_next - seq <= self.dup_window {
                // Sent again after a kill: a frame the dead instance wrote
                // and never answered — the last one on a cable, one of the
                // last batch on a TAP.
                self.wire_dups += 1;
            } else {
                panic!("TX frame {seq} on the wire, expected {}", self.wire_next);
            }
        }
        let mut repost = Vec::new();
        while let Some(rsp) = vif.rx.take_response().unwrap() {
            let Some(slot) = self.rx_posted.get_mut(usize::from(rsp.id)) else {
                self.rx_bad += 1;
                continue;
            };
            if !std::mem::replace(slot, false) {
                self.rx_bad += 1;
                continue;
            }
            repost.push(rsp.id);
            assert!(rsp.status > 0, "RX status {}", rsp.status);
            let mut data = vec![0u8; rsp.status as usize];
            let page = u64::from(RX_BUF_FRAME + u32::from(rsp.id)) * PAGE;
            vif.region
                .read(page + u64::from(rsp.offset), &mut data)
                .unwrap();
            let seq = check_long_frame(&data);
            assert!(seq >= self.rx_next, "RX frame {seq} again or out of order");
            self.rx_lost += seq - self.rx_next;
            self.rx_next = seq + 1;
            self.rx_received += 1;
        }
        for id in repost.iter().copied() {
            self.post_rx(vif, id);
        }
        if !repost.is_empty() && vif.rx.push_requests().unwrap() {
            vif.kick.notify().unwrap();
        }
    }
}

#[test]
fn frames_cross_both_ways_and_every_request_is_answered_once() {
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[]);
    backend.attach(&vif, false, true);
    let mut t = Traffic::new(&mut vif);
    vif.kick.notify().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (t.wire_next < 2000 || t.rx_received < 1000 || !t.tx_out.is_empty())
        && Instant::now() < deadline
    {
        t.step(&mut vif, 2000, 1000);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(t.tx_answered, t.tx_slots, "TX slots answered");
    assert!(t.tx_out.is_empty());
    assert_eq!(t.wire_next, 2000, "TX frames on the wire");
    assert_eq!((t.tx_bad, t.wire_dups, t.rx_bad), (0, 0, 0));
    assert_eq!(t.rx_received, 1000);
    assert_eq!(t.rx_lost, 0);
    backend.kill_in_place();
}

/// What a run saw.
#[derive(Default)]
struct Outcome {
    kills: u32,
    /// Of `kills`, those of an instance stopped at a crash point
    /// (`stop:` in `first_env`).
    stopped_kills: u32,
    crashes: u32,
    maybe_dup: u64,
    tx_replayed: u64,
    rx_recovered: u64,
    rx_dropped_in_crash: u64,
}

/// How a run treats its backends.
struct Run {
    wire: WireType,
    tx_total: u32,
    rx_total: u32,
    /// SIGKILL the serving backend this many times, spread over the
    /// traffic's progress (TX packets posted plus RX frames sent), not
    /// over time: the kills land inside the traffic whatever the speed of
    /// the build and the machine.
    kills: u32,
    /// Environment of the first instance (`SHADOWBACK_CRASH_AT`). An
    /// instance that stops itself at a crash point (`stop:…`) is killed
    /// there, as one of `kills`: a kill at a known instant.
    first_env: Vec<(&'static str, String)>,
}

impl Run {
    /// Moves the traffic to the end through kills and crashes, replacing
    /// each dead backend with a recovering one, then checks every
    /// invariant of the module documentation.
    fn run(&self) -> Outcome {
        let mut vif = Vif::on(self.wire);
        let mut backend = Backend::spawn(&self.first_env);
        backend.attach(&vif, false, true);
        let mut t = Traffic::new(&mut vif);
        vif.kick.notify().unwrap();
        let mut o = Outcome::default();
        let stops = self
            .first_env
            .iter()
            .any(|(k, v)| *k == "SHADOWBACK_CRASH_AT" && v.starts_with("stop:"));
        let total = self.tx_total + self.rx_total;
        // Evenly spaced, each shifted by up to a third of a space so the
        // kills do not fall on the same ring positions every time.
        let kill_at = |k: u32| {
            let space = total / (self.kills + 1);
            space * (k + 1) + (k * 7919) % (space / 3).max(1)
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let replace = |backend: &mut Backend, vif: &Vif, o: &mut Outcome, blame: bool| {
            *backend = Backend::spawn(&[]);
            let attached = backend.attach(vif, true, blame);
            let get = |k| attached.get_u64(k).unwrap().unwrap_or(0);
            o.maybe_dup += get("tx-maybe-duplicated");
            o.tx_replayed += get("tx-replayed");
            o.rx_recovered += get("rx-buffers-recovered");
            o.rx_dropped_in_crash += get("rx-dropped-in-crash");
        };
        // A backend that crashed (an injected crash point) is replaced as
        // the supervisor would, also while the last RX frames drain: the
        // peer may have written them all before the backend reached the
        // point, on an RX frame.
        let reap_crash = |backend: &mut Backend, vif: &Vif, o: &mut Outcome| {
            if let Some(status) = backend.0.child.try_wait().unwrap() {
                assert!(!status.success(), "the backend exited on its own: {status}");
                o.crashes += 1;
                replace(backend, vif, o, true);
            }
        };
        while (t.tx_next < self.tx_total || t.rx_sent < self.rx_total || !t.tx_out.is_empty())
            && Instant::now() < deadline
        {
            t.step(&mut vif, self.tx_total, self.rx_total);
            reap_crash(&mut backend, &vif, &mut o);
            if stops && o.stopped_kills == 0 && stopped(backend.0.child.id()) {
                backend.kill_in_place();
                o.kills += 1;
                o.stopped_kills += 1;
                replace(&mut backend, &vif, &mut o, false);
            }
            if o.kills < self.kills && t.tx_next + t.rx_sent >= kill_at(o.kills) {
                backend.kill_in_place();
                o.kills += 1;
                replace(&mut backend, &vif, &mut o, false);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let drain = Instant::now() + Duration::from_secs(10);
        while t.rx_next < t.rx_sent && Instant::now() < drain {
            t.reap(&mut vif);
            reap_crash(&mut backend, &vif, &mut o);
            std::thread::sleep(Duration::from_millis(1));
        }
        eprintln!(
            "kills={} crashes={} tx_slots={} wire_dups={} maybe_dup={} tx_replayed={} \
             rx_received={} rx_lost={} rx_dropped_in_crash={} rx_recovered={} rx_peer_drops={}",
            o.kills,
            o.crashes,
            t.tx_slots,
            t.wire_dups,
            o.maybe_dup,
            o.tx_replayed,
            t.rx_received,
            t.rx_lost,
            o.rx_dropped_in_crash,
            o.rx_recovered,
            t.rx_peer_drops
        );
        assert_eq!(t.tx_bad, 0, "TX responses for no request, or failed");
        assert_eq!(t.tx_next, self.tx_total, "the run did not finish");
        assert!(t.tx_out.is_empty(), "TX requests never answered");
        assert_eq!(t.tx_answered, t.tx_slots, "every TX slot answered once");
        assert_eq!(t.wire_next, self.tx_total, "no TX frame lost on the wire");
        assert!(
            u64::from(t.wire_dups) <= o.maybe_dup,
            "{} duplicates, {} reported possible",
            t.wire_dups,
            o.maybe_dup
        );
        assert_eq!(t.rx_bad, 0, "RX responses for buffers not posted");
        // A frame inside a dying instance is lost, as on any NIC, and
        // counted by the next instance — except one read from the wire and
        // not yet bound to a buffer when the instance died (at most one
        // per death). A counted frame is always lost.
        let deaths = o.kills + o.crashes;
        assert!(
            o.rx_dropped_in_crash <= u64::from(t.rx_lost)
                && u64::from(t.rx_lost) <= o.rx_dropped_in_crash + u64::from(deaths),
            "{} RX frames lost in {deaths} deaths, {} counted",
            t.rx_lost,
            o.rx_dropped_in_crash
        );
        // A death loses at most the frame it was copying into buffers
        // (answered, its answers not yet logged: counted) and one it had
        // read and not yet bound to a buffer (not counted).
        assert!(
            t.rx_lost <= 2 * deaths,
            "{} RX frames lost in {deaths} deaths",
            t.rx_lost
        );
        assert_eq!(
            t.rx_received + t.rx_lost,
            t.rx_sent,
            "RX frames unaccounted for"
        );
        backend.kill_in_place();
        o
    }
}

#[test]
fn tx_and_rx_survive_sigkills_of_the_backend() {
    let o = Run {
        wire: WireType::Cable,
        tx_total: 20_000,
        rx_total: 10_000,
        kills: 40,
        first_env: Vec::new(),
    }
    .run();
    assert_eq!(o.kills, 40, "kills while the traffic ran");
}

/// The same on a TAP, TX only: frames leave in batches of
/// `tapbatch::TX_BATCH` writes, so a kill can come after a batch's write
/// and before its answers; the answers must still be exactly one per slot
/// and the duplicates on the wire no more than reported possible. Where
/// the other kills land depends on how the machine schedules the test and
/// the backend (under load, all 40 can find it idle); the first instance
/// is killed where a TX slot is certainly logged and not yet sent: stopped
/// right after logging its 300th (the RX log takes 256, one per buffer
/// posted), so the run certainly sends something again.
#[test]
fn tx_batches_to_a_tap_survive_sigkills_of_the_backend() {
    let o = std::thread::spawn(|| {
        enter_fresh_netns();
        Run {
            wire: WireType::Tap,
            tx_total: 20_000,
            rx_total: 0,
            kills: 40,
            first_env: vec![("SHADOWBACK_CRASH_AT", "stop:consume.8@300".into())],
        }
        .run()
    })
    .join()
    .expect("the run's thread");
    assert_eq!(o.kills, 40, "kills while the traffic ran");
    assert_eq!(o.stopped_kills, 1, "the first instance never stopped");
    assert!(o.tx_replayed > 0, "no kill found a packet to send again");
}

/// Whether process `pid` is stopped (state `T` in `/proc/PID/stat`).
fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        == Some("T")
}

/// Runs `wire` traffic once per crash point of the `transitions` given,
/// the first instance aborting there on each occurrence of `nths`
/// (`published` fires once per instance and log, so only on its first);
/// the next instance must recover with every invariant of [`Run::run`].
/// Returns how many runs crashed where they were told to.
fn crash_point_sweep(wire: WireType, transitions: &[&str], nths: &[u32], rx_total: u32) -> u32 {
    let mut crashed = 0;
    for point in shadowback_shadow::CrashPoint::all() {
        let name = point.to_string();
        if !transitions
            .iter()
            .any(|t| name.starts_with(&format!("{t}.")))
        {
            continue;
        }
        let nths = if name.starts_with("published.") {
            &[1][..]
        } else {
            nths
        };
        for nth in nths {
            eprintln!("crash point {name}@{nth} ({wire:?})");
            let o = Run {
                wire,
                tx_total: 400,
                rx_total,
                kills: 0,
                first_env: vec![("SHADOWBACK_CRASH_AT", format!("{name}@{nth}"))],
            }
            .run();
            assert_eq!(
                o.crashes, 1,
                "{name}@{nth}: the first instance did not crash there"
            );
            crashed += 1;
        }
    }
    crashed
}

/// The first instance aborts at each crash point of the shadow logs a vif
/// serves with (not those of a recovery, which a first instance never
/// runs), on an early occurrence — before the first instance ever
/// published, so its successor replays serially (a suspected crash loop,
/// docs/ARCHITECTURE.md §7.5) — and one deep in the stream; the next
/// instance recovers.
#[test]
fn every_crash_point_of_a_vif_is_recovered() {
    let served = ["consume", "complete", "free", "published", "progress"];
    let crashed = crash_point_sweep(WireType::Cable, &served, &[5, 37], 200);
    assert!(crashed >= 18, "only {crashed} crash points");
}

/// The same on a TAP, where a batch's slots are logged together just
/// before the batch is written and answered together after it
/// (docs/ARCHITECTURE.md §11.6), for the TX log's points (`progress` is the
/// RX log's), early (inside the first batches) and later. After an early
/// crash a packet the dead instance was still logging has to be completed
/// from the ring once the serial replay ends, or its first slot is taken
/// for a packet of its own (what this sweep found).
#[test]
fn every_crash_point_of_a_tap_batch_is_recovered() {
    let crashed = std::thread::spawn(|| {
        enter_fresh_netns();
        let tx = ["consume", "complete", "free", "published"];
        crash_point_sweep(WireType::Tap, &tx, &[5, 70], 0)
    })
    .join()
    .expect("the sweep's thread");
    assert!(crashed >= 20, "only {crashed} crash points");
}

/// A frame the backend read from the wire and held for a second buffer
/// dies with the backend: the next instance reports it in
/// `rx-dropped-in-crash`, once, and serves the buffer it was bound for.
#[test]
fn a_frame_held_by_a_killed_backend_is_counted_as_dropped_in_crash() {
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[]);
    backend.attach(&vif, false, true);
    let mut t = Traffic {
        rx_posted: vec![false; RING as usize],
        ..Traffic::default()
    };
    t.post_rx(&mut vif, 0);
    vif.rx.push_requests().unwrap();
    vif.kick.notify().unwrap();
    let send = |vif: &mut Vif, seq: u32, len: usize| {
        let mut out = vec![0u8; VnetHeaderLen::Basic.bytes()];
        VnetHeader::plain()
            .encode(&mut out, VnetHeaderLen::Basic)
            .unwrap();
        out.extend(frame(seq, len));
        assert_eq!(vif.peer.send(&out).unwrap(), SendOutcome::Sent);
    };
    // Two pages of frame, one buffer posted: the backend reads it and
    // holds it, its first buffer marked in the RX log.
    send(&mut vif, 0, 6000);
    let deadline = Instant::now() + Duration::from_secs(20);
    let marked = |vif: &Vif| {
        let snap = vif.rx_log.snapshot().unwrap();
        snap.entries.iter().filter(|e| e.progress != 0).count()
    };
    while marked(&vif) == 0 {
        assert!(
            Instant::now() < deadline,
            "the backend never took the frame"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let dropped = |attached: &Message| attached.get_u64("rx-dropped-in-crash").unwrap();
    backend.kill_in_place();
    backend = Backend::spawn(&[]);
    assert_eq!(dropped(&backend.attach(&vif, true, false)), Some(1));
    assert_eq!(marked(&vif), 0, "the mark outlived its count");
    // The buffer serves the next frame; the held one is gone.
    send(&mut vif, 1, 500);
    let deadline = Instant::now() + Duration::from_secs(20);
    t.rx_next = 1;
    while t.rx_received == 0 {
        assert!(Instant::now() < deadline, "the next frame never arrived");
        t.reap(&mut vif);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!((t.rx_received, t.rx_lost, t.rx_bad), (1, 0, 0));
    // Nothing was held at this kill: nothing is counted again.
    backend.kill_in_place();
    backend = Backend::spawn(&[]);
    assert_eq!(dropped(&backend.attach(&vif, true, false)), Some(0));
    backend.kill_in_place();
}

/// Frames waiting on the wire when buffers are posted are copied and
/// answered one at a time, each frame's answer logged before the next is
/// read: a backend dying while it logs the answer of the 4th of 16 loses
/// that frame (counted in `rx-dropped-in-crash`) and no other — the rest
/// are still on the wire for the next instance. (Answers collected over
/// many frames and logged together lost all of them at once, up to 32 per
/// death, and a TCP stream through a kill then waited for a
/// retransmission timeout: `bench failover --class net`.)
#[test]
fn a_backend_dying_while_frames_arrive_loses_only_the_frame_it_was_answering() {
    const FRAMES: u32 = 16;
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[("SHADOWBACK_CRASH_AT", "complete.0@4".into())]);
    backend.attach(&vif, false, true);
    let mut t = Traffic {
        rx_posted: vec![false; RING as usize],
        ..Traffic::default()
    };
    // No buffer posted yet: the frames wait on the wire.
    for seq in 0..FRAMES {
        let mut out = vec![0u8; VnetHeaderLen::Basic.bytes()];
        VnetHeader::plain()
            .encode(&mut out, VnetHeaderLen::Basic)
            .unwrap();
        out.extend(frame(seq, frame_len(seq)));
        assert_eq!(vif.peer.send(&out).unwrap(), SendOutcome::Sent);
        t.rx_sent += 1;
    }
    for id in 0..FRAMES as u16 {
        t.post_rx(&mut vif, id);
    }
    vif.rx.push_requests().unwrap();
    vif.kick.notify().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = backend.0.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the backend never reached complete.0@4"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(!status.success(), "the backend exited on its own: {status}");
    backend = Backend::spawn(&[]);
    let attached = backend.attach(&vif, true, true);
    assert_eq!(attached.get_u64("rx-dropped-in-crash").unwrap(), Some(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.rx_received + t.rx_lost < FRAMES {
        assert!(
            Instant::now() < deadline,
            "frames never arrived: {} received, {} lost",
            t.rx_received,
            t.rx_lost
        );
        t.reap(&mut vif);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        (t.rx_received, t.rx_lost, t.rx_bad),
        (FRAMES - 1, 1, 0),
        "one frame lost, the one being answered"
    );
    backend.kill_in_place();
}

/// A hostile TX ring: an error is answered and the vif carries on; a
/// protocol violation disconnects this vif, and the backend stays up.
#[test]
fn bad_tx_requests_are_answered_or_disconnect_the_vif_only() {
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[]);
    backend.attach(&vif, false, true);
    // A runt (under an Ethernet header): answered with an error.
    let runt = NetifTxRequest {
        gref: TX_BUF_GREF,
        offset: 0,
        flags: 0,
        id: 7,
        size: 10,
    };
    vif.tx.put_request(&runt).unwrap();
    vif.tx.push_requests().unwrap();
    vif.kick.notify().unwrap();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let rsp = loop {
        if let Some(rsp) = vif.tx.take_response().unwrap() {
            break rsp;
        }
        assert!(Instant::now() < deadline, "no answer to a runt");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((rsp.id, rsp.status), (7, -1), "a runt is an error");
    // Still serving: a good frame goes out.
    let mut t = Traffic::new(&mut vif);
    while t.wire_next < 10 && Instant::now() < deadline {
        t.step(&mut vif, 10, 0);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(t.wire_next, 10);
    // Data crossing its page: fatal for the vif (Linux netback's rule).
    let crossing = NetifTxRequest {
        gref: TX_BUF_GREF,
        offset: 4000,
        flags: 0,
        id: 9,
        size: 200,
    };
    vif.tx.put_request(&crossing).unwrap();
    vif.tx.push_requests().unwrap();
    vif.kick.notify().unwrap();
    let (msg, _) = backend
        .0
        .control
        .recv_timeout(REPLY_TIMEOUT)
        .unwrap()
        .expect("a disconnect in time");
    assert_eq!(msg.kind(), "disconnect", "{msg:?}");
    assert!(
        msg.get("reason").unwrap().contains("crosses its page"),
        "{msg:?}"
    );
    assert!(
        backend.0.child.try_wait().unwrap().is_none(),
        "the backend died"
    );
    // The process serves the next vif.
    backend
        .0
        .control
        .send(&Message::new("detach"), &[])
        .unwrap();
    let (msg, _) = backend
        .0
        .control
        .recv_timeout(REPLY_TIMEOUT)
        .unwrap()
        .unwrap();
    assert_eq!(msg.kind(), "detached", "{msg:?}");
    let mut other = Vif::new();
    backend.attach(&other, false, true);
    let mut t = Traffic::new(&mut other);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while t.wire_next < 10 && Instant::now() < deadline {
        t.step(&mut other, 10, 0);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(t.wire_next, 10, "the next vif is served");
    backend.kill_in_place();
}

/// `attach-net` is checked by the backend itself, not only by the
/// supervisor: a non-eventfd where an event channel belongs, or an offload
/// this backend does not implement, is refused; the process then serves a
/// correct attach.
#[test]
fn a_bad_attach_net_is_refused_and_the_process_serves_the_next() {
    let vif = Vif::new();
    let backend = Backend::spawn(&[]);
    let refused = |msg: &Message, fds: &[BorrowedFd<'_>]| {
        backend.0.control.send(msg, fds).unwrap();
        let (reply, _) = backend
            .0
            .control
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap()
            .expect("an answer in time");
        assert_eq!(reply.kind(), "error", "{reply:?}");
        reply.get("message").unwrap_or_default().to_owned()
    };
    // The region where the kick eventfd belongs.
    let mut fds = vif.attach_fds();
    fds[1] = vif.region.file().as_fd();
    let why = refused(&vif.attach_message(false, true), &fds);
    assert!(why.contains("not an eventfd"), "{why}");
    // GSO asked for.
    let msg = vif.attach_message(false, true).with("feature-gso-tcpv4", 1);
    let why = refused(&msg, &vif.attach_fds());
    assert!(why.contains("GSO"), "{why}");
    let mut backend = backend;
    backend.attach(&vif, false, true);
    backend.kill_in_place();
}

/// Runs TX traffic into a cable whose far end stops reading (a peer
/// backend descheduled or stopped), and RX traffic from it, until the TX
/// answers stop for a while; with `kill`, the backend is then SIGKILLed
/// and replaced. Then the far end reads again. Returns the traffic and
/// the `tx-maybe-duplicated` of the replacement.
fn through_a_paused_far_end(kill: bool) -> (Traffic, u64) {
    // Far more than the cable holds (its queue is ≈ 512 KiB of messages
    // of 60–760 bytes).
    const TX: u32 = 4000;
    const RX: u32 = 400;
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[]);
    backend.attach(&vif, false, true);
    let mut t = Traffic::new(&mut vif);
    t.peer_paused = true;
    vif.kick.notify().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (t.tx_answered, Instant::now());
    while t.rx_received < RX || last.1.elapsed() < Duration::from_millis(300) {
        assert!(
            Instant::now() < deadline,
            "{} of {RX} RX frames in while TX was held back",
            t.rx_received
        );
        t.step(&mut vif, TX, RX);
        if t.tx_answered != last.0 {
            last = (t.tx_answered, Instant::now());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    eprintln!(
        "far end paused: {} of {TX} TX packets posted, {} slots answered, {} not",
        t.tx_next,
        t.tx_answered,
        t.tx_out.len()
    );
    // The cable cannot hold the whole run: the backend held the rest back.
    assert!(
        t.tx_next < TX && !t.tx_out.is_empty(),
        "{} of {TX} TX packets answered into a cable nobody reads",
        t.tx_next
    );
    assert_eq!(t.wire_next, 0);
    assert!(
        backend.0.child.try_wait().unwrap().is_none(),
        "the backend died"
    );
    let mut maybe_dup = 0;
    if kill {
        backend.kill_in_place();
        backend = Backend::spawn(&[]);
        let attached = backend.attach(&vif, true, false);
        maybe_dup = attached
            .get_u64("tx-maybe-duplicated")
            .unwrap()
            .unwrap_or(0);
    }
    t.peer_paused = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (t.tx_next < TX || !t.tx_out.is_empty()) && Instant::now() < deadline {
        t.step(&mut vif, TX, RX);
        std::thread::sleep(Duration::from_micros(200));
    }
    t.reap(&mut vif);
    backend.kill_in_place();
    (t, maybe_dup)
}

/// A cable's far end that stops reading for a while costs the sender
/// time, never frames (docs/ARCHITECTURE.md §11.5): once the cable is full
/// the backend leaves the packet it could not send unanswered and takes no
/// more TX until the cable has room, while RX keeps moving; when the far
/// end reads again every frame arrives, in order, and every TX request is
/// answered once. (Each frame meeting the full cable used to be dropped
/// and answered `OKAY`: a TCP sender then waited for its retransmission
/// timeout.)
#[test]
fn a_full_cable_holds_tx_back_and_loses_no_frame() {
    let (t, _) = through_a_paused_far_end(false);
    assert_eq!(t.tx_bad, 0, "TX responses for no request, or failed");
    assert_eq!(t.tx_next, 4000, "the run did not finish");
    assert_eq!(t.tx_answered, t.tx_slots, "every TX slot answered once");
    assert_eq!(t.wire_next, 4000, "no TX frame lost on the wire");
    assert_eq!(t.wire_dups, 0);
    assert_eq!((t.rx_received, t.rx_lost, t.rx_bad), (400, 0, 0));
}

/// A backend killed while its TX waits for a full cable: the packets it
/// held back were logged and never answered, so the next instance sends
/// them (§11.6) — none lost, each answered once, a duplicate only where
/// reported possible.
#[test]
fn a_backend_killed_while_the_cable_is_full_loses_no_frame() {
    let (t, maybe_dup) = through_a_paused_far_end(true);
    assert_eq!(t.tx_bad, 0, "TX responses for no request, or failed");
    assert_eq!(t.tx_next, 4000, "the run did not finish");
    assert_eq!(t.tx_answered, t.tx_slots, "every TX slot answered once");
    assert_eq!(t.wire_next, 4000, "no TX frame lost on the wire");
    assert!(
        u64::from(t.wire_dups) <= maybe_dup,
        "{} duplicates, {maybe_dup} reported possible",
        t.wire_dups
    );
    assert_eq!((t.rx_received, t.rx_bad), (400, 0));
}

/// Fills the TX ring with one-slot frames, ids 0..RING, published with one
/// `req_prod` store, and kicks.
fn post_full_tx_ring(vif: &mut Vif) {
    for id in 0..RING as u16 {
        let f = frame(u32::from(id), 60);
        let page = u64::from(TX_BUF_FRAME + u32::from(id)) * PAGE;
        vif.region.write(page, &f).unwrap();
        let req = NetifTxRequest {
            gref: TX_BUF_GREF + u32::from(id),
            offset: 0,
            flags: 0,
            id,
            size: f.len() as u16,
        };
        vif.tx.put_request(&req).unwrap();
    }
    vif.tx.push_requests().unwrap();
    vif.kick.notify().unwrap();
}

/// A drain of a full TX ring publishes its answers every 32 packets, so the
/// guest can refill the ring while the backend works through the rest
/// (docs/ARCHITECTURE.md §11.6). The backend dies at the 201st packet
/// (poisoned): the 192 answers of six whole batches before it were
/// published, the 8 after the last batch were not. (A backend that
/// published once per drain left the guest nothing.)
#[test]
fn a_long_tx_drain_publishes_answers_before_it_ends() {
    const POISONED_ID: u16 = 200;
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[]);
    backend.attach(&vif, false, true);
    let poison = Message::new(shadowback_xenbus::protocol::kind::POISON)
        .with(shadowback_xenbus::protocol::key::SECTOR, POISONED_ID);
    backend.0.control.send(&poison, &[]).unwrap();
    let (ok, _) = backend
        .0
        .control
        .recv_timeout(REPLY_TIMEOUT)
        .unwrap()
        .expect("poison answered");
    assert_eq!(ok.kind(), shadowback_xenbus::protocol::kind::OK);
    post_full_tx_ring(&mut vif);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while backend.0.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the backend never reached the poisoned packet"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut answered = Vec::new();
    while let Some(rsp) = vif.tx.take_response().unwrap() {
        assert_eq!(rsp.status, NETIF_RSP_OKAY);
        answered.push(rsp.id);
    }
    let expected: Vec<u16> = (0..192).collect();
    assert_eq!(
        answered, expected,
        "answers published before the poisoned packet"
    );
    backend.kill_in_place();
}

/// A guest asleep while the backend drains a full TX ring — its
/// `rsp_event` asks for the first answer — is woken once the drain ends:
/// the publications in the middle of the drain owe the notification they
/// did not send to the drain's end (one owed and never sent would leave
/// this guest asleep for good).
#[test]
fn a_guest_asleep_through_a_long_drain_is_notified() {
    let mut vif = Vif::new();
    let mut backend = Backend::spawn(&[]);
    backend.attach(&vif, false, true);
    // The wake-up every attach sends, before its reply.
    vif.notify.drain().unwrap();
    post_full_tx_ring(&mut vif);
    assert!(
        vif.notify.wait(REPLY_TIMEOUT).unwrap(),
        "the guest was never notified"
    );
    let mut answered = 0;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while answered < RING {
        assert!(Instant::now() < deadline, "{answered} answers");
        while let Some(rsp) = vif.tx.take_response().unwrap() {
            assert_eq!(rsp.status, NETIF_RSP_OKAY);
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    backend.kill_in_place();
}

/// A cable whose far end is closed (the supervisor tearing the other vif
/// down first) has nothing more for this guest: the backend says so once
/// and stops polling that wire, where the closed end used to wake it at
/// once, every turn, with a warning each time, until the detach.
#[test]
fn a_closed_far_end_of_a_cable_is_reported_once_and_not_polled_again() {
    let mut vif = Vif::new();
    let mut backend = Backend(NetbackProcess::spawn_logging(&[]));
    backend.attach(&vif, false, true);
    let mut t = Traffic::new(&mut vif);
    vif.kick.notify().unwrap();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while (t.wire_next < 20 || t.rx_received < 20 || !t.tx_out.is_empty())
        && Instant::now() < deadline
    {
        t.step(&mut vif, 20, 20);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!((t.wire_next, t.rx_received), (20, 20), "frames both ways");
    let Peer::Cable(far) = &vif.peer else {
        unreachable!("a cable vif");
    };
    nix::sys::socket::shutdown(far.fd().as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        backend.0.child.try_wait().unwrap().is_none(),
        "the backend died of a closed cable"
    );
    let mut log = backend.0.child.stderr.take().expect("piped stderr");
    backend.kill_in_place();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut log, &mut text).unwrap();
    assert_eq!(
        text.matches("far end closed").count(),
        1,
        "one report of the closed end:\n{text}"
    );
    assert!(
        !text.contains("wire read failed"),
        "the closed end was read again:\n{text}"
    );
}
