//! Guest RAM: one sealed memfd mapped into this process, guest-physical
//! address = offset in the memfd, and a page allocator for DMA buffers.
//!
//! The vhost-user backend maps the same memfd (`SET_MEM_TABLE`), so
//! everything the driver places here — virtqueues, request headers, data —
//! is what the backend sees at the same guest-physical address.
//!
//! # One RAM per process
//!
//! `virtio_drivers::Hal` is a trait of associated functions without `self`,
//! so its allocator cannot be found through a device: it must be reachable
//! from a static. A process here plays one guest, and a guest has one
//! physical memory shared by all its devices, so [`GuestRam::global`]
//! creates it once (sized by the first caller) and every device — and every
//! vhost-user connection — uses it.
//!
//! All accesses go through `vm-memory`'s range-checked volatile accessors;
//! nothing here is `unsafe`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{
    AtomicAccess, Bytes, FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

/// Page size of the DMA allocator (and of virtio-drivers' `PAGE_SIZE`).
pub const PAGE_BYTES: u64 = 4096;
/// Guest RAM size used when the first user does not ask for another.
pub const DEFAULT_RAM_BYTES: u64 = 256 << 20;
/// Largest guest RAM this client creates.
pub const MAX_RAM_BYTES: u64 = 64 << 30;

static RAM: OnceLock<GuestRam> = OnceLock::new();
/// Serialises creation of [`RAM`] (`OnceLock::get_or_try_init` is unstable).
static RAM_INIT: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every
    // critical section is a single map update), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Free page runs, first fit, coalescing on free. Page 0 is never handed
/// out: `virtio_drivers` treats physical address 0 as an allocation failure.
#[derive(Debug)]
pub(crate) struct PageAllocator {
    /// First page → length in pages, of every free run. Runs never touch.
    free: BTreeMap<u64, u64>,
    total: u64,
}

impl PageAllocator {
    /// An allocator over pages `[1, total)`.
    pub(crate) fn new(total: u64) -> Self {
        let mut free = BTreeMap::new();
        if total > 1 {
            free.insert(1, total - 1);
        }
        PageAllocator { free, total }
    }

    /// First page of a run of `pages` pages, or `None` when no run fits.
    pub(crate) fn alloc(&mut self, pages: u64) -> Option<u64> {
        if pages == 0 {
            return None;
        }
        let (&start, &len) = self.free.iter().find(|(_, &len)| len >= pages)?;
        self.free.remove(&start);
        if len > pages {
            self.free.insert(start + pages, len - pages);
        }
        Some(start)
    }

    /// Returns a run. A run that is not (wholly) allocated is refused with
    /// `false` and changes nothing.
    pub(crate) fn free(&mut self, start: u64, pages: u64) -> bool {
        let Some(end) = start.checked_add(pages) else {
            return false;
        };
        if pages == 0 || start == 0 || end > self.total {
            return false;
        }
        let before = self.free.range(..end).next_back().map(|(&s, &l)| (s, l));
        if let Some((s, l)) = before {
            if s + l > start {
                return false; // overlaps a free run: double free
            }
        }
        let (mut start, mut pages) = (start, pages);
        if let Some((s, l)) = before {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                pages += l;
            }
        }
        if let Some(l) = self.free.remove(&end) {
            pages += l;
        }
        self.free.insert(start, pages);
        true
    }

    /// Pages currently free.
    pub(crate) fn free_pages(&self) -> u64 {
        self.free.values().sum()
    }
}

/// The guest's physical memory. See the module docs.
#[derive(Debug)]
pub struct GuestRam {
    /// The one region, at gpa 0: a gpa is its region address, so no
    /// access looks a region up (the driver's rings and frames are
    /// accessed several times per frame).
    mem: GuestRegionMmap,
    /// The memfd, for `SET_MEM_TABLE`.
    file: File,
    size: u64,
    pages: Mutex<PageAllocator>,
}

