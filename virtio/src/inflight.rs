//! The VMM's in-flight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`),
//! split-ring layout of QEMU's `docs/interop/vhost-user.rst`, "Inflight I/O
//! tracking":
//!
//! ```text
//! struct DescStateSplit  { u8 inflight; u8 padding[5]; u16 next; u64 counter; }   16 bytes
//! struct QueueRegionSplit { u64 features; u16 version; u16 desc_num;
//!                           u16 last_batch_head; u16 used_idx;
//!                           DescStateSplit desc[desc_num]; }
//! ```
//!
//! One `QueueRegionSplit` per virtqueue, queue `i` at `i *`
//! [`inflight_queue_region_size`]. The VMM keeps the memfd across backend
//! reconnects, so even a supervisor restart (fresh shadow logs) can find
//! which heads were consumed and not yet answered.
//!
//! Protocol kept by the data plane (all little endian):
//! - consume head `h`: `desc[h].counter = next counter`, then
//!   `desc[h].inflight = 1`;
//! - before publishing a batch of used entries: link its heads through
//!   `next`, first head in `last_batch_head`;
//! - after storing `used->idx`: `inflight = 0` for each head of the batch,
//!   then `used_idx = used->idx`.
//!
//! Recovery ([`InflightQueue::recover`]): if `used_idx != used->idx` the
//! last batch was published but not (or not completely) cleared: walk
//! exactly `used->idx - used_idx` links from `last_batch_head` and clear
//! every head on the way, whether or not a crash inside
//! [`InflightQueue::finish_batch`] already cleared it. The heads still in
//! flight are resubmitted in `counter` order, and the next avail index is
//! `used->idx` plus their number, so there can never be more of them than
//! the avail ring holds beyond `used->idx`. A region that breaks any of
//! this is refused, never half-trusted (docs/ARCHITECTURE.md §7.4).
//!
//! Every multi-store update (`begin`, `link_batch`, `finish_batch`) can be
//! interrupted at any store by a crash hook ([`RegionCrashPoint`]), so the
//! tests can leave the region exactly as a SIGKILL there would.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shadowback_xenbus::virtio::InflightConfig;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Alignment of each queue's region (libvhost-user `INFLIGHT_ALIGNMENT`).
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// `version` of an initialised queue region.
pub const INFLIGHT_VERSION: u16 = 1;
/// `features`, `version`, `desc_num`, `last_batch_head`, `used_idx`.
pub const QUEUE_HEADER_SIZE: u64 = 16;
/// `sizeof(DescStateSplit)`.
pub const DESC_STATE_SIZE: u64 = 16;

const VERSION: u64 = 8;
const DESC_NUM: u64 = 10;
const LAST_BATCH_HEAD: u64 = 12;
const USED_IDX: u64 = 14;
const D_INFLIGHT: u64 = 0;
const D_NEXT: u64 = 6;
const D_COUNTER: u64 = 8;

/// Bytes of one queue's region for `queue_size` descriptors, exactly as
/// libvhost-user computes it (QEMU `subprojects/libvhost-user/libvhost-user.c`,
/// `vu_inflight_queue_size`):
///
/// `ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), INFLIGHT_ALIGNMENT)`
/// = `align_up(16 * queue_size + 2, 64)`.
///
/// The rounding always leaves room for the 16-byte queue header (checked
/// for every queue size by a unit test); queue `i`'s region starts at `i`
/// times this (`vu_set_inflight_fd`).
pub fn inflight_queue_region_size(queue_size: u16) -> u64 {
    let raw = DESC_STATE_SIZE * u64::from(queue_size) + 2;
    raw.div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT
}

/// `mmap_size` of `GET_INFLIGHT_FD` for `num_queues` queues of `queue_size`
/// (libvhost-user `vu_get_inflight_fd`).
pub fn inflight_mmap_size(num_queues: u16, queue_size: u16) -> u64 {
    inflight_queue_region_size(queue_size) * u64::from(num_queues)
}

/// Offset of virtqueue `index`'s region inside the mapping.
pub fn inflight_queue_offset(index: u16, queue_size: u16) -> u64 {
    inflight_queue_region_size(queue_size) * u64::from(index)
}

