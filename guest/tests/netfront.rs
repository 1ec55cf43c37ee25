//! NetFront against an in-test netif backend.
//!
//! The backend ([`Vif`]) maps the guest's region from the descriptors the
//! frontend hands out, reaches every page through the grant table
//! ([`GrantMapper`]) and serves the rings with `BackRing`s, as a netback
//! would. [`LoopBackend`] joins two frontends — A's TX becomes B's RX and
//! vice versa — so smoltcp TCP streams run across them; the synchronous
//! tests drive one frontend slot by slot, including a backend that lies.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use shadowback_guest::net::{
    run_stream, FrameDevice, FrameError, StreamParams, StreamReport, StreamRole,
};
use shadowback_guest::netfront::{
    NetFront, NetFrontConfig, NetFrontError, NetFrontStats, RX_BUFFERS, TX_BUFFERS,
};
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::netif::{
    NetifExtraGso, NetifExtraInfo, NetifRx, NetifRxResponse, NetifTx, NetifTxRequest,
    NetifTxResponse, NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETRXF_EXTRA_INFO, NETRXF_MORE_DATA,
    NETTXF_MORE_DATA, XEN_NETIF_GSO_TYPE_TCPV4,
};
use shadowback_ring::sring::{BackRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion, PAGE_SIZE};
use shadowback_xenbus::netif::{MacAddr, NetBackendInfo, NetConnectRequest, NetFds, NetFeatures};
use shadowback_xenbus::{kind, ErrorCode, Message, SeqPacketListener, XenbusState};

const BACKEND_ID: u16 = 3;
const MIB: u64 = 1 << 20;
const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Frames a [`LoopBackend`] holds per direction while the receiver has no
/// RX buffer posted; beyond that it drops, as a NIC queue would.
const LOOP_QUEUE: usize = 1024;
/// Byte offset of `rsp_prod` in a ring page (`xen/io/ring.h`).
const RSP_PROD: u64 = 8;

fn config(name: &str, mac_last: u8) -> NetFrontConfig {
    NetFrontConfig {
        backend_id: BACKEND_ID,
        mac: MacAddr([2, 0, 0, 0, 0, mac_last]),
        ..NetFrontConfig::new(name)
    }
}

fn jumbo(cfg: NetFrontConfig) -> NetFrontConfig {
    NetFrontConfig { mtu: 9000, ..cfg }
}

/// An Ethernet-looking frame of `len` bytes with content from `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One event channel as the backend holds it.
struct BackChannel {
    kick: EventChannel,
    notify: EventChannel,
}

/// The backend's side of one vif: rings, grants and event channels mapped
/// from what the frontend hands over.
struct Vif {
    region: Arc<SharedRegion>,
    grants: GrantMapper,
    tx: BackRing<NetifTx>,
    rx: BackRing<NetifRx>,
    tx_channel: BackChannel,
    rx_channel: Option<BackChannel>,
    /// Byte offsets of the ring pages (to publish or corrupt by hand).
    tx_ring_offset: u64,
    rx_ring_offset: u64,
}

impl Vif {
    /// What a netback does with `connect`'s keys and descriptors.
    fn from_connect(req: &NetConnectRequest, fds: NetFds) -> Vif {
        let region = Arc::new(SharedRegion::from_fd(fds.region).expect("map region"));
        let grants = GrantMapper::new(region.clone(), req.grant_frames, BACKEND_ID).unwrap();
        let ring = |gref| {
            let off = grants.map(gref, Access::Write).expect("ring grant");
            (off, RingPages::new(region.clone(), vec![off]).unwrap())
        };
        let (tx_ring_offset, tx_pages) = ring(req.tx_ring_ref);
        let (rx_ring_offset, rx_pages) = ring(req.rx_ring_ref);
        let channel = |e: shadowback_xenbus::netif::EventFds| BackChannel {
            kick: EventChannel::from_fd(e.kick).unwrap(),
            notify: EventChannel::from_fd(e.notify).unwrap(),
        };
        Vif {
            tx: BackRing::attach(tx_pages).unwrap(),
            rx: BackRing::attach(rx_pages).unwrap(),
            tx_channel: channel(fds.tx),
            rx_channel: fds.rx.map(channel),
            region,
            grants,
            tx_ring_offset,
            rx_ring_offset,
        }
    }

