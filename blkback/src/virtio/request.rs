//! virtio-blk requests (virtio 1.2 §5.2.6): from a walked descriptor chain
//! to a validated action, without executing anything.
//!
//! The chain is read as two byte streams, whatever the descriptor split
//! (`VIRTIO_F_ANY_LAYOUT`): the device-readable bytes start with the 16-byte
//! `virtio_blk_outhdr` followed by data-out, the device-writable bytes are
//! data-in followed by the one status byte. Every check failure becomes a
//! status (`IOERR`/`UNSUPP`) written to that byte; a chain without a usable
//! status byte is answered with a used entry of length 0.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

pub use shadowback_virtio::blk::{MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SEG, SEG_MAX};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::{Chain, ChainError};

/// Bytes per virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `virtio_blk_outhdr`: type, ioprio, sector.
pub const HEADER_SIZE: u64 = 16;
/// Size of one `virtio_blk_discard_write_zeroes` segment.
pub const SEGMENT_SIZE: u64 = 16;
/// Buffers kept by a chain walk: data plus header and status.
pub const CHAIN_CAP: usize = SEG_MAX as usize + 2;

/// `VIRTIO_BLK_S_OK`.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What the device offers (the config space the supervisor publishes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// `VIRTIO_BLK_F_RO`: writes, discards and write-zeroes fail.
    pub readonly: bool,
    /// `VIRTIO_BLK_F_DISCARD`.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// `GET_ID` answer: the device name, NUL padded.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl BlkConfig {
    /// The serial for device `name` (truncated to 20 bytes).
    pub fn serial_for(name: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = name.len().min(serial.len());
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        serial
    }
}

/// `virtio_blk_outhdr`, as read (little endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutHdr {
    pub req_type: u32,
    pub ioprio: u32,
    pub sector: u64,
}

impl OutHdr {
    /// Decodes 16 header bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        OutHdr {
            req_type: u32_at(0),
            ioprio: u32_at(4),
            sector: u64::from_le_bytes(s),
        }
    }

    /// Encodes it (for the shadow log).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.req_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        b[8..].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// What to do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Answer at once with `status`; nothing was transferred.
    Done(u8),
    /// Read `bytes` at disk byte `offset` into the data pieces.
    Read { offset: u64, bytes: u64 },
    /// Write the data pieces (`bytes`) at disk byte `offset`.
    Write { offset: u64, bytes: u64 },
    /// `fdatasync`.
    Flush,
    /// Write the serial into the data pieces (`bytes` of them, at most 20).
    GetId { bytes: u32 },
    /// Deallocate each `(offset, len)` byte range.
    Discard,
    /// Zero each range; `unmap` allows punching holes.
    WriteZeroes { unmap: bool },
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Guest-physical address of the status byte; `None`: the chain has no
    /// usable one (answer with a used length of 0, write nothing).
    pub status_at: Option<u64>,
    pub header: OutHdr,
    pub action: Action,
}

impl Parsed {
    fn no_status() -> Self {
        Parsed {
            status_at: None,
            header: OutHdr::default(),
            action: Action::Done(STATUS_IOERR),
        }
    }
}

