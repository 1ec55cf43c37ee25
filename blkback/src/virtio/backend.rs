//! The virtio-blk event loop: the same process, engine and control socket
//! as the Xen path, serving split virtqueues after an `attach-virtio`
//! (docs/ARCHITECTURE.md §8).
//!
//! Driven by [`event_loop::run`] like the Xen loop: one iteration consumes
//! what the avail rings hold (parsed, logged in the queue's shadow log and
//! the VMM's in-flight region, then submitted in batches), reaps
//! completions, and publishes each queue's used entries with one release
//! store and at most one notification.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use shadowback_ring::EventChannel;
use shadowback_shadow::{
    plan_recovery, EntryId, EntryState, RecoveryPlan, Repush, ShadowLog, REQUEST_SIZE,
};
use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds, ATTACH_VIRTIO, MAX_QUEUES};
use shadowback_xenbus::{Message, SeqPacket};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::request::{
    parse, Action, BlkConfig, OutHdr, Parsed, CHAIN_CAP, MAX_DISCARD_SEG, SECTOR_SIZE,
    STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::instance::{BackendConfig, BlkbackStats};
use crate::record::virtio_blk as vblk;
use shadowback_dataplane::control::{
    attach_reply, control_err, fault_injection, poisoned, recv_control, refuse_unexpected,
    sanitize, send_detached, AttachFlags,
};
use shadowback_dataplane::event_loop::{
    self, arm, submit_burst, BackendError, EventLoop, Generations, Token,
};
use shadowback_dataplane::recovery::{
    self, log_failed, open_shadow_log, RecoveryStats, ReplayTarget, SerialReplay, POISON_THRESHOLD,
};
use shadowback_dataplane::uring::{Completion, Engine, IoBuffers, IoOp};
use shadowback_virtio::inflight::{
    InflightQueue, InflightRegion, RegionCrashHook, RegionCrashPoint,
};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::{extend_index, guest_index, Chain, SplitQueue};

/// Descriptors one queue may walk per loop iteration. Requests answered at
/// once take no engine slot, so without it a full ring of long hostile
/// chains (each up to 64Ki descriptors) would keep the loop from its
/// heartbeat and the control socket for minutes. Far above what engine
/// room lets legitimate chains use.
const WALK_BUDGET: u32 = 1 << 16;

/// Engine ops one request may need at most (one per discard segment).
const MAX_OPS_PER_REQUEST: usize = MAX_DISCARD_SEG as usize;

/// A request between consumption and its used entry.
#[derive(Clone, Copy, Debug)]
struct Pending {
    entry: Option<EntryId>,
    status_at: Option<u64>,
    /// Engine ops not yet completed.
    ops_left: u16,
    /// OK until an op fails.
    status: u8,
    /// Bytes each data op must transfer (0: a result of 0 is success).
    expected: u64,
    /// Used length on success (data read + status byte).
    used_len: u32,
    read: bool,
}

/// One started virtqueue.
struct VQueue {
    /// Virtqueue index in the device.
    index: u16,
    ring: SplitQueue,
    kick: EventChannel,
    call: EventChannel,
    log: Option<ShadowLog>,
    inflight: Option<InflightQueue>,
    /// Next in-flight region counter.
    counter: u64,
    /// Guest u16 index = log u32 index (low half) + `delta`.
    delta: u16,
    /// Log-space index of the next avail entry to consume.
    next_avail: u32,
    /// Log-space index of the next used entry to write.
    next_used: u32,
    /// Log-space `used->idx` last published.
    published: u32,
    /// Requests in flight, by head.
    slots: Vec<Option<Pending>>,
    in_flight: usize,
    /// Heads written to the used ring, not yet published.
    batch: Vec<u16>,
    /// Serial replay after a suspected crash loop.
    replay_queue: SerialReplay<u16>,
    /// The driver broke the ring: consume nothing more.
    broken: bool,
}

impl VQueue {
    fn size(&self) -> u16 {
        self.ring.size
    }
}

/// The attached device.
struct Device {
    name: String,
    generation: u32,
    mem: Arc<GuestRam>,
    queues: Vec<VQueue>,
    /// `detach` received: answer `detached` once idle.
    closing: bool,
}

impl Device {
    fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.in_flight).sum()
    }
}

/// Work a recovery leaves for after the queue is set up.
enum Replay {
    Plan(RecoveryPlan),
    /// Heads from the in-flight region to resubmit, in order.
    Region(Vec<u16>),
    None,
}

/// The loop state; it borrows the engine and the control socket from the
/// Xen loop that received `attach-virtio`.
struct VirtioLoop<'a> {
    engine: &'a mut Engine,
    control: &'a SeqPacket,
    cfg: &'a BackendConfig,
    poison: &'a mut Vec<u64>,
    blk: BlkConfig,
    device: Option<Device>,
    generations: &'a mut Generations,
    stats: BlkbackStats,
    completions: Vec<Completion>,
    chain: Chain,
    data: Vec<(u64, usize)>,
    ranges: Vec<(u64, u64)>,
}

