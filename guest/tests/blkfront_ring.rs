//! BlkFront against an in-test backend that plays the supervisor's side of
//! the control socket and serves the blkif ring from a `Vec<u8>` disk.
//!
//! The backend maps the guest's region from the fd it receives and reaches
//! every page through the grant table ([`GrantMapper`]), like blkback does,
//! so a frontend that grants the wrong frame or domain fails here.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, DeviceError, Status};
use shadowback_guest::workload::{VerifyConfig, VerifyWorkload};
use shadowback_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestSegment, BlkifResponse, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
};
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::sring::{BackRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion};
use shadowback_testsupport::TempDir;
use shadowback_xenbus::{
    kind, BackendInfo, ConnectRequest, DeviceFds, DiskMode, ErrorCode, Message, SeqPacket,
    SeqPacketListener, XenbusError,
};

/// 4 MiB in-memory disk.
const DISK_SECTORS: u64 = 8192;
const SECTOR: usize = 512;
const BACKEND_ID: u16 = 0;
const DEVICE: &str = "xvda";
const WAIT: Duration = Duration::from_secs(10);

/// What the test backend offers and how it misbehaves.
#[derive(Clone, Copy, Debug)]
struct BackendOpts {
    max_ring_page_order: u8,
    max_indirect_segments: u32,
    /// Answer every batch of requests in reverse order.
    reverse: bool,
}

impl Default for BackendOpts {
    fn default() -> Self {
        BackendOpts {
            max_ring_page_order: 4,
            max_indirect_segments: 256,
            reverse: true,
        }
    }
}

/// What the backend saw, returned when it exits.
#[derive(Debug, Default)]
struct BackendReport {
    requests: u64,
    indirect: u64,
    ring_pages: usize,
    grant_frames: u32,
    closed_cleanly: bool,
}

fn info(opts: &BackendOpts) -> BackendInfo {
    BackendInfo {
        backend_id: BACKEND_ID,
        sectors: DISK_SECTORS,
        sector_size: 512,
        physical_sector_size: 4096,
        mode: DiskMode::ReadWrite,
        feature_flush_cache: true,
        feature_discard: true,
        discard_granularity: 4096,
        discard_alignment: 0,
        max_indirect_segments: opts.max_indirect_segments,
        max_ring_page_order: opts.max_ring_page_order,
        info: 0,
    }
}

/// A listening "supervisor" for one frontend connection.
struct TestBackend {
    path: PathBuf,
    thread: Option<JoinHandle<BackendReport>>,
    _dir: TempDir,
}

