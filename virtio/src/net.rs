//! What a virtio-net device served over vhost-user offers, defined once:
//! the supervisor advertises it (features, `virtio_net_config`) and
//! netback's virtqueue loop serves exactly it (docs/ARCHITECTURE.md §8.1).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtqueue index of the first receive queue (the device writes frames
/// into the driver's buffers); pair `i` receives on `2i`.
pub const RX_QUEUE: u16 = 0;
/// Virtqueue index of the first transmit queue; pair `i` transmits on
/// `2i + 1`.
pub const TX_QUEUE: u16 = 1;
/// Virtqueues a session runs with at least: the first receive/transmit
/// pair (a VMM that handles the control queue itself, as QEMU does, never
/// hands it over).
pub const MIN_QUEUES: u16 = 2;

/// Virtqueues of a device with `max_pairs` receive/transmit pairs: the
/// pairs and the control queue.
pub const fn num_queues(max_pairs: u16) -> u16 {
    2 * max_pairs + 1
}

/// Virtqueue index of the control queue (with `VIRTIO_NET_F_CTRL_VQ`)
/// for a driver that acked `features` on a device of `max_pairs` pairs:
/// after every pair with `VIRTIO_NET_F_MQ`, else after the first
/// (virtio 1.2 §5.1.2).
pub fn ctrl_queue(features: u64, max_pairs: u16) -> u16 {
    2 * pairs_in_use(features, max_pairs)
}

/// Queue pairs a driver that acked `features` may use: all of them with
/// `VIRTIO_NET_F_MQ`, else one.
pub fn pairs_in_use(features: u64, max_pairs: u16) -> u16 {
    if has(features, VIRTIO_NET_F_MQ) {
        max_pairs.max(1)
    } else {
        1
    }
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Virtio features offered (without `VHOST_USER_F_PROTOCOL_FEATURES`):
/// virtio 1.x, EVENT_IDX, indirect tables, a partial checksum accepted on
/// transmit (`CSUM`: completed in software before the wire) and delivered
/// on receive (`GUEST_CSUM`), mergeable receive buffers, MAC, MTU, a
/// link status that is always up, and a control queue for the receive
/// mode and MAC filter (`CTRL_RX`), the MAC (`CTRL_MAC_ADDR`) and the
/// guest offloads (`CTRL_GUEST_OFFLOADS`), several queue pairs (`MQ`,
/// with `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`); on a TAP also
/// [`TAP_FEATURES`].
///
/// A backend accepts any subset of these; the supervisor offers a vif on
/// a cable `OFFERED_FEATURES & !TAP_FEATURES`, and `MQ` only to a vif of
/// more than one pair.
pub const OFFERED_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_CTRL_RX)
    | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
    | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | bit(VIRTIO_NET_F_MQ)
    | TAP_FEATURES;

/// Several receive/transmit queue pairs.
pub const MQ_FEATURE: u64 = bit(VIRTIO_NET_F_MQ);

/// TCP segmentation both ways (`HOST_TSO4/6`: the driver sends TCP
/// super-frames, the TAP cuts them; `GUEST_TSO4/6`: the TAP hands over
/// super-frames, `TUNSETOFFLOAD`), offered only for a vif on a TAP: a
/// cable carries finished frames.
pub const TAP_FEATURES: u64 = bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6);

/// Bytes of `virtio_net_config` served: `mac`, `status`,
/// `max_virtqueue_pairs` and `mtu` (the fields the offered features make
/// valid), up to the end of `mtu`.
pub const CONFIG_SPACE_SIZE: usize = offset_of!(virtio_net_config, mtu) + size_of::<u16>();

/// `virtio_net_config.status`: the link is up, and stays up while backends
/// come and go (the supervisor answers `GET_CONFIG`, never a backend).
pub const STATUS_LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;

/// The virtio-net header a driver that acked `features` puts before every
/// frame: 12 bytes (`virtio_net_hdr_mrg_rxbuf`) with VERSION_1 or
/// MRG_RXBUF, else 10.
pub fn header_len(features: u64) -> usize {
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        12
    } else {
        10
    }
}

/// Whether `features` include virtio-net feature `feature`.
pub fn has(features: u64, feature: u32) -> bool {
    features & bit(feature) != 0
}

/// The config space of a vif with MAC `mac`, MTU `mtu` and `max_pairs`
/// queue pairs, little-endian.
pub fn config_space(mac: [u8; 6], mtu: u16, max_pairs: u16) -> [u8; CONFIG_SPACE_SIZE] {
    let mut buf = [0u8; CONFIG_SPACE_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        buf[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(offset_of!(virtio_net_config, mac), &mac);
    put(
        offset_of!(virtio_net_config, status),
        &STATUS_LINK_UP.to_le_bytes(),
    );
    put(
        offset_of!(virtio_net_config, max_virtqueue_pairs),
        &max_pairs.to_le_bytes(),
    );
    put(offset_of!(virtio_net_config, mtu), &mtu.to_le_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_follows_the_virtio_layout() {
        let c = config_space([2, 1, 2, 3, 4, 5], 1500, 1);
        // virtio 1.2 §5.1.4: mac[6], status, max_virtqueue_pairs, mtu.
        assert_eq!(c.len(), 12);
        assert_eq!(&c[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "LINK_UP");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "one pair");
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500, "mtu");
    }

    #[test]
    fn header_length_follows_the_features() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(header_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        // Bits 0, 1, 2, 3, 5, 7, 8, 11, 12, 15, 16, 17, 18, 22, 23 (net),
        // 28, 29 (ring), 32 (VERSION_1).
        assert_eq!(OFFERED_FEATURES, 0x1_30c7_99af);
        assert_eq!(TAP_FEATURES, 0x1980);
    }

    #[test]
    fn the_control_queue_follows_the_pairs_in_use() {
        assert_eq!(num_queues(4), 9);
        assert_eq!(ctrl_queue(0, 4), 2, "without MQ the driver uses one pair");
        assert_eq!(ctrl_queue(MQ_FEATURE, 4), 8);
        assert_eq!(ctrl_queue(MQ_FEATURE, 1), 2);
        assert_eq!(
            u16::from_le_bytes(config_space([2; 6], 1500, 4)[8..10].try_into().unwrap()),
            4
        );
    }
}