/// The bytes of a fresh region: every queue `version = 1`, `desc_num =
/// queue_size`, nothing in flight.
pub fn fresh_inflight_region(num_queues: u16, queue_size: u16) -> Vec<u8> {
    let per = inflight_queue_region_size(queue_size) as usize;
    let mut bytes = vec![0u8; per * usize::from(num_queues)];
    for q in 0..usize::from(num_queues) {
        let base = q * per;
        bytes[base + VERSION as usize..base + VERSION as usize + 2]
            .copy_from_slice(&INFLIGHT_VERSION.to_le_bytes());
        bytes[base + DESC_NUM as usize..base + DESC_NUM as usize + 2]
            .copy_from_slice(&queue_size.to_le_bytes());
    }
    bytes
}

/// Writes a fresh region ([`fresh_inflight_region`]) at `mmap_offset` of
/// `file` (the supervisor, answering `GET_INFLIGHT_FD`). The file must
/// already be large enough.
pub fn init_inflight_region(
    file: &File,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
) -> std::io::Result<()> {
    file.write_all_at(&fresh_inflight_region(num_queues, queue_size), mmap_offset)
}

/// A region that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("in-flight region: {0}")]
    Invalid(String),
    #[error("in-flight region: access at {0:#x} failed")]
    Access(u64),
}

/// A multi-store update of a queue's region, for crash points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionTransition {
    /// [`InflightQueue::begin`]: 1 `counter`, 2 `inflight = 1`.
    Begin,
    /// [`InflightQueue::link_batch`]: one `next` per head but the last,
    /// then `last_batch_head`.
    Link,
    /// [`InflightQueue::finish_batch`]: one `inflight = 0` per head, then
    /// `used_idx`.
    Finish,
}

impl RegionTransition {
    /// Every region transition.
    pub const ALL: [RegionTransition; 3] = [
        RegionTransition::Begin,
        RegionTransition::Link,
        RegionTransition::Finish,
    ];

    /// Lower-case name used by `Display` and `FromStr` (`region-finish`).
    pub const fn name(self) -> &'static str {
        match self {
            RegionTransition::Begin => "region-begin",
            RegionTransition::Link => "region-link",
            RegionTransition::Finish => "region-finish",
        }
    }
}

/// A point inside a region update: `step` of its stores are done. A
/// transition whose store count depends on the batch (`Link`, `Finish`)
/// reaches `step` only in an update with at least `step` stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionCrashPoint {
    pub transition: RegionTransition,
    pub step: u32,
}

impl std::fmt::Display for RegionCrashPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.transition.name(), self.step)
    }
}

impl std::str::FromStr for RegionCrashPoint {
    type Err = InflightError;

    /// Parses `region-finish.3`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InflightError::Invalid(format!("not a region crash point: {s:?}"));
        let (name, step) = s.split_once('.').ok_or_else(bad)?;
        let transition = RegionTransition::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(bad)?;
        let step: u32 = step.parse().map_err(|_| bad())?;
        // Begin has two stores; a batch has at most 32768 heads.
        let max = match transition {
            RegionTransition::Begin => 2,
            RegionTransition::Link | RegionTransition::Finish => 1 << 15,
        };
        if step > max {
            return Err(bad());
        }
        Ok(RegionCrashPoint { transition, step })
    }
}

/// Called at every region crash point with the point and the number of
/// stores the update makes in all.
pub type RegionCrashHook = Arc<dyn Fn(RegionCrashPoint, u32) + Send + Sync>;

/// The mapped in-flight region.
#[derive(Debug)]
pub struct InflightRegion {
    mem: GuestMemoryMmap,
    len: u64,
    queue_size: u16,
}