impl TestBackend {
    fn spawn(opts: BackendOpts) -> Self {
        let dir = TempDir::new("blkfront");
        let path = dir.join("control.sock");
        let listener = SeqPacketListener::bind(&path).expect("bind test control socket");
        let thread = std::thread::spawn(move || {
            let conn = listener.accept().expect("accept");
            serve_connection(&conn, opts)
        });
        TestBackend {
            path,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn attach(&self, cfg: &BlkFrontConfig) -> Result<BlkFront, DeviceError> {
        BlkFront::attach(&self.path, cfg)
    }

    /// Waits for the backend to see the frontend go away.
    fn join(mut self) -> BackendReport {
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("test backend panicked")
    }
}

/// Control-socket side: probe, connect, then the ring until close/EOF.
fn serve_connection(conn: &SeqPacket, opts: BackendOpts) -> BackendReport {
    let info = info(&opts);
    let (probe, _) = conn.recv().expect("probe");
    assert_eq!(probe.kind(), kind::PROBE);
    if probe.get("device") != Some(DEVICE) {
        conn.send(&Message::error(ErrorCode::Enoent, "no such device"), &[])
            .unwrap();
        return BackendReport::default();
    }
    conn.send(&info.backend_message(), &[]).unwrap();
    // A frontend that refuses the backend's keys just hangs up.
    let Ok((msg, fds)) = conn.recv() else {
        return BackendReport::default();
    };
    let connect = ConnectRequest::from_message(&msg).expect("valid connect");
    let fds = DeviceFds::from_received(&msg, fds).expect("three fds");
    assert_eq!(connect.device, DEVICE);
    assert!(connect.feature_persistent);

    let region = Arc::new(SharedRegion::from_fd(fds.region).expect("map region"));
    let mapper = GrantMapper::new(region.clone(), connect.grant_frames, BACKEND_ID).unwrap();
    let ring_offsets = connect
        .ring_refs
        .iter()
        .map(|&gref| mapper.map(gref, Access::Write).expect("ring grant"))
        .collect();
    let ring = BackRing::<Blkif>::attach(RingPages::new(region, ring_offsets).unwrap()).unwrap();
    let kick = EventChannel::from_fd(fds.kick).unwrap();
    let notify = EventChannel::from_fd(fds.notify).unwrap();
    conn.send(&info.connected_message(), &[]).unwrap();

    let mut server = RingServer {
        mapper,
        ring,
        disk: vec![0; DISK_SECTORS as usize * SECTOR],
        opts,
        report: BackendReport {
            ring_pages: connect.ring_refs.len(),
            grant_frames: connect.grant_frames,
            ..Default::default()
        },
    };
    loop {
        match conn.recv_timeout(Duration::ZERO) {
            Ok(None) => {}
            Ok(Some((msg, _))) if msg.kind() == kind::CLOSE => {
                conn.send(&Message::new(kind::CLOSED).with("state", 6), &[])
                    .unwrap();
                server.report.closed_cleanly = true;
                return server.report;
            }
            Ok(Some((msg, _))) => panic!("unexpected control message {msg}"),
            Err(XenbusError::Closed) => return server.report,
            Err(e) => panic!("control socket: {e}"),
        }
        if server.serve_batch(&notify) {
            continue;
        }
        kick.wait(Duration::from_millis(20)).unwrap();
    }
}

struct RingServer {
    mapper: GrantMapper,
    ring: BackRing<Blkif>,
    disk: Vec<u8>,
    opts: BackendOpts,
    report: BackendReport,
}

impl RingServer {
    /// Serves every published request; false when there was none and the
    /// backend may sleep (`RING_FINAL_CHECK_FOR_REQUESTS` done).
    fn serve_batch(&mut self, notify: &EventChannel) -> bool {
        let mut batch = Vec::new();
        while self.ring.unconsumed_requests().unwrap() > 0 {
            batch.push(self.ring.take_request().unwrap().1);
        }
        if batch.is_empty() {
            return self.ring.final_check_for_requests().unwrap();
        }
        if self.opts.reverse {
            batch.reverse();
        }
        for req in batch {
            self.report.requests += 1;
            let rsp = self.execute(&req);
            self.ring.put_response(&rsp).unwrap();
        }
        if self.ring.push_responses().unwrap() {
            notify.notify().unwrap();
        }
        true
    }

    fn execute(&mut self, req: &BlkifRequest) -> BlkifResponse {
        let (operation, status) = match req.operation {
            BLKIF_OP_READ | BLKIF_OP_WRITE => {
                let segs = req.seg
                    [..usize::from(req.nr_segments).min(BLKIF_MAX_SEGMENTS_PER_REQUEST)]
                    .to_vec();
                let ok = req.nr_segments >= 1
                    && usize::from(req.nr_segments) <= BLKIF_MAX_SEGMENTS_PER_REQUEST;
                (
                    req.operation,
                    self.rw(ok, req.operation, req.sector_number, &segs),
                )
            }
            BLKIF_OP_INDIRECT => {
                self.report.indirect += 1;
                let ind = req.as_indirect();
                // Linux blkback answers with the indirect_op.
                match self.indirect_segments(req) {
                    Some(segs) => (
                        ind.indirect_op,
                        self.rw(true, ind.indirect_op, ind.sector_number, &segs),
                    ),
                    None => (ind.indirect_op, BLKIF_RSP_ERROR),
                }
            }
            BLKIF_OP_FLUSH_DISKCACHE => (req.operation, BLKIF_RSP_OKAY),
            BLKIF_OP_DISCARD => {
                let d = req.as_discard();
                let range = d
                    .sector_number
                    .checked_add(d.nr_sectors)
                    .filter(|&end| end <= DISK_SECTORS)
                    .map(|end| d.sector_number as usize * SECTOR..end as usize * SECTOR);
                match range {
                    Some(r) => {
                        self.disk[r].fill(0);
                        (req.operation, BLKIF_RSP_OKAY)
                    }
                    None => (req.operation, BLKIF_RSP_ERROR),
                }
            }
            other => (other, BLKIF_RSP_EOPNOTSUPP),
        };
        BlkifResponse {
            id: req.id,
            operation,
            status,
            ..Default::default()
        }
    }

    fn indirect_segments(&self, req: &BlkifRequest) -> Option<Vec<BlkifRequestSegment>> {
        let ind = req.as_indirect();
        let n = usize::from(ind.nr_segments);
        if n == 0 || n > self.opts.max_indirect_segments as usize {
            return None;
        }
        let pages = n.div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME);
        if pages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST {
            return None;
        }
        let mut segs = Vec::with_capacity(n);
        for i in 0..n {
            let page = self
                .mapper
                .map(
                    ind.indirect_grefs[i / BLKIF_SEGS_PER_INDIRECT_FRAME],
                    Access::Read,
                )
                .ok()?;
            let off = page + (i % BLKIF_SEGS_PER_INDIRECT_FRAME) as u64 * 8;
            segs.push(self.mapper.region().read_obj(off).ok()?);
        }
        Some(segs)
    }

    /// Executes a read or write segment by segment, through the grants.
    fn rw(&mut self, ok: bool, op: u8, sector: u64, segs: &[BlkifRequestSegment]) -> i16 {
        if !ok || (op != BLKIF_OP_READ && op != BLKIF_OP_WRITE) {
            return BLKIF_RSP_ERROR;
        }
        let access = if op == BLKIF_OP_READ {
            Access::Write
        } else {
            Access::Read
        };
        let mut disk_off = sector as usize * SECTOR;
        for seg in segs {
            if seg.first_sect > seg.last_sect || seg.last_sect >= 8 {
                return BLKIF_RSP_ERROR;
            }
            let Ok(page) = self.mapper.map(seg.gref, access) else {
                return BLKIF_RSP_ERROR;
            };
            let start = page + u64::from(seg.first_sect) * SECTOR as u64;
            let len = usize::from(seg.last_sect - seg.first_sect + 1) * SECTOR;
            let Some(range) = Some(disk_off..disk_off + len).filter(|r| r.end <= self.disk.len())
            else {
                return BLKIF_RSP_ERROR;
            };
            let region = self.mapper.region();
            let done = if op == BLKIF_OP_READ {
                region.write(start, &self.disk[range])
            } else {
                region.read(start, &mut self.disk[range])
            };
            if done.is_err() {
                return BLKIF_RSP_ERROR;
            }
            disk_off += len;
        }
        BLKIF_RSP_OKAY
    }
}

// ---- frontend helpers ----

fn config(order: Option<u32>) -> BlkFrontConfig {
    BlkFrontConfig {
        ring_page_order: order,
        ..BlkFrontConfig::new(DEVICE)
    }
}

/// Collects completions until every tag in `tags` has one.
fn wait_for(front: &mut BlkFront, tags: &[u64]) -> Vec<Completion> {
    let deadline = Instant::now() + WAIT;
    let mut done = Vec::new();
    while tags
        .iter()
        .any(|t| !done.iter().any(|c: &Completion| c.tag == *t))
    {
        assert!(Instant::now() < deadline, "timed out waiting for {tags:?}");
        front
            .poll_completions(Duration::from_millis(100), &mut done)
            .unwrap();
    }
    done
}

fn run_one(front: &mut BlkFront, tag: u64, req: &BlockRequest<'_>) -> Completion {
    front.submit(tag, req).unwrap();
    front.kick().unwrap();
    let mut done = wait_for(front, &[tag]);
    assert_eq!(done.len(), 1);
    done.remove(0)
}

fn write(front: &mut BlkFront, tag: u64, sector: u64, data: &[u8]) {
    let c = run_one(front, tag, &BlockRequest::write(sector, data));
    assert_eq!(
        c.status,
        Status::Ok,
        "write of {} bytes at {sector}",
        data.len()
    );
}

fn read(front: &mut BlkFront, tag: u64, sector: u64, sectors: u32) -> Vec<u8> {
    let c = run_one(front, tag, &BlockRequest::read(sector, sectors, true));
    assert_eq!(c.status, Status::Ok);
    c.data.expect("read data")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7919)) as u8
                ^ (i >> 9) as u8
        })
        .collect()
}