/// Serves virtqueues until the supervisor closes the control channel
/// (`Err(SupervisorGone)`), starting with the `attach-virtio` in `first`.
/// Called by the Xen loop, which must have no frontend attached.
pub(crate) fn serve(
    engine: &mut Engine,
    control: &SeqPacket,
    cfg: &BackendConfig,
    poison: &mut Vec<u64>,
    generations: &mut Generations,
    first: (Message, Vec<OwnedFd>),
) -> Result<(), BackendError> {
    let blk = BlkConfig {
        sectors: cfg.disk.sectors,
        readonly: cfg.disk.readonly,
        discard: cfg.disk.discard,
        write_zeroes: !cfg.disk.readonly,
        serial: BlkConfig::serial_for(&cfg.device),
    };
    let mut lp = VirtioLoop {
        engine,
        control,
        cfg,
        poison,
        blk,
        device: None,
        generations,
        stats: BlkbackStats::default(),
        completions: Vec::with_capacity(256),
        chain: Chain::default(),
        data: Vec::with_capacity(CHAIN_CAP),
        ranges: Vec::with_capacity(MAX_DISCARD_SEG as usize),
    };
    tracing::info!(device = %cfg.device, "serving virtqueues");
    lp.handle_message(first.0, first.1)?;
    let result = event_loop::run(&mut lp);
    tracing::info!(device = %cfg.device, stats = ?lp.stats, "virtio loop done");
    result
}

