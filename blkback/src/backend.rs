//! The block backend's event loop: one process per disk, one frontend at a
//! time.
//!
//! Everything waits in one place, `io_uring_enter`: disk I/O, the guest's
//! kick eventfd and the supervisor's control socket are all io_uring ops,
//! told apart by [`EventSource`]. One loop iteration consumes what the ring
//! holds, submits it in one batch, reaps completions and publishes their
//! responses with one notification at most.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use shadowback_ring::blkif::{
    Blkif, BlkifRequest, BlkifResponse, BLKIF_OP_INDIRECT, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY, BLKIF_SECTOR_SIZE,
};
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::sring::{BackRing, RingPages};
use shadowback_ring::{EventChannel, RingError, SharedRegion, MAX_REGION_PAGES, PAGE_SIZE};
use shadowback_xenbus::protocol::{kind, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::{Message, SeqPacket, XenbusError};

use shadowback_shadow::{plan_recovery, CrashPoint, EntryId, RecoveryPlan, ShadowError, ShadowLog};
use vm_memory::ByteValued;

use crate::record;
use crate::request::{parse, BlkOp, DiskGeometry};
use crate::uring::{Completion, Engine, EngineConfig, EngineError, IoBuffers, IoOp};

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
/// replayed again (the crash-loop breaker, DESIGN §5 step 5): the one that
/// consumed it and two that replayed it.
pub const POISON_THRESHOLD: u32 = 3;

/// Requests parsed between two submissions to the kernel within a burst.
const SUBMIT_BATCH: u64 = 8;

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
    pub region: Option<(shadowback_virtio::inflight::RegionCrashPoint, u64)>,
}

/// What a completion belongs to, packed into the io_uring user data.
///
/// Kick and I/O tokens carry the attachment generation, so a completion
/// that belongs to a frontend that has since detached is recognised and
/// ignored instead of being credited to its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventSource {
    /// The supervisor's control socket is readable.
    Control,
    /// The guest kicked its event channel.
    Kick { generation: u32 },
    /// Disk I/O for in-flight slot `slot` finished.
    Io { generation: u32, slot: u32 },
}

impl EventSource {
    const CONTROL: u64 = 0;
    const KICK: u64 = 1;
    const IO: u64 = 2;

    fn encode(self) -> u64 {
        match self {
            EventSource::Control => Self::CONTROL,
            EventSource::Kick { generation } => Self::KICK | u64::from(generation) << 32,
            EventSource::Io { generation, slot } => {
                Self::IO | u64::from(slot) << 2 | u64::from(generation) << 32
            }
        }
    }

    fn decode(token: u64) -> Self {
        let generation = (token >> 32) as u32;
        match token & 3 {
            Self::CONTROL => EventSource::Control,
            Self::KICK => EventSource::Kick { generation },
            _ => EventSource::Io {
                generation,
                slot: ((token & 0xffff_ffff) >> 2) as u32,
            },
        }
    }
}

