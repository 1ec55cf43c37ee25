//! The one data-plane loop (docs/ARCHITECTURE.md §11.2): any
//! [`RingSet`] with any [`DeviceModel`], driven by [`event_loop::run`].
//!
//! Per ring it keeps the shadow log, the in-flight table (slot → logged
//! entry and the model's pending state; the slot is the `Io` token's),
//! and a serial replay; per attachment, where it stands on its way out.
//! The steps of one turn, the control dispatch, recovery and replay are
//! written once here; an [`AttachKind`] builds the rings and the model
//! from an attach message.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use shadowback_shadow::{
    EntryId, IoCounters, Latency, LogWriter, MetricsWriter, Repush, ShadowLog, REQUEST_SIZE,
};
use shadowback_xenbus::protocol::{key, kind, ErrorCode, QosLimits};
use shadowback_xenbus::{Message, SeqPacket};

use crate::control::{
    attach_reply, control_err, fault_injection, recv_control, refuse_unexpected, sanitize,
    send_detached, AttachFlags,
};
use crate::event_loop::{
    self, arm_kick, rearm_kick, submit_burst, BackendError, Closing, EventLoop, Generations, Token,
    COUNTER_OK,
};
use crate::model::{Answer, DeviceModel, Footprint, HeldEntries, Started, Submit, Traffic};
use crate::qos::Qos;
use crate::recovery::{self, log_failed, RecoveryStats, ReplayTarget, SerialReplay};
use crate::rings::{Recovery, RingSet, DETAIL_SIZE, TAKE_BUDGET};
use crate::uring::{Completion, Engine, IoOp};

/// Ring numbers a token carries (6 bits): the rings of an attachment, then
/// the model's sources.
const MAX_TOKEN_RINGS: usize = 64;

/// Counters of one backend process, over all its attachments.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopStats {
    /// Requests taken from the rings.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes moved, as the device model counts them.
    pub traffic: Traffic,
    /// Kicks received from the guest.
    pub kicks: u64,
    /// Notifications sent to the guest.
    pub notifications: u64,
}

/// What every loop of a process shares: the engine, the control socket,
/// attachment generations, fault injection and the counters. A process
/// that switches transport (a block backend taking `attach-virtio`) hands
/// the same core to the next loop.
pub struct Core {
    /// Device name, for logs.
    pub device: String,
    pub engine: Engine,
    pub control: SeqPacket,
    pub generations: Generations,
    /// Fault injection: taking a request that covers one of these sectors
    /// aborts the process (`poison` from the supervisor).
    pub poison: Vec<u64>,
    pub stats: LoopStats,
    /// Adaptive polling: how long the loop polls after activity before it
    /// sleeps (`poll_us` of the device; zero: never polls).
    pub poll_window: Duration,
    /// Completion latency of this process's requests (docs/ARCHITECTURE.md §4.1).
    pub latency: Latency,
    /// The device's metrics page, if the supervisor gave one.
    pub metrics: Option<MetricsWriter>,
    /// The device's IOPS and bandwidth limits (`qos`, or the instance's
    /// arguments).
    pub qos: Qos,
    /// The device's size in sectors once the supervisor resized it
    /// (`resize`); `None`: the size the process was started with. Later
    /// attachments in this process use it.
    pub capacity: Option<u64>,
}

impl Core {
    pub fn new(device: String, engine: Engine, control: SeqPacket) -> Self {
        Core {
            device,
            engine,
            control,
            generations: Generations::default(),
            poison: Vec::new(),
            stats: LoopStats::default(),
            poll_window: Duration::ZERO,
            latency: Latency::default(),
            metrics: None,
            qos: Qos::default(),
            capacity: None,
        }
    }

    /// How long until QoS lets the next request be taken; `None`: now
    /// (or no limit).
    fn throttled(&self) -> Option<Duration> {
        if self.qos.is_off() {
            return None;
        }
        self.qos.wait(Instant::now())
    }

    /// `qos` and `resize` (docs/PROTOCOL.md §6): the device's own settings
    /// changed at run time; `None` for any other message.
    fn reconfigure(&mut self, msg: &Message) -> Option<Result<Option<u64>, (ErrorCode, String)>> {
        let inval = |e: shadowback_xenbus::XenbusError| (ErrorCode::Einval, e.to_string());
        match msg.kind() {
            kind::QOS => Some(QosLimits::from_message(msg).map_err(inval).map(|limits| {
                tracing::info!(device = %self.device, ?limits, "QoS limits set");
                self.qos = Qos::new(limits, Instant::now());
                None
            })),
            kind::RESIZE => Some(msg.require_u64(key::SECTORS).map_err(inval).map(|sectors| {
                tracing::info!(device = %self.device, sectors, "disk resized");
                self.capacity = Some(sectors);
                Some(sectors)
            })),
            _ => None,
        }
    }

    /// This process's totals, as the metrics page counts them.
    fn io_counters(&self, in_flight: usize) -> IoCounters {
        IoCounters {
            requests: self.stats.requests,
            errors: self.stats.errors,
            bytes_to_guest: self.stats.traffic.to_guest,
            bytes_from_guest: self.stats.traffic.from_guest,
            in_flight: in_flight as u64,
            latency: self.latency,
            ..IoCounters::default()
        }
    }

    /// Copies the totals (`local`: from [`Core::io_counters`], as the model
    /// or the attach kind sees them) into the metrics page (throttled, see
    /// [`MetricsWriter::publish`]); `take_over`: this process starts
    /// serving the device.
    fn publish_metrics(&mut self, local: IoCounters, take_over: bool) {
        if let Some(m) = self.metrics.as_mut() {
            if take_over {
                m.take_over(&local);
            }
            m.publish(Instant::now(), &local, take_over);
        }
    }

    /// Sends a control message; a closed channel means the supervisor is
    /// gone.
    pub fn send(&self, msg: &Message) -> Result<(), BackendError> {
        self.control.send(msg, &[]).map_err(control_err)
    }

    /// Engine room for one more request of `ops` ops, beside the control
    /// poll and `rings` kick polls.
    fn has_room(&self, ops: usize, rings: usize) -> bool {
        let free = self
            .engine
            .capacity()
            .saturating_sub(self.engine.in_flight());
        free > ops + 1 + rings
    }
}

