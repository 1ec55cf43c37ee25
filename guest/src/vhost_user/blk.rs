//! [`VhostUserBlk`]: a high-queue-depth virtio-blk driver over vhost-user,
//! implementing [`BlockDevice`].
//!
//! The virtqueues are `virtio_drivers::queue::VirtQueue`s (an implementation
//! independent of the backend's); the virtio-blk requests are built here.
//! Every request is a three-descriptor chain — header, data, status — whose
//! buffers live in a per-request *slot* allocated in guest RAM at connect
//! time, so nothing is copied except write payloads in and read data out.
//!
//! [`BlockDevice::submit`] puts each request on the next virtqueue with a
//! free slot, round-robin, so a steady load keeps every queue busy;
//! [`BlockDevice::submit_to`] picks the queue, for workloads that drain one
//! queue while another is busy.
//!
//! Every used-ring entry is validated before it is trusted: the used index
//! may advance by at most the number of requests in flight, and every id
//! must name the head of a chain in flight. A violation is reported as
//! [`DeviceError::Transport`], never a panic.
//!
//! Notifications follow the virtio rules rather than `VirtQueue`'s own
//! `should_notify`, whose `avail_event` comparison ignores index
//! wrap-around (virtio 1.2 §2.7.10, `vring_need_event`).

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_USED_F_NO_NOTIFY};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{DeviceStatus, Transport};

use super::hal::{need_event, ChainBuf, GuestHal, RequestQueue};
use super::memory::{DmaBuffer, GuestRam, DEFAULT_RAM_BYTES};
use super::transport::{
    deadline_after, TransportOptions, VhostUserTransport, MAX_QUEUES, REPLY_TIMEOUT,
};
use crate::device::{
    BlockDevice, BlockOp, BlockRequest, Completion, DeviceError, Status, SECTOR_SIZE,
};

/// Descriptors per request: header, data, status.
pub const DESCRIPTORS_PER_REQUEST: u16 = 3;
/// Bytes of a virtio-blk request header (`virtio_blk_outhdr`).
pub const HEADER_BYTES: u32 = 16;
/// Bytes of a discard segment (`virtio_blk_discard_write_zeroes`).
pub const DISCARD_SEGMENT_BYTES: u32 = 16;
/// Bytes of a `GET_ID` answer.
pub const ID_BYTES: u32 = 20;
/// Per-slot header area: the header at 0, the status byte at 16.
const SLOT_META_BYTES: u64 = 64;
const STATUS_OFFSET: u64 = 16;
/// Status byte we write before submitting, so a device that completes
/// without writing one is noticed.
const STATUS_UNSET: u8 = 0xff;
/// Largest request this driver accepts (`max_request_bytes`).
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;

