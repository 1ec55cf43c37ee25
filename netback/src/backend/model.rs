//! The netif device model on the generic loop (docs/ARCHITECTURE.md
//! §11.3, §11.6): what a vif does with the slots its rings hand over.
//!
//! Every slot is held ([`Started::Held`]) until it is answered through
//! [`DeviceModel::next_answer`]; the loop logged it when it took it.
//!
//! - **TX**: a packet's slots are collected until its last one; then it is
//!   refused (every slot `ERROR`), a multicast change is kept and answered,
//!   a frame to a cable is sent and answered (a cable found full: the
//!   packet waits, unanswered, and no more TX is taken until the cable has
//!   room, [`DeviceModel::takes`]), and a frame to a TAP joins
//!   the batch, written when it is full and when the ring is drained
//!   ([`DeviceModel::drained`]), its packets answered after the write in
//!   ring order, the first slot first. A replayed packet (its slots read
//!   back from the log, or the rest of one the dead instance was logging)
//!   is reassembled and parsed again, then answered only if the dead
//!   instance sent it, else sent again on its own.
//! - **RX**: posted buffers wait in a pool in ring order. The wire is read
//!   while buffers are posted — when it is polled readable
//!   ([`DeviceModel::ready`]) and, while it may still hold frames, at the
//!   end of each drain — and each frame is laid into the first buffers,
//!   each answered in its own slot; a frame needing more buffers than are
//!   posted is held. Before a frame's first byte is copied its first
//!   buffer's entry is marked [`RX_TAKEN`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use shadowback_dataplane::model::{Answer, DeviceModel, HeldEntries, Started, Submit};
use shadowback_dataplane::rings::{Detail, DETAIL_SIZE};
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::netif::{
    NetifRxRequest, NetifRxResponse, NetifTxResponse, NETIF_RSP_ERROR, NETIF_RSP_OKAY,
    XEN_NETIF_NR_SLOTS_MIN,
};
use shadowback_ring::SharedRegion;
use shadowback_shadow::IoCounters;

use super::rings::{NetifAnswer, NetifRings, NetifSlot, TxParsed, RX, TX};
use super::{NetStats, RX_TAKEN};
use crate::checksum;
use crate::netif::tx::{parse_tx, TxPacket, TxRequest, TxSlots};
use crate::netif::{
    rx_plan, Checksum, MulticastFilter, NetifRxError, RxFeatures, RxFrame, TxFragment,
};
use crate::record::tx::{self as txrec, TxSlotRecord};
use crate::tapbatch::{PushError, TapBatch, TX_BATCH};
use crate::wire::{DropReason, SendOutcome, VnetHeader, Wire, WireError, WireKind};

/// What a vif reads and writes frames with: the wire and the guest's
/// granted pages.
pub struct VifIo {
    pub region: Arc<SharedRegion>,
    pub grants: GrantMapper,
    pub wire: Wire,
}

/// The slots of one TX packet collected so far, in ring order, each with
/// the loop's slot holding it.
#[derive(Default)]
struct Collecting {
    /// Ring index of the packet's first slot.
    packet: u32,
    count: u16,
    slots: Vec<(u16, TxSlotRecord)>,
    /// The packet as validated when it was taken (`None`: replayed).
    parsed: Option<TxParsed>,
}

impl Collecting {
    /// Whether `answered` slots answered by a dead instance make the
    /// packet whole.
    fn whole(&self, answered: usize) -> bool {
        self.slots.len() + answered >= usize::from(self.count)
    }
}

/// A packet in the TAP batch, answered once the batch is written.
struct Batched {
    /// The loop's slots holding its ring slots, in ring order.
    held: Vec<u16>,
    slots: TxSlots,
    fragments: Vec<TxFragment>,
    size: u16,
}

/// A TX packet for a cable that found it full, waiting for room
/// (docs/ARCHITECTURE.md §11.5): logged, not sent, not answered.
struct Waiting {
    held: Vec<u16>,
    packet: TxPacket,
}

/// The model's event sources: the wire polled for frames to deliver, and
/// for room while TX packets wait for a full cable.
const SOURCE_FRAMES: usize = 0;
const SOURCE_ROOM: usize = 1;

/// What a dead instance did with the TX packets still in its log.
#[derive(Default)]
pub struct TxProgress {
    /// Packets it sent (first slot marked `TX_SENT` by an older instance).
    pub sent: HashSet<u32>,
    /// Slots it answered, by packet: a packet it was answering when it died
    /// is whole with them.
    pub answered: HashMap<u32, Vec<TxSlotRecord>>,
}