/// A read of one sector into slot 0's first data page, with a chosen id.
fn raw_read(front: &BlkFront, id: u64) -> BlkifRequest {
    let mut req = BlkifRequest {
        operation: BLKIF_OP_READ,
        nr_segments: 1,
        id,
        sector_number: 0,
        ..Default::default()
    };
    req.seg[0] = BlkifRequestSegment {
        gref: front.data_gref(0, 0).unwrap(),
        first_sect: 0,
        last_sect: 0,
        _pad: [0; 2],
    };
    req
}

// ---- tests ----

#[test]
fn write_read_round_trips_direct_and_indirect() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(None)).unwrap();
    assert_eq!(front.ring_page_order(), 4);
    assert_eq!(front.ring_size(), 512);
    assert!(front.uses_indirect());
    assert_eq!(front.max_request_sectors(), 256);
    assert_eq!(front.capacity_sectors(), DISK_SECTORS);
    assert_eq!(front.backend_keys().kind(), kind::CONNECTED);

    let mut tag = 0;
    let mut sector = 0;
    // 4 KiB … 128 KiB: 1..=11 pages direct, 12..=32 indirect; plus partial
    // last pages (odd sector counts).
    let sizes: Vec<u32> = (1..=32u32)
        .map(|pages| pages * 8)
        .chain([1, 3, 17, 95, 255])
        .collect();
    for sectors in sizes {
        let data = pattern(sectors as usize * SECTOR, u64::from(sectors));
        write(&mut front, tag, sector, &data);
        let back = read(&mut front, tag + 1, sector, sectors);
        assert!(
            back == data,
            "{sectors} sectors at {sector} read back differently"
        );
        tag += 2;
        sector += u64::from(sectors);
    }
    let stats = front.stats();
    assert_eq!(stats.submitted, tag);
    // 21 sizes of 12..=32 pages plus 95 and 255 sectors, written and read.
    assert_eq!(stats.indirect, 2 * 23);
    drop(front);
    let report = backend.join();
    assert_eq!(report.indirect, 2 * 23);
    assert_eq!(report.ring_pages, 16);
}

