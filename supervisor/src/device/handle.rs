//! [`DeviceHandle`]: how connection tasks and vhost-user threads reach a
//! device task, and the values they exchange with it.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use shadowback_shadow::{IoCounters, MetricsPage};
use shadowback_xenbus::netif::{NetAttachRequest, NetFds};
use shadowback_xenbus::protocol::{
    action, key, kind, AttachRequest, DeviceFds, ErrorCode, QosLimits,
};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use shadowback_xenbus::{Message, XenbusError};
use tokio::sync::{mpsc, oneshot, watch};

use super::Refusal;
use crate::access::AccessList;
use crate::class::ClassInfo;
use crate::limits::DeviceLimits;
use crate::pool::StandbyPool;
use crate::stats::DeviceStats;
use crate::transport::Frontend;
use crate::upgrade::{DeviceState, Handover};
use crate::vhost_user::VirtioModel;

/// Why a frontend lost its device (sent to its connection task).
#[derive(Debug, Clone)]
pub enum Lost {
    /// The backend found the ring corrupt.
    Disconnected(String),
    /// No backend can serve the device any more (without the shadow layer:
    /// the backend died; with it: every takeover failed).
    BackendDied(String),
    /// An operator removed the device (`disk remove --force`).
    Removed,
}

/// A frontend's hold on the device: detach with `id`; `lost` fires if the
/// device goes away first.
#[derive(Debug)]
pub struct Attachment {
    pub id: u64,
    pub lost: oneshot::Receiver<Lost>,
}

/// A fault to inject into a device's current backend instance (the
/// `fault` control message, docs/PROTOCOL.md §6a).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL it. The recovery's `detect` then runs from the kill.
    Kill,
    /// SIGSTOP it. The watchdog replaces it as soon as the guest has work
    /// pending; an idle stopped backend is left alone.
    Hang,
    /// Make it, and every later instance of the device, abort on any
    /// request covering `sector` (the crash-loop breaker then fails that
    /// request in the third instance that replays it).
    Poison { sector: u64 },
    /// Make it spin in a busy loop (no heartbeat, a CPU burnt): the
    /// watchdog must tell this hang too.
    Spin,
    /// Make it call a syscall outside its seccomp filter: a confined
    /// backend is killed by SIGSYS, a crash like any other.
    Syscall,
}

