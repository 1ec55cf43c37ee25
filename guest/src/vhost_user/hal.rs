//! The only `unsafe` of the vhost-user client: where `virtio-drivers`' raw
//! pointer API meets guest RAM.
//!
//! - [`GuestHal`], the `virtio_drivers::Hal` over [`GuestRam`]: DMA pages
//!   come from the RAM; `share` passes buffers that already live in guest
//!   RAM by their guest-physical address (zero copy) and bounces others
//!   through freshly allocated pages, copied back on `unshare`.
//! - [`RequestQueue`], a `VirtQueue` whose buffers are named by
//!   guest-physical ranges ([`ChainBuf`]) instead of Rust slices, so callers
//!   stay safe.
//! - [`borrow_eventfd`], because `vmm_sys_util::EventFd` has no `AsFd`.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Mutex;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{GuestRam, DEFAULT_RAM_BYTES, PAGE_BYTES};

/// A gpa outside any RAM we create: what `share` hands the device when it
/// cannot bounce a buffer (RAM exhausted), so the device fails the request
/// instead of touching unrelated memory.
pub const INVALID_GPA: PhysAddr = !(PAGE_BYTES - 1);

/// Bounce buffers in use: gpa → pages.
static BOUNCES: Mutex<BTreeMap<PhysAddr, u64>> = Mutex::new(BTreeMap::new());

fn ram() -> Option<&'static GuestRam> {
    match GuestRam::global(DEFAULT_RAM_BYTES) {
        Ok(ram) => Some(ram),
        Err(e) => {
            tracing::error!("guest RAM unavailable: {e}");
            None
        }
    }
}

/// `virtio_drivers::Hal` over the process's [`GuestRam`] (see the memory
/// module for why it is process-global).
#[derive(Debug)]
pub struct GuestHal;

#[allow(unsafe_code, reason = "virtio-drivers' `Hal` is an unsafe trait")]
// SAFETY: `dma_alloc` returns page-aligned pointers into the 'static RAM
// mapping, from runs the page allocator hands out exactly once until
// `dma_dealloc`, zeroed; `share` returns gpas the device may use for the
// buffer's lifetime; `mmio_phys_to_virt` is never valid here and panics.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let failed = (0, NonNull::dangling());
        let Some(ram) = ram() else { return failed };
        let Some(gpa) = ram.alloc_pages(pages as u64) else {
            tracing::error!(pages, "guest RAM exhausted");
            return failed;
        };
        match ram.host_addr(gpa).and_then(NonNull::new) {
            Some(ptr) => (gpa, ptr),
            None => {
                ram.free_pages_at(gpa, pages as u64);
                failed
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        // virtio-drivers asserts 0 on drop; a refused free is only logged.
        if let Some(ram) = GuestRam::installed() {
            if !ram.free_pages_at(paddr, pages as u64) {
                tracing::error!(paddr, pages, "DMA pages freed that were not allocated");
            }
        }
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Only the PCI transport maps BARs; the vhost-user transport has none.
        panic!("vhost-user transport has no MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let Some(ram) = ram() else { return INVALID_GPA };
        let (ptr, len) = (buffer.as_ptr() as *const u8, buffer.len());
        if let Some(gpa) = ram.gpa_of(ptr, len) {
            return gpa; // already in guest RAM: zero copy
        }
        let pages = (len as u64).max(1).div_ceil(PAGE_BYTES);
        let Some(gpa) = ram.alloc_pages(pages) else {
            tracing::error!(len, "guest RAM exhausted, cannot bounce a buffer");
            return INVALID_GPA;
        };
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller guarantees `buffer` is valid for `len` bytes
            // and not accessed by another thread during this call.
            let src = unsafe { std::slice::from_raw_parts(ptr, len) };
            if ram.write(gpa, src).is_err() {
                ram.free_pages_at(gpa, pages);
                return INVALID_GPA;
            }
        }
        lock_bounces().insert(gpa, pages);
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let Some(ram) = GuestRam::installed() else {
            return;
        };
        let (ptr, len) = (buffer.as_ptr() as *mut u8, buffer.len());
        if ram.gpa_of(ptr, len) == Some(paddr) {
            return; // shared in place
        }
        let Some(pages) = lock_bounces().remove(&paddr) else {
            return; // INVALID_GPA or never shared: nothing to copy
        };
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: the caller guarantees `buffer` is valid for `len` bytes
            // and not accessed by another thread during this call; it is the
            // buffer `share` bounced to `paddr`, which has `len` bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            if let Err(e) = ram.read(paddr, dst) {
                tracing::error!("bounce copy-back failed: {e}");
            }
        }
        ram.free_pages_at(paddr, pages);
    }
}

