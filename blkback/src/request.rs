//! Parsing and validation of blkif requests.
//!
//! Everything here treats the request as hostile: each field is checked
//! before it is trusted, arithmetic is checked, and every failure becomes a
//! [`BlkError`] that is answered with an error response on the ring — never
//! a panic, never an access outside the pages the guest granted.

use shadowback_ring::blkif::{
    BlkifRequest, BlkifRequestSegment, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
    BLKIF_SECTOR_SIZE, BLKIF_SEGS_PER_INDIRECT_FRAME, SECTORS_PER_PAGE,
};
use shadowback_ring::grant::{Access, GrantError, GrantMapper};
use shadowback_ring::RingError;

/// What the backend offers for one disk (the keys it publishes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Capacity in 512-byte sectors (`sectors`).
    pub sectors: u64,
    /// `mode=r`: writes and discards are refused.
    pub readonly: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `feature-max-indirect-segments` (0 = no indirect requests).
    pub max_indirect_segments: u16,
}

/// Default for `feature-max-indirect-segments`: 1 MiB per request.
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u16 = 256;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlkError {
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("operation {0} is not supported by this disk")]
    Unsupported(u8),
    #[error("a data request needs at least one segment")]
    NoSegments,
    #[error("{got} segments exceed the limit of {max}")]
    TooManySegments { got: u32, max: u32 },
    #[error("segment {index}: first_sect {first} / last_sect {last} out of range")]
    BadSegment { index: u32, first: u8, last: u8 },
    #[error("sectors {start}+{count} exceed the disk's {capacity}")]
    BeyondDisk {
        start: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("empty discard")]
    EmptyDiscard,
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("reading an indirect page failed: {0}")]
    IndirectPage(String),
}

impl BlkError {
    /// The blkif status this error is answered with.
    pub fn status(&self) -> i16 {
        match self {
            BlkError::Unsupported(_) => BLKIF_RSP_EOPNOTSUPP,
            _ => BLKIF_RSP_ERROR,
        }
    }
}

/// One contiguous piece of guest memory, as a region byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    pub offset: u64,
    pub len: u32,
}

/// A validated request, ready for the I/O engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// Disk → guest pages.
    Read { sector: u64, bufs: Vec<GuestBuf> },
    /// Guest pages → disk. `then_flush`: a `FLUSH_DISKCACHE` carrying
    /// segments (PROTOCOL.md §5.3): answered only after an `fdatasync`
    /// that follows the write.
    Write {
        sector: u64,
        bufs: Vec<GuestBuf>,
        then_flush: bool,
    },
    /// `FLUSH_DISKCACHE` without segments: everything acknowledged so far
    /// reaches the disk.
    Flush,
    /// Punch a hole.
    Discard { sector: u64, sectors: u64 },
}

impl BlkOp {
    /// Bytes moved by a data op.
    pub fn data_bytes(&self) -> u64 {
        match self {
            BlkOp::Read { bufs, .. } | BlkOp::Write { bufs, .. } => {
                bufs.iter().map(|b| u64::from(b.len)).sum()
            }
            _ => 0,
        }
    }
}

/// Validates `req` against the disk and the guest's grants.
pub fn parse(
    req: &BlkifRequest,
    disk: &DiskGeometry,
    grants: &GrantMapper,
) -> Result<BlkOp, BlkError> {
    parse_reusing(req, disk, grants, Vec::new())
}

