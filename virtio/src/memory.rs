//! Guest memory of a vhost-user device: the VMM's memory regions, each
//! mapped from its memfd at its `mmap_offset`.
//!
//! Everything here is checked against the mapping before it is used: a
//! guest-physical range either lies inside one mapped region or the access
//! fails with an error, never a fault. Buffers the kernel reads or writes
//! for a request are split at region boundaries ([`GuestRam::split`]) and
//! handed to an I/O engine as host addresses ([`GuestRam::host_range`]);
//! blkback's `IoMemory` implementation in `blkback/src/uring.rs`, its only
//! `unsafe` module, is what turns them into iovecs.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use shadowback_xenbus::virtio::MemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

/// Granularity regions must be aligned to (`mmap` works in pages).
pub const REGION_ALIGN: u64 = 4096;

/// Largest region accepted (1 TiB): bounds what a bogus message can map.
pub const MAX_REGION_SIZE: u64 = 1 << 40;

/// Why guest memory could not be mapped or accessed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// No regions, or not one memfd per region.
    #[error("expected {expected} region fds, got {got}")]
    FdCount { expected: usize, got: usize },
    /// A region is empty, too large, or not page aligned.
    #[error("region {index} ({gpa:#x}+{size:#x} at offset {offset:#x}) is {why}")]
    BadRegion {
        index: usize,
        gpa: u64,
        size: u64,
        offset: u64,
        why: &'static str,
    },
    /// Two regions share guest-physical addresses.
    #[error("regions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// The memfd is shorter than the range to map (touching it would fault).
    #[error("region {index}: file of {file_len:#x} bytes is shorter than offset+size {need:#x}")]
    ShortFile {
        index: usize,
        file_len: u64,
        need: u64,
    },
    /// `fstat` failed.
    #[error("region {index}: cannot stat its fd")]
    Stat {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    /// `mmap` failed.
    #[error("region {index}: mmap failed: {why}")]
    Map { index: usize, why: String },
    /// A guest-physical range outside the mapped memory.
    #[error("guest range {gpa:#x}+{len:#x} is not mapped")]
    OutOfRange { gpa: u64, len: u64 },
}

/// The guest's memory, mapped shared from the VMM's memfds.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Validates `regions` (non-empty, page aligned, at most
    /// [`MAX_REGION_SIZE`], no overlap, file long enough) and maps each from
    /// its fd. Nothing is mapped if any check fails.
    pub fn map(regions: &[MemoryRegion], fds: Vec<OwnedFd>) -> Result<Self, MemoryError> {
        if regions.is_empty() || fds.len() != regions.len() {
            return Err(MemoryError::FdCount {
                expected: regions.len().max(1),
                got: fds.len(),
            });
        }
        check_layout(regions)?;
        let mut mapped = Vec::with_capacity(regions.len());
        for (index, (r, fd)) in regions.iter().zip(fds).enumerate() {
            let file = File::from(fd);
            let file_len = file
                .metadata()
                .map_err(|source| MemoryError::Stat { index, source })?
                .len();
            // Checked in check_layout.
            let need = r.mmap_offset + r.size;
            if file_len < need {
                return Err(MemoryError::ShortFile {
                    index,
                    file_len,
                    need,
                });
            }
            let size = usize::try_from(r.size).map_err(|_| MemoryError::BadRegion {
                index,
                gpa: r.gpa,
                size: r.size,
                offset: r.mmap_offset,
                why: "larger than the address space",
            })?;
            let mapping = MmapRegionBuilder::new(size)
                .with_file_offset(FileOffset::new(file, r.mmap_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::Map {
                    index,
                    why: e.to_string(),
                })?;
            let region =
                GuestRegionMmap::new(mapping, GuestAddress(r.gpa)).ok_or(MemoryError::Map {
                    index,
                    why: "region end overflows".into(),
                })?;
            mapped.push(region);
        }
        mapped.sort_by_key(|r| r.start_addr());
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map {
            index: 0,
            why: e.to_string(),
        })?;
        Ok(GuestRam { mem })
    }

    /// Wraps memory built elsewhere (tests).
    pub fn from_memory(mem: GuestMemoryMmap) -> Self {
        GuestRam { mem }
    }

    /// The vm-memory view, for typed loads and stores.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of `len` bytes at `gpa` if they lie inside one region.
    pub fn host_range(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let offset = gpa.checked_sub(region.start_addr().raw_value())?;
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        if end > region.len() {
            return None;
        }
        let ptr = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
        NonNull::new(ptr)
    }

    /// Appends `[gpa, gpa + len)` to `out` as pieces that each lie inside
    /// one region (a buffer may straddle two adjacent regions).
    pub fn split(
        &self,
        gpa: u64,
        len: u64,
        out: &mut Vec<(u64, usize)>,
    ) -> Result<(), MemoryError> {
        let bad = || MemoryError::OutOfRange { gpa, len };
        gpa.checked_add(len).ok_or_else(bad)?;
        let mut at = gpa;
        let mut left = len;
        // Each piece ends a region or the buffer, so the walk is bounded by
        // the region count.
        while left > 0 {
            let region = self.mem.find_region(GuestAddress(at)).ok_or_else(bad)?;
            let offset = at - region.start_addr().raw_value();
            let piece = (region.len() - offset).min(left);
            out.push((at, usize::try_from(piece).map_err(|_| bad())?));
            at += piece;
            left -= piece;
        }
        Ok(())
    }

    /// Copies guest bytes at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Whether `[gpa, gpa + len)` is mapped (possibly across regions).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        gpa.checked_add(len as u64).is_some()
            && GuestMemoryBackend::check_range(&self.mem, GuestAddress(gpa), len)
    }
}

