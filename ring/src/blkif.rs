//! Wire structs of `xen/io/blkif.h` (x86_64 layout).
//!
//! A ring slot holds a [`BlkifRequest`] (112 bytes); discard and indirect
//! requests are other views of the same 112 bytes, selected by `operation`.

use vm_memory::ByteValued;

use crate::grant::GrantRef;
use crate::sring::RingProtocol;

pub const BLKIF_OP_READ: u8 = 0;
pub const BLKIF_OP_WRITE: u8 = 1;
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
pub const BLKIF_OP_RESERVED_1: u8 = 4;
pub const BLKIF_OP_DISCARD: u8 = 5;
pub const BLKIF_OP_INDIRECT: u8 = 6;

pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
pub const BLKIF_RSP_ERROR: i16 = -1;
pub const BLKIF_RSP_OKAY: i16 = 0;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segments described by one indirect page (4096 / 8).
pub const BLKIF_SEGS_PER_INDIRECT_FRAME: usize = 512;
/// `BLKIF_DISCARD_SECURE`.
pub const BLKIF_DISCARD_SECURE: u8 = 1;
/// blkif counts in 512-byte sectors whatever the `sector-size` key says.
pub const BLKIF_SECTOR_SIZE: u64 = 512;
/// Sectors in one 4 KiB segment page (`last_sect` is at most 7).
pub const SECTORS_PER_PAGE: u8 = 8;

/// `struct blkif_request_segment`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestSegment {
    pub gref: GrantRef,
    pub first_sect: u8,
    pub last_sect: u8,
    pub _pad: [u8; 2],
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers with explicit padding; any bit pattern is valid.
unsafe impl ByteValued for BlkifRequestSegment {}

/// `struct blkif_request` (READ, WRITE, FLUSH_DISKCACHE, WRITE_BARRIER).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequest {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: u16,
    pub _pad: u32,
    pub id: u64,
    pub sector_number: u64,
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers with explicit padding; any bit pattern is valid.
unsafe impl ByteValued for BlkifRequest {}

/// `struct blkif_request_discard`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestDiscard {
    pub operation: u8,
    pub flag: u8,
    pub handle: u16,
    pub _pad: u32,
    pub id: u64,
    pub sector_number: u64,
    pub nr_sectors: u64,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers with explicit padding; any bit pattern is valid.
unsafe impl ByteValued for BlkifRequestDiscard {}

/// `struct blkif_request_indirect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifRequestIndirect {
    pub operation: u8,
    pub indirect_op: u8,
    pub nr_segments: u16,
    pub _pad: u32,
    pub id: u64,
    pub sector_number: u64,
    pub handle: u16,
    pub _pad2: u16,
    pub indirect_grefs: [GrantRef; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    pub _pad3: u32,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers with explicit padding; any bit pattern is valid.
unsafe impl ByteValued for BlkifRequestIndirect {}

/// `struct blkif_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkifResponse {
    pub id: u64,
    pub operation: u8,
    pub _pad: u8,
    pub status: i16,
    pub _pad2: u32,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers with explicit padding; any bit pattern is valid.
unsafe impl ByteValued for BlkifResponse {}

impl BlkifRequest {
    /// The same slot seen as a discard request.
    pub fn as_discard(&self) -> BlkifRequestDiscard {
        view(self)
    }

    /// The same slot seen as an indirect request.
    pub fn as_indirect(&self) -> BlkifRequestIndirect {
        view(self)
    }

    /// A slot holding `d` (the rest zeroed).
    pub fn from_discard(d: &BlkifRequestDiscard) -> Self {
        embed(d)
    }

    /// A slot holding `ind` (the rest zeroed).
    pub fn from_indirect(ind: &BlkifRequestIndirect) -> Self {
        embed(ind)
    }
}

fn view<T: ByteValued + Default>(req: &BlkifRequest) -> T {
    let mut out = T::default();
    let n = out.as_slice().len();
    out.as_mut_slice().copy_from_slice(&req.as_slice()[..n]);
    out
}

fn embed<T: ByteValued>(val: &T) -> BlkifRequest {
    let mut out = BlkifRequest::default();
    let src = val.as_slice();
    out.as_mut_slice()[..src.len()].copy_from_slice(src);
    out
}

/// The blkif ring (`DEFINE_RING_TYPES(blkif, …)`).
#[derive(Debug)]
pub struct Blkif;

impl RingProtocol for Blkif {
    type Request = BlkifRequest;
    type Response = BlkifResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn sizes_and_offsets() {
        assert_eq!(size_of::<BlkifRequestSegment>(), 8);
        assert_eq!(size_of::<BlkifRequest>(), 112);
        assert_eq!(offset_of!(BlkifRequest, id), 8);
        assert_eq!(offset_of!(BlkifRequest, sector_number), 16);
        assert_eq!(offset_of!(BlkifRequest, seg), 24);
        assert_eq!(size_of::<BlkifRequestDiscard>(), 32);
        assert_eq!(offset_of!(BlkifRequestDiscard, nr_sectors), 24);
        assert_eq!(size_of::<BlkifRequestIndirect>(), 64);
        assert_eq!(offset_of!(BlkifRequestIndirect, handle), 24);
        assert_eq!(offset_of!(BlkifRequestIndirect, indirect_grefs), 28);
        assert_eq!(size_of::<BlkifResponse>(), 16);
        assert_eq!(offset_of!(BlkifResponse, status), 10);
        assert_eq!(Blkif::ENTRY_SIZE, 112);
    }

    #[test]
    fn views_share_the_common_prefix() {
        let d = BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            id: 42,
            sector_number: 8,
            nr_sectors: 16,
            ..Default::default()
        };
        let slot = BlkifRequest::from_discard(&d);
        assert_eq!(slot.operation, BLKIF_OP_DISCARD);
        assert_eq!(slot.id, 42);
        assert_eq!(slot.as_discard(), d);
    }
}