impl VirtioLoop<'_> {
    /// Room in the engine for one more request of the worst kind, beside
    /// the control and kick polls.
    fn engine_has_room(&self) -> bool {
        let reserve = MAX_OPS_PER_REQUEST + 1 + MAX_QUEUES;
        self.engine.capacity() - self.engine.in_flight() > reserve
    }

    /// Takes every request queue `qi` holds (as far as the engine has
    /// room): walk, parse, log, execute.
    fn consume_queue(&mut self, qi: usize) -> Result<(), BackendError> {
        let mut budget = WALK_BUDGET;
        loop {
            // Out of budget: `has_work` brings the loop straight back.
            if !self.engine_has_room() || budget == 0 {
                return Ok(());
            }
            let Some(dev) = self.device.as_mut() else {
                return Ok(());
            };
            if dev.closing {
                return Ok(());
            }
            let mem = dev.mem.clone();
            let q = &mut dev.queues[qi];
            if q.broken || !q.replay_queue.is_empty() {
                return Ok(());
            }
            let next16 = guest_index(q.next_avail, q.delta);
            let avail16 = match q.ring.avail_idx(&mem) {
                Ok(a) => a,
                Err(e) => return self.queue_broken(qi, &e.to_string()),
            };
            if avail16 == next16 {
                if !q.ring.event_idx {
                    return Ok(());
                }
                // EVENT_IDX: ask for a kick at the next index, then check
                // again (the driver may have added one before seeing it).
                if q.ring.set_avail_event(&mem, next16).is_err() {
                    return self.queue_broken(qi, "avail_event not writable");
                }
                // SeqCst fence: avail_event is visible before avail->idx is
                // re-read (§2.7.10, the device-side mb()).
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                match q.ring.avail_idx(&mem) {
                    Ok(a) if a == next16 => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return self.queue_broken(qi, &e.to_string()),
                }
            }
            if avail16.wrapping_sub(next16) > q.size() {
                let why = format!("avail index {avail16} is more than a ring ahead of {next16}");
                return self.queue_broken(qi, &why);
            }
            let head = match q.ring.avail_head(&mem, next16) {
                Ok(h) => h,
                Err(e) => return self.queue_broken(qi, &e.to_string()),
            };
            if head >= q.size() {
                return self.queue_broken(qi, &format!("avail head {head} out of range"));
            }
            if q.slots[usize::from(head)].is_some() {
                return self.queue_broken(qi, &format!("head {head} made available twice"));
            }
            let walked = q.ring.walk(&mem, head, CHAIN_CAP, &mut self.chain);
            budget = budget.saturating_sub(self.chain.descriptors_read.max(1));
            let parsed = parse(
                &mem,
                walked.as_ref().map(|()| &self.chain).map_err(|e| *e),
                &self.blk,
                &mut self.data,
                &mut self.ranges,
            );
            if let Err(e) = &walked {
                tracing::debug!(device = %self.cfg.device, head, error = %e, "bad chain");
            }
            // The in-flight region first: a head it marks but the shadow
            // log lacks is consumed again from the avail ring by a
            // log-driven recovery, while region-only recovery counts it.
            if let Some(iq) = q.inflight.as_ref() {
                if let Err(e) = iq.begin(head, q.counter) {
                    tracing::warn!(device = %self.cfg.device, error = %e, "in-flight region update failed");
                }
                q.counter += 1;
            }
            // docs/ARCHITECTURE.md §7.1: logged before any of it is executed.
            let entry = match q.log.as_ref() {
                None => None,
                Some(log) => {
                    let bytes = vblk::request(head, next16, q.index, parsed.header);
                    match log.log_consumed(q.next_avail, &bytes) {
                        Ok(e) => Some(e),
                        Err(e) => log_failed(&self.cfg.device, e),
                    }
                }
            };
            q.next_avail = q.next_avail.wrapping_add(1);
            self.stats.requests += 1;
            self.check_poison(&parsed);
            self.start(qi, head, entry, parsed);
            submit_burst(self.engine, self.stats.requests)?;
        }
    }

    /// The driver broke queue `qi`: stop consuming from it and tell the
    /// supervisor (requests in flight still complete).
    fn queue_broken(&mut self, qi: usize, why: &str) -> Result<(), BackendError> {
        let Some(dev) = self.device.as_mut() else {
            return Ok(());
        };
        let q = &mut dev.queues[qi];
        if q.broken {
            return Ok(());
        }
        q.broken = true;
        tracing::warn!(device = %self.cfg.device, queue = q.index, why, "virtqueue broken, not consuming from it");
        let msg = Message::new(kind::DISCONNECT)
            .with(key::FRONTEND, &dev.name)
            .with(key::QUEUE, q.index)
            .with(key::REASON, sanitize(why));
        self.control.send(&msg, &[]).map_err(control_err)
    }

    /// Fault injection: a request covering a poisoned sector kills this
    /// instance.
    fn check_poison(&self, parsed: &Parsed) {
        if self.poison.is_empty() {
            return;
        }
        let hit = |start: u64, sectors: u64| poisoned(self.poison, start, sectors);
        let poisoned = match parsed.action {
            Action::Read { offset, bytes } | Action::Write { offset, bytes } => {
                hit(offset / SECTOR_SIZE, bytes / SECTOR_SIZE)
            }
            Action::Discard | Action::WriteZeroes { .. } => self
                .ranges
                .iter()
                .any(|&(o, l)| hit(o / SECTOR_SIZE, l / SECTOR_SIZE)),
            _ => false,
        };
        if poisoned {
            tracing::error!(device = %self.cfg.device, sector = parsed.header.sector, "poisoned request: aborting (fault injection)");
            std::process::abort();
        }
    }

    /// Executes a parsed request (its data pieces and ranges are in the
    /// scratch vectors) or answers it at once.
    fn start(&mut self, qi: usize, head: u16, entry: Option<EntryId>, parsed: Parsed) {
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        let generation = dev.generation;
        let mem = dev.mem.clone();
        let mut ops: Vec<IoOp> = Vec::new();
        let mut pending = Pending {
            entry,
            status_at: parsed.status_at,
            ops_left: 0,
            status: STATUS_OK,
            expected: 0,
            used_len: 1,
            read: false,
        };
        let immediate = match parsed.action {
            Action::Done(status) => Some(status),
            Action::GetId { bytes } => {
                let mut at = 0usize;
                let mut ok = true;
                for &(gpa, len) in &self.data {
                    let end = (at + len).min(self.blk.serial.len());
                    ok &= mem.write(gpa, &self.blk.serial[at..end]).is_ok();
                    at = end;
                }
                pending.used_len = bytes + 1;
                Some(if ok { STATUS_OK } else { STATUS_IOERR })
            }
            Action::Read { offset, bytes } | Action::Write { offset, bytes } => {
                let read = matches!(parsed.action, Action::Read { .. });
                match IoBuffers::from_ranges(mem.clone(), &self.data) {
                    Ok(bufs) => {
                        pending.expected = bytes;
                        pending.read = read;
                        if read {
                            // The walk bounds a chain to 4 GiB.
                            pending.used_len = u32::try_from(bytes + 1).unwrap_or(u32::MAX);
                            ops.push(IoOp::Readv { offset, bufs });
                        } else {
                            ops.push(IoOp::Writev { offset, bufs });
                        }
                        None
                    }
                    Err(e) => {
                        tracing::warn!(device = %self.cfg.device, error = %e, "buffer setup failed");
                        Some(STATUS_IOERR)
                    }
                }
            }
            Action::Flush => {
                ops.push(IoOp::Fsync);
                None
            }
            Action::Discard | Action::WriteZeroes { .. } => {
                let punch = matches!(
                    parsed.action,
                    Action::Discard | Action::WriteZeroes { unmap: true }
                );
                ops.extend(self.ranges.iter().map(|&(offset, len)| {
                    if punch {
                        IoOp::PunchHole { offset, len }
                    } else {
                        IoOp::ZeroRange { offset, len }
                    }
                }));
                if ops.is_empty() {
                    Some(STATUS_OK)
                } else {
                    None
                }
            }
        };
        if let Some(status) = immediate {
            let len = if status == STATUS_OK {
                pending.used_len
            } else {
                1
            };
            self.respond(qi, head, entry, parsed.status_at, status, len);
            return;
        }
        let q = &mut dev.queues[qi];
        q.in_flight += 1;
        let token = Token::Io {
            generation,
            ring: qi as u8,
            slot: head,
        }
        .encode();
        for op in ops {
            match self.engine.push(token, op) {
                Ok(()) => pending.ops_left += 1,
                Err((e, _op)) => {
                    // The engine is sized with room to spare: the kernel
                    // refused. Fail the request on the completion path.
                    tracing::warn!(device = %self.cfg.device, error = %e, "submission failed");
                    pending.status = STATUS_IOERR;
                }
            }
        }
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        let q = &mut dev.queues[qi];
        if pending.ops_left == 0 {
            q.in_flight -= 1;
            self.respond(qi, head, entry, parsed.status_at, STATUS_IOERR, 1);
        } else {
            q.slots[usize::from(head)] = Some(pending);
        }
    }

    /// Writes the status byte and the used element for `head` and logs it
    /// COMPLETING (docs/ARCHITECTURE.md §7.1); published in [`EventLoop::publish`].
    fn respond(
        &mut self,
        qi: usize,
        head: u16,
        entry: Option<EntryId>,
        status_at: Option<u64>,
        status: u8,
        len: u32,
    ) {
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        if status != STATUS_OK {
            self.stats.errors += 1;
        }
        let len = match status_at {
            Some(at) if dev.mem.write(at, &[status]).is_ok() => len,
            _ => 0,
        };
        let q = &mut dev.queues[qi];
        let idx = q.next_used;
        if let Err(e) = q
            .ring
            .write_used(&dev.mem, guest_index(idx, q.delta), u32::from(head), len)
        {
            tracing::error!(device = %self.cfg.device, error = %e, "cannot write a used element");
            return;
        }
        if let (Some(log), Some(entry)) = (q.log.as_ref(), entry) {
            if let Err(e) = log.log_completing(entry, idx, &vblk::response(head, len, status)) {
                log_failed(&self.cfg.device, e);
            }
        }
        q.next_used = idx.wrapping_add(1);
        q.batch.push(head);
    }

    /// Re-walks the chain at `head` (still owned by the device: its used
    /// entry was never visible) and executes it again.
    fn reexecute(&mut self, qi: usize, head: u16, entry: Option<EntryId>) {
        let Some(parsed) = self.walk_and_parse(qi, head) else {
            return;
        };
        self.check_poison(&parsed);
        self.start(qi, head, entry, parsed);
    }

    /// Answers `head` with IOERR without executing it (poisoned or
    /// corrupt entries).
    fn fail(&mut self, qi: usize, head: u16, entry: EntryId) {
        let Some(parsed) = self.walk_and_parse(qi, head) else {
            return;
        };
        self.respond(qi, head, Some(entry), parsed.status_at, STATUS_IOERR, 1);
    }

    /// Walks the chain at `head` of queue `qi` again and parses it; `None`
    /// without an attached device.
    fn walk_and_parse(&mut self, qi: usize, head: u16) -> Option<Parsed> {
        let dev = self.device.as_mut()?;
        let mem = dev.mem.clone();
        let q = &dev.queues[qi];
        let walked = q.ring.walk(&mem, head, CHAIN_CAP, &mut self.chain);
        Some(parse(
            &mem,
            walked.as_ref().map(|()| &self.chain).map_err(|e| *e),
            &self.blk,
            &mut self.data,
            &mut self.ranges,
        ))
    }

    fn handle_message(&mut self, msg: Message, fds: Vec<OwnedFd>) -> Result<(), BackendError> {
        if let Some(done) = fault_injection(&msg, &self.cfg.device, self.poison, self.control) {
            return done;
        }
        let send = |m: &Message| self.control.send(m, &[]).map_err(control_err);
        match msg.kind() {
            ATTACH_VIRTIO => {
                let result = self.attach(&msg, fds);
                if let Err((_, why)) = &result {
                    tracing::warn!(device = %self.cfg.device, why, "attach-virtio refused");
                }
                send(&attach_reply(result))
            }
            kind::ATTACH => send(&Message::error(
                ErrorCode::Ebusy,
                "this instance serves virtqueues",
            )),
            kind::SET_CALL => {
                let reply = match self.set_call(&msg, fds) {
                    Ok(()) => Message::new(kind::OK),
                    Err(why) => Message::error(ErrorCode::Einval, &sanitize(&why)),
                };
                send(&reply)
            }
            kind::DETACH => match self.device.as_mut() {
                Some(dev) => {
                    dev.closing = true;
                    Ok(())
                }
                None => send_detached(self.control, None),
            },
            other => refuse_unexpected(self.control, other),
        }
    }

    /// `set-call queue=<virtqueue index>` with the new call eventfd.
    fn set_call(&mut self, msg: &Message, mut fds: Vec<OwnedFd>) -> Result<(), String> {
        let index = msg.require_u16(key::QUEUE).map_err(|e| e.to_string())?;
        if fds.len() != 1 {
            return Err(format!("set-call carries {} fds, expected 1", fds.len()));
        }
        let dev = self.device.as_mut().ok_or("no device attached")?;
        let q = dev
            .queues
            .iter_mut()
            .find(|q| q.index == index)
            .ok_or_else(|| format!("no queue {index}"))?;
        let fd = fds.pop().ok_or("no fd")?;
        q.call = EventChannel::from_fd(fd).map_err(|e| e.to_string())?;
        // A notification may have gone to the old eventfd while the VMM was
        // switching: one spurious interrupt is harmless, a lost one hangs.
        let _ = q.call.notify();
        tracing::info!(device = %self.cfg.device, queue = index, "call eventfd replaced");
        Ok(())
    }

    /// Maps memory and rings, recovers each queue and starts serving.
    fn attach(
        &mut self,
        msg: &Message,
        fds: Vec<OwnedFd>,
    ) -> Result<RecoveryStats, (ErrorCode, String)> {
        if self.device.is_some() {
            return Err((ErrorCode::Ebusy, "a device is already attached".into()));
        }
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = VirtioAttachRequest::from_message(msg).map_err(|e| inval(&e))?;
        let AttachFlags { recover, blame } = AttachFlags::from_message(msg)?;
        let vfds = VirtioFds::from_received(&req, fds).map_err(|e| inval(&e))?;
        if req.queues.is_empty() {
            return Err((ErrorCode::Einval, "no queues".into()));
        }
        let mut seen = [false; MAX_QUEUES];
        for q in &req.queues {
            let slot = seen.get_mut(usize::from(q.index)).ok_or_else(|| {
                (
                    ErrorCode::Einval,
                    format!("queue index {} too large", q.index),
                )
            })?;
            if std::mem::replace(slot, true) {
                return Err((ErrorCode::Einval, format!("queue {} given twice", q.index)));
            }
        }
        let mem = Arc::new(GuestRam::map(&req.regions, vfds.regions).map_err(|e| inval(&e))?);
        let event_idx = req.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let rings = req
            .queues
            .iter()
            .map(|q| {
                SplitQueue::new(q, &mem, event_idx)
                    .map_err(|e| (ErrorCode::Einval, format!("queue {}: {e}", q.index)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let region = match (req.inflight, vfds.inflight) {
            (Some(cfg), Some(fd)) => Some(Arc::new(
                InflightRegion::map(fd, &cfg).map_err(|e| inval(&e))?,
            )),
            _ => None,
        };
        let started = std::time::Instant::now();
        let mut stats = RecoveryStats::default();
        let mut logs: Vec<Option<ShadowLog>> = Vec::new();
        let mut fresh_logs = Vec::new();
        if self.cfg.shadow && req.shadow {
            for (fd, ring) in vfds.logs.into_iter().zip(&rings) {
                let (log, generation) =
                    open_shadow_log(&self.cfg.crash_at, fd).map_err(|e| inval(&e))?;
                if log.entries() != u32::from(ring.size) {
                    return Err((
                        ErrorCode::Einval,
                        format!("shadow log does not have {} entries", ring.size),
                    ));
                }
                stats.generation = stats.generation.max(generation);
                fresh_logs.push(generation == 1);
                logs.push(Some(log));
            }
        } else {
            logs.extend(req.queues.iter().map(|_| None));
            fresh_logs.extend(req.queues.iter().map(|_| true));
        }

        let region_hook = self
            .cfg
            .crash_at
            .region
            .filter(|_| fresh_logs.iter().all(|&f| f))
            .map(region_crash_hook);
        let generation = self.generations.new_attachment();
        let mut queues = Vec::with_capacity(req.queues.len());
        let mut replays = Vec::with_capacity(req.queues.len());
        for ((((qcfg, ring), (kick, call)), log), fresh) in req
            .queues
            .iter()
            .zip(rings)
            .zip(vfds.queues)
            .zip(logs)
            .zip(fresh_logs)
        {
            let kick = EventChannel::from_fd(kick).map_err(|e| inval(&e))?;
            let call = EventChannel::from_fd(call).map_err(|e| inval(&e))?;
            let inflight = match &region {
                Some(r) => {
                    let mut iq = r.queue(qcfg.index, qcfg.size).map_err(|e| inval(&e))?;
                    iq.set_crash_hook(region_hook.clone());
                    Some(iq)
                }
                None => None,
            };
            let mut q = VQueue {
                index: qcfg.index,
                ring,
                kick,
                call,
                log,
                inflight,
                counter: 1,
                delta: 0,
                next_avail: 0,
                next_used: 0,
                published: 0,
                slots: vec![None; usize::from(qcfg.size)],
                in_flight: 0,
                batch: Vec::with_capacity(usize::from(qcfg.size)),
                replay_queue: SerialReplay::default(),
                broken: false,
            };
            let replay = recover_queue(&mut q, &mem, qcfg.next_avail, recover, fresh)?;
            queues.push(q);
            replays.push(replay);
        }
        self.device = Some(Device {
            name: req.frontend.clone(),
            generation,
            mem,
            queues,
            closing: false,
        });
        for (qi, replay) in replays.into_iter().enumerate() {
            self.apply_replay(qi, replay, blame, &mut stats)
                .map_err(|e| (ErrorCode::Eproto, format!("replay failed: {e}")))?;
        }
        stats.replay_us = started.elapsed().as_micros() as u64;
        // The driver may be asleep waiting for responses the dead instance
        // owed it: publish and notify unconditionally.
        self.publish();
        let Some(dev) = self.device.as_ref() else {
            return Err((ErrorCode::Enodev, "device gone".into()));
        };
        let kicks: Vec<(u8, i32)> = dev
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let _ = q.call.notify();
                (i as u8, q.kick.as_raw_fd())
            })
            .collect();
        for (ring, fd) in kicks {
            arm(self.engine, Token::Kick { generation, ring }, fd)
                .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        }
        tracing::info!(device = %self.cfg.device, queues = req.queues.len(), event_idx, recover, ?stats, "virtio device attached");
        Ok(stats)
    }

    /// Replay (docs/ARCHITECTURE.md §7.5) for one queue, after it is set
    /// up: re-push saved used elements, free what the driver has seen, fail
    /// poisoned and corrupt requests, re-execute the rest in seq order (or
    /// resubmit the in-flight region's heads).
    fn apply_replay(
        &mut self,
        qi: usize,
        replay: Replay,
        blame: bool,
        stats: &mut RecoveryStats,
    ) -> Result<(), String> {
        let plan = match replay {
            Replay::None => return Ok(()),
            Replay::Region(heads) => {
                // Adopt every head into the log first and mark it complete
                // only then: an instance dying half-way leaves an
                // incomplete log, and its successor adopts the region
                // again (see `recover_queue`).
                let dev = self.device.as_mut().ok_or("no device")?;
                let q = &mut dev.queues[qi];
                let mut adopted = Vec::with_capacity(heads.len());
                for head in heads {
                    let entry = match q.log.as_ref() {
                        Some(log) => {
                            let avail16 = guest_index(q.next_avail, q.delta);
                            // The header is not known before the re-walk.
                            let bytes = vblk::request(head, avail16, q.index, OutHdr::default());
                            Some(
                                log.log_consumed(q.next_avail, &bytes)
                                    .map_err(|e| e.to_string())?,
                            )
                        }
                        None => None,
                    };
                    q.next_avail = q.next_avail.wrapping_add(1);
                    adopted.push((head, entry));
                }
                if let Some(log) = q.log.as_ref() {
                    log.mark_complete().map_err(|e| e.to_string())?;
                }
                for (head, entry) in adopted {
                    stats.replayed += 1;
                    self.reexecute(qi, head, entry);
                }
                return Ok(());
            }
            Replay::Plan(plan) => plan,
        };
        let size = self
            .device
            .as_ref()
            .ok_or("no device")?
            .queues
            .get(qi)
            .ok_or("no queue")?
            .size();
        let mut target = QueueReplay {
            lp: self,
            qi,
            size,
            live: vec![false; usize::from(size)],
        };
        recovery::apply_plan(&mut target, &plan, blame, stats)
    }
}

/// One virtqueue as the recovery applier sees it. A virtqueue replays
/// from the ring: a head stays the device's until its used entry is
/// visible, so the chain is walked again (docs/ARCHITECTURE.md §7.4). Heads
/// are the driver's, so a corrupt entry naming a head another live request
/// holds is not answered.
struct QueueReplay<'l, 'a> {
    lp: &'l mut VirtioLoop<'a>,
    qi: usize,
    size: u16,
    /// Heads with a live request.
    live: Vec<bool>,
}

impl QueueReplay<'_, '_> {
    fn queue(&mut self) -> Result<(&GuestRam, &mut VQueue), String> {
        let dev = self.lp.device.as_mut().ok_or("no device")?;
        let q = dev.queues.get_mut(self.qi).ok_or("no queue")?;
        Ok((&dev.mem, q))
    }
}

impl ReplayTarget for QueueReplay<'_, '_> {
    type Request = u16;

    fn device(&self) -> &str {
        &self.lp.cfg.device
    }

    fn log(&self) -> Option<&ShadowLog> {
        self.lp.device.as_ref()?.queues.get(self.qi)?.log.as_ref()
    }

    fn repush(&mut self, r: &Repush) -> Result<(), String> {
        let size = self.size;
        let (id, len) = vblk::saved_used_elem(&r.response);
        let Some(head) = u16::try_from(id).ok().filter(|&h| h < size) else {
            return Err(format!("saved used element names head {id}"));
        };
        let (mem, q) = self.queue()?;
        if r.rsp_idx != q.next_used {
            return Err(format!(
                "re-push at {}, expected {}",
                r.rsp_idx, q.next_used
            ));
        }
        q.ring
            .write_used(mem, guest_index(r.rsp_idx, q.delta), id, len)
            .map_err(|e| e.to_string())?;
        q.log
            .as_ref()
            .ok_or("no shadow log")?
            .log_repushed(r.entry, r.rsp_idx)
            .map_err(|e| e.to_string())?;
        q.next_used = r.rsp_idx.wrapping_add(1);
        q.batch.push(head);
        self.live[usize::from(head)] = true;
        Ok(())
    }

    fn locate(&self, record: &[u8; REQUEST_SIZE]) -> Option<u16> {
        vblk::logged_head(record)
            .map(|(head, _)| head)
            .filter(|&head| head < self.size)
    }

    fn claim(&mut self, head: &u16) -> bool {
        match self.live.get_mut(usize::from(*head)) {
            Some(live) => !std::mem::replace(live, true),
            None => false,
        }
    }

    fn fail(&mut self, head: u16, entry: EntryId) -> Result<(), String> {
        self.lp.fail(self.qi, head, entry);
        Ok(())
    }

    fn reexecute(&mut self, head: u16, entry: EntryId) -> Result<(), String> {
        self.lp.reexecute(self.qi, head, Some(entry));
        Ok(())
    }

    fn replay_serially(&mut self, queue: SerialReplay<u16>) {
        if let Ok((_, q)) = self.queue() {
            q.replay_queue = queue;
        }
    }

    fn describe(&self, head: &u16) -> String {
        format!("head {head}")
    }
}

/// Fault injection: a hook that aborts the process at `point` on its
/// `nth` occurrence over all queues (an update with fewer stores than the
/// point's step does not count).
fn region_crash_hook((point, nth): (RegionCrashPoint, u64)) -> RegionCrashHook {
    let hits = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |at: RegionCrashPoint, stores: u32| {
        if at == point
            && stores >= point.step
            && hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == nth
        {
            tracing::error!(%at, "crash point reached: aborting (fault injection)");
            std::process::abort();
        }
    })
}