fn lock_bounces() -> std::sync::MutexGuard<'static, BTreeMap<PhysAddr, u64>> {
    BOUNCES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bounce buffers currently outstanding (for tests and leak checks).
pub fn outstanding_bounces() -> usize {
    lock_bounces().len()
}

/// One buffer of a descriptor chain: `len` bytes of guest RAM at `gpa`,
/// written by the device if `device_writes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainBuf {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
    /// The device writes this buffer (a virtio "in" buffer).
    pub device_writes: bool,
}

/// Most buffers in one chain (virtio-blk: header, data, status).
pub const MAX_CHAIN: usize = 3;

/// The operations used on a `VirtQueue<GuestHal, SIZE>`, object-safe so the
/// queue size can be chosen at run time.
#[allow(unsafe_code, reason = "mirrors `VirtQueue`'s unsafe add/pop contracts")]
trait RawQueue: Send {
    /// # Safety
    /// `inputs`/`outputs` must stay valid until `pop` of the returned token.
    unsafe fn add<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> QueueResult<u16>;
    /// # Safety
    /// The buffers must be the ones `add` returned `token` for.
    unsafe fn pop<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> QueueResult<u32>;
}

type QueueResult<T> = Result<T, virtio_drivers::Error>;

#[allow(unsafe_code, reason = "forwards to `VirtQueue`'s unsafe add/pop")]
impl<const SIZE: usize> RawQueue for VirtQueue<GuestHal, SIZE> {
    unsafe fn add<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> QueueResult<u16> {
        // SAFETY: forwarded from our caller's contract.
        unsafe { VirtQueue::add(self, inputs, outputs) }
    }

    unsafe fn pop<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> QueueResult<u32> {
        // SAFETY: forwarded from our caller's contract.
        unsafe { self.pop_used(token, inputs, outputs) }
    }
}

/// A split virtqueue driven by `virtio-drivers`, with buffers named by
/// guest-physical ranges.
///
/// `virtio-drivers` only ever turns the slices it is given back into
/// pointers for [`GuestHal::share`], which maps in-RAM buffers to their gpa
/// without reading them; so the slices built here live only for the
/// duration of one `add`/`pop` call and nothing dereferences them while the
/// device may write the memory.
pub struct RequestQueue {
    queue: Box<dyn RawQueue>,
    ram: &'static GuestRam,
    size: u16,
}

impl std::fmt::Debug for RequestQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestQueue")
            .field("size", &self.size)
            .finish()
    }
}

impl RequestQueue {
    /// Queue sizes [`RequestQueue::new`] accepts.
    pub const SIZES: [u16; 5] = [64, 128, 256, 512, 1024];

    /// Allocates virtqueue `index` of `size` descriptors (one of
    /// [`RequestQueue::SIZES`]) in guest RAM and sets it up through
    /// `transport` (`queue_set`). No indirect descriptors: every buffer stays
    /// in guest RAM.
    pub fn new<T: Transport>(
        transport: &mut T,
        ram: &'static GuestRam,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> QueueResult<Self> {
        fn boxed<T: Transport, const N: usize>(
            t: &mut T,
            index: u16,
            event_idx: bool,
        ) -> QueueResult<Box<dyn RawQueue>> {
            Ok(Box::new(VirtQueue::<GuestHal, N>::new(
                t, index, false, event_idx,
            )?))
        }
        let queue = match size {
            64 => boxed::<T, 64>(transport, index, event_idx)?,
            128 => boxed::<T, 128>(transport, index, event_idx)?,
            256 => boxed::<T, 256>(transport, index, event_idx)?,
            512 => boxed::<T, 512>(transport, index, event_idx)?,
            1024 => boxed::<T, 1024>(transport, index, event_idx)?,
            _ => return Err(virtio_drivers::Error::InvalidParam),
        };
        Ok(RequestQueue { queue, ram, size })
    }

