//! The in-flight region of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split
//! ring layout of QEMU's `docs/interop/vhost-user.rst`: per queue, a
//! 16-byte header (`features`, `version`, `desc_num`, `last_batch_head`,
//! `used_idx`) and one 16-byte `DescStateSplit` per descriptor, the queue's
//! share rounded up to 64 bytes as libvhost-user sizes it.
//!
//! The supervisor only creates, sizes and keeps the region; the data plane
//! reads and writes it. The layout arithmetic is the data plane's
//! (`shadowback_virtio`), so both sides agree by construction.

use std::fs::File;
use std::os::fd::OwnedFd;

use shadowback_virtio::init_inflight_region;
pub use shadowback_virtio::{inflight_mmap_size, inflight_queue_region_size as queue_region_size};
use vhost::vhost_user::message::VhostUserInflight;

/// Why an in-flight region was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    #[error("{num_queues} queues of {queue_size} descriptors: out of range")]
    Shape { num_queues: u16, queue_size: u16 },
    #[error("mmap_size {got:#x} is below the {need:#x} bytes the layout needs")]
    TooSmall { got: u64, need: u64 },
    #[error("the memfd holds {len:#x} bytes, not offset {offset:#x} + {size:#x}")]
    Truncated { len: u64, offset: u64, size: u64 },
    #[error("in-flight memfd: {0}")]
    Io(String),
}

/// The region the supervisor keeps for the device.
#[derive(Debug)]
pub struct InflightRegion {
    pub file: File,
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

fn check_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(), InflightError> {
    let ok = (1..=max_queues).contains(&num_queues)
        && queue_size.is_power_of_two()
        && queue_size <= max_size;
    if ok {
        Ok(())
    } else {
        Err(InflightError::Shape {
            num_queues,
            queue_size,
        })
    }
}

impl InflightRegion {
    /// `GET_INFLIGHT_FD`: a zeroed memfd for the frontend's
    /// `num_queues` x `queue_size`, each queue's `desc_num` set.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Self, InflightError> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        check_shape(num_queues, queue_size, max_queues, max_size)?;
        let io = |e: &dyn std::fmt::Display| InflightError::Io(e.to_string());
        let fd = memfd_create(c"shadowback-inflight", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| io(&e))?;
        let file = File::from(fd);
        let mmap_size = inflight_mmap_size(num_queues, queue_size);
        file.set_len(mmap_size).map_err(|e| io(&e))?;
        init_inflight_region(&file, 0, num_queues, queue_size).map_err(|e| io(&e))?;
        Ok(InflightRegion {
            file,
            mmap_size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        })
    }

    /// `SET_INFLIGHT_FD`: adopts the frontend's region (how a restarted
    /// supervisor gets the in-flight state back) after checking that the
    /// memfd really holds the layout it claims.
    pub fn adopt(
        msg: &VhostUserInflight,
        file: File,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Self, InflightError> {
        check_shape(msg.num_queues, msg.queue_size, max_queues, max_size)?;
        let need = inflight_mmap_size(msg.num_queues, msg.queue_size);
        if msg.mmap_size < need {
            return Err(InflightError::TooSmall {
                got: msg.mmap_size,
                need,
            });
        }
        let len = file
            .metadata()
            .map_err(|e| InflightError::Io(e.to_string()))?
            .len();
        let fits = msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .is_some_and(|end| end <= len);
        if !fits {
            return Err(InflightError::Truncated {
                len,
                offset: msg.mmap_offset,
                size: msg.mmap_size,
            });
        }
        Ok(InflightRegion {
            file,
            mmap_size: msg.mmap_size,
            mmap_offset: msg.mmap_offset,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        })
    }

    /// The `GET_INFLIGHT_FD` reply body.
    pub fn reply(&self) -> VhostUserInflight {
        VhostUserInflight::new(
            self.mmap_size,
            self.mmap_offset,
            self.num_queues,
            self.queue_size,
        )
    }

    /// A fresh descriptor of the memfd.
    pub fn dup_fd(&self) -> std::io::Result<OwnedFd> {
        self.file.try_clone().map(OwnedFd::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sizes_follow_libvhost_user() {
        // 16 * 256 + 2 = 4098, rounded up to 64.
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(1024), 16448);
        assert_eq!(inflight_mmap_size(4, 128), 4 * 2112);
    }

    #[test]
    fn created_regions_are_sized_and_initialised() {
        let r = InflightRegion::create(2, 128, 4, 1024).unwrap();
        assert_eq!(r.mmap_size, 2 * 2112);
        assert_eq!(r.file.metadata().unwrap().len(), r.mmap_size);
        let mut b = [0u8; 2];
        r.file.read_exact_at(&mut b, 2112 + 10).unwrap();
        assert_eq!(u16::from_le_bytes(b), 128);
        r.file.read_exact_at(&mut b, 8).unwrap();
        assert_eq!(u16::from_le_bytes(b), 1, "version");
        let reply = r.reply();
        assert_eq!((reply.num_queues, reply.queue_size), (2, 128));
        for (q, s) in [(0, 128), (5, 128), (1, 100), (1, 2048), (1, 0)] {
            assert!(InflightRegion::create(q, s, 4, 1024).is_err(), "{q}x{s}");
        }
    }

    #[test]
    fn adoption_checks_the_memfd() {
        let r = InflightRegion::create(1, 256, 1, 256).unwrap();
        let msg = r.reply();
        let ok = InflightRegion::adopt(&msg, r.file.try_clone().unwrap(), 1, 256).unwrap();
        assert_eq!(ok.mmap_size, 4160);
        let lying = VhostUserInflight::new(4160, 64, 1, 256);
        assert!(InflightRegion::adopt(&lying, r.file.try_clone().unwrap(), 1, 256).is_err());
        let small = VhostUserInflight::new(4096, 0, 1, 256);
        assert!(InflightRegion::adopt(&small, r.file.try_clone().unwrap(), 1, 256).is_err());
        let wrap = VhostUserInflight::new(4160, u64::MAX, 1, 256);
        assert!(InflightRegion::adopt(&wrap, r.file.try_clone().unwrap(), 1, 256).is_err());
    }
}
