//! An in-memory [`BlockDevice`] for tests.
//!
//! `MemDisk` holds the image in a `Vec<u8>`, executes requests when they are
//! reaped (in submission order or shuffled, to exercise out-of-order
//! completion) and has fault knobs that model the backend bugs the verifying
//! workload must catch: lost writes and discards, corrupted reads, misdirected
//! writes, torn failed writes, lost and duplicated completions, and an
//! acknowledged write that lands again after a newer one (a recovery
//! resubmitting a request the guest had already seen completed).
//!
//! It can have several queues ([`MemDisk::with_queues`]) sharing its slots
//! evenly; [`BlockDevice::submit_to`] picks one, `submit` goes round-robin.
//! The queues only matter for capacity and the statistics (how often one
//! queue drained while another was busy): requests of all queues complete
//! in one order.
//!
//! In strict mode (the default) it also rejects any request that overlaps an
//! in-flight write or discard, so a workload that breaks the "no overlapping
//! mutations in flight" rule fails loudly with [`DeviceError::InvalidRequest`].
//!
//! It never blocks: `poll_completions` returns at once, with nothing if no
//! kicked request is pending.

use std::time::Duration;

use crate::device::{
    BlockDevice, BlockOp, BlockRequest, Completion, DeviceError, Status, SECTOR_SIZE,
};
use crate::pattern::SplitMix64;

/// The order in which `poll_completions` completes published requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionOrder {
    /// Every published request, in submission order, on each poll.
    InOrder,
    /// A random non-empty subset of the published requests, in random order,
    /// on each poll (seeded, so runs are reproducible).
    Shuffled {
        /// Seed of the order.
        seed: u64,
    },
}

/// Counters describing what the disk did, for test assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemDiskStats {
    /// Requests accepted by `submit`.
    pub submitted: u64,
    /// Completions delivered (duplicates included).
    pub completed: u64,
    /// Most requests in flight (submitted, not yet completed) at once.
    pub max_in_flight_seen: usize,
    /// Requests rejected because they overlapped an in-flight mutation.
    pub overlap_violations: u64,
    /// Failed writes that stored part of their data before failing.
    pub torn_writes: u64,
    /// Most requests in flight on one queue at once.
    pub max_queue_in_flight_seen: usize,
    /// Completions that left their queue empty.
    pub queue_drains: u64,
    /// Completions that left their queue empty while another queue still
    /// had requests in flight.
    pub drained_beside_busy: u64,
    /// Requests accepted per queue.
    pub submitted_per_queue: [u64; MAX_QUEUES],
}

/// Most queues a [`MemDisk`] can have.
pub const MAX_QUEUES: usize = 8;

/// A request between `submit` and its completion.
#[derive(Debug)]
struct Pending {
    tag: u64,
    queue: usize,
    op: BlockOp,
    sector: u64,
    sectors: u32,
    data: Option<Vec<u8>>,
    want_data: bool,
}

impl Pending {
    fn range(&self) -> Option<(u64, u64)> {
        self.op
            .has_range()
            .then(|| (self.sector, self.sector + u64::from(self.sectors)))
    }
}

/// Fault knobs; each counter is consumed by the matching request kind.
#[derive(Debug, Default)]
struct Faults {
    corrupt_reads: u64,
    drop_writes: u64,
    drop_discards: u64,
    fail: u64,
    misdirect: Option<u64>,
    swallow: u64,
    duplicate: u64,
    late: Late,
}

/// [`MemDisk::replay_next_write_late`]'s state.
#[derive(Debug, Default)]
enum Late {
    #[default]
    Off,
    /// The next write is to be remembered.
    Armed,
    /// A write that lands again right after the next write overlapping it.
    Holding { sector: u64, data: Vec<u8> },
}

/// An in-memory block device. See the module docs.
#[derive(Debug)]
pub struct MemDisk {
    image: Vec<u8>,
    max_in_flight: usize,
    max_request_sectors: u32,
    discard: bool,
    flush: bool,
    strict: bool,
    order: CompletionOrder,
    rng: SplitMix64,
    queues: usize,
    next_queue: usize,
    /// Submitted, not yet kicked.
    queued: Vec<Pending>,
    /// Kicked, not yet completed.
    published: Vec<Pending>,
    /// Swallowed by a fault: in flight forever.
    lost: Vec<Pending>,
    faults: Faults,
    stats: MemDiskStats,
}