/// A request between consumption and response.
#[derive(Clone, Copy, Debug)]
struct Inflight {
    id: u64,
    /// Its shadow-log entry.
    entry: Option<EntryId>,
    operation: u8,
    /// What the op in flight must return: the bytes of a read or write;
    /// 0 for flush and discard.
    expected: u64,
    /// A `FLUSH_DISKCACHE` with segments whose write is in flight: once it
    /// has written everything, an `fdatasync` follows in the same slot and
    /// only its result is answered (PROTOCOL.md §5.3).
    then_flush: bool,
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

/// One attached frontend.
struct Frontend {
    name: String,
    generation: u32,
    grants: GrantMapper,
    region: Arc<SharedRegion>,
    ring: BackRing<Blkif>,
    kick: EventChannel,
    notify: EventChannel,
    /// The shadow log (absent with `--no-shadow` or an old supervisor).
    log: Option<ShadowLog>,
    /// Requests still to re-execute one at a time, in sequence order, when
    /// the previous instance died during its own replay (a crash loop):
    /// only the request running when an instance dies is then charged a
    /// replay, so requests in flight beside a poison request are not failed
    /// with it. New requests wait until the queue is empty.
    replay_queue: std::collections::VecDeque<(EntryId, BlkifRequest)>,
    slots: Vec<Option<Inflight>>,
    free: Vec<u32>,
    /// Responses put on the ring but not yet published.
    unpublished: bool,
    /// Stop consuming; drop the frontend once nothing is in flight.
    closing: Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    No,
    /// The supervisor asked: answer `detached` when idle.
    Detach,
    /// The ring is corrupt: we told the supervisor already.
    Broken,
}

impl Frontend {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// The backend instance.
pub struct Backend {
    cfg: BackendConfig,
    engine: Engine,
    control: SeqPacket,
    frontend: Option<Frontend>,
    next_generation: u32,
    stats: BlkbackStats,
    completions: Vec<Completion>,
    /// Fault injection: consuming a request that covers one of these
    /// sectors aborts the process (`poison` from the supervisor).
    poison: Vec<u64>,
}

impl Backend {
    /// Sets up the engine on `disk`; nothing runs before [`Backend::run`].
    pub fn new(cfg: BackendConfig, control: SeqPacket, disk: &File) -> Result<Self, BackendError> {
        let engine = Engine::new(disk.as_fd(), &cfg.engine).map_err(BackendError::Engine)?;
        Ok(Backend {
            cfg,
            engine,
            control,
            frontend: None,
            next_generation: 1,
            stats: BlkbackStats::default(),
            completions: Vec::with_capacity(256),
            poison: Vec::new(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> BlkbackStats {
        self.stats
    }

    /// Serves until the supervisor closes the control channel.
    pub fn run(&mut self) -> Result<(), BackendError> {
        self.arm(EventSource::Control, self.control.as_fd().as_raw_fd())?;
        loop {
            self.advance_serial_replay()?;
            self.consume_requests()?;
            self.publish_responses();
            self.finish_closing()?;
            self.heartbeat();
            let more = self.has_ring_work();
            self.engine
                .submit_and_wait_timeout(usize::from(!more), HEARTBEAT_INTERVAL)
                .map_err(BackendError::Engine)?;
            let mut completions = std::mem::take(&mut self.completions);
            self.engine.drain(&mut completions);
            for c in completions.drain(..) {
                match EventSource::decode(c.token) {
                    EventSource::Control => {
                        self.handle_control()?;
                        self.arm(EventSource::Control, self.control.as_fd().as_raw_fd())?;
                    }
                    EventSource::Kick { generation } => self.handle_kick(generation)?,
                    EventSource::Io { generation, slot } => {
                        self.complete_io(generation, slot, c.result)
                    }
                }
            }
            self.completions = completions;
        }
    }

    fn heartbeat(&mut self) {
        if let Some(log) = self.frontend.as_ref().and_then(|fe| fe.log.as_ref()) {
            if let Err(e) = log.heartbeat() {
                tracing::warn!(device = %self.cfg.device, error = %e, "heartbeat failed");
            }
        }
    }

    fn arm(&mut self, source: EventSource, fd: i32) -> Result<(), BackendError> {
        self.engine
            .push(source.encode(), IoOp::PollIn { fd })
            .map_err(|(e, _)| BackendError::Engine(e))
    }

    /// Whether the loop must go round again without sleeping:
    /// `RING_FINAL_CHECK_FOR_REQUESTS` with room to take them.
    fn has_ring_work(&mut self) -> bool {
        let Some(fe) = self.frontend.as_mut() else {
            return false;
        };
        if fe.closing != Closing::No || fe.free.is_empty() {
            return false;
        }
        // An error is reported by the next consume_requests.
        fe.ring.final_check_for_requests().unwrap_or(true)
    }

    /// Takes every request the ring holds (as far as slots allow), validates
    /// it and queues its I/O; a refused request is answered at once.
    fn consume_requests(&mut self) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_mut() else {
            return Ok(());
        };
        if fe.closing != Closing::No || !fe.replay_queue.is_empty() {
            return Ok(());
        }
        let pending = match fe.ring.unconsumed_requests() {
            Ok(n) => n,
            Err(e) => return self.ring_broken(e),
        };
        for _ in 0..pending {
            let Some(fe) = self.frontend.as_mut() else {
                break;
            };
            let Some(slot) = fe.free.pop() else {
                break;
            };
            let (idx, req) = match fe.ring.take_request() {
                Ok(taken) => taken,
                Err(e) => {
                    fe.free.push(slot);
                    return self.ring_broken(e);
                }
            };
            // DESIGN §4 "consume": the request is in the log before any of
            // it is executed.
            let entry = match fe
                .log
                .as_ref()
                .map(|log| log.log_consumed(idx, req.as_slice()))
            {
                None => None,
                Some(Ok(entry)) => Some(entry),
                Some(Err(e)) => {
                    fe.free.push(slot);
                    Self::log_failed(&self.cfg.device, e);
                }
            };
            self.stats.requests += 1;
            self.check_poison(&req);
            self.start_request(slot, req, entry)?;
            // Hand the device the first requests of a burst while the rest
            // are still being parsed.
            if self.stats.requests.is_multiple_of(SUBMIT_BATCH) {
                self.engine
                    .submit_and_wait(0)
                    .map_err(BackendError::Engine)?;
            }
        }
        Ok(())
    }

    /// Fault injection: a poisoned sector kills this instance.
    fn check_poison(&self, req: &BlkifRequest) {
        if self.poison.is_empty() {
            return;
        }
        let Some(fe) = self.frontend.as_ref() else {
            return;
        };
        let range = match parse(req, &self.cfg.disk, &fe.grants) {
            Ok(BlkOp::Read { sector, ref bufs })
            | Ok(BlkOp::Write {
                sector, ref bufs, ..
            }) => {
                let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                Some((sector, len / BLKIF_SECTOR_SIZE))
            }
            Ok(BlkOp::Discard { sector, sectors }) => Some((sector, sectors)),
            _ => None,
        };
        if let Some((start, n)) = range {
            if self
                .poison
                .iter()
                .any(|&p| p >= start && p < start.saturating_add(n))
            {
                tracing::error!(device = %self.cfg.device, id = req.id, "poisoned request: aborting (fault injection)");
                std::process::abort();
            }
        }
    }

    fn start_request(
        &mut self,
        slot: u32,
        req: BlkifRequest,
        entry: Option<EntryId>,
    ) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_mut() else {
            return Ok(());
        };
        // Indirect requests are answered with their inner operation, as
        // Linux blkback does.
        let operation = if req.operation == BLKIF_OP_INDIRECT {
            req.as_indirect().indirect_op
        } else {
            req.operation
        };
        let op = match parse(&req, &self.cfg.disk, &fe.grants) {
            Ok(op) => op,
            Err(e) => {
                tracing::debug!(device = %self.cfg.device, id = req.id, error = %e, "request refused");
                fe.free.push(slot);
                self.respond(entry, req.id, operation, e.status());
                return Ok(());
            }
        };
        let expected = op.data_bytes();
        let then_flush = matches!(
            op,
            BlkOp::Write {
                then_flush: true,
                ..
            }
        );
        let io = match op {
            BlkOp::Read { sector, bufs } => io_buffers(&fe.region, &bufs).map(|b| IoOp::Readv {
                offset: sector * BLKIF_SECTOR_SIZE,
                bufs: b,
            }),
            BlkOp::Write { sector, bufs, .. } => {
                io_buffers(&fe.region, &bufs).map(|b| IoOp::Writev {
                    offset: sector * BLKIF_SECTOR_SIZE,
                    bufs: b,
                })
            }
            BlkOp::Flush => Ok(IoOp::Fsync),
            BlkOp::Discard { sector, sectors } => Ok(IoOp::PunchHole {
                offset: sector * BLKIF_SECTOR_SIZE,
                len: sectors * BLKIF_SECTOR_SIZE,
            }),
        };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(device = %self.cfg.device, id = req.id, error = %e, "buffer setup failed");
                fe.free.push(slot);
                self.respond(entry, req.id, operation, BLKIF_RSP_ERROR);
                return Ok(());
            }
        };
        let inflight = Inflight {
            id: req.id,
            entry,
            operation,
            expected,
            then_flush,
        };
        self.submit(slot, inflight, io);
        Ok(())
    }

