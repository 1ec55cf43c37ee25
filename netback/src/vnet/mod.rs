//! The virtio-net loop of a network backend process: the same process,
//! engine and control socket as the netif loop, serving a vif's receive
//! and transmit virtqueues after an `attach-virtio` (docs/ARCHITECTURE.md
//! §8.1), on the wire the supervisor lends.
//!
//! Driven by [`event_loop::run`] like the other loops, one loop over every
//! queue of the device (as blkback serves a disk's queues). A device has
//! up to [`MAX_QUEUE_PAIRS`] receive/transmit *pairs* (pair `i` receives
//! on virtqueue `2i`, transmits on `2i + 1`; `VIRTIO_NET_F_MQ`) and a
//! control queue after them. The driver uses the first
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` pairs (kept in the device state
//! area), or, when the VMM keeps the control queue (QEMU), the pairs the
//! VMM started; the others get nothing. Each pair moves its frames on a
//! *lane*: its own queue of a multi-queue TAP (the queues of pairs not in
//! use are detached, `TUNSETQUEUE`, so the kernel steers no flow to
//! them), or the one cable every pair shares, whose received frames are
//! fanned out by flow hash ([`frame::flow_hash`]). Each iteration:
//!
//! - **TX** (queue `2i + 1`): every available head is logged and its chain
//!   walked. To a TAP, up to [`TX_BATCH`] frames are written with one
//!   submission ([`TapBatch`]): a plain frame straight from the driver's
//!   buffers ([`frame::locate`]), one with a partial checksum or a TCP
//!   super-frame gathered and finished in the batch's slab first; to a
//!   cable (and in a replay) each frame is gathered into a private frame
//!   ([`frame::gather`]) and sent on its own. Each head's used element is
//!   written (logged COMPLETING) after its frame's write — on a TAP after
//!   the batch's. A malformed chain gets its used element too (length 0),
//!   so no driver waits for ever.
//! - **RX** (queue `2i`): available heads are logged and kept in a pool in
//!   avail order; while the pool is not empty the wire is read and each
//!   frame written into the first heads of the pool (several with
//!   `MRG_RXBUF`, `num_buffers` in the header), each head answered in
//!   order. With no head posted the wire is not read: frames wait in its
//!   kernel queue.
//! - **Control** (after the pairs, with `VIRTIO_NET_F_CTRL_VQ` and a VMM that
//!   hands it over): each command is parsed and checked ([`ctrl`]),
//!   applied to the device state, which is written to the state area the
//!   supervisor keeps before the command is answered, so the next
//!   instance serves with it (`shadowback_virtio::net_state`).
//! - **Publish**: per queue one release store of `used->idx` and at most
//!   one call.
//!
//! Recovery is the shared applier on each queue's log, with the virtqueue
//! rule of §7.4: a head stays the device's until its used element is
//! visible, so a head to replay is walked again in the ring. TX heads
//! answered (or, by an older instance, marked sent) are answered only;
//! the others are sent again. RX heads go
//! back to the pool; a receive frame whose used elements were not all
//! written is shown to the driver as empty buffers, never in part.

pub mod ctrl;
mod frame;
mod queue;
mod record;

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use shadowback_dataplane::control::{
    attach_reply, control_err, fault_injection, recv_control, refuse_unexpected, sanitize,
    send_detached, AttachFlags,
};
use shadowback_dataplane::event_loop::{self, arm, BackendError, EventLoop, Generations, Token};
use shadowback_dataplane::recovery::{
    self, log_failed, open_shadow_log, RecoveryStats, ReplayTarget, SerialReplay,
};
use shadowback_dataplane::uring::{Completion, Engine};
use shadowback_ring::EventChannel;
use shadowback_shadow::{
    EntryId, LogWriter, MetricsWriter, RecoveryPlan, Repush, ShadowLog, REQUEST_SIZE,
};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::net::{self as vnet, RX_QUEUE, TX_QUEUE};
use shadowback_virtio::net_state::{NetDeviceState, NetStateArea};
use shadowback_virtio::queue::{Chain, SplitQueue};
use shadowback_xenbus::netif::ATTACH_NET;
use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds, ATTACH_VIRTIO, MAX_QUEUE_PAIRS};
use shadowback_xenbus::{Message, SeqPacket};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_OK,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::backend::{
    publish_metrics, NetConfig, NetRecovery, NetStats, KEY_RX_BUFFERS_RECOVERED,
    KEY_TX_MAYBE_DUPLICATED, KEY_TX_REPLAYED, TX_SENT,
};
use crate::tapbatch::{PushError, TapBatch, TX_BATCH};
use crate::wire::tap::set_queue_attached;
use crate::wire::{
    Offloads, SendOutcome, VnetHeader, VnetHeaderLen, Wire, WireKind, MAX_FRAME_LEN, MIN_FRAME_LEN,
};
use frame::TxError;
use queue::{Taken, VQueue};
use record::UsedRecord;

/// Token ring numbers (6 bits): a virtqueue's own index (at most 14:
/// seven pairs and the control queue) and, from `LANE_TOKEN` on, a
/// lane's readability.
const LANE_TOKEN: u8 = 32;
const _: () =
    assert!(2 * MAX_QUEUE_PAIRS < LANE_TOKEN as u16 && LANE_TOKEN as u16 + MAX_QUEUE_PAIRS < 64);
/// Buffers of a chain kept by a walk: more than any driver uses for one
/// frame (Linux: MAX_SKB_FRAGS + 2).
const CHAIN_CAP: usize = 64;
/// Descriptors one queue may walk per loop iteration (as for
/// virtio-blk): a ring of long hostile chains cannot keep the loop from
/// its heartbeat and control socket.
const WALK_BUDGET: u32 = 1 << 16;
/// The header the wire carries (the supervisor sets the TAP up with it).
const WIRE_HDR: VnetHeaderLen = VnetHeaderLen::Basic;

/// A transmit head whose frame is in the TAP batch: answered once the
/// batch is written.
#[derive(Clone, Copy, Debug)]
struct Batched {
    head: u16,
    entry: Option<EntryId>,
    /// Bytes of the frame (without any header).
    len: usize,
}

/// A posted receive head.
#[derive(Clone, Copy, Debug)]
struct Posted {
    taken: Taken,
    /// Bytes its device-writable buffers hold (walked when it was taken).
    capacity: usize,
}

/// A receive/transmit queue pair the VMM started.
struct Pair {
    rx: VQueue,
    tx: VQueue,
    /// Receive heads taken, in avail order.
    pool: VecDeque<Posted>,
    rx_serial: SerialReplay<u16>,
    tx_serial: SerialReplay<u16>,
}

/// Where frames of one or more pairs come and go: a TAP queue, or the
/// cable.
struct Lane {
    wire: Wire,
    /// A frame from the wire (wire header first) waiting for heads.
    held: Option<Vec<u8>>,
    armed: bool,
    readable: bool,
    /// Attached to its TAP (`TUNSETQUEUE`): a detached queue is neither
    /// read nor polled. Always true for a lane of its own wire.
    attached: bool,
}

/// What a virtqueue index is in this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Rx(usize),
    Tx(usize),
    Ctrl,
}

/// The attached vif.
struct Device {
    name: String,
    generation: u32,
    mem: Arc<GuestRam>,
    /// The driver's virtio-net header length (10 or 12).
    hdr_len: usize,
    mrg_rxbuf: bool,
    csum: bool,
    /// Partial checksums are passed on to the driver (`GUEST_CSUM`
    /// negotiated and not switched off on the control queue).
    guest_csum: bool,
    /// The virtio features the driver acked.
    features: u64,
    /// `max_virtqueue_pairs` of the device.
    max_pairs: u16,
    /// TCP super-frames the driver sends (`HOST_TSO4/6`, on a TAP).
    host_tso: frame::Tso,
    /// TCP super-frames the driver takes (`GUEST_TSO4/6` in force).
    guest_tso: frame::Tso,
    /// By pair number, as many as the driver may use (`None`: the VMM
    /// did not start both of its queues).
    pairs: Vec<Option<Pair>>,
    /// Queues started without the other of their pair: kept for their
    /// shadow logs, never served.
    idle: Vec<VQueue>,
    /// The control queue, if the VMM handed it over.
    ctrl: Option<VQueue>,
    ctrl_serial: SerialReplay<u16>,
    /// What the driver set on the control queue, and where it is kept
    /// for the next instance (`None`: a supervisor that keeps none; the
    /// state then lives as long as this instance).
    state: NetDeviceState,
    state_area: Option<NetStateArea>,
    /// One per TAP queue (pair `i` on lane `i`), or one cable.
    lanes: Vec<Lane>,
    /// `detach` received: answer `detached` once the replay is done.
    closing: bool,
}

impl Device {
    fn role(&self, ring: u8) -> Option<Role> {
        let index = u16::from(ring);
        if self.ctrl.as_ref().is_some_and(|q| q.index == index) {
            return Some(Role::Ctrl);
        }
        let pair = usize::from(index / 2);
        self.pairs.get(pair)?.as_ref()?;
        Some(if index % 2 == 0 {
            Role::Rx(pair)
        } else {
            Role::Tx(pair)
        })
    }

    fn queue(&mut self, ring: u8) -> Option<&mut VQueue> {
        let index = u16::from(ring);
        match self.role(ring) {
            Some(Role::Ctrl) => self.ctrl.as_mut(),
            Some(Role::Rx(p)) => self.pairs[p].as_mut().map(|p| &mut p.rx),
            Some(Role::Tx(p)) => self.pairs[p].as_mut().map(|p| &mut p.tx),
            None => self.idle.iter_mut().find(|q| q.index == index),
        }
    }

    fn queue_ref(&self, ring: u8) -> Option<&VQueue> {
        let index = u16::from(ring);
        match self.role(ring) {
            Some(Role::Ctrl) => self.ctrl.as_ref(),
            Some(Role::Rx(p)) => self.pairs[p].as_ref().map(|p| &p.rx),
            Some(Role::Tx(p)) => self.pairs[p].as_ref().map(|p| &p.tx),
            None => self.idle.iter().find(|q| q.index == index),
        }
    }

    fn pair(&mut self, pair: usize) -> Option<&mut Pair> {
        self.pairs.get_mut(pair)?.as_mut()
    }

    fn queues(&self) -> impl Iterator<Item = &VQueue> {
        let pairs = self.pairs.iter().flatten().flat_map(|p| [&p.rx, &p.tx]);
        pairs.chain(self.ctrl.iter()).chain(self.idle.iter())
    }

    fn queues_mut(&mut self) -> impl Iterator<Item = &mut VQueue> {
        let pairs = self
            .pairs
            .iter_mut()
            .flatten()
            .flat_map(|p| [&mut p.rx, &mut p.tx]);
        pairs
            .chain(self.ctrl.iter_mut())
            .chain(self.idle.iter_mut())
    }

    /// Whether pair `pair` is served: started, and among the pairs the
    /// driver uses (`VQ_PAIRS_SET` when the control queue is ours; every
    /// started pair when the VMM keeps it).
    fn served(&self, pair: usize) -> bool {
        self.pairs.get(pair).is_some_and(Option::is_some)
            && (self.ctrl.is_none() || pair < usize::from(self.state.pairs))
    }

    fn lane_of(&self, pair: usize) -> usize {
        if self.lanes.len() == 1 {
            0
        } else {
            pair
        }
    }

    /// The served pair a frame read from `lane` goes to: a TAP queue's
    /// own, or on the cable one chosen by the frame's flow.
    fn rx_target(&self, lane: usize, frame: &[u8]) -> Option<usize> {
        if self.lanes.len() > 1 {
            return self.served(lane).then_some(lane);
        }
        let served = (0..self.pairs.len()).filter(|&p| self.served(p));
        let n = served.clone().count();
        if n == 0 {
            return None;
        }
        let k = frame::flow_hash(frame) as usize % n;
        served.into_iter().nth(k)
    }

    fn pool_len(&self, pair: usize) -> usize {
        self.pairs
            .get(pair)
            .and_then(Option::as_ref)
            .map_or(0, |p| p.pool.len())
    }

    /// Whether lane `lane` has a frame to deliver and a head for it: its
    /// held frame's pair has a head, or (nothing held) it is readable and
    /// a pair it serves has one.
    fn lane_ready(&self, lane: usize) -> bool {
        let Some(l) = self.lanes.get(lane) else {
            return false;
        };
        if !l.attached {
            return false;
        }
        match &l.held {
            Some(frame) => {
                let data = frame.get(WIRE_HDR.bytes()..).unwrap_or_default();
                self.rx_target(lane, data)
                    .is_some_and(|p| self.pool_len(p) > 0)
            }
            None => {
                l.readable
                    && (0..self.pairs.len())
                        .any(|p| self.lane_of(p) == lane && self.served(p) && self.pool_len(p) > 0)
            }
        }
    }

    fn serials_empty(&self) -> bool {
        self.ctrl_serial.is_empty()
            && self
                .pairs
                .iter()
                .flatten()
                .all(|p| p.tx_serial.is_empty() && p.rx_serial.is_empty())
    }

    /// Attaches the TAP queue of every pair served and detaches the
    /// others (`force`: whatever this instance believes their state is,
    /// as a new instance knows nothing of it).
    fn sync_lanes(&mut self, force: bool) -> Result<(), String> {
        if self.lanes.len() == 1 {
            return Ok(());
        }
        for i in 0..self.lanes.len() {
            let want = self.served(i);
            let lane = &mut self.lanes[i];
            if lane.attached == want && !force {
                continue;
            }
            set_queue_attached(lane.wire.fd(), want).map_err(|e| e.to_string())?;
            lane.attached = want;
            lane.readable = want;
            if !want {
                // The kernel purged the queue; a frame read from it and
                // held is dropped with it.
                lane.held = None;
            }
        }
        Ok(())
    }

    /// Tells a TAP what the driver accepts on receive, from the guest
    /// offloads in force (a cable takes none). The offloads belong to the
    /// interface: set through any attached queue.
    fn apply_offloads(&mut self) -> Result<(), String> {
        let on = |f| vnet::has(self.state.offloads, f);
        self.guest_csum = on(VIRTIO_NET_F_GUEST_CSUM);
        let tap = self.lanes[0].wire.kind() == WireKind::Tap;
        self.guest_tso = frame::Tso {
            v4: tap && on(VIRTIO_NET_F_GUEST_TSO4),
            v6: tap && on(VIRTIO_NET_F_GUEST_TSO6),
        };
        if !tap {
            return Ok(());
        }
        let lane = self
            .lanes
            .iter()
            .find(|l| l.attached)
            .ok_or("no TAP queue attached")?;
        lane.wire
            .set_offloads(Offloads::from_virtio_features(self.state.offloads))
            .map_err(|e| e.to_string())
    }
}

/// The loop state; it borrows the engine and the control socket from the
/// netif loop that received `attach-virtio`.
struct VnetLoop<'a> {
    engine: &'a mut Engine,
    control: &'a SeqPacket,
    cfg: &'a NetConfig,
    poison: &'a mut Vec<u64>,
    generations: &'a mut Generations,
    metrics: &'a mut Option<MetricsWriter>,
    device: Option<Device>,
    stats: NetStats,
    recovery: NetRecovery,
    completions: Vec<Completion>,
    chain: Chain,
    /// Transmit frames for a TAP, written together (the netif loop's
    /// batch, made before the process was confined).
    tap_batch: &'a mut TapBatch,
    /// The heads of `tap_batch`, in its order, all of one pair.
    tx_batched: Vec<Batched>,
    /// Scratch: the guest ranges of one transmit frame.
    tx_ranges: Vec<(u64, usize)>,
    /// Wire header + the largest frame: one transmit frame at a time.
    frame: Vec<u8>,
    /// Frames read from the wire.
    rx_scratch: Vec<u8>,
}

/// Serves a vif's virtqueues until the supervisor closes the control
/// channel, starting with the `attach-virtio` in `first`. Called by the
/// netif loop, which must have no vif attached.
#[allow(
    clippy::too_many_arguments,
    reason = "each is a separate borrow of the netif loop's state, lent for the loop's life"
)]
pub(crate) fn serve(
    engine: &mut Engine,
    control: &SeqPacket,
    cfg: &NetConfig,
    poison: &mut Vec<u64>,
    generations: &mut Generations,
    metrics: &mut Option<MetricsWriter>,
    tap_batch: &mut TapBatch,
    first: (Message, Vec<OwnedFd>),
) -> Result<(), BackendError> {
    let mut lp = VnetLoop {
        engine,
        control,
        cfg,
        poison,
        generations,
        metrics,
        device: None,
        stats: NetStats::default(),
        recovery: NetRecovery::default(),
        completions: Vec::with_capacity(16),
        chain: Chain::default(),
        tap_batch,
        tx_batched: Vec::with_capacity(TX_BATCH),
        tx_ranges: Vec::with_capacity(2 * CHAIN_CAP),
        frame: vec![0; WIRE_HDR.bytes() + MAX_FRAME_LEN],
        rx_scratch: Vec::new(),
    };
    tracing::info!(device = %cfg.device, "serving virtio-net queues");
    lp.handle_message(first.0, first.1)?;
    let result = event_loop::run(&mut lp);
    tracing::info!(device = %cfg.device, stats = ?lp.stats, "virtio-net loop done");
    result
}

impl VnetLoop<'_> {
    /// The driver broke a queue: stop consuming from it and tell the
    /// supervisor (which closes this VMM's session only).
    fn queue_broken(&mut self, ring: u8, why: &str) -> Result<(), BackendError> {
        let Some(q) = self.device.as_mut().and_then(|d| d.queue(ring)) else {
            return Ok(());
        };
        if q.broken {
            return Ok(());
        }
        q.broken = true;
        let index = q.index;
        tracing::warn!(device = %self.cfg.device, queue = index, why, "virtqueue broken, not consuming from it");
        let name = self
            .device
            .as_ref()
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let msg = Message::new(kind::DISCONNECT)
            .with(key::FRONTEND, &name)
            .with(key::QUEUE, index)
            .with(key::REASON, sanitize(why));
        self.control.send(&msg, &[]).map_err(control_err)
    }

    /// Walks the chain at `head` of queue `ring` into `self.chain`.
    fn walk(&mut self, ring: u8, head: u16) -> Result<(), String> {
        let dev = self.device.as_mut().ok_or("no device")?;
        let mem = dev.mem.clone();
        let q = dev.queue(ring).ok_or("no such queue")?;
        q.ring
            .walk(&mem, head, CHAIN_CAP, &mut self.chain)
            .map_err(|e| e.to_string())?;
        if self.chain.overflowed() {
            return Err(format!("chain of {} buffers", self.chain.count));
        }
        Ok(())
    }

    /// Writes a used element on queue `ring`.
    fn answer(&mut self, ring: u8, entry: Option<EntryId>, used: UsedRecord) {
        self.answer_with(ring, entry, used, None);
    }

    /// [`Self::answer`], logged through `writer`, the locked writer of
    /// queue `ring`'s log, if given.
    fn answer_with(
        &mut self,
        ring: u8,
        entry: Option<EntryId>,
        used: UsedRecord,
        writer: Option<&mut LogWriter<'_>>,
    ) {
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        let mem = dev.mem.clone();
        let Some(q) = dev.queue(ring) else {
            return;
        };
        if let Err(e) = q.put_used(&mem, entry, &used, &self.cfg.device, writer) {
            tracing::error!(device = %self.cfg.device, error = %e, "cannot write a used element");
        }
    }

    // ---- TX ------------------------------------------------------------

    /// Takes and sends every head the transmit queue of `pair` holds; what
    /// is batched for a TAP is written and answered before it returns.
    /// Every transition of the drain is logged under one lock of the
    /// queue's log ([`LogWriter`]: the same stores in the same order as
    /// one lock per transition, as netif's TAP batches, §11.6).
    fn consume_tx(&mut self, pair: usize) -> Result<(), BackendError> {
        let log = self
            .device
            .as_mut()
            .and_then(|d| d.pair(pair))
            .and_then(|p| p.tx.log.clone());
        let device = &self.cfg.device;
        let mut w = log
            .as_ref()
            .map(|log| log.writer().unwrap_or_else(|e| log_failed(device, e)));
        let taken = self.take_tx(pair, &mut w);
        self.flush_tx(pair, &mut w);
        taken
    }

    fn take_tx(&mut self, pair: usize, w: &mut Option<LogWriter<'_>>) -> Result<(), BackendError> {
        let ring = tx_ring(pair);
        let mut budget = WALK_BUDGET;
        loop {
            let Some(dev) = self.device.as_mut() else {
                return Ok(());
            };
            if dev.closing || budget == 0 {
                return Ok(());
            }
            let mem = dev.mem.clone();
            let on_tap =
                (dev.lanes.get(dev.lane_of(pair))).is_some_and(|l| l.wire.kind() == WireKind::Tap);
            let Some(p) = dev.pair(pair) else {
                return Ok(());
            };
            if p.tx.broken || !p.tx_serial.is_empty() {
                return Ok(());
            }
            let taken = match p.tx.take_with(&mem, &self.cfg.device, w.as_mut()) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(()),
                Err(why) => return self.queue_broken(ring, &why),
            };
            if self.poison.contains(&u64::from(taken.head)) {
                tracing::error!(device = %self.cfg.device, head = taken.head, "poisoned head: aborting (fault injection)");
                std::process::abort();
            }
            if on_tap {
                self.queue_tx(pair, taken.head, taken.entry, w);
            } else {
                self.send_head(pair, taken.head, taken.entry, w.as_mut());
            }
            budget = budget.saturating_sub(self.chain.descriptors_read.max(1));
        }
    }

    /// Sends the frame of transmit head `head` of `pair` on its own and
    /// answers it: its used element, logged COMPLETING right after the
    /// write, is what says the frame went out (docs/ARCHITECTURE.md §8.1).
    /// `writer`: the locked writer of the queue's log, if the caller holds
    /// it.
    fn send_head(
        &mut self,
        pair: usize,
        head: u16,
        entry: Option<EntryId>,
        writer: Option<&mut LogWriter<'_>>,
    ) {
        if let Err(e) = self.transmit(pair, head) {
            tracing::debug!(device = %self.cfg.device, head, error = %e, "TX frame refused");
            self.stats.tx_errors += 1;
        }
        self.answer_with(tx_ring(pair), entry, UsedRecord::single(head, 0), writer);
    }

    /// Puts the frame of transmit head `head` of `pair` in the TAP batch
    /// (written and answered at the next [`VnetLoop::flush_tx`], at the
    /// latest when the drain of the queue ends); a frame refused here is
    /// answered at once.
    fn queue_tx(
        &mut self,
        pair: usize,
        head: u16,
        entry: Option<EntryId>,
        w: &mut Option<LogWriter<'_>>,
    ) {
        match self.batch_frame(pair, head, w) {
            Ok(len) => {
                self.tx_batched.push(Batched { head, entry, len });
                if self.tap_batch.len() >= TX_BATCH {
                    self.flush_tx(pair, w);
                }
            }
            Err(PushError::Fill(e)) => {
                tracing::debug!(device = %self.cfg.device, head, error = %e, "TX frame refused");
                self.stats.tx_errors += 1;
                self.answer_with(
                    tx_ring(pair),
                    entry,
                    UsedRecord::single(head, 0),
                    w.as_mut(),
                );
            }
            // Not expected after a flush: sent on its own.
            Err(PushError::Full | PushError::Busy) => self.send_head(pair, head, entry, w.as_mut()),
        }
    }

    /// Puts one transmit frame in the TAP batch; its length. A plain
    /// frame ([`frame::is_plain`]) is its wire header, in the batch's
    /// slab, and its ranges of guest memory: the kernel copies it once,
    /// straight from the driver's buffers. Any other is gathered into the
    /// slab and finished there ([`frame::prepare_tx`]), so what was
    /// checked is what is written.
    fn batch_frame(
        &mut self,
        pair: usize,
        head: u16,
        w: &mut Option<LogWriter<'_>>,
    ) -> Result<usize, PushError<TxError>> {
        let no_device = || PushError::Fill(TxError::Header("no device".into()));
        self.walk(tx_ring(pair), head)
            .map_err(|e| PushError::Fill(TxError::Header(e)))?;
        let dev = self.device.as_ref().ok_or_else(no_device)?;
        let wire_hdr = WIRE_HDR.bytes();
        let mut hdr = [0u8; 12];
        self.tx_ranges.clear();
        let len = frame::locate(
            &dev.mem,
            &self.chain.bufs,
            &mut hdr[..dev.hdr_len],
            &mut self.tx_ranges,
        )
        .map_err(PushError::Fill)?;
        let header = |e: &dyn std::fmt::Display| PushError::Fill(TxError::Header(e.to_string()));
        let driver_hdr = VnetHeader::decode(&hdr, WIRE_HDR).map_err(|e| header(&e))?;
        driver_hdr.validate(len).map_err(|e| header(&e))?;
        let plain = frame::is_plain(&driver_hdr);
        let slab_len = if plain { wire_hdr } else { wire_hdr + len };
        if !self.tap_batch.has_room(slab_len) {
            self.flush_tx(pair, w);
        }
        let dev = self.device.as_ref().ok_or_else(no_device)?;
        if plain {
            return self
                .tap_batch
                .push(slab_len, &self.tx_ranges, |slab| {
                    VnetHeader::plain()
                        .encode(slab, WIRE_HDR)
                        .map_err(|e| TxError::Header(e.to_string()))
                })
                .map(|()| len);
        }
        let (csum, tso) = (dev.csum, dev.host_tso);
        let lane = dev.lanes.get(dev.lane_of(pair)).ok_or_else(no_device)?;
        self.tap_batch
            .push(slab_len, &[], |slab| {
                let (wire, data) = slab.split_at_mut(wire_hdr);
                let mut copied_hdr = [0u8; 12];
                let copied = frame::gather(
                    &dev.mem,
                    &self.chain.bufs,
                    &mut copied_hdr[..dev.hdr_len],
                    data,
                )?;
                // The copy is what goes out: its header is the one checked.
                let copied_hdr = VnetHeader::decode(&copied_hdr, WIRE_HDR)
                    .map_err(|e| TxError::Header(e.to_string()))?;
                if copied != len {
                    return Err(TxError::Header(
                        "the chain changed while it was read".into(),
                    ));
                }
                frame::prepare_tx(&copied_hdr, data, csum, tso)?
                    .encode(wire, WIRE_HDR)
                    .map_err(|e| TxError::Header(e.to_string()))?;
                // As `Wire::send` checks what it is handed.
                lane.wire
                    .check_frame(wire, len)
                    .map_err(|e| TxError::Header(format!("wire: {e}")))
            })
            .map(|()| len)
    }

    /// Writes the TAP batch to the lane of `pair` and answers its heads
    /// in batch order (avail order), each after the whole batch's write;
    /// `w`: the locked writer of the transmit queue's log.
    fn flush_tx(&mut self, pair: usize, w: &mut Option<LogWriter<'_>>) {
        if self.tap_batch.is_empty() {
            return;
        }
        let Some(dev) = self.device.as_mut() else {
            // Never queued without a device; nothing of it may outlive it.
            self.tap_batch.clear();
            self.tx_batched.clear();
            return;
        };
        let lane = dev.lane_of(pair);
        let fd = dev.lanes[lane].wire.fd().as_raw_fd();
        let mut results = [0i32; TX_BATCH];
        let written = self.tap_batch.flush(fd, &dev.mem);
        results[..written.len()].copy_from_slice(written);
        let mut batched = std::mem::take(&mut self.tx_batched);
        for (b, &result) in batched.iter().zip(&results) {
            let Some(dev) = self.device.as_mut() else {
                break;
            };
            match dev.lanes[lane].wire.count_write(result) {
                Ok(SendOutcome::Sent) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += b.len as u64;
                }
                // A full queue or a down link loses the frame, as on a NIC.
                Ok(SendOutcome::Dropped(_)) => self.stats.tx_wire_drops += 1,
                Err(e) => {
                    tracing::debug!(device = %self.cfg.device, head = b.head, error = %e, "TX frame refused by the TAP");
                    self.stats.tx_errors += 1;
                }
            }
            self.answer_with(
                tx_ring(pair),
                b.entry,
                UsedRecord::single(b.head, 0),
                w.as_mut(),
            );
        }
        batched.clear();
        self.tx_batched = batched;
    }

    /// Gathers, checks and writes one transmit frame to the lane of
    /// `pair`.
    fn transmit(&mut self, pair: usize, head: u16) -> Result<(), TxError> {
        self.walk(tx_ring(pair), head).map_err(TxError::Header)?;
        let Some(dev) = self.device.as_mut() else {
            return Ok(());
        };
        let wire_hdr = WIRE_HDR.bytes();
        let mut hdr = [0u8; 12];
        let len = frame::gather(
            &dev.mem,
            &self.chain.bufs,
            &mut hdr[..dev.hdr_len],
            &mut self.frame[wire_hdr..],
        )?;
        let driver_hdr =
            VnetHeader::decode(&hdr, WIRE_HDR).map_err(|e| TxError::Header(e.to_string()))?;
        let data = &mut self.frame[wire_hdr..wire_hdr + len];
        frame::prepare_tx(&driver_hdr, data, dev.csum, dev.host_tso)?
            .encode(&mut self.frame[..wire_hdr], WIRE_HDR)
            .map_err(|e| TxError::Header(e.to_string()))?;
        let lane = dev.lane_of(pair);
        let wire = &mut dev.lanes[lane].wire;
        match wire.send(&self.frame[..wire_hdr + len]) {
            Ok(SendOutcome::Sent) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += len as u64;
            }
            // A full queue or a down link loses the frame, as on a NIC.
            Ok(SendOutcome::Dropped(_)) => self.stats.tx_wire_drops += 1,
            Err(e) => return Err(TxError::Header(format!("wire: {e}"))),
        }
        Ok(())
    }

    // ---- RX ------------------------------------------------------------

    /// Takes every head the receive queue of `pair` holds into its pool;
    /// a head without a usable writable buffer is answered at once
    /// (length 0).
    fn consume_rx(&mut self, pair: usize) -> Result<(), BackendError> {
        let mut budget = WALK_BUDGET;
        loop {
            let Some(dev) = self.device.as_mut() else {
                return Ok(());
            };
            if dev.closing || budget == 0 {
                return Ok(());
            }
            let mem = dev.mem.clone();
            let Some(p) = dev.pair(pair) else {
                return Ok(());
            };
            if p.rx.broken || !p.rx_serial.is_empty() {
                return Ok(());
            }
            let taken = match p.rx.take(&mem, &self.cfg.device) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(()),
                Err(why) => return self.queue_broken(rx_ring(pair), &why),
            };
            self.post(pair, taken);
            budget = budget.saturating_sub(self.chain.descriptors_read.max(1));
        }
    }

    /// Puts a receive head into the pool of `pair`, or answers it empty if
    /// the driver did not give it a usable buffer.
    fn post(&mut self, pair: usize, taken: Taken) {
        let ring = rx_ring(pair);
        let capacity = match self.walk(ring, taken.head) {
            Ok(()) if !self.chain.bufs.iter().any(|b| !b.writable) => {
                frame::capacity(&self.chain.bufs)
            }
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(device = %self.cfg.device, head = taken.head, error = %e, "bad receive chain");
                0
            }
        };
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        // A head that can never hold a frame goes back at once: one
        // smaller than the driver's header (with MRG_RXBUF every buffer
        // holds at least that, virtio 1.2 §5.1.6.3.1), or without
        // MRG_RXBUF one short of the header and an Ethernet header. Kept,
        // it would sit at the front of the pool and drop every frame.
        let least = if dev.mrg_rxbuf {
            dev.hdr_len
        } else {
            dev.hdr_len + MIN_FRAME_LEN
        };
        match dev.pair(pair) {
            Some(p) if capacity >= least => p.pool.push_back(Posted { taken, capacity }),
            _ => {
                self.stats.rx_dropped += 1;
                self.answer(ring, taken.entry, UsedRecord::single(taken.head, 0));
            }
        }
    }

    /// Moves frames from every lane into posted heads while there are
    /// both.
    fn deliver_rx(&mut self) -> Result<(), BackendError> {
        let lanes = self.device.as_ref().map_or(0, |d| d.lanes.len());
        for lane in 0..lanes {
            self.deliver_lane(lane)?;
        }
        Ok(())
    }

    /// Moves frames from `lane` into posted heads while there are both;
    /// re-arms the lane's poll once it is drained.
    fn deliver_lane(&mut self, lane: usize) -> Result<(), BackendError> {
        loop {
            let Some(dev) = self.device.as_mut() else {
                return Ok(());
            };
            if dev.closing || !dev.lanes[lane].attached {
                return Ok(());
            }
            if let Some(mut held) = dev.lanes[lane].held.take() {
                if !self.deliver_frame(lane, &mut held) {
                    if let Some(dev) = self.device.as_mut() {
                        dev.lanes[lane].held = Some(held);
                    }
                    return Ok(());
                }
                continue;
            }
            if !dev.lane_ready(lane) {
                return Ok(());
            }
            let mut buf = std::mem::take(&mut self.rx_scratch);
            let wire = &mut dev.lanes[lane].wire;
            buf.resize(wire.recv_buf_len(), 0);
            let received = wire.recv(&mut buf);
            let drained = match received {
                Ok(Some(n)) => {
                    if !self.deliver_frame(lane, &mut buf[..n]) {
                        if let Some(dev) = self.device.as_mut() {
                            dev.lanes[lane].held = Some(buf[..n].to_vec());
                        }
                    }
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(device = %self.cfg.device, error = %e, "wire read failed");
                    true
                }
            };
            self.rx_scratch = buf;
            if drained {
                if let Some(dev) = self.device.as_mut() {
                    dev.lanes[lane].readable = false;
                }
                return self.arm_lane(lane);
            }
        }
    }

    /// Writes one frame read from `lane` (wire header first) into the
    /// first heads of its pair's pool and answers them, or drops it;
    /// `false` when it needs more heads than are posted (the caller holds
    /// it).
    fn deliver_frame(&mut self, lane: usize, wire_frame: &mut [u8]) -> bool {
        let Some(dev) = self.device.as_mut() else {
            return true;
        };
        let Ok(wire_hdr) = VnetHeader::decode(wire_frame, WIRE_HDR) else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let data = &mut wire_frame[WIRE_HDR.bytes()..];
        let dst: Option<[u8; 6]> = data.get(..6).and_then(|d| d.try_into().ok());
        if !dst.is_some_and(|dst| dev.state.accepts(&dst)) {
            self.stats.rx_filtered += 1;
            return true;
        }
        let Some(pair) = dev.rx_target(lane, data) else {
            // No pair is served on this lane any more.
            self.stats.rx_dropped += 1;
            return true;
        };
        let Some(mut hdr) = frame::rx_header(&wire_hdr, data, dev.guest_csum, dev.guest_tso) else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let total = dev.hdr_len + data.len();
        let (mrg_rxbuf, hdr_len) = (dev.mrg_rxbuf, dev.hdr_len);
        let Some(p) = dev.pair(pair) else {
            return true;
        };
        if p.pool.is_empty() {
            return false;
        }
        // Heads the frame needs: one without MRG_RXBUF.
        let mut count = 0usize;
        let mut room = 0usize;
        for posted in &p.pool {
            count += 1;
            room += posted.capacity;
            if room >= total || !mrg_rxbuf {
                break;
            }
        }
        if room < total {
            let ring_full = p.pool.len() >= usize::from(p.rx.size());
            if mrg_rxbuf && !ring_full {
                return false;
            }
            // No head (or every head the ring can post) holds it.
            self.stats.rx_dropped += 1;
            return true;
        }
        hdr.num_buffers = count as u16;
        let hdr_layout = if hdr_len == 12 {
            VnetHeaderLen::MergeableRx
        } else {
            VnetHeaderLen::Basic
        };
        // Written into the heads after the header, as one string with it.
        let mut hdr_bytes = [0u8; 12];
        let hdr_bytes = &mut hdr_bytes[..hdr_len];
        if hdr.encode(hdr_bytes, hdr_layout).is_err() {
            self.stats.rx_dropped += 1;
            return true;
        }
        let frame_len = data.len() as u64;
        let ring = rx_ring(pair);
        let mut at = 0usize;
        let mut ok = true;
        for position in 0..count {
            let posted = self
                .device
                .as_mut()
                .and_then(|d| d.pair(pair))
                .and_then(|p| p.pool.pop_front());
            let Some(posted) = posted else {
                break;
            };
            let head = posted.taken.head;
            // Walked again: the chain is the driver's memory.
            let written = if ok && self.walk(ring, head).is_ok() {
                let mem = self.device.as_ref().map(|d| d.mem.clone());
                mem.and_then(|m| {
                    frame::scatter_parts(&m, &self.chain.bufs, hdr_bytes, data, at).ok()
                })
            } else {
                None
            };
            let len = match written {
                Some(n) => {
                    at += n;
                    n as u32
                }
                None => {
                    ok = false;
                    0
                }
            };
            let used = UsedRecord {
                id: u32::from(head),
                len,
                position: position as u16,
                count: count as u16,
            };
            self.answer(ring, posted.taken.entry, used);
        }
        if ok && at == total {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += frame_len;
        } else {
            self.stats.rx_dropped += 1;
        }
        true
    }

    fn arm_lane(&mut self, lane: usize) -> Result<(), BackendError> {
        let Some(dev) = self.device.as_mut() else {
            return Ok(());
        };
        let generation = dev.generation;
        let Some(l) = dev.lanes.get_mut(lane) else {
            return Ok(());
        };
        if l.armed || !l.attached {
            return Ok(());
        }
        l.armed = true;
        let token = Token::Kick {
            generation,
            ring: lane_token(lane),
        };
        arm(self.engine, token, l.wire.fd().as_raw_fd())
    }

    // ---- control queue -------------------------------------------------

    /// Takes and executes every command the control queue holds.
    fn consume_ctrl(&mut self) -> Result<(), BackendError> {
        let mut budget = WALK_BUDGET;
        loop {
            let Some(dev) = self.device.as_mut() else {
                return Ok(());
            };
            if dev.closing || !dev.ctrl_serial.is_empty() || budget == 0 {
                return Ok(());
            }
            let mem = dev.mem.clone();
            let Some(q) = dev.ctrl.as_mut().filter(|q| !q.broken) else {
                return Ok(());
            };
            let ring = queue_ring(q.index);
            let taken = match q.take(&mem, &self.cfg.device) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(()),
                Err(why) => return self.queue_broken(ring, &why),
            };
            self.ctrl_head(taken.head, taken.entry, false);
            budget = budget.saturating_sub(self.chain.descriptors_read.max(1));
        }
    }

    /// Executes the command of control head `head` (or, `refuse`d by the
    /// crash-loop breaker, only answers it `VIRTIO_NET_ERR`), then writes
    /// the ack and the used element. A chain without a writable byte for
    /// the ack is answered with length 0 and not executed: the driver
    /// could not be told the outcome.
    fn ctrl_head(&mut self, head: u16, entry: Option<EntryId>, refuse: bool) {
        let Some(ring) = self
            .device
            .as_ref()
            .and_then(|d| d.ctrl.as_ref())
            .map(|q| queue_ring(q.index))
        else {
            return;
        };
        let mut len = 0;
        match self.walk(ring, head) {
            Ok(()) if self.chain.bufs.iter().any(|b| b.writable) => {
                let ran = if refuse { None } else { Some(self.run_ctrl()) };
                let ack = match ran {
                    Some(Ok(())) => VIRTIO_NET_OK as u8,
                    None => VIRTIO_NET_ERR as u8,
                    Some(Err(why)) => {
                        tracing::debug!(device = %self.cfg.device, head, why, "control command refused");
                        self.stats.ctrl_errors += 1;
                        VIRTIO_NET_ERR as u8
                    }
                };
                let mem = self.device.as_ref().map(|d| d.mem.clone());
                let written =
                    mem.and_then(|m| frame::scatter(&m, &self.chain.bufs, &[ack], 0).ok());
                len = written.unwrap_or(0) as u32;
            }
            Ok(()) => self.stats.ctrl_errors += 1,
            Err(e) => {
                tracing::debug!(device = %self.cfg.device, head, error = %e, "bad control chain");
                self.stats.ctrl_errors += 1;
            }
        }
        self.answer(ring, entry, UsedRecord::single(head, len));
    }

    /// Runs the command in `self.chain`: the new state is written to the
    /// state area before it takes effect, and before the ack.
    fn run_ctrl(&mut self) -> Result<(), String> {
        let dev = self.device.as_mut().ok_or("no device")?;
        if self.chain.misordered {
            return Err("a readable buffer after a writable one".into());
        }
        let readable: usize = self
            .chain
            .bufs
            .iter()
            .filter(|b| !b.writable)
            .map(|b| b.len as usize)
            .sum();
        if self.chain.overflowed() || readable > ctrl::MAX_COMMAND_BYTES {
            return Err(format!("{readable} command bytes"));
        }
        let mut bytes = vec![0u8; readable];
        let mut at = 0;
        for b in self.chain.bufs.iter().filter(|b| !b.writable) {
            let dst = &mut bytes[at..at + b.len as usize];
            dev.mem
                .read(b.addr, dst)
                .map_err(|_| format!("buffer at {:#x} is not guest memory", b.addr))?;
            at += b.len as usize;
        }
        let mut state = dev.state.clone();
        let device = ctrl::CtrlDevice {
            features: dev.features,
            max_pairs: dev.max_pairs,
        };
        ctrl::execute(&mut state, device, &bytes).map_err(|e| e.to_string())?;
        if let Some(area) = dev.state_area.as_mut() {
            area.store(&state).map_err(|e| e.to_string())?;
        }
        dev.state = state;
        // A new pair count moves TAP queues in or out of the kernel's
        // steering before the driver is told.
        dev.sync_lanes(false)?;
        dev.apply_offloads()
    }

    // ---- control ---------------------------------------------------------

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
                    self.device = None;
                }
                let r = self.recovery;
                send(
                    &attach_reply(result)
                        .with(KEY_TX_REPLAYED, r.tx_replayed)
                        .with(KEY_TX_MAYBE_DUPLICATED, r.tx_maybe_duplicated)
                        .with(KEY_RX_BUFFERS_RECOVERED, r.rx_buffers_recovered),
                )
            }
            ATTACH_NET => send(&Message::error(
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
        let q = u8::try_from(index).ok().and_then(|ring| dev.queue(ring));
        let q = q.ok_or_else(|| format!("no queue {index}"))?;
        let fd = fds.pop().ok_or("no fd")?;
        q.call = EventChannel::from_fd(fd).map_err(|e| e.to_string())?;
        // A call may have gone to the old eventfd while the VMM switched:
        // one spurious interrupt is harmless, a lost one hangs the driver.
        let _ = q.call.notify();
        Ok(())
    }

    /// Maps memory and rings, recovers every queue and starts serving.
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
        let AttachFlags { recover, blame, .. } = AttachFlags::from_message(msg)?;
        let vfds = VirtioFds::from_received(&req, fds).map_err(|e| inval(&e))?;
        let unknown = req.features & !vnet::OFFERED_FEATURES;
        if unknown != 0 {
            return Err(inval(&format!("features {unknown:#x} were not offered")));
        }
        if vfds.inflight.is_some() {
            return Err(inval(&"no in-flight region is offered for virtio-net"));
        }
        let wire_kind = match req.wire.as_deref() {
            Some("tap") => WireKind::Tap,
            Some("cable") => WireKind::Cable,
            other => return Err(inval(&format!("wire={other:?}: tap or cable"))),
        };
        // A TAP queue per pair, or one wire every pair shares.
        let lanes_ok = vfds.wire.len() == 1
            || (wire_kind == WireKind::Tap && vfds.wire.len() == usize::from(req.queue_pairs));
        if !lanes_ok {
            return Err(inval(&format!(
                "{} wire descriptors for {} queue pairs",
                vfds.wire.len(),
                req.queue_pairs
            )));
        }
        let mut lanes = Vec::with_capacity(vfds.wire.len());
        for fd in vfds.wire {
            lanes.push(Lane {
                wire: Wire::from_fd(wire_kind, fd, WIRE_HDR).map_err(|e| inval(&e))?,
                held: None,
                armed: false,
                readable: true,
                attached: true,
            });
        }
        // Which queue is which (virtio 1.2 §5.1.2): the pairs the driver
        // may use, then the control queue.
        let in_use = vnet::pairs_in_use(req.features, req.queue_pairs);
        let ctrl_index = vnet::ctrl_queue(req.features, req.queue_pairs);
        let with_ctrl = vnet::has(req.features, VIRTIO_NET_F_CTRL_VQ);
        for q in &req.queues {
            if q.index >= 2 * in_use && !(with_ctrl && q.index == ctrl_index) {
                return Err(inval(&format!(
                    "virtqueue {} is not a queue of a driver using {in_use} pairs",
                    q.index
                )));
            }
        }
        let has_queue = |i: u16| req.queues.iter().any(|q| q.index == i);
        if !has_queue(RX_QUEUE) || !has_queue(TX_QUEUE) {
            return Err(inval(
                &"the first receive and transmit queues (0, 1) are needed",
            ));
        }
        let (state_area, state) = match vfds.device_state {
            Some(fd) => {
                let (area, state) =
                    NetStateArea::open(std::fs::File::from(fd)).map_err(|e| inval(&e))?;
                (Some(area), state)
            }
            // A supervisor that keeps no state: a device reset, the MAC
            // unknown (every unicast frame is accepted while promiscuous,
            // and a driver that filters has set its MAC).
            None => (None, NetDeviceState::initial([0; 6], req.features)),
        };
        let mem = Arc::new(GuestRam::map(&req.regions, vfds.regions).map_err(|e| inval(&e))?);
        let event_idx = req.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut logs: Vec<Option<ShadowLog>> = req.queues.iter().map(|_| None).collect();
        let mut stats = RecoveryStats::default();
        let mut fresh = true;
        if self.cfg.shadow && req.shadow {
            for (slot, (fd, q)) in logs.iter_mut().zip(vfds.logs.into_iter().zip(&req.queues)) {
                let (log, generation) =
                    open_shadow_log(&self.cfg.crash_at, fd).map_err(|e| inval(&e))?;
                if log.entries() != u32::from(q.size) {
                    return Err(inval(&format!(
                        "shadow log does not have {} entries",
                        q.size
                    )));
                }
                stats.generation = stats.generation.max(generation);
                fresh &= generation == 1;
                *slot = Some(log);
            }
        }
        let started = std::time::Instant::now();
        let mut queues: Vec<Recovered> = Vec::with_capacity(req.queues.len());
        for ((qcfg, (kick, call)), log) in req.queues.iter().zip(vfds.queues).zip(logs) {
            let ring = SplitQueue::new(qcfg, &mem, event_idx)
                .map_err(|e| inval(&format!("queue {}: {e}", qcfg.index)))?;
            let kick = EventChannel::from_fd(kick).map_err(|e| inval(&e))?;
            let call = EventChannel::from_fd(call).map_err(|e| inval(&e))?;
            let mut q = VQueue::new(qcfg.index, ring, kick, call, log);
            let plan = q.recover(&mem, qcfg.next_avail, fresh && !recover)?;
            queues.push((q, plan));
        }
        // Sorted out by role: pairs with both queues, the control queue,
        // and queues started alone (a VMM still setting up).
        let mut ctrl = None;
        let mut halves: Vec<[Option<Recovered>; 2]> = (0..in_use).map(|_| [None, None]).collect();
        for (q, plan) in queues {
            if with_ctrl && q.index == ctrl_index {
                ctrl = Some((q, plan));
            } else {
                let half = &mut halves[usize::from(q.index / 2)][usize::from(q.index % 2)];
                *half = Some((q, plan));
            }
        }
        let mut pairs = Vec::with_capacity(halves.len());
        let mut pair_plans = Vec::with_capacity(halves.len());
        let mut idle = Vec::new();
        for [rx, tx] in halves {
            match (rx, tx) {
                (Some((rx, rx_plan)), Some((tx, tx_plan))) => {
                    pairs.push(Some(Pair {
                        rx,
                        tx,
                        pool: VecDeque::new(),
                        rx_serial: SerialReplay::default(),
                        tx_serial: SerialReplay::default(),
                    }));
                    pair_plans.push((rx_plan, tx_plan));
                }
                (alone_rx, alone_tx) => {
                    for (q, plan) in alone_rx.into_iter().chain(alone_tx) {
                        // Never served in this session, so nothing logged.
                        if plan.is_some() {
                            return Err((
                                ErrorCode::Eproto,
                                format!(
                                    "virtqueue {}: log entries of a queue never served",
                                    q.index
                                ),
                            ));
                        }
                        idle.push(q);
                    }
                    pairs.push(None);
                    pair_plans.push((None, None));
                }
            }
        }
        let (ctrl, ctrl_plan) = match ctrl {
            Some((q, plan)) => (Some(q), plan),
            None => (None, None),
        };
        let has = |f| vnet::has(req.features, f);
        let tap = wire_kind == WireKind::Tap;
        self.device = Some(Device {
            name: req.frontend.clone(),
            generation: self.generations.new_attachment(),
            mem,
            hdr_len: vnet::header_len(req.features),
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            csum: has(VIRTIO_NET_F_CSUM),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            features: req.features,
            max_pairs: req.queue_pairs,
            host_tso: frame::Tso {
                v4: tap && has(VIRTIO_NET_F_HOST_TSO4),
                v6: tap && has(VIRTIO_NET_F_HOST_TSO6),
            },
            guest_tso: frame::Tso::default(),
            pairs,
            idle,
            ctrl,
            ctrl_serial: SerialReplay::default(),
            state,
            state_area,
            lanes,
            closing: false,
        });
        // What the driver set before this instance: in force before the
        // first frame is served — the TAP queues of the pairs in use
        // attached and the others detached, the offloads.
        if let Some(dev) = self.device.as_mut() {
            dev.sync_lanes(true)
                .map_err(|e| (ErrorCode::Enodev, format!("TAP queues: {e}")))?;
            dev.apply_offloads()
                .map_err(|e| (ErrorCode::Enodev, format!("guest offloads: {e}")))?;
        }
        let proto = |e: String| (ErrorCode::Eproto, format!("replay failed: {e}"));
        if let (Some(plan), Some(index)) = (&ctrl_plan, self.ctrl_index()) {
            // First: a command the dead instance did not answer takes
            // effect again before any frame is served.
            let mut target = QueueReplay::new(self, queue_ring(index), plan);
            recovery::apply_plan(&mut target, plan, blame, &mut stats).map_err(proto)?;
        }
        // Frames a crash can leave written and not answered, per queue.
        let window = match wire_kind {
            WireKind::Tap => TX_BATCH,
            WireKind::Cable => 1,
        };
        for (pair, (rx_plan, tx_plan)) in pair_plans.iter().enumerate() {
            if let Some(plan) = rx_plan {
                let mut target = QueueReplay::new(self, rx_ring(pair), plan);
                recovery::apply_plan(&mut target, plan, blame, &mut stats).map_err(proto)?;
            }
            if let Some(plan) = tx_plan {
                let mut target = QueueReplay::new(self, tx_ring(pair), plan);
                // Counted now: a serial replay runs after the reply. Heads
                // are sent in consumption order and each is answered right
                // after its write — on a TAP after its batch's write: per
                // queue only the first one not answered (on a TAP, the
                // first TX_BATCH) can have left the dead instance too.
                let unsent = plan.reexecute.len() - target.sent.len();
                target.lp.recovery.tx_replayed += unsent as u64;
                target.lp.recovery.tx_maybe_duplicated += unsent.min(window) as u64;
                recovery::apply_plan(&mut target, plan, blame, &mut stats).map_err(proto)?;
            }
        }
        stats.replay_us = started.elapsed().as_micros() as u64;
        // The driver may be asleep waiting for what the dead instance owed.
        self.publish();
        let dev = self
            .device
            .as_ref()
            .ok_or((ErrorCode::Enodev, "device gone".into()))?;
        let generation = dev.generation;
        let kicks: Vec<(u8, i32)> = dev
            .pairs
            .iter()
            .flatten()
            .flat_map(|p| [&p.rx, &p.tx])
            .chain(dev.ctrl.iter())
            .map(|q| (queue_ring(q.index), q.kick.as_raw_fd()))
            .collect();
        for q in dev.queues() {
            let _ = q.call.notify();
        }
        for (ring, fd) in kicks {
            arm(self.engine, Token::Kick { generation, ring }, fd)
                .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        }
        publish_metrics(self.metrics, &self.stats, true);
        tracing::info!(device = %self.cfg.device, frontend = %req.frontend, event_idx, recover,
            pairs = in_use, lanes = dev.lanes.len(), ?stats, recovery = ?self.recovery, "virtio-net attached");
        Ok(stats)
    }

    fn ctrl_index(&self) -> Option<u16> {
        Some(self.device.as_ref()?.ctrl.as_ref()?.index)
    }
}

/// A queue and the plan of its log, if it holds live entries.
type Recovered = (VQueue, Option<RecoveryPlan>);

/// The token ring number of virtqueue `index` (at most 14).
fn queue_ring(index: u16) -> u8 {
    u8::try_from(index).unwrap_or(u8::MAX)
}

fn rx_ring(pair: usize) -> u8 {
    queue_ring((2 * pair) as u16)
}

fn tx_ring(pair: usize) -> u8 {
    queue_ring((2 * pair + 1) as u16)
}

fn lane_token(lane: usize) -> u8 {
    LANE_TOKEN + u8::try_from(lane).unwrap_or(0)
}

/// One queue as the recovery applier sees it (docs/ARCHITECTURE.md §7.4,
/// §8.1): a head to replay is walked again in the ring. Transmit heads the
/// dead instance marked sent are answered only. A receive frame whose
/// used elements were not all logged before the crash is re-pushed as
/// empty buffers: the driver drops them, as it drops any runt.
struct QueueReplay<'l, 'a> {
    lp: &'l mut VnetLoop<'a>,
    ring: u8,
    role: Option<Role>,
    /// Heads with a live request.
    live: Vec<bool>,
    /// Transmit entries whose frame the dead instance wrote to the wire.
    sent: HashSet<EntryId>,
    /// Re-pushes (by their old index) of receive frames not whole.
    partial: HashSet<u32>,
}

impl<'l, 'a> QueueReplay<'l, 'a> {
    fn new(lp: &'l mut VnetLoop<'a>, ring: u8, plan: &RecoveryPlan) -> Self {
        let size = lp
            .device
            .as_mut()
            .and_then(|d| d.queue(ring))
            .map_or(0, |q| q.size());
        let role = lp.device.as_ref().and_then(|d| d.role(ring));
        let sent = plan
            .reexecute
            .iter()
            .filter(|e| matches!(role, Some(Role::Tx(_))) && e.progress & TX_SENT != 0)
            .map(|e| e.entry)
            .collect();
        QueueReplay {
            lp,
            ring,
            role,
            live: vec![false; usize::from(size)],
            sent,
            partial: partial_frames(&plan.repush),
        }
    }
}

/// The old indices of re-pushes whose frame is not whole among them.
fn partial_frames(repush: &[Repush]) -> HashSet<u32> {
    let saved: std::collections::HashMap<u32, UsedRecord> = repush
        .iter()
        .filter_map(|r| UsedRecord::decode(&r.response).map(|u| (r.old_rsp_idx, u)))
        .collect();
    saved
        .iter()
        .filter(|(&idx, u)| {
            let first = idx.wrapping_sub(u32::from(u.position));
            (0..u32::from(u.count)).any(|k| !saved.contains_key(&first.wrapping_add(k)))
        })
        .map(|(&idx, _)| idx)
        .collect()
}

impl ReplayTarget for QueueReplay<'_, '_> {
    type Request = u16;

    fn device(&self) -> &str {
        &self.lp.cfg.device
    }

    fn log(&self) -> Option<&ShadowLog> {
        self.lp
            .device
            .as_ref()?
            .queue_ref(self.ring)?
            .log
            .as_deref()
    }

    fn repush(&mut self, r: &Repush) -> Result<(), String> {
        let mut used = UsedRecord::decode(&r.response).ok_or("not a used element")?;
        let size = self.live.len();
        let head = usize::try_from(used.id).ok().filter(|&h| h < size);
        let head = head.ok_or_else(|| format!("saved used element names head {}", used.id))?;
        if self.partial.contains(&r.old_rsp_idx) {
            used.len = 0;
        }
        let dev = self.lp.device.as_mut().ok_or("no device")?;
        let mem = dev.mem.clone();
        dev.queue(self.ring)
            .ok_or("no such queue")?
            .repush(&mem, r.entry, r.rsp_idx, &used)?;
        self.live[head] = true;
        Ok(())
    }

    fn locate(&self, saved: &[u8; REQUEST_SIZE]) -> Option<u16> {
        record::logged_head(saved)
            .map(|(head, _)| head)
            .filter(|&h| usize::from(h) < self.live.len())
    }

    fn claim(&mut self, head: &u16) -> bool {
        match self.live.get_mut(usize::from(*head)) {
            Some(live) => !std::mem::replace(live, true),
            None => false,
        }
    }

    fn fail(&mut self, head: u16, entry: EntryId) -> Result<(), String> {
        if self.role == Some(Role::Ctrl) {
            self.lp.ctrl_head(head, Some(entry), true);
        } else {
            self.lp
                .answer(self.ring, Some(entry), UsedRecord::single(head, 0));
        }
        Ok(())
    }

    fn reexecute(&mut self, head: u16, entry: EntryId) -> Result<(), String> {
        let taken = Taken {
            head,
            entry: Some(entry),
        };
        match self.role {
            // Every command sets state: executing it again is harmless.
            Some(Role::Ctrl) => self.lp.ctrl_head(head, Some(entry), false),
            Some(Role::Rx(pair)) => {
                self.lp.recovery.rx_buffers_recovered += 1;
                self.lp.post(pair, taken);
            }
            Some(Role::Tx(_)) if self.sent.contains(&entry) => {
                self.lp
                    .answer(self.ring, Some(entry), UsedRecord::single(head, 0));
            }
            Some(Role::Tx(pair)) => self.lp.send_head(pair, head, Some(entry), None),
            None => return Err(format!("virtqueue {} is not served", self.ring)),
        }
        Ok(())
    }

    fn replay_serially(&mut self, queue: SerialReplay<u16>) {
        let Some(dev) = self.lp.device.as_mut() else {
            return;
        };
        match self.role {
            Some(Role::Ctrl) => dev.ctrl_serial = queue,
            Some(Role::Rx(p)) => {
                if let Some(p) = dev.pair(p) {
                    p.rx_serial = queue;
                }
            }
            Some(Role::Tx(p)) => {
                if let Some(p) = dev.pair(p) {
                    p.tx_serial = queue;
                }
            }
            None => {}
        }
    }

    fn describe(&self, head: &u16) -> String {
        format!("virtqueue {} head {head}", self.ring)
    }
}

impl EventLoop for VnetLoop<'_> {
    fn engine(&mut self) -> &mut Engine {
        self.engine
    }

    fn control(&self) -> &SeqPacket {
        self.control
    }

    fn completions(&mut self) -> &mut Vec<Completion> {
        &mut self.completions
    }

    /// Nothing is in flight between turns: one queued head per queue
    /// and turn.
    fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
        let device = &self.cfg.device;
        let Some(dev) = self.device.as_mut() else {
            return Ok(());
        };
        let ctrl_log = dev.ctrl.as_ref().and_then(|q| q.log.as_deref());
        let ctrl = dev.ctrl_serial.next(0, ctrl_log, device);
        let mut next = Vec::new();
        for (pair, p) in dev.pairs.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            let tx = p.tx_serial.next(0, p.tx.log.as_deref(), device);
            let rx = p.rx_serial.next(0, p.rx.log.as_deref(), device);
            next.push((pair, tx, rx));
        }
        if let Some((entry, head)) = ctrl {
            self.ctrl_head(head, Some(entry), false);
        }
        for (pair, tx, rx) in next {
            if let Some((entry, head)) = tx {
                // A serial replay follows a suspected crash loop: the dead
                // instance marked nothing sent that this one could trust
                // less.
                self.send_head(pair, head, Some(entry), None);
            }
            if let Some((entry, head)) = rx {
                self.post(
                    pair,
                    Taken {
                        head,
                        entry: Some(entry),
                    },
                );
            }
        }
        Ok(())
    }

    fn consume(&mut self) -> Result<(), BackendError> {
        self.consume_ctrl()?;
        let pairs = self.device.as_ref().map_or(0, |d| d.pairs.len());
        for pair in 0..pairs {
            if self.device.as_ref().is_some_and(|d| d.served(pair)) {
                self.consume_tx(pair)?;
                self.consume_rx(pair)?;
            }
        }
        self.deliver_rx()
    }

    fn publish(&mut self) {
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        let mem = dev.mem.clone();
        for q in dev.queues_mut() {
            match q.publish(&mem, &self.cfg.device) {
                Ok(false) => {}
                Ok(true) => {
                    self.stats.notifications += 1;
                    if let Err(e) = q.call.notify() {
                        tracing::warn!(device = %self.cfg.device, error = %e, "notify failed");
                    }
                }
                Err(e) => {
                    tracing::error!(device = %self.cfg.device, error = %e, "cannot publish used elements");
                }
            }
        }
    }

    fn finish_detach(&mut self) -> Result<(), BackendError> {
        let Some(dev) = self.device.as_ref() else {
            return Ok(());
        };
        if !dev.closing || !dev.serials_empty() {
            return Ok(());
        }
        // Receive heads still pooled are not answered: they were taken in
        // avail order and are the last ones, so the VMM, resuming at
        // `used->idx`, hands them to the next attachment again.
        let name = dev.name.clone();
        self.device = None;
        tracing::info!(device = %self.cfg.device, frontend = %name, stats = ?self.stats, "virtio-net detached");
        send_detached(self.control, Some(&name))
    }

    fn heartbeat(&mut self) {
        let logs = self
            .device
            .iter()
            .flat_map(|d| d.queues().flat_map(|q| q.log.as_deref()));
        event_loop::heartbeat(&self.cfg.device, logs);
        publish_metrics(self.metrics, &self.stats, false);
    }

    fn has_work(&mut self) -> bool {
        let Some(dev) = self.device.as_ref() else {
            return false;
        };
        if dev.closing {
            return !dev.serials_empty();
        }
        let pair_work = |(i, p): (usize, &Option<Pair>)| {
            p.as_ref().is_some_and(|p| {
                dev.served(i) && (p.tx.has_avail(&dev.mem) || p.rx.has_avail(&dev.mem))
            })
        };
        !dev.serials_empty()
            || dev.ctrl.as_ref().is_some_and(|q| q.has_avail(&dev.mem))
            || dev.pairs.iter().enumerate().any(pair_work)
            || (0..dev.lanes.len()).any(|l| dev.lane_ready(l))
    }

    fn on_control(&mut self) -> Result<(), BackendError> {
        let (msg, fds) = recv_control(self.control)?;
        self.handle_message(msg, fds)
    }

    fn on_kick(&mut self, generation: u32, ring: u8, _poll: i32) -> Result<(), BackendError> {
        let Some(dev) = self.device.as_mut() else {
            return Ok(());
        };
        if dev.generation != generation {
            return Ok(());
        }
        if let Some(lane) = ring.checked_sub(LANE_TOKEN) {
            if let Some(l) = dev.lanes.get_mut(usize::from(lane)) {
                l.armed = false;
                l.readable = true;
            }
            return Ok(());
        }
        let Some(q) = dev.queue(ring) else {
            return Ok(());
        };
        self.stats.kicks += 1;
        let _ = q.kick.drain();
        let fd = q.kick.as_raw_fd();
        arm(self.engine, Token::Kick { generation, ring }, fd)
    }

    fn on_io(&mut self, _generation: u32, _ring: u8, _slot: u16, _result: i32) {}
}
