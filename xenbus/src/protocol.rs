//! Message kinds, key names and typed views of the messages in
//! `docs/PROTOCOL.md`.
//!
//! The codec in `message.rs` knows nothing about meanings; this module
//! turns the messages that carry meaning into structs, checking every value
//! range on the way in, so the supervisor and backends never index with an
//! unchecked guest number.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::str::FromStr;

use crate::error::XenbusError;
use crate::message::Message;
use crate::state::XenbusState;

/// Message kinds (first line of a message).
pub mod kind {
    /// Guest → supervisor: ask for a device's backend keys.
    pub const PROBE: &str = "probe";
    /// Supervisor → guest: backend keys, `state=2` (InitWait).
    pub const BACKEND: &str = "backend";
    /// Guest → supervisor: ring refs and 3 fds; attach the device.
    pub const CONNECT: &str = "connect";
    /// Supervisor → guest: backend keys, `state=4` (Connected).
    pub const CONNECTED: &str = "connected";
    /// Guest → supervisor: detach the device.
    pub const CLOSE: &str = "close";
    /// Supervisor → guest: detached, `state=6` (Closed).
    pub const CLOSED: &str = "closed";
    /// Either direction: failure with `code` and `message`; the socket is
    /// closed after it.
    pub const ERROR: &str = "error";
    /// Supervisor → backend: the connect keys plus `frontend`, and 3 fds.
    pub const ATTACH: &str = "attach";
    /// Backend → supervisor: the device is being served.
    pub const ATTACHED: &str = "attached";
    /// Supervisor → backend: stop serving the device.
    pub const DETACH: &str = "detach";
    /// Backend → supervisor: no longer touching the device.
    pub const DETACHED: &str = "detached";
    /// Backend → supervisor, unsolicited: the ring is corrupt.
    pub const DISCONNECT: &str = "disconnect";
    /// Supervisor → backend: abort on any request covering `sector`
    /// (fault injection); answered with [`OK`].
    pub const POISON: &str = "poison";
    /// Success answer with no payload (`poison`, `fault`).
    pub const OK: &str = "ok";
    /// Any client → supervisor: report every device's recovery counters;
    /// answered with one `status` per device, then [`STATUS_END`].
    pub const STATUS: &str = "status";
    /// Supervisor → client: the last answer to `status`.
    pub const STATUS_END: &str = "status-end";
    /// Any client → supervisor: inject a fault into a device's backend
    /// (`device`, `action`, `sector`); answered with [`OK`] or `error`.
    pub const FAULT: &str = "fault";
    /// Operator → supervisor: replace the supervisor's binary in place
    /// (`binary`, optional), keeping every connection and backend
    /// (docs/PROTOCOL.md §6a); answered by the new binary with
    /// [`UPGRADED`], or by the old one with `error`.
    pub const UPGRADE: &str = "upgrade";
    /// Supervisor → operator: the new binary took over (`pid`,
    /// `state-version`).
    pub const UPGRADED: &str = "upgraded";
    /// Supervisor → backend: a vhost-user device's virtqueues
    /// (docs/PROTOCOL.md §6b, [`crate::virtio`]); answered like [`ATTACH`].
    pub const ATTACH_VIRTIO: &str = "attach-virtio";
    /// Supervisor → backend: switch virtqueue `queue`'s call eventfd to the
    /// one descriptor that comes with the message; answered with [`OK`].
    pub const SET_CALL: &str = "set-call";
    /// Supervisor → spare backend: the device it takes over, as the
    /// arguments a backend started for it would have, with its metrics
    /// page and (a disk) its file (docs/PROTOCOL.md §6); answered with
    /// [`OK`].
    pub const ADOPT: &str = "adopt";
    /// Supervisor → backend: busy-loop without a heartbeat (fault
    /// injection); never answered.
    pub const SPIN: &str = "spin";
    /// Supervisor → backend: make a syscall outside the seccomp filter
    /// (fault injection): a confined backend is killed by SIGSYS; never
    /// answered.
    pub const SYSCALL: &str = "syscall";
    /// Operator → supervisor: export a new disk; its keys are a `[[disk]]`
    /// table's (docs/PROTOCOL.md §6a); answered with [`OK`] or `error`.
    pub const DISK_ADD: &str = "disk-add";
    /// Operator → supervisor: stop exporting disk `device` (`force=1`
    /// even while a frontend is attached); answered with [`OK`].
    pub const DISK_REMOVE: &str = "disk-remove";
    /// Operator → supervisor: list the disks; answered with one [`DISK`]
    /// per disk, then [`DISK_LIST_END`].
    pub const DISK_LIST: &str = "disk-list";
    /// Supervisor → operator: one disk of a [`DISK_LIST`] answer.
    pub const DISK: &str = "disk";
    /// Supervisor → operator: the last answer to [`DISK_LIST`].
    pub const DISK_LIST_END: &str = "disk-list-end";
    /// Operator → supervisor: resize disk `device` to `size` bytes (a block
    /// device: re-read its size); answered with [`OK`] and `sectors`.
    pub const DISK_RESIZE: &str = "disk-resize";
    /// Operator → supervisor: change run-time settings of disk `device`
    /// (the QoS keys); answered with [`OK`].
    pub const DISK_SET: &str = "disk-set";
    /// Supervisor → connected frontend, unsolicited: the backend keys
    /// changed (a resized disk's `sectors`), `state=4`.
    pub const CHANGED: &str = "changed";
    /// Supervisor → backend: the disk now has `sectors` sectors; answered
    /// with [`OK`].
    pub const RESIZE: &str = "resize";
    /// Supervisor → backend: new QoS limits ([`crate::protocol::QosLimits`]);
    /// answered with [`OK`].
    pub const QOS: &str = "qos";
    /// Supervisor → backend attached with `fence=1`: every earlier
    /// instance's I/O is gone; run what was held back
    /// (docs/ARCHITECTURE.md §7.3). Never answered.
    pub const FENCED: &str = "fenced";
    /// Backend → supervisor, from a panic hook or a fatal-signal handler:
    /// the instance is about to die; kill it and take over now
    /// (docs/ARCHITECTURE.md §7.2). Never answered.
    pub const DYING: &str = "dying";
}

