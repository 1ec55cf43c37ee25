//! The block model over a Xen ring: blkif requests validated against the
//! disk and the guest's grants ([`crate::request`]), answered with blkif
//! responses.

use std::sync::Arc;

use shadowback_dataplane::control::poisoned;
use shadowback_dataplane::model::{DeviceModel, Footprint, Started, Submit};
use shadowback_dataplane::rings::{Detail, DETAIL_SIZE};
use shadowback_dataplane::uring::{EngineError, IoBuffers, IoOp};
use shadowback_ring::blkif::{
    BlkifRequest, BlkifResponse, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_INDIRECT,
    BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_SECTOR_SIZE,
};
use shadowback_ring::grant::GrantMapper;
use shadowback_ring::SharedRegion;
use shadowback_shadow::REQUEST_SIZE;
use vm_memory::ByteValued;

use super::{DiskIo, Outcome};
use crate::record;
use crate::request::{parse_reusing, BlkOp, DiskGeometry, GuestBuf};
use crate::xen::{response_from, XenRing};

/// The block model of one Xen frontend.
pub struct BlkifModel {
    device: String,
    disk: DiskGeometry,
    grants: GrantMapper,
    region: Arc<SharedRegion>,
    /// The pieces vector of the request started last, handed to the next
    /// parse, and the scratch its iovecs are built from: the hot path
    /// allocates nothing (docs/ARCHITECTURE.md §11.2).
    spare: Vec<GuestBuf>,
    ranges: Vec<(u64, usize)>,
}

impl BlkifModel {
    pub fn new(
        device: String,
        disk: DiskGeometry,
        grants: GrantMapper,
        region: Arc<SharedRegion>,
    ) -> Self {
        BlkifModel {
            device,
            disk,
            grants,
            region,
            spare: Vec::with_capacity(BLKIF_MAX_SEGMENTS_PER_REQUEST),
            ranges: Vec::with_capacity(BLKIF_MAX_SEGMENTS_PER_REQUEST),
        }
    }

    /// The iovecs of `bufs`, checked against the mapping; `bufs` becomes
    /// the next parse's vector.
    fn io_buffers(&mut self, mut bufs: Vec<GuestBuf>) -> Result<IoBuffers, EngineError> {
        self.ranges.clear();
        self.ranges
            .extend(bufs.iter().map(|b| (b.offset, b.len as usize)));
        bufs.clear();
        self.spare = bufs;
        IoBuffers::from_ranges(self.region.clone(), &self.ranges)
    }
}

/// A parsed blkif request.
pub struct Parsed {
    id: u64,
    /// What the response carries: an indirect request is answered with
    /// its inner operation, as Linux blkback does.
    operation: u8,
    /// The disk op, or the status it is refused with.
    op: Result<BlkOp, i16>,
}

/// A blkif request on the engine.
pub struct Pending {
    id: u64,
    operation: u8,
    io: DiskIo,
}

fn answer(id: u64, operation: u8, status: i16) -> BlkifResponse {
    BlkifResponse {
        id,
        operation,
        status,
        ..Default::default()
    }
}

impl DeviceModel<XenRing> for BlkifModel {
    type Request = Parsed;
    type Pending = Pending;
    /// The write of a `FLUSH_DISKCACHE` with segments and its flush run
    /// one after the other.
    const MAX_OPS: usize = 1;

    fn parse(&mut self, _rings: &XenRing, _ring: usize, req: &BlkifRequest) -> Parsed {
        let operation = if req.operation == BLKIF_OP_INDIRECT {
            req.as_indirect().indirect_op
        } else {
            req.operation
        };
        let bufs = std::mem::take(&mut self.spare);
        let op = parse_reusing(req, &self.disk, &self.grants, bufs).map_err(|e| {
            tracing::debug!(device = %self.device, id = req.id, error = %e, "request refused");
            e.status()
        });
        Parsed {
            id: req.id,
            operation,
            op,
        }
    }

    /// The Xen ring's record is the request itself.
    fn detail(&self, _req: &Parsed) -> Detail {
        [0; DETAIL_SIZE]
    }

    fn cost(&self, req: &Parsed) -> u64 {
        req.op.as_ref().map_or(0, BlkOp::data_bytes)
    }

    fn resize(&mut self, sectors: u64) {
        self.disk.sectors = sectors;
    }

