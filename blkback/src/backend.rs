//! The block backend's event loop: one process per disk, one frontend at a
//! time.
//!
//! Everything waits in one place, `io_uring_enter`: disk I/O, the guest's
//! kick eventfd and the supervisor's control socket are all io_uring ops,
//! told apart by [`Token`]. One loop iteration ([`event_loop::run`])
//! consumes what the ring holds, submits it in one batch, reaps
//! completions and publishes their responses with one notification at
//! most.

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
use shadowback_xenbus::protocol::{key, kind, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::{Message, SeqPacket};

use shadowback_shadow::{plan_recovery, EntryId, RecoveryPlan, Repush, ShadowLog, REQUEST_SIZE};
use vm_memory::ByteValued;

use crate::instance::{BackendConfig, BlkbackStats};
use crate::record;
use crate::request::{parse, BlkOp};
use shadowback_dataplane::control::{
    attach_reply, control_err, fault_injection, poisoned, recv_control, refuse_unexpected,
    sanitize, send_detached, AttachFlags,
};
use shadowback_dataplane::event_loop::{
    self, arm, submit_burst, BackendError, Closing, EventLoop, Generations, Token,
};
use shadowback_dataplane::recovery::{
    self, log_failed, open_shadow_log, RecoveryStats, ReplayTarget, SerialReplay, POISON_THRESHOLD,
};
use shadowback_dataplane::uring::{Completion, Engine, EngineError, IoBuffers, IoOp};

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
    /// Serial replay after a suspected crash loop.
    replay_queue: SerialReplay<BlkifRequest>,
    slots: Vec<Option<Inflight>>,
    free: Vec<u32>,
    /// Responses put on the ring but not yet published.
    unpublished: bool,
    /// Stop consuming; drop the frontend once nothing is in flight.
    closing: Closing,
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
    generations: Generations,
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
            generations: Generations::default(),
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
        event_loop::run(self)
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
            if poisoned(&self.poison, start, n) {
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
        let token = Token::Io {
            generation: fe.generation,
            ring: 0,
            // A ring has at most 512 slots (ring-page-order 4).
            slot: slot as u16,
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

    /// Puts a response on the ring and logs it COMPLETING
    /// (docs/ARCHITECTURE.md §7.1); published in [`EventLoop::publish`].
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
                log_failed(&self.cfg.device, e);
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
        arm(
            &mut self.engine,
            Token::Kick {
                generation,
                ring: 0,
            },
            fd,
        )
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
            .with(key::FRONTEND, &fe.name)
            .with(key::REASON, sanitize(&err.to_string()));
        self.control.send(&msg, &[]).map_err(control_err)
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
        let AttachFlags { recover, blame } = AttachFlags::from_message(msg)?;
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
                let (log, generation) =
                    open_shadow_log(&self.cfg.crash_at, fd).map_err(|e| inval(&e))?;
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
        let generation = self.generations.new_attachment();
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
            replay_queue: SerialReplay::default(),
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
        arm(
            &mut self.engine,
            Token::Kick {
                generation,
                ring: 0,
            },
            kick_fd,
        )
        .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        tracing::info!(device = %self.cfg.device, ring_size = size, order, recover, ?stats, "frontend attached");
        Ok(stats)
    }

    /// Replay (docs/ARCHITECTURE.md §7.5) through the shared applier, then
    /// publish and notify unconditionally: the guest may be asleep waiting
    /// for responses the dead instance owed it.
    fn apply_plan(
        &mut self,
        plan: &RecoveryPlan,
        blame: bool,
        stats: &mut RecoveryStats,
    ) -> Result<(), String> {
        recovery::apply_plan(self, plan, blame, stats)?;
        self.publish();
        if let Some(fe) = self.frontend.as_ref() {
            let _ = fe.notify.notify();
        }
        Ok(())
    }
}

/// A Xen ring replays from the saved request bytes: the grants they name
/// stay the frontend's until the request is answered.
impl ReplayTarget for Backend {
    type Request = BlkifRequest;

    fn device(&self) -> &str {
        &self.cfg.device
    }

    fn log(&self) -> Option<&ShadowLog> {
        self.frontend.as_ref()?.log.as_ref()
    }

    fn repush(&mut self, r: &Repush) -> Result<(), String> {
        let fe = self.frontend.as_mut().ok_or("no frontend")?;
        let log = fe.log.as_ref().ok_or("no shadow log")?;
        let idx = fe
            .ring
            .put_response(&response_from(&r.response))
            .map_err(|e| e.to_string())?;
        if idx != r.rsp_idx {
            return Err(format!("re-push landed at {idx}, planned {}", r.rsp_idx));
        }
        log.log_repushed(r.entry, idx).map_err(|e| e.to_string())?;
        fe.unpublished = true;
        Ok(())
    }

    fn locate(&self, record: &[u8; REQUEST_SIZE]) -> Option<BlkifRequest> {
        let mut req = BlkifRequest::default();
        req.as_mut_slice().copy_from_slice(record);
        Some(req)
    }

    /// Slots are the backend's, not the guest's: nothing to collide.
    fn claim(&mut self, _request: &BlkifRequest) -> bool {
        true
    }

    fn fail(&mut self, request: BlkifRequest, entry: EntryId) -> Result<(), String> {
        let fe = self.frontend.as_mut().ok_or("no frontend")?;
        let log = fe.log.as_ref().ok_or("no shadow log")?;
        let mut record = [0u8; REQUEST_SIZE];
        record.copy_from_slice(request.as_slice());
        let rsp = record::blkif::error_response(&record);
        let idx = fe
            .ring
            .put_response(&response_from(&rsp))
            .map_err(|e| e.to_string())?;
        log.log_completing(entry, idx, &rsp)
            .map_err(|e| e.to_string())?;
        fe.unpublished = true;
        self.stats.errors += 1;
        Ok(())
    }

    fn reexecute(&mut self, request: BlkifRequest, entry: EntryId) -> Result<(), String> {
        let fe = self.frontend.as_mut().ok_or("no frontend")?;
        let slot = fe.free.pop().ok_or("more requests to replay than slots")?;
        self.check_poison(&request);
        self.start_request(slot, request, Some(entry))
            .map_err(|e| e.to_string())
    }

    fn replay_serially(&mut self, queue: SerialReplay<BlkifRequest>) {
        if let Some(fe) = self.frontend.as_mut() {
            fe.replay_queue = queue;
        }
    }

    fn describe(&self, request: &BlkifRequest) -> String {
        format!("id {}", request.id)
    }
}

/// A blkif response from its 16 saved bytes.
fn response_from(bytes: &[u8; shadowback_shadow::RESPONSE_SIZE]) -> BlkifResponse {
    let mut rsp = BlkifResponse::default();
    rsp.as_mut_slice().copy_from_slice(bytes);
    rsp
}

/// Turns region byte ranges into iovecs checked against the mapping.
fn io_buffers(
    region: &Arc<SharedRegion>,
    bufs: &[crate::request::GuestBuf],
) -> Result<IoBuffers, EngineError> {
    let ranges: Vec<(u64, usize)> = bufs.iter().map(|b| (b.offset, b.len as usize)).collect();
    IoBuffers::from_ranges(region.clone(), &ranges)
}

impl EventLoop for Backend {
    fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    fn control(&self) -> &SeqPacket {
        &self.control
    }

    fn completions(&mut self) -> &mut Vec<Completion> {
        &mut self.completions
    }

    /// Serial replay: starts the next queued request once the previous one
    /// has completed.
    fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_mut() else {
            return Ok(());
        };
        // Also while a close waits: the queued requests were consumed and
        // are answered before `closed`/`detached`. Not on a broken ring.
        if fe.closing == Closing::Broken {
            return Ok(());
        }
        let in_flight = fe.in_flight();
        let Some((entry, req)) = fe
            .replay_queue
            .next(in_flight, fe.log.as_ref(), &self.cfg.device)
        else {
            return Ok(());
        };
        // Nothing is in flight: every slot is free.
        let Some(slot) = fe.free.pop() else {
            return Ok(());
        };
        self.check_poison(&req);
        self.start_request(slot, req, Some(entry))
    }

    /// Takes every request the ring holds (as far as slots allow), validates
    /// it and queues its I/O; a refused request is answered at once.
    fn consume(&mut self) -> Result<(), BackendError> {
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
            // docs/ARCHITECTURE.md §7.1: the request is in the log before
            // any of it is executed.
            let entry = match fe
                .log
                .as_ref()
                .map(|log| log.log_consumed(idx, req.as_slice()))
            {
                None => None,
                Some(Ok(entry)) => Some(entry),
                Some(Err(e)) => {
                    fe.free.push(slot);
                    log_failed(&self.cfg.device, e);
                }
            };
            self.stats.requests += 1;
            self.check_poison(&req);
            self.start_request(slot, req, entry)?;
            submit_burst(&mut self.engine, self.stats.requests)?;
        }
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` once per loop iteration.
    fn publish(&mut self) {
        let Some(fe) = self.frontend.as_mut() else {
            return;
        };
        if !fe.unpublished {
            return;
        }
        fe.unpublished = false;
        let pushed = fe.ring.push_responses();
        // docs/ARCHITECTURE.md §7.1, last step: entries whose responses
        // are now visible are freed.
        if let (Ok(_), Some(log)) = (&pushed, fe.log.as_ref()) {
            if let Err(e) = log.log_published(fe.ring.rsp_prod_pvt()) {
                log_failed(&self.cfg.device, e);
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

    /// Drops a closing frontend once its I/O has drained.
    fn finish_detach(&mut self) -> Result<(), BackendError> {
        let Some(fe) = self.frontend.as_ref() else {
            return Ok(());
        };
        let replaying = fe.closing != Closing::Broken && !fe.replay_queue.is_empty();
        if fe.closing == Closing::No || fe.in_flight() > 0 || replaying {
            return Ok(());
        }
        let closing = fe.closing;
        let name = fe.name.clone();
        self.frontend = None;
        tracing::info!(device = %self.cfg.device, frontend = %name, "frontend detached");
        if closing == Closing::Detach {
            send_detached(&self.control, Some(&name))?;
        }
        Ok(())
    }

    fn heartbeat(&mut self) {
        let logs = self.frontend.as_ref().and_then(|fe| fe.log.as_ref());
        event_loop::heartbeat(&self.cfg.device, logs);
    }

    /// Whether the loop must go round again without sleeping:
    /// `RING_FINAL_CHECK_FOR_REQUESTS` with room to take them.
    fn has_work(&mut self) -> bool {
        let Some(fe) = self.frontend.as_mut() else {
            return false;
        };
        if fe.closing != Closing::No || fe.free.is_empty() {
            return false;
        }
        // An error is reported by the next `consume`.
        fe.ring.final_check_for_requests().unwrap_or(true)
    }

    fn on_control(&mut self) -> Result<(), BackendError> {
        let (msg, fds) = recv_control(&self.control)?;
        if let Some(done) = fault_injection(&msg, &self.cfg.device, &mut self.poison, &self.control)
        {
            return done;
        }
        match msg.kind() {
            kind::ATTACH => {
                let reply = attach_reply(self.attach(&msg, fds));
                self.control.send(&reply, &[]).map_err(control_err)
            }
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
                    &mut self.generations,
                    (msg, fds),
                )
            }
            kind::DETACH => match self.frontend.as_mut() {
                Some(fe) => {
                    // Answer `detached` once the in-flight I/O drained.
                    fe.closing = Closing::Detach;
                    Ok(())
                }
                None => send_detached(&self.control, None),
            },
            other => refuse_unexpected(&self.control, other),
        }
    }

    fn on_kick(&mut self, generation: u32, _ring: u8) -> Result<(), BackendError> {
        self.handle_kick(generation)
    }

    fn on_io(&mut self, generation: u32, _ring: u8, slot: u16, result: i32) {
        self.complete_io(generation, u32::from(slot), result)
    }
}