    /// Descriptors in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Publishes a chain (driver-read buffers first, then device-written
    /// ones, as virtio requires) and returns its head descriptor, the token
    /// the device will report in the used ring.
    #[allow(unsafe_code, reason = "calls `RawQueue::add` with RAM-backed slices")]
    pub fn add(&mut self, chain: &[ChainBuf]) -> QueueResult<u16> {
        let mut inputs: [&[u8]; MAX_CHAIN] = [&[]; MAX_CHAIN];
        let mut outputs: [&mut [u8]; MAX_CHAIN] = [&mut [], &mut [], &mut []];
        let (ni, no) = slices(self.ram, chain, &mut inputs, &mut outputs)?;
        // SAFETY: the slices point into the 'static RAM mapping (bounds
        // checked in `slices`); virtio-drivers keeps only the gpas
        // `GuestHal::share` returns for them, never the slices.
        unsafe { self.queue.add(&inputs[..ni], &mut outputs[..no]) }
    }

    /// Recycles the chain `token` after the device used it; `chain` must be
    /// what was passed to [`RequestQueue::add`] for it. Returns the used
    /// length the device reported. Fails (without panicking) if `token` is
    /// not the next used entry.
    #[allow(unsafe_code, reason = "calls `RawQueue::pop` with the slices of `add`")]
    pub fn pop(&mut self, token: u16, chain: &[ChainBuf]) -> QueueResult<u32> {
        let mut inputs: [&[u8]; MAX_CHAIN] = [&[]; MAX_CHAIN];
        let mut outputs: [&mut [u8]; MAX_CHAIN] = [&mut [], &mut [], &mut []];
        let (ni, no) = slices(self.ram, chain, &mut inputs, &mut outputs)?;
        // SAFETY: as in `add`; `unshare` of in-RAM buffers touches no
        // memory, and virtio-drivers checks `token` against the used ring
        // before recycling.
        unsafe { self.queue.pop(token, &inputs[..ni], &mut outputs[..no]) }
    }
}