/// [`parse`], with the pieces of a read or write put in `bufs` (cleared
/// first): the vector of an earlier request handed back, so that a request
/// of up to as many pieces as it holds allocates nothing.
pub fn parse_reusing(
    req: &BlkifRequest,
    disk: &DiskGeometry,
    grants: &GrantMapper,
    bufs: Vec<GuestBuf>,
) -> Result<BlkOp, BlkError> {
    match req.operation {
        // Without segments a flush touches no sector (any `sector_number`
        // is ignored), so it is fine on a read-only disk too.
        BLKIF_OP_FLUSH_DISKCACHE if req.nr_segments == 0 => Ok(BlkOp::Flush),
        // With segments, a write of them followed by the flush, validated
        // exactly like BLKIF_OP_WRITE (PROTOCOL.md §5.3). Linux blkback
        // runs it as a write with REQ_PREFLUSH; flushing after the write
        // instead also makes the write's own data durable.
        BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_FLUSH_DISKCACHE => {
            let n = usize::from(req.nr_segments);
            if n > BLKIF_MAX_SEGMENTS_PER_REQUEST {
                return Err(BlkError::TooManySegments {
                    got: n as u32,
                    max: BLKIF_MAX_SEGMENTS_PER_REQUEST as u32,
                });
            }
            data_op(
                req.operation,
                req.sector_number,
                &req.seg[..n],
                disk,
                grants,
                bufs,
            )
        }
        BLKIF_OP_INDIRECT => {
            let ind = req.as_indirect();
            if disk.max_indirect_segments == 0 {
                return Err(BlkError::Unsupported(BLKIF_OP_INDIRECT));
            }
            // Only reads and writes, as in Linux blkback: an indirect
            // FLUSH_DISKCACHE (with data or not) is refused (PROTOCOL.md
            // §5.3).
            if ind.indirect_op != BLKIF_OP_READ && ind.indirect_op != BLKIF_OP_WRITE {
                return Err(BlkError::UnknownOp(ind.indirect_op));
            }
            let n = usize::from(ind.nr_segments);
            let max = usize::from(disk.max_indirect_segments)
                .min(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME);
            if n > max {
                return Err(BlkError::TooManySegments {
                    got: n as u32,
                    max: max as u32,
                });
            }
            let segs = read_indirect_segments(&ind.indirect_grefs, n, grants)?;
            data_op(
                ind.indirect_op,
                ind.sector_number,
                &segs,
                disk,
                grants,
                bufs,
            )
        }
        BLKIF_OP_DISCARD => {
            if !disk.discard {
                return Err(BlkError::Unsupported(BLKIF_OP_DISCARD));
            }
            if disk.readonly {
                return Err(BlkError::ReadOnly);
            }
            let d = req.as_discard();
            if d.nr_sectors == 0 {
                return Err(BlkError::EmptyDiscard);
            }
            check_range(d.sector_number, d.nr_sectors, disk)?;
            Ok(BlkOp::Discard {
                sector: d.sector_number,
                sectors: d.nr_sectors,
            })
        }
        // Not offered (no `feature-barrier`): answered EOPNOTSUPP whatever
        // it carries, nothing is written (PROTOCOL.md §5.3).
        BLKIF_OP_WRITE_BARRIER => Err(BlkError::Unsupported(BLKIF_OP_WRITE_BARRIER)),
        op => Err(BlkError::UnknownOp(op)),
    }
}

/// Copies the segment descriptors out of the guest's indirect pages.
fn read_indirect_segments(
    grefs: &[u32],
    n: usize,
    grants: &GrantMapper,
) -> Result<Vec<BlkifRequestSegment>, BlkError> {
    let mut segs = Vec::with_capacity(n);
    let pages = n.div_ceil(BLKIF_SEGS_PER_INDIRECT_FRAME);
    for (page, &gref) in grefs.iter().take(pages).enumerate() {
        let base = grants.map(gref, Access::Read)?;
        let in_page = (n - page * BLKIF_SEGS_PER_INDIRECT_FRAME).min(BLKIF_SEGS_PER_INDIRECT_FRAME);
        let mut raw = vec![0u8; in_page * std::mem::size_of::<BlkifRequestSegment>()];
        grants
            .region()
            .read(base, &mut raw)
            .map_err(|e: RingError| BlkError::IndirectPage(e.to_string()))?;
        segs.extend(raw.chunks_exact(8).map(|c| BlkifRequestSegment {
            gref: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            first_sect: c[4],
            last_sect: c[5],
            _pad: [0; 2],
        }));
    }
    Ok(segs)
}

