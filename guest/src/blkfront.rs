//! The Xen block frontend (`blkfront`) over shadowback's control socket.
//!
//! [`BlkFront::attach`] probes a device on the supervisor's control socket
//! (`docs/PROTOCOL.md`), builds the guest's granted region, grants it to the
//! backend and sends `connect` with the region memfd and two eventfds. From
//! then on I/O flows through the shared `blkif` ring only; the socket stays
//! open as the device connection, and dropping the [`BlkFront`] detaches.
//!
//! # Region layout
//!
//! One sealed memfd, in 4 KiB frames ([`RegionLayout`]):
//!
//! ```text
//! [0, G)            grant table (grant-frames = G)
//! [G, G+R)          ring pages, 2^ring-page-order, contiguous
//! [.., +S*I)        indirect-descriptor pages, I per request slot
//! [.., +S*D)        data pages, D = max request bytes / 4096 per slot
//! ```
//!
//! Every ring, indirect and data frame is granted once, at attach time, and
//! stays granted while the device is attached: the persistent-grant model of
//! Linux blkfront (`feature-persistent=1`). Grant refs are fixed per frame,
//! `gref = FIRST_GREF + (frame - G)`, so a backend that used a ref as a frame
//! number would hit the wrong page. Ring and data pages are granted
//! writable — a data page serves reads (backend writes into it) and writes
//! (backend reads it), and one writable grant per page is simpler than
//! re-granting per request; indirect pages are granted read-only, since the
//! backend only ever reads segment descriptors from them.
//!
//! # Request slots
//!
//! A request's ring `id` is the index of its slot, taken from a free list.
//! Every response id is validated (in range, and naming a slot with a
//! request in flight) before anything is trusted: a violation is reported as
//! [`DeviceError::Transport`], never a panic.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowback_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSegment,
    BlkifResponse, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_OKAY, BLKIF_SEGS_PER_INDIRECT_FRAME, SECTORS_PER_PAGE,
};
use shadowback_ring::grant::{GrantRef, GrantTable, ENTRIES_PER_FRAME};
use shadowback_ring::sring::{ring_size, FrontRing, RingPages};
use shadowback_ring::{EventChannel, RingError, SharedRegion, MAX_REGION_PAGES, PAGE_SIZE};
use shadowback_xenbus::protocol::MAX_RING_PAGE_ORDER;
use shadowback_xenbus::{
    expect_no_fds, kind, BackendInfo, ConnectRequest, DiskMode, Message, SeqPacket, XenbusError,
};

use crate::device::{
    BlockDevice, BlockOp, BlockRequest, Completion, DeviceError, Status, SECTOR_SIZE,
};

/// First grant reference the frontend hands out. Xen reserves refs 0..8
/// (`GNTTAB_NR_RESERVED_ENTRIES`) for the toolstack; we leave them unused.
pub const FIRST_GREF: GrantRef = 8;

/// Ring page order used when the configuration does not name one (capped by
/// the backend's `max-ring-page-order`).
pub const DEFAULT_RING_PAGE_ORDER: u32 = 4;

/// Default largest request: 128 KiB, 32 segments, one indirect page.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 128 * 1024;

/// Default number of request slots.
pub const DEFAULT_QUEUE_DEPTH: usize = 32;
/// Requests queued between two publications of `req_prod` within a burst.
const PUSH_BATCH: u32 = 8;

const PAGE: u64 = PAGE_SIZE as u64;
/// Size of one segment descriptor in an indirect page.
const SEGMENT_BYTES: u64 = std::mem::size_of::<BlkifRequestSegment>() as u64;
/// How long `attach` and `detach` wait for each supervisor reply.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// How to attach a block frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkFrontConfig {
    /// Device name, as configured in the supervisor.
    pub device: String,
    /// Our domain id (`frontend-id`).
    pub frontend_id: u16,
    /// log2 of the ring pages; `None`: `min(4, max-ring-page-order)`.
    /// A value above the backend's maximum fails the attach.
    pub ring_page_order: Option<u32>,
    /// Request slots (at most the ring size).
    pub queue_depth: usize,
    /// Largest request in bytes: a non-zero multiple of 4096. Clamped to
    /// what the backend can take (11 segments without indirect requests,
    /// `feature-max-indirect-segments` with them).
    pub max_request_bytes: u32,
    /// Use `BLKIF_OP_INDIRECT` for requests of more than 11 segments when
    /// the backend offers it.
    pub use_indirect: bool,
}

impl BlkFrontConfig {
    /// Defaults for `device`: frontend id 1, automatic ring order, 32 slots,
    /// 128 KiB requests, indirect requests when offered.
    pub fn new(device: impl Into<String>) -> Self {
        BlkFrontConfig {
            device: device.into(),
            frontend_id: 1,
            ring_page_order: None,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            use_indirect: true,
        }
    }
}