#[test]
fn without_indirect_requests_are_capped_at_11_segments() {
    let backend = TestBackend::spawn(BackendOpts {
        max_indirect_segments: 0,
        ..Default::default()
    });
    let mut front = backend.attach(&config(None)).unwrap();
    assert!(!front.uses_indirect());
    assert_eq!(front.max_request_sectors(), 88);
    let data = pattern(88 * SECTOR, 5);
    write(&mut front, 1, 100, &data);
    assert!(read(&mut front, 2, 100, 88) == data);
    assert!(matches!(
        front.submit(3, &BlockRequest::read(0, 96, true)),
        Err(DeviceError::InvalidRequest(_))
    ));
    assert_eq!(front.stats().indirect, 0);
}

#[test]
fn out_of_range_response_id_is_an_error() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(Some(0))).unwrap();
    // The backend echoes the id it was given; 9999 is no slot of ours.
    front.submit_raw(raw_read(&front, 9999)).unwrap();
    front.kick().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match front.poll_completions(Duration::from_millis(100), &mut out) {
            Err(e) => break e,
            Ok(()) => assert!(Instant::now() < deadline, "no error reported"),
        }
    };
    assert!(
        matches!(&err, DeviceError::Transport(m) if m.contains("9999") && m.contains("outside")),
        "{err:?}"
    );
    assert!(out.is_empty());

    // A valid slot index with no request in flight is a violation too.
    front.submit_raw(raw_read(&front, 5)).unwrap();
    front.kick().unwrap();
    let err = loop {
        match front.poll_completions(Duration::from_millis(100), &mut out) {
            Err(e) => break e,
            Ok(()) => assert!(Instant::now() < deadline, "no error reported"),
        }
    };
    assert!(
        matches!(&err, DeviceError::Transport(m) if m.contains("no request in flight")),
        "{err:?}"
    );

    assert_eq!(front.in_flight(), 0);

    // The device keeps working afterwards.
    let data = pattern(4096, 1);
    write(&mut front, 1, 8, &data);
    assert!(read(&mut front, 2, 8, 8) == data);
}