impl InflightRegion {
    /// Maps `cfg.mmap_size` bytes at `cfg.mmap_offset` of `fd`, after
    /// checking the file is long enough and the size holds at least one
    /// queue region.
    pub fn map(fd: OwnedFd, cfg: &InflightConfig) -> Result<Self, InflightError> {
        let bad = |s: &str| InflightError::Invalid(s.to_owned());
        if cfg.queue_size == 0 || !cfg.queue_size.is_power_of_two() {
            return Err(bad("queue size not a power of two"));
        }
        if !cfg.mmap_offset.is_multiple_of(4096) {
            return Err(bad("offset not page aligned"));
        }
        if cfg.mmap_size < inflight_queue_region_size(cfg.queue_size) || cfg.mmap_size > 1 << 32 {
            return Err(bad("size does not fit one queue region"));
        }
        let end = cfg
            .mmap_offset
            .checked_add(cfg.mmap_size)
            .filter(|&e| i64::try_from(e).is_ok())
            .ok_or_else(|| bad("offset+size overflows"))?;
        let file = File::from(fd);
        let file_len = file
            .metadata()
            .map_err(|e| InflightError::Invalid(format!("stat: {e}")))?
            .len();
        if file_len < end {
            return Err(bad("file shorter than offset+size"));
        }
        let mapping = MmapRegionBuilder::new(cfg.mmap_size as usize)
            .with_file_offset(FileOffset::new(file, cfg.mmap_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| InflightError::Invalid(format!("mmap: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).ok_or_else(|| bad("mmap"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| InflightError::Invalid(e.to_string()))?;
        Ok(InflightRegion {
            mem,
            len: cfg.mmap_size,
            queue_size: cfg.queue_size,
        })
    }

    /// Virtqueue `index`'s part, for a queue of `size` descriptors.
    pub fn queue(self: &Arc<Self>, index: u16, size: u16) -> Result<InflightQueue, InflightError> {
        if size > self.queue_size {
            return Err(InflightError::Invalid(format!(
                "queue {index} has {size} descriptors, the region {}",
                self.queue_size
            )));
        }
        let base = inflight_queue_offset(index, self.queue_size);
        if base + inflight_queue_region_size(self.queue_size) > self.len {
            return Err(InflightError::Invalid(format!("no room for queue {index}")));
        }
        Ok(InflightQueue {
            region: self.clone(),
            base,
            desc_num: self.queue_size,
            size,
            hook: None,
        })
    }
}

/// What [`InflightQueue::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightRecovery {
    /// Heads to resubmit, in `counter` order.
    pub heads: Vec<u16>,
    /// The counter to give the next consumed head.
    pub next_counter: u64,
    /// The region was not initialised (or unusable) and was reset.
    pub fresh: bool,
}

/// One virtqueue's `QueueRegionSplit`.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: u64,
    desc_num: u16,
    /// The virtqueue's size (heads at or above it are invalid).
    size: u16,
    hook: Option<RegionCrashHook>,
}

impl std::fmt::Debug for InflightQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightQueue")
            .field("base", &self.base)
            .field("desc_num", &self.desc_num)
            .field("size", &self.size)
            .field("crash_hook", &self.hook.is_some())
            .finish()
    }
}

impl InflightQueue {
    /// Installs (or removes) the crash hook of fault injection.
    pub fn set_crash_hook(&mut self, hook: Option<RegionCrashHook>) {
        self.hook = hook;
    }

    fn point(&self, transition: RegionTransition, step: u32, stores: u32) {
        if let Some(hook) = &self.hook {
            hook(RegionCrashPoint { transition, step }, stores);
        }
    }

    fn load<T: vm_memory::AtomicAccess>(&self, off: u64) -> Result<T, InflightError> {
        // Relaxed: the previous writer is a dead (fenced) process, or us.
        self.region
            .mem
            .load(GuestAddress(self.base + off), Ordering::Relaxed)
            .map_err(|_| InflightError::Access(self.base + off))
    }

    fn store<T: vm_memory::AtomicAccess>(
        &self,
        off: u64,
        val: T,
        order: Ordering,
    ) -> Result<(), InflightError> {
        self.region
            .mem
            .store(val, GuestAddress(self.base + off), order)
            .map_err(|_| InflightError::Access(self.base + off))
    }