/// The netif model of one attached vif.
pub struct NetifModel {
    pub(super) device: String,
    pub(super) io: VifIo,
    pub(super) rx_features: RxFeatures,
    /// Complete blank checksums before RX delivery.
    pub(super) no_csum_offload: bool,
    /// The guest's multicast list (docs/ARCHITECTURE.md §11.6).
    pub(super) mcast: MulticastFilter,
    pub(super) stats: NetStats,
    /// RX buffers handed back by recovery.
    pub(super) rx_buffers_recovered: u64,
    pub(super) tap_batch: TapBatch,
    pub(super) progress: TxProgress,
    collecting: Collecting,
    /// The packet whose first slot was just parsed, until it is started.
    fresh: Option<TxParsed>,
    batched: Vec<Batched>,
    /// Packets for a full cable, in ring order: sent and answered once it
    /// has room. At most a ring's worth (no TX is taken meanwhile; a
    /// replay adds at most what the log holds).
    waiting: VecDeque<Waiting>,
    /// Emptied lists of answered packets' held slots, reused.
    held_lists: Vec<Vec<u16>>,
    answers: VecDeque<Answer<NetifAnswer>>,
    /// Lists of answered packets, given back to the parser at the next
    /// call that has the rings ([`NetifModel::return_spent`]).
    spent: Vec<(TxSlots, Option<Vec<TxFragment>>)>,
    /// Scratch frame: virtio-net header + the largest frame.
    frame: Vec<u8>,
    /// Scratch for frames read from the wire.
    rx_scratch: Vec<u8>,
    /// Posted RX buffers in ring order, with the loop's slots holding them.
    pool: VecDeque<(u16, NetifRxRequest)>,
    /// A frame read from the wire that waits for more buffers.
    held_frame: Option<Vec<u8>>,
    /// The RX slot last marked [`RX_TAKEN`] (a held frame is marked once).
    rx_taken: Option<u16>,
    /// The wire may hold frames: read at the end of a drain rather than
    /// polled.
    wire_readable: bool,
}

/// A parsed slot (a packet taken by this instance waits in the model
/// from its first slot's parse).
pub struct NetifRequest {
    slot: NetifSlot,
}

