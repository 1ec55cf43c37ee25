use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::statfs::{fstatfs, TMPFS_MAGIC};
use vm_memory::{
    AtomicAccess, ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::RingError;

/// Size of a grant frame / ring page, as on x86 Xen.
pub const PAGE_SIZE: usize = 4096;

/// Largest region a backend agrees to map (4 GiB): bounds what a guest can
/// make a backend reserve.
pub const MAX_REGION_PAGES: u32 = 1 << 20;

/// A guest's granted memory: a memfd mapped shared with `vm-memory`.
///
/// A "guest address" is a byte offset into the memfd, and frame `n` is the
/// 4 KiB page at offset `n * 4096`. The guest creates the region; a backend
/// maps the same memfd, received over the control socket.
#[derive(Debug)]
pub struct SharedRegion {
    file: std::sync::Arc<File>,
    mem: GuestMemoryMmap,
    /// The one mapping `mem` is made of: every access goes to it directly
    /// (bounds-checked by its volatile slice), without `mem`'s search
    /// through its regions, which cost a ring or log access more than the
    /// access itself (`perf` of netback, issue 10).
    region: std::sync::Arc<GuestRegionMmap>,
    pages: u32,
}

impl SharedRegion {
    /// Creates and maps a new region of `pages` zeroed 4 KiB pages.
    pub fn create(name: &str, pages: u32) -> Result<Self, RingError> {
        if pages == 0 || pages > MAX_REGION_PAGES {
            return Err(RingError::BadRegionSize(
                u64::from(pages) * PAGE_SIZE as u64,
            ));
        }
        let fd = memfd_create(
            &std::ffi::CString::new(name).unwrap_or_default(),
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(|e| RingError::CreateMemfd(e.into()))?;
        let file = File::from(fd);
        file.set_len(u64::from(pages) * PAGE_SIZE as u64)
            .map_err(RingError::CreateMemfd)?;
        // A backend refuses regions that can shrink under its mapping.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
            .map_err(|e| RingError::CreateMemfd(e.into()))?;
        Self::map(file, pages)
    }

    /// Maps a region received from a guest: a shmem memfd sealed against
    /// shrinking, whose size is a non-zero multiple of the page size, at
    /// most [`MAX_REGION_PAGES`] pages.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RingError> {
        let file = File::from(fd);
        // A region the guest could truncate would turn every later access
        // into SIGBUS for the backend: insist on the shrink seal.
        let seals =
            fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|_| RingError::NotSealed)?;
        if SealFlag::from_bits_truncate(seals) & SealFlag::F_SEAL_SHRINK != SealFlag::F_SEAL_SHRINK
        {
            return Err(RingError::NotSealed);
        }
        // Sealed hugetlbfs memory still faults where the huge-page pool
        // cannot supply a page (or the guest punched one out): only shmem
        // has every page of a sealed file for as long as it is mapped.
        let fs = fstatfs(&file).map_err(|e| RingError::Map(format!("fstatfs: {e}")))?;
        if fs.filesystem_type() != TMPFS_MAGIC {
            return Err(RingError::NotShmem);
        }
        let len = file
            .metadata()
            .map_err(|e| RingError::Map(e.to_string()))?
            .len();
        if len == 0
            || len % PAGE_SIZE as u64 != 0
            || len / PAGE_SIZE as u64 > u64::from(MAX_REGION_PAGES)
        {
            return Err(RingError::BadRegionSize(len));
        }
        let pages =
            u32::try_from(len / PAGE_SIZE as u64).map_err(|_| RingError::BadRegionSize(len))?;
        Self::map(file, pages)
    }

    fn map(file: File, pages: u32) -> Result<Self, RingError> {
        let file = std::sync::Arc::new(file);
        let size = pages as usize * PAGE_SIZE;
        let region = GuestRegionMmap::from_range(
            GuestAddress(0),
            size,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )
        .map_err(|e| RingError::Map(e.to_string()))?;
        let region = std::sync::Arc::new(region);
        let mem = GuestMemoryMmap::from_arc_regions(vec![region.clone()])
            .map_err(|e| RingError::Map(e.to_string()))?;
        Ok(SharedRegion {
            file,
            mem,
            region,
            pages,
        })
    }

    /// The memfd, to pass to another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapping, for typed access through `vm-memory`.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest address of the start of `frame`, checked against the region.
    pub fn frame_addr(&self, frame: u32) -> Result<GuestAddress, RingError> {
        if frame >= self.pages {
            return Err(RingError::FrameOutOfRange {
                frame,
                pages: self.pages,
            });
        }
        Ok(GuestAddress(u64::from(frame) * PAGE_SIZE as u64))
    }

    /// Host pointer to `len` bytes at `offset`, for handing to the kernel
    /// (io_uring). The range is checked to lie inside the mapping; the
    /// pointer stays valid while `self` is alive.
    pub fn host_range(&self, offset: u64, len: usize) -> Result<*mut u8, RingError> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| access_err(offset, "overflow"))?;
        if end > self.len() {
            return Err(access_err(offset, "beyond the region"));
        }
        let slice = self
            .region
            .get_slice(MemoryRegionAddress(offset), len)
            .map_err(|e| access_err(offset, e))?;
        Ok(slice.ptr_guard_mut().as_ptr())
    }

    /// Copies bytes out of the region.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RingError> {
        self.region
            .read_slice(buf, MemoryRegionAddress(offset))
            .map_err(|e| access_err(offset, e))
    }

    /// Copies bytes into the region.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), RingError> {
        self.region
            .write_slice(buf, MemoryRegionAddress(offset))
            .map_err(|e| access_err(offset, e))
    }

    /// Reads a plain-data object (volatile copy: the guest may change the
    /// memory under us, the copy is what gets validated).
    pub fn read_obj<T: ByteValued>(&self, offset: u64) -> Result<T, RingError> {
        self.region
            .read_obj(MemoryRegionAddress(offset))
            .map_err(|e| access_err(offset, e))
    }

    /// Writes a plain-data object.
    pub fn write_obj<T: ByteValued>(&self, val: T, offset: u64) -> Result<(), RingError> {
        self.region
            .write_obj(val, MemoryRegionAddress(offset))
            .map_err(|e| access_err(offset, e))
    }

    /// The `u32` at `offset` as an atomic, checked against the region and
    /// its alignment once: a store through [`SharedRegion::store`] (a
    /// volatile slice made and checked, a call into `vm-memory`) cost more
    /// than the store (`perf` of netback, issue 10).
    #[inline]
    pub fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, RingError> {
        let ptr = self.atomic_ptr(offset, std::mem::size_of::<AtomicU32>())?;
        #[allow(unsafe_code)]
        // SAFETY: `atomic_ptr` checked that the 4 bytes lie inside the
        // mapping and are 4-aligned; the mapping lives as long as `self`
        // (it is unmapped when the last `Arc` of `region` drops), so the
        // reference cannot outlive it. Another process writing the memfd
        // is what atomics are for.
        Ok(unsafe { AtomicU32::from_ptr(ptr.cast()) })
    }

    /// The `u64` at `offset` as an atomic; as [`SharedRegion::atomic_u32`].
    #[inline]
    pub fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, RingError> {
        let ptr = self.atomic_ptr(offset, std::mem::size_of::<AtomicU64>())?;
        #[allow(unsafe_code)]
        // SAFETY: as in `atomic_u32`, for 8 bytes 8-aligned.
        Ok(unsafe { AtomicU64::from_ptr(ptr.cast()) })
    }

    /// `N` consecutive `u32`s from `offset` as atomics, checked against the
    /// region and their alignment once: the shadow log's view of one entry,
    /// whose fields are then fixed indices with no check per store
    /// (docs/ARCHITECTURE.md §11.6, what the log costs per TX slot).
    #[inline]
    pub fn atomic_u32s<const N: usize>(&self, offset: u64) -> Result<&[AtomicU32; N], RingError> {
        let ptr = self.atomic_ptr_aligned(offset, N * 4, 4)?;
        #[allow(unsafe_code)]
        // SAFETY: as in `atomic_u32`, for `N` consecutive 4-aligned words
        // inside the mapping; `[AtomicU32; N]` has the layout of `N` `u32`s.
        Ok(unsafe { &*ptr.cast::<[AtomicU32; N]>() })
    }

    /// `N` consecutive `u64`s from `offset` as atomics; as
    /// [`SharedRegion::atomic_u32s`].
    #[inline]
    pub fn atomic_u64s<const N: usize>(&self, offset: u64) -> Result<&[AtomicU64; N], RingError> {
        let ptr = self.atomic_ptr_aligned(offset, N * 8, 8)?;
        #[allow(unsafe_code)]
        // SAFETY: as in `atomic_u64`, for `N` consecutive 8-aligned words.
        Ok(unsafe { &*ptr.cast::<[AtomicU64; N]>() })
    }

    /// The `count` `u32`s from `offset` as atomics, checked once; as
    /// [`SharedRegion::atomic_u32s`], for a run whose length is known at
    /// run time (a whole shadow log, viewed once per batch it logs).
    #[inline]
    pub fn atomic_u32_slice(&self, offset: u64, count: usize) -> Result<&[AtomicU32], RingError> {
        let size = count
            .checked_mul(4)
            .ok_or_else(|| access_err(offset, "overflow"))?;
        let ptr = self.atomic_ptr_aligned(offset, size, 4)?;
        #[allow(unsafe_code)]
        // SAFETY: as in `atomic_u32s`, for `count` words.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU32>(), count) })
    }

    /// The `count` `u64`s from `offset` as atomics; as
    /// [`SharedRegion::atomic_u32_slice`].
    #[inline]
    pub fn atomic_u64_slice(&self, offset: u64, count: usize) -> Result<&[AtomicU64], RingError> {
        let size = count
            .checked_mul(8)
            .ok_or_else(|| access_err(offset, "overflow"))?;
        let ptr = self.atomic_ptr_aligned(offset, size, 8)?;
        #[allow(unsafe_code)]
        // SAFETY: as in `atomic_u64s`, for `count` words.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), count) })
    }

    /// The host address of `size` bytes at `offset`, inside the mapping
    /// and aligned to `size`.
    #[inline]
    fn atomic_ptr(&self, offset: u64, size: usize) -> Result<*mut u8, RingError> {
        self.atomic_ptr_aligned(offset, size, size)
    }

    /// The host address of `size` bytes at `offset`, inside the mapping
    /// and aligned to `align`.
    #[inline]
    fn atomic_ptr_aligned(
        &self,
        offset: u64,
        size: usize,
        align: usize,
    ) -> Result<*mut u8, RingError> {
        let inside = offset
            .checked_add(size as u64)
            .is_some_and(|end| end <= self.region.len());
        if !inside || !offset.is_multiple_of(align as u64) {
            return Err(access_err(
                offset,
                "not an aligned atomic inside the region",
            ));
        }
        // In bounds (checked above), so the offset fits the address space.
        Ok(self.region.as_ptr().wrapping_add(offset as usize))
    }

    /// Atomic load with the given ordering.
    pub fn load<T: AtomicAccess>(&self, offset: u64, order: Ordering) -> Result<T, RingError> {
        self.region
            .load(MemoryRegionAddress(offset), order)
            .map_err(|e| access_err(offset, e))
    }

    /// Atomic store with the given ordering.
    pub fn store<T: AtomicAccess>(
        &self,
        val: T,
        offset: u64,
        order: Ordering,
    ) -> Result<(), RingError> {
        self.region
            .store(val, MemoryRegionAddress(offset), order)
            .map_err(|e| access_err(offset, e))
    }
}