    /// Puts `io` in flight for `slot` (owned by `inflight` from now on); if
    /// the engine refuses it, the request is answered with an error.
    fn submit(&mut self, slot: u32, inflight: Inflight, io: IoOp) {
        let Some(fe) = self.frontend.as_mut() else {
            return;
        };
        let token = EventSource::Io {
            generation: fe.generation,
            slot,
        }
        .encode();
        fe.slots[slot as usize] = Some(inflight);
        if let Err((e, _op)) = self.engine.push(token, io) {
            // The engine is sized for a full ring plus the polls; failing
            // here means the kernel refused: answer with an error.
            tracing::warn!(device = %self.cfg.device, error = %e, "submission failed");
            if let Some(fe) = self.frontend.as_mut() {
                fe.slots[slot as usize] = None;
                fe.free.push(slot);
            }
            self.respond(
                inflight.entry,
                inflight.id,
                inflight.operation,
                BLKIF_RSP_ERROR,
            );
        }
    }

    fn complete_io(&mut self, generation: u32, slot: u32, result: i32) {
        let Some(fe) = self.frontend.as_mut() else {
            return;
        };
        if fe.generation != generation {
            return;
        }
        let Some(done) = fe.slots.get_mut(slot as usize).and_then(Option::take) else {
            tracing::warn!(slot, "completion for an idle slot");
            return;
        };
        let status = if result < 0 {
            if result == -libc::EOPNOTSUPP {
                BLKIF_RSP_EOPNOTSUPP
            } else {
                BLKIF_RSP_ERROR
            }
        } else if u64::from(result as u32) == done.expected {
            BLKIF_RSP_OKAY
        } else {
            BLKIF_RSP_ERROR
        };
        if status == BLKIF_RSP_OKAY && done.then_flush {
            // The write of a FLUSH_DISKCACHE with segments is complete; the
            // flush runs in the same slot and its result is the answer.
            self.stats.bytes_written += done.expected;
            let flush = Inflight {
                expected: 0,
                then_flush: false,
                ..done
            };
            self.submit(slot, flush, IoOp::Fsync);
            return;
        }
        fe.free.push(slot);
        if status == BLKIF_RSP_OKAY && done.expected > 0 {
            if done.operation == shadowback_ring::blkif::BLKIF_OP_READ {
                self.stats.bytes_read += done.expected;
            } else {
                self.stats.bytes_written += done.expected;
            }
        }
        if status != BLKIF_RSP_OKAY {
            tracing::debug!(device = %self.cfg.device, id = done.id, result, "I/O failed");
        }
        self.respond(done.entry, done.id, done.operation, status);
    }

