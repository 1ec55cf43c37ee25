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

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::protocol::{key, kind, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use shadowback_xenbus::{BackendInfo, DiskMode, Message, XenbusError};
use tokio::sync::{mpsc, oneshot};

use crate::config::DiskConfig;
use crate::instance::{Instance, NoAnswer};
use crate::session::{Session, VirtioSession, XenSession};
use crate::spawn::{open_disk, BackendCommand, Disk};
use crate::stats::{micros, DeviceStats, RecoveryTimes};
use crate::watchdog::{Watchdog, CHECK_PERIOD};
use crate::SupervisorError;

/// How long a backend may take to answer a control request (`attach`,
/// including its replay; `detach`; `poison`).
const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Takeovers in a row that may fail (the new instance dies, hangs or
/// refuses) before the guest is disconnected. A request that kills every
/// instance costs two (the crash-loop breaker fails it in the third
/// replaying instance), so five leave room for one more failure.
pub const MAX_FAILED_TAKEOVERS: u32 = 5;
/// An idle instance that dies younger than this died "at start-up".
const STABLE_AGE: Duration = Duration::from_secs(1);
/// Supervisor → instance: switch virtqueue `queue`'s call eventfd to the
/// one descriptor that comes with the message; answered `ok`.
pub const SET_CALL: &str = "set-call";
/// The virtqueue index key of [`SET_CALL`].
pub const KEY_QUEUE: &str = "queue";
/// Start-up deaths in a row after which the device is given up, rather
/// than forking backends that cannot run in a loop.
const MAX_STARTUP_DEATHS: u32 = 5;
/// Delay before replacing a standby that died or could not be started.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// Why a frontend lost its device (sent to its connection task).
#[derive(Debug, Clone)]
pub enum Lost {
    /// The backend found the ring corrupt.
    Disconnected(String),
    /// No backend can serve the device any more (without the shadow layer:
    /// the backend died; with it: every takeover failed).
    BackendDied(String),
}

/// A frontend's hold on the device: detach with `id`; `lost` fires if the
/// device goes away first.
#[derive(Debug)]
pub struct Attachment {
    pub id: u64,
    pub lost: oneshot::Receiver<Lost>,
}

/// A fault to inject into a device's current backend instance (the
/// `fault` control message; DESIGN §7).
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
}

impl Fault {
    /// The `action` value.
    pub fn action(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Hang => "hang",
            Fault::Poison { .. } => "poison",
            Fault::Spin => "spin",
        }
    }

    /// The `fault` message for `device`.
    pub fn to_message(self, device: &str) -> Message {
        let msg = Message::new(kind::FAULT)
            .with(key::DEVICE, device)
            .with(key::ACTION, self.action());
        match self {
            Fault::Poison { sector } => msg.with(key::SECTOR, sector),
            Fault::Kill | Fault::Hang | Fault::Spin => msg,
        }
    }

    /// Parses the `action` (and `sector`) keys of a `fault` message.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(kind::FAULT)?;
        match msg.require(key::ACTION)? {
            "kill" => Ok(Fault::Kill),
            "hang" => Ok(Fault::Hang),
            "spin" => Ok(Fault::Spin),
            "poison" => Ok(Fault::Poison {
                sector: msg.require_u64(key::SECTOR)?,
            }),
            other => Err(XenbusError::InvalidValue {
                key: key::ACTION.to_owned(),
                value: other.to_owned(),
                reason: "expected kill, hang, spin or poison",
            }),
        }
    }
}

type Refusal = (ErrorCode, String);

/// What a frontend attaches with.
enum Frontend {
    /// A guest's shared ring (the control socket's `connect`).
    Xen { req: AttachRequest, fds: DeviceFds },
    /// A VMM's virtqueues (the disk's vhost-user socket).
    Virtio {
        req: VirtioAttachRequest,
        fds: VirtioFds,
    },
}

