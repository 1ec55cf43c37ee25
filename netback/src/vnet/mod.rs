//! vhost-user-net in a network backend process (docs/ARCHITECTURE.md
//! §8.1): after an `attach-virtio` the process serves a vif's receive and
//! transmit virtqueues, on the wire the supervisor lends, with the same
//! engine and control socket as the netif backend — on the generic loop
//! ([`shadowback_dataplane::serve`]), as vhost-user-blk does.
//!
//! A device has up to
//! [`MAX_QUEUE_PAIRS`](shadowback_xenbus::virtio::MAX_QUEUE_PAIRS) receive/transmit *pairs* (pair
//! `i` receives on virtqueue `2i`, transmits on `2i + 1`;
//! `VIRTIO_NET_F_MQ`) and a control queue after them. The driver uses the
//! first `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` pairs (kept in the device state
//! area), or, when the VMM keeps the control queue (QEMU), the pairs the
//! VMM started; the loop takes from no other
//! ([`shadowback_dataplane::model::DeviceModel::takes`]). Each pair moves
//! its frames on a *lane*: its own queue of a multi-queue TAP (the queues
//! of pairs not in use are detached, `TUNSETQUEUE`, so the kernel steers
//! no flow to them), or the one cable every pair shares, whose received
//! frames are fanned out by flow hash ([`frame::flow_hash`]).
//!
//! This module is the `attach-virtio` kind ([`VnetAttach`]: maps memory,
//! the virtqueues and the wire, opens the logs and plans each queue's
//! recovery); the virtqueues are the generic ring set
//! ([`shadowback_dataplane::virtq`]) with virtio-net's [`record`]s, and
//! [`model`] is what the device does with their heads (TX, RX, control).
//!
//! Recovery is the shared applier on each queue's log, with the virtqueue
//! rule of §7.4: a head stays the device's until its used element is
//! visible, so a head to replay is walked again in the ring. TX heads
//! answered (or, by an older instance, marked [`TX_SENT`]) are answered
//! only; the others are sent again. RX heads go back to the pool; a frame
//! the dead instance had taken from the wire and not delivered (its first
//! head still in flight, marked [`RX_TAKEN`](crate::backend::RX_TAKEN)) is
//! lost, as on any NIC, and counted (`rx-dropped-in-crash`); a receive frame
//! whose used elements were not all written is shown to the driver as empty
//! buffers, never in part. The control queue is the first ring of the set,
//! so a command the dead instance did not answer takes effect again before
//! any frame is served.

pub mod ctrl;
mod frame;
mod model;
mod record;

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use shadowback_dataplane::control::AttachFlags;
use shadowback_dataplane::event_loop::BackendError;
use shadowback_dataplane::recovery::{open_shadow_log, RecoveryStats};
use shadowback_dataplane::rings::Recovery;
use shadowback_dataplane::serve::{AttachKind, Built, Core, DataPlane};
use shadowback_dataplane::virtq::VQueue;
use shadowback_ring::EventChannel;
use shadowback_shadow::{IoCounters, RecoveryPlan, Repush, ShadowLog};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::net::{self as vnet, RX_QUEUE, TX_QUEUE};
use shadowback_virtio::net_state::{NetDeviceState, NetStateArea};
use shadowback_virtio::queue::SplitQueue;
use shadowback_xenbus::netif::ATTACH_NET;
use shadowback_xenbus::protocol::{kind, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds, ATTACH_VIRTIO};
use shadowback_xenbus::Message;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::backend::{rx_taken_and_lost, NetConfig, NetRecovery, NetStats, TX_SENT};
use crate::tapbatch::{TapBatch, TX_BATCH};
use crate::wire::{VnetHeaderLen, Wire, WireKind};
use model::{Lane, Negotiated, Role, VnetModel, VnetParts, VnetQueues};
use record::UsedRecord;

