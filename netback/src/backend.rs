//! The Xen netif loop of one network backend process
//! (docs/ARCHITECTURE.md §11.6).
//!
//! One vif: a TX ring and an RX ring in the guest's granted region, one or
//! two event channels, a wire (TAP or cable) the supervisor holds and lends
//! to each instance, and one shadow log per ring. It runs on the shared
//! data plane ([`shadowback_dataplane`]): the same completion token, loop
//! body, control pieces and recovery applier as the block backend. The
//! engine only waits (kicks, the control socket, the wire's readability);
//! frames move with non-blocking `send`/`recv` on the wire, one at a time,
//! except TX frames to a TAP, written in batches through a ring of their
//! own ([`crate::tapbatch`]) and waited for, so nothing is in flight
//! between two loop turns.
//!
//! - **TX**, per packet: its slots are copied out of the ring once and
//!   validated as Linux netback does ([`crate::netif::parse_tx`]), each
//!   slot logged (one shadow-log entry per slot), the data read from the
//!   granted pages into a private frame, a blank checksum completed (a
//!   cable) or left to the kernel with GSO (a TAP: `NEEDS_CSUM` and the
//!   segmentation in the virtio-net header), the frame written to the
//!   wire (to a TAP: queued, and written with up to
//!   [`TX_BATCH`] others, straight from the granted pages unless a
//!   header had to change), and every slot answered, the first one first
//!   (its answer says the packet went out). A fatal verdict disconnects this vif only. A
//!   long drain publishes every [`PUBLISH_EVERY`] answers, so the guest
//!   refills the ring while the backend works.
//! - **RX**: posted buffers are logged as taken and kept in a pool; a frame
//!   from the wire is copied into the first buffers of the pool and each
//!   buffer answered in its own slot. With no buffer posted, the wire is not
//!   read: frames wait in its kernel queue, nothing grows here.
//! - **Recovery**: TX packets with an answered slot (or, in a log of an
//!   older instance, marked [`TX_SENT`]) are answered only; the others are
//!   sent again (at most the one packet being written at the crash, or on
//!   a TAP the batch, can go out twice: counted in `tx-maybe-duplicated`). A packet whose slots the
//!   dead instance was still logging is completed from the ring. RX
//!   buffers not answered go back to the pool (`rx-buffers-recovered`); a
//!   frame the dead instance had read from the wire and not delivered is
//!   lost, as on any NIC, and counted (`rx-dropped-in-crash`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use shadowback_dataplane::control::{
    attach_reply, control_err, fault_injection, recv_control, refuse_unexpected, sanitize,
    send_detached, AttachFlags,
};
use shadowback_dataplane::event_loop::{
    self, arm, BackendError, Closing, EventLoop, Generations, Token,
};
use shadowback_dataplane::recovery::{
    self, log_failed, open_shadow_log, CrashSpec, RecoveryStats, ReplayTarget, SerialReplay,
    POISON_THRESHOLD,
};
use shadowback_dataplane::uring::{Completion, Engine, EngineConfig};
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::netif::{
    NetifRx, NetifRxRequest, NetifRxResponse, NetifTx, NetifTxResponse, NETIF_RSP_ERROR,
    NETIF_RSP_OKAY, XEN_NETIF_NR_SLOTS_MIN,
};
use shadowback_ring::sring::{BackRing, RingPages};
use shadowback_ring::{EventChannel, RingError, SharedRegion};
use shadowback_shadow::{
    plan_recovery, EntryId, EntryState, IoCounters, LogSnapshot, LogWriter, MetricsWriter,
    RecoveryPlan, Repush, ShadowError, ShadowLog, REQUEST_SIZE,
};
use shadowback_xenbus::netif::{NetAttachRequest, NetConnectRequest, ATTACH_NET};
use shadowback_xenbus::protocol::{is_eventfd, key, kind, ErrorCode};
use shadowback_xenbus::virtio::ATTACH_VIRTIO;
use shadowback_xenbus::{Message, SeqPacket};

use crate::checksum;
use crate::netif::tx::{parse_tx, parse_tx_reusing, TxRequest, TxSpares, TxVerdict};
use crate::netif::{
    rx_plan, Checksum, MulticastFilter, NetifRxError, RxFeatures, RxFrame, TxSlots,
};
use crate::record::response;
use crate::record::rx as rxrec;
use crate::record::tx::{self as txrec, TxSlotRecord};
use crate::tapbatch::{PushError, TapBatch, TX_BATCH};
use crate::wire::{
    Offloads, SendOutcome, VnetHeader, VnetHeaderLen, Wire, WireKind, MAX_FRAME_LEN,
};

/// Token ring numbers of a vif.
const TX: u8 = 0;
const RX: u8 = 1;
/// The wire's readability.
const WIRE: u8 = 2;

/// Responses a long drain of a ring puts before it publishes them (and
/// notifies, if the guest asked): the guest refills the ring while the
/// backend works through the rest, instead of the two taking turns with
/// a whole ring each.
const PUBLISH_EVERY: u32 = 32;

/// Progress flag of a TX entry: the frame was handed to the wire
/// (`ShadowLog::set_progress`). vhost-user-net sets it; the netif loop
/// reads it (a log written by an older instance) but no longer sets it:
/// its packet's first slot is answered right after the write, and an
/// answered slot says the same.
pub const TX_SENT: u32 = 1;

/// Progress flag of an RX buffer's entry: a frame read from the wire starts
/// in this buffer (it is being copied there, or held for more buffers).
/// Still set on an INFLIGHT entry after a crash, it counts a frame the
/// dead instance took from the wire and never delivered.
pub const RX_TAKEN: u32 = 1;

/// `attach-net`: `wire=tap` or `wire=cable`, the kind of the wire fd.
pub const KEY_WIRE: &str = "wire";
/// `attach-net`'s key saying the attachment's device state area (the
/// guest's multicast list) follows the wire.
pub const KEY_DEVICE_STATE: &str = "device-state";
/// `attached` of a vif: TX packets sent again by this instance.
pub const KEY_TX_REPLAYED: &str = "tx-replayed";
/// `attached` of a vif: of those, ones the dead instance may have sent.
pub const KEY_TX_MAYBE_DUPLICATED: &str = "tx-maybe-duplicated";
/// `attached` of a vif: posted RX buffers handed over from the dead
/// instance.
pub const KEY_RX_BUFFERS_RECOVERED: &str = "rx-buffers-recovered";
/// `attached` of a vif: frames the dead instance had read from the wire
/// and not delivered ([`RX_TAKEN`]).
pub const KEY_RX_DROPPED_IN_CRASH: &str = "rx-dropped-in-crash";

/// Static configuration of one network backend instance.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Device name, for logs.
    pub device: String,
    /// Domain id the guest's grants must name.
    pub backend_id: u16,
    /// Log every slot in the shadow logs the supervisor passes.
    pub shadow: bool,
    /// Fault injection for crash tests (`SHADOWBACK_CRASH_AT`).
    pub crash_at: CrashSpec,
}

/// Counters of one network backend instance.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// TX packets answered with an error (refused, bad grant).
    pub tx_errors: u64,
    /// TX packets the wire dropped (queue full, link down).
    pub tx_wire_drops: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames from the wire that could not be delivered (too large, no
    /// `feature-sg`, bad grant).
    pub rx_dropped: u64,
    /// Frames from the wire the driver's receive filter refused (virtio:
    /// MAC, receive mode and tables set on the control queue).
    pub rx_filtered: u64,
    /// Control-queue commands answered `VIRTIO_NET_ERR`.
    pub ctrl_errors: u64,
    pub kicks: u64,
    pub notifications: u64,
}

impl NetStats {
    /// These counters as the metrics page counts them (a vif has no
    /// request latency; docs/ARCHITECTURE.md §4.1).
    pub fn io_counters(&self) -> IoCounters {
        IoCounters {
            requests: self.tx_packets + self.tx_errors,
            errors: self.tx_errors,
            bytes_to_guest: self.rx_bytes,
            bytes_from_guest: self.tx_bytes,
            packets_to_guest: self.rx_packets,
            packets_from_guest: self.tx_packets,
            dropped: self.rx_dropped + self.tx_wire_drops,
            ..IoCounters::default()
        }
    }
}

/// Copies `stats` into the metrics page, if there is one (throttled);
/// `take_over`: this process starts serving the vif.
pub(crate) fn publish_metrics(
    metrics: &mut Option<MetricsWriter>,
    stats: &NetStats,
    take_over: bool,
) {
    if let Some(m) = metrics.as_mut() {
        let local = stats.io_counters();
        if take_over {
            m.take_over(&local);
        }
        m.publish(std::time::Instant::now(), &local, take_over);
    }
}