/// Key names.
pub mod key {
    /// A spare's `ok` to `adopt`: µs from receiving it to being set up.
    pub const ADOPT_US: &str = "adopt-us";
    /// Device name, as configured in the supervisor.
    pub const DEVICE: &str = "device";
    /// XenBus state number.
    pub const STATE: &str = "state";
    /// Domain id the guest must name in its grant entries.
    pub const BACKEND_ID: &str = "backend-id";
    /// Domain id of the frontend.
    pub const FRONTEND_ID: &str = "frontend-id";
    /// Frontend identifier string (supervisor → backend only).
    pub const FRONTEND: &str = "frontend";
    /// Disk size in 512-byte sectors.
    pub const SECTORS: &str = "sectors";
    /// Logical sector size in bytes.
    pub const SECTOR_SIZE: &str = "sector-size";
    /// Physical sector size in bytes.
    pub const PHYSICAL_SECTOR_SIZE: &str = "physical-sector-size";
    /// `w` (read-write) or `r` (read-only).
    pub const MODE: &str = "mode";
    /// Backend honours `BLKIF_OP_FLUSH_DISKCACHE`.
    pub const FEATURE_FLUSH_CACHE: &str = "feature-flush-cache";
    /// Backend honours `BLKIF_OP_DISCARD`.
    pub const FEATURE_DISCARD: &str = "feature-discard";
    /// Discard granularity in bytes.
    pub const DISCARD_GRANULARITY: &str = "discard-granularity";
    /// Discard alignment in bytes.
    pub const DISCARD_ALIGNMENT: &str = "discard-alignment";
    /// Most segments of one `BLKIF_OP_INDIRECT` request.
    pub const FEATURE_MAX_INDIRECT_SEGMENTS: &str = "feature-max-indirect-segments";
    /// Largest ring page order the backend accepts.
    pub const MAX_RING_PAGE_ORDER: &str = "max-ring-page-order";
    /// `VDISK_*` flags.
    pub const INFO: &str = "info";
    /// log2 of the number of ring pages.
    pub const RING_PAGE_ORDER: &str = "ring-page-order";
    /// Grant ref of the single ring page (order 0).
    pub const RING_REF: &str = "ring-ref";
    /// Number of 4 KiB grant-table frames at the start of the region.
    pub const GRANT_FRAMES: &str = "grant-frames";
    /// Ring ABI, always [`PROTOCOL_X86_64`](super::PROTOCOL_X86_64).
    pub const PROTOCOL: &str = "protocol";
    /// Frontend keeps its data grants mapped across requests.
    pub const FEATURE_PERSISTENT: &str = "feature-persistent";
    /// Errno name of an `error` message.
    pub const CODE: &str = "code";
    /// Human text of an `error` message.
    pub const MESSAGE: &str = "message";
    /// Why a backend gave up a ring (`disconnect`).
    pub const REASON: &str = "reason";
    /// `attach`, `attach-virtio`: `1` when a previous instance served this
    /// attachment and the backend must replay the shadow log first.
    pub const RECOVER: &str = "recover";
    /// `attach`, `attach-virtio` with `recover=1`: `0` when the previous
    /// instance was killed or stopped by an operator fault, so its death
    /// does not count towards the crash-loop breaker.
    pub const BLAME: &str = "blame";
    /// `attach`, `attach-virtio` with `recover=1`: `1` while I/O of an
    /// earlier instance may still be in the kernel: hold back the logged
    /// requests and those overlapping them until [`kind::FENCED`]
    /// (docs/ARCHITECTURE.md §7.3).
    pub const FENCE: &str = "fence";
    /// `attached`: `1` when the backend registered for
    /// `MEMBARRIER_CMD_GLOBAL_EXPEDITED`, so a SIGKILL the supervisor sends
    /// can be proven final at once (docs/ARCHITECTURE.md §7.2).
    pub const MEMBARRIER: &str = "membarrier";
    /// `set-call`, `disconnect` of a virtio backend: a virtqueue index.
    pub const QUEUE: &str = "queue";
    /// `attach-virtio`: acked virtio features (hex).
    pub const FEATURES: &str = "features";
    /// `attach-virtio`: number of guest memory regions ([`region`]).
    pub const REGIONS: &str = "regions";
    /// `attach-virtio`: number of started virtqueues ([`queue_at`]).
    pub const QUEUES: &str = "queues";
    /// `attach-virtio`: the VMM's in-flight region, if any.
    pub const INFLIGHT: &str = "inflight";
    /// `attach-virtio`: `1` when one shadow log per queue follows.
    pub const SHADOW: &str = "shadow";
    /// `attached`: shadow-log generation of the answering instance.
    pub const GENERATION: &str = "generation";
    /// `attached`, `status`: requests re-executed from the shadow log.
    pub const REPLAYED: &str = "replayed";
    /// `attached`, `status`: saved responses re-pushed without re-execution.
    pub const REPUSHED: &str = "repushed";
    /// `attached`, `status`: requests failed by the crash-loop breaker.
    pub const POISONED: &str = "poisoned";
    /// `attached`, `status`: corrupt log entries answered with an error.
    pub const CORRUPT: &str = "corrupt";
    /// `attached`: microseconds the backend spent replaying.
    pub const REPLAY_US: &str = "replay-us";
    /// `poison`, `fault`: a 512-byte sector number.
    pub const SECTOR: &str = "sector";
    /// `fault`: one of [`action`](super::action).
    pub const ACTION: &str = "action";
    /// `upgrade`: the path of the binary to exec (default: the running
    /// one's path).
    pub const BINARY: &str = "binary";
    /// `upgraded`: the state version the new binary read.
    pub const STATE_VERSION: &str = "state-version";
    /// `status`: backend instances that died (crashed or were killed).
    pub const CRASHES: &str = "crashes";
    /// `status`: backend instances the watchdog declared hung.
    pub const HANGS: &str = "hangs";
    /// `status`: successful takeovers (`attached` after `recover=1`).
    pub const RECOVERIES: &str = "recoveries";
    /// `status`: `1` while a guest is attached.
    pub const CONNECTED: &str = "connected";
    /// `status`: process id of the serving backend (`0`: none).
    pub const PID: &str = "pid";
    /// `status`: process id of the hot standby (`0`: none).
    pub const STANDBY_PID: &str = "standby-pid";
    /// `status`: last recovery, failure start → declared (µs).
    pub const LAST_DETECT_US: &str = "last-detect-us";
    /// `status`: last recovery, SIGKILL sent → reaped (µs).
    pub const LAST_FENCE_US: &str = "last-fence-us";
    /// `status`: last recovery, instance chosen → `attach` sent (µs).
    pub const LAST_TAKEOVER_US: &str = "last-takeover-us";
    /// `status`: last recovery, the backend's `replay-us`.
    pub const LAST_REPLAY_US: &str = "last-replay-us";
    /// `status`: last recovery, failure seen → `attached` (µs).
    pub const LAST_TOTAL_US: &str = "last-total-us";
    /// `disk-remove`: `1` to remove a disk a frontend is attached to.
    pub const FORCE: &str = "force";
    /// `disk-resize`: the new size in bytes.
    pub const SIZE: &str = "size";
    /// `disk`: the image's path.
    pub const PATH: &str = "path";
    /// `disk`: `1` for a read-only disk.
    pub const READONLY: &str = "readonly";
    /// `disk`: the disk's vhost-user socket, if it has one.
    pub const VHOST_USER: &str = "vhost-user";
    /// `qos`: requests per second (0: no limit).
    pub const IOPS_LIMIT: &str = "iops-limit";
    /// `qos`: requests the bucket holds (0: a tenth of a second's worth).
    pub const IOPS_BURST: &str = "iops-burst";
    /// `qos`: bytes per second (0: no limit).
    pub const BYTES_LIMIT: &str = "bytes-limit";
    /// `qos`: bytes the bucket holds (0: a tenth of a second's worth).
    pub const BYTES_BURST: &str = "bytes-burst";

