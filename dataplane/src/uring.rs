//! The I/O engine: a thin, single-threaded wrapper over `io-uring`.
//!
//! This is the only module of the data plane with `unsafe`. What it
//! guarantees:
//!
//! - Memory handed to the kernel for an op ([`IoBuffers`]) is owned by the
//!   in-flight table until the op's completion is reaped in [`Engine::drain`]
//!   (or, if the ring can no longer be waited on, leaked on purpose).
//! - The in-flight table is bounded by the completion-queue size, so the CQ
//!   can never overflow: a full table makes [`Engine::push`] fail with
//!   [`EngineError::Busy`] and hand the op back.
//! - A failed push hands the op back (Firecracker style), so the caller
//!   completes it on the same path as a real completion.
//! - Dropping the engine cancels what is still in flight and waits for it,
//!   so no buffer is freed while the kernel may still touch it.
//!
//! Results are reported as the kernel gives them: a byte count or `-errno`.
//! Reads and writes can be **short** (past end of file, or a partial
//! transfer); the engine does not retry them. The caller compares
//! `result` with [`IoBuffers::len_bytes`] and treats any difference as an
//! I/O error.

use std::cell::UnsafeCell;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::register::Restriction;
use io_uring::types::{CancelBuilder, Fd, Fixed, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{opcode, squeue, IoUring};

/// Who a completion belongs to; the caller encodes it (the loops'
/// [`crate::event_loop::Token`] packed into a `u64`).
pub type Token = u64;

/// The only opcodes a ring accepts once enabled ([`Engine::restrict`]):
/// those [`build_sqe`] makes and the cancel-all of `Drop`.
const ALLOWED_OPCODES: [u8; 8] = [
    opcode::Readv::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::PollAdd::CODE,
    opcode::AsyncCancel2::CODE,
];

/// The one registration a spare's ring allows once enabled
/// (`IORING_REGISTER_FILES_UPDATE`): its disk, at adoption.
pub const SPARE_REGISTER_OP: u8 = 6;

/// Index of the disk in the ring's registered-file table.
const DISK_FIXED_INDEX: u32 = 0;

/// `user_data` of the cancel-all request issued on drop; never a table slot
/// because the table is far smaller than `u64::MAX`.
const CANCEL_USER_DATA: u64 = u64::MAX;

/// How long a kernel SQPOLL thread spins before it sleeps, when enabled.
const SQPOLL_IDLE_MS: u32 = 100;

/// How long dropping an engine waits for cancelled ops before it gives up
/// and leaks their buffers (leaking is safe; freeing them would not be).
const DROP_WAIT: Duration = Duration::from_secs(10);

/// Errors of the I/O engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The kernel refused to set up a ring.
    #[error("cannot set up io_uring")]
    Setup(#[source] io::Error),
    /// The ring's opcode allowlist could not be installed, or the ring
    /// not enabled.
    #[error("cannot restrict io_uring to its opcodes")]
    Restrict(#[source] io::Error),
    /// The disk could not be registered as a fixed file.
    #[error("cannot register the disk with io_uring")]
    RegisterDisk(#[source] io::Error),
    /// Every in-flight slot is taken; reap completions and push again.
    #[error("in-flight table full ({capacity} ops)")]
    Busy {
        /// Size of the in-flight table.
        capacity: usize,
    },
    /// The submission queue stayed full after a submit (e.g. an SQPOLL
    /// thread lagging); reap completions and push again.
    #[error("submission queue full")]
    SubmissionQueueFull,
    /// `io_uring_enter` failed with an error other than a transient one.
    #[error("io_uring_enter failed")]
    Submit(#[source] io::Error),
    /// The op cannot be expressed to the kernel (offset beyond `i64::MAX`,
    /// too many iovecs, ...).
    #[error("invalid op: {0}")]
    InvalidOp(&'static str),
    /// A buffer range does not lie inside its memory.
    #[error("buffer range {offset:#x}+{len:#x} outside its memory")]
    BufferOutOfRange {
        /// Byte offset into the memory.
        offset: u64,
        /// Length in bytes.
        len: usize,
    },
    /// Allocating an aligned buffer failed.
    #[error("cannot allocate {len} bytes of aligned memory")]
    Alloc {
        /// Requested size in bytes.
        len: usize,
        /// What mmap said.
        #[source]
        source: io::Error,
    },
    /// An op completed with an error or a short count where the caller
    /// required the full transfer (used by the raw benchmark).
    #[error("op completed with {result}, expected {expected}")]
    OpFailed {
        /// Byte count or `-errno` from the kernel.
        result: i32,
        /// Bytes the op asked for.
        expected: usize,
    },
}

/// Memory the kernel may read or write for an op, addressed by byte offset.
///
/// Implement it for a mapping (guest memory, an aligned buffer) to build
/// [`IoBuffers`] with [`IoBuffers::from_ranges`], which checks every range;
/// callers then never handle raw pointers.
///
/// # Safety
///
/// When `io_range(offset, len)` returns `Some(p)`, the `len` bytes at `p`
/// must be mapped and valid for reads and writes, and stay so for as long as
/// `self` is alive. Nothing may hold a Rust reference (`&[u8]`/`&mut [u8]`)
/// to those bytes through a shared `&self` while an op on them can be in
/// flight: the kernel accesses them with no synchronisation Rust can see.
pub unsafe trait IoMemory: Send + Sync + 'static {
    /// Host address of `len` bytes at `offset`, or `None` if the range is
    /// not inside this memory.
    fn io_range(&self, offset: u64, len: usize) -> Option<NonNull<u8>>;
}

/// Iovecs an [`IoBuffers`] holds in place, without a heap array: more
/// than the pieces of a direct blkif request (11 segments) or of a
/// virtio-blk request of a few pages, so the block models allocate
/// nothing per request (docs/ARCHITECTURE.md §11.2). Longer lists take
/// one heap array.
pub const INLINE_IOVECS: usize = 16;

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// The iovec array of one op: in place up to [`INLINE_IOVECS`], else on
/// the heap.
#[allow(
    clippy::large_enum_variant,
    reason = "the inline array is the point: no allocation per request"
)]
enum Iovecs {
    Inline {
        len: usize,
        array: [libc::iovec; INLINE_IOVECS],
    },
    Heap(Box<[libc::iovec]>),
}

impl Iovecs {
    fn as_slice(&self) -> &[libc::iovec] {
        match self {
            Iovecs::Inline { len, array } => &array[..*len],
            Iovecs::Heap(iovecs) => iovecs,
        }
    }
}

/// Memory the kernel reads or writes for one op: an iovec array plus the
/// owner that keeps the memory it points into alive until the op completes.
///
/// The array may be inline, so the SQE carrying its address is built only
/// once the op rests in the engine's in-flight table ([`Engine::push`]).
pub struct IoBuffers {
    /// What the SQE points at; must not move or be freed before the
    /// completion once the op is queued.
    iovecs: Iovecs,
    /// Keeps the memory behind `iovecs` mapped.
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: `iovecs` is only read (by us and the kernel) and points into memory
// kept alive by `_owner`, which is itself `Send + Sync`; nothing here is tied
// to the creating thread.
unsafe impl Send for IoBuffers {}
// SAFETY: `&IoBuffers` exposes only lengths, never the pointed-to bytes.
unsafe impl Sync for IoBuffers {}

impl IoBuffers {
    /// Buffers from raw iovecs.
    ///
    /// This is `unsafe` because pushing the result lets the kernel write
    /// wherever the iovecs point; prefer [`IoBuffers::from_ranges`], which
    /// checks the ranges against an [`IoMemory`].
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory valid for reads and writes of
    /// `iov_len` bytes for as long as `owner` is alive, and no Rust reference
    /// to that memory may be live while an op using it is in flight.
    pub unsafe fn new(iovecs: Vec<libc::iovec>, owner: Arc<dyn Send + Sync + 'static>) -> Self {
        IoBuffers {
            iovecs: Iovecs::Heap(iovecs.into_boxed_slice()),
            _owner: owner,
        }
    }

    /// Buffers for `(offset, len)` ranges of `mem`, each checked to lie
    /// inside it. The op holds a clone of `mem` until it completes. Up to
    /// [`INLINE_IOVECS`] ranges allocate nothing.
    pub fn from_ranges<M: IoMemory>(
        mem: Arc<M>,
        ranges: &[(u64, usize)],
    ) -> Result<Self, EngineError> {
        let iovec = |&(offset, len): &(u64, usize)| {
            mem.io_range(offset, len)
                .map(|base| libc::iovec {
                    iov_base: base.as_ptr().cast(),
                    iov_len: len,
                })
                .ok_or(EngineError::BufferOutOfRange { offset, len })
        };
        let iovecs = if ranges.len() <= INLINE_IOVECS {
            let mut array = [EMPTY_IOVEC; INLINE_IOVECS];
            for (slot, range) in array.iter_mut().zip(ranges) {
                *slot = iovec(range)?;
            }
            Iovecs::Inline {
                len: ranges.len(),
                array,
            }
        } else {
            Iovecs::Heap(ranges.iter().map(iovec).collect::<Result<_, _>>()?)
        };
        Ok(IoBuffers {
            iovecs,
            _owner: mem,
        })
    }

    /// Buffers for ranges of two memories, `first`'s ranges first (a
    /// header in private memory, then a frame in guest memory): each range
    /// checked as in [`IoBuffers::from_ranges`]; the op holds both until it
    /// completes.
    pub fn from_ranges_of_two<A: IoMemory, B: IoMemory>(
        first: (Arc<A>, &[(u64, usize)]),
        then: (Arc<B>, &[(u64, usize)]),
    ) -> Result<Self, EngineError> {
        Self::from_ranges_of_pair(&Arc::new((first.0, then.0)), first.1, then.1)
    }

    /// Like [`IoBuffers::from_ranges_of_two`], with the two memories
    /// already paired by the caller: a batch of ops on the same two
    /// memories clones one `Arc` per op instead of allocating an owner.
    pub fn from_ranges_of_pair<A: IoMemory, B: IoMemory>(
        pair: &Arc<(Arc<A>, Arc<B>)>,
        first: &[(u64, usize)],
        then: &[(u64, usize)],
    ) -> Result<Self, EngineError> {
        let count = first.len() + then.len();
        let iovecs = if count <= INLINE_IOVECS {
            let mut array = [EMPTY_IOVEC; INLINE_IOVECS];
            fill_pair(&mut array[..count], pair, first, then)?;
            Iovecs::Inline { len: count, array }
        } else {
            let mut all = vec![EMPTY_IOVEC; count];
            fill_pair(&mut all, pair, first, then)?;
            Iovecs::Heap(all.into_boxed_slice())
        };
        Ok(IoBuffers {
            iovecs,
            _owner: pair.clone(),
        })
    }

    /// Total bytes described: what a full read or write returns.
    pub fn len_bytes(&self) -> usize {
        self.iovecs
            .as_slice()
            .iter()
            .fold(0usize, |sum, iov| sum.saturating_add(iov.iov_len))
    }

    /// Number of iovecs.
    pub fn segments(&self) -> usize {
        self.iovecs.as_slice().len()
    }
}

/// Writes the iovecs of `first`'s ranges of `pair.0` then `then`'s of
/// `pair.1` into `out` (as long as both lists), each range checked to lie
/// inside its memory.
fn fill_pair<A: IoMemory, B: IoMemory>(
    out: &mut [libc::iovec],
    pair: &(Arc<A>, Arc<B>),
    first: &[(u64, usize)],
    then: &[(u64, usize)],
) -> Result<(), EngineError> {
    fn iovec<M: IoMemory>(
        mem: &M,
        &(offset, len): &(u64, usize),
    ) -> Result<libc::iovec, EngineError> {
        mem.io_range(offset, len)
            .map(|base| libc::iovec {
                iov_base: base.as_ptr().cast(),
                iov_len: len,
            })
            .ok_or(EngineError::BufferOutOfRange { offset, len })
    }
    let (head, tail) = out.split_at_mut(first.len());
    for (slot, range) in head.iter_mut().zip(first) {
        *slot = iovec(&*pair.0, range)?;
    }
    for (slot, range) in tail.iter_mut().zip(then) {
        *slot = iovec(&*pair.1, range)?;
    }
    Ok(())
}

impl fmt::Debug for IoBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuffers")
            .field("segments", &self.segments())
            .field("len_bytes", &self.len_bytes())
            .finish()
    }
}

/// One operation for the engine.
#[derive(Debug)]
pub enum IoOp {
    /// Read from the disk at `offset` into `bufs`.
    Readv {
        /// Byte offset in the disk file.
        offset: u64,
        /// Destination memory.
        bufs: IoBuffers,
    },
    /// Write `bufs` to the disk at `offset`.
    Writev {
        /// Byte offset in the disk file.
        offset: u64,
        /// Source memory.
        bufs: IoBuffers,
    },
    /// `fdatasync` of the disk (`IORING_FSYNC_DATASYNC`).
    Fsync,
    /// Deallocate a range of the disk, keeping its size
    /// (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
    PunchHole {
        /// Byte offset in the disk file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zero a range of the disk, keeping its size
    /// (`FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`).
    ZeroRange {
        /// Byte offset in the disk file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write `bufs` to an fd that is not the disk and has no file
    /// position (a TAP queue: one write is one frame). The fd must be
    /// non-blocking (a full queue completes with `-EAGAIN`); closing it
    /// before completion is memory-safe.
    WriteStream {
        /// The fd to write to.
        fd: RawFd,
        /// Source memory.
        bufs: IoBuffers,
    },
    /// One-shot readiness for reading of an fd that is not the disk (an
    /// eventfd, a socket); the result is the ready `poll` mask or `-errno`.
    PollIn {
        /// The fd to watch. Closing it before completion is memory-safe.
        fd: RawFd,
    },
    /// One-shot readiness for writing (`POLLOUT`) of such an fd: a socket
    /// whose queue was full has room again. The result as for
    /// [`IoOp::PollIn`].
    PollOut {
        /// The fd to watch. Closing it before completion is memory-safe.
        fd: RawFd,
    },
    /// Reads an eventfd's counter (8 bytes) into `value` once it is
    /// non-zero, whether or not the fd is `O_NONBLOCK`: the kernel tries
    /// without blocking and otherwise waits for readiness inside the ring,
    /// so the loop never blocks (a wake-up and the read in one
    /// completion, where [`IoOp::PollIn`] needs a `read(2)` after it).
    /// The result is 8, or `-errno`. Closing the fd before completion is
    /// memory-safe: the ring holds its own reference to the file.
    ReadCounter {
        /// The eventfd.
        fd: RawFd,
        /// Where the kernel puts the counter; lives in the op's slot
        /// (an `UnsafeCell`: the kernel writes it behind a shared
        /// reference). Nobody reads it: the result says a kick came.
        value: UnsafeCell<u64>,
    },
    /// Adds `value` to an eventfd's counter (a notification), sent with
    /// the next `io_uring_enter` and never blocking the loop: on an
    /// `O_NONBLOCK` eventfd the write runs in that call (a full counter
    /// completes with `-EAGAIN`), on a blocking one the kernel hands it to
    /// a worker of the ring. The result is 8, or `-errno`.
    AddCounter {
        /// The eventfd.
        fd: RawFd,
        /// What to add; lives in the op's slot.
        value: u64,
    },
    /// Cancels the op in slot `slot` ([`Engine::cancel`]); the result is
    /// 0, `-ENOENT` (it finished first) or `-EALREADY`.
    Cancel {
        /// The engine slot (the `user_data`) of the op to cancel.
        slot: u64,
    },
}

impl IoOp {
    /// [`IoOp::ReadCounter`] of `fd`.
    pub fn read_counter(fd: RawFd) -> Self {
        IoOp::ReadCounter {
            fd,
            value: UnsafeCell::new(0),
        }
    }

    /// [`IoOp::AddCounter`] of 1 to `fd`.
    pub fn signal(fd: RawFd) -> Self {
        IoOp::AddCounter { fd, value: 1 }
    }
}

/// A finished op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The token the op was pushed with.
    pub token: Token,
    /// Bytes transferred (possibly short, see the module docs), the `poll`
    /// mask for [`IoOp::PollIn`], 8 for [`IoOp::ReadCounter`] and
    /// [`IoOp::AddCounter`], `0` for
    /// fsync/punch-hole, or `-errno`.
    pub result: i32,
}

/// Ring parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Submission-queue size (the kernel rounds up to a power of two); the
    /// completion queue is twice that.
    pub entries: u32,
    /// Let a kernel thread poll the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Set the ring up as fio does (see `Engine::build`): one issuer,
    /// deferred task work. `false` (the default), or with `sqpoll`: the
    /// plain ring. Off by default: measured on an idle machine it bought no
    /// IOPS and cost 20–33 % more CPU per I/O at QD32 (README, Benchmarks).
    pub deferred: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            entries: 256,
            sqpoll: false,
            deferred: false,
        }
    }
}