impl NetifModel {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        device: String,
        io: VifIo,
        rx_features: RxFeatures,
        no_csum_offload: bool,
        mcast: MulticastFilter,
        stats: NetStats,
        tap_batch: TapBatch,
        progress: TxProgress,
    ) -> Self {
        NetifModel {
            device,
            io,
            rx_features,
            no_csum_offload,
            mcast,
            stats,
            rx_buffers_recovered: 0,
            tap_batch,
            progress,
            collecting: Collecting::default(),
            fresh: None,
            batched: Vec::with_capacity(TX_BATCH),
            waiting: VecDeque::new(),
            held_lists: Vec::with_capacity(TX_BATCH),
            answers: VecDeque::with_capacity(4 * TX_BATCH),
            spent: Vec::with_capacity(TX_BATCH),
            frame: vec![0; crate::wire::VnetHeaderLen::Basic.bytes() + crate::wire::MAX_FRAME_LEN],
            rx_scratch: Vec::new(),
            pool: VecDeque::new(),
            held_frame: None,
            rx_taken: None,
            wire_readable: true,
        }
    }

    fn on_tap(&self) -> bool {
        self.io.wire.kind() == WireKind::Tap
    }

    fn answer_tx(&mut self, slot: u16, rsp: NetifTxResponse) {
        self.answers.push_back(Answer {
            ring: TX,
            slot,
            response: NetifAnswer::Tx(rsp),
        });
    }

    /// Answers every held slot of a packet, in ring order: `status` for
    /// data slots, `NULL` for extras.
    fn answer_packet(&mut self, held: &[u16], slots: &TxSlots, status: i16) {
        for (&slot, rsp) in held.iter().zip(slots.responses_iter(status)) {
            self.answers.push_back(Answer {
                ring: TX,
                slot,
                response: NetifAnswer::Tx(rsp),
            });
        }
    }

    /// Answers the slots collected so far with an error each: their packet
    /// cannot be put together (a corrupt log).
    fn fail_collected(&mut self) {
        let stale = std::mem::take(&mut self.collecting);
        tracing::warn!(device = %self.device, packet = stale.packet, "an incomplete TX packet in the log: its slots failed");
        for (slot, rec) in stale.slots {
            self.answer_tx(slot, txrec::error_response(&rec));
        }
    }

    /// A TX slot: collected until its packet is whole, then the packet is
    /// executed.
    fn start_tx(&mut self, slot: u16, rec: TxSlotRecord) {
        if !self.collecting.slots.is_empty() && self.collecting.packet != rec.packet {
            // The previous packet never became whole.
            self.fail_collected();
        }
        let c = &mut self.collecting;
        if c.slots.is_empty() {
            c.packet = rec.packet;
            c.count = rec.count;
        }
        c.slots.push((slot, rec));
        let fresh = if rec.position == 0 {
            self.fresh.take()
        } else {
            None
        };
        let answered = if self.progress.answered.is_empty() {
            0
        } else {
            self.progress.answered.get(&rec.packet).map_or(0, Vec::len)
        };
        if !c.whole(answered) {
            if fresh.is_some() {
                c.parsed = fresh;
            }
            return;
        }
        // A one-slot packet goes straight on: a packet is a few hundred
        // bytes, moved as little as possible.
        let parsed = if fresh.is_some() {
            fresh
        } else {
            c.parsed.take()
        };
        self.finish_packet(parsed);
    }

    /// The whole packet collected: one this instance took and validated,
    /// or a replayed one, reassembled from its records.
    fn finish_packet(&mut self, parsed: Option<TxParsed>) {
        let mut collected = std::mem::take(&mut self.collecting.slots);
        let packet = self.collecting.packet;
        let mut held = self.held_lists.pop().unwrap_or_default();
        held.clear();
        held.extend(collected.iter().map(|(slot, _)| *slot));
        match parsed {
            Some(TxParsed::Refused(slots)) => {
                // Answered in ring order: the batch before it first.
                self.flush_tx();
                self.stats.tx_errors += 1;
                self.answer_packet(&held, &slots, NETIF_RSP_ERROR);
                self.keep_held(held);
                self.give_back(slots, None);
            }
            Some(TxParsed::Request(request)) => self.execute_fresh(held, request),
            None => {
                self.replay_packet(packet, &collected);
                self.keep_held(held);
            }
        }
        // Keep the collecting list's allocation.
        collected.clear();
        self.collecting.slots = collected;
    }

    fn keep_held(&mut self, held: Vec<u16>) {
        if self.held_lists.len() < TX_BATCH
            && held.capacity() <= crate::netif::tx::TxSpares::LONGEST_KEPT
        {
            self.held_lists.push(held);
        }
    }

    /// The lists of an answered packet, for the parser to reuse.
    fn give_back(&mut self, slots: TxSlots, fragments: Option<Vec<TxFragment>>) {
        self.spent.push((slots, fragments));
    }

    /// Hands the parser the lists given back since the last call.
    fn return_spent(&mut self, rings: &NetifRings) {
        for (slots, fragments) in self.spent.drain(..) {
            rings.keep(slots, fragments);
        }
    }

    /// A packet this instance took: batched for a TAP, else executed now
    /// (after the batch: answers keep ring order).
    fn execute_fresh(&mut self, held: Vec<u16>, request: TxRequest) {
        let packet = match request {
            TxRequest::Packet(p) if self.on_tap() => p,
            other => {
                self.flush_tx();
                self.execute(&held, other);
                return self.keep_held(held);
            }
        };
        match self.batch_packet(&packet) {
            Ok(()) => {
                let TxPacket {
                    slots,
                    fragments,
                    size,
                    ..
                } = packet;
                self.batched.push(Batched {
                    held,
                    slots,
                    fragments,
                    size,
                });
                if self.tap_batch.len() >= TX_BATCH {
                    self.flush_tx();
                }
            }
            Err(PushError::Fill(why)) => {
                tracing::debug!(device = %self.device, why, "TX packet failed");
                self.flush_tx();
                self.stats.tx_errors += 1;
                self.answer_packet(&held, &packet.slots, NETIF_RSP_ERROR);
                self.keep_held(held);
                self.give_back(packet.slots, Some(packet.fragments));
            }
            // Not expected after a flush: sent on its own.
            Err(PushError::Full | PushError::Busy) => {
                self.flush_tx();
                self.execute(&held, TxRequest::Packet(packet));
                self.keep_held(held);
            }
        }
    }

    /// Keeps a multicast change, or sends a packet on its own, and answers
    /// its slots.
    fn execute(&mut self, held: &[u16], request: TxRequest) {
        match request {
            TxRequest::Multicast(m) => {
                // Kept in the device state area before it is answered.
                let status = match self.mcast.apply(m.op) {
                    Ok(()) => NETIF_RSP_OKAY,
                    Err(why) => {
                        tracing::warn!(device = %self.device, why, "multicast list not kept");
                        NETIF_RSP_ERROR
                    }
                };
                self.answer_packet(held, &m.slots, status);
                self.give_back(m.slots, None);
            }
            TxRequest::Packet(p) => {
                if !self.waiting.is_empty() {
                    // Behind the packets waiting for room, in ring order.
                    return self.waiting.push_back(Waiting {
                        held: held.to_vec(),
                        packet: p,
                    });
                }
                // No progress flag: the first slot's answer, logged right
                // after the write, says the packet went out (§11.6).
                let status = match self.send_packet(&p) {
                    Ok(true) => NETIF_RSP_OKAY,
                    Ok(false) => {
                        return self.waiting.push_back(Waiting {
                            held: held.to_vec(),
                            packet: p,
                        });
                    }
                    Err(why) => {
                        tracing::debug!(device = %self.device, why, "TX packet failed");
                        self.stats.tx_errors += 1;
                        NETIF_RSP_ERROR
                    }
                };
                self.answer_packet(held, &p.slots, status);
                self.give_back(p.slots, Some(p.fragments));
            }
        }
    }

    /// A replayed packet, whole with the slots the dead instance answered:
    /// answered only (the slots not answered yet) if it was sent, else sent
    /// again.
    fn replay_packet(&mut self, packet: u32, collected: &[(u16, TxSlotRecord)]) {
        let answered = self.progress.answered.remove(&packet).unwrap_or_default();
        let records: Vec<TxSlotRecord> = collected
            .iter()
            .map(|(_, r)| *r)
            .chain(answered.iter().copied())
            .collect();
        let parsed = txrec::reassemble(&records)
            .ok()
            .and_then(|slots| parse_tx(&mut slots.into_iter()));
        let Some(Ok(request)) = parsed else {
            // Valid when first taken: a corrupt log. Every slot an error.
            for &(slot, rec) in collected {
                self.answer_tx(slot, txrec::error_response(&rec));
            }
            return;
        };
        let sent = !answered.is_empty() || self.progress.sent.contains(&packet);
        if sent {
            let responses: Vec<NetifTxResponse> =
                request.slots().responses_iter(NETIF_RSP_OKAY).collect();
            for &(slot, rec) in collected {
                if let Some(rsp) = responses.get(usize::from(rec.position)) {
                    self.answer_tx(slot, *rsp);
                }
            }
            return;
        }
        // In ring order, as reassembled.
        let mut held: Vec<u16> = vec![u16::MAX; request.slots().len()];
        for &(slot, rec) in collected {
            if let Some(place) = held.get_mut(usize::from(rec.position)) {
                *place = slot;
            }
        }
        self.flush_tx();
        self.execute(&held, request);
    }

    /// Puts a packet in the TAP batch: a plain frame as its header and the
    /// guest's pages, one whose headers must change (a partial checksum, a
    /// GSO packet) copied with its header.
    fn batch_packet(&mut self, packet: &TxPacket) -> Result<(), PushError<String>> {
        let hdr_len = self.io.wire.header_len();
        let hdr = hdr_len.bytes();
        let size = usize::from(packet.size);
        let zero_copy = packet.gso.is_none() && packet.checksum != Checksum::Partial;
        let slab_len = if zero_copy { hdr } else { hdr + size };
        if !self.tap_batch.has_room(slab_len) {
            self.flush_tx();
        }
        let io = &self.io;
        if !zero_copy {
            return self.tap_batch.push(slab_len, &[], |frame| {
                fill_frame(io, packet, frame, true)?;
                io.wire
                    .check_frame(&frame[..hdr], size)
                    .map_err(|e| e.to_string())
            });
        }
        let mut ranges = [(0u64, 0usize); crate::netif::tx::FATAL_SKB_SLOTS + 1];
        if packet.fragments.len() > ranges.len() {
            return Err(PushError::Fill("too many fragments".into()));
        }
        for (range, frag) in ranges.iter_mut().zip(&packet.fragments) {
            let page = io
                .grants
                .map(frag.gref, Access::Read)
                .map_err(|e| PushError::Fill(e.to_string()))?;
            *range = (page + u64::from(frag.offset), usize::from(frag.len));
        }
        let ranges = &ranges[..packet.fragments.len()];
        self.tap_batch.push(slab_len, ranges, |header| {
            VnetHeader::plain()
                .encode(header, hdr_len)
                .map_err(|e| e.to_string())?;
            io.wire.check_frame(header, size).map_err(|e| e.to_string())
        })
    }

    /// Writes the TAP batch and answers its packets, in ring order, each
    /// `OKAY` unless the kernel refused the frame (a full queue or a down
    /// interface drops it, as on a NIC). Every slot was logged when the
    /// loop took it, before any of the batch is written.
    fn flush_tx(&mut self) {
        if self.tap_batch.is_empty() {
            return;
        }
        let mut results = [0i32; TX_BATCH];
        let written = self
            .tap_batch
            .flush(self.io.wire.fd().as_raw_fd(), &self.io.region);
        results[..written.len()].copy_from_slice(written);
        let mut batched = std::mem::take(&mut self.batched);
        for (b, &result) in batched.drain(..).zip(&results) {
            let status = match self.io.wire.count_write(result) {
                Ok(SendOutcome::Sent) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += u64::from(b.size);
                    NETIF_RSP_OKAY
                }
                Ok(SendOutcome::Dropped(_)) => {
                    self.stats.tx_wire_drops += 1;
                    NETIF_RSP_OKAY
                }
                Err(e) => {
                    tracing::debug!(device = %self.device, error = %e, "TX frame refused by the TAP");
                    self.stats.tx_errors += 1;
                    NETIF_RSP_ERROR
                }
            };
            self.answer_packet(&b.held, &b.slots, status);
            self.keep_held(b.held);
            self.give_back(b.slots, Some(b.fragments));
        }
        self.batched = batched;
    }

    /// Sends the packets waiting for room on the cable, in ring order, and
    /// answers each, until one finds the cable full again.
    fn send_waiting(&mut self) {
        while let Some(w) = self.waiting.pop_front() {
            let status = match self.send_packet(&w.packet) {
                Ok(true) => NETIF_RSP_OKAY,
                Ok(false) => {
                    self.waiting.push_front(w);
                    return;
                }
                Err(why) => {
                    tracing::debug!(device = %self.device, why, "TX packet failed");
                    self.stats.tx_errors += 1;
                    NETIF_RSP_ERROR
                }
            };
            self.answer_packet(&w.held, &w.packet.slots, status);
            self.keep_held(w.held);
            self.give_back(w.packet.slots, Some(w.packet.fragments));
        }
    }

    /// Reads a packet out of its grants into the scratch frame, completes a
    /// blank checksum (a cable) and writes it to the wire. `Ok(false)`: a
    /// cable's queue is full and the packet was not sent; the caller keeps
    /// it until the cable has room (a point-to-point wire between two of
    /// our vifs loses nothing to a peer backend that is slow to read). A
    /// TAP's full queue drops the frame, counted, as a NIC's would.
    fn send_packet(&mut self, packet: &TxPacket) -> Result<bool, String> {
        let hdr = self.io.wire.header_len().bytes();
        let size = usize::from(packet.size);
        // A TAP takes partial checksums and TCP super-frames as they are
        // (the kernel finishes them); a cable carries only finished frames.
        let offload = self.on_tap();
        if packet.gso.is_some() && !offload {
            return Err("GSO on a wire that does not segment".into());
        }
        let frame = &mut self.frame[..hdr + size];
        fill_frame(&self.io, packet, frame, offload)?;
        match self.io.wire.send(frame).map_err(|e| e.to_string())? {
            SendOutcome::Sent => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += size as u64;
            }
            SendOutcome::Dropped(DropReason::QueueFull) if !offload => {
                tracing::trace!(device = %self.device, "cable full: TX waits for room");
                return Ok(false);
            }
            // Lost like on a full NIC queue; TCP resends.
            SendOutcome::Dropped(_) => self.stats.tx_wire_drops += 1,
        }
        Ok(true)
    }

    // ---- RX ------------------------------------------------------------

    /// Moves frames from the wire into posted buffers while there are
    /// both; `true` when it stopped after one frame's answers with more to
    /// do (the loop logs them and calls again).
    fn deliver_rx(&mut self, entries: &mut dyn HeldEntries) -> bool {
        let mut answered = 0;
        loop {
            if self.pool.is_empty() {
                return false;
            }
            if answered > 0 {
                // The loop logs a frame's answers before the next frame is
                // read: a frame copied into buffers and answered but not yet
                // logged dies with this instance (counted, never seen by
                // the guest), so at most one is in that state at a death
                // (docs/ARCHITECTURE.md §11.6). Batching answers here lost
                // up to a publication's worth per kill, and TCP streams
                // then waited for a retransmission timeout.
                return true;
            }
            let before = self.pool.len();
            if let Some(mut held) = self.held_frame.take() {
                if !self.deliver_frame(&mut held, entries) {
                    self.held_frame = Some(held);
                    return false;
                }
                answered += before - self.pool.len();
                continue;
            }
            if !self.wire_readable {
                return false;
            }
            // One scratch buffer for every frame: no allocation per frame.
            let mut buf = std::mem::take(&mut self.rx_scratch);
            buf.resize(self.io.wire.recv_buf_len(), 0);
            let received = self.io.wire.recv(&mut buf);
            let more = match received {
                Ok(Some(n)) => {
                    if !self.deliver_frame(&mut buf[..n], entries) {
                        self.held_frame = Some(buf[..n].to_vec());
                    }
                    true
                }
                Ok(None) => false,
                Err(WireError::Closed) => {
                    // Read once: the wire is not polled again.
                    tracing::warn!(device = %self.device, "the cable's far end closed: nothing more for the guest");
                    false
                }
                Err(e) => {
                    tracing::warn!(device = %self.device, error = %e, "wire read failed");
                    false
                }
            };
            self.rx_scratch = buf;
            if !more {
                self.wire_readable = false;
                return false;
            }
            answered += before - self.pool.len();
        }
    }

    /// Marks the first pooled buffer's entry [`RX_TAKEN`]: a frame from the
    /// wire is bound for it.
    fn mark_rx_taken(&mut self, entries: &mut dyn HeldEntries) {
        let Some(&(slot, _)) = self.pool.front() else {
            return;
        };
        if self.rx_taken == Some(slot) {
            return;
        }
        entries.mark(RX, slot, RX_TAKEN);
        self.rx_taken = Some(slot);
    }

    /// Copies one frame (virtio-net header first) into posted buffers and
    /// answers them, or drops it; `false` when it needs more buffers than
    /// are posted (the caller holds it).
    fn deliver_frame(&mut self, frame: &mut [u8], entries: &mut dyn HeldEntries) -> bool {
        let hdr_len = self.io.wire.header_len();
        let Ok(hdr) = VnetHeader::decode(frame, hdr_len) else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let data = &mut frame[hdr_len.bytes()..];
        let dst: Option<[u8; 6]> = data.get(..6).and_then(|d| d.try_into().ok());
        if !dst.is_some_and(|dst| self.mcast.accepts(&dst)) {
            self.stats.rx_filtered += 1;
            return true;
        }
        let mut csum = if hdr.needs_csum() {
            Checksum::Partial
        } else {
            Checksum::Unknown
        };
        if csum == Checksum::Partial && self.no_csum_offload {
            if checksum::complete(data).is_err() {
                self.stats.rx_dropped += 1;
                return true;
            }
            csum = Checksum::Validated;
        }
        // A TCP super-frame, which the TAP only hands over when this vif's
        // guest accepts the kind (TUNSETOFFLOAD at attach); anything else
        // is a misbehaving peer. rx_plan checks the size and the kind.
        let gso = match hdr.tcp_gso() {
            Ok(None) => None,
            Ok(Some((ipv6, size))) if csum == Checksum::Partial => Some(crate::netif::Gso {
                kind: if ipv6 {
                    crate::netif::GsoType::TcpV6
                } else {
                    crate::netif::GsoType::TcpV4
                },
                size,
            }),
            Ok(Some(_)) | Err(()) => {
                self.stats.rx_dropped += 1;
                return true;
            }
        };
        let rx_frame = RxFrame {
            len: data.len(),
            checksum: csum,
            gso,
        };
        // A frame takes at most XEN_NETIF_NR_SLOTS_MIN data buffers and a
        // GSO extra: look no further into the pool.
        let mut posted = [NetifRxRequest::default(); XEN_NETIF_NR_SLOTS_MIN + 1];
        let n = self.pool.len().min(posted.len());
        for (p, (_, req)) in posted.iter_mut().zip(&self.pool) {
            *p = *req;
        }
        let plan = match rx_plan(&posted[..n], &rx_frame, self.rx_features) {
            Ok(plan) => plan,
            Err(NetifRxError::NotEnoughBuffers { .. }) => {
                self.mark_rx_taken(entries);
                return false;
            }
            Err(e) => {
                tracing::debug!(device = %self.device, error = %e, "RX frame dropped");
                self.stats.rx_dropped += 1;
                return true;
            }
        };
        // Before the first copy: from here a crash loses a frame the wire
        // no longer holds, and the next instance counts it.
        self.mark_rx_taken(entries);
        let mut ok = true;
        for copy in &plan.copies {
            let written = self
                .io
                .grants
                .map(copy.gref, Access::Write)
                .map_err(|e| e.to_string())
                .and_then(|page| {
                    let src = data
                        .get(copy.range.clone())
                        .ok_or("copy beyond the frame")?;
                    self.io
                        .region
                        .write(page + u64::from(copy.offset), src)
                        .map_err(|e| e.to_string())
                });
            if let Err(why) = written {
                tracing::debug!(device = %self.device, why, "RX buffer not writable");
                ok = false;
            }
        }
        if ok {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += data.len() as u64;
        } else {
            self.stats.rx_dropped += 1;
        }
        for mut rsp in plan.responses {
            let Some((slot, _)) = self.pool.pop_front() else {
                break;
            };
            if !ok && rsp.status >= 0 {
                rsp.status = NETIF_RSP_ERROR;
            }
            self.answers.push_back(Answer {
                ring: RX,
                slot,
                response: NetifAnswer::Rx(rsp),
            });
        }
        self.rx_taken = None;
        true
    }
}

