//! The virtio-net header that precedes every frame on a wire
//! (docs/ARCHITECTURE.md §11.5).
//!
//! Both wires carry it so a backend has one path for both: the TAP reads
//! and writes it itself (`IFF_VNET_HDR`), the cable carries it in each
//! message. Its layout is `struct virtio_net_hdr` (10 bytes) or
//! `struct virtio_net_hdr_mrg_rxbuf` (12 bytes, with `num_buffers`),
//! little-endian as in virtio 1.x; the TAP is switched to little-endian
//! headers when it is opened, whatever the host's byte order.

use thiserror::Error;
use virtio_bindings::virtio_net::{
    virtio_net_hdr, virtio_net_hdr_mrg_rxbuf, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
};

/// Bytes of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr>();
/// Bytes of `struct virtio_net_hdr_mrg_rxbuf`.
pub const VNET_HDR_MRG_LEN: usize = std::mem::size_of::<virtio_net_hdr_mrg_rxbuf>();

/// Which of the two header layouts a wire end uses: the size the TAP is
/// told with `TUNSETVNETHDRSZ`, and the bytes before every frame a backend
/// hands to or gets from [`super::Wire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VnetHeaderLen {
    /// `struct virtio_net_hdr`: Xen netif, or virtio-net without
    /// `VIRTIO_NET_F_MRG_RXBUF` / `VIRTIO_F_VERSION_1`.
    Basic,
    /// `struct virtio_net_hdr_mrg_rxbuf`: virtio-net with
    /// `VIRTIO_NET_F_MRG_RXBUF` or `VIRTIO_F_VERSION_1`.
    MergeableRx,
}

impl VnetHeaderLen {
    pub const fn bytes(self) -> usize {
        match self {
            VnetHeaderLen::Basic => VNET_HDR_LEN,
            VnetHeaderLen::MergeableRx => VNET_HDR_MRG_LEN,
        }
    }

    /// The layout of `bytes` bytes, if it is one of the two.
    pub const fn from_bytes(bytes: usize) -> Option<Self> {
        match bytes {
            VNET_HDR_LEN => Some(VnetHeaderLen::Basic),
            VNET_HDR_MRG_LEN => Some(VnetHeaderLen::MergeableRx),
            _ => None,
        }
    }
}

/// Why a header was refused. Every field of a header may come from a
/// guest (or, over a cable, from another guest's backend): each check
/// below is one a hostile value would otherwise get past.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VnetHeaderError {
    #[error("{got} bytes cannot hold a {need}-byte virtio-net header")]
    Short { got: usize, need: usize },
    #[error("unknown virtio-net header flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("unknown virtio-net gso_type {0:#04x}")]
    UnknownGsoType(u8),
    #[error("ECN bit on a gso_type that is not TCP")]
    EcnWithoutTcp,
    #[error(
        "segmentation (gso_type {gso_type:#04x}) needs VIRTIO_NET_HDR_F_NEEDS_CSUM and a gso_size"
    )]
    GsoIncomplete { gso_type: u8 },
    #[error("gso_size {gso_size} exceeds the {frame_len}-byte frame")]
    GsoSizeTooLarge { gso_size: u16, frame_len: usize },
    #[error("checksum field at {start}+{offset} lies beyond the {frame_len}-byte frame")]
    ChecksumOutOfFrame {
        start: u16,
        offset: u16,
        frame_len: usize,
    },
}

/// A decoded virtio-net header. `num_buffers` is 0 for the basic layout;
/// a wire neither reads nor writes it (it is the RX ring's business).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

// The constants are u32 in virtio-bindings; every one of them fits a u8.
const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

impl VnetHeader {
    /// A header that asks for nothing: no checksum to complete, no
    /// segmentation.
    pub const fn plain() -> Self {
        VnetHeader {
            flags: 0,
            gso_type: VIRTIO_NET_HDR_GSO_NONE as u8,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 0,
            csum_offset: 0,
            num_buffers: 0,
        }
    }

    /// A partial checksum for the device to complete: the field at
    /// `csum_start + csum_offset` holds the pseudo-header's sum.
    pub const fn partial(csum_start: u16, csum_offset: u16) -> Self {
        VnetHeader {
            flags: NEEDS_CSUM,
            csum_start,
            csum_offset,
            ..VnetHeader::plain()
        }
    }

    /// A TCP super-frame for the device to cut into `gso_size`-byte
    /// segments (`VIRTIO_NET_HDR_GSO_TCPV4`/`V6`), its checksum partial;
    /// `hdr_len` is where the payload starts.
    pub const fn tcp_segmentation(
        ipv6: bool,
        gso_size: u16,
        hdr_len: u16,
        csum_start: u16,
        csum_offset: u16,
    ) -> Self {
        VnetHeader {
            gso_type: if ipv6 {
                VIRTIO_NET_HDR_GSO_TCPV6 as u8
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4 as u8
            },
            gso_size,
            hdr_len,
            ..VnetHeader::partial(csum_start, csum_offset)
        }
    }