/// What the in-flight table keeps for an op until its completion is reaped.
struct InflightEntry {
    token: Token,
    /// The op, buffers and all: its SQE points into them, so it stays here
    /// and is dropped when the completion is reaped, not before.
    op: IoOp,
}

/// An io_uring instance with the disk registered as fixed file 0, owned by
/// one event loop.
pub struct Engine {
    ring: IoUring,
    /// Indexed by the `user_data` of each SQE.
    slots: Vec<Option<InflightEntry>>,
    /// Free slot indices; `slots.len() - free.len()` ops are in flight.
    free: Vec<usize>,
    /// [`IoOp::AddCounter`]s queued since the last `io_uring_enter`: each
    /// normally completes in the call that submits it, so a wait asks for
    /// that many completions more (see [`Engine::submit_and_wait`]).
    signals: usize,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("capacity", &self.capacity())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Engine {
    /// Sets up a ring and registers `disk` as fixed file 0. The ring holds
    /// its own reference to the file, so `disk` may be closed afterwards.
    pub fn new(disk: impl AsFd, cfg: &EngineConfig) -> Result<Self, EngineError> {
        let ring = Self::build(cfg)?;
        ring.submitter()
            .register_files(&[disk.as_fd().as_raw_fd()])
            .map_err(EngineError::RegisterDisk)?;
        Self::restrict(&ring, &[])?;
        Self::with_ring(ring, cfg)
    }

    /// A ring whose disk comes later ([`Engine::adopt_disk`]), for a spare
    /// backend that does not know its device yet (docs/ARCHITECTURE.md
    /// §7.5): the registered-file table has one empty slot, and the ring
    /// allows one registration after it is enabled, the update of that
    /// table ([`SPARE_REGISTER_OP`]). The seccomp filter a spare tightens
    /// to once adopted forbids `io_uring_register` altogether.
    pub fn spare(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let ring = Self::build(cfg)?;
        ring.submitter()
            .register_files_sparse(1)
            .map_err(EngineError::RegisterDisk)?;
        Self::restrict(&ring, &[SPARE_REGISTER_OP])?;
        Self::with_ring(ring, cfg)
    }

    /// Puts `disk` in the empty slot of a [`spare`](Self::spare) engine's
    /// table. As for [`Engine::new`], the ring holds its own reference.
    pub fn adopt_disk(&mut self, disk: impl AsFd) -> Result<(), EngineError> {
        self.ring
            .submitter()
            .register_files_update(DISK_FIXED_INDEX, &[disk.as_fd().as_raw_fd()])
            .map_err(EngineError::RegisterDisk)
            .map(drop)
    }

    /// A ring without a registered file, for a loop that only waits on
    /// fds ([`IoOp::PollIn`]): a NIC's wire is read and written by the
    /// loop itself, without blocking. Disk ops on it fail with `EBADF`.
    pub fn for_polls(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let ring = Self::build(cfg)?;
        Self::restrict(&ring, &[])?;
        Self::with_ring(ring, cfg)
    }

    /// A ring created disabled, so [`Engine::restrict`] can install its
    /// allowlist before any request runs.
    ///
    /// With [`EngineConfig::deferred`] the ring is set up as fio sets up its own
    /// (docs/ARCHITECTURE.md §11.2): one task submits and reaps
    /// (`SINGLE_ISSUER`), completions are posted only when that task
    /// enters the kernel to reap (`DEFER_TASKRUN`), so a completion neither
    /// interrupts the loop while it runs (`COOP_TASKRUN`) nor wakes it
    /// before the wait it asked for is met; `TASKRUN_FLAG` shows pending
    /// completions in the SQ flags, which [`Engine::has_completions`]
    /// reads. A kernel that knows none of these (before 6.1) gets the
    /// plain ring.
    fn build(cfg: &EngineConfig) -> Result<IoUring, EngineError> {
        let mut builder = IoUring::builder();
        builder.setup_r_disabled();
        if cfg.sqpoll {
            builder.setup_sqpoll(SQPOLL_IDLE_MS);
        }
        if cfg.sqpoll || !cfg.deferred {
            return builder.build(cfg.entries).map_err(EngineError::Setup);
        }
        let mut deferred = builder.clone();
        deferred
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun();
        match deferred.build(cfg.entries) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("io_uring without deferred task work (old kernel)");
                builder.build(cfg.entries).map_err(EngineError::Setup)
            }
            ring => ring.map_err(EngineError::Setup),
        }
    }

    /// Allows on `ring` only the opcodes [`build_sqe`] and the cancel on
    /// drop make, and only the fixed-file flag; no more registrations
    /// than `register_ops` (none but a spare's table update); then enables
    /// it. io_uring requests bypass seccomp, so this, not the
    /// backend's seccomp filter, is what keeps a confined backend from
    /// opening files or sockets through its ring (docs/ARCHITECTURE.md
    /// §1.1).
    fn restrict(ring: &IoUring, register_ops: &[u8]) -> Result<(), EngineError> {
        let mut allow: Vec<Restriction> = ALLOWED_OPCODES
            .iter()
            .map(|&op| Restriction::sqe_op(op))
            .chain(register_ops.iter().map(|&op| Restriction::register_op(op)))
            .collect();
        allow.push(Restriction::sqe_flags_allowed(
            squeue::Flags::FIXED_FILE.bits(),
        ));
        let submitter = ring.submitter();
        submitter
            .register_restrictions(&mut allow)
            .map_err(EngineError::Restrict)?;
        submitter
            .register_enable_rings()
            .map_err(EngineError::Restrict)
    }

    fn with_ring(ring: IoUring, cfg: &EngineConfig) -> Result<Self, EngineError> {
        // One CQ entry stays free for the cancel-all request issued on drop,
        // so even then the CQ cannot overflow.
        let cq_entries = usize::try_from(ring.params().cq_entries()).map_err(|_| {
            EngineError::Setup(io::Error::new(io::ErrorKind::InvalidData, "CQ size"))
        })?;
        let capacity = cq_entries.saturating_sub(1).max(1);
        tracing::debug!(
            sq = ring.params().sq_entries(),
            cq = cq_entries,
            capacity,
            sqpoll = cfg.sqpoll,
            deferred = ring.params().is_setup_single_issuer(),
            "io_uring engine ready"
        );
        Ok(Engine {
            ring,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            signals: 0,
        })
    }

    /// Most ops that can be in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Ops pushed and not yet reaped by [`Engine::drain`].
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Cancels the ops in flight that were pushed with `token` (not
    /// cancels themselves): e.g. a kick's read once its attachment is
    /// gone, so that it does not take the next attachment's kick from a
    /// shared eventfd. Each cancel is an op of its own, with the same
    /// token, so the table still bounds the completion queue; a cancelled
    /// op completes with `-ECANCELED`. What finds no room stays in
    /// flight. Returns how many cancels were queued.
    pub fn cancel(&mut self, token: Token) -> usize {
        let mut queued = 0;
        for slot in 0..self.slots.len() {
            let target = matches!(&self.slots[slot],
                Some(e) if e.token == token && !matches!(e.op, IoOp::Cancel { .. }));
            if target && self.push(token, IoOp::Cancel { slot: slot as u64 }).is_ok() {
                queued += 1;
            }
        }
        queued
    }

    /// Queues an op (no syscall). When the SQ is full, submits what is
    /// queued and retries once. On failure the op is handed back so the
    /// caller can complete it on its error path; [`EngineError::Busy`] and
    /// [`EngineError::SubmissionQueueFull`] mean "reap completions and
    /// retry".
    #[allow(
        clippy::result_large_err,
        reason = "the op is handed back whole, inline iovecs and all (Firecracker style)"
    )]
    pub fn push(&mut self, token: Token, op: IoOp) -> Result<(), (EngineError, IoOp)> {
        let Some(slot) = self.free.pop() else {
            return Err((
                EngineError::Busy {
                    capacity: self.capacity(),
                },
                op,
            ));
        };
        // The op rests in its slot before its SQE is built: the SQE points
        // into its iovecs, which may be inline in the op.
        let entry = self.slots[slot].insert(InflightEntry { token, op });
        let signal = matches!(entry.op, IoOp::AddCounter { .. });
        let queued = build_sqe(&entry.op).and_then(|sqe| self.queue(sqe.user_data(slot as u64)));
        match queued {
            Ok(()) => {
                self.signals += usize::from(signal);
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                let Some(entry) = self.slots[slot].take() else {
                    unreachable!("the op was put in slot {slot} above");
                };
                Err((e, entry.op))
            }
        }
    }

    /// Queues a write of ranges of two memories to a stream `fd`
    /// ([`IoOp::WriteStream`] on [`IoBuffers::from_ranges_of_pair`]),
    /// its iovecs written straight into the op's slot: a batch of small
    /// writes (a TAP's frames) does not move each op's inline iovec array
    /// from the caller to the slot. Errors as [`Engine::push`]'s, and
    /// [`EngineError::BufferOutOfRange`]; nothing is queued then.
    pub fn push_write_stream<A: IoMemory, B: IoMemory>(
        &mut self,
        token: Token,
        fd: RawFd,
        pair: &Arc<(Arc<A>, Arc<B>)>,
        first: &[(u64, usize)],
        then: &[(u64, usize)],
    ) -> Result<(), EngineError> {
        let count = first.len() + then.len();
        if count > INLINE_IOVECS {
            let bufs = IoBuffers::from_ranges_of_pair(pair, first, then)?;
            return self
                .push(token, IoOp::WriteStream { fd, bufs })
                .map_err(|(e, _)| e);
        }
        let Some(slot) = self.free.pop() else {
            return Err(EngineError::Busy {
                capacity: self.capacity(),
            });
        };
        let entry = self.slots[slot].insert(InflightEntry {
            token,
            op: IoOp::WriteStream {
                fd,
                bufs: IoBuffers {
                    iovecs: Iovecs::Inline {
                        len: 0,
                        array: [EMPTY_IOVEC; INLINE_IOVECS],
                    },
                    _owner: pair.clone(),
                },
            },
        });
        let filled = match &mut entry.op {
            IoOp::WriteStream {
                bufs:
                    IoBuffers {
                        iovecs: Iovecs::Inline { len, array },
                        ..
                    },
                ..
            } => fill_pair(&mut array[..count], pair, first, then).map(|()| *len = count),
            _ => unreachable!("a stream write with inline iovecs was put in slot {slot}"),
        };
        let queued = filled
            .and_then(|()| build_sqe(&entry.op))
            .and_then(|sqe| self.queue(sqe.user_data(slot as u64)));
        if queued.is_err() {
            self.slots[slot] = None;
            self.free.push(slot);
        }
        queued
    }

    /// Puts `sqe` in the SQ, submitting what is queued first if it is
    /// full.
    fn queue(&mut self, sqe: squeue::Entry) -> Result<(), EngineError> {
        // SAFETY: every pointer in `sqe` points into the buffers of the op
        // in the slot named by its user data (heap or inline iovec array,
        // and memory kept alive by its owner, per the IoBuffers contract;
        // a counter read's cell, which the kernel alone writes);
        // the slot keeps the op, unmoved (`slots` never grows), until
        // `drain` reaps its CQE or `Drop` has waited for it (else leaks
        // it). On failure `push` takes the op back before anything ran.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            return Ok(());
        }
        self.enter(0, None)?;
        // SAFETY: same entry, same ownership argument as the push above.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| EngineError::SubmissionQueueFull)
    }

    /// One `io_uring_enter`: submits queued SQEs and waits for at least
    /// `min_complete` completions (`0` = don't wait). `min_complete` is
    /// capped at [`Engine::in_flight`] so the call cannot wait forever.
    ///
    /// An [`IoOp::AddCounter`] queued since the last call completes in
    /// this one (the eventfd's write runs as it is submitted), so it does
    /// not count towards `min_complete`: a loop that waits for its next
    /// event is not woken by its own notification. One that the kernel
    /// could not finish at once (a blocking eventfd) still counts once it
    /// does, so the wait ends late by that write at most.
    ///
    /// Returns how many SQEs were submitted. A signal (`EINTR`) or a
    /// transiently busy kernel (`EBUSY`, `EAGAIN`) returns `Ok(0)`: the
    /// event loop drains, checks its own state and calls again.
    pub fn submit_and_wait(&mut self, min_complete: usize) -> Result<usize, EngineError> {
        self.enter(min_complete, None)
    }

    /// Like [`Engine::submit_and_wait`], but waits at most `timeout`; a
    /// timeout (`ETIME`) is not an error and returns `Ok(0)` unless SQEs
    /// were submitted. Returns immediately if nothing is in flight.
    pub fn submit_and_wait_timeout(
        &mut self,
        min_complete: usize,
        timeout: Duration,
    ) -> Result<usize, EngineError> {
        self.enter(min_complete, Some(timeout))
    }

    fn enter(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let signals = std::mem::take(&mut self.signals);
        let want = if min_complete == 0 {
            0
        } else {
            (min_complete + signals).min(self.in_flight())
        };
        let submitter = self.ring.submitter();
        let res = match timeout {
            None => submitter.submit_and_wait(want),
            Some(timeout) => {
                let ts = Timespec::from(timeout);
                let args = SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(want, &args)
            }
        };
        match res {
            Ok(n) => Ok(n),
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) => Ok(0),
                Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                    tracing::debug!(error = %e, "io_uring_enter busy, retry after draining");
                    Ok(0)
                }
                _ => Err(EngineError::Submit(e)),
            },
        }
    }

    /// Whether completions wait to be drained (no syscall: a look at the
    /// CQ's tail and at the SQ flags), for a loop that polls instead of
    /// sleeping. With deferred task work a finished op is not in the CQ
    /// until the next [`Engine::submit_and_wait`] (any `min_complete`)
    /// posts it; the kernel's `IORING_SQ_TASKRUN` flag says one is
    /// pending.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    /// Hands the kernel what is queued, if anything, without waiting.
    pub fn submit_queued(&mut self) -> Result<(), EngineError> {
        if !self.ring.submission().is_empty() {
            self.enter(0, None)?;
        }
        Ok(())
    }

    /// Pops every available completion into `out`; the buffers of finished
    /// ops are released here.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let user_data = cqe.user_data();
            // The op is dropped where it rests (`*e = None`), not moved out
            // first: it holds its iovecs inline, a few hundred bytes.
            let token = usize::try_from(user_data).ok().and_then(|slot| {
                let e = self.slots.get_mut(slot)?;
                let token = e.as_ref()?.token;
                *e = None;
                Some((slot, token))
            });
            match token {
                Some((slot, token)) => {
                    self.free.push(slot);
                    out.push(Completion {
                        token,
                        result: cqe.result(),
                    });
                }
                _ if user_data == CANCEL_USER_DATA => {
                    tracing::debug!(result = cqe.result(), "cancel-all completed");
                }
                _ => tracing::warn!(user_data, "completion for an unknown slot ignored"),
            }
        }
    }

    /// Queues a request cancelling everything in flight; false if the SQ
    /// has no room yet.
    fn queue_cancel_all(&mut self) -> bool {
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL_USER_DATA);
        // SAFETY: a cancel request carries no buffer pointers.
        unsafe { self.ring.submission().push(&cancel) }.is_ok()
    }

    /// Gives up on the ops still in flight: the kernel may access their
    /// buffers even after the ring is closed, so they must never be freed.
    fn leak_in_flight(&mut self, why: &dyn fmt::Display) {
        tracing::error!(
            reason = %why,
            in_flight = self.in_flight(),
            "cannot wait for in-flight ops; leaking their buffers"
        );
        std::mem::forget(std::mem::take(&mut self.slots));
        self.free.clear();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.in_flight() == 0 {
            return;
        }
        tracing::debug!(
            in_flight = self.in_flight(),
            "engine dropped with ops in flight, cancelling"
        );
        let mut reaped = Vec::new();
        // Get queued SQEs to the kernel so the cancel can see them, and make
        // room in the CQ.
        let _ = self.enter(0, None);
        self.drain(&mut reaped);
        let mut cancel_queued = false;
        let deadline = Instant::now() + DROP_WAIT;
        while self.in_flight() > 0 {
            if !cancel_queued {
                cancel_queued = self.queue_cancel_all();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.leak_in_flight(&"timed out waiting for cancelled ops");
                return;
            }
            if let Err(e) = self.enter(1, Some(left)) {
                self.leak_in_flight(&e);
                return;
            }
            self.drain(&mut reaped);
        }
    }
}