fn data_op(
    op: u8,
    sector: u64,
    segs: &[BlkifRequestSegment],
    disk: &DiskGeometry,
    grants: &GrantMapper,
    mut bufs: Vec<GuestBuf>,
) -> Result<BlkOp, BlkError> {
    if segs.is_empty() {
        return Err(BlkError::NoSegments);
    }
    let then_flush = op == BLKIF_OP_FLUSH_DISKCACHE;
    let write = op == BLKIF_OP_WRITE || then_flush;
    if write && disk.readonly {
        return Err(BlkError::ReadOnly);
    }
    // A disk read writes into guest memory, a disk write reads from it.
    let access = if write { Access::Read } else { Access::Write };
    bufs.clear();
    bufs.reserve(segs.len());
    let mut total: u64 = 0;
    for (index, seg) in segs.iter().enumerate() {
        if seg.first_sect > seg.last_sect || seg.last_sect >= SECTORS_PER_PAGE {
            return Err(BlkError::BadSegment {
                index: index as u32,
                first: seg.first_sect,
                last: seg.last_sect,
            });
        }
        let frame = grants.map(seg.gref, access)?;
        let buf = GuestBuf {
            offset: frame + u64::from(seg.first_sect) * BLKIF_SECTOR_SIZE,
            len: u32::from(seg.last_sect - seg.first_sect + 1) * BLKIF_SECTOR_SIZE as u32,
        };
        total += u64::from(seg.last_sect - seg.first_sect + 1);
        // Adjacent pieces become one iovec: fewer descriptors for the kernel.
        match bufs.last_mut() {
            Some(last) if last.offset + u64::from(last.len) == buf.offset => last.len += buf.len,
            _ => bufs.push(buf),
        }
    }
    check_range(sector, total, disk)?;
    Ok(if write {
        BlkOp::Write {
            sector,
            bufs,
            then_flush,
        }
    } else {
        BlkOp::Read { sector, bufs }
    })
}