/// What a vif's recovery did, beyond [`RecoveryStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRecovery {
    pub tx_replayed: u64,
    pub tx_maybe_duplicated: u64,
    pub rx_buffers_recovered: u64,
    pub rx_dropped_in_crash: u64,
}

/// A posted RX buffer.
#[derive(Clone, Copy, Debug)]
struct Posted {
    req: NetifRxRequest,
    entry: Option<EntryId>,
}

/// One ring's event channel, shared by both rings unless split.
struct Channel {
    kick: EventChannel,
    notify: EventChannel,
}

/// The attached vif.
struct Vif {
    name: String,
    generation: u32,
    region: Arc<SharedRegion>,
    grants: GrantMapper,
    tx: BackRing<NetifTx>,
    rx: BackRing<NetifRx>,
    tx_chan: Channel,
    /// The RX ring's own channel (`split-event-channels=1`).
    rx_chan: Option<Channel>,
    tx_log: Option<ShadowLog>,
    rx_log: Option<ShadowLog>,
    wire: Wire,
    rx_features: RxFeatures,
    /// Complete blank checksums before RX delivery.
    no_csum_offload: bool,
    /// The guest's multicast list (docs/ARCHITECTURE.md §11.6).
    mcast: MulticastFilter,
    pool: VecDeque<Posted>,
    /// A frame read from the wire that waits for more buffers.
    held: Option<Vec<u8>>,
    /// The RX entry last marked [`RX_TAKEN`] (so a held frame is marked
    /// once, not at every retry).
    rx_taken: Option<EntryId>,
    /// A poll on the wire is armed.
    wire_armed: bool,
    /// The wire was seen readable and not yet drained.
    wire_readable: bool,
    /// Responses put and not yet published, per ring.
    tx_unpublished: u32,
    rx_unpublished: u32,
    /// The guest asked to be notified of answers published without a
    /// notification (in the middle of a drain).
    tx_notify_owed: bool,
    rx_notify_owed: bool,
    /// Slots of a packet being replayed, collected in ring order.
    tx_pending: Vec<(EntryId, TxSlotRecord)>,
    /// Packets the dead instance sent (first slot marked by an older
    /// instance, or a slot
    /// already answered: answers follow the write).
    tx_sent: HashSet<u32>,
    /// Slots the dead instance answered, by packet: a packet it was
    /// answering when it died is whole with them.
    tx_answered: HashMap<u32, Vec<TxSlotRecord>>,
    tx_serial: SerialReplay<TxSlotRecord>,
    rx_serial: SerialReplay<NetifRxRequest>,
    closing: Closing,
}

impl Vif {
    fn rx_notify(&self) -> &EventChannel {
        &self.rx_chan.as_ref().unwrap_or(&self.tx_chan).notify
    }
}

/// The backend instance.
pub struct NetBackend {
    cfg: NetConfig,
    engine: Engine,
    control: SeqPacket,
    vif: Option<Vif>,
    generations: Generations,
    stats: NetStats,
    recovery: NetRecovery,
    completions: Vec<Completion>,
    poison: Vec<u64>,
    /// Scratch frame: virtio-net header + the largest frame.
    frame: Vec<u8>,
    /// TX frames for a TAP, written together (ARCHITECTURE.md §11.6).
    tap_batch: TapBatch,
    /// The packets of `tap_batch`, in its order: logged just before it is
    /// written, answered once it is.
    tx_batched: Vec<Batched>,
    /// Emptied entry lists of answered packets, reused by
    /// [`NetBackend::log_tx`] so a packet allocates none.
    tx_entry_lists: Vec<Vec<Option<EntryId>>>,
    /// Emptied slot and fragment lists, reused by the TX parser.
    tx_spares: TxSpares,
    /// Scratch for frames read from the wire.
    rx_scratch: Vec<u8>,
    /// The device's metrics page, if the supervisor gave one.
    pub metrics: Option<MetricsWriter>,
}

impl NetBackend {
    pub fn new(cfg: NetConfig, control: SeqPacket) -> Result<Self, BackendError> {
        let engine = Engine::for_polls(&EngineConfig::default()).map_err(BackendError::Engine)?;
        let tap_batch = TapBatch::new().map_err(BackendError::Engine)?;
        Ok(Self::with_engine(cfg, control, engine, tap_batch))
    }