impl MemDisk {
    /// A zero-filled disk of `capacity_sectors` 512-byte sectors with 64
    /// slots, 256-sector (128 KiB) requests, flush and discard, in-order
    /// completion and strict overlap checking.
    pub fn new(capacity_sectors: u64) -> Self {
        let bytes = capacity_sectors
            .checked_mul(SECTOR_SIZE)
            .and_then(|b| usize::try_from(b).ok())
            .expect("MemDisk capacity does not fit in memory");
        MemDisk {
            image: vec![0; bytes],
            max_in_flight: 64,
            max_request_sectors: 256,
            discard: true,
            flush: true,
            strict: true,
            order: CompletionOrder::InOrder,
            rng: SplitMix64::new(0),
            queues: 1,
            next_queue: 0,
            queued: Vec::new(),
            published: Vec::new(),
            lost: Vec::new(),
            faults: Faults::default(),
            stats: MemDiskStats::default(),
        }
    }

    /// Sets the completion order.
    pub fn with_order(mut self, order: CompletionOrder) -> Self {
        if let CompletionOrder::Shuffled { seed } = order {
            self.rng = SplitMix64::new(seed);
        }
        self.order = order;
        self
    }

    /// Sets the number of request slots.
    pub fn with_max_in_flight(mut self, slots: usize) -> Self {
        self.max_in_flight = slots;
        self
    }

    /// Sets the number of queues (1..=[`MAX_QUEUES`]); each holds an even
    /// share of the slots.
    ///
    /// # Panics
    /// If `queues` is out of range (a test bug).
    pub fn with_queues(mut self, queues: usize) -> Self {
        assert!(
            (1..=MAX_QUEUES).contains(&queues),
            "MemDisk queues {queues}"
        );
        self.queues = queues;
        self
    }

    /// Sets the largest request in sectors.
    pub fn with_max_request_sectors(mut self, sectors: u32) -> Self {
        self.max_request_sectors = sectors;
        self
    }

    /// Enables or disables discard (disabled: discards complete `NotSupported`).
    pub fn with_discard(mut self, enabled: bool) -> Self {
        self.discard = enabled;
        self
    }

    /// Enables or disables flush (disabled: flushes complete `NotSupported`).
    pub fn with_flush(mut self, enabled: bool) -> Self {
        self.flush = enabled;
        self
    }

