//! Frames between descriptor chains and the wire (docs/ARCHITECTURE.md
//! §8.1): a transmit chain gathered into a private frame, a received frame
//! scattered into the driver's buffers, and the virtio-net header the
//! driver uses translated to and from the wire's.
//!
//! Every length here comes from the driver and is checked against the
//! buffers it describes and the largest frame a wire carries.

use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::Buf;
use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM};

use crate::checksum;
use crate::wire::{VnetHeader, MAX_FRAME_LEN, MIN_FRAME_LEN};

/// Why a transmit chain is not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("a device-writable buffer in a transmit chain")]
    WritableBuffer,
    #[error("{0} bytes after the virtio-net header: not an Ethernet frame")]
    TooShort(usize),
    #[error("more than {MAX_FRAME_LEN} bytes after the virtio-net header")]
    TooLong,
    #[error("buffer at {0:#x} is not guest memory")]
    Unreadable(u64),
    #[error("segmentation offload (gso_type {0}) was not offered")]
    Gso(u8),
    #[error("bad virtio-net header: {0}")]
    Header(String),
    #[error("the partial checksum cannot be completed: {0}")]
    Checksum(String),
}

/// Copies the driver-readable buffers of a transmit chain: the first
/// `hdr.len()` bytes into `hdr`, the rest into `frame`; returns the frame's
/// length. `frame` holds at least [`MAX_FRAME_LEN`] bytes.
pub fn gather(
    mem: &GuestRam,
    bufs: &[Buf],
    hdr: &mut [u8],
    frame: &mut [u8],
) -> Result<usize, TxError> {
    walk(mem, bufs, hdr, |start, gpa, len| {
        let dst = frame.get_mut(start..start + len).ok_or(TxError::TooLong)?;
        mem.read(gpa, dst).map_err(|_| TxError::Unreadable(gpa))
    })
}

/// Where the frame of a transmit chain lies, for a write straight from
/// guest memory: copies the first `hdr.len()` bytes of the driver-readable
/// buffers into `hdr` and appends the rest to `ranges` as
/// guest-physical ranges, each inside one memory region; returns the
/// frame's length. The chain is walked and checked as [`gather`] walks
/// and checks it (one [`walk`]): the same chain is refused by both for
/// the same reason.
pub fn locate(
    mem: &GuestRam,
    bufs: &[Buf],
    hdr: &mut [u8],
    ranges: &mut Vec<(u64, usize)>,
) -> Result<usize, TxError> {
    walk(mem, bufs, hdr, |_, gpa, len| {
        mem.split(gpa, len as u64, ranges)
            .map_err(|_| TxError::Unreadable(gpa))
    })
}

/// Walks the driver-readable buffers of a transmit chain: the first
/// `hdr.len()` bytes are read into `hdr`, and each later piece is handed
/// to `frame_part` as (offset in the frame, guest address, length), never
/// past [`MAX_FRAME_LEN`]; returns the frame's length.
fn walk(
    mem: &GuestRam,
    bufs: &[Buf],
    hdr: &mut [u8],
    mut frame_part: impl FnMut(usize, u64, usize) -> Result<(), TxError>,
) -> Result<usize, TxError> {
    let mut at = 0usize;
    let hdr_len = hdr.len();
    for b in bufs {
        if b.writable {
            return Err(TxError::WritableBuffer);
        }
        let mut gpa = b.addr;
        let mut left = b.len as usize;
        if at < hdr_len {
            let n = left.min(hdr_len - at);
            mem.read(gpa, &mut hdr[at..at + n])
                .map_err(|_| TxError::Unreadable(gpa))?;
            at += n;
            left -= n;
            gpa = gpa.checked_add(n as u64).ok_or(TxError::Unreadable(gpa))?;
        }
        if left == 0 {
            continue;
        }
        let start = at - hdr_len;
        if start
            .checked_add(left)
            .is_none_or(|end| end > MAX_FRAME_LEN)
        {
            return Err(TxError::TooLong);
        }
        frame_part(start, gpa, left)?;
        at += left;
    }
    let len = at.saturating_sub(hdr_len);
    if at < hdr_len || len < MIN_FRAME_LEN {
        return Err(TxError::TooShort(len));
    }
    Ok(len)
}

