//! blkif: a guest's grant table, ring contents and indices, consumed with
//! [`BackRing`] and validated with [`shadowback_blkback::request::parse`],
//! as the Xen data plane does.
//!
//! Region layout: frame 0 the grant table, frames 1..=4 the ring (1, 2 or
//! 4 pages, in any order), frames 5 and 6 indirect segment pages, the rest data pages
//! (grants may name any frame, as a guest's may).

use std::sync::Arc;

use arbitrary::{Result, Unstructured};
use shadowback_blkback::request::{parse, BlkOp, DiskGeometry};
use shadowback_ring::blkif::{
    Blkif, BlkifRequest, BlkifResponse, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
};
use shadowback_ring::grant::{GrantMapper, GTF_PERMIT_ACCESS, GTF_READONLY};
use shadowback_ring::sring::{BackRing, RingPages};
use shadowback_ring::{SharedRegion, PAGE_SIZE};
use vm_memory::ByteValued;

const REGION_PAGES: u32 = 48;
const RING_FRAME: u32 = 1;
const INDIRECT_FRAMES: [u32; 2] = [5, 6];
const BACKEND: u16 = 0;
/// Guest rounds (write slots, bump req_prod, backend consumes) per input.
const MAX_ROUNDS: u32 = 8;

/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = run_input(&mut Unstructured::new(data));
}

fn run_input(u: &mut Unstructured) -> Result<()> {
    let disk = DiskGeometry {
        sectors: if u.ratio(1, 8)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=4096)?
        },
        readonly: u.ratio(1, 4)?,
        discard: u.arbitrary()?,
        max_indirect_segments: *u.choose(&[0, 8, 256, 1024, u16::MAX])?,
    };
    let Ok(region) = SharedRegion::create("fuzz-blkif", REGION_PAGES) else {
        return Ok(());
    };
    let region = Arc::new(region);
    for _ in 0..u.int_in_range(0..=48)? {
        let gref: u32 = u.int_in_range(0..=70)?;
        let flags: u16 = match u.int_in_range(0..=3)? {
            0 | 1 => GTF_PERMIT_ACCESS,
            2 => GTF_PERMIT_ACCESS | GTF_READONLY,
            _ => u.arbitrary()?,
        };
        let domid: u16 = if u.ratio(7, 8)? {
            BACKEND
        } else {
            u.arbitrary()?
        };
        let frame: u32 = if u.ratio(7, 8)? {
            u.int_in_range(0..=REGION_PAGES)?
        } else {
            u.arbitrary()?
        };
        let mut entry = [0u8; 8];
        entry[..2].copy_from_slice(&flags.to_ne_bytes());
        entry[2..4].copy_from_slice(&domid.to_ne_bytes());
        entry[4..].copy_from_slice(&frame.to_ne_bytes());
        let _ = region.write(u64::from(gref) * 8, &entry);
    }
    for _ in 0..u.int_in_range(0..=16)? {
        let frame = *u.choose(&INDIRECT_FRAMES)?;
        let index = u.int_in_range(0..=BLKIF_SEGS_PER_INDIRECT_FRAME as u64 - 1)?;
        let seg = segment(u)?;
        let _ = region.write(u64::from(frame) * PAGE_SIZE as u64 + index * 8, &seg);
    }
    let Ok(grants) = GrantMapper::new(region.clone(), 1, BACKEND) else {
        return Ok(());
    };
    // 1, 2 or 4 ring pages, contiguous or any frames of 1..=4 (a guest
    // may even name one page twice).
    let count = 1usize << u.int_in_range(0..=2)?;
    let frames: Vec<u32> = if u.arbitrary()? {
        (0..count as u32).map(|i| RING_FRAME + i).collect()
    } else {
        (0..count)
            .map(|_| u.int_in_range(RING_FRAME..=RING_FRAME + 3))
            .collect::<Result<_>>()?
    };
    let offsets: Vec<u64> = frames
        .iter()
        .map(|&f| u64::from(f) * PAGE_SIZE as u64)
        .collect();
    let Ok(ring_pages) = RingPages::new(region.clone(), offsets.clone()) else {
        return Ok(());
    };
    let base: u32 = u.arbitrary()?;
    let ahead: u32 = u.int_in_range(0..=130)?;
    let mut back = match if u.arbitrary()? {
        BackRing::<Blkif>::attach_at(ring_pages, base.wrapping_add(ahead), base)
    } else {
        BackRing::<Blkif>::attach(ring_pages)
    } {
        Ok(b) => b,
        Err(_) => return Ok(()),
    };
    let size = back.size();
    let guest = Guest {
        region: &region,
        pages: offsets,
    };
    let mut req_prod = back.req_cons();
    let mut taken = 0u32;
    for _ in 0..u.int_in_range(1..=MAX_ROUNDS)? {
        for _ in 0..u.int_in_range(0..=size.min(40))? {
            let req = request(u)?;
            guest.put(size, req_prod, &req);
            req_prod = req_prod.wrapping_add(1);
        }
        let published = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            req_prod
        };
        guest.publish(published);
        let pending = match back.unconsumed_requests() {
            Ok(n) => n,
            Err(_) => return Ok(()),
        };
        assert!(pending <= size, "{pending} unconsumed on a ring of {size}");
        for _ in 0..pending {
            let Ok((_, req)) = back.take_request() else {
                return Ok(());
            };
            taken += 1;
            assert!(
                taken <= MAX_ROUNDS * size,
                "consumed more than was published"
            );
            if let Ok(op) = parse(&req, &disk, &grants) {
                check(&op, &req, &disk);
            }
            let rsp = BlkifResponse {
                id: req.id,
                operation: req.operation,
                ..Default::default()
            };
            if back.put_response(&rsp).is_err() {
                return Ok(());
            }
        }
        let _ = back.push_responses();
        let _ = back.final_check_for_requests();
    }
    Ok(())
}