/// Buffers of a chain kept by a walk: more than any driver uses for one
/// frame (Linux: MAX_SKB_FRAGS + 2).
const CHAIN_CAP: usize = 64;
/// The header the wire carries (the supervisor sets the TAP up with it).
const WIRE_HDR: VnetHeaderLen = VnetHeaderLen::Basic;

/// The `attach-virtio` kind of a network backend: what outlives a
/// device's attachment in this process (its configuration, counters and
/// the TAP batch's ring).
pub struct VnetAttach {
    cfg: NetConfig,
    stats: NetStats,
    recovery: NetRecovery,
    /// The TAP batch's ring, lent to the model while a device is attached.
    tap_batch: Option<TapBatch>,
}

impl VnetAttach {
    fn new(cfg: NetConfig, tap_batch: TapBatch) -> Self {
        VnetAttach {
            cfg,
            stats: NetStats::default(),
            recovery: NetRecovery::default(),
            tap_batch: Some(tap_batch),
        }
    }
}

/// Serves a vif's virtqueues on `core` until the supervisor closes the
/// control channel, starting with the `attach-virtio` in `first`; the TAP
/// batch is handed back. Called by the netif backend, which must have no
/// vif attached.
pub(crate) fn serve(
    core: &mut Core,
    cfg: &NetConfig,
    tap_batch: TapBatch,
    first: (&Message, Vec<OwnedFd>),
) -> (Result<(), BackendError>, Option<TapBatch>) {
    tracing::info!(device = %cfg.device, "serving virtio-net queues");
    let mut plane = DataPlane::new(core, VnetAttach::new(cfg.clone(), tap_batch));
    let result = plane.handle(first.0, first.1).and_then(|()| plane.run());
    let kind = plane.into_kind();
    tracing::info!(device = %cfg.device, stats = ?kind.stats, "virtio-net loop done");
    (result, kind.tap_batch)
}

impl AttachKind for VnetAttach {
    type Rings = VnetQueues;
    type Model = VnetModel;
    const KIND: &'static str = ATTACH_VIRTIO;
    const WHAT: &'static str = "virtio-net device";

