//! The block backend process: one disk, one frontend at a time, over a
//! Xen ring (`attach`) or, once switched, virtqueues (`attach-virtio`).
//!
//! Both are the generic data-plane loop ([`DataPlane`], docs/ARCHITECTURE.md
//! §3 and §11.2) with the block model: [`XenAttach`] builds a
//! [`XenRing`] and a [`BlkifModel`], [`crate::virtio::attach::VirtioAttach`]
//! the virtqueues and a virtio-blk model.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use shadowback_dataplane::control::AttachFlags;
use shadowback_dataplane::event_loop::{BackendError, MAX_POLL_WINDOW};
use shadowback_dataplane::qos::Qos;
use shadowback_dataplane::recovery::{open_shadow_log, RecoveryStats};
use shadowback_dataplane::rings::Recovery;
use shadowback_dataplane::serve::{AttachKind, Built, Core, DataPlane, LoopStats};
use shadowback_dataplane::uring::Engine;
use shadowback_dataplane::xen::attach_ring;
use shadowback_ring::blkif::Blkif;
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::sring::RingPages;
use shadowback_ring::{EventChannel, RingError, SharedRegion, MAX_REGION_PAGES, PAGE_SIZE};
use shadowback_xenbus::protocol::{kind, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::{Message, SeqPacket};

use crate::instance::BackendConfig;
use crate::model::blkif::BlkifModel;
use crate::request::DiskGeometry;
use crate::virtio::attach::VirtioAttach;
use crate::xen::XenRing;

/// The backend instance.
pub struct Backend {
    cfg: BackendConfig,
    core: Core,
}

impl Backend {
    /// Sets up the engine on `disk`; nothing runs before [`Backend::run`].
    pub fn new(cfg: BackendConfig, control: SeqPacket, disk: &File) -> Result<Self, BackendError> {
        let engine = Engine::new(disk.as_fd(), &cfg.engine).map_err(BackendError::Engine)?;
        Ok(Self::with_engine(cfg, control, engine))
    }

    /// The backend on an engine that has its disk already (a spare's,
    /// adopted: [`Engine::adopt_disk`]).
    pub fn with_engine(cfg: BackendConfig, control: SeqPacket, engine: Engine) -> Self {
        let mut core = Core::new(cfg.device.clone(), engine, control);
        core.poll_window = Duration::from_micros(u64::from(cfg.poll_us)).min(MAX_POLL_WINDOW);
        core.qos = Qos::new(cfg.qos, std::time::Instant::now());
        Backend { cfg, core }
    }

    /// Copies the counters into the device's metrics page while serving.
    pub fn set_metrics(&mut self, metrics: shadowback_shadow::MetricsWriter) {
        self.core.metrics = Some(metrics);
    }

    /// Counters so far.
    pub fn stats(&self) -> LoopStats {
        self.core.stats
    }

    /// Serves until the supervisor closes the control channel.
    pub fn run(&mut self) -> Result<(), BackendError> {
        DataPlane::new(&mut self.core, XenAttach { cfg: &self.cfg }).run()
    }
}

/// `attach`: a blkif ring in the guest's granted region.
pub struct XenAttach<'a> {
    cfg: &'a BackendConfig,
}

impl AttachKind for XenAttach<'_> {
    type Rings = XenRing;
    type Model = BlkifModel;
    const KIND: &'static str = kind::ATTACH;
    const WHAT: &'static str = "frontend";

    /// Maps the guest's region and ring and plans recovery from the ring's
    /// indices; on failure nothing is kept.
    fn build(
        &mut self,
        core: &mut Core,
        msg: &Message,
        mut fds: Vec<OwnedFd>,
        flags: AttachFlags,
    ) -> Result<Built<XenRing, BlkifModel>, (ErrorCode, String)> {
        let cfg = self.cfg;
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        let req = AttachRequest::from_message(msg).map_err(|e| inval(&e))?;
        // [region, kick, notify] and, with the shadow layer, the log.
        let log_fd = if fds.len() == 4 { fds.pop() } else { None };
        let fds = DeviceFds::from_received(msg, fds).map_err(|e| inval(&e))?;
        let order = req.connect.ring_page_order().unwrap_or(u8::MAX);
        if order > cfg.max_ring_page_order {
            return Err((
                ErrorCode::Einval,
                format!(
                    "ring-page-order {order} exceeds {}",
                    cfg.max_ring_page_order
                ),
            ));
        }
        let region = Arc::new(SharedRegion::from_fd(fds.region).map_err(|e| match e {
            RingError::BadRegionSize(n) if n > u64::from(MAX_REGION_PAGES) * PAGE_SIZE as u64 => {
                (ErrorCode::E2big, e.to_string())
            }
            e => inval(&e),
        })?);
        let grants = GrantMapper::new(region.clone(), req.connect.grant_frames, cfg.backend_id)
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
            Some(fd) if cfg.shadow => {
                let (log, generation) =
                    open_shadow_log(&cfg.crash_at, fd).map_err(|e| inval(&e))?;
                stats.generation = generation;
                Some(log)
            }
            _ => None,
        };
        let (ring, planned) = attach_ring::<Blkif>(log.as_ref(), flags.recover, pages)?;
        let recovery = match planned {
            Some((plan, _)) => Recovery::Plan(plan),
            None => Recovery::Nothing,
        };
        let size = ring.size();
        if log.as_ref().is_some_and(|l| l.entries() != size) {
            return Err((
                ErrorCode::Einval,
                format!("shadow log does not have {size} entries"),
            ));
        }
        tracing::info!(device = %cfg.device, ring_size = size, order, "blkif ring mapped");
        Ok(Built {
            name: req.frontend,
            rings: XenRing::new(ring, kick, notify),
            model: BlkifModel::new(
                cfg.device.clone(),
                DiskGeometry {
                    // A resize this process was told of (`resize`).
                    sectors: core.capacity.unwrap_or(cfg.disk.sectors),
                    ..cfg.disk
                },
                grants,
                region,
            ),
            logs: vec![log],
            recoveries: vec![recovery],
            stats,
            started,
        })
    }

    /// `attach-virtio`: one engine, two transports — the virtio loop
    /// takes over this process's core for good.
    fn on_other(
        &mut self,
        core: &mut Core,
        ring: Option<&mut XenRing>,
        msg: &Message,
        fds: Vec<OwnedFd>,
    ) -> Option<Result<(), BackendError>> {
        if msg.kind() != kind::ATTACH_VIRTIO {
            return None;
        }
        if ring.is_some() {
            let reply = Message::error(ErrorCode::Ebusy, "a Xen frontend is attached");
            return Some(core.send(&reply));
        }
        tracing::info!(device = %self.cfg.device, "serving virtqueues");
        let mut lp = DataPlane::new(core, VirtioAttach::new(self.cfg));
        let result = lp.handle(msg, fds).and_then(|()| lp.run());
        tracing::info!(device = %self.cfg.device, "virtio loop done");
        Some(result)
    }
}
