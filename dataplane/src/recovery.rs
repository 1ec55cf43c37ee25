//! Recovery pieces every device class shares (docs/ARCHITECTURE.md §7):
//! opening a shadow log with its crash hook, the counters reported in
//! `attached`, freeing what the guest has seen, and the crash-loop
//! breaker's serial replay.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use shadowback_shadow::{
    CorruptAction, CrashPoint, EntryId, InflightEntry, RecoveryPlan, Repush, ShadowError,
    ShadowLog, REQUEST_SIZE,
};
use shadowback_virtio::inflight::RegionCrashPoint;

/// Instances a request may be in flight in before it is failed instead of
/// replayed again (the crash-loop breaker, docs/ARCHITECTURE.md §7.5): the
/// one that consumed it and two that replayed it.
pub const POISON_THRESHOLD: u32 = 3;
/// Fault injection: abort (or stop) at a crash point on its `nth`
/// occurrence, in the first instance of a device only (the one that finds
/// its shadow logs fresh), so the next instance can recover.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashSpec {
    /// A store of the shadow log (`SHADOWBACK_CRASH_AT=consume.3@100`).
    pub log: Option<(CrashPoint, u64)>,
    /// A store of the VMM's in-flight region (`region-finish.3@2`).
    pub region: Option<(RegionCrashPoint, u64)>,
    /// What the point does when it fires.
    pub action: CrashAction,
}

/// What a crash point of a [`CrashSpec`] does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CrashAction {
    /// `abort()`: the instance crashes there.
    #[default]
    Abort,
    /// `SIGSTOP` to itself (`SHADOWBACK_CRASH_AT=stop:region-begin.2@300`):
    /// the instance freezes there with everything it consumed still in
    /// flight, until someone else kills (or continues) it — a kill at a
    /// known instant, e.g. its supervisor's death with requests certainly
    /// in flight (`tests/supervisor_restart.rs`).
    Stop,
}

impl CrashAction {
    /// Fires at crash point `at`. `Abort` does not return.
    pub fn fire(self, at: &dyn std::fmt::Display) {
        match self {
            CrashAction::Abort => {
                tracing::error!(%at, "crash point reached: aborting (fault injection)");
                std::process::abort();
            }
            CrashAction::Stop => {
                tracing::warn!(%at, "crash point reached: stopping (fault injection)");
                // `raise` is `tgkill` on this process, which the seccomp
                // filter allows (`confine.rs`).
                // SAFETY: raise has no memory-safety preconditions.
                #[allow(unsafe_code)]
                let rc = unsafe { libc::raise(libc::SIGSTOP) };
                if rc != 0 {
                    tracing::error!(%at, "raise(SIGSTOP) failed: aborting instead");
                    std::process::abort();
                }
            }
        }
    }
}

/// Counters of one backend instance./// What the last recovery did (reported to the supervisor in `attached`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    /// Log generation of this instance.
    pub generation: u64,
    /// Requests re-executed.
    pub replayed: u64,
    /// Saved responses published again.
    pub repushed: u64,
    /// Requests failed by the crash-loop breaker.
    pub poisoned: u64,
    /// Corrupt log entries answered with an error.
    pub corrupt: u64,
    /// From opening the log to the recovered requests being submitted.
    pub replay_us: u64,
}

impl RecoveryStats {
    /// Counts a request recovery answered with an error without running
    /// it: `poisoned` by the crash-loop breaker, or found corrupt in the
    /// log.
    pub fn count_failure(&mut self, device: &str, poisoned: bool, request: &dyn std::fmt::Display) {
        if poisoned {
            self.poisoned += 1;
            tracing::error!(device, %request,
                "request failed every instance it ran in: answered with an error (crash-loop breaker)");
        } else {
            self.corrupt += 1;
        }
    }
}