enum Command {
    Attach {
        frontend: Frontend,
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
}

/// Cheap handle to a device task.
#[derive(Clone)]
pub struct DeviceHandle {
    pub name: String,
    pub info: BackendInfo,
    tx: mpsc::Sender<Command>,
    stats: Arc<Mutex<DeviceStats>>,
}

fn stopped() -> Refusal {
    (ErrorCode::Enodev, "device task stopped".to_string())
}

impl DeviceHandle {
    /// Asks the backend to attach; on success returns a receiver that fires
    /// if the device is lost while attached.
    pub async fn attach(&self, req: AttachRequest, fds: DeviceFds) -> Result<Attachment, Refusal> {
        let (reply, rx) = oneshot::channel();
        let frontend = Frontend::Xen { req, fds };
        self.tx
            .send(Command::Attach { frontend, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
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
            .blocking_send(Command::Attach { frontend, reply })
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

    /// The device's counters and state, as of the last event it handled.
    pub fn stats(&self) -> DeviceStats {
        lock(&self.stats).clone()
    }
}

fn lock(stats: &Mutex<DeviceStats>) -> MutexGuard<'_, DeviceStats> {
    // Plain counters: a panic elsewhere cannot leave them inconsistent.
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

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

/// The current frontend.
struct Attached {
    id: u64,
    /// Fires when the guest loses the device; `None` once it has. The
    /// attachment stays registered until the connection detaches, so the
    /// backend is told `detach` exactly once.
    lost: Option<oneshot::Sender<Lost>>,
    /// What a replacement backend needs; `None` without the shadow layer.
    session: Option<Session>,
}

/// How a failed instance failed.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// It exited or closed its control channel.
    Crashed,
    /// The watchdog (or a request) found it stuck since `since`.
    Hung { since: Instant },
}

impl Failure {
    fn of(no_answer: &NoAnswer, asked: Instant) -> Self {
        match no_answer {
            NoAnswer::Died(_) => Failure::Crashed,
            NoAnswer::Hung(_) => Failure::Hung { since: asked },
        }
    }
}

/// What the main loop waits for.
enum Event {
    Command(Command),
    /// A message (or EOF) on the current instance's control channel.
    Backend(Result<Message, String>),
    /// The current instance's pidfd became readable.
    Exited,
    StandbyExited,
    StandbyRetry,
    WatchdogTick,
    Stop,
}

struct DeviceTask {
    name: String,
    cfg: DiskConfig,
    cmd: BackendCommand,
    /// The supervisor keeps the disk open for as long as the device exists;
    /// every instance inherits it.
    disk: Disk,
    /// The instance serving (or ready to serve) the device.
    current: Option<Instance>,
    /// A started instance waiting on its control socket, for takeovers.
    standby: Option<Instance>,
    standby_retry: Option<tokio::time::Instant>,
    attached: Option<Attached>,
    next_attachment: u64,
    /// Set when the supervisor gave up on the device; attaches then fail.
    given_up: Option<String>,
    /// Sectors poisoned by `fault`, in order; every instance is told all
    /// of them before its `attach`.
    poisons: Vec<u64>,
    /// When a `fault kill` was sent to the current instance.
    injected_kill: Option<Instant>,
    /// An operator fault (`hang`, `spin`) stopped the heartbeat: the hang
    /// that follows is not the requests' fault.
    injected_hang: bool,
    /// Whether the death being recovered from counts against the requests
    /// in flight (the crash-loop breaker). Operator kills and hangs do not.
    blame: bool,
    /// Heartbeat progress of the current instance while it serves a
    /// session.
    watchdog: Option<Watchdog>,
    startup_deaths: u32,
    stats: Arc<Mutex<DeviceStats>>,
}

async fn next_message(instance: Option<&Instance>) -> Result<Message, String> {
    match instance {
        Some(i) => i.recv().await,
        None => std::future::pending().await,
    }
}

async fn exited(instance: Option<&Instance>) {
    match instance {
        Some(i) => i.exited().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Tells `instance` the poisoned sectors it has not heard of yet.
async fn send_poisons(
    instance: &mut Instance,
    poisons: &[u64],
    liveness: Option<(&ShadowLog, Duration)>,
    aside: &mut Vec<Message>,
) -> Result<(), NoAnswer> {
    while let Some(&sector) = poisons.get(instance.poisons_sent) {
        let msg = Message::new(kind::POISON).with(key::SECTOR, sector);
        instance.send(&msg, &[]).await?;
        let reply = instance
            .reply(BACKEND_REPLY_TIMEOUT, liveness, aside)
            .await?;
        if reply.kind() != kind::OK {
            tracing::warn!(pid = instance.pid(), sector, reply = %reply, "backend refused a poison");
        }
        instance.poisons_sent += 1;
    }
    Ok(())
}

/// Poisons, then `attach`; returns the answer and when `attach` was sent.
async fn send_attach(
    instance: &mut Instance,
    poisons: &[u64],
    msg: &Message,
    fds: &[BorrowedFd<'_>],
    aside: &mut Vec<Message>,
) -> Result<(Message, Instant), NoAnswer> {
    send_poisons(instance, poisons, None, aside).await?;
    instance.send(msg, fds).await?;
    let sent = Instant::now();
    // No heartbeat check: a replaying instance has not entered its event
    // loop yet.
    let reply = instance.reply(BACKEND_REPLY_TIMEOUT, None, aside).await?;
    Ok((reply, sent))
}

/// The backend's `error` answer as a refusal.
fn refusal(reply: &Message) -> Refusal {
    if reply.kind() != kind::ERROR {
        return (
            ErrorCode::Eproto,
            format!("backend answered {}", reply.kind()),
        );
    }
    let code = reply
        .get(key::CODE)
        .and_then(|c| c.parse().ok())
        .unwrap_or(ErrorCode::Einval);
    let text = reply.get(key::MESSAGE).unwrap_or("backend refused");
    (code, text.to_string())
}

/// The replay report of an `attached` answer.
#[derive(Debug, Default)]
struct ReplayReport {
    generation: u64,
    replayed: u64,
    repushed: u64,
    poisoned: u64,
    corrupt: u64,
    replay_us: u64,
}

impl ReplayReport {
    fn of(reply: &Message) -> Self {
        let n = |k| reply.get_u64(k).ok().flatten().unwrap_or(0);
        ReplayReport {
            generation: n(key::GENERATION),
            replayed: n(key::REPLAYED),
            repushed: n(key::REPUSHED),
            poisoned: n(key::POISONED),
            corrupt: n(key::CORRUPT),
            replay_us: n(key::REPLAY_US),
        }
    }
}

impl DeviceTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(CHECK_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                cmd = rx.recv() => cmd.map_or(Event::Stop, Event::Command),
                msg = next_message(self.current.as_ref()) => Event::Backend(msg),
                () = exited(self.current.as_ref()) => Event::Exited,
                () = exited(self.standby.as_ref()) => Event::StandbyExited,
                () = sleep_until(self.standby_retry) => Event::StandbyRetry,
                _ = tick.tick(), if self.watchdog.is_some() => Event::WatchdogTick,
            };
            match event {
                Event::Command(Command::Attach { frontend, reply }) => {
                    let res = self.attach(frontend).await;
                    let _ = reply.send(res);
                }
                Event::Command(Command::SetCall {
                    id,
                    queue,
                    fd,
                    reply,
                }) => {
                    let res = self.set_call(id, queue, fd).await;
                    let _ = reply.send(res);
                }
                Event::Command(Command::Detach { id, reply }) => {
                    self.detach(id).await;
                    let _ = reply.send(());
                }
                Event::Command(Command::Fault { fault, reply }) => {
                    let res = self.fault(fault).await;
                    let _ = reply.send(res);
                }
                Event::Backend(Ok(msg)) => self.unsolicited(msg),
                Event::Backend(Err(e)) => {
                    tracing::debug!(device = %self.name, error = %e, "backend control channel closed");
                    self.on_failure(Failure::Crashed).await;
                }
                Event::Exited => self.on_failure(Failure::Crashed).await,
                Event::StandbyExited => {
                    if let Some(standby) = self.standby.take() {
                        let fenced = standby.fence().await;
                        tracing::warn!(device = %self.name, status = %fenced.status, "standby backend exited");
                    }
                    self.standby_retry = Some(tokio::time::Instant::now() + STANDBY_RETRY);
                }
                Event::StandbyRetry => {
                    self.standby_retry = None;
                    self.ensure_standby();
                }
                Event::WatchdogTick => {
                    if let Some(hang) = self.check_hang() {
                        self.on_failure(Failure::Hung { since: hang.since }).await;
                    }
                }
                Event::Stop => break,
            }
            self.publish();
        }
        // Dropping the instances kills them (`kill_on_drop`).
    }

    fn hang_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.hang_timeout_ms)
    }

