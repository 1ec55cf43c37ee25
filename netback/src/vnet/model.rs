//! The virtio-net device model on the generic loop (docs/ARCHITECTURE.md
//! §8.1, §11.2): what a vhost-user-net device does with the heads its
//! virtqueues hand over. The loop logged each head when it took it, puts
//! and logs each answer COMPLETING, publishes and notifies.
//!
//! - **TX** (queue `2i + 1`): to a TAP, up to [`TX_BATCH`] frames are
//!   written with one submission ([`TapBatch`]): a plain frame straight
//!   from the driver's buffers ([`frame::locate`]), one with a partial
//!   checksum or a TCP super-frame gathered and finished in the batch's
//!   slab first. Its heads are held ([`Started::Held`]) and answered in
//!   avail order once the batch is written — when it is full, and when the
//!   queue is drained ([`DeviceModel::drained`]). To a cable, and in a
//!   replay, each frame is gathered into a private frame ([`frame::gather`])
//!   and sent on its own, its head answered at once. A malformed chain is
//!   answered too (length 0), so no driver waits for ever. A replayed head
//!   an older instance marked [`TX_SENT`] is answered only.
//! - **RX** (queue `2i`): heads are held in a pool per pair in avail
//!   order. Each *lane* (a TAP queue, or the one cable every pair shares)
//!   is an event source of the model, polled while a pair it serves has a
//!   head posted; a frame read from it is written into the first heads of
//!   its pair's pool (several with `MRG_RXBUF`, `num_buffers` in the
//!   header) and each head answered, and the loop logs those answers
//!   before the next frame is read (docs/ARCHITECTURE.md §11.6). Before a
//!   frame's first byte is written (or it is held for more heads) the
//!   first head's entry is marked [`RX_TAKEN`], once per head.
//! - **Control** (with `VIRTIO_NET_F_CTRL_VQ` and a VMM that hands it
//!   over): each command is parsed and checked ([`ctrl`]) and applied to the
//!   device state, which is written to the state area the supervisor
//!   keeps before the command is answered. The pairs the driver uses
//!   (`VQ_PAIRS_SET`) are the ones the loop takes from
//!   ([`DeviceModel::takes`]).
//!
//! [`TX_SENT`]: crate::backend::TX_SENT

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use shadowback_dataplane::model::{Answer, DeviceModel, HeldEntries, Started, Submit};
use shadowback_dataplane::rings::{Detail, RingSet, DETAIL_SIZE};
use shadowback_dataplane::virtq::{Head, VirtQueues};
use shadowback_shadow::IoCounters;
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::net as vnet;
use shadowback_virtio::net_state::{NetDeviceState, NetStateArea};
use shadowback_virtio::queue::Chain;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_ERR, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_OK,
};

use super::frame::{self, TxError};
use super::record::{UsedRecord, VnetRecords};
use super::{ctrl, WIRE_HDR};
use crate::backend::{NetStats, RX_TAKEN};
use crate::tapbatch::{PushError, TapBatch, TX_BATCH};
use crate::wire::tap::set_queue_attached;
use crate::wire::{
    Offloads, SendOutcome, VnetHeader, VnetHeaderLen, Wire, WireError, WireKind, MIN_FRAME_LEN,
};

/// The virtqueues of a virtio-net device.
pub type VnetQueues = VirtQueues<VnetRecords>;

/// What a ring of the set is in this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Rx(usize),
    Tx(usize),
    Ctrl,
    /// Started without the other queue of its pair: kept for its shadow
    /// log, never served.
    Idle,
}

/// Where frames of one or more pairs come and go: a TAP queue, or the
/// cable.
pub struct Lane {
    pub wire: Wire,
    /// A frame from the wire (wire header first) waiting for heads.
    held: Option<Vec<u8>>,
    /// The wire may hold frames: read at the end of a drain rather than
    /// polled.
    readable: bool,
    /// Attached to its TAP (`TUNSETQUEUE`): a detached queue is neither
    /// read nor polled. Always true for a lane of its own wire.
    attached: bool,
}

