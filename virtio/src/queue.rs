//! One split virtqueue (virtio 1.2 §2.7): typed, bounds-checked access to
//! the descriptor table and the avail and used rings in guest memory, the
//! descriptor-chain walk, and the index arithmetic of `VIRTIO_RING_F_EVENT_IDX`.
//!
//! Every field the driver controls is read once and validated: a head or
//! `next` out of range, a loop, a nested indirect table or an unmapped
//! descriptor ends the walk with a [`ChainError`], never a panic.

use std::sync::atomic::Ordering;

use shadowback_xenbus::virtio::QueueConfig;
use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

/// Size of one descriptor (`struct virtq_desc`).
pub const DESC_SIZE: u64 = 16;
/// Largest indirect table accepted, in descriptors (the largest queue).
pub const MAX_INDIRECT_DESCS: u32 = 32768;

/// A queue whose rings are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    #[error("{ring} ring at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        ring: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("{ring} ring {addr:#x}+{len:#x} is not inside guest memory")]
    OutOfMemory {
        ring: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("guest memory access failed at {0:#x}")]
    Access(u64),
}

/// Why a descriptor chain cannot be walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head {0} out of range")]
    BadHead(u16),
    #[error("next index {0} out of range")]
    BadNext(u16),
    #[error("descriptor loop")]
    Loop,
    #[error("descriptor at {0:#x} unreadable")]
    Unreadable(u64),
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT set, or bad table length {0}")]
    BadIndirect(u32),
    #[error("chain longer than 4 GiB")]
    TooLong,
}

/// One buffer of a chain, as the driver described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

/// A walked chain: its buffers in order. Only the first `cap` buffers are
/// kept; the walk still runs to the end (bounded) to find the last one,
/// which holds the status byte of a block request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chain {
    pub bufs: Vec<Buf>,
    /// The last buffer (kept even when `bufs` overflowed).
    pub last: Option<Buf>,
    /// Buffers in the chain, including those not kept.
    pub count: u32,
    /// A device-readable buffer follows a device-writable one (§2.7.4.2).
    pub misordered: bool,
    /// Descriptors read by the walk (its cost), even when it failed.
    pub descriptors_read: u32,
}

impl Chain {
    /// More buffers than the walk kept.
    pub fn overflowed(&self) -> bool {
        self.count as usize > self.bufs.len()
    }

    fn clear(&mut self) {
        self.bufs.clear();
        self.last = None;
        self.count = 0;
        self.misordered = false;
        self.descriptors_read = 0;
    }
}

/// Guest-physical layout of one split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx: bool,
}

