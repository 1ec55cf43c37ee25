//! Wire structs of `xen/io/netif.h` (every layout and value checked
//! against the installed header by `tests/xen_abi.rs`).
//!
//! A TX ring entry is 12 bytes (the size of [`NetifTxRequest`], the larger
//! half of the union); an RX ring entry is 8. An extra-info slot
//! ([`NetifExtraInfo`], 8 bytes) overlays a TX request on the TX ring and
//! an RX response on the RX ring; [`NetifTxRequest::as_extra`] and
//! [`NetifRxResponse::from_extra`] are those overlays.

use vm_memory::ByteValued;

use crate::grant::GrantRef;
use crate::sring::{ring_size, RingProtocol};

/// Protocol checksum field is blank in the packet (hardware offload).
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
/// Packet data has been validated against the protocol checksum.
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
/// Packet continues in the next request slot.
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
/// Packet is followed by an extra-info slot.
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;

pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;
/// GSO prefix in the packet (a feature current Linux no longer offers).
pub const NETRXF_GSO_PREFIX: u16 = 1 << 4;

/// Never used: an extra-info slot of this type is invalid.
pub const XEN_NETIF_EXTRA_TYPE_NONE: u8 = 0;
/// `u.gso`.
pub const XEN_NETIF_EXTRA_TYPE_GSO: u8 = 1;
/// `u.mcast`: add a multicast address to the vif's filter.
pub const XEN_NETIF_EXTRA_TYPE_MCAST_ADD: u8 = 2;
/// `u.mcast`: remove one.
pub const XEN_NETIF_EXTRA_TYPE_MCAST_DEL: u8 = 3;
/// `u.hash`.
pub const XEN_NETIF_EXTRA_TYPE_HASH: u8 = 4;
/// One past the last valid extra type.
pub const XEN_NETIF_EXTRA_TYPE_MAX: u8 = 5;
/// Another extra-info slot follows this one.
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

pub const XEN_NETIF_GSO_TYPE_NONE: u8 = 0;
pub const XEN_NETIF_GSO_TYPE_TCPV4: u8 = 1;
pub const XEN_NETIF_GSO_TYPE_TCPV6: u8 = 2;

/// Slots of one TX packet every backend must accept (the historical
/// `MAX_SKB_FRAGS` + 1 of Linux).
pub const XEN_NETIF_NR_SLOTS_MIN: usize = 18;
/// Largest TX packet: `size` of the first slot is 16 bits.
pub const XEN_NETIF_MAX_TX_SIZE: u32 = 0xFFFF;

pub const NETIF_RSP_DROPPED: i16 = -2;
pub const NETIF_RSP_ERROR: i16 = -1;
pub const NETIF_RSP_OKAY: i16 = 0;
/// Response of an extra-info slot: nothing to report.
pub const NETIF_RSP_NULL: i16 = 1;

// Linux's copy of the header (`include/xen/interface/io/netif.h`) spells
// the statuses with a XEN_ prefix; same values.
pub const XEN_NETIF_RSP_DROPPED: i16 = NETIF_RSP_DROPPED;
pub const XEN_NETIF_RSP_ERROR: i16 = NETIF_RSP_ERROR;
pub const XEN_NETIF_RSP_OKAY: i16 = NETIF_RSP_OKAY;
pub const XEN_NETIF_RSP_NULL: i16 = NETIF_RSP_NULL;

/// `struct netif_tx_request`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifTxRequest {
    pub gref: GrantRef,
    pub offset: u16,
    pub flags: u16,
    pub id: u16,
    pub size: u16,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifTxRequest {}

/// `struct netif_tx_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifTxResponse {
    pub id: u16,
    pub status: i16,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifTxResponse {}

/// `struct netif_rx_request`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifRxRequest {
    pub id: u16,
    pub pad: u16,
    pub gref: GrantRef,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifRxRequest {}

/// `struct netif_rx_response`. `status` is the byte count of the slot when
/// positive, a `NETIF_RSP_*` when negative.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifRxResponse {
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    pub status: i16,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifRxResponse {}