/// The SQE for `op`, without `user_data`. Pointers in it borrow from `op`.
fn build_sqe(op: &IoOp) -> Result<squeue::Entry, EngineError> {
    let disk = Fixed(DISK_FIXED_INDEX);
    Ok(match op {
        IoOp::Readv { offset, bufs } => {
            opcode::Readv::new(disk, bufs.iovecs.as_slice().as_ptr(), iovec_count(bufs)?)
                .offset(file_offset(*offset)?)
                .build()
        }
        IoOp::Writev { offset, bufs } => {
            opcode::Writev::new(disk, bufs.iovecs.as_slice().as_ptr(), iovec_count(bufs)?)
                .offset(file_offset(*offset)?)
                .build()
        }
        IoOp::Fsync => opcode::Fsync::new(disk).flags(FsyncFlags::DATASYNC).build(),
        IoOp::PunchHole { offset, len } => opcode::Fallocate::new(disk, file_offset(*len)?)
            .offset(file_offset(*offset)?)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
        IoOp::ZeroRange { offset, len } => opcode::Fallocate::new(disk, file_offset(*len)?)
            .offset(file_offset(*offset)?)
            .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
        IoOp::WriteStream { fd, bufs } => {
            opcode::Writev::new(Fd(*fd), bufs.iovecs.as_slice().as_ptr(), iovec_count(bufs)?)
                .build()
        }
        IoOp::PollIn { fd } => opcode::PollAdd::new(Fd(*fd), libc::POLLIN as u32).build(),
        IoOp::PollOut { fd } => opcode::PollAdd::new(Fd(*fd), libc::POLLOUT as u32).build(),
        IoOp::ReadCounter { fd, value } => {
            // The counter is read at the current position (eventfds have
            // none): offset -1 as `read(2)`.
            opcode::Read::new(Fd(*fd), value.get().cast(), 8)
                .offset(u64::MAX)
                .build()
        }
        IoOp::Cancel { slot } => opcode::AsyncCancel2::new(CancelBuilder::user_data(*slot)).build(),
        IoOp::AddCounter { fd, value } => {
            opcode::Write::new(Fd(*fd), std::ptr::from_ref(value).cast(), 8)
                .offset(u64::MAX)
                .build()
        }
    })
}

