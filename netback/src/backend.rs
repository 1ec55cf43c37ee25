//! The Xen netif backend of one network backend process
//! (docs/ARCHITECTURE.md §11.3, §11.6), on the generic data-plane loop
//! ([`shadowback_dataplane::serve`]).
//!
//! One vif: a TX ring and an RX ring in the guest's granted region, one or
//! two event channels, a wire (TAP or cable) the supervisor holds and lends
//! to each instance, and one shadow log per ring. This module is the
//! `attach-net` kind ([`NetifAttach`]: maps the region, the rings and the
//! wire, opens the logs and plans each ring's recovery); [`rings`] is the
//! two rings as a ring set, [`model`] what a vif does with their slots.
//! The loop does the rest as for a disk: it logs every slot it takes
//! before the model sees it, puts and logs each answer COMPLETING,
//! publishes (every [`PUBLISH_EVERY`] answers in a long drain), notifies,
//! replays, beats the heartbeat.
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
//!   (its answer says the packet went out). A fatal verdict disconnects
//!   this vif only.
//! - **RX**: posted buffers are logged as taken and kept in a pool; a frame
//!   from the wire is copied into the first buffers of the pool and each
//!   buffer answered in its own slot. With no buffer posted, the wire is not
//!   read: frames wait in its kernel queue, nothing grows here.
//! - **Recovery**: TX packets with an answered slot (or, in a log of an
//!   older instance, marked [`TX_SENT`]) are answered only; the others are
//!   sent again (at most the one packet being written at the crash, or on
//!   a TAP the batch, can go out twice: counted in `tx-maybe-duplicated`).
//!   A packet whose slots the dead instance was still logging is completed
//!   from the ring. RX buffers not answered go back to the pool
//!   (`rx-buffers-recovered`); a frame the dead instance had read from the
//!   wire and not delivered is lost, as on any NIC, and counted
//!   (`rx-dropped-in-crash`).

mod model;
mod rings;

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use shadowback_dataplane::control::AttachFlags;
use shadowback_dataplane::event_loop::{BackendError, MAX_POLL_WINDOW};
use shadowback_dataplane::recovery::{open_shadow_log, CrashSpec, RecoveryStats};
use shadowback_dataplane::rings::Recovery;
use shadowback_dataplane::serve::{AttachKind, Built, Core, DataPlane};
use shadowback_dataplane::uring::{Engine, EngineConfig};
use shadowback_dataplane::xen::{attach_ring, Planned, XenRing};
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::netif::{NetifRx, NetifTx};
use shadowback_ring::sring::RingPages;
use shadowback_ring::{EventChannel, SharedRegion};
use shadowback_shadow::{
    EntryId, EntryState, IoCounters, LogSnapshot, MetricsWriter, ShadowError, ShadowLog,
};
use shadowback_xenbus::netif::{NetAttachRequest, NetConnectRequest, ATTACH_NET};
use shadowback_xenbus::protocol::{is_eventfd, key, ErrorCode};
use shadowback_xenbus::virtio::ATTACH_VIRTIO;
use shadowback_xenbus::{Message, SeqPacket};

use crate::netif::{MulticastFilter, RxFeatures};
use crate::record::tx::{self as txrec, SlotKind, TxSlotRecord};
use crate::tapbatch::{TapBatch, TX_BATCH};
use crate::wire::{Offloads, VnetHeaderLen, Wire, WireKind};
use model::{NetifModel, TxProgress, VifIo};
use rings::{Channel, NetifRings, Resume};

/// Responses a long drain of a ring puts before it publishes them (and
/// notifies, if the guest asked): the guest refills the ring while the
/// backend works through the rest, instead of the two taking turns with
/// a whole ring each.
pub const PUBLISH_EVERY: u32 = 32;

/// Progress flag of a TX entry: the frame was handed to the wire
/// (`ShadowLog::set_progress`). vhost-user-net sets it; the netif backend
/// reads it (a log written by an older instance) but no longer sets it:
/// its packet's first slot is answered right after the write, and an
/// answered slot says the same.
pub const TX_SENT: u32 = 1;