#[test]
fn raw_requests_reach_the_backend_verbatim() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(None)).unwrap();
    // A grant reference the frontend never granted (a reserved one).
    let mut bad = raw_read(&front, 77);
    bad.seg[0].gref = 3;
    front.submit_raw(bad).unwrap();
    front.kick().unwrap();
    let rsp = front.take_raw_response(WAIT).unwrap().expect("response");
    assert_eq!((rsp.id, rsp.status), (77, BLKIF_RSP_ERROR));
    // A revoked data grant is refused too.
    let gref = front.data_gref(0, 0).unwrap();
    front.grant_table().end_access(gref).unwrap();
    front.submit_raw(raw_read(&front, 78)).unwrap();
    let rsp = front.take_raw_response(WAIT).unwrap().expect("response");
    assert_eq!((rsp.id, rsp.status), (78, BLKIF_RSP_ERROR));
    // Unknown operation.
    front
        .submit_raw(BlkifRequest {
            operation: 42,
            id: 79,
            ..Default::default()
        })
        .unwrap();
    let rsp = front.take_raw_response(WAIT).unwrap().expect("response");
    assert_eq!((rsp.id, rsp.status), (79, BLKIF_RSP_EOPNOTSUPP));
    assert_eq!(
        front.take_raw_response(Duration::from_millis(20)).unwrap(),
        None
    );
}

#[test]
fn out_of_order_responses_are_matched() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(None)).unwrap();
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| pattern(8192, 100 + i)).collect();
    for (i, data) in blocks.iter().enumerate() {
        front
            .submit(i as u64, &BlockRequest::write(i as u64 * 16, data))
            .unwrap();
    }
    front.kick().unwrap();
    let tags: Vec<u64> = (0..16).collect();
    let done = wait_for(&mut front, &tags);
    assert!(done.iter().all(|c| c.status == Status::Ok));

    // Reads with tags unrelated to slot indices, answered in reverse.
    let read_tags: Vec<u64> = (0..16).map(|i| 1000 + 37 * i).collect();
    for (i, &tag) in read_tags.iter().enumerate() {
        front
            .submit(tag, &BlockRequest::read(i as u64 * 16, 16, true))
            .unwrap();
    }
    front.kick().unwrap();
    let done = wait_for(&mut front, &read_tags);
    assert_eq!(done.len(), 16);
    let order: Vec<u64> = done.iter().map(|c| c.tag).collect();
    assert_ne!(order, read_tags, "the backend should have reordered");
    for c in &done {
        let i = read_tags.iter().position(|&t| t == c.tag).unwrap();
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.data.as_deref() == Some(&blocks[i][..]),
            "tag {} got other data",
            c.tag
        );
    }
}

#[test]
fn discard_reads_back_zeros_and_flush_completes() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(None)).unwrap();
    assert!(front.supports_discard());
    assert!(front.supports_flush());
    let data = vec![0xab; 64 * 1024];
    write(&mut front, 1, 256, &data);
    let c = run_one(&mut front, 2, &BlockRequest::discard(256 + 32, 32));
    assert_eq!(c.status, Status::Ok);
    let c = run_one(&mut front, 3, &BlockRequest::flush());
    assert_eq!((c.status, c.data), (Status::Ok, None));
    let back = read(&mut front, 4, 256, 128);
    assert!(back[..32 * SECTOR].iter().all(|&b| b == 0xab));
    assert!(back[32 * SECTOR..64 * SECTOR].iter().all(|&b| b == 0));
    assert!(back[64 * SECTOR..].iter().all(|&b| b == 0xab));
}

#[test]
fn ring_orders_0_and_4_both_work() {
    for (order, entries) in [(0, 32), (4, 512)] {
        let backend = TestBackend::spawn(BackendOpts::default());
        let mut front = backend.attach(&config(Some(order))).unwrap();
        assert_eq!(front.ring_size(), entries);
        let data = pattern(128 * 1024, u64::from(order));
        write(&mut front, 1, 512, &data);
        assert!(read(&mut front, 2, 512, 256) == data);
        drop(front);
        let report = backend.join();
        assert_eq!(report.ring_pages, 1 << order);
        assert_eq!(report.requests, 2);
    }
}