/// Offsets are `loff_t` to the kernel; io_uring reads `-1` as "the current
/// file position", so anything that does not fit in an `i64` is refused
/// rather than silently becoming a different I/O.
fn file_offset(value: u64) -> Result<u64, EngineError> {
    if i64::try_from(value).is_ok() {
        Ok(value)
    } else {
        Err(EngineError::InvalidOp("offset or length beyond i64::MAX"))
    }
}

fn iovec_count(bufs: &IoBuffers) -> Result<u32, EngineError> {
    u32::try_from(bufs.segments()).map_err(|_| EngineError::InvalidOp("too many iovecs"))
}

/// Page-aligned anonymous memory (so `O_DIRECT` works), usable as
/// [`IoMemory`].
///
/// Its contents are reachable only through `&mut self`: once the buffer is
/// shared with in-flight ops (which hold clones of its `Arc`),
/// `Arc::get_mut` fails until they are all reaped, so Rust never looks at
/// bytes the kernel may be writing.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone, and `&AlignedBuf` exposes
// only its address and length, never its contents.
unsafe impl Send for AlignedBuf {}
// SAFETY: as for Send; content access needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Maps `len` zeroed bytes, page-aligned.
    pub fn new(len: usize) -> Result<Self, EngineError> {
        if len == 0 {
            return Err(EngineError::InvalidOp("zero-length buffer"));
        }
        // SAFETY: an anonymous private mapping at a kernel-chosen address
        // touches no existing memory; the result is checked for MAP_FAILED
        // just below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(EngineError::Alloc {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(EngineError::Alloc {
            len,
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })?;
        Ok(AlignedBuf { ptr, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The contents.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is the live mapping made in `new`; `&mut
        // self` is exclusive, and in-flight ops hold their own `Arc` clones,
        // so reaching `&mut` (Arc::get_mut / an unshared value) proves none
        // is in flight on it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once; ops using
        // it hold `Arc` clones, so none can be in flight when this runs.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "munmap of aligned buffer failed");
        }
    }
}