/// Parses the chain `walked` (the result of a chain walk) against `cfg`.
///
/// For data requests, `data` receives the guest pieces (each inside one
/// memory region) and, for discard/write-zeroes, `ranges` the disk byte
/// ranges; both are cleared first, so callers can reuse them.
pub fn parse(
    mem: &GuestRam,
    walked: Result<&Chain, ChainError>,
    cfg: &BlkConfig,
    data: &mut Vec<(u64, usize)>,
    ranges: &mut Vec<(u64, u64)>,
) -> Parsed {
    data.clear();
    ranges.clear();
    let Ok(chain) = walked else {
        return Parsed::no_status();
    };
    // The status byte: the last byte of the last buffer, device-writable.
    let status_at = match chain.last {
        Some(b) if b.writable && b.len >= 1 => match b.addr.checked_add(u64::from(b.len) - 1) {
            Some(at) if mem.contains(at, 1) => at,
            _ => return Parsed::no_status(),
        },
        _ => return Parsed::no_status(),
    };
    let mut parsed = Parsed {
        status_at: Some(status_at),
        header: OutHdr::default(),
        action: Action::Done(STATUS_IOERR),
    };
    if chain.overflowed() || chain.misordered {
        return parsed;
    }
    // Readable stream: header then data-out.
    let mut header = [0u8; 16];
    let mut header_got = 0u64;
    let mut out_bytes = 0u64;
    let mut in_bytes = 0u64;
    let mut in_segments = 0u32;
    let mut out_segments = 0u32;
    let n = chain.bufs.len();
    for (i, b) in chain.bufs.iter().enumerate() {
        let len = u64::from(b.len);
        if !b.writable {
            let take = (HEADER_SIZE - header_got).min(len);
            if take > 0 {
                let lo = header_got as usize;
                if mem
                    .read(b.addr, &mut header[lo..lo + take as usize])
                    .is_err()
                {
                    return parsed;
                }
                header_got += take;
            }
            if len > take {
                // The data-out pieces are walked again by `readable_data`.
                out_bytes += len - take;
                out_segments += 1;
            }
        } else {
            // The last buffer's final byte is the status.
            let data_len = if i + 1 == n { len - 1 } else { len };
            if data_len > 0 {
                in_bytes += data_len;
                in_segments += 1;
            }
        }
    }
    if header_got < HEADER_SIZE {
        return parsed;
    }
    let hdr = OutHdr::from_bytes(&header);
    parsed.header = hdr;
    let ioerr = Action::Done(STATUS_IOERR);
    parsed.action = match hdr.req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let read = hdr.req_type == VIRTIO_BLK_T_IN;
            // Data must flow one way only: a read's buffers are writable,
            // a write's readable.
            let (bytes, segments, wrong_way) = if read {
                (in_bytes, in_segments, out_bytes)
            } else {
                (out_bytes, out_segments, in_bytes)
            };
            if wrong_way != 0 || segments > SEG_MAX || (!read && cfg.readonly) {
                ioerr
            } else {
                match sector_range(hdr.sector, bytes, cfg.sectors) {
                    None => ioerr,
                    Some(offset) => {
                        let split = if read {
                            split_all(mem, writable_data(chain), data)
                        } else {
                            split_all(mem, readable_data(chain), data)
                        };
                        if split.is_err() {
                            ioerr
                        } else if bytes == 0 {
                            Action::Done(STATUS_OK)
                        } else if read {
                            Action::Read { offset, bytes }
                        } else {
                            Action::Write { offset, bytes }
                        }
                    }
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => Action::Flush,
        VIRTIO_BLK_T_GET_ID => {
            let bytes = in_bytes.min(u64::from(VIRTIO_BLK_ID_BYTES));
            let mut pieces: Vec<(u64, u64)> = writable_data(chain).collect();
            truncate_pieces(&mut pieces, bytes);
            if split_all(mem, pieces, data).is_err() {
                ioerr
            } else {
                Action::GetId {
                    bytes: bytes as u32,
                }
            }
        }
        t @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            let discard = t == VIRTIO_BLK_T_DISCARD;
            let (offered, max) = if discard {
                (cfg.discard, MAX_DISCARD_SEG)
            } else {
                (cfg.write_zeroes, MAX_WRITE_ZEROES_SEG)
            };
            if !offered {
                Action::Done(STATUS_UNSUPP)
            } else if cfg.readonly || in_bytes != 0 {
                ioerr
            } else {
                segments(
                    mem,
                    readable_data(chain),
                    out_bytes,
                    max,
                    discard,
                    cfg.sectors,
                    ranges,
                )
            }
        }
        _ => Action::Done(STATUS_UNSUPP),
    };
    parsed
}

/// Byte offset of `sector` when `bytes` (a multiple of 512) fit the disk.
fn sector_range(sector: u64, bytes: u64, capacity: u64) -> Option<u64> {
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let end = sector.checked_add(bytes / SECTOR_SIZE)?;
    if end > capacity {
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    i64::try_from(offset.checked_add(bytes)?).ok()?;
    Some(offset)
}

/// The device-writable bytes before the status byte, as
/// `(address, length)` pieces.
fn writable_data(chain: &Chain) -> impl Iterator<Item = (u64, u64)> + '_ {
    let n = chain.bufs.len();
    chain
        .bufs
        .iter()
        .enumerate()
        .filter(|(_, b)| b.writable)
        .map(move |(i, b)| {
            let len = u64::from(b.len) - u64::from(i + 1 == n);
            (b.addr, len)
        })
        .filter(|&(_, len)| len > 0)
}

