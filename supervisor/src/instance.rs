//! One backend process as the supervisor holds it: a pidfd that becomes
//! readable when it exits (and through which it is signalled and reaped),
//! and its control channel. Dropping an instance kills and reaps it.
//!
//! Signals go through the pidfd, never a pid number, so a signal can never
//! reach a process that reused the pid of a reaped backend. Nothing holds
//! a `Child`: an instance is its pid, pidfd and control socket, which is
//! what lets a new supervisor binary adopt it after a live upgrade
//! ([`Instance::inherit`], docs/ARCHITECTURE.md §4.2).

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{
    pidfd_open, pidfd_send_signal, waitid, Pid, PidfdFlags, Signal, WaitId, WaitIdOptions,
    WaitIdStatus,
};
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::protocol::{key, kind};
use shadowback_xenbus::{AsyncSeqPacket, Message};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::class::DeviceClass;
use crate::spawn::{spawn_backend, spawn_spare, BackendCommand, IoFence};
use crate::watchdog::{SchedSample, Watchdog, CHECK_PERIOD};
use crate::SupervisorError;

/// Why an instance gave no answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAnswer {
    /// It exited or closed its control channel.
    Died(String),
    /// It did not answer in time, or its heartbeat stalled while we waited.
    Hung(String),
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Died(why) => write!(f, "backend died: {why}"),
            NoAnswer::Hung(why) => write!(f, "backend hung: {why}"),
        }
    }
}

/// When a fenced instance was killed and reaped.
#[derive(Debug)]
pub struct Fenced {
    /// SIGKILL sent (a no-op for an instance that had already exited).
    pub kill_sent: Instant,
    /// `wait` returned: the process is gone, it can issue no more I/O.
    pub reaped: Instant,
    /// Every I/O it had submitted has completed.
    pub io_done: Instant,
    /// Its exit status, for logs.
    pub status: String,
}

/// A running backend process.
#[derive(Debug)]
pub struct Instance {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    control: AsyncSeqPacket,
    started: Instant,
    /// How many of the device's poisoned sectors this instance was told
    /// (a prefix of the device's list).
    pub poisons_sent: usize,
    /// It serves the current attachment (answered `attach` with
    /// `attached`, not yet detached).
    pub serving: bool,
    /// It registered for `MEMBARRIER_CMD_GLOBAL_EXPEDITED` (its
    /// `attached` said so): [`Instance::stop`] can prove a SIGKILL final
    /// at once.
    pub membarrier: bool,
    /// It was attached with `fence=1` and has not been sent `fenced`.
    pub held: bool,
    /// What [`Instance::fence`] waits for after the reap, as the device
    /// class set it up; `None` when nothing the instance did can land
    /// later (a read-only disk).
    io_fence: Option<IoFence>,
    /// A spare was sent `adopt` and its `ok` is still to be read.
    adopting: AtomicBool,
    /// The spare's `adopt-us`.
    adopt_us: AtomicU64,
    /// `waitid` collected its exit status: nothing left to kill or reap.
    reaped: bool,
}

impl Instance {
    /// Execs a backend instance of device `name`, set up by its `class`;
    /// `shadow` is the device's shadow layer. `first` marks the device's
    /// first instance (see [`BackendCommand::env`]).
    pub fn start(
        cmd: &BackendCommand,
        name: &str,
        class: &dyn DeviceClass,
        shadow: bool,
        first: bool,
        metrics: &File,
    ) -> Result<Self, SupervisorError> {
        let setup = class.prepare_instance()?;
        let (pid, control) = spawn_backend(
            cmd,
            name,
            &setup.args,
            setup.device_file,
            Some(metrics),
            shadow,
            first,
        )?;
        tracing::debug!(device = %name, pid, first, "backend started");
        Self::started(pid, control, setup.io_fence)
    }

    /// Execs a spare of the standby pool (docs/ARCHITECTURE.md §7.5): a
    /// backend of `cmd`'s class with no device until [`adopt`](Self::adopt).
    pub fn start_spare(cmd: &BackendCommand) -> Result<Self, SupervisorError> {
        let (pid, control) = spawn_spare(cmd)?;
        Self::started(pid, control, None)
    }