fn check_range(start: u64, count: u64, disk: &DiskGeometry) -> Result<(), BlkError> {
    match start.checked_add(count) {
        Some(end) if end <= disk.sectors => Ok(()),
        _ => Err(BlkError::BeyondDisk {
            start,
            count,
            capacity: disk.sectors,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use shadowback_ring::blkif::{BlkifRequestDiscard, BlkifRequestIndirect};
    use shadowback_ring::grant::{GrantTable, GTF_PERMIT_ACCESS, GTF_SUB_PAGE};
    use shadowback_ring::SharedRegion;

    use super::*;

    const BACKEND: u16 = 0;
    const DISK: DiskGeometry = DiskGeometry {
        sectors: 1024,
        readonly: false,
        discard: true,
        max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
    };

    /// Region of 64 pages; grant table in frame 0. Grants: 1..=40 → frame
    /// 8+gref read-write; 50 read-only; 51 for another domain; 52 to a frame
    /// outside the region; 53 revoked; 54 sub-page; 60/61 indirect pages.
    fn setup() -> (GrantTable, GrantMapper) {
        let region = Arc::new(SharedRegion::create("t", 64).unwrap());
        let table = GrantTable::new(region.clone(), 1).unwrap();
        for g in 1..=40 {
            table.grant(g, BACKEND, 8 + g, false).unwrap();
        }
        table.grant(50, BACKEND, 5, true).unwrap();
        table.grant(51, 9, 5, false).unwrap();
        table.grant(52, BACKEND, 64, false).unwrap();
        table.grant(53, BACKEND, 5, false).unwrap();
        table.end_access(53).unwrap();
        table.grant(54, BACKEND, 5, false).unwrap();
        region
            .store(GTF_PERMIT_ACCESS | GTF_SUB_PAGE, 54 * 8, Ordering::Release)
            .unwrap();
        table.grant(60, BACKEND, 2, true).unwrap();
        table.grant(61, BACKEND, 3, true).unwrap();
        (table, GrantMapper::new(region, 1, BACKEND).unwrap())
    }

    fn seg(gref: u32, first: u8, last: u8) -> BlkifRequestSegment {
        BlkifRequestSegment {
            gref,
            first_sect: first,
            last_sect: last,
            _pad: [0; 2],
        }
    }

    fn rw(op: u8, sector: u64, segs: &[BlkifRequestSegment]) -> BlkifRequest {
        let mut req = BlkifRequest {
            operation: op,
            nr_segments: segs.len() as u8,
            id: 7,
            sector_number: sector,
            ..Default::default()
        };
        req.seg[..segs.len()].copy_from_slice(segs);
        req
    }

    fn with_nr_segments(mut req: BlkifRequest, n: u8) -> BlkifRequest {
        req.nr_segments = n;
        req
    }

    fn indirect(op: u8, sector: u64, nr: u16, grefs: &[u32]) -> BlkifRequest {
        let mut ind = BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: op,
            nr_segments: nr,
            id: 9,
            sector_number: sector,
            ..Default::default()
        };
        ind.indirect_grefs[..grefs.len()].copy_from_slice(grefs);
        BlkifRequest::from_indirect(&ind)
    }

    fn write_indirect_page(grants: &GrantMapper, frame: u64, segs: &[BlkifRequestSegment]) {
        for (i, s) in segs.iter().enumerate() {
            grants
                .region()
                .write_obj(*s, frame * 4096 + i as u64 * 8)
                .unwrap();
        }
    }

    fn discard(sector: u64, n: u64) -> BlkifRequest {
        BlkifRequest::from_discard(&BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            id: 3,
            sector_number: sector,
            nr_sectors: n,
            ..Default::default()
        })
    }

    #[test]
    fn valid_requests_are_parsed() {
        let (_t, grants) = setup();
        let op = parse(
            &rw(BLKIF_OP_READ, 0, &[seg(1, 0, 7), seg(2, 0, 3)]),
            &DISK,
            &grants,
        )
        .unwrap();
        // Frames 9 and 10 are adjacent: one buffer.
        assert_eq!(
            op,
            BlkOp::Read {
                sector: 0,
                bufs: vec![GuestBuf {
                    offset: 9 * 4096,
                    len: 4096 + 2048
                }]
            }
        );
        let op = parse(
            &rw(BLKIF_OP_WRITE, 1012, &[seg(50, 2, 7), seg(3, 0, 5)]),
            &DISK,
            &grants,
        )
        .unwrap();
        let bufs = vec![
            GuestBuf {
                offset: 5 * 4096 + 1024,
                len: 3072,
            },
            GuestBuf {
                offset: 11 * 4096,
                len: 3072,
            },
        ];
        assert_eq!(
            op,
            BlkOp::Write {
                sector: 1012,
                bufs: bufs.clone(),
                then_flush: false,
            }
        );
        assert_eq!(
            parse(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[]), &DISK, &grants),
            Ok(BlkOp::Flush)
        );
        // A flush without data touches no sector: fine on a read-only disk.
        let readonly = DiskGeometry {
            readonly: true,
            ..DISK
        };
        assert_eq!(
            parse(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[]), &readonly, &grants),
            Ok(BlkOp::Flush)
        );
        // With segments it is a write of them, then a flush (PROTOCOL.md
        // §5.3), parsed exactly like BLKIF_OP_WRITE.
        let op = parse(
            &rw(
                BLKIF_OP_FLUSH_DISKCACHE,
                1012,
                &[seg(50, 2, 7), seg(3, 0, 5)],
            ),
            &DISK,
            &grants,
        )
        .unwrap();
        assert_eq!(
            op,
            BlkOp::Write {
                sector: 1012,
                bufs,
                then_flush: true,
            }
        );
        assert_eq!(op.data_bytes(), 6144);
        assert_eq!(
            parse(&discard(1000, 24), &DISK, &grants),
            Ok(BlkOp::Discard {
                sector: 1000,
                sectors: 24
            })
        );
        // 40 segments through two indirect pages... one page holds 512, use 1.
        let segs: Vec<_> = (1..=40).map(|g| seg(g, 0, 7)).collect();
        write_indirect_page(&grants, 2, &segs);
        let op = parse(&indirect(BLKIF_OP_READ, 0, 40, &[60]), &DISK, &grants).unwrap();
        assert_eq!(op.data_bytes(), 40 * 4096);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let (_t, grants) = setup();
        write_indirect_page(&grants, 2, &[seg(1, 0, 7), seg(2, 5, 3)]);
        write_indirect_page(&grants, 3, &[seg(51, 0, 7)]);
        let readonly = DiskGeometry {
            readonly: true,
            ..DISK
        };
        let no_features = DiskGeometry {
            discard: false,
            max_indirect_segments: 0,
            ..DISK
        };
        let mut too_many = rw(BLKIF_OP_READ, 0, &[seg(1, 0, 7)]);
        too_many.nr_segments = 12;
        let cases: Vec<(&str, BlkifRequest, DiskGeometry, BlkError)> = vec![
            (
                "unknown op",
                rw(200, 0, &[seg(1, 0, 7)]),
                DISK,
                BlkError::UnknownOp(200),
            ),
            (
                "reserved op",
                rw(4, 0, &[seg(1, 0, 7)]),
                DISK,
                BlkError::UnknownOp(4),
            ),
            (
                "barrier",
                rw(BLKIF_OP_WRITE_BARRIER, 0, &[]),
                DISK,
                BlkError::Unsupported(2),
            ),
            (
                "no segments",
                rw(BLKIF_OP_READ, 0, &[]),
                DISK,
                BlkError::NoSegments,
            ),
            (
                "12 segments",
                too_many,
                DISK,
                BlkError::TooManySegments { got: 12, max: 11 },
            ),
            (
                "first > last",
                rw(BLKIF_OP_READ, 0, &[seg(1, 4, 3)]),
                DISK,
                BlkError::BadSegment {
                    index: 0,
                    first: 4,
                    last: 3,
                },
            ),
            (
                "last > 7",
                rw(BLKIF_OP_READ, 0, &[seg(1, 0, 7), seg(2, 0, 8)]),
                DISK,
                BlkError::BadSegment {
                    index: 1,
                    first: 0,
                    last: 8,
                },
            ),
            (
                "past the end",
                rw(BLKIF_OP_READ, 1017, &[seg(1, 0, 7)]),
                DISK,
                BlkError::BeyondDisk {
                    start: 1017,
                    count: 8,
                    capacity: 1024,
                },
            ),
            (
                "sector overflow",
                rw(BLKIF_OP_WRITE, u64::MAX - 2, &[seg(1, 0, 7)]),
                DISK,
                BlkError::BeyondDisk {
                    start: u64::MAX - 2,
                    count: 8,
                    capacity: 1024,
                },
            ),
            (
                "grant out of range",
                rw(BLKIF_OP_READ, 0, &[seg(9999, 0, 7)]),
                DISK,
                GrantError::RefOutOfRange {
                    gref: 9999,
                    entries: 512,
                }
                .into(),
            ),
            (
                "grant not permitted",
                rw(BLKIF_OP_READ, 0, &[seg(53, 0, 7)]),
                DISK,
                GrantError::NotPermitted { gref: 53, flags: 0 }.into(),
            ),
            (
                "grant never made",
                rw(BLKIF_OP_WRITE, 0, &[seg(45, 0, 7)]),
                DISK,
                GrantError::NotPermitted { gref: 45, flags: 0 }.into(),
            ),
            (
                "sub-page grant",
                rw(BLKIF_OP_WRITE, 0, &[seg(1, 0, 7), seg(54, 0, 7)]),
                DISK,
                GrantError::BadFlags {
                    gref: 54,
                    flags: GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
                }
                .into(),
            ),
            (
                "grant for another domain",
                rw(BLKIF_OP_WRITE, 0, &[seg(51, 0, 7)]),
                DISK,
                GrantError::WrongDomain {
                    gref: 51,
                    domid: 9,
                    expected: 0,
                }
                .into(),
            ),
            (
                "frame outside region",
                rw(BLKIF_OP_WRITE, 0, &[seg(52, 0, 7)]),
                DISK,
                GrantError::FrameOutOfRange {
                    gref: 52,
                    frame: 64,
                    pages: 64,
                }
                .into(),
            ),
            (
                "read into read-only grant",
                rw(BLKIF_OP_READ, 0, &[seg(50, 0, 7)]),
                DISK,
                GrantError::ReadOnly { gref: 50 }.into(),
            ),
            (
                "flush with data on a read-only disk",
                rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(1, 0, 7)]),
                readonly,
                BlkError::ReadOnly,
            ),
            (
                "flush with 12 segments",
                with_nr_segments(rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(1, 0, 7)]), 12),
                DISK,
                BlkError::TooManySegments { got: 12, max: 11 },
            ),
            (
                "flush with data, first > last",
                rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(1, 0, 7), seg(2, 6, 5)]),
                DISK,
                BlkError::BadSegment {
                    index: 1,
                    first: 6,
                    last: 5,
                },
            ),
            (
                "flush with data past the end",
                rw(BLKIF_OP_FLUSH_DISKCACHE, 1020, &[seg(1, 0, 7)]),
                DISK,
                BlkError::BeyondDisk {
                    start: 1020,
                    count: 8,
                    capacity: 1024,
                },
            ),
            (
                "flush with data from another domain's grant",
                rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(51, 0, 7)]),
                DISK,
                GrantError::WrongDomain {
                    gref: 51,
                    domid: 9,
                    expected: 0,
                }
                .into(),
            ),
            (
                "flush with data from a revoked grant",
                rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(53, 0, 7)]),
                DISK,
                GrantError::NotPermitted { gref: 53, flags: 0 }.into(),
            ),
            (
                "write to read-only disk",
                rw(BLKIF_OP_WRITE, 0, &[seg(1, 0, 7)]),
                readonly,
                BlkError::ReadOnly,
            ),
            (
                "discard on read-only disk",
                discard(0, 8),
                readonly,
                BlkError::ReadOnly,
            ),
            (
                "discard unsupported",
                discard(0, 8),
                no_features,
                BlkError::Unsupported(BLKIF_OP_DISCARD),
            ),
            ("empty discard", discard(0, 0), DISK, BlkError::EmptyDiscard),
            (
                "discard past the end",
                discard(1020, 5),
                DISK,
                BlkError::BeyondDisk {
                    start: 1020,
                    count: 5,
                    capacity: 1024,
                },
            ),
            (
                "discard overflow",
                discard(8, u64::MAX),
                DISK,
                BlkError::BeyondDisk {
                    start: 8,
                    count: u64::MAX,
                    capacity: 1024,
                },
            ),
            (
                "indirect unsupported",
                indirect(BLKIF_OP_READ, 0, 1, &[60]),
                no_features,
                BlkError::Unsupported(BLKIF_OP_INDIRECT),
            ),
            (
                "indirect bad inner op",
                indirect(BLKIF_OP_FLUSH_DISKCACHE, 0, 1, &[60]),
                DISK,
                BlkError::UnknownOp(BLKIF_OP_FLUSH_DISKCACHE),
            ),
            (
                "indirect zero segments",
                indirect(BLKIF_OP_READ, 0, 0, &[60]),
                DISK,
                BlkError::NoSegments,
            ),
            (
                "indirect beyond limit",
                indirect(BLKIF_OP_READ, 0, 257, &[60]),
                DISK,
                BlkError::TooManySegments { got: 257, max: 256 },
            ),
            (
                "indirect bad segment",
                indirect(BLKIF_OP_READ, 0, 2, &[60]),
                DISK,
                BlkError::BadSegment {
                    index: 1,
                    first: 5,
                    last: 3,
                },
            ),
            (
                "indirect page not granted",
                indirect(BLKIF_OP_READ, 0, 1, &[45]),
                DISK,
                GrantError::NotPermitted { gref: 45, flags: 0 }.into(),
            ),
            (
                "indirect data for another domain",
                indirect(BLKIF_OP_WRITE, 0, 1, &[61]),
                DISK,
                GrantError::WrongDomain {
                    gref: 51,
                    domid: 9,
                    expected: 0,
                }
                .into(),
            ),
        ];
        for (name, req, disk, want) in cases {
            assert_eq!(
                parse(&req, &disk, &grants),
                Err(want.clone()),
                "case {name}"
            );
            let status = want.status();
            assert!(status < 0, "case {name} must answer an error status");
        }
        assert_eq!(BlkError::Unsupported(2).status(), BLKIF_RSP_EOPNOTSUPP);
        assert_eq!(BlkError::NoSegments.status(), BLKIF_RSP_ERROR);
    }
}