    /// Strict mode rejects requests overlapping an in-flight write/discard.
    /// Benchmarks, which may legally overlap, turn it off.
    pub fn with_strict_overlap(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// The disk content.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// The disk content, for tests that damage it directly.
    pub fn image_mut(&mut self) -> &mut [u8] {
        &mut self.image
    }

    /// What the disk has done so far.
    pub fn stats(&self) -> MemDiskStats {
        self.stats
    }

    /// Requests submitted and not yet completed (including swallowed ones).
    pub fn in_flight(&self) -> usize {
        self.queued.len() + self.published.len() + self.lost.len()
    }

    /// Flips a byte in the data returned by the next read that returns data
    /// (the image is untouched).
    pub fn corrupt_next_read(&mut self) {
        self.faults.corrupt_reads += 1;
    }

    /// Acknowledges the next `n` writes `Ok` without storing them.
    pub fn drop_write(&mut self, n: u64) {
        self.faults.drop_writes += n;
    }

    /// Acknowledges the next `n` discards `Ok` without zeroing.
    pub fn drop_discard(&mut self, n: u64) {
        self.faults.drop_discards += n;
    }

    /// Fails the next `n` requests of any kind with `IoError`. A failed write
    /// or discard of two or more sectors first applies its first half (torn).
    pub fn fail_next(&mut self, n: u64) {
        self.faults.fail += n;
    }

    /// Stores the next write `delta_sectors` further on (wrapping inside the
    /// disk) while acknowledging it `Ok`.
    pub fn misdirect_next_write(&mut self, delta_sectors: u64) {
        self.faults.misdirect = Some(delta_sectors);
    }

    /// Accepts the next `n` requests but never completes them (lost
    /// completions).
    pub fn swallow_next(&mut self, n: u64) {
        self.faults.swallow += n;
    }

    /// Delivers the next `n` completions twice.
    pub fn duplicate_next_completion(&mut self, n: u64) {
        self.faults.duplicate += n;
    }

    /// Executes the next write normally, then stores its data again right
    /// after the next write that overlaps it was executed: an acknowledged
    /// write landing after a newer one, as when a restarted backend
    /// resubmits a request whose completion the guest has already seen.
    pub fn replay_next_write_late(&mut self) {
        self.faults.late = Late::Armed;
    }

    /// Slots of one queue.
    fn queue_slots(&self) -> usize {
        (self.max_in_flight / self.queues).max(1)
    }

    fn queue_in_flight(&self, queue: usize) -> usize {
        self.in_flight_iter().filter(|p| p.queue == queue).count()
    }

    fn capacity(&self) -> u64 {
        self.image.len() as u64 / SECTOR_SIZE
    }

    fn in_flight_iter(&self) -> impl Iterator<Item = &Pending> {
        self.queued.iter().chain(&self.published).chain(&self.lost)
    }

    fn validate(&self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        let invalid = |msg: String| Err(DeviceError::InvalidRequest(msg));
        if self.in_flight_iter().any(|p| p.tag == tag) {
            return invalid(format!("tag {tag} is already in flight"));
        }
        if req.op == BlockOp::Flush {
            return Ok(());
        }
        if req.sectors == 0 || req.sectors > self.max_request_sectors {
            return invalid(format!(
                "{:?} of {} sectors (max {})",
                req.op, req.sectors, self.max_request_sectors
            ));
        }
        let end = req.sector.checked_add(u64::from(req.sectors));
        if !matches!(end, Some(end) if end <= self.capacity()) {
            return invalid(format!(
                "{:?} of sectors {}+{} beyond capacity {}",
                req.op,
                req.sector,
                req.sectors,
                self.capacity()
            ));
        }
        if req.op == BlockOp::Write && req.data.map(<[u8]>::len) != Some(req.bytes() as usize) {
            return invalid(format!(
                "write of {} sectors with {:?} bytes of data",
                req.sectors,
                req.data.map(<[u8]>::len)
            ));
        }
        Ok(())
    }

    /// The in-flight request that `req` may not run beside, if any.
    fn overlapping(&self, req: &BlockRequest<'_>) -> Option<u64> {
        let (start, end) = req.range()?;
        self.in_flight_iter()
            .filter(|p| p.op.modifies_data() || req.op.modifies_data())
            .find(|p| p.range().is_some_and(|(s, e)| s < end && start < e))
            .map(|p| p.tag)
    }

    fn byte_range(sector: u64, sectors: u32) -> std::ops::Range<usize> {
        // In range: validated against the image size at submit.
        let start = (sector * SECTOR_SIZE) as usize;
        start..start + (u64::from(sectors) * SECTOR_SIZE) as usize
    }

    /// Executes one request and returns its completion.
    fn execute(&mut self, p: Pending) -> Completion {
        let done = |status, data| Completion {
            tag: p.tag,
            status,
            data,
        };
        if self.faults.fail > 0 {
            self.faults.fail -= 1;
            if p.op.modifies_data() && p.sectors >= 2 {
                let half = p.sectors / 2;
                let range = Self::byte_range(p.sector, half);
                match &p.data {
                    Some(data) => self.image[range.clone()].copy_from_slice(&data[..range.len()]),
                    None => self.image[range].fill(0),
                }
                self.stats.torn_writes += 1;
            }
            return done(Status::IoError, None);
        }
        let range = Self::byte_range(p.sector, p.sectors);
        match p.op {
            BlockOp::Read => {
                if !p.want_data {
                    return done(Status::Ok, None);
                }
                let mut data = self.image[range].to_vec();
                if self.faults.corrupt_reads > 0 {
                    self.faults.corrupt_reads -= 1;
                    let at = data.len() / 2 + 37;
                    data[at] ^= 0x5a;
                }
                done(Status::Ok, Some(data))
            }
            BlockOp::Write => {
                let Some(data) = &p.data else {
                    return done(Status::IoError, None);
                };
                if self.faults.drop_writes > 0 {
                    self.faults.drop_writes -= 1;
                    return done(Status::Ok, None);
                }
                let range = match self.faults.misdirect.take() {
                    Some(delta) => {
                        let slots = self.capacity() - u64::from(p.sectors) + 1;
                        Self::byte_range(p.sector.wrapping_add(delta) % slots, p.sectors)
                    }
                    None => range,
                };
                self.image[range].copy_from_slice(data);
                self.faults.late = match std::mem::take(&mut self.faults.late) {
                    Late::Off => Late::Off,
                    Late::Armed => Late::Holding {
                        sector: p.sector,
                        data: data.clone(),
                    },
                    Late::Holding { sector, data: old } => {
                        let end = sector + old.len() as u64 / SECTOR_SIZE;
                        if sector < p.sector + u64::from(p.sectors) && p.sector < end {
                            let at = (sector * SECTOR_SIZE) as usize;
                            self.image[at..at + old.len()].copy_from_slice(&old);
                            Late::Off
                        } else {
                            Late::Holding { sector, data: old }
                        }
                    }
                };
                done(Status::Ok, None)
            }
            BlockOp::Discard if !self.discard => done(Status::NotSupported, None),
            BlockOp::Discard => {
                if self.faults.drop_discards > 0 {
                    self.faults.drop_discards -= 1;
                } else {
                    self.image[range].fill(0);
                }
                done(Status::Ok, None)
            }
            BlockOp::Flush if !self.flush => done(Status::NotSupported, None),
            BlockOp::Flush => done(Status::Ok, None),
        }
    }

    /// Counts `queue` draining, alone or while another is busy (after one
    /// of its requests left the in-flight lists).
    fn note_completion(&mut self, queue: usize) {
        if self.queue_in_flight(queue) > 0 {
            return;
        }
        self.stats.queue_drains += 1;
        if (0..self.queues).any(|q| q != queue && self.queue_in_flight(q) > 0) {
            self.stats.drained_beside_busy += 1;
        }
    }

    fn deliver(&mut self, c: Completion, out: &mut Vec<Completion>) {
        if self.faults.duplicate > 0 {
            self.faults.duplicate -= 1;
            out.push(c.clone());
            self.stats.completed += 1;
        }
        out.push(c);
        self.stats.completed += 1;
    }
}

impl BlockDevice for MemDisk {
    fn capacity_sectors(&self) -> u64 {
        self.capacity()
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn max_request_sectors(&self) -> u32 {
        self.max_request_sectors
    }

    fn supports_discard(&self) -> bool {
        self.discard
    }

    fn supports_flush(&self) -> bool {
        self.flush
    }

    fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        let slots = self.queue_slots();
        let queue = (0..self.queues)
            .map(|i| (self.next_queue + i) % self.queues)
            .find(|&q| self.queue_in_flight(q) < slots)
            .ok_or(DeviceError::QueueFull)?;
        self.submit_to(queue, tag, req)?;
        self.next_queue = (queue + 1) % self.queues;
        Ok(())
    }

