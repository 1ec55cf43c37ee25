//! The vhost-user request handler of one VMM connection, for any device
//! class: it keeps what the VMM sent (memory table, vring addresses and eventfds, in-flight
//! region) and starts or stops the device's virtio session around it.
//!
//! A queue is *started* when it has a size, addresses, kick and call fds
//! and is enabled (`SET_VRING_ENABLE 1`; without
//! `VHOST_USER_F_PROTOCOL_FEATURES` the kick fd enables it). When every
//! queue that has addresses is started, the session is attached with those
//! queues; anything that would change what the data plane runs on detaches
//! it first (the device task drains the instance), and after a detach each
//! ring's next avail index is its `used->idx`: every consumed request has
//! been answered. `SET_VRING_CALL` on a running queue only swaps the call fd
//! (QEMU does that when it masks interrupts).

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shadowback_xenbus::virtio::{InflightConfig, QueueConfig, VirtioAttachRequest, VirtioFds};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error as VhostError, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

use super::inflight::InflightRegion;
use super::memory::{MemoryTable, RegionDesc};
use super::model::VirtioModel;
use crate::admission::{LogLimiter, LOG_INTERVAL};
use crate::config::MAX_VHOST_QUEUE_SIZE;
use crate::limits::DeviceLimits;
use crate::upgrade::{
    Adopted, Handover, InflightState, RegionState, VhostConnState, VringState, WireFeatures,
};
use crate::SupervisorError;

type Result<T> = std::result::Result<T, VhostError>;

/// How the handler reaches the device task (a trait so that the state
/// machine can be tested without one).
pub(crate) trait SessionLink: Send {
    /// Attaches a virtio session; `Err` carries the device's refusal.
    fn attach(
        &mut self,
        req: VirtioAttachRequest,
        fds: VirtioFds,
    ) -> std::result::Result<(), String>;
    /// Detaches the session; returns once the instance has drained it.
    fn detach(&mut self);
    /// Hands the running session a new call eventfd for virtqueue `queue`.
    fn set_call(&mut self, queue: u16, fd: OwnedFd) -> std::result::Result<(), String>;
    /// `Some(why)` once the device has lost the session (every takeover
    /// failed): the connection must be closed.
    fn lost(&mut self) -> Option<String>;
    /// Whether the device's config space changed (a resize) since the
    /// last call.
    fn config_changed(&mut self) -> bool {
        false
    }
    /// The id of the attached session, for a live upgrade.
    fn attachment(&self) -> Option<u64> {
        None
    }
}

/// What the handler knows of its device.
#[derive(Clone, Debug)]
pub(crate) struct DeviceFacts {
    pub name: String,
    /// The device's virtio model (features, queues, config space), from
    /// its class.
    pub model: Arc<dyn VirtioModel>,
    /// Largest `SET_VRING_NUM`.
    pub queue_size: u16,
    pub shadow: bool,
    /// What a memory table may hold (`[limits]`).
    pub limits: DeviceLimits,
    /// The rate limit of the device's log lines a VMM can repeat at will
    /// (refused requests, connections), shared by its connections.
    pub log: Arc<Mutex<LogLimiter>>,
}

impl DeviceFacts {
    /// A fresh [`log`](Self::log) limiter.
    pub(crate) fn new_log() -> Arc<Mutex<LogLimiter>> {
        Arc::new(Mutex::new(LogLimiter::new(LOG_INTERVAL)))
    }

    /// `Some(suppressed since the last line)` if a line a VMM can repeat
    /// may be written now.
    pub(crate) fn log_allowed(&self) -> Option<u64> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(Instant::now())
    }
}

/// Guest-physical ring addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

/// Offset of `idx` in `struct vring_used` (after `flags`).
const USED_IDX_OFFSET: u64 = 2;

/// One vring as configured by the VMM.
#[derive(Debug, Default)]
struct Vring {
    size: u16,
    addr: Option<RingAddrs>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
}

impl Vring {
    fn started(&self) -> bool {
        self.size != 0
            && self.addr.is_some()
            && self.kick.is_some()
            && self.call.is_some()
            && self.enabled
    }
}

/// The handler of one connection.
pub(crate) struct VhostUserHandler {
    facts: DeviceFacts,
    frontend: String,
    acked_features: u64,
    features_set: bool,
    memory: Option<MemoryTable>,
    vrings: Vec<Vring>,
    inflight: Option<InflightRegion>,
    /// The device state area of this driver session (a model that
    /// [keeps one](VirtioModel::keeps_device_state)): created at the
    /// first start after a reset or `SET_FEATURES`, handed to every
    /// session and instance until the next.
    device_state: Option<File>,
    link: Box<dyn SessionLink>,
    /// Virtqueue indices of the attached session.
    running: Option<Vec<u16>>,
    /// The last request was refused with an answer the frontend can see
    /// (a NACK, an empty config); the connection stays up. Any other
    /// failure closes it.
    soft_refusal: bool,
    /// The VMM's end of the backend request channel (`SET_BACKEND_REQ_FD`,
    /// taken from the peeked message: `vhost`'s `Backend` cannot send a
    /// config change), for `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
    backend_channel: Option<OwnedFd>,
    /// The descriptor of a `SET_BACKEND_REQ_FD` being handled.
    offered_channel: Option<OwnedFd>,
    /// What `vhost`'s request handler recorded of the negotiation, for a
    /// live upgrade (it keeps its own copy and has no setter).
    pub(super) wire: WireFeatures,
}

fn io_error(why: String) -> VhostError {
    VhostError::ReqHandlerError(std::io::Error::other(why))
}

fn dup(file: &File) -> Result<OwnedFd> {
    file.try_clone()
        .map(OwnedFd::from)
        .map_err(|e| io_error(format!("dup: {e}")))
}

/// An eventfd nobody waits on: the call fd of a queue whose frontend polls.
fn unwatched_eventfd() -> Result<File> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map(|e| File::from(OwnedFd::from(e)))
        .map_err(|e| io_error(format!("eventfd: {e}")))
}

