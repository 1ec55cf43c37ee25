//! No double fetch (docs/ARCHITECTURE.md §2, "Every guest field is read
//! once"): while the backend consumes requests, a guest thread rewrites
//! them in shared memory in a tight loop, and every request the backend
//! accepts must be the request as written, validated as a whole.
//!
//! How that is observable: each rewritten field flips between its valid
//! value and a hostile one chosen so that any mix of the two (a copy may
//! see some bytes of each) is refused by validation. A backend that reads
//! each field once, into private memory, therefore either refuses the
//! request or accepts exactly the valid one. A backend that validates one
//! read and uses another accepts a request carrying the hostile value,
//! which differs from the valid one: the test fails.
//!
//! Covered: blkif requests, indirect segment pages and grant entries; netif
//! TX slots and RX requests; virtqueue avail entries, descriptors, indirect
//! tables and the virtio-blk header. Each test also checks that the
//! rewriting really raced the reads (some requests refused, some accepted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use shadowback_blkback::request::{parse as parse_blkif, DiskGeometry};
use shadowback_blkback::virtio::request::{parse as parse_virtio, BlkConfig, Parsed, CHAIN_CAP};
use shadowback_netback::netif::{parse_tx, TxRequest};
use shadowback_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestIndirect, BlkifResponse, BLKIF_OP_INDIRECT, BLKIF_OP_READ,
};
use shadowback_ring::grant::{Access, GrantMapper, GrantTable, GTF_PERMIT_ACCESS};
use shadowback_ring::netif::{
    NetifRx, NetifRxRequest, NetifRxResponse, NetifTx, NetifTxRequest, NetifTxResponse,
};
use shadowback_ring::sring::{BackRing, FrontRing, RingPages, RingProtocol};
use shadowback_ring::{SharedRegion, PAGE_SIZE};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::{Chain, SplitQueue};
use shadowback_xenbus::virtio::QueueConfig;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Requests checked at least, for at least [`MIN_RACE`], and for as long
/// as one outcome (accepted, refused) has not been seen yet, up to
/// [`MAX_RACE`]. The time matters on a busy machine: the race needs both
/// threads on a CPU at once.
const MIN_REQUESTS: u64 = 20_000;
const MIN_RACE: Duration = Duration::from_secs(2);
const MAX_RACE: Duration = Duration::from_secs(60);
const PAGE: u64 = PAGE_SIZE as u64;
const BACKEND: u16 = 0;

/// Writes a field's valid (`false`) or hostile (`true`) value.
type Flip = Box<dyn Fn(bool) + Send>;