/// Progress flag of an RX buffer's entry (a netif buffer, a virtio-net
/// receive head): a frame read from the wire starts in this buffer (it is
/// being copied there, or held for more buffers).
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
    /// Adaptive polling window in µs (`poll_us` of the nic; 0: never
    /// poll), capped at
    /// [`shadowback_dataplane::event_loop::MAX_POLL_WINDOW`].
    pub poll_us: u32,
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

/// What a vif's recovery did, beyond [`RecoveryStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRecovery {
    pub tx_replayed: u64,
    pub tx_maybe_duplicated: u64,
    pub rx_buffers_recovered: u64,
    pub rx_dropped_in_crash: u64,
}

impl NetRecovery {
    /// These counts as the `attached` reply's keys, with `rx_held`
    /// recovered buffers the serving model still holds (counted here when
    /// it detaches) — the same keys for both transports.
    pub fn add_to(&self, reply: Message, rx_held: u64) -> Message {
        reply
            .with(KEY_TX_REPLAYED, self.tx_replayed)
            .with(KEY_TX_MAYBE_DUPLICATED, self.tx_maybe_duplicated)
            .with(
                KEY_RX_BUFFERS_RECOVERED,
                self.rx_buffers_recovered + rx_held,
            )
            .with(KEY_RX_DROPPED_IN_CRASH, self.rx_dropped_in_crash)
    }
}

/// The `attach-net` kind: what outlives a vif's attachment in this
/// process (its configuration, counters and the TAP batch's ring).
pub struct NetifAttach {
    cfg: NetConfig,
    stats: NetStats,
    recovery: NetRecovery,
    /// The TAP batch's ring, lent to the model while a vif is attached.
    tap_batch: Option<TapBatch>,
}

impl NetifAttach {
    pub fn new(cfg: NetConfig, tap_batch: TapBatch) -> Self {
        NetifAttach {
            cfg,
            stats: NetStats::default(),
            recovery: NetRecovery::default(),
            tap_batch: Some(tap_batch),
        }
    }
}

impl AttachKind for NetifAttach {
    type Rings = NetifRings;
    type Model = NetifModel;
    const KIND: &'static str = ATTACH_NET;
    const WHAT: &'static str = "vif";

