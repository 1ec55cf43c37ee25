//! A device's part of a live upgrade (docs/ARCHITECTURE.md §4.2): the
//! task describes itself between two events and pauses; the binary that
//! takes over rebuilds the task around the same instances, session and
//! counters.

use std::sync::Arc;
use std::time::Instant;

use shadowback_shadow::MetricsPage;
use shadowback_xenbus::Message;
use tokio::sync::oneshot;

use super::handle::{lock, Attachment};
use super::takeover::GivenUp;
use super::task::{Attached, DeviceTask};
use super::{launch, DeviceHandle, Settings};
use crate::access::AccessList;
use crate::class::net::HeldWire;
use crate::class::{BlockClass, DeviceClass, NetClass};
use crate::config::{DiskConfig, LimitsConfig, NicConfig};
use crate::instance::Instance;
use crate::pool::StandbyPool;
use crate::session::Session;
use crate::spawn::{BackendCommand, IoFence};
use crate::stats::DeviceStats;
use crate::upgrade::{
    Adopted, AttachedState, ClassState, DeviceState, FenceState, Handover, InstanceState,
};
use crate::SupervisorError;

/// A device task paused for an upgrade: its state, the descriptors it
/// names, and what resumes it.
pub(crate) struct Frozen {
    pub state: DeviceState,
    pub fds: Handover,
    /// Fire (or drop) to resume the task.
    pub resume: oneshot::Sender<()>,
}

/// A running instance (a device's, or a spare of the standby pool) as the
/// binary that takes over needs it.
pub(crate) fn instance_state(i: &Instance, fds: &mut Handover) -> InstanceState {
    let (pidfd, control) = i.handover_fds();
    InstanceState {
        pid: i.pid(),
        pidfd: fds.fd(pidfd),
        control: fds.fd(control),
        poisons_sent: i.poisons_sent,
        serving: i.serving,
        membarrier: i.membarrier,
        fence: i.io_fence().map(|f| {
            let (disk, slot) = f.parts();
            FenceState {
                disk: fds.fd(disk),
                slot,
            }
        }),
    }
}

impl DeviceTask {
    /// The device as the binary that takes over needs it.
    pub(super) fn handover(&self) -> Result<(DeviceState, Handover), String> {
        let mut fds = Handover::default();
        let class = self.class.handover(&mut fds);
        let attached = match &self.attached {
            Some(a) => Some(AttachedState {
                id: a.id,
                lost: a.lost.is_none(),
                session: a
                    .session
                    .as_ref()
                    .map(|s| s.handover(&mut fds))
                    .transpose()?,
            }),
            None => None,
        };
        let stats = lock(&self.stats)
            .to_message(&self.name)
            .encode()
            .map_err(|e| e.to_string())?;
        let state = DeviceState {
            name: self.name.clone(),
            class,
            metrics: fds.fd(self.metrics.file()),
            current: self.current.as_ref().map(|i| instance_state(i, &mut fds)),
            attached,
            next_attachment: self.next_attachment,
            poisons: self.poisons.clone(),
            blame: self.blame,
            startup_deaths: self.startup_deaths,
            given_up: self.given_up.as_ref().map(|g| g.why.clone()),
            stats: String::from_utf8(stats).map_err(|e| e.to_string())?,
        };
        Ok((state, fds))
    }
}

/// A disk a previous binary handed over, with the attachment of its
/// frontend (for the connection or vhost-user thread that serves it).
pub(crate) fn adopt_disk(
    cfg: &DiskConfig,
    limits: &LimitsConfig,
    cmd: &BackendCommand,
    state: &DeviceState,
    fds: &Adopted,
    pool: Option<StandbyPool>,
) -> Result<(DeviceHandle, Option<Attachment>), SupervisorError> {
    let ClassState::Disk { image, sectors } = &state.class else {
        return Err(mismatch(&cfg.name));
    };
    let class = Box::new(BlockClass::adopt(cfg, fds.file(*image)?, *sectors)?);
    let access = AccessList::new(&cfg.allow_uids, &cfg.allow_gids);
    let settings = Settings::of(cfg, limits);
    adopt(state, class, settings, access, cmd, fds, pool)
}