/// A guest thread rewriting fields while the backend reads them: each
/// `(write valid, write hostile)` pair in turn, forever, until dropped.
struct Rewriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Rewriter {
    fn start(flips: Vec<Flip>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let cpus = two_cpus();
        if let Some((mine, _)) = cpus {
            pin(mine);
        }
        let thread = std::thread::spawn(move || {
            if let Some((_, theirs)) = cpus {
                pin(theirs);
            }
            let mut rounds = 0u64;
            // Relaxed: a stop request, nothing is published with it.
            while !flag.load(Ordering::Relaxed) {
                for hostile in [true, false] {
                    for f in &flips {
                        f(hostile);
                    }
                }
                rounds += 1;
            }
            rounds
        });
        Rewriter {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

impl Drop for Rewriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Two CPUs this thread may run on, if it has two.
fn two_cpus() -> Option<(usize, usize)> {
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let mut cpus = (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false));
    Some((cpus.next()?, cpus.next()?))
}

/// Keeps the calling thread on `cpu`: the backend and the rewriting guest
/// run on different CPUs, so that reads and rewrites really overlap.
fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Counts outcomes and says when the race has been run long enough.
#[derive(Default)]
struct Outcomes {
    accepted: u64,
    refused: u64,
}

impl Outcomes {
    fn more(&self, since: Instant) -> bool {
        let seen_both = self.accepted > 0 && self.refused > 0;
        let total = self.accepted + self.refused;
        let elapsed = since.elapsed();
        (total < MIN_REQUESTS || elapsed < MIN_RACE || !seen_both) && elapsed < MAX_RACE
    }

    fn check_raced(&self, what: &str, rewrites: u64) {
        eprintln!(
            "{what}: {} accepted, {} refused, {rewrites} rewrite rounds",
            self.accepted, self.refused
        );
        assert!(
            self.accepted > 0 && self.refused > 0,
            "{what}: the rewriting never raced the reads ({} accepted, {} refused)",
            self.accepted,
            self.refused
        );
    }
}

/// Writes `valid` or `hostile` at `offset` of the region.
fn flip_bytes(
    region: &Arc<SharedRegion>,
    offset: u64,
    valid: &[u8],
    hostile: &[u8],
) -> Box<dyn Fn(bool) + Send> {
    let (region, valid, hostile) = (region.clone(), valid.to_vec(), hostile.to_vec());
    Box::new(move |h| {
        region
            .write(offset, if h { &hostile } else { &valid })
            .unwrap()
    })
}

/// A front and back ring of `P` on one page at `frame`.
fn rings<P: RingProtocol>(region: &Arc<SharedRegion>, frame: u32) -> (FrontRing<P>, BackRing<P>) {
    let pages = || RingPages::contiguous(region.clone(), frame, 1).unwrap();
    let front = FrontRing::init(pages()).unwrap();
    let back = BackRing::attach(pages()).unwrap();
    (front, back)
}

/// Region of 64 pages: grant table in frame 0, grants 1..=8 → frames
/// 8+g read-write, grant 60 → frame 2 (indirect page) read-only.
fn blkif_setup() -> (Arc<SharedRegion>, GrantMapper) {
    let region = Arc::new(SharedRegion::create("double-fetch", 64).unwrap());
    let table = GrantTable::new(region.clone(), 1).unwrap();
    for g in 1..=8 {
        table.grant(g, BACKEND, 8 + g, false).unwrap();
    }
    table.grant(60, BACKEND, 2, true).unwrap();
    let grants = GrantMapper::new(region.clone(), 1, BACKEND).unwrap();
    (region, grants)
}

/// 64 sectors: a hostile byte (0x40) anywhere in a sector number is beyond it.
const DISK: DiskGeometry = DiskGeometry {
    sectors: 64,
    readonly: false,
    discard: false,
    max_indirect_segments: 256,
};

/// Offset of field `field` of slot `slot` of a one-page ring at `frame`.
fn slot_field<P: RingProtocol>(frame: u32, slot: u32, field: u64) -> u64 {
    u64::from(frame) * PAGE + 64 + u64::from(slot) * P::ENTRY_SIZE as u64 + field
}

/// A blkif ring on frame 1 of a [`blkif_setup`] region.
struct BlkifRig {
    region: Arc<SharedRegion>,
    grants: GrantMapper,
    front: FrontRing<Blkif>,
    back: BackRing<Blkif>,
}

impl BlkifRig {
    fn new() -> Self {
        let (region, grants) = blkif_setup();
        let (front, back) = rings::<Blkif>(&region, 1);
        BlkifRig {
            region,
            grants,
            front,
            back,
        }
    }

    /// Publishes `request` in every free slot, takes and parses every
    /// published request, while `flips` rewrite them; every accepted one
    /// must parse to `expected`.
    fn consume(mut self, request: &BlkifRequest, what: &str, flips: Vec<Flip>) {
        let expected = parse_blkif(request, &DISK, &self.grants).unwrap();
        let rewriter = Rewriter::start(flips);
        let mut seen = Outcomes::default();
        let start = Instant::now();
        while seen.more(start) {
            while self.front.free_requests() > 0 {
                self.front.put_request(request).unwrap();
            }
            self.front.push_requests().unwrap();
            for _ in 0..self.back.unconsumed_requests().unwrap() {
                let (_, req) = self.back.take_request().unwrap();
                match parse_blkif(&req, &DISK, &self.grants) {
                    Ok(op) => {
                        assert_eq!(op, expected, "{what}: accepted a request never written");
                        seen.accepted += 1;
                    }
                    Err(_) => seen.refused += 1,
                }
                self.back.put_response(&BlkifResponse::default()).unwrap();
            }
            self.back.push_responses().unwrap();
            while self.front.take_response().unwrap().is_some() {}
        }
        seen.check_raced(what, rewriter.stop());
    }
}

#[test]
fn blkif_request_rewritten_in_the_ring() {
    let rig = BlkifRig::new();
    let region = &rig.region;
    let mut req = BlkifRequest {
        operation: BLKIF_OP_READ,
        nr_segments: 1,
        id: 7,
        sector_number: 8,
        ..Default::default()
    };
    req.seg[0].gref = 1;
    req.seg[0].last_sect = 7;
    let mut flips = Vec::new();
    for slot in 0..rig.back.size() {
        let at = |field| slot_field::<Blkif>(1, slot, field);
        // nr_segments: 1 or 0x40 (more than 11).
        flips.push(flip_bytes(region, at(1), &[1], &[0x40]));
        // sector_number: 8 or 0x4040…40 (beyond the disk, whatever mix).
        flips.push(flip_bytes(region, at(16), &8u64.to_ne_bytes(), &[0x40; 8]));
        // seg[0].gref: 1 or 0x40404040 (not granted, whatever mix).
        flips.push(flip_bytes(region, at(24), &1u32.to_ne_bytes(), &[0x40; 4]));
        // seg[0].last_sect: 7 or 0x40 (beyond the page).
        flips.push(flip_bytes(region, at(29), &[7], &[0x40]));
    }
    rig.consume(&req, "blkif ring", flips);
}

#[test]
fn blkif_indirect_segments_and_grants_rewritten() {
    let rig = BlkifRig::new();
    let region = &rig.region;
    let mut ind = BlkifRequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: BLKIF_OP_READ,
        nr_segments: 2,
        id: 9,
        sector_number: 0,
        ..Default::default()
    };
    ind.indirect_grefs[0] = 60;
    let req = BlkifRequest::from_indirect(&ind);
    // The indirect page: segments {gref 1, 0..7}, {gref 2, 0..7}.
    let page = 2 * PAGE;
    for (i, gref) in [1u32, 2].into_iter().enumerate() {
        let mut seg = [0u8; 8];
        seg[..4].copy_from_slice(&gref.to_ne_bytes());
        seg[5] = 7;
        region.write(page + 8 * i as u64, &seg).unwrap();
    }
    let expected = parse_blkif(&req, &DISK, &rig.grants).unwrap();
    assert_eq!(expected.data_bytes(), 2 * PAGE);
    // Grant 2's entry: frame 10, or frame 0x40404040 (outside the region).
    let mut valid_entry = [0u8; 8];
    valid_entry[..2].copy_from_slice(&GTF_PERMIT_ACCESS.to_ne_bytes());
    valid_entry[4..].copy_from_slice(&10u32.to_ne_bytes());
    let mut hostile_entry = valid_entry;
    hostile_entry[4..].copy_from_slice(&[0x40; 4]);
    let flips = vec![
        // Segment 0: first_sect 0 or 0x40 (after last_sect), last_sect 7 or
        // 0x40 (beyond the page); segment 1: gref 2 or 0x40404040.
        flip_bytes(region, page + 4, &[0], &[0x40]),
        flip_bytes(region, page + 5, &[7], &[0x40]),
        flip_bytes(region, page + 8, &2u32.to_ne_bytes(), &[0x40; 4]),
        flip_bytes(region, 2 * 8, &valid_entry, &hostile_entry),
    ];
    rig.consume(&req, "blkif indirect page and grant entry", flips);
}

#[test]
fn netif_tx_slots_and_rx_requests_rewritten() {
    let (region, grants) = blkif_setup();
    let (mut tx_front, mut tx_back) = rings::<NetifTx>(&region, 3);
    let (mut rx_front, mut rx_back) = rings::<NetifRx>(&region, 4);
    let slot = NetifTxRequest {
        gref: 1,
        offset: 0,
        flags: 0,
        id: 5,
        size: 100,
    };
    let expected = match parse_tx(&mut std::iter::once(slot)) {
        Some(Ok(TxRequest::Packet(p))) => p,
        other => panic!("the valid slot is refused: {other:?}"),
    };
    let posted = NetifRxRequest {
        id: 6,
        pad: 0,
        gref: 3,
    };
    let rx_page = grants.map(3, Access::Write).unwrap();
    let mut flips = Vec::new();
    for i in 0..tx_back.size() {
        let at = |field| slot_field::<NetifTx>(3, i, field);
        // offset: 0 or 0x1000 (the data would cross its page).
        flips.push(flip_bytes(
            &region,
            at(4),
            &0u16.to_ne_bytes(),
            &0x1000u16.to_ne_bytes(),
        ));
        // size: 100 or 0x2000; a mix is 0 (a runt) or 0x2064 (crosses).
        flips.push(flip_bytes(
            &region,
            at(10),
            &100u16.to_ne_bytes(),
            &0x2000u16.to_ne_bytes(),
        ));
    }
    for i in 0..rx_back.size() {
        // gref: 3 or 0x40404040 (not in the grant table).
        let at = slot_field::<NetifRx>(4, i, 4);
        flips.push(flip_bytes(&region, at, &3u32.to_ne_bytes(), &[0x40; 4]));
    }
    let rewriter = Rewriter::start(flips);
    let (mut tx, mut rx) = (Outcomes::default(), Outcomes::default());
    let start = Instant::now();
    while tx.more(start) || rx.more(start) {
        while tx_front.free_requests() > 0 {
            tx_front.put_request(&slot).unwrap();
        }
        tx_front.push_requests().unwrap();
        let mut taken = (0..tx_back.unconsumed_requests().unwrap())
            .map(|_| tx_back.take_request().unwrap().1)
            .collect::<Vec<_>>()
            .into_iter();
        // Each slot is a packet of its own (no more_data, no extras).
        while let Some(parsed) = parse_tx(&mut taken) {
            match parsed {
                Ok(TxRequest::Packet(p)) => {
                    assert_eq!(p, expected, "netif TX: accepted a packet never written");
                    tx.accepted += 1;
                }
                Ok(other) => panic!("netif TX: {other:?} was never written"),
                Err(_) => tx.refused += 1,
            }
            tx_back.put_response(&NetifTxResponse::default()).unwrap();
        }
        tx_back.push_responses().unwrap();
        while tx_front.take_response().unwrap().is_some() {}

        while rx_front.free_requests() > 0 {
            rx_front.put_request(&posted).unwrap();
        }
        rx_front.push_requests().unwrap();
        for _ in 0..rx_back.unconsumed_requests().unwrap() {
            let (_, req) = rx_back.take_request().unwrap();
            // What the RX path does with a posted buffer: map its grant
            // for writing, then copy the frame there.
            match grants.map(req.gref, Access::Write) {
                Ok(page) => {
                    assert_eq!((req.id, page), (6, rx_page), "netif RX: wrong buffer");
                    rx.accepted += 1;
                }
                Err(_) => rx.refused += 1,
            }
            rx_back.put_response(&NetifRxResponse::default()).unwrap();
        }
        rx_back.push_responses().unwrap();
        while rx_front.take_response().unwrap().is_some() {}
    }
    let rounds = rewriter.stop();
    tx.check_raced("netif TX", rounds);
    rx.check_raced("netif RX", rounds);
}

#[test]
fn virtqueue_descriptors_and_header_rewritten() {
    const SIZE: u16 = 16;
    const AVAIL: u64 = 0x1000;
    const HDR: u64 = 0x3000;
    const TABLE: u64 = 0x6000;
    let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    // The rewriter's view of the same mapping.
    let guest = mmap.clone();
    let mem = GuestRam::from_memory(mmap);
    let cfg = QueueConfig {
        index: 0,
        size: SIZE,
        desc: 0,
        avail: AVAIL,
        used: 0x2000,
        next_avail: 0,
    };
    let queue = SplitQueue::new(&cfg, &mem, true).unwrap();
    let put = |table: u64, i: u64, addr: u64, len: u32, flags: u32, next: u16| {
        let d = Descriptor::new(addr, len, flags as u16, next);
        mem.memory()
            .write_obj(d, GuestAddress(table + 16 * i))
            .unwrap();
    };
    let (next, write, indirect) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT);
    // Head 0: header, a 4 KiB read buffer, the status byte.
    put(0, 0, HDR, 16, next, 1);
    put(0, 1, 0x4000, 0x1000, next | write, 2);
    put(0, 2, 0x5000, 1, write, 0);
    // Head 3: the same request through an indirect table.
    put(0, 3, TABLE, 48, indirect, 0);
    put(TABLE, 0, HDR, 16, next, 1);
    put(TABLE, 1, 0x7000, 0x1000, next | write, 2);
    put(TABLE, 2, 0x8000, 1, write, 0);
    // VIRTIO_BLK_T_IN of sector 0; the disk holds 8 sectors (4 KiB).
    mem.write(HDR, &[0u8; 16]).unwrap();
    for (slot, head) in [(0u64, 0u16), (1, 3)] {
        mem.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
    }
    let blk = BlkConfig {
        sectors: 8,
        readonly: false,
        discard: false,
        write_zeroes: false,
        serial: BlkConfig::serial_for("vd"),
    };
    let mut chain = Chain::default();
    let (mut data, mut ranges) = (Vec::new(), Vec::new());
    let mut walk_and_parse = |head: u16, data: &mut Vec<(u64, usize)>| -> Parsed {
        let walked = queue.walk(&mem, head, CHAIN_CAP, &mut chain);
        parse_virtio(
            &mem,
            walked.as_ref().map(|()| &chain).map_err(|e| *e),
            &blk,
            data,
            &mut ranges,
        )
    };
    let expected: Vec<(Parsed, Vec<(u64, usize)>)> = [0u16, 3]
        .into_iter()
        .map(|head| {
            let parsed = walk_and_parse(head, &mut data);
            assert!(matches!(
                parsed.action,
                shadowback_blkback::virtio::request::Action::Read { .. }
            ));
            (parsed, data.clone())
        })
        .collect();