    /// The backend on rings set up beforehand (a spare's: both are set up
    /// before it is confined, docs/ARCHITECTURE.md §1.1).
    pub fn with_engine(
        cfg: NetConfig,
        control: SeqPacket,
        engine: Engine,
        tap_batch: TapBatch,
    ) -> Self {
        NetBackend {
            cfg,
            engine,
            control,
            vif: None,
            generations: Generations::default(),
            stats: NetStats::default(),
            recovery: NetRecovery::default(),
            completions: Vec::with_capacity(64),
            poison: Vec::new(),
            frame: vec![0; VnetHeaderLen::Basic.bytes() + MAX_FRAME_LEN],
            tap_batch,
            tx_batched: Vec::with_capacity(TX_BATCH),
            tx_entry_lists: Vec::with_capacity(TX_BATCH),
            tx_spares: TxSpares::default(),
            rx_scratch: Vec::new(),
            metrics: None,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Serves until the supervisor closes the control channel.
    pub fn run(&mut self) -> Result<(), BackendError> {
        event_loop::run(self)
    }

    /// Protocol violation on a ring: stop serving this vif, tell the
    /// supervisor (which disconnects this guest only).
    fn broken(&mut self, why: &str) -> Result<(), BackendError> {
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        if vif.closing == Closing::Broken {
            return Ok(());
        }
        tracing::warn!(device = %self.cfg.device, frontend = %vif.name, why, "vif broken, disconnecting");
        vif.closing = Closing::Broken;
        let msg = Message::new(kind::DISCONNECT)
            .with(key::FRONTEND, &vif.name)
            .with(key::REASON, sanitize(why));
        self.control.send(&msg, &[]).map_err(control_err)
    }

    /// Publishes the answers put on each ring (`RING_PUSH_RESPONSES`, then
    /// `log_published`). A notification the guest asked for (`rsp_event`)
    /// is sent with `notify`, else owed until the next call with it: a
    /// drain publishing every [`PUBLISH_EVERY`] answers wakes the guest
    /// once, at its end, not once per batch (a guest that is running
    /// finds the answers itself; one asleep gets its notification no
    /// later than when the drain publishes only at its end).
    fn publish_rings(&mut self, notify: bool) {
        let Some(vif) = self.vif.as_mut() else {
            return;
        };
        let device = &self.cfg.device;
        if std::mem::take(&mut vif.tx_unpublished) > 0 {
            vif.tx_notify_owed |= push_and_log(&mut vif.tx, vif.tx_log.as_ref(), device);
        }
        if std::mem::take(&mut vif.rx_unpublished) > 0 {
            vif.rx_notify_owed |= push_and_log(&mut vif.rx, vif.rx_log.as_ref(), device);
        }
        if !notify {
            return;
        }
        if std::mem::take(&mut vif.tx_notify_owed) {
            self.stats.notifications += 1;
            let _ = vif.tx_chan.notify.notify();
        }
        if std::mem::take(&mut vif.rx_notify_owed) {
            self.stats.notifications += 1;
            let _ = vif.rx_notify().notify();
        }
    }

    // ---- TX ------------------------------------------------------------

    /// Takes every packet the TX ring holds; what is batched for a TAP is
    /// written and answered before it returns.
    fn consume_tx(&mut self) -> Result<(), BackendError> {
        let taken = self.take_tx();
        self.flush_tx();
        taken
    }

    fn take_tx(&mut self) -> Result<(), BackendError> {
        loop {
            let Some(vif) = self.vif.as_mut() else {
                return Ok(());
            };
            if vif.closing != Closing::No || !vif.tx_serial.is_empty() {
                return Ok(());
            }
            if vif.tx_unpublished >= PUBLISH_EVERY {
                // The guest refills these slots while the rest are sent.
                self.publish_rings(false);
                continue;
            }
            let available = match vif.tx.unconsumed_requests() {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => return self.broken(&e.to_string()),
            };
            let first_index = vif.tx.req_cons();
            let mut ring_err = None;
            let mut left = available;
            let mut source = std::iter::from_fn(|| {
                if left == 0 || ring_err.is_some() {
                    return None;
                }
                left -= 1;
                match vif.tx.take_request() {
                    Ok((_, slot)) => Some(slot),
                    Err(e) => {
                        ring_err = Some(e);
                        None
                    }
                }
            });
            let parsed = parse_tx_reusing(&mut source, &mut self.tx_spares);
            if let Some(e) = ring_err {
                return self.broken(&e.to_string());
            }
            match parsed {
                None => return Ok(()),
                Some(Err(TxVerdict::Fatal(f))) => return self.broken(&f.to_string()),
                Some(Err(TxVerdict::Error { slots, reason })) => {
                    tracing::debug!(device = %self.cfg.device, %reason, "TX packet refused");
                    // Logged in ring order: the batch's packets first.
                    self.flush_tx();
                    let entries = self.log_tx(first_index, &slots);
                    self.stats.tx_errors += 1;
                    self.answer_tx(&slots, &entries, NETIF_RSP_ERROR, &[]);
                    self.recycle_entries(entries);
                }
                Some(Ok(request)) => self.queue_tx(first_index, request),
            }
        }
    }

    /// A valid packet taken from the ring at `first_index`: on a TAP,
    /// queued in the batch (logged, written and answered at the next
    /// [`NetBackend::flush_tx`]); else logged, sent and answered now, after
    /// the batch (the log takes slots in ring order).
    fn queue_tx(&mut self, first_index: u32, request: TxRequest) {
        let on_tap = self
            .vif
            .as_ref()
            .is_some_and(|v| v.wire.kind() == WireKind::Tap);
        let packet = match request {
            TxRequest::Packet(p) if on_tap && !poisoned(&self.poison, &p.slots) => p,
            other => {
                self.flush_tx();
                let entries = self.log_tx(first_index, other.slots());
                self.execute_tx(other, &entries, false);
                return self.recycle_entries(entries);
            }
        };
        match self.batch_packet(&packet) {
            Ok(()) => {
                let mut entries = self.tx_entry_lists.pop().unwrap_or_default();
                entries.clear();
                self.tx_batched.push(Batched {
                    first_index,
                    slots: packet.slots,
                    entries,
                    size: packet.size,
                });
                self.tx_spares.keep_fragments(packet.fragments);
                if self.tap_batch.len() >= TX_BATCH {
                    self.flush_tx();
                }
            }
            Err(PushError::Fill(why)) => {
                tracing::debug!(device = %self.cfg.device, why, "TX packet failed");
                self.flush_tx();
                let entries = self.log_tx(first_index, &packet.slots);
                self.stats.tx_errors += 1;
                self.answer_tx(&packet.slots, &entries, NETIF_RSP_ERROR, &[]);
                self.recycle_entries(entries);
            }
            // Not expected after a flush: send it on its own.
            Err(PushError::Full | PushError::Busy) => {
                self.flush_tx();
                let entries = self.log_tx(first_index, &packet.slots);
                self.execute_tx(TxRequest::Packet(packet), &entries, false);
                self.recycle_entries(entries);
            }
        }
    }

    /// Puts a packet in the TAP batch: a plain frame as its header and the
    /// guest's pages, one whose headers must change (a partial checksum, a
    /// GSO packet) copied with its header.
    fn batch_packet(&mut self, packet: &crate::netif::TxPacket) -> Result<(), PushError<String>> {
        let vif = self.vif.as_ref().ok_or(PushError::Fill("no vif".into()))?;
        let hdr_len = vif.wire.header_len();
        let hdr = hdr_len.bytes();
        let size = usize::from(packet.size);
        let zero_copy = packet.gso.is_none() && packet.checksum != Checksum::Partial;
        let slab_len = if zero_copy { hdr } else { hdr + size };
        if !self.tap_batch.has_room(slab_len) {
            self.flush_tx();
        }
        let vif = self.vif.as_ref().ok_or(PushError::Fill("no vif".into()))?;
        if !zero_copy {
            return self.tap_batch.push(slab_len, &[], |frame| {
                fill_frame(vif, packet, frame, true)?;
                vif.wire
                    .check_frame(&frame[..hdr], size)
                    .map_err(|e| e.to_string())
            });
        }
        let mut ranges = [(0u64, 0usize); crate::netif::tx::FATAL_SKB_SLOTS + 1];
        if packet.fragments.len() > ranges.len() {
            return Err(PushError::Fill("too many fragments".into()));
        }
        for (range, frag) in ranges.iter_mut().zip(&packet.fragments) {
            let page = vif
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
            vif.wire
                .check_frame(header, size)
                .map_err(|e| e.to_string())
        })
    }

    /// Logs the TAP batch's packets, writes the batch and answers its
    /// packets, in ring order, each `OKAY` unless the kernel refused the
    /// frame (a full queue or a down interface drops it, as on a NIC). The
    /// log's lock is taken once for all of it.
    fn flush_tx(&mut self) {
        if self.tap_batch.is_empty() {
            return;
        }
        let Some(vif) = self.vif.as_mut() else {
            // Never queued without a vif; nothing of it may outlive it.
            self.tap_batch.clear();
            self.tx_batched.clear();
            return;
        };
        let device = &self.cfg.device;
        let mut w = vif
            .tx_log
            .as_ref()
            .map(|log| log.writer().unwrap_or_else(|e| log_failed(device, e)));
        // docs/ARCHITECTURE.md §7.1: every slot is logged before any of
        // the batch is written.
        for b in &mut self.tx_batched {
            log_slots(device, w.as_mut(), b.first_index, &b.slots, &mut b.entries);
        }
        let mut results = [0i32; TX_BATCH];
        let written = self.tap_batch.flush(vif.wire.fd().as_raw_fd(), &vif.region);
        results[..written.len()].copy_from_slice(written);
        let mut batched = std::mem::take(&mut self.tx_batched);
        for (b, &result) in batched.drain(..).zip(&results) {
            let Batched {
                slots,
                entries,
                size,
                ..
            } = b;
            let status = match vif.wire.count_write(result) {
                Ok(SendOutcome::Sent) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += u64::from(size);
                    NETIF_RSP_OKAY
                }
                Ok(SendOutcome::Dropped(_)) => {
                    self.stats.tx_wire_drops += 1;
                    NETIF_RSP_OKAY
                }
                Err(e) => {
                    tracing::debug!(device = %device, error = %e, "TX frame refused by the TAP");
                    self.stats.tx_errors += 1;
                    NETIF_RSP_ERROR
                }
            };
            let answer = TxAnswer {
                slots: &slots,
                entries: &entries,
                status,
                answered: &[],
            };
            answer.put(device, &mut vif.tx, &mut vif.tx_unpublished, w.as_mut());
            recycle_entries(&mut self.tx_entry_lists, entries);
            self.tx_spares.keep_slots(slots);
        }
        drop(w);
        batched.clear();
        self.tx_batched = batched;
    }

    /// Logs every slot of a packet (docs/ARCHITECTURE.md §7.1: before any
    /// of it is executed); one entry per slot, in ring order.
    fn log_tx(&mut self, first_index: u32, slots: &TxSlots) -> Vec<Option<EntryId>> {
        let mut entries = self.tx_entry_lists.pop().unwrap_or_default();
        entries.clear();
        let device = &self.cfg.device;
        let mut w = self
            .vif
            .as_ref()
            .and_then(|v| v.tx_log.as_ref())
            .map(|log| log.writer().unwrap_or_else(|e| log_failed(device, e)));
        log_slots(device, w.as_mut(), first_index, slots, &mut entries);
        entries
    }

    /// Keeps an answered packet's entry list for the next
    /// [`NetBackend::log_tx`] (a bounded number of them, none longer than
    /// the parser's spares: a batch's worth of short lists).
    fn recycle_entries(&mut self, entries: Vec<Option<EntryId>>) {
        recycle_entries(&mut self.tx_entry_lists, entries);
    }

