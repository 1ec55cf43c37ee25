//! The netif request model: what a TX packet on the ring means, when it is
//! answered with errors and when it disconnects the vif, and how a frame is
//! laid into posted RX buffers — pure functions over already-copied slots,
//! no grant, ring or tap access (docs/ARCHITECTURE.md §11, "netif wire
//! format and validation").
//!
//! The rules are those of Linux xen-netback (`drivers/net/xen-netback`:
//! `xenvif_tx_build_gops`, `xenvif_count_requests`, `xenvif_get_extras`,
//! `xenvif_set_skb_gso` for TX; `xenvif_rx_skb` for RX), since netfront
//! implementations are written and tested against it.

pub mod mcast;
pub mod rx;
pub mod tx;

pub use mcast::MulticastFilter;
pub use rx::{rx_plan, rx_slots_needed, NetifRxError, RxCopy, RxFeatures, RxFrame, RxPlan};
pub use tx::{
    parse_tx, parse_tx_reusing, MulticastOp, TxDrop, TxFatal, TxFragment, TxMulticast, TxPacket,
    TxRequest, TxSlotSource, TxSlots, TxSpares, TxVerdict, ETH_HLEN, FATAL_SKB_SLOTS,
    LEGACY_SLOTS_MAX,
};

use shadowback_ring::netif::{XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6};

/// Bytes of a granted page: no slot's data may cross it.
pub const XEN_PAGE_SIZE: u32 = 4096;

/// What a packet says about its checksum (`NETTXF_*` / `NETRXF_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// Nothing said: the receiver checks the checksum itself.
    Unknown,
    /// `csum_blank`: the checksum field is blank (partial checksum to be
    /// completed, hardware offload); implies `data_validated` on RX.
    Partial,
    /// `data_validated`: the data was checked, the checksum is right.
    Validated,
}

/// The segmentation a GSO packet asks for (`XEN_NETIF_GSO_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoType {
    TcpV4,
    TcpV6,
}

impl GsoType {
    /// The `XEN_NETIF_GSO_TYPE_*` value.
    pub fn wire(self) -> u8 {
        match self {
            GsoType::TcpV4 => XEN_NETIF_GSO_TYPE_TCPV4,
            GsoType::TcpV6 => XEN_NETIF_GSO_TYPE_TCPV6,
        }
    }

    /// The type a `XEN_NETIF_GSO_TYPE_*` value names, if any.
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            XEN_NETIF_GSO_TYPE_TCPV4 => Some(GsoType::TcpV4),
            XEN_NETIF_GSO_TYPE_TCPV6 => Some(GsoType::TcpV6),
            _ => None,
        }
    }
}

/// A GSO extra: the packet is a super-frame of `size`-byte segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoType,
    /// Largest payload of one segment (the MSS); never 0.
    pub size: u16,
}