/// Whether a transmit frame with this driver header goes out as the
/// driver wrote it, behind a plain wire header: no partial checksum to
/// complete or set up and no segmentation. Only such a frame may be
/// written straight from guest memory: the others are changed on the way,
/// so they are copied first and checked in the copy.
pub fn is_plain(hdr: &VnetHeader) -> bool {
    !hdr.needs_csum() && matches!(hdr.tcp_gso(), Ok(None))
}

/// TCP segmentation a direction allows: what the driver negotiated
/// (transmit: `HOST_TSO4/6`; receive: `GUEST_TSO4/6` in force) on a wire
/// that segments (a TAP; a cable carries finished frames only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tso {
    pub v4: bool,
    pub v6: bool,
}

impl Tso {
    fn allows(self, ipv6: bool) -> bool {
        if ipv6 {
            self.v6
        } else {
            self.v4
        }
    }
}

/// Checks the driver's header for a transmit frame and returns the
/// header for the wire: a TCP super-frame the driver may send (`tso`) is
/// passed on for the TAP to segment, its checksum set up partial; any
/// other segmentation is refused; a partial checksum of a plain frame
/// (`VIRTIO_NET_F_CSUM`) is completed in software and the frame goes out
/// with a plain header.
pub fn prepare_tx(
    hdr: &VnetHeader,
    frame: &mut [u8],
    csum_offered: bool,
    tso: Tso,
) -> Result<VnetHeader, TxError> {
    hdr.validate(frame.len())
        .map_err(|e| TxError::Header(e.to_string()))?;
    match hdr.tcp_gso() {
        Ok(None) => {}
        Ok(Some((ipv6, gso_size))) if csum_offered && tso.allows(ipv6) => {
            return checksum::prepare_tcp_segmentation(frame, ipv6, gso_size)
                .map_err(|e| TxError::Checksum(e.to_string()));
        }
        Ok(Some(_)) | Err(()) => return Err(TxError::Gso(hdr.gso_type)),
    }
    if hdr.needs_csum() {
        if !csum_offered {
            return Err(TxError::Header(
                "NEEDS_CSUM without VIRTIO_NET_F_CSUM".into(),
            ));
        }
        checksum::complete(frame).map_err(|e| TxError::Checksum(e.to_string()))?;
    }
    Ok(VnetHeader::plain())
}

/// The header a received frame gets in the driver's buffer, from the
/// wire's: a TCP super-frame goes to a driver that takes it (`tso`, with
/// `GUEST_CSUM`) as it came, a partial checksum is passed on when the
/// driver accepts one (`VIRTIO_NET_F_GUEST_CSUM`), else completed here;
/// `None` when the frame must be dropped (segmentation the driver does not
/// take, or a checksum that cannot be completed).
pub fn rx_header(
    wire: &VnetHeader,
    frame: &mut [u8],
    guest_csum: bool,
    tso: Tso,
) -> Option<VnetHeader> {
    match wire.tcp_gso() {
        Ok(None) if wire.gso_size == 0 => {}
        Ok(Some((ipv6, _))) if guest_csum && tso.allows(ipv6) && wire.needs_csum() => {
            wire.validate(frame.len()).ok()?;
            return Some(VnetHeader {
                flags: wire.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                num_buffers: 0,
                ..*wire
            });
        }
        _ => return None,
    }
    let mut hdr = VnetHeader::plain();
    if wire.needs_csum() {
        if guest_csum {
            hdr.flags = wire.flags;
            hdr.csum_start = wire.csum_start;
            hdr.csum_offset = wire.csum_offset;
        } else {
            checksum::complete(frame).ok()?;
        }
    } else if guest_csum {
        hdr.flags = wire.flags & VIRTIO_NET_HDR_F_DATA_VALID as u8;
    }
    Some(hdr)
}