    /// Maps memory and rings and plans every queue's recovery.
    fn build(
        &mut self,
        _core: &mut Core,
        msg: &Message,
        fds: Vec<OwnedFd>,
        flags: AttachFlags,
    ) -> Result<Built<VnetQueues, VnetModel>, (ErrorCode, String)> {
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = VirtioAttachRequest::from_message(msg).map_err(|e| inval(&e))?;
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
            let wire = Wire::from_fd(wire_kind, fd, WIRE_HDR).map_err(|e| inval(&e))?;
            lanes.push(Lane::new(wire));
        }
        // Which queue is which (virtio 1.2 §5.1.2): the pairs the driver
        // may use, then the control queue.
        let in_use = vnet::pairs_in_use(req.features, req.queue_pairs);
        let ctrl_index = vnet::ctrl_queue(req.features, req.queue_pairs);
        let with_ctrl = vnet::has(req.features, VIRTIO_NET_F_CTRL_VQ);
        let mut seen = HashSet::new();
        for q in &req.queues {
            if q.index >= 2 * in_use && !(with_ctrl && q.index == ctrl_index) {
                return Err(inval(&format!(
                    "virtqueue {} is not a queue of a driver using {in_use} pairs",
                    q.index
                )));
            }
            if !seen.insert(q.index) {
                return Err(inval(&format!("virtqueue {} given twice", q.index)));
            }
        }
        if !seen.contains(&RX_QUEUE) || !seen.contains(&TX_QUEUE) {
            return Err(inval(
                &"the first receive and transmit queues (0, 1) are needed",
            ));
        }
        let role = |index: u16| {
            if with_ctrl && index == ctrl_index {
                Role::Ctrl
            } else if !seen.contains(&(index ^ 1)) {
                Role::Idle
            } else if index.is_multiple_of(2) {
                Role::Rx(usize::from(index / 2))
            } else {
                Role::Tx(usize::from(index / 2))
            }
        };
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
        let mut stats = RecoveryStats::default();
        let mut logs: Vec<Option<ShadowLog>> = req.queues.iter().map(|_| None).collect();
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
        // The control queue first: its plan is applied before any pair's.
        let mut order: Vec<usize> = (0..req.queues.len()).collect();
        order.sort_by_key(|&i| role(req.queues[i].index) != Role::Ctrl);
        let mut parts: Vec<_> = req
            .queues
            .iter()
            .zip(vfds.queues)
            .zip(logs)
            .map(Some)
            .collect();
        let mut queues = Vec::with_capacity(order.len());
        let mut roles = Vec::with_capacity(order.len());
        let mut ring_logs = Vec::with_capacity(order.len());
        let mut bases = Vec::with_capacity(order.len());
        for i in order {
            let Some(((qcfg, (kick, call)), log)) = parts[i].take() else {
                continue;
            };
            let ring = SplitQueue::new(qcfg, &mem, event_idx)
                .map_err(|e| inval(&format!("queue {}: {e}", qcfg.index)))?;
            let kick = EventChannel::from_fd(kick).map_err(|e| inval(&e))?;
            let call = EventChannel::from_fd(call).map_err(|e| inval(&e))?;
            queues.push(VQueue::new(qcfg.index, ring, kick, call, None));
            roles.push(role(qcfg.index));
            ring_logs.push(log);
            bases.push(qcfg.next_avail);
        }
        let mut rings = VnetQueues::new(mem.clone(), queues, CHAIN_CAP);
        // Frames a crash can leave written and not answered, per queue.
        let window = match wire_kind {
            WireKind::Tap => TX_BATCH,
            WireKind::Cable => 1,
        };
        let mut recoveries = Vec::with_capacity(roles.len());
        let mut tx_sent = HashSet::new();
        for (ring, role) in roles.iter().enumerate() {
            let recovery = rings.recover(
                ring,
                ring_logs[ring].as_ref(),
                bases[ring],
                flags.recover,
                fresh,
            )?;
            let recovery = match (recovery, role) {
                (Recovery::Plan(_), Role::Idle) => {
                    // Never served in this session, so nothing logged.
                    return Err((
                        ErrorCode::Eproto,
                        format!(
                            "virtqueue {}: log entries of a queue never served",
                            rings.index(ring)
                        ),
                    ));
                }
                (Recovery::Plan(plan), Role::Tx(_)) => {
                    let sent: Vec<u16> = plan
                        .reexecute
                        .iter()
                        .filter(|e| e.progress & TX_SENT != 0)
                        .filter_map(|e| record::logged_head(&e.request).map(|(h, _)| h))
                        .collect();
                    // Counted now: a serial replay runs after the reply.
                    // Heads are sent in consumption order and each is
                    // answered right after its write — on a TAP after its
                    // batch's write: per queue only the first one not
                    // answered (on a TAP, the first TX_BATCH) can have
                    // left the dead instance too.
                    let unsent = plan.reexecute.len().saturating_sub(sent.len());
                    self.recovery.tx_replayed += unsent as u64;
                    self.recovery.tx_maybe_duplicated += unsent.min(window) as u64;
                    tx_sent.extend(sent.into_iter().map(|h| (ring, h)));
                    Recovery::Plan(plan)
                }
                (Recovery::Plan(plan), Role::Rx(_)) => {
                    // Before the heads go back to the pool: the marks are
                    // cleared as they are counted.
                    if let Some(log) = ring_logs[ring].as_ref() {
                        let proto = |e: &dyn std::fmt::Display| (ErrorCode::Eproto, e.to_string());
                        let snapshot = log.snapshot().map_err(|e| proto(&e))?;
                        self.recovery.rx_dropped_in_crash +=
                            rx_taken_and_lost(log, &snapshot).map_err(|e| proto(&e))?;
                    }
                    Recovery::Plan(empty_partial_frames(plan))
                }
                (recovery, _) => recovery,
            };
            recoveries.push(recovery);
        }
        let tap_batch = self
            .tap_batch
            .take()
            .ok_or((ErrorCode::Ebusy, "a device is already attached".into()))?;
        let has = |f| vnet::has(req.features, f);
        let tap = wire_kind == WireKind::Tap;
        let parts = VnetParts {
            device: self.cfg.device.clone(),
            mem,
            neg: Negotiated {
                features: req.features,
                max_pairs: req.queue_pairs,
                hdr_len: vnet::header_len(req.features),
                mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
                csum: has(VIRTIO_NET_F_CSUM),
                host_tso: frame::Tso {
                    v4: tap && has(VIRTIO_NET_F_HOST_TSO4),
                    v6: tap && has(VIRTIO_NET_F_HOST_TSO6),
                },
            },
            roles,
            has_ctrl: with_ctrl && seen.contains(&ctrl_index),
            state,
            state_area,
            lanes,
            stats: self.stats,
            tx_sent,
            tap_batch,
        };
        let mut model = VnetModel::new(parts);
        if let Err(why) = model.set_up() {
            self.tap_batch = Some(model.tap_batch);
            return Err((ErrorCode::Enodev, why));
        }
        tracing::info!(device = %self.cfg.device, frontend = %req.frontend, event_idx,
            pairs = in_use, lanes = model.lanes.len(), recovery = ?self.recovery, "virtqueues mapped");
        Ok(Built {
            name: req.frontend.clone(),
            rings,
            model,
            logs: ring_logs,
            recoveries,
            stats,
            started,
        })
    }

    /// `set-call`, and `attach-net` refused: this process serves
    /// virtqueues now.
    fn on_other(
        &mut self,
        core: &mut Core,
        rings: Option<&mut VnetQueues>,
        msg: &Message,
        mut fds: Vec<OwnedFd>,
    ) -> Option<Result<(), BackendError>> {
        let reply = match msg.kind() {
            ATTACH_NET => Message::error(ErrorCode::Ebusy, "this instance serves virtqueues"),
            kind::SET_CALL => VnetQueues::set_call_reply(rings, &self.cfg.device, msg, &mut fds),
            _ => return None,
        };
        Some(core.send(&reply))
    }

    fn reply(&self, model: Option<&VnetModel>, reply: Message) -> Message {
        self.recovery
            .add_to(reply, model.map_or(0, |m| m.rx_buffers_recovered))
    }

    /// Receive heads still pooled are not answered: they were taken in
    /// avail order and are the last ones, so the VMM, resuming at
    /// `used->idx`, hands them to the next attachment again.
    fn detached(&mut self, model: VnetModel) {
        self.stats = model.stats;
        self.recovery.rx_buffers_recovered += model.rx_buffers_recovered;
        self.tap_batch = Some(model.tap_batch);
    }

    fn io_counters(&self, _base: IoCounters) -> IoCounters {
        self.stats.io_counters()
    }
}

/// A receive queue's plan with the re-pushes of frames not whole among
/// them (a crash between the used elements of one `MRG_RXBUF` frame)
/// turned into empty buffers: the driver drops them, as it drops any runt.
fn empty_partial_frames(mut plan: RecoveryPlan) -> RecoveryPlan {
    let partial = partial_frames(&plan.repush);
    for r in plan.repush.iter_mut() {
        if !partial.contains(&r.old_rsp_idx) {
            continue;
        }
        if let Some(mut used) = UsedRecord::decode(&r.response) {
            used.len = 0;
            let bytes = used.encode();
            r.response[..bytes.len()].copy_from_slice(&bytes);
        }
    }
    plan
}

/// The old indices of re-pushes whose frame is not whole among them.
fn partial_frames(repush: &[Repush]) -> HashSet<u32> {
    let saved: HashMap<u32, UsedRecord> = repush
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
