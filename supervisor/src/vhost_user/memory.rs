//! The VMM's memory table (`SET_MEM_TABLE`): its regions and memfds,
//! address translation, and reads of ring indices.
//!
//! The supervisor never maps guest memory: a VMM that truncates a memfd
//! would make every access to the mapping fault (SIGBUS) and take the
//! supervisor down. The few bytes it needs (`avail->idx`, `used->idx`) are
//! read with `pread`, which fails cleanly instead.
//!
//! Backends do map it, so a table is refused up front where a mapping
//! would fault from the start: a region that ends beyond its file, or a
//! hugetlbfs region whose huge pages the host cannot supply (the
//! supervisor allocates them with `fallocate`, as QEMU's `prealloc=on`
//! would). A VMM can still truncate or punch an unsealed file later; then
//! only its own device's backends fault, and the device is given up like
//! any crash loop (docs/ARCHITECTURE.md §8).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use shadowback_xenbus::virtio::{MemoryRegion, MAX_REGIONS};

/// Why a memory table or an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} memory regions (at most {MAX_REGIONS})")]
    TooManyRegions(usize),
    #[error("{regions} regions but {fds} fds")]
    FdCount { regions: usize, fds: usize },
    #[error("region {0} is empty")]
    Empty(usize),
    #[error("region {0} wraps the address space")]
    Wraps(usize),
    #[error("regions {0} and {1} overlap")]
    Overlap(usize, usize),
    #[error("user address {0:#x} (+{1:#x}) is outside every region")]
    UserAddress(u64, u64),
    #[error("guest address {0:#x} (+{1:#x}) is outside every region")]
    GuestAddress(u64, u64),
    #[error("reading guest memory at {0:#x}: {1}")]
    Read(u64, String),
    #[error("region {index} ends at file offset {end:#x}, beyond its file of {len:#x} bytes")]
    BeyondFile { index: usize, end: u64, len: u64 },
    #[error("region {0}: the host cannot supply its huge pages ({1})")]
    Unbacked(usize, String),
}

/// `HUGETLBFS_MAGIC` (`linux/magic.h`) as `fstatfs` reports it.
const HUGETLBFS: nix::sys::statfs::FsType = nix::sys::statfs::HUGETLBFS_MAGIC;

/// Refuses region `index` if a backend mapping it would fault at once: it
/// ends beyond its file, or it is hugetlbfs memory whose pages cannot all
/// be allocated now.
fn check_backing(index: usize, r: &RegionDesc, file: &File) -> Result<(), MemoryError> {
    use nix::fcntl::{fallocate, FallocateFlags};

    let unbacked = |why: String| MemoryError::Unbacked(index, why);
    let len = file.metadata().map_err(|e| unbacked(e.to_string()))?.len();
    // `new` checked that the sum does not wrap.
    let end = r.mmap_offset + r.size;
    if end > len {
        return Err(MemoryError::BeyondFile { index, end, len });
    }
    let fs = nix::sys::statfs::fstatfs(file).map_err(|e| unbacked(e.to_string()))?;
    if fs.filesystem_type() == HUGETLBFS {
        let (Ok(offset), Ok(size)) = (i64::try_from(r.mmap_offset), i64::try_from(r.size)) else {
            return Err(unbacked("offset out of range".into()));
        };
        // Allocates the pages not yet allocated (a no-op for the others):
        // ENOSPC when the pool is short, where a mapping would SIGBUS.
        fallocate(
            file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            size,
        )
        .map_err(|e| unbacked(format!("fallocate: {e}")))?;
    }
    Ok(())
}

/// One region as the VMM described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    pub gpa: u64,
    pub size: u64,
    /// Where the VMM has it mapped (what `SET_VRING_ADDR` speaks in).
    pub user_addr: u64,
    /// Offset of the region in its memfd.
    pub mmap_offset: u64,
}

/// `[start, start + len)` inside `[base, base + size)`, without overflow.
fn contains(base: u64, size: u64, start: u64, len: u64) -> bool {
    let Some(off) = start.checked_sub(base) else {
        return false;
    };
    off.checked_add(len).is_some_and(|end| end <= size)
}

/// The validated table and the supervisor's copies of its memfds.
#[derive(Debug, Clone)]
pub struct MemoryTable {
    regions: Vec<RegionDesc>,
    files: Vec<Arc<File>>,
}