    fn build(
        &mut self,
        _core: &mut Core,
        msg: &Message,
        fds: Vec<OwnedFd>,
        flags: AttachFlags,
    ) -> Result<Built<NetifRings, NetifModel>, (ErrorCode, String)> {
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = NetAttachRequest::from_message(msg).map_err(|e| inval(&e))?;
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
        let mut stats = RecoveryStats::default();
        let (tx_log, rx_log) = if shadow && self.cfg.shadow {
            let (tx_log, g1) =
                open_shadow_log(&self.cfg.crash_at, next()?).map_err(|e| inval(&e))?;
            let (rx_log, g2) =
                open_shadow_log(&self.cfg.crash_at, next()?).map_err(|e| inval(&e))?;
            stats.generation = g1.max(g2);
            (Some(tx_log), Some(rx_log))
        } else {
            (None, None)
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
        let (tx, tx_plan) = attach_ring::<NetifTx>(tx_log.as_ref(), flags.recover, tx_pages)?;
        let (rx, rx_plan) = attach_ring::<NetifRx>(rx_log.as_ref(), flags.recover, rx_pages)?;
        for (log, size) in [(&tx_log, tx.size()), (&rx_log, rx.size())] {
            if log.as_ref().is_some_and(|l| l.entries() != size) {
                return Err(inval(&format!("shadow log does not have {size} entries")));
            }
        }
        if let (Some(log), Some((_, snapshot))) = (&rx_log, &rx_plan) {
            self.recovery.rx_dropped_in_crash +=
                rx_taken_and_lost(log, snapshot).map_err(|e| (ErrorCode::Einval, e.to_string()))?;
        }
        let progress = tx_plan
            .as_ref()
            .map(|(_, snapshot)| tx_progress(snapshot))
            .unwrap_or_default();
        let mut resume = None;
        if let Some((plan, _)) = &tx_plan {
            let logged: Vec<TxSlotRecord> = plan
                .reexecute
                .iter()
                .filter_map(|e| txrec::decode(&e.request).ok())
                .collect();
            // Counted now: a serial replay runs after the reply.
            let unsent: HashSet<u32> = logged
                .iter()
                .map(|r| r.packet)
                .filter(|p| !progress.sent.contains(p) && !progress.answered.contains_key(p))
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
            resume = partial_packet(&logged, &progress);
        }
        let mut rings = NetifRings::new(XenRing::new(tx), XenRing::new(rx), tx_chan, rx_chan);
        if let Some(r) = resume {
            tracing::warn!(device = %self.cfg.device, slots = r.count - r.next,
                "completing a packet the dead instance was logging");
            rings.resume(r);
        }
        let tap_batch = self
            .tap_batch
            .take()
            .ok_or((ErrorCode::Ebusy, "a vif is already attached".into()))?;
        let features = conn.features;
        let model = NetifModel::new(
            self.cfg.device.clone(),
            VifIo {
                region,
                grants,
                wire,
            },
            RxFeatures {
                sg: features.sg,
                gso_tcpv4: features.gso_tcpv4,
                gso_tcpv6: features.gso_tcpv6,
            },
            conn.no_csum_offload,
            mcast,
            self.stats,
            tap_batch,
            progress,
        );
        let plan = |p: Option<Planned>| match p {
            Some((plan, _)) => Recovery::Plan(plan),
            None => Recovery::Nothing,
        };
        Ok(Built {
            name: req.frontend.clone(),
            rings,
            model,
            logs: vec![tx_log, rx_log],
            recoveries: vec![plan(tx_plan), plan(rx_plan)],
            stats,
            started,
        })
    }

    /// `attach-virtio` while no vif is attached: the process serves a
    /// vhost-user-net device from now on (docs/ARCHITECTURE.md §8.1).
    fn on_other(
        &mut self,
        core: &mut Core,
        rings: Option<&mut NetifRings>,
        msg: &Message,
        fds: Vec<OwnedFd>,
    ) -> Option<Result<(), BackendError>> {
        if msg.kind() != ATTACH_VIRTIO || rings.is_some() {
            return None;
        }
        let tap_batch = self.tap_batch.take()?;
        let (result, tap_batch) = crate::vnet::serve(core, &self.cfg, tap_batch, (msg, fds));
        self.tap_batch = tap_batch;
        Some(result)
    }

    fn reply(&self, model: Option<&NetifModel>, reply: Message) -> Message {
        self.recovery
            .add_to(reply, model.map_or(0, |m| m.rx_buffers_recovered))
    }

    fn detached(&mut self, model: NetifModel) {
        self.stats = model.stats;
        self.recovery.rx_buffers_recovered += model.rx_buffers_recovered;
        self.tap_batch = Some(model.tap_batch);
    }

    fn io_counters(&self, _base: IoCounters) -> IoCounters {
        self.stats.io_counters()
    }
}

/// The backend instance: the process's loop state and the `attach-net`
/// kind, served by [`DataPlane`].
pub struct NetBackend {
    core: Core,
    kind: Option<NetifAttach>,
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
        let mut core = Core::new(cfg.device.clone(), engine, control);
        core.poll_window = Duration::from_micros(u64::from(cfg.poll_us)).min(MAX_POLL_WINDOW);
        NetBackend {
            core,
            kind: Some(NetifAttach::new(cfg, tap_batch)),
            metrics: None,
        }
    }

    /// Counters so far (of the vifs detached, and of the last once the loop
    /// has ended).
    pub fn stats(&self) -> NetStats {
        let mut stats = self.kind.as_ref().map(|k| k.stats).unwrap_or_default();
        stats.kicks = self.core.stats.kicks;
        stats.notifications = self.core.stats.notifications;
        stats
    }

    /// Serves until the supervisor closes the control channel.
    pub fn run(&mut self) -> Result<(), BackendError> {
        if self.metrics.is_some() {
            self.core.metrics = self.metrics.take();
        }
        let Some(kind) = self.kind.take() else {
            return Ok(());
        };
        let mut plane = DataPlane::new(&mut self.core, kind);
        let result = plane.run();
        self.kind = Some(plane.into_kind());
        result
    }
}

