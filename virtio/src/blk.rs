//! virtio-blk limits defined once: the supervisor advertises them in the
//! `virtio_blk_config` space (`GET_CONFIG`), and blkback's parser refuses
//! requests beyond them. A driver that trusts the config space must never
//! be refused, so the two sides take them from here.

/// Data descriptors per request (`seg_max`).
pub const SEG_MAX: u32 = 128;
/// Segments per discard request (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Segments per write-zeroes request (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