/// `struct netif_extra_info`: type, flags and a 6-byte union whose views
/// are [`NetifExtraGso`], the multicast address and [`NetifExtraHash`].
/// The union holds a `uint16_t`, so the struct is 2-aligned like `u`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifExtraInfo {
    pub type_: u8,
    pub flags: u8,
    pub u: [u16; 3],
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifExtraInfo {}

/// `u.gso` of a `XEN_NETIF_EXTRA_TYPE_GSO` slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifExtraGso {
    /// Largest payload of one segment (the TCP MSS).
    pub size: u16,
    /// `XEN_NETIF_GSO_TYPE_*`.
    pub type_: u8,
    pub pad: u8,
    /// `XEN_NETIF_GSO_FEAT_*` (none defined).
    pub features: u16,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifExtraGso {}

/// `u.hash` of a `XEN_NETIF_EXTRA_TYPE_HASH` slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifExtraHash {
    /// `_XEN_NETIF_CTRL_HASH_TYPE_*`.
    pub type_: u8,
    /// `XEN_NETIF_CTRL_HASH_ALGORITHM_*`.
    pub algorithm: u8,
    /// The hash, least significant byte first.
    pub value: [u8; 4],
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for NetifExtraHash {}

/// Byte offset of the union `u` in `struct netif_extra_info`.
pub const NETIF_EXTRA_UNION_OFFSET: usize = 2;
const UNION_SIZE: usize = 6;

impl NetifExtraInfo {
    /// A slot of `type_` whose union holds `u` (the rest zeroed).
    fn with_union<T: ByteValued>(type_: u8, flags: u8, u: &T) -> Self {
        let mut out = NetifExtraInfo {
            type_,
            flags,
            ..Default::default()
        };
        let src = u.as_slice();
        let n = src.len().min(UNION_SIZE);
        out.as_mut_slice()[NETIF_EXTRA_UNION_OFFSET..NETIF_EXTRA_UNION_OFFSET + n]
            .copy_from_slice(&src[..n]);
        out
    }

    fn union_view<T: ByteValued + Default>(&self) -> T {
        let mut out = T::default();
        let n = out.as_slice().len().min(UNION_SIZE);
        out.as_mut_slice()[..n].copy_from_slice(
            &self.as_slice()[NETIF_EXTRA_UNION_OFFSET..NETIF_EXTRA_UNION_OFFSET + n],
        );
        out
    }

    /// A `XEN_NETIF_EXTRA_TYPE_GSO` slot.
    pub fn from_gso(flags: u8, gso: &NetifExtraGso) -> Self {
        Self::with_union(XEN_NETIF_EXTRA_TYPE_GSO, flags, gso)
    }

    /// A `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`/`_DEL` slot.
    pub fn from_mcast(type_: u8, flags: u8, addr: [u8; 6]) -> Self {
        Self::with_union(type_, flags, &addr)
    }

    /// A `XEN_NETIF_EXTRA_TYPE_HASH` slot.
    pub fn from_hash(flags: u8, hash: &NetifExtraHash) -> Self {
        Self::with_union(XEN_NETIF_EXTRA_TYPE_HASH, flags, hash)
    }

    /// The union seen as `u.gso` (whatever `type_` says).
    pub fn gso(&self) -> NetifExtraGso {
        self.union_view()
    }

    /// The union seen as `u.mcast.addr`.
    pub fn mcast_addr(&self) -> [u8; 6] {
        self.union_view()
    }

    /// The union seen as `u.hash`.
    pub fn hash(&self) -> NetifExtraHash {
        self.union_view()
    }
}

impl NetifTxRequest {
    /// The slot seen as an extra-info slot: its first 8 bytes (the last
    /// 4 are the "padding for tx" of the header).
    pub fn as_extra(&self) -> NetifExtraInfo {
        let mut out = NetifExtraInfo::default();
        let n = out.as_slice().len();
        out.as_mut_slice().copy_from_slice(&self.as_slice()[..n]);
        out
    }

    /// A slot holding `extra` (the last 4 bytes zeroed).
    pub fn from_extra(extra: &NetifExtraInfo) -> Self {
        let mut out = NetifTxRequest::default();
        let src = extra.as_slice();
        out.as_mut_slice()[..src.len()].copy_from_slice(src);
        out
    }
}

