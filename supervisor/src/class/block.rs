//! The block device class: a disk image (a file or a block device) served
//! by `shadowback blkback`, as a blkif ring or a virtio-blk device.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shadowback_xenbus::protocol::{ErrorCode, QosLimits};
use shadowback_xenbus::{BackendInfo, DiskMode};
use vhost::vhost_user::VhostUserProtocolFeatures;

use super::{ClassInfo, DeviceClass, InstanceSetup};
use crate::config::DiskConfig;
use crate::device::Refusal;
use crate::spawn::{adopt_disk, disk_size, open_disk, Disk};
use crate::upgrade::{ClassState, Handover};
use crate::vhost_user::{BlkGeometry, VirtioModel};
use crate::SupervisorError;

/// A disk: its configuration and the image, opened and locked for as long
/// as the device exists (`spawn` module docs).
#[derive(Debug)]
pub struct BlockClass {
    cfg: DiskConfig,
    disk: Disk,
    /// The size its vhost-user face shows (`GET_CONFIG`), changed by a
    /// resize.
    capacity: Arc<AtomicU64>,
}

/// The virtio-blk model of a disk whose size may change at run time: its
/// geometry with the current capacity.
#[derive(Debug)]
struct ResizableBlk {
    geometry: BlkGeometry,
    capacity: Arc<AtomicU64>,
}

impl ResizableBlk {
    fn now(&self) -> BlkGeometry {
        BlkGeometry {
            // Relaxed: a plain value; a resize is announced after the store.
            sectors: self.capacity.load(Ordering::Relaxed),
            ..self.geometry
        }
    }
}

impl VirtioModel for ResizableBlk {
    fn features(&self) -> u64 {
        self.geometry.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.geometry.protocol_features()
    }

    fn num_queues(&self) -> u16 {
        self.geometry.num_queues()
    }

    fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        self.now().read_config(offset, size)
    }
}

impl BlockClass {
    /// The `shadowback` subcommand that runs a block backend.
    pub const SUBCOMMAND: &'static str = "blkback";

    /// Opens the image as `cfg` says and takes its lock, waiting for a
    /// previous supervisor's backends and their last writes.
    pub fn open(cfg: &DiskConfig) -> Result<Self, SupervisorError> {
        let disk = open_disk(cfg)?;
        Ok(BlockClass {
            cfg: cfg.clone(),
            capacity: Arc::new(AtomicU64::new(disk.sectors)),
            disk,
        })
    }

    /// The disk a previous binary opened and locked (a live upgrade):
    /// `image` is its description of the image, `sectors` the capacity
    /// its guests were shown (a resize included).
    pub fn adopt(
        cfg: &DiskConfig,
        image: std::fs::File,
        sectors: u64,
    ) -> Result<Self, SupervisorError> {
        let mut disk = adopt_disk(image, &cfg.path)?;
        disk.sectors = sectors;
        Ok(BlockClass {
            cfg: cfg.clone(),
            capacity: Arc::new(AtomicU64::new(disk.sectors)),
            disk,
        })
    }
}

impl DeviceClass for BlockClass {
    fn backend_info(&self) -> ClassInfo {
        let cfg = &self.cfg;
        ClassInfo::Disk(BackendInfo {
            backend_id: cfg.backend_id,
            sectors: self.disk.sectors,
            sector_size: 512,
            physical_sector_size: 4096,
            mode: if cfg.readonly {
                DiskMode::ReadOnly
            } else {
                DiskMode::ReadWrite
            },
            feature_flush_cache: true,
            feature_discard: cfg.discard && !cfg.readonly,
            discard_granularity: 4096,
            discard_alignment: 0,
            max_indirect_segments: 256,
            max_ring_page_order: cfg.max_ring_page_order,
            info: u32::from(cfg.readonly) * 4,
        })
    }

    fn virtio_model(&self) -> Option<Arc<dyn VirtioModel>> {
        Some(Arc::new(ResizableBlk {
            geometry: BlkGeometry {
                sectors: self.disk.sectors,
                readonly: self.cfg.readonly,
                discard: self.cfg.discard,
                num_queues: self.cfg.num_queues,
            },
            capacity: self.capacity.clone(),
        }))
    }