    /// Sends a valid packet (unless `sent`: the dead instance did) and
    /// answers its slots.
    fn execute_tx(&mut self, request: TxRequest, entries: &[Option<EntryId>], sent: bool) {
        let packet = match request {
            TxRequest::Multicast(m) => {
                // Kept in the device state area before it is answered.
                let kept = self.vif.as_mut().map(|v| v.mcast.apply(m.op));
                let status = match kept {
                    Some(Ok(())) => NETIF_RSP_OKAY,
                    Some(Err(why)) => {
                        tracing::warn!(device = %self.cfg.device, why, "multicast list not kept");
                        NETIF_RSP_ERROR
                    }
                    None => NETIF_RSP_ERROR,
                };
                self.answer_tx(&m.slots, entries, status, &[]);
                return;
            }
            TxRequest::Packet(p) => p,
        };
        if poisoned(&self.poison, &packet.slots) {
            tracing::error!(device = %self.cfg.device, "poisoned packet: aborting (fault injection)");
            std::process::abort();
        }
        let status = if sent {
            NETIF_RSP_OKAY
        } else {
            // No progress flag: the first slot's answer, logged right
            // after the write, says the packet went out (ARCHITECTURE.md
            // §11.6), and saves a log store per packet.
            match self.send_packet(&packet) {
                Ok(()) => NETIF_RSP_OKAY,
                Err(why) => {
                    tracing::debug!(device = %self.cfg.device, why, "TX packet failed");
                    self.stats.tx_errors += 1;
                    NETIF_RSP_ERROR
                }
            }
        };
        self.answer_tx(&packet.slots, entries, status, &[]);
    }