impl GuestRam {
    /// The process's guest RAM, created with `size` bytes on first use
    /// (later callers get the existing one, whatever its size).
    pub fn global(size: u64) -> io::Result<&'static GuestRam> {
        if let Some(ram) = RAM.get() {
            return Ok(ram);
        }
        let _guard = lock(&RAM_INIT);
        if let Some(ram) = RAM.get() {
            return Ok(ram);
        }
        let ram = GuestRam::new(size)?;
        Ok(RAM.get_or_init(|| ram))
    }

    /// The process's guest RAM if it exists.
    pub fn installed() -> Option<&'static GuestRam> {
        RAM.get()
    }

    /// A fresh RAM of `size` bytes (a non-zero multiple of 4 KiB, at least
    /// two pages, at most [`MAX_RAM_BYTES`]).
    pub(crate) fn new(size: u64) -> io::Result<Self> {
        if size < 2 * PAGE_BYTES || !size.is_multiple_of(PAGE_BYTES) || size > MAX_RAM_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest RAM size {size} is not a multiple of 4 KiB in [8 KiB, 64 GiB]"),
            ));
        }
        let fd = memfd_create(
            c"shadowback-guest-ram",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(size)?;
        // The backend maps the whole size: it must never shrink under it.
        fcntl(
            file.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let len = usize::try_from(size).map_err(|_| io::Error::other("RAM size overflows"))?;
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), len)
            .map_err(|e| io::Error::other(format!("mapping guest RAM: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| io::Error::other("guest RAM region overflows"))?;
        Ok(GuestRam {
            mem: region,
            file,
            size,
            pages: Mutex::new(PageAllocator::new(size / PAGE_BYTES)),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing the RAM (mapped at offset 0 = gpa 0).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Pages not allocated.
    pub fn free_pages(&self) -> u64 {
        lock(&self.pages).free_pages()
    }

    /// `[gpa, gpa + len)` lies inside the RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Our address of `gpa` (the vhost-user "user address"), or `None` out
    /// of range.
    pub fn host_addr(&self, gpa: u64) -> Option<*mut u8> {
        if gpa >= self.size {
            return None;
        }
        self.mem.get_host_address(MemoryRegionAddress(gpa)).ok()
    }

    /// The guest-physical address of `[addr, addr + len)` when it lies
    /// entirely inside the RAM mapping.
    pub fn gpa_of(&self, addr: *const u8, len: usize) -> Option<u64> {
        let base = self.host_addr(0)? as usize;
        let off = (addr as usize).checked_sub(base)? as u64;
        self.contains(off, len as u64).then_some(off)
    }

    /// Allocates `pages` zeroed pages; returns the gpa of the first.
    pub(crate) fn alloc_pages(&self, pages: u64) -> Option<u64> {
        let first = lock(&self.pages).alloc(pages)?;
        let gpa = first * PAGE_BYTES;
        if self.zero(gpa, pages * PAGE_BYTES).is_err() {
            lock(&self.pages).free(first, pages);
            return None;
        }
        Some(gpa)
    }

    /// Returns pages from [`GuestRam::alloc_pages`]; `false` if they were not
    /// allocated.
    pub(crate) fn free_pages_at(&self, gpa: u64, pages: u64) -> bool {
        gpa.is_multiple_of(PAGE_BYTES) && lock(&self.pages).free(gpa / PAGE_BYTES, pages)
    }

    /// A zeroed buffer of at least `bytes` bytes (whole pages), freed when
    /// dropped.
    pub fn alloc(&'static self, bytes: u64) -> Option<DmaBuffer> {
        let pages = bytes.max(1).div_ceil(PAGE_BYTES);
        let gpa = self.alloc_pages(pages)?;
        Some(DmaBuffer {
            ram: self,
            gpa,
            pages,
        })
    }

    fn zero(&self, gpa: u64, len: u64) -> io::Result<()> {
        const ZEROS: [u8; PAGE_BYTES as usize] = [0; PAGE_BYTES as usize];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(PAGE_BYTES);
            self.write(gpa + off, &ZEROS[..n as usize])?;
            off += n;
        }
        Ok(())
    }

    /// Copies `buf` to guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> io::Result<()> {
        self.mem
            .write_slice(buf, MemoryRegionAddress(gpa))
            .map_err(|e| io::Error::other(format!("guest RAM write at {gpa:#x}: {e}")))
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem
            .read_slice(buf, MemoryRegionAddress(gpa))
            .map_err(|e| io::Error::other(format!("guest RAM read at {gpa:#x}: {e}")))
    }

    /// Atomic load of a naturally aligned integer (ring indices).
    pub fn load<T: AtomicAccess>(&self, gpa: u64, order: Ordering) -> io::Result<T> {
        self.mem
            .load(MemoryRegionAddress(gpa), order)
            .map_err(|e| io::Error::other(format!("guest RAM load at {gpa:#x}: {e}")))
    }

    /// Atomic store of a naturally aligned integer.
    pub fn store<T: AtomicAccess>(&self, gpa: u64, val: T, order: Ordering) -> io::Result<()> {
        self.mem
            .store(val, MemoryRegionAddress(gpa), order)
            .map_err(|e| io::Error::other(format!("guest RAM store at {gpa:#x}: {e}")))
    }
}

/// Whole pages of guest RAM owned by a device; returned when dropped.
#[derive(Debug)]
pub struct DmaBuffer {
    ram: &'static GuestRam,
    gpa: u64,
    pages: u64,
}

impl DmaBuffer {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> u64 {
        self.pages * PAGE_BYTES
    }

    /// Never true: buffers have at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The gpa of `[offset, offset + len)` if it lies inside the buffer.
    pub fn sub(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        (end <= self.len()).then_some(self.gpa + offset)
    }

    /// Copies `buf` into the buffer at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let gpa = self
            .sub(offset, buf.len() as u64)
            .ok_or_else(out_of_buffer)?;
        self.ram.write(gpa, buf)
    }

    /// Copies from the buffer at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let gpa = self
            .sub(offset, buf.len() as u64)
            .ok_or_else(out_of_buffer)?;
        self.ram.read(gpa, buf)
    }
}

