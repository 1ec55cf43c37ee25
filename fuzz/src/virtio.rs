//! virtio: a driver's descriptor table, indirect tables, avail ring and
//! request bytes, walked with [`SplitQueue::walk`] from the head the avail
//! ring names and parsed with [`shadowback_blkback::virtio::request::parse`],
//! as the vhost-user data plane does.
//!
//! Guest memory: two adjacent regions `[0, 0x10000)` (a buffer may
//! straddle them) and one after a hole at `0x20000`. The queue's rings sit
//! at `0x0` (descriptors), `0x1000` (avail), `0x1800` (used); indirect
//! tables are written at `0x2100`, request headers at `0x3000`.

use arbitrary::{Result, Unstructured};
use shadowback_blkback::virtio::request::{parse, Action, BlkConfig, CHAIN_CAP, SECTOR_SIZE};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::{Chain, SplitQueue, MAX_INDIRECT_DESCS};
use shadowback_xenbus::virtio::QueueConfig;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x1800;
const INDIRECT: u64 = 0x2100;
const HEADERS: u64 = 0x3000;
const MEMORY: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x20000, 0x4000)];

/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = run_input(&mut Unstructured::new(data));
}

fn run_input(u: &mut Unstructured) -> Result<()> {
    let ranges: Vec<_> = MEMORY.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let Ok(mmap) = GuestMemoryMmap::from_ranges(&ranges) else {
        return Ok(());
    };
    let mem = GuestRam::from_memory(mmap);
    let size: u16 = 1 << u.int_in_range(0..=8)?;
    let queue = QueueConfig {
        index: 0,
        size,
        desc: DESC,
        avail: AVAIL,
        used: USED,
        next_avail: 0,
    };
    let Ok(q) = SplitQueue::new(&queue, &mem, u.arbitrary()?) else {
        return Ok(());
    };
    for i in 0..u.int_in_range(0..=u32::from(size).min(24))? {
        let d = descriptor(u, size)?;
        let _ = mem
            .memory()
            .write_obj(d, GuestAddress(DESC + 16 * u64::from(i)));
    }
    for i in 0..u.int_in_range(0u64..=24)? {
        let d = descriptor(u, 24)?;
        let _ = mem.memory().write_obj(d, GuestAddress(INDIRECT + 16 * i));
    }
    for i in 0..u.int_in_range(0u64..=4)? {
        let mut hdr = [0u8; 16];
        u.fill_buffer(&mut hdr)?;
        let any: u32 = u.arbitrary()?;
        let t = *u.choose(&[
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            any,
        ])?;
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        if u.ratio(3, 4)? {
            let sector: u64 = u.int_in_range(0..=4100)?;
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
        }
        let _ = mem.write(HEADERS + 16 * i, &hdr);
    }
    // Discard / write-zeroes segments and any other bytes.
    for _ in 0..u.int_in_range(0..=8)? {
        let at: u64 = u.int_in_range(HEADERS..=HEADERS + 0x200)?;
        let mut seg = [0u8; 16];
        u.fill_buffer(&mut seg)?;
        if u.ratio(3, 4)? {
            let sector: u64 = u.int_in_range(0..=4100)?;
            let num: u32 = u.int_in_range(0..=64)?;
            let flags: u32 = u.int_in_range(0..=2)?;
            seg[..8].copy_from_slice(&sector.to_le_bytes());
            seg[8..12].copy_from_slice(&num.to_le_bytes());
            seg[12..].copy_from_slice(&flags.to_le_bytes());
        }
        let _ = mem.write(at, &seg);
    }
    let cfg = BlkConfig {
        sectors: u.int_in_range(0..=4096)?,
        readonly: u.ratio(1, 4)?,
        discard: u.arbitrary()?,
        write_zeroes: u.arbitrary()?,
        serial: BlkConfig::serial_for("fuzz"),
    };
    let mut chain = Chain::default();
    let mut data = Vec::new();
    let mut ranges = Vec::new();
    for idx in 0..u.int_in_range(1..=4)? {
        let head: u16 = if u.ratio(7, 8)? {
            u.int_in_range(0..=size)?
        } else {
            u.arbitrary()?
        };
        let _ = mem.write(AVAIL + 4 + 2 * u64::from(idx), &head.to_le_bytes());
        // As the data plane: the head from the avail ring, checked there.
        let Ok(head) = q.avail_head(&mem, idx) else {
            continue;
        };
        if head >= size {
            continue;
        }
        let walked = q.walk(&mem, head, CHAIN_CAP, &mut chain);
        assert!(
            chain.descriptors_read <= u32::from(size) + MAX_INDIRECT_DESCS,
            "walk read {} descriptors",
            chain.descriptors_read
        );
        if walked.is_ok() {
            assert!(chain.count >= 1 && chain.last.is_some());
            assert_eq!(chain.bufs.len(), (chain.count as usize).min(CHAIN_CAP));
        }
        let parsed = parse(
            &mem,
            walked.as_ref().map(|()| &chain).map_err(|e| *e),
            &cfg,
            &mut data,
            &mut ranges,
        );
        if let Some(at) = parsed.status_at {
            assert!(mem.contains(at, 1), "status byte at {at:#x} unmapped");
        } else {
            assert!(matches!(parsed.action, Action::Done(_)));
        }
        for &(addr, len) in &data {
            assert!(
                len > 0 && mem.contains(addr, len as u64),
                "piece {addr:#x}+{len}"
            );
            // Each piece lies inside one region.
            let inside = MEMORY
                .iter()
                .any(|&(a, l)| addr >= a && addr + len as u64 <= a + l as u64);
            assert!(inside, "piece {addr:#x}+{len} straddles regions");
        }
        let piece_bytes: u64 = data.iter().map(|&(_, l)| l as u64).sum();
        let capacity = cfg.sectors * SECTOR_SIZE;
        match parsed.action {
            Action::Read { offset, bytes } | Action::Write { offset, bytes } => {
                assert_eq!(bytes, piece_bytes);
                assert!(bytes > 0 && bytes % SECTOR_SIZE == 0 && offset % SECTOR_SIZE == 0);
                assert!(
                    offset + bytes <= capacity,
                    "{offset}+{bytes} beyond {capacity}"
                );
                if matches!(parsed.action, Action::Write { .. }) {
                    assert!(!cfg.readonly);
                    assert_eq!(parsed.header.req_type, VIRTIO_BLK_T_OUT);
                } else {
                    assert_eq!(parsed.header.req_type, VIRTIO_BLK_T_IN);
                }
            }
            Action::GetId { bytes } => {
                assert!(bytes <= 20);
                assert_eq!(u64::from(bytes), piece_bytes);
            }
            Action::Discard | Action::WriteZeroes { .. } => {
                assert!(!cfg.readonly);
                assert!(if matches!(parsed.action, Action::Discard) {
                    cfg.discard
                } else {
                    cfg.write_zeroes
                });
                for &(o, l) in &ranges {
                    assert!(l > 0 && o.checked_add(l).is_some_and(|e| e <= capacity));
                }
            }
            Action::Flush | Action::Done(_) => {}
        }
    }
    Ok(())
}

