//! Xen grant table v1, kept in the first frames of a [`SharedRegion`].
//!
//! The guest fills entries (`gnttab_grant_foreign_access`); a backend
//! resolves a grant reference to a frame only through [`GrantMapper`], which
//! enforces the rules of PROTOCOL.md §5.1 (and ARCHITECTURE.md §2): type
//! `GTF_permit_access`, no flag outside [`GTF_MAP_ACCEPTED`] (so no
//! `GTF_sub_page`), the entry names the backend's domid, the frame lies
//! inside the region, and the entry is not `GTF_readonly` when the backend
//! writes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::{RingError, SharedRegion, PAGE_SIZE};

/// Grant reference (`grant_ref_t`).
pub type GrantRef = u32;
/// Domain id (`domid_t`).
pub type DomId = u16;

/// `GTF_permit_access`: the entry grants access to `frame`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_readonly`: the grantee may only read.
pub const GTF_READONLY: u16 = 1 << 2;
/// Mask of the type bits (`GTF_type_mask`).
pub const GTF_TYPE_MASK: u16 = 3;
/// `GTF_reading`: in Xen, set by the hypervisor while the grantee has the
/// frame mapped for reading. Not emulated; ignored when a guest sets it.
pub const GTF_READING: u16 = 1 << 3;
/// `GTF_writing`: in Xen, set by the hypervisor while the grantee has the
/// frame mapped for writing. Not emulated; ignored when a guest sets it.
pub const GTF_WRITING: u16 = 1 << 4;
/// `GTF_PWT`: x86 cache attribute for mappings of the grant; ignored.
pub const GTF_PWT: u16 = 1 << 5;
/// `GTF_PCD`: x86 cache attribute for mappings of the grant; ignored.
pub const GTF_PCD: u16 = 1 << 6;
/// `GTF_PAT`: x86 cache attribute for mappings of the grant; ignored.
pub const GTF_PAT: u16 = 1 << 7;
/// `GTF_sub_page`: access to a sub-range of the frame only, by copy, never
/// by mapping. A backend maps every frame it uses, so such an entry is
/// refused (as Xen's `gnttab_map_grant_ref` refuses it).
pub const GTF_SUB_PAGE: u16 = 1 << 8;

/// Every bit a `GTF_permit_access` entry may carry besides its type for the
/// backend to use its frame (PROTOCOL.md §5.1): `GTF_readonly` (checked per
/// access), and Xen's `GTF_reading`/`GTF_writing` and the x86 cache
/// attributes, which mean nothing here and are ignored, as Xen ignores them
/// on a grant it maps. `GTF_sub_page` (Xen refuses to map such a grant) and
/// the undefined bits 9..=15 are not in it.
pub const GTF_MAP_ACCEPTED: u16 =
    GTF_READONLY | GTF_READING | GTF_WRITING | GTF_PWT | GTF_PCD | GTF_PAT;

/// `struct grant_entry_v1` from `xen/grant_table.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantEntryV1 {
    pub flags: u16,
    pub domid: DomId,
    pub frame: u32,
}

#[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
// SAFETY: plain integers, no padding, every bit pattern is valid.
unsafe impl ByteValued for GrantEntryV1 {}

/// Entries per 4 KiB grant-table frame.
pub const ENTRIES_PER_FRAME: u32 = (PAGE_SIZE / std::mem::size_of::<GrantEntryV1>()) as u32;

/// What the backend is about to do with a granted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The backend reads guest data (a disk write, a net TX).
    Read,
    /// The backend writes into guest memory (a disk read, a net RX).
    Write,
}

/// Why a grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("grant reference {gref} is outside the table of {entries} entries")]
    RefOutOfRange { gref: GrantRef, entries: u32 },
    #[error("grant reference {gref} does not permit access (flags {flags:#x})")]
    NotPermitted { gref: GrantRef, flags: u16 },
    #[error("grant reference {gref} is for domain {domid}, not {expected}")]
    WrongDomain {
        gref: GrantRef,
        domid: DomId,
        expected: DomId,
    },
    #[error("grant reference {gref} carries flags {flags:#x} a mapping may not have (GTF_sub_page or an undefined bit)")]
    BadFlags { gref: GrantRef, flags: u16 },
    #[error("grant reference {gref} is read-only")]
    ReadOnly { gref: GrantRef },
    #[error("grant reference {gref} names frame {frame}, outside the region of {pages} pages")]
    FrameOutOfRange {
        gref: GrantRef,
        frame: u32,
        pages: u32,
    },
}