/// How to connect a [`VhostUserBlk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserBlkOptions {
    /// Virtqueues (the backend must offer `VIRTIO_BLK_F_MQ` for more than 1).
    pub queues: u16,
    /// Descriptors per virtqueue: 64, 128, 256, 512 or 1024. Each queue
    /// holds `queue_size / 3` requests.
    pub queue_size: u16,
    /// Largest request: a non-zero multiple of 4096, at most 4 MiB
    /// (clamped to the device's `size_max`).
    pub max_request_bytes: u32,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` when offered.
    pub event_idx: bool,
    /// On EOF of the socket, reconnect to the same path and replay the
    /// set-up (see [`VhostUserTransport::reconnect`]) instead of failing
    /// with [`DeviceError::Disconnected`].
    pub reconnect: bool,
    /// How long one reconnect keeps trying.
    pub reconnect_timeout: Duration,
    /// How long the first connect retries a missing or refusing socket.
    pub connect_timeout: Duration,
    /// How long one set-up step may wait for the backend's replies
    /// ([`TransportOptions::reply_timeout`]).
    pub reply_timeout: Duration,
    /// Guest RAM size if this is the process's first device (raised to
    /// what the queues' request slots need).
    pub ram_bytes: u64,
}

impl Default for VhostUserBlkOptions {
    fn default() -> Self {
        VhostUserBlkOptions {
            queues: 1,
            queue_size: 256,
            max_request_bytes: 128 * 1024,
            event_idx: true,
            reconnect: false,
            reconnect_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            reply_timeout: REPLY_TIMEOUT,
            ram_bytes: DEFAULT_RAM_BYTES,
        }
    }
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// What the device supports, from its features and config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest read/write in bytes.
    pub max_request_bytes: u32,
    /// `VIRTIO_BLK_F_FLUSH`.
    pub flush: bool,
    /// `VIRTIO_BLK_F_DISCARD` with at least one segment.
    pub discard: bool,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
}

/// Where a request's data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataDir {
    None,
    ToDevice,
    FromDevice,
}

/// A validated request, ready to be laid out in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RequestPlan {
    type_: u32,
    sector: u64,
    data_len: u32,
    dir: DataDir,
}

fn invalid(msg: String) -> DeviceError {
    DeviceError::InvalidRequest(msg)
}

/// Checks `req` against the device and maps it to a virtio-blk request.
fn plan(req: &BlockRequest<'_>, limits: &Limits) -> Result<RequestPlan, DeviceError> {
    if req.op.has_range() {
        if req.sectors == 0 {
            return Err(invalid(format!("{:?} of 0 sectors", req.op)));
        }
        let in_range = req
            .sector
            .checked_add(u64::from(req.sectors))
            .is_some_and(|end| end <= limits.capacity);
        if !in_range {
            return Err(invalid(format!(
                "{:?} {}+{} beyond capacity {}",
                req.op, req.sector, req.sectors, limits.capacity
            )));
        }
    }
    if req.op.modifies_data() && limits.read_only {
        return Err(invalid(format!("{:?} on a read-only device", req.op)));
    }
    let bytes = u64::from(req.sectors) * SECTOR_SIZE;
    let data_len = |what: &str| {
        u32::try_from(bytes)
            .ok()
            .filter(|&b| b <= limits.max_request_bytes)
            .ok_or_else(|| {
                invalid(format!(
                    "{what} of {bytes} bytes exceeds {}",
                    limits.max_request_bytes
                ))
            })
    };
    match req.op {
        BlockOp::Read => Ok(RequestPlan {
            type_: VIRTIO_BLK_T_IN,
            sector: req.sector,
            data_len: data_len("read")?,
            dir: DataDir::FromDevice,
        }),
        BlockOp::Write => {
            let len = data_len("write")?;
            match req.data {
                Some(d) if d.len() as u64 == bytes => {}
                _ => return Err(invalid("write payload does not match its sectors".into())),
            }
            Ok(RequestPlan {
                type_: VIRTIO_BLK_T_OUT,
                sector: req.sector,
                data_len: len,
                dir: DataDir::ToDevice,
            })
        }
        BlockOp::Flush if limits.flush => Ok(RequestPlan {
            type_: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            data_len: 0,
            dir: DataDir::None,
        }),
        BlockOp::Discard if limits.discard => {
            if req.sectors > limits.max_discard_sectors {
                return Err(invalid(format!(
                    "discard of {} sectors exceeds {}",
                    req.sectors, limits.max_discard_sectors
                )));
            }
            Ok(RequestPlan {
                type_: VIRTIO_BLK_T_DISCARD,
                sector: 0,
                data_len: DISCARD_SEGMENT_BYTES,
                dir: DataDir::ToDevice,
            })
        }
        op => Err(invalid(format!("{op:?} not supported by the device"))),
    }
}

/// A `virtio_blk_outhdr`, little-endian (VIRTIO_F_VERSION_1).
fn header_bytes(type_: u32, sector: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[0..4].copy_from_slice(&type_.to_le_bytes());
    // ioprio (4..8) stays 0
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A `virtio_blk_discard_write_zeroes` segment, flags 0.
fn discard_segment(sector: u64, sectors: u32) -> [u8; DISCARD_SEGMENT_BYTES as usize] {
    let mut s = [0u8; DISCARD_SEGMENT_BYTES as usize];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s
}

/// Maps a virtio-blk status byte; anything unknown is an I/O error.
fn status_of(byte: u8) -> Status {
    match u32::from(byte) {
        VIRTIO_BLK_S_OK => Status::Ok,
        VIRTIO_BLK_S_UNSUPP => Status::NotSupported,
        VIRTIO_BLK_S_IOERR => Status::IoError,
        _ => {
            tracing::warn!(status = byte, "device wrote an unknown status");
            Status::IoError
        }
    }
}

/// What a slot in flight is for.
#[derive(Clone, Copy, Debug)]
enum SlotUse {
    Block {
        tag: u64,
        op: BlockOp,
        bytes: u32,
        want_data: bool,
    },
    /// `VIRTIO_BLK_T_GET_ID` number `seq` (see [`VhostUserBlk::get_id`]).
    GetId { seq: u64 },
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    chain: [ChainBuf; 3],
    chain_len: usize,
    use_: SlotUse,
    token: u16,
}

/// One virtqueue and its request slots.
struct BlkQueue {
    index: u16,
    size: u16,
    queue: RequestQueue,
    /// Slot headers and status bytes, [`SLOT_META_BYTES`] each.
    meta: DmaBuffer,
    /// Slot data areas, `data_stride` bytes each.
    data: DmaBuffer,
    data_stride: u64,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
    /// Head descriptor (token) → slot.
    by_token: Vec<Option<u16>>,
    in_flight: usize,
    used_gpa: u64,
    /// Used entries consumed (mirrors VirtQueue's own counter).
    last_used: u16,
    /// Chains published.
    avail_idx: u16,
    /// `avail_idx` when we last decided about a notification.
    notified_idx: u16,
}

impl BlkQueue {
    fn meta_gpa(&self, slot: u16, offset: u64) -> Result<u64, DeviceError> {
        self.meta
            .sub(u64::from(slot) * SLOT_META_BYTES + offset, 1)
            .ok_or_else(|| DeviceError::Transport("slot outside its buffer".into()))
    }
}

/// A virtio-blk device over vhost-user. See the module docs.
pub struct VhostUserBlk {
    opts: VhostUserBlkOptions,
    ram: &'static GuestRam,
    limits: Limits,
    event_idx: bool,
    queues: Vec<BlkQueue>,
    next_queue: usize,
    /// Completions reaped while waiting for something else (`get_id`).
    stash: Vec<Completion>,
    /// Number of the last `get_id` call; a `GET_ID` answered after its
    /// caller gave up carries an older one and is dropped.
    id_seq: u64,
    id_answer: Option<Result<String, DeviceError>>,
    dead: bool,
    reconnects: u64,
    /// Last: the rings are stopped before the slots' memory is freed.
    transport: VhostUserTransport,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("limits", &self.limits)
            .field("queues", &self.queues.len())
            .field("transport", &self.transport)
            .finish()
    }
}

fn le_u16(cfg: &[u8], off: usize) -> u16 {
    cfg.get(off..off + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn le_u32(cfg: &[u8], off: usize) -> u32 {
    cfg.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le_u64(cfg: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(b) = cfg.get(off..off + 8) {
        v.copy_from_slice(b);
    }
    u64::from_le_bytes(v)
}

impl VhostUserBlk {
    /// Connects to the vhost-user-blk backend at `socket_path`, negotiates
    /// features and starts `opts.queues` virtqueues.
    pub fn connect(
        socket_path: impl AsRef<std::path::Path>,
        opts: VhostUserBlkOptions,
    ) -> Result<Self, DeviceError> {
        if opts.queues == 0 || opts.queues > MAX_QUEUES {
            return Err(invalid(format!(
                "{} queues (1..={MAX_QUEUES})",
                opts.queues
            )));
        }
        if !RequestQueue::SIZES.contains(&opts.queue_size) {
            return Err(invalid(format!(
                "queue size {} (one of {:?})",
                opts.queue_size,
                RequestQueue::SIZES
            )));
        }
        if opts.max_request_bytes == 0
            || !opts.max_request_bytes.is_multiple_of(4096)
            || opts.max_request_bytes > MAX_REQUEST_BYTES
        {
            return Err(invalid(format!(
                "max request {} bytes (a multiple of 4096 up to {MAX_REQUEST_BYTES})",
                opts.max_request_bytes
            )));
        }
        // Slots of every queue, plus room for the rings and other devices.
        let slot_bytes = u64::from(opts.max_request_bytes) + SLOT_META_BYTES;
        let needed = u64::from(opts.queues)
            * u64::from(opts.queue_size / DESCRIPTORS_PER_REQUEST)
            * slot_bytes
            + (64 << 20);
        let ram_bytes = opts.ram_bytes.max(needed.next_multiple_of(4096));
        let ram = GuestRam::global(ram_bytes).map_err(DeviceError::Io)?;
        let mut t = VhostUserTransport::connect(
            socket_path,
            TransportOptions {
                queues: opts.queues,
                queue_size: opts.queue_size,
                connect_timeout: opts.connect_timeout,
                reply_timeout: opts.reply_timeout,
                ..TransportOptions::default()
            },
            ram,
        )?;

        // virtio 1.2 §3.1.1: reset, ACKNOWLEDGE|DRIVER, features, FEATURES_OK.
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(DeviceError::Transport(
                "device does not offer VIRTIO_F_VERSION_1 (legacy devices unsupported)".into(),
            ));
        }
        let mut wanted = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_DISCARD)
            | bit(VIRTIO_BLK_F_RO)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        if opts.queues > 1 {
            wanted |= bit(VIRTIO_BLK_F_MQ);
        }
        if opts.event_idx {
            wanted |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let acked = offered & wanted;
        t.write_driver_features(acked);
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        t.take_error()?;

        let limits = Self::read_limits(&t, acked, &opts)?;
        let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(opts.queues.into());
        for index in 0..opts.queues {
            queues.push(Self::make_queue(
                &mut t,
                ram,
                index,
                opts.queue_size,
                limits.max_request_bytes,
                event_idx,
            )?);
        }
        t.set_status(
            DeviceStatus::ACKNOWLEDGE
                | DeviceStatus::DRIVER
                | DeviceStatus::FEATURES_OK
                | DeviceStatus::DRIVER_OK,
        );
        t.take_error()?;
        tracing::debug!(?limits, event_idx, "vhost-user-blk connected");
        Ok(VhostUserBlk {
            opts,
            ram,
            limits,
            event_idx,
            queues,
            next_queue: 0,
            stash: Vec::new(),
            id_seq: 0,
            id_answer: None,
            dead: false,
            reconnects: 0,
            transport: t,
        })
    }

    fn read_limits(
        t: &VhostUserTransport,
        acked: u64,
        opts: &VhostUserBlkOptions,
    ) -> Result<Limits, DeviceError> {
        use std::mem::offset_of;
        let cfg = t.config();
        if cfg.is_empty() {
            return Err(DeviceError::Transport(
                "backend does not offer VHOST_USER_PROTOCOL_F_CONFIG".into(),
            ));
        }
        let has = |f: u32| acked & bit(f) != 0;
        let mut max_request_bytes = opts.max_request_bytes;
        if has(VIRTIO_BLK_F_SIZE_MAX) {
            // One data descriptor per request: it must fit one segment.
            let size_max = le_u32(cfg, offset_of!(virtio_blk_config, size_max));
            if size_max != 0 {
                max_request_bytes = max_request_bytes.min(size_max & !4095);
            }
            if max_request_bytes == 0 {
                return Err(DeviceError::Transport(format!(
                    "device size_max {size_max} is below 4 KiB"
                )));
            }
        }
        if has(VIRTIO_BLK_F_MQ) {
            let n = le_u16(cfg, offset_of!(virtio_blk_config, num_queues));
            if n < opts.queues {
                return Err(DeviceError::Transport(format!(
                    "device has {n} queues, {} wanted",
                    opts.queues
                )));
            }
        } else if opts.queues > 1 {
            return Err(DeviceError::Transport(
                "device does not offer VIRTIO_BLK_F_MQ".into(),
            ));
        }
        let max_discard_sectors = le_u32(cfg, offset_of!(virtio_blk_config, max_discard_sectors));
        let max_discard_seg = le_u32(cfg, offset_of!(virtio_blk_config, max_discard_seg));
        Ok(Limits {
            capacity: le_u64(cfg, offset_of!(virtio_blk_config, capacity)),
            max_request_bytes,
            flush: has(VIRTIO_BLK_F_FLUSH),
            discard: has(VIRTIO_BLK_F_DISCARD) && max_discard_seg >= 1 && max_discard_sectors > 0,
            max_discard_sectors,
            read_only: has(VIRTIO_BLK_F_RO),
        })
    }

    fn make_queue(
        t: &mut VhostUserTransport,
        ram: &'static GuestRam,
        index: u16,
        size: u16,
        max_request_bytes: u32,
        event_idx: bool,
    ) -> Result<BlkQueue, DeviceError> {
        let queue = RequestQueue::new(t, ram, index, size, event_idx)
            .map_err(|e| DeviceError::Transport(format!("virtqueue {index}: {e}")))?;
        t.take_error()?;
        let slots = size / DESCRIPTORS_PER_REQUEST;
        let exhausted = || DeviceError::Transport("guest RAM exhausted".into());
        let meta = ram
            .alloc(u64::from(slots) * SLOT_META_BYTES)
            .ok_or_else(exhausted)?;
        let data_stride = u64::from(max_request_bytes);
        let data = ram
            .alloc(u64::from(slots) * data_stride)
            .ok_or_else(exhausted)?;
        let used_gpa = t
            .used_ring(index)
            .ok_or_else(|| DeviceError::Transport(format!("no used ring for queue {index}")))?;
        Ok(BlkQueue {
            index,
            size,
            queue,
            meta,
            data,
            data_stride,
            slots: vec![None; usize::from(slots)],
            free: (0..slots).rev().collect(),
            by_token: vec![None; usize::from(size)],
            in_flight: 0,
            used_gpa,
            last_used: 0,
            avail_idx: 0,
            notified_idx: 0,
        })
    }

    /// What the device supports.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The transport (features, in-flight region, ...).
    pub fn transport(&self) -> &VhostUserTransport {
        &self.transport
    }

    /// Successful reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.in_flight).sum()
    }

    /// Issues `VIRTIO_BLK_T_GET_ID` and waits up to `timeout` for the
    /// device's serial (up to 20 bytes, NUL-terminated if shorter).
    /// Completions of other requests that arrive meanwhile are kept for the
    /// next [`BlockDevice::poll_completions`].
    pub fn get_id(&mut self, timeout: Duration) -> Result<String, DeviceError> {
        self.id_seq += 1;
        self.id_answer = None;
        let (q, slot) = self.take_slot()?;
        let hdr = header_bytes(VIRTIO_BLK_T_GET_ID, 0);
        let use_ = SlotUse::GetId { seq: self.id_seq };
        self.publish(q, slot, &hdr, ID_BYTES, DataDir::FromDevice, use_)?;
        self.kick()?;
        let deadline = deadline_after(timeout);
        let mut got = Vec::new();
        let answer = loop {
            if let Some(answer) = self.id_answer.take() {
                break answer;
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(DeviceError::Transport("GET_ID not answered in time".into()));
            }
            if let Err(e) = self.poll_inner(deadline - now, &mut got, true) {
                break Err(e);
            }
        };
        // Whatever else completed meanwhile goes to the next poll, even
        // when GET_ID failed.
        self.stash.append(&mut got);
        answer
    }

    /// Submits a virtio-blk request of any `type_`, checked against this
    /// driver's slot size but not against the device's features or
    /// limits: for requests [`BlockDevice`] has no op for
    /// (`VIRTIO_BLK_T_WRITE_ZEROES`) and for tests of the device's own
    /// validation (a write to a read-only device). `out` is the
    /// device-readable payload after the header (a write's data, discard
    /// or write-zeroes segments; may be empty), `in_bytes` the size of a
    /// device-writable buffer (a read's data; 0 for none); at most one of
    /// them is non-empty. The completion arrives from
    /// [`BlockDevice::poll_completions`] with `tag`, carrying the
    /// device-writable buffer as its data when the status is OK.
    pub fn submit_raw(
        &mut self,
        tag: u64,
        type_: u32,
        sector: u64,
        out: &[u8],
        in_bytes: u32,
    ) -> Result<(), DeviceError> {
        if !out.is_empty() && in_bytes != 0 {
            return Err(invalid("both a payload and a reply buffer".into()));
        }
        let (len, dir, op) = if in_bytes != 0 {
            (in_bytes, DataDir::FromDevice, BlockOp::Read)
        } else if out.is_empty() {
            (0, DataDir::None, BlockOp::Write)
        } else {
            let len = u32::try_from(out.len())
                .map_err(|_| invalid(format!("payload of {} bytes", out.len())))?;
            (len, DataDir::ToDevice, BlockOp::Write)
        };
        if len > self.limits.max_request_bytes {
            return Err(invalid(format!(
                "{len} bytes exceed the slot size {}",
                self.limits.max_request_bytes
            )));
        }
        let (qi, slot) = self.take_slot()?;
        let q = &self.queues[qi];
        if let Err(e) = q.data.write(u64::from(slot) * q.data_stride, out) {
            self.queues[qi].free.push(slot);
            return Err(DeviceError::Io(e));
        }
        let use_ = SlotUse::Block {
            tag,
            op,
            bytes: len,
            want_data: in_bytes != 0,
        };
        let hdr = header_bytes(type_, sector);
        self.publish(qi, slot, &hdr, len, dir, use_)
    }

    /// A queue with a free slot, round robin.
    fn take_slot(&mut self) -> Result<(usize, u16), DeviceError> {
        if self.dead {
            return Err(DeviceError::Disconnected);
        }
        let n = self.queues.len();
        for i in 0..n {
            let qi = (self.next_queue + i) % n;
            if let Some(slot) = self.queues[qi].free.pop() {
                self.next_queue = (qi + 1) % n;
                return Ok((qi, slot));
            }
        }
        Err(DeviceError::QueueFull)
    }

    /// A free slot of queue `qi`.
    fn take_slot_on(&mut self, qi: usize) -> Result<(usize, u16), DeviceError> {
        if self.dead {
            return Err(DeviceError::Disconnected);
        }
        let n = self.queues.len();
        let q = self
            .queues
            .get_mut(qi)
            .ok_or_else(|| invalid(format!("queue {qi} of {n}")))?;
        q.free
            .pop()
            .map(|slot| (qi, slot))
            .ok_or(DeviceError::QueueFull)
    }

    /// Submits `req` on queue `queue`, or (`None`) on the next queue with a
    /// free slot, round-robin.
    fn submit_on(
        &mut self,
        queue: Option<usize>,
        tag: u64,
        req: &BlockRequest<'_>,
    ) -> Result<(), DeviceError> {
        if self.dead {
            return Err(DeviceError::Disconnected);
        }
        let p = plan(req, &self.limits)?;
        let (qi, slot) = match queue {
            Some(qi) => self.take_slot_on(qi)?,
            None => self.take_slot()?,
        };
        let q = &self.queues[qi];
        let data_off = u64::from(slot) * q.data_stride;
        let staged = match req.op {
            BlockOp::Write => match req.data {
                Some(d) => q.data.write(data_off, d),
                None => Ok(()),
            },
            BlockOp::Discard => q
                .data
                .write(data_off, &discard_segment(req.sector, req.sectors)),
            _ => Ok(()),
        };
        if let Err(e) = staged {
            self.queues[qi].free.push(slot);
            return Err(DeviceError::Io(e));
        }
        let use_ = SlotUse::Block {
            tag,
            op: req.op,
            bytes: p.data_len,
            want_data: req.want_data,
        };
        let hdr = header_bytes(p.type_, p.sector);
        self.publish(qi, slot, &hdr, p.data_len, p.dir, use_)
    }

    /// Lays a request out in `slot` (data already written for writes) and
    /// publishes its chain. On error the slot is free again.
    fn publish(
        &mut self,
        qi: usize,
        slot: u16,
        hdr: &[u8; HEADER_BYTES as usize],
        data_len: u32,
        dir: DataDir,
        use_: SlotUse,
    ) -> Result<(), DeviceError> {
        let result = self.try_publish(qi, slot, hdr, data_len, dir, use_);
        if result.is_err() {
            self.queues[qi].free.push(slot);
        }
        result
    }

    fn try_publish(
        &mut self,
        qi: usize,
        slot: u16,
        hdr: &[u8; HEADER_BYTES as usize],
        data_len: u32,
        dir: DataDir,
        use_: SlotUse,
    ) -> Result<(), DeviceError> {
        let q = &mut self.queues[qi];
        let hdr_gpa = q.meta_gpa(slot, 0)?;
        let status_gpa = q.meta_gpa(slot, STATUS_OFFSET)?;
        self.ram.write(hdr_gpa, hdr).map_err(DeviceError::Io)?;
        self.ram
            .write(status_gpa, &[STATUS_UNSET])
            .map_err(DeviceError::Io)?;
        let header = ChainBuf {
            gpa: hdr_gpa,
            len: HEADER_BYTES,
            device_writes: false,
        };
        let status = ChainBuf {
            gpa: status_gpa,
            len: 1,
            device_writes: true,
        };
        let mut chain = [header, status, status];
        let chain_len = if dir == DataDir::None {
            2
        } else {
            let data_gpa = q
                .data
                .sub(u64::from(slot) * q.data_stride, u64::from(data_len))
                .ok_or_else(|| DeviceError::Transport("data outside its slot".into()))?;
            chain[1] = ChainBuf {
                gpa: data_gpa,
                len: data_len,
                device_writes: dir == DataDir::FromDevice,
            };
            3
        };
        let token = q.queue.add(&chain[..chain_len]).map_err(|e| match e {
            virtio_drivers::Error::QueueFull => DeviceError::QueueFull,
            e => DeviceError::Transport(format!("virtqueue add: {e}")),
        })?;
        match q.by_token.get_mut(usize::from(token)) {
            Some(entry @ None) => *entry = Some(slot),
            _ => {
                return Err(DeviceError::Transport(format!(
                    "virtqueue reused busy head {token}"
                )))
            }
        }
        q.slots[usize::from(slot)] = Some(InFlight {
            chain,
            chain_len,
            use_,
            token,
        });
        q.in_flight += 1;
        q.avail_idx = q.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Consumes every used entry of queue `qi`, validating each.
    fn reap(&mut self, qi: usize, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        let ram = self.ram;
        let used_idx = self.transport.used_idx(self.queues[qi].index)?;
        let q = &mut self.queues[qi];
        let pending = used_idx.wrapping_sub(q.last_used);
        if usize::from(pending) > q.in_flight {
            return Err(DeviceError::Transport(format!(
                "queue {}: used index advanced by {pending} with {} in flight",
                q.index, q.in_flight
            )));
        }
        for _ in 0..pending {
            let pos = u64::from(q.last_used % q.size);
            let elem = q.used_gpa + 4 + 8 * pos;
            // Relaxed: ordered after the Acquire load of used->idx above.
            let id: u32 = ram.load(elem, Ordering::Relaxed).map_err(DeviceError::Io)?;
            let slot = u16::try_from(id)
                .ok()
                .and_then(|t| q.by_token.get(usize::from(t)).copied().flatten())
                .ok_or_else(|| {
                    DeviceError::Transport(format!(
                        "queue {}: used id {id} is not a request in flight",
                        q.index
                    ))
                })?;
            let Some(req) = q.slots[usize::from(slot)] else {
                return Err(DeviceError::Transport("in-flight slot lost".into()));
            };
            q.queue
                .pop(req.token, &req.chain[..req.chain_len])
                .map_err(|e| DeviceError::Transport(format!("virtqueue pop: {e}")))?;
            q.by_token[usize::from(req.token)] = None;
            q.slots[usize::from(slot)] = None;
            q.last_used = q.last_used.wrapping_add(1);
            q.in_flight -= 1;
            let mut status = [STATUS_UNSET];
            let status_read = q
                .meta_gpa(slot, STATUS_OFFSET)
                .and_then(|gpa| ram.read(gpa, &mut status).map_err(DeviceError::Io));
            let data_off = u64::from(slot) * q.data_stride;
            let result = status_read.and_then(|()| {
                let status = status_of(status[0]);
                match req.use_ {
                    SlotUse::Block {
                        tag,
                        op,
                        bytes,
                        want_data,
                    } => {
                        let data = if op == BlockOp::Read && want_data && status == Status::Ok {
                            let mut buf = vec![0u8; bytes as usize];
                            q.data.read(data_off, &mut buf).map_err(DeviceError::Io)?;
                            Some(buf)
                        } else {
                            None
                        };
                        out.push(Completion { tag, status, data });
                    }
                    // A GET_ID whose caller gave up: nobody wants it.
                    SlotUse::GetId { seq } if seq != self.id_seq => {}
                    SlotUse::GetId { .. } => {
                        let answer = if status == Status::Ok {
                            let mut id = [0u8; ID_BYTES as usize];
                            q.data.read(data_off, &mut id).map_err(DeviceError::Io)?;
                            let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
                            Ok(String::from_utf8_lossy(&id[..len]).into_owned())
                        } else {
                            Err(DeviceError::Transport(format!("GET_ID: {status:?}")))
                        };
                        self.id_answer = Some(answer);
                    }
                }
                Ok(())
            });
            q.free.push(slot);
            result?;
        }
        Ok(())
    }

    fn any_used(&self) -> Result<bool, DeviceError> {
        for q in &self.queues {
            if self.transport.used_idx(q.index)? != q.last_used {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The backend hung up: reconnect if configured, else fail for good.
    fn on_disconnect(&mut self) -> Result<(), DeviceError> {
        if self.opts.reconnect {
            tracing::warn!("vhost-user backend hung up; reconnecting");
            match self.transport.reconnect(self.opts.reconnect_timeout) {
                Ok(()) => {
                    self.reconnects += 1;
                    // The backend resumes at used->idx; our notification
                    // bookkeeping restarts from what is published.
                    for q in &mut self.queues {
                        q.notified_idx = q.avail_idx;
                    }
                    return Ok(());
                }
                Err(e) => tracing::error!("reconnect failed: {e}"),
            }
        }
        self.dead = true;
        Err(DeviceError::Disconnected)
    }

    /// Waits up to `timeout` for completions (and, with `want_id`, for
    /// the answer to the pending `get_id`).
    fn poll_inner(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
        want_id: bool,
    ) -> Result<(), DeviceError> {
        let deadline = deadline_after(timeout);
        loop {
            if self.dead {
                return Err(DeviceError::Disconnected);
            }
            let before = out.len();
            out.append(&mut self.stash);
            for qi in 0..self.queues.len() {
                self.reap(qi, out)?;
            }
            if out.len() > before || (want_id && self.id_answer.is_some()) {
                return Ok(());
            }
            // Full barrier between publishing used_event (in pop) and
            // re-reading used->idx, so a completion racing with going to
            // sleep is either seen now or signalled (virtio 1.2 §2.7.10).
            fence(Ordering::SeqCst);
            if self.any_used()? {
                continue;
            }
            if self.transport.peer_gone()? {
                self.on_disconnect()?;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let wait = PollTimeout::try_from(deadline - now).unwrap_or(PollTimeout::MAX);
            {
                let mut fds: Vec<PollFd<'_>> = (0..self.queues.len() as u16)
                    .filter_map(|q| self.transport.call_fd(q))
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                    .collect();
                fds.push(PollFd::new(self.transport.socket_fd(), PollFlags::POLLIN));
                match poll(&mut fds, wait) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(DeviceError::Io(e.into())),
                }
            }
            self.transport.drain_calls();
        }
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        // Stop the rings (GET_VRING_BASE) before the slots' memory returns
        // to the allocator.
        if !self.dead {
            self.transport.set_status(DeviceStatus::empty());
        }
    }
}

impl BlockDevice for VhostUserBlk {
    fn capacity_sectors(&self) -> u64 {
        self.limits.capacity
    }

    fn max_in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.slots.len()).sum()
    }

    fn max_request_sectors(&self) -> u32 {
        self.limits.max_request_bytes / SECTOR_SIZE as u32
    }

    fn supports_discard(&self) -> bool {
        self.limits.discard
    }

    fn supports_flush(&self) -> bool {
        self.limits.flush
    }

    fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        self.submit_on(None, tag, req)
    }

    fn queues(&self) -> usize {
        self.queues.len()
    }

    fn submit_to(
        &mut self,
        queue: usize,
        tag: u64,
        req: &BlockRequest<'_>,
    ) -> Result<(), DeviceError> {
        self.submit_on(Some(queue), tag, req)
    }

    fn kick(&mut self) -> Result<(), DeviceError> {
        if self.dead {
            return Err(DeviceError::Disconnected);
        }
        for q in &mut self.queues {
            if q.avail_idx == q.notified_idx {
                continue;
            }
            // Full barrier between publishing avail->idx and reading the
            // device's suppression field (virtio 1.2 §2.7.13.4).
            fence(Ordering::SeqCst);
            let need = if self.event_idx {
                let avail_event = q.used_gpa + 4 + 8 * u64::from(q.size);
                let event: u16 = self
                    .ram
                    .load(avail_event, Ordering::Relaxed)
                    .map_err(DeviceError::Io)?;
                need_event(event, q.avail_idx, q.notified_idx)
            } else {
                let flags: u16 = self
                    .ram
                    .load(q.used_gpa, Ordering::Relaxed)
                    .map_err(DeviceError::Io)?;
                u32::from(flags) & VRING_USED_F_NO_NOTIFY == 0
            };
            q.notified_idx = q.avail_idx;
            if need {
                self.transport.kick(q.index)?;
            }
        }
        Ok(())
    }

    fn poll_completions(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<(), DeviceError> {
        self.poll_inner(timeout, out, false)
    }
}

/// The smoke path: `virtio-drivers`' own [`VirtIOBlk`] (queue size 16,
/// synchronous, busy-waits for completions) over the same transport.
pub type SimpleVirtioBlk = VirtIOBlk<GuestHal, VhostUserTransport>;

/// Connects `virtio-drivers`' [`VirtIOBlk`] to the backend at `socket_path`.
///
/// `VirtIOBlk` spins until each request completes, so a backend that dies
/// mid-request hangs the caller: use it for cross-checks, not crash tests.
pub fn connect_simple(
    socket_path: impl AsRef<std::path::Path>,
    ram_bytes: u64,
) -> Result<SimpleVirtioBlk, DeviceError> {
    let ram = GuestRam::global(ram_bytes).map_err(DeviceError::Io)?;
    let transport = VhostUserTransport::connect(
        socket_path,
        TransportOptions {
            queues: 1,
            queue_size: 16,
            ..TransportOptions::default()
        },
        ram,
    )?;
    VirtIOBlk::new(transport).map_err(|e| DeviceError::Transport(format!("VirtIOBlk: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            capacity: 1000,
            max_request_bytes: 8192,
            flush: true,
            discard: true,
            max_discard_sectors: 64,
            read_only: false,
        }
    }

    #[test]
    fn headers_and_segments_are_little_endian() {
        let h = header_bytes(VIRTIO_BLK_T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h[..4], [1, 0, 0, 0]);
        assert_eq!(h[4..8], [0; 4]);
        assert_eq!(h[8..], [8, 7, 6, 5, 4, 3, 2, 1]);
        let s = discard_segment(0x10, 0x20);
        assert_eq!(s[..8], [0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(s[8..12], [0x20, 0, 0, 0]);
        assert_eq!(s[12..], [0; 4], "flags 0: no unmap hint");
        assert_eq!(
            std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_outhdr>(),
            HEADER_BYTES as usize
        );
    }

    #[test]
    fn requests_map_to_virtio_blk() {
        let l = limits();
        let data = vec![0u8; 4096];
        let w = plan(&BlockRequest::write(8, &data), &l).unwrap();
        assert_eq!(
            w,
            RequestPlan {
                type_: VIRTIO_BLK_T_OUT,
                sector: 8,
                data_len: 4096,
                dir: DataDir::ToDevice
            }
        );
        let r = plan(&BlockRequest::read(992, 8, true), &l).unwrap();
        assert_eq!(
            (r.type_, r.dir, r.data_len),
            (VIRTIO_BLK_T_IN, DataDir::FromDevice, 4096)
        );
        let f = plan(&BlockRequest::flush(), &l).unwrap();
        assert_eq!(
            (f.type_, f.dir, f.data_len),
            (VIRTIO_BLK_T_FLUSH, DataDir::None, 0)
        );
        let d = plan(&BlockRequest::discard(0, 64), &l).unwrap();
        assert_eq!(
            (d.type_, d.data_len),
            (VIRTIO_BLK_T_DISCARD, DISCARD_SEGMENT_BYTES)
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let l = limits();
        let bad = |r: BlockRequest<'_>, l: &Limits| {
            matches!(plan(&r, l), Err(DeviceError::InvalidRequest(_)))
        };
        assert!(bad(BlockRequest::read(993, 8, false), &l), "past the end");
        assert!(bad(BlockRequest::read(u64::MAX, 8, false), &l), "overflow");
        assert!(bad(BlockRequest::read(0, 0, false), &l), "empty");
        assert!(bad(BlockRequest::read(0, 24, false), &l), "too large");
        assert!(bad(BlockRequest::discard(0, 65), &l), "discard too large");
        let short = vec![0u8; 100];
        let mut w = BlockRequest::write(0, &short);
        w.sectors = 1;
        assert!(bad(w, &l), "payload size mismatch");
        let no_flush = Limits {
            flush: false,
            discard: false,
            ..l
        };
        assert!(bad(BlockRequest::flush(), &no_flush));
        assert!(bad(BlockRequest::discard(0, 8), &no_flush));
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert!(bad(BlockRequest::write(0, &[0u8; 512]), &ro));
        assert!(!bad(BlockRequest::read(0, 1, false), &ro));
    }

    #[test]
    fn status_bytes_map_to_status() {
        assert_eq!(status_of(0), Status::Ok);
        assert_eq!(status_of(1), Status::IoError);
        assert_eq!(status_of(2), Status::NotSupported);
        assert_eq!(status_of(0xff), Status::IoError);
    }
}