    fn footprint(&self, req: &Parsed) -> Footprint {
        let bytes = |sector: u64| sector.saturating_mul(BLKIF_SECTOR_SIZE);
        match &req.op {
            Ok(BlkOp::Read { sector, bufs }) => {
                let len = bufs.iter().map(|b| u64::from(b.len)).sum();
                Footprint::range(bytes(*sector), len, false)
            }
            Ok(BlkOp::Write {
                sector,
                bufs,
                then_flush,
            }) => {
                let len = bufs.iter().map(|b| u64::from(b.len)).sum();
                let write = Footprint::range(bytes(*sector), len, true);
                if *then_flush {
                    write.union(Footprint::FLUSH)
                } else {
                    write
                }
            }
            Ok(BlkOp::Flush) => Footprint::FLUSH,
            Ok(BlkOp::Discard { sector, sectors }) => {
                Footprint::range(bytes(*sector), bytes(*sectors), true)
            }
            Err(_) => Footprint::NONE,
        }
    }

    fn poisoned(&self, req: &Parsed, poison: &[u64]) -> bool {
        let range = match &req.op {
            Ok(BlkOp::Read { sector, bufs }) | Ok(BlkOp::Write { sector, bufs, .. }) => {
                let len: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                Some((*sector, len / BLKIF_SECTOR_SIZE))
            }
            Ok(BlkOp::Discard { sector, sectors }) => Some((*sector, *sectors)),
            _ => None,
        };
        range.is_some_and(|(start, n)| poisoned(poison, start, n))
    }

    fn start(&mut self, req: Parsed, io: &mut Submit<'_>) -> Started<Pending, BlkifResponse> {
        let (id, operation) = (req.id, req.operation);
        let op = match req.op {
            Ok(op) => op,
            Err(status) => return Started::Done(answer(id, operation, status)),
        };
        let mut disk = DiskIo::new(
            op.data_bytes(),
            matches!(op, BlkOp::Read { .. }),
            matches!(
                op,
                BlkOp::Write {
                    then_flush: true,
                    ..
                }
            ),
        );
        let disk_op = match op {
            BlkOp::Read { sector, bufs } => self.io_buffers(bufs).map(|b| IoOp::Readv {
                offset: sector * BLKIF_SECTOR_SIZE,
                bufs: b,
            }),
            BlkOp::Write { sector, bufs, .. } => self.io_buffers(bufs).map(|b| IoOp::Writev {
                offset: sector * BLKIF_SECTOR_SIZE,
                bufs: b,
            }),
            BlkOp::Flush => Ok(IoOp::Fsync),
            BlkOp::Discard { sector, sectors } => Ok(IoOp::PunchHole {
                offset: sector * BLKIF_SECTOR_SIZE,
                len: sectors * BLKIF_SECTOR_SIZE,
            }),
        };
        let disk_op = match disk_op {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!(device = %self.device, id, error = %e, "buffer setup failed");
                return Started::Done(answer(id, operation, BLKIF_RSP_ERROR));
            }
        };
        if !disk.submit([disk_op], io, &self.device) {
            return Started::Done(answer(id, operation, BLKIF_RSP_ERROR));
        }
        Started::Pending(Pending {
            id,
            operation,
            io: disk,
        })
    }

    fn complete(
        &mut self,
        p: &mut Pending,
        result: i32,
        io: &mut Submit<'_>,
    ) -> Option<BlkifResponse> {
        let status = match p.io.complete(result, io, &self.device)? {
            Outcome::Done => BLKIF_RSP_OKAY,
            Outcome::Failed => BLKIF_RSP_ERROR,
            Outcome::Unsupported { .. } => BLKIF_RSP_EOPNOTSUPP,
        };
        Some(answer(p.id, p.operation, status))
    }

    /// Answered from the saved bytes alone: a corrupt request may not
    /// parse.
    fn fail(&mut self, _rings: &XenRing, _ring: usize, req: &BlkifRequest) -> BlkifResponse {
        let mut saved = [0u8; REQUEST_SIZE];
        saved.copy_from_slice(req.as_slice());
        response_from(&record::blkif::error_response(&saved))
    }

    fn is_error(&self, rsp: &BlkifResponse) -> bool {
        rsp.status != BLKIF_RSP_OKAY
    }
}