fn entry_offset(gref: GrantRef) -> u64 {
    u64::from(gref) * std::mem::size_of::<GrantEntryV1>() as u64
}

/// The guest's side: writes grant entries.
#[derive(Debug, Clone)]
pub struct GrantTable {
    region: Arc<SharedRegion>,
    entries: u32,
}

impl GrantTable {
    /// The table occupies frames `0..frames` of `region`.
    pub fn new(region: Arc<SharedRegion>, frames: u32) -> Result<Self, RingError> {
        if frames == 0 || frames > region.pages() {
            return Err(RingError::FrameOutOfRange {
                frame: frames,
                pages: region.pages(),
            });
        }
        Ok(GrantTable {
            region,
            entries: frames * ENTRIES_PER_FRAME,
        })
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Grants `domid` access to `frame` (`gnttab_grant_foreign_access`).
    pub fn grant(
        &self,
        gref: GrantRef,
        domid: DomId,
        frame: u32,
        readonly: bool,
    ) -> Result<(), RingError> {
        self.check_ref(gref)?;
        let off = entry_offset(gref);
        self.region.store(frame, off + 4, Ordering::Relaxed)?;
        self.region.store(domid, off + 2, Ordering::Relaxed)?;
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        // Release: the backend sees domid and frame before the flags that
        // make them valid (the wmb() in gnttab_grant_foreign_access).
        self.region.store(flags, off, Ordering::Release)
    }

    /// Revokes a grant (`gnttab_end_foreign_access`).
    pub fn end_access(&self, gref: GrantRef) -> Result<(), RingError> {
        self.check_ref(gref)?;
        self.region
            .store(0u16, entry_offset(gref), Ordering::Release)
    }

    fn check_ref(&self, gref: GrantRef) -> Result<(), RingError> {
        if gref >= self.entries {
            return Err(GrantError::RefOutOfRange {
                gref,
                entries: self.entries,
            }
            .into());
        }
        Ok(())
    }
}

/// The backend's side: resolves grant references under the access rules.
#[derive(Debug, Clone)]
pub struct GrantMapper {
    region: Arc<SharedRegion>,
    entries: u32,
    backend: DomId,
}

impl GrantMapper {
    /// `frames` is the `grant-frames` value the guest announced; it must lie
    /// inside the region.
    pub fn new(region: Arc<SharedRegion>, frames: u32, backend: DomId) -> Result<Self, RingError> {
        if frames == 0 || frames > region.pages() {
            return Err(RingError::FrameOutOfRange {
                frame: frames,
                pages: region.pages(),
            });
        }
        Ok(GrantMapper {
            region,
            entries: frames * ENTRIES_PER_FRAME,
            backend,
        })
    }

