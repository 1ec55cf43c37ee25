//! The device task: one per device, it owns the backend instances and the
//! attached frontend's session and serves [`Command`]s one at a time.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use shadowback_shadow::{MetricsPage, ShadowLog};
use shadowback_xenbus::protocol::{key, kind, ErrorCode, QosLimits};
use shadowback_xenbus::Message;
use tokio::sync::{mpsc, oneshot, watch};

use super::handle::{lock, Attachment, Command, Fault, Lost};
use super::takeover::{Failure, GivenUp, ReplayReport, MAX_FAILED_TAKEOVERS};
use super::Refusal;
use super::Settings;
use crate::class::{ClassInfo, DeviceClass};
use crate::instance::{Fenced, Instance, NoAnswer};
use crate::limits::{AttachRate, MAX_POISONED_SECTORS};
use crate::pool::StandbyPool;
use crate::session::Session;
use crate::spawn::BackendCommand;
use crate::stats::DeviceStats;
use crate::transport::Frontend;
use crate::watchdog::{SchedSample, Watchdog, CHECK_PERIOD};
use crate::SupervisorError;

/// How long a backend may take to answer a control request (`attach`,
/// including its replay; `detach`; `poison`).
pub(super) const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The current frontend.
pub(super) struct Attached {
    pub(super) id: u64,
    /// Fires when the guest loses the device; `None` once it has. The
    /// attachment stays registered until the connection detaches, so the
    /// backend is told `detach` exactly once.
    pub(super) lost: Option<oneshot::Sender<Lost>>,
    /// What a replacement backend needs; `None` without the shadow layer.
    pub(super) session: Option<Session>,
}
/// What the main loop waits for.
enum Event {
    Command(Command),
    /// A message (or EOF) on the current instance's control channel.
    Backend(Result<Message, String>),
    /// The current instance's pidfd became readable.
    Exited,
    WatchdogTick,
    /// Every dead instance's fence is down (or its task failed).
    Fenced(Result<Fenced, tokio::task::JoinError>),
    Stop,
}