/// Turns a chain into the slices `VirtQueue` wants: `(inputs, outputs)`
/// counts. Every buffer must lie in RAM, and device-written buffers must
/// follow driver-written ones.
#[allow(unsafe_code, reason = "builds slices over guest RAM from gpas")]
fn slices<'s>(
    ram: &'static GuestRam,
    chain: &[ChainBuf],
    inputs: &mut [&'s [u8]; MAX_CHAIN],
    outputs: &mut [&'s mut [u8]; MAX_CHAIN],
) -> QueueResult<(usize, usize)> {
    if chain.is_empty() || chain.len() > MAX_CHAIN {
        return Err(virtio_drivers::Error::InvalidParam);
    }
    let (mut ni, mut no) = (0, 0);
    for buf in chain {
        if buf.len == 0 || !ram.contains(buf.gpa, u64::from(buf.len)) {
            return Err(virtio_drivers::Error::InvalidParam);
        }
        if !buf.device_writes && no > 0 {
            return Err(virtio_drivers::Error::InvalidParam);
        }
        let ptr = ram
            .host_addr(buf.gpa)
            .ok_or(virtio_drivers::Error::InvalidParam)?;
        let len = buf.len as usize;
        if buf.device_writes {
            // SAFETY: `[gpa, gpa + len)` lies inside the RAM mapping, which
            // lives for the whole process; the slice is only handed to one
            // `add`/`pop` call, which uses nothing but its address.
            outputs[no] = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            no += 1;
        } else {
            // SAFETY: as above.
            inputs[ni] = unsafe { std::slice::from_raw_parts(ptr, len) };
            ni += 1;
        }
    }
    Ok((ni, no))
}

/// `vring_need_event` (virtio 1.2 §2.7.10): notify if `event` lies in
/// `[old, new)` modulo 2^16 — a driver that moved `avail->idx` from `old`
/// to `new` kicks a device whose `avail_event` is `event`. (Not
/// `VirtQueue::should_notify`, whose comparison ignores wrap-around.)
pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Borrows the fd of an `EventFd` (which lacks `AsFd`) for `poll(2)`.
#[allow(unsafe_code, reason = "`BorrowedFd::borrow_raw`")]
pub fn borrow_eventfd(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns its fd and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

#[cfg(test)]
#[allow(unsafe_code, reason = "the tests call the `Hal`'s unsafe functions")]
mod tests {
    use super::*;

    fn global() -> &'static GuestRam {
        GuestRam::global(DEFAULT_RAM_BYTES).unwrap()
    }

    #[test]
    fn need_event_handles_wrap_around() {
        // The device asked to be notified once avail passes index 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3), "event not yet reached");
        assert!(!need_event(9, 12, 10), "event before old: already notified");
        // Across the 16-bit wrap: what virtio-drivers' `>=` gets wrong.
        assert!(need_event(65530, 3, 65529));
        assert!(!need_event(2, 65534, 65530));
    }

    #[test]
    fn share_in_ram_is_zero_copy() {
        let ram = global();
        let buf = ram.alloc(8192).unwrap();
        let ptr = ram.host_addr(buf.gpa()).unwrap();
        let slice = NonNull::slice_from_raw_parts(NonNull::new(ptr).unwrap(), 100);
        // SAFETY: 100 bytes of a live DMA buffer nobody else uses.
        let gpa = unsafe { GuestHal::share(slice, BufferDirection::Both) };
        assert_eq!(gpa, buf.gpa());
        assert!(!lock_bounces().contains_key(&gpa), "no bounce");
        // SAFETY: as above, with the gpa `share` returned.
        unsafe { GuestHal::unshare(gpa, slice, BufferDirection::Both) };
    }

    #[test]
    fn share_outside_ram_bounces_and_copies_back() {
        let ram = global();
        let mut outside = vec![7u8; 5000];
        let slice = NonNull::from(outside.as_mut_slice());
        // SAFETY: a live Vec we do not touch until unshare.
        let gpa = unsafe { GuestHal::share(slice, BufferDirection::Both) };
        assert!(ram.contains(gpa, 5000), "bounced into guest RAM");
        assert_eq!(lock_bounces().get(&gpa), Some(&2), "two bounce pages");
        let mut seen = vec![0u8; 5000];
        ram.read(gpa, &mut seen).unwrap();
        assert!(seen.iter().all(|&b| b == 7), "copied in for the device");
        // The "device" writes the bounce buffer.
        ram.write(gpa, &[9u8; 5000]).unwrap();
        // SAFETY: same buffer, the gpa `share` returned.
        unsafe { GuestHal::unshare(gpa, slice, BufferDirection::DeviceToDriver) };
        assert!(outside.iter().all(|&b| b == 9), "copied back to the driver");
        assert!(!lock_bounces().contains_key(&gpa), "bounce freed");

        // Driver-to-device buffers are not copied back.
        let slice = NonNull::from(outside.as_mut_slice());
        // SAFETY: as above.
        let gpa = unsafe { GuestHal::share(slice, BufferDirection::DriverToDevice) };
        ram.write(gpa, &[1u8; 5000]).unwrap();
        // SAFETY: as above.
        unsafe { GuestHal::unshare(gpa, slice, BufferDirection::DriverToDevice) };
        assert!(outside.iter().all(|&b| b == 9));
    }

    #[test]
    fn dma_alloc_is_zeroed_page_aligned_and_never_zero() {
        let (gpa, ptr) = GuestHal::dma_alloc(2, BufferDirection::Both);
        assert_ne!(gpa, 0);
        assert_eq!(gpa % PAGE_BYTES, 0);
        let ram = global();
        assert_eq!(ram.host_addr(gpa), Some(ptr.as_ptr()));
        let mut page = vec![1u8; 8192];
        ram.read(gpa, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        // SAFETY: returned by dma_alloc above with the same page count.
        assert_eq!(unsafe { GuestHal::dma_dealloc(gpa, ptr, 2) }, 0);
    }
}