/// The checks of [`GuestRam::map`] that need no fd.
pub fn check_layout(regions: &[MemoryRegion]) -> Result<(), MemoryError> {
    for (index, r) in regions.iter().enumerate() {
        let bad = |why| MemoryError::BadRegion {
            index,
            gpa: r.gpa,
            size: r.size,
            offset: r.mmap_offset,
            why,
        };
        if r.size == 0 {
            return Err(bad("empty"));
        }
        if r.size > MAX_REGION_SIZE {
            return Err(bad("too large"));
        }
        if !r.gpa.is_multiple_of(REGION_ALIGN)
            || !r.size.is_multiple_of(REGION_ALIGN)
            || !r.mmap_offset.is_multiple_of(REGION_ALIGN)
        {
            return Err(bad("not page aligned"));
        }
        if r.gpa.checked_add(r.size).is_none() || r.mmap_offset.checked_add(r.size).is_none() {
            return Err(bad("overflowing"));
        }
        if i64::try_from(r.mmap_offset + r.size).is_err() {
            return Err(bad("beyond the largest file offset"));
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            // Both ends checked above.
            if a.gpa < b.gpa + b.size && b.gpa < a.gpa + a.size {
                return Err(MemoryError::Overlap(i, j));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(gpa: u64, size: u64, mmap_offset: u64) -> MemoryRegion {
        MemoryRegion {
            gpa,
            size,
            mmap_offset,
        }
    }

    #[test]
    fn layout_checks() {
        assert!(check_layout(&[r(0, 0x10000, 0), r(0x10000, 0x1000, 0x10000)]).is_ok());
        for bad in [
            vec![r(0, 0, 0)],
            vec![r(1, 0x1000, 0)],
            vec![r(0, 0x1001, 0)],
            vec![r(0, 0x1000, 8)],
            vec![r(u64::MAX - 0xfff, 0x2000, 0)],
            vec![r(0, MAX_REGION_SIZE * 2, 0)],
            vec![r(0, 0x1000, !0xfff)],
            vec![r(0, 0x2000, 0), r(0x1000, 0x1000, 0)],
        ] {
            assert!(check_layout(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn split_crosses_regions_and_refuses_holes() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        let ram = GuestRam::from_memory(mem);
        let mut out = Vec::new();
        ram.split(0xf00, 0x200, &mut out).unwrap();
        assert_eq!(out, vec![(0xf00, 0x100), (0x1000, 0x100)]);
        out.clear();
        assert!(ram.split(0x1f00, 0x200, &mut out).is_err());
        assert!(ram.split(u64::MAX, 2, &mut out).is_err());
        assert!(ram.host_range(0x1f00, 0x100).is_some());
        assert!(ram.host_range(0x1f00, 0x101).is_none());
        assert!(ram.contains(0, 0x2000));
        assert!(!ram.contains(0, 0x2001));
    }
}