    fn desc(head: u16) -> u64 {
        QUEUE_HEADER_SIZE + DESC_STATE_SIZE * u64::from(head)
    }

    fn check(&self, head: u16) -> Result<(), InflightError> {
        if head >= self.size {
            return Err(InflightError::Invalid(format!("head {head} out of range")));
        }
        Ok(())
    }

    /// `used_idx` as stored.
    pub fn used_idx(&self) -> Result<u16, InflightError> {
        Ok(u16::from_le(self.load(USED_IDX)?))
    }

    /// Whether `head` is marked in flight.
    pub fn is_inflight(&self, head: u16) -> Result<bool, InflightError> {
        self.check(head)?;
        Ok(self.load::<u8>(Self::desc(head) + D_INFLIGHT)? == 1)
    }

    /// Resets the queue region: version, `desc_num`, nothing in flight,
    /// `used_idx`.
    pub fn reset(&self, used_idx: u16) -> Result<(), InflightError> {
        for head in 0..self.desc_num {
            self.store(Self::desc(head) + D_INFLIGHT, 0u8, Ordering::Relaxed)?;
            self.store(Self::desc(head) + D_NEXT, 0u16, Ordering::Relaxed)?;
            self.store(Self::desc(head) + D_COUNTER, 0u64, Ordering::Relaxed)?;
        }
        self.store(0, 0u64, Ordering::Relaxed)?;
        self.store(DESC_NUM, self.desc_num.to_le(), Ordering::Relaxed)?;
        self.store(LAST_BATCH_HEAD, 0u16, Ordering::Relaxed)?;
        self.store(USED_IDX, used_idx.to_le(), Ordering::Relaxed)?;
        // Release: the zeroed state is complete before the version says so.
        self.store(VERSION, INFLIGHT_VERSION.to_le(), Ordering::Release)
    }

    /// Marks `head` consumed with `counter`.
    pub fn begin(&self, head: u16, counter: u64) -> Result<(), InflightError> {
        self.check(head)?;
        let d = Self::desc(head);
        let t = RegionTransition::Begin;
        self.point(t, 0, 2);
        self.store(d + D_COUNTER, counter.to_le(), Ordering::Relaxed)?;
        self.point(t, 1, 2);
        // Release: the counter is in place before the head reads in flight
        // (vhost-user.rst: "set desc[head].counter, then inflight = 1").
        self.store(d + D_INFLIGHT, 1u8, Ordering::Release)?;
        self.point(t, 2, 2);
        Ok(())
    }

    /// Links the heads of a batch about to be published, first head in
    /// `last_batch_head`.
    pub fn link_batch(&self, heads: &[u16]) -> Result<(), InflightError> {
        let Some(&first) = heads.first() else {
            return Ok(());
        };
        let t = RegionTransition::Link;
        let stores = heads.len() as u32;
        self.point(t, 0, stores);
        for (i, pair) in heads.windows(2).enumerate() {
            self.check(pair[0])?;
            self.store(
                Self::desc(pair[0]) + D_NEXT,
                pair[1].to_le(),
                Ordering::Relaxed,
            )?;
            self.point(t, i as u32 + 1, stores);
        }
        self.check(first)?;
        // Release: the links are complete before the batch is named.
        self.store(LAST_BATCH_HEAD, first.to_le(), Ordering::Release)?;
        self.point(t, stores, stores);
        Ok(())
    }

    /// After `used->idx = used_idx` was stored: the batch's heads are no
    /// longer in flight.
    pub fn finish_batch(&self, heads: &[u16], used_idx: u16) -> Result<(), InflightError> {
        let t = RegionTransition::Finish;
        let stores = heads.len() as u32 + 1;
        self.point(t, 0, stores);
        for (i, &head) in heads.iter().enumerate() {
            self.check(head)?;
            self.store(Self::desc(head) + D_INFLIGHT, 0u8, Ordering::Relaxed)?;
            self.point(t, i as u32 + 1, stores);
        }
        // Release: heads cleared before used_idx says the batch is done.
        self.store(USED_IDX, used_idx.to_le(), Ordering::Release)?;
        self.point(t, stores, stores);
        Ok(())
    }

