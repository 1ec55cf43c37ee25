//! The block device class: a disk image (a file or a block device) served
//! by `shadowback blkback`, as a blkif ring or a virtio-blk device.

use std::sync::Arc;

use shadowback_xenbus::{BackendInfo, DiskMode};

use super::{ClassInfo, DeviceClass, InstanceSetup};
use crate::config::DiskConfig;
use crate::spawn::{open_disk, Disk, BACKEND_DISK_FD};
use crate::vhost_user::{BlkGeometry, VirtioModel};
use crate::SupervisorError;

/// A disk: its configuration and the image, opened and locked for as long
/// as the device exists (`spawn` module docs).
#[derive(Debug)]
pub struct BlockClass {
    cfg: DiskConfig,
    disk: Disk,
}

impl BlockClass {
    /// The `shadowback` subcommand that runs a block backend.
    pub const SUBCOMMAND: &'static str = "blkback";

    /// Opens the image as `cfg` says and takes its lock, waiting for a
    /// previous supervisor's backends and their last writes.
    pub fn open(cfg: &DiskConfig) -> Result<Self, SupervisorError> {
        Ok(BlockClass {
            cfg: cfg.clone(),
            disk: open_disk(cfg)?,
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
        Some(Arc::new(BlkGeometry {
            sectors: self.disk.sectors,
            readonly: self.cfg.readonly,
            discard: self.cfg.discard,
            num_queues: self.cfg.num_queues,
        }))
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
            "--disk-fd".into(),
            BACKEND_DISK_FD.to_string().into(),
            "--backend-id".into(),
            cfg.backend_id.to_string().into(),
            "--sectors".into(),
            self.disk.sectors.to_string().into(),
            "--max-ring-page-order".into(),
            cfg.max_ring_page_order.to_string().into(),
            "--poll-us".into(),
            cfg.poll_us.to_string().into(),
        ];
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
}
