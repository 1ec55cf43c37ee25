//! TX frames for a TAP written in batches through io_uring
//! (docs/ARCHITECTURE.md §11.6).
//!
//! A TAP takes one frame per write, so a frame per `writev` cost a system
//! call (entry, seccomp, file lookup) per frame and, before it, a copy of
//! the frame out of the guest's pages. A [`TapBatch`] collects up to
//! [`TX_BATCH`] frames and writes them with one `io_uring_enter`, each
//! frame one `writev` whose iovecs point at the virtio-net header (in this
//! batch's private slab) and straight at the guest's granted pages: the
//! kernel copies the frame once, into its own buffer. A frame whose bytes
//! the backend must change (a blank checksum or a GSO packet's headers)
//! is copied into the slab instead.
//!
//! The batch has its own ring, so its completions never mix with the
//! loop's polls, and [`TapBatch::flush`] waits for all of them: nothing is
//! in flight between two loop turns, as before.

use std::os::fd::RawFd;
use std::sync::Arc;

use shadowback_dataplane::uring::{
    AlignedBuf, Completion, Engine, EngineConfig, EngineError, IoMemory,
};

/// Frames written with one submission; also the most a crash can leave
/// written and unanswered (`tx-maybe-duplicated`).
pub const TX_BATCH: usize = 32;

/// The slab: a header per frame and the frames that had to be copied (a
/// GSO frame is at most 64 KiB, so one always fits in an empty slab).
const SLAB_BYTES: usize = 256 * 1024;

/// Where a frame's header starts in the slab: 16-byte aligned.
const HEADER_ALIGN: usize = 16;

/// One frame of the batch: its bytes in the slab (the header, and the
/// frame itself when copied), then its ranges of guest memory.
#[derive(Clone, Copy, Debug)]
struct Frame {
    slab: (u64, usize),
    /// `guest_ranges[start..end]`.
    guest: (usize, usize),
}

/// The frames queued for one TAP write submission.
pub struct TapBatch {
    engine: Engine,
    slab: Arc<AlignedBuf>,
    used: usize,
    frames: Vec<Frame>,
    guest_ranges: Vec<(u64, usize)>,
    completions: Vec<Completion>,
    results: Vec<i32>,
}

impl std::fmt::Debug for TapBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapBatch")
            .field("frames", &self.frames.len())
            .field("slab_used", &self.used)
            .finish()
    }
}

impl TapBatch {
    /// A ring and a slab; made before the process is confined (io_uring
    /// setup is not allowed after).
    pub fn new() -> Result<Self, EngineError> {
        let cfg = EngineConfig {
            entries: TX_BATCH as u32,
            ..EngineConfig::default()
        };
        Ok(TapBatch {
            engine: Engine::for_polls(&cfg)?,
            slab: Arc::new(AlignedBuf::new(SLAB_BYTES)?),
            used: 0,
            frames: Vec::with_capacity(TX_BATCH),
            guest_ranges: Vec::with_capacity(TX_BATCH * 2),
            completions: Vec::with_capacity(TX_BATCH),
            results: Vec::with_capacity(TX_BATCH),
        })
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether another frame of `slab_len` bytes in the slab (its header,
    /// plus the frame if copied) fits before a flush.
    pub fn has_room(&self, slab_len: usize) -> bool {
        self.frames.len() < TX_BATCH && self.used + slab_len <= SLAB_BYTES
    }

    /// Queues a frame: `slab_len` bytes of the slab, filled by `fill`
    /// (the header, and the frame if it is copied), then `guest` ranges of
    /// the guest's memory. `fill`'s error leaves nothing queued. The
    /// caller checks [`TapBatch::has_room`] first.
    pub fn push<E>(
        &mut self,
        slab_len: usize,
        guest: &[(u64, usize)],
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), PushError<E>> {
        if !self.has_room(slab_len) {
            return Err(PushError::Full);
        }
        // Nothing is in flight between flushes, so the slab is not shared.
        let slab = Arc::get_mut(&mut self.slab).ok_or(PushError::Busy)?;
        let at = self.used;
        fill(&mut slab.as_mut_slice()[at..at + slab_len]).map_err(PushError::Fill)?;
        self.used = (at + slab_len).next_multiple_of(HEADER_ALIGN);
        let start = self.guest_ranges.len();
        self.guest_ranges.extend_from_slice(guest);
        self.frames.push(Frame {
            slab: (at as u64, slab_len),
            guest: (start, self.guest_ranges.len()),
        });
        Ok(())
    }

    /// Drops what is queued, unwritten.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.guest_ranges.clear();
        self.used = 0;
    }

    /// Writes every queued frame to `fd`, with one submission, and waits
    /// for all of them; the write results in queue order (bytes written or
    /// `-errno`). The guest ranges are offsets in `region` (a netif vif's
    /// granted pages, or a virtio-net device's guest RAM). The batch is
    /// empty afterwards.
    pub fn flush<M: IoMemory>(&mut self, fd: RawFd, region: &Arc<M>) -> &[i32] {
        self.results.clear();
        self.results.resize(self.frames.len(), -libc::EIO);
        let mut pushed = 0;
        // One owner of both memories for the whole batch, not one per
        // frame; dropped on return, when no op holds it any more.
        let memories = Arc::new((self.slab.clone(), region.clone()));
        for (i, frame) in self.frames.iter().enumerate() {
            let guest = &self.guest_ranges[frame.guest.0..frame.guest.1];
            match self
                .engine
                .push_write_stream(i as u64, fd, &memories, &[frame.slab], guest)
            {
                Ok(()) => pushed += 1,
                Err(e @ EngineError::BufferOutOfRange { .. }) => {
                    tracing::debug!(error = %e, "TX frame outside the guest's memory");
                    self.results[i] = -libc::EFAULT;
                }
                Err(e) => tracing::warn!(error = %e, "cannot queue a TAP write"),
            }
        }
        while self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.submit_and_wait(self.engine.in_flight()) {
                // The ring is unusable: the engine's drop waits for (or
                // leaks) what is in flight; the frames count as failed.
                tracing::error!(error = %e, pushed, "TAP write submission failed");
                break;
            }
            self.completions.clear();
            self.engine.drain(&mut self.completions);
            for c in &self.completions {
                if let Some(r) = self.results.get_mut(c.token as usize) {
                    *r = c.result;
                }
            }
        }
        self.clear();
        &self.results
    }
}