/// Fills `frame` (the wire's header length, then `packet.size` bytes) with
/// a packet read out of its grants: the frame, and the virtio-net header
/// saying what is left to do. `offload` (a TAP): a blank checksum is left
/// partial and GSO set up for the kernel; else the checksum is completed.
fn fill_frame(
    io: &VifIo,
    packet: &TxPacket,
    frame: &mut [u8],
    offload: bool,
) -> Result<(), String> {
    let hdr = io.wire.header_len().bytes();
    frame[..hdr].fill(0);
    let mut at = hdr;
    for frag in &packet.fragments {
        let page = io
            .grants
            .map(frag.gref, Access::Read)
            .map_err(|e| e.to_string())?;
        let len = usize::from(frag.len);
        let dst = frame
            .get_mut(at..at + len)
            .ok_or("fragments exceed the packet size")?;
        io.region
            .read(page + u64::from(frag.offset), dst)
            .map_err(|e| e.to_string())?;
        at += len;
    }
    let vnet = match (packet.gso, packet.checksum, offload) {
        (None, Checksum::Partial, false) => {
            checksum::complete(&mut frame[hdr..]).map_err(|e| e.to_string())?;
            VnetHeader::plain()
        }
        (None, Checksum::Partial, true) => {
            let at = checksum::prepare_partial(&mut frame[hdr..]).map_err(|e| e.to_string())?;
            VnetHeader::partial(as_u16(at.start)?, as_u16(at.offset)?)
        }
        (None, _, _) => VnetHeader::plain(),
        // Segmentation needs a partial checksum whatever the guest
        // flagged (Linux netback sets one up the same way).
        (Some(gso), _, _) => checksum::prepare_tcp_segmentation(
            &mut frame[hdr..],
            gso.kind == crate::netif::GsoType::TcpV6,
            gso.size,
        )
        .map_err(|e| format!("GSO {:?}: {e}", gso.kind))?,
    };
    vnet.encode(&mut frame[..hdr], io.wire.header_len())
        .map_err(|e| e.to_string())
}