impl VhostUserHandler {
    pub(crate) fn new(facts: DeviceFacts, frontend: String, link: Box<dyn SessionLink>) -> Self {
        let vrings = (0..facts.model.num_queues())
            .map(|_| Vring::default())
            .collect();
        VhostUserHandler {
            facts,
            frontend,
            acked_features: 0,
            features_set: false,
            memory: None,
            vrings,
            inflight: None,
            device_state: None,
            link,
            running: None,
            soft_refusal: false,
            backend_channel: None,
            offered_channel: None,
            wire: WireFeatures::default(),
        }
    }

    /// The descriptor of the `SET_BACKEND_REQ_FD` about to be handled
    /// (peeked); kept if `vhost` accepts the message.
    pub(crate) fn offer_backend_channel(&mut self, fd: Option<OwnedFd>) {
        self.offered_channel = fd;
    }

    /// Tells the VMM its config space changed (a resized disk), over the
    /// backend request channel if it set one up: QEMU then reads the
    /// config again and raises the guest's config-change interrupt. Never
    /// blocks: a VMM that does not read its channel misses the message.
    pub(crate) fn forward_config_change(&mut self) {
        if !self.link.config_changed() {
            return;
        }
        let Some(channel) = self.backend_channel.as_ref() else {
            tracing::info!(frontend = %self.frontend, "config changed; the VMM set up no backend channel to be told");
            return;
        };
        // `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`: request 2, version 1, no
        // payload, no reply asked for.
        const CONFIG_CHANGE_MSG: u32 = 2;
        const VERSION: u32 = 1;
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        let sent = rustix::net::send(
            channel,
            &header,
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        );
        match sent {
            Ok(12) => tracing::info!(frontend = %self.frontend, "VMM told of a config change"),
            other => {
                tracing::warn!(frontend = %self.frontend, ?other, "VMM not told of a config change")
            }
        }
    }

    /// What the VMM set up on this connection, for a live upgrade
    /// (docs/ARCHITECTURE.md §4.2); `socket` is the connection.
    pub(crate) fn handover(&self, socket: BorrowedFd<'_>, fds: &mut Handover) -> VhostConnState {
        VhostConnState {
            socket: fds.fd(socket),
            frontend: self.frontend.clone(),
            wire: self.wire,
            acked_features: self.acked_features,
            features_set: self.features_set,
            memory: self.memory.as_ref().map(|m| {
                m.parts()
                    .map(|(r, f)| RegionState {
                        gpa: r.gpa,
                        size: r.size,
                        user_addr: r.user_addr,
                        mmap_offset: r.mmap_offset,
                        fd: fds.fd(f),
                    })
                    .collect()
            }),
            vrings: self
                .vrings
                .iter()
                .map(|v| VringState {
                    size: v.size,
                    addr: v.addr.map(|a| (a.desc, a.avail, a.used)),
                    base: v.base,
                    kick: v.kick.as_ref().map(|f| fds.fd(f)),
                    call: v.call.as_ref().map(|f| fds.fd(f)),
                    enabled: v.enabled,
                })
                .collect(),
            inflight: self.inflight.as_ref().map(|f| InflightState {
                fd: fds.fd(&f.file),
                mmap_size: f.mmap_size,
                mmap_offset: f.mmap_offset,
                num_queues: f.num_queues,
                queue_size: f.queue_size,
            }),
            device_state: self.device_state.as_ref().map(|f| fds.fd(f)),
            running: self.running.clone(),
            attachment: self.link.attachment(),
            backend_channel: self.backend_channel.as_ref().map(|f| fds.fd(f)),
        }
    }

    /// The handler of a connection a previous binary handed over;
    /// `attached` says whether the device still has its session.
    pub(crate) fn adopt(
        facts: DeviceFacts,
        state: &VhostConnState,
        fds: &Adopted,
        link: Box<dyn SessionLink>,
        attached: bool,
    ) -> std::result::Result<Self, SupervisorError> {
        let err =
            |why: String| SupervisorError::Runtime(format!("upgrade state: vhost-user: {why}"));
        let mut handler = VhostUserHandler::new(facts, state.frontend.clone(), link);
        if state.vrings.len() != handler.vrings.len() {
            return Err(err(format!("{} vrings", state.vrings.len())));
        }
        handler.wire = state.wire;
        handler.acked_features = state.acked_features;
        handler.features_set = state.features_set;
        if let Some(regions) = &state.memory {
            let descs = regions
                .iter()
                .map(|r| RegionDesc {
                    gpa: r.gpa,
                    size: r.size,
                    user_addr: r.user_addr,
                    mmap_offset: r.mmap_offset,
                })
                .collect();
            let files = regions
                .iter()
                .map(|r| fds.fd(r.fd))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            handler.memory = Some(MemoryTable::new(descs, files).map_err(|e| err(e.to_string()))?);
        }
        for (v, s) in handler.vrings.iter_mut().zip(&state.vrings) {
            let file = |fd: Option<i32>| fd.map(|fd| fds.file(fd)).transpose();
            *v = Vring {
                size: s.size,
                addr: s
                    .addr
                    .map(|(desc, avail, used)| RingAddrs { desc, avail, used }),
                base: s.base,
                kick: file(s.kick)?,
                call: file(s.call)?,
                enabled: s.enabled,
            };
        }
        if let Some(f) = &state.inflight {
            handler.inflight = Some(InflightRegion {
                file: fds.file(f.fd)?,
                mmap_size: f.mmap_size,
                mmap_offset: f.mmap_offset,
                num_queues: f.num_queues,
                queue_size: f.queue_size,
            });
        }
        handler.device_state = state.device_state.map(|fd| fds.file(fd)).transpose()?;
        handler.backend_channel = state.backend_channel.map(|fd| fds.fd(fd)).transpose()?;
        // A session the device no longer has is not running: the next
        // change of the configuration starts one.
        handler.running = state.running.clone().filter(|_| attached);
        Ok(handler)
    }

