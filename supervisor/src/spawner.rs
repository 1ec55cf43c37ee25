//! The spawner: the one thread that forks every backend, so the runtime's
//! thread never waits for a fork and an exec (docs/ARCHITECTURE.md §4).
//!
//! `Command::spawn` returns only once the child has exec'd (or failed to):
//! on a loaded host that is the time until the child gets a CPU, up to
//! 0.1–0.4 s at load 30, and on the runtime's thread every other device's
//! events waited that long. A [`Spawner`] hands the fork to another thread
//! and the runtime awaits its result like any other event.
//!
//! That thread must live as long as the supervisor: `PR_SET_PDEATHSIG`
//! follows the thread that forked a backend, not the process (`spawn`
//! module docs). So it is not a pool thread but one made for the purpose:
//!
//! - `shadowback up` ([`SpawnerLoop::run`]) runs it on the process's *main*
//!   thread and the runtime on a thread of its own. A live upgrade's
//!   `execve` ([`Spawner::exec`]) runs on that same main thread: `execve`
//!   ends every other thread of the process (which would send the death
//!   signal to whatever they forked) but not the calling one, and a
//!   process's main thread keeps being it across the exec. So every
//!   backend, whichever binary forked it, is a child of the one thread
//!   that lives until the process dies, and the new binary's spawner is
//!   that thread again.
//! - [`SupervisorThread`](crate::SupervisorThread) (demo, benches, tests)
//!   starts one with [`Spawner::start`]; it ends when the supervisor
//!   thread lets go of it, after its backends were killed.
//!
//! The runtime's thread finds its spawner through [`Spawner::enter`]
//! (the runtime is current-thread: every device task runs there). With
//! none entered — a unit test — the fork runs inline, as it did before.
//! Jobs run one at a time, in the order sent; an exec queued behind a
//! fork runs after it.

use std::cell::RefCell;
use std::sync::mpsc;

use crate::SupervisorError;

type Job = Box<dyn FnOnce() + Send>;

/// Sends fork (and exec) jobs to the spawner thread.
#[derive(Clone, Debug)]
pub struct Spawner {
    jobs: mpsc::Sender<Job>,
}

/// The receiving end: what the spawner thread runs.
#[derive(Debug)]
pub struct SpawnerLoop {
    jobs: mpsc::Receiver<Job>,
}

thread_local! {
    /// The spawner of the supervisor whose runtime runs on this thread.
    static CURRENT: RefCell<Option<Spawner>> = const { RefCell::new(None) };
}

/// While it lives, [`Spawner::run`] on this thread goes to its spawner.
#[derive(Debug)]
pub struct Entered {
    previous: Option<Spawner>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

impl SpawnerLoop {
    /// Runs jobs on the calling thread until every [`Spawner`] is gone.
    pub fn run(self) {
        while let Ok(job) = self.jobs.recv() {
            job();
        }
    }
}

impl Spawner {
    /// A spawner and the loop another thread must [`run`](SpawnerLoop::run).
    pub fn new() -> (Spawner, SpawnerLoop) {
        let (jobs, rx) = mpsc::channel();
        (Spawner { jobs }, SpawnerLoop { jobs: rx })
    }

    /// A spawner on a thread of its own, which ends once every handle is
    /// dropped.
    pub fn start() -> Result<Spawner, SupervisorError> {
        let (spawner, jobs) = Spawner::new();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || jobs.run())
            .map_err(|e| SupervisorError::Runtime(format!("spawner thread: {e}")))?;
        Ok(spawner)
    }

    /// Makes this the spawner of the calling thread's supervisor until the
    /// guard is dropped.
    pub fn enter(&self) -> Entered {
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        Entered { previous }
    }

    fn current() -> Option<Spawner> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Runs `job` (a fork) on the current spawner thread and awaits its
    /// result; inline when no spawner was entered.
    pub(crate) async fn run<T: Send + 'static>(
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SupervisorError> {
        let Some(spawner) = Self::current() else {
            return Ok(job());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || SupervisorError::Spawn("the spawner thread is gone".into());
        spawner
            .jobs
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Runs `exec` (an `execve` of this process, which returns only on
    /// failure) on the current spawner thread, blocking the caller until it
    /// failed; inline when no spawner was entered. Nothing else runs on the
    /// runtime's thread meanwhile, so no fork is asked for after it.
    pub(crate) fn exec(exec: impl FnOnce() -> std::io::Error + Send + 'static) -> std::io::Error {
        let Some(spawner) = Self::current() else {
            return exec();
        };
        let (tx, rx) = mpsc::channel();
        let sent = spawner.jobs.send(Box::new(move || {
            let _ = tx.send(exec());
        }));
        if sent.is_err() {
            return std::io::Error::other("the spawner thread is gone");
        }
        rx.recv()
            .unwrap_or_else(|_| std::io::Error::other("the spawner thread is gone"))
    }
}