    /// Updates the shared stats: `update` changes counters, and the state
    /// fields (pid, standby, connected) are refreshed in the same critical
    /// section, so a reader never sees a new count with an old pid.
    fn publish_with(&self, update: impl FnOnce(&mut DeviceStats)) {
        let mut s = lock(&self.stats);
        update(&mut s);
        s.connected = self.attached.as_ref().is_some_and(|a| a.lost.is_some());
        s.pid = self.current.as_ref().map(Instance::pid);
        s.standby_pid = self.standby.as_ref().map(Instance::pid);
        s.given_up = self.given_up.is_some();
    }

    /// Refreshes the state fields of the shared stats.
    fn publish(&self) {
        self.publish_with(|_| {});
    }

    /// The attached guest is still connected and has a session to recover.
    fn recoverable(&self) -> bool {
        self.attached
            .as_ref()
            .is_some_and(|a| a.lost.is_some() && a.session.is_some())
    }

    fn lose(&mut self, why: Lost) {
        if let Some(tx) = self.attached.as_mut().and_then(|a| a.lost.take()) {
            let _ = tx.send(why);
        }
    }

    fn unsolicited(&mut self, msg: Message) {
        if msg.kind() == kind::DISCONNECT {
            let reason = msg.get(key::REASON).unwrap_or("ring corrupt").to_string();
            tracing::warn!(device = %self.name, %reason, "backend disconnected the frontend");
            self.lose(Lost::Disconnected(reason));
        } else {
            tracing::warn!(device = %self.name, kind = msg.kind(), "unexpected message from backend");
        }
    }

