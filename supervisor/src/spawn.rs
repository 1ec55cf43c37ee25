//! Starting a backend process with the fds it inherits, and opening the
//! disk image it serves.
//!
//! # A supervisor's death
//!
//! Backends must not outlive their supervisor: a new supervisor (restarted
//! by systemd, reconnected to by the VMM's chardev `reconnect`) starts new
//! backends on the same rings and the same image, and an old one that was
//! SIGSTOPped or hung while its supervisor died would otherwise keep
//! touching both. Two mechanisms make that impossible:
//!
//! 1. **`PR_SET_PDEATHSIG(SIGKILL)`** in every backend (set between fork
//!    and exec, see [`spawn_backend`]): the kernel kills it the moment the
//!    supervisor dies, stopped or not. The signal fires when the *thread*
//!    that forked the backend exits, not the process; every backend is
//!    forked from the thread that runs the supervisor's runtime. `shadowback
//!    up` and `SupervisorThread` run a current-thread runtime, so that is
//!    the one thread that calls `block_on` and lives until the supervisor
//!    returns: `start_device` runs in `serve` and the device tasks are
//!    `tokio::spawn`ed onto that runtime. On a multi-thread runtime they
//!    would run on worker threads, which also live as long as the runtime.
//!    Never spawn a backend from `spawn_blocking` (its threads retire after
//!    10 s idle, which would kill the backend) or from a short-lived thread.
//!
//! 2. **A `flock` on the image** ([`open_disk`]): the lock belongs to the
//!    open file description, and the supervisor takes a shared one on its
//!    own description and on each backend's (see (3)); the kernel drops
//!    each only when the last reference to that description goes. An io_uring request in
//!    flight holds a reference until it completes, and so does a ring's
//!    registered-file table until the ring is torn down after its last
//!    request. So the lock of a dead supervisor stays held until every
//!    backend it started has exited *and* every write they submitted has
//!    landed (or failed). A new supervisor takes the lock exclusively before
//!    it starts anything on the image, and therefore waits for exactly
//!    that.
//!
//! # A backend instance's death
//!
//! 3. **Each instance has its own open file description of the image**
//!    ([`Disk::open_for_instance`]), on which the supervisor takes, before
//!    the fork, a shared `flock` (so (2) still covers it) and keeps no
//!    reference to it: the instance's fd 4 and the references its io_uring
//!    takes (its requests', its ring's registered-file table) are the only
//!    ones. Fencing an instance ([`IoFence::wait`]) then waits, after the
//!    reap, until none of its I/O can still reach the image: on an image
//!    file through the inode's direct-I/O count; on a block device, which
//!    has none, through an open-file-description read lock the supervisor
//!    took on the instance's description, on one byte far past the end of
//!    any image at an offset naming the instance ([`FENCE_LOCK_BASE`] plus
//!    its slot). The kernel releases that lock when the last reference
//!    goes — after the process has exited *and* its io_uring has been torn
//!    down with every request completed — and [`wait_for_instance_io`]
//!    takes a write lock on the same byte through the supervisor's own
//!    description, waits for it, and releases it (docs/ARCHITECTURE.md
//!    §7.3).
//!
//! Without (2) the order would still hold in practice: the old backends
//! die within microseconds of their supervisor and their last writes land
//! within milliseconds, while a VMM needs far longer to reconnect (QEMU's
//! chardev `reconnect` retries once per second, and the new supervisor must
//! exec, open the image and start a backend before it even listens); only
//! after the reconnect does a new backend resubmit the requests of the
//! in-flight region. The lock makes this ordering a guarantee instead of a
//! matter of timing. The lock also keeps a second supervisor from
//! exporting an image a running one serves.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Seek;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shadowback_xenbus::SeqPacket;

use crate::config::{CacheMode, DiskConfig};
use crate::SupervisorError;

/// fd number of the control socketpair in the backend.
pub const BACKEND_CONTROL_FD: i32 = 3;
/// fd number of the disk image in the backend.
pub const BACKEND_DISK_FD: i32 = 4;
/// The device's metrics page (docs/ARCHITECTURE.md §4.1) in a backend.
pub const BACKEND_METRICS_FD: i32 = 5;

/// How long [`open_disk`] waits for another holder of the image's lock (a
/// dead supervisor's backends and their last I/O) before it gives up.
pub const IMAGE_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often it tries.
const IMAGE_LOCK_RETRY: Duration = Duration::from_millis(5);

