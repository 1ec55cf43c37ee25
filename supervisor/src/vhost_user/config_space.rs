//! The virtio-blk model ([`VirtioModel`]) of the block device class: what
//! a vhost-user-blk frontend is offered — virtio and protocol features, and
//! the `virtio_blk_config` space (`GET_CONFIG`).

use std::mem::{offset_of, size_of};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::model::VirtioModel;

pub use shadowback_virtio::blk::{MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SEG, SEG_MAX};

/// Logical block size in bytes (`blk_size`).
pub const BLK_SIZE: u32 = 512;
/// Largest discard / write-zeroes request, in 512-byte sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discard alignment in sectors (4 KiB, the hole-punch granularity).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// The facts about a disk that its virtio face shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkGeometry {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    pub readonly: bool,
    pub discard: bool,
    pub num_queues: u16,
}

const fn bit(n: u32) -> u64 {
    1 << n
}

impl BlkGeometry {
    /// The whole `virtio_blk_config`, little-endian as virtio 1.0 wants.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut buf = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            buf[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.sectors.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &BLK_SIZE.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        for (offset, value) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_DISCARD_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                MAX_DISCARD_SEG,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                DISCARD_SECTOR_ALIGNMENT,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_DISCARD_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_WRITE_ZEROES_SEG,
            ),
        ] {
            put(offset, &value.to_le_bytes());
        }
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        buf
    }
}

impl VirtioModel for BlkGeometry {
    /// Virtio features offered in `GET_FEATURES`, including
    /// `VHOST_USER_F_PROTOCOL_FEATURES`. A read-only disk offers `RO` and
    /// neither discard nor write-zeroes.
    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.readonly {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
            if self.discard {
                f |= bit(VIRTIO_BLK_F_DISCARD);
            }
        }
        f
    }

    /// Protocol features offered in `GET_PROTOCOL_FEATURES`.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// `GET_CONFIG`: `size` bytes of the config space from `offset`; a
    /// range outside it is refused.
    fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        self.config_space().get(start..end).map(<[u8]>::to_vec)
    }
}

/// Bytes of `virtio_blk_config` (with the zoned fields: 96).
pub const CONFIG_SPACE_SIZE: usize = size_of::<virtio_blk_config>();

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> BlkGeometry {
        BlkGeometry {
            sectors: 0x1_0000_0001,
            readonly: false,
            discard: true,
            num_queues: 4,
        }
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn config_space_bytes_follow_the_virtio_layout() {
        let c = disk().config_space();
        assert_eq!(c.len(), 96);
        // Offsets from the virtio 1.2 spec, 5.2.4.
        assert_eq!(&c[0..8], &0x1_0000_0001u64.to_le_bytes());
        assert_eq!(le32(&c, 12), 128, "seg_max");
        assert_eq!(le32(&c, 20), 512, "blk_size");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4, "num_queues");
        assert_eq!(le32(&c, 36), 1 << 21, "max_discard_sectors");
        assert_eq!(le32(&c, 40), 32, "max_discard_seg");
        assert_eq!(le32(&c, 44), 8, "discard_sector_alignment");
        assert_eq!(le32(&c, 48), 1 << 21, "max_write_zeroes_sectors");
        assert_eq!(le32(&c, 52), 32, "max_write_zeroes_seg");
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
        assert!(c[57..].iter().all(|&b| b == 0));
    }

    #[test]
    fn get_config_is_bounds_checked() {
        let d = disk();
        assert_eq!(d.read_config(0, 8).unwrap(), 0x1_0000_0001u64.to_le_bytes());
        assert_eq!(d.read_config(34, 2).unwrap(), vec![4, 0]);
        assert_eq!(d.read_config(0, 96).unwrap().len(), 96);
        assert_eq!(d.read_config(96, 0).unwrap().len(), 0);
        assert!(d.read_config(90, 7).is_none());
        assert!(d.read_config(97, 0).is_none());
        assert!(d.read_config(u32::MAX, u32::MAX).is_none());
        assert!(d.read_config(1, u32::MAX).is_none());
    }

    #[test]
    fn features_follow_the_disk() {
        let rw = disk().features();
        for b in [32, 29, 28, 2, 6, 9, 12, 13, 14, 30] {
            assert_ne!(rw & (1 << b), 0, "bit {b}");
        }
        assert_eq!(rw & (1 << 5), 0, "not read-only");
        let no_discard = BlkGeometry {
            discard: false,
            ..disk()
        };
        assert_eq!(no_discard.features() & (1 << 13), 0);
        let ro = BlkGeometry {
            readonly: true,
            ..disk()
        }
        .features();
        assert_ne!(ro & (1 << 5), 0);
        assert_eq!(ro & ((1 << 13) | (1 << 14)), 0);
        let p = disk().protocol_features().bits();
        // MQ, REPLY_ACK, BACKEND_REQ (config changes), CONFIG,
        // INFLIGHT_SHMFD, RESET_DEVICE.
        assert_eq!(p, 0x1 | 0x8 | 0x20 | 0x200 | 0x1000 | 0x2000);
    }
}