    fn queues(&self) -> usize {
        self.queues
    }

    fn submit_to(
        &mut self,
        queue: usize,
        tag: u64,
        req: &BlockRequest<'_>,
    ) -> Result<(), DeviceError> {
        if queue >= self.queues {
            return Err(DeviceError::InvalidRequest(format!(
                "queue {queue} of {}",
                self.queues
            )));
        }
        if self.in_flight() >= self.max_in_flight
            || self.queue_in_flight(queue) >= self.queue_slots()
        {
            return Err(DeviceError::QueueFull);
        }
        self.validate(tag, req)?;
        if self.strict {
            if let Some(other) = self.overlapping(req) {
                self.stats.overlap_violations += 1;
                return Err(DeviceError::InvalidRequest(format!(
                    "{:?} tag {tag} of sectors {}+{} overlaps in-flight tag {other}",
                    req.op, req.sector, req.sectors
                )));
            }
        }
        let pending = Pending {
            tag,
            queue,
            op: req.op,
            sector: req.sector,
            sectors: req.sectors,
            data: req.data.map(<[u8]>::to_vec),
            want_data: req.want_data,
        };
        if self.faults.swallow > 0 {
            self.faults.swallow -= 1;
            self.lost.push(pending);
        } else {
            self.queued.push(pending);
        }
        self.stats.submitted += 1;
        self.stats.submitted_per_queue[queue] += 1;
        self.stats.max_in_flight_seen = self.stats.max_in_flight_seen.max(self.in_flight());
        self.stats.max_queue_in_flight_seen = self
            .stats
            .max_queue_in_flight_seen
            .max(self.queue_in_flight(queue));
        Ok(())
    }