    /// `ring-ref{index}`, the key of ring page `index` when the order is > 0.
    pub fn ring_ref(index: usize) -> String {
        format!("{RING_REF}{index}")
    }

    /// `region-{index}`: guest memory region `index` of `attach-virtio`.
    pub fn region(index: usize) -> String {
        format!("region-{index}")
    }

    /// `queue-{index}`: the `index`-th started virtqueue of
    /// `attach-virtio` (not the virtqueue number, which it carries).
    pub fn queue_at(index: usize) -> String {
        format!("{QUEUE}-{index}")
    }
}

/// A disk's QoS limits as a backend gets them (`qos`, and the
/// `--iops-limit` … arguments of a new instance): two token buckets, one
/// for requests and one for bytes, each a rate and a size; 0 is no limit
/// (a rate) or a tenth of a second's worth (a size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub iops: u64,
    pub iops_burst: u64,
    pub bytes: u64,
    pub bytes_burst: u64,
}

impl QosLimits {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.iops > 0 || self.bytes > 0
    }

    /// The `qos` message.
    pub fn to_message(&self) -> Message {
        Message::new(kind::QOS)
            .with(key::IOPS_LIMIT, self.iops)
            .with(key::IOPS_BURST, self.iops_burst)
            .with(key::BYTES_LIMIT, self.bytes)
            .with(key::BYTES_BURST, self.bytes_burst)
    }

    /// Parses a `qos` message (an absent key is 0).
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(kind::QOS)?;
        let n = |k| msg.get_u64(k).map(|v| v.unwrap_or(0));
        Ok(QosLimits {
            iops: n(key::IOPS_LIMIT)?,
            iops_burst: n(key::IOPS_BURST)?,
            bytes: n(key::BYTES_LIMIT)?,
            bytes_burst: n(key::BYTES_BURST)?,
        })
    }
}

/// Values of the `action` key of a `fault` message.
pub mod action {
    /// SIGKILL the serving backend.
    pub const KILL: &str = "kill";
    /// SIGSTOP it.
    pub const HANG: &str = "hang";
    /// Make it busy-loop without a heartbeat (`spin`).
    pub const SPIN: &str = "spin";
    /// Make every instance abort on requests covering `sector`.
    pub const POISON: &str = "poison";
    /// Make it call a syscall its seccomp filter forbids (`syscall`).
    pub const SYSCALL: &str = "syscall";
}

/// The only ring ABI this protocol speaks.
pub const PROTOCOL_X86_64: &str = "x86_64-abi";
/// Protocol ceiling for `ring-page-order` (16 ring pages), as Xen's
/// `XENBUS_MAX_RING_GRANT_ORDER`.
pub const MAX_RING_PAGE_ORDER: u8 = 4;
/// Size of a page of the shared region, and of a grant-table frame.
pub const PAGE_SIZE: u64 = 4096;
/// `grant_entry_v1` entries per grant-table frame.
pub const GRANT_ENTRIES_PER_FRAME: u64 = PAGE_SIZE / 8;
/// File descriptors carried by `connect` and `attach`.
pub const DEVICE_FDS: usize = 3;
/// `VDISK_CDROM` bit of `info`.
pub const VDISK_CDROM: u32 = 1;
/// `VDISK_REMOVABLE` bit of `info`.
pub const VDISK_REMOVABLE: u32 = 2;
/// `VDISK_READONLY` bit of `info`.
pub const VDISK_READONLY: u32 = 4;

/// The errno names an `error` message may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed message, missing or out-of-range key, wrong fds.
    Einval,
    /// No such device.
    Enoent,
    /// The device is already connected to another frontend.
    Ebusy,
    /// More than the backend allows (ring order, region size).
    E2big,
    /// Protocol violation: out-of-sequence message, or a corrupt ring.
    Eproto,
    /// The backend cannot serve the device (failed to start, gave up).
    Enodev,
    /// The peer (`SO_PEERCRED`) may not use the device, or is not an
    /// operator.
    Eacces,
    /// Too many attaches of the device in the last second
    /// (`attaches_per_second`): try again later.
    Eagain,
}