/// The device-readable bytes after the header (data-out), as
/// `(address, length)` pieces.
fn readable_data(chain: &Chain) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut header_left = HEADER_SIZE;
    chain
        .bufs
        .iter()
        .filter(|b| !b.writable)
        .filter_map(move |b| {
            let len = u64::from(b.len);
            let take = header_left.min(len);
            header_left -= take;
            // Checked: the walk bounded the chain to 4 GiB.
            (len > take).then(|| (b.addr.wrapping_add(take), len - take))
        })
}

fn truncate_pieces(pieces: &mut Vec<(u64, u64)>, mut bytes: u64) {
    pieces.retain_mut(|(_, len)| {
        let keep = (*len).min(bytes);
        bytes -= keep;
        *len = keep;
        keep > 0
    });
}

fn split_all(
    mem: &GuestRam,
    pieces: impl IntoIterator<Item = (u64, u64)>,
    data: &mut Vec<(u64, usize)>,
) -> Result<(), ()> {
    for (addr, len) in pieces {
        mem.split(addr, len, data).map_err(|_| ())?;
    }
    Ok(())
}

/// Reads and validates the discard/write-zeroes segments.
fn segments(
    mem: &GuestRam,
    pieces: impl Iterator<Item = (u64, u64)>,
    bytes: u64,
    max: u32,
    discard: bool,
    capacity: u64,
    ranges: &mut Vec<(u64, u64)>,
) -> Action {
    let ioerr = Action::Done(STATUS_IOERR);
    if bytes == 0 || !bytes.is_multiple_of(SEGMENT_SIZE) {
        return ioerr;
    }
    let count = bytes / SEGMENT_SIZE;
    if count > u64::from(max) {
        return ioerr;
    }
    // At most 32 segments of 16 bytes.
    let mut raw = vec![0u8; bytes as usize];
    let mut at = 0usize;
    for (addr, len) in pieces {
        let len = len as usize;
        if mem.read(addr, &mut raw[at..at + len]).is_err() {
            return ioerr;
        }
        at += len;
    }
    let mut unmap_all = true;
    for seg in raw.chunks_exact(SEGMENT_SIZE as usize) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&seg[..8]);
        let sector = u64::from_le_bytes(s);
        let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // §5.2.6.2: unmap is meaningless for discard; unknown flags fail.
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Action::Done(STATUS_UNSUPP);
        }
        unmap_all &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let len = u64::from(num) * SECTOR_SIZE;
        let Some(offset) = sector_range(sector, len, capacity) else {
            return ioerr;
        };
        if len > 0 {
            ranges.push((offset, len));
        }
    }
    if discard {
        Action::Discard
    } else {
        Action::WriteZeroes { unmap: unmap_all }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_virtio::queue::{walk_chain, Chain};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn cfg() -> BlkConfig {
        BlkConfig {
            sectors: 1000,
            readonly: false,
            discard: true,
            write_zeroes: true,
            serial: BlkConfig::serial_for("vd0"),
        }
    }

    /// Memory with a descriptor table at 0 built from `(addr, len, flags)`
    /// chained in order, and `hdr` at HDR.
    fn setup(descs: &[(u64, u32, u16)], hdr: OutHdr) -> (GuestRam, Result<Chain, ChainError>) {
        let mem = GuestRam::from_memory(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            let d = Descriptor::new(addr, len, flags, (i + 1) as u16);
            mem.memory()
                .write_obj(d, GuestAddress(16 * i as u64))
                .unwrap();
        }
        mem.write(HDR, &hdr.to_bytes()).unwrap();
        let mut chain = Chain::default();
        let r = walk_chain(&mem, 0, 256, 0, CHAIN_CAP, &mut chain).map(|()| chain);
        (mem, r)
    }

    fn hdr(req_type: u32, sector: u64) -> OutHdr {
        OutHdr {
            req_type,
            ioprio: 0,
            sector,
        }
    }

    type Run = (Parsed, Vec<(u64, usize)>, Vec<(u64, u64)>);

    fn run(descs: &[(u64, u32, u16)], h: OutHdr, c: &BlkConfig) -> Run {
        let (mem, chain) = setup(descs, h);
        let (mut data, mut ranges) = (Vec::new(), Vec::new());
        let p = parse(
            &mem,
            chain.as_ref().map_err(|e| *e),
            c,
            &mut data,
            &mut ranges,
        );
        (p, data, ranges)
    }

    fn seg_bytes(mem_segs: &[(u64, u32, u32)]) -> Vec<u8> {
        mem_segs
            .iter()
            .flat_map(|&(s, n, f)| {
                let mut b = s.to_le_bytes().to_vec();
                b.extend_from_slice(&n.to_le_bytes());
                b.extend_from_slice(&f.to_le_bytes());
                b
            })
            .collect()
    }

    #[test]
    fn valid_requests() {
        let c = cfg();
        let (p, data, _) = run(
            &[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_IN, 8),
            &c,
        );
        assert_eq!(p.status_at, Some(STATUS));
        assert_eq!(
            p.action,
            Action::Read {
                offset: 4096,
                bytes: 4096
            }
        );
        assert_eq!(data, vec![(DATA, 4096)]);

        let (p, data, _) = run(
            &[
                (HDR, 16, 0),
                (DATA, 512, 0),
                (DATA + 512, 1024, 0),
                (STATUS, 1, W),
            ],
            hdr(VIRTIO_BLK_T_OUT, 997),
            &c,
        );
        assert_eq!(
            p.action,
            Action::Write {
                offset: 997 * 512,
                bytes: 1536
            }
        );
        assert_eq!(data.len(), 2);

        // Header and data in one buffer; data and status in one buffer.
        let (p, data, _) = run(
            &[(HDR, 16 + 512, 0), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_OUT, 0),
            &c,
        );
        assert_eq!(
            p.action,
            Action::Write {
                offset: 0,
                bytes: 512
            }
        );
        assert_eq!(data, vec![(HDR + 16, 512)]);
        assert_eq!(p.status_at, Some(STATUS));
        let (p, data, _) = run(&[(HDR, 16, 0), (DATA, 513, W)], hdr(VIRTIO_BLK_T_IN, 0), &c);
        assert_eq!(
            p.action,
            Action::Read {
                offset: 0,
                bytes: 512
            }
        );
        assert_eq!(data, vec![(DATA, 512)]);
        assert_eq!(p.status_at, Some(DATA + 512));

        let (p, _, _) = run(
            &[(HDR, 16, 0), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_FLUSH, 77),
            &c,
        );
        assert_eq!(p.action, Action::Flush);
        let (p, data, _) = run(
            &[(HDR, 16, 0), (DATA, 64, W), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_GET_ID, 0),
            &c,
        );
        assert_eq!(p.action, Action::GetId { bytes: 20 });
        assert_eq!(data, vec![(DATA, 20)]);
        let (p, _, _) = run(&[(HDR, 16, 0), (STATUS, 1, W)], hdr(99, 0), &c);
        assert_eq!(p.action, Action::Done(STATUS_UNSUPP));
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let c = cfg();
        // Rewrites the segment table of a set-up chain and parses it again.
        let reparse = |mem: &GuestRam,
                       chain: &Result<Chain, ChainError>,
                       c: &BlkConfig,
                       segs: &[(u64, u32, u32)]|
         -> Run {
            mem.write(DATA, &seg_bytes(segs)).unwrap();
            let (mut data, mut ranges) = (Vec::new(), Vec::new());
            let p = parse(
                mem,
                chain.as_ref().map_err(|e| *e),
                c,
                &mut data,
                &mut ranges,
            );
            (p, data, ranges)
        };
        let (mem, chain) = setup(
            &[(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
        );
        let (p, _, ranges) = reparse(&mem, &chain, &c, &[(8, 8, 1), (100, 1, 1)]);
        assert_eq!(p.action, Action::WriteZeroes { unmap: true });
        assert_eq!(ranges, vec![(4096, 4096), (51200, 512)]);
        let (p, _, _) = reparse(&mem, &chain, &c, &[(8, 8, 1), (100, 1, 0)]);
        assert_eq!(p.action, Action::WriteZeroes { unmap: false });

        // Unknown flag → UNSUPP; beyond the disk → IOERR.
        for (segs, status) in [
            ([(8, 8, 2), (0, 1, 0)], STATUS_UNSUPP),
            ([(999, 2, 0), (0, 1, 0)], STATUS_IOERR),
            ([(u64::MAX, 2, 0), (0, 1, 0)], STATUS_IOERR),
        ] {
            let (p, _, _) = reparse(&mem, &chain, &c, &segs);
            assert_eq!(p.action, Action::Done(status), "{segs:?}");
        }

        // Discard with unmap set → UNSUPP; discard not offered → UNSUPP.
        let (mem, chain) = setup(
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_DISCARD, 0),
        );
        let (p, _, _) = reparse(&mem, &chain, &c, &[(8, 8, 1)]);
        assert_eq!(p.action, Action::Done(STATUS_UNSUPP));
        let (p, _, _) = reparse(&mem, &chain, &c, &[(8, 8, 0)]);
        assert_eq!(p.action, Action::Discard);
        let off = BlkConfig {
            discard: false,
            ..cfg()
        };
        let (p, _, _) = reparse(&mem, &chain, &off, &[(8, 8, 0)]);
        assert_eq!(p.action, Action::Done(STATUS_UNSUPP));

        // 33 segments, or a ragged segment list.
        let c33 = cfg();
        let (p, _, _) = run(
            &[(HDR, 16, 0), (DATA, 33 * 16, 0), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_DISCARD, 0),
            &c33,
        );
        assert_eq!(p.action, Action::Done(STATUS_IOERR));
        let (p, _, _) = run(
            &[(HDR, 16, 0), (DATA, 20, 0), (STATUS, 1, W)],
            hdr(VIRTIO_BLK_T_DISCARD, 0),
            &c33,
        );
        assert_eq!(p.action, Action::Done(STATUS_IOERR));
    }

    #[test]
    fn hostile_chains_table() {
        let c = cfg();
        let ro = BlkConfig {
            readonly: true,
            ..cfg()
        };
        let ioerr = Action::Done(STATUS_IOERR);
        let many: Vec<(u64, u32, u16)> = std::iter::once((HDR, 16, 0))
            .chain((0..129).map(|i| (DATA + 512 * (i % 8), 512, W)))
            .chain(std::iter::once((STATUS, 1, W)))
            .collect();
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<(u64, u32, u16)>,
            OutHdr,
            &BlkConfig,
            Option<u64>,
            Action,
        )> = vec![
            (
                "missing status",
                vec![(HDR, 16, 0), (DATA, 512, 0)],
                hdr(VIRTIO_BLK_T_OUT, 0),
                &c,
                None,
                ioerr,
            ),
            (
                "status too short",
                vec![(HDR, 16, 0), (STATUS, 0, W)],
                hdr(VIRTIO_BLK_T_FLUSH, 0),
                &c,
                None,
                ioerr,
            ),
            (
                "status unmapped",
                vec![(HDR, 16, 0), (0x20000, 1, W)],
                hdr(VIRTIO_BLK_T_FLUSH, 0),
                &c,
                None,
                ioerr,
            ),
            (
                "header too short",
                vec![(HDR, 8, 0), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "no header",
                vec![(STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "read into read-only buffer",
                vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "write from writable buffer",
                vec![(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_OUT, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "out of range sector",
                vec![(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 999),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "sector overflow",
                vec![(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, u64::MAX),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "unaligned length",
                vec![(HDR, 16, 0), (DATA, 511, W), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "too many segments",
                many,
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "write to read-only disk",
                vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_OUT, 0),
                &ro,
                Some(STATUS),
                ioerr,
            ),
            (
                "readable after writable",
                vec![(HDR, 16, 0), (DATA, 512, W), (DATA, 512, 0), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "data outside memory",
                vec![(HDR, 16, 0), (0xfe00, 1024, W), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 0),
                &c,
                Some(STATUS),
                ioerr,
            ),
            (
                "read-only disk may read",
                vec![(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
                hdr(VIRTIO_BLK_T_IN, 1),
                &ro,
                Some(STATUS),
                Action::Read {
                    offset: 512,
                    bytes: 512,
                },
            ),
        ];
        for (name, descs, h, c, status, action) in cases {
            let (p, _, _) = run(&descs, h, c);
            assert_eq!(p.status_at, status, "{name}");
            assert_eq!(p.action, action, "{name}");
        }
        // A broken walk: no status at all.
        let mem = GuestRam::from_memory(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
        );
        let p = parse(
            &mem,
            Err(ChainError::Loop),
            &c,
            &mut Vec::new(),
            &mut Vec::new(),
        );
        assert_eq!(p.status_at, None);
    }
}
