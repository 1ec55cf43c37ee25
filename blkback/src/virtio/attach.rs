//! `attach-virtio`: the split virtqueues of a vhost-user-blk device
//! (docs/ARCHITECTURE.md §8), built into a [`VirtQueues`] and a
//! virtio-blk model for the generic loop.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use shadowback_dataplane::control::AttachFlags;
use shadowback_dataplane::event_loop::BackendError;
use shadowback_dataplane::recovery::{open_shadow_log, CrashAction, RecoveryStats};
use shadowback_dataplane::serve::{AttachKind, Built, Core};
use shadowback_ring::EventChannel;
use shadowback_shadow::ShadowLog;
use shadowback_virtio::inflight::{InflightRegion, RegionCrashHook, RegionCrashPoint};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::SplitQueue;
use shadowback_xenbus::protocol::{kind, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds, ATTACH_VIRTIO, MAX_QUEUES};
use shadowback_xenbus::Message;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::queues::{VQueue, VirtQueues};
use super::request::{BlkConfig, CHAIN_CAP};
use crate::instance::BackendConfig;
use crate::model::virtio_blk::VirtioBlkModel;

/// `attach-virtio` for a block backend.
pub struct VirtioAttach<'a> {
    cfg: &'a BackendConfig,
    blk: BlkConfig,
}

impl<'a> VirtioAttach<'a> {
    pub fn new(cfg: &'a BackendConfig) -> Self {
        let blk = BlkConfig {
            sectors: cfg.disk.sectors,
            readonly: cfg.disk.readonly,
            discard: cfg.disk.discard,
            write_zeroes: !cfg.disk.readonly,
            serial: BlkConfig::serial_for(&cfg.device),
        };
        VirtioAttach { cfg, blk }
    }
}

impl AttachKind for VirtioAttach<'_> {
    type Rings = VirtQueues;
    type Model = VirtioBlkModel;
    const KIND: &'static str = ATTACH_VIRTIO;
    const WHAT: &'static str = "virtio device";

    /// Maps memory and rings and decides where each queue resumes.
    fn build(
        &mut self,
        core: &mut Core,
        msg: &Message,
        fds: Vec<OwnedFd>,
        flags: AttachFlags,
    ) -> Result<Built<VirtQueues, VirtioBlkModel>, (ErrorCode, String)> {
        let cfg = self.cfg;
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = VirtioAttachRequest::from_message(msg).map_err(|e| inval(&e))?;
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
        if cfg.shadow && req.shadow {
            for (fd, ring) in vfds.logs.into_iter().zip(&rings) {
                let (log, generation) =
                    open_shadow_log(&cfg.crash_at, fd).map_err(|e| inval(&e))?;
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

        let region_hook = cfg
            .crash_at
            .region
            .filter(|_| fresh_logs.iter().all(|&f| f))
            .map(|spec| region_crash_hook(spec, cfg.crash_at.action));
        let mut queues = Vec::with_capacity(req.queues.len());
        for ((qcfg, ring), (kick, call)) in req.queues.iter().zip(rings).zip(vfds.queues) {
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
            queues.push(VQueue::new(qcfg.index, ring, kick, call, inflight));
        }
        let mut vqs = VirtQueues::new(mem.clone(), queues, CHAIN_CAP);
        let mut recoveries = Vec::with_capacity(req.queues.len());
        for (ring, qcfg) in req.queues.iter().enumerate() {
            let recovery = vqs.recover(
                ring,
                logs[ring].as_ref(),
                qcfg.next_avail,
                flags.recover,
                fresh_logs[ring],
            )?;
            recoveries.push(recovery);
        }
        tracing::info!(device = %cfg.device, queues = req.queues.len(), event_idx, "virtqueues mapped");
        Ok(Built {
            name: req.frontend.clone(),
            rings: vqs,
            model: VirtioBlkModel::new(
                cfg.device.clone(),
                BlkConfig {
                    // A resize this process was told of (`resize`).
                    sectors: core.capacity.unwrap_or(self.blk.sectors),
                    ..self.blk.clone()
                },
                mem,
            ),
            logs,
            recoveries,
            stats,
            started,
        })
    }

    /// `set-call`, and `attach` refused: this process serves virtqueues
    /// now.
    fn on_other(
        &mut self,
        core: &mut Core,
        rings: Option<&mut VirtQueues>,
        msg: &Message,
        mut fds: Vec<OwnedFd>,
    ) -> Option<Result<(), BackendError>> {
        let reply = match msg.kind() {
            kind::ATTACH => Message::error(ErrorCode::Ebusy, "this instance serves virtqueues"),
            kind::SET_CALL => VirtQueues::set_call_reply(rings, &self.cfg.device, msg, &mut fds),
            _ => return None,
        };
        Some(core.send(&reply))
    }
}

/// Fault injection: a hook that aborts (or stops) the process at `point` on its
/// `nth` occurrence over all queues (an update with fewer stores than the
/// point's step does not count).
fn region_crash_hook(
    (point, nth): (RegionCrashPoint, u64),
    action: CrashAction,
) -> RegionCrashHook {
    let hits = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |at: RegionCrashPoint, stores: u32| {
        if at == point
            && stores >= point.step
            && hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == nth
        {
            action.fire(&at);
        }
    })
}