/// An opened disk image.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// This process's claim on the image's lock (see [`open_disk`]).
    _lock: ImageLock,
}

/// Where the instances' fence locks live: byte `FENCE_LOCK_BASE + slot`,
/// far past the end of any image (a lock range need not lie inside the
/// file), so they never meet a lock anyone takes on data.
pub const FENCE_LOCK_BASE: i64 = 1 << 60;

/// Slots for [`FENCE_LOCK_BASE`]: one per instance ever started by this
/// process, never reused.
static NEXT_FENCE_SLOT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// An instance's own open file description of its image, with its locks
/// (module docs, (3)).
#[derive(Debug)]
pub struct InstanceFile {
    pub file: File,
    /// Its fence lock's slot, if it took one (see [`IoFence::wait`]).
    pub slot: Option<i64>,
}

/// `fcntl(F_OFD_SETLK{,W})` of `kind` on byte [`FENCE_LOCK_BASE`]` + slot`.
fn fence_lock(file: &File, slot: i64, kind: libc::c_short, wait: bool) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    let lock = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: FENCE_LOCK_BASE + slot,
        l_len: 1,
        // Open-file-description locks require 0.
        l_pid: 0,
    };
    loop {
        let arg = if wait {
            FcntlArg::F_OFD_SETLKW(&lock)
        } else {
            FcntlArg::F_OFD_SETLK(&lock)
        };
        match fcntl(file.as_raw_fd(), arg) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map(drop),
        }
    }
}

/// What fencing one instance of a writable disk waits for after the reap
/// (docs/ARCHITECTURE.md §7.3). Created by the block class with the
/// instance.
#[derive(Debug)]
pub struct IoFence {
    /// The supervisor's own description of the image (a dup).
    disk: File,
    /// The instance's fence-lock slot (a block device), or `None` (an image
    /// file: the inode's direct-I/O count is waited for instead).
    slot: Option<i64>,
}

impl IoFence {
    /// The supervisor's description of the image and the fence slot, for
    /// a live upgrade.
    pub fn parts(&self) -> (&File, Option<i64>) {
        (&self.disk, self.slot)
    }

    /// The fence [`parts`](Self::parts) described, in the binary that
    /// took over.
    pub fn from_parts(disk: File, slot: Option<i64>) -> Self {
        IoFence { disk, slot }
    }

    /// Waits until no I/O of the fenced instance can still reach the
    /// image. Blocks: call it from `spawn_blocking`.
    ///
    /// - An image file: `fallocate(KEEP_SIZE)` over its first block waits
    ///   for every direct I/O in flight on the inode (`inode_dio_wait`) and
    ///   changes no data. Quick: it returns as soon as the last direct
    ///   write of the dead instance has completed.
    /// - A block device refuses that `fallocate` and keeps no direct-I/O
    ///   count: [`wait_for_instance_io`] waits for the instance's own file
    ///   description to be released instead (module docs, (3)), which the
    ///   kernel does only after the dead process's io_uring has been torn
    ///   down — tens of milliseconds later (§7.3).
    pub fn wait(&self) -> nix::Result<()> {
        match self.slot {
            Some(slot) => wait_for_instance_io(&self.disk, slot),
            None => {
                use nix::fcntl::{fallocate, FallocateFlags};
                fallocate(
                    self.disk.as_raw_fd(),
                    FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                )
                .map(drop)
            }
        }
    }
}

/// Waits until every reference to the open file description of the
/// instance with fence slot `slot` is gone — its process and all the I/O
/// it submitted (module docs, (3)). `disk` is the supervisor's own
/// description of the image (opened for writing). Blocks: call it from
/// `spawn_blocking`.
pub fn wait_for_instance_io(disk: &File, slot: i64) -> nix::Result<()> {
    fence_lock(disk, slot, libc::F_WRLCK as libc::c_short, true)?;
    fence_lock(disk, slot, libc::F_UNLCK as libc::c_short, false)
}