impl ErrorCode {
    /// The errno name written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Einval => "EINVAL",
            Self::Enoent => "ENOENT",
            Self::Ebusy => "EBUSY",
            Self::E2big => "E2BIG",
            Self::Eproto => "EPROTO",
            Self::Enodev => "ENODEV",
            Self::Eacces => "EACCES",
            Self::Eagain => "EAGAIN",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = XenbusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "EINVAL" => Self::Einval,
            "ENOENT" => Self::Enoent,
            "EBUSY" => Self::Ebusy,
            "E2BIG" => Self::E2big,
            "EPROTO" => Self::Eproto,
            "ENODEV" => Self::Enodev,
            "EACCES" => Self::Eacces,
            "EAGAIN" => Self::Eagain,
            _ => return Err(XenbusError::invalid(key::CODE, s, "unknown error code")),
        })
    }
}

/// Access mode of a disk (`mode` key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskMode {
    /// `w`
    ReadWrite,
    /// `r`
    ReadOnly,
}

impl DiskMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::ReadWrite => "w",
            Self::ReadOnly => "r",
        }
    }
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Message {
    /// The `state` key as a [`XenbusState`].
    pub fn state(&self) -> Result<XenbusState, XenbusError> {
        self.require(key::STATE)?.parse()
    }

    /// A `probe` for `device`.
    pub fn probe(device: &str) -> Self {
        Self::new(kind::PROBE).with(key::DEVICE, device)
    }
}

/// The backend keys of a block device, sent in `backend` (InitWait) and
/// `connected` (Connected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Domain id the guest must put in `grant_entry_v1.domid`.
    pub backend_id: u16,
    /// Disk size in 512-byte units, whatever the sector size.
    pub sectors: u64,
    /// Logical sector size: 512 or 4096.
    pub sector_size: u32,
    /// Physical sector size: a power of two, at least `sector_size`.
    pub physical_sector_size: u32,
    /// Read-write or read-only.
    pub mode: DiskMode,
    /// `BLKIF_OP_FLUSH_DISKCACHE` is honoured.
    pub feature_flush_cache: bool,
    /// `BLKIF_OP_DISCARD` is honoured.
    pub feature_discard: bool,
    /// Discard granularity in bytes.
    pub discard_granularity: u32,
    /// Discard alignment in bytes.
    pub discard_alignment: u32,
    /// Most segments in one indirect request (0: no indirect requests).
    pub max_indirect_segments: u32,
    /// Largest `ring-page-order` accepted, at most [`MAX_RING_PAGE_ORDER`].
    pub max_ring_page_order: u8,
    /// `VDISK_*` flags.
    pub info: u32,
}

impl BackendInfo {
    /// The `backend` answer to a `probe` (`state=2`, InitWait).
    pub fn backend_message(&self) -> Message {
        self.message(kind::BACKEND, XenbusState::InitWait)
    }

    /// The `connected` answer to a `connect` (`state=4`, Connected).
    pub fn connected_message(&self) -> Message {
        self.message(kind::CONNECTED, XenbusState::Connected)
    }

    fn message(&self, kind: &str, state: XenbusState) -> Message {
        Message::new(kind)
            .with(key::STATE, state)
            .with(key::BACKEND_ID, self.backend_id)
            .with(key::SECTORS, self.sectors)
            .with(key::SECTOR_SIZE, self.sector_size)
            .with(key::PHYSICAL_SECTOR_SIZE, self.physical_sector_size)
            .with(key::MODE, self.mode)
            .with(key::FEATURE_FLUSH_CACHE, u8::from(self.feature_flush_cache))
            .with(key::FEATURE_DISCARD, u8::from(self.feature_discard))
            .with(key::DISCARD_GRANULARITY, self.discard_granularity)
            .with(key::DISCARD_ALIGNMENT, self.discard_alignment)
            .with(
                key::FEATURE_MAX_INDIRECT_SEGMENTS,
                self.max_indirect_segments,
            )
            .with(key::MAX_RING_PAGE_ORDER, self.max_ring_page_order)
            .with(key::INFO, self.info)
    }

    /// Parses a `backend` or `connected` message; the `state` key must match
    /// the kind (2 or 4).
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        let expected_state = match msg.kind() {
            kind::BACKEND => XenbusState::InitWait,
            kind::CONNECTED => XenbusState::Connected,
            other => {
                return Err(XenbusError::UnexpectedKind {
                    expected: "backend or connected",
                    got: other.to_owned(),
                })
            }
        };
        let state = msg.state()?;
        if state != expected_state {
            return Err(XenbusError::invalid(
                key::STATE,
                msg.require(key::STATE)?,
                "state does not match the message kind",
            ));
        }
        let sector_size = msg.require_u32(key::SECTOR_SIZE)?;
        if sector_size != 512 && sector_size != 4096 {
            return Err(XenbusError::invalid(
                key::SECTOR_SIZE,
                msg.require(key::SECTOR_SIZE)?,
                "expected 512 or 4096",
            ));
        }
        let physical_sector_size = msg.require_u32(key::PHYSICAL_SECTOR_SIZE)?;
        if !physical_sector_size.is_power_of_two() || physical_sector_size < sector_size {
            return Err(XenbusError::invalid(
                key::PHYSICAL_SECTOR_SIZE,
                msg.require(key::PHYSICAL_SECTOR_SIZE)?,
                "expected a power of two no smaller than sector-size",
            ));
        }
        let mode = match msg.require(key::MODE)? {
            "w" => DiskMode::ReadWrite,
            "r" => DiskMode::ReadOnly,
            other => return Err(XenbusError::invalid(key::MODE, other, "expected w or r")),
        };
        Ok(Self {
            backend_id: msg.require_u16(key::BACKEND_ID)?,
            sectors: msg.require_u64(key::SECTORS)?,
            sector_size,
            physical_sector_size,
            mode,
            feature_flush_cache: msg.require_flag(key::FEATURE_FLUSH_CACHE)?,
            feature_discard: msg.require_flag(key::FEATURE_DISCARD)?,
            discard_granularity: msg.require_u32(key::DISCARD_GRANULARITY)?,
            discard_alignment: msg.require_u32(key::DISCARD_ALIGNMENT)?,
            max_indirect_segments: msg.require_u32(key::FEATURE_MAX_INDIRECT_SEGMENTS)?,
            max_ring_page_order: ring_page_order(msg, key::MAX_RING_PAGE_ORDER)?.ok_or_else(
                || XenbusError::MissingKey {
                    key: key::MAX_RING_PAGE_ORDER.to_owned(),
                },
            )?,
            info: msg.require_u32(key::INFO)?,
        })
    }
}