    /// The TCP segmentation a header asks for: `Some((ipv6, gso_size))`
    /// for `GSO_TCPV4`/`TCPV6` without ECN, `None` for no segmentation;
    /// `Err(())` for any other kind, which a netif guest cannot take.
    #[allow(clippy::result_unit_err)]
    pub fn tcp_gso(&self) -> Result<Option<(bool, u16)>, ()> {
        match u32::from(self.gso_type) {
            VIRTIO_NET_HDR_GSO_NONE => Ok(None),
            VIRTIO_NET_HDR_GSO_TCPV4 => Ok(Some((false, self.gso_size))),
            VIRTIO_NET_HDR_GSO_TCPV6 => Ok(Some((true, self.gso_size))),
            _ => Err(()),
        }
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & NEEDS_CSUM != 0
    }

    /// Reads the first `len.bytes()` bytes of `bytes`. Only the length is
    /// checked here; [`VnetHeader::validate`] checks the fields against
    /// the frame that follows.
    pub fn decode(bytes: &[u8], len: VnetHeaderLen) -> Result<Self, VnetHeaderError> {
        let need = len.bytes();
        let b = bytes.get(..need).ok_or(VnetHeaderError::Short {
            got: bytes.len(),
            need,
        })?;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Ok(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: match len {
                VnetHeaderLen::Basic => 0,
                VnetHeaderLen::MergeableRx => u16_at(10),
            },
        })
    }

    /// Writes the header into the first `len.bytes()` bytes of `out`.
    pub fn encode(&self, out: &mut [u8], len: VnetHeaderLen) -> Result<(), VnetHeaderError> {
        let need = len.bytes();
        let got = out.len();
        let b = out
            .get_mut(..need)
            .ok_or(VnetHeaderError::Short { got, need })?;
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        if len == VnetHeaderLen::MergeableRx {
            b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        }
        Ok(())
    }

    /// Checks the fields against the `frame_len` bytes of Ethernet frame
    /// that follow the header, with the rules Linux applies before it
    /// trusts one (`virtio_net_hdr_to_skb`) and the virtio spec's
    /// "gso_type other than NONE needs NEEDS_CSUM and gso_size".
    /// `hdr_len` is only a hint in both and is not checked.
    pub fn validate(&self, frame_len: usize) -> Result<(), VnetHeaderError> {
        let unknown = self.flags & !(NEEDS_CSUM | DATA_VALID);
        if unknown != 0 {
            return Err(VnetHeaderError::UnknownFlags(unknown));
        }
        let kind = u32::from(self.gso_type & !GSO_ECN);
        let tcp = kind == VIRTIO_NET_HDR_GSO_TCPV4 || kind == VIRTIO_NET_HDR_GSO_TCPV6;
        let known = tcp
            || kind == VIRTIO_NET_HDR_GSO_NONE
            || kind == VIRTIO_NET_HDR_GSO_UDP
            || kind == VIRTIO_NET_HDR_GSO_UDP_L4;
        if !known {
            return Err(VnetHeaderError::UnknownGsoType(self.gso_type));
        }
        if self.gso_type & GSO_ECN != 0 && !tcp {
            return Err(VnetHeaderError::EcnWithoutTcp);
        }
        if kind != VIRTIO_NET_HDR_GSO_NONE {
            if !self.needs_csum() || self.gso_size == 0 {
                return Err(VnetHeaderError::GsoIncomplete {
                    gso_type: self.gso_type,
                });
            }
            if usize::from(self.gso_size) > frame_len {
                return Err(VnetHeaderError::GsoSizeTooLarge {
                    gso_size: self.gso_size,
                    frame_len,
                });
            }
        }
        if self.needs_csum() {
            // The 2-byte checksum field must lie inside the frame.
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(VnetHeaderError::ChecksumOutOfFrame {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    frame_len,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layouts_match_linux_virtio_net_h() {
        assert_eq!(VNET_HDR_LEN, 10);
        assert_eq!(VNET_HDR_MRG_LEN, 12);
        assert_eq!(offset_of!(virtio_net_hdr, flags), 0);
        assert_eq!(offset_of!(virtio_net_hdr, gso_type), 1);
        assert_eq!(offset_of!(virtio_net_hdr, hdr_len), 2);
        assert_eq!(offset_of!(virtio_net_hdr, gso_size), 4);
        assert_eq!(offset_of!(virtio_net_hdr, csum_start), 6);
        assert_eq!(offset_of!(virtio_net_hdr, csum_offset), 8);
        assert_eq!(offset_of!(virtio_net_hdr_mrg_rxbuf, num_buffers), 10);
        assert_eq!(
            VnetHeaderLen::from_bytes(10),
            Some(VnetHeaderLen::Basic),
            "10 bytes is the basic header"
        );
        assert_eq!(
            VnetHeaderLen::from_bytes(12),
            Some(VnetHeaderLen::MergeableRx)
        );
        assert_eq!(VnetHeaderLen::from_bytes(11), None);
    }

    #[test]
    fn encode_decode_round_trip_is_little_endian() {
        let h = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 0x090a,
        };
        let mut b = [0xffu8; 12];
        h.encode(&mut b, VnetHeaderLen::MergeableRx).unwrap();
        assert_eq!(b, [1, 1, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 0x09]);
        assert_eq!(VnetHeader::decode(&b, VnetHeaderLen::MergeableRx), Ok(h));
        let basic = VnetHeader::decode(&b, VnetHeaderLen::Basic).unwrap();
        assert_eq!(basic.num_buffers, 0);
        assert_eq!(basic.csum_offset, 0x0708);
    }

    #[test]
    fn short_buffers_are_refused_not_indexed() {
        for n in 0..12 {
            let b = vec![0u8; n];
            let r = VnetHeader::decode(&b, VnetHeaderLen::MergeableRx);
            assert_eq!(r, Err(VnetHeaderError::Short { got: n, need: 12 }));
            let mut out = vec![0u8; n];
            assert!(VnetHeader::plain()
                .encode(&mut out, VnetHeaderLen::MergeableRx)
                .is_err());
        }
    }

    #[test]
    fn validation_refuses_what_linux_would() {
        let frame = 100;
        let ok = VnetHeader::plain();
        assert_eq!(ok.validate(frame), Ok(()));

        let unknown_flag = VnetHeader { flags: 0x84, ..ok };
        assert_eq!(
            unknown_flag.validate(frame),
            Err(VnetHeaderError::UnknownFlags(0x84))
        );
        let unknown_gso = VnetHeader { gso_type: 2, ..ok };
        assert_eq!(
            unknown_gso.validate(frame),
            Err(VnetHeaderError::UnknownGsoType(2))
        );
        let ecn_udp = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_UDP_L4 as u8 | GSO_ECN,
            gso_size: 50,
            ..ok
        };
        assert_eq!(ecn_udp.validate(frame), Err(VnetHeaderError::EcnWithoutTcp));
        let tso = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 as u8 | GSO_ECN,
            gso_size: 50,
            csum_start: 54,
            csum_offset: 16,
            ..ok
        };
        assert_eq!(tso.validate(frame), Ok(()));
        assert!(matches!(
            VnetHeader { flags: 0, ..tso }.validate(frame),
            Err(VnetHeaderError::GsoIncomplete { .. })
        ));
        assert!(matches!(
            VnetHeader { gso_size: 0, ..tso }.validate(frame),
            Err(VnetHeaderError::GsoIncomplete { .. })
        ));
        assert!(matches!(
            VnetHeader {
                gso_size: 101,
                ..tso
            }
            .validate(frame),
            Err(VnetHeaderError::GsoSizeTooLarge { .. })
        ));
        // The checksum field's last byte is the frame's last byte: fine;
        // one further is out.
        let edge = VnetHeader {
            flags: NEEDS_CSUM,
            csum_start: 90,
            csum_offset: 8,
            ..ok
        };
        assert_eq!(edge.validate(frame), Ok(()));
        assert!(matches!(
            VnetHeader {
                csum_offset: 9,
                ..edge
            }
            .validate(frame),
            Err(VnetHeaderError::ChecksumOutOfFrame { .. })
        ));
        // No overflow with the largest values.
        let huge = VnetHeader {
            flags: NEEDS_CSUM,
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..ok
        };
        assert!(huge.validate(usize::from(u16::MAX)).is_err());
    }

    #[test]
    fn any_twelve_bytes_decode_and_validate_without_panicking() {
        // A cheap exhaustive sweep over the bytes that steer validation.
        let (mut accepted, mut refused) = (0, 0);
        for flags in 0..=u8::MAX {
            for gso_type in 0..=u8::MAX {
                let mut b = [0u8; 12];
                b[0] = flags;
                b[1] = gso_type;
                b[4] = gso_type; // gso_size follows gso_type
                b[6] = flags; // csum_start
                b[9] = gso_type; // csum_offset high byte
                let h = VnetHeader::decode(&b, VnetHeaderLen::MergeableRx).unwrap();
                match h.validate(usize::from(flags) * 7) {
                    Ok(()) => {
                        assert_eq!(h.flags & !(NEEDS_CSUM | DATA_VALID), 0);
                        accepted += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(accepted > 0 && refused > 0, "{accepted} / {refused}");
    }
}