/// Where everything lives in the granted region, in 4 KiB frames. See the
/// module docs for the picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// Grant-table frames at the start of the region (`grant-frames`).
    pub grant_frames: u32,
    /// Ring pages (2^order).
    pub ring_pages: u32,
    /// Request slots.
    pub slots: u32,
    /// Indirect-descriptor pages per slot (0 without indirect requests).
    pub indirect_pages_per_slot: u32,
    /// Data pages per slot.
    pub data_pages_per_slot: u32,
}

impl RegionLayout {
    /// Lays out a region; fails when it would exceed [`MAX_REGION_PAGES`].
    pub fn new(
        ring_pages: u32,
        slots: u32,
        indirect_pages_per_slot: u32,
        data_pages_per_slot: u32,
    ) -> Result<Self, DeviceError> {
        let too_big = || {
            DeviceError::InvalidRequest(format!(
                "a region of {ring_pages} ring pages and {slots} slots of \
                 {indirect_pages_per_slot}+{data_pages_per_slot} pages exceeds \
                 {MAX_REGION_PAGES} pages"
            ))
        };
        let granted = indirect_pages_per_slot
            .checked_add(data_pages_per_slot)
            .and_then(|per_slot| per_slot.checked_mul(slots))
            .and_then(|pool| pool.checked_add(ring_pages))
            .ok_or_else(too_big)?;
        let entries = granted.checked_add(FIRST_GREF).ok_or_else(too_big)?;
        let grant_frames = entries.div_ceil(ENTRIES_PER_FRAME);
        let layout = RegionLayout {
            grant_frames,
            ring_pages,
            slots,
            indirect_pages_per_slot,
            data_pages_per_slot,
        };
        match grant_frames.checked_add(granted) {
            Some(total) if total <= MAX_REGION_PAGES => Ok(layout),
            _ => Err(too_big()),
        }
    }

    /// Frames in the region.
    pub fn total_pages(&self) -> u32 {
        // Checked in `new`.
        self.grant_frames + self.granted_pages()
    }

    /// Frames granted to the backend (all but the grant table).
    pub fn granted_pages(&self) -> u32 {
        self.ring_pages + self.slots * (self.indirect_pages_per_slot + self.data_pages_per_slot)
    }

    /// First ring frame.
    pub fn ring_frame(&self) -> u32 {
        self.grant_frames
    }

    /// Frame of indirect page `page` of `slot`.
    pub fn indirect_frame(&self, slot: u32, page: u32) -> Option<u32> {
        (slot < self.slots && page < self.indirect_pages_per_slot).then(|| {
            self.ring_frame() + self.ring_pages + slot * self.indirect_pages_per_slot + page
        })
    }

    /// Frame of data page `page` of `slot`.
    pub fn data_frame(&self, slot: u32, page: u32) -> Option<u32> {
        (slot < self.slots && page < self.data_pages_per_slot).then(|| {
            self.ring_frame()
                + self.ring_pages
                + self.slots * self.indirect_pages_per_slot
                + slot * self.data_pages_per_slot
                + page
        })
    }

    /// The grant reference of a granted frame.
    pub fn gref_of_frame(&self, frame: u32) -> Option<GrantRef> {
        (frame >= self.grant_frames && frame < self.total_pages())
            .then(|| frame - self.grant_frames + FIRST_GREF)
    }

    /// Grant references of the ring pages, in ring order (`ring-ref*`).
    pub fn ring_refs(&self) -> Vec<GrantRef> {
        (0..self.ring_pages).map(|i| FIRST_GREF + i).collect()
    }

    /// Grant reference of data page `page` of `slot`.
    pub fn data_gref(&self, slot: u32, page: u32) -> Option<GrantRef> {
        self.data_frame(slot, page)
            .and_then(|f| self.gref_of_frame(f))
    }

    /// Grant reference of indirect page `page` of `slot`.
    pub fn indirect_gref(&self, slot: u32, page: u32) -> Option<GrantRef> {
        self.indirect_frame(slot, page)
            .and_then(|f| self.gref_of_frame(f))
    }
}

/// What the frontend has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkFrontStats {
    /// Requests put on the ring by [`BlockDevice::submit`].
    pub submitted: u64,
    /// Of those, `BLKIF_OP_INDIRECT` requests.
    pub indirect: u64,
    /// Requests completed locally without reaching the ring (an operation
    /// the backend does not offer).
    pub completed_locally: u64,
    /// Responses matched to a request slot.
    pub completed: u64,
    /// Kicks that notified the backend.
    pub notifications: u64,
    /// Pushes the backend did not ask to be notified of.
    pub suppressed_notifications: u64,
    /// Sleeps on the notify event channel.
    pub waits: u64,
}

/// A request between `submit` and its response.
#[derive(Clone, Copy, Debug)]
struct InflightEntry {
    tag: u64,
    op: BlockOp,
    sectors: u32,
    want_data: bool,
    /// `operation` on the ring (may be `BLKIF_OP_INDIRECT`).
    wire_op: u8,
}