/// A vif a previous binary handed over (see [`adopt_disk`]).
pub(crate) fn adopt_nic(
    cfg: &NicConfig,
    limits: &LimitsConfig,
    cmd: &BackendCommand,
    state: &DeviceState,
    fds: &Adopted,
    pool: Option<StandbyPool>,
) -> Result<(DeviceHandle, Option<Attachment>), SupervisorError> {
    let wire = HeldWire::adopt(&state.class, fds)?.ok_or_else(|| mismatch(&cfg.name))?;
    let class = Box::new(NetClass::new(cfg, wire)?);
    let cmd = cmd.with_subcommand(BlockClass::SUBCOMMAND, NetClass::SUBCOMMAND);
    let access = AccessList::new(&cfg.allow_uids, &cfg.allow_gids);
    adopt(
        state,
        class,
        Settings::of_nic(cfg, limits),
        access,
        &cmd,
        fds,
        pool,
    )
}

fn mismatch(name: &str) -> SupervisorError {
    SupervisorError::Runtime(format!(
        "upgrade state: device {name} is of another class than configured"
    ))
}

fn adopt(
    state: &DeviceState,
    class: Box<dyn DeviceClass>,
    settings: Settings,
    access: AccessList,
    cmd: &BackendCommand,
    fds: &Adopted,
    pool: Option<StandbyPool>,
) -> Result<(DeviceHandle, Option<Attachment>), SupervisorError> {
    let err = |why: String| SupervisorError::Runtime(format!("upgrade state: {why}"));
    let metrics = Arc::new(
        MetricsPage::open(fds.fd(state.metrics)?).map_err(|e| err(format!("metrics: {e}")))?,
    );
    let mut task = DeviceTask::new(&state.name, class, settings, cmd, metrics, pool);
    task.current = state
        .current
        .as_ref()
        .map(|s| inherit_instance(s, fds))
        .transpose()?;
    task.next_attachment = state.next_attachment;
    task.poisons = state.poisons.clone();
    task.blame = state.blame;
    task.startup_deaths = state.startup_deaths;
    task.given_up = state.given_up.clone().map(|why| GivenUp {
        why,
        at: Instant::now(),
    });
    let stats = Message::decode(state.stats.as_bytes())
        .and_then(|m| DeviceStats::from_message(&m))
        .map_err(|e| err(format!("counters: {e}")))?;
    *lock(&task.stats) = stats.1;
    let mut attachment = None;
    if let Some(a) = &state.attached {
        let session = match &a.session {
            Some(s) => Some(Session::adopt(s, fds, task.settings.backend_id)?),
            None => None,
        };
        let (tx, lost) = oneshot::channel();
        task.attached = Some(Attached {
            id: a.id,
            // A frontend already told it lost the device sees its channel
            // closed: its connection ends as it was ending.
            lost: (!a.lost).then_some(tx),
            session,
        });
        attachment = Some(Attachment { id: a.id, lost });
        if task.current.as_ref().is_some_and(|i| i.serving) {
            task.watch_current();
        }
    }
    tracing::info!(device = %state.name, pid = ?task.current.as_ref().map(Instance::pid),
        attached = attachment.is_some(), "device adopted");
    Ok((launch(task, access), attachment))
}

/// The instance `s` describes, started by the binary this one replaced.
pub(crate) fn inherit_instance(
    s: &InstanceState,
    fds: &Adopted,
) -> Result<Instance, SupervisorError> {
    let fence = match &s.fence {
        Some(f) => Some(IoFence::from_parts(fds.file(f.disk)?, f.slot)),
        None => None,
    };
    let mut instance = Instance::inherit(
        s.pid,
        fds.fd(s.pidfd)?,
        fds.fd(s.control)?,
        fence,
        s.poisons_sent,
        s.serving,
    )?;
    // Registered once, before its filter: still so in this binary.
    instance.membarrier = s.membarrier;
    Ok(instance)
}