/// Writes `data` from offset `from` into the device-writable buffers of
/// one chain, in order; returns the bytes written (at most what the
/// buffers hold). `Err` when a buffer is not writable guest memory.
pub fn scatter(mem: &GuestRam, bufs: &[Buf], data: &[u8], from: usize) -> Result<usize, u64> {
    scatter_parts(mem, bufs, &[], data, from)
}

/// [`scatter`] of `head` followed by `data` as one byte string (a
/// received frame's virtio-net header and the frame, without copying
/// them together first).
pub fn scatter_parts(
    mem: &GuestRam,
    bufs: &[Buf],
    head: &[u8],
    data: &[u8],
    from: usize,
) -> Result<usize, u64> {
    let total = head.len() + data.len();
    let mut at = from;
    for b in bufs.iter().filter(|b| b.writable) {
        if at >= total {
            break;
        }
        let end = at + (b.len as usize).min(total - at);
        let mut addr = b.addr;
        while at < end {
            let (src, off) = match at.checked_sub(head.len()) {
                None => (head, at),
                Some(off) => (data, off),
            };
            let piece = (src.len() - off).min(end - at);
            mem.write(addr, &src[off..off + piece])
                .map_err(|_| b.addr)?;
            addr = addr.checked_add(piece as u64).ok_or(b.addr)?;
            at += piece;
        }
    }
    Ok(at - from)
}

/// Bytes the device-writable buffers of a chain hold.
pub fn capacity(bufs: &[Buf]) -> usize {
    bufs.iter()
        .filter(|b| b.writable)
        .map(|b| b.len as usize)
        .sum()
}