/// An offset inside a frame (at most `MAX_FRAME_LEN`) as a header field.
fn as_u16(at: usize) -> Result<u16, String> {
    u16::try_from(at).map_err(|_| format!("offset {at} beyond a frame"))
}

impl DeviceModel<NetifRings> for NetifModel {
    type Request = NetifRequest;
    type Pending = ();
    /// Frames move with the wire's own calls and the TAP batch's ring.
    const MAX_OPS: usize = 0;

    fn parse(&mut self, rings: &NetifRings, _ring: usize, slot: &NetifSlot) -> NetifRequest {
        self.return_spent(rings);
        if let NetifSlot::Tx {
            rec,
            replayed: false,
        } = slot
        {
            if rec.position == 0 {
                self.fresh = rings.take_parsed(rec.packet);
            }
        }
        NetifRequest { slot: *slot }
    }

    fn detail(&self, _request: &NetifRequest) -> Detail {
        [0; DETAIL_SIZE]
    }

    /// A poisoned "sector" names a TX slot id.
    fn poisoned(&self, request: &NetifRequest, poison: &[u64]) -> bool {
        match &request.slot {
            NetifSlot::Tx { rec, .. } => poison.contains(&u64::from(rec.slot.id)),
            NetifSlot::Rx { .. } => false,
        }
    }