impl NetifRxResponse {
    /// An RX response slot holding `extra`: how a backend answers an RX
    /// request with an extra-info slot (both are 8 bytes).
    pub fn from_extra(extra: &NetifExtraInfo) -> Self {
        let mut out = NetifRxResponse::default();
        out.as_mut_slice().copy_from_slice(extra.as_slice());
        out
    }

    /// The slot seen as an extra-info slot.
    pub fn as_extra(&self) -> NetifExtraInfo {
        let mut out = NetifExtraInfo::default();
        out.as_mut_slice().copy_from_slice(self.as_slice());
        out
    }
}

/// The netif TX ring (`DEFINE_RING_TYPES(netif_tx, …)`).
#[derive(Debug)]
pub struct NetifTx;
impl RingProtocol for NetifTx {
    type Request = NetifTxRequest;
    type Response = NetifTxResponse;
}

/// The netif RX ring (`DEFINE_RING_TYPES(netif_rx, …)`).
#[derive(Debug)]
pub struct NetifRx;
impl RingProtocol for NetifRx {
    type Request = NetifRxRequest;
    type Response = NetifRxResponse;
}

/// `NET_TX_RING_SIZE`: `__CONST_RING_SIZE(netif_tx, 4096)`.
pub const NET_TX_RING_SIZE: u32 = ring_size(1, NetifTx::ENTRY_SIZE);
/// `NET_RX_RING_SIZE`: `__CONST_RING_SIZE(netif_rx, 4096)`.
pub const NET_RX_RING_SIZE: u32 = ring_size(1, NetifRx::ENTRY_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    #[test]
    fn sizes_match_netif_h() {
        assert_eq!(size_of::<NetifTxRequest>(), 12);
        assert_eq!(size_of::<NetifTxResponse>(), 4);
        assert_eq!(size_of::<NetifRxRequest>(), 8);
        assert_eq!(size_of::<NetifRxResponse>(), 8);
        assert_eq!(size_of::<NetifExtraInfo>(), 8);
        assert_eq!(align_of::<NetifExtraInfo>(), 2);
        assert_eq!(size_of::<NetifExtraGso>(), UNION_SIZE);
        assert_eq!(size_of::<NetifExtraHash>(), UNION_SIZE);
        assert_eq!(NetifTx::ENTRY_SIZE, 12);
        assert_eq!(NetifRx::ENTRY_SIZE, 8);
        assert_eq!(NET_TX_RING_SIZE, 256);
        assert_eq!(NET_RX_RING_SIZE, 256);
    }

    #[test]
    fn extra_views_share_the_union() {
        let gso = NetifExtraGso {
            size: 1448,
            type_: XEN_NETIF_GSO_TYPE_TCPV6,
            pad: 0,
            features: 0,
        };
        let extra = NetifExtraInfo::from_gso(XEN_NETIF_EXTRA_FLAG_MORE, &gso);
        assert_eq!(extra.type_, XEN_NETIF_EXTRA_TYPE_GSO);
        assert_eq!(extra.flags, XEN_NETIF_EXTRA_FLAG_MORE);
        assert_eq!(extra.gso(), gso);
        assert_eq!(extra.as_slice()[2..4], 1448u16.to_ne_bytes());
        assert_eq!(extra.as_slice()[4], XEN_NETIF_GSO_TYPE_TCPV6);

        let addr = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        let mcast = NetifExtraInfo::from_mcast(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, addr);
        assert_eq!(mcast.mcast_addr(), addr);
        assert_eq!(mcast.as_slice()[2..8], addr);

        let hash = NetifExtraHash {
            type_: 1,
            algorithm: 1,
            value: [1, 2, 3, 4],
        };
        assert_eq!(NetifExtraInfo::from_hash(0, &hash).hash(), hash);
    }

    #[test]
    fn extra_overlays_a_tx_request_and_an_rx_response() {
        let extra = NetifExtraInfo::from_mcast(XEN_NETIF_EXTRA_TYPE_MCAST_DEL, 0, [9; 6]);
        let slot = NetifTxRequest::from_extra(&extra);
        assert_eq!(slot.as_extra(), extra);
        assert_eq!(slot.as_slice()[8..12], [0; 4]);
        let rsp = NetifRxResponse::from_extra(&extra);
        assert_eq!(rsp.as_extra(), extra);
        assert_eq!(rsp.as_slice(), extra.as_slice());
    }
}