impl SplitQueue {
    /// Checks the queue against guest memory: size a power of two, rings
    /// aligned (16/2/4, §2.7) and entirely mapped, including the event
    /// words.
    pub fn new(cfg: &QueueConfig, mem: &GuestRam, event_idx: bool) -> Result<Self, QueueError> {
        let size = cfg.size;
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::BadSize(size));
        }
        let n = u64::from(size);
        for (ring, addr, align, len) in [
            ("descriptor", cfg.desc, 16, DESC_SIZE * n),
            // flags, idx, ring[n], used_event
            ("avail", cfg.avail, 2, 6 + 2 * n),
            // flags, idx, ring[n] of 8 bytes, avail_event
            ("used", cfg.used, 4, 6 + 8 * n),
        ] {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { ring, addr, align });
            }
            if !mem.contains(addr, len) {
                return Err(QueueError::OutOfMemory { ring, addr, len });
            }
        }
        Ok(SplitQueue {
            size,
            desc: cfg.desc,
            avail: cfg.avail,
            used: cfg.used,
            event_idx,
        })
    }

    fn load16(&self, mem: &GuestRam, addr: u64, order: Ordering) -> Result<u16, QueueError> {
        mem.memory()
            .load::<u16>(GuestAddress(addr), order)
            .map(u16::from_le)
            .map_err(|_| QueueError::Access(addr))
    }

    fn store16(
        &self,
        mem: &GuestRam,
        addr: u64,
        val: u16,
        order: Ordering,
    ) -> Result<(), QueueError> {
        mem.memory()
            .store(val.to_le(), GuestAddress(addr), order)
            .map_err(|_| QueueError::Access(addr))
    }

    /// `avail->idx`. Acquire: the ring entries the driver wrote before
    /// bumping it are visible (§2.7.13, the driver's write barrier).
    pub fn avail_idx(&self, mem: &GuestRam) -> Result<u16, QueueError> {
        self.load16(mem, self.avail + 2, Ordering::Acquire)
    }

    /// `avail->flags`.
    pub fn avail_flags(&self, mem: &GuestRam) -> Result<u16, QueueError> {
        // Relaxed: a hint, read after the fence of `needs_notify`.
        self.load16(mem, self.avail, Ordering::Relaxed)
    }

    /// `avail->ring[idx % size]`: a head the driver made available. Not
    /// validated here (see [`walk_chain`]).
    pub fn avail_head(&self, mem: &GuestRam, idx: u16) -> Result<u16, QueueError> {
        let slot = u64::from(idx & (self.size - 1));
        // Relaxed: ordered by the acquire load of avail->idx.
        self.load16(mem, self.avail + 4 + 2 * slot, Ordering::Relaxed)
    }

    /// `used_event` (the word after the avail ring).
    pub fn used_event(&self, mem: &GuestRam) -> Result<u16, QueueError> {
        // Relaxed: read after the fence of `needs_notify`.
        self.load16(
            mem,
            self.avail + 4 + 2 * u64::from(self.size),
            Ordering::Relaxed,
        )
    }

    /// `used->idx` as the driver sees it.
    pub fn used_idx(&self, mem: &GuestRam) -> Result<u16, QueueError> {
        // Acquire: only the device writes it; reading our own release store.
        self.load16(mem, self.used + 2, Ordering::Acquire)
    }

    /// Writes used element `idx % size`. Published by [`Self::publish_used`].
    pub fn write_used(
        &self,
        mem: &GuestRam,
        idx: u16,
        id: u32,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = u64::from(idx & (self.size - 1));
        let addr = self.used + 4 + 8 * slot;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&id.to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(addr, &elem).map_err(|_| QueueError::Access(addr))
    }

    /// Stores `used->idx`. Release: the used elements (and the data and
    /// status bytes they describe) are visible first (§2.7.14, the
    /// device's write barrier before updating idx).
    pub fn publish_used(&self, mem: &GuestRam, idx: u16) -> Result<(), QueueError> {
        self.store16(mem, self.used + 2, idx, Ordering::Release)
    }

    /// Stores `avail_event` (the word after the used ring).
    pub fn set_avail_event(&self, mem: &GuestRam, val: u16) -> Result<(), QueueError> {
        // Relaxed: the caller fences before re-reading avail->idx.
        self.store16(
            mem,
            self.used + 4 + 8 * u64::from(self.size),
            val,
            Ordering::Relaxed,
        )
    }

    /// Whether the driver wants an interrupt now that `used->idx` moved
    /// from `old` to `new` (§2.7.10).
    pub fn needs_notify(&self, mem: &GuestRam, old: u16, new: u16) -> Result<bool, QueueError> {
        // SeqCst fence: the used->idx store is visible before we read the
        // driver's suppression words (the device-side mb() of §2.7.10).
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.event_idx {
            Ok(vring_need_event(self.used_event(mem)?, new, old))
        } else {
            Ok(self.avail_flags(mem)? & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        }
    }

    /// Walks the chain starting at `head` into `chain`, keeping at most
    /// `cap` buffers. See [`walk_chain`].
    pub fn walk(
        &self,
        mem: &GuestRam,
        head: u16,
        cap: usize,
        chain: &mut Chain,
    ) -> Result<(), ChainError> {
        walk_chain(mem, self.desc, self.size, head, cap, chain)
    }
}

/// `vring_need_event`: whether `event` lies in `(old, new]` (mod 2^16).
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The free-running u32 index whose low 16 bits, shifted by `delta`, are
/// `idx16`, nearest to `reference` (within ±32767).
pub fn extend_index(reference: u32, delta: u16, idx16: u16) -> u32 {
    let at_ref = (reference as u16).wrapping_add(delta);
    let d = idx16.wrapping_sub(at_ref) as i16;
    reference.wrapping_add_signed(i32::from(d))
}