impl InflightEntry {
    /// The operation a response may carry: the ring op, or for an indirect
    /// request its `indirect_op` (what Linux blkback echoes).
    fn matches_response_op(&self, op: u8) -> bool {
        op == self.wire_op || op == self.data_op()
    }

    fn data_op(&self) -> u8 {
        match self.op {
            BlockOp::Read => BLKIF_OP_READ,
            BlockOp::Write => BLKIF_OP_WRITE,
            BlockOp::Flush => BLKIF_OP_FLUSH_DISKCACHE,
            BlockOp::Discard => BLKIF_OP_DISCARD,
        }
    }
}

/// A Xen block frontend attached through the supervisor. See the module
/// docs.
#[derive(Debug)]
pub struct BlkFront {
    /// The device connection: closing it detaches.
    control: SeqPacket,
    backend: BackendInfo,
    backend_keys: Message,
    region: Arc<SharedRegion>,
    grants: GrantTable,
    layout: RegionLayout,
    ring: FrontRing<Blkif>,
    /// Frontend → backend.
    kick: EventChannel,
    /// Backend → frontend.
    notify: EventChannel,
    ring_page_order: u32,
    use_indirect: bool,
    max_request_sectors: u32,
    /// `slots[id]` is the request with ring id `id`, if one is in flight.
    slots: Vec<Option<InflightEntry>>,
    free_slots: Vec<u32>,
    /// Completions decided without the backend, delivered on the next poll.
    local: Vec<Completion>,
    /// `req_prod` as last published by a kick.
    published: u32,
    /// Raw requests put on the ring and not yet answered through
    /// [`take_raw_response`](Self::take_raw_response).
    raw_outstanding: u32,
    stats: BlkFrontStats,
}

impl BlkFront {
    /// Probes `cfg.device` on the control socket at `socket`, sets up the
    /// granted region and ring, and connects.
    pub fn attach(socket: &Path, cfg: &BlkFrontConfig) -> Result<Self, DeviceError> {
        let control = SeqPacket::connect(socket)
            .map_err(|e| control_err("connecting to the supervisor", e))?;
        control
            .send(&Message::probe(&cfg.device), &[])
            .map_err(|e| control_err("sending probe", e))?;
        let reply = recv_reply(&control, kind::BACKEND, "probe")?;
        let backend = BackendInfo::from_message(&reply)
            .map_err(|e| control_err("parsing the backend keys", e))?;

        let max_order = u32::from(backend.max_ring_page_order.min(MAX_RING_PAGE_ORDER));
        let ring_page_order = cfg
            .ring_page_order
            .unwrap_or(DEFAULT_RING_PAGE_ORDER.min(max_order));
        if ring_page_order > max_order {
            return Err(DeviceError::InvalidRequest(format!(
                "ring page order {ring_page_order} exceeds the backend's maximum {max_order}"
            )));
        }
        let ring_pages = 1u32 << ring_page_order;
        let ring_entries = ring_size(ring_pages as usize, std::mem::size_of::<BlkifRequest>());
        if cfg.queue_depth == 0 || cfg.queue_depth > ring_entries as usize {
            return Err(DeviceError::InvalidRequest(format!(
                "queue depth {} is not within 1..={ring_entries} (the ring size)",
                cfg.queue_depth
            )));
        }
        if cfg.max_request_bytes == 0 || cfg.max_request_bytes & (PAGE_SIZE as u32 - 1) != 0 {
            return Err(DeviceError::InvalidRequest(format!(
                "max request bytes {} is not a non-zero multiple of {PAGE_SIZE}",
                cfg.max_request_bytes
            )));
        }
        let (use_indirect, segments) = segment_limits(cfg, &backend);
        let indirect_pages = if use_indirect {
            segments.div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME as u32)
        } else {
            0
        };
        // queue_depth <= ring size <= 512: fits u32.
        let slots = cfg.queue_depth as u32;
        let layout = RegionLayout::new(ring_pages, slots, indirect_pages, segments)?;

        let region = Arc::new(
            SharedRegion::create(&format!("blkfront-{}", cfg.device), layout.total_pages())
                .map_err(ring_err)?,
        );
        let grants = GrantTable::new(region.clone(), layout.grant_frames).map_err(ring_err)?;
        grant_region(&grants, &layout, backend.backend_id)?;
        let ring = FrontRing::<Blkif>::init(
            RingPages::contiguous(region.clone(), layout.ring_frame(), ring_pages as usize)
                .map_err(ring_err)?,
        )
        .map_err(ring_err)?;
        let kick = EventChannel::new().map_err(ring_err)?;
        let notify = EventChannel::new().map_err(ring_err)?;

        let connect = ConnectRequest {
            device: cfg.device.clone(),
            frontend_id: cfg.frontend_id,
            ring_refs: layout.ring_refs(),
            grant_frames: layout.grant_frames,
            feature_persistent: true,
        }
        .to_message()
        .map_err(|e| control_err("building connect", e))?;
        control
            .send(
                &connect,
                &[region.file().as_fd(), kick.as_fd(), notify.as_fd()],
            )
            .map_err(|e| control_err("sending connect", e))?;
        let reply = recv_reply(&control, kind::CONNECTED, "connect")?;
        // The backend keys may be refined at connect; the connected ones win.
        let backend = BackendInfo::from_message(&reply)
            .map_err(|e| control_err("parsing the connected keys", e))?;