    /// Maps `front` directly, the way a test harness acting as the
    /// supervisor hands its descriptors to a backend.
    fn attach(front: &NetFront) -> Vif {
        let req = front.connect_request();
        let fds = front.fds().expect("dup fds");
        assert_eq!(fds.len(), req.fd_count());
        let fds = NetFds::from_received(&req.to_message(), &req, fds).unwrap();
        Vif::from_connect(&req, fds)
    }

    fn rx_notify(&self) -> &EventChannel {
        self.rx_channel
            .as_ref()
            .map_or(&self.tx_channel.notify, |c| &c.notify)
    }

    fn kicks(&self) -> Vec<&EventChannel> {
        let mut kicks = vec![&self.tx_channel.kick];
        if let Some(rx) = &self.rx_channel {
            kicks.push(&rx.kick);
        }
        kicks
    }

    /// Takes the next TX packet's slots (all published together).
    fn take_tx_slots(&mut self) -> Option<Vec<NetifTxRequest>> {
        if self.tx.unconsumed_requests().unwrap() == 0 {
            return None;
        }
        let mut slots = vec![self.tx.take_request().unwrap().1];
        while slots.last().unwrap().flags & NETTXF_MORE_DATA != 0 {
            assert!(
                self.tx.unconsumed_requests().unwrap() > 0,
                "a packet's slots were published apart"
            );
            slots.push(self.tx.take_request().unwrap().1);
        }
        Some(slots)
    }

    /// The frame carried by `slots`: the first slot's `size` is the whole
    /// frame, its own data what the others leave.
    fn read_tx(&self, slots: &[NetifTxRequest]) -> Vec<u8> {
        let total = usize::from(slots[0].size);
        let rest: usize = slots[1..].iter().map(|s| usize::from(s.size)).sum();
        let mut out = Vec::with_capacity(total);
        for (i, slot) in slots.iter().enumerate() {
            let len = if i == 0 {
                total - rest
            } else {
                usize::from(slot.size)
            };
            assert!(usize::from(slot.offset) + len <= PAGE_SIZE, "{slot:?}");
            let page = self.grants.map(slot.gref, Access::Read).expect("TX grant");
            let start = out.len();
            out.resize(start + len, 0);
            self.region
                .read(page + u64::from(slot.offset), &mut out[start..])
                .unwrap();
        }
        out
    }

    /// Takes one TX packet and answers every slot with `status`.
    fn take_tx(&mut self, status: i16) -> Option<Vec<u8>> {
        let slots = self.take_tx_slots()?;
        let data = self.read_tx(&slots);
        for slot in &slots {
            self.tx
                .put_response(&NetifTxResponse {
                    id: slot.id,
                    status,
                })
                .unwrap();
        }
        Some(data)
    }

    fn push_tx(&mut self) {
        if self.tx.push_responses().unwrap() {
            self.tx_channel.notify.notify().unwrap();
        }
    }

    /// Copies `data` into the buffers of the next posted RX requests, a
    /// page each, with `extra` (if any) in the slot after the first; false
    /// (nothing consumed) without enough buffers posted.
    fn deliver(&mut self, data: &[u8], extra: Option<NetifExtraInfo>) -> bool {
        let chunks: Vec<&[u8]> = data.chunks(PAGE_SIZE).collect();
        let needed = chunks.len() + usize::from(extra.is_some());
        if (self.rx.unconsumed_requests().unwrap() as usize) < needed {
            return false;
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let (_, req) = self.rx.take_request().unwrap();
            let page = self.grants.map(req.gref, Access::Write).expect("RX grant");
            self.region.write(page, chunk).unwrap();
            let mut flags = if i + 1 < chunks.len() {
                NETRXF_MORE_DATA
            } else {
                0
            };
            if i == 0 && extra.is_some() {
                flags |= NETRXF_EXTRA_INFO;
            }
            self.rx
                .put_response(&NetifRxResponse {
                    id: req.id,
                    offset: 0,
                    flags,
                    status: chunk.len() as i16,
                })
                .unwrap();
            if i == 0 {
                if let Some(extra) = extra {
                    self.rx.take_request().unwrap();
                    self.rx
                        .put_response(&NetifRxResponse::from_extra(&extra))
                        .unwrap();
                }
            }
        }
        true
    }