    fn start(&mut self, request: NetifRequest, io: &mut Submit<'_>) -> Started<(), NetifAnswer> {
        let (_, slot) = io.place();
        match request.slot {
            NetifSlot::Tx { rec, .. } => self.start_tx(slot, rec),
            NetifSlot::Rx { req, replayed } => {
                if replayed {
                    self.rx_buffers_recovered += 1;
                }
                self.pool.push_back((slot, req));
            }
        }
        Started::Held(())
    }

    fn complete(
        &mut self,
        _pending: &mut (),
        _result: i32,
        _io: &mut Submit<'_>,
    ) -> Option<NetifAnswer> {
        None
    }

    fn fail(&mut self, _rings: &NetifRings, _ring: usize, slot: &NetifSlot) -> NetifAnswer {
        match slot {
            NetifSlot::Tx { rec, .. } => NetifAnswer::Tx(txrec::error_response(rec)),
            NetifSlot::Rx { req, .. } => NetifAnswer::Rx(NetifRxResponse {
                id: req.id,
                offset: 0,
                flags: 0,
                status: NETIF_RSP_ERROR,
            }),
        }
    }

    fn is_error(&self, answer: &NetifAnswer) -> bool {
        match answer {
            NetifAnswer::Tx(rsp) => rsp.status == NETIF_RSP_ERROR,
            NetifAnswer::Rx(rsp) => rsp.status < 0,
        }
    }

