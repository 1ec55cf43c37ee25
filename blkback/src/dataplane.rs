//! What the backend's event loops share, whatever the transport: the
//! configuration and counters of an instance, the one completion token,
//! the loop body, the control-channel pieces both answer alike (attach
//! flags and reply, fault injection), and opening a shadow log.
//!
//! The Xen-ring loop ([`crate::backend`]) and the virtqueue loop
//! ([`crate::virtio::backend`]) each implement [`EventLoop`] and are driven
//! by [`run`]; neither imports the other's internals (docs/ARCHITECTURE.md
//! §3, §8 and §11).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use shadowback_shadow::{CorruptAction, CrashPoint, EntryId, RecoveryPlan, ShadowError, ShadowLog};
use shadowback_virtio::inflight::RegionCrashPoint;
use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::{Message, SeqPacket, XenbusError};

use crate::request::DiskGeometry;
use crate::uring::{Completion, Engine, EngineConfig, EngineError, IoOp};

/// Errors that end the backend process.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("I/O engine failed")]
    Engine(#[source] EngineError),
    #[error("control channel failed")]
    Control(#[source] XenbusError),
    #[error("the supervisor closed the control channel")]
    SupervisorGone,
}

/// Instances a request may be in flight in before it is failed instead of
/// replayed again (the crash-loop breaker, docs/ARCHITECTURE.md §7.5): the
/// one that consumed it and two that replayed it.
pub const POISON_THRESHOLD: u32 = 3;

/// Requests parsed between two submissions to the kernel within a burst.
pub(crate) const SUBMIT_BATCH: u64 = 8;

/// The event loop turns at least this often, so the heartbeat in the shadow
/// log moves even when the backend is idle or waiting for the disk.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Static configuration of one backend instance.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Device name, for logs.
    pub device: String,
    /// Domain id the guest's grants must name.
    pub backend_id: u16,
    /// What the disk offers.
    pub disk: DiskGeometry,
    /// Largest accepted `ring-page-order`.
    pub max_ring_page_order: u8,
    /// io_uring parameters.
    pub engine: EngineConfig,
    /// Log every request in the shadow log the supervisor passes (off only
    /// for the overhead benchmark: a crash then loses in-flight requests).
    pub shadow: bool,
    /// Fault injection for crash tests (`SHADOWBACK_CRASH_AT`).
    pub crash_at: CrashSpec,
}

/// Fault injection: abort at a crash point on its `nth` occurrence, in the
/// first instance of a device only (the one that finds its shadow logs
/// fresh), so the next instance can recover.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashSpec {
    /// A store of the shadow log (`SHADOWBACK_CRASH_AT=consume.3@100`).
    pub log: Option<(CrashPoint, u64)>,
    /// A store of the VMM's in-flight region (`region-finish.3@2`).
    pub region: Option<(RegionCrashPoint, u64)>,
}

/// Counters of one backend instance.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlkbackStats {
    /// Requests consumed from the ring.
    pub requests: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Bytes read from the disk into guest pages.
    pub bytes_read: u64,
    /// Bytes written from guest pages to the disk.
    pub bytes_written: u64,
    /// Kicks received from the guest.
    pub kicks: u64,
    /// Notifications sent to the guest.
    pub notifications: u64,
}

