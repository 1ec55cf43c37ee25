//! One exported device: its backend instances, the frontend attached to
//! it, and its recovery (docs/ARCHITECTURE.md §4, §7).
//!
//! A device task owns the current backend instance, a share of its
//! class's standby pool (`pool.rs`), and —
//! for the attached frontend — everything that must outlive a backend (a
//! [`Session`](crate::session::Session): the frontend's request and fds,
//! a shadow log per ring). The frontend is a guest on the control socket
//! (a Xen-style ring) or a VMM on the device's vhost-user socket
//! (virtqueues); recovery treats both alike, and what differs between them
//! is the transport's (`transport.rs`). What differs between a disk and
//! another kind of device is its class's (`class/`): the task holds a
//! `Box<dyn DeviceClass>` and starts every instance through it.
//!
//! - `handle.rs`: [`DeviceHandle`], the commands connection tasks and
//!   vhost-user threads send, [`Fault`], [`Lost`];
//! - `task.rs`: the task's loop, attach, detach, `set-call`, faults;
//! - `takeover.rs`: failure, fence and takeover.
//!
//! The current instance is watched three ways: its pidfd (exit), its
//! control channel (EOF), and, while a frontend is attached with the
//! shadow layer, the watchdog on the log's heartbeat and the rings. A
//! failure is fenced (SIGKILL, wait for the pidfd, reap, and for a
//! writable disk wait for its last I/O) before anything else touches the
//! rings; then the standby, or a cold-started instance, gets the attach
//! with `recover=1` and replays the logs. The frontend stays Connected: it
//! is told only if [`MAX_FAILED_TAKEOVERS`] takeovers in a row fail.

mod handle;
mod takeover;
mod task;
mod upgrade;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shadowback_shadow::MetricsPage;
use shadowback_xenbus::protocol::ErrorCode;
use tokio::sync::mpsc;

use crate::access::AccessList;
use crate::class::net::HeldWire;
use crate::class::{BlockClass, DeviceClass, NetClass};
use crate::config::{DiskConfig, LimitsConfig, NicConfig};
use crate::instance::Instance;
use crate::limits::{AttachRate, DeviceLimits};
use crate::pool::StandbyPool;
use crate::spawn::BackendCommand;
use crate::stats::DeviceStats;
use crate::SupervisorError;

pub use handle::{Attachment, DeviceHandle, Fault, Lost};
pub use takeover::{FRESH_START_AFTER, MAX_FAILED_TAKEOVERS};
use task::DeviceTask;
pub(crate) use upgrade::{adopt_disk, adopt_nic, inherit_instance, instance_state, Frozen};

/// A request refused: the code and text the frontend is told.
pub(crate) type Refusal = (ErrorCode, String);

/// What the device task needs of a device's configuration, whatever its
/// class.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// The shadow layer: shadow logs, transparent recovery.
    pub shadow: bool,
    /// The watchdog's `hang_timeout_ms`.
    pub hang_timeout: Duration,
    /// The Xen domain a ring's grants must name (for the watchdog's probe).
    pub backend_id: u16,
    /// What a frontend may make the device hold (`[limits]`).
    pub limits: DeviceLimits,
}

impl Settings {
    fn of(cfg: &DiskConfig, limits: &LimitsConfig) -> Self {
        Settings {
            shadow: cfg.shadow,
            hang_timeout: Duration::from_millis(cfg.hang_timeout_ms),
            backend_id: cfg.backend_id,
            limits: DeviceLimits::new(limits),
        }
    }

    fn of_nic(cfg: &NicConfig, limits: &LimitsConfig) -> Self {
        Settings {
            shadow: cfg.shadow,
            hang_timeout: Duration::from_millis(cfg.hang_timeout_ms),
            backend_id: cfg.backend_id,
            limits: DeviceLimits::new(limits),
        }
    }
}

/// Opens the disk, starts its backend and the task that owns it;
/// `limits` bound what a frontend makes it hold; its takeovers take
/// spares from `pool` (none: `standby = false`).
pub fn start_device(
    cfg: &DiskConfig,
    limits: &LimitsConfig,
    cmd: &BackendCommand,
    pool: Option<StandbyPool>,
) -> Result<DeviceHandle, SupervisorError> {
    start_disk(cfg, BlockClass::open(cfg)?, limits, cmd, pool)
}