    fn push_rx(&mut self) {
        if self.rx.push_responses().unwrap() {
            self.rx_notify().notify().unwrap();
        }
    }
}

/// Moves what `src` sent into `queue` and from there into `dst`'s RX
/// buffers; true when anything moved.
fn pump(src: &mut Vif, dst: &mut Vif, queue: &mut VecDeque<Vec<u8>>) -> bool {
    let mut moved = false;
    while let Some(data) = src.take_tx(NETIF_RSP_OKAY) {
        moved = true;
        if queue.len() < LOOP_QUEUE {
            queue.push_back(data);
        }
    }
    src.push_tx();
    while let Some(data) = queue.front() {
        if !dst.deliver(data, None) {
            break;
        }
        queue.pop_front();
        moved = true;
    }
    dst.push_rx();
    moved
}

/// A backend thread looping two vifs into each other.
struct LoopBackend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LoopBackend {
    fn spawn(mut a: Vif, mut b: Vif) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            let (mut ab, mut ba) = (VecDeque::new(), VecDeque::new());
            loop {
                let done = stopping.load(Ordering::Acquire);
                let moved = pump(&mut a, &mut b, &mut ab) | pump(&mut b, &mut a, &mut ba);
                if done {
                    // One last pump after the stop: every TX request the
                    // fronts published is answered.
                    return;
                }
                if moved {
                    continue;
                }
                // RING_FINAL_CHECK_FOR_REQUESTS on every ring, then sleep
                // on the kicks.
                let mut pending = false;
                for vif in [&mut a, &mut b] {
                    pending |= vif.tx.final_check_for_requests().unwrap();
                    pending |= vif.rx.final_check_for_requests().unwrap();
                }
                if pending {
                    continue;
                }
                let kicks: Vec<&EventChannel> = a.kicks().into_iter().chain(b.kicks()).collect();
                let mut fds: Vec<PollFd> = kicks
                    .iter()
                    .map(|k| PollFd::new(k.as_fd(), PollFlags::POLLIN))
                    .collect();
                poll(&mut fds, PollTimeout::from(5u8)).unwrap();
                for k in kicks {
                    k.drain().unwrap();
                }
            }
        });
        LoopBackend {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("loop backend panicked");
    }
}

impl Drop for LoopBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn params(address: Ipv4Addr, peer: Ipv4Addr) -> StreamParams {
    StreamParams {
        seed: 41,
        bytes: 4 * MIB,
        stall_timeout: Duration::from_secs(20),
        ..StreamParams::between(address, peer)
    }
}

/// Runs a 4 MiB stream from A to B over two netfronts joined by a
/// [`LoopBackend`]; returns both reports and both fronts' final stats.
fn stream_across(
    cfg_a: NetFrontConfig,
    cfg_b: NetFrontConfig,
) -> ((StreamReport, NetFrontStats), (StreamReport, NetFrontStats)) {
    let a = NetFront::new(cfg_a).unwrap();
    let b = NetFront::new(cfg_b).unwrap();
    let backend = LoopBackend::spawn(Vif::attach(&a), Vif::attach(&b));
    let side = |mut front: NetFront, role, p: StreamParams| {
        thread::spawn(move || {
            let report = run_stream(&mut front, role, &p);
            (report, front)
        })
    };
    let tb = side(b, StreamRole::Receiver, params(B_ADDR, A_ADDR));
    let ta = side(a, StreamRole::Sender, params(A_ADDR, B_ADDR));
    let (ra, mut a) = ta.join().expect("side A panicked");
    let (rb, mut b) = tb.join().expect("side B panicked");
    backend.stop();
    // Take what the backend answered last: TX responses, and frames that
    // crossed after the streams ended (their buffers are posted again).
    let mut buf = Vec::new();
    for front in [&mut a, &mut b] {
        front.can_send();
        while front.recv(&mut buf).unwrap() {}
    }
    ((ra, a.stats()), (rb, b.stats()))
}