impl Lane {
    pub fn new(wire: Wire) -> Self {
        Lane {
            wire,
            held: None,
            readable: true,
            attached: true,
        }
    }
}

/// A posted receive head.
#[derive(Clone, Copy, Debug)]
struct Posted {
    /// The loop's slot holding it.
    slot: u16,
    head: u16,
    /// Bytes its device-writable buffers hold (walked when it was taken).
    capacity: usize,
    /// Its entry is marked [`RX_TAKEN`]: a frame from the wire starts in
    /// it (a held frame is marked once).
    taken: bool,
}

/// A transmit head whose frame is in the TAP batch: answered once the
/// batch is written.
#[derive(Clone, Copy, Debug)]
struct Batched {
    ring: usize,
    slot: u16,
    head: u16,
    /// Bytes of the frame (without any header).
    len: usize,
}

/// What the driver negotiated, as the data path uses it.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    /// The virtio features the driver acked.
    pub features: u64,
    /// `max_virtqueue_pairs` of the device.
    pub max_pairs: u16,
    /// The driver's virtio-net header length (10 or 12).
    pub hdr_len: usize,
    pub mrg_rxbuf: bool,
    pub csum: bool,
    /// TCP super-frames the driver sends (`HOST_TSO4/6`, on a TAP).
    pub host_tso: frame::Tso,
}

/// A head as parsed: its chain is the model's (`VnetModel::chain`) until
/// it is started.
pub struct VnetRequest {
    ring: usize,
    head: u16,
    replayed: bool,
}

/// The virtio-net model of one attached device.
pub struct VnetModel {
    device: String,
    mem: Arc<GuestRam>,
    neg: Negotiated,
    /// Partial checksums are passed on to the driver (`GUEST_CSUM`
    /// negotiated and not switched off on the control queue).
    guest_csum: bool,
    /// TCP super-frames the driver takes (`GUEST_TSO4/6` in force).
    guest_tso: frame::Tso,
    /// By ring of the set.
    roles: Vec<Role>,
    /// By pair: the ring of its receive queue (`None`: the VMM did not
    /// start both of its queues).
    rx_rings: Vec<Option<usize>>,
    /// By pair: receive heads taken, in avail order.
    pools: Vec<VecDeque<Posted>>,
    has_ctrl: bool,
    /// What the driver set on the control queue, and where it is kept for
    /// the next instance (`None`: a supervisor that keeps none).
    state: NetDeviceState,
    state_area: Option<NetStateArea>,
    /// One per TAP queue (pair `i` on lane `i`), or one cable.
    pub lanes: Vec<Lane>,
    pub stats: NetStats,
    /// Receive heads handed over by recovery.
    pub rx_buffers_recovered: u64,
    /// Transmit heads, by ring, an older instance marked sent: answered
    /// only when replayed.
    tx_sent: HashSet<(usize, u16)>,
    pub tap_batch: TapBatch,
    /// The heads of `tap_batch`, in its order, all of one lane.
    tx_batched: Vec<Batched>,
    batch_lane: usize,
    answers: VecDeque<Answer<UsedRecord>>,
    /// The chain of the head parsed last, or why its walk failed.
    chain: Chain,
    walked: Result<(), String>,
    /// Scratch: a receive head's chain, walked again to write into it.
    rx_chain: Chain,
    /// Scratch: the guest ranges of one transmit frame.
    tx_ranges: Vec<(u64, usize)>,
    /// Wire header + the largest frame: one transmit frame at a time.
    frame: Vec<u8>,
    /// Frames read from the wire.
    rx_scratch: Vec<u8>,
}

/// What a new model starts from.
pub struct VnetParts {
    pub device: String,
    pub mem: Arc<GuestRam>,
    pub neg: Negotiated,
    pub roles: Vec<Role>,
    pub has_ctrl: bool,
    pub state: NetDeviceState,
    pub state_area: Option<NetStateArea>,
    pub lanes: Vec<Lane>,
    pub stats: NetStats,
    pub tx_sent: HashSet<(usize, u16)>,
    pub tap_batch: TapBatch,
}