/// What a frontend sets up for one device: the keys of `connect` (and of
/// `attach`, which adds `frontend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Device name.
    pub device: String,
    /// The frontend's domain id.
    pub frontend_id: u16,
    /// Grant refs of the ring pages, in ring order; the length is
    /// `2^ring-page-order`, between 1 and `2^MAX_RING_PAGE_ORDER`.
    pub ring_refs: Vec<u32>,
    /// Number of 4 KiB grant-table frames at the start of the region (≥ 1).
    pub grant_frames: u32,
    /// The frontend set `feature-persistent=1`.
    pub feature_persistent: bool,
}

impl ConnectRequest {
    /// log2 of the number of ring pages, or `None` when `ring_refs` is not a
    /// power of two no larger than `2^MAX_RING_PAGE_ORDER`.
    pub fn ring_page_order(&self) -> Option<u8> {
        let n = self.ring_refs.len();
        let order = u8::try_from(n.trailing_zeros()).ok()?;
        (n.is_power_of_two() && order <= MAX_RING_PAGE_ORDER).then_some(order)
    }

    /// The `connect` message.
    pub fn to_message(&self) -> Result<Message, XenbusError> {
        self.write_keys(Message::new(kind::CONNECT))
    }

    fn write_keys(&self, msg: Message) -> Result<Message, XenbusError> {
        let order = self.ring_page_order().ok_or_else(|| {
            XenbusError::invalid(
                key::RING_PAGE_ORDER,
                &self.ring_refs.len().to_string(),
                "ring page count must be a power of two up to 16",
            )
        })?;
        let mut msg = msg
            .with(key::DEVICE, &self.device)
            .with(key::FRONTEND_ID, self.frontend_id)
            .with(key::RING_PAGE_ORDER, order)
            .with(key::GRANT_FRAMES, self.grant_frames)
            .with(key::PROTOCOL, PROTOCOL_X86_64);
        if order == 0 {
            msg.set(key::RING_REF, self.ring_refs[0]);
        } else {
            for (index, gref) in self.ring_refs.iter().enumerate() {
                msg.set(&key::ring_ref(index), gref);
            }
        }
        if self.feature_persistent {
            msg.set(key::FEATURE_PERSISTENT, 1);
        }
        Ok(msg)
    }

    /// Parses a `connect` message.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(kind::CONNECT)?;
        Self::from_keys(msg)
    }

    fn from_keys(msg: &Message) -> Result<Self, XenbusError> {
        let device = msg.require(key::DEVICE)?;
        if device.is_empty() {
            return Err(XenbusError::invalid(
                key::DEVICE,
                device,
                "empty device name",
            ));
        }
        let order = ring_page_order(msg, key::RING_PAGE_ORDER)?.unwrap_or(0);
        let indexed_keys: Vec<String> = if order == 0 {
            Vec::new()
        } else {
            (0..1usize << order).map(key::ring_ref).collect()
        };
        let ring_refs = if order == 0 {
            vec![msg.require_u32(key::RING_REF)?]
        } else {
            reject_key(msg, key::RING_REF, "ring-page-order > 0: use ring-ref0..")?;
            indexed_keys
                .iter()
                .map(|name| msg.require_u32(name))
                .collect::<Result<Vec<_>, _>>()?
        };
        // A ring-refN the order does not call for means the frontend and we
        // disagree about the ring size: refuse rather than guess.
        for (name, value) in msg.iter() {
            let indexed = name
                .strip_prefix(key::RING_REF)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
            if indexed && !indexed_keys.iter().any(|k| k == name) {
                return Err(XenbusError::invalid(
                    name,
                    value,
                    "ring-ref index does not match ring-page-order",
                ));
            }
        }
        let grant_frames = msg.require_u32(key::GRANT_FRAMES)?;
        if grant_frames == 0 {
            return Err(XenbusError::invalid(
                key::GRANT_FRAMES,
                msg.require(key::GRANT_FRAMES)?,
                "at least one grant-table frame is required",
            ));
        }
        let entries = u64::from(grant_frames) * GRANT_ENTRIES_PER_FRAME;
        if let Some(index) = ring_refs.iter().position(|&r| u64::from(r) >= entries) {
            let name = if order == 0 {
                key::RING_REF.to_owned()
            } else {
                key::ring_ref(index)
            };
            return Err(XenbusError::invalid(
                &name,
                &ring_refs[index].to_string(),
                "grant ref beyond the grant table",
            ));
        }
        let protocol = msg.require(key::PROTOCOL)?;
        if protocol != PROTOCOL_X86_64 {
            return Err(XenbusError::invalid(
                key::PROTOCOL,
                protocol,
                "only x86_64-abi is supported",
            ));
        }
        Ok(Self {
            device: device.to_owned(),
            frontend_id: msg.require_u16(key::FRONTEND_ID)?,
            ring_refs,
            grant_frames,
            feature_persistent: msg.get_flag(key::FEATURE_PERSISTENT)?.unwrap_or(false),
        })
    }
}

/// Supervisor → backend: a [`ConnectRequest`] plus the frontend's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    /// Identifies the frontend (for logs and metrics).
    pub frontend: String,
    /// What the frontend sent in `connect`.
    pub connect: ConnectRequest,
}

impl AttachRequest {
    /// The `attach` message.
    pub fn to_message(&self) -> Result<Message, XenbusError> {
        self.connect
            .write_keys(Message::new(kind::ATTACH))
            .map(|msg| msg.with(key::FRONTEND, &self.frontend))
    }

