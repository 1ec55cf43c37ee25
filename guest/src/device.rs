//! The transport-neutral block device interface.
//!
//! A Xen blkfront and a vhost-user client both implement [`BlockDevice`]; the
//! workloads in [`crate::workload`] only ever see this trait. The model is a
//! submission queue: [`BlockDevice::submit`] queues requests, [`BlockDevice::kick`]
//! publishes them, and [`BlockDevice::poll_completions`] reaps completions in
//! whatever order the backend finishes them.

use std::time::Duration;

/// Size of one sector in bytes. All sector numbers are 512-byte units, as in
/// Xen's blkif protocol, whatever the logical block size of the backing disk.
pub const SECTOR_SIZE: u64 = 512;

/// The kind of a block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockOp {
    /// Read `sectors` sectors starting at `sector`.
    Read,
    /// Write the request's payload at `sector`.
    Write,
    /// Make every previously completed write durable. Has no range.
    Flush,
    /// Deallocate a range; reads of it return zeros afterwards.
    Discard,
}

impl BlockOp {
    /// True for operations that address a sector range (everything but flush).
    pub fn has_range(self) -> bool {
        !matches!(self, BlockOp::Flush)
    }

    /// True for operations that change the disk content of their range.
    pub fn modifies_data(self) -> bool {
        matches!(self, BlockOp::Write | BlockOp::Discard)
    }
}

/// One request handed to [`BlockDevice::submit`].
///
/// The device copies (or grants) `data` during `submit`; the borrow ends when
/// `submit` returns.
#[derive(Clone, Copy, Debug)]
pub struct BlockRequest<'a> {
    /// What to do.
    pub op: BlockOp,
    /// First sector (512-byte units). Ignored for [`BlockOp::Flush`].
    pub sector: u64,
    /// Number of sectors. Zero for [`BlockOp::Flush`].
    pub sectors: u32,
    /// Payload for writes: exactly `sectors * SECTOR_SIZE` bytes.
    pub data: Option<&'a [u8]>,
    /// Reads: copy the data back into the [`Completion`] (verifying
    /// workloads) or not (benchmarks).
    pub want_data: bool,
}

impl<'a> BlockRequest<'a> {
    /// A read of `sectors` sectors at `sector`.
    pub fn read(sector: u64, sectors: u32, want_data: bool) -> Self {
        BlockRequest {
            op: BlockOp::Read,
            sector,
            sectors,
            data: None,
            want_data,
        }
    }

    /// A write of `data` at `sector`; `data.len()` must be a whole number of
    /// sectors that fits in `u32` sectors (checked by the device).
    pub fn write(sector: u64, data: &'a [u8]) -> Self {
        let sectors = u32::try_from(data.len() as u64 / SECTOR_SIZE).unwrap_or(u32::MAX);
        BlockRequest {
            op: BlockOp::Write,
            sector,
            sectors,
            data: Some(data),
            want_data: false,
        }
    }

    /// A flush (no range).
    pub fn flush() -> Self {
        BlockRequest {
            op: BlockOp::Flush,
            sector: 0,
            sectors: 0,
            data: None,
            want_data: false,
        }
    }

    /// A discard of `sectors` sectors at `sector`.
    pub fn discard(sector: u64, sectors: u32) -> Self {
        BlockRequest {
            op: BlockOp::Discard,
            sector,
            sectors,
            data: None,
            want_data: false,
        }
    }

    /// Length of the request's range in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.sectors) * SECTOR_SIZE
    }

    /// The half-open sector range `[start, end)` this request touches, or
    /// `None` for a flush. `end` saturates rather than overflowing.
    pub fn range(&self) -> Option<(u64, u64)> {
        self.op.has_range().then(|| {
            (
                self.sector,
                self.sector.saturating_add(u64::from(self.sectors)),
            )
        })
    }
}

/// Outcome of one request, as reported by the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Done.
    Ok,
    /// The backend failed the request (blkif `BLKIF_RSP_ERROR`).
    IoError,
    /// The backend does not implement the operation (blkif `BLKIF_RSP_EOPNOTSUPP`).
    NotSupported,
}

/// One finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag passed to [`BlockDevice::submit`].
    pub tag: u64,
    /// How it ended.
    pub status: Status,
    /// Read data, for reads submitted with `want_data` that completed
    /// [`Status::Ok`].
    pub data: Option<Vec<u8>>,
}

/// Errors of the device interface itself (not of individual requests, which
/// complete with a [`Status`]).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backend went away and the device cannot be used any more.
    #[error("block device disconnected")]
    Disconnected,
    /// No free slot for another request; reap completions first.
    #[error("block device queue is full")]
    QueueFull,
    /// The request (or a workload configuration) is malformed or out of range.
    #[error("invalid block request: {0}")]
    InvalidRequest(String),
    /// An OS-level failure (event channel, socket, mapping, ...).
    #[error("block device I/O error")]
    Io(#[source] std::io::Error),
    /// A protocol violation or other transport failure.
    #[error("block transport error: {0}")]
    Transport(String),
}

/// A block device driven through a submission/completion queue.
pub trait BlockDevice {
    /// Size of the device in 512-byte sectors.
    fn capacity_sectors(&self) -> u64;

    /// How many requests the transport can hold in flight at once.
    fn max_in_flight(&self) -> usize;

    /// Largest request in sectors (e.g. 256 = 128 KiB).
    fn max_request_sectors(&self) -> u32;

    /// Whether [`BlockOp::Discard`] is implemented.
    fn supports_discard(&self) -> bool;

    /// Whether [`BlockOp::Flush`] is implemented.
    fn supports_flush(&self) -> bool;

    /// Queue one request (may not be visible to the backend until `kick`).
    ///
    /// On error the request was not queued and no completion will be
    /// delivered for `tag`.
    fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError>;

    /// How many hardware queues (virtqueues, rings) requests can be steered
    /// to with [`submit_to`](Self::submit_to); 1 for single-queue
    /// transports.
    fn queues(&self) -> usize {
        1
    }

    /// Like [`submit`](Self::submit), on queue `queue` (`< queues()`)
    /// rather than wherever the device would put it. The round pattern of
    /// [`crate::workload`] uses it so each queue drains on its own.
    /// [`DeviceError::QueueFull`] means *that* queue is full. Devices with
    /// one queue need not override it; wrappers must forward both.
    fn submit_to(
        &mut self,
        queue: usize,
        tag: u64,
        req: &BlockRequest<'_>,
    ) -> Result<(), DeviceError> {
        if queue >= self.queues() {
            return Err(DeviceError::InvalidRequest(format!(
                "queue {queue} of {}",
                self.queues()
            )));
        }
        self.submit(tag, req)
    }

    /// Publish queued requests and notify the backend if it asked for it.
    fn kick(&mut self) -> Result<(), DeviceError>;

    /// Append completions to `out`; block up to `timeout` for at least one if
    /// none is ready.
    fn poll_completions(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<(), DeviceError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_constructors_describe_their_range() {
        let data = vec![0u8; 4096];
        let w = BlockRequest::write(16, &data);
        assert_eq!(w.sectors, 8);
        assert_eq!(w.range(), Some((16, 24)));
        assert_eq!(w.bytes(), 4096);
        assert_eq!(BlockRequest::flush().range(), None);
        assert!(BlockOp::Discard.modifies_data());
        assert!(!BlockOp::Read.modifies_data());
        assert_eq!(
            BlockRequest::read(u64::MAX, 8, true).range(),
            Some((u64::MAX, u64::MAX))
        );
    }
}