    /// Hands this spare device `name`: the instance's own file of the
    /// device and its I/O fence, as `class` sets them up for any new
    /// instance, and the device's `metrics` page, with `adopt`
    /// (docs/PROTOCOL.md §6). The supervisor keeps no reference to the
    /// file once it is sent (`spawn` module docs (3)). From then on the
    /// instance is what [`Instance::start`] would have started: the next
    /// request (`poison`, `attach`) may follow at once, without a round
    /// trip — the spare reads it only once it has set up and tightened its
    /// filter — and [`reply`](Self::reply) takes the `ok` of `adopt` off
    /// the channel before that request's answer (a refusal is that
    /// request's failure).
    pub async fn adopt(
        &mut self,
        name: &str,
        class: &dyn DeviceClass,
        shadow: bool,
        metrics: &File,
    ) -> Result<(), String> {
        let setup = class.prepare_instance().map_err(|e| e.to_string())?;
        let msg = adopt_message(name, &setup.args, shadow)?;
        // Set before the file leaves: whatever the spare does with it from
        // now on, fencing the instance waits for it.
        self.io_fence = setup.io_fence;
        let mut fds = vec![metrics.as_fd()];
        fds.extend(setup.device_file.as_ref().map(AsFd::as_fd));
        self.send(&msg, &fds).await.map_err(|e| e.to_string())?;
        drop(fds);
        drop(setup.device_file);
        self.adopting.store(true, Ordering::Relaxed);
        tracing::debug!(device = %name, pid = self.pid, "spare told its device");
        Ok(())
    }

    /// How long the spare took, by its own clock, from receiving `adopt`
    /// to being set up for its device (its `adopt-us`); 0 for an instance
    /// started for the device.
    pub fn adopt_us(&self) -> u64 {
        self.adopt_us.load(Ordering::Relaxed)
    }