fn assert_stream_ok(tx: &StreamReport, rx: &StreamReport) {
    assert!(tx.passed(), "{tx:#?}");
    assert!(rx.passed(), "{rx:#?}");
    assert_eq!((tx.bytes, rx.bytes), (4 * MIB, 4 * MIB));
    assert_eq!(tx.checksum, rx.checksum);
    assert_eq!(rx.first_mismatch, None);
}

/// Exactly one response per TX request, no accounting error, every RX
/// buffer posted again.
fn assert_clean(stats: &NetFrontStats) {
    assert_eq!(stats.tx_bad_responses, 0, "{stats:?}");
    assert_eq!(stats.rx_bad_responses, 0, "{stats:?}");
    assert_eq!((stats.tx_errors, stats.rx_errors), (0, 0), "{stats:?}");
    assert_eq!(stats.tx_in_flight, 0, "{stats:?}");
    assert_eq!(stats.rx_posted, RX_BUFFERS, "{stats:?}");
}

#[test]
fn a_4_mib_tcp_stream_crosses_two_netfronts() {
    let ((tx, a), (rx, b)) = stream_across(config("vif-a", 1), config("vif-b", 2));
    assert_stream_ok(&tx, &rx);
    assert_clean(&a);
    assert_clean(&b);
    // 4 MiB in segments of at most 1460 bytes went A → B.
    assert!(a.tx_packets > 4 * MIB / 1460, "{a:?}");
    assert!(b.rx_packets > 4 * MIB / 1460, "{b:?}");
    assert!(b.tx_packets > 0 && a.rx_packets > 0);
}

#[test]
fn a_jumbo_stream_uses_multi_slot_frames_and_split_channels() {
    let split = |cfg| NetFrontConfig {
        split_event_channels: true,
        ..jumbo(cfg)
    };
    let ((tx, a), (rx, b)) = stream_across(split(config("vif-a", 1)), split(config("vif-b", 2)));
    assert_stream_ok(&tx, &rx);
    assert_clean(&a);
    assert_clean(&b);
    // 8960-byte segments: fewer frames than 1500-byte ones could carry.
    assert!(a.tx_packets < 4 * MIB / 1460, "{a:?}");
    assert!(b.rx_packets > 4 * MIB / 8960, "{b:?}");
}

#[test]
fn a_jumbo_frame_takes_three_slots_each_way() {
    let mut front = NetFront::new(jumbo(config("vif0", 1))).unwrap();
    let mut vif = Vif::attach(&front);
    let sent = frame(9014, 5);
    front.send(&sent).unwrap();
    let slots = vif.take_tx_slots().expect("published");
    let shape: Vec<(u16, u16)> = slots.iter().map(|s| (s.size, s.flags)).collect();
    assert_eq!(
        shape,
        [(9014, NETTXF_MORE_DATA), (4096, NETTXF_MORE_DATA), (822, 0)]
    );
    let ids: std::collections::HashSet<u16> = slots.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 3, "every slot has its own id: {slots:?}");
    assert_eq!(vif.read_tx(&slots), sent);
    assert_eq!(front.stats().tx_in_flight, 3);

    assert!(vif.deliver(&sent, None));
    vif.push_rx();
    let mut got = Vec::new();
    assert!(front.recv(&mut got).unwrap());
    assert_eq!(got, sent);
    assert!(!front.recv(&mut got).unwrap());
    let stats = front.stats();
    assert_eq!((stats.rx_packets, stats.rx_errors), (1, 0));
    assert_eq!(
        stats.rx_posted, RX_BUFFERS,
        "the three buffers are posted again"
    );
}