impl Fault {
    /// The `action` value.
    pub fn action(self) -> &'static str {
        match self {
            Fault::Kill => action::KILL,
            Fault::Hang => action::HANG,
            Fault::Poison { .. } => action::POISON,
            Fault::Spin => action::SPIN,
            Fault::Syscall => action::SYSCALL,
        }
    }

    /// The `fault` message for `device`.
    pub fn to_message(self, device: &str) -> Message {
        let msg = Message::new(kind::FAULT)
            .with(key::DEVICE, device)
            .with(key::ACTION, self.action());
        match self {
            Fault::Poison { sector } => msg.with(key::SECTOR, sector),
            Fault::Kill | Fault::Hang | Fault::Spin | Fault::Syscall => msg,
        }
    }

    /// Parses the `action` (and `sector`) keys of a `fault` message.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(kind::FAULT)?;
        match msg.require(key::ACTION)? {
            action::KILL => Ok(Fault::Kill),
            action::HANG => Ok(Fault::Hang),
            action::SPIN => Ok(Fault::Spin),
            action::SYSCALL => Ok(Fault::Syscall),
            action::POISON => Ok(Fault::Poison {
                sector: msg.require_u64(key::SECTOR)?,
            }),
            other => Err(XenbusError::InvalidValue {
                key: key::ACTION.to_owned(),
                value: other.to_owned(),
                reason: "expected kill, hang, spin, syscall or poison",
            }),
        }
    }
}
pub(super) enum Command {
    Attach {
        /// Boxed: a frontend is several times the size of the other
        /// commands.
        frontend: Box<Frontend>,
        reply: oneshot::Sender<Result<Attachment, Refusal>>,
    },
    /// A new call eventfd for virtqueue `queue` of attachment `id`.
    SetCall {
        id: u64,
        queue: u16,
        fd: OwnedFd,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// Detach attachment `id`; a stale id (already detached, or lost) is
    /// acknowledged without touching the current frontend.
    Detach { id: u64, reply: oneshot::Sender<()> },
    Fault {
        fault: Fault,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// Stop exporting the device: refused while a frontend is attached
    /// unless `force`. Answered once every instance is fenced and the task
    /// has dropped the device (a disk's image and its lock).
    Remove {
        force: bool,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// Resize a disk to `bytes` (`None`: re-read a block device's size);
    /// answered with the new size in sectors.
    Resize {
        bytes: Option<u64>,
        reply: oneshot::Sender<Result<u64, Refusal>>,
    },
    /// New QoS limits for the running instances and later ones.
    SetQos {
        qos: QosLimits,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// Pause for a live upgrade: describe the device (`reply`), then wait
    /// until `resume` fires or is dropped (the `execve` failed).
    Freeze {
        reply: oneshot::Sender<Result<(DeviceState, Handover), String>>,
        resume: oneshot::Receiver<()>,
    },
}

/// Cheap handle to a device task.
#[derive(Clone)]
pub struct DeviceHandle {
    pub name: String,
    /// The Xen backend keys of the device (its class's), as of its last
    /// change (a resize).
    pub(crate) info: watch::Receiver<ClassInfo>,
    /// What a vhost-user frontend sees of the device (its class's).
    pub(crate) virtio: Option<Arc<dyn VirtioModel>>,
    /// Who may probe, connect, see and reach it over vhost-user.
    pub(crate) access: AccessList,
    /// What a frontend may make it hold (`[limits]`).
    pub(crate) limits: DeviceLimits,
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) stats: Arc<Mutex<DeviceStats>>,
    /// The device's metrics page, which its instances write.
    pub(super) metrics: Arc<MetricsPage>,
    /// The last copy read whole from `metrics`, shown while a read finds
    /// the writer busy, so counters a scraper sees never go back.
    pub(super) last_io: Arc<Mutex<IoCounters>>,
    /// Its class's standby pool, if it may use it.
    pub(super) pool: Option<StandbyPool>,
}

fn stopped() -> Refusal {
    (ErrorCode::Enodev, "device task stopped".to_string())
}

impl DeviceHandle {
    /// The Xen backend keys now.
    pub fn info(&self) -> ClassInfo {
        self.info.borrow().clone()
    }

    /// Sends `command` (built around the reply channel) and waits for the
    /// answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, Refusal>>) -> Command,
    ) -> Result<T, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(command(reply)).await.map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Stops exporting the device (docs/PROTOCOL.md §6a `disk-remove`);
    /// returns once its instances are fenced and its image released.
    pub async fn remove(&self, force: bool) -> Result<(), Refusal> {
        self.ask(|reply| Command::Remove { force, reply }).await
    }

    /// Resizes a disk; returns its new size in sectors.
    pub async fn resize(&self, bytes: Option<u64>) -> Result<u64, Refusal> {
        self.ask(|reply| Command::Resize { bytes, reply }).await
    }

    /// Gives a disk's running and later instances new QoS limits.
    pub async fn set_qos(&self, qos: QosLimits) -> Result<(), Refusal> {
        self.ask(|reply| Command::SetQos { qos, reply }).await
    }

    /// Asks the backend to attach; on success returns a receiver that fires
    /// if the device is lost while attached.
    pub async fn attach(&self, req: AttachRequest, fds: DeviceFds) -> Result<Attachment, Refusal> {
        self.send_attach(Frontend::Xen { req, fds }).await
    }

    /// Hands `frontend` to the device task and waits for its answer.
    async fn send_attach(&self, frontend: Frontend) -> Result<Attachment, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Attach {
                frontend: Box::new(frontend),
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Asks the backend to attach a vif's rings (`attach-net`, with the
    /// device's wire); as [`attach`](Self::attach) otherwise.
    pub async fn attach_net(
        &self,
        req: NetAttachRequest,
        fds: NetFds,
    ) -> Result<Attachment, Refusal> {
        self.send_attach(Frontend::Net {
            req,
            fds,
            wire: None,
            state: None,
            shadow: true,
        })
        .await
    }

    /// Attaches a vhost-user frontend's virtqueues (`fds.logs` is ignored:
    /// the device creates the shadow logs). Blocks until the backend
    /// answered; call it from a plain thread, not from async code.
    pub fn attach_virtio_blocking(
        &self,
        req: VirtioAttachRequest,
        fds: VirtioFds,
    ) -> Result<Attachment, Refusal> {
        let (reply, rx) = oneshot::channel();
        let frontend = Frontend::Virtio { req, fds };
        self.tx
            .blocking_send(Command::Attach {
                frontend: Box::new(frontend),
                reply,
            })
            .map_err(|_| stopped())?;
        rx.blocking_recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// [`detach`](Self::detach) from a plain thread.
    pub fn detach_blocking(&self, id: u64) {
        let (reply, rx) = oneshot::channel();
        if self.tx.blocking_send(Command::Detach { id, reply }).is_ok() {
            let _ = rx.blocking_recv();
        }
    }

    /// Gives attachment `id`'s virtqueue `queue` a new call eventfd: the
    /// running instance switches to it (`set-call`), later instances get
    /// it. Nothing is restarted. Blocks; call it from a plain thread.
    pub fn set_call_blocking(&self, id: u64, queue: u16, fd: OwnedFd) -> Result<(), Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::SetCall {
                id,
                queue,
                fd,
                reply,
            })
            .map_err(|_| stopped())?;
        rx.blocking_recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// Detaches attachment `id` (waits until the backend drained it).
    pub async fn detach(&self, id: u64) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Detach { id, reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Injects `fault` into the current backend instance.
    pub async fn fault(&self, fault: Fault) -> Result<(), Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Fault { fault, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// [`fault`](Self::fault) from a thread outside the supervisor's
    /// runtime (panics inside an async context).
    pub fn fault_blocking(&self, fault: Fault) -> Result<(), Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Command::Fault { fault, reply })
            .map_err(|_| stopped())?;
        rx.blocking_recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// Pauses the device task between two events for a live upgrade and
    /// returns its state (see [`super::Frozen`]).
    pub(crate) async fn freeze(&self) -> Result<super::Frozen, String> {
        let (reply, rx) = oneshot::channel();
        let (resume, resumed) = oneshot::channel();
        self.tx
            .send(Command::Freeze {
                reply,
                resume: resumed,
            })
            .await
            .map_err(|_| "device task stopped".to_string())?;
        let (state, fds) = rx.await.map_err(|_| "device task stopped".to_string())??;
        Ok(super::Frozen { state, fds, resume })
    }

    /// The device's counters and state, as of the last event it handled,
    /// and its I/O counters as of the serving instance's last copy.
    pub fn stats(&self) -> DeviceStats {
        let mut stats = lock(&self.stats).clone();
        if let Some(pool) = &self.pool {
            stats.standby_pid = pool.next_pid();
            stats.pool_spares = pool.ready();
            stats.pool_size = pool.size();
        }
        let mut last = self.last_io.lock().unwrap_or_else(|e| e.into_inner());
        match self.metrics.read() {
            Ok(io) => *last = io,
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, "metrics page unreadable; showing the last copy");
            }
        }
        stats.io = *last;
        stats.latency_p50_us = last.latency.quantile_us(0.5);
        stats.latency_p99_us = last.latency.quantile_us(0.99);
        stats
    }
}

pub(super) fn lock(stats: &Mutex<DeviceStats>) -> MutexGuard<'_, DeviceStats> {
    // Plain counters: a panic elsewhere cannot leave them inconsistent.
    stats.lock().unwrap_or_else(|e| e.into_inner())
}