    fn kick(&mut self) -> Result<(), DeviceError> {
        self.published.append(&mut self.queued);
        Ok(())
    }

    fn poll_completions(
        &mut self,
        _timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<(), DeviceError> {
        match self.order {
            CompletionOrder::InOrder => {
                while !self.published.is_empty() {
                    let p = self.published.remove(0);
                    let queue = p.queue;
                    let c = self.execute(p);
                    self.note_completion(queue);
                    self.deliver(c, out);
                }
            }
            CompletionOrder::Shuffled { .. } => {
                let n = self.published.len() as u64;
                if n == 0 {
                    return Ok(());
                }
                for _ in 0..=self.rng.below(n) {
                    let i = self.rng.below(self.published.len() as u64) as usize;
                    let p = self.published.swap_remove(i);
                    let queue = p.queue;
                    let c = self.execute(p);
                    self.note_completion(queue);
                    self.deliver(c, out);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(disk: &mut MemDisk) -> Vec<Completion> {
        let mut out = Vec::new();
        disk.poll_completions(Duration::ZERO, &mut out).unwrap();
        out
    }

    #[test]
    fn write_then_read_round_trips_after_kick() {
        let mut disk = MemDisk::new(64);
        let data = vec![7u8; 1024];
        disk.submit(1, &BlockRequest::write(4, &data)).unwrap();
        assert!(poll(&mut disk).is_empty(), "nothing is visible before kick");
        disk.kick().unwrap();
        assert_eq!(poll(&mut disk)[0].status, Status::Ok);
        disk.submit(2, &BlockRequest::read(4, 2, true)).unwrap();
        disk.kick().unwrap();
        assert_eq!(poll(&mut disk)[0].data.as_deref(), Some(data.as_slice()));
        assert_eq!(disk.in_flight(), 0);
    }

    #[test]
    fn rejects_out_of_range_and_malformed_requests() {
        let mut disk = MemDisk::new(64).with_max_request_sectors(16);
        let bad = [
            BlockRequest::read(60, 8, true),
            BlockRequest::read(u64::MAX - 2, 8, true),
            BlockRequest::read(0, 0, true),
            BlockRequest::read(0, 17, true),
            BlockRequest {
                data: None,
                ..BlockRequest::write(0, &[0u8; 512])
            },
        ];
        for req in bad {
            assert!(
                matches!(disk.submit(1, &req), Err(DeviceError::InvalidRequest(_))),
                "{req:?}"
            );
        }
    }

    #[test]
    fn strict_mode_rejects_overlap_with_in_flight_mutation() {
        let mut disk = MemDisk::new(64);
        let data = vec![1u8; 4096];
        disk.submit(1, &BlockRequest::write(8, &data)).unwrap();
        assert!(disk.submit(2, &BlockRequest::read(15, 1, true)).is_err());
        assert!(disk.submit(3, &BlockRequest::discard(0, 9)).is_err());
        disk.submit(4, &BlockRequest::read(16, 8, true)).unwrap();
        disk.submit(5, &BlockRequest::read(16, 8, true)).unwrap();
        disk.submit(6, &BlockRequest::flush()).unwrap();
        assert!(
            disk.submit(6, &BlockRequest::flush()).is_err(),
            "duplicate tag"
        );
        assert_eq!(disk.stats().overlap_violations, 2);
    }

    #[test]
    fn queue_full_at_max_in_flight() {
        let mut disk = MemDisk::new(64).with_max_in_flight(2);
        disk.submit(1, &BlockRequest::flush()).unwrap();
        disk.submit(2, &BlockRequest::flush()).unwrap();
        assert!(matches!(
            disk.submit(3, &BlockRequest::flush()),
            Err(DeviceError::QueueFull)
        ));
    }

    #[test]
    fn shuffled_order_completes_everything_out_of_order() {
        let mut disk = MemDisk::new(1024).with_order(CompletionOrder::Shuffled { seed: 3 });
        for tag in 0..32 {
            disk.submit(tag, &BlockRequest::read(tag * 8, 8, false))
                .unwrap();
        }
        disk.kick().unwrap();
        let mut tags = Vec::new();
        while disk.in_flight() > 0 {
            tags.extend(poll(&mut disk).into_iter().map(|c| c.tag));
        }
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..32).collect::<Vec<_>>());
        assert_ne!(tags, sorted, "seed 3 reorders");
    }

    #[test]
    fn a_late_write_lands_again_after_the_next_overlapping_one() {
        let mut disk = MemDisk::new(64);
        disk.replay_next_write_late();
        let (old, new) = (vec![1u8; 4096], vec![2u8; 4096]);
        for (tag, req) in [
            (1, BlockRequest::write(8, &old)),
            (2, BlockRequest::write(32, &new)),
            (3, BlockRequest::write(12, &new)),
        ] {
            disk.submit(tag, &req).unwrap();
            disk.kick().unwrap();
            assert_eq!(poll(&mut disk)[0].status, Status::Ok);
            assert!(disk.image()[8 * 512..16 * 512].iter().all(|&b| b == 1));
        }
        assert!(disk.image()[32 * 512..40 * 512].iter().all(|&b| b == 2));
        assert!(disk.image()[16 * 512..20 * 512].iter().all(|&b| b == 2));
        // Once only.
        disk.submit(4, &BlockRequest::write(8, &new)).unwrap();
        disk.kick().unwrap();
        poll(&mut disk);
        assert!(disk.image()[8 * 512..16 * 512].iter().all(|&b| b == 2));
    }

    #[test]
    fn queues_share_the_slots_and_count_drains() {
        let mut disk = MemDisk::new(1024).with_max_in_flight(8).with_queues(2);
        for tag in 0..4 {
            disk.submit_to(1, tag, &BlockRequest::read(tag * 8, 8, false))
                .unwrap();
        }
        assert!(matches!(
            disk.submit_to(1, 9, &BlockRequest::flush()),
            Err(DeviceError::QueueFull)
        ));
        assert!(disk.submit_to(2, 9, &BlockRequest::flush()).is_err());
        // Round-robin finds the queue with room.
        disk.submit(10, &BlockRequest::flush()).unwrap();
        disk.submit(11, &BlockRequest::flush()).unwrap();
        assert_eq!(disk.stats().submitted_per_queue[..2], [2, 4]);
        disk.kick().unwrap();
        assert_eq!(poll(&mut disk).len(), 6);
        let s = disk.stats();
        assert_eq!((s.max_queue_in_flight_seen, s.queue_drains), (4, 2));
        assert_eq!(s.drained_beside_busy, 1, "queue 1 was still busy");
    }

    #[test]
    fn failed_write_is_torn() {
        let mut disk = MemDisk::new(64);
        disk.fail_next(1);
        let data = vec![9u8; 4096];
        disk.submit(1, &BlockRequest::write(0, &data)).unwrap();
        disk.kick().unwrap();
        assert_eq!(poll(&mut disk)[0].status, Status::IoError);
        assert!(disk.image()[..2048].iter().all(|&b| b == 9));
        assert!(disk.image()[2048..4096].iter().all(|&b| b == 0));
        assert_eq!(disk.stats().torn_writes, 1);
    }
}