/// Index of a queue from its token byte.
fn qi_of(queue: u8) -> usize {
    usize::from(queue)
}

/// Decides where queue `q` resumes and what it must replay, and rewrites
/// the in-flight region to match (docs/ARCHITECTURE.md §7.4):
///
/// - a *complete* shadow log is the only authority: its live entries are
///   planned (re-push, re-execute, fail), and without any the queue
///   resumes at `used->idx` with nothing in flight. The in-flight region
///   is never read then: it lags the driver by up to a batch (cleared one
///   head at a time after `used->idx` moves), and resubmitting from it
///   re-executes heads the driver has already seen answered and reused;
/// - a log that is not complete yet, beside an in-flight region (the
///   first instance after a restart of the supervisor, or its successor
///   if it died before it was done): the region says what is in flight;
///   whatever a dead instance half-adopted into the log is dropped and the
///   region adopted again, then the log is marked complete;
/// - a log without a region: the log, as for a complete one;
/// - a region without a log (`shadow = false`): the region;
/// - neither: nothing is in flight; resume at `SET_VRING_BASE` on a first
///   attach, else at `used->idx`.
fn recover_queue(
    q: &mut VQueue,
    mem: &GuestRam,
    vring_base: u16,
    recover: bool,
    fresh_log: bool,
) -> Result<Replay, (ErrorCode, String)> {
    let proto = |s: String| (ErrorCode::Eproto, s);
    let size = q.size();
    let used16 = q.ring.used_idx(mem).map_err(|e| proto(e.to_string()))?;
    let avail16 = q.ring.avail_idx(mem).map_err(|e| proto(e.to_string()))?;
    let snapshot = match q.log.as_ref() {
        Some(log) => Some(log.snapshot().map_err(|e| proto(e.to_string()))?),
        None => None,
    };
    let live = |snap: &shadowback_shadow::LogSnapshot| {
        snap.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state() != Some(EntryState::Free))
            .map(|(i, _)| EntryId(i as u32))
            .collect::<Vec<_>>()
    };
    let adopt_region =
        q.inflight.is_some() && snapshot.as_ref().is_some_and(|s| !s.header.complete);
    if let (Some(snap), false) = (snapshot.as_ref(), adopt_region) {
        if !live(snap).is_empty() {
            let plan = plan_from_log(q, snap, used16, avail16)?;
            return Ok(Replay::Plan(plan));
        }
    }
    let mut resubmit = Vec::new();
    let mut first16 = if fresh_log && !recover {
        vring_base
    } else {
        used16
    };
    if let Some(iq) = q.inflight.as_ref() {
        if q.log.is_none() || adopt_region {
            if let (Some(log), Some(snap)) = (q.log.as_ref(), snapshot.as_ref()) {
                let partial = live(snap);
                if !partial.is_empty() {
                    tracing::warn!(
                        queue = q.index,
                        entries = partial.len(),
                        "an instance died adopting the in-flight region: adopting it again"
                    );
                }
                for entry in partial {
                    log.free(entry).map_err(|e| proto(e.to_string()))?;
                }
            }
            let rec = iq
                .recover(used16, avail16)
                .map_err(|e| proto(e.to_string()))?;
            q.counter = rec.next_counter;
            if !rec.fresh {
                first16 = used16;
                resubmit = rec.heads;
            }
        } else {
            // The complete log holds nothing in flight: neither may the
            // region.
            q.counter = iq
                .reset_to(used16, &[], 1)
                .map_err(|e| proto(e.to_string()))?;
        }
    }
    let gap = first16.wrapping_sub(used16);
    if gap > size {
        return Err((
            ErrorCode::Einval,
            format!("next avail {first16} is more than a ring ahead of used {used16}"),
        ));
    }
    if gap > 0 {
        tracing::warn!(
            queue = q.index,
            gap,
            "requests consumed before attach will not be answered"
        );
    }
    let base = snapshot.as_ref().map_or(0, |s| s.header.req_cons);
    q.delta = first16.wrapping_sub(base as u16);
    q.next_avail = base;
    q.next_used = base.wrapping_sub(u32::from(gap));
    q.published = q.next_used;
    if resubmit.is_empty() {
        // Nothing to adopt: the log accounts for everything from here on.
        if let Some(log) = q.log.as_ref() {
            log.mark_complete().map_err(|e| proto(e.to_string()))?;
        }
        Ok(Replay::None)
    } else {
        Ok(Replay::Region(resubmit))
    }
}

