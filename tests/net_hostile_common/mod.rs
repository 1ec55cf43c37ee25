//! What the hostile network guest tests share (docs/PROTOCOL.md §4.8): a
//! supervisor serving four vifs, a well-behaved pair streaming checksummed
//! TCP between two netfronts, a raw netif frontend (the hostile guest of
//! `netif_hostile`, and the verifying peer at the far end of the hostile
//! vif's cable in both tests), and the checks made after every case.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::net::{run_stream, ProgressHook, StreamParams, StreamReport, StreamRole};
use shadowback_guest::netfront::{NetFront, NetFrontConfig, NetFrontStats};
use shadowback_ring::grant::GrantTable;
use shadowback_ring::netif::{
    NetifRx, NetifRxRequest, NetifRxResponse, NetifTx, NetifTxRequest, NetifTxResponse,
    NETTXF_MORE_DATA,
};
use shadowback_ring::sring::{FrontRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion, PAGE_SIZE};
use shadowback_supervisor::{Config, DeviceStats, SupervisorThread};
use shadowback_testsupport::harness::backend_command;
use shadowback_testsupport::operator::{stats_of, status};
use shadowback_testsupport::temp::TempDir;
use shadowback_xenbus::netif::{NetBackendInfo, NetConnectRequest, NetFeatures};
use shadowback_xenbus::protocol::kind;
use shadowback_xenbus::{Message, SeqPacket, XenbusError};

pub use crate::netback_common::{check_frame, frame};

pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes of one round of the well-behaved stream.
const ROUND_BYTES: u64 = 1 << 20;

/// The supervisor of a test and its sockets.
pub struct Setup {
    pub dir: TempDir,
    pub sup: SupervisorThread,
    pub socket: PathBuf,
    pub vhost: PathBuf,
}

/// Starts a supervisor with `gooda` ↔ `goodb` (netif, the well-behaved
/// stream) and `evil` ↔ `peer` (`evil` over vhost-user when `evil_vhost`,
/// else netif). No standbys: a pid that changes is a backend that died.
///
/// Every vif runs with the default hang watchdog (100 ms): a busy,
/// well-behaved backend on a loaded host must not be declared hung
/// (docs/ARCHITECTURE.md §7.2), so a bystander's pid must not change.
pub fn start(tag: &str, evil_vhost: bool) -> Setup {
    start_on(tag, evil_vhost, "cable = \"peer\"", "cable = \"evil\"")
}