    /// The region the grants refer to.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// Reads and checks entry `gref`; returns the byte offset of its frame.
    pub fn map(&self, gref: GrantRef, access: Access) -> Result<u64, GrantError> {
        if gref >= self.entries {
            return Err(GrantError::RefOutOfRange {
                gref,
                entries: self.entries,
            });
        }
        // One 8-byte atomic load gives a consistent snapshot of the entry;
        // Acquire pairs with the guest's release store of `flags`.
        let raw: u64 = self
            .region
            .load(entry_offset(gref), Ordering::Acquire)
            .map_err(|_| GrantError::RefOutOfRange {
                gref,
                entries: self.entries,
            })?;
        let entry = GrantEntryV1 {
            flags: raw as u16,
            domid: (raw >> 16) as u16,
            frame: (raw >> 32) as u32,
        };
        if entry.flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS {
            return Err(GrantError::NotPermitted {
                gref,
                flags: entry.flags,
            });
        }
        if entry.flags & !GTF_MAP_ACCEPTED != GTF_PERMIT_ACCESS {
            return Err(GrantError::BadFlags {
                gref,
                flags: entry.flags,
            });
        }
        if entry.domid != self.backend {
            return Err(GrantError::WrongDomain {
                gref,
                domid: entry.domid,
                expected: self.backend,
            });
        }
        if access == Access::Write && entry.flags & GTF_READONLY != 0 {
            return Err(GrantError::ReadOnly { gref });
        }
        if entry.frame >= self.region.pages() {
            return Err(GrantError::FrameOutOfRange {
                gref,
                frame: entry.frame,
                pages: self.region.pages(),
            });
        }
        Ok(u64::from(entry.frame) * PAGE_SIZE as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (GrantTable, GrantMapper) {
        let region = Arc::new(SharedRegion::create("g", 8).unwrap());
        (
            GrantTable::new(region.clone(), 1).unwrap(),
            GrantMapper::new(region, 1, 7).unwrap(),
        )
    }

    #[test]
    fn layout_matches_xen() {
        assert_eq!(std::mem::size_of::<GrantEntryV1>(), 8);
        assert_eq!(ENTRIES_PER_FRAME, 512);
    }

    #[test]
    fn access_rules() {
        let (table, mapper) = setup();
        table.grant(3, 7, 5, false).unwrap();
        assert_eq!(mapper.map(3, Access::Write), Ok(5 * 4096));
        table.grant(4, 7, 6, true).unwrap();
        assert_eq!(mapper.map(4, Access::Read), Ok(6 * 4096));
        assert_eq!(
            mapper.map(4, Access::Write),
            Err(GrantError::ReadOnly { gref: 4 })
        );
        table.grant(5, 9, 6, false).unwrap();
        assert!(matches!(
            mapper.map(5, Access::Read),
            Err(GrantError::WrongDomain { .. })
        ));
        table.grant(6, 7, 8, false).unwrap();
        assert!(matches!(
            mapper.map(6, Access::Read),
            Err(GrantError::FrameOutOfRange { .. })
        ));
        assert!(matches!(
            mapper.map(7, Access::Read),
            Err(GrantError::NotPermitted { .. })
        ));
        assert!(matches!(
            mapper.map(512, Access::Read),
            Err(GrantError::RefOutOfRange { .. })
        ));
        table.end_access(3).unwrap();
        assert!(matches!(
            mapper.map(3, Access::Read),
            Err(GrantError::NotPermitted { .. })
        ));
    }

    /// Stores a raw `flags` word into entry `gref` (the other fields as
    /// [`GrantTable::grant`] wrote them).
    fn set_flags(table: &GrantTable, gref: GrantRef, flags: u16) {
        table
            .region
            .store(flags, entry_offset(gref), Ordering::Release)
            .unwrap();
    }

    #[test]
    fn flags_a_mapping_may_not_carry_are_refused() {
        let (table, mapper) = setup();
        table.grant(3, 7, 5, false).unwrap();
        // PROTOCOL.md §5.1: sub-page grants (copy-only in Xen) and the
        // undefined bits 9..=15 are refused, for reads and writes alike.
        for flags in [
            GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
            GTF_PERMIT_ACCESS | GTF_READONLY | GTF_SUB_PAGE,
            GTF_PERMIT_ACCESS | 1 << 9,
            GTF_PERMIT_ACCESS | 1 << 15,
        ] {
            set_flags(&table, 3, flags);
            for access in [Access::Read, Access::Write] {
                assert_eq!(
                    mapper.map(3, access),
                    Err(GrantError::BadFlags { gref: 3, flags }),
                    "flags {flags:#x}, {access:?}"
                );
            }
        }
        // Xen's own status bits and the x86 cache attributes are accepted
        // and ignored; GTF_readonly still applies.
        let ignored = GTF_READING | GTF_WRITING | GTF_PWT | GTF_PCD | GTF_PAT;
        set_flags(&table, 3, GTF_PERMIT_ACCESS | ignored);
        assert_eq!(mapper.map(3, Access::Write), Ok(5 * 4096));
        set_flags(&table, 3, GTF_PERMIT_ACCESS | GTF_READONLY | ignored);
        assert_eq!(mapper.map(3, Access::Read), Ok(5 * 4096));
        assert_eq!(
            mapper.map(3, Access::Write),
            Err(GrantError::ReadOnly { gref: 3 })
        );
        // Transitive and accept-transfer entries are other types.
        for flags in [GTF_TYPE_MASK, 2] {
            set_flags(&table, 3, flags);
            assert_eq!(
                mapper.map(3, Access::Read),
                Err(GrantError::NotPermitted { gref: 3, flags })
            );
        }
    }

    #[test]
    fn table_must_fit_the_region() {
        let region = Arc::new(SharedRegion::create("g", 2).unwrap());
        assert!(GrantMapper::new(region.clone(), 3, 0).is_err());
        assert!(GrantMapper::new(region, 0, 0).is_err());
    }
}