#[test]
fn without_sg_a_frame_is_one_slot() {
    let mut front = NetFront::new(NetFrontConfig {
        sg: false,
        ..config("vif0", 1)
    })
    .unwrap();
    assert!(!front.connect_request().features.sg);
    let mut vif = Vif::attach(&front);
    front.send(&frame(1514, 1)).unwrap();
    let slots = vif.take_tx_slots().unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!((slots[0].size, slots[0].flags), (1514, 0));
    assert!(matches!(
        front.send(&frame(1515, 1)),
        Err(FrameError::TooLong {
            len: 1515,
            max: 1514
        })
    ));
}

#[test]
fn rx_extra_info_slots_are_skipped_and_their_buffers_reposted() {
    let mut front = NetFront::new(jumbo(config("vif0", 1))).unwrap();
    let mut vif = Vif::attach(&front);
    let gso = NetifExtraInfo::from_gso(
        0,
        &NetifExtraGso {
            size: 1448,
            type_: XEN_NETIF_GSO_TYPE_TCPV4,
            pad: 0,
            features: 0,
        },
    );
    let sent = frame(6000, 9);
    assert!(vif.deliver(&sent, Some(gso)));
    // Then a plain one-slot frame right behind it.
    let small = frame(60, 3);
    assert!(vif.deliver(&small, None));
    vif.push_rx();
    let mut got = Vec::new();
    assert!(front.recv(&mut got).unwrap());
    assert_eq!(got, sent, "the extra slot is not data");
    assert!(front.recv(&mut got).unwrap());
    assert_eq!(got, small);
    assert!(!front.recv(&mut got).unwrap());
    let stats = front.stats();
    assert_eq!(
        (stats.rx_packets, stats.rx_errors, stats.rx_bad_responses),
        (2, 0, 0)
    );
    assert_eq!(stats.rx_posted, RX_BUFFERS);
    // Every buffer is on the ring again, extra slot's included.
    assert_eq!(vif.rx.unconsumed_requests().unwrap(), RX_BUFFERS);
}

#[test]
fn an_invalid_extra_info_slot_drops_the_frame_only() {
    let mut front = NetFront::new(config("vif0", 1)).unwrap();
    let mut vif = Vif::attach(&front);
    assert!(vif.deliver(&frame(100, 1), Some(NetifExtraInfo::default())));
    assert!(vif.deliver(&frame(80, 2), None));
    vif.push_rx();
    let mut got = Vec::new();
    assert!(front.recv(&mut got).unwrap());
    assert_eq!(got, frame(80, 2));
    let stats = front.stats();
    assert_eq!((stats.rx_packets, stats.rx_errors), (1, 1));
    assert_eq!(stats.rx_posted, RX_BUFFERS);
}

#[test]
fn a_frame_whose_slots_arrive_apart_is_assembled() {
    let mut front = NetFront::new(jumbo(config("vif0", 1))).unwrap();
    let mut vif = Vif::attach(&front);
    let sent = frame(5000, 4);
    assert!(vif.deliver(&sent, None));
    // Publish only the first of its two slots: rsp_prod one short.
    let rsp_prod = vif.rx.rsp_prod_pvt();
    vif.region
        .store(
            rsp_prod - 1,
            vif.rx_ring_offset + RSP_PROD,
            Ordering::Release,
        )
        .unwrap();
    let mut got = Vec::new();
    assert!(!front.recv(&mut got).unwrap());
    vif.push_rx();
    assert!(front.recv(&mut got).unwrap());
    assert_eq!(got, sent);
}