/// Frees the log entries of a plan the guest needs nothing more for: those
/// whose responses it has seen, and corrupt ones it is not waiting for
/// (docs/ARCHITECTURE.md §7.5).
pub fn free_seen(log: &ShadowLog, plan: &RecoveryPlan) -> Result<(), String> {
    let discarded = plan
        .corrupt
        .iter()
        .filter(|c| c.action == CorruptAction::Discard)
        .map(|c| &c.entry);
    for &entry in plan.free.iter().chain(discarded) {
        log.free(entry).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether a replay runs one request at a time: instances started since
/// one last published a response above 1 means the previous instance died
/// before publishing anything, a crash loop is suspected, and only the
/// request running when an instance dies should be charged a replay
/// (docs/ARCHITECTURE.md §7.5). Not when the previous instance was killed
/// from outside (`blame=0`).
pub fn serial_replay(
    log: &ShadowLog,
    blame: bool,
    device: &str,
    requests: usize,
) -> Result<bool, String> {
    let serial = blame && log.stalled_instances().map_err(|e| e.to_string())? > 1;
    if serial {
        tracing::warn!(
            device,
            requests,
            "crash loop suspected: replaying one request at a time"
        );
    }
    Ok(serial)
}

/// Requests still to re-execute one at a time, in sequence order, after
/// a suspected crash loop ([`serial_replay`]): only the request running
/// when an instance dies is then charged a replay, so requests in flight
/// beside a poison request are not failed with it. New requests wait until
/// it is empty. `T` says where a request is (a saved blkif request, a
/// virtqueue head).
#[derive(Debug)]
pub struct SerialReplay<T>(VecDeque<(EntryId, T)>);

impl<T> Default for SerialReplay<T> {
    fn default() -> Self {
        SerialReplay(VecDeque::new())
    }
}

impl<T> SerialReplay<T> {
    pub fn new(requests: impl IntoIterator<Item = (EntryId, T)>) -> Self {
        SerialReplay(requests.into_iter().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The requests still queued, in order.
    pub fn requests(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, request)| request)
    }

    /// The next request to start, once nothing is in flight on its ring;
    /// charged a replay in `log` before it runs.
    pub fn next(
        &mut self,
        in_flight: usize,
        log: Option<&ShadowLog>,
        device: &str,
    ) -> Option<(EntryId, T)> {
        if in_flight > 0 {
            return None;
        }
        let (entry, request) = self.0.pop_front()?;
        if let Some(log) = log {
            if let Err(e) = log.mark_replayed(&[entry]) {
                log_failed(device, e);
            }
        }
        Some((entry, request))
    }
}

/// Maps a shadow log and makes this instance its writer; returns the new
/// generation (1 for a log no instance used before). With
/// `SHADOWBACK_CRASH_AT`, the first instance aborts (or stops) at that
/// crash point.
pub fn open_shadow_log(crash_at: &CrashSpec, fd: OwnedFd) -> Result<(ShadowLog, u64), ShadowError> {
    let mut log = ShadowLog::open(fd)?;
    if let Some((point, nth)) = crash_at.log {
        // Only the first instance crashes, so a restart can recover.
        if log.generation()? == 0 {
            let hits = std::sync::atomic::AtomicU64::new(0);
            let action = crash_at.action;
            log.set_crash_hook(Some(Box::new(move |at| {
                if at == point && hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == nth
                {
                    action.fire(&at);
                }
            })));
        }
    }
    let generation = log.begin_instance()?;
    Ok((log, generation))
}

/// The shadow log refused a transition: that is a bug or a corrupt log,
/// and serving on without logging would break the recovery guarantee.
/// Exit and let the supervisor replace this instance.
pub fn log_failed(device: &str, err: impl std::fmt::Display) -> ! {
    tracing::error!(device, error = %err, "shadow log failed: exiting for a restart");
    std::process::abort();
}

/// What one ring does with the entries of its recovery plan; the applier
/// ([`apply_plan`]) is the same for every transport and device class.
pub trait ReplayTarget {
    /// Where a logged request is: the saved request itself (Xen rings: the
    /// grants stay the frontend's until answered) or a virtqueue head (the
    /// chain stays the device's until its used entry is visible).
    type Request;

    /// Device name, for logs.
    fn device(&self) -> &str;
    /// The ring's shadow log.
    fn log(&self) -> Option<&ShadowLog>;
    /// Writes a saved response again at its planned index, unpublished,
    /// and logs it re-pushed.
    fn repush(&mut self, repush: &Repush) -> Result<(), String>;
    /// The request a logged record names; `None` when the record names
    /// nothing usable.
    fn locate(&self, record: &[u8; REQUEST_SIZE]) -> Option<Self::Request>;
    /// Marks the place of `request` taken by a live request; `false` when
    /// it already was (a corrupt entry naming it is then not answered: the
    /// guest gets exactly one response per request).
    fn claim(&mut self, request: &Self::Request) -> bool;
    /// Answers `request` with an error without running it, logged
    /// COMPLETING.
    fn fail(&mut self, request: Self::Request, entry: EntryId) -> Result<(), String>;
    /// Runs `request` again (its entry stays the same).
    fn reexecute(&mut self, request: Self::Request, entry: EntryId) -> Result<(), String>;
    /// Keeps `queue` to run one request at a time (a suspected crash loop).
    fn replay_serially(&mut self, queue: SerialReplay<Self::Request>);
    /// A name for `request` in logs.
    fn describe(&self, request: &Self::Request) -> String;
}

/// Applies a recovery plan to one ring (docs/ARCHITECTURE.md §7.5), in the
/// order [`RecoveryPlan`] documents: re-push saved responses, free what the
/// guest has seen, answer poisoned and corrupt requests with errors, and
/// re-execute the rest in sequence order — all at once, or one at a time
/// after a suspected crash loop ([`serial_replay`]). Publishing what was put
/// is the caller's.
pub fn apply_plan<T: ReplayTarget>(
    target: &mut T,
    plan: &RecoveryPlan,
    blame: bool,
    stats: &mut RecoveryStats,
) -> Result<(), String> {
    for r in &plan.repush {
        target.repush(r)?;
        stats.repushed += 1;
    }
    let log = target.log().ok_or("no shadow log")?;
    free_seen(log, plan)?;
    let located = |entries: &[InflightEntry], what: &str| {
        entries
            .iter()
            .map(|e| {
                target
                    .locate(&e.request)
                    .map(|r| (e.entry, r))
                    .ok_or_else(|| format!("{what} entry {} names no request", e.entry))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let poisoned = located(&plan.poisoned, "poisoned")?;
    let reexecute = located(&plan.reexecute, "re-execute")?;
    for (_, request) in poisoned.iter().chain(&reexecute) {
        target.claim(request);
    }
    let mut failures: Vec<(EntryId, T::Request, bool)> = poisoned
        .into_iter()
        .map(|(entry, request)| (entry, request, true))
        .collect();
    for c in plan.corrupt_to_answer() {
        match target.locate(&c.request) {
            Some(request) if target.claim(&request) => failures.push((c.entry, request, false)),
            _ => {
                tracing::warn!(device = target.device(), entry = %c.entry,
                    "corrupt entry without a usable request: not answered");
                target
                    .log()
                    .ok_or("no shadow log")?
                    .free(c.entry)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let log = target.log().ok_or("no shadow log")?;
    let serial = serial_replay(log, blame, target.device(), reexecute.len())?;
    for (entry, request, poisoned) in failures {
        let name = target.describe(&request);
        stats.count_failure(target.device(), poisoned, &name);
        target.fail(request, entry)?;
    }
    stats.replayed += reexecute.len() as u64;
    if serial {
        target.replay_serially(SerialReplay::new(reexecute));
        return Ok(());
    }
    for (entry, request) in reexecute {
        if blame {
            if let Some(log) = target.log() {
                log.mark_replayed(&[entry]).map_err(|e| e.to_string())?;
            }
        }
        target.reexecute(request, entry)?;
    }
    Ok(())
}
