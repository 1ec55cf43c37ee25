//! Completing a partial checksum (`NETTXF_csum_blank`) in software.
//!
//! A frontend with checksum offload (Linux netfront always has it for
//! IPv4) sends TCP and UDP packets whose checksum field holds only the
//! pseudo-header sum. A NIC completes it; so does this backend before a
//! frame leaves on a wire that does not take partial checksums, as Linux
//! netback does with `skb_checksum_setup` and the stack after it.
//! Every offset is checked against the frame: the bytes are the guest's.

/// Why a partial checksum cannot be completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("not an IPv4 or IPv6 frame")]
    NotIp,
    #[error("IP header truncated or malformed")]
    BadIpHeader,
    #[error("transport protocol {0} has no checksum to complete")]
    Protocol(u8),
    #[error("transport header truncated")]
    Truncated,
    #[error("IPv6 extension headers are not parsed")]
    Ipv6Extension,
    #[error("TCP segmentation of a frame that is not TCP over IPv{0}")]
    NotTcp(u8),
    #[error("offset {0} beyond a frame")]
    Offset(usize),
}

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Where a frame's TCP or UDP checksum is, found by [`locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Checksum {
    /// The transport protocol: TCP (6) or UDP (17).
    pub proto: u8,
    /// Whether the network header is IPv6.
    pub ipv6: bool,
    /// Offset of the transport header in the frame (`csum_start`).
    pub start: usize,
    /// Offset of the checksum field from `start` (`csum_offset`).
    pub offset: usize,
    /// End of the transport header (TCP: by its data offset), where the
    /// payload a segmentation splits begins.
    pub header_end: usize,
    /// Bytes of transport header and payload.
    l4_len: usize,
    /// The pseudo-header's sum, unfolded.
    pseudo: u32,
}

impl L4Checksum {
    pub fn is_tcp(&self) -> bool {
        self.proto == PROTO_TCP
    }
}