    fn next_answer(&mut self) -> Option<Answer<NetifAnswer>> {
        self.answers.pop_front()
    }

    /// The wire twice: for frames ([`SOURCE_FRAMES`]), while buffers are
    /// posted, it is open and not known to hold frames already (then the
    /// drain reads it) and no frame waits for buffers; and for room
    /// ([`SOURCE_ROOM`]) while TX packets wait for a full cable.
    fn sources(&self) -> usize {
        2
    }

    fn source(&self, n: usize) -> Option<RawFd> {
        let watch = match n {
            SOURCE_FRAMES => {
                !self.pool.is_empty()
                    && !self.wire_readable
                    && !self.io.wire.is_closed()
                    && self.held_frame.is_none()
            }
            _ => !self.waiting.is_empty(),
        };
        watch.then(|| self.io.wire.fd().as_raw_fd())
    }

    fn source_writable(&self, n: usize) -> bool {
        n == SOURCE_ROOM
    }

    /// No TX is taken while packets wait for a full cable: the guest's
    /// ring holds the rest, so nothing here grows (§11.5).
    fn takes(&self, ring: usize) -> bool {
        ring != TX || self.waiting.is_empty()
    }

    fn ready(&mut self, n: usize, rings: &NetifRings, entries: &mut dyn HeldEntries) -> bool {
        self.return_spent(rings);
        if n == SOURCE_ROOM {
            self.send_waiting();
            return false;
        }
        self.wire_readable = true;
        self.deliver_rx(entries)
    }

    /// TX: the batch is written before the turn publishes. RX: buffers
    /// just posted take what the wire holds.
    fn drained(&mut self, rings: &NetifRings, ring: usize, entries: &mut dyn HeldEntries) -> bool {
        self.return_spent(rings);
        match ring {
            TX => {
                self.flush_tx();
                self.return_spent(rings);
                false
            }
            _ => self.deliver_rx(entries),
        }
    }

    fn io_counters(&self, _base: IoCounters) -> IoCounters {
        self.stats.io_counters()
    }
}