    let flip = |addr: u64, valid: Vec<u8>, hostile: Vec<u8>| -> Flip {
        let guest = guest.clone();
        Box::new(move |h| {
            guest
                .write_slice(if h { &hostile } else { &valid }, GuestAddress(addr))
                .unwrap()
        })
    };
    let hostile_addr = 0x4040_4040_4040_4000u64.to_le_bytes();
    let flips = vec![
        // avail->ring[0]: head 0 or 0x4040 (beyond the queue).
        flip(AVAIL + 4, 0u16.to_le_bytes().to_vec(), vec![0x40; 2]),
        // Descriptor 1: addr 0x4000 or unmapped, len 4 KiB or too long /
        // not whole sectors.
        flip(16, 0x4000u64.to_le_bytes().to_vec(), hostile_addr.to_vec()),
        flip(16 + 8, 0x1000u32.to_le_bytes().to_vec(), vec![0x40; 4]),
        // Descriptor 0's flags: NEXT or NEXT|INDIRECT (refused).
        flip(12, vec![1, 0], vec![5, 0]),
        // Descriptor 3: an indirect table of 48 bytes or of 0x40404040.
        flip(3 * 16 + 8, 48u32.to_le_bytes().to_vec(), vec![0x40; 4]),
        // The indirect table's data descriptor, like descriptor 1.
        flip(TABLE + 16, 0x7000u64.to_le_bytes().to_vec(), {
            let mut a = hostile_addr;
            a[1] = 0x70;
            a.to_vec()
        }),
        flip(
            TABLE + 16 + 8,
            0x1000u32.to_le_bytes().to_vec(),
            vec![0x40; 4],
        ),
        // The header: type IN or unknown, sector 0 or beyond the disk.
        flip(HDR, vec![0; 4], vec![0x40; 4]),
        flip(HDR + 8, vec![0; 8], vec![0x40; 8]),
    ];
    let rewriter = Rewriter::start(flips);
    let mut seen = Outcomes::default();
    let start = Instant::now();
    while seen.more(start) {
        for (idx, (want, want_data)) in expected.iter().enumerate() {
            // As the data plane: the head from the avail ring, range-checked.
            let head = queue.avail_head(&mem, idx as u16).unwrap();
            if head >= SIZE {
                seen.refused += 1;
                continue;
            }
            let parsed = walk_and_parse(head, &mut data);
            if matches!(
                parsed.action,
                shadowback_blkback::virtio::request::Action::Done(_)
            ) {
                seen.refused += 1;
                continue;
            }
            assert_eq!(
                (&parsed, &data),
                (want, want_data),
                "virtqueue: accepted a request never written"
            );
            seen.accepted += 1;
        }
    }
    seen.check_raced("virtqueue", rewriter.stop());
}
