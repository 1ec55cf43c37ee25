//! The block model (docs/ARCHITECTURE.md §11.2): what a block request
//! does to the disk, for each wire format. Parsing is per wire (blkif
//! segments and grants; a virtio-blk chain); running the disk ops and
//! judging their results is the same for both, here.
//!
//! - [`blkif`]: the model over a Xen ring;
//! - [`virtio_blk`]: the model over virtqueues.

pub mod blkif;
pub mod virtio_blk;

use shadowback_dataplane::model::Submit;
use shadowback_dataplane::uring::IoOp;

/// The disk ops of one request on the engine, and what they returned so
/// far.
#[derive(Clone, Copy, Debug)]
pub struct DiskIo {
    /// Ops not completed yet.
    ops_left: u16,
    /// Bytes each data op must transfer (0: a result of 0 is success).
    expected: u64,
    /// Data moves into guest memory (a read).
    read: bool,
    /// A `FLUSH_DISKCACHE` with segments whose write is in flight: once it
    /// has written everything, an `fdatasync` follows and only its result
    /// counts (PROTOCOL.md §5.3).
    then_flush: bool,
    /// An op failed, was refused, or moved fewer bytes than asked.
    failed: bool,
    /// An op returned `-EOPNOTSUPP`.
    unsupported: bool,
}

impl DiskIo {
    pub fn new(expected: u64, read: bool, then_flush: bool) -> Self {
        DiskIo {
            ops_left: 0,
            expected,
            read,
            then_flush,
            failed: false,
            unsupported: false,
        }
    }

    /// Puts `ops` in flight; an op the engine refuses fails the request
    /// (the engine is sized with room to spare: the kernel refused).
    /// Returns whether any op is in flight.
    pub fn submit(
        &mut self,
        ops: impl IntoIterator<Item = IoOp>,
        io: &mut Submit<'_>,
        device: &str,
    ) -> bool {
        for op in ops {
            match io.push(op) {
                Ok(()) => self.ops_left += 1,
                Err((e, _op)) => {
                    tracing::warn!(device, error = %e, "submission failed");
                    self.failed = true;
                }
            }
        }
        self.ops_left > 0
    }

    /// One op completed with `result`; the outcome once the request is
    /// done (its bytes counted if it succeeded).
    pub fn complete(&mut self, result: i32, io: &mut Submit<'_>, device: &str) -> Option<Outcome> {
        if result < 0 {
            self.failed = true;
            self.unsupported |= result == -libc::EOPNOTSUPP;
        } else if u64::from(result as u32) != self.expected {
            self.failed = true;
        }
        if self.failed {
            tracing::debug!(device, result, "I/O failed");
        }
        self.ops_left = self.ops_left.saturating_sub(1);
        if self.ops_left > 0 {
            return None;
        }
        if !self.failed && self.then_flush {
            // The write is complete; the flush runs under the same token
            // and its result is the answer.
            io.traffic().from_guest += self.expected;
            self.expected = 0;
            self.then_flush = false;
            if self.submit([IoOp::Fsync], io, device) {
                return None;
            }
        }
        if !self.failed {
            let traffic = io.traffic();
            if self.read {
                traffic.to_guest += self.expected;
            } else {
                traffic.from_guest += self.expected;
            }
        }
        Some(if self.unsupported {
            Outcome::Unsupported {
                moved_data: self.expected > 0,
            }
        } else if self.failed {
            Outcome::Failed
        } else {
            Outcome::Done
        })
    }
}

/// How a request's disk ops ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// An op failed, was refused, or moved fewer bytes than asked.
    Failed,
    /// An op returned `-EOPNOTSUPP`; `moved_data`: the request reads or
    /// writes data (else it is a flush, discard or write-zeroes).
    Unsupported {
        moved_data: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_dataplane::model::Traffic;
    use shadowback_dataplane::uring::{Engine, EngineConfig};

    /// An engine whose ops are only queued: the tests feed `complete` the
    /// results themselves.
    fn engine() -> Engine {
        Engine::for_polls(&EngineConfig::default()).expect("io_uring")
    }

    /// A `FLUSH_DISKCACHE` with segments whose write returns `written`:
    /// the outcome of each completion fed (the flush returns 0), the bytes
    /// counted written and the ops pushed.
    fn write_then_flush(written: i32) -> (Vec<Option<Outcome>>, u64, usize) {
        let (mut engine, mut traffic) = (engine(), Traffic::default());
        let outcomes = {
            let mut io = Submit::new(&mut engine, 7, &mut traffic);
            let mut disk = DiskIo::new(4096, false, true);
            assert!(disk.submit([IoOp::Fsync], &mut io, "t"));
            let mut outcomes = vec![disk.complete(written, &mut io, "t")];
            if outcomes[0].is_none() {
                outcomes.push(disk.complete(0, &mut io, "t"));
            }
            outcomes
        };
        (outcomes, traffic.from_guest, engine.in_flight())
    }

    #[test]
    fn a_write_with_flush_is_answered_by_the_flush_and_only_if_the_write_succeeded() {
        // The write completed: the flush is pushed, its result answers.
        assert_eq!(
            write_then_flush(4096),
            (vec![None, Some(Outcome::Done)], 4096, 2)
        );
        // A short write is answered at once, without a flush.
        assert_eq!(write_then_flush(512), (vec![Some(Outcome::Failed)], 0, 1));
    }

    #[test]
    fn every_op_of_a_request_completes_before_it_is_answered() {
        let (mut engine, mut traffic) = (engine(), Traffic::default());
        let mut io = Submit::new(&mut engine, 7, &mut traffic);
        let mut disk = DiskIo::new(0, false, false);
        assert!(disk.submit([IoOp::Fsync, IoOp::Fsync], &mut io, "t"));
        assert_eq!(disk.complete(-libc::EOPNOTSUPP, &mut io, "t"), None);
        assert_eq!(
            disk.complete(0, &mut io, "t"),
            Some(Outcome::Unsupported { moved_data: false })
        );
        let mut read = DiskIo::new(8192, true, false);
        assert!(read.submit([IoOp::Fsync], &mut io, "t"));
        assert_eq!(read.complete(8192, &mut io, "t"), Some(Outcome::Done));
        assert_eq!(io.traffic().to_guest, 8192);
        let mut failed = DiskIo::new(512, true, false);
        assert!(failed.submit([IoOp::Fsync], &mut io, "t"));
        assert_eq!(
            failed.complete(-libc::EOPNOTSUPP, &mut io, "t"),
            Some(Outcome::Unsupported { moved_data: true })
        );
        assert_eq!(io.traffic().to_guest, 8192);
    }
}