    /// Recovers from the region alone, given the guest's `used->idx` and
    /// `avail->idx` (see the module docs). Fixes the region up as it goes,
    /// so it is consistent with the returned heads being in flight; doing
    /// it again after a crash half-way gives the same answer. An
    /// uninitialised region is reset (nothing to resubmit); one whose
    /// indices and flags contradict each other is an error.
    pub fn recover(
        &self,
        used_now: u16,
        avail_now: u16,
    ) -> Result<InflightRecovery, InflightError> {
        let version = u16::from_le(self.load(VERSION)?);
        let desc_num = u16::from_le(self.load(DESC_NUM)?);
        if version != INFLIGHT_VERSION || desc_num != self.desc_num {
            if version != 0 {
                tracing::warn!(version, desc_num, "unusable in-flight region reset");
            }
            self.reset(used_now)?;
            return Ok(InflightRecovery {
                heads: Vec::new(),
                next_counter: 1,
                fresh: true,
            });
        }
        let mut inflight = vec![false; usize::from(self.desc_num)];
        for head in 0..self.desc_num {
            let v: u8 = self.load(Self::desc(head) + D_INFLIGHT)?;
            // A head outside the queue, or a value no writer stores.
            if v > 1 || (v == 1 && head >= self.size) {
                tracing::warn!(head, v, "corrupt in-flight descriptor state cleared");
                self.store(Self::desc(head) + D_INFLIGHT, 0u8, Ordering::Relaxed)?;
            } else if v == 1 {
                inflight[usize::from(head)] = true;
            }
        }
        let logged_used = self.used_idx()?;
        let published = used_now.wrapping_sub(logged_used);
        if published > self.size {
            return Err(InflightError::Invalid(format!(
                "used index {used_now} is {published} past the region's {logged_used}, \
                 more than one batch of a {}-entry queue",
                self.size
            )));
        }
        // The last batch reached the driver, and a crash may have come
        // after any number of its heads were cleared: clear exactly the
        // `published` heads it links, cleared already or not. Stopping at
        // the first cleared one would leave the rest flagged, and they
        // would be resubmitted although the driver may already have reused
        // them for new requests (docs/ARCHITECTURE.md §7.4).
        let mut walked = vec![false; usize::from(self.size)];
        let mut head: u16 = u16::from_le(self.load(LAST_BATCH_HEAD)?);
        for i in 0..published {
            if head >= self.size || std::mem::replace(&mut walked[usize::from(head)], true) {
                return Err(InflightError::Invalid(format!(
                    "batch link {i} of {published} names head {head}: out of range or seen twice"
                )));
            }
            inflight[usize::from(head)] = false;
            self.store(Self::desc(head) + D_INFLIGHT, 0u8, Ordering::Relaxed)?;
            if i + 1 < published {
                head = u16::from_le(self.load(Self::desc(head) + D_NEXT)?);
            }
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        let mut max_counter = 0u64;
        for head in 0..self.size {
            if inflight[usize::from(head)] {
                let c = u64::from_le(self.load(Self::desc(head) + D_COUNTER)?);
                max_counter = max_counter.max(c);
                heads.push((c, head));
            }
        }
        // Every head in flight was consumed from an avail entry the driver
        // has not seen answered: at most `avail->idx - used->idx` of them.
        let outstanding = avail_now.wrapping_sub(used_now);
        if heads.len() > usize::from(outstanding) {
            return Err(InflightError::Invalid(format!(
                "{} heads marked in flight, but only {outstanding} requests are outstanding \
                 (avail {avail_now}, used {used_now})",
                heads.len()
            )));
        }
        // Release: the cleared batch is complete before used_idx says so.
        self.store(USED_IDX, used_now.to_le(), Ordering::Release)?;
        heads.sort_unstable();
        Ok(InflightRecovery {
            heads: heads.into_iter().map(|(_, h)| h).collect(),
            next_counter: max_counter.saturating_add(1),
            fresh: false,
        })
    }

    /// Rewrites the region to exactly `heads` in flight (in that counter
    /// order, from `first_counter`) with `used_idx`: after a recovery that
    /// the shadow log planned. Returns the next counter.
    pub fn reset_to(
        &self,
        used_idx: u16,
        heads: &[u16],
        first_counter: u64,
    ) -> Result<u64, InflightError> {
        self.reset(used_idx)?;
        let mut counter = first_counter;
        for &head in heads {
            self.begin(head, counter)?;
            counter += 1;
        }
        Ok(counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    fn region(queues: u16, size: u16) -> (Arc<InflightRegion>, File) {
        let fd = memfd_create(c"inflight-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        let len = inflight_mmap_size(queues, size);
        file.set_len(len).unwrap();
        let cfg = InflightConfig {
            mmap_size: len,
            mmap_offset: 0,
            queue_size: size,
        };
        let r = InflightRegion::map(file.try_clone().unwrap().into(), &cfg).unwrap();
        (Arc::new(r), file)
    }

    #[test]
    fn sizes_match_libvhost_user_and_hold_the_header() {
        assert_eq!(inflight_queue_region_size(1), 64);
        assert_eq!(inflight_queue_region_size(4), 128);
        assert_eq!(inflight_queue_region_size(128), 2112);
        assert_eq!(inflight_queue_region_size(256), 4160);
        assert_eq!(inflight_mmap_size(2, 256), 8320);
        assert_eq!(inflight_queue_offset(3, 256), 3 * 4160);
        for shift in 0..=15 {
            let qs = 1u16 << shift;
            let size = inflight_queue_region_size(qs);
            assert!(size >= QUEUE_HEADER_SIZE + DESC_STATE_SIZE * u64::from(qs));
            assert_eq!(size % INFLIGHT_ALIGNMENT, 0);
        }
    }

    #[test]
    fn fresh_region_bytes_and_init() {
        let (r, file) = region(2, 8);
        init_inflight_region(&file, 0, 2, 8).unwrap();
        for q in 0..2 {
            let iq = r.queue(q, 8).unwrap();
            let rec = iq.recover(0, 0).unwrap();
            assert!(!rec.fresh, "initialised region seen as fresh");
            assert!(rec.heads.is_empty());
        }
        let bytes = fresh_inflight_region(1, 8);
        assert_eq!(&bytes[8..12], &[1, 0, 8, 0]);
    }

    #[test]
    fn uninitialised_region_is_reset() {
        let (r, _f) = region(1, 8);
        let q = r.queue(0, 8).unwrap();
        let rec = q.recover(17, 17).unwrap();
        assert!(rec.fresh);
        assert_eq!(q.used_idx().unwrap(), 17);
        assert!(!q.recover(17, 17).unwrap().fresh);
        assert!(r.queue(1, 8).is_err());
        assert!(r.queue(0, 16).is_err());
    }

    #[test]
    fn partially_published_batch_out_of_order() {
        let (r, _f) = region(1, 8);
        let q = r.queue(0, 8).unwrap();
        q.reset(0).unwrap();
        // Consumed heads 5, 2, 7, 0, 3 (counters 1..=5).
        for (c, h) in [5u16, 2, 7, 0, 3].iter().enumerate() {
            q.begin(*h, c as u64 + 1).unwrap();
        }
        // First batch, completed out of order: 7, 5 — fully finished.
        q.link_batch(&[7, 5]).unwrap();
        q.finish_batch(&[7, 5], 2).unwrap();
        // Second batch 0, 2: used->idx stored (4), crash before clearing.
        q.link_batch(&[0, 2]).unwrap();
        let rec = q.recover(4, 5).unwrap();
        assert_eq!(rec.heads, vec![3]);
        assert_eq!(rec.next_counter, 6);
        assert_eq!(q.used_idx().unwrap(), 4);
        assert!(!q.is_inflight(0).unwrap() && !q.is_inflight(2).unwrap());

        // Same state, but the crash came before used->idx moved: all of
        // 0, 2, 3 are resubmitted, in counter order.
        q.reset_to(2, &[2, 0, 3], 3).unwrap();
        q.link_batch(&[0, 2]).unwrap();
        let rec = q.recover(2, 5).unwrap();
        assert_eq!(rec.heads, vec![2, 0, 3]);
        // More heads in flight than the avail ring holds beyond used.
        q.reset_to(2, &[2, 0, 3], 3).unwrap();
        assert!(q.recover(2, 4).is_err());
    }

    /// Issue 8's root cause: a crash inside `finish_batch` after `j` of
    /// the batch's heads were cleared. Whatever `j`, recovery must resubmit
    /// only the heads that were still in flight beside the batch, never a
    /// head of the batch the driver has already seen answered (it may
    /// have reused it for a new request).
    #[test]
    fn a_crash_inside_finish_batch_never_resubmits_a_published_head() {
        let batch: Vec<u16> = vec![9, 3, 14, 0, 7, 1, 12, 5];
        for j in 0..=batch.len() as u32 + 1 {
            let (r, _f) = region(1, 16);
            let mut q = r.queue(0, 16).unwrap();
            q.reset(10).unwrap();
            // Head 4 consumed first and still in flight; then the batch.
            q.begin(4, 1).unwrap();
            for (c, &h) in batch.iter().enumerate() {
                q.begin(h, c as u64 + 2).unwrap();
            }
            q.link_batch(&batch).unwrap();
            let used = 10 + batch.len() as u16;
            q.set_crash_hook(Some(Arc::new(move |p: RegionCrashPoint, _| {
                if p.transition == RegionTransition::Finish && p.step == j {
                    panic!("crash at {p}");
                }
            })));
            let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                q.finish_batch(&batch, used).unwrap();
            }))
            .is_err();
            assert!(crashed, "crash point finish.{j} not reached");
            q.set_crash_hook(None);
            // The driver saw used->idx = used (published before finish).
            let rec = q.recover(used, used + 1).unwrap();
            assert_eq!(rec.heads, vec![4], "crash after {j} clears");
            assert_eq!(q.used_idx().unwrap(), used);
            // Recovery is idempotent: done again, the same answer.
            assert_eq!(q.recover(used, used + 1).unwrap().heads, vec![4]);
        }
    }

    #[test]
    fn region_crash_points_parse() {
        let p: RegionCrashPoint = "region-finish.3".parse().unwrap();
        assert_eq!(p.transition, RegionTransition::Finish);
        assert_eq!(p.step, 3);
        assert_eq!(p.to_string(), "region-finish.3");
        assert!("region-begin.3".parse::<RegionCrashPoint>().is_err());
        assert!("region-nope.1".parse::<RegionCrashPoint>().is_err());
        assert!("finish.1".parse::<RegionCrashPoint>().is_err());
    }

    #[test]
    fn hostile_region_contents_are_bounded() {
        let (r, file) = region(1, 8);
        let q = r.queue(0, 4).unwrap();
        q.reset(0).unwrap();
        // Head 6 ≥ queue size 4 marked in flight; a bad inflight byte.
        file.write_all_at(&[1], QUEUE_HEADER_SIZE + 6 * DESC_STATE_SIZE)
            .unwrap();
        file.write_all_at(&[9], QUEUE_HEADER_SIZE + DESC_STATE_SIZE)
            .unwrap();
        q.begin(2, 1).unwrap();
        // A used index far ahead of the region's: refused.
        assert!(q.recover(1000, 1000).is_err());
        // The corrupt states were cleared; head 2 is still in flight.
        assert!(!q.is_inflight(1).unwrap());
        assert_eq!(q.recover(0, 1).unwrap().heads, vec![2]);
        // A batch link that loops back to 2: refused.
        q.link_batch(&[2, 2]).unwrap();
        assert!(q.recover(2, 2).is_err());
        // used moved by 1: clears head 2, the only one in flight.
        let rec = q.recover(1, 1).unwrap();
        assert_eq!(rec.heads, Vec::<u16>::new());
        // Wrong version/desc_num: reset.
        file.write_all_at(&[7, 0], VERSION).unwrap();
        assert!(q.recover(0, 0).unwrap().fresh);
    }
}