/// What an attach built: the rings, the model, and what recovery found.
pub struct Built<R: RingSet, M> {
    /// The frontend's name (for `detached` and `disconnect`).
    pub name: String,
    pub rings: R,
    pub model: M,
    /// One per ring, opened (`recovery::open_shadow_log`); `None` without
    /// the shadow layer.
    pub logs: Vec<Option<ShadowLog>>,
    /// One per ring: what recovery left to do.
    pub recoveries: Vec<Recovery<R::Request>>,
    /// The log generation; the other counters are filled by the loop.
    pub stats: RecoveryStats,
    /// When recovery started (for `replay-us`).
    pub started: std::time::Instant,
}

/// One attach message kind and what it builds.
pub trait AttachKind {
    type Rings: RingSet;
    type Model: DeviceModel<Self::Rings>;
    /// The control message that attaches (`attach`, `attach-virtio`).
    const KIND: &'static str;
    /// What it attaches, in log lines (`frontend`, `virtio device`).
    const WHAT: &'static str;

    /// Maps what the message names, opens the shadow logs and decides
    /// where each ring resumes; on error nothing is kept.
    fn build(
        &mut self,
        core: &mut Core,
        msg: &Message,
        fds: Vec<OwnedFd>,
        flags: AttachFlags,
    ) -> Result<Built<Self::Rings, Self::Model>, (ErrorCode, String)>;

    /// A control message the loop does not handle itself (a transport's
    /// own, such as `set-call`; another attach kind); `None` refuses it.
    fn on_other(
        &mut self,
        core: &mut Core,
        rings: Option<&mut Self::Rings>,
        msg: &Message,
        fds: Vec<OwnedFd>,
    ) -> Option<Result<(), BackendError>>;

    /// The reply to an attach (`attached` or the error), with what the kind
    /// adds (a vif's recovery counters).
    fn reply(&self, _model: Option<&Self::Model>, reply: Message) -> Message {
        reply
    }

    /// The attachment ended (or the loop did); the model is handed back
    /// (what outlives an attachment: the process's counters, buffers).
    fn detached(&mut self, _model: Self::Model) {}

    /// The process's counters for the metrics page while nothing is
    /// attached (see [`DeviceModel::io_counters`]).
    fn io_counters(&self, base: IoCounters) -> IoCounters {
        base
    }
}

/// A request the engine works on, or the model holds.
struct InFlight<P> {
    entry: Option<EntryId>,
    pending: P,
    /// When it was started, for its latency; `None` for a request the
    /// model holds ([`Started::Held`]: no engine op, not in flight, no
    /// latency — a posted receive buffer waits for the wire, not for the
    /// device to finish, so no clock is read for it).
    started: Option<Instant>,
}

impl<P> InFlight<P> {
    /// Held by the model: no engine op, answered through
    /// [`DeviceModel::next_answer`].
    fn held(&self) -> bool {
        self.started.is_none()
    }
}

/// One ring's loop state.
struct RingState<T, P> {
    /// The shadow log (absent with `--no-shadow`).
    log: Option<ShadowLog>,
    /// Requests in flight, by slot (the `Io` token's).
    slots: Vec<Option<InFlight<P>>>,
    free: Vec<u16>,
    /// Slots the model holds ([`Started::Held`]).
    held: usize,
    /// Serial replay after a suspected crash loop.
    replay: SerialReplay<T>,
    /// The guest broke the ring: take nothing more from it.
    broken: bool,
    /// A notification is on the engine, not reaped yet.
    notifying: bool,
    /// Answers put since the last publication (counted only with
    /// [`RingSet::PUBLISH_EVERY`]).
    put: u32,
    /// A publication in the middle of a drain found the guest asking for
    /// a notification: sent at the end of the turn.
    notify_owed: bool,
}

impl<T, P> RingState<T, P> {
    fn new(log: Option<ShadowLog>, size: u32) -> Self {
        // Rings have at most 32768 entries (virtqueues; a Xen ring 512).
        let size = size.min(1 << 15) as u16;
        RingState {
            log,
            slots: (0..size).map(|_| None).collect(),
            free: (0..size).rev().collect(),
            held: 0,
            replay: SerialReplay::default(),
            broken: false,
            notifying: false,
            put: 0,
            notify_owed: false,
        }
    }

    /// Requests the engine works on: taken slots the model does not
    /// hold.
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() - self.held
    }
}

/// The log of the ring a drain takes from, locked once for the drain
/// (docs/ARCHITECTURE.md §11.2): the consumed, completing and published
/// transitions logged while it takes go through this one writer — the
/// same stores and crash points as one call each, without a lock taken
/// per transition.
struct Draining<'l> {
    ring: usize,
    writer: LogWriter<'l>,
}

/// The log entries of one attachment's rings, as a model marks those of
/// its held requests ([`DeviceModel::ready`]).
struct Marks<'a, 'd, 'l, T, P> {
    device: &'a str,
    state: &'a [RingState<T, P>],
    /// The drained ring's log (out of `state` for the drain).
    draining: &'d mut Option<Draining<'l>>,
}

impl<T, P> HeldEntries for Marks<'_, '_, '_, T, P> {
    fn mark(&mut self, ring: usize, slot: u16, flags: u32) {
        let Some(st) = self.state.get(ring) else {
            return;
        };
        let entry = st
            .slots
            .get(usize::from(slot))
            .and_then(Option::as_ref)
            .filter(|f| f.held())
            .and_then(|f| f.entry);
        let Some(entry) = entry else {
            return;
        };
        let marked = match self.draining {
            Some(d) if d.ring == ring => Some(d.writer.set_progress(entry, flags)),
            _ => st.log.as_ref().map(|log| log.set_progress(entry, flags)),
        };
        if let Some(Err(e)) = marked {
            log_failed(self.device, e);
        }
    }
}

/// What a held-back request does once the fence is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeldAs {
    /// A logged request of an earlier instance: run again.
    Replay,
    /// A logged request recovery answers with an error (poisoned,
    /// corrupt).
    Fail,
    /// A request this instance took that overlaps one held back.
    Start,
}

/// One request held back until the fence.
struct Held<T> {
    ring: usize,
    entry: Option<EntryId>,
    request: T,
    what: HeldAs,
}

/// While I/O of an earlier instance may still be in the kernel (attached
/// with `fence=1`, until `fenced`): the requests held back and what they
/// may touch (docs/ARCHITECTURE.md §7.3). Everything an earlier instance
/// logged and did not answer waits — it may be in the kernel — and so does
/// every new request that conflicts with anything waiting; the rest is
/// served at once. Bounded: every entry is a request the guest has not
/// been answered, at most the rings' sizes.
pub(crate) struct Holding<T> {
    /// What the held requests, and those a serial replay queued, may touch.
    footprints: Vec<Footprint>,
    queue: VecDeque<Held<T>>,
}