pub(super) struct DeviceTask {
    pub(super) name: String,
    pub(super) settings: Settings,
    /// Attach attempts left this second (`attaches_per_second`).
    pub(super) attach_rate: AttachRate,
    pub(super) cmd: BackendCommand,
    /// What kind of device it is; it holds what must live as long as the
    /// device (a disk: the image, opened and locked).
    pub(super) class: Box<dyn DeviceClass>,
    /// The instance serving (or ready to serve) the device.
    pub(super) current: Option<Instance>,
    /// Where takeovers find a spare (docs/ARCHITECTURE.md §7.5); `None`
    /// with `standby = false`.
    pub(super) pool: Option<StandbyPool>,
    /// The fences of dead instances still running in the background, one
    /// after the other: done once every earlier instance's I/O is gone
    /// (docs/ARCHITECTURE.md §7.3).
    pub(super) fencing: Option<tokio::task::JoinHandle<Fenced>>,
    pub(super) attached: Option<Attached>,
    pub(super) next_attachment: u64,
    /// Set when the supervisor gave up on the device; until the next
    /// fresh start attaches fail.
    pub(super) given_up: Option<GivenUp>,
    /// Sectors poisoned by `fault`, in order; every instance is told all
    /// of them before its `attach`.
    pub(super) poisons: Vec<u64>,
    /// When a `fault kill` was sent to the current instance.
    pub(super) injected_kill: Option<Instant>,
    /// An operator fault (`hang`, `spin`) stopped the heartbeat: the hang
    /// that follows is not the requests' fault.
    pub(super) injected_hang: bool,
    /// Whether the death being recovered from counts against the requests
    /// in flight (the crash-loop breaker). Operator kills and hangs do not.
    pub(super) blame: bool,
    /// Heartbeat progress of the current instance while it serves a
    /// session.
    pub(super) watchdog: Option<Watchdog>,
    pub(super) startup_deaths: u32,
    pub(super) stats: Arc<Mutex<DeviceStats>>,
    /// The device's metrics page (docs/ARCHITECTURE.md §4.1).
    pub(super) metrics: Arc<MetricsPage>,
    /// The Xen backend keys every handle sees (changed by a resize).
    pub(super) info: watch::Sender<ClassInfo>,
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

async fn fence_done(
    fencing: &mut Option<tokio::task::JoinHandle<Fenced>>,
) -> Result<Fenced, tokio::task::JoinError> {
    match fencing {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// Tells `instance` the poisoned sectors it has not heard of yet.
pub(super) async fn send_poisons(
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

/// Poisons, then `attach`; returns the answer and when it arrived.
pub(super) async fn send_attach(
    instance: &mut Instance,
    poisons: &[u64],
    msg: &Message,
    fds: &[BorrowedFd<'_>],
    aside: &mut Vec<Message>,
) -> Result<(Message, Instant), NoAnswer> {
    send_poisons(instance, poisons, None, aside).await?;
    instance.send(msg, fds).await?;
    // No heartbeat check: a replaying instance has not entered its event
    // loop yet.
    let reply = instance.reply(BACKEND_REPLY_TIMEOUT, None, aside).await?;
    Ok((reply, Instant::now()))
}

/// The backend's `error` answer as a refusal.
pub(super) fn refusal(reply: &Message) -> Refusal {
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
impl DeviceTask {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(CHECK_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let removed = loop {
            let event = tokio::select! {
                cmd = rx.recv() => cmd.map_or(Event::Stop, Event::Command),
                msg = next_message(self.current.as_ref()) => Event::Backend(msg),
                () = exited(self.current.as_ref()) => Event::Exited,
                fenced = fence_done(&mut self.fencing) => Event::Fenced(fenced),
                _ = tick.tick(), if self.watchdog.is_some() => Event::WatchdogTick,
            };
            match event {
                Event::Command(Command::Attach { frontend, reply }) => {
                    let res = self.attach(*frontend).await;
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
                    let killed = fault == Fault::Kill && res.is_ok();
                    let _ = reply.send(res);
                    // docs/ARCHITECTURE.md §7.2: a kill we sent is known
                    // now; when it can be proven final at once, take over
                    // without waiting for the exit.
                    if killed
                        && self.class.holds_back()
                        && self.current.as_ref().is_some_and(|i| i.membarrier)
                    {
                        self.on_failure(Failure::Crashed).await;
                    }
                }
                Event::Backend(Ok(msg)) if msg.kind() == kind::DYING => {
                    tracing::warn!(device = %self.name, "backend sent a crash note");
                    self.publish_with(|s| s.crash_notes += 1);
                    self.on_failure(Failure::Crashed).await;
                }
                Event::Command(Command::Remove { force, reply }) => {
                    match self.remove(force).await {
                        Ok(()) => break Some(reply),
                        Err(refused) => {
                            let _ = reply.send(Err(refused));
                        }
                    }
                }
                Event::Command(Command::Resize { bytes, reply }) => {
                    let res = self.resize(bytes).await;
                    let _ = reply.send(res);
                }
                Event::Command(Command::SetQos { qos, reply }) => {
                    let res = self.set_qos(qos).await;
                    let _ = reply.send(res);
                }
                Event::Command(Command::Freeze { reply, resume }) => {
                    // The state names no background fence: an instance
                    // holding requests back gets its `fenced` from this
                    // binary, or the one taking over would never send it
                    // (docs/ARCHITECTURE.md §7.3).
                    self.await_fences().await;
                    if reply.send(self.handover()).is_ok() {
                        // Paused until the upgrade's `execve` failed (or
                        // succeeded, and this process is gone).
                        let _ = resume.await;
                        tracing::info!(device = %self.name, "resumed after a failed upgrade");
                    }
                }
                Event::Backend(Ok(msg)) => self.unsolicited(msg),
                Event::Backend(Err(e)) => {
                    tracing::debug!(device = %self.name, error = %e, "backend control channel closed");
                    self.on_failure(Failure::Crashed).await;
                }
                Event::Exited => {
                    // A crash note queued before the exit, seen after it.
                    self.queued_crash_note().await;
                    self.on_failure(Failure::Crashed).await;
                }
                Event::WatchdogTick => {
                    if let Some(hang) = self.check_hang() {
                        // A stall that is a death in progress: the main
                        // thread exiting, or a crash note the tick came
                        // before (docs/ARCHITECTURE.md §7.2).
                        let since = hang.since;
                        let failure = if self.queued_crash_note().await || hang.exiting {
                            Failure::Died { since }
                        } else {
                            Failure::Hung { since }
                        };
                        self.on_failure(failure).await;
                    }
                }
                Event::Fenced(fenced) => {
                    self.fencing = None;
                    self.fence_down(fenced).await;
                }
                Event::Stop => break None,
            }
            self.publish();
        };
        // Dropping the instances kills and reaps them (`Instance`'s `Drop`);
        // a removed device's were fenced already, and dropping the class
        // closes its image (and lets go of its lock) before the removal is
        // answered.
        drop(self);
        if let Some(reply) = removed {
            let _ = reply.send(Ok(()));
        }
    }

    /// A new instance (not the device's first).
    pub(super) fn start_instance(&self) -> Result<Instance, SupervisorError> {
        Instance::start(
            &self.cmd,
            &self.name,
            self.class.as_ref(),
            self.settings.shadow,
            false,
            self.metrics.file(),
        )
    }

    pub(super) fn hang_timeout(&self) -> Duration {
        self.settings.hang_timeout
    }

    /// Updates the shared stats: `update` changes counters, and the state
    /// fields (pid, standby, connected) are refreshed in the same critical
    /// section, so a reader never sees a new count with an old pid.
    pub(super) fn publish_with(&self, update: impl FnOnce(&mut DeviceStats)) {
        let mut s = lock(&self.stats);
        update(&mut s);
        s.connected = self.attached.as_ref().is_some_and(|a| a.lost.is_some());
        s.pid = self.current.as_ref().map(Instance::pid);
        s.given_up = self.given_up.is_some();
    }

    /// Refreshes the state fields of the shared stats.
    pub(super) fn publish(&self) {
        self.publish_with(|_| {});
    }

    /// The attached guest is still connected and has a session to recover.
    pub(super) fn recoverable(&self) -> bool {
        self.attached
            .as_ref()
            .is_some_and(|a| a.lost.is_some() && a.session.is_some())
    }

    pub(super) fn lose(&mut self, why: Lost) {
        if let Some(tx) = self.attached.as_mut().and_then(|a| a.lost.take()) {
            let _ = tx.send(why);
        }
    }

    pub(super) fn unsolicited(&mut self, msg: Message) {
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
        let sample = self
            .current
            .as_ref()
            .and_then(|i| SchedSample::read(i.pid()));
        watchdog.check(Instant::now(), beat, pending, sample)
    }

    /// Takes a message the current instance sent and the loop has not
    /// read yet; `true` (and counted) if it is a crash note.
    async fn queued_crash_note(&mut self) -> bool {
        let Some(i) = self.current.as_ref() else {
            return false;
        };
        let Ok(Ok(msg)) = tokio::time::timeout(Duration::ZERO, i.recv()).await else {
            return false;
        };
        if msg.kind() == kind::DYING {
            self.publish_with(|s| s.crash_notes += 1);
            true
        } else {
            self.unsolicited(msg);
            false
        }
    }

    /// Starts watching the current instance's heartbeat.
    pub(super) fn watch_current(&mut self) {
        let beat = self
            .attached
            .as_ref()
            .and_then(|a| a.session.as_ref())
            .map(|s| s.log().read_heartbeat().unwrap_or(0));
        self.watchdog = beat.map(|beat| Watchdog::new(self.hang_timeout(), Instant::now(), beat));
    }

    /// Asks the pool to replace the spare a takeover took, in the
    /// background (the guest is already served).
    pub(super) fn ensure_standby(&mut self) {
        if let Some(pool) = &self.pool {
            pool.refill();
        }
    }

    /// A spare of the pool, told it is this device's (its `ok` comes
    /// before the answer to the next request, [`Instance::adopt`]); `None`
    /// when the device uses no pool, none is ready, or the one taken could
    /// not be told (it is fenced: a cold start follows).
    pub(super) async fn adopt_spare(&mut self) -> Option<Instance> {
        let mut spare = self.pool.as_ref()?.take()?;
        let adopted = spare
            .adopt(
                &self.name,
                self.class.as_ref(),
                self.settings.shadow,
                self.metrics.file(),
            )
            .await;
        match adopted {
            Ok(()) => Some(spare),
            Err(why) => {
                let pid = spare.pid();
                let fenced = spare.fence().await;
                tracing::warn!(device = %self.name, pid, %why, status = %fenced.status, "spare could not adopt the device");
                self.ensure_standby();
                None
            }
        }
    }
}

impl DeviceTask {
    /// `disk-remove` (docs/PROTOCOL.md §6a): refused while a frontend is
    /// attached unless `force`. Forced, the backend is detached first —
    /// it stops taking requests and answers those it holds — then the
    /// frontend is told the device is gone (a Xen guest gets `error
    /// code=ENODEV`, a VMM's vhost-user connection is closed), and every
    /// instance is fenced (killed, reaped, its I/O waited for). `Ok`: the
    /// task stops.
    async fn remove(&mut self, force: bool) -> Result<(), Refusal> {
        let connected = self.attached.as_ref().is_some_and(|a| a.lost.is_some());
        if connected && !force {
            return Err((
                ErrorCode::Ebusy,
                format!(
                    "a frontend is attached to {}; detach it or remove with force",
                    self.name
                ),
            ));
        }
        tracing::warn!(device = %self.name, connected, "removing the device");
        // Taken first: no takeover for a frontend that is going away.
        let lost = self.attached.as_mut().and_then(|a| a.lost.take());
        if let Some(id) = self.attached.as_ref().map(|a| a.id) {
            self.detach(id).await;
        }
        if let Some(tx) = lost {
            let _ = tx.send(Lost::Removed);
        }
        self.attached = None;
        self.watchdog = None;
        if let Some(instance) = self.current.take() {
            instance.fence().await;
        }
        // No dead instance's late write may reach the image after the
        // removal is answered (docs/ARCHITECTURE.md §7.3).
        self.await_fences().await;
        Ok(())
    }

    /// Sends `msg` (a `resize` or `qos`) to the serving instance and waits
    /// for its answer (a spare of the pool learns the device's settings
    /// when it adopts it, docs/ARCHITECTURE.md §7.5). An instance that dies or hangs
    /// meanwhile is replaced by the main loop, and its replacement is
    /// started with the class's settings, which the caller changed first
    /// (or, for a shrink, changes next).
    async fn reconfigure_instances(&mut self, msg: &Message) {
        let hang_timeout = self.hang_timeout();
        let mut aside = Vec::new();
        let log = self
            .attached
            .as_ref()
            .and_then(|a| a.session.as_ref())
            .map(|s| s.log());
        if let Some(instance) = self.current.as_mut() {
            // A serving instance is also given up on when its heartbeat
            // stalls.
            let liveness = log.filter(|_| instance.serving).map(|l| (l, hang_timeout));
            let result = match instance.send(msg, &[]).await {
                Ok(()) => {
                    instance
                        .reply(BACKEND_REPLY_TIMEOUT, liveness, &mut aside)
                        .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(reply) if reply.kind() == kind::OK => {}
                Ok(reply) => {
                    tracing::warn!(device = %self.name, pid = instance.pid(), %reply, "backend refused a setting");
                }
                Err(e) => {
                    tracing::warn!(device = %self.name, pid = instance.pid(), error = %e, "backend did not take a setting");
                }
            }
        }
        for msg in aside {
            self.unsolicited(msg);
        }
    }

    /// `disk-resize`: a shrink reaches the instances before the image is
    /// cut (no new request past the new end is taken once they answered),
    /// a growth after it is extended; then every frontend is told the new
    /// `sectors` (a Xen guest by `changed`, a VMM by a config-change
    /// message).
    async fn resize(&mut self, bytes: Option<u64>) -> Result<u64, Refusal> {
        // A dead instance's write still in the kernel could land past a
        // new end, or in a region the growth zeroes (docs/ARCHITECTURE.md
        // §7.3).
        self.await_fences().await;
        let sectors = self.class.plan_resize(bytes)?;
        let msg = Message::new(kind::RESIZE).with(key::SECTORS, sectors);
        let old = match self.class.backend_info() {
            ClassInfo::Disk(info) => info.sectors,
            ClassInfo::Net(_) => 0,
        };
        if sectors < old {
            self.reconfigure_instances(&msg).await;
            if let Err(refused) = self.class.apply_resize(sectors) {
                let back = Message::new(kind::RESIZE).with(key::SECTORS, old);
                self.reconfigure_instances(&back).await;
                return Err(refused);
            }
        } else {
            self.class.apply_resize(sectors)?;
            self.reconfigure_instances(&msg).await;
        }
        tracing::info!(device = %self.name, old, sectors, "disk resized");
        self.info.send_replace(self.class.backend_info());
        Ok(sectors)
    }

    /// `disk-set`: the class starts later instances with `qos`; the
    /// running instance and the standby are told now.
    async fn set_qos(&mut self, qos: QosLimits) -> Result<(), Refusal> {
        self.class.set_qos(qos)?;
        tracing::info!(device = %self.name, ?qos, "QoS limits changed");
        self.reconfigure_instances(&qos.to_message()).await;
        Ok(())
    }

    async fn attach(&mut self, mut frontend: Frontend) -> Result<Attachment, Refusal> {
        self.attach_rate.take(Instant::now())?;
        if self.attached.is_some() {
            return Err((
                ErrorCode::Ebusy,
                format!("device {} is already connected", self.name),
            ));
        }
        self.settings
            .limits
            .check_memory(&frontend.guest_memory()?)?;
        if self.given_up.is_some() {
            self.fresh_start()?;
        }
        if self.current.is_none() {
            let (instance, _) = self
                .next_instance()
                .await
                .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
            self.current = Some(instance);
            self.ensure_standby();
        }
        let wire = self
            .class
            .lend_wire()
            .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        frontend.set_wire(wire)?;
        let (session, msg, plain) = if self.settings.shadow {
            let session = Session::new(frontend, self.settings.backend_id)?;
            let msg = session.attach_message(false)?;
            (Some(session), msg, Vec::new())
        } else {
            frontend.set_shadow(false);
            let msg = frontend.attach_message()?;
            (None, msg, frontend.into_fds())
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
                    instance.membarrier =
                        reply.get_flag(key::MEMBARRIER).ok().flatten() == Some(true);
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
            // A backend holding requests back answers them only after
            // `fenced`, and drains before `detached`: every fence first,
            // also the one a takeover inside this loop left running.
            self.await_fences().await;
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
                    a.lost.is_some()
                        && a.session
                            .as_ref()
                            .is_some_and(Session::resumes_after_detach)
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
            session.set_call(queue, &fd)?;
        }
        let Some(instance) = self.current.as_mut().filter(|i| i.serving) else {
            // A takeover is due; it sends the new fd.
            return Ok(());
        };
        let liveness = attached.session.as_ref().map(|s| (s.log(), hang_timeout));
        let msg = Message::new(kind::SET_CALL).with(key::QUEUE, queue);
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
        if let Some(given_up) = &self.given_up {
            return Err((ErrorCode::Enodev, given_up.why.clone()));
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
            // A second kill before the first one's death has been seen
            // would hit the same dying process: one crash for two kills.
            Fault::Kill if self.injected_kill.is_some() => Err((
                ErrorCode::Ebusy,
                "the backend was killed already and is being replaced".into(),
            )),
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
                    .send(&Message::new(kind::SPIN), &[])
                    .await
                    .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
                self.injected_hang = true;
                Ok(())
            }
            // Not marked injected: the SIGSYS is a crash like any other,
            // which is what this fault shows.
            Fault::Syscall => instance
                .send(&Message::new(kind::SYSCALL), &[])
                .await
                .map_err(|e| (ErrorCode::Enodev, e.to_string())),
            Fault::Poison { sector } => {
                if !self.poisons.contains(&sector) {
                    if self.poisons.len() >= MAX_POISONED_SECTORS {
                        return Err((
                            ErrorCode::E2big,
                            format!("{MAX_POISONED_SECTORS} sectors are poisoned already"),
                        ));
                    }
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