/// Why [`TapBatch::push`] queued nothing.
#[derive(Debug)]
pub enum PushError<E> {
    /// Flush first.
    Full,
    /// The slab is still shared with an op (never after a flush).
    Busy,
    /// `fill` failed.
    Fill(E),
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::fcntl::OFlag;
    use shadowback_ring::SharedRegion;

    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap()
    }

    fn read_all(fd: &OwnedFd) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Each frame is its slab bytes then its guest ranges, frames in
    /// queue order, one result each; a range outside the guest's memory
    /// fails that frame only.
    #[test]
    fn frames_are_written_in_order_from_the_slab_and_guest_memory() {
        let region = Arc::new(SharedRegion::create("tapbatch", 2).unwrap());
        region.write(100, b"guest-one").unwrap();
        region.write(4096 + 7, b"GUEST-TWO").unwrap();
        let mut batch = TapBatch::new().unwrap();
        let fill = |bytes: &'static [u8]| {
            move |b: &mut [u8]| -> Result<(), ()> {
                b.copy_from_slice(bytes);
                Ok(())
            }
        };
        batch.push(3, &[(100, 9)], fill(b"h1:")).unwrap();
        batch
            .push(4, &[(4096 + 7, 9), (100, 5)], fill(b"h2::"))
            .unwrap();
        batch.push(3, &[(8190, 4)], fill(b"h3:")).unwrap();
        batch.push(7, &[], fill(b"copied!")).unwrap();
        assert!(matches!(
            batch.push(1, &[], |_| Err("refused")),
            Err(PushError::Fill("refused"))
        ));
        assert_eq!(batch.len(), 4);
        let (rd, wr) = pipe();
        let results = batch.flush(wr.as_raw_fd(), &region).to_vec();
        assert_eq!(results, [12, 18, -libc::EFAULT, 7]);
        assert!(batch.is_empty());
        assert_eq!(read_all(&rd), b"h1:guest-oneh2::GUEST-TWOguestcopied!");
    }

    /// A frame of more ranges than an op holds inline is written whole
    /// too.
    #[test]
    fn a_frame_of_many_ranges_is_written_whole() {
        let region = Arc::new(SharedRegion::create("tapbatch", 1).unwrap());
        region.write(0, b"abcdefghijklmnopqrstuvwxyz").unwrap();
        let ranges: Vec<(u64, usize)> = (0..20).map(|i| (i, 1)).collect();
        assert!(ranges.len() + 1 > shadowback_dataplane::uring::INLINE_IOVECS);
        let mut batch = TapBatch::new().unwrap();
        batch
            .push(2, &ranges, |b| {
                b.copy_from_slice(b"h:");
                Ok::<(), ()>(())
            })
            .unwrap();
        let (rd, wr) = pipe();
        assert_eq!(batch.flush(wr.as_raw_fd(), &region), [22]);
        assert_eq!(read_all(&rd), b"h:abcdefghijklmnopqrst");
    }

    /// A batch holds at most TX_BATCH frames and what its slab takes.
    #[test]
    fn a_batch_is_bounded() {
        let region = Arc::new(SharedRegion::create("tapbatch", 1).unwrap());
        let mut batch = TapBatch::new().unwrap();
        assert!(!batch.has_room(SLAB_BYTES + 1));
        for _ in 0..TX_BATCH {
            batch.push(10, &[(0, 1)], |_| Ok::<(), ()>(())).unwrap();
        }
        assert!(matches!(
            batch.push(10, &[], |_| Ok::<(), ()>(())),
            Err(PushError::Full)
        ));
        let (_rd, wr) = pipe();
        assert!(batch
            .flush(wr.as_raw_fd(), &region)
            .iter()
            .all(|&r| r == 11));
        assert!(batch.has_room(SLAB_BYTES));
    }
}