/// What a dead instance did with the TX packets still in its log: the
/// packets it sent, and the slots it answered, by packet.
fn tx_progress(snap: &LogSnapshot) -> TxProgress {
    let mut progress = TxProgress::default();
    for e in &snap.entries {
        let state = e.state();
        if matches!(state, Some(EntryState::Free) | None) {
            continue;
        }
        let Ok(rec) = txrec::decode(&e.request) else {
            continue;
        };
        if e.progress & TX_SENT != 0 {
            progress.sent.insert(rec.packet);
        }
        if state != Some(EntryState::Inflight) {
            progress.answered.entry(rec.packet).or_default().push(rec);
        }
    }
    progress
}

/// The packet the dead instance was still logging, if any: the last one
/// logged (slots are logged in ring order), with fewer slots logged or
/// answered than it has. The rest of its slots are still on the ring,
/// right after the logged ones.
fn partial_packet(logged: &[TxSlotRecord], progress: &TxProgress) -> Option<Resume> {
    let last = logged.last()?;
    let mine: Vec<&TxSlotRecord> = logged.iter().filter(|r| r.packet == last.packet).collect();
    let have = mine.len() + progress.answered.get(&last.packet).map_or(0, Vec::len);
    let next = u16::try_from(have).ok()?;
    (next < last.count).then(|| Resume {
        packet: last.packet,
        next,
        count: last.count,
        extras: mine.iter().filter(|r| r.kind == SlotKind::Extra).count() as u16,
    })
}

/// Frames the dead instance took from the wire and never delivered: RX
/// entries (a netif ring's or a virtio-net receive queue's) still INFLIGHT
/// with [`RX_TAKEN`] set. Their flags are cleared before the buffers go
/// back to the pool, so a later crash does not count them again. (A crash
/// between the clearing and the `attached` reply loses the count, never
/// doubles it.)
pub(crate) fn rx_taken_and_lost(log: &ShadowLog, snap: &LogSnapshot) -> Result<u64, ShadowError> {
    let mut lost = 0;
    for (i, e) in snap.entries.iter().enumerate() {
        if e.state() == Some(EntryState::Inflight) && e.progress & RX_TAKEN != 0 {
            log.set_progress(EntryId(i as u32), 0)?;
            lost += 1;
        }
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use shadowback_ring::netif::NetifTxRequest;

    use super::*;

    fn rec(packet: u32, position: u16, count: u16, kind: SlotKind) -> TxSlotRecord {
        TxSlotRecord {
            slot: NetifTxRequest::default(),
            packet,
            position,
            count,
            kind,
        }
    }

    /// `--poll-us` becomes the loop's poll window, capped as a disk's.
    #[test]
    fn the_poll_window_is_the_configured_one_capped() {
        for (poll_us, window) in [
            (0, Duration::ZERO),
            (50, Duration::from_micros(50)),
            (5000, MAX_POLL_WINDOW),
        ] {
            let cfg = NetConfig {
                device: "vif0".into(),
                backend_id: 0,
                shadow: true,
                crash_at: CrashSpec::default(),
                poll_us,
            };
            let (control, _supervisor) = SeqPacket::pair().unwrap();
            let backend = NetBackend::new(cfg, control).unwrap();
            assert_eq!(backend.core.poll_window, window, "poll_us {poll_us}");
        }
    }

    #[test]
    fn the_last_logged_packet_with_slots_missing_is_resumed_from_the_ring() {
        let none = TxProgress::default();
        // A whole packet, then the first two of four slots of the next.
        let logged = [
            rec(7, 0, 1, SlotKind::First),
            rec(8, 0, 4, SlotKind::First),
            rec(8, 1, 4, SlotKind::Extra),
        ];
        let r = partial_packet(&logged, &none).expect("a packet to resume");
        assert_eq!((r.packet, r.next, r.count, r.extras), (8, 2, 4, 1));
        // Whole: nothing to resume.
        assert!(partial_packet(&logged[..1], &none).is_none());
        // Slots the dead instance answered count as logged.
        let mut answered = TxProgress::default();
        answered.answered.insert(
            8,
            vec![
                rec(8, 2, 4, SlotKind::Following),
                rec(8, 3, 4, SlotKind::Following),
            ],
        );
        assert!(partial_packet(&logged, &answered).is_none());
    }
}
