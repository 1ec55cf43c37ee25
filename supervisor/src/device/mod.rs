//! One exported disk: its backend instances, the frontend attached to it,
//! and the recovery of DESIGN §5.
//!
//! A device task owns the current backend instance, a hot standby, and —
//! for the attached frontend — everything that must outlive a backend (a
//! [`Session`]: the frontend's fds, its attach request, the shadow logs).
//! The frontend is a guest on the control socket (a Xen-style ring) or a
//! VMM on the disk's vhost-user socket (virtqueues); recovery treats both
//! alike. Connection tasks and vhost-user threads talk to it through
//! [`DeviceHandle`].
//!
//! The current instance is watched three ways: its pidfd (exit), its
//! control channel (EOF), and, while a guest is attached with the shadow
//! layer, the [`Watchdog`] on the log's heartbeat and the ring. A failure
//! is fenced (SIGKILL, wait for the pidfd, reap) before anything else
//! touches the ring; then the standby, or a cold-started instance, gets
//! `attach` with `recover=1` and replays the log. The guest's connection
//! stays Connected: it is told only if [`MAX_FAILED_TAKEOVERS`] takeovers
//! in a row fail.

mod handle;
mod takeover;
mod task;

use std::sync::{Arc, Mutex};

use shadowback_xenbus::protocol::ErrorCode;
use shadowback_xenbus::{BackendInfo, DiskMode};
use tokio::sync::mpsc;

use crate::config::DiskConfig;
use crate::instance::Instance;
use crate::spawn::{open_disk, BackendCommand};
use crate::stats::DeviceStats;
use crate::SupervisorError;

pub use handle::{Attachment, DeviceHandle, Fault, Lost};
pub use takeover::MAX_FAILED_TAKEOVERS;
use task::DeviceTask;

/// A request refused: the code and text the frontend is told.
pub(crate) type Refusal = (ErrorCode, String);

/// Opens the disk, starts its backend (and standby) and the task that owns
/// them.
pub fn start_device(
    cfg: &DiskConfig,
    cmd: &BackendCommand,
) -> Result<DeviceHandle, SupervisorError> {
    let disk = open_disk(cfg)?;
    let current = Instance::start(cmd, cfg, &disk, true)?;
    let info = BackendInfo {
        backend_id: cfg.backend_id,
        sectors: disk.sectors,
        sector_size: 512,
        physical_sector_size: 4096,
        mode: if cfg.readonly {
            DiskMode::ReadOnly
        } else {
            DiskMode::ReadWrite
        },
        feature_flush_cache: true,
        feature_discard: cfg.discard && !cfg.readonly,
        discard_granularity: 4096,
        discard_alignment: 0,
        max_indirect_segments: 256,
        max_ring_page_order: cfg.max_ring_page_order,
        info: u32::from(cfg.readonly) * 4,
    };
    let stats = Arc::new(Mutex::new(DeviceStats::default()));
    let (tx, rx) = mpsc::channel(16);
    let mut task = DeviceTask {
        name: cfg.name.clone(),
        cfg: cfg.clone(),
        cmd: cmd.clone(),
        disk,
        current: Some(current),
        standby: None,
        standby_retry: None,
        attached: None,
        next_attachment: 1,
        given_up: None,
        poisons: Vec::new(),
        injected_kill: None,
        injected_hang: false,
        blame: true,
        watchdog: None,
        startup_deaths: 0,
        stats: stats.clone(),
    };
    task.ensure_standby();
    task.publish();
    tokio::spawn(task.run(rx));
    Ok(DeviceHandle {
        name: cfg.name.clone(),
        info,
        tx,
        stats,
    })
}
