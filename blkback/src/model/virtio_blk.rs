//! The block model over virtqueues: virtio-blk chains parsed against the
//! disk ([`crate::virtio::request`]), answered with a status byte in
//! guest memory and a used element.

use std::sync::Arc;

use shadowback_dataplane::control::poisoned;
use shadowback_dataplane::model::{DeviceModel, Footprint, Started, Submit};
use shadowback_dataplane::rings::Detail;
use shadowback_dataplane::uring::{IoBuffers, IoOp};
use shadowback_virtio::memory::GuestRam;

use super::{DiskIo, Outcome};
use crate::virtio::queues::{Head, Used, VirtQueues};
use crate::virtio::request::{
    parse, Action, BlkConfig, Parsed, MAX_DISCARD_SEG, SECTOR_SIZE, STATUS_IOERR, STATUS_OK,
    STATUS_UNSUPP,
};

/// The block model of one virtio-blk device.
pub struct VirtioBlkModel {
    device: String,
    blk: BlkConfig,
    mem: Arc<GuestRam>,
    /// Scratch of the request parsed last: its guest data pieces and disk
    /// byte ranges.
    data: Vec<(u64, usize)>,
    ranges: Vec<(u64, u64)>,
}

impl VirtioBlkModel {
    pub fn new(device: String, blk: BlkConfig, mem: Arc<GuestRam>) -> Self {
        VirtioBlkModel {
            device,
            blk,
            mem,
            data: Vec::with_capacity(crate::virtio::request::CHAIN_CAP),
            ranges: Vec::with_capacity(MAX_DISCARD_SEG as usize),
        }
    }

    /// Writes `status` and returns the used element for `head`: `len`
    /// bytes written, or 0 when the chain has no usable status byte.
    fn answer(&self, head: u16, status_at: Option<u64>, status: u8, len: u32) -> Used {
        let len = match status_at {
            Some(at) if self.mem.write(at, &[status]).is_ok() => len,
            _ => 0,
        };
        Used { head, len, status }
    }
}

impl VirtioBlkModel {
    /// Puts the ops of the request in `head` on the engine; answers it with
    /// IOERR at once if none could be.
    fn submit(
        &self,
        head: u16,
        status_at: Option<u64>,
        used_len: u32,
        mut disk: DiskIo,
        ops: impl IntoIterator<Item = IoOp>,
        io: &mut Submit<'_>,
    ) -> Started<Pending, Used> {
        if !disk.submit(ops, io, &self.device) {
            return Started::Done(self.answer(head, status_at, STATUS_IOERR, 1));
        }
        Started::Pending(Pending {
            head,
            status_at,
            used_len,
            io: disk,
        })
    }
}

/// A parsed virtio-blk request (its data pieces and ranges are the
/// model's scratch until it starts).
pub struct Request {
    head: u16,
    parsed: Parsed,
}

/// A virtio-blk request on the engine.
pub struct Pending {
    head: u16,
    status_at: Option<u64>,
    /// Used length on success (data read + status byte).
    used_len: u32,
    io: DiskIo,
}

impl DeviceModel<VirtQueues> for VirtioBlkModel {
    type Request = Request;
    type Pending = Pending;
    /// One op per discard or write-zeroes segment.
    const MAX_OPS: usize = MAX_DISCARD_SEG as usize;

    fn parse(&mut self, rings: &VirtQueues, _ring: usize, head: &Head) -> Request {
        let parsed = parse(
            &self.mem,
            rings.walked(),
            &self.blk,
            &mut self.data,
            &mut self.ranges,
        );
        Request {
            head: head.head,
            parsed,
        }
    }

    /// The request header.
    fn detail(&self, req: &Request) -> Detail {
        req.parsed.header.to_bytes()
    }

    fn cost(&self, req: &Request) -> u64 {
        match req.parsed.action {
            Action::Read { bytes, .. } | Action::Write { bytes, .. } => bytes,
            _ => 0,
        }
    }

    fn resize(&mut self, sectors: u64) {
        self.blk.sectors = sectors;
    }

    /// Discard and write-zeroes ranges are the model's scratch of the
    /// request parsed last, which is `req` here.
    fn footprint(&self, req: &Request) -> Footprint {
        match req.parsed.action {
            Action::Read { offset, bytes } => Footprint::range(offset, bytes, false),
            Action::Write { offset, bytes } => Footprint::range(offset, bytes, true),
            Action::Flush => Footprint::FLUSH,
            Action::Discard | Action::WriteZeroes { .. } => self
                .ranges
                .iter()
                .fold(Footprint::NONE, |f, &(offset, len)| {
                    f.union(Footprint::range(offset, len, true))
                }),
            Action::Done(_) | Action::GetId { .. } => Footprint::NONE,
        }
    }