    fn handover(&self, fds: &mut Handover) -> ClassState {
        ClassState::Disk {
            image: fds.fd(&self.disk.file),
            sectors: self.disk.sectors,
        }
    }

    /// Both block models hold back requests by their sector ranges;
    /// used when the disk asks for it (`fast_takeover`).
    fn holds_back(&self) -> bool {
        self.cfg.fast_takeover
    }

    /// The instance's own description of the image and, unless the disk is
    /// read-only, its I/O fence (`spawn` module docs (3),
    /// docs/ARCHITECTURE.md §7.3).
    fn prepare_instance(&self) -> Result<InstanceSetup, SupervisorError> {
        let cfg = &self.cfg;
        // A read-only instance writes nothing a fence would wait for.
        let fence_lock = !cfg.readonly && self.disk.is_block_device();
        let file = self.disk.open_for_instance(cfg.readonly, fence_lock)?;
        let io_fence = if cfg.readonly {
            None
        } else {
            Some(self.disk.io_fence(file.slot)?)
        };
        let mut args: Vec<std::ffi::OsString> = vec![
            "--backend-id".into(),
            cfg.backend_id.to_string().into(),
            "--sectors".into(),
            self.disk.sectors.to_string().into(),
            "--max-ring-page-order".into(),
            cfg.max_ring_page_order.to_string().into(),
            "--poll-us".into(),
            cfg.poll_us.to_string().into(),
        ];
        let qos = cfg.qos();
        for (flag, value) in [
            ("--iops-limit", qos.iops),
            ("--iops-burst", qos.iops_burst),
            ("--bytes-limit", qos.bytes),
            ("--bytes-burst", qos.bytes_burst),
        ] {
            if value > 0 {
                args.extend([flag.into(), value.to_string().into()]);
            }
        }
        if cfg.readonly {
            args.push("--readonly".into());
        }
        if !cfg.discard {
            args.push("--no-discard".into());
        }
        Ok(InstanceSetup {
            args,
            device_file: Some(file.file),
            io_fence,
        })
    }

    /// A block device: its size as the kernel now says (`bytes`, if
    /// given, must match). An image file: `bytes`, a non-zero multiple of
    /// 512, on a writable disk.
    fn plan_resize(&self, bytes: Option<u64>) -> Result<u64, Refusal> {
        let inval = |why: String| (ErrorCode::Einval, why);
        if self.disk.is_block_device() {
            let now = disk_size(&self.disk.file).map_err(|e| inval(e.to_string()))?;
            if bytes.is_some_and(|b| b != now) {
                return Err(inval(format!(
                    "a block device is resized by the host; it has {now} bytes"
                )));
            }
            return Ok(now / 512);
        }
        let bytes = bytes.ok_or_else(|| inval("an image file needs the new size".into()))?;
        if bytes == 0 || !bytes.is_multiple_of(512) {
            return Err(inval(format!(
                "size {bytes} is not a non-zero multiple of 512 bytes"
            )));
        }
        if self.cfg.readonly {
            return Err(inval("the disk is read-only".into()));
        }
        Ok(bytes / 512)
    }

    /// Truncates an image file to `sectors` (a growth first cuts the file
    /// back to the size the guest knows, so whatever a write past the old
    /// end left there reads back as zeros).
    fn apply_resize(&mut self, sectors: u64) -> Result<(), Refusal> {
        let io = |e: std::io::Error| (ErrorCode::Einval, format!("resizing the image: {e}"));
        if !self.disk.is_block_device() {
            let file: &File = &self.disk.file;
            file.set_len(self.disk.sectors * 512).map_err(io)?;
            file.set_len(sectors * 512).map_err(io)?;
        }
        self.disk.sectors = sectors;
        // Relaxed: see `ResizableBlk::now`.
        self.capacity.store(sectors, Ordering::Relaxed);
        Ok(())
    }

    fn set_qos(&mut self, qos: QosLimits) -> Result<(), Refusal> {
        let cfg = &mut self.cfg;
        (cfg.iops_limit, cfg.iops_burst) = (qos.iops, qos.iops_burst);
        (cfg.bandwidth_limit_mib, cfg.bandwidth_burst_mib) =
            (qos.bytes >> 20, qos.bytes_burst >> 20);
        Ok(())
    }
}