#[test]
fn bad_configurations_are_refused() {
    let backend = TestBackend::spawn(BackendOpts {
        max_ring_page_order: 2,
        ..Default::default()
    });
    assert!(matches!(
        backend.attach(&config(Some(3))),
        Err(DeviceError::InvalidRequest(_))
    ));
    let backend = TestBackend::spawn(BackendOpts::default());
    let cfg = BlkFrontConfig {
        queue_depth: 33,
        ..config(Some(0))
    };
    assert!(matches!(
        backend.attach(&cfg),
        Err(DeviceError::InvalidRequest(_))
    ));
    let backend = TestBackend::spawn(BackendOpts::default());
    let cfg = BlkFrontConfig {
        max_request_bytes: 1000,
        ..config(None)
    };
    assert!(matches!(
        backend.attach(&cfg),
        Err(DeviceError::InvalidRequest(_))
    ));
    let backend = TestBackend::spawn(BackendOpts::default());
    let cfg = BlkFrontConfig::new("nope");
    assert!(matches!(
        backend.attach(&cfg),
        Err(DeviceError::Transport(m)) if m.contains("ENOENT")
    ));
    // The default ring order follows the backend's maximum.
    let backend = TestBackend::spawn(BackendOpts {
        max_ring_page_order: 2,
        ..Default::default()
    });
    let mut front = backend.attach(&config(None)).unwrap();
    assert_eq!(front.ring_page_order(), 2);
    assert_eq!(front.ring_size(), 128);
    // Out-of-range requests never reach the ring.
    for req in [
        BlockRequest::read(DISK_SECTORS - 7, 8, true),
        BlockRequest::read(u64::MAX, 8, true),
        BlockRequest::read(0, 0, true),
        BlockRequest::discard(DISK_SECTORS, 1),
    ] {
        assert!(matches!(
            front.submit(0, &req),
            Err(DeviceError::InvalidRequest(_))
        ));
    }
    let short = vec![0u8; 100];
    assert!(matches!(
        front.submit(0, &BlockRequest::write(0, &short)),
        Err(DeviceError::InvalidRequest(_))
    ));
    assert_eq!(front.in_flight(), 0);
}

#[test]
fn queue_depth_32_sustained_wraps_the_ring() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(Some(0))).unwrap();
    assert_eq!((front.ring_size(), front.max_in_flight()), (32, 32));
    const OPS: u64 = 3000;
    const BLOCKS: u64 = 256;
    let block = |i: u64| (i % BLOCKS) * 8;
    let mut next = 0u64;
    let mut completed = 0u64;
    let mut saw_full = false;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed < OPS {
        assert!(
            Instant::now() < deadline,
            "stalled at {completed} completions"
        );
        // Keep the queue full; the write to block i and i + 256 are never
        // in flight together at depth 32.
        while next < OPS {
            let data = pattern(4096, next);
            match front.submit(next, &BlockRequest::write(block(next), &data)) {
                Ok(()) => next += 1,
                Err(DeviceError::QueueFull) => {
                    saw_full = true;
                    break;
                }
                Err(e) => panic!("submit: {e}"),
            }
        }
        front.kick().unwrap();
        out.clear();
        front
            .poll_completions(Duration::from_millis(100), &mut out)
            .unwrap();
        for c in &out {
            assert_eq!(c.status, Status::Ok, "tag {}", c.tag);
        }
        completed += out.len() as u64;
    }
    assert!(saw_full, "the queue never filled up");
    assert_eq!(front.in_flight(), 0);
    // Every block holds its last write.
    for b in 0..BLOCKS {
        let last = (0..OPS).rev().find(|i| i % BLOCKS == b).unwrap();
        assert!(
            read(&mut front, OPS + b, b * 8, 8) == pattern(4096, last),
            "block {b}"
        );
    }
    let stats = front.stats();
    assert_eq!(stats.completed, OPS + BLOCKS);
    drop(front);
    let report = backend.join();
    assert_eq!(report.requests, OPS + BLOCKS);
}

#[test]
fn verifying_workload_runs_clean_over_blkfront() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(None)).unwrap();
    let mut workload = VerifyWorkload::new(VerifyConfig {
        seed: 7,
        queue_depth: 32,
        duration: Some(Duration::from_secs(1)),
        ..VerifyConfig::default()
    });
    let report = workload.run(&mut front, &mut |_| {}).unwrap();
    assert_eq!(report.verify_failures, 0, "{:?}", report.failures);
    assert_eq!(report.io_errors, 0);
    assert!(report.ops > 100, "only {} ops", report.ops);
    assert!(report.reads_verified > 0);
    assert_eq!(report.sectors_verified_final, DISK_SECTORS);
}

#[test]
fn detach_closes_the_device() {
    let backend = TestBackend::spawn(BackendOpts::default());
    let mut front = backend.attach(&config(None)).unwrap();
    write(&mut front, 1, 0, &pattern(4096, 9));
    front.detach().unwrap();
    let report = backend.join();
    assert!(report.closed_cleanly);
    assert!(report.grant_frames >= 1);
}