impl Disk {
    /// Whether the image is a block device (fenced through fence locks,
    /// see [`IoFence::wait`]).
    pub fn is_block_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
    }

    /// The fence of a writable instance whose file took fence slot `slot`
    /// (`None`: an image file, see [`IoFence::wait`]).
    pub fn io_fence(&self, slot: Option<i64>) -> Result<IoFence, SupervisorError> {
        let disk = self
            .file
            .try_clone()
            .map_err(|e| SupervisorError::Spawn(e.to_string()))?;
        Ok(IoFence { disk, slot })
    }

    /// A new open file description of the image for one backend instance,
    /// with the image's shared `flock` and, if `fence_lock`, the instance's
    /// fence lock (module docs, (3)).
    pub fn open_for_instance(
        &self,
        readonly: bool,
        fence_lock: bool,
    ) -> Result<InstanceFile, SupervisorError> {
        use nix::fcntl::{fcntl, FcntlArg, FlockArg, OFlag};
        let err = |why: String| SupervisorError::Disk(format!("instance file: {why}"));
        let flags =
            fcntl(self.file.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| err(e.to_string()))?;
        let direct = OFlag::from_bits_truncate(flags) & OFlag::O_DIRECT;
        // Reopening through /proc gives a new description of the same
        // inode, whatever became of the path since.
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(direct.bits())
            .open(&path)
            .map_err(|e| err(format!("{path}: {e}")))?;
        // Shared with this supervisor's own claim: cannot conflict.
        try_flock(&file, FlockArg::LockSharedNonblock).map_err(|e| err(format!("flock: {e}")))?;
        if !fence_lock {
            return Ok(InstanceFile { file, slot: None });
        }
        let slot = NEXT_FENCE_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self::fence_lock(&file, slot, libc::F_RDLCK as libc::c_short, false)
            .map_err(|e| err(format!("fence lock: {e}")))?;
        Ok(InstanceFile {
            file,
            slot: Some(slot),
        })
    }
}

/// Images this process holds the lock of, as `(st_dev, st_ino, users)`.
/// Several disks of one config may export the same image (the benchmarks
/// do): only the first waits for the exclusive lock, the others share it.
static LOCKED_IMAGES: Mutex<Vec<(u64, u64, usize)>> = Mutex::new(Vec::new());

fn locked_images() -> MutexGuard<'static, Vec<(u64, u64, usize)>> {
    // A plain list of counters: a panic elsewhere cannot leave it torn.
    LOCKED_IMAGES.lock().unwrap_or_else(|e| e.into_inner())
}

/// One [`Disk`]'s use of an image this process holds the lock of.
#[derive(Debug)]
struct ImageLock {
    dev: u64,
    ino: u64,
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let mut held = locked_images();
        if let Some(i) = held
            .iter()
            .position(|&(d, n, _)| (d, n) == (self.dev, self.ino))
        {
            held[i].2 -= 1;
            if held[i].2 == 0 {
                held.swap_remove(i);
            }
        }
        // The flock itself goes with the last reference to the file
        // description, i.e. after the backends sharing it are gone.
    }
}

/// `flock(2)` without blocking. (`nix::fcntl::Flock` would take the file
/// by value; the `Disk` keeps it.)
#[allow(deprecated)]
fn try_flock(file: &File, arg: nix::fcntl::FlockArg) -> nix::Result<()> {
    nix::fcntl::flock(file.as_raw_fd(), arg)
}