fn out_of_buffer() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "access beyond DMA buffer")
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if !self.ram.free_pages_at(self.gpa, self.pages) {
            tracing::error!(gpa = self.gpa, pages = self.pages, "DMA buffer freed twice");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_first_fit_coalesces_and_refuses_double_free() {
        let mut a = PageAllocator::new(16);
        assert_eq!(a.free_pages(), 15, "page 0 is reserved");
        let x = a.alloc(4).unwrap();
        let y = a.alloc(4).unwrap();
        let z = a.alloc(7).unwrap();
        assert_eq!((x, y, z), (1, 5, 9));
        assert_eq!(a.alloc(1), None);
        assert!(a.free(y, 4));
        assert!(!a.free(y, 4), "double free refused");
        assert!(!a.free(y + 1, 1), "free inside a free run refused");
        assert!(a.free(x, 4));
        assert!(a.free(z, 7));
        assert_eq!(a.free_pages(), 15);
        assert_eq!(a.free.len(), 1, "runs coalesced");
        assert_eq!(a.alloc(15), Some(1));
        assert!(!a.free(0, 1), "page 0 is never allocated");
        assert!(!a.free(15, 2), "beyond the end");
        assert!(!a.free(u64::MAX, 2), "overflow");
    }

    #[test]
    fn ram_round_trips_and_bounds_are_checked() {
        let ram = GuestRam::new(64 * PAGE_BYTES).unwrap();
        let free = ram.free_pages();
        let gpa = ram.alloc_pages(2).unwrap();
        assert_ne!(gpa, 0);
        ram.write(gpa, b"hello").unwrap();
        let mut buf = [0u8; 5];
        ram.read(gpa, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(ram.read(ram.size() - 2, &mut buf).is_err());
        assert!(ram.host_addr(ram.size()).is_none());
        let host = ram.host_addr(gpa).unwrap();
        assert_eq!(ram.gpa_of(host, 8192), Some(gpa));
        assert_eq!(ram.gpa_of(host, usize::MAX), None);
        let outside = [0u8; 4];
        assert_eq!(ram.gpa_of(outside.as_ptr(), 4), None);
        assert!(ram.free_pages_at(gpa, 2));
        assert_eq!(ram.free_pages(), free);
        assert!(GuestRam::new(4097).is_err());
    }
}