/// The guest's u16 index for log index `idx` (inverse of [`extend_index`]).
pub fn guest_index(idx: u32, delta: u16) -> u16 {
    (idx as u16).wrapping_add(delta)
}

fn read_desc(mem: &GuestRam, table: u64, i: u16) -> Result<Descriptor, ChainError> {
    let addr = table
        .checked_add(u64::from(i) * DESC_SIZE)
        .ok_or(ChainError::Unreadable(table))?;
    mem.memory()
        .read_obj::<Descriptor>(GuestAddress(addr))
        .map_err(|_| ChainError::Unreadable(addr))
}

/// Walks the descriptor chain at `head` of the table at `desc_table`
/// (`size` entries), following at most one indirect table.
///
/// Bounded: at most `size` descriptors in the main table and at most the
/// table's length in an indirect one (a longer walk is a loop), so a chain
/// costs O(queue size) at worst.
pub fn walk_chain(
    mem: &GuestRam,
    desc_table: u64,
    size: u16,
    head: u16,
    cap: usize,
    chain: &mut Chain,
) -> Result<(), ChainError> {
    chain.clear();
    if head >= size {
        return Err(ChainError::BadHead(head));
    }
    let mut table = desc_table;
    let mut table_len = u32::from(size);
    let mut ttl = table_len;
    let mut indirect = false;
    let mut next = head;
    let mut total: u64 = 0;
    let mut seen_writable = false;
    loop {
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        ttl -= 1;
        chain.descriptors_read += 1;
        let d = read_desc(mem, table, next)?;
        let flags = d.flags();
        if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            let len = d.len();
            if flags & VRING_DESC_F_NEXT as u16 != 0
                || len == 0
                || u64::from(len) % DESC_SIZE != 0
                || u64::from(len) / DESC_SIZE > u64::from(MAX_INDIRECT_DESCS)
            {
                return Err(ChainError::BadIndirect(len));
            }
            indirect = true;
            table = d.addr().0;
            table_len = (u64::from(len) / DESC_SIZE) as u32;
            ttl = table_len;
            next = 0;
            continue;
        }
        total += u64::from(d.len());
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooLong);
        }
        let buf = Buf {
            addr: d.addr().0,
            len: d.len(),
            writable: flags & VRING_DESC_F_WRITE as u16 != 0,
        };
        if buf.writable {
            seen_writable = true;
        } else if seen_writable {
            chain.misordered = true;
        }
        chain.count += 1;
        if chain.bufs.len() < cap {
            chain.bufs.push(buf);
        }
        chain.last = Some(buf);
        if flags & VRING_DESC_F_NEXT as u16 == 0 {
            return Ok(());
        }
        next = d.next();
        if u32::from(next) >= table_len {
            return Err(ChainError::BadNext(next));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const F_IND: u16 = VRING_DESC_F_INDIRECT as u16;

    fn ram() -> GuestRam {
        GuestRam::from_memory(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap())
    }

    fn put(mem: &GuestRam, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.memory()
            .write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Notify when used->idx moved past used_event: event in [old, new).
        assert!(vring_need_event(5, 6, 5));
        assert!(vring_need_event(4, 6, 4));
        assert!(vring_need_event(5, 6, 4));
        assert!(!vring_need_event(5, 5, 4));
        assert!(!vring_need_event(7, 6, 4));
        assert!(!vring_need_event(3, 6, 4));
        // Across the u16 wrap.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(1, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
        // Nothing new never notifies.
        assert!(!vring_need_event(7, 7, 7));
    }

    #[test]
    fn index_extension_across_the_wrap() {
        assert_eq!(extend_index(0x1_0000, 0, 3), 0x1_0003);
        assert_eq!(extend_index(0x1_0002, 0, 0xfffe), 0xfffe);
        assert_eq!(extend_index(0xffff_fff0, 0, 0x10), 0x10);
        assert_eq!(extend_index(5, 0, 0xfff0), 0xffff_fff0);
        // A shifted mapping: guest index = log index + delta.
        let delta = 0x8000u16;
        assert_eq!(extend_index(100, delta, 100u16.wrapping_add(delta)), 100);
        assert_eq!(extend_index(100, delta, 90u16.wrapping_add(delta)), 90);
        for log in [0u32, 1, 0xffff, 0x1_0000, u32::MAX, 0x7fff_ffff] {
            for delta in [0u16, 1, 0x8000, 0xffff] {
                for d in [-300i32, -1, 0, 1, 300] {
                    let target = log.wrapping_add_signed(d);
                    assert_eq!(extend_index(log, delta, guest_index(target, delta)), target);
                }
            }
        }
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let mem = ram();
        let mut chain = Chain::default();
        put(&mem, 0, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0, 1, 0x2000, 512, F_NEXT | F_WRITE, 2);
        put(&mem, 0, 2, 0x3000, 1, F_WRITE, 0);
        walk_chain(&mem, 0, 4, 0, 8, &mut chain).unwrap();
        assert_eq!(chain.count, 3);
        assert!(!chain.misordered);
        assert_eq!(chain.last.unwrap().addr, 0x3000);

        // Indirect table of 3 at 0x800.
        put(&mem, 0, 3, 0x800, 48, F_IND, 0);
        put(&mem, 0x800, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0x800, 1, 0x2000, 512, F_NEXT, 2);
        put(&mem, 0x800, 2, 0x3000, 1, F_WRITE, 0);
        walk_chain(&mem, 0, 4, 3, 8, &mut chain).unwrap();
        assert_eq!(chain.count, 3);
        assert_eq!(chain.bufs[1].len, 512);

        // Capped: still finds the last buffer.
        walk_chain(&mem, 0, 4, 3, 1, &mut chain).unwrap();
        assert_eq!((chain.bufs.len(), chain.count), (1, 3));
        assert!(chain.overflowed());
        assert_eq!(chain.last.unwrap().addr, 0x3000);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let mem = ram();
        let mut chain = Chain::default();
        assert_eq!(
            walk_chain(&mem, 0, 4, 4, 8, &mut chain),
            Err(ChainError::BadHead(4))
        );
        // Loop 0 → 1 → 0.
        put(&mem, 0, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0, 1, 0x1000, 16, F_NEXT, 0);
        assert_eq!(
            walk_chain(&mem, 0, 4, 0, 8, &mut chain),
            Err(ChainError::Loop)
        );
        // The walk's cost is known even when it fails.
        assert_eq!(chain.descriptors_read, 4);
        // next out of range.
        put(&mem, 0, 1, 0x1000, 16, F_NEXT, 9);
        assert_eq!(
            walk_chain(&mem, 0, 4, 0, 8, &mut chain),
            Err(ChainError::BadNext(9))
        );
        // Indirect in indirect.
        put(&mem, 0, 2, 0x800, 32, F_IND, 0);
        put(&mem, 0x800, 0, 0x900, 16, F_IND, 0);
        assert_eq!(
            walk_chain(&mem, 0, 4, 2, 8, &mut chain),
            Err(ChainError::NestedIndirect)
        );
        // Indirect with a length not a multiple of 16, or with NEXT.
        put(&mem, 0, 2, 0x800, 20, F_IND, 0);
        assert!(matches!(
            walk_chain(&mem, 0, 4, 2, 8, &mut chain),
            Err(ChainError::BadIndirect(20))
        ));
        put(&mem, 0, 2, 0x800, 32, F_IND | F_NEXT, 3);
        assert!(matches!(
            walk_chain(&mem, 0, 4, 2, 8, &mut chain),
            Err(ChainError::BadIndirect(_))
        ));
        // Loop inside an indirect table.
        put(&mem, 0, 2, 0x800, 32, F_IND, 0);
        put(&mem, 0x800, 0, 0x1000, 16, F_NEXT, 1);
        put(&mem, 0x800, 1, 0x1000, 16, F_NEXT, 0);
        assert_eq!(
            walk_chain(&mem, 0, 4, 2, 8, &mut chain),
            Err(ChainError::Loop)
        );
        // Indirect table outside guest memory.
        put(&mem, 0, 2, 0xffff_0000, 32, F_IND, 0);
        assert!(matches!(
            walk_chain(&mem, 0, 4, 2, 8, &mut chain),
            Err(ChainError::Unreadable(_))
        ));
        // Over 4 GiB in total.
        put(&mem, 0, 0, 0x1000, u32::MAX, F_NEXT, 1);
        put(&mem, 0, 1, 0x1000, 2, 0, 0);
        assert_eq!(
            walk_chain(&mem, 0, 4, 0, 8, &mut chain),
            Err(ChainError::TooLong)
        );
        // Readable after writable is walked but flagged.
        put(&mem, 0, 0, 0x1000, 1, F_NEXT | F_WRITE, 1);
        put(&mem, 0, 1, 0x1000, 16, 0, 0);
        walk_chain(&mem, 0, 4, 0, 8, &mut chain).unwrap();
        assert!(chain.misordered);
    }

    #[test]
    fn queue_layout_is_validated() {
        let mem = ram();
        let cfg = |desc, avail, used, size| QueueConfig {
            index: 0,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
        };
        assert!(SplitQueue::new(&cfg(0, 0x1000, 0x2000, 256), &mem, true).is_ok());
        assert!(matches!(
            SplitQueue::new(&cfg(8, 0x1000, 0x2000, 256), &mem, true),
            Err(QueueError::Misaligned { .. })
        ));
        assert!(matches!(
            SplitQueue::new(&cfg(0, 0x1001, 0x2000, 256), &mem, true),
            Err(QueueError::Misaligned { .. })
        ));
        assert!(matches!(
            SplitQueue::new(&cfg(0, 0x1000, 0x2002, 256), &mem, true),
            Err(QueueError::Misaligned { .. })
        ));
        assert!(matches!(
            SplitQueue::new(&cfg(0, 0x1000, 0xf800, 256), &mem, true),
            Err(QueueError::OutOfMemory { .. })
        ));
        assert!(matches!(
            SplitQueue::new(&cfg(0xf000, 0x1000, 0x2000, 512), &mem, true),
            Err(QueueError::OutOfMemory { .. })
        ));
        assert!(matches!(
            SplitQueue::new(&cfg(0, 0x1000, 0x2000, 3), &mem, true),
            Err(QueueError::BadSize(3))
        ));
    }

    #[test]
    fn used_ring_round_trip_and_notification() {
        let mem = ram();
        let cfg = QueueConfig {
            index: 0,
            size: 4,
            desc: 0,
            avail: 0x1000,
            used: 0x2000,
            next_avail: 0,
        };
        let q = SplitQueue::new(&cfg, &mem, true).unwrap();
        q.write_used(&mem, 5, 3, 513).unwrap();
        q.publish_used(&mem, 6).unwrap();
        assert_eq!(q.used_idx(&mem).unwrap(), 6);
        let mut elem = [0u8; 8];
        mem.read(0x2000 + 4 + 8, &mut elem).unwrap();
        assert_eq!(elem, [3, 0, 0, 0, 1, 2, 0, 0]);
        // used_event = 5: moving 4 → 6 crosses it.
        mem.write(0x1000 + 4 + 8, &5u16.to_le_bytes()).unwrap();
        assert!(q.needs_notify(&mem, 4, 6).unwrap());
        assert!(!q.needs_notify(&mem, 6, 7).unwrap());
        q.set_avail_event(&mem, 9).unwrap();
        let mut w = [0u8; 2];
        mem.read(0x2000 + 4 + 32, &mut w).unwrap();
        assert_eq!(u16::from_le_bytes(w), 9);
        // Without EVENT_IDX: the NO_INTERRUPT flag.
        let q = SplitQueue::new(&cfg, &mem, false).unwrap();
        assert!(q.needs_notify(&mem, 6, 7).unwrap());
        mem.write(0x1000, &1u16.to_le_bytes()).unwrap();
        assert!(!q.needs_notify(&mem, 6, 7).unwrap());
    }
}