/// Takes the image's lock for `file` (see the module docs): exclusively
/// first, so that every earlier holder — a dead supervisor's backends and
/// their in-flight I/O included — has let go; then shared, so that other
/// disks of this process on the same image can take it too. Another
/// process holding it for longer than [`IMAGE_LOCK_TIMEOUT`] is an error.
fn lock_image(file: &File, path: &std::path::Path) -> Result<ImageLock, SupervisorError> {
    use nix::errno::Errno;
    use nix::fcntl::FlockArg;
    let err = |why: String| SupervisorError::Disk(format!("{}: {why}", path.display()));
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    let (dev, ino) = (meta.dev(), meta.ino());
    {
        let mut held = locked_images();
        if let Some(entry) = held.iter_mut().find(|e| (e.0, e.1) == (dev, ino)) {
            // This process already waited for it: share its lock.
            try_flock(file, FlockArg::LockSharedNonblock)
                .map_err(|e| err(format!("cannot share the image's lock: {e}")))?;
            entry.2 += 1;
            return Ok(ImageLock { dev, ino });
        }
    }
    let started = Instant::now();
    let mut warned = false;
    loop {
        match try_flock(file, FlockArg::LockExclusiveNonblock) {
            Ok(()) => break,
            Err(Errno::EWOULDBLOCK | Errno::EINTR) => {}
            Err(e) => return Err(err(format!("flock: {e}"))),
        }
        let waited = started.elapsed();
        if waited >= IMAGE_LOCK_TIMEOUT {
            return Err(err(format!(
                "in use by another process for {waited:?} (another supervisor, or backends of \
                 a dead one that do not exit)"
            )));
        }
        if !warned && waited >= Duration::from_secs(1) {
            warned = true;
            tracing::warn!(path = %path.display(), "waiting for the image's previous users to exit");
        }
        std::thread::sleep(IMAGE_LOCK_RETRY);
    }
    let waited_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    tracing::debug!(path = %path.display(), waited_us, "image lock taken");
    // The conversion may release the lock for an instant; a process that
    // takes it exclusively then makes it fail, and we refuse the image.
    try_flock(file, FlockArg::LockSharedNonblock)
        .map_err(|e| err(format!("cannot keep the image's lock: {e}")))?;
    locked_images().push((dev, ino, 1));
    Ok(ImageLock { dev, ino })
}

/// Opens the image as the config says (`O_DIRECT` for `cache = "none"`)
/// and takes its lock (see the module docs), waiting up to
/// [`IMAGE_LOCK_TIMEOUT`] for a previous supervisor's backends and their
/// last writes to be gone.
pub fn open_disk(cfg: &DiskConfig) -> Result<Disk, SupervisorError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!cfg.readonly);
    if cfg.cache == CacheMode::None {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts
        .open(&cfg.path)
        .map_err(|e| SupervisorError::Disk(format!("{}: {e}", cfg.path.display())))?;
    let lock = lock_image(&file, &cfg.path)?;
    let sectors = sectors_of(&file, &cfg.path)?;
    Ok(Disk {
        file,
        sectors,
        _lock: lock,
    })
}

/// The size of an image in 512-byte sectors.
fn sectors_of(file: &File, path: &std::path::Path) -> Result<u64, SupervisorError> {
    let len =
        disk_size(file).map_err(|e| SupervisorError::Disk(format!("{}: {e}", path.display())))?;
    if len == 0 || len % 512 != 0 {
        return Err(SupervisorError::Disk(format!(
            "{}: size {len} is not a non-zero multiple of 512 bytes",
            path.display()
        )));
    }
    Ok(len / 512)
}

/// The image the previous binary of this process opened and locked (a
/// live upgrade, docs/ARCHITECTURE.md §4.2): `file` is that description,
/// so it still holds the image's `flock`, which is not taken again.
pub fn adopt_disk(file: File, path: &std::path::Path) -> Result<Disk, SupervisorError> {
    let meta = file
        .metadata()
        .map_err(|e| SupervisorError::Disk(format!("{}: {e}", path.display())))?;
    let (dev, ino) = (meta.dev(), meta.ino());
    {
        let mut held = locked_images();
        match held.iter_mut().find(|e| (e.0, e.1) == (dev, ino)) {
            Some(entry) => entry.2 += 1,
            None => held.push((dev, ino, 1)),
        }
    }
    let lock = ImageLock { dev, ino };
    let sectors = sectors_of(&file, path)?;
    Ok(Disk {
        file,
        sectors,
        _lock: lock,
    })
}

/// The size of an image in bytes. Seeking to the end gives the size of a
/// block device too (its metadata says 0).
pub fn disk_size(file: &File) -> std::io::Result<u64> {
    let mut file = file;
    file.seek(std::io::SeekFrom::End(0))
}

/// The next I/O fence slot this process would give an instance, for the
/// binary that takes over in a live upgrade.
pub fn next_fence_slot() -> i64 {
    NEXT_FENCE_SLOT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Continues the fence slots of the previous binary: a slot is never
/// reused, also across an upgrade.
pub fn continue_fence_slots(next: i64) {
    NEXT_FENCE_SLOT.fetch_max(next, std::sync::atomic::Ordering::Relaxed);
}

/// How to run a backend: the program and the arguments before those the
/// supervisor and the device class add (`shadowback blkback` by default:
/// the block class's backend; a NIC's runs
/// [`with_subcommand`](Self::with_subcommand)`("blkback", "netback")`).
#[derive(Clone, Debug)]
pub struct BackendCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra environment for the **first** backend instance of each device
    /// only (not its standby, not any replacement), e.g.
    /// `SHADOWBACK_CRASH_AT` in tests: a crash point then fires once and
    /// the recovery it provokes can succeed.
    pub env: Vec<(OsString, OsString)>,
}