// SAFETY: `io_range` returns an address only after checking the range lies
// inside the mapping, which lives as long as `self`; contents are never
// exposed through `&self`.
unsafe impl IoMemory for AlignedBuf {
    fn io_range(&self, offset: u64, len: usize) -> Option<NonNull<u8>> {
        let offset = usize::try_from(offset).ok()?;
        if offset.checked_add(len)? > self.len {
            return None;
        }
        NonNull::new(self.ptr.as_ptr().wrapping_add(offset))
    }
}

// SAFETY: `host_range` checks the range lies inside the region's mapping,
// which lives as long as the `SharedRegion`; the region exposes its bytes
// only through vm-memory's volatile accessors, never as `&[u8]`.
unsafe impl IoMemory for shadowback_ring::SharedRegion {
    fn io_range(&self, offset: u64, len: usize) -> Option<NonNull<u8>> {
        NonNull::new(self.host_range(offset, len).ok()?)
    }
}

// SAFETY: `host_range` returns an address only when `[gpa, gpa + len)` lies
// inside one mapped region; the regions stay mapped as long as the
// `GuestRam` (the op holds an `Arc` of it); guest memory is only accessed
// through vm-memory's volatile accessors, never as `&[u8]`.
unsafe impl IoMemory for shadowback_virtio::memory::GuestRam {
    fn io_range(&self, offset: u64, len: usize) -> Option<NonNull<u8>> {
        self.host_range(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::eventfd::{EfdFlags, EventFd};

    const BLOCK: usize = 4096;

    /// A file under the temp dir, removed on drop.
    struct TempDisk {
        path: PathBuf,
        file: File,
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn temp_disk(size: u64, direct: bool) -> TempDisk {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "shadowback-uring-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        File::create(&path).unwrap().set_len(size).unwrap();
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&path).unwrap();
        TempDisk { path, file }
    }

    fn open_engine(disk: &TempDisk) -> Engine {
        Engine::new(&disk.file, &EngineConfig::default()).unwrap()
    }

    /// Puts `sqe` on the engine's ring behind its back and returns the
    /// result of its completion.
    fn raw_result(engine: &mut Engine, sqe: squeue::Entry) -> i32 {
        let sqe = sqe.user_data(CANCEL_USER_DATA - 1);
        // SAFETY: the entries given here carry no pointers into memory.
        unsafe { engine.ring.submission().push(&sqe) }.unwrap();
        engine.ring.submitter().submit_and_wait(1).unwrap();
        let cqe = engine.ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), CANCEL_USER_DATA - 1);
        cqe.result()
    }