/// What the last recovery did (reported to the supervisor in `attached`).
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
    pub(crate) fn count_failure(
        &mut self,
        device: &str,
        poisoned: bool,
        request: &dyn std::fmt::Display,
    ) {
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
pub(crate) fn free_seen(log: &ShadowLog, plan: &RecoveryPlan) -> Result<(), String> {
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
pub(crate) fn serial_replay(
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
pub(crate) struct SerialReplay<T>(VecDeque<(EntryId, T)>);

impl<T> Default for SerialReplay<T> {
    fn default() -> Self {
        SerialReplay(VecDeque::new())
    }
}

impl<T> SerialReplay<T> {
    pub(crate) fn new(requests: impl IntoIterator<Item = (EntryId, T)>) -> Self {
        SerialReplay(requests.into_iter().collect())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next request to start, once nothing is in flight on its ring;
    /// charged a replay in `log` before it runs.
    pub(crate) fn next(
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

/// What a completion belongs to, packed into the io_uring user data; the
/// one token type of every loop.
///
/// Kick and I/O tokens carry the attachment generation. Generations are
/// numbered per process, across loops ([`Generations`]), so a completion
/// of a frontend that has since detached — including one the Xen loop left
/// behind when the process switched to virtqueues — is recognised and
/// ignored instead of being credited to its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Token {
    /// The supervisor's control socket is readable.
    Control,
    /// The guest kicked ring `ring` (0 for a Xen ring; the virtqueue's
    /// position in the device).
    Kick { generation: u32, ring: u8 },
    /// Disk I/O for the request in `slot` of ring `ring` (a Xen in-flight
    /// slot, a virtqueue head).
    Io {
        generation: u32,
        ring: u8,
        slot: u16,
    },
}

impl Token {
    const CONTROL: u64 = 0;
    const KICK: u64 = 1;
    const IO: u64 = 2;

    pub(crate) fn encode(self) -> u64 {
        match self {
            Token::Control => Self::CONTROL,
            Token::Kick { generation, ring } => {
                Self::KICK | u64::from(ring) << 2 | u64::from(generation) << 32
            }
            Token::Io {
                generation,
                ring,
                slot,
            } => {
                Self::IO | u64::from(ring) << 2 | u64::from(slot) << 8 | u64::from(generation) << 32
            }
        }
    }

    /// `None` for a user data no loop produces.
    pub(crate) fn decode(token: u64) -> Option<Self> {
        let generation = (token >> 32) as u32;
        let ring = ((token >> 2) & 0x3f) as u8;
        match token & 3 {
            Self::CONTROL => Some(Token::Control),
            Self::KICK => Some(Token::Kick { generation, ring }),
            Self::IO => Some(Token::Io {
                generation,
                ring,
                slot: ((token >> 8) & 0xffff) as u16,
            }),
            _ => None,
        }
    }
}

/// Attachment generations of one process, shared by its loops.
#[derive(Debug)]
pub(crate) struct Generations(u32);

impl Default for Generations {
    fn default() -> Self {
        Generations(1)
    }
}

impl Generations {
    /// The generation of a new attachment (never 0).
    pub(crate) fn next(&mut self) -> u32 {
        let g = self.0;
        self.0 = self.0.wrapping_add(1).max(1);
        g
    }
}

/// One transport's event loop, as [`run`] drives it. Every wait is an
/// io_uring op told apart by [`Token`]; one turn runs the steps below in
/// this order, then sleeps in `io_uring_enter` unless
/// [`EventLoop::has_work`], and dispatches what completed.
pub(crate) trait EventLoop {
    fn engine(&mut self) -> &mut Engine;
    fn control(&self) -> &SeqPacket;
    /// Scratch space for reaped completions.
    fn completions(&mut self) -> &mut Vec<Completion>;
    /// Starts the next request of a serial replay once the previous one
    /// completed (docs/ARCHITECTURE.md §7.5).
    fn advance_serial_replay(&mut self) -> Result<(), BackendError>;
    /// Takes what the rings hold, logs it, and submits its I/O.
    fn consume(&mut self) -> Result<(), BackendError>;
    /// Makes the responses put since the last turn visible, notifying at
    /// most once per ring.
    fn publish(&mut self);
    /// Drops a detaching frontend once nothing is in flight.
    fn finish_detach(&mut self) -> Result<(), BackendError>;
    /// Moves the heartbeat of every shadow log.
    fn heartbeat(&mut self);
    /// Whether to go round again without sleeping.
    fn has_work(&mut self) -> bool;
    /// The control socket is readable.
    fn on_control(&mut self) -> Result<(), BackendError>;
    fn on_kick(&mut self, generation: u32, ring: u8) -> Result<(), BackendError>;
    fn on_io(&mut self, generation: u32, ring: u8, slot: u16, result: i32);
}

/// Serves until the supervisor closes the control channel.
pub(crate) fn run<L: EventLoop>(lp: &mut L) -> Result<(), BackendError> {
    arm_control(lp)?;
    loop {
        lp.advance_serial_replay()?;
        lp.consume()?;
        lp.publish();
        lp.finish_detach()?;
        lp.heartbeat();
        let more = lp.has_work();
        lp.engine()
            .submit_and_wait_timeout(usize::from(!more), HEARTBEAT_INTERVAL)
            .map_err(BackendError::Engine)?;
        let mut completions = std::mem::take(lp.completions());
        lp.engine().drain(&mut completions);
        for c in completions.drain(..) {
            match Token::decode(c.token) {
                Some(Token::Control) => {
                    lp.on_control()?;
                    arm_control(lp)?;
                }
                Some(Token::Kick { generation, ring }) => lp.on_kick(generation, ring)?,
                Some(Token::Io {
                    generation,
                    ring,
                    slot,
                }) => lp.on_io(generation, ring, slot, c.result),
                None => {}
            }
        }
        *lp.completions() = completions;
    }
}

fn arm_control<L: EventLoop>(lp: &mut L) -> Result<(), BackendError> {
    let fd = lp.control().as_fd().as_raw_fd();
    arm(lp.engine(), Token::Control, fd)
}

/// A one-shot poll for input on `fd`, completing with `token`.
pub(crate) fn arm(engine: &mut Engine, token: Token, fd: RawFd) -> Result<(), BackendError> {
    engine
        .push(token.encode(), IoOp::PollIn { fd })
        .map_err(|(e, _)| BackendError::Engine(e))
}

/// Hands the device the first requests of a burst while the rest are
/// still being parsed: a submission every [`SUBMIT_BATCH`] requests.
pub(crate) fn submit_burst(engine: &mut Engine, requests: u64) -> Result<(), BackendError> {
    if requests.is_multiple_of(SUBMIT_BATCH) {
        engine.submit_and_wait(0).map_err(BackendError::Engine)?;
    }
    Ok(())
}

/// Moves the heartbeat of each log (docs/ARCHITECTURE.md §7.2).
pub(crate) fn heartbeat<'a>(device: &str, logs: impl IntoIterator<Item = &'a ShadowLog>) {
    for log in logs {
        if let Err(e) = log.heartbeat() {
            tracing::warn!(device, error = %e, "heartbeat failed");
        }
    }
}

/// The next control message; a closed channel means the supervisor is gone.
pub(crate) fn recv_control(control: &SeqPacket) -> Result<(Message, Vec<OwnedFd>), BackendError> {
    match control.recv() {
        Ok(m) => Ok(m),
        Err(XenbusError::Closed) => Err(BackendError::SupervisorGone),
        Err(e) => Err(control_err(e)),
    }
}

/// The flags of an `attach` or `attach-virtio`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttachFlags {
    /// `recover=1`: a previous instance served this frontend; replay.
    pub recover: bool,
    /// `blame=0`: the previous instance was killed from outside (an
    /// operator fault), so this replay does not count against the requests
    /// in flight (the crash-loop breaker).
    pub blame: bool,
}

impl AttachFlags {
    pub(crate) fn from_message(msg: &Message) -> Result<Self, (ErrorCode, String)> {
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        Ok(AttachFlags {
            recover: msg
                .get_flag(key::RECOVER)
                .map_err(|e| inval(&e))?
                .unwrap_or(false),
            blame: msg
                .get_flag(key::BLAME)
                .map_err(|e| inval(&e))?
                .unwrap_or(true),
        })
    }
}

/// The reply to an attach: `attached` with the recovery counters, or the
/// error.
pub(crate) fn attach_reply(result: Result<RecoveryStats, (ErrorCode, String)>) -> Message {
    match result {
        Ok(r) => Message::new(kind::ATTACHED)
            .with(key::GENERATION, r.generation)
            .with(key::REPLAYED, r.replayed)
            .with(key::REPUSHED, r.repushed)
            .with(key::POISONED, r.poisoned)
            .with(key::CORRUPT, r.corrupt)
            .with(key::REPLAY_US, r.replay_us),
        Err((code, why)) => Message::error(code, &sanitize(&why)),
    }
}

/// Fault-injection messages, answered alike by every loop; `None` for any
/// other message.
pub(crate) fn fault_injection(
    msg: &Message,
    device: &str,
    poison: &mut Vec<u64>,
    control: &SeqPacket,
) -> Option<Result<(), BackendError>> {
    match msg.kind() {
        kind::SPIN => {
            // A backend stuck in a busy loop, for the hang watchdog (it
            // stops the heartbeat like SIGSTOP, but burns a CPU while doing
            // so). No answer: the supervisor does not wait for one.
            tracing::warn!(device, "spinning forever (fault injection)");
            loop {
                std::hint::spin_loop();
            }
        }
        kind::POISON => {
            let reply = match msg.require_u64(key::SECTOR) {
                Ok(sector) => {
                    tracing::warn!(device, sector, "sector poisoned (fault injection)");
                    poison.push(sector);
                    Message::new(kind::OK)
                }
                Err(e) => Message::error(ErrorCode::Einval, &sanitize(&e.to_string())),
            };
            Some(control.send(&reply, &[]).map_err(control_err))
        }
        _ => None,
    }
}

/// Fault injection: whether `[start, start + sectors)` covers a poisoned
/// sector.
pub(crate) fn poisoned(poison: &[u64], start: u64, sectors: u64) -> bool {
    poison
        .iter()
        .any(|&p| p >= start && p < start.saturating_add(sectors))
}

/// Maps a shadow log and makes this instance its writer; returns the new
/// generation (1 for a log no instance used before). With
/// `SHADOWBACK_CRASH_AT`, the first instance aborts at that crash point.
pub(crate) fn open_shadow_log(
    cfg: &BackendConfig,
    fd: OwnedFd,
) -> Result<(ShadowLog, u64), ShadowError> {
    let mut log = ShadowLog::open(fd)?;
    if let Some((point, nth)) = cfg.crash_at.log {
        // Only the first instance crashes, so a restart can recover.
        if log.generation()? == 0 {
            let hits = std::sync::atomic::AtomicU64::new(0);
            log.set_crash_hook(Some(Box::new(move |at| {
                if at == point && hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == nth
                {
                    std::process::abort();
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
pub(crate) fn log_failed(device: &str, err: impl std::fmt::Display) -> ! {
    tracing::error!(device, error = %err, "shadow log failed: exiting for a restart");
    std::process::abort();
}

/// A closed control channel means the supervisor is gone: exit quietly.
pub(crate) fn control_err(e: XenbusError) -> BackendError {
    match e {
        XenbusError::Closed => BackendError::SupervisorGone,
        e => BackendError::Control(e),
    }
}

/// Message values are printable ASCII without newlines.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { ' ' })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Control,
            Token::Kick {
                generation: 7,
                ring: 15,
            },
            Token::Kick {
                generation: 1,
                ring: 0,
            },
            Token::Io {
                generation: u32::MAX,
                ring: 3,
                slot: 32767,
            },
            Token::Io {
                generation: 1,
                ring: 0,
                slot: 511,
            },
            Token::Io {
                generation: 1,
                ring: 0,
                slot: 0,
            },
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(3), None);
    }

    #[test]
    fn generations_are_never_zero_and_never_repeat_soon() {
        let mut g = Generations(u32::MAX);
        assert_eq!(g.next(), u32::MAX);
        assert_eq!(g.next(), 1);
        assert_eq!(g.next(), 2);
    }
}