#[test]
fn bogus_tx_responses_are_counted_not_trusted() {
    let mut front = NetFront::new(config("vif0", 1)).unwrap();
    let mut vif = Vif::attach(&front);
    for seed in 0..4 {
        front.send(&frame(60, seed)).unwrap();
    }
    let ids: Vec<u16> = (0..4).map(|_| vif.take_tx_slots().unwrap()[0].id).collect();
    // A good answer, the same id again, an id never sent, one far out of
    // range: one response per consumed request, but only one is right.
    for (id, status) in [
        (ids[0], NETIF_RSP_OKAY),
        (ids[0], NETIF_RSP_OKAY),
        (ids[3] + 100, NETIF_RSP_OKAY),
        (u16::MAX, NETIF_RSP_ERROR),
    ] {
        vif.tx
            .put_response(&NetifTxResponse { id, status })
            .unwrap();
    }
    vif.push_tx();
    assert!(front.can_send());
    let stats = front.stats();
    assert_eq!(stats.tx_bad_responses, 3, "{stats:?}");
    assert_eq!(stats.tx_errors, 0, "a bad response's status is not trusted");
    assert_eq!(stats.tx_in_flight, 3, "ids 1..4 still wait for theirs");

    // The device keeps working, and an error status is counted.
    front.send(&frame(60, 9)).unwrap();
    let id = vif.take_tx_slots().unwrap()[0].id;
    assert!(!ids[1..].contains(&id), "an id in flight was reused");
    vif.tx
        .put_response(&NetifTxResponse {
            id,
            status: NETIF_RSP_ERROR,
        })
        .unwrap();
    vif.push_tx();
    let mut buf = Vec::new();
    assert!(!front.recv(&mut buf).unwrap());
    let stats = front.stats();
    assert_eq!(
        (stats.tx_errors, stats.tx_in_flight, stats.tx_packets),
        (1, 3, 5)
    );
}

#[test]
fn bogus_rx_responses_are_counted_and_the_buffer_reposted() {
    let mut front = NetFront::new(config("vif0", 1)).unwrap();
    let mut vif = Vif::attach(&front);
    let page_of = |vif: &Vif, gref| vif.grants.map(gref, Access::Write).unwrap();
    // Wrong id for its slot; an error status; data crossing the page; a
    // good frame last.
    let respond = |vif: &mut Vif, f: &dyn Fn(u16) -> NetifRxResponse, data: &[u8]| {
        let (_, req) = vif.rx.take_request().unwrap();
        vif.region.write(page_of(vif, req.gref), data).unwrap();
        vif.rx.put_response(&f(req.id)).unwrap();
    };
    let ok = |id, len: usize| NetifRxResponse {
        id,
        offset: 0,
        flags: 0,
        status: len as i16,
    };
    respond(&mut vif, &|id| ok(id.wrapping_add(1), 60), &frame(60, 1));
    respond(&mut vif, &|id| ok(id ^ 0x8000, 60), &frame(60, 1));
    respond(
        &mut vif,
        &|id| NetifRxResponse {
            status: NETIF_RSP_ERROR,
            ..ok(id, 0)
        },
        &[],
    );
    respond(
        &mut vif,
        &|id| NetifRxResponse {
            offset: 4000,
            ..ok(id, 200)
        },
        &[],
    );
    respond(&mut vif, &|id| ok(id, 64), &frame(64, 7));
    vif.push_rx();
    let mut got = Vec::new();
    assert!(front.recv(&mut got).unwrap());
    assert_eq!(got, frame(64, 7));
    assert!(!front.recv(&mut got).unwrap());
    let stats = front.stats();
    assert_eq!(stats.rx_bad_responses, 2, "{stats:?}");
    assert_eq!(stats.rx_errors, 2, "{stats:?}");
    assert_eq!(stats.rx_packets, 1);
    assert_eq!(stats.rx_posted, RX_BUFFERS, "no buffer lost");
    assert_eq!(vif.rx.unconsumed_requests().unwrap(), RX_BUFFERS);
}