    #[test]
    fn rings_refuse_opcodes_and_flags_outside_their_allowlist() {
        let disk = temp_disk(64 * 1024, false);
        for mut engine in [
            open_engine(&disk),
            Engine::for_polls(&EngineConfig::default()).unwrap(),
        ] {
            // What a confined backend must not do through its ring.
            let nop = opcode::Nop::new().build();
            assert_eq!(raw_result(&mut engine, nop), -libc::EACCES);
            let path = c"/";
            let open = opcode::OpenAt::new(Fd(libc::AT_FDCWD), path.as_ptr()).build();
            assert_eq!(raw_result(&mut engine, open), -libc::EACCES);
            // An allowed opcode with a flag outside the allowlist.
            let fsync = opcode::Fsync::new(Fixed(DISK_FIXED_INDEX))
                .build()
                .flags(squeue::Flags::IO_LINK);
            assert_eq!(raw_result(&mut engine, fsync), -libc::EACCES);
            // No new registrations once enabled.
            let err = engine
                .ring
                .submitter()
                .register_files(&[disk.file.as_raw_fd()])
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        }
        // What it does still works.
        let mut engine = open_engine(&disk);
        let fsync = opcode::Fsync::new(Fixed(DISK_FIXED_INDEX)).build();
        assert_eq!(raw_result(&mut engine, fsync), 0);
    }

    /// A fresh non-blocking eventfd and a `PollIn` on it queued with `token`.
    fn push_eventfd_poll(engine: &mut Engine, token: Token) -> EventFd {
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        push_poll(engine, token, &efd);
        efd
    }

    /// Queues a `PollIn` on `efd` with `token`.
    fn push_poll(engine: &mut Engine, token: Token, efd: &EventFd) {
        let fd = efd.as_raw_fd();
        engine.push(token, IoOp::PollIn { fd }).unwrap();
    }