        let max_request_sectors = segments * u32::from(SECTORS_PER_PAGE);
        tracing::info!(
            device = %cfg.device,
            ring_page_order,
            ring_entries,
            slots,
            use_indirect,
            max_request_sectors,
            region_pages = layout.total_pages(),
            sectors = backend.sectors,
            "blkfront connected"
        );
        Ok(BlkFront {
            control,
            backend,
            backend_keys: reply,
            region,
            grants,
            layout,
            ring,
            kick,
            notify,
            ring_page_order,
            use_indirect,
            max_request_sectors,
            slots: vec![None; cfg.queue_depth],
            free_slots: (0..slots).rev().collect(),
            local: Vec::new(),
            published: 0,
            raw_outstanding: 0,
            stats: BlkFrontStats::default(),
        })
    }

    /// Detaches cleanly: `close`, then waits for `closed`. Dropping the
    /// frontend detaches too, by closing the socket.
    pub fn detach(self) -> Result<(), DeviceError> {
        self.control
            .send(&Message::new(kind::CLOSE), &[])
            .map_err(|e| control_err("sending close", e))?;
        recv_reply(&self.control, kind::CLOSED, "close").map(drop)
    }

    /// The backend's keys, typed.
    pub fn backend(&self) -> &BackendInfo {
        &self.backend
    }

    /// The backend's keys as received in `connected`.
    pub fn backend_keys(&self) -> &Message {
        &self.backend_keys
    }

    /// Entries in the shared ring (`RING_SIZE`).
    pub fn ring_size(&self) -> u32 {
        self.ring.size()
    }

    /// log2 of the ring pages in use.
    pub fn ring_page_order(&self) -> u32 {
        self.ring_page_order
    }

    /// Whether requests of more than 11 segments go out as
    /// `BLKIF_OP_INDIRECT`.
    pub fn uses_indirect(&self) -> bool {
        self.use_indirect
    }

    /// Where everything lives in the granted region.
    pub fn layout(&self) -> &RegionLayout {
        &self.layout
    }

    /// Counters.
    pub fn stats(&self) -> BlkFrontStats {
        self.stats
    }

    /// Test tool: the granted region (to read or damage slot pages).
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// Test tool: the grant table, to revoke or forge grants before
    /// [`submit_raw`](Self::submit_raw).
    pub fn grant_table(&self) -> &GrantTable {
        &self.grants
    }

    /// Test tool: the grant reference of data page `page` of `slot`.
    pub fn data_gref(&self, slot: u32, page: u32) -> Option<GrantRef> {
        self.layout.data_gref(slot, page)
    }

    /// Test tool: the byte offset of data page `page` of `slot` in the
    /// region.
    pub fn data_offset(&self, slot: u32, page: u32) -> Option<u64> {
        self.layout
            .data_frame(slot, page)
            .map(|f| u64::from(f) * PAGE)
    }

    /// Test tool: the event channels `(kick, notify)`, frontend → backend
    /// and backend → frontend.
    pub fn event_channels(&self) -> (&EventChannel, &EventChannel) {
        (&self.kick, &self.notify)
    }

    /// Test tool for hostile-guest tests: puts `req` on the ring verbatim
    /// (the caller chooses the `id`), without publishing it — call
    /// [`kick`](BlockDevice::kick). Returns the ring index it went to.
    ///
    /// Raw requests bypass slot tracking: read their responses with
    /// [`take_raw_response`](Self::take_raw_response), and do not mix them
    /// with [`submit`](BlockDevice::submit)ted requests in flight, since a
    /// response to either is taken by whichever reaps first.
    pub fn submit_raw(&mut self, req: BlkifRequest) -> Result<u32, DeviceError> {
        let idx = self.ring.put_request(&req).map_err(ring_err)?;
        self.raw_outstanding = self.raw_outstanding.saturating_add(1);
        Ok(idx)
    }

    /// Test tool: the next response on the ring, whatever its id, waiting
    /// up to `timeout` for one. Publishes queued requests first.
    pub fn take_raw_response(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<BlkifResponse>, DeviceError> {
        self.publish()?;
        let deadline = Deadline::after(timeout);
        loop {
            if let Some(rsp) = self.ring.take_response().map_err(ring_err)? {
                self.raw_outstanding = self.raw_outstanding.saturating_sub(1);
                return Ok(Some(rsp));
            }
            if self.ring.final_check_for_responses().map_err(ring_err)? {
                continue;
            }
            let left = deadline.left();
            if left.is_zero() {
                return Ok(None);
            }
            self.stats.waits += 1;
            self.notify.wait(left).map_err(ring_err)?;
        }
    }

    /// Requests submitted (or raw) and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len() + self.raw_outstanding as usize
    }

    fn capacity_check(&self, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        let end = req.sector.checked_add(u64::from(req.sectors));
        if req.sectors == 0 || !matches!(end, Some(end) if end <= self.backend.sectors) {
            return Err(DeviceError::InvalidRequest(format!(
                "{:?} of sectors {}+{} outside the disk of {} sectors",
                req.op, req.sector, req.sectors, self.backend.sectors
            )));
        }
        Ok(())
    }

    fn validate(&self, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        match req.op {
            BlockOp::Flush => Ok(()),
            BlockOp::Discard => self.capacity_check(req),
            BlockOp::Read | BlockOp::Write => {
                self.capacity_check(req)?;
                if req.sectors > self.max_request_sectors {
                    return Err(DeviceError::InvalidRequest(format!(
                        "{:?} of {} sectors exceeds the maximum of {}",
                        req.op, req.sectors, self.max_request_sectors
                    )));
                }
                let len = req.data.map(<[u8]>::len);
                if req.op == BlockOp::Write && len.map(|l| l as u64) != Some(req.bytes()) {
                    return Err(DeviceError::InvalidRequest(format!(
                        "write of {} sectors with {len:?} bytes of data",
                        req.sectors
                    )));
                }
                Ok(())
            }
        }
    }

    /// The completion status of an operation the backend does not offer, if
    /// `op` is one.
    fn locally_refused(&self, op: BlockOp) -> Option<Status> {
        match op {
            BlockOp::Flush if !self.backend.feature_flush_cache => Some(Status::NotSupported),
            BlockOp::Discard if !self.backend.feature_discard => Some(Status::NotSupported),
            // Xen blkback fails writes to a read-only disk with BLKIF_RSP_ERROR.
            BlockOp::Write | BlockOp::Discard if self.backend.mode == DiskMode::ReadOnly => {
                Some(Status::IoError)
            }
            _ => None,
        }
    }

    /// Builds the ring request for `req` in `slot`, writing its payload and
    /// indirect descriptors into the slot's pages.
    fn build_request(
        &mut self,
        slot: u32,
        req: &BlockRequest<'_>,
    ) -> Result<BlkifRequest, DeviceError> {
        let id = u64::from(slot);
        match req.op {
            BlockOp::Flush => Ok(BlkifRequest {
                operation: BLKIF_OP_FLUSH_DISKCACHE,
                id,
                ..Default::default()
            }),
            BlockOp::Discard => Ok(BlkifRequest::from_discard(&BlkifRequestDiscard {
                operation: BLKIF_OP_DISCARD,
                id,
                sector_number: req.sector,
                nr_sectors: u64::from(req.sectors),
                ..Default::default()
            })),
            BlockOp::Read | BlockOp::Write => {
                if let (BlockOp::Write, Some(data)) = (req.op, req.data) {
                    let offset = self.slot_data_offset(slot)?;
                    self.region.write(offset, data).map_err(ring_err)?;
                }
                let segments = self.segments(slot, req.sectors)?;
                let op = if req.op == BlockOp::Read {
                    BLKIF_OP_READ
                } else {
                    BLKIF_OP_WRITE
                };
                if segments.len() <= BLKIF_MAX_SEGMENTS_PER_REQUEST {
                    let mut ring_req = BlkifRequest {
                        operation: op,
                        nr_segments: segments.len() as u8,
                        id,
                        sector_number: req.sector,
                        ..Default::default()
                    };
                    ring_req.seg[..segments.len()].copy_from_slice(&segments);
                    Ok(ring_req)
                } else {
                    self.build_indirect(slot, op, req.sector, &segments)
                }
            }
        }
    }

    /// Writes `segments` into the slot's indirect pages and returns the
    /// `BLKIF_OP_INDIRECT` request describing them.
    fn build_indirect(
        &mut self,
        slot: u32,
        op: u8,
        sector: u64,
        segments: &[BlkifRequestSegment],
    ) -> Result<BlkifRequest, DeviceError> {
        let per_page = BLKIF_SEGS_PER_INDIRECT_FRAME;
        let pages = segments.len().div_ceil(per_page);
        let (Ok(nr_segments), true) = (
            u16::try_from(segments.len()),
            self.use_indirect && pages <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        ) else {
            return Err(DeviceError::InvalidRequest(format!(
                "{} segments need indirect descriptors this device does not use",
                segments.len()
            )));
        };
        let mut indirect_grefs = [0; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        for (page, chunk) in segments.chunks(per_page).enumerate() {
            let page = page as u32;
            let missing =
                || DeviceError::InvalidRequest(format!("slot {slot} has no indirect page {page}"));
            let frame = self.layout.indirect_frame(slot, page).ok_or_else(missing)?;
            indirect_grefs[page as usize] = self.layout.gref_of_frame(frame).ok_or_else(missing)?;
            let base = u64::from(frame) * PAGE;
            for (i, seg) in chunk.iter().enumerate() {
                self.region
                    .write_obj(*seg, base + i as u64 * SEGMENT_BYTES)
                    .map_err(ring_err)?;
            }
        }
        self.stats.indirect += 1;
        Ok(BlkifRequest::from_indirect(&BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: op,
            nr_segments,
            id: u64::from(slot),
            sector_number: sector,
            indirect_grefs,
            ..Default::default()
        }))
    }

    /// One segment per 4 KiB data page of the slot; the payload starts at
    /// the first page, so only the last segment may be partial.
    fn segments(&self, slot: u32, sectors: u32) -> Result<Vec<BlkifRequestSegment>, DeviceError> {
        let per_page = u32::from(SECTORS_PER_PAGE);
        let count = sectors.div_ceil(per_page);
        (0..count)
            .map(|page| {
                let gref = self.layout.data_gref(slot, page).ok_or_else(|| {
                    DeviceError::InvalidRequest(format!(
                        "{sectors} sectors do not fit the {} data pages of a slot",
                        self.layout.data_pages_per_slot
                    ))
                })?;
                let in_page = (sectors - page * per_page).min(per_page);
                Ok(BlkifRequestSegment {
                    gref,
                    first_sect: 0,
                    // 1 <= in_page <= 8.
                    last_sect: (in_page - 1) as u8,
                    _pad: [0; 2],
                })
            })
            .collect()
    }

    fn slot_data_offset(&self, slot: u32) -> Result<u64, DeviceError> {
        self.data_offset(slot, 0)
            .ok_or_else(|| DeviceError::InvalidRequest(format!("no data pages for slot {slot}")))
    }

    /// Publishes requests queued since the last kick.
    fn publish(&mut self) -> Result<(), DeviceError> {
        if self.ring.req_prod_pvt() == self.published {
            return Ok(());
        }
        self.published = self.ring.req_prod_pvt();
        if self.ring.push_requests().map_err(ring_err)? {
            self.stats.notifications += 1;
            self.kick.notify().map_err(ring_err)?;
        } else {
            self.stats.suppressed_notifications += 1;
        }
        Ok(())
    }

    /// Matches one response to its slot and turns it into a completion.
    fn complete(&mut self, rsp: &BlkifResponse) -> Result<Completion, DeviceError> {
        let id = rsp.id;
        let slot = usize::try_from(id)
            .ok()
            .filter(|&s| s < self.slots.len())
            .ok_or_else(|| {
                DeviceError::Transport(format!(
                    "backend answered request id {id}, outside the {} request slots",
                    self.slots.len()
                ))
            })?;
        let entry = self.slots[slot].ok_or_else(|| {
            DeviceError::Transport(format!(
                "backend answered request id {id}, which has no request in flight"
            ))
        })?;
        if !entry.matches_response_op(rsp.operation) {
            // Leave the slot in flight: this response is not about it.
            return Err(DeviceError::Transport(format!(
                "backend answered request id {id} (operation {}) with operation {}",
                entry.wire_op, rsp.operation
            )));
        }
        let status = status_from_wire(rsp.status);
        let data = if entry.op == BlockOp::Read && entry.want_data && status == Status::Ok {
            let mut buf = vec![0u8; u64::from(entry.sectors) as usize * SECTOR_SIZE as usize];
            self.region
                .read(self.slot_data_offset(slot as u32)?, &mut buf)
                .map_err(ring_err)?;
            Some(buf)
        } else {
            None
        };
        self.slots[slot] = None;
        self.free_slots.push(slot as u32);
        self.stats.completed += 1;
        Ok(Completion {
            tag: entry.tag,
            status,
            data,
        })
    }

    /// Takes every published response; returns how many completions were
    /// appended.
    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, DeviceError> {
        let mut n = self.local.len();
        out.append(&mut self.local);
        while let Some(rsp) = self.ring.take_response().map_err(ring_err)? {
            match self.complete(&rsp) {
                Ok(completion) => out.push(completion),
                Err(e) => {
                    // Consumed but claimed by no slot: if raw requests are
                    // out, count it as the answer to one of them.
                    self.raw_outstanding = self.raw_outstanding.saturating_sub(1);
                    return Err(e);
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// After a wait that found nothing: has the supervisor closed the
    /// device connection (or sent an `error`, after which it closes)?
    fn check_control(&mut self) -> Result<(), DeviceError> {
        loop {
            match self.control.recv_timeout(Duration::ZERO) {
                Ok(None) => return Ok(()),
                Ok(Some((msg, _fds))) if msg.kind() == kind::CHANGED => self.apply_change(&msg)?,
                Ok(Some((msg, _fds))) => {
                    tracing::warn!(message = %msg, "unsolicited control message; treating as disconnect");
                    return Err(DeviceError::Disconnected);
                }
                Err(e) => return Err(control_err("checking the control socket", e)),
            }
        }
    }

    /// `changed` (docs/PROTOCOL.md §4.4): the disk was resized.
    fn apply_change(&mut self, msg: &Message) -> Result<(), DeviceError> {
        let sectors = msg
            .require_u64(shadowback_xenbus::key::SECTORS)
            .map_err(|e| control_err("changed", e))?;
        tracing::info!(old = self.backend.sectors, sectors, "disk resized");
        self.backend.sectors = sectors;
        Ok(())
    }

    /// Reads what the supervisor announced on the control socket (a
    /// resize, PROTOCOL.md §4.4) and returns the disk's size in sectors.
    /// A request past the known end does this by itself before it is
    /// refused.
    pub fn refresh_capacity(&mut self) -> Result<u64, DeviceError> {
        self.check_control()?;
        Ok(self.backend.sectors)
    }
}

impl BlockDevice for BlkFront {
    fn capacity_sectors(&self) -> u64 {
        self.backend.sectors
    }

    fn max_in_flight(&self) -> usize {
        self.slots.len()
    }

    fn max_request_sectors(&self) -> u32 {
        self.max_request_sectors
    }

    fn supports_discard(&self) -> bool {
        self.backend.feature_discard && self.backend.mode == DiskMode::ReadWrite
    }

    fn supports_flush(&self) -> bool {
        self.backend.feature_flush_cache
    }

    fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        if self.validate(req).is_err() {
            // The disk may have grown: look for a `changed` first.
            self.check_control()?;
            self.validate(req)?;
        }
        if let Some(status) = self.locally_refused(req.op) {
            self.stats.completed_locally += 1;
            self.local.push(Completion {
                tag,
                status,
                data: None,
            });
            return Ok(());
        }
        if self.ring.free_requests() == 0 {
            return Err(DeviceError::QueueFull);
        }
        let slot = self.free_slots.pop().ok_or(DeviceError::QueueFull)?;
        let built = self.build_request(slot, req).and_then(|ring_req| {
            self.ring.put_request(&ring_req).map_err(ring_err)?;
            Ok(ring_req.operation)
        });
        let wire_op = match built {
            Ok(op) => op,
            Err(e) => {
                self.free_slots.push(slot);
                return Err(e);
            }
        };
        self.slots[slot as usize] = Some(InflightEntry {
            tag,
            op: req.op,
            sectors: req.sectors,
            want_data: req.want_data,
            wire_op,
        });
        self.stats.submitted += 1;
        // Publish in small batches while a burst is being queued, so the
        // backend starts on the first requests while we build the rest
        // (Linux blkfront pushes after every request; notification
        // suppression keeps the kicks rare either way).
        if self.ring.req_prod_pvt().is_multiple_of(PUSH_BATCH) {
            self.publish()?;
        }
        Ok(())
    }

    fn kick(&mut self) -> Result<(), DeviceError> {
        self.publish()
    }

    /// Also publishes requests not yet kicked: waiting for responses to
    /// requests the backend cannot see would only run into the timeout.
    /// Returns at once when nothing is in flight.
    fn poll_completions(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<(), DeviceError> {
        self.publish()?;
        let deadline = Deadline::after(timeout);
        loop {
            if self.reap(out)? > 0 || self.in_flight() == 0 {
                return Ok(());
            }
            // RING_FINAL_CHECK_FOR_RESPONSES before sleeping: re-arm
            // rsp_event, then re-check so a response pushed in between is
            // not slept through.
            if self.ring.final_check_for_responses().map_err(ring_err)? {
                continue;
            }
            let left = deadline.left();
            if left.is_zero() {
                return self.check_control();
            }
            self.stats.waits += 1;
            self.notify.wait(left).map_err(ring_err)?;
        }
    }
}

/// The end of a wait; `None` when the timeout is too large to represent
/// (wait forever).
#[derive(Clone, Copy, Debug)]
struct Deadline(Option<Instant>);

impl Deadline {
    fn after(timeout: Duration) -> Self {
        Deadline(Instant::now().checked_add(timeout))
    }

    /// Time left, zero once passed.
    fn left(self) -> Duration {
        self.0.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }
}

/// Segments per request and whether indirect requests are used, from the
/// configuration and what the backend offers.
fn segment_limits(cfg: &BlkFrontConfig, backend: &BackendInfo) -> (bool, u32) {
    let wanted = cfg.max_request_bytes / PAGE_SIZE as u32;
    let direct = BLKIF_MAX_SEGMENTS_PER_REQUEST as u32;
    let indirect_max = backend
        .max_indirect_segments
        .min((BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME) as u32);
    if cfg.use_indirect && wanted > direct && indirect_max > direct {
        (true, wanted.min(indirect_max))
    } else {
        (false, wanted.min(direct))
    }
}

/// Grants every ring, indirect and data frame to the backend, once.
fn grant_region(
    grants: &GrantTable,
    layout: &RegionLayout,
    backend: u16,
) -> Result<(), DeviceError> {
    let indirect_start = layout.ring_frame() + layout.ring_pages;
    let data_start = indirect_start + layout.slots * layout.indirect_pages_per_slot;
    for frame in layout.grant_frames..layout.total_pages() {
        // Indirect pages only carry segment descriptors the backend reads.
        let readonly = (indirect_start..data_start).contains(&frame);
        let gref = layout.gref_of_frame(frame).ok_or_else(|| {
            DeviceError::InvalidRequest(format!("frame {frame} has no grant reference"))
        })?;
        grants
            .grant(gref, backend, frame, readonly)
            .map_err(ring_err)?;
    }
    Ok(())
}

/// The one mapping from a blkif response status to a completion status.
pub fn status_from_wire(status: i16) -> Status {
    match status {
        BLKIF_RSP_OKAY => Status::Ok,
        BLKIF_RSP_EOPNOTSUPP => Status::NotSupported,
        _ => Status::IoError,
    }
}

/// Receives the reply to `what`: `expected`, or an `error` turned into a
/// [`DeviceError::Transport`].
fn recv_reply(
    control: &SeqPacket,
    expected: &'static str,
    what: &str,
) -> Result<Message, DeviceError> {
    let (msg, fds) = control
        .recv_timeout(CONTROL_TIMEOUT)
        .map_err(|e| control_err(what, e))?
        .ok_or_else(|| {
            DeviceError::Transport(format!("no reply to {what} within {CONTROL_TIMEOUT:?}"))
        })?;
    expect_no_fds(&msg, fds).map_err(|e| control_err(what, e))?;
    if msg.kind() == kind::CHANGED && expected != kind::CHANGED {
        // A resize announced before the answer (`close`): not it.
        return recv_reply(control, expected, what);
    }
    if msg.kind() == kind::ERROR {
        return Err(DeviceError::Transport(format!(
            "supervisor refused {what}: {} ({})",
            msg.get(shadowback_xenbus::key::MESSAGE)
                .unwrap_or("no message"),
            msg.get(shadowback_xenbus::key::CODE).unwrap_or("no code"),
        )));
    }
    msg.expect_kind(expected)
        .map_err(|e| control_err(what, e))?;
    Ok(msg)
}

fn control_err(what: &str, err: XenbusError) -> DeviceError {
    match err {
        XenbusError::Closed => DeviceError::Disconnected,
        XenbusError::Io(io) => DeviceError::Io(io),
        other => DeviceError::Transport(format!("{what}: {other}")),
    }
}

fn ring_err(err: RingError) -> DeviceError {
    match err {
        RingError::Event(io) | RingError::CreateMemfd(io) => DeviceError::Io(io),
        RingError::RingFull => DeviceError::QueueFull,
        other => DeviceError::Transport(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_the_default_configuration() {
        // Order 4, 32 slots of 1 indirect + 32 data pages.
        let l = RegionLayout::new(16, 32, 1, 32).unwrap();
        let granted = 16 + 32 * 33;
        assert_eq!(l.granted_pages(), granted);
        assert_eq!(l.grant_frames, (granted + FIRST_GREF).div_ceil(512));
        assert_eq!(l.grant_frames, 3);
        assert_eq!(l.ring_frame(), 3);
        assert_eq!(l.ring_refs(), (8..24).collect::<Vec<_>>());
        assert_eq!(l.indirect_frame(0, 0), Some(19));
        assert_eq!(l.indirect_frame(31, 0), Some(50));
        assert_eq!(l.indirect_frame(32, 0), None);
        assert_eq!(l.indirect_frame(0, 1), None);
        assert_eq!(l.data_frame(0, 0), Some(51));
        assert_eq!(l.data_frame(31, 31), Some(l.total_pages() - 1));
        assert_eq!(l.data_frame(0, 32), None);
        assert_eq!(l.data_gref(0, 0), Some(51 - 3 + 8));
        assert_eq!(l.gref_of_frame(2), None);
        assert_eq!(l.gref_of_frame(l.total_pages()), None);
    }

    #[test]
    fn layout_refuses_oversized_regions() {
        assert!(RegionLayout::new(16, u32::MAX, 1, 32).is_err());
        assert!(RegionLayout::new(1, 1 << 16, 0, 16).is_err());
        assert!(RegionLayout::new(1, 1, 0, 1).is_ok());
    }

    #[test]
    fn the_table_covers_every_granted_frame() {
        for (ring, slots, ind, data) in [
            (1, 1, 0, 1),
            (1, 32, 0, 11),
            (16, 512, 1, 32),
            (2, 7, 8, 4096),
        ] {
            let l = RegionLayout::new(ring, slots, ind, data).unwrap();
            let last = l.gref_of_frame(l.total_pages() - 1).unwrap();
            assert!(last < l.grant_frames * ENTRIES_PER_FRAME);
        }
    }

    #[test]
    fn status_mapping() {
        assert_eq!(status_from_wire(BLKIF_RSP_OKAY), Status::Ok);
        assert_eq!(status_from_wire(BLKIF_RSP_EOPNOTSUPP), Status::NotSupported);
        assert_eq!(status_from_wire(-1), Status::IoError);
        assert_eq!(status_from_wire(7), Status::IoError);
    }
}