    /// Reads a packet out of its grants into the scratch frame, completes a
    /// blank checksum and writes it to the wire.
    fn send_packet(&mut self, packet: &crate::netif::TxPacket) -> Result<(), String> {
        let vif = self.vif.as_mut().ok_or("no vif")?;
        let hdr = vif.wire.header_len().bytes();
        let size = usize::from(packet.size);
        // A TAP takes partial checksums and TCP super-frames as they are
        // (the kernel finishes them); a cable carries only finished frames.
        let offload = vif.wire.kind() == WireKind::Tap;
        if packet.gso.is_some() && !offload {
            return Err("GSO on a wire that does not segment".into());
        }
        let frame = &mut self.frame[..hdr + size];
        fill_frame(vif, packet, frame, offload)?;
        match vif.wire.send(frame).map_err(|e| e.to_string())? {
            SendOutcome::Sent => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += size as u64;
            }
            // Lost like on a full NIC queue; TCP resends.
            SendOutcome::Dropped(_) => self.stats.tx_wire_drops += 1,
        }
        Ok(())
    }

    /// Puts one response per slot (`NULL` for extra-info slots) and logs
    /// each COMPLETING; slots whose `answered` flag is set are skipped (a
    /// dead instance answered them).
    fn answer_tx(
        &mut self,
        slots: &TxSlots,
        entries: &[Option<EntryId>],
        status: i16,
        answered: &[bool],
    ) {
        let Some(vif) = self.vif.as_mut() else {
            return;
        };
        let mut w = vif.tx_log.as_ref().map(|log| {
            log.writer()
                .unwrap_or_else(|e| log_failed(&self.cfg.device, e))
        });
        let answer = TxAnswer {
            slots,
            entries,
            status,
            answered,
        };
        answer.put(
            &self.cfg.device,
            &mut vif.tx,
            &mut vif.tx_unpublished,
            w.as_mut(),
        );
    }

    /// A replayed TX slot: collected until its packet is whole, then the
    /// packet is answered (sent before the crash) or sent again.
    fn replay_tx_slot(&mut self, rec: TxSlotRecord, entry: EntryId) {
        let Some(vif) = self.vif.as_mut() else {
            return;
        };
        if vif
            .tx_pending
            .first()
            .is_some_and(|(_, first)| first.packet != rec.packet)
        {
            // The previous packet never became whole: fail its slots.
            let stale = std::mem::take(&mut vif.tx_pending);
            self.fail_tx_slots(&stale);
        }
        let Some(vif) = self.vif.as_mut() else {
            return;
        };
        vif.tx_pending.push((entry, rec));
        let answered = vif.tx_answered.get(&rec.packet).map_or(0, Vec::len);
        if vif.tx_pending.len() + answered == usize::from(rec.count) {
            self.finish_replayed_packet();
        }
    }

    /// Executes the collected slots of one whole packet (with those the
    /// dead instance answered): sent again unless the dead instance sent
    /// it, and only the slots not answered yet are answered.
    fn finish_replayed_packet(&mut self) {
        let Some(vif) = self.vif.as_mut() else {
            return;
        };
        let pending = std::mem::take(&mut vif.tx_pending);
        let Some(&(_, first)) = pending.first() else {
            return;
        };
        let answered = vif.tx_answered.remove(&first.packet).unwrap_or_default();
        let records: Vec<TxSlotRecord> = pending
            .iter()
            .map(|(_, r)| *r)
            .chain(answered.iter().copied())
            .collect();
        let Ok(slots) = txrec::reassemble(&records) else {
            self.fail_tx_slots(&pending);
            return;
        };
        // Entries and answered flags in ring order, as reassemble ordered
        // the slots.
        let mut entries = vec![None; slots.len()];
        for (entry, rec) in &pending {
            if let Some(place) = entries.get_mut(usize::from(rec.position)) {
                *place = Some(*entry);
            }
        }
        let mut done = vec![false; slots.len()];
        for rec in &answered {
            if let Some(place) = done.get_mut(usize::from(rec.position)) {
                *place = true;
            }
        }
        let sent = !answered.is_empty() || vif.tx_sent.contains(&first.packet);
        let mut source = slots.into_iter();
        match parse_tx(&mut source) {
            Some(Ok(request)) => {
                if sent {
                    self.answer_tx(request.slots(), &entries, NETIF_RSP_OKAY, &done);
                    return;
                }
                self.execute_tx(request, &entries, false);
            }
            // The slots were valid when first taken; anything else means a
            // corrupt log: answer every slot with an error.
            _ => self.fail_tx_slots(&pending),
        }
    }

    fn fail_tx_slots(&mut self, slots: &[(EntryId, TxSlotRecord)]) {
        for &(entry, rec) in slots {
            if let Err(e) = self.fail_tx(rec, entry) {
                tracing::error!(device = %self.cfg.device, error = %e, "cannot fail a TX slot");
            }
        }
    }

    fn fail_tx(&mut self, rec: TxSlotRecord, entry: EntryId) -> Result<(), String> {
        let vif = self.vif.as_mut().ok_or("no vif")?;
        let rsp = txrec::error_response(&rec);
        let idx = vif.tx.put_response(&rsp).map_err(|e| e.to_string())?;
        vif.tx_unpublished += 1;
        if let Some(log) = vif.tx_log.as_ref() {
            log.log_completing(entry, idx, &response::encode_tx(&rsp))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A packet the dead instance was still logging when it died: the rest
    /// of its slots are still on the ring, right after the logged ones.
    fn complete_partial_packet(&mut self) -> Result<(), String> {
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        let Some(&(_, first)) = vif.tx_pending.first() else {
            return Ok(());
        };
        let have = vif.tx_pending.len() + vif.tx_answered.get(&first.packet).map_or(0, Vec::len);
        let missing = usize::from(first.count).saturating_sub(have);
        let available = vif.tx.unconsumed_requests().map_err(|e| e.to_string())?;
        if available < missing as u32 {
            return Err("a half-logged packet's slots are no longer on the ring".into());
        }
        let mut taken = Vec::with_capacity(missing);
        for _ in 0..missing {
            let (idx, slot) = vif.tx.take_request().map_err(|e| e.to_string())?;
            taken.push((idx, slot));
        }
        let mut recs = Vec::with_capacity(missing);
        for (i, (idx, slot)) in taken.into_iter().enumerate() {
            let position = u16::try_from(have + i).map_err(|_| "packet too long")?;
            let rec = TxSlotRecord {
                slot,
                packet: first.packet,
                position,
                count: first.count,
                kind: if position <= extra_count(&vif.tx_pending) {
                    txrec::SlotKind::Extra
                } else {
                    txrec::SlotKind::Following
                },
            };
            let entry = match vif.tx_log.as_ref() {
                Some(log) => log
                    .log_consumed(idx, &txrec::encode(&rec))
                    .map_err(|e| e.to_string())?,
                None => return Err("no TX log".into()),
            };
            recs.push((entry, rec));
        }
        tracing::warn!(device = %self.cfg.device, slots = missing, "completing a packet the dead instance was logging");
        for (entry, rec) in recs {
            self.replay_tx_slot(rec, entry);
        }
        Ok(())
    }

    // ---- RX ------------------------------------------------------------

    /// Takes every posted RX buffer into the pool.
    fn consume_rx(&mut self) -> Result<(), BackendError> {
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        if vif.closing != Closing::No || !vif.rx_serial.is_empty() {
            return Ok(());
        }
        let available = match vif.rx.unconsumed_requests() {
            Ok(n) => n,
            Err(e) => return self.broken(&e.to_string()),
        };
        for _ in 0..available {
            let Some(vif) = self.vif.as_mut() else {
                break;
            };
            let (idx, req) = match vif.rx.take_request() {
                Ok(taken) => taken,
                Err(e) => return self.broken(&e.to_string()),
            };
            let entry = match vif.rx_log.as_ref() {
                None => None,
                Some(log) => match log.log_consumed(idx, &rxrec::encode(&req)) {
                    Ok(e) => Some(e),
                    Err(e) => log_failed(&self.cfg.device, e),
                },
            };
            vif.pool.push_back(Posted { req, entry });
        }
        Ok(())
    }

    /// Moves frames from the wire into posted buffers while there are
    /// both; re-arms the wire's poll once it is drained.
    fn deliver_rx(&mut self) -> Result<(), BackendError> {
        loop {
            let Some(vif) = self.vif.as_mut() else {
                return Ok(());
            };
            if vif.closing != Closing::No || vif.pool.is_empty() {
                return Ok(());
            }
            if vif.rx_unpublished >= PUBLISH_EVERY {
                // The guest takes these frames while the rest are copied.
                self.publish_rings(false);
                continue;
            }
            if let Some(mut held) = vif.held.take() {
                if !self.deliver_frame(&mut held) {
                    if let Some(vif) = self.vif.as_mut() {
                        vif.held = Some(held);
                    }
                    return Ok(());
                }
                continue;
            }
            if !vif.wire_readable {
                return Ok(());
            }
            // One scratch buffer for every frame: no allocation per frame.
            let mut buf = std::mem::take(&mut self.rx_scratch);
            buf.resize(vif.wire.recv_buf_len(), 0);
            let received = vif.wire.recv(&mut buf);
            let result = match received {
                Ok(Some(n)) => {
                    if !self.deliver_frame(&mut buf[..n]) {
                        if let Some(vif) = self.vif.as_mut() {
                            vif.held = Some(buf[..n].to_vec());
                        }
                    }
                    None
                }
                Ok(None) => Some(Ok(())),
                Err(e) => {
                    tracing::warn!(device = %self.cfg.device, error = %e, "wire read failed");
                    Some(Ok(()))
                }
            };
            self.rx_scratch = buf;
            if let Some(done) = result {
                if let Some(vif) = self.vif.as_mut() {
                    vif.wire_readable = false;
                }
                return done.and_then(|()| self.arm_wire());
            }
        }
    }

    /// Copies one frame (virtio-net header first) into posted buffers and
    /// answers them, or drops it; `false` when it needs more buffers than
    /// are posted (the caller holds it).
    fn deliver_frame(&mut self, frame: &mut [u8]) -> bool {
        let Some(vif) = self.vif.as_mut() else {
            return true;
        };
        let hdr_len = vif.wire.header_len();
        let Ok(hdr) = VnetHeader::decode(frame, hdr_len) else {
            self.stats.rx_dropped += 1;
            return true;
        };
        let data = &mut frame[hdr_len.bytes()..];
        let dst: Option<[u8; 6]> = data.get(..6).and_then(|d| d.try_into().ok());
        if !dst.is_some_and(|dst| vif.mcast.accepts(&dst)) {
            self.stats.rx_filtered += 1;
            return true;
        }
        let mut csum = if hdr.needs_csum() {
            Checksum::Partial
        } else {
            Checksum::Unknown
        };
        if csum == Checksum::Partial && vif.no_csum_offload {
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
        let posted: Vec<NetifRxRequest> = vif
            .pool
            .iter()
            .take(XEN_NETIF_NR_SLOTS_MIN + 1)
            .map(|p| p.req)
            .collect();
        let plan = match rx_plan(&posted, &rx_frame, vif.rx_features) {
            Ok(plan) => plan,
            Err(NetifRxError::NotEnoughBuffers { .. }) => {
                mark_rx_taken(&self.cfg.device, vif);
                return false;
            }
            Err(e) => {
                tracing::debug!(device = %self.cfg.device, error = %e, "RX frame dropped");
                self.stats.rx_dropped += 1;
                return true;
            }
        };
        // Before the first copy: from here a crash loses a frame the wire
        // no longer holds, and the next instance counts it.
        mark_rx_taken(&self.cfg.device, vif);
        let mut ok = true;
        for copy in &plan.copies {
            let written = vif
                .grants
                .map(copy.gref, Access::Write)
                .map_err(|e| e.to_string())
                .and_then(|page| {
                    let src = data
                        .get(copy.range.clone())
                        .ok_or("copy beyond the frame")?;
                    vif.region
                        .write(page + u64::from(copy.offset), src)
                        .map_err(|e| e.to_string())
                });
            if let Err(why) = written {
                tracing::debug!(device = %self.cfg.device, why, "RX buffer not writable");
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
            let Some(posted) = vif.pool.pop_front() else {
                break;
            };
            if !ok && rsp.status >= 0 {
                rsp.status = NETIF_RSP_ERROR;
            }
            answer_rx(&self.cfg.device, vif, posted.entry, &rsp);
        }
        vif.rx_taken = None;
        true
    }

    fn arm_wire(&mut self) -> Result<(), BackendError> {
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        if vif.wire_armed {
            return Ok(());
        }
        vif.wire_armed = true;
        let token = Token::Kick {
            generation: vif.generation,
            ring: WIRE,
        };
        arm(&mut self.engine, token, vif.wire.fd().as_raw_fd())
    }

    // ---- control ---------------------------------------------------------

    fn attach(
        &mut self,
        msg: &Message,
        fds: Vec<OwnedFd>,
    ) -> Result<RecoveryStats, (ErrorCode, String)> {
        if self.vif.is_some() {
            return Err((ErrorCode::Ebusy, "a vif is already attached".into()));
        }
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = NetAttachRequest::from_message(msg).map_err(|e| inval(&e))?;
        let AttachFlags { recover, blame, .. } = AttachFlags::from_message(msg)?;
        let wire_kind = match msg.get(KEY_WIRE) {
            Some("tap") => WireKind::Tap,
            Some("cable") => WireKind::Cable,
            other => return Err(inval(&format!("wire={other:?}: tap or cable"))),
        };
        let shadow = msg
            .get_flag(key::SHADOW)
            .map_err(|e| inval(&e))?
            .unwrap_or(false);
        let conn: &NetConnectRequest = &req.connect;
        // Segmentation is the TAP's (docs/ARCHITECTURE.md §11.6): a cable
        // carries finished frames only, so its vifs are not offered GSO.
        let gso = conn.features.gso_tcpv4 || conn.features.gso_tcpv6;
        if gso && wire_kind == WireKind::Cable {
            return Err(inval(&"GSO is not offered on a cable"));
        }
        if gso && conn.no_csum_offload {
            return Err(inval(
                &"GSO needs checksum offload (feature-no-csum-offload=0)",
            ));
        }
        // The guest's multicast list, kept by the supervisor across
        // instances (absent: this instance keeps it).
        let device_state = msg
            .get_flag(KEY_DEVICE_STATE)
            .map_err(|e| inval(&e))?
            .unwrap_or(false);
        let want = conn.fd_count() + 1 + usize::from(device_state) + if shadow { 2 } else { 0 };
        if fds.len() != want {
            return Err(inval(&format!(
                "attach-net carries {} fds, expected {want}",
                fds.len()
            )));
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().ok_or_else(|| inval(&"missing fd"));
        let region = Arc::new(SharedRegion::from_fd(next()?).map_err(|e| inval(&e))?);
        let channel = |kick: OwnedFd, notify: OwnedFd| -> Result<Channel, (ErrorCode, String)> {
            for fd in [&kick, &notify] {
                if !is_eventfd(fd.as_fd()).map_err(|e| inval(&e))? {
                    return Err(inval(&"an event channel descriptor is not an eventfd"));
                }
            }
            Ok(Channel {
                kick: EventChannel::from_fd(kick).map_err(|e| inval(&e))?,
                notify: EventChannel::from_fd(notify).map_err(|e| inval(&e))?,
            })
        };
        let tx_chan = channel(next()?, next()?)?;
        let rx_chan = if conn.split_event_channels {
            Some(channel(next()?, next()?)?)
        } else {
            None
        };
        let wire =
            Wire::from_fd(wire_kind, next()?, VnetHeaderLen::Basic).map_err(|e| inval(&e))?;
        let area = if device_state { Some(next()?) } else { None };
        let mcast = MulticastFilter::open(area, conn.multicast_control).map_err(|e| inval(&e))?;
        if wire_kind == WireKind::Tap {
            // What the kernel may hand over unfinished: what this guest
            // accepts (a previous attachment's guest may have differed).
            wire.set_offloads(Offloads {
                csum: !conn.no_csum_offload,
                tso4: conn.features.gso_tcpv4,
                tso6: conn.features.gso_tcpv6,
                ..Offloads::default()
            })
            .map_err(|e| inval(&e))?;
        }
        let logs = if shadow && self.cfg.shadow {
            let (tx_log, g1) =
                open_shadow_log(&self.cfg.crash_at, next()?).map_err(|e| inval(&e))?;
            let (rx_log, g2) =
                open_shadow_log(&self.cfg.crash_at, next()?).map_err(|e| inval(&e))?;
            Some((tx_log, rx_log, g1.max(g2)))
        } else {
            None
        };
        let grants = GrantMapper::new(region.clone(), conn.grant_frames, self.cfg.backend_id)
            .map_err(|e| inval(&e))?;
        let ring_pages = |gref| -> Result<RingPages, (ErrorCode, String)> {
            let page = grants
                .map(gref, Access::Write)
                .map_err(|e| (ErrorCode::Einval, format!("ring grant: {e}")))?;
            RingPages::new(region.clone(), vec![page]).map_err(|e| inval(&e))
        };
        let tx_pages = ring_pages(conn.tx_ring_ref)?;
        let rx_pages = ring_pages(conn.rx_ring_ref)?;

        let started = std::time::Instant::now();
        let mut stats = RecoveryStats::default();
        let (tx_log, rx_log) = match logs {
            Some((t, r, generation)) => {
                stats.generation = generation;
                (Some(t), Some(r))
            }
            None => (None, None),
        };
        let mut plans = [None, None];
        let mut tx_snapshot = None;
        let tx = match (&tx_log, recover) {
            (Some(log), true) => {
                let (ring, plan, snapshot) = recover_ring::<NetifTx>(log, tx_pages)?;
                plans[0] = Some(plan);
                tx_snapshot = Some(snapshot);
                ring
            }
            _ => BackRing::<NetifTx>::attach(tx_pages).map_err(|e| inval(&e))?,
        };
        let rx = match (&rx_log, recover) {
            (Some(log), true) => {
                let (ring, plan, snapshot) = recover_ring::<NetifRx>(log, rx_pages)?;
                plans[1] = Some(plan);
                self.recovery.rx_dropped_in_crash += rx_taken_and_lost(log, &snapshot)
                    .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
                ring
            }
            _ => BackRing::<NetifRx>::attach(rx_pages).map_err(|e| inval(&e))?,
        };
        for (log, size) in [(&tx_log, tx.size()), (&rx_log, rx.size())] {
            if log.as_ref().is_some_and(|l| l.entries() != size) {
                return Err(inval(&format!("shadow log does not have {size} entries")));
            }
        }
        let (tx_sent, tx_answered) = tx_snapshot.as_ref().map(tx_progress).unwrap_or_default();
        if let Some(plan) = &plans[0] {
            // Counted now: a serial replay runs after the reply.
            let unsent: HashSet<u32> = plan
                .reexecute
                .iter()
                .filter_map(|e| txrec::decode(&e.request).ok())
                .map(|r| r.packet)
                .filter(|p| !tx_sent.contains(p) && !tx_answered.contains_key(p))
                .collect();
            self.recovery.tx_replayed += unsent.len() as u64;
            // Packets go out in ring order and are answered right after
            // their write — on a TAP a batch of them after the batch's
            // write: only the first one not answered (on a TAP, the first
            // TX_BATCH) can have left the dead instance too.
            let window = match wire_kind {
                WireKind::Tap => TX_BATCH,
                WireKind::Cable => 1,
            };
            self.recovery.tx_maybe_duplicated += unsent.len().min(window) as u64;
        }
        let generation = self.generations.new_attachment();
        let features = conn.features;
        self.vif = Some(Vif {
            name: req.frontend.clone(),
            generation,
            region,
            grants,
            tx,
            rx,
            tx_chan,
            rx_chan,
            tx_log,
            rx_log,
            wire,
            rx_features: RxFeatures {
                sg: features.sg,
                gso_tcpv4: features.gso_tcpv4,
                gso_tcpv6: features.gso_tcpv6,
            },
            no_csum_offload: conn.no_csum_offload,
            mcast,
            pool: VecDeque::new(),
            held: None,
            rx_taken: None,
            wire_armed: false,
            wire_readable: true,
            tx_unpublished: 0,
            rx_unpublished: 0,
            tx_notify_owed: false,
            rx_notify_owed: false,
            tx_pending: Vec::new(),
            tx_sent,
            tx_answered,
            tx_serial: SerialReplay::default(),
            rx_serial: SerialReplay::default(),
            closing: Closing::No,
        });
        let proto = |e: String| (ErrorCode::Eproto, format!("replay failed: {e}"));
        if let Some(plan) = &plans[1] {
            recovery::apply_plan(&mut RxReplay(self), plan, blame, &mut stats).map_err(proto)?;
        }
        if let Some(plan) = &plans[0] {
            recovery::apply_plan(&mut TxReplay(self), plan, blame, &mut stats).map_err(proto)?;
            self.complete_partial_packet().map_err(proto)?;
        }
        stats.replay_us = started.elapsed().as_micros() as u64;
        // The guest may be asleep waiting for what the dead instance owed.
        self.publish();
        let vif = self
            .vif
            .as_ref()
            .ok_or((ErrorCode::Enodev, "vif gone".into()))?;
        let _ = vif.tx_chan.notify.notify();
        let _ = vif.rx_notify().notify();
        let mut polls = vec![(TX, vif.tx_chan.kick.as_raw_fd())];
        if let Some(rx) = &vif.rx_chan {
            polls.push((RX, rx.kick.as_raw_fd()));
        }
        for (ring, fd) in polls {
            arm(&mut self.engine, Token::Kick { generation, ring }, fd)
                .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        }
        publish_metrics(&mut self.metrics, &self.stats, true);
        tracing::info!(device = %self.cfg.device, frontend = %req.frontend, recover, ?stats, recovery = ?self.recovery, "vif attached");
        Ok(stats)
    }

    fn handle_kick(&mut self, generation: u32, ring: u8) -> Result<(), BackendError> {
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        if vif.generation != generation {
            return Ok(());
        }
        if ring == WIRE {
            vif.wire_armed = false;
            vif.wire_readable = true;
            return Ok(());
        }
        self.stats.kicks += 1;
        let chan = match (ring, &vif.rx_chan) {
            (RX, Some(rx)) => rx,
            _ => &vif.tx_chan,
        };
        let _ = chan.kick.drain();
        let fd = chan.kick.as_raw_fd();
        arm(&mut self.engine, Token::Kick { generation, ring }, fd)
    }
}

/// A packet in the TAP batch: taken from the ring at `first_index`, its
/// slots logged in `entries` when the batch is written.
struct Batched {
    first_index: u32,
    slots: TxSlots,
    entries: Vec<Option<EntryId>>,
    size: u16,
}

/// Logs the slots of a packet taken at `first_index` through `log`, the TX
/// log's writer, one entry per slot in ring order, into `entries` (`None`
/// each without a log). A transition the log refuses ends the process
/// ([`log_failed`]).
fn log_slots(
    device: &str,
    log: Option<&mut LogWriter<'_>>,
    first_index: u32,
    slots: &TxSlots,
    entries: &mut Vec<Option<EntryId>>,
) {
    let Some(log) = log else {
        entries.resize(slots.len(), None);
        return;
    };
    entries.extend(
        txrec::records(first_index, slots)
            .enumerate()
            .map(|(i, rec)| {
                let idx = first_index.wrapping_add(i as u32);
                match log.log_consumed(idx, &txrec::encode(&rec)) {
                    Ok(e) => Some(e),
                    Err(e) => log_failed(device, e),
                }
            }),
    );
}

/// Keeps an answered packet's entry list in `lists`
/// ([`NetBackend::recycle_entries`]).
fn recycle_entries(lists: &mut Vec<Vec<Option<EntryId>>>, entries: Vec<Option<EntryId>>) {
    if lists.len() < TX_BATCH && entries.capacity() <= TxSpares::LONGEST_KEPT {
        lists.push(entries);
    }
}

/// The answers to one TX packet's slots ([`NetBackend::answer_tx`]).
struct TxAnswer<'a> {
    slots: &'a TxSlots,
    entries: &'a [Option<EntryId>],
    status: i16,
    /// Slots a dead instance answered, skipped.
    answered: &'a [bool],
}

impl TxAnswer<'_> {
    /// Puts one response per slot not answered yet on `tx` and logs each
    /// COMPLETING through `log`, the TX log's writer.
    fn put(
        &self,
        device: &str,
        tx: &mut BackRing<NetifTx>,
        unpublished: &mut u32,
        mut log: Option<&mut LogWriter<'_>>,
    ) {
        let responses = self.slots.responses_iter(self.status);
        for (i, (rsp, entry)) in responses.zip(self.entries).enumerate() {
            if self.answered.get(i).copied().unwrap_or(false) {
                continue;
            }
            let idx = match tx.put_response(&rsp) {
                Ok(idx) => idx,
                Err(e) => {
                    tracing::error!(device, error = %e, "cannot put a TX response");
                    return;
                }
            };
            *unpublished += 1;
            if let (Some(log), Some(entry)) = (log.as_deref_mut(), entry) {
                if let Err(e) = log.log_completing(*entry, idx, &response::encode_tx(&rsp)) {
                    log_failed(device, e);
                }
            }
        }
    }
}

/// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` on one ring, then
/// `log_published` (docs/ARCHITECTURE.md §7.1: the entries the guest can
/// now see are freed); whether the guest asked to be notified.
fn push_and_log<P: shadowback_ring::sring::RingProtocol>(
    ring: &mut BackRing<P>,
    log: Option<&ShadowLog>,
    device: &str,
) -> bool {
    let pushed = ring.push_responses();
    if let (Ok(_), Some(log)) = (&pushed, log) {
        if let Err(e) = log.log_published(ring.rsp_prod_pvt()) {
            log_failed(device, e);
        }
    }
    pushed.unwrap_or(false)
}

/// Marks the first pooled RX buffer's entry [`RX_TAKEN`]: a frame from
/// the wire is bound for it.
fn mark_rx_taken(device: &str, vif: &mut Vif) {
    let Some(entry) = vif.pool.front().and_then(|p| p.entry) else {
        return;
    };
    if vif.rx_taken == Some(entry) {
        return;
    }
    if let Some(log) = vif.rx_log.as_ref() {
        if let Err(e) = log.set_progress(entry, RX_TAKEN) {
            log_failed(device, e);
        }
    }
    vif.rx_taken = Some(entry);
}

/// Puts an RX response in the slot of its request and logs it COMPLETING.
fn answer_rx(device: &str, vif: &mut Vif, entry: Option<EntryId>, rsp: &NetifRxResponse) {
    let idx = match vif.rx.put_response(rsp) {
        Ok(idx) => idx,
        Err(e) => {
            tracing::error!(device, error = %e, "cannot put an RX response");
            return;
        }
    };
    vif.rx_unpublished += 1;
    if let (Some(log), Some(entry)) = (vif.rx_log.as_ref(), entry) {
        if let Err(e) = log.log_completing(entry, idx, &response::encode_rx(rsp)) {
            log_failed(device, e);
        }
    }
}

/// What a dead instance did with the TX packets still in its log: the
/// packets it sent, and the slots it answered, by packet.
fn tx_progress(snap: &LogSnapshot) -> (HashSet<u32>, HashMap<u32, Vec<TxSlotRecord>>) {
    let mut sent = HashSet::new();
    let mut answered: HashMap<u32, Vec<TxSlotRecord>> = HashMap::new();
    for e in &snap.entries {
        let state = e.state();
        if matches!(state, Some(EntryState::Free) | None) {
            continue;
        }
        let Ok(rec) = txrec::decode(&e.request) else {
            continue;
        };
        if e.progress & TX_SENT != 0 {
            sent.insert(rec.packet);
        }
        if state != Some(EntryState::Inflight) {
            answered.entry(rec.packet).or_default().push(rec);
        }
    }
    (sent, answered)
}

/// Fills `frame` (the wire's header length, then `packet.size` bytes) with
/// a packet read out of its grants: the frame, and the virtio-net header
/// saying what is left to do. `offload` (a TAP): a blank checksum is left
/// partial and GSO set up for the kernel; else the checksum is completed.
fn fill_frame(
    vif: &Vif,
    packet: &crate::netif::TxPacket,
    frame: &mut [u8],
    offload: bool,
) -> Result<(), String> {
    let hdr = vif.wire.header_len().bytes();
    frame[..hdr].fill(0);
    let mut at = hdr;
    for frag in &packet.fragments {
        let page = vif
            .grants
            .map(frag.gref, Access::Read)
            .map_err(|e| e.to_string())?;
        let len = usize::from(frag.len);
        let dst = frame
            .get_mut(at..at + len)
            .ok_or("fragments exceed the packet size")?;
        vif.region
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
    vnet.encode(&mut frame[..hdr], vif.wire.header_len())
        .map_err(|e| e.to_string())
}

/// An offset inside a frame (at most [`MAX_FRAME_LEN`]) as a header field.
fn as_u16(at: usize) -> Result<u16, String> {
    u16::try_from(at).map_err(|_| format!("offset {at} beyond a frame"))
}

/// Frames the dead instance took from the wire and never delivered: RX
/// entries still INFLIGHT with [`RX_TAKEN`] set. Their flags are cleared
/// before the buffers go back to the pool, so a later crash does not count
/// them again. (A crash between the clearing and the `attached` reply
/// loses the count, never doubles it.)
fn rx_taken_and_lost(log: &ShadowLog, snap: &LogSnapshot) -> Result<u64, ShadowError> {
    let mut lost = 0;
    for (i, e) in snap.entries.iter().enumerate() {
        if e.state() == Some(EntryState::Inflight) && e.progress & RX_TAKEN != 0 {
            log.set_progress(EntryId(i as u32), 0)?;
            lost += 1;
        }
    }
    Ok(lost)
}

/// Extra-info slots at the start of a packet's collected slots.
fn extra_count(pending: &[(EntryId, TxSlotRecord)]) -> u16 {
    pending
        .iter()
        .filter(|(_, r)| r.kind == txrec::SlotKind::Extra)
        .count() as u16
}

/// Fault injection: a poisoned "sector" names a TX slot id here.
fn poisoned(poison: &[u64], slots: &TxSlots) -> bool {
    !poison.is_empty()
        && slots
            .all()
            .iter()
            .any(|s| poison.contains(&u64::from(s.id)))
}

/// Plans one ring's recovery from its log and attaches the ring where the
/// plan resumes.
fn recover_ring<P: shadowback_ring::sring::RingProtocol>(
    log: &ShadowLog,
    pages: RingPages,
) -> Result<(BackRing<P>, RecoveryPlan, LogSnapshot), (ErrorCode, String)> {
    let inval = |e: RingError| (ErrorCode::Einval, e.to_string());
    let probe = BackRing::<P>::attach(pages.clone()).map_err(inval)?;
    let rsp_prod = probe.shared_rsp_prod().map_err(inval)?;
    let req_prod = probe.shared_req_prod().map_err(inval)?;
    let snapshot = log
        .snapshot()
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    let plan = plan_recovery(
        &snapshot,
        rsp_prod,
        req_prod,
        probe.size(),
        POISON_THRESHOLD,
    )
    .map_err(|e| (ErrorCode::Eproto, format!("recovery impossible: {e}")))?;
    log.log_recovered(&plan)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    let ring = BackRing::<P>::attach_at(pages, plan.req_cons, plan.rsp_prod).map_err(inval)?;
    Ok((ring, plan, snapshot))
}

/// The TX ring as the recovery applier sees it: requests are the logged
/// slots (the grants they name stay the frontend's until answered).
struct TxReplay<'a>(&'a mut NetBackend);

impl ReplayTarget for TxReplay<'_> {
    type Request = TxSlotRecord;

    fn device(&self) -> &str {
        &self.0.cfg.device
    }

    fn log(&self) -> Option<&ShadowLog> {
        self.0.vif.as_ref()?.tx_log.as_ref()
    }

    fn repush(&mut self, r: &Repush) -> Result<(), String> {
        let vif = self.0.vif.as_mut().ok_or("no vif")?;
        let rsp: NetifTxResponse = response::decode_tx(&r.response).map_err(|e| e.to_string())?;
        let idx = vif.tx.put_response(&rsp).map_err(|e| e.to_string())?;
        if idx != r.rsp_idx {
            return Err(format!("re-push landed at {idx}, planned {}", r.rsp_idx));
        }
        vif.tx_log
            .as_ref()
            .ok_or("no TX log")?
            .log_repushed(r.entry, idx)
            .map_err(|e| e.to_string())?;
        vif.tx_unpublished += 1;
        Ok(())
    }

    fn locate(&self, record: &[u8; REQUEST_SIZE]) -> Option<TxSlotRecord> {
        txrec::decode(record).ok()
    }

    fn claim(&mut self, _slot: &TxSlotRecord) -> bool {
        true
    }

    fn fail(&mut self, slot: TxSlotRecord, entry: EntryId) -> Result<(), String> {
        self.0.fail_tx(slot, entry)
    }

    fn reexecute(&mut self, slot: TxSlotRecord, entry: EntryId) -> Result<(), String> {
        self.0.replay_tx_slot(slot, entry);
        Ok(())
    }

    fn replay_serially(&mut self, queue: SerialReplay<TxSlotRecord>) {
        if let Some(vif) = self.0.vif.as_mut() {
            vif.tx_serial = queue;
        }
    }

    fn describe(&self, slot: &TxSlotRecord) -> String {
        format!("TX slot id {}", slot.slot.id)
    }
}

/// The RX ring as the recovery applier sees it: an unanswered buffer goes
/// back to the pool; nothing was delivered into it that the guest saw.
struct RxReplay<'a>(&'a mut NetBackend);