/// Completes the TCP or UDP checksum of an Ethernet frame in place: the
/// checksum is computed over the pseudo-header and the whole segment,
/// ignoring whatever partial sum the field held.
pub fn complete(frame: &mut [u8]) -> Result<(), ChecksumError> {
    let at = locate(frame)?;
    let (l4, field) = (at.start, at.start + at.offset);
    frame[field] = 0;
    frame[field + 1] = 0;
    let mut csum = fold(add(at.pseudo, &frame[l4..l4 + at.l4_len]));
    if at.proto == PROTO_UDP && csum == 0 {
        // RFC 768: a computed 0 is sent as all ones.
        csum = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

/// Leaves the checksum to the device that receives the frame
/// (`CHECKSUM_PARTIAL`, a virtio-net header's `NEEDS_CSUM`): the field is
/// set to the pseudo-header's sum, as the device expects, whatever the
/// guest wrote there. Returns where the checksum is, for the header.
pub fn prepare_partial(frame: &mut [u8]) -> Result<L4Checksum, ChecksumError> {
    let at = locate(frame)?;
    let field = at.start + at.offset;
    // The folded sum, not complemented: the device adds the segment to it
    // and complements the total.
    let sum = !fold(at.pseudo);
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(at)
}

/// Sets up a TCP super-frame for the device that receives it to cut into
/// `gso_size`-byte segments: its checksum partial ([`prepare_partial`])
/// and the virtio-net header that asks for the segmentation. Refused for a
/// frame that is not TCP over IPv6 (`ipv6`) or IPv4.
pub fn prepare_tcp_segmentation(
    frame: &mut [u8],
    ipv6: bool,
    gso_size: u16,
) -> Result<crate::wire::VnetHeader, ChecksumError> {
    let at = prepare_partial(frame)?;
    if !at.is_tcp() || at.ipv6 != ipv6 {
        return Err(ChecksumError::NotTcp(if ipv6 { 6 } else { 4 }));
    }
    let u16_of = |n: usize| u16::try_from(n).map_err(|_| ChecksumError::Offset(n));
    Ok(crate::wire::VnetHeader::tcp_segmentation(
        ipv6,
        gso_size,
        u16_of(at.header_end)?,
        u16_of(at.start)?,
        u16_of(at.offset)?,
    ))
}

/// Finds the TCP or UDP checksum of an Ethernet frame (IPv4, or IPv6
/// without extension headers; one VLAN tag at most), checking every
/// length against the frame.
pub fn locate(frame: &[u8]) -> Result<L4Checksum, ChecksumError> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(frame, 12).ok_or(ChecksumError::NotIp)?;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16).ok_or(ChecksumError::NotIp)?;
        l3 += 4;
    }
    let (proto, l4, l4_len, pseudo) = match ethertype {
        ETHERTYPE_IPV4 => {
            let vihl = *frame.get(l3).ok_or(ChecksumError::BadIpHeader)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(ChecksumError::BadIpHeader);
            }
            let total = usize::from(be16(frame, l3 + 2).ok_or(ChecksumError::BadIpHeader)?);
            if total < ihl || l3 + total > frame.len() {
                return Err(ChecksumError::BadIpHeader);
            }
            let proto = frame[l3 + 9];
            let l4_len = total - ihl;
            let mut sum = 0u32;
            sum = add(sum, &frame[l3 + 12..l3 + 20]);
            sum += u32::from(proto);
            sum += l4_len as u32;
            (proto, l3 + ihl, l4_len, sum)
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < l3 + 40 || frame[l3] >> 4 != 6 {
                return Err(ChecksumError::BadIpHeader);
            }
            let payload = usize::from(be16(frame, l3 + 4).ok_or(ChecksumError::BadIpHeader)?);
            if l3 + 40 + payload > frame.len() {
                return Err(ChecksumError::BadIpHeader);
            }
            let proto = frame[l3 + 6];
            if proto != PROTO_TCP && proto != PROTO_UDP {
                return Err(ChecksumError::Ipv6Extension);
            }
            let mut sum = 0u32;
            sum = add(sum, &frame[l3 + 8..l3 + 40]);
            sum += u32::from(proto);
            sum += payload as u32;
            (proto, l3 + 40, payload, sum)
        }
        _ => return Err(ChecksumError::NotIp),
    };
    let (offset, header_len) = match proto {
        PROTO_TCP if l4_len >= 20 => {
            let data_offset = usize::from(frame[l4 + 12] >> 4) * 4;
            if data_offset < 20 || data_offset > l4_len {
                return Err(ChecksumError::Truncated);
            }
            (16, data_offset)
        }
        PROTO_UDP if l4_len >= 8 => (6, 8),
        PROTO_TCP | PROTO_UDP => return Err(ChecksumError::Truncated),
        other => return Err(ChecksumError::Protocol(other)),
    };
    Ok(L4Checksum {
        proto,
        ipv6: ethertype == ETHERTYPE_IPV6,
        start: l4,
        offset,
        header_end: l4 + header_len,
        l4_len,
        pseudo,
    })
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, added to
/// `sum` (carries kept above bit 16 until [`fold`]).
fn add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Keep the sum from overflowing on 64 KiB segments.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + UDP frame with a correct checksum, computed
    /// independently by summing the words of the pseudo-header and the
    /// segment.
    fn udp4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        f.extend(ip);
        let mut udp = vec![0x30, 0x39, 0x00, 0x35, 0, 0, 0, 0];
        udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend(udp);
        f.extend(payload);
        f
    }

    fn verify(frame: &[u8], l4: usize, pseudo_src_dst: &[u8], proto: u8) -> bool {
        let seg = &frame[l4..];
        let mut words: Vec<u8> = pseudo_src_dst.to_vec();
        words.extend([0, proto]);
        words.extend((seg.len() as u16).to_be_bytes());
        words.extend(seg);
        if words.len() % 2 == 1 {
            words.push(0);
        }
        let mut sum: u64 = 0;
        for w in words.chunks(2) {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn udp_over_ipv4_is_completed() {
        for payload in [&b""[..], b"a", b"hello world", &[0xffu8; 1473][..]] {
            let mut f = udp4(payload);
            // Garbage in the field, as a partial sum would be.
            f[14 + 20 + 6] = 0x12;
            f[14 + 20 + 7] = 0x34;
            complete(&mut f).unwrap();
            assert!(verify(&f, 34, &f[26..34], PROTO_UDP), "{payload:?}");
        }
    }

    #[test]
    fn tcp_over_ipv6_is_completed() {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let payload = b"the quick brown fox";
        let mut ip = vec![0x60, 0, 0, 0, 0, 0, PROTO_TCP, 64];
        ip[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend((0..32).map(|i| i as u8));
        f.extend(ip);
        let mut tcp = vec![0u8; 20];
        tcp[12] = 5 << 4;
        tcp[16] = 0xde;
        tcp[17] = 0xad;
        f.extend(tcp);
        f.extend(payload);
        complete(&mut f).unwrap();
        assert!(verify(&f, 54, &f[22..54], PROTO_TCP));
    }

    /// A partial checksum left to a device: the device sums the segment
    /// from `start` (the field holding what `prepare_partial` put there)
    /// and stores the complement; the result must verify.
    #[test]
    fn a_prepared_partial_checksum_is_completed_by_a_device() {
        let mut f = udp4(b"left to the device");
        f[14 + 20 + 6] = 0x55;
        let at = prepare_partial(&mut f).unwrap();
        assert_eq!(
            (at.proto, at.start, at.offset, at.header_end),
            (PROTO_UDP, 34, 6, 42)
        );
        assert!(!at.is_tcp() && !at.ipv6);
        let device = fold(add(0, &f[at.start..]));
        f[at.start + at.offset..at.start + at.offset + 2].copy_from_slice(&device.to_be_bytes());
        assert!(verify(&f, 34, &f[26..34], PROTO_UDP));
    }

    #[test]
    fn hostile_frames_are_refused_not_panicked_on() {
        let good = udp4(b"xyz");
        // Every truncation of a good frame either completes or errs.
        for len in 0..good.len() {
            let mut f = good[..len].to_vec();
            let _ = complete(&mut f);
        }
        let mut lying = good.clone();
        lying[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(complete(&mut lying), Err(ChecksumError::BadIpHeader));
        let mut icmp = good.clone();
        icmp[23] = 1;
        assert_eq!(complete(&mut icmp), Err(ChecksumError::Protocol(1)));
        let mut arp = good;
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(complete(&mut arp), Err(ChecksumError::NotIp));
    }
}