#[test]
fn a_response_producer_past_the_requests_breaks_the_device() {
    let mut front = NetFront::new(config("vif0", 1)).unwrap();
    let vif = Vif::attach(&front);
    front.send(&frame(60, 0)).unwrap();
    // rsp_prod claims 40 responses for 1 request.
    vif.region
        .store(40u32, vif.tx_ring_offset + RSP_PROD, Ordering::Release)
        .unwrap();
    assert!(matches!(front.send(&frame(60, 0)), Err(FrameError::Io(_))));
    let mut buf = Vec::new();
    assert!(front.recv(&mut buf).is_err(), "broken for good");
    assert_eq!(front.stats().tx_bad_responses, 0);
}

#[test]
fn can_send_is_false_on_a_full_tx_ring() {
    for (cfg, per_frame) in [(config("vif0", 1), 1), (jumbo(config("vif1", 1)), 3)] {
        let mut front = NetFront::new(cfg).unwrap();
        let mut vif = Vif::attach(&front);
        let big = frame(front.mtu() + 14, 1);
        let mut sent = 0;
        while front.can_send() {
            front.send(&big).unwrap();
            sent += 1;
            assert!(sent <= TX_BUFFERS, "the ring never filled");
        }
        assert_eq!(sent, TX_BUFFERS / per_frame, "MTU {}", front.mtu());
        front.send(&big).unwrap();
        assert_eq!(front.stats().tx_dropped, 1);
        assert_eq!(front.stats().tx_packets, u64::from(sent));
        // One packet answered: room for exactly one more.
        vif.take_tx(NETIF_RSP_OKAY).unwrap();
        vif.push_tx();
        assert!(front.can_send());
        front.send(&big).unwrap();
        assert!(!front.can_send());
    }
}

#[test]
fn fewer_rx_buffers_are_posted_when_asked() {
    let front = NetFront::new(NetFrontConfig {
        rx_buffers: 16,
        ..config("vif0", 1)
    })
    .unwrap();
    let vif = Vif::attach(&front);
    assert_eq!(vif.rx.unconsumed_requests().unwrap(), 16);
    assert_eq!(front.stats().rx_posted, 16);
}

#[test]
fn notifications_use_the_channels_of_the_wire_order() {
    for split in [false, true] {
        let mut front = NetFront::new(NetFrontConfig {
            split_event_channels: split,
            ..config("vif0", 1)
        })
        .unwrap();
        let req = front.connect_request();
        assert_eq!(req.fd_count(), if split { 5 } else { 3 });
        assert_eq!((req.tx_ring_ref, req.rx_ring_ref), (8, 9));
        assert!(req.no_csum_offload);
        let mut vif = Vif::attach(&front);
        // The initial RX refill kicked the RX channel (req_event starts at 1).
        let rx_kick = vif
            .rx_channel
            .as_ref()
            .map_or(&vif.tx_channel.kick, |c| &c.kick);
        assert!(rx_kick.drain().unwrap() > 0, "split={split}");
        front.send(&frame(60, 1)).unwrap();
        assert!(vif.tx_channel.kick.drain().unwrap() > 0, "split={split}");
        // An RX response wakes the fd the stack waits on.
        assert!(vif.deliver(&frame(60, 2), None));
        vif.push_rx();
        let wait = front.wait_fd().unwrap();
        let mut fds = [PollFd::new(wait, PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::ZERO).unwrap(),
            1,
            "split={split}"
        );
        let mut got = Vec::new();
        assert!(front.recv(&mut got).unwrap());
        assert!(!front.recv(&mut got).unwrap());
        let mut fds = [PollFd::new(front.wait_fd().unwrap(), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::ZERO).unwrap(),
            0,
            "recv drains it"
        );
    }
}

/// A fake supervisor on a temporary socket: answers `probe` with `info`,
/// takes `connect`, maps the vif, answers `connected`, and returns the vif
/// and the `connect` it got. With `refuse`, it answers `probe` with an
/// `error` instead.
struct FakeSupervisor {
    path: PathBuf,
    thread: Option<JoinHandle<Option<(Vif, NetConnectRequest)>>>,
}