    /// Clears and returns the soft-refusal mark of the last request.
    pub(crate) fn take_soft_refusal(&mut self) -> bool {
        std::mem::take(&mut self.soft_refusal)
    }

    /// The device lost the session (see [`SessionLink::lost`]).
    pub(crate) fn lost(&mut self) -> Option<String> {
        self.link.lost()
    }

    /// The connection ended: detach the session.
    pub(crate) fn disconnect(&mut self) {
        self.stop();
    }

    /// A refusal the frontend is told about (REPLY_ACK or an empty reply).
    fn refuse(&mut self, why: String) -> VhostError {
        if let Some(suppressed) = self.facts.log_allowed() {
            tracing::warn!(device = %self.facts.name, frontend = %self.frontend, %why, suppressed, "vhost-user request refused");
        }
        self.soft_refusal = true;
        io_error(why)
    }

    /// A failed request that has no error answer (its reply carries data):
    /// the connection is closed.
    fn fail(&self, why: String) -> VhostError {
        if let Some(suppressed) = self.facts.log_allowed() {
            tracing::warn!(device = %self.facts.name, frontend = %self.frontend, %why, suppressed, "vhost-user request failed");
        }
        io_error(why)
    }

    /// A request the device does not implement, answered with an error.
    fn unsupported(&mut self, what: &'static str) -> VhostError {
        let _ = self.refuse(format!("{what} is not supported"));
        VhostError::InvalidOperation("not supported")
    }

    fn vring_index(&mut self, index: u32) -> Result<usize> {
        match usize::try_from(index) {
            Ok(i) if i < self.vrings.len() => Ok(i),
            _ => Err(self.refuse(format!("vring {index} does not exist"))),
        }
    }

    fn is_running(&self, index: usize) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.iter().any(|&q| usize::from(q) == index))
    }

    /// Stops the running session before `index` changes under it.
    fn stop_if_running(&mut self, index: usize) {
        if self.is_running(index) {
            self.stop();
        }
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Detaches the session (the data plane drains it) and records each of
    /// its rings' next avail index: all it consumed is answered, so that is
    /// `used->idx`.
    fn stop(&mut self) {
        let Some(queues) = self.running.take() else {
            return;
        };
        self.link.detach();
        tracing::info!(device = %self.facts.name, frontend = %self.frontend, "virtio session stopped");
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        for q in queues {
            let Some(vring) = self.vrings.get_mut(usize::from(q)) else {
                continue;
            };
            let Some(addr) = vring.addr else { continue };
            let idx = addr
                .used
                .checked_add(USED_IDX_OFFSET)
                .ok_or_else(|| "used ring address wraps".to_string())
                .and_then(|at| memory.read_u16(at).map_err(|e| e.to_string()));
            match idx {
                Ok(idx) => vring.base = idx,
                Err(e) => {
                    tracing::warn!(device = %self.facts.name, queue = q, error = %e, "cannot read used->idx; keeping the last base")
                }
            }
        }
    }

    /// The queues to run, if the device is ready to start: features and
    /// memory set, and every queue that has addresses started.
    fn startable(&self) -> Option<Vec<u16>> {
        if !self.features_set || self.memory.is_none() {
            return None;
        }
        let mut queues = Vec::new();
        for (i, v) in self.vrings.iter().enumerate() {
            if v.addr.is_none() {
                continue;
            }
            let index = u16::try_from(i).ok()?;
            if !v.enabled && self.facts.model.may_stay_disabled(index) {
                continue;
            }
            if !v.started() {
                return None;
            }
            queues.push(index);
        }
        let enough = queues.len().max(1) >= usize::from(self.facts.model.min_queues());
        (!queues.is_empty() && enough).then_some(queues)
    }

    /// Brings the session in line with the configuration: detach if it
    /// runs other queues than it should, attach if it should run.
    fn reconcile(&mut self) -> Result<()> {
        let want = self.startable();
        if self.running.is_some() && self.running != want {
            self.stop();
        }
        match want {
            Some(queues) if self.running.is_none() => self.start(queues),
            _ => Ok(()),
        }
    }

    /// Builds `attach-virtio` for `queues` and attaches it.
    fn start(&mut self, queues: Vec<u16>) -> Result<()> {
        if let Err(why) = self.ensure_device_state() {
            return Err(self.refuse(why));
        }
        let plan = self.attach_plan(&queues);
        let (req, fds) = match plan {
            Ok(x) => x,
            Err(why) => return Err(self.refuse(why)),
        };
        match self.link.attach(req, fds) {
            Ok(()) => {
                tracing::info!(device = %self.facts.name, frontend = %self.frontend, ?queues, "virtio session started");
                self.running = Some(queues);
                Ok(())
            }
            Err(why) => Err(self.refuse(format!("device refused the session: {why}"))),
        }
    }

    /// Creates the device state area if the model keeps one and this
    /// driver session has none yet.
    fn ensure_device_state(&mut self) -> std::result::Result<(), String> {
        if !self.facts.model.keeps_device_state() || self.device_state.is_some() {
            return Ok(());
        }
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"shadowback-device-state", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| format!("device state memfd: {e}"))?;
        let file = File::from(fd);
        let copy = file.try_clone().map_err(|e| format!("dup: {e}"))?;
        let features = self.acked_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.facts.model.reset_device_state(copy, features)?;
        self.device_state = Some(file);
        Ok(())
    }

    fn attach_plan(
        &self,
        queues: &[u16],
    ) -> std::result::Result<(VirtioAttachRequest, VirtioFds), String> {
        let memory = self.memory.as_ref().ok_or("no memory table")?;
        let mut configs = Vec::with_capacity(queues.len());
        let mut fds = Vec::with_capacity(queues.len());
        for &q in queues {
            let v = self
                .vrings
                .get(usize::from(q))
                .ok_or_else(|| format!("vring {q} does not exist"))?;
            let (Some(a), Some(kick), Some(call)) = (v.addr, &v.kick, &v.call) else {
                return Err(format!("vring {q} is not started"));
            };
            let n = u64::from(v.size);
            for (what, gpa, len) in [
                ("descriptor table", a.desc, 16 * n),
                ("avail ring", a.avail, 6 + 2 * n),
                ("used ring", a.used, 6 + 8 * n),
            ] {
                memory
                    .check_gpa(gpa, len)
                    .map_err(|e| format!("vring {q} {what}: {e}"))?;
            }
            if let Some(f) = &self.inflight {
                if q >= f.num_queues || v.size > f.queue_size {
                    return Err(format!(
                        "vring {q} of {} does not fit the in-flight region ({} x {})",
                        v.size, f.num_queues, f.queue_size
                    ));
                }
            }
            configs.push(QueueConfig {
                index: q,
                size: v.size,
                desc: a.desc,
                avail: a.avail,
                used: a.used,
                next_avail: v.base,
            });
            let dup = |f: &File| f.try_clone().map(OwnedFd::from).map_err(|e| e.to_string());
            fds.push((dup(kick)?, dup(call)?));
        }
        let req = VirtioAttachRequest {
            frontend: self.frontend.clone(),
            features: self.acked_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            regions: memory.wire_regions(),
            queues: configs,
            inflight: self.inflight.as_ref().map(|f| InflightConfig {
                mmap_size: f.mmap_size,
                mmap_offset: f.mmap_offset,
                queue_size: f.queue_size,
            }),
            wire: None,
            wire_queues: 0,
            queue_pairs: 1,
            device_state: self.device_state.is_some(),
            shadow: self.facts.shadow,
        };
        let inflight = match &self.inflight {
            Some(f) => Some(f.dup_fd().map_err(|e| e.to_string())?),
            None => None,
        };
        let device_state = match &self.device_state {
            Some(f) => Some(OwnedFd::from(f.try_clone().map_err(|e| e.to_string())?)),
            None => None,
        };
        let fds = VirtioFds {
            regions: memory.dup_fds().map_err(|e| e.to_string())?,
            queues: fds,
            inflight,
            wire: Vec::new(),
            device_state,
            logs: Vec::new(),
        };
        Ok((req, fds))
    }

    /// `reset` of `RESET_OWNER` / `RESET_DEVICE`: rings, features and the
    /// device state back to their initial state (memory and in-flight
    /// region are kept: the VMM sends them again before the next start
    /// anyway).
    fn reset(&mut self) -> Result<()> {
        self.stop();
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.acked_features = 0;
        self.features_set = false;
        self.device_state = None;
        Ok(())
    }
}