    /// The instance around a started child `pid` and its `control` channel.
    fn started(
        pid: u32,
        control: shadowback_xenbus::SeqPacket,
        io_fence: Option<IoFence>,
    ) -> Result<Self, SupervisorError> {
        let spawn_err = |e: &dyn std::fmt::Display| SupervisorError::Spawn(e.to_string());
        // The child is not reaped before we `waitid` for it, so its pid
        // cannot have been reused yet.
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| spawn_err(&format!("pid {pid}")))?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| spawn_err(&e))?;
        Self::inherit(pid, pidfd, control.into_fd(), io_fence, 0, false)
    }

    /// An instance from its pid, pidfd and control socket: one just
    /// spawned, or one another supervisor process (the binary this one
    /// replaced by `execve`, docs/ARCHITECTURE.md §4.2) started, which is
    /// still this process's child.
    pub fn inherit(
        pid: u32,
        pidfd: OwnedFd,
        control: OwnedFd,
        io_fence: Option<IoFence>,
        poisons_sent: usize,
        serving: bool,
    ) -> Result<Self, SupervisorError> {
        let spawn_err = |e: &dyn std::fmt::Display| SupervisorError::Spawn(e.to_string());
        // SAFETY: `pidfd` is an `OwnedFd`: it owns an open descriptor that
        // nothing else can close, and the `AsyncFd` takes it over, so the
        // descriptor stays open for as long as it is registered.
        // The pidfd is watched by the runtime's reactor.
        #[allow(unsafe_code)]
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| spawn_err(&e))?;
        let control = AsyncSeqPacket::from_fd(control).map_err(|e| spawn_err(&e))?;
        Ok(Instance {
            pid,
            pidfd,
            control,
            started: Instant::now(),
            poisons_sent,
            serving,
            membarrier: false,
            held: false,
            io_fence,
            adopting: AtomicBool::new(false),
            adopt_us: AtomicU64::new(0),
            reaped: false,
        })
    }

    /// Its pidfd and control socket, for a live upgrade.
    pub fn handover_fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.pidfd.get_ref().as_fd(), self.control.as_fd())
    }

    /// Its I/O fence, if its class gave it one.
    pub fn io_fence(&self) -> Option<&IoFence> {
        self.io_fence.as_ref()
    }

    /// Its process id (for status and logs only).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long it has been running.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sends `sig` through the pidfd.
    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        pidfd_send_signal(self.pidfd.get_ref(), sig).map_err(std::io::Error::from)
    }

    /// Resolves once the process has exited (its pidfd is readable). The
    /// readiness is never cleared, so it stays resolved.
    pub async fn exited(&self) {
        // An error here would be a reactor failure; treating it as an
        // exit fences the instance rather than silently losing track.
        let _ = self.pidfd.readable().await;
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.get_ref(), PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
    }

    /// The next message from the backend (cancel-safe).
    pub async fn recv(&self) -> Result<Message, String> {
        loop {
            let (msg, _fds) = self.control.recv().await.map_err(|e| e.to_string())?;
            if !self.took_adopt_answer(&msg).map_err(|e| e.to_string())? {
                return Ok(msg);
            }
        }
    }

    /// Whether `msg` is the pending answer to `adopt` (then taken: its
    /// `adopt-us` kept); an error if the spare refused.
    fn took_adopt_answer(&self, msg: &Message) -> Result<bool, NoAnswer> {
        if !self.adopting.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        if msg.kind() != kind::OK {
            return Err(NoAnswer::Died(format!("spare refused adopt: {msg}")));
        }
        let us = msg.get_u64(key::ADOPT_US).ok().flatten().unwrap_or(0);
        self.adopt_us.store(us, Ordering::Relaxed);
        Ok(true)
    }

    /// Sends one control message.
    pub async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), NoAnswer> {
        self.control
            .send(msg, fds)
            .await
            .map_err(|e| NoAnswer::Died(format!("control channel: {e}")))
    }

    /// Waits for the answer to a request. Unsolicited `disconnect`s that
    /// arrive first are put `aside` for the caller. Gives up when the
    /// process exits, after `timeout`, or — given a shadow log and a hang
    /// timeout — when the heartbeat stalls that long (a backend waiting on
    /// its control socket beats, so a control request is pending work).
    pub async fn reply(
        &self,
        timeout: Duration,
        liveness: Option<(&ShadowLog, Duration)>,
        aside: &mut Vec<Message>,
    ) -> Result<Message, NoAnswer> {
        let deadline = tokio::time::Instant::now() + timeout;
        let beat = |log: &ShadowLog| log.read_heartbeat().unwrap_or(0);
        let mut watchdog =
            liveness.map(|(log, hang)| (log, Watchdog::new(hang, Instant::now(), beat(log))));
        let mut tick = tokio::time::interval(CHECK_PERIOD);
        loop {
            tokio::select! {
                // A reply sent just before the process exited is still
                // queued on the socket: read it before believing the exit.
                biased;
                msg = self.control.recv() => match msg {
                    Ok((msg, _fds)) if msg.kind() == kind::DISCONNECT => aside.push(msg),
                    Ok((msg, _fds)) if msg.kind() == kind::DYING => {
                        return Err(NoAnswer::Died("dying (crash note)".into()))
                    }
                    Ok((msg, _fds)) => if !self.took_adopt_answer(&msg)? {
                        return Ok(msg);
                    },
                    Err(e) => return Err(NoAnswer::Died(format!("control channel: {e}"))),
                },
                () = self.exited() => return Err(NoAnswer::Died("exited".into())),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(NoAnswer::Hung(format!("no answer in {timeout:?}")))
                }
                _ = tick.tick(), if watchdog.is_some() => {
                    if let Some((log, w)) = watchdog.as_mut() {
                        let sample = SchedSample::read(self.pid);
                        if w.check(Instant::now(), beat(log), Some(true), sample).is_some() {
                            return Err(NoAnswer::Hung("heartbeat stalled".into()));
                        }
                    }
                }
            }
        }
    }

    /// Kills the instance and proves at once that it runs no more
    /// instructions of its own (docs/ARCHITECTURE.md §7.2): SIGKILL, then
    /// `MEMBARRIER_CMD_GLOBAL_EXPEDITED`, which interrupts every CPU
    /// running a registered process and returns once each has taken the
    /// interrupt — on its way back to user mode the instance meets the
    /// pending SIGKILL. Its stores before that are visible to us and to
    /// the next instance. `false` when that cannot be proven (the instance
    /// did not register, the kernel has no such barrier): then only its
    /// exit says so. Its I/O may still be in the kernel: [`Instance::fence`]
    /// waits for that.
    pub fn stop(&self) -> bool {
        if self.has_exited() {
            return true;
        }
        if !self.membarrier {
            return false;
        }
        if let Err(e) = self.signal(Signal::KILL) {
            tracing::debug!(pid = self.pid, error = %e, "SIGKILL (already exited?)");
        }
        match rustix::thread::membarrier(rustix::thread::MembarrierCommand::GlobalExpedited) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "membarrier failed: waiting for the exit");
                false
            }
        }
    }

    /// Fences the instance (docs/ARCHITECTURE.md §7.3): SIGKILL, wait for
    /// the pidfd, reap, then — if its class gave it an I/O fence (a
    /// writable disk) — wait until every I/O it submitted has completed
    /// (its fence lock, `spawn` module docs (3)). When this returns nothing
    /// the instance did can still reach the device.
    pub async fn fence(mut self) -> Fenced {
        let kill_sent = Instant::now();
        if let Err(e) = self.signal(Signal::KILL) {
            tracing::debug!(pid = self.pid, error = %e, "SIGKILL (already exited?)");
        }
        self.exited().await;
        let status = match waitid(
            WaitId::PidFd(self.pidfd.get_ref().as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(s)) => describe_exit(&s),
            Ok(None) => "exited (no status)".to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        self.reaped = true;
        let reaped = Instant::now();
        if let Some(io_fence) = self.io_fence.take() {
            let pid = self.pid;
            match tokio::task::spawn_blocking(move || io_fence.wait()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(pid, error = %e, "could not wait for the dead backend's I/O")
                }
                Err(e) => tracing::error!(pid, error = %e, "I/O fence task failed"),
            }
        }
        Fenced {
            kill_sent,
            reaped,
            io_done: Instant::now(),
            status,
        }
    }
}

