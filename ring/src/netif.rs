//! Wire structs of `xen/io/netif.h`.

use vm_memory::ByteValued;

use crate::grant::GrantRef;
use crate::sring::RingProtocol;

pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;

pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;
pub const NETRXF_GSO_PREFIX: u16 = 1 << 4;

pub const XEN_NETIF_EXTRA_TYPE_NONE: u8 = 0;
pub const XEN_NETIF_EXTRA_TYPE_GSO: u8 = 1;
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

pub const NETIF_RSP_DROPPED: i16 = -2;
pub const NETIF_RSP_ERROR: i16 = -1;
pub const NETIF_RSP_OKAY: i16 = 0;
pub const NETIF_RSP_NULL: i16 = 1;

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
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for NetifTxRequest {}

/// `struct netif_tx_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifTxResponse {
    pub id: u16,
    pub status: i16,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding.
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
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for NetifRxRequest {}

/// `struct netif_rx_response`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifRxResponse {
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    pub status: i16,
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for NetifRxResponse {}

/// `struct netif_extra_info`: type, flags and a 6-byte union (GSO:
/// size u16, type u8, pad u8, features u16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetifExtraInfo {
    pub type_: u8,
    pub flags: u8,
    pub u: [u16; 3],
}
#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for NetifExtraInfo {}

/// The netif TX ring.
#[derive(Debug)]
pub struct NetifTx;
impl RingProtocol for NetifTx {
    type Request = NetifTxRequest;
    type Response = NetifTxResponse;
}

/// The netif RX ring.
#[derive(Debug)]
pub struct NetifRx;
impl RingProtocol for NetifRx {
    type Request = NetifRxRequest;
    type Response = NetifRxResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sring::ring_size;
    use std::mem::size_of;

    #[test]
    fn sizes_match_netif_h() {
        assert_eq!(size_of::<NetifTxRequest>(), 12);
        assert_eq!(size_of::<NetifTxResponse>(), 4);
        assert_eq!(size_of::<NetifRxRequest>(), 8);
        assert_eq!(size_of::<NetifRxResponse>(), 8);
        assert_eq!(size_of::<NetifExtraInfo>(), 8);
        // NET_TX_RING_SIZE / NET_RX_RING_SIZE for one page.
        assert_eq!(ring_size(1, NetifTx::ENTRY_SIZE), 256);
        assert_eq!(ring_size(1, NetifRx::ENTRY_SIZE), 256);
    }
}