/// The guest's writes to its ring, through the region (the fuzz input may
/// leave the ring in any state; no `FrontRing` bookkeeping applies).
struct Guest<'a> {
    region: &'a SharedRegion,
    /// Region offset of each ring page, in ring order.
    pages: Vec<u64>,
}

impl Guest<'_> {
    /// Writes `bytes` at ring offset `at`, split at page boundaries.
    fn write(&self, at: usize, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let (page, in_page) = ((at + done) / PAGE_SIZE, (at + done) % PAGE_SIZE);
            let n = (PAGE_SIZE - in_page).min(bytes.len() - done);
            if let Some(base) = self.pages.get(page) {
                let _ = self
                    .region
                    .write(base + in_page as u64, &bytes[done..done + n]);
            }
            done += n;
        }
    }

    fn put(&self, size: u32, idx: u32, req: &BlkifRequest) {
        let entry = std::mem::size_of::<BlkifRequest>();
        self.write(64 + (idx & (size - 1)) as usize * entry, req.as_slice());
    }

    fn publish(&self, req_prod: u32) {
        self.write(0, &req_prod.to_ne_bytes());
    }
}

fn segment(u: &mut Unstructured) -> Result<[u8; 8]> {
    let gref: u32 = if u.ratio(7, 8)? {
        u.int_in_range(0..=70)?
    } else {
        u.arbitrary()?
    };
    let (first, last): (u8, u8) = if u.ratio(7, 8)? {
        (u.int_in_range(0..=8)?, u.int_in_range(0..=8)?)
    } else {
        (u.arbitrary()?, u.arbitrary()?)
    };
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&gref.to_ne_bytes());
    b[4] = first;
    b[5] = last;
    Ok(b)
}