impl MemoryTable {
    /// Validates the table: at most [`MAX_REGIONS`], one fd per region, no
    /// empty or wrapping region, no overlap in guest-physical or user
    /// address space (either would make a translation ambiguous), every
    /// region backed (see the module comment).
    pub fn new(regions: Vec<RegionDesc>, fds: Vec<OwnedFd>) -> Result<Self, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions(regions.len()));
        }
        if regions.len() != fds.len() {
            return Err(MemoryError::FdCount {
                regions: regions.len(),
                fds: fds.len(),
            });
        }
        for (i, r) in regions.iter().enumerate() {
            if r.size == 0 {
                return Err(MemoryError::Empty(i));
            }
            let wraps = [r.gpa, r.user_addr, r.mmap_offset]
                .iter()
                .any(|a| a.checked_add(r.size).is_none());
            if wraps {
                return Err(MemoryError::Wraps(i));
            }
            for (j, o) in regions[..i].iter().enumerate() {
                // Both ends were checked above, so the sums cannot wrap.
                let overlap = |a: u64, b: u64| a < b + o.size && b < a + r.size;
                if overlap(r.gpa, o.gpa) || overlap(r.user_addr, o.user_addr) {
                    return Err(MemoryError::Overlap(j, i));
                }
            }
        }
        let files: Vec<Arc<File>> = fds.into_iter().map(|fd| Arc::new(File::from(fd))).collect();
        for (i, (r, file)) in regions.iter().zip(&files).enumerate() {
            check_backing(i, r, file)?;
        }
        Ok(MemoryTable { regions, files })
    }

    /// The regions as `attach-virtio` describes them.
    pub fn wire_regions(&self) -> Vec<MemoryRegion> {
        self.regions
            .iter()
            .map(|r| MemoryRegion {
                gpa: r.gpa,
                size: r.size,
                mmap_offset: r.mmap_offset,
            })
            .collect()
    }

    /// Each region and the supervisor's copy of its memfd, in order.
    pub fn parts(&self) -> impl Iterator<Item = (&RegionDesc, &File)> {
        self.regions.iter().zip(self.files.iter().map(|f| &**f))
    }

    /// Fresh descriptors of the region memfds, in order.
    pub fn dup_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.files
            .iter()
            .map(|f| f.try_clone().map(OwnedFd::from))
            .collect()
    }

    /// The guest-physical address of the VMM's `[user, user + len)`, which
    /// must lie in one region.
    pub fn user_to_gpa(&self, user: u64, len: u64) -> Result<u64, MemoryError> {
        self.regions
            .iter()
            .find(|r| contains(r.user_addr, r.size, user, len))
            .map(|r| r.gpa + (user - r.user_addr))
            .ok_or(MemoryError::UserAddress(user, len))
    }

    /// The memfd and file offset of guest-physical `[gpa, gpa + len)`,
    /// which must lie in one region.
    fn locate(&self, gpa: u64, len: u64) -> Result<(&File, u64), MemoryError> {
        self.regions
            .iter()
            .zip(&self.files)
            .find(|(r, _)| contains(r.gpa, r.size, gpa, len))
            .map(|(r, f)| (f.as_ref(), r.mmap_offset + (gpa - r.gpa)))
            .ok_or(MemoryError::GuestAddress(gpa, len))
    }

    /// Checks that guest-physical `[gpa, gpa + len)` lies in one region.
    pub fn check_gpa(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.locate(gpa, len).map(|_| ())
    }

    /// Reads the little-endian `u16` at `gpa` (a ring index).
    ///
    /// A plain `pread`, not an atomic load: the caller only needs a value
    /// some writer published (a torn read is a transient wrong guess that
    /// the next read corrects), and no ordering with other memory.
    pub fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        let (file, offset) = self.locate(gpa, 2)?;
        let mut buf = [0u8; 2];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| MemoryError::Read(gpa, e.to_string()))?;
        Ok(u16::from_le_bytes(buf))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shadowback_testsupport::fd::SealFlag;
    use std::os::fd::AsFd;

    /// A memfd of `len` bytes.
    pub(crate) fn memfd(len: u64) -> OwnedFd {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"test-guest", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(fd.as_fd(), i64::try_from(len).unwrap()).unwrap();
        fd
    }

    fn region(gpa: u64, size: u64, user_addr: u64, mmap_offset: u64) -> RegionDesc {
        RegionDesc {
            gpa,
            size,
            user_addr,
            mmap_offset,
        }
    }

    /// Low memory at gpa 0 and a second region at 1 MiB, backed by one
    /// memfd each.
    pub(crate) fn two_regions() -> MemoryTable {
        MemoryTable::new(
            vec![
                region(0, 0x10000, 0x7f00_0000_0000, 0),
                region(0x10_0000, 0x10000, 0x7f00_1000_0000, 0x1000),
            ],
            vec![memfd(0x10000), memfd(0x11000)],
        )
        .unwrap()
    }

    #[test]
    fn translates_inside_regions_only() {
        let t = two_regions();
        assert_eq!(t.user_to_gpa(0x7f00_0000_0010, 16).unwrap(), 0x10);
        assert_eq!(t.user_to_gpa(0x7f00_1000_0000, 0x10000).unwrap(), 0x10_0000);
        // Straddles the end of a region, precedes it, wraps u64.
        assert!(t.user_to_gpa(0x7f00_0000_fff0, 0x20).is_err());
        assert!(t.user_to_gpa(0x7eff_ffff_fff0, 0x10).is_err());
        assert!(t.user_to_gpa(u64::MAX - 1, 4).is_err());
        assert!(t.check_gpa(0xfffe, 2).is_ok());
        assert!(t.check_gpa(0xffff, 2).is_err());
        assert!(t.check_gpa(u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn reads_ring_indices_through_the_memfd() {
        let t = two_regions();
        // gpa 0x10_0002 is offset 0x1002 in the second memfd.
        t.files[1]
            .write_all_at(&0xbeefu16.to_le_bytes(), 0x1002)
            .unwrap();
        assert_eq!(t.read_u16(0x10_0002).unwrap(), 0xbeef);
        assert_eq!(t.read_u16(0x2).unwrap(), 0);
        // The VMM shrank its memfd: an error, not a SIGBUS.
        t.files[1].set_len(0x1000).unwrap();
        assert!(matches!(t.read_u16(0x10_0002), Err(MemoryError::Read(..))));
    }

    #[test]
    fn rejects_bad_tables() {
        let fds = |n| (0..n).map(|_| memfd(0x1000)).collect::<Vec<_>>();
        let bad = [
            (vec![region(0, 0, 0, 0)], 1),
            (vec![region(u64::MAX - 10, 0x1000, 0, 0)], 1),
            (vec![region(0, 0x1000, u64::MAX, 0)], 1),
            (
                vec![region(0, 0x2000, 0, 0), region(0x1000, 0x1000, 0x10000, 0)],
                2,
            ),
            (
                vec![region(0, 0x1000, 0, 0), region(0x1000, 0x1000, 0x800, 0)],
                2,
            ),
            (vec![region(0, 0x1000, 0, 0)], 2),
            (
                (0..9)
                    .map(|i| region(i << 20, 0x1000, i << 20, 0))
                    .collect(),
                9,
            ),
        ];
        for (regions, n) in bad {
            assert!(
                MemoryTable::new(regions.clone(), fds(n)).is_err(),
                "{regions:?}"
            );
        }
        let adjacent = vec![region(0, 0x1000, 0, 0), region(0x1000, 0x1000, 0x1000, 0)];
        assert!(MemoryTable::new(adjacent, fds(2)).is_ok());
    }

    #[test]
    fn refuses_memory_a_mapping_would_fault_on() {
        // Ends one page beyond its memfd.
        assert!(matches!(
            MemoryTable::new(vec![region(0, 0x2000, 0, 0x1000)], vec![memfd(0x2000)]),
            Err(MemoryError::BeyondFile {
                index: 0,
                end: 0x3000,
                len: 0x2000
            })
        ));
        // hugetlbfs memory larger than the free huge pages: creating it
        // takes none, touching a page the pool lacks is SIGBUS.
        const HUGE: u64 = 2 << 20;
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let free = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let size = (free + 1) * HUGE;
        let fd = shadowback_testsupport::fd::hugetlbfs_memfd(size, SealFlag::empty()).into();
        assert!(matches!(
            MemoryTable::new(vec![region(0, size, 0, 0)], vec![fd]),
            Err(MemoryError::Unbacked(0, _))
        ));
    }
}