impl AsFd for SharedRegion {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn access_err(offset: u64, reason: impl std::fmt::Display) -> RingError {
    RingError::Access {
        offset,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An atomic is the region's bytes, seen by another mapping; one not
    /// aligned or not wholly inside the region is refused.
    #[test]
    fn atomics_are_checked_and_shared() {
        let a = SharedRegion::create("t", 1).unwrap();
        let b = SharedRegion::from_fd(a.file().try_clone().unwrap().into()).unwrap();
        a.atomic_u32(4092)
            .unwrap()
            .store(0xA1B2_C3D4, Ordering::Release);
        a.atomic_u64(8)
            .unwrap()
            .store(u64::MAX - 1, Ordering::Release);
        assert_eq!(b.load::<u32>(4092, Ordering::Acquire).unwrap(), 0xA1B2_C3D4);
        assert_eq!(
            b.atomic_u64(8).unwrap().load(Ordering::Acquire),
            u64::MAX - 1
        );
        for bad in [4094, 4096, 2, u64::MAX - 3] {
            assert!(a.atomic_u32(bad).is_err(), "u32 at {bad}");
        }
        for bad in [4092, 4096, 4, u64::MAX - 7] {
            assert!(a.atomic_u64(bad).is_err(), "u64 at {bad}");
        }
    }

    /// A run of atomics is checked once, as a whole: each word is the
    /// region's bytes at its offset; a run reaching past the end or not
    /// aligned is refused.
    #[test]
    fn runs_of_atomics_are_checked_as_a_whole() {
        let a = SharedRegion::create("t", 1).unwrap();
        let words = a.atomic_u32s::<4>(4080).unwrap();
        words[3].store(0x0102_0304, Ordering::Release);
        assert_eq!(a.load::<u32>(4092, Ordering::Acquire).unwrap(), 0x0102_0304);
        let longs = a.atomic_u64s::<2>(16).unwrap();
        longs[1].store(u64::MAX - 5, Ordering::Release);
        assert_eq!(a.load::<u64>(24, Ordering::Acquire).unwrap(), u64::MAX - 5);
        for bad in [4084, 4096, 2, u64::MAX - 3] {
            assert!(a.atomic_u32s::<4>(bad).is_err(), "u32s at {bad}");
        }
        for bad in [4088, 4, 12, u64::MAX - 7] {
            assert!(a.atomic_u64s::<2>(bad).is_err(), "u64s at {bad}");
        }
        let all = a.atomic_u32_slice(0, 1024).unwrap();
        assert_eq!(all[1023].load(Ordering::Acquire), 0x0102_0304);
        let all = a.atomic_u64_slice(8, 511).unwrap();
        assert_eq!(all[2].load(Ordering::Acquire), u64::MAX - 5);
        assert!(a.atomic_u32_slice(4, 1024).is_err());
        assert!(a.atomic_u32_slice(2, 1).is_err());
        assert!(a.atomic_u64_slice(8, 512).is_err());
        assert!(a.atomic_u64_slice(0, usize::MAX).is_err());
    }

    #[test]
    fn a_second_mapping_sees_the_same_bytes() {
        let a = SharedRegion::create("t", 4).unwrap();
        let b = SharedRegion::from_fd(a.file().try_clone().unwrap().into()).unwrap();
        a.write(8190, b"hello").unwrap();
        let mut buf = [0u8; 5];
        b.read(8190, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(b.pages(), 4);
    }

    #[test]
    fn out_of_range_access_is_an_error() {
        let a = SharedRegion::create("t", 1).unwrap();
        assert!(a.read(4095, &mut [0u8; 2]).is_err());
        assert!(a.host_range(4096, 1).is_err());
        assert!(a.host_range(u64::MAX, 2).is_err());
        assert!(a.frame_addr(1).is_err());
        assert!(a.load::<u32>(4094, Ordering::Acquire).is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(SharedRegion::create("t", 0).is_err());
        let f = SharedRegion::create("t", 1).unwrap();
        assert!(
            f.file().set_len(100).is_err(),
            "sealed region must not shrink"
        );
        // An unsealed fd (a plain memfd) is refused.
        let raw = memfd_create(c"x", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        let file = File::from(raw);
        file.set_len(4096).unwrap();
        assert!(matches!(
            SharedRegion::from_fd(file.into()),
            Err(RingError::NotSealed)
        ));
    }

    #[test]
    fn sealed_hugetlbfs_memory_is_refused() {
        use shadowback_testsupport::fd::hugetlbfs_memfd;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
        assert!(matches!(
            SharedRegion::from_fd(hugetlbfs_memfd(2 << 20, seals).into()),
            Err(RingError::NotShmem)
        ));
    }
}
