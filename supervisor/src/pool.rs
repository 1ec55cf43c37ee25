//! The standby pool (docs/ARCHITECTURE.md §7.5): warm spares of one
//! device class, shared by every device of that class that may use one.
//!
//! A spare is a started, confined backend (`--spare`) waiting on its
//! control socket with no device. A takeover takes one
//! ([`StandbyPool::take`]) and hands it the device with `adopt`
//! ([`Instance::adopt`]); the pool starts the next one in the background
//! once the device task asks ([`StandbyPool::refill`], after the guest is
//! served again: never while a takeover may still be looking for one), and
//! a spare that died is fenced and replaced at the next tick. Spares are started from the supervisor's runtime thread like
//! every backend (`spawn` module docs: the death signal).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::class::{BlockClass, NetClass};
use crate::config::Config;
use crate::device::{inherit_instance, instance_state};
use crate::instance::Instance;
use crate::spawn::BackendCommand;
use crate::upgrade::{Adopted, Handover, PoolState};
use crate::SupervisorError;

/// How often the pool looks for dead spares and replaces them; also the
/// pause after a spare could not be started.
const TICK: Duration = Duration::from_secs(1);

/// Largest pool a class may have (`[standby]`).
pub const MAX_POOL: usize = 64;

/// The spares of one class, shared by its devices and the refill task.
#[derive(Clone, Debug)]
pub struct StandbyPool {
    inner: Arc<Mutex<Spares>>,
    wake: Arc<Notify>,
}

#[derive(Debug)]
struct Spares {
    /// `blkback` or `netback`, for logs.
    class: &'static str,
    cmd: BackendCommand,
    size: usize,
    ready: Vec<Instance>,
    /// Spares found dead by [`StandbyPool::take`], for the task to fence.
    dead: Vec<Instance>,
}

impl StandbyPool {
    /// A pool of `size` spares of `cmd` (a class's backend command), empty
    /// until [`start`](Self::start).
    pub fn new(class: &'static str, cmd: BackendCommand, size: usize) -> Self {
        StandbyPool {
            inner: Arc::new(Mutex::new(Spares {
                class,
                cmd,
                size,
                ready: Vec::with_capacity(size),
                dead: Vec::new(),
            })),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The block and net classes' pools (docs/ARCHITECTURE.md §7.5: one
    /// per class) of the sizes `cfg` asks for, spares run by `backend`.
    pub fn per_class(cfg: &Config, backend: &BackendCommand) -> (Self, Self) {
        let net = backend.with_subcommand(BlockClass::SUBCOMMAND, NetClass::SUBCOMMAND);
        (
            StandbyPool::new("blkback", backend.clone(), cfg.block_pool()),
            StandbyPool::new("netback", net, cfg.net_pool()),
        )
    }

    /// Starts the spares and the refill task. Called once every device
    /// has its image and its first backend: no process of this supervisor
    /// starts before the images' locks are its own (`spawn` module docs),
    /// and serving instances come first. Must run on the supervisor's
    /// runtime thread.
    pub fn start(&self) {
        let short = !self.fill();
        tokio::spawn(self.clone().refill_task(short));
    }

    fn lock(&self) -> MutexGuard<'_, Spares> {
        // A list of processes: a panic elsewhere cannot leave it torn.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A live spare, if one is ready. Does not start the next one: the
    /// caller asks with [`refill`](Self::refill) once the guest is served,
    /// so the fork is not on the takeover's path.
    pub fn take(&self) -> Option<Instance> {
        let mut spares = self.lock();
        while let Some(spare) = spares.ready.pop() {
            if !spare.has_exited() {
                tracing::debug!(class = spares.class, pid = spare.pid(), "spare taken");
                return Some(spare);
            }
            spares.dead.push(spare);
        }
        None
    }

    /// Asks the pool to start what it lacks, in the background.
    pub fn refill(&self) {
        self.wake.notify_one();
    }

    /// Makes the pool at least `size` spares (a disk added at run time
    /// that may use one, when the pool had none) and fills it in the
    /// background.
    pub fn grow_to(&self, size: usize) {
        let mut spares = self.lock();
        if size > spares.size {
            spares.size = size.min(MAX_POOL);
            drop(spares);
            self.refill();
        }
    }

    /// Spares ready now.
    pub fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// The configured number of spares.
    pub fn size(&self) -> usize {
        self.lock().size
    }

    /// The process id of the spare [`take`](Self::take) would give now.
    pub fn next_pid(&self) -> Option<u32> {
        self.lock().ready.last().map(Instance::pid)
    }

    /// The pool as the binary that takes over in a live upgrade needs it
    /// (docs/ARCHITECTURE.md §4.2): its size and every spare, dead ones
    /// included (the new binary fences them: they are its children).
    /// Called with nothing awaited until the `execve`, so the refill task
    /// cannot start a spare the state does not list.
    pub(crate) fn handover(&self, fds: &mut Handover) -> PoolState {
        let spares = self.lock();
        PoolState {
            size: spares.size,
            spares: spares
                .ready
                .iter()
                .chain(&spares.dead)
                .map(|i| instance_state(i, fds))
                .collect(),
        }
    }

    /// Takes over the spares a previous binary described in `state`; the
    /// pool is then [`start`](Self::start)ed like a new one.
    pub(crate) fn inherit(&self, state: &PoolState, fds: &Adopted) -> Result<(), SupervisorError> {
        let mut spares = self.lock();
        spares.size = state.size.min(MAX_POOL);
        for s in &state.spares {
            spares.ready.push(inherit_instance(s, fds)?);
        }
        Ok(())
    }

    /// Starts spares until the pool is full (`true`) or one cannot be
    /// started (`false`).
    fn fill(&self) -> bool {
        let mut spares = self.lock();
        while spares.ready.len() < spares.size {
            match Instance::start_spare(&spares.cmd) {
                Ok(spare) => {
                    tracing::debug!(class = spares.class, pid = spare.pid(), "spare started");
                    spares.ready.push(spare);
                }
                Err(e) => {
                    tracing::warn!(class = spares.class, error = %e, "cannot start a spare");
                    return false;
                }
            }
        }
        true
    }

    /// Sets aside the spares that have exited, for fencing.
    fn sweep(&self) -> Vec<Instance> {
        let mut spares = self.lock();
        let (dead, live): (Vec<_>, Vec<_>) = std::mem::take(&mut spares.ready)
            .into_iter()
            .partition(Instance::has_exited);
        spares.ready = live;
        let mut all = std::mem::take(&mut spares.dead);
        all.extend(dead);
        all
    }

    /// Runs for the supervisor's life: fences the dead spares at each
    /// [`TICK`], and fills the pool up when asked or when one died (or
    /// when the last fill could not finish).
    async fn refill_task(self, mut short: bool) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let asked = tokio::select! {
                () = self.wake.notified() => true,
                _ = tick.tick() => false,
            };
            let dead = self.sweep();
            let refill = asked || short || !dead.is_empty();
            for spare in dead {
                let pid = spare.pid();
                let fenced = spare.fence().await;
                tracing::warn!(pid, status = %fenced.status, "spare backend exited");
            }
            if refill {
                short = !self.fill();
            }
        }
    }
}