/// [`start`] with `evil`'s and `peer`'s wires given (`tap = "…"` puts
/// each on a TAP of its own, in the calling thread's network namespace).
pub fn start_on(tag: &str, evil_vhost: bool, evil_link: &str, peer_link: &str) -> Setup {
    let dir = TempDir::new(tag);
    let socket = dir.join("control.sock");
    let vhost = dir.join("evil.sock");
    let common = "standby = false\n";
    let evil_wire = if evil_vhost {
        format!("vhost_user = \"{}\"\n", vhost.display())
    } else {
        String::new()
    };
    let toml = format!(
        "socket = \"{}\"\n\
         [[nic]]\nname = \"gooda\"\ncable = \"goodb\"\n{common}\
         [[nic]]\nname = \"goodb\"\ncable = \"gooda\"\n{common}\
         [[nic]]\nname = \"evil\"\n{evil_link}\n{common}{evil_wire}\
         [[nic]]\nname = \"peer\"\n{peer_link}\n{common}",
        socket.display()
    );
    let path = dir.join("shadowback.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = Config::from_file(&path).expect("the test's config");
    let sup = SupervisorThread::start(cfg, backend_command()).expect("start the supervisor");
    Setup {
        dir,
        sup,
        socket,
        vhost,
    }
}

// ---- the well-behaved pair ---------------------------------------------------

/// Two netfront guests on `gooda` and `goodb` streaming TCP in rounds of
/// [`ROUND_BYTES`] (a fresh connection each) until told to stop.
pub struct GoodStream {
    shared: Shared,
    sender: thread::JoinHandle<(Vec<StreamReport>, NetFrontStats)>,
    receiver: thread::JoinHandle<(Vec<StreamReport>, NetFrontStats)>,
}

/// What the two sides of a [`GoodStream`] and the test share.
#[derive(Clone, Default)]
struct Shared {
    /// Raised by the test: the sender's current round is the last.
    stop: Arc<AtomicBool>,
    /// Rounds the sender finished, shifted left once; bit 0 says the last
    /// of them was the last round.
    rounds: Arc<AtomicU64>,
    /// Bytes the receiver has checked, over every round.
    progress: Arc<AtomicU64>,
}

impl GoodStream {
    pub fn start(socket: &Path) -> Self {
        let shared = Shared::default();
        let a = Ipv4Addr::new(10, 9, 7, 1);
        let b = Ipv4Addr::new(10, 9, 7, 2);
        let receiver = Self::side(socket, "goodb", StreamRole::Receiver, b, a, &shared);
        let sender = Self::side(socket, "gooda", StreamRole::Sender, a, b, &shared);
        GoodStream {
            shared,
            sender,
            receiver,
        }
    }

    fn side(
        socket: &Path,
        vif: &str,
        role: StreamRole,
        address: Ipv4Addr,
        peer: Ipv4Addr,
        shared: &Shared,
    ) -> thread::JoinHandle<(Vec<StreamReport>, NetFrontStats)> {
        let mut front =
            NetFront::attach(socket, &NetFrontConfig::new(vif)).expect("a good guest attaches");
        let shared = shared.clone();
        thread::spawn(move || {
            let mut reports = Vec::new();
            let mut round = 0u64;
            loop {
                let base = shared.progress.load(Ordering::Acquire);
                let hook = (role == StreamRole::Receiver).then(|| {
                    let progress = shared.progress.clone();
                    ProgressHook::new(move |_, offset| {
                        progress.fetch_max(base + offset, Ordering::AcqRel);
                    })
                });
                let p = StreamParams {
                    port: 6000 + round as u16,
                    seed: 1000 + round,
                    bytes: ROUND_BYTES,
                    stall_timeout: Duration::from_secs(30),
                    on_progress: hook,
                    ..StreamParams::between(address, peer)
                };
                let report = run_stream(&mut front, role, &p);
                let failed = !report.passed();
                reports.push(report);
                round += 1;
                if failed {
                    break;
                }
                if role == StreamRole::Sender {
                    // The sender decides whether this round was the last;
                    // the receiver learns it from `rounds`.
                    let last = u64::from(shared.stop.load(Ordering::Acquire));
                    shared.rounds.store(round << 1 | last, Ordering::Release);
                    if last == 1 {
                        break;
                    }
                } else {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let state = loop {
                        let state = shared.rounds.load(Ordering::Acquire);
                        if state >> 1 >= round || Instant::now() > deadline {
                            break state;
                        }
                        thread::sleep(Duration::from_millis(1));
                    };
                    if state >> 1 != round || state & 1 == 1 {
                        break;
                    }
                }
            }
            let stats = front.stats();
            front.detach().expect("a good guest closes cleanly");
            (reports, stats)
        })
    }

    /// Bytes the receiver has checked so far.
    pub fn progress(&self) -> u64 {
        self.shared.progress.load(Ordering::Acquire)
    }

    /// Waits until the stream moves past where it is now: the good vifs
    /// are still served.
    pub fn assert_moving(&self, after: &str) {
        let from = self.progress();
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while self.progress() <= from {
            assert!(
                Instant::now() < deadline,
                "the good stream stopped after {after} (at {from} bytes)"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops after the current round; checks every round passed, both
    /// ends agree, and no ring request was answered wrongly.
    pub fn finish(self) -> u64 {
        self.shared.stop.store(true, Ordering::Release);
        let (sent, tx_front) = self.sender.join().expect("the good sender");
        let (received, rx_front) = self.receiver.join().expect("the good receiver");
        eprintln!(
            "good stream: {} rounds sent, {} received; sender={tx_front:?} receiver={rx_front:?}",
            sent.len(),
            received.len()
        );
        for r in sent.iter().chain(&received) {
            assert!(r.passed(), "a good stream round failed: {r:#?}");
            assert_eq!(r.resets, 0, "the good stream reset: {r:#?}");
            assert_eq!(r.bytes, ROUND_BYTES, "{r:#?}");
        }
        assert_eq!(sent.len(), received.len(), "rounds sent and received");
        for (s, r) in sent.iter().zip(&received) {
            assert_eq!(s.checksum, r.checksum, "the good stream's data changed");
            assert_eq!(r.first_mismatch, None);
        }
        for f in [&tx_front, &rx_front] {
            assert_eq!((f.tx_bad_responses, f.rx_bad_responses), (0, 0), "{f:?}");
        }
        ROUND_BYTES * sent.len() as u64
    }
}

// ---- status -------------------------------------------------------------------

/// The pids and counters of the vifs that must never notice the hostile
/// guest, taken before the cases.
pub struct Bystanders {
    socket: PathBuf,
    before: Vec<(String, DeviceStats)>,
}

impl Bystanders {
    pub const NAMES: [&'static str; 3] = ["gooda", "goodb", "peer"];

    pub fn record(socket: &Path) -> Self {
        let before = Self::NAMES
            .iter()
            .map(|n| (n.to_string(), stats_of(socket, n)))
            .collect();
        Bystanders {
            socket: socket.to_path_buf(),
            before,
        }
    }

    /// The supervisor answers `status` and lists every vif; the
    /// bystanders run on the same backend processes with no crash, hang
    /// or recovery, and are still connected.
    pub fn assert_untouched(&self, after: &str) {
        let now = status(&self.socket);
        assert_eq!(now.len(), 4, "{after}: status lists {now:?}");
        for (name, before) in &self.before {
            let s = &now
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{after}: status lists no {name}"))
                .1;
            assert!(s.pid.is_some(), "{after}: {name} has no backend");
            assert_eq!(
                s.pid, before.pid,
                "{after}: {name}'s backend changed: {s:?}"
            );
            assert_eq!(
                (s.crashes, s.hangs, s.recoveries, s.given_up),
                (0, 0, 0, false),
                "{after}: {name}: {s:?}"
            );
            assert!(s.connected, "{after}: {name} lost its guest");
        }
    }
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the backend's status");
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

// ---- a vif that posts no receive buffer -------------------------------------------

/// Frames the peer sends towards a vif that posts no receive buffer.
pub const BLAST: u32 = 16 * 1024;
pub const BLAST_LEN: usize = 1024;

/// A blast in progress ([`Peer::blast_step`]): frames posted, answered,
/// and out.
#[derive(Debug, Default)]
pub struct Blast {
    pub next: u32,
    pub answered: u32,
    pub out: u32,
}

/// The peer sends up to [`BLAST`] frames of [`BLAST_LEN`] bytes (16 MiB)
/// towards the hostile vif, which has posted nothing, until the peer's TX
/// is held back: once the cable is full, the peer's (netif) backend
/// answers and takes nothing more until it has room, rather than drop
/// (docs/ARCHITECTURE.md §11.5). Neither the hostile vif's backend nor the
/// peer's (`pids`) grows. Returns the blast, for [`drain_blast`].
pub fn blast_at_silent_vif(peer: &mut Peer, pids: [u32; 2], what: &str) -> Blast {
    let rss_before = pids.map(rss_kib);
    let mut blast = Blast::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (blast.answered, Instant::now());
    while last.1.elapsed() < Duration::from_millis(500) {
        assert!(
            Instant::now() < deadline,
            "{what}: the peer's TX never stopped"
        );
        peer.blast_step(&mut blast, BLAST, BLAST_LEN);
        if blast.answered != last.0 {
            last = (blast.answered, Instant::now());
        }
        thread::sleep(Duration::from_micros(200));
    }
    let rss_after = pids.map(rss_kib);
    eprintln!(
        "{} of {BLAST} frames answered before the peer's TX was held back; RSS of the \
         backends (hostile, peer) {rss_before:?} -> {rss_after:?} KiB",
        blast.answered
    );
    assert!(
        blast.answered < BLAST && blast.out > 0,
        "{what}: the peer's TX was not held back: {blast:?}"
    );
    for (before, after) in rss_before.iter().zip(&rss_after) {
        assert!(
            *after < before + 2048,
            "{what}: a backend grew from {before} to {after} KiB"
        );
    }
    blast
}

/// Once the hostile vif posted buffers: `next` giving the sequence number
/// of the next frame delivered (its buffer reposted), every frame of the
/// blast arrives, once and in order, while the peer sends the rest, and
/// every one of the peer's TX requests is answered.
pub fn drain_blast(peer: &mut Peer, mut blast: Blast, what: &str, mut next: impl FnMut() -> u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for expected in 0..BLAST {
        assert!(Instant::now() < deadline, "{what}: {blast:?}");
        peer.blast_step(&mut blast, BLAST, BLAST_LEN);
        let seq = next();
        assert_eq!(seq, expected, "{what}: frame {seq} delivered");
    }
    while blast.answered < BLAST {
        assert!(Instant::now() < deadline, "{what}: {blast:?}");
        peer.blast_step(&mut blast, BLAST, BLAST_LEN);
        thread::sleep(Duration::from_micros(200));
    }
}

// ---- a raw netif frontend -----------------------------------------------------------

/// TX buffer pages of a [`RawNetif`]: one per TX slot id it uses.
pub const TX_BUFS: u32 = 64;
/// RX buffer pages: one per RX ring slot.
pub const RX_BUFS: u32 = 256;
pub const GRANT_FRAMES: u32 = 2;
pub const TX_RING_FRAME: u32 = GRANT_FRAMES;
pub const RX_RING_FRAME: u32 = GRANT_FRAMES + 1;
pub const TX_BUF_FRAME: u32 = GRANT_FRAMES + 2;
pub const RX_BUF_FRAME: u32 = TX_BUF_FRAME + TX_BUFS;
pub const PAGES: u32 = RX_BUF_FRAME + RX_BUFS;
/// Every granted frame `f` has reference `f + GREF_BASE` (refs below 8
/// are the toolstack's).
pub const GREF_BASE: u32 = 6;
/// A reference inside the table that was never granted.
pub const UNGRANTED_GREF: u32 = 1000;

pub fn tx_gref(id: u16) -> u32 {
    TX_BUF_FRAME + u32::from(id) + GREF_BASE
}

pub fn rx_gref(id: u16) -> u32 {
    RX_BUF_FRAME + u32::from(id) + GREF_BASE
}

/// A netif frontend whose every ring slot and index the test writes: it
/// can behave (post buffers, send verified frames) or not.
pub struct RawNetif {
    pub control: SeqPacket,
    pub region: Arc<SharedRegion>,
    pub grants: GrantTable,
    pub backend_id: u16,
    pub tx: FrontRing<NetifTx>,
    pub rx: FrontRing<NetifRx>,
    pub kick: EventChannel,
    pub notify: EventChannel,
    /// RX slot (ring index mod size) → the request posted there.
    pub rx_posted: HashMap<u32, NetifRxRequest>,
    /// Our copy of the RX ring's response consumer.
    pub rx_cons: u32,
}

impl RawNetif {
    /// Probes and connects `device` through the supervisor, with
    /// `feature-sg` and checksums offloaded to nobody.
    pub fn attach(socket: &Path, device: &str) -> Self {
        Self::attach_with(socket, device, false)
    }

    /// As [`attach`](Self::attach), asking for multicast filtering
    /// (`request-multicast-control`) if `multicast_control`.
    pub fn attach_with(socket: &Path, device: &str, multicast_control: bool) -> Self {
        let control = SeqPacket::connect(socket).expect("control socket");
        control.send(&Message::probe(device), &[]).unwrap();
        let reply = recv(&control, "probe");
        assert_eq!(reply.kind(), kind::BACKEND, "{reply:?}");
        let info = NetBackendInfo::from_message(&reply).expect("backend keys");
        let region = Arc::new(SharedRegion::create("hostile-netif", PAGES).unwrap());
        let grants = GrantTable::new(region.clone(), GRANT_FRAMES).unwrap();
        for frame in GRANT_FRAMES..PAGES {
            grants
                .grant(frame + GREF_BASE, info.backend_id, frame, false)
                .unwrap();
        }
        let pages =
            |frame: u32| RingPages::new(region.clone(), vec![u64::from(frame) * PAGE]).unwrap();
        let tx = FrontRing::<NetifTx>::init(pages(TX_RING_FRAME)).unwrap();
        let rx = FrontRing::<NetifRx>::init(pages(RX_RING_FRAME)).unwrap();
        let kick = EventChannel::new().unwrap();
        let notify = EventChannel::new().unwrap();
        let connect = NetConnectRequest {
            device: device.into(),
            frontend_id: 1,
            grant_frames: GRANT_FRAMES,
            tx_ring_ref: TX_RING_FRAME + GREF_BASE,
            rx_ring_ref: RX_RING_FRAME + GREF_BASE,
            features: NetFeatures {
                sg: true,
                ..NetFeatures::default()
            },
            no_csum_offload: true,
            split_event_channels: false,
            multicast_control,
        };
        control
            .send(
                &connect.to_message(),
                &[region.file().as_fd(), kick.as_fd(), notify.as_fd()],
            )
            .unwrap();
        let reply = recv(&control, "connect");
        assert_eq!(reply.kind(), kind::CONNECTED, "{reply:?}");
        RawNetif {
            control,
            region,
            grants,
            backend_id: info.backend_id,
            tx,
            rx,
            kick,
            notify,
            rx_posted: HashMap::new(),
            rx_cons: 0,
        }
    }

    /// Publishes what was put on both rings and kicks.
    pub fn push(&mut self) {
        self.tx.push_requests().unwrap();
        self.rx.push_requests().unwrap();
        self.kick.notify().unwrap();
    }

    /// Puts `slots` on the TX ring, publishes them and kicks.
    pub fn put_tx(&mut self, slots: &[NetifTxRequest]) {
        for s in slots {
            self.tx.put_request(s).unwrap();
        }
        self.push();
    }

    /// Waits for `n` TX responses.
    pub fn tx_responses(&mut self, n: usize) -> Vec<NetifTxResponse> {
        let mut out = Vec::new();
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while out.len() < n {
            match self.tx.take_response().unwrap() {
                Some(r) => out.push(r),
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "{} of {n} TX responses: {out:?}",
                        out.len()
                    );
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        out
    }

    /// Asserts no TX response comes within `wait`.
    pub fn assert_no_tx_response(&mut self, wait: Duration) {
        thread::sleep(wait);
        assert_eq!(self.tx.take_response().unwrap(), None);
    }

    /// Writes `data` into TX buffer `id` at `offset`.
    pub fn fill_tx(&self, id: u16, offset: u16, data: &[u8]) {
        let page = u64::from(TX_BUF_FRAME + u32::from(id)) * PAGE;
        self.region.write(page + u64::from(offset), data).unwrap();
    }

    /// The slots of `data` sent in `pieces` slots (ids from `first_id`),
    /// each piece in its own buffer at offset 0; the data is written.
    pub fn packet(&self, data: &[u8], pieces: usize, first_id: u16) -> Vec<NetifTxRequest> {
        let chunk = data.len() / pieces;
        let first_len = data.len() - chunk * (pieces - 1);
        let mut at = 0;
        (0..pieces)
            .map(|i| {
                let id = first_id + i as u16;
                let len = if i == 0 { first_len } else { chunk };
                self.fill_tx(id, 0, &data[at..at + len]);
                at += len;
                NetifTxRequest {
                    gref: tx_gref(id),
                    offset: 0,
                    flags: if i + 1 < pieces { NETTXF_MORE_DATA } else { 0 },
                    id,
                    size: if i == 0 {
                        data.len() as u16
                    } else {
                        len as u16
                    },
                }
            })
            .collect()
    }

    /// Sends `data` as one valid packet of `pieces` slots and checks every
    /// slot is answered `status`.
    pub fn send(&mut self, data: &[u8], pieces: usize, status: i16) {
        let slots = self.packet(data, pieces, 0);
        self.put_tx(&slots);
        let rsps = self.tx_responses(slots.len());
        for (s, r) in slots.iter().zip(&rsps) {
            assert_eq!((r.id, r.status), (s.id, status), "{rsps:?}");
        }
    }

    /// Posts RX `req` (not yet published).
    pub fn post_rx(&mut self, req: NetifRxRequest) {
        let idx = self.rx.put_request(&req).unwrap();
        self.rx_posted.insert(idx % RX_BUFS, req);
    }

    /// Posts the buffer of slot id `id` with its own grant.
    pub fn post_rx_id(&mut self, id: u16) {
        self.post_rx(NetifRxRequest {
            id,
            pad: 0,
            gref: rx_gref(id),
        });
    }

    /// The next RX response with the request of its slot, if one is
    /// published. netif answers each request in its own slot.
    pub fn take_rx(&mut self) -> Option<(NetifRxRequest, NetifRxResponse)> {
        let rsp = self.rx.take_response().unwrap()?;
        let slot = self.rx_cons % RX_BUFS;
        self.rx_cons = self.rx_cons.wrapping_add(1);
        let req = self
            .rx_posted
            .remove(&slot)
            .expect("a response for a slot never posted");
        Some((req, rsp))
    }

    /// Waits for the next RX response.
    pub fn next_rx(&mut self) -> (NetifRxRequest, NetifRxResponse) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(r) = self.take_rx() {
                return r;
            }
            assert!(Instant::now() < deadline, "no RX response in time");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The frame an RX response describes, read from the page its request
    /// granted (one slot: the test's frames fit a page).
    pub fn rx_data(&self, req: &NetifRxRequest, rsp: &NetifRxResponse) -> Vec<u8> {
        assert!(rsp.status > 0, "RX status {}", rsp.status);
        assert_eq!(rsp.id, req.id, "RX response for another slot's id");
        let frame = req.gref - GREF_BASE;
        let mut data = vec![0u8; rsp.status as usize];
        self.region
            .read(u64::from(frame) * PAGE + u64::from(rsp.offset), &mut data)
            .unwrap();
        data
    }

    /// Moves a ring's shared `req_prod` (of the ring page `ring_frame`)
    /// `ahead` entries past its `rsp_prod` and kicks: an index no ring
    /// code would write.
    pub fn req_prod_ahead(&self, ring_frame: u32, ahead: u32) {
        let page = u64::from(ring_frame) * PAGE;
        let rsp_prod: u32 = self.region.load(page + 8, Ordering::Acquire).unwrap();
        self.region
            .store(rsp_prod.wrapping_add(ahead), page, Ordering::Release)
            .unwrap();
        self.kick.notify().unwrap();
    }

    /// Expects the supervisor to disconnect this guest: `error
    /// code=EPROTO` (naming `why`), then EOF.
    pub fn expect_disconnect(&self, why: &str) {
        let msg = recv(&self.control, "a disconnect");
        assert_eq!(msg.kind(), kind::ERROR, "{msg:?}");
        assert_eq!(msg.get("code"), Some("EPROTO"), "{msg:?}");
        assert!(
            msg.get("message").unwrap_or_default().contains(why),
            "{msg:?} does not say {why:?}"
        );
        match self.control.recv_timeout(REPLY_TIMEOUT) {
            Err(XenbusError::Closed) => {}
            other => panic!("expected EOF after the disconnect, got {other:?}"),
        }
    }

    /// Asserts the supervisor says nothing to this guest (it is still
    /// connected).
    pub fn assert_connected(&self) {
        match self.control.recv_timeout(Duration::from_millis(1)) {
            Ok(None) => {}
            other => panic!("the guest was told {other:?}"),
        }
    }

    /// `close`, then `closed`.
    pub fn close(self) {
        self.control.send(&Message::new(kind::CLOSE), &[]).unwrap();
        let msg = recv(&self.control, "close");
        assert_eq!(msg.kind(), kind::CLOSED, "{msg:?}");
    }
}

fn recv(control: &SeqPacket, what: &str) -> Message {
    control
        .recv_timeout(REPLY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
        .unwrap_or_else(|| panic!("no answer to {what} in time"))
        .0
}

/// The far end of the hostile vif's cable: a well-behaved raw netif guest
/// that keeps every RX buffer posted and checks every frame it receives.
pub struct Peer {
    pub guest: RawNetif,
    /// Sequence numbers of the frames received, in order.
    pub received: Vec<u32>,
}

impl Peer {
    pub fn attach(socket: &Path) -> Self {
        let mut guest = RawNetif::attach(socket, "peer");
        for id in 0..RX_BUFS as u16 {
            guest.post_rx_id(id);
        }
        guest.push();
        Peer {
            guest,
            received: Vec::new(),
        }
    }

    /// Takes every frame delivered so far (each checked), reposting its
    /// buffer.
    pub fn reap(&mut self) {
        let mut any = false;
        while let Some((req, rsp)) = self.guest.take_rx() {
            let data = self.guest.rx_data(&req, &rsp);
            self.received.push(check_frame(&data));
            self.guest.post_rx(req);
            any = true;
        }
        if any {
            self.guest.push();
        }
    }

    /// Waits until frame `seq` arrived; every frame before it must be one
    /// of `allowed` (frames sent before and not yet seen).
    pub fn expect(&mut self, seq: u32) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while !self.received.contains(&seq) {
            assert!(
                Instant::now() < deadline,
                "frame {seq} never reached the peer"
            );
            self.reap();
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// One round of a blast of `count` frames of `len` bytes towards the
    /// hostile vif, one slot each, that does not wait: posts while fewer
    /// than [`TX_BUFS`] are out, then takes the answers there are (each
    /// `OKAY`).
    pub fn blast_step(&mut self, b: &mut Blast, count: u32, len: usize) {
        let mut posted = false;
        while b.next < count && b.out < TX_BUFS {
            let id = (b.next % TX_BUFS) as u16;
            self.guest.fill_tx(id, 0, &frame(b.next, len));
            self.guest
                .tx
                .put_request(&NetifTxRequest {
                    gref: tx_gref(id),
                    offset: 0,
                    flags: 0,
                    id,
                    size: len as u16,
                })
                .unwrap();
            b.next += 1;
            b.out += 1;
            posted = true;
        }
        if posted {
            self.guest.push();
        }
        while let Some(r) = self.guest.tx.take_response().unwrap() {
            assert_eq!(r.status, 0, "the peer's TX answered {r:?}");
            b.answered += 1;
            b.out -= 1;
        }
    }
}