    /// Parses an `attach` message.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(kind::ATTACH)?;
        Ok(Self {
            frontend: msg.require(key::FRONTEND)?.to_owned(),
            connect: ConnectRequest::from_keys(msg)?,
        })
    }
}

/// The three descriptors of `connect` and `attach`, in wire order.
#[derive(Debug)]
pub struct DeviceFds {
    /// \[0\] memfd of the guest's granted region; grant table first.
    pub region: OwnedFd,
    /// \[1\] eventfd the frontend writes to kick the backend.
    pub kick: OwnedFd,
    /// \[2\] eventfd the backend writes to notify the frontend.
    pub notify: OwnedFd,
}

impl DeviceFds {
    /// Takes the descriptors received with a `connect` or `attach`
    /// message; any other count is [`XenbusError::FdCount`] (and the
    /// descriptors are closed).
    pub fn from_received(msg: &Message, fds: Vec<OwnedFd>) -> Result<Self, XenbusError> {
        let got = fds.len();
        let Ok([region, kick, notify]) = <[OwnedFd; DEVICE_FDS]>::try_from(fds) else {
            return Err(XenbusError::FdCount {
                kind: msg.kind().to_owned(),
                expected: DEVICE_FDS,
                got,
            });
        };
        Ok(Self {
            region,
            kick,
            notify,
        })
    }

    /// Checks the descriptors before anything maps or polls them: the
    /// region as [`check_region`] does, the other two must be eventfds.
    /// Returns the region size in pages.
    pub fn check(&self, req: &ConnectRequest) -> Result<u64, XenbusError> {
        let pages = check_region(self.region.as_fd(), req.grant_frames)?;
        for (index, fd) in [(1, &self.kick), (2, &self.notify)] {
            if !is_eventfd(fd.as_fd())? {
                return Err(XenbusError::BadFd {
                    index,
                    reason: "not an eventfd",
                });
            }
        }
        Ok(pages)
    }

    /// Borrowed descriptors in wire order, for [`crate::SeqPacket::send`].
    pub fn as_borrowed(&self) -> [BorrowedFd<'_>; DEVICE_FDS] {
        [self.region.as_fd(), self.kick.as_fd(), self.notify.as_fd()]
    }
}

/// `TMPFS_MAGIC` (`linux/magic.h`): the file system of a plain memfd.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Checks a guest's granted region (descriptor 0 of a disk's or a vif's
/// `connect`) before anything maps it: a memfd on shmem (`fstatfs` says
/// tmpfs), sealed with `F_SEAL_SHRINK`, writable (no `F_SEAL_WRITE` or
/// `F_SEAL_FUTURE_WRITE`), a whole number of 4 KiB pages and larger than
/// the grant table of `grant_frames` frames. Returns its size in pages.
///
/// Every page of such a region exists for as long as it is mapped: it
/// cannot shrink, and a hole the guest punches reads back as zeros. A
/// `MFD_HUGETLB` memfd (hugetlbfs) is refused even when sealed: a page of
/// it the host's huge-page pool cannot supply — or one the guest punched
/// out — is SIGBUS on first touch, in the supervisor or a backend
/// (docs/ARCHITECTURE.md §2).
pub fn check_region(region: BorrowedFd<'_>, grant_frames: u32) -> Result<u64, XenbusError> {
    use rustix::fs::{fcntl_get_seals, fstat, fstatfs, FileType, SealFlags};

    let bad = |reason| XenbusError::BadFd { index: 0, reason };
    let stat = fstat(region)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(bad("region is not a memfd"));
    }
    let seals = fcntl_get_seals(region).map_err(|_| bad("region is not a memfd"))?;
    let fs = fstatfs(region)?;
    if u64::try_from(fs.f_type).ok() != Some(TMPFS_MAGIC) {
        return Err(bad(
            "region is not a shmem memfd (hugetlbfs memory can fault: refused)",
        ));
    }
    if !seals.contains(SealFlags::SHRINK) {
        return Err(bad("region is not sealed with F_SEAL_SHRINK"));
    }
    if seals.intersects(SealFlags::WRITE | SealFlags::FUTURE_WRITE) {
        return Err(bad("region is sealed against writes"));
    }
    let size = u64::try_from(stat.st_size).map_err(|_| bad("negative region size"))?;
    if size == 0 || size % PAGE_SIZE != 0 {
        return Err(bad("region size is not a non-zero multiple of 4096"));
    }
    let pages = size / PAGE_SIZE;
    if pages <= u64::from(grant_frames) {
        return Err(bad("region holds no page beyond the grant table"));
    }
    Ok(pages)
}

/// Checks that a message arrived without descriptors (every kind except
/// `connect` and `attach`). Descriptors that did arrive are closed.
pub fn expect_no_fds(msg: &Message, fds: Vec<OwnedFd>) -> Result<(), XenbusError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(XenbusError::FdCount {
            kind: msg.kind().to_owned(),
            expected: 0,
            got: fds.len(),
        })
    }
}

/// Whether `fd` is an eventfd (every event channel must be one).
pub fn is_eventfd(fd: BorrowedFd<'_>) -> Result<bool, XenbusError> {
    use std::os::fd::AsRawFd;

    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(link.as_os_str() == "anon_inode:[eventfd]")
}

fn ring_page_order(msg: &Message, name: &str) -> Result<Option<u8>, XenbusError> {
    let Some(order) = msg.get_u64(name)? else {
        return Ok(None);
    };
    match u8::try_from(order) {
        Ok(order) if order <= MAX_RING_PAGE_ORDER => Ok(Some(order)),
        _ => Err(XenbusError::invalid(
            name,
            msg.get(name).unwrap_or_default(),
            "ring page order above 4",
        )),
    }
}