    fn poisoned(&self, req: &Request, poison: &[u64]) -> bool {
        let hit = |start: u64, sectors: u64| poisoned(poison, start, sectors);
        match req.parsed.action {
            Action::Read { offset, bytes } | Action::Write { offset, bytes } => {
                hit(offset / SECTOR_SIZE, bytes / SECTOR_SIZE)
            }
            Action::Discard | Action::WriteZeroes { .. } => self
                .ranges
                .iter()
                .any(|&(o, l)| hit(o / SECTOR_SIZE, l / SECTOR_SIZE)),
            _ => false,
        }
    }

    fn start(&mut self, req: Request, io: &mut Submit<'_>) -> Started<Pending, Used> {
        let Request { head, parsed } = req;
        let status_at = parsed.status_at;
        let mut used_len = 1;
        let mut disk = DiskIo::new(0, false, false);
        // Each arm answers at once or puts its ops on the engine (without
        // collecting them: nothing is allocated per request).
        let status = match parsed.action {
            Action::Done(status) => status,
            Action::GetId { bytes } => {
                let mut at = 0usize;
                let mut ok = true;
                for &(gpa, len) in &self.data {
                    let end = (at + len).min(self.blk.serial.len());
                    ok &= self.mem.write(gpa, &self.blk.serial[at..end]).is_ok();
                    at = end;
                }
                used_len = bytes + 1;
                if ok {
                    STATUS_OK
                } else {
                    STATUS_IOERR
                }
            }
            Action::Read { offset, bytes } | Action::Write { offset, bytes } => {
                let read = matches!(parsed.action, Action::Read { .. });
                match IoBuffers::from_ranges(self.mem.clone(), &self.data) {
                    Ok(bufs) => {
                        disk = DiskIo::new(bytes, read, false);
                        let op = if read {
                            // The walk bounds a chain to 4 GiB.
                            used_len = u32::try_from(bytes + 1).unwrap_or(u32::MAX);
                            IoOp::Readv { offset, bufs }
                        } else {
                            IoOp::Writev { offset, bufs }
                        };
                        return self.submit(head, status_at, used_len, disk, [op], io);
                    }
                    Err(e) => {
                        tracing::warn!(device = %self.device, error = %e, "buffer setup failed");
                        STATUS_IOERR
                    }
                }
            }
            Action::Flush => {
                return self.submit(head, status_at, used_len, disk, [IoOp::Fsync], io);
            }
            Action::Discard | Action::WriteZeroes { .. } if !self.ranges.is_empty() => {
                let punch = matches!(
                    parsed.action,
                    Action::Discard | Action::WriteZeroes { unmap: true }
                );
                let ops = std::mem::take(&mut self.ranges);
                let started = self.submit(
                    head,
                    status_at,
                    used_len,
                    disk,
                    ops.iter().map(|&(offset, len)| {
                        if punch {
                            IoOp::PunchHole { offset, len }
                        } else {
                            IoOp::ZeroRange { offset, len }
                        }
                    }),
                    io,
                );
                self.ranges = ops;
                return started;
            }
            Action::Discard | Action::WriteZeroes { .. } => STATUS_OK,
        };
        let len = if status == STATUS_OK { used_len } else { 1 };
        Started::Done(self.answer(head, status_at, status, len))
    }

    fn complete(&mut self, p: &mut Pending, result: i32, io: &mut Submit<'_>) -> Option<Used> {
        let status = match p.io.complete(result, io, &self.device)? {
            Outcome::Done => STATUS_OK,
            // Only a request that moves no data is unsupported (a
            // discard, write-zeroes or flush).
            Outcome::Unsupported { moved_data: false } => STATUS_UNSUPP,
            Outcome::Failed | Outcome::Unsupported { moved_data: true } => STATUS_IOERR,
        };
        let len = if status == STATUS_OK { p.used_len } else { 1 };
        Some(self.answer(p.head, p.status_at, status, len))
    }

    /// The chain was walked again ([`VirtQueues::reload`]): its status byte
    /// gets IOERR.
    fn fail(&mut self, rings: &VirtQueues, ring: usize, head: &Head) -> Used {
        let req = self.parse(rings, ring, head);
        self.answer(head.head, req.parsed.status_at, STATUS_IOERR, 1)
    }

    fn is_error(&self, used: &Used) -> bool {
        used.status != STATUS_OK
    }
}