/// A hash of a frame's flow that is the same in both directions: the
/// IP addresses and, for TCP and UDP, the ports, each pair taken in an
/// order that does not depend on which end sent (the Ethernet addresses
/// for anything else). A cable's receive fan-in steers each flow to one
/// receive queue with it, so a flow stays in order (docs/ARCHITECTURE.md
/// §8.1). Every offset is checked: a short or odd frame hashes whatever
/// of it there is.
pub fn flow_hash(frame: &[u8]) -> u32 {
    fn fnv(h: u32, bytes: &[u8]) -> u32 {
        bytes
            .iter()
            .fold(h, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
    }
    fn both(h: u32, a: &[u8], b: &[u8]) -> u32 {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        fnv(fnv(h, lo), hi)
    }
    const BASIS: u32 = 0x811c_9dc5;
    let l3 = frame.get(MIN_FRAME_LEN..).unwrap_or_default();
    let (addrs, proto, l4) = match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            let ihl = usize::from(l3.first().map_or(0, |b| b & 0x0f)) * 4;
            (l3.get(12..20), l3.get(9).copied(), l3.get(ihl..))
        }
        Some([0x86, 0xdd]) => (l3.get(8..40), l3.get(6).copied(), l3.get(40..)),
        _ => {
            return both(
                BASIS,
                frame.get(..6).unwrap_or_default(),
                frame.get(6..12).unwrap_or_default(),
            )
        }
    };
    let Some(addrs) = addrs else {
        return BASIS;
    };
    let (src, dst) = addrs.split_at(addrs.len() / 2);
    let mut h = both(BASIS, src, dst);
    if let (Some(p @ (6 | 17)), Some(ports)) = (proto, l4.and_then(|l| l.get(..4))) {
        h = both(fnv(h, &[p]), &ports[..2], &ports[2..]);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_hashes_alike_both_ways_and_short_frames_do_not_panic() {
        let mut ab = vec![0u8; 14 + 20 + 4];
        ab[12..14].copy_from_slice(&[0x08, 0x00]);
        ab[14] = 0x45;
        ab[14 + 9] = 6;
        ab[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 1]);
        ab[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 2]);
        ab[34..38].copy_from_slice(&[0x13, 0x89, 0xc0, 0x00]);
        let mut ba = ab.clone();
        ba[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 2]);
        ba[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
        ba[34..38].copy_from_slice(&[0xc0, 0x00, 0x13, 0x89]);
        assert_eq!(flow_hash(&ab), flow_hash(&ba));
        let mut other = ab.clone();
        other[36] = 0xc1;
        assert_ne!(flow_hash(&ab), flow_hash(&other), "another port");
        for n in 0..ab.len() {
            let _ = flow_hash(&ab[..n]);
        }
    }

    fn ram() -> GuestRam {
        use vm_memory::{GuestAddress, GuestMemoryMmap};
        GuestRam::from_memory(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap())
    }

    fn buf(addr: u64, len: u32, writable: bool) -> Buf {
        Buf {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn gather_splits_header_and_frame_across_buffers() {
        let mem = ram();
        let bytes: Vec<u8> = (0..100u8).collect();
        mem.write(0x1000, &bytes[..7]).unwrap();
        mem.write(0x2000, &bytes[7..]).unwrap();
        let mut hdr = [0u8; 12];
        let mut frame = vec![0u8; MAX_FRAME_LEN];
        let bufs = [buf(0x1000, 7, false), buf(0x2000, 93, false)];
        let n = gather(&mem, &bufs, &mut hdr, &mut frame).unwrap();
        assert_eq!(n, 88);
        assert_eq!(&hdr[..], &bytes[..12]);
        assert_eq!(&frame[..n], &bytes[12..]);
    }

    #[test]
    fn gather_refuses_what_a_driver_must_not_send() {
        let mem = ram();
        let mut hdr = [0u8; 12];
        let mut frame = vec![0u8; MAX_FRAME_LEN];
        let mut go = |bufs: &[Buf]| gather(&mem, bufs, &mut hdr, &mut frame);
        assert_eq!(go(&[buf(0, 20, false)]), Err(TxError::TooShort(8)));
        assert_eq!(go(&[buf(0, 4, false)]), Err(TxError::TooShort(0)));
        assert_eq!(
            go(&[buf(0, 100, false), buf(0x100, 8, true)]),
            Err(TxError::WritableBuffer)
        );
        assert_eq!(
            go(&[buf(0xff00, 0x200, false)]),
            Err(TxError::Unreadable(0xff0c)),
            "the frame's first byte, past the header"
        );
        // 6 × 16 KiB after the header: beyond the largest frame.
        let big: Vec<Buf> = (0..6).map(|_| buf(0, 0x4000, false)).collect();
        assert_eq!(go(&big), Err(TxError::TooLong));
    }

    /// `locate` finds the bytes `gather` copies, and refuses every chain
    /// `gather` refuses, for the same reason.
    #[test]
    fn locate_names_the_bytes_gather_copies() {
        use vm_memory::{GuestAddress, GuestMemoryMmap};
        // Two adjacent regions: a buffer may straddle them.
        let mem = GuestRam::from_memory(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x10000), 0x10000),
            ])
            .unwrap(),
        );
        let bytes: Vec<u8> = (0..200u8).collect();
        mem.write(0x1000, &bytes[..7]).unwrap();
        mem.write(0xff80, &bytes[7..]).unwrap();
        let bufs = [buf(0x1000, 7, false), buf(0xff80, 193, false)];
        let (mut hdr, mut ranges) = ([0u8; 12], Vec::new());
        assert_eq!(locate(&mem, &bufs, &mut hdr, &mut ranges), Ok(188));
        assert_eq!(&hdr[..], &bytes[..12]);
        assert_eq!(ranges, [(0xff85, 0x7b), (0x10000, 0x41)]);
        let mut located = Vec::new();
        for &(gpa, len) in &ranges {
            let mut piece = vec![0u8; len];
            mem.read(gpa, &mut piece).unwrap();
            located.extend(piece);
        }
        let mut frame = vec![0u8; MAX_FRAME_LEN];
        let n = gather(&mem, &bufs, &mut hdr, &mut frame).unwrap();
        assert_eq!(located, &frame[..n]);

        let big: Vec<Buf> = (0..6).map(|_| buf(0, 0x4000, false)).collect();
        for bad in [
            vec![buf(0, 20, false)],
            vec![buf(0, 4, false)],
            vec![buf(0, 100, false), buf(0x100, 8, true)],
            vec![buf(0x1ff00, 0x200, false)],
            big,
        ] {
            ranges.clear();
            assert_eq!(
                locate(&mem, &bad, &mut hdr, &mut ranges),
                gather(&mem, &bad, &mut hdr, &mut frame).map(|_| 0),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn scatter_fills_writable_buffers_in_order() {
        let mem = ram();
        let data: Vec<u8> = (0..50u8).collect();
        let bufs = [
            buf(0x100, 8, false),
            buf(0x1000, 16, true),
            buf(0x2000, 16, true),
        ];
        assert_eq!(capacity(&bufs), 32);
        assert_eq!(scatter(&mem, &bufs, &data, 10), Ok(32));
        let mut got = [0u8; 16];
        mem.read(0x2000, &mut got).unwrap();
        assert_eq!(&got[..], &data[26..42]);
        assert_eq!(scatter(&mem, &bufs, &data, 42), Ok(8));
        assert_eq!(
            scatter(&mem, &[buf(0xfff8, 16, true)], &data, 0),
            Err(0xfff8)
        );
    }

    #[test]
    fn scatter_parts_writes_header_and_frame_as_one_string() {
        let mem = ram();
        let head: Vec<u8> = (100..112u8).collect();
        let data: Vec<u8> = (0..50u8).collect();
        let whole: Vec<u8> = head.iter().chain(&data).copied().collect();
        // Buffers of 5, 10 and 100 bytes: the header crosses the first
        // two, the second holds the end of the header and the frame's
        // start, the last the rest.
        let bufs = [
            buf(0x1000, 5, true),
            buf(0x100, 8, false),
            buf(0x2000, 10, true),
            buf(0x3000, 100, true),
        ];
        // A frame over two heads: the first takes 5 + 10 bytes.
        assert_eq!(scatter_parts(&mem, &bufs[..3], &head, &data, 0), Ok(15));
        assert_eq!(scatter_parts(&mem, &bufs[3..], &head, &data, 15), Ok(47));
        let mut got = vec![0u8; 5];
        mem.read(0x1000, &mut got).unwrap();
        let mut more = vec![0u8; 10];
        mem.read(0x2000, &mut more).unwrap();
        got.extend_from_slice(&more);
        let mut rest = vec![0u8; 47];
        mem.read(0x3000, &mut rest).unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, whole);
        // The same bytes as scattering the joined string.
        assert_eq!(scatter(&mem, &bufs, &whole, 0), Ok(62));
        assert_eq!(
            scatter_parts(&mem, &[buf(0xfff8, 16, true)], &head, &data, 0),
            Err(0xfff8)
        );
    }

    #[test]
    fn headers_pass_a_partial_checksum_only_to_a_driver_that_takes_one() {
        // An IPv4/UDP frame with a blank checksum at 40 (csum_start 34).
        let mut frame = vec![0u8; 60];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[16..18].copy_from_slice(&46u16.to_be_bytes());
        frame[23] = 17;
        frame[38..40].copy_from_slice(&26u16.to_be_bytes());
        let mut wire = VnetHeader::plain();
        wire.flags = 1;
        wire.csum_start = 34;
        wire.csum_offset = 6;
        let none = Tso::default();
        let kept = rx_header(&wire, &mut frame.clone(), true, none).unwrap();
        assert_eq!((kept.flags, kept.csum_start, kept.csum_offset), (1, 34, 6));
        let mut done = frame.clone();
        let plain = rx_header(&wire, &mut done, false, none).unwrap();
        assert_eq!(plain, VnetHeader::plain());
        assert_ne!(&done[40..42], &[0, 0], "checksum completed");
        let mut gso = wire;
        gso.gso_type = 1;
        gso.gso_size = 10;
        assert_eq!(rx_header(&gso, &mut frame.clone(), true, none), None);
        // Transmit: a partial checksum needs VIRTIO_NET_F_CSUM.
        assert!(prepare_tx(&wire, &mut frame.clone(), false, none).is_err());
        let mut sent = frame.clone();
        assert_eq!(
            prepare_tx(&wire, &mut sent, true, none),
            Ok(VnetHeader::plain())
        );
        assert_eq!(sent, done);
        assert!(matches!(
            prepare_tx(&gso, &mut frame, true, none),
            Err(TxError::Gso(1))
        ));
    }

    /// An IPv4/TCP frame of `payload` bytes (no options).
    fn tcp4(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 54 + payload];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[46] = 5 << 4; // data offset: 20 bytes
        f
    }

    fn gso_header(gso_type: u8, gso_size: u16) -> VnetHeader {
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type,
            hdr_len: 54,
            gso_size,
            ..VnetHeader::partial(34, 16)
        }
    }

    #[test]
    fn tcp_super_frames_pass_only_where_negotiated() {
        const TCPV4: u8 = 1;
        const TCPV6: u8 = 4;
        const UDP: u8 = 3;
        let v4 = Tso {
            v4: true,
            v6: false,
        };
        let hdr = gso_header(TCPV4, 1448);
        let mut frame = tcp4(20_000);
        let out = prepare_tx(&hdr, &mut frame, true, v4).unwrap();
        assert_eq!(
            (
                out.gso_type,
                out.gso_size,
                out.hdr_len,
                out.csum_start,
                out.csum_offset
            ),
            (TCPV4, 1448, 54, 34, 16)
        );
        assert!(out.needs_csum());
        assert_ne!(&frame[50..52], &[0, 0], "pseudo-header sum in the field");
        // Not negotiated, no CSUM, the wrong IP version, not TCP, UDP
        // fragmentation, ECN, a segment size of 0: refused.
        for (h, csum, tso) in [
            (hdr, true, Tso::default()),
            (hdr, false, v4),
            (gso_header(TCPV6, 1448), true, Tso { v4: true, v6: true }),
            (gso_header(UDP, 1448), true, v4),
            (gso_header(TCPV4 | 0x80, 1448), true, v4),
            (gso_header(TCPV4, 0), true, v4),
        ] {
            assert!(
                prepare_tx(&h, &mut tcp4(20_000), csum, tso).is_err(),
                "{h:?} csum={csum} {tso:?}"
            );
        }
        let mut udp = tcp4(2000);
        udp[23] = 17;
        assert!(prepare_tx(&hdr, &mut udp, true, v4).is_err());
        // Receive: passed on to a driver that takes it, dropped otherwise.
        let got = rx_header(&hdr, &mut tcp4(20_000), true, v4).unwrap();
        assert_eq!((got.gso_type, got.gso_size, got.hdr_len), (TCPV4, 1448, 54));
        assert_eq!(rx_header(&hdr, &mut tcp4(20_000), false, v4), None);
        assert_eq!(
            rx_header(&hdr, &mut tcp4(20_000), true, Tso::default()),
            None
        );
        let mut no_csum = hdr;
        no_csum.flags = 0;
        assert_eq!(rx_header(&no_csum, &mut tcp4(20_000), true, v4), None);
    }
}