impl<T> Default for Holding<T> {
    fn default() -> Self {
        Holding {
            footprints: Vec::new(),
            queue: VecDeque::new(),
        }
    }
}

impl<T> Holding<T> {
    /// Whether a request with footprint `f` must wait too.
    pub(crate) fn conflicts(&self, f: &Footprint) -> bool {
        self.footprints.iter().any(|h| h.conflicts(f))
    }

    /// Holds `request` back, in arrival order.
    fn hold(&mut self, held: Held<T>, footprint: Footprint) {
        self.footprints.push(footprint);
        self.queue.push_back(held);
    }

    /// Counts what may touch `footprint` without holding a request (a
    /// serial replay keeps its own queue).
    fn cover(&mut self, footprint: Footprint) {
        self.footprints.push(footprint);
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

/// One attached frontend.
struct Attachment<R: RingSet, M: DeviceModel<R>> {
    name: String,
    generation: u32,
    rings: R,
    model: M,
    state: Vec<RingState<R::Request, M::Pending>>,
    closing: Closing,
    /// Requests held back until an earlier instance's I/O is gone; `None`
    /// once it is (or was from the start).
    holding: Option<Holding<R::Request>>,
    /// The model's event sources polled ([`DeviceModel::source`]), one
    /// bit each.
    sources_armed: u64,
}

impl<R: RingSet, M: DeviceModel<R>> Attachment<R, M> {
    fn in_flight(&self) -> usize {
        self.state.iter().map(RingState::in_flight).sum()
    }

    fn has_room(&self, core: &Core) -> bool {
        // Each ring's kick read and notification beside the request, and
        // the poll of the model's source.
        core.has_room(
            M::MAX_OPS,
            2 * R::MAX_RINGS + self.sources_armed.count_ones() as usize,
        )
    }

    /// The token the model's source `n` is polled with: the rings after
    /// the last.
    fn source_token(&self, n: usize) -> Token {
        Token::Kick {
            generation: self.generation,
            ring: (self.rings.count() + n) as u8,
        }
    }

    /// Sources a token can name: ring numbers are 6 bits.
    fn source_count(&self) -> usize {
        self.model
            .sources()
            .min(MAX_TOKEN_RINGS.saturating_sub(self.rings.count()))
    }

    /// Polls each of the model's sources it has to watch that is not
    /// polled yet (end of a turn). An engine without room tries again
    /// next turn.
    fn arm_source(&mut self, core: &mut Core) {
        if self.closing == Closing::Broken {
            return;
        }
        for n in 0..self.source_count() {
            if self.sources_armed & (1 << n) != 0 {
                continue;
            }
            let Some(fd) = self.model.source(n) else {
                continue;
            };
            let token = self.source_token(n);
            let armed = if self.model.source_writable(n) {
                event_loop::arm_writable(&mut core.engine, token, fd)
            } else {
                event_loop::arm(&mut core.engine, token, fd)
            };
            match armed {
                Ok(()) => self.sources_armed |= 1 << n,
                Err(e) => {
                    tracing::warn!(device = %core.device, source = n, error = %e, "cannot poll the device's source");
                    return;
                }
            }
        }
    }

    /// The model's source `n` is ready: the model answers what it can.
    fn source_ready(&mut self, core: &mut Core, n: usize, result: i32) {
        self.sources_armed &= !(1 << n);
        if result < 0 {
            tracing::warn!(device = %core.device, source = n, result, "poll of the device's source failed");
        }
        loop {
            let mut marks = Marks {
                device: &core.device,
                state: &self.state,
                draining: &mut None,
            };
            let more = self.model.ready(n, &self.rings, &mut marks);
            self.take_answers(core, &mut None);
            self.publish_due(core, &mut None);
            if !more {
                break;
            }
        }
    }

    /// Puts and logs the model's answers to requests it held, in the order
    /// it queued them.
    fn take_answers(&mut self, core: &mut Core, draining: &mut Option<Draining<'_>>) {
        while let Some(answer) = self.model.next_answer() {
            self.answer_held(core, answer, draining);
        }
    }

    /// Frees the held slot an answer names and answers its request.
    fn answer_held(
        &mut self,
        core: &mut Core,
        answer: Answer<R::Response>,
        draining: &mut Option<Draining<'_>>,
    ) {
        let Answer {
            ring,
            slot,
            response,
        } = answer;
        let Some(st) = self.state.get_mut(ring) else {
            tracing::error!(device = %core.device, ring, "answer for no ring");
            return;
        };
        let held = st
            .slots
            .get_mut(usize::from(slot))
            .filter(|f| f.as_ref().is_some_and(InFlight::held))
            .and_then(Option::take);
        let Some(inflight) = held else {
            tracing::error!(device = %core.device, ring, slot, "answer for a slot not held");
            return;
        };
        st.held -= 1;
        st.free.push(slot);
        self.respond_or_warn(core, ring, inflight.entry, &response, draining);
    }

    /// Takes what each ring holds (as far as slots, engine room and the
    /// turn's budget allow): take, parse, log, execute.
    fn consume(&mut self, core: &mut Core) -> Result<(), BackendError> {
        for ring in 0..self.state.len() {
            // The ring's log leaves its state for the drain: its
            // transitions go through one writer (`Draining`) and it is
            // back before the next lock of it.
            let log = self.state[ring].log.take();
            let mut draining = log.as_ref().map(|log| match log.writer() {
                Ok(writer) => Draining { ring, writer },
                Err(e) => log_failed(&core.device, e),
            });
            let took = self.take_from(core, ring, &mut draining);
            if took.is_ok() {
                self.finish_drain(core, ring, &mut draining);
            }
            drop(draining);
            self.state[ring].log = log;
            took?;
        }
        Ok(())
    }

    /// The end of ring `ring`'s drain: the model answers what it
    /// collected (a TAP batch), answers put and published.
    fn finish_drain(&mut self, core: &mut Core, ring: usize, draining: &mut Option<Draining<'_>>) {
        loop {
            let mut marks = Marks {
                device: &core.device,
                state: &self.state,
                draining: &mut *draining,
            };
            let more = self.model.drained(&self.rings, ring, &mut marks);
            self.take_answers(core, draining);
            self.publish_due(core, draining);
            if !more {
                break;
            }
        }
    }

    /// Takes what ring `ring` holds, its log transitions through
    /// `draining` (`None` without a shadow log).
    fn take_from(
        &mut self,
        core: &mut Core,
        ring: usize,
        draining: &mut Option<Draining<'_>>,
    ) -> Result<(), BackendError> {
        let mut budget = TAKE_BUDGET;
        loop {
            let st = &self.state[ring];
            if self.closing != Closing::No
                || st.broken
                || !self.model.takes(ring)
                || !st.replay.is_empty()
                || budget == 0
                || !self.has_room(core)
            {
                break;
            }
            if st.free.is_empty() {
                // A slot per ring entry, every one taken (a network
                // model's held buffers): a request the ring still shows is
                // one more than it holds, whatever the transport.
                if self.rings.peek_requests(ring) {
                    self.ring_broken(core, ring, "more requests out than the ring has entries")?;
                }
                break;
            }
            // QoS: a throttled request stays on the ring; the loop
            // wakes when the buckets allow it (`wake_in`).
            if core.throttled().is_some() {
                break;
            }
            self.publish_due(core, draining);
            let taken = match self.rings.take(ring) {
                Ok(Some(taken)) => taken,
                Ok(None) => break,
                Err(why) => {
                    self.ring_broken(core, ring, &why)?;
                    break;
                }
            };
            budget = budget.saturating_sub(taken.cost.max(1));
            let parsed = self.model.parse(&self.rings, ring, &taken.request);
            if !core.qos.is_off() {
                // Admitted: `throttled` just said so.
                let _ = core.qos.admit(Instant::now());
                core.qos.charge(self.model.cost(&parsed));
            }
            self.rings.begin(ring, &taken.request);
            // docs/ARCHITECTURE.md §7.1: the request is in the log
            // before any of it is executed.
            let entry = match draining.as_mut() {
                None => None,
                Some(d) => {
                    let detail = self.model.detail(&parsed);
                    let record = self.rings.request_record(ring, &taken.request, &detail);
                    match d.writer.log_consumed(taken.log_index, record.as_slice()) {
                        Ok(entry) => Some(entry),
                        Err(e) => log_failed(&core.device, e),
                    }
                }
            };
            core.stats.requests += 1;
            self.check_poison(core, &parsed);
            if let Some(holding) = self.holding.as_mut() {
                // docs/ARCHITECTURE.md §7.3: a request that conflicts
                // with what an earlier instance may still have in the
                // kernel waits for the fence, behind it.
                let footprint = self.model.footprint(&parsed);
                if holding.conflicts(&footprint) {
                    let held = Held {
                        ring,
                        entry,
                        request: taken.request,
                        what: HeldAs::Start,
                    };
                    holding.hold(held, footprint);
                    continue;
                }
            }
            let Some(slot) = self.state[ring].free.pop() else {
                break;
            };
            self.start(core, ring, slot, entry, parsed, draining);
            if M::MAX_OPS > 0 {
                // A model without engine ops (a NIC's) has nothing to
                // hand the kernel.
                submit_burst(&mut core.engine, core.stats.requests)?;
            }
        }
        Ok(())
    }

    /// Fault injection: a request covering a poisoned sector kills this
    /// instance.
    fn check_poison(&self, core: &Core, parsed: &M::Request) {
        if !core.poison.is_empty() && self.model.poisoned(parsed, &core.poison) {
            tracing::error!(device = %core.device, "poisoned request: aborting (fault injection)");
            std::process::abort();
        }
    }

    /// Executes a parsed request in `slot` (owned by it from now on) or
    /// answers it at once.
    fn start(
        &mut self,
        core: &mut Core,
        ring: usize,
        slot: u16,
        entry: Option<EntryId>,
        parsed: M::Request,
        draining: &mut Option<Draining<'_>>,
    ) {
        let token = Token::Io {
            generation: self.generation,
            ring: ring as u8,
            slot,
        }
        .encode();
        let mut submit = Submit::new(&mut core.engine, token, &mut core.stats.traffic);
        // Starting one request may finish others the model held (the
        // earlier slots of a packet, or this one's too): their answers are
        // taken once it is in its slot, before its own answer.
        match self.model.start(parsed, &mut submit) {
            Started::Pending(pending) => {
                self.state[ring].slots[usize::from(slot)] = Some(InFlight {
                    entry,
                    pending,
                    started: Some(Instant::now()),
                });
                self.take_answers(core, draining);
            }
            Started::Held(pending) => {
                let st = &mut self.state[ring];
                st.slots[usize::from(slot)] = Some(InFlight {
                    entry,
                    pending,
                    started: None,
                });
                st.held += 1;
                self.take_answers(core, draining);
            }
            Started::Done(response) => {
                self.take_answers(core, draining);
                core.latency.record(Duration::ZERO);
                self.state[ring].free.push(slot);
                self.respond_or_warn(core, ring, entry, &response, draining);
            }
        }
    }

    /// Re-executes a logged request (replay): parsed again from what the
    /// ring says it is.
    fn execute(
        &mut self,
        core: &mut Core,
        ring: usize,
        entry: Option<EntryId>,
        request: R::Request,
    ) -> Result<(), String> {
        let slot = self.state[ring]
            .free
            .pop()
            .ok_or("more requests to replay than slots")?;
        self.rings.reload(ring, &request);
        let parsed = self.model.parse(&self.rings, ring, &request);
        self.check_poison(core, &parsed);
        self.start(core, ring, slot, entry, parsed, &mut None);
        Ok(())
    }

    /// What `request` of `ring` may touch, parsed again from what the ring
    /// says it is (a logged request, before it is held back).
    fn footprint_of(&mut self, ring: usize, request: &R::Request) -> Footprint {
        self.rings.reload(ring, request);
        let parsed = self.model.parse(&self.rings, ring, request);
        self.model.footprint(&parsed)
    }

    /// Holds back a logged request of an earlier instance (`what`: run it
    /// again or answer it with an error) until the fence, if one is
    /// pending; else hands it back.
    fn hold_logged(
        &mut self,
        ring: usize,
        entry: EntryId,
        request: R::Request,
        what: HeldAs,
    ) -> Option<R::Request> {
        if self.holding.is_none() {
            return Some(request);
        }
        let footprint = self.footprint_of(ring, &request);
        if let Some(holding) = self.holding.as_mut() {
            let held = Held {
                ring,
                entry: Some(entry),
                request,
                what,
            };
            holding.hold(held, footprint);
        }
        None
    }

    /// Answers a logged request with an error without running it.
    fn fail_logged(
        &mut self,
        core: &mut Core,
        ring: usize,
        entry: Option<EntryId>,
        request: &R::Request,
    ) -> Result<(), String> {
        self.rings.reload(ring, request);
        let response = self.model.fail(&self.rings, ring, request);
        self.respond(core, ring, entry, &response, &mut None)
    }

    /// `fenced`: no I/O of an earlier instance can reach the device any
    /// more; runs what was held back, in the order it was held, and lets
    /// serial replays go on.
    fn release(&mut self, core: &mut Core) {
        let Some(holding) = self.holding.take() else {
            return;
        };
        tracing::info!(device = %core.device, held = holding.len(), "fence down: running what was held back");
        for held in holding.queue {
            let Held {
                ring,
                entry,
                request,
                what,
            } = held;
            let done = match what {
                HeldAs::Replay | HeldAs::Start => self.execute(core, ring, entry, request),
                HeldAs::Fail => self.fail_logged(core, ring, entry, &request),
            };
            if let Err(e) = done {
                tracing::error!(device = %core.device, ring, error = %e, "held-back request failed");
            }
        }
    }

    /// Puts a response on the ring and logs it COMPLETING
    /// (docs/ARCHITECTURE.md §7.1); published in [`Attachment::publish`].
    fn respond(
        &mut self,
        core: &mut Core,
        ring: usize,
        entry: Option<EntryId>,
        response: &R::Response,
        draining: &mut Option<Draining<'_>>,
    ) -> Result<(), String> {
        if self.model.is_error(response) {
            core.stats.errors += 1;
        }
        let idx = self.rings.put(ring, response)?;
        if R::PUBLISH_EVERY.is_some() {
            self.state[ring].put += 1;
        }
        let Some(entry) = entry else {
            return Ok(());
        };
        let logged = match draining {
            Some(d) if d.ring == ring => {
                let record = self.rings.response_record(response);
                Some(d.writer.log_completing(entry, idx, record.as_slice()))
            }
            _ => self.state[ring].log.as_ref().map(|log| {
                let record = self.rings.response_record(response);
                log.log_completing(entry, idx, record.as_slice())
            }),
        };
        if let Some(Err(e)) = logged {
            log_failed(&core.device, e);
        }
        Ok(())
    }

    fn respond_or_warn(
        &mut self,
        core: &mut Core,
        ring: usize,
        entry: Option<EntryId>,
        response: &R::Response,
        draining: &mut Option<Draining<'_>>,
    ) {
        if let Err(e) = self.respond(core, ring, entry, response, draining) {
            tracing::error!(device = %core.device, ring, error = %e, "cannot put a response");
        }
    }

    /// The guest broke `ring`: stop taking from it (or, where a broken ring
    /// ends the attachment, from all) and tell the supervisor, which
    /// disconnects the guest. Requests in flight still complete.
    fn ring_broken(&mut self, core: &Core, ring: usize, why: &str) -> Result<(), BackendError> {
        let st = &mut self.state[ring];
        if st.broken {
            return Ok(());
        }
        st.broken = true;
        if R::BREAK_ENDS_ATTACHMENT {
            self.closing = Closing::Broken;
        }
        tracing::warn!(device = %core.device, frontend = %self.name, ring, why, "ring broken, not taking from it");
        let mut msg = Message::new(kind::DISCONNECT).with(key::FRONTEND, &self.name);
        if let Some(label) = self.rings.label(ring) {
            msg.set(key::QUEUE, label);
        }
        msg.set(key::REASON, sanitize(why));
        core.send(&msg)
    }

    /// Starts the next request of each serial replay once its ring has
    /// nothing in flight. Also while a detach waits: the queued requests
    /// were consumed and are answered before `detached`. Not once a broken
    /// ring ended the attachment.
    fn advance_serial_replay(&mut self, core: &mut Core) {
        if self.closing == Closing::Broken || self.holding.is_some() {
            return;
        }
        for ring in 0..self.state.len() {
            let st = &mut self.state[ring];
            let in_flight = st.in_flight();
            let Some((entry, request)) = st.replay.next(in_flight, st.log.as_ref(), &core.device)
            else {
                continue;
            };
            if let Err(e) = self.execute(core, ring, Some(entry), request) {
                tracing::error!(device = %core.device, ring, error = %e, "serial replay failed");
            }
        }
    }

    /// Makes the responses put since the last turn visible, logs them
    /// published (docs/ARCHITECTURE.md §7.1, last step: their entries are
    /// freed) and notifies at most once per ring.
    fn publish(&mut self, core: &mut Core) {
        for ring in 0..self.state.len() {
            let asked = self.publish_ring(core, ring, &mut None);
            let st = &mut self.state[ring];
            if asked || std::mem::take(&mut st.notify_owed) {
                core.stats.notifications += 1;
                self.notify(core, ring);
            }
        }
    }

    /// Publishes what ring `ring` has put and logs it published; whether
    /// the guest asked to be notified.
    fn publish_ring(
        &mut self,
        core: &Core,
        ring: usize,
        draining: &mut Option<Draining<'_>>,
    ) -> bool {
        self.state[ring].put = 0;
        let visible = match self.rings.publish(ring) {
            Ok(Some(idx)) => idx,
            Ok(None) => return false,
            Err(e) => {
                tracing::error!(device = %core.device, ring, error = %e, "cannot publish responses");
                return false;
            }
        };
        let logged = match draining {
            Some(d) if d.ring == ring => Some(d.writer.log_published(visible)),
            _ => self.state[ring]
                .log
                .as_ref()
                .map(|log| log.log_published(visible)),
        };
        if let Some(Err(e)) = logged {
            log_failed(&core.device, e);
        }
        self.rings.published(ring)
    }

    /// In the middle of a drain: publishes each ring that has put
    /// [`RingSet::PUBLISH_EVERY`] answers. The notification the guest asks
    /// for is owed to the end of the turn, so a drain wakes it once —
    /// unless at most half the ring is left to take: then it is sent at
    /// once (`write(2)`: the engine's would wait for the turn's end), so
    /// the guest refills the ring while the backend works through the
    /// rest instead of after it ran dry (docs/ARCHITECTURE.md §11.2).
    fn publish_due(&mut self, core: &mut Core, draining: &mut Option<Draining<'_>>) {
        let Some(every) = R::PUBLISH_EVERY else {
            return;
        };
        for ring in 0..self.state.len() {
            if self.state[ring].put < every {
                continue;
            }
            if self.publish_ring(core, ring, draining) {
                self.state[ring].notify_owed = true;
            }
            // The guest asks once (`rsp_event`) and waits: what an earlier
            // publication found asked for is sent once the ring runs low.
            let low = self.rings.size(ring) / 2;
            let running_low = |left: u32| left <= low;
            if !self.state[ring].notify_owed
                || !self.rings.requests_left(ring).is_some_and(running_low)
            {
                continue;
            }
            self.state[ring].notify_owed = false;
            core.stats.notifications += 1;
            if let Err(e) = self.rings.notify(ring) {
                tracing::warn!(device = %core.device, ring, error = %e, "notify failed");
            }
        }
    }

    /// Signals ring `ring`'s guest: through the engine, sent with the
    /// loop's next `io_uring_enter` (no syscall of its own); with a
    /// guarded `write(2)` at once while the previous one is still on the
    /// engine (it may have been sent before this publish) or the engine
    /// has no room.
    fn notify(&mut self, core: &mut Core, ring: usize) {
        let st = &mut self.state[ring];
        if !st.notifying {
            let token = Token::Notify {
                generation: self.generation,
                ring: ring as u8,
            };
            let fd = self.rings.notify_channel(ring).as_raw_fd();
            if core.engine.push(token.encode(), IoOp::signal(fd)).is_ok() {
                st.notifying = true;
                return;
            }
        }
        if let Err(e) = self.rings.notify(ring) {
            tracing::warn!(device = %core.device, ring, error = %e, "notify failed");
        }
    }

    /// The engine sent ring `ring`'s notification with `result`. One it
    /// could not send (a full counter: the guest has a wake-up pending;
    /// a fd that is not an eventfd) is sent the guarded way, which skips
    /// a full counter and reports the rest.
    fn notified(&mut self, core: &Core, ring: usize, result: i32) {
        let Some(st) = self.state.get_mut(ring) else {
            return;
        };
        st.notifying = false;
        if result != COUNTER_OK {
            if let Err(e) = self.rings.notify(ring) {
                tracing::warn!(device = %core.device, ring, error = %e, result, "notify failed");
            }
        }
    }

    /// Whether the loop must go round again without sleeping: a ring has
    /// requests and room to take them, or a serial replay can advance.
    /// `arm`: ask the guest to kick the rings found empty (before
    /// sleeping; not while busy or polling).
    fn has_work(&mut self, core: &Core, arm: bool) -> bool {
        // A throttled ring is not work: the loop sleeps until `wake_in`.
        let room = self.has_room(core) && core.throttled().is_none();
        for ring in 0..self.state.len() {
            let st = &self.state[ring];
            let more = if !st.replay.is_empty() {
                st.in_flight() == 0 && self.closing != Closing::Broken
            } else {
                self.closing == Closing::No
                    && !st.broken
                    && self.model.takes(ring)
                    && !st.free.is_empty()
                    && room
                    && if arm {
                        self.rings.has_requests(ring)
                    } else {
                        self.rings.peek_requests(ring)
                    }
            };
            if more {
                return true;
            }
        }
        false
    }

    /// Whether a closing attachment can let go: nothing in flight, queued
    /// or unpublished.
    fn idle(&self) -> bool {
        let replaying = self.closing != Closing::Broken
            && (self.holding.is_some() || self.state.iter().any(|s| !s.replay.is_empty()));
        self.in_flight() == 0
            && !replaying
            && (0..self.state.len()).all(|ring| !self.rings.unpublished(ring))
    }

    /// Applies what recovery left for `ring` (docs/ARCHITECTURE.md §7.5).
    fn recover(
        &mut self,
        core: &mut Core,
        ring: usize,
        recovery: Recovery<R::Request>,
        blame: bool,
        stats: &mut RecoveryStats,
    ) -> Result<(), String> {
        match recovery {
            Recovery::Nothing => Ok(()),
            Recovery::Plan(plan) => {
                let size = self.rings.size(ring) as usize;
                let mut target = ReplayRing {
                    att: self,
                    core,
                    ring,
                    live: vec![false; size],
                };
                recovery::apply_plan(&mut target, &plan, blame, stats)
            }
            Recovery::Adopt(requests) => {
                // Every request is logged before the log is marked
                // complete: an instance dying half-way leaves an
                // incomplete log, and its successor adopts again (§7.4).
                let mut adopted = Vec::with_capacity(requests.len());
                for (log_index, request) in requests {
                    let entry = match self.state[ring].log.as_ref() {
                        Some(log) => {
                            // What the device adds is not known before the
                            // request is read again.
                            let record =
                                self.rings.request_record(ring, &request, &[0; DETAIL_SIZE]);
                            Some(
                                log.log_consumed(log_index, record.as_slice())
                                    .map_err(|e| e.to_string())?,
                            )
                        }
                        None => None,
                    };
                    adopted.push((entry, request));
                }
                if let Some(log) = self.state[ring].log.as_ref() {
                    log.mark_complete().map_err(|e| e.to_string())?;
                }
                for (entry, request) in adopted {
                    stats.replayed += 1;
                    let request = match entry {
                        Some(e) => self.hold_logged(ring, e, request, HeldAs::Replay),
                        None => Some(request),
                    };
                    if let Some(request) = request {
                        self.execute(core, ring, entry, request)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// One ring of an attachment as the recovery applier sees it. Where the
/// guest owns the places (virtqueue heads), a corrupt entry naming a place
/// another live request holds is not answered.
struct ReplayRing<'a, R: RingSet, M: DeviceModel<R>> {
    att: &'a mut Attachment<R, M>,
    core: &'a mut Core,
    ring: usize,
    /// Places with a live request.
    live: Vec<bool>,
}

impl<R: RingSet, M: DeviceModel<R>> ReplayTarget for ReplayRing<'_, R, M> {
    type Request = R::Request;

    fn device(&self) -> &str {
        &self.core.device
    }

    fn log(&self) -> Option<&ShadowLog> {
        self.att.state[self.ring].log.as_ref()
    }

    fn repush(&mut self, r: &Repush) -> Result<(), String> {
        if self.log().is_none() {
            return Err("no shadow log".into());
        }
        let place = self.att.rings.repush(self.ring, r)?;
        self.log()
            .ok_or("no shadow log")?
            .log_repushed(r.entry, r.rsp_idx)
            .map_err(|e| e.to_string())?;
        if let Some(live) = place.and_then(|p| self.live.get_mut(usize::from(p))) {
            *live = true;
        }
        Ok(())
    }

    fn locate(&self, record: &[u8; REQUEST_SIZE]) -> Option<R::Request> {
        self.att.rings.locate(self.ring, record)
    }

    fn claim(&mut self, request: &R::Request) -> bool {
        match self.att.rings.place(request) {
            None => true,
            Some(p) => match self.live.get_mut(usize::from(p)) {
                Some(live) => !std::mem::replace(live, true),
                None => false,
            },
        }
    }

    /// Held back while a fence is pending: the earlier instance may still
    /// have the request in the kernel, and an answer would let the guest
    /// reuse its buffers (docs/ARCHITECTURE.md §7.3).
    fn fail(&mut self, request: R::Request, entry: EntryId) -> Result<(), String> {
        match self
            .att
            .hold_logged(self.ring, entry, request, HeldAs::Fail)
        {
            Some(request) => self
                .att
                .fail_logged(self.core, self.ring, Some(entry), &request),
            None => Ok(()),
        }
    }

    /// Held back while a fence is pending, as [`Self::fail`].
    fn reexecute(&mut self, request: R::Request, entry: EntryId) -> Result<(), String> {
        match self
            .att
            .hold_logged(self.ring, entry, request, HeldAs::Replay)
        {
            Some(request) => self.att.execute(self.core, self.ring, Some(entry), request),
            None => Ok(()),
        }
    }

    /// The queue waits for the fence too (it is not advanced while one is
    /// pending), and what it may touch holds back conflicting requests.
    fn replay_serially(&mut self, queue: SerialReplay<R::Request>) {
        if self.att.holding.is_some() {
            let footprints: Vec<Footprint> = queue
                .requests()
                .map(|r| self.att.footprint_of(self.ring, r))
                .collect();
            if let Some(holding) = self.att.holding.as_mut() {
                for f in footprints {
                    holding.cover(f);
                }
            }
        }
        self.att.state[self.ring].replay = queue;
    }

    fn describe(&self, request: &R::Request) -> String {
        self.att.rings.describe(request)
    }
}

/// The loop of one attach kind over a process's [`Core`].
pub struct DataPlane<'c, K: AttachKind> {
    core: &'c mut Core,
    kind: K,
    attachment: Option<Attachment<K::Rings, K::Model>>,
    completions: Vec<Completion>,
}

impl<'c, K: AttachKind> DataPlane<'c, K> {
    pub fn new(core: &'c mut Core, kind: K) -> Self {
        DataPlane {
            core,
            kind,
            attachment: None,
            completions: Vec::with_capacity(256),
        }
    }

    /// Serves until the supervisor closes the control channel.
    pub fn run(&mut self) -> Result<(), BackendError> {
        event_loop::run(self)
    }

    /// The attach kind back, once the loop has ended (with the model of an
    /// attachment still in place, [`AttachKind::detached`]).
    pub fn into_kind(mut self) -> K {
        if let Some(att) = self.attachment.take() {
            self.kind.detached(att.model);
        }
        self.kind
    }

    /// Handles one control message (the first one may come from a loop
    /// that handed this one its core).
    pub fn handle(&mut self, msg: &Message, fds: Vec<OwnedFd>) -> Result<(), BackendError> {
        let core = &mut *self.core;
        if let Some(done) = fault_injection(msg, &core.device, &mut core.poison, &core.control) {
            return done;
        }
        if let Some(result) = core.reconfigure(msg) {
            if let (Ok(Some(sectors)), Some(att)) = (&result, self.attachment.as_mut()) {
                att.model.resize(*sectors);
            }
            let reply = match result {
                Ok(_) => Message::new(kind::OK),
                Err((code, why)) => Message::error(code, &sanitize(&why)),
            };
            return core.send(&reply);
        }
        match msg.kind() {
            k if k == K::KIND => {
                let result = self.attach(msg, fds);
                if let Err((_, why)) = &result {
                    tracing::warn!(device = %self.core.device, kind = k, why, "attach refused");
                }
                let model = self.attachment.as_ref().map(|a| &a.model);
                let reply = self.kind.reply(model, attach_reply(result));
                self.core.send(&reply)
            }
            kind::FENCED => {
                if let Some(att) = self.attachment.as_mut() {
                    att.release(core);
                }
                Ok(())
            }
            kind::DETACH => match self.attachment.as_mut() {
                Some(att) => {
                    // Answer `detached` once nothing is in flight.
                    att.closing = Closing::Detach;
                    Ok(())
                }
                None => send_detached(&core.control, None),
            },
            other => {
                let rings = self.attachment.as_mut().map(|a| &mut a.rings);
                match self.kind.on_other(core, rings, msg, fds) {
                    Some(done) => done,
                    None => refuse_unexpected(&core.control, other),
                }
            }
        }
    }

    /// Builds the attachment, applies recovery and starts serving.
    fn attach(
        &mut self,
        msg: &Message,
        fds: Vec<OwnedFd>,
    ) -> Result<RecoveryStats, (ErrorCode, String)> {
        if self.attachment.is_some() {
            return Err((ErrorCode::Ebusy, "a frontend is already attached".into()));
        }
        let flags = AttachFlags::from_message(msg)?;
        let core = &mut *self.core;
        let built = self.kind.build(core, msg, fds, flags)?;
        let generation = core.generations.new_attachment();
        let rings = built.rings;
        let state = built
            .logs
            .into_iter()
            .enumerate()
            .map(|(ring, log)| RingState::new(log, rings.size(ring)))
            .collect();
        let att = self.attachment.insert(Attachment {
            name: built.name,
            generation,
            rings,
            model: built.model,
            state,
            closing: Closing::No,
            holding: (flags.recover && flags.fence).then(Holding::default),
            sources_armed: 0,
        });
        let mut stats = built.stats;
        let recovered = built
            .recoveries
            .iter()
            .any(|r| !matches!(r, Recovery::Nothing));
        for (ring, recovery) in built.recoveries.into_iter().enumerate() {
            att.recover(core, ring, recovery, flags.blame, &mut stats)
                .map_err(|e| (ErrorCode::Eproto, format!("replay failed: {e}")))?;
        }
        // The guest may be asleep waiting for responses the dead instance
        // owed it: publish and notify unconditionally.
        if recovered || K::Rings::WAKE_ON_ATTACH {
            att.publish(core);
            for ring in 0..att.rings.count() {
                let _ = att.rings.notify(ring);
            }
        }
        stats.replay_us = built.started.elapsed().as_micros() as u64;
        for ring in (0..att.rings.count()).filter(|&r| !att.rings.shares_kick(r)) {
            let token = Token::Kick {
                generation,
                ring: ring as u8,
            };
            arm_kick(&mut core.engine, token, att.rings.kick(ring))
                .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        }
        let counters = att.model.io_counters(core.io_counters(att.in_flight()));
        core.publish_metrics(counters, true);
        tracing::info!(device = %core.device, frontend = %att.name, rings = att.rings.count(),
            recover = flags.recover, ?stats, "{} attached", K::WHAT);
        Ok(stats)
    }
}

impl<K: AttachKind> EventLoop for DataPlane<'_, K> {
    fn engine(&mut self) -> &mut Engine {
        &mut self.core.engine
    }

    fn control(&self) -> &SeqPacket {
        &self.core.control
    }

    fn completions(&mut self) -> &mut Vec<Completion> {
        &mut self.completions
    }

    fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
        if let Some(att) = self.attachment.as_mut() {
            att.advance_serial_replay(self.core);
        }
        Ok(())
    }

    fn consume(&mut self) -> Result<(), BackendError> {
        match self.attachment.as_mut() {
            Some(att) => att.consume(self.core),
            None => Ok(()),
        }
    }

    fn publish(&mut self) {
        if let Some(att) = self.attachment.as_mut() {
            att.publish(self.core);
            att.arm_source(self.core);
        }
    }

    /// Drops a closing attachment once it is idle; `detached` answers a
    /// detach (a broken ring was reported with `disconnect` already).
    fn finish_detach(&mut self) -> Result<(), BackendError> {
        let Some(att) = self.attachment.as_ref() else {
            return Ok(());
        };
        if att.closing == Closing::No || !att.idle() {
            return Ok(());
        }
        let closing = att.closing;
        let name = att.name.clone();
        // Its kick reads would take the first kick of a later attachment
        // that shares an eventfd (a VMM re-sends its kick fds).
        for ring in 0..att.rings.count() {
            let token = Token::Kick {
                generation: att.generation,
                ring: ring as u8,
            };
            self.core.engine.cancel(token.encode());
        }
        for n in (0..64).filter(|n| att.sources_armed & (1 << n) != 0) {
            self.core.engine.cancel(att.source_token(n).encode());
        }
        if let Some(att) = self.attachment.take() {
            self.kind.detached(att.model);
        }
        tracing::info!(device = %self.core.device, frontend = %name, "{} detached", K::WHAT);
        if closing == Closing::Detach {
            send_detached(&self.core.control, Some(&name))?;
        }
        Ok(())
    }

    fn heartbeat(&mut self) {
        let logs = self
            .attachment
            .iter()
            .flat_map(|att| att.state.iter().filter_map(|s| s.log.as_ref()));
        event_loop::heartbeat(&self.core.device, logs);
        if self.core.metrics.is_none() {
            return;
        }
        let counters = match self.attachment.as_ref() {
            Some(att) => att
                .model
                .io_counters(self.core.io_counters(att.in_flight())),
            None => self.kind.io_counters(self.core.io_counters(0)),
        };
        self.core.publish_metrics(counters, false);
    }

    fn has_work(&mut self) -> bool {
        match self.attachment.as_mut() {
            Some(att) => att.has_work(self.core, true),
            None => false,
        }
    }

    fn peek_work(&mut self) -> bool {
        match self.attachment.as_mut() {
            Some(att) => att.has_work(self.core, false),
            None => false,
        }
    }

    fn poll_window(&self) -> Duration {
        self.core.poll_window
    }

    fn wake_in(&self) -> Option<Duration> {
        self.attachment.as_ref()?;
        self.core.throttled()
    }

    fn on_control(&mut self) -> Result<(), BackendError> {
        let (msg, fds) = recv_control(&self.core.control)?;
        self.handle(&msg, fds)
    }

    fn on_kick(&mut self, generation: u32, ring: u8, result: i32) -> Result<(), BackendError> {
        let Some(att) = self.attachment.as_mut() else {
            return Ok(());
        };
        let r = usize::from(ring);
        if att.generation != generation {
            return Ok(());
        }
        if let Some(n) = r.checked_sub(att.rings.count()) {
            if n < att.source_count() {
                att.source_ready(self.core, n, result);
            }
            return Ok(());
        }
        self.core.stats.kicks += 1;
        rearm_kick(
            &mut self.core.engine,
            Token::Kick { generation, ring },
            att.rings.kick(r),
            result,
        )
    }

    fn on_notified(&mut self, generation: u32, ring: u8, result: i32) {
        match self.attachment.as_mut() {
            Some(att) if att.generation == generation => {
                att.notified(self.core, usize::from(ring), result);
            }
            _ => {}
        }
    }

    fn on_io(&mut self, generation: u32, ring: u8, slot: u16, result: i32) {
        let Some(att) = self.attachment.as_mut() else {
            return;
        };
        if att.generation != generation {
            return;
        }
        let r = usize::from(ring);
        let Some(inflight) = att
            .state
            .get_mut(r)
            .and_then(|st| st.slots.get_mut(usize::from(slot)))
            .and_then(Option::as_mut)
            .filter(|f| !f.held())
        else {
            tracing::warn!(ring, slot, "completion for an idle slot");
            return;
        };
        let token = Token::Io {
            generation,
            ring,
            slot,
        }
        .encode();
        let core = &mut *self.core;
        let mut submit = Submit::new(&mut core.engine, token, &mut core.stats.traffic);
        let done = att
            .model
            .complete(&mut inflight.pending, result, &mut submit);
        let Some(response) = done else {
            return;
        };
        let entry = inflight.entry;
        if let Some(started) = inflight.started {
            core.latency.record(started.elapsed());
        }
        let st = &mut att.state[r];
        st.slots[usize::from(slot)] = None;
        st.free.push(slot);
        att.respond_or_warn(core, r, entry, &response, &mut None);
    }
}

#[cfg(test)]
mod tests;