    fn check_hang(&mut self) -> Option<crate::watchdog::Hang> {
        let session = self.attached.as_ref()?.session.as_ref()?;
        let watchdog = self.watchdog.as_mut()?;
        let beat = session.log().read_heartbeat().ok()?;
        let pending = session.pending();
        watchdog.check(Instant::now(), beat, pending)
    }

    /// Starts watching the current instance's heartbeat.
    fn watch_current(&mut self) {
        let beat = self
            .attached
            .as_ref()
            .and_then(|a| a.session.as_ref())
            .map(|s| s.log().read_heartbeat().unwrap_or(0));
        self.watchdog = beat.map(|beat| Watchdog::new(self.hang_timeout(), Instant::now(), beat));
    }

    /// Starts a standby if the config wants one and none is running.
    fn ensure_standby(&mut self) {
        if !self.cfg.standby || self.standby.is_some() || self.given_up.is_some() {
            return;
        }
        match Instance::start(&self.cmd, &self.cfg, &self.disk, false) {
            Ok(instance) => {
                tracing::debug!(device = %self.name, pid = instance.pid(), "standby backend started");
                self.standby = Some(instance);
            }
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, "cannot start a standby backend");
                self.standby_retry = Some(tokio::time::Instant::now() + STANDBY_RETRY);
            }
        }
    }

    /// The standby if it is alive, else a cold-started instance; `true`
    /// when it is the standby.
    async fn next_instance(&mut self) -> Result<(Instance, bool), SupervisorError> {
        if let Some(standby) = self.standby.take() {
            if !standby.has_exited() {
                return Ok((standby, true));
            }
            let fenced = standby.fence().await;
            tracing::warn!(device = %self.name, status = %fenced.status, "standby backend had exited");
        }
        Ok((
            Instance::start(&self.cmd, &self.cfg, &self.disk, false)?,
            false,
        ))
    }

    /// The current instance failed: fence it (DESIGN §5 step 2), then take
    /// over the attachment, or just replace an idle backend.
    async fn on_failure(&mut self, failure: Failure) {
        let seen = Instant::now();
        let Some(old) = self.current.take() else {
            return;
        };
        self.watchdog = None;
        let injected = self.injected_kill.take();
        let injected_hang = std::mem::take(&mut self.injected_hang);
        // DESIGN §5 step 5 counts instances a request killed; a kill or hang
        // we injected ourselves says nothing about the requests in flight.
        self.blame =
            injected.is_none() && !(injected_hang && matches!(failure, Failure::Hung { .. }));
        // An injected SIGKILL explains a stalled heartbeat: the process is
        // still exiting (io_uring teardown waits for its in-flight I/O).
        let failure = if injected.is_some() {
            Failure::Crashed
        } else {
            failure
        };
        let pid = old.pid();
        let age = old.age();
        let detect = match (failure, injected) {
            (Failure::Hung { since }, _) => seen.saturating_duration_since(since),
            (Failure::Crashed, Some(kill)) => seen.saturating_duration_since(kill),
            (Failure::Crashed, None) => seen.elapsed(),
        };
        match failure {
            Failure::Crashed => self.publish_with(|s| s.crashes += 1),
            Failure::Hung { .. } => self.publish_with(|s| s.hangs += 1),
        }
        let fenced = old.fence().await;
        let fence = fenced.io_done.saturating_duration_since(fenced.kill_sent);
        let io_wait = fenced.io_done.saturating_duration_since(fenced.reaped);
        tracing::error!(
            device = %self.name, pid, ?failure, status = %fenced.status,
            detect_us = micros(detect), fence_us = micros(fence), io_wait_us = micros(io_wait),
            "backend failed"
        );
        if self.recoverable() {
            self.take_over(seen, detect, fence).await;
            return;
        }
        if self.attached.as_ref().is_some_and(|a| a.lost.is_some()) {
            // No shadow layer: nothing to replay from.
            self.lose(Lost::BackendDied(format!(
                "backend {pid} {}",
                fenced.status
            )));
        }
        // A kill we injected says nothing about the backend starting up
        // badly: it must not count towards giving the device up.
        let age = if injected.is_some() { STABLE_AGE } else { age };
        self.replace_idle(age).await;
    }

    /// Gives the device a new, unattached backend.
    async fn replace_idle(&mut self, dead_age: Duration) {
        if dead_age >= STABLE_AGE {
            self.startup_deaths = 0;
        } else {
            self.startup_deaths += 1;
        }
        if self.startup_deaths >= MAX_STARTUP_DEATHS {
            self.give_up(format!(
                "{} backends in a row died at start-up",
                self.startup_deaths
            ))
            .await;
            return;
        }
        match self.next_instance().await {
            Ok((instance, _)) => self.current = Some(instance),
            Err(e) => tracing::error!(device = %self.name, error = %e, "cannot start a backend"),
        }
        self.ensure_standby();
    }

    /// DESIGN §5 step 3: a fresh instance attaches with `recover=1` and
    /// replays the log; on failure, fence it and try the next, up to
    /// [`MAX_FAILED_TAKEOVERS`].
    async fn take_over(&mut self, first_seen: Instant, mut detect: Duration, mut fence: Duration) {
        let mut failures = 0;
        let mut aside = Vec::new();
        while self.recoverable() {
            let chosen = Instant::now();
            let attempt = self.next_instance().await;
            let (mut instance, from_standby) = match attempt {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(device = %self.name, error = %e, "cannot start a backend");
                    failures += 1;
                    self.publish_with(|s| s.failed_takeovers += 1);
                    if failures >= MAX_FAILED_TAKEOVERS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(session) = self.attached.as_ref().and_then(|a| a.session.as_ref()) else {
                // Cannot happen (`recoverable` checked it); keep the
                // instance as an idle backend rather than dropping it.
                self.current = Some(instance);
                return;
            };
            let blame = std::mem::replace(&mut self.blame, true);
            let result = match session.attach_message(true) {
                Ok(msg) => {
                    let msg = msg.with("blame", u8::from(blame));
                    send_attach(
                        &mut instance,
                        &self.poisons,
                        &msg,
                        &session.attach_fds(),
                        &mut aside,
                    )
                    .await
                }
                Err((_, why)) => Err(NoAnswer::Died(why)),
            };
            for msg in aside.drain(..) {
                self.unsolicited(msg);
            }
            let (failure, why) = match result {
                Ok((reply, sent)) if reply.kind() == kind::ATTACHED => {
                    self.took_over(
                        instance,
                        from_standby,
                        &reply,
                        RecoveryTimes {
                            detect_us: micros(detect),
                            fence_us: micros(fence),
                            takeover_us: micros(sent.saturating_duration_since(chosen)),
                            replay_us: 0,
                            total_us: micros(first_seen.elapsed()),
                        },
                    );
                    return;
                }
                Ok((reply, _)) => (None, format!("refused: {:?}", refusal(&reply))),
                Err(e) => (Some(Failure::of(&e, chosen)), e.to_string()),
            };
            let seen = Instant::now();
            failures += 1;
            self.publish_with(|s| {
                s.failed_takeovers += 1;
                match failure {
                    Some(Failure::Crashed) => s.crashes += 1,
                    Some(Failure::Hung { .. }) => s.hangs += 1,
                    None => {}
                }
            });
            let pid = instance.pid();
            let fenced = instance.fence().await;
            detect = match failure {
                Some(Failure::Hung { since }) => seen.saturating_duration_since(since),
                _ => seen.elapsed(),
            };
            fence = fenced.io_done.saturating_duration_since(fenced.kill_sent);
            tracing::error!(device = %self.name, pid, failures, %why, status = %fenced.status, "takeover failed");
            if failures >= MAX_FAILED_TAKEOVERS {
                break;
            }
        }
        if self.recoverable() {
            self.give_up(format!("{failures} takeovers in a row failed"))
                .await;
        } else {
            // The guest went away (ring corrupt) while we were at it.
            self.replace_idle(STABLE_AGE).await;
        }
    }

    /// Bookkeeping of a successful takeover.
    fn took_over(
        &mut self,
        mut instance: Instance,
        from_standby: bool,
        reply: &Message,
        mut times: RecoveryTimes,
    ) {
        let report = ReplayReport::of(reply);
        times.replay_us = report.replay_us;
        instance.serving = true;
        tracing::info!(
            device = %self.name, pid = instance.pid(), from_standby,
            generation = report.generation, replayed = report.replayed,
            repushed = report.repushed, poisoned = report.poisoned, corrupt = report.corrupt,
            detect_us = times.detect_us, fence_us = times.fence_us,
            takeover_us = times.takeover_us, replay_us = times.replay_us,
            total_us = times.total_us,
            "backend recovered"
        );
        self.current = Some(instance);
        self.startup_deaths = 0;
        self.watch_current();
        // DESIGN §5 step 3: the next standby starts now, off the critical
        // path (the guest is already being served).
        self.ensure_standby();
        self.publish_with(|s| {
            s.recoveries += 1;
            if from_standby {
                s.standby_takeovers += 1;
            } else {
                s.cold_takeovers += 1;
            }
            s.replayed += report.replayed;
            s.repushed += report.repushed;
            s.poisoned += report.poisoned;
            s.corrupt += report.corrupt;
            s.last_recovery = Some(times);
        });
    }

    /// No backend can serve the device: the guest is told, and every later
    /// attach fails with `ENODEV`.
    async fn give_up(&mut self, why: String) {
        tracing::error!(device = %self.name, %why, "giving up on the device");
        self.lose(Lost::BackendDied(why.clone()));
        self.given_up = Some(why);
        self.watchdog = None;
        for instance in [self.current.take(), self.standby.take()]
            .into_iter()
            .flatten()
        {
            instance.fence().await;
        }
    }

    async fn attach(&mut self, frontend: Frontend) -> Result<Attachment, Refusal> {
        if let Some(why) = &self.given_up {
            return Err((ErrorCode::Enodev, why.clone()));
        }
        if self.attached.is_some() {
            return Err((
                ErrorCode::Ebusy,
                format!("device {} is already connected", self.name),
            ));
        }
        if self.current.is_none() {
            let (instance, _) = self
                .next_instance()
                .await
                .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
            self.current = Some(instance);
            self.ensure_standby();
        }
        let (session, msg, plain) = match (frontend, self.cfg.shadow) {
            (Frontend::Xen { req, fds }, true) => {
                let session = Session::Xen(XenSession::new(req, fds, self.cfg.backend_id)?);
                let msg = session.attach_message(false)?;
                (Some(session), msg, Vec::new())
            }
            (Frontend::Xen { req, fds }, false) => {
                let msg = req
                    .to_message()
                    .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
                (None, msg, vec![fds.region, fds.kick, fds.notify])
            }
            (Frontend::Virtio { req, fds }, true) => {
                let session = Session::Virtio(VirtioSession::new(req, fds)?);
                let msg = session.attach_message(false)?;
                (Some(session), msg, Vec::new())
            }
            (Frontend::Virtio { mut req, fds }, false) => {
                req.shadow = false;
                (None, req.to_message(), plain_virtio_fds(fds))
            }
        };
        let Some(instance) = self.current.as_mut() else {
            return Err((ErrorCode::Enodev, "no backend".into()));
        };
        let borrowed: Vec<BorrowedFd<'_>> = match &session {
            Some(s) => s.attach_fds(),
            None => plain.iter().map(AsFd::as_fd).collect(),
        };
        let mut aside = Vec::new();
        let asked = Instant::now();
        let result = send_attach(instance, &self.poisons, &msg, &borrowed, &mut aside).await;
        drop(borrowed);
        // The backend holds its own copies now (or failed): without the
        // shadow layer nothing of the guest's is kept.
        drop(plain);
        for msg in aside {
            self.unsolicited(msg);
        }
        let id = self.next_attachment;
        self.next_attachment += 1;
        let (tx, lost) = oneshot::channel();
        match result {
            Ok((reply, _)) if reply.kind() == kind::ATTACHED => {
                if let Some(instance) = self.current.as_mut() {
                    instance.serving = true;
                }
                // A first attach replays too when a virtqueue comes with
                // requests in flight in the VMM's in-flight region (after a
                // restart of the supervisor): count them.
                let report = ReplayReport::of(&reply);
                if report.replayed + report.poisoned + report.corrupt > 0 {
                    tracing::info!(device = %self.name, replayed = report.replayed,
                        poisoned = report.poisoned, corrupt = report.corrupt,
                        "requests in flight before the attach resubmitted");
                    self.publish_with(|s| {
                        s.replayed += report.replayed;
                        s.poisoned += report.poisoned;
                        s.corrupt += report.corrupt;
                    });
                }
                self.attached = Some(Attached {
                    id,
                    lost: Some(tx),
                    session,
                });
                self.watch_current();
                Ok(Attachment { id, lost })
            }
            Ok((reply, _)) => Err(refusal(&reply)),
            Err(e) if session.is_none() => {
                self.on_failure(Failure::of(&e, asked)).await;
                Err((ErrorCode::Enodev, e.to_string()))
            }
            Err(e) => {
                // The instance had the log and may have consumed requests
                // already: recover like any failure. The guest learns of it
                // only if recovery gives up.
                self.attached = Some(Attached {
                    id,
                    lost: Some(tx),
                    session,
                });
                self.on_failure(Failure::of(&e, asked)).await;
                if self.recoverable() && self.current.as_ref().is_some_and(|i| i.serving) {
                    Ok(Attachment { id, lost })
                } else {
                    self.attached = None;
                    Err((ErrorCode::Enodev, format!("{e}; recovery failed")))
                }
            }
        }
    }

    async fn detach(&mut self, id: u64) {
        if self.attached.as_ref().map(|a| a.id) != Some(id) {
            tracing::debug!(device = %self.name, id, "stale detach ignored");
            return;
        }
        // Dropped at the end: the session (the guest's fds, the log) is
        // released only once no backend touches it.
        let mut attached = self.attached.take();
        let mut takeovers = 0;
        loop {
            self.watchdog = None;
            let hang_timeout = self.hang_timeout();
            let Some(instance) = self.current.as_mut().filter(|i| i.serving) else {
                break;
            };
            instance.serving = false;
            let liveness = attached
                .as_ref()
                .and_then(|a| a.session.as_ref())
                .map(|s| (s.log(), hang_timeout));
            let asked = Instant::now();
            let mut aside = Vec::new();
            let result = match instance.send(&Message::new(kind::DETACH), &[]).await {
                Ok(()) => {
                    instance
                        .reply(BACKEND_REPLY_TIMEOUT, liveness, &mut aside)
                        .await
                }
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(msg) if msg.kind() == kind::DETACHED => break,
                Ok(msg) => {
                    tracing::warn!(device = %self.name, kind = msg.kind(), "unexpected reply to detach");
                    break;
                }
                Err(e) => e,
            };
            tracing::warn!(device = %self.name, error = %e, "detach failed");
            // A vhost-user device outlives the detach (GET_VRING_BASE, a new
            // memory table; the VMM resumes at `used->idx`): what the dead
            // instance consumed must be answered first. Take over, then
            // detach the new instance.
            let resumable = takeovers < MAX_FAILED_TAKEOVERS
                && attached.as_ref().is_some_and(|a| {
                    a.lost.is_some() && matches!(a.session, Some(Session::Virtio(_)))
                });
            if !resumable {
                self.on_failure(Failure::of(&e, asked)).await;
                break;
            }
            takeovers += 1;
            self.attached = attached.take();
            self.on_failure(Failure::of(&e, asked)).await;
            attached = self.attached.take();
        }
        drop(attached);
    }

    /// `SET_VRING_CALL` on a running vhost-user session: keep the new fd
    /// for later instances and switch the serving one to it. An instance
    /// that fails to answer is replaced, and the replacement gets the new
    /// fd with its `attach-virtio`.
    async fn set_call(&mut self, id: u64, queue: u16, fd: OwnedFd) -> Result<(), Refusal> {
        let hang_timeout = self.hang_timeout();
        let Some(attached) = self.attached.as_mut().filter(|a| a.id == id) else {
            return Err((ErrorCode::Enodev, "the session is gone".into()));
        };
        if let Some(session) = attached.session.as_mut() {
            let Session::Virtio(virtio) = session else {
                return Err((ErrorCode::Einval, "not a virtio session".into()));
            };
            let copy = fd
                .try_clone()
                .map_err(|e| (ErrorCode::Enodev, format!("dup: {e}")))?;
            virtio.set_call(queue, copy)?;
        }
        let Some(instance) = self.current.as_mut().filter(|i| i.serving) else {
            // A takeover is due; it sends the new fd.
            return Ok(());
        };
        let liveness = attached.session.as_ref().map(|s| (s.log(), hang_timeout));
        let msg = Message::new(SET_CALL).with(KEY_QUEUE, queue);
        let asked = Instant::now();
        let mut aside = Vec::new();
        let result = match instance.send(&msg, &[fd.as_fd()]).await {
            Ok(()) => {
                instance
                    .reply(BACKEND_REPLY_TIMEOUT, liveness, &mut aside)
                    .await
            }
            Err(e) => Err(e),
        };
        for msg in aside {
            self.unsolicited(msg);
        }
        match result {
            Ok(reply) if reply.kind() == kind::OK => Ok(()),
            Ok(reply) => {
                tracing::warn!(device = %self.name, queue, reply = %reply, "backend refused set-call");
                Err(refusal(&reply))
            }
            Err(e) => {
                tracing::warn!(device = %self.name, queue, error = %e, "set-call failed");
                self.on_failure(Failure::of(&e, asked)).await;
                Ok(())
            }
        }
    }

    async fn fault(&mut self, fault: Fault) -> Result<(), Refusal> {
        if let Some(why) = &self.given_up {
            return Err((ErrorCode::Enodev, why.clone()));
        }
        let hang_timeout = self.hang_timeout();
        let Some(instance) = self.current.as_mut() else {
            return Err((ErrorCode::Enodev, "no backend running".into()));
        };
        tracing::warn!(device = %self.name, pid = instance.pid(), ?fault, "injecting a fault");
        let signal = |sig| {
            instance
                .signal(sig)
                .map_err(|e| (ErrorCode::Enodev, format!("signal: {e}")))
        };
        match fault {
            Fault::Kill => {
                signal(Signal::KILL)?;
                self.injected_kill = Some(Instant::now());
                Ok(())
            }
            Fault::Hang => {
                signal(Signal::STOP)?;
                self.injected_hang = true;
                Ok(())
            }
            // The backend does not answer: it is busy spinning.
            Fault::Spin => {
                instance
                    .send(&Message::new("spin"), &[])
                    .await
                    .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
                self.injected_hang = true;
                Ok(())
            }
            Fault::Poison { sector } => {
                if !self.poisons.contains(&sector) {
                    self.poisons.push(sector);
                }
                let liveness = self
                    .attached
                    .as_ref()
                    .and_then(|a| a.session.as_ref())
                    .filter(|_| instance.serving)
                    .map(|s| (s.log(), hang_timeout));
                let mut aside = Vec::new();
                let result = send_poisons(instance, &self.poisons, liveness, &mut aside).await;
                for msg in aside {
                    self.unsolicited(msg);
                }
                // A backend that died or hung meanwhile is replaced by the
                // main loop; the next instance is told before its attach.
                result.map_err(|e| (ErrorCode::Enodev, e.to_string()))
            }
        }
    }
}

/// The descriptors of an `attach-virtio` without shadow logs, in message
/// order.
fn plain_virtio_fds(fds: VirtioFds) -> Vec<OwnedFd> {
    let mut v = fds.regions;
    for (kick, call) in fds.queues {
        v.push(kick);
        v.push(call);
    }
    v.extend(fds.inflight);
    v
}