fn descriptor(u: &mut Unstructured, table_len: u16) -> Result<Descriptor> {
    if u.ratio(1, 8)? {
        return Ok(Descriptor::new(
            u.arbitrary()?,
            u.arbitrary()?,
            u.arbitrary()?,
            u.arbitrary()?,
        ));
    }
    let indirect = u.ratio(1, 8)?;
    let mut flags = 0u16;
    if indirect {
        flags |= VRING_DESC_F_INDIRECT as u16;
    } else {
        if u.arbitrary()? {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if u.arbitrary()? {
            flags |= VRING_DESC_F_WRITE as u16;
        }
    }
    let addr = if indirect {
        INDIRECT
    } else if u.ratio(1, 2)? {
        HEADERS + 16 * u.int_in_range(0..=3)?
    } else {
        let any: u64 = u.arbitrary()?;
        *u.choose(&[0x4000, 0x7f00, 0xfff0, 0x20000, 0x23fff, 0x10000, any])?
    };
    let len = if indirect {
        16 * u.int_in_range(0..=25)?
    } else {
        let any = u.int_in_range(0..=0x9000)?;
        *u.choose(&[1, 16, 17, 512, 513, 0x1000, 0, any])?
    };
    let next = u.int_in_range(0..=table_len)?;
    Ok(Descriptor::new(addr, len, flags, next))
}