/// The recovery plan of a queue whose shadow log holds live entries; sets
/// the queue's indices and rewrites the in-flight region to the heads the
/// driver still waits for.
fn plan_from_log(
    q: &mut VQueue,
    snap: &shadowback_shadow::LogSnapshot,
    used16: u16,
    avail16: u16,
) -> Result<RecoveryPlan, (ErrorCode, String)> {
    let proto = |s: String| (ErrorCode::Eproto, s);
    let size = q.size();
    // The mapping between log and guest indices, from the entry consumed
    // last.
    let delta = snap
        .entries
        .iter()
        .filter(|e| {
            matches!(
                e.state(),
                Some(EntryState::Inflight | EntryState::Completing)
            )
        })
        .filter_map(|e| vblk::logged_head(&e.request).map(|(_, a)| (e.seq, a, e.ring_idx)))
        .max_by_key(|&(seq, _, _)| seq)
        .map(|(_, avail16, ring_idx)| avail16.wrapping_sub(ring_idx as u16))
        .ok_or_else(|| proto("no live entry tells the ring position".into()))?;
    let h = &snap.header;
    let rsp_prod = extend_index(h.rsp_prod_pvt, delta, used16);
    let req_prod = extend_index(h.req_cons, delta, avail16);
    let plan = plan_recovery(snap, rsp_prod, req_prod, u32::from(size), POISON_THRESHOLD)
        .map_err(|e| proto(format!("recovery impossible: {e}")))?;
    let log = q
        .log
        .as_ref()
        .ok_or_else(|| proto("no shadow log".into()))?;
    log.log_recovered(&plan).map_err(|e| proto(e.to_string()))?;
    log.mark_complete().map_err(|e| proto(e.to_string()))?;
    q.delta = delta;
    q.next_avail = plan.req_cons;
    q.next_used = plan.rsp_prod;
    q.published = plan.rsp_prod;
    if let Some(iq) = q.inflight.as_ref() {
        // Every head the guest still waits for is in flight.
        let mut heads: Vec<u16> = plan
            .repush
            .iter()
            .filter_map(|r| u16::try_from(vblk::saved_used_elem(&r.response).0).ok())
            .collect();
        heads.extend(
            plan.poisoned
                .iter()
                .chain(&plan.reexecute)
                .filter_map(|e| vblk::logged_head(&e.request).map(|(h, _)| h)),
        );
        heads.extend(
            plan.corrupt_to_answer()
                .filter_map(|c| vblk::logged_head(&c.request).map(|(h, _)| h)),
        );
        heads.retain(|&h| h < size);
        heads.sort_unstable();
        heads.dedup();
        q.counter = iq
            .reset_to(used16, &heads, 1)
            .map_err(|e| proto(e.to_string()))?;
    }
    Ok(plan)
}