impl VhostUserBackendReqHandlerMut for VhostUserHandler {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset()
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset()
    }

    fn get_features(&mut self) -> Result<u64> {
        self.wire.features_asked = true;
        Ok(self.facts.model.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        self.wire.acked = Some(features);
        let unknown = features & !self.facts.model.features();
        if unknown != 0 {
            return Err(self.refuse(format!("features {unknown:#x} were not offered")));
        }
        self.stop();
        // A driver negotiates features after a reset of the device: what
        // it set before is gone.
        self.device_state = None;
        self.acked_features = features;
        self.features_set = true;
        self.reconcile()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        // Before anything is looked at or allocated (a hugetlbfs region's
        // pages are, by the table's checks).
        let sizes: Vec<u64> = ctx.iter().map(|r| r.memory_size).collect();
        if let Err((_, why)) = self.facts.limits.check_memory(&sizes) {
            return Err(self.refuse(format!("memory table: {why}")));
        }
        let regions = ctx
            .iter()
            .map(|r| RegionDesc {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        let table = match MemoryTable::new(regions, files.into_iter().map(OwnedFd::from).collect())
        {
            Ok(t) => t,
            Err(e) => return Err(self.refuse(format!("memory table: {e}"))),
        };
        self.stop();
        self.memory = Some(table);
        self.reconcile()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let i = self.vring_index(index)?;
        let size = match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= self.facts.queue_size => n,
            _ => {
                return Err(self.refuse(format!(
                    "vring size {num}: not a power of two up to {}",
                    self.facts.queue_size
                )))
            }
        };
        self.stop_if_running(i);
        self.vrings[i].size = size;
        self.reconcile()
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let i = self.vring_index(index)?;
        let Some(memory) = self.memory.as_ref() else {
            return Err(self.refuse("SET_VRING_ADDR before SET_MEM_TABLE".into()));
        };
        // The fixed headers must translate here; the whole rings are
        // checked against the size when the queue starts. Alignments are
        // virtio 1.x §2.7 (split virtqueues).
        let translate = |what: &str, user: u64, len: u64, align: u64| {
            let gpa = memory
                .user_to_gpa(user, len)
                .map_err(|e| format!("{what}: {e}"))?;
            if gpa % align != 0 {
                return Err(format!("{what} at {gpa:#x} is not {align}-byte aligned"));
            }
            Ok(gpa)
        };
        let addrs = translate("descriptor table", descriptor, 16, 16).and_then(|desc| {
            Ok(RingAddrs {
                desc,
                avail: translate("avail ring", available, 4, 2)?,
                used: translate("used ring", used, 4, 4)?,
            })
        });
        let addrs = match addrs {
            Ok(a) => a,
            Err(why) => return Err(self.refuse(format!("vring {i}: {why}"))),
        };
        self.stop_if_running(i);
        self.vrings[i].addr = Some(addrs);
        self.reconcile()
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let i = self.vring_index(index)?;
        let Ok(base) = u16::try_from(base) else {
            return Err(self.refuse(format!("vring base {base} is above 65535")));
        };
        self.stop_if_running(i);
        self.vrings[i].base = base;
        self.reconcile()
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        // No error answer exists for a request with a reply: a bad index
        // closes the connection.
        let i = match usize::try_from(index) {
            Ok(i) if i < self.vrings.len() => i,
            _ => return Err(self.fail(format!("GET_VRING_BASE of vring {index}"))),
        };
        self.stop_if_running(i);
        // The ring is stopped until its next kick; the other rings cannot
        // start without it, so there is nothing to reconcile.
        let vring = &mut self.vrings[i];
        vring.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(vring.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = self.vring_index(u32::from(index))?;
        let Some(fd) = fd else {
            return Err(self.refuse("a vring without kick fd (polling) is not supported".into()));
        };
        self.stop_if_running(i);
        let acked = self.protocol_features_acked();
        let vring = &mut self.vrings[i];
        vring.kick = Some(fd);
        // vhost-user.rst "Ring states": without PROTOCOL_FEATURES a ring
        // starts enabled, with its kick.
        if !acked {
            vring.enabled = true;
        }
        self.reconcile()
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = self.vring_index(u32::from(index))?;
        let fd = match fd {
            Some(fd) => fd,
            None => unwatched_eventfd()?,
        };
        if self.is_running(i) {
            // QEMU swaps call fds when the guest masks interrupts: the data
            // plane switches without a restart.
            let copy = dup(&fd)?;
            if let Err(why) = self.link.set_call(u16::from(index), copy) {
                tracing::warn!(device = %self.facts.name, queue = index, %why, "set-call failed");
            }
            self.vrings[i].call = Some(fd);
            return Ok(());
        }
        self.vrings[i].call = Some(fd);
        self.reconcile()
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // Errors are reported through the device (an I/O error status),
        // never through the err eventfd.
        self.vring_index(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.facts.model.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.wire.protocol = Some(features);
        let unknown = features & !self.facts.model.protocol_features().bits();
        if unknown != 0 {
            return Err(self.refuse(format!("protocol features {unknown:#x} were not offered")));
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.facts.model.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let i = self.vring_index(index)?;
        if !enable {
            self.stop_if_running(i);
        }
        self.vrings[i].enabled = enable;
        self.reconcile()
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        // What the driver set in this session (a vif's MAC) is in the
        // device state area the backends write; before the first start
        // or after a reset there is none, and the config is the device's.
        let bytes = match &self.device_state {
            Some(state) => self.facts.model.read_config_in(offset, size, state),
            None => self.facts.model.read_config(offset, size),
        };
        match bytes {
            Some(bytes) => Ok(bytes),
            None => Err(self.refuse(format!(
                "GET_CONFIG of {size} bytes at {offset} is outside the config space"
            ))),
        }
    }

    fn set_config(&mut self, offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        Err(self.refuse(format!(
            "SET_CONFIG at {offset}: the config space is read-only"
        )))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // `vhost` accepted the channel (BACKEND_REQ was negotiated).
        self.backend_channel = self.offered_channel.take();
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(self.unsupported("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(self.unsupported("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        let region = InflightRegion::create(
            inflight.num_queues,
            inflight.queue_size,
            self.facts.model.num_queues(),
            MAX_VHOST_QUEUE_SIZE,
        )
        .map_err(|e| self.fail(format!("GET_INFLIGHT_FD: {e}")))?;
        let reply = region.reply();
        let file = region
            .file
            .try_clone()
            .map_err(|e| self.fail(format!("GET_INFLIGHT_FD: {e}")))?;
        // A running session keeps the region it was started with until it
        // is stopped; the new one serves the next start.
        self.stop();
        self.inflight = Some(region);
        if let Err(e) = self.reconcile() {
            tracing::debug!(device = %self.facts.name, error = %e, "not restarted after GET_INFLIGHT_FD");
        }
        self.soft_refusal = false;
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let region = match InflightRegion::adopt(
            inflight,
            file,
            self.facts.model.num_queues(),
            MAX_VHOST_QUEUE_SIZE,
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.refuse(format!("SET_INFLIGHT_FD: {e}"))),
        };
        self.stop();
        self.inflight = Some(region);
        self.reconcile()
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Err(self.fail("GET_MAX_MEM_SLOTS is not supported".into()))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        Err(self.unsupported("ADD_MEM_REG"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Err(self.unsupported("REM_MEM_REG"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(self.unsupported("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(self.unsupported("CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(self.fail("GET_SHMEM_CONFIG is not supported".into()))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(self.fail("SET_LOG_BASE is not supported".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::vhost_user::memory::tests::memfd;
    use crate::vhost_user::BlkGeometry;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    #[derive(Debug)]
    enum Ev {
        Attach(Vec<u16>),
        Detach,
        SetCall(u16),
    }

    #[derive(Default)]
    struct Calls {
        events: Vec<Ev>,
        refuse: bool,
        attached: bool,
        /// Every attach request, never drained.
        attaches: Vec<(VirtioAttachRequest, usize)>,
        /// The device state area of every attach.
        states: Vec<Option<File>>,
    }

    struct MockLink(Arc<Mutex<Calls>>);

    impl SessionLink for MockLink {
        fn attach(
            &mut self,
            req: VirtioAttachRequest,
            fds: VirtioFds,
        ) -> std::result::Result<(), String> {
            let mut c = self.0.lock().unwrap();
            if c.refuse {
                return Err("EBUSY: in use".into());
            }
            assert!(!c.attached, "attach while attached");
            assert!(fds.logs.is_empty());
            let n = fds.regions.len() + 2 * fds.queues.len() + usize::from(fds.inflight.is_some());
            c.attached = true;
            assert_eq!(req.device_state, fds.device_state.is_some());
            c.states.push(fds.device_state.map(File::from));
            c.attaches.push((req.clone(), n));
            c.events
                .push(Ev::Attach(req.queues.iter().map(|q| q.index).collect()));
            Ok(())
        }
        fn detach(&mut self) {
            let mut c = self.0.lock().unwrap();
            assert!(c.attached, "detach while detached");
            c.attached = false;
            c.events.push(Ev::Detach);
        }
        fn set_call(&mut self, queue: u16, _fd: OwnedFd) -> std::result::Result<(), String> {
            self.0.lock().unwrap().events.push(Ev::SetCall(queue));
            Ok(())
        }
        fn lost(&mut self) -> Option<String> {
            None
        }
    }

    const USER: u64 = 0x7f00_0000_0000;
    const PROTOCOL: u64 = 1 << 30;
    /// VERSION_1 | EVENT_IDX.
    const FEATURES: u64 = (1 << 32) | (1 << 29);

    /// Ring addresses (guest-physical) of queue `q`: 16 KiB apart.
    fn rings(q: u64) -> (u64, u64, u64) {
        let base = 0x1_0000 + q * 0x4000;
        (base, base + 0x1000, base + 0x2000)
    }

    struct Rig {
        h: VhostUserHandler,
        calls: Arc<Mutex<Calls>>,
        guest: File,
    }

    impl Rig {
        fn new(num_queues: u16) -> Self {
            Self::with_model(Arc::new(BlkGeometry {
                sectors: 2048,
                readonly: false,
                discard: true,
                num_queues,
            }))
        }

        fn with_model(model: Arc<dyn VirtioModel>) -> Self {
            let calls = Arc::new(Mutex::new(Calls::default()));
            let facts = DeviceFacts {
                name: "vd".into(),
                model,
                queue_size: 256,
                shadow: true,
                limits: DeviceLimits::new(&LimitsConfig::default()),
                log: DeviceFacts::new_log(),
            };
            let h = VhostUserHandler::new(facts, "vmm".into(), Box::new(MockLink(calls.clone())));
            let guest = File::from(memfd(0x10_0000));
            Rig { h, calls, guest }
        }

        fn events(&self) -> Vec<String> {
            let mut c = self.calls.lock().unwrap();
            c.events
                .drain(..)
                .map(|e| match e {
                    Ev::Attach(queues) => format!("attach {queues:?}"),
                    Ev::Detach => "detach".into(),
                    Ev::SetCall(q) => format!("set-call {q}"),
                })
                .collect()
        }

        fn last_attach(&self) -> (VirtioAttachRequest, usize) {
            let c = self.calls.lock().unwrap();
            c.attaches.last().cloned().expect("an attach")
        }

        /// One region: gpa 0..1 MiB at `USER` in the VMM.
        fn memory(&mut self) {
            let region = VhostUserMemoryRegion::new(0, 0x10_0000, USER, 0);
            let fd = self.guest.try_clone().unwrap();
            self.h.set_mem_table(&[region], vec![fd], None).unwrap();
        }

        fn eventfd() -> Option<File> {
            Some(unwatched_eventfd().unwrap())
        }

        /// NUM, BASE, ADDR, KICK, CALL as QEMU sends them.
        fn queue(&mut self, q: u8, base: u32) {
            let i = u32::from(q);
            let (desc, avail, used) = rings(u64::from(q));
            self.h.set_vring_num(i, 256).unwrap();
            self.h.set_vring_base(i, base).unwrap();
            let flags = VhostUserVringAddrFlags::empty();
            self.h
                .set_vring_addr(i, flags, USER + desc, USER + used, USER + avail, 0)
                .unwrap();
            self.h.set_vring_kick(q, Self::eventfd()).unwrap();
            self.h.set_vring_call(q, Self::eventfd()).unwrap();
        }

        fn write_u16(&self, gpa: u64, v: u16) {
            self.guest.write_all_at(&v.to_le_bytes(), gpa).unwrap();
        }
    }

    /// A vif's control-queue state lives in one area per driver session:
    /// every session until the driver starts over sees what was written,
    /// and `SET_FEATURES` or a reset starts from the vif's MAC again.
    #[test]
    fn a_vif_keeps_one_device_state_area_per_driver_session() {
        use crate::class::net::NetModel;
        use shadowback_virtio::net_state::{rx_mode, NetStateArea};
        use std::os::unix::fs::MetadataExt;
        let mac = [2, 0xaa, 0, 0, 0, 1];
        let mut r = Rig::with_model(Arc::new(NetModel {
            mac,
            mtu: 1500,
            tap: false,
            pairs: 1,
        }));
        let start = |r: &mut Rig| {
            r.memory();
            r.queue(0, 0);
            r.queue(1, 0);
            r.h.set_vring_enable(0, true).unwrap();
            r.h.set_vring_enable(1, true).unwrap();
        };
        let last_state = |r: &Rig| {
            let c = r.calls.lock().unwrap();
            let f = c.states.last().unwrap().as_ref().expect("an area");
            let ino = f.metadata().unwrap().ino();
            (ino, NetStateArea::open(f.try_clone().unwrap()).unwrap())
        };
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        start(&mut r);
        assert_eq!(r.events(), ["attach [0, 1]"]);
        let (first, (mut area, state)) = last_state(&r);
        assert_eq!((state.mac, state.rx_mode), (mac, rx_mode::PROMISC));
        // A backend sets promiscuity off; a new memory table restarts the
        // session, which gets the same area.
        let mut changed = state.clone();
        changed.rx_mode = 0;
        area.store(&changed).unwrap();
        r.memory();
        assert_eq!(r.events(), ["detach", "attach [0, 1]"]);
        let (again, (_, state)) = last_state(&r);
        assert_eq!((again, &state), (first, &changed));
        // The driver starts over: a fresh area with the reset state.
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        assert_eq!(r.events(), ["detach", "attach [0, 1]"]);
        let (fresh, (_, state)) = last_state(&r);
        assert_ne!(fresh, first);
        assert_eq!(state.rx_mode, rx_mode::PROMISC);
        r.h.reset_device().unwrap();
        assert_eq!(r.events(), ["detach"]);
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        start(&mut r);
        assert_ne!(last_state(&r).0, fresh);
        // A disk keeps none.
        let mut disk = Rig::new(1);
        disk.h.set_features(FEATURES | PROTOCOL).unwrap();
        disk.memory();
        disk.queue(0, 0);
        disk.h.set_vring_enable(0, true).unwrap();
        assert!(!disk.last_attach().0.device_state);
    }

    /// QEMU sets up every queue pair of a multiqueue vif but enables only
    /// those its driver uses: the session starts without the disabled
    /// pairs, and restarts with a pair once it is enabled.
    #[test]
    fn a_vif_starts_without_the_pairs_the_vmm_left_disabled() {
        use crate::class::net::NetModel;
        let mut r = Rig::with_model(Arc::new(NetModel {
            mac: [2, 0xaa, 0, 0, 0, 1],
            mtu: 1500,
            tap: false,
            pairs: 2,
        }));
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        r.memory();
        for q in 0..4 {
            r.queue(q, 0);
        }
        r.h.set_vring_enable(2, false).unwrap();
        r.h.set_vring_enable(3, false).unwrap();
        assert!(r.events().is_empty());
        r.h.set_vring_enable(0, true).unwrap();
        assert!(r.events().is_empty(), "the first pair is waited for");
        r.h.set_vring_enable(1, true).unwrap();
        assert_eq!(r.events(), ["attach [0, 1]"]);
        r.h.set_vring_enable(2, true).unwrap();
        r.h.set_vring_enable(3, true).unwrap();
        assert_eq!(
            r.events(),
            [
                "detach",
                "attach [0, 1, 2]",
                "detach",
                "attach [0, 1, 2, 3]"
            ]
        );
        // A disk waits for every queue the VMM set up.
        let mut disk = Rig::new(2);
        disk.h.set_features(FEATURES | PROTOCOL).unwrap();
        disk.memory();
        disk.queue(0, 0);
        disk.queue(1, 0);
        disk.h.set_vring_enable(0, true).unwrap();
        disk.h.set_vring_enable(1, false).unwrap();
        assert!(disk.events().is_empty());
    }

    #[test]
    fn attaches_once_every_configured_queue_is_enabled() {
        let mut r = Rig::new(2);
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        r.memory();
        r.queue(0, 5);
        r.queue(1, 0);
        r.h.set_vring_enable(0, true).unwrap();
        assert!(
            r.events().is_empty(),
            "queue 1 has addresses but is disabled"
        );
        r.h.set_vring_enable(1, true).unwrap();
        assert_eq!(r.events(), ["attach [0, 1]"]);
        let (req, fds) = r.last_attach();
        assert_eq!(fds, 1 + 2 * 2);
        assert_eq!(
            req.features, FEATURES,
            "PROTOCOL_FEATURES is not a device feature"
        );
        assert_eq!(req.regions.len(), 1);
        assert_eq!((req.regions[0].gpa, req.regions[0].size), (0, 0x10_0000));
        let q0 = req.queues[0];
        assert_eq!((q0.desc, q0.avail, q0.used), rings(0), "guest-physical");
        assert_eq!((q0.size, q0.next_avail), (256, 5));
        assert!(req.shadow && req.inflight.is_none());
    }

    #[test]
    fn without_protocol_features_the_kick_enables() {
        let mut r = Rig::new(2);
        r.h.set_features(FEATURES).unwrap();
        r.memory();
        r.queue(0, 0);
        assert_eq!(r.events(), ["attach [0]"]);
        // A second queue configured later restarts the session with both.
        r.queue(1, 0);
        assert_eq!(r.events(), ["detach", "attach [0, 1]"]);
    }

    #[test]
    fn set_vring_call_on_a_running_queue_restarts_nothing() {
        let mut r = Rig::new(1);
        r.h.set_features(FEATURES).unwrap();
        r.memory();
        r.queue(0, 0);
        r.events();
        r.h.set_vring_call(0, Rig::eventfd()).unwrap();
        r.h.set_vring_call(0, None).unwrap();
        assert_eq!(r.events(), ["set-call 0", "set-call 0"]);
    }

    #[test]
    fn get_vring_base_stops_the_ring_at_used_idx() {
        let mut r = Rig::new(2);
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        r.memory();
        r.queue(0, 3);
        r.queue(1, 9);
        r.h.set_vring_enable(0, true).unwrap();
        r.h.set_vring_enable(1, true).unwrap();
        r.events();
        // The data plane answered up to 77 and 12 before it drained.
        r.write_u16(rings(0).2 + 2, 77);
        r.write_u16(rings(1).2 + 2, 12);
        let s = r.h.get_vring_base(0).unwrap();
        let (index, num) = (s.index, s.num);
        assert_eq!((index, num), (0, 77));
        assert_eq!(r.events(), ["detach"]);
        let s = r.h.get_vring_base(1).unwrap();
        let num = s.num;
        assert_eq!(num, 12);
        assert!(r.events().is_empty(), "nothing was running");
        // QEMU starts again: kicks, then the session resumes at used->idx.
        r.h.set_vring_kick(0, Rig::eventfd()).unwrap();
        assert!(r.events().is_empty(), "queue 1 is stopped");
        r.h.set_vring_kick(1, Rig::eventfd()).unwrap();
        assert_eq!(r.events(), ["attach [0, 1]"]);
        let (req, _) = r.last_attach();
        assert_eq!(
            (req.queues[0].next_avail, req.queues[1].next_avail),
            (77, 12)
        );
    }

    #[test]
    fn changes_to_a_running_set_up_detach_first() {
        let mut r = Rig::new(1);
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        r.memory();
        r.queue(0, 0);
        r.h.set_vring_enable(0, true).unwrap();
        assert_eq!(r.events(), ["attach [0]"]);
        r.memory();
        assert_eq!(r.events(), ["detach", "attach [0]"]);
        r.h.set_vring_num(0, 128).unwrap();
        assert_eq!(r.events(), ["detach", "attach [0]"]);
        r.h.set_vring_base(0, 4).unwrap();
        assert_eq!(r.events(), ["detach", "attach [0]"]);
        assert_eq!(r.last_attach().0.queues[0].next_avail, 4);
        r.h.set_vring_kick(0, Rig::eventfd()).unwrap();
        assert_eq!(r.events(), ["detach", "attach [0]"]);
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        assert_eq!(r.events(), ["detach", "attach [0]"]);
        r.h.set_vring_enable(0, false).unwrap();
        assert_eq!(r.events(), ["detach"]);
        r.h.set_vring_enable(0, true).unwrap();
        assert_eq!(r.events(), ["attach [0]"]);
        r.h.reset_device().unwrap();
        assert_eq!(r.events(), ["detach"]);
        r.h.disconnect();
        assert!(r.events().is_empty());
    }

    #[test]
    fn disconnect_detaches() {
        let mut r = Rig::new(1);
        r.h.set_features(FEATURES).unwrap();
        r.memory();
        r.queue(0, 0);
        r.h.disconnect();
        assert_eq!(r.events(), ["attach [0]", "detach"]);
    }

    #[test]
    fn hostile_values_are_refused_without_effect() {
        let mut r = Rig::new(2);
        r.h.set_features(FEATURES).unwrap();
        assert!(r.h.set_features(1 << 40).is_err());
        assert!(r.h.take_soft_refusal());
        let flags = VhostUserVringAddrFlags::empty;
        assert!(
            r.h.set_vring_addr(0, flags(), USER, USER, USER, 0).is_err(),
            "addresses before the memory table"
        );
        r.memory();
        for q in [2u32, 255, u32::MAX] {
            assert!(r.h.set_vring_num(q, 256).is_err());
            assert!(r.h.set_vring_base(q, 0).is_err());
            assert!(r.h.set_vring_enable(q, true).is_err());
            assert!(r.h.set_vring_addr(q, flags(), USER, USER, USER, 0).is_err());
            assert!(r.h.take_soft_refusal(), "answered with a NACK");
        }
        for q in [2u8, 255] {
            assert!(r.h.set_vring_kick(q, Rig::eventfd()).is_err());
            assert!(r.h.set_vring_call(q, Rig::eventfd()).is_err());
            assert!(r.h.set_vring_err(q, Rig::eventfd()).is_err());
        }
        r.h.take_soft_refusal();
        assert!(r.h.get_vring_base(2).is_err());
        assert!(!r.h.take_soft_refusal(), "no reply possible: close");
        for n in [0, 3, 512, 65536, u32::MAX] {
            assert!(r.h.set_vring_num(0, n).is_err(), "size {n}");
        }
        assert!(r.h.set_vring_base(0, 65536).is_err());
        let end = USER + 0x10_0000;
        for (desc, used, avail) in [
            (end, USER, USER),
            (USER, end - 2, USER),
            (USER + 8, USER, USER),
            (USER, USER + 2, USER),
            (USER, USER, USER + 1),
            (u64::MAX - 4, USER, USER),
            (0, USER, USER),
        ] {
            assert!(
                r.h.set_vring_addr(0, flags(), desc, used, avail, 0)
                    .is_err(),
                "{desc:#x} {used:#x} {avail:#x}"
            );
        }
        assert!(r.h.set_vring_kick(0, None).is_err(), "polling is refused");
        // A descriptor table that starts inside memory but does not fit:
        // refused when the queue would start, and nothing attaches.
        r.h.set_vring_num(0, 256).unwrap();
        r.h.set_vring_addr(0, flags(), end - 16, USER + 0x2000, USER + 0x1000, 0)
            .unwrap();
        r.h.set_vring_kick(0, Rig::eventfd()).unwrap();
        assert!(r.h.set_vring_call(0, Rig::eventfd()).is_err());
        assert!(r.events().is_empty());
        assert!(r
            .h
            .get_config(0, 97, VhostUserConfigFlags::empty())
            .is_err());
        assert_eq!(
            r.h.get_config(0, 8, VhostUserConfigFlags::empty()).unwrap(),
            2048u64.to_le_bytes()
        );
        assert!(r
            .h
            .set_config(0, &[0], VhostUserConfigFlags::WRITABLE)
            .is_err());
        assert!(r.h.take_soft_refusal());
        assert!(r
            .h
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 3, 256))
            .is_err());
        assert!(!r.h.take_soft_refusal());
        let table = [
            VhostUserMemoryRegion::new(0, 0x1000, USER, 0),
            VhostUserMemoryRegion::new(0x800, 0x1000, USER + 0x10000, 0),
        ];
        let fds = vec![r.guest.try_clone().unwrap(), r.guest.try_clone().unwrap()];
        assert!(r.h.set_mem_table(&table, fds, None).is_err(), "overlap");
        assert_eq!(r.h.get_queue_num().unwrap(), 2);
    }

    #[test]
    fn the_inflight_region_travels_with_the_session() {
        let mut r = Rig::new(2);
        let (reply, file) =
            r.h.get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 128))
                .unwrap();
        assert_eq!((reply.mmap_size, reply.mmap_offset), (2 * 2112, 0));
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        r.h.set_inflight_fd(&reply, file).unwrap();
        r.h.set_features(FEATURES).unwrap();
        r.memory();
        // 256 descriptors do not fit a region made for 128.
        r.h.set_vring_num(0, 256).unwrap();
        let (desc, avail, used) = rings(0);
        let flags = VhostUserVringAddrFlags::empty();
        r.h.set_vring_addr(0, flags, USER + desc, USER + used, USER + avail, 0)
            .unwrap();
        r.h.set_vring_kick(0, Rig::eventfd()).unwrap();
        assert!(r.h.set_vring_call(0, Rig::eventfd()).is_err());
        r.h.set_vring_num(0, 128).unwrap();
        assert_eq!(r.events(), ["attach [0]"]);
        let (req, fds) = r.last_attach();
        let inflight = req.inflight.expect("in-flight region");
        assert_eq!((inflight.mmap_size, inflight.queue_size), (2 * 2112, 128));
        assert_eq!(fds, 1 + 2 + 1);
    }

    #[test]
    fn a_refused_attach_is_a_nack_and_is_retried() {
        let mut r = Rig::new(1);
        r.calls.lock().unwrap().refuse = true;
        r.h.set_features(FEATURES | PROTOCOL).unwrap();
        r.memory();
        r.queue(0, 0);
        assert!(r.h.set_vring_enable(0, true).is_err());
        assert!(r.h.take_soft_refusal());
        r.calls.lock().unwrap().refuse = false;
        r.h.set_vring_enable(0, true).unwrap();
        assert_eq!(r.events(), ["attach [0]"]);
    }
}