/// A request biased towards the ones that get past the first checks.
fn request(u: &mut Unstructured) -> Result<BlkifRequest> {
    let mut raw = [0u8; std::mem::size_of::<BlkifRequest>()];
    u.fill_buffer(&mut raw)?;
    let mut req = BlkifRequest::default();
    req.as_mut_slice().copy_from_slice(&raw);
    if u.ratio(1, 8)? {
        return Ok(req);
    }
    let any_op: u8 = u.arbitrary()?;
    req.operation = *u.choose(&[
        BLKIF_OP_READ,
        BLKIF_OP_WRITE,
        BLKIF_OP_FLUSH_DISKCACHE,
        BLKIF_OP_DISCARD,
        BLKIF_OP_INDIRECT,
        BLKIF_OP_WRITE_BARRIER,
        any_op,
    ])?;
    if req.operation == BLKIF_OP_INDIRECT {
        let mut ind = req.as_indirect();
        let any_op: u8 = u.arbitrary()?;
        ind.indirect_op = *u.choose(&[BLKIF_OP_READ, BLKIF_OP_WRITE, any_op])?;
        ind.nr_segments = if u.ratio(7, 8)? {
            u.int_in_range(0..=600)?
        } else {
            u.arbitrary()?
        };
        ind.sector_number = u.int_in_range(0..=5000)?;
        for g in ind.indirect_grefs.iter_mut() {
            *g = u.int_in_range(0..=70)?;
        }
        return Ok(BlkifRequest::from_indirect(&ind));
    }
    if req.operation == BLKIF_OP_DISCARD {
        let mut d = req.as_discard();
        d.sector_number = u.int_in_range(0..=5000)?;
        d.nr_sectors = u.int_in_range(0..=5000)?;
        return Ok(BlkifRequest::from_discard(&d));
    }
    req.nr_segments = u.int_in_range(0..=12)?;
    req.sector_number = u.int_in_range(0..=5000)?;
    for s in req.seg.iter_mut() {
        let b = segment(u)?;
        s.gref = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        s.first_sect = b[4];
        s.last_sect = b[5];
    }
    Ok(req)
}

/// What a validated request promises: inside the disk, inside the
/// region's data pages, no write on a read-only disk, the op the request
/// named.
fn check(op: &BlkOp, req: &BlkifRequest, disk: &DiskGeometry) {
    let region_end = u64::from(REGION_PAGES) * PAGE_SIZE as u64;
    match op {
        BlkOp::Read { sector, bufs } | BlkOp::Write { sector, bufs, .. } => {
            assert!(!bufs.is_empty(), "data op without buffers: {req:?}");
            let bytes = op.data_bytes();
            assert!(
                bytes > 0 && bytes.is_multiple_of(512),
                "{bytes} bytes: {req:?}"
            );
            let end = sector.checked_add(bytes / 512).expect("sector overflow");
            assert!(end <= disk.sectors, "beyond the disk: {op:?} {disk:?}");
            for b in bufs {
                assert!(b.offset.is_multiple_of(512), "unaligned buffer {b:?}");
                assert!(
                    b.offset + u64::from(b.len) <= region_end,
                    "buffer {b:?} beyond the region"
                );
            }
            let write = matches!(op, BlkOp::Write { .. });
            assert!(!(write && disk.readonly), "write on a read-only disk");
            let named = if req.operation == BLKIF_OP_INDIRECT {
                req.as_indirect().indirect_op
            } else {
                req.operation
            };
            let expect_write = named == BLKIF_OP_WRITE || named == BLKIF_OP_FLUSH_DISKCACHE;
            assert_eq!(write, expect_write, "op {named} became {op:?}");
        }
        BlkOp::Flush => {
            assert_eq!(req.operation, BLKIF_OP_FLUSH_DISKCACHE);
            assert_eq!(req.nr_segments, 0);
        }
        BlkOp::Discard { sector, sectors } => {
            assert_eq!(req.operation, BLKIF_OP_DISCARD);
            assert!(disk.discard && !disk.readonly);
            assert!(*sectors > 0);
            assert!(sector
                .checked_add(*sectors)
                .is_some_and(|e| e <= disk.sectors));
        }
    }
}