impl EventLoop for VirtioLoop<'_> {
    fn engine(&mut self) -> &mut Engine {
        self.engine
    }

    fn control(&self) -> &SeqPacket {
        self.control
    }

    fn completions(&mut self) -> &mut Vec<Completion> {
        &mut self.completions
    }

    /// Serial replay: starts the next queued request of a queue once the
    /// previous one has completed.
    fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
        let n = self.device.as_ref().map_or(0, |d| d.queues.len());
        for qi in 0..n {
            let Some(dev) = self.device.as_mut() else {
                break;
            };
            // Also while a detach waits: the queued requests were consumed
            // and must be answered before `detached` (the VMM then restarts
            // the ring at `used->idx`).
            let q = &mut dev.queues[qi];
            let Some((entry, head)) =
                q.replay_queue
                    .next(q.in_flight, q.log.as_ref(), &self.cfg.device)
            else {
                continue;
            };
            self.reexecute(qi, head, Some(entry));
        }
        Ok(())
    }

    fn consume(&mut self) -> Result<(), BackendError> {
        let n = self.device.as_ref().map_or(0, |d| d.queues.len());
        for qi in 0..n {
            self.consume_queue(qi)?;
        }
        Ok(())
    }

    fn publish(&mut self) {
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        for q in &mut dev.queues {
            if q.batch.is_empty() {
                continue;
            }
            if let Some(iq) = q.inflight.as_ref() {
                if let Err(e) = iq.link_batch(&q.batch) {
                    tracing::warn!(device = %self.cfg.device, error = %e, "in-flight region update failed");
                }
            }
            let old = guest_index(q.published, q.delta);
            let new = guest_index(q.next_used, q.delta);
            if let Err(e) = q.ring.publish_used(&dev.mem, new) {
                tracing::error!(device = %self.cfg.device, error = %e, "cannot publish used entries");
                continue;
            }
            // docs/ARCHITECTURE.md §7.1, last step: free what is now visible.
            if let Some(log) = q.log.as_ref() {
                if let Err(e) = log.log_published(q.next_used) {
                    log_failed(&self.cfg.device, e);
                }
            }
            if let Some(iq) = q.inflight.as_ref() {
                if let Err(e) = iq.finish_batch(&q.batch, new) {
                    tracing::warn!(device = %self.cfg.device, error = %e, "in-flight region update failed");
                }
            }
            q.batch.clear();
            q.published = q.next_used;
            match q.ring.needs_notify(&dev.mem, old, new) {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    self.stats.notifications += 1;
                    if let Err(e) = q.call.notify() {
                        tracing::warn!(device = %self.cfg.device, error = %e, "notify failed");
                    }
                }
            }
        }
    }

    fn finish_detach(&mut self) -> Result<(), BackendError> {
        let Some(dev) = self.device.as_ref() else {
            return Ok(());
        };
        if !dev.closing
            || dev.in_flight() > 0
            || dev
                .queues
                .iter()
                .any(|q| !q.batch.is_empty() || !q.replay_queue.is_empty())
        {
            return Ok(());
        }
        let name = dev.name.clone();
        self.device = None;
        tracing::info!(device = %self.cfg.device, frontend = %name, "virtio device detached");
        send_detached(self.control, Some(&name))
    }

    fn heartbeat(&mut self) {
        let logs = self
            .device
            .iter()
            .flat_map(|dev| dev.queues.iter().filter_map(|q| q.log.as_ref()));
        event_loop::heartbeat(&self.cfg.device, logs);
    }

    /// Whether the loop must go round again without sleeping: a queue has
    /// requests and room to take them, or a serial replay can advance.
    fn has_work(&mut self) -> bool {
        let Some(dev) = self.device.as_ref() else {
            return false;
        };
        dev.queues.iter().any(|q| {
            if !q.replay_queue.is_empty() {
                return q.in_flight == 0;
            }
            !dev.closing
                && !q.broken
                && self.engine_has_room()
                && q.ring
                    .avail_idx(&dev.mem)
                    .is_ok_and(|a| a != guest_index(q.next_avail, q.delta))
        })
    }

    fn on_control(&mut self) -> Result<(), BackendError> {
        let (msg, fds) = recv_control(self.control)?;
        self.handle_message(msg, fds)
    }

    fn on_kick(&mut self, generation: u32, queue: u8) -> Result<(), BackendError> {
        let Some(dev) = self.device.as_mut() else {
            return Ok(());
        };
        if dev.generation != generation {
            return Ok(());
        }
        let Some(q) = dev.queues.get(usize::from(queue)) else {
            return Ok(());
        };
        self.stats.kicks += 1;
        let _ = q.kick.drain();
        let fd = q.kick.as_raw_fd();
        arm(
            self.engine,
            Token::Kick {
                generation,
                ring: queue,
            },
            fd,
        )
    }

    fn on_io(&mut self, generation: u32, queue: u8, head: u16, result: i32) {
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        if dev.generation != generation {
            return;
        }
        let Some(q) = dev.queues.get_mut(usize::from(queue)) else {
            return;
        };
        let Some(p) = q.slots.get_mut(usize::from(head)).and_then(|s| s.as_mut()) else {
            tracing::warn!(head, "completion for an idle head");
            return;
        };
        let ok = if result < 0 {
            if result == -libc::EOPNOTSUPP && p.expected == 0 {
                p.status = p.status.max(STATUS_UNSUPP);
            }
            false
        } else {
            u64::from(result as u32) == p.expected
        };
        if !ok {
            tracing::debug!(device = %self.cfg.device, head, result, "I/O failed");
            if p.status == STATUS_OK {
                p.status = STATUS_IOERR;
            }
        }
        p.ops_left -= 1;
        if p.ops_left > 0 {
            return;
        }
        let done = *p;
        q.slots[usize::from(head)] = None;
        q.in_flight -= 1;
        if done.status == STATUS_OK {
            if done.read {
                self.stats.bytes_read += done.expected;
            } else {
                self.stats.bytes_written += done.expected;
            }
        }
        let len = if done.status == STATUS_OK {
            done.used_len
        } else {
            1
        };
        self.respond(
            qi_of(queue),
            head,
            done.entry,
            done.status_at,
            done.status,
            len,
        );
    }
}