impl BackendCommand {
    /// `<this executable> blkback`
    /// ([`BlockClass::SUBCOMMAND`](crate::class::BlockClass::SUBCOMMAND)).
    pub fn current_exe() -> Result<Self, SupervisorError> {
        let exe = std::env::current_exe().map_err(|e| SupervisorError::Spawn(e.to_string()))?;
        Ok(BackendCommand {
            program: exe.into_os_string(),
            args: vec![crate::class::BlockClass::SUBCOMMAND.into()],
            env: Vec::new(),
        })
    }

    /// The same command for another class's backend: every argument
    /// `from` (a subcommand, `blkback`) becomes `to` (`netback`). A
    /// command without `from` (a test's fake backend) is kept as it is.
    pub fn with_subcommand(&self, from: &str, to: &str) -> Self {
        let args = self
            .args
            .iter()
            .map(|a| if a == from { to.into() } else { a.clone() })
            .collect();
        BackendCommand {
            args,
            ..self.clone()
        }
    }

    /// The same command with `--no-confine` (`[backend] confine =
    /// false`): its backends skip seccomp, capability dropping and limits.
    pub fn unconfined(&self) -> Self {
        let mut cmd = self.clone();
        cmd.args.push(NO_CONFINE.into());
        cmd
    }
}

/// The backend flag of `[backend] confine = false`.
pub const NO_CONFINE: &str = "--no-confine";