/// `adopt` for device `name` (docs/PROTOCOL.md §6): `device`, each of the
/// class's `args` as a key (`--sectors 2048` as `sectors=2048`, a bare
/// `--readonly` as `readonly=`), and `no-shadow=` without the shadow
/// layer — what [`spawn_backend`] puts on a backend's command line.
fn adopt_message(name: &str, args: &[OsString], shadow: bool) -> Result<Message, String> {
    let mut msg = Message::new(kind::ADOPT).with(key::DEVICE, name);
    let mut args = args.iter().map(|a| a.to_str()).peekable();
    while let Some(arg) = args.next() {
        let flag = arg
            .and_then(|a| a.strip_prefix("--"))
            .ok_or_else(|| format!("backend argument {arg:?} is not a --flag"))?;
        let value = match args.peek() {
            Some(Some(v)) if !v.starts_with("--") => args.next().flatten().unwrap_or_default(),
            _ => "",
        };
        msg.set(flag, value);
    }
    if !shadow {
        msg.set(NO_SHADOW_KEY, "");
    }
    Ok(msg)
}

/// `--no-shadow` as a key of `adopt`.
const NO_SHADOW_KEY: &str = "no-shadow";

impl Drop for Instance {
    /// An instance nobody fenced (the device stopped): kill it and reap it
    /// off the caller's thread, so no zombie is left behind.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.signal(Signal::KILL);
        let Ok(pidfd) = self.pidfd.get_ref().try_clone() else {
            return;
        };
        let reap = move || {
            let _ = waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
        };
        if std::thread::Builder::new()
            .name("reap".into())
            .spawn(reap)
            .is_err()
        {
            tracing::debug!(pid = self.pid, "cannot reap a dropped backend");
        }
    }
}

/// An exit status for logs: "killed by SIGSYS" (a seccomp violation),
/// "killed by SIGKILL", or "exit status: N".
pub(crate) fn describe_exit(status: &WaitIdStatus) -> String {
    match (status.terminating_signal(), status.exit_status()) {
        (Some(n), _) => match nix::sys::signal::Signal::try_from(n) {
            Ok(sig) => format!("killed by {}", sig.as_str()),
            Err(_) => format!("killed by signal {n}"),
        },
        (None, Some(code)) => format!("exit status: {code}"),
        (None, None) => "exited".to_string(),
    }
}