    /// Puts a response on the ring and logs it COMPLETING (DESIGN §4
    /// "complete"); published in [`Self::publish_responses`].
    fn respond(&mut self, entry: Option<EntryId>, id: u64, operation: u8, status: i16) {
        let Some(fe) = self.frontend.as_mut() else {
            return;
        };
        if status != BLKIF_RSP_OKAY {
            self.stats.errors += 1;
        }
        let rsp = BlkifResponse {
            id,
            operation,
            status,
            ..Default::default()
        };
        let idx = match fe.ring.put_response(&rsp) {
            Ok(idx) => idx,
            Err(e) => {
                tracing::error!(device = %self.cfg.device, error = %e, "cannot put response");
                return;
            }
        };
        fe.unpublished = true;
        if let (Some(log), Some(entry)) = (fe.log.as_ref(), entry) {
            if let Err(e) = log.log_completing(entry, idx, rsp.as_slice()) {
                Self::log_failed(&self.cfg.device, e);
            }
        }
    }

    /// The shadow log refused a transition: that is a bug or a corrupt log,
    /// and serving on without logging would break the recovery guarantee.
    /// Exit and let the supervisor replace this instance.
    fn log_failed(device: &str, err: ShadowError) -> ! {
        tracing::error!(device, error = %err, "shadow log failed: exiting for a restart");
        std::process::abort();
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` once per loop iteration.
    fn publish_responses(&mut self) {
        let Some(fe) = self.frontend.as_mut() else {
            return;
        };
        if !fe.unpublished {
            return;
        }
        fe.unpublished = false;
        let pushed = fe.ring.push_responses();
        // DESIGN §4 "complete", last step: entries whose responses are now
        // visible are freed.
        if let (Ok(_), Some(log)) = (&pushed, fe.log.as_ref()) {
            if let Err(e) = log.log_published(fe.ring.rsp_prod_pvt()) {
                Self::log_failed(&self.cfg.device, e);
            }
        }
        match pushed {
            Ok(true) => {
                self.stats.notifications += 1;
                if let Err(e) = fe.notify.notify() {
                    tracing::warn!(device = %self.cfg.device, error = %e, "notify failed");
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(device = %self.cfg.device, error = %e, "cannot publish responses")
            }
        }
    }

    fn handle_kick(&mut self, generation: u32) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_mut() else {
            return Ok(());
        };
        if fe.generation != generation {
            return Ok(());
        }
        self.stats.kicks += 1;
        let _ = fe.kick.drain();
        let fd = fe.kick.as_raw_fd();
        self.arm(EventSource::Kick { generation }, fd)
    }

    /// Ring-level corruption: stop serving this frontend and tell the
    /// supervisor, which disconnects the guest.
    fn ring_broken(&mut self, err: RingError) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_mut() else {
            return Ok(());
        };
        tracing::warn!(device = %self.cfg.device, frontend = %fe.name, error = %err, "ring corrupt, disconnecting");
        fe.closing = Closing::Broken;
        let msg = Message::new(kind::DISCONNECT)
            .with("frontend", &fe.name)
            .with("reason", sanitize(&err.to_string()));
        self.control.send(&msg, &[]).map_err(control_err)
    }

    /// Drops a closing frontend once its I/O has drained.
    fn finish_closing(&mut self) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_ref() else {
            return Ok(());
        };
        if fe.closing == Closing::No || fe.in_flight() > 0 {
            return Ok(());
        }
        let closing = fe.closing;
        let name = fe.name.clone();
        self.frontend = None;
        tracing::info!(device = %self.cfg.device, frontend = %name, "frontend detached");
        if closing == Closing::Detach {
            let msg = Message::new(kind::DETACHED).with("frontend", &name);
            self.control.send(&msg, &[]).map_err(control_err)?;
        }
        Ok(())
    }

    fn handle_control(&mut self) -> Result<(), BackendError> {
        let (msg, fds) = match self.control.recv() {
            Ok(m) => m,
            Err(XenbusError::Closed) => return Err(BackendError::SupervisorGone),
            Err(e) => return Err(control_err(e)),
        };
        match msg.kind() {
            kind::ATTACH => {
                let reply = match self.attach(&msg, fds) {
                    Ok(r) => Message::new(kind::ATTACHED)
                        .with("generation", r.generation)
                        .with("replayed", r.replayed)
                        .with("repushed", r.repushed)
                        .with("poisoned", r.poisoned)
                        .with("corrupt", r.corrupt)
                        .with("replay-us", r.replay_us),
                    Err((code, why)) => Message::error(code, &sanitize(&why)),
                };
                self.control.send(&reply, &[]).map_err(control_err)
            }
            "spin" => {
                // Fault injection: a backend stuck in a busy loop, for the
                // hang watchdog (it stops the heartbeat like SIGSTOP, but
                // burns a CPU while doing so).
                // No answer: the supervisor does not wait for one.
                tracing::warn!(device = %self.cfg.device, "spinning forever (fault injection)");
                loop {
                    std::hint::spin_loop();
                }
            }
            "poison" => match msg.require_u64("sector") {
                Ok(sector) => {
                    tracing::warn!(device = %self.cfg.device, sector, "sector poisoned (fault injection)");
                    self.poison.push(sector);
                    self.control
                        .send(&Message::new("ok"), &[])
                        .map_err(control_err)
                }
                Err(e) => self
                    .control
                    .send(
                        &Message::error(ErrorCode::Einval, &sanitize(&e.to_string())),
                        &[],
                    )
                    .map_err(control_err),
            },
            shadowback_xenbus::virtio::ATTACH_VIRTIO => {
                if self.frontend.is_some() {
                    let reply = Message::error(ErrorCode::Ebusy, "a Xen frontend is attached");
                    return self.control.send(&reply, &[]).map_err(control_err);
                }
                // One engine, two transports: the virtio loop takes over
                // this process's engine and control channel for good.
                crate::virtio::backend::serve(
                    &mut self.engine,
                    &self.control,
                    &self.cfg,
                    &mut self.poison,
                    (msg, fds),
                )
            }
            kind::DETACH => match self.frontend.as_mut() {
                Some(fe) => {
                    // Answer `detached` once the in-flight I/O drained.
                    fe.closing = Closing::Detach;
                    Ok(())
                }
                None => self
                    .control
                    .send(&Message::new(kind::DETACHED), &[])
                    .map_err(control_err),
            },
            other => {
                tracing::warn!(kind = other, "unexpected control message");
                let reply = Message::error(ErrorCode::Eproto, "unexpected message");
                self.control.send(&reply, &[]).map_err(control_err)
            }
        }
    }

    /// Maps the guest's region and ring; on failure nothing is kept.
    fn attach(
        &mut self,
        msg: &Message,
        mut fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<RecoveryStats, (ErrorCode, String)> {
        if self.frontend.is_some() {
            return Err((ErrorCode::Ebusy, "a frontend is already attached".into()));
        }
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = AttachRequest::from_message(msg).map_err(|e| inval(&e))?;
        // [region, kick, notify] and, with the shadow layer, the log.
        let log_fd = if fds.len() == 4 { fds.pop() } else { None };
        let recover = msg
            .get_flag("recover")
            .map_err(|e| inval(&e))?
            .unwrap_or(false);
        // `blame=0`: the previous instance was killed from outside (an
        // operator fault), so this replay does not count against the
        // requests in flight (the crash-loop breaker).
        let blame = msg
            .get_flag("blame")
            .map_err(|e| inval(&e))?
            .unwrap_or(true);
        let fds = DeviceFds::from_received(msg, fds).map_err(|e| inval(&e))?;
        let order = req.connect.ring_page_order().unwrap_or(u8::MAX);
        if order > self.cfg.max_ring_page_order {
            return Err((
                ErrorCode::Einval,
                format!(
                    "ring-page-order {order} exceeds {}",
                    self.cfg.max_ring_page_order
                ),
            ));
        }
        let region = Arc::new(SharedRegion::from_fd(fds.region).map_err(|e| match e {
            RingError::BadRegionSize(n) if n > u64::from(MAX_REGION_PAGES) * PAGE_SIZE as u64 => {
                (ErrorCode::E2big, e.to_string())
            }
            e => inval(&e),
        })?);
        let grants = GrantMapper::new(
            region.clone(),
            req.connect.grant_frames,
            self.cfg.backend_id,
        )
        .map_err(|e| inval(&e))?;
        let pages = req
            .connect
            .ring_refs
            .iter()
            .map(|&gref| grants.map(gref, Access::Write))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (ErrorCode::Einval, format!("ring grant: {e}")))?;
        let pages = RingPages::new(region.clone(), pages).map_err(|e| inval(&e))?;
        let kick = EventChannel::from_fd(fds.kick).map_err(|e| inval(&e))?;
        let notify = EventChannel::from_fd(fds.notify).map_err(|e| inval(&e))?;

        let started = std::time::Instant::now();
        let mut stats = RecoveryStats::default();
        let log = match log_fd {
            Some(fd) if self.cfg.shadow => {
                let (log, generation) = self.open_log(fd).map_err(|e| inval(&e))?;
                stats.generation = generation;
                Some(log)
            }
            _ => None,
        };
        let (ring, plan) = match (&log, recover) {
            (Some(log), true) => {
                let probe = BackRing::<Blkif>::attach(pages.clone()).map_err(|e| inval(&e))?;
                let rsp_prod = probe.shared_rsp_prod().map_err(|e| inval(&e))?;
                let req_prod = probe.shared_req_prod().map_err(|e| inval(&e))?;
                let snapshot = log.snapshot().map_err(|e| inval(&e))?;
                let plan = plan_recovery(
                    &snapshot,
                    rsp_prod,
                    req_prod,
                    probe.size(),
                    POISON_THRESHOLD,
                )
                .map_err(|e| (ErrorCode::Eproto, format!("recovery impossible: {e}")))?;
                log.log_recovered(&plan).map_err(|e| inval(&e))?;
                let ring = BackRing::<Blkif>::attach_at(pages, plan.req_cons, plan.rsp_prod)
                    .map_err(|e| inval(&e))?;
                (ring, Some(plan))
            }
            _ => (
                BackRing::<Blkif>::attach(pages).map_err(|e| inval(&e))?,
                None,
            ),
        };
        let size = ring.size();
        if log.as_ref().is_some_and(|l| l.entries() != size) {
            return Err((
                ErrorCode::Einval,
                format!("shadow log does not have {size} entries"),
            ));
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let kick_fd = kick.as_raw_fd();
        self.frontend = Some(Frontend {
            name: req.frontend,
            generation,
            grants,
            region,
            ring,
            kick,
            notify,
            log,
            replay_queue: std::collections::VecDeque::new(),
            slots: vec![None; size as usize],
            free: (0..size).rev().collect(),
            unpublished: false,
            closing: Closing::No,
        });
        if let Some(plan) = plan {
            self.apply_plan(&plan, blame, &mut stats)
                .map_err(|e| (ErrorCode::Eproto, format!("replay failed: {e}")))?;
        }
        stats.replay_us = started.elapsed().as_micros() as u64;
        self.arm(EventSource::Kick { generation }, kick_fd)
            .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        tracing::info!(device = %self.cfg.device, ring_size = size, order, recover, ?stats, "frontend attached");
        Ok(stats)
    }

    /// Serial replay: starts the next queued request once the previous one
    /// has completed.
    fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_mut() else {
            return Ok(());
        };
        if fe.in_flight() > 0 || fe.closing != Closing::No {
            return Ok(());
        }
        let Some((entry, req)) = fe.replay_queue.pop_front() else {
            return Ok(());
        };
        let Some(slot) = fe.free.pop() else {
            return Ok(());
        };
        if let Some(log) = fe.log.as_ref() {
            if let Err(e) = log.mark_replayed(&[entry]) {
                Self::log_failed(&self.cfg.device, e);
            }
        }
        self.check_poison(&req);
        self.start_request(slot, req, Some(entry))
    }

    /// Maps the shadow log and makes this instance its writer.
    fn open_log(&self, fd: std::os::fd::OwnedFd) -> Result<(ShadowLog, u64), ShadowError> {
        open_shadow_log(&self.cfg, fd)
    }

    /// DESIGN §5 step 4, in the order `RecoveryPlan` documents: re-push saved
    /// responses, free what the guest has seen, answer poisoned and corrupt
    /// requests with errors, re-execute the rest in sequence order.
    fn apply_plan(
        &mut self,
        plan: &RecoveryPlan,
        blame: bool,
        stats: &mut RecoveryStats,
    ) -> Result<(), String> {
        let fe = self.frontend.as_mut().ok_or("no frontend")?;
        let log = fe.log.as_ref().ok_or("no shadow log")?;
        for r in &plan.repush {
            let idx = fe
                .ring
                .put_response(&response_from(&r.response))
                .map_err(|e| e.to_string())?;
            if idx != r.rsp_idx {
                return Err(format!("re-push landed at {idx}, planned {}", r.rsp_idx));
            }
            log.log_repushed(r.entry, idx).map_err(|e| e.to_string())?;
            stats.repushed += 1;
        }
        for &entry in plan.free.iter().chain(
            plan.corrupt
                .iter()
                .filter(|c| c.action == shadowback_shadow::CorruptAction::Discard)
                .map(|c| &c.entry),
        ) {
            log.free(entry).map_err(|e| e.to_string())?;
        }
        let failed = plan
            .poisoned
            .iter()
            .map(|p| (p.entry, p.request, true))
            .chain(
                plan.corrupt_to_answer()
                    .map(|c| (c.entry, c.request, false)),
            );
        for (entry, request, poisoned) in failed {
            let rsp = record::blkif::error_response(&request);
            let idx = fe
                .ring
                .put_response(&response_from(&rsp))
                .map_err(|e| e.to_string())?;
            log.log_completing(entry, idx, &rsp)
                .map_err(|e| e.to_string())?;
            if poisoned {
                stats.poisoned += 1;
                tracing::error!(device = %self.cfg.device, id = record::blkif::request_id(&request),
                    "request failed every instance it ran in: answered with an error (crash-loop breaker)");
            } else {
                stats.corrupt += 1;
            }
        }
        fe.unpublished = true;
        self.stats.errors += stats.poisoned + stats.corrupt;
        // Instances started since one last published a response: above 1,
        // the previous instance died before publishing anything — replay one
        // request at a time.
        if blame && log.stalled_instances().map_err(|e| e.to_string())? > 1 {
            tracing::warn!(device = %self.cfg.device, requests = plan.reexecute.len(), "crash loop suspected: replaying one request at a time");
            fe.replay_queue = plan
                .reexecute
                .iter()
                .map(|e| {
                    let mut req = BlkifRequest::default();
                    req.as_mut_slice().copy_from_slice(&e.request);
                    (e.entry, req)
                })
                .collect();
            stats.replayed += plan.reexecute.len() as u64;
        }
        let parallel = if fe.replay_queue.is_empty() {
            &plan.reexecute[..]
        } else {
            &[]
        };
        for e in parallel {
            let Some(fe) = self.frontend.as_mut() else {
                break;
            };
            let Some(slot) = fe.free.pop() else {
                return Err("more requests to replay than slots".into());
            };
            if let Some(log) = fe.log.as_ref().filter(|_| blame) {
                log.mark_replayed(&[e.entry]).map_err(|e| e.to_string())?;
            }
            let mut req = BlkifRequest::default();
            req.as_mut_slice().copy_from_slice(&e.request);
            self.check_poison(&req);
            self.start_request(slot, req, Some(e.entry))
                .map_err(|e| e.to_string())?;
            stats.replayed += 1;
        }
        // The guest may be asleep waiting for responses the dead instance
        // owed it: publish and notify unconditionally.
        self.publish_responses();
        if let Some(fe) = self.frontend.as_ref() {
            let _ = fe.notify.notify();
        }
        Ok(())
    }
}

/// Maps a shadow log and makes this instance its writer; returns the new
/// generation (1 for a log no instance used before). With
/// `SHADOWBACK_CRASH_AT`, the first instance aborts at that crash point.
pub(crate) fn open_shadow_log(
    cfg: &BackendConfig,
    fd: std::os::fd::OwnedFd,
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

/// A blkif response from its 16 saved bytes.
fn response_from(bytes: &[u8; shadowback_shadow::RESPONSE_SIZE]) -> BlkifResponse {
    let mut rsp = BlkifResponse::default();
    rsp.as_mut_slice().copy_from_slice(bytes);
    rsp
}

/// A closed control channel means the supervisor is gone: exit quietly.
pub(crate) fn control_err(e: XenbusError) -> BackendError {
    match e {
        XenbusError::Closed => BackendError::SupervisorGone,
        e => BackendError::Control(e),
    }
}

/// Turns region byte ranges into iovecs checked against the mapping.
fn io_buffers(
    region: &Arc<SharedRegion>,
    bufs: &[crate::request::GuestBuf],
) -> Result<IoBuffers, EngineError> {
    let ranges: Vec<(u64, usize)> = bufs.iter().map(|b| (b.offset, b.len as usize)).collect();
    IoBuffers::from_ranges(region.clone(), &ranges)
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
    fn event_sources_round_trip() {
        for src in [
            EventSource::Control,
            EventSource::Kick { generation: 7 },
            EventSource::Io {
                generation: u32::MAX,
                slot: 511,
            },
            EventSource::Io {
                generation: 1,
                slot: 0,
            },
        ] {
            assert_eq!(EventSource::decode(src.encode()), src);
        }
    }
}