/// [`start_device`] with the image opened already (a disk added at run
/// time opens it off the runtime's thread: the image's lock may be waited
/// for).
pub fn start_disk(
    cfg: &DiskConfig,
    class: BlockClass,
    limits: &LimitsConfig,
    cmd: &BackendCommand,
    pool: Option<StandbyPool>,
) -> Result<DeviceHandle, SupervisorError> {
    let class: Box<dyn DeviceClass> = Box::new(class);
    let access = AccessList::new(&cfg.allow_uids, &cfg.allow_gids);
    start(
        &cfg.name,
        class,
        Settings::of(cfg, limits),
        access,
        cmd,
        pool,
    )
}

/// Starts the backend of vif `cfg` on `wire`, which the device holds
/// from now on, and the task that owns it; spares come from `pool`.
pub fn start_nic(
    cfg: &NicConfig,
    limits: &LimitsConfig,
    wire: HeldWire,
    cmd: &BackendCommand,
    pool: Option<StandbyPool>,
) -> Result<DeviceHandle, SupervisorError> {
    let class: Box<dyn DeviceClass> = Box::new(NetClass::new(cfg, wire)?);
    let cmd = cmd.with_subcommand(BlockClass::SUBCOMMAND, NetClass::SUBCOMMAND);
    let access = AccessList::new(&cfg.allow_uids, &cfg.allow_gids);
    start(
        &cfg.name,
        class,
        Settings::of_nic(cfg, limits),
        access,
        &cmd,
        pool,
    )
}

/// Starts the first backend instance of device `name` and the task that
/// owns it; `access` says who may use it.
fn start(
    name: &str,
    class: Box<dyn DeviceClass>,
    settings: Settings,
    access: AccessList,
    cmd: &BackendCommand,
    pool: Option<StandbyPool>,
) -> Result<DeviceHandle, SupervisorError> {
    // Outlives every instance, so its counters add up across them.
    let metrics = Arc::new(
        MetricsPage::create().map_err(|e| SupervisorError::Spawn(format!("metrics page: {e}")))?,
    );
    let current = Instance::start(
        cmd,
        name,
        class.as_ref(),
        settings.shadow,
        true,
        metrics.file(),
    )?;
    let mut task = DeviceTask::new(name, class, settings, cmd, metrics, pool);
    task.current = Some(current);
    Ok(launch(task, access))
}

/// Publishes `task`'s state, spawns it and returns its handle.
fn launch(task: DeviceTask, access: AccessList) -> DeviceHandle {
    let (tx, rx) = mpsc::channel(16);
    let handle = DeviceHandle {
        name: task.name.clone(),
        info: task.info.subscribe(),
        virtio: task.class.virtio_model(),
        access,
        limits: task.settings.limits,
        tx,
        stats: task.stats.clone(),
        metrics: task.metrics.clone(),
        last_io: Arc::default(),
        pool: task.pool.clone(),
    };
    task.publish();
    tokio::spawn(task.run(rx));
    handle
}

impl DeviceTask {
    /// A task for device `name` with no instance yet; its takeovers take
    /// spares from `pool`.
    fn new(
        name: &str,
        class: Box<dyn DeviceClass>,
        settings: Settings,
        cmd: &BackendCommand,
        metrics: Arc<MetricsPage>,
        pool: Option<StandbyPool>,
    ) -> Self {
        let (info, _) = tokio::sync::watch::channel(class.backend_info());
        DeviceTask {
            name: name.to_string(),
            attach_rate: AttachRate::new(settings.limits.attaches_per_second),
            settings,
            cmd: cmd.clone(),
            class,
            current: None,
            pool,
            fencing: None,
            attached: None,
            next_attachment: 1,
            given_up: None,
            poisons: Vec::new(),
            injected_kill: None,
            injected_hang: false,
            blame: true,
            watchdog: None,
            startup_deaths: 0,
            stats: Arc::new(Mutex::new(DeviceStats::default())),
            metrics,
            info,
        }
    }
}