/// Starts a backend instance of device `name`: `cmd`, then `--device
/// NAME --control-fd 3`, the class's `setup.args`, and `--no-shadow`
/// without the shadow layer. It inherits the control socket as fd 3 and
/// `device_file` (if the class has one) as fd 4 (`--disk-fd 4`) and the
/// device's `metrics` page as fd 5 (`--metrics-fd 5`), nothing else; the
/// supervisor's copy of the device file is closed once the process is
/// started. `first` marks the device's first instance, the only one that
/// gets [`BackendCommand::env`]. A spare of the standby pool
/// ([`spawn_spare`]) gets neither file nor metrics page.
pub fn spawn_backend(
    cmd: &BackendCommand,
    name: &str,
    args: &[std::ffi::OsString],
    device_file: Option<File>,
    metrics: Option<&File>,
    shadow: bool,
    first: bool,
) -> Result<(u32, SeqPacket), SupervisorError> {
    let (ours, theirs) = SeqPacket::pair().map_err(|e| SupervisorError::Spawn(e.to_string()))?;
    let theirs: OwnedFd = theirs.into_fd();
    let control_src = theirs.as_raw_fd();
    // Dropped after the spawn: the child's fd 4 is then its only holder.
    let disk_src = device_file.as_ref().map(AsRawFd::as_raw_fd);
    let metrics_src = metrics.map(AsRawFd::as_raw_fd);
    // A plain `std` child: nothing reaps it behind the supervisor's back
    // and dropping it kills nothing; the `Instance` owns it through its
    // pidfd (and a new supervisor binary can adopt it, §4.2).
    let mut command = std::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .arg("--device")
        .arg(name)
        .arg("--control-fd")
        .arg(BACKEND_CONTROL_FD.to_string())
        .args(args)
        .stdin(Stdio::null());
    if disk_src.is_some() {
        command.arg("--disk-fd").arg(BACKEND_DISK_FD.to_string());
    }
    if metrics_src.is_some() {
        command
            .arg("--metrics-fd")
            .arg(BACKEND_METRICS_FD.to_string());
    }
    if !shadow {
        command.arg("--no-shadow");
    }
    if first {
        command.envs(cmd.env.iter().map(|(k, v)| (k, v)));
    }
    // Taken before the fork: in the child, `getppid` differs from it once
    // the supervisor has died.
    let supervisor = libc::pid_t::try_from(std::process::id())
        .map_err(|_| SupervisorError::Spawn("pid out of range".into()))?;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl, getppid, _exit, fcntl and dup2, which are
    // async-signal-safe; it allocates nothing. The source fds are open in
    // the parent (owned by `theirs`, `device_file` and the caller's
    // `metrics`, alive across the spawn call). All are first copied above
    // fd 10 so that no target number can clobber another source; dup2
    // then clears FD_CLOEXEC on the copies at 3, 4 and 5, and the high
    // copies close on exec. Without a device file fd 4 is left unused,
    // without a metrics page fd 5.
    // `pre_exec` is the one way to set the death signal and place the fds
    // between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            // The backend dies with the supervisor (module docs). The
            // setting survives exec; it is cleared only by a set-uid exec.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl: then
            // nobody will send the signal, and we were re-parented.
            if libc::getppid() != supervisor {
                libc::_exit(1);
            }
            let control = libc::fcntl(control_src, libc::F_DUPFD_CLOEXEC, 10);
            let disk = match disk_src {
                Some(src) => libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 10),
                None => 0,
            };
            let metrics = match metrics_src {
                Some(src) => libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 10),
                None => 0,
            };
            if control < 0 || disk < 0 || metrics < 0 || libc::dup2(control, BACKEND_CONTROL_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if disk_src.is_some() && libc::dup2(disk, BACKEND_DISK_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if metrics_src.is_some() && libc::dup2(metrics, BACKEND_METRICS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| SupervisorError::Spawn(format!("{}: {e}", cmd.program.to_string_lossy())))?;
    drop(theirs);
    drop(device_file);
    Ok((child.id(), ours))
}

/// The name a spare's logs go by until it is adopted.
pub const SPARE_NAME: &str = "spare";
/// The backend flag that starts a spare.
pub const SPARE: &str = "--spare";

/// Starts a spare of the standby pool (docs/ARCHITECTURE.md §7.5): `cmd`
/// (a class's backend command) with `--spare`, inheriting the control
/// socket alone. It sets itself up, confines itself and waits for
/// `adopt`, which brings what [`spawn_backend`] would have passed a
/// backend of the device.
pub fn spawn_spare(cmd: &BackendCommand) -> Result<(u32, SeqPacket), SupervisorError> {
    spawn_backend(cmd, SPARE_NAME, &[SPARE.into()], None, None, true, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the fence lock of `slot` can be taken now, without waiting.
    fn fence_free(disk: &File, slot: i64) -> bool {
        match fence_lock(disk, slot, libc::F_WRLCK as libc::c_short, false) {
            Ok(()) => {
                fence_lock(disk, slot, libc::F_UNLCK as libc::c_short, false).unwrap();
                true
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => false,
            Err(e) => panic!("fence lock: {e}"),
        }
    }

    /// The fence waits for every reference to an instance's description —
    /// its fd, and each in-flight io_uring request's — and for nothing
    /// else: not for the supervisor's own description, not for another
    /// instance (a hot standby) of the same image.
    #[test]
    fn the_fence_waits_for_the_last_reference_to_the_instance_file() {
        let dir = std::env::temp_dir().join(format!("sb-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        File::create(&image).unwrap().set_len(1 << 20).unwrap();
        let mut cfg = DiskConfig::new("fence", &image);
        cfg.cache = CacheMode::Writeback;
        let disk = open_disk(&cfg).unwrap();
        assert_eq!(disk.sectors, 2048);

        let first = disk.open_for_instance(false, true).unwrap();
        let standby = disk.open_for_instance(false, true).unwrap();
        let (a, b) = (first.slot.unwrap(), standby.slot.unwrap());
        assert_ne!(a, b);
        // A reference like the one an in-flight request holds.
        let in_flight = first.file.try_clone().unwrap();
        drop(first);
        assert!(
            !fence_free(&disk.file, a),
            "the fence ignored an in-flight reference"
        );
        drop(in_flight);
        assert!(
            fence_free(&disk.file, a),
            "the fence outlived the instance file"
        );
        wait_for_instance_io(&disk.file, a).unwrap();
        // The standby's lock is its own.
        assert!(!fence_free(&disk.file, b));
        drop(standby);
        assert!(fence_free(&disk.file, b));
        // An image file is fenced through its inode instead.
        assert!(!disk.is_block_device());
        assert_eq!(disk.open_for_instance(false, false).unwrap().slot, None);
        disk.io_fence(None).unwrap().wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