impl ReplayTarget for RxReplay<'_> {
    type Request = NetifRxRequest;

    fn device(&self) -> &str {
        &self.0.cfg.device
    }

    fn log(&self) -> Option<&ShadowLog> {
        self.0.vif.as_ref()?.rx_log.as_ref()
    }

    fn repush(&mut self, r: &Repush) -> Result<(), String> {
        let vif = self.0.vif.as_mut().ok_or("no vif")?;
        let rsp: NetifRxResponse = response::decode_rx(&r.response).map_err(|e| e.to_string())?;
        let idx = vif.rx.put_response(&rsp).map_err(|e| e.to_string())?;
        if idx != r.rsp_idx {
            return Err(format!("re-push landed at {idx}, planned {}", r.rsp_idx));
        }
        vif.rx_log
            .as_ref()
            .ok_or("no RX log")?
            .log_repushed(r.entry, idx)
            .map_err(|e| e.to_string())?;
        vif.rx_unpublished += 1;
        Ok(())
    }

    fn locate(&self, record: &[u8; REQUEST_SIZE]) -> Option<NetifRxRequest> {
        rxrec::decode(record).ok()
    }

    fn claim(&mut self, _req: &NetifRxRequest) -> bool {
        true
    }

    fn fail(&mut self, req: NetifRxRequest, entry: EntryId) -> Result<(), String> {
        let vif = self.0.vif.as_mut().ok_or("no vif")?;
        let rsp = NetifRxResponse {
            id: req.id,
            offset: 0,
            flags: 0,
            status: NETIF_RSP_ERROR,
        };
        answer_rx(&self.0.cfg.device, vif, Some(entry), &rsp);
        Ok(())
    }

    fn reexecute(&mut self, req: NetifRxRequest, entry: EntryId) -> Result<(), String> {
        let vif = self.0.vif.as_mut().ok_or("no vif")?;
        vif.pool.push_back(Posted {
            req,
            entry: Some(entry),
        });
        self.0.recovery.rx_buffers_recovered += 1;
        Ok(())
    }

    fn replay_serially(&mut self, queue: SerialReplay<NetifRxRequest>) {
        if let Some(vif) = self.0.vif.as_mut() {
            vif.rx_serial = queue;
        }
    }

    fn describe(&self, req: &NetifRxRequest) -> String {
        format!("RX buffer id {}", req.id)
    }
}