impl FakeSupervisor {
    fn spawn(info: NetBackendInfo, refuse: bool) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "sb-netfront-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let listener = SeqPacketListener::bind(&path).expect("bind test control socket");
        let thread = thread::spawn(move || {
            let conn = listener.accept().expect("accept");
            // A frontend that gives up closes the socket: the fake stops.
            let (probe, fds) = conn.recv().ok()?;
            assert!(fds.is_empty());
            assert_eq!(probe.kind(), kind::PROBE);
            assert_eq!(probe.get("device"), Some(info.device.as_str()));
            if refuse {
                conn.send(&Message::error(ErrorCode::Enoent, "no such vif"), &[])
                    .unwrap();
                return None;
            }
            conn.send(&info.to_message(kind::BACKEND, XenbusState::InitWait), &[])
                .unwrap();
            let (msg, fds) = conn.recv().ok()?;
            let req = NetConnectRequest::from_message(&msg).expect("a valid vif connect");
            let fds = NetFds::from_received(&msg, &req, fds).expect("descriptors");
            let vif = Vif::from_connect(&req, fds);
            conn.send(
                &info.to_message(kind::CONNECTED, XenbusState::Connected),
                &[],
            )
            .unwrap();
            let (close, _) = conn.recv().expect("close");
            assert_eq!(close.kind(), kind::CLOSE);
            conn.send(&Message::new(kind::CLOSED), &[]).unwrap();
            Some((vif, req))
        });
        FakeSupervisor {
            path,
            thread: Some(thread),
        }
    }

    fn join(mut self) -> Option<(Vif, NetConnectRequest)> {
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("fake supervisor panicked")
    }
}

impl Drop for FakeSupervisor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn backend_info(sg: bool) -> NetBackendInfo {
    NetBackendInfo {
        device: "vif0".into(),
        backend_id: BACKEND_ID,
        mac: MacAddr([2, 0x5b, 0, 0, 0, 0x42]),
        mtu: 9000,
        features: NetFeatures {
            sg,
            ..NetFeatures::ALL
        },
    }
}

#[test]
fn attach_through_the_supervisor_protocol() {
    let sup = FakeSupervisor::spawn(backend_info(true), false);
    // The configuration's link keys are the backend's to choose.
    let cfg = NetFrontConfig {
        backend_id: 99,
        split_event_channels: true,
        ..NetFrontConfig::new("vif0")
    };
    let mut front = NetFront::attach(&sup.path, &cfg).expect("attach");
    assert_eq!(front.mac(), [2, 0x5b, 0, 0, 0, 0x42]);
    assert_eq!(front.mtu(), 9000);
    assert_eq!(front.config().backend_id, BACKEND_ID);
    assert!(front.config().sg);
    let sent = frame(9014, 6);
    front.send(&sent).unwrap();
    front.detach().expect("detach");
    let (mut vif, req) = sup.join().expect("connected");
    assert!(req.split_event_channels && req.features.sg);
    assert!(!req.features.gso_tcpv4, "only what the frontend implements");
    assert_eq!(req.frontend_id, 1);
    // The backend reached the frame through grants made for its domain.
    assert_eq!(vif.take_tx(NETIF_RSP_OKAY), Some(sent));
}

#[test]
fn attach_without_backend_sg_refuses_a_jumbo_mtu() {
    let sup = FakeSupervisor::spawn(backend_info(false), false);
    let err = NetFront::attach(&sup.path, &NetFrontConfig::new("vif0")).unwrap_err();
    assert!(matches!(err, NetFrontError::Config(_)), "{err}");
}

#[test]
fn attach_reports_a_refusal() {
    let sup = FakeSupervisor::spawn(backend_info(true), true);
    let err = NetFront::attach(&sup.path, &NetFrontConfig::new("vif0")).unwrap_err();
    match err {
        NetFrontError::Refused { code, .. } => assert_eq!(code, "ENOENT"),
        other => panic!("{other}"),
    }
    assert!(sup.join().is_none());
}