impl VnetModel {
    /// The model; [`VnetModel::set_up`] puts what the driver set in force.
    pub fn new(parts: VnetParts) -> Self {
        let pairs = parts
            .roles
            .iter()
            .filter_map(|r| match r {
                Role::Rx(p) | Role::Tx(p) => Some(p + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut rx_rings = vec![None; pairs];
        for (ring, role) in parts.roles.iter().enumerate() {
            if let Role::Rx(p) = role {
                rx_rings[*p] = Some(ring);
            }
        }
        VnetModel {
            device: parts.device,
            mem: parts.mem,
            neg: parts.neg,
            guest_csum: false,
            guest_tso: frame::Tso::default(),
            roles: parts.roles,
            rx_rings,
            pools: (0..pairs).map(|_| VecDeque::new()).collect(),
            has_ctrl: parts.has_ctrl,
            state: parts.state,
            state_area: parts.state_area,
            lanes: parts.lanes,
            stats: parts.stats,
            rx_buffers_recovered: 0,
            tx_sent: parts.tx_sent,
            tap_batch: parts.tap_batch,
            tx_batched: Vec::with_capacity(TX_BATCH),
            batch_lane: 0,
            answers: VecDeque::new(),
            chain: Chain::default(),
            walked: Ok(()),
            rx_chain: Chain::default(),
            tx_ranges: Vec::with_capacity(2 * super::CHAIN_CAP),
            frame: vec![0; WIRE_HDR.bytes() + crate::wire::MAX_FRAME_LEN],
            rx_scratch: Vec::new(),
        }
    }

    /// What the driver set before this instance, in force before the
    /// first frame is served: the TAP queues of the pairs in use attached
    /// and the others detached, the offloads.
    pub fn set_up(&mut self) -> Result<(), String> {
        self.sync_lanes(true)
            .map_err(|e| format!("TAP queues: {e}"))?;
        self.apply_offloads()
            .map_err(|e| format!("guest offloads: {e}"))
    }

    /// Whether pair `pair` is served: started, and among the pairs the
    /// driver uses (`VQ_PAIRS_SET` when the control queue is ours; every
    /// started pair when the VMM keeps it).
    fn served(&self, pair: usize) -> bool {
        self.rx_rings.get(pair).is_some_and(Option::is_some)
            && (!self.has_ctrl || pair < usize::from(self.state.pairs))
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
        let served = (0..self.pools.len()).filter(|&p| self.served(p));
        let n = served.clone().count();
        if n == 0 {
            return None;
        }
        let k = frame::flow_hash(frame) as usize % n;
        served.into_iter().nth(k)
    }

    /// Whether a served pair read from `lane` has a head posted.
    fn lane_has_heads(&self, lane: usize) -> bool {
        (0..self.pools.len())
            .any(|p| self.lane_of(p) == lane && self.served(p) && !self.pools[p].is_empty())
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

    /// The chain parsed last, checked for a frame or a command.
    fn parsed_chain(&self) -> Result<(), String> {
        self.walked.clone()?;
        if self.chain.overflowed() {
            return Err(format!("chain of {} buffers", self.chain.count));
        }
        Ok(())
    }

    // ---- TX ------------------------------------------------------------

    fn start_tx(&mut self, req: &VnetRequest, pair: usize, slot: u16) -> Started<(), UsedRecord> {
        let answer = UsedRecord::single(req.head, 0);
        if req.replayed && self.tx_sent.remove(&(req.ring, req.head)) {
            return Started::Done(answer);
        }
        let lane = self.lane_of(pair);
        let on_tap = self.lanes[lane].wire.kind() == WireKind::Tap;
        if !on_tap || req.replayed {
            self.send_own(lane, req.head);
            return Started::Done(answer);
        }
        if !self.tx_batched.is_empty() && self.batch_lane != lane {
            self.flush_tx();
        }
        self.batch_lane = lane;
        match self.batch_frame(lane) {
            Ok(len) => {
                self.tx_batched.push(Batched {
                    ring: req.ring,
                    slot,
                    head: req.head,
                    len,
                });
                if self.tap_batch.len() >= TX_BATCH {
                    self.flush_tx();
                }
                Started::Held(())
            }
            Err(PushError::Fill(e)) => {
                tracing::debug!(device = %self.device, head = req.head, error = %e, "TX frame refused");
                self.stats.tx_errors += 1;
                Started::Done(answer)
            }
            // Not expected after a flush: sent on its own.
            Err(PushError::Full | PushError::Busy) => {
                self.send_own(lane, req.head);
                Started::Done(answer)
            }
        }
    }

    /// Sends the frame of the chain parsed last on its own; its head is
    /// answered after the write (docs/ARCHITECTURE.md §8.1).
    fn send_own(&mut self, lane: usize, head: u16) {
        if let Err(e) = self.transmit(lane) {
            tracing::debug!(device = %self.device, head, error = %e, "TX frame refused");
            self.stats.tx_errors += 1;
        }
    }

    /// Puts the frame of the chain parsed last in the TAP batch; its
    /// length. A plain frame ([`frame::is_plain`]) is its wire header, in
    /// the batch's slab, and its ranges of guest memory: the kernel copies
    /// it once, straight from the driver's buffers. Any other is gathered
    /// into the slab and finished there ([`frame::prepare_tx`]), so what was
    /// checked is what is written.
    fn batch_frame(&mut self, lane: usize) -> Result<usize, PushError<TxError>> {
        self.parsed_chain()
            .map_err(|e| PushError::Fill(TxError::Header(e)))?;
        let hdr_len = self.neg.hdr_len;
        let wire_hdr = WIRE_HDR.bytes();
        let mut hdr = [0u8; 12];
        self.tx_ranges.clear();
        let len = frame::locate(
            &self.mem,
            &self.chain.bufs,
            &mut hdr[..hdr_len],
            &mut self.tx_ranges,
        )
        .map_err(PushError::Fill)?;
        let header = |e: &dyn std::fmt::Display| PushError::Fill(TxError::Header(e.to_string()));
        let driver_hdr = VnetHeader::decode(&hdr, WIRE_HDR).map_err(|e| header(&e))?;
        driver_hdr.validate(len).map_err(|e| header(&e))?;
        let plain = frame::is_plain(&driver_hdr);
        let slab_len = if plain { wire_hdr } else { wire_hdr + len };
        if !self.tap_batch.has_room(slab_len) {
            self.flush_tx();
        }
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
        let (csum, tso) = (self.neg.csum, self.neg.host_tso);
        let (mem, bufs, wire) = (&self.mem, &self.chain.bufs, &self.lanes[lane].wire);
        self.tap_batch
            .push(slab_len, &[], |slab| {
                let (wire_part, data) = slab.split_at_mut(wire_hdr);
                let mut copied_hdr = [0u8; 12];
                let copied = frame::gather(mem, bufs, &mut copied_hdr[..hdr_len], data)?;
                // The copy is what goes out: its header is the one checked.
                let copied_hdr = VnetHeader::decode(&copied_hdr, WIRE_HDR)
                    .map_err(|e| TxError::Header(e.to_string()))?;
                if copied != len {
                    return Err(TxError::Header(
                        "the chain changed while it was read".into(),
                    ));
                }
                frame::prepare_tx(&copied_hdr, data, csum, tso)?
                    .encode(wire_part, WIRE_HDR)
                    .map_err(|e| TxError::Header(e.to_string()))?;
                // As `Wire::send` checks what it is handed.
                wire.check_frame(wire_part, len)
                    .map_err(|e| TxError::Header(format!("wire: {e}")))
            })
            .map(|()| len)
    }

    /// Writes the TAP batch to its lane and answers its heads in batch
    /// order (avail order), each after the whole batch's write.
    fn flush_tx(&mut self) {
        if self.tap_batch.is_empty() {
            self.tx_batched.clear();
            return;
        }
        let lane = self.batch_lane;
        let fd = self.lanes[lane].wire.fd().as_raw_fd();
        let mut results = [0i32; TX_BATCH];
        let written = self.tap_batch.flush(fd, &self.mem);
        results[..written.len()].copy_from_slice(written);
        for (b, &result) in self.tx_batched.iter().zip(&results) {
            match self.lanes[lane].wire.count_write(result) {
                Ok(SendOutcome::Sent) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += b.len as u64;
                }
                // A full queue or a down link loses the frame, as on a NIC.
                Ok(SendOutcome::Dropped(_)) => self.stats.tx_wire_drops += 1,
                Err(e) => {
                    tracing::debug!(device = %self.device, head = b.head, error = %e, "TX frame refused by the TAP");
                    self.stats.tx_errors += 1;
                }
            }
            self.answers.push_back(Answer {
                ring: b.ring,
                slot: b.slot,
                response: UsedRecord::single(b.head, 0),
            });
        }
        self.tx_batched.clear();
    }

    /// Gathers, checks and writes the frame of the chain parsed last to
    /// `lane`.
    fn transmit(&mut self, lane: usize) -> Result<(), TxError> {
        self.parsed_chain().map_err(TxError::Header)?;
        let wire_hdr = WIRE_HDR.bytes();
        let mut hdr = [0u8; 12];
        let len = frame::gather(
            &self.mem,
            &self.chain.bufs,
            &mut hdr[..self.neg.hdr_len],
            &mut self.frame[wire_hdr..],
        )?;
        let driver_hdr =
            VnetHeader::decode(&hdr, WIRE_HDR).map_err(|e| TxError::Header(e.to_string()))?;
        let data = &mut self.frame[wire_hdr..wire_hdr + len];
        frame::prepare_tx(&driver_hdr, data, self.neg.csum, self.neg.host_tso)?
            .encode(&mut self.frame[..wire_hdr], WIRE_HDR)
            .map_err(|e| TxError::Header(e.to_string()))?;
        match self.lanes[lane].wire.send(&self.frame[..wire_hdr + len]) {
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

    /// Puts a receive head into the pool of `pair`, or answers it empty if
    /// the driver did not give it a usable buffer.
    fn start_rx(&mut self, req: &VnetRequest, pair: usize, slot: u16) -> Started<(), UsedRecord> {
        if req.replayed {
            self.rx_buffers_recovered += 1;
        }
        let capacity = match self.parsed_chain() {
            Ok(()) if self.chain.bufs.iter().all(|b| b.writable) => {
                frame::capacity(&self.chain.bufs)
            }
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(device = %self.device, head = req.head, error = %e, "bad receive chain");
                0
            }
        };
        // A head that can never hold a frame goes back at once: one
        // smaller than the driver's header (with MRG_RXBUF every buffer
        // holds at least that, virtio 1.2 §5.1.6.3.1), or without
        // MRG_RXBUF one short of the header and an Ethernet header. Kept,
        // it would sit at the front of the pool and drop every frame.
        let least = if self.neg.mrg_rxbuf {
            self.neg.hdr_len
        } else {
            self.neg.hdr_len + MIN_FRAME_LEN
        };
        if capacity < least {
            self.stats.rx_dropped += 1;
            return Started::Done(UsedRecord::single(req.head, 0));
        }
        self.pools[pair].push_back(Posted {
            slot,
            head: req.head,
            capacity,
            taken: false,
        });
        Started::Held(())
    }

    /// Moves frames from `lane` into posted heads while there are both;
    /// `true` when it stopped after one frame's answers with more to do
    /// (the loop logs them and calls again).
    fn deliver_lane(
        &mut self,
        rings: &VnetQueues,
        lane: usize,
        entries: &mut dyn HeldEntries,
    ) -> bool {
        let mut answered = false;
        loop {
            if !self.lanes[lane].attached {
                return false;
            }
            if answered {
                // The loop logs a frame's answers before the next frame is
                // read: a frame written into heads and answered but not
                // yet logged dies with this instance, so at most one is in
                // that state at a death (docs/ARCHITECTURE.md §11.6).
                return true;
            }
            let before = self.answers.len();
            if let Some(mut held) = self.lanes[lane].held.take() {
                if !self.deliver_frame(rings, lane, &mut held, entries) {
                    self.lanes[lane].held = Some(held);
                    return false;
                }
                answered = self.answers.len() > before;
                continue;
            }
            if !self.lanes[lane].readable || !self.lane_has_heads(lane) {
                return false;
            }
            // One scratch buffer for every frame: no allocation per frame.
            let mut buf = std::mem::take(&mut self.rx_scratch);
            let wire = &mut self.lanes[lane].wire;
            buf.resize(wire.recv_buf_len(), 0);
            let received = wire.recv(&mut buf);
            let drained = match received {
                Ok(Some(n)) => {
                    if !self.deliver_frame(rings, lane, &mut buf[..n], entries) {
                        self.lanes[lane].held = Some(buf[..n].to_vec());
                    }
                    false
                }
                Ok(None) => true,
                Err(WireError::Closed) => {
                    // Read once: the lane is not polled again.
                    tracing::warn!(device = %self.device, lane, "the cable's far end closed: nothing more for the guest");
                    true
                }
                Err(e) => {
                    tracing::warn!(device = %self.device, error = %e, "wire read failed");
                    true
                }
            };
            self.rx_scratch = buf;
            if drained {
                self.lanes[lane].readable = false;
                return false;
            }
            answered = self.answers.len() > before;
        }
    }

    /// Writes one frame read from `lane` (wire header first) into the
    /// first heads of its pair's pool and answers them, or drops it;
    /// `false` when it needs more heads than are posted (the caller holds
    /// it).
    fn deliver_frame(
        &mut self,
        rings: &VnetQueues,
        lane: usize,
        wire_frame: &mut [u8],
        entries: &mut dyn HeldEntries,
    ) -> bool {
        let Ok(wire_hdr) = VnetHeader::decode(wire_frame, WIRE_HDR) else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let data = &mut wire_frame[WIRE_HDR.bytes()..];
        let dst: Option<[u8; 6]> = data.get(..6).and_then(|d| d.try_into().ok());
        if !dst.is_some_and(|dst| self.state.accepts(&dst)) {
            self.stats.rx_filtered += 1;
            return true;
        }
        let Some(pair) = self.rx_target(lane, data) else {
            // No pair is served on this lane any more.
            self.stats.rx_dropped += 1;
            return true;
        };
        let Some(ring) = self.rx_rings[pair] else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let Some(mut hdr) = frame::rx_header(&wire_hdr, data, self.guest_csum, self.guest_tso)
        else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let (mrg_rxbuf, hdr_len) = (self.neg.mrg_rxbuf, self.neg.hdr_len);
        let total = hdr_len + data.len();
        let pool = &self.pools[pair];
        if pool.is_empty() {
            return false;
        }
        // Heads the frame needs: one without MRG_RXBUF.
        let mut count = 0usize;
        let mut room = 0usize;
        for posted in pool {
            count += 1;
            room += posted.capacity;
            if room >= total || !mrg_rxbuf {
                break;
            }
        }
        if room < total {
            let ring_full = pool.len() >= rings.size(ring) as usize;
            if mrg_rxbuf && !ring_full {
                self.mark_taken(ring, pair, entries);
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
        // Before the first byte is written: from here a crash loses a
        // frame the wire no longer holds, and the next instance counts it.
        self.mark_taken(ring, pair, entries);
        let frame_len = data.len() as u64;
        let mut at = 0usize;
        let mut ok = true;
        for position in 0..count {
            let Some(posted) = self.pools[pair].pop_front() else {
                break;
            };
            // Walked again: the chain is the driver's memory.
            let walked = rings.walk_into(ring, posted.head, &mut self.rx_chain);
            let written = if ok && walked.is_ok() && !self.rx_chain.overflowed() {
                frame::scatter_parts(&self.mem, &self.rx_chain.bufs, hdr_bytes, data, at).ok()
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
            self.answers.push_back(Answer {
                ring,
                slot: posted.slot,
                response: UsedRecord {
                    id: u32::from(posted.head),
                    len,
                    position: position as u16,
                    count: count as u16,
                },
            });
        }
        if ok && at == total {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += frame_len;
        } else {
            self.stats.rx_dropped += 1;
        }
        true
    }

    /// Marks the entry of the first head of `pair`'s pool [`RX_TAKEN`]
    /// (`ring`: its receive queue), unless it is already: a frame from
    /// the wire is bound for it.
    fn mark_taken(&mut self, ring: usize, pair: usize, entries: &mut dyn HeldEntries) {
        let Some(first) = self.pools[pair].front_mut() else {
            return;
        };
        if !first.taken {
            entries.mark(ring, first.slot, RX_TAKEN);
            first.taken = true;
        }
    }

    // ---- control queue -------------------------------------------------

    /// Executes the command of the chain parsed last (or, `refuse`d by the
    /// crash-loop breaker, only answers it `VIRTIO_NET_ERR`), then writes
    /// the ack; the used element. A chain without a writable byte for the
    /// ack is answered with length 0 and not executed: the driver could
    /// not be told the outcome.
    fn ctrl_head(&mut self, head: u16, refuse: bool) -> UsedRecord {
        let mut len = 0;
        match self.parsed_chain() {
            Ok(()) if self.chain.bufs.iter().any(|b| b.writable) => {
                let ran = if refuse { None } else { Some(self.run_ctrl()) };
                let ack = match ran {
                    Some(Ok(())) => VIRTIO_NET_OK as u8,
                    None => VIRTIO_NET_ERR as u8,
                    Some(Err(why)) => {
                        tracing::debug!(device = %self.device, head, why, "control command refused");
                        self.stats.ctrl_errors += 1;
                        VIRTIO_NET_ERR as u8
                    }
                };
                let written = frame::scatter(&self.mem, &self.chain.bufs, &[ack], 0).ok();
                len = written.unwrap_or(0) as u32;
            }
            Ok(()) => self.stats.ctrl_errors += 1,
            Err(e) => {
                tracing::debug!(device = %self.device, head, error = %e, "bad control chain");
                self.stats.ctrl_errors += 1;
            }
        }
        UsedRecord::single(head, len)
    }

    /// Runs the command in the chain parsed last: the new state is written
    /// to the state area before it takes effect, and before the ack.
    fn run_ctrl(&mut self) -> Result<(), String> {
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
            self.mem
                .read(b.addr, dst)
                .map_err(|_| format!("buffer at {:#x} is not guest memory", b.addr))?;
            at += b.len as usize;
        }
        let mut state = self.state.clone();
        let device = ctrl::CtrlDevice {
            features: self.neg.features,
            max_pairs: self.neg.max_pairs,
        };
        ctrl::execute(&mut state, device, &bytes).map_err(|e| e.to_string())?;
        if let Some(area) = self.state_area.as_mut() {
            area.store(&state).map_err(|e| e.to_string())?;
        }
        self.state = state;
        // A new pair count moves TAP queues in or out of the kernel's
        // steering before the driver is told.
        self.sync_lanes(false)?;
        self.apply_offloads()
    }

    /// Takes the chain the ring set walked last as the one parsed.
    fn keep_chain(&mut self, rings: &VnetQueues) {
        self.walked = match rings.walked() {
            Ok(chain) => {
                self.chain.clone_from(chain);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
    }
}

impl DeviceModel<VnetQueues> for VnetModel {
    type Request = VnetRequest;
    type Pending = ();
    /// Frames move with the wire's own calls and the TAP batch's ring.
    const MAX_OPS: usize = 0;

    fn parse(&mut self, rings: &VnetQueues, ring: usize, head: &Head) -> VnetRequest {
        self.keep_chain(rings);
        VnetRequest {
            ring,
            head: head.head,
            replayed: head.replayed,
        }
    }

    fn detail(&self, _request: &VnetRequest) -> Detail {
        [0; DETAIL_SIZE]
    }

    /// A poisoned "sector" names a transmit head.
    fn poisoned(&self, request: &VnetRequest, poison: &[u64]) -> bool {
        matches!(self.roles.get(request.ring), Some(Role::Tx(_)))
            && poison.contains(&u64::from(request.head))
    }

    fn start(&mut self, request: VnetRequest, io: &mut Submit<'_>) -> Started<(), UsedRecord> {
        let (_, slot) = io.place();
        match self.roles.get(request.ring).copied() {
            Some(Role::Tx(pair)) => self.start_tx(&request, pair, slot),
            Some(Role::Rx(pair)) => self.start_rx(&request, pair, slot),
            // Every command sets state: executing it again is harmless.
            Some(Role::Ctrl) => Started::Done(self.ctrl_head(request.head, false)),
            Some(Role::Idle) | None => Started::Done(UsedRecord::single(request.head, 0)),
        }
    }

    fn complete(
        &mut self,
        _pending: &mut (),
        _result: i32,
        _io: &mut Submit<'_>,
    ) -> Option<UsedRecord> {
        None
    }

    /// A command is answered `VIRTIO_NET_ERR`; a frame's head with length
    /// 0.
    fn fail(&mut self, rings: &VnetQueues, ring: usize, head: &Head) -> UsedRecord {
        if self.roles.get(ring) == Some(&Role::Ctrl) {
            self.keep_chain(rings);
            return self.ctrl_head(head.head, true);
        }
        UsedRecord::single(head.head, 0)
    }

    fn is_error(&self, _used: &UsedRecord) -> bool {
        false
    }

    fn next_answer(&mut self) -> Option<Answer<UsedRecord>> {
        self.answers.pop_front()
    }

    fn sources(&self) -> usize {
        self.lanes.len()
    }

    /// Lane `n`'s wire, while a pair it serves has a head posted, it is
    /// open and not known to hold frames already (then a drain reads it)
    /// and no frame of it waits for heads.
    fn source(&self, n: usize) -> Option<RawFd> {
        let lane = self.lanes.get(n)?;
        (lane.attached
            && !lane.wire.is_closed()
            && !lane.readable
            && lane.held.is_none()
            && self.lane_has_heads(n))
        .then(|| lane.wire.fd().as_raw_fd())
    }

    fn ready(&mut self, n: usize, rings: &VnetQueues, entries: &mut dyn HeldEntries) -> bool {
        let Some(lane) = self.lanes.get_mut(n) else {
            return false;
        };
        lane.readable = true;
        self.deliver_lane(rings, n, entries)
    }

    fn takes(&self, ring: usize) -> bool {
        match self.roles.get(ring) {
            Some(Role::Ctrl) => true,
            Some(Role::Rx(p) | Role::Tx(p)) => self.served(*p),
            Some(Role::Idle) | None => false,
        }
    }

    /// TX: the batch is written before the turn publishes. RX: heads just
    /// posted take what the pair's lane holds.
    fn drained(&mut self, rings: &VnetQueues, ring: usize, entries: &mut dyn HeldEntries) -> bool {
        match self.roles.get(ring).copied() {
            Some(Role::Tx(_)) => {
                self.flush_tx();
                false
            }
            Some(Role::Rx(pair)) => {
                let lane = self.lane_of(pair);
                self.deliver_lane(rings, lane, entries)
            }
            _ => false,
        }
    }

    fn io_counters(&self, _base: IoCounters) -> IoCounters {
        self.stats.io_counters()
    }
}