impl EventLoop for NetBackend {
    fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    fn control(&self) -> &SeqPacket {
        &self.control
    }

    fn completions(&mut self) -> &mut Vec<Completion> {
        &mut self.completions
    }

    /// Nothing is in flight between turns: one queued entry per turn.
    fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        if vif.closing == Closing::Broken {
            return Ok(());
        }
        let device = self.cfg.device.clone();
        if let Some((entry, rec)) = vif.tx_serial.next(0, vif.tx_log.as_ref(), &device) {
            self.replay_tx_slot(rec, entry);
            // The last logged packet may be one the dead instance was still
            // logging: completed from the ring once every logged slot is
            // replayed, before anything new is taken from the ring (as
            // `attach` does right after a replay that is not serial).
            if self.vif.as_ref().is_some_and(|v| v.tx_serial.is_empty()) {
                if let Err(e) = self.complete_partial_packet() {
                    return self.broken(&format!("replay failed: {e}"));
                }
            }
        }
        let Some(vif) = self.vif.as_mut() else {
            return Ok(());
        };
        if let Some((entry, req)) = vif.rx_serial.next(0, vif.rx_log.as_ref(), &device) {
            vif.pool.push_back(Posted {
                req,
                entry: Some(entry),
            });
        }
        Ok(())
    }

    fn consume(&mut self) -> Result<(), BackendError> {
        self.consume_tx()?;
        self.consume_rx()?;
        self.deliver_rx()
    }

    fn publish(&mut self) {
        self.publish_rings(true);
    }

    fn finish_detach(&mut self) -> Result<(), BackendError> {
        let Some(vif) = self.vif.as_ref() else {
            return Ok(());
        };
        let replaying = !vif.tx_serial.is_empty() || !vif.rx_serial.is_empty();
        if vif.closing == Closing::No || (vif.closing == Closing::Detach && replaying) {
            return Ok(());
        }
        let closing = vif.closing;
        let name = vif.name.clone();
        self.vif = None;
        tracing::info!(device = %self.cfg.device, frontend = %name, stats = ?self.stats, "vif detached");
        if closing == Closing::Detach {
            send_detached(&self.control, Some(&name))?;
        }
        Ok(())
    }

    fn heartbeat(&mut self) {
        let logs = self
            .vif
            .iter()
            .flat_map(|v| v.tx_log.iter().chain(v.rx_log.iter()));
        event_loop::heartbeat(&self.cfg.device, logs);
        publish_metrics(&mut self.metrics, &self.stats, false);
    }

    fn has_work(&mut self) -> bool {
        let Some(vif) = self.vif.as_mut() else {
            return false;
        };
        if vif.closing != Closing::No {
            return false;
        }
        if !vif.tx_serial.is_empty() || !vif.rx_serial.is_empty() {
            return true;
        }
        let tx = vif.tx.final_check_for_requests().unwrap_or(true);
        let rx = vif.rx.final_check_for_requests().unwrap_or(true);
        let wire = (vif.wire_readable || vif.held.is_some()) && !vif.pool.is_empty();
        tx || rx || wire
    }

    fn on_control(&mut self) -> Result<(), BackendError> {
        let (msg, fds) = recv_control(&self.control)?;
        if let Some(done) = fault_injection(&msg, &self.cfg.device, &mut self.poison, &self.control)
        {
            return done;
        }
        match msg.kind() {
            ATTACH_NET => {
                let result = self.attach(&msg, fds);
                if let Err((_, why)) = &result {
                    tracing::warn!(device = %self.cfg.device, why, "attach-net refused");
                    self.vif = None;
                }
                let recovered = self.recovery;
                let reply = attach_reply(result)
                    .with(KEY_TX_REPLAYED, recovered.tx_replayed)
                    .with(KEY_TX_MAYBE_DUPLICATED, recovered.tx_maybe_duplicated)
                    .with(KEY_RX_BUFFERS_RECOVERED, recovered.rx_buffers_recovered)
                    .with(KEY_RX_DROPPED_IN_CRASH, recovered.rx_dropped_in_crash);
                self.control.send(&reply, &[]).map_err(control_err)
            }
            // A vif served over vhost-user: this instance serves its
            // virtqueues from now on (docs/ARCHITECTURE.md §8.1).
            ATTACH_VIRTIO if self.vif.is_none() => crate::vnet::serve(
                &mut self.engine,
                &self.control,
                &self.cfg,
                &mut self.poison,
                &mut self.generations,
                &mut self.metrics,
                &mut self.tap_batch,
                (msg, fds),
            ),
            kind::DETACH => match self.vif.as_mut() {
                Some(vif) => {
                    vif.closing = Closing::Detach;
                    Ok(())
                }
                None => send_detached(&self.control, None),
            },
            other => refuse_unexpected(&self.control, other),
        }
    }

    fn on_kick(&mut self, generation: u32, ring: u8, _poll: i32) -> Result<(), BackendError> {
        self.handle_kick(generation, ring)
    }

    fn on_io(&mut self, _generation: u32, _ring: u8, _slot: u16, _result: i32) {}
}

impl AsFd for NetBackend {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.control.as_fd()
    }
}