    /// Submits and reaps until `n` completions arrived (fails after 5 s).
    fn wait_for(engine: &mut Engine, n: usize) -> Vec<Completion> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "timed out with {} of {n}",
                out.len()
            );
            engine
                .submit_and_wait_timeout(n - out.len(), Duration::from_millis(100))
                .unwrap();
            engine.drain(&mut out);
        }
        out
    }

    fn run_one(engine: &mut Engine, op: IoOp) -> i32 {
        engine.push(7, op).unwrap();
        let done = wait_for(engine, 1);
        assert_eq!(done[0].token, 7);
        assert_eq!(engine.in_flight(), 0);
        done[0].result
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / BLOCK) as u8)
            .collect()
    }

    fn buf_with(bytes: &[u8]) -> Arc<AlignedBuf> {
        let mut buf = AlignedBuf::new(bytes.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(bytes);
        Arc::new(buf)
    }

    fn contents(mut buf: Arc<AlignedBuf>) -> Vec<u8> {
        Arc::get_mut(&mut buf)
            .expect("no op holds the buffer any more")
            .as_mut_slice()
            .to_vec()
    }

    fn write_then_read(direct: bool) {
        let disk = temp_disk(64 * 1024, direct);
        let mut engine = open_engine(&disk);
        let data = pattern(3, 4 * BLOCK);
        let src = buf_with(&data);
        // Three iovecs, uneven split, written at 8 KiB.
        let bufs = IoBuffers::from_ranges(
            src.clone(),
            &[
                (0, BLOCK),
                (BLOCK as u64, 2 * BLOCK),
                (3 * BLOCK as u64, BLOCK),
            ],
        )
        .unwrap();
        assert_eq!(bufs.segments(), 3);
        assert_eq!(bufs.len_bytes(), 4 * BLOCK);
        assert_eq!(
            run_one(&mut engine, IoOp::Writev { offset: 8192, bufs }),
            4 * BLOCK as i32
        );

        // Read back through a different split, into a fresh buffer.
        let dst = Arc::new(AlignedBuf::new(4 * BLOCK).unwrap());
        let bufs = IoBuffers::from_ranges(
            dst.clone(),
            &[(2 * BLOCK as u64, 2 * BLOCK), (0, 2 * BLOCK)],
        )
        .unwrap();
        assert_eq!(
            run_one(&mut engine, IoOp::Readv { offset: 8192, bufs }),
            4 * BLOCK as i32
        );
        let got = contents(dst);
        assert_eq!(&got[2 * BLOCK..], &data[..2 * BLOCK]);
        assert_eq!(&got[..2 * BLOCK], &data[2 * BLOCK..]);

        // And the file agrees, read without the engine.
        let mut on_disk = vec![0u8; 4 * BLOCK];
        File::open(&disk.path)
            .unwrap()
            .read_exact_at(&mut on_disk, 8192)
            .unwrap();
        assert_eq!(on_disk, data);
        drop(src);
    }

    #[test]
    fn writev_readv_roundtrip_buffered() {
        write_then_read(false);
    }

    #[test]
    fn writev_readv_roundtrip_o_direct() {
        write_then_read(true);
    }

    #[test]
    fn fsync_completes_with_zero() {
        for direct in [false, true] {
            let disk = temp_disk(BLOCK as u64, direct);
            let mut engine = open_engine(&disk);
            assert_eq!(run_one(&mut engine, IoOp::Fsync), 0);
        }
    }

    /// Punch-hole and zero-range: the range reads back as zeros, the rest
    /// as written, and the file keeps its size (buffered and O_DIRECT).
    #[test]
    fn punch_hole_and_zero_range_read_zeros_and_keep_size() {
        let size = 16 * BLOCK as u64;
        let (at, len) = (4 * BLOCK as u64, 3 * BLOCK as u64);
        let cases: [fn(u64, u64) -> IoOp; 2] = [
            |offset, len| IoOp::PunchHole { offset, len },
            |offset, len| IoOp::ZeroRange { offset, len },
        ];
        for make in cases {
            for direct in [false, true] {
                let disk = temp_disk(size, direct);
                let mut engine = open_engine(&disk);
                let data = pattern(9, 16 * BLOCK);
                let bufs = IoBuffers::from_ranges(buf_with(&data), &[(0, 16 * BLOCK)]).unwrap();
                assert_eq!(
                    run_one(&mut engine, IoOp::Writev { offset: 0, bufs }),
                    16 * BLOCK as i32
                );
                let op = make(at, len);
                let name = format!("{op:?}");
                assert_eq!(run_one(&mut engine, op), 0, "{name}");
                assert_eq!(disk.file.metadata().unwrap().len(), size, "{name}");

                let dst = Arc::new(AlignedBuf::new(16 * BLOCK).unwrap());
                let bufs = IoBuffers::from_ranges(dst.clone(), &[(0, 16 * BLOCK)]).unwrap();
                assert_eq!(
                    run_one(&mut engine, IoOp::Readv { offset: 0, bufs }),
                    16 * BLOCK as i32
                );
                let got = contents(dst);
                let (a, b) = (at as usize, (at + len) as usize);
                assert!(got[a..b].iter().all(|&x| x == 0), "{name}: range not zero");
                assert_eq!(&got[..a], &data[..a], "{name}");
                assert_eq!(&got[b..], &data[b..], "{name}");
            }
        }
    }

    #[test]
    fn poll_in_completes_only_after_eventfd_write() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = open_engine(&disk);
        let efd = push_eventfd_poll(&mut engine, 42);

        let mut out = Vec::new();
        assert_eq!(
            engine
                .submit_and_wait_timeout(1, Duration::from_millis(50))
                .unwrap(),
            1
        );
        engine
            .submit_and_wait_timeout(1, Duration::from_millis(50))
            .unwrap();
        engine.drain(&mut out);
        assert!(
            out.is_empty(),
            "poll completed before the eventfd was written: {out:?}"
        );
        assert_eq!(engine.in_flight(), 1);

        efd.write(1).unwrap();
        let done = wait_for(&mut engine, 1);
        assert_eq!(done[0].token, 42);
        assert!(
            done[0].result > 0 && done[0].result & i32::from(libc::POLLIN) != 0,
            "{done:?}"
        );
    }

    /// A counter read waits inside the ring, on a blocking eventfd as on a
    /// non-blocking one, and completes with the 8 bytes once a kick came:
    /// the counter is taken, so a poll after it would wait.
    #[test]
    fn a_counter_read_waits_in_the_ring_and_takes_the_counter() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = open_engine(&disk);
        for flags in [EfdFlags::EFD_CLOEXEC, EfdFlags::EFD_NONBLOCK] {
            let efd = EventFd::from_flags(flags).unwrap();
            engine.push(7, IoOp::read_counter(efd.as_raw_fd())).unwrap();
            engine
                .submit_and_wait_timeout(1, Duration::from_millis(50))
                .unwrap();
            let mut out = Vec::new();
            engine.drain(&mut out);
            assert!(
                out.is_empty(),
                "{flags:?}: read completed with no kick: {out:?}"
            );
            efd.write(3).unwrap();
            let done = wait_for(&mut engine, 1);
            assert_eq!(
                done,
                [Completion {
                    token: 7,
                    result: 8
                }],
                "{flags:?}"
            );
            // Taken: nothing is left for a poll to see.
            let mut fds = [PollFd::new(efd.as_fd(), PollFlags::POLLIN)];
            assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 0, "{flags:?}");
        }
        // A fd that is not an eventfd (a directory) fails the read.
        let dir = File::open(std::env::temp_dir()).unwrap();
        engine.push(9, IoOp::read_counter(dir.as_raw_fd())).unwrap();
        let done = wait_for(&mut engine, 1);
        assert_eq!(
            done,
            [Completion {
                token: 9,
                result: -libc::EISDIR
            }]
        );
    }

    /// A notification through the ring adds to the counter; on a
    /// blocking eventfd whose counter is full it waits in the ring, not in
    /// the loop, and lands once the peer reads.
    #[test]
    fn a_counter_add_never_blocks_the_loop() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = open_engine(&disk);
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        engine.push(1, IoOp::signal(efd.as_raw_fd())).unwrap();
        assert_eq!(
            wait_for(&mut engine, 1),
            [Completion {
                token: 1,
                result: 8
            }]
        );
        assert_eq!(efd.read().unwrap(), 1);
        // Full and blocking: a write(2) would wait for the peer.
        let full = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap();
        full.write(0xffff_ffff_ffff_fffe).unwrap();
        let t0 = Instant::now();
        engine.push(2, IoOp::signal(full.as_raw_fd())).unwrap();
        engine
            .submit_and_wait_timeout(1, Duration::from_millis(50))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "the loop blocked");
        let mut out = Vec::new();
        engine.drain(&mut out);
        assert!(out.is_empty(), "added to a full counter: {out:?}");
        assert_eq!(full.read().unwrap(), 0xffff_ffff_ffff_fffe);
        assert_eq!(
            wait_for(&mut engine, 1),
            [Completion {
                token: 2,
                result: 8
            }]
        );
        assert_eq!(full.read().unwrap(), 1);
    }

    /// A cancelled counter read leaves the next kick in the eventfd for
    /// whoever waits next.
    #[test]
    fn a_cancelled_counter_read_takes_no_kick() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = open_engine(&disk);
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        engine.push(5, IoOp::read_counter(efd.as_raw_fd())).unwrap();
        engine.push(6, IoOp::read_counter(efd.as_raw_fd())).unwrap();
        engine.submit_and_wait(0).unwrap();
        assert_eq!(engine.cancel(5), 1);
        let mut done = wait_for(&mut engine, 2);
        done.sort_by_key(|c| c.result);
        assert_eq!(
            done,
            [
                Completion {
                    token: 5,
                    result: -libc::ECANCELED
                },
                Completion {
                    token: 5,
                    result: 0
                },
            ]
        );
        assert_eq!(engine.in_flight(), 1, "token 6 is still waiting");
        efd.write(1).unwrap();
        assert_eq!(
            wait_for(&mut engine, 1),
            [Completion {
                token: 6,
                result: 8
            }]
        );
    }

    /// A loop that notifies and then waits for its next event is not
    /// woken by its own notification.
    #[test]
    fn a_wait_is_not_ended_by_the_signal_it_submits() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = open_engine(&disk);
        let kick = push_eventfd_poll(&mut engine, 1);
        let notify = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        engine.push(2, IoOp::signal(notify.as_raw_fd())).unwrap();
        let t0 = Instant::now();
        engine
            .submit_and_wait_timeout(1, Duration::from_millis(100))
            .unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "woken by its own signal after {:?}",
            t0.elapsed()
        );
        assert_eq!(notify.read().unwrap(), 1, "the signal was sent");
        kick.write(1).unwrap();
        let mut done = wait_for(&mut engine, 2);
        done.sort_by_key(|c| c.token);
        assert_eq!(done[0].token, 1);
        assert_eq!(
            done[1],
            Completion {
                token: 2,
                result: 8
            }
        );
    }

    /// A ring set up as fio's posts a finished op only when its task
    /// enters the kernel to reap; a polling loop must still see that one
    /// is pending without a syscall, or it polls out its window for
    /// nothing.
    #[test]
    fn a_deferred_completion_shows_before_it_is_posted() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = Engine::new(
            &disk.file,
            &EngineConfig {
                deferred: true,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        assert!(engine.ring.params().is_setup_single_issuer());
        let efd = push_eventfd_poll(&mut engine, 7);
        engine.submit_and_wait(0).unwrap();
        assert!(!engine.has_completions());
        efd.write(1).unwrap();
        assert!(
            engine.ring.completion().is_empty(),
            "completion posted without an enter: task work is not deferred"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !engine.has_completions() {
            assert!(
                Instant::now() < deadline,
                "the pending completion never showed"
            );
            std::hint::spin_loop();
        }
        // What a polling loop does next: an enter that does not wait.
        engine.submit_and_wait(0).unwrap();
        let mut out = Vec::new();
        engine.drain(&mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].token, 7);
        assert!(!engine.has_completions());

        let plain = open_engine(&disk);
        assert!(!plain.ring.params().is_setup_single_issuer());
    }

    #[test]
    fn full_table_is_busy_and_hands_the_op_back() {
        let disk = temp_disk(4 * BLOCK as u64, false);
        let cfg = EngineConfig {
            entries: 4,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(&disk.file, &cfg).unwrap();
        let capacity = engine.capacity();
        assert!(capacity >= 4, "capacity {capacity}");
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        // More polls than the SQ holds: push submits on its own when full.
        for token in 0..capacity as u64 {
            push_poll(&mut engine, token, &efd);
        }
        assert_eq!(engine.in_flight(), capacity);

        let bufs = IoBuffers::from_ranges(Arc::new(AlignedBuf::new(BLOCK).unwrap()), &[(0, BLOCK)])
            .unwrap();
        match engine.push(99, IoOp::Readv { offset: 0, bufs }) {
            Err((EngineError::Busy { capacity: c }, IoOp::Readv { offset: 0, bufs })) => {
                assert_eq!(c, capacity);
                assert_eq!(bufs.len_bytes(), BLOCK);
            }
            other => panic!("expected Busy with the Readv back, got {other:?}"),
        }
        assert_eq!(engine.in_flight(), capacity);

        efd.write(1).unwrap();
        let done = wait_for(&mut engine, capacity);
        let mut tokens: Vec<_> = done.iter().map(|c| c.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..capacity as u64).collect::<Vec<_>>());
        // Room again.
        assert_eq!(run_one(&mut engine, IoOp::Fsync), 0);
    }

    #[test]
    fn read_past_eof_is_short() {
        // Buffered: the file ends mid-block.
        let disk = temp_disk(BLOCK as u64 + 1000, false);
        let mut engine = open_engine(&disk);
        let bufs = IoBuffers::from_ranges(
            Arc::new(AlignedBuf::new(2 * BLOCK).unwrap()),
            &[(0, 2 * BLOCK)],
        )
        .unwrap();
        assert_eq!(
            run_one(
                &mut engine,
                IoOp::Readv {
                    offset: BLOCK as u64,
                    bufs
                }
            ),
            1000
        );
        let bufs = IoBuffers::from_ranges(Arc::new(AlignedBuf::new(BLOCK).unwrap()), &[(0, BLOCK)])
            .unwrap();
        assert_eq!(
            run_one(
                &mut engine,
                IoOp::Readv {
                    offset: 8 * BLOCK as u64,
                    bufs
                }
            ),
            0
        );

        // O_DIRECT: two blocks asked, one left.
        let disk = temp_disk(2 * BLOCK as u64, true);
        let mut engine = open_engine(&disk);
        let bufs = IoBuffers::from_ranges(
            Arc::new(AlignedBuf::new(2 * BLOCK).unwrap()),
            &[(0, 2 * BLOCK)],
        )
        .unwrap();
        assert_eq!(
            run_one(
                &mut engine,
                IoOp::Readv {
                    offset: BLOCK as u64,
                    bufs
                }
            ),
            BLOCK as i32
        );
    }

    #[test]
    fn bad_fd_and_bad_offsets_complete_with_negative_results() {
        let disk = temp_disk(4 * BLOCK as u64, true);
        let mut engine = open_engine(&disk);
        assert_eq!(run_one(&mut engine, IoOp::PollIn { fd: -1 }), -libc::EBADF);

        // fallocate refuses an empty range.
        let empty_hole = IoOp::PunchHole { offset: 0, len: 0 };
        assert_eq!(run_one(&mut engine, empty_hole), -libc::EINVAL);

        let mem = Arc::new(AlignedBuf::new(BLOCK).unwrap());
        // An offset whose end overflows loff_t.
        let bufs = IoBuffers::from_ranges(mem.clone(), &[(0, BLOCK)]).unwrap();
        let res = run_one(
            &mut engine,
            IoOp::Writev {
                offset: i64::MAX as u64 - 100,
                bufs,
            },
        );
        assert!(res < 0, "write at the end of loff_t gave {res}");

        // Offsets the kernel would misread (-1 = current position) are
        // refused up front, op handed back.
        let bufs = IoBuffers::from_ranges(mem.clone(), &[(0, BLOCK)]).unwrap();
        match engine.push(
            1,
            IoOp::Readv {
                offset: u64::MAX,
                bufs,
            },
        ) {
            Err((
                EngineError::InvalidOp(_),
                IoOp::Readv {
                    offset: u64::MAX, ..
                },
            )) => {}
            other => panic!("expected InvalidOp, got {other:?}"),
        }
        assert_eq!(engine.in_flight(), 0);
    }

    #[test]
    fn out_of_range_buffers_are_refused() {
        let mem = Arc::new(AlignedBuf::new(BLOCK).unwrap());
        for (offset, len) in [
            (1, BLOCK),
            (BLOCK as u64, 1),
            (u64::MAX, 1),
            (0, usize::MAX),
        ] {
            match IoBuffers::from_ranges(mem.clone(), &[(0, 8), (offset, len)]) {
                Err(EngineError::BufferOutOfRange { offset: o, len: l }) => {
                    assert_eq!((o, l), (offset, len));
                }
                other => panic!("({offset}, {len}) accepted: {other:?}"),
            }
        }
        assert!(IoBuffers::from_ranges(mem, &[(BLOCK as u64, 0), (0, BLOCK)]).is_ok());
    }

    #[test]
    fn drop_with_ops_in_flight_cancels_and_returns() {
        let disk = temp_disk(BLOCK as u64, false);
        let mut engine = open_engine(&disk);
        let mem = Arc::new(AlignedBuf::new(BLOCK).unwrap());
        let efd = push_eventfd_poll(&mut engine, 1);
        engine.submit_and_wait(0).unwrap();
        // Queued, never submitted: drop must submit then cancel it too.
        let bufs = IoBuffers::from_ranges(mem.clone(), &[(0, BLOCK)]).unwrap();
        engine.push(2, IoOp::Readv { offset: 0, bufs }).unwrap();
        engine
            .push(
                3,
                IoOp::PollIn {
                    fd: efd.as_raw_fd(),
                },
            )
            .unwrap();
        let started = Instant::now();
        drop(engine);
        assert!(
            started.elapsed() < DROP_WAIT,
            "drop waited for the deadline"
        );
        // The buffers were released, not leaked.
        assert_eq!(Arc::strong_count(&mem), 1);
    }

    #[test]
    fn guest_region_is_io_memory() {
        let disk = temp_disk(8 * BLOCK as u64, true);
        let mut engine = open_engine(&disk);
        let region = Arc::new(shadowback_ring::SharedRegion::create("uring-test", 4).unwrap());
        let data = pattern(11, 2 * BLOCK);
        region.write(BLOCK as u64, &data).unwrap();
        // Two guest pages, written out of order to consecutive disk blocks.
        let bufs = IoBuffers::from_ranges(
            region.clone(),
            &[(2 * BLOCK as u64, BLOCK), (BLOCK as u64, BLOCK)],
        )
        .unwrap();
        assert_eq!(
            run_one(&mut engine, IoOp::Writev { offset: 0, bufs }),
            2 * BLOCK as i32
        );
        let bufs = IoBuffers::from_ranges(region.clone(), &[(3 * BLOCK as u64, BLOCK)]).unwrap();
        assert_eq!(
            run_one(&mut engine, IoOp::Readv { offset: 0, bufs }),
            BLOCK as i32
        );
        let mut got = vec![0u8; BLOCK];
        region.read(3 * BLOCK as u64, &mut got).unwrap();
        assert_eq!(got, &data[BLOCK..]);
        assert!(matches!(
            IoBuffers::from_ranges(region, &[(4 * BLOCK as u64 - 8, 16)]),
            Err(EngineError::BufferOutOfRange { .. })
        ));
    }

    #[test]
    fn sqpoll_engine_round_trips() {
        let disk = temp_disk(4 * BLOCK as u64, false);
        let cfg = EngineConfig {
            entries: 8,
            sqpoll: true,
            ..EngineConfig::default()
        };
        let mut engine = match Engine::new(&disk.file, &cfg) {
            Ok(engine) => engine,
            // Unprivileged SQPOLL is refused on old kernels / by policy.
            Err(EngineError::Setup(e)) if e.raw_os_error() == Some(libc::EPERM) => return,
            Err(e) => panic!("{e}"),
        };
        let data = pattern(5, BLOCK);
        let bufs = IoBuffers::from_ranges(buf_with(&data), &[(0, BLOCK)]).unwrap();
        assert_eq!(
            run_one(
                &mut engine,
                IoOp::Writev {
                    offset: BLOCK as u64,
                    bufs
                }
            ),
            BLOCK as i32
        );
        let dst = Arc::new(AlignedBuf::new(BLOCK).unwrap());
        let bufs = IoBuffers::from_ranges(dst.clone(), &[(0, BLOCK)]).unwrap();
        assert_eq!(
            run_one(
                &mut engine,
                IoOp::Readv {
                    offset: BLOCK as u64,
                    bufs
                }
            ),
            BLOCK as i32
        );
        assert_eq!(contents(dst), data);
    }
}