fn reject_key(msg: &Message, name: &str, reason: &'static str) -> Result<(), XenbusError> {
    match msg.get(name) {
        Some(value) => Err(XenbusError::invalid(name, value, reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spellings of docs/PROTOCOL.md §6, §6b and §7: backends written
    /// against the document must keep understanding the constants.
    #[test]
    fn control_keys_are_spelled_as_documented() {
        assert_eq!(
            [
                kind::ATTACH_VIRTIO,
                kind::SET_CALL,
                kind::SPIN,
                kind::SYSCALL,
                kind::ADOPT,
                kind::FENCED,
                kind::DYING
            ],
            [
                "attach-virtio",
                "set-call",
                "spin",
                "syscall",
                "adopt",
                "fenced",
                "dying"
            ]
        );
        assert_eq!(
            [
                kind::UPGRADE,
                kind::UPGRADED,
                key::BINARY,
                key::STATE_VERSION
            ],
            ["upgrade", "upgraded", "binary", "state-version"]
        );
        assert_eq!(
            [
                key::RECOVER,
                key::BLAME,
                key::QUEUE,
                key::SHADOW,
                key::FENCE
            ],
            ["recover", "blame", "queue", "shadow", "fence"]
        );
        assert_eq!(
            [
                kind::DISK_ADD,
                kind::DISK_REMOVE,
                kind::DISK_LIST,
                kind::DISK,
                kind::DISK_LIST_END,
                kind::DISK_RESIZE,
                kind::DISK_SET,
                kind::CHANGED,
                kind::RESIZE,
                kind::QOS
            ],
            [
                "disk-add",
                "disk-remove",
                "disk-list",
                "disk",
                "disk-list-end",
                "disk-resize",
                "disk-set",
                "changed",
                "resize",
                "qos"
            ]
        );
        assert_eq!(
            [
                key::FORCE,
                key::SIZE,
                key::IOPS_LIMIT,
                key::IOPS_BURST,
                key::BYTES_LIMIT,
                key::BYTES_BURST
            ],
            [
                "force",
                "size",
                "iops-limit",
                "iops-burst",
                "bytes-limit",
                "bytes-burst"
            ]
        );
        assert_eq!(
            [key::FEATURES, key::REGIONS, key::QUEUES, key::INFLIGHT],
            ["features", "regions", "queues", "inflight"]
        );
        assert_eq!(
            (key::region(2), key::queue_at(15)),
            ("region-2".to_string(), "queue-15".to_string())
        );
        assert_eq!(
            [
                action::KILL,
                action::HANG,
                action::SPIN,
                action::POISON,
                action::SYSCALL
            ],
            ["kill", "hang", "spin", "poison", "syscall"]
        );
    }

    fn disk() -> BackendInfo {
        BackendInfo {
            backend_id: 1,
            sectors: 2048,
            sector_size: 512,
            physical_sector_size: 4096,
            mode: DiskMode::ReadWrite,
            feature_flush_cache: true,
            feature_discard: true,
            discard_granularity: 4096,
            discard_alignment: 0,
            max_indirect_segments: 256,
            max_ring_page_order: 4,
            info: 0,
        }
    }

    fn connect(pages: usize) -> ConnectRequest {
        ConnectRequest {
            device: "xvda".into(),
            frontend_id: 3,
            ring_refs: (0..pages).map(|i| 8 + i as u32).collect(),
            grant_frames: 1,
            feature_persistent: false,
        }
    }

    fn wire(msg: &Message) -> Message {
        Message::decode(&msg.encode().unwrap()).unwrap()
    }

    #[test]
    fn qos_limits_round_trip() {
        let q = QosLimits {
            iops: 2000,
            iops_burst: 0,
            bytes: 1 << 20,
            bytes_burst: 5,
        };
        assert_eq!(QosLimits::from_message(&wire(&q.to_message())).unwrap(), q);
        assert!(q.is_limited() && !QosLimits::default().is_limited());
        let partial = Message::new(kind::QOS).with(key::IOPS_LIMIT, 7);
        assert_eq!(QosLimits::from_message(&partial).unwrap().iops, 7);
        let bad = Message::new(kind::QOS).with(key::BYTES_LIMIT, "-1");
        assert!(QosLimits::from_message(&bad).is_err());
        assert!(QosLimits::from_message(&Message::new(kind::OK)).is_err());
    }

    #[test]
    fn backend_info_round_trip() {
        let info = disk();
        let msg = wire(&info.backend_message());
        assert_eq!(msg.kind(), kind::BACKEND);
        assert_eq!(msg.state().unwrap(), XenbusState::InitWait);
        assert_eq!(msg.get(key::FEATURE_FLUSH_CACHE), Some("1"));
        assert_eq!(msg.get(key::MODE), Some("w"));
        assert_eq!(BackendInfo::from_message(&msg).unwrap(), info);
        let msg = wire(&info.connected_message());
        assert_eq!(msg.state().unwrap(), XenbusState::Connected);
        assert_eq!(BackendInfo::from_message(&msg).unwrap(), info);
    }

    #[test]
    fn backend_info_rejects_out_of_range() {
        let base = disk().backend_message();
        for (k, v) in [
            (key::SECTOR_SIZE, "1024"),
            (key::PHYSICAL_SECTOR_SIZE, "256"),
            (key::PHYSICAL_SECTOR_SIZE, "1536"),
            (key::MODE, "rw"),
            (key::STATE, "4"),
            (key::MAX_RING_PAGE_ORDER, "5"),
            (key::BACKEND_ID, "65536"),
            (key::FEATURE_DISCARD, "2"),
        ] {
            let msg = base.clone().with(k, v);
            assert!(
                matches!(
                    BackendInfo::from_message(&msg),
                    Err(XenbusError::InvalidValue { .. })
                ),
                "{k}={v} accepted"
            );
        }
    }

    #[test]
    fn connect_round_trip_order_0_and_4() {
        let req = connect(1);
        let msg = wire(&req.to_message().unwrap());
        assert_eq!(msg.get(key::RING_REF), Some("8"));
        assert_eq!(msg.get(key::RING_PAGE_ORDER), Some("0"));
        assert_eq!(msg.get(key::PROTOCOL), Some(PROTOCOL_X86_64));
        assert_eq!(ConnectRequest::from_message(&msg).unwrap(), req);

        let mut req = connect(16);
        req.feature_persistent = true;
        let msg = wire(&req.to_message().unwrap());
        assert_eq!(msg.get(key::RING_REF), None);
        assert_eq!(msg.get("ring-ref15"), Some("23"));
        assert_eq!(ConnectRequest::from_message(&msg).unwrap(), req);
        assert!(connect(3).to_message().is_err());
        assert!(connect(32).to_message().is_err());
    }

    #[test]
    fn connect_without_order_means_order_0() {
        let msg = Message::new(kind::CONNECT)
            .with(key::DEVICE, "xvda")
            .with(key::FRONTEND_ID, 3)
            .with(key::RING_REF, 9)
            .with(key::GRANT_FRAMES, 2)
            .with(key::PROTOCOL, PROTOCOL_X86_64);
        let req = ConnectRequest::from_message(&msg).unwrap();
        assert_eq!(req.ring_refs, vec![9]);
        assert_eq!(req.ring_page_order(), Some(0));
    }

    #[test]
    fn connect_rejects_inconsistent_keys() {
        let base = connect(2).to_message().unwrap();
        let cases: Vec<(Message, &str)> = vec![
            (base.clone().with(key::RING_PAGE_ORDER, 5), "order 5"),
            (
                base.clone().with(key::RING_PAGE_ORDER, 2),
                "missing ring-ref2",
            ),
            (base.clone().with("ring-ref2", 1), "ring-ref beyond order"),
            (base.clone().with("ring-ref01", 1), "leading zero index"),
            (base.clone().with(key::RING_REF, 1), "ring-ref with order 1"),
            (base.clone().with(key::GRANT_FRAMES, 0), "zero grant frames"),
            (base.clone().with(key::PROTOCOL, "x86_32-abi"), "32-bit abi"),
            (base.clone().with(key::FRONTEND_ID, 70000), "frontend id"),
            (base.clone().with(key::DEVICE, ""), "empty device"),
            (base.clone().with("ring-ref1", "x"), "non-numeric ref"),
            (base.clone().with("ring-ref1", 512), "ref beyond one frame"),
        ];
        for (msg, what) in cases {
            assert!(
                ConnectRequest::from_message(&msg).is_err(),
                "{what} accepted"
            );
        }
        let order0 = connect(1).to_message().unwrap().with("ring-ref0", 1);
        assert!(ConnectRequest::from_message(&order0).is_err());
        let mut missing = Message::new(kind::CONNECT);
        for (k, v) in base.iter().filter(|(k, _)| *k != key::PROTOCOL) {
            missing.set(k, v);
        }
        assert!(matches!(
            ConnectRequest::from_message(&missing),
            Err(XenbusError::MissingKey { key }) if key == "protocol"
        ));
        assert!(matches!(
            ConnectRequest::from_message(&Message::probe("xvda")),
            Err(XenbusError::UnexpectedKind { .. })
        ));
    }

    fn memfd(pages: u64, seals: rustix::fs::SealFlags) -> OwnedFd {
        use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags};
        let fd = memfd_create("region", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, pages * PAGE_SIZE).unwrap();
        if !seals.is_empty() {
            fcntl_add_seals(&fd, seals).unwrap();
        }
        fd
    }

    fn eventfd() -> OwnedFd {
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn device_fds_check() {
        use rustix::fs::SealFlags;
        let req = connect(1);
        let good = |region| DeviceFds {
            region,
            kick: eventfd(),
            notify: eventfd(),
        };
        let fds = good(memfd(4, SealFlags::SHRINK));
        assert_eq!(fds.check(&req).unwrap(), 4);
        let cases = [
            (good(memfd(4, SealFlags::empty())), 0),
            (good(memfd(4, SealFlags::SHRINK | SealFlags::WRITE)), 0),
            (good(memfd(1, SealFlags::SHRINK)), 0),
            (good(eventfd()), 0),
            (
                DeviceFds {
                    region: memfd(4, SealFlags::SHRINK),
                    kick: rustix::pipe::pipe().unwrap().0,
                    notify: eventfd(),
                },
                1,
            ),
            (
                DeviceFds {
                    region: memfd(4, SealFlags::SHRINK),
                    kick: eventfd(),
                    notify: memfd(1, SealFlags::empty()),
                },
                2,
            ),
        ];
        for (i, (fds, bad_index)) in cases.into_iter().enumerate() {
            match fds.check(&req) {
                Err(XenbusError::BadFd { index, .. }) => assert_eq!(index, bad_index, "case {i}"),
                other => panic!("case {i}: {other:?}"),
            }
        }
        let unaligned = memfd(4, SealFlags::empty());
        rustix::fs::ftruncate(&unaligned, 4 * PAGE_SIZE + 1).unwrap();
        rustix::fs::fcntl_add_seals(&unaligned, SealFlags::SHRINK).unwrap();
        assert!(matches!(
            good(unaligned).check(&req),
            Err(XenbusError::BadFd { index: 0, .. })
        ));
        let three = vec![eventfd(), eventfd(), eventfd()];
        assert!(DeviceFds::from_received(&Message::new(kind::CONNECT), three).is_ok());
        assert!(matches!(
            DeviceFds::from_received(&Message::new(kind::CONNECT), vec![eventfd()]),
            Err(XenbusError::FdCount {
                expected: 3,
                got: 1,
                ..
            })
        ));
    }

    #[test]
    fn attach_round_trip() {
        let req = AttachRequest {
            frontend: "guest-3".into(),
            connect: connect(4),
        };
        let msg = wire(&req.to_message().unwrap());
        assert_eq!(msg.kind(), kind::ATTACH);
        assert_eq!(AttachRequest::from_message(&msg).unwrap(), req);
    }

    #[test]
    fn error_codes() {
        for code in [
            ErrorCode::Einval,
            ErrorCode::Enoent,
            ErrorCode::Ebusy,
            ErrorCode::E2big,
            ErrorCode::Eproto,
            ErrorCode::Enodev,
            ErrorCode::Eacces,
            ErrorCode::Eagain,
        ] {
            assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), code);
        }
        assert!("EWHAT".parse::<ErrorCode>().is_err());
    }
}
