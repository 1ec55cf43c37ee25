//! A hostile guest against the real supervisor and `shadowback blkback`
//! processes (docs/ARCHITECTURE.md §3, docs/PROTOCOL.md §5).
//!
//! - Malformed requests are answered on the ring with an error status and
//!   the request's own `id`; nothing reaches the disk or guest memory, the
//!   device keeps serving and the backend process is never replaced.
//! - Ring-level corruption (`req_prod` more than a ring ahead) disconnects
//!   that guest only: `error code=EPROTO` then EOF on its control socket,
//!   while a guest on another disk keeps doing verified I/O and the
//!   supervisor keeps accepting guests.
#![deny(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_guest::device::{BlockDevice, DeviceError};
use shadowback_ring::blkif::{
    BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSegment, BlkifResponse,
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};
use shadowback_ring::grant::{
    GTF_PAT, GTF_PCD, GTF_PERMIT_ACCESS, GTF_PWT, GTF_READING, GTF_SUB_PAGE, GTF_WRITING,
};
use shadowback_ring::SharedRegion;
use shadowback_supervisor::{Fault, FRESH_START_AFTER};
use shadowback_testsupport::blockio::*;
use shadowback_testsupport::harness::*;
use shadowback_testsupport::process::*;
use shadowback_testsupport::raw_guest::*;
use shadowback_testsupport::wait::wait_for_state;
use shadowback_testsupport::REPLY_TIMEOUT;
use shadowback_xenbus::ErrorCode;

const PAGE: u64 = 4096;
/// The slot whose pages the hostile requests use; normal I/O uses slot 0.
const HOSTILE_SLOT: u32 = 31;
/// Byte the hostile slot's data pages are filled with before each case.
const POISON: u8 = 0xee;
/// Sectors `[0, PREFILL_SECTORS)` hold a known pattern that no refused
/// request may change; hostile writes aim there.
const PREFILL_SECTORS: u32 = 256;
/// Where each case's verified I/O goes (case `i` at `SCRATCH + i * 256`).
const SCRATCH: u64 = 4096;
/// Backend domid of the hostile disk (not 0, so a default domid is wrong).
const BACKEND_ID: u16 = 7;

fn seg(gref: u32, first_sect: u8, last_sect: u8) -> BlkifRequestSegment {
    BlkifRequestSegment {
        gref,
        first_sect,
        last_sect,
        _pad: [0; 2],
    }
}

fn rw(op: u8, sector: u64, segs: &[BlkifRequestSegment]) -> BlkifRequest {
    let mut req = BlkifRequest {
        operation: op,
        nr_segments: segs.len() as u8,
        sector_number: sector,
        ..Default::default()
    };
    req.seg[..segs.len()].copy_from_slice(segs);
    req
}

fn with_nr_segments(mut req: BlkifRequest, n: u8) -> BlkifRequest {
    req.nr_segments = n;
    req
}

fn indirect(op: u8, sector: u64, nr_segments: u16, grefs: &[u32]) -> BlkifRequest {
    let mut ind = BlkifRequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: op,
        nr_segments,
        sector_number: sector,
        ..Default::default()
    };
    ind.indirect_grefs[..grefs.len()].copy_from_slice(grefs);
    BlkifRequest::from_indirect(&ind)
}

fn discard(sector: u64, nr_sectors: u64) -> BlkifRequest {
    BlkifRequest::from_discard(&BlkifRequestDiscard {
        operation: BLKIF_OP_DISCARD,
        sector_number: sector,
        nr_sectors,
        ..Default::default()
    })
}

/// A change to the grant of the hostile slot's first data page, made before
/// the request and undone after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tamper {
    None,
    /// `gnttab_end_foreign_access`: flags cleared.
    Revoke,
    /// Granted to domid 0 instead of the backend.
    OtherDomain,
    /// Names a frame past the end of the region.
    FrameOutside,
    /// `GTF_readonly`.
    ReadOnly,
    /// `GTF_sub_page` on a writable grant: refused (PROTOCOL.md §5.1).
    SubPage,
    /// An undefined flag bit (bit 9) on a writable grant: refused.
    UndefinedFlag,
    /// Xen's `GTF_reading`/`GTF_writing` and the x86 cache attributes on a
    /// writable grant: accepted and ignored.
    IgnoredFlags,
}

struct Case {
    name: &'static str,
    req: BlkifRequest,
    /// Written to the hostile slot's indirect page first.
    indirect_segs: Vec<BlkifRequestSegment>,
    tamper: Tamper,
    want: i16,
    /// The hostile slot's data pages must still hold [`POISON`] afterwards.
    pages_untouched: bool,
}

impl Case {
    fn new(name: &'static str, req: BlkifRequest, want: i16) -> Self {
        Case {
            name,
            req,
            indirect_segs: Vec::new(),
            tamper: Tamper::None,
            want,
            pages_untouched: true,
        }
    }

    fn tamper(mut self, t: Tamper) -> Self {
        self.tamper = t;
        self
    }

    fn indirect_page(mut self, segs: Vec<BlkifRequestSegment>) -> Self {
        self.indirect_segs = segs;
        self
    }

    fn may_touch_pages(mut self) -> Self {
        self.pages_untouched = false;
        self
    }
}

fn cases(front: &BlkFront) -> Vec<Case> {
    let layout = *front.layout();
    let g0 = front.data_gref(HOSTILE_SLOT, 0).expect("data gref");
    let g1 = front.data_gref(HOSTILE_SLOT, 1).expect("data gref");
    let ig = layout
        .indirect_gref(HOSTILE_SLOT, 0)
        .expect("indirect gref");
    let entries = front.grant_table().entries();
    let cap = front.capacity_sectors();
    let full = [seg(g0, 0, 7)];
    let valid_indirect: Vec<_> = (0..257).map(|_| seg(g0, 0, 7)).collect();
    vec![
        // Controls: the harness sees success when there is success.
        Case::new(
            "control: valid read",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_OKAY,
        )
        .may_touch_pages(),
        Case::new(
            "control: write from a read-only grant",
            rw(BLKIF_OP_WRITE, SCRATCH - 64, &full),
            BLKIF_RSP_OKAY,
        )
        .tamper(Tamper::ReadOnly),
        Case::new(
            "control: flush",
            rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[]),
            BLKIF_RSP_OKAY,
        ),
        Case::new(
            "control: flush with data from a read-only grant",
            rw(BLKIF_OP_FLUSH_DISKCACHE, SCRATCH - 192, &full),
            BLKIF_RSP_OKAY,
        )
        .tamper(Tamper::ReadOnly),
        // FLUSH_DISKCACHE with segments is validated as a write
        // (PROTOCOL.md §5.3): every refusal below aims at the prefill.
        Case::new(
            "flush with data and 12 segments",
            with_nr_segments(rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(g0, 0, 7); 11]), 12),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "flush with data, first_sect > last_sect",
            rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(g0, 0, 7), seg(g1, 5, 4)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "flush with data, last_sect 8",
            rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[seg(g0, 0, 8)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "flush with data past the end of the disk",
            rw(BLKIF_OP_FLUSH_DISKCACHE, cap - 4, &full),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "flush with data from a revoked grant",
            rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::Revoke),
        Case::new(
            "flush with data naming another domid",
            rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::OtherDomain),
        Case::new(
            "flush with data from a sub-page grant",
            rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::SubPage),
        // Operations.
        Case::new("unknown op 200", rw(200, 0, &full), BLKIF_RSP_ERROR),
        Case::new("reserved op 4", rw(4, 0, &full), BLKIF_RSP_ERROR),
        Case::new(
            "write barrier",
            rw(BLKIF_OP_WRITE_BARRIER, 0, &full),
            BLKIF_RSP_EOPNOTSUPP,
        ),
        // Segment counts.
        Case::new(
            "read with 0 segments",
            rw(BLKIF_OP_READ, 0, &[]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "write with 0 segments",
            rw(BLKIF_OP_WRITE, 0, &[]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "read with 12 segments",
            with_nr_segments(rw(BLKIF_OP_READ, 0, &[seg(g0, 0, 7); 11]), 12),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "write with 255 segments",
            with_nr_segments(rw(BLKIF_OP_WRITE, 0, &[seg(g0, 0, 7); 11]), 255),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "indirect read with 0 segments",
            indirect(BLKIF_OP_READ, 0, 0, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(valid_indirect.clone()),
        Case::new(
            "indirect write with 257 segments (> feature-max-indirect-segments)",
            indirect(BLKIF_OP_WRITE, 0, 257, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(valid_indirect.clone()),
        Case::new(
            "indirect write with 65535 segments",
            indirect(BLKIF_OP_WRITE, 0, u16::MAX, &[ig; 8]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(valid_indirect),
        Case::new(
            "indirect with inner op flush",
            indirect(BLKIF_OP_FLUSH_DISKCACHE, 0, 1, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(vec![seg(g0, 0, 7)]),
        Case::new(
            "indirect page gref beyond the table",
            indirect(BLKIF_OP_READ, 0, 1, &[entries]),
            BLKIF_RSP_ERROR,
        ),
        // Segment bounds.
        Case::new(
            "first_sect > last_sect",
            rw(BLKIF_OP_WRITE, 0, &[seg(g0, 5, 4)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "last_sect 8",
            rw(BLKIF_OP_WRITE, 0, &[seg(g0, 0, 7), seg(g1, 0, 8)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "read with last_sect 8",
            rw(BLKIF_OP_READ, 0, &[seg(g0, 0, 8)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "indirect segment with last_sect 8",
            indirect(BLKIF_OP_WRITE, 0, 2, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(vec![seg(g0, 0, 7), seg(g1, 0, 8)]),
        // Sector range.
        Case::new(
            "read past the end of the disk",
            rw(BLKIF_OP_READ, cap - 4, &full),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "write starting at the end of the disk",
            rw(BLKIF_OP_WRITE, cap, &[seg(g0, 0, 0)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "sector overflow near u64::MAX",
            rw(BLKIF_OP_WRITE, u64::MAX - 2, &full),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "indirect write past the end",
            indirect(BLKIF_OP_WRITE, cap - 8, 2, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(vec![seg(g0, 0, 7), seg(g1, 0, 7)]),
        // Grants.
        Case::new(
            "grant ref beyond the table",
            rw(BLKIF_OP_READ, 0, &[seg(entries, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "grant ref u32::MAX",
            rw(BLKIF_OP_WRITE, 0, &[seg(u32::MAX, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        Case::new(
            "revoked grant (write)",
            rw(BLKIF_OP_WRITE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::Revoke),
        Case::new(
            "revoked grant (read)",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::Revoke),
        Case::new(
            "grant naming another domid",
            rw(BLKIF_OP_WRITE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::OtherDomain),
        Case::new(
            "grant to a frame outside the region",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::FrameOutside),
        Case::new(
            "read into a read-only grant",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::ReadOnly),
        Case::new(
            "second segment revoked",
            rw(BLKIF_OP_READ, 0, &[seg(g1, 0, 7), seg(g0, 0, 7)]),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::Revoke),
        Case::new(
            "control: write from a grant with GTF_reading/writing/PWT/PCD/PAT",
            rw(BLKIF_OP_WRITE, SCRATCH - 128, &full),
            BLKIF_RSP_OKAY,
        )
        .tamper(Tamper::IgnoredFlags),
        Case::new(
            "control: read into a grant with GTF_reading/writing/PWT/PCD/PAT",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_OKAY,
        )
        .tamper(Tamper::IgnoredFlags)
        .may_touch_pages(),
        Case::new(
            "write from a sub-page grant",
            rw(BLKIF_OP_WRITE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::SubPage),
        Case::new(
            "read into a sub-page grant",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::SubPage),
        Case::new(
            "indirect segment from a sub-page grant",
            indirect(BLKIF_OP_WRITE, 0, 1, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(vec![seg(g0, 0, 7)])
        .tamper(Tamper::SubPage),
        Case::new(
            "write from a grant with an undefined flag bit",
            rw(BLKIF_OP_WRITE, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::UndefinedFlag),
        Case::new(
            "read into a grant with an undefined flag bit",
            rw(BLKIF_OP_READ, 0, &full),
            BLKIF_RSP_ERROR,
        )
        .tamper(Tamper::UndefinedFlag),
        Case::new(
            "indirect segment naming another domid",
            indirect(BLKIF_OP_WRITE, 0, 1, &[ig]),
            BLKIF_RSP_ERROR,
        )
        .indirect_page(vec![seg(g0, 0, 7)])
        .tamper(Tamper::OtherDomain),
        // Discards.
        Case::new("discard past the end", discard(cap - 4, 8), BLKIF_RSP_ERROR),
        Case::new(
            "discard overflowing u64",
            discard(8, u64::MAX),
            BLKIF_RSP_ERROR,
        ),
        Case::new("empty discard", discard(0, 0), BLKIF_RSP_ERROR),
    ]
}

/// Applies (or with `undo`, reverts) a tamper on the hostile slot's first
/// data page grant.
fn set_grant(front: &BlkFront, tamper: Tamper, undo: bool) {
    let gref = front.data_gref(HOSTILE_SLOT, 0).expect("gref");
    let frame = front.layout().data_frame(HOSTILE_SLOT, 0).expect("frame");
    let table = front.grant_table();
    let backend = front.backend().backend_id;
    let res = match (tamper, undo) {
        (Tamper::None, _) => Ok(()),
        (_, true) => table.grant(gref, backend, frame, false),
        (Tamper::Revoke, false) => table.end_access(gref),
        (Tamper::OtherDomain, false) => table.grant(gref, 0, frame, false),
        (Tamper::FrameOutside, false) => {
            table.grant(gref, backend, front.region().pages() + 16, false)
        }
        (Tamper::ReadOnly, false) => table.grant(gref, backend, frame, true),
        (Tamper::SubPage, false) => {
            grant_with_flags(front, gref, frame, GTF_PERMIT_ACCESS | GTF_SUB_PAGE)
        }
        (Tamper::UndefinedFlag, false) => {
            grant_with_flags(front, gref, frame, GTF_PERMIT_ACCESS | 1 << 9)
        }
        (Tamper::IgnoredFlags, false) => grant_with_flags(
            front,
            gref,
            frame,
            GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING | GTF_PWT | GTF_PCD | GTF_PAT,
        ),
    };
    res.expect("grant table update");
}

/// Grants `frame` to the backend, then stores a raw `flags` word over the
/// entry (as a C frontend would), with release ordering.
fn grant_with_flags(
    front: &BlkFront,
    gref: u32,
    frame: u32,
    flags: u16,
) -> Result<(), shadowback_ring::RingError> {
    front
        .grant_table()
        .grant(gref, front.backend().backend_id, frame, false)?;
    front
        .region()
        .store(flags, u64::from(gref) * 8, Ordering::Release)
}

fn poison_pages(front: &BlkFront) {
    for page in 0..2 {
        let off = front.data_offset(HOSTILE_SLOT, page).expect("data offset");
        front
            .region()
            .write(off, &[POISON; PAGE as usize])
            .expect("poison");
    }
}

fn pages_poisoned(front: &BlkFront) -> bool {
    (0..2).all(|page| {
        let off = front.data_offset(HOSTILE_SLOT, page).expect("data offset");
        let mut buf = vec![0u8; PAGE as usize];
        front.region().read(off, &mut buf).expect("read region");
        buf.iter().all(|&b| b == POISON)
    })
}

/// Runs one case; `Err` describes what went wrong.
fn run_case(front: &mut BlkFront, index: usize, case: &Case) -> Result<(), String> {
    poison_pages(front);
    let ind_frame = front
        .layout()
        .indirect_frame(HOSTILE_SLOT, 0)
        .expect("indirect frame");
    for (i, s) in case.indirect_segs.iter().enumerate() {
        front
            .region()
            .write_obj(*s, u64::from(ind_frame) * PAGE + i as u64 * 8)
            .expect("write indirect page");
    }
    set_grant(front, case.tamper, false);
    let id = 0x5eed_0000_0000_0000 | index as u64;
    let mut req = case.req;
    req.id = id;
    let submitted = front
        .submit_raw(req)
        .and_then(|_| front.kick())
        .and_then(|()| front.take_raw_response(REPLY_TIMEOUT));
    let extra = front.take_raw_response(Duration::ZERO);
    set_grant(front, case.tamper, true);

    let rsp = match submitted {
        Ok(Some(rsp)) => rsp,
        Ok(None) => return Err(format!("no response within {REPLY_TIMEOUT:?}")),
        Err(e) => return Err(format!("ring error: {e}")),
    };
    if rsp.id != id {
        return Err(format!("response id {:#x}, expected {id:#x}", rsp.id));
    }
    let inner_op = req.as_indirect().indirect_op;
    if rsp.operation != req.operation
        && !(req.operation == BLKIF_OP_INDIRECT && rsp.operation == inner_op)
    {
        return Err(format!(
            "response operation {}, request operation {}",
            rsp.operation, req.operation
        ));
    }
    if rsp.status != case.want {
        return Err(format!("status {}, expected {}", rsp.status, case.want));
    }
    match extra {
        Ok(None) => {}
        other => return Err(format!("a second response arrived: {other:?}")),
    }
    if case.pages_untouched && !pages_poisoned(front) {
        return Err("the backend wrote into the guest's data pages".into());
    }
    Ok(())
}

#[test]
fn malformed_requests_get_error_responses_and_the_backend_survives() {
    let name = unique_name("hg-req");
    let h = Harness::start(
        "hostile-req",
        &[DiskSpec::new(&name, 16).backend_id(BACKEND_ID)],
    );
    let mut front = BlkFront::attach(h.socket(), &BlkFrontConfig::new(&name)).expect("attach");
    assert!(
        front.uses_indirect(),
        "the default frontend should use indirect requests"
    );
    let pid = backend_pid(&name);

    let prefill = pattern(0xbeef, PREFILL_SECTORS as usize * 512);
    write(&mut front, 0, &prefill).expect("prefill");

    let cases = cases(&front);
    let mut failures = Vec::new();
    let mut verified = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        if let Err(e) = run_case(&mut front, index, case) {
            failures.push(format!("{}: {e}", case.name));
        }
        // Whatever the answer was, the device still serves normal I/O.
        match verified_io(
            &mut front,
            SCRATCH + index as u64 * 256,
            0x1000 + index as u64,
        ) {
            Ok(()) => verified.push(index),
            Err(e) => failures.push(format!(
                "{}: device broken after the request: {e}",
                case.name
            )),
        }
        let now = backend_pids(&name, std::process::id());
        if now != [pid] {
            failures.push(format!(
                "{}: backend process {pid} replaced or gone (now {now:?})",
                case.name
            ));
            break;
        }
    }
    // Nothing a refused request carried reached the disk.
    if let Err(e) = check(&mut front, 0, &prefill) {
        failures.push(format!("prefilled sectors changed: {e}"));
    }
    // Verified data of every case is still there.
    for index in verified {
        let sector = SCRATCH + index as u64 * 256;
        if let Err(e) = check(&mut front, sector, &pattern(0x1000 + index as u64, 4096)) {
            failures.push(format!("case {index} data lost: {e}"));
        }
    }
    assert!(alive(pid), "backend {pid} died: {:?}", h.stats(&name));
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    front.detach().expect("clean detach");
    h.stop();
}

/// Puts `req` on the ring as it is, kicks, and returns the one response
/// (checking that no second one follows).
fn raw_request(front: &mut BlkFront, req: BlkifRequest) -> BlkifResponse {
    front.submit_raw(req).expect("submit");
    front.kick().expect("kick");
    let rsp = front
        .take_raw_response(REPLY_TIMEOUT)
        .expect("ring")
        .unwrap_or_else(|| panic!("no response to id {:#x}", req.id));
    let extra = front.take_raw_response(Duration::ZERO).expect("ring");
    assert!(extra.is_none(), "a second response: {extra:?}");
    rsp
}

/// `len` bytes of the image file at 512-byte `sector`.
fn image_bytes(image: &std::path::Path, sector: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(image).expect("open image");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, sector * 512)
        .expect("read image");
    buf
}

/// PROTOCOL.md §5.3: `BLKIF_OP_FLUSH_DISKCACHE` with segments writes them
/// and then flushes, answering `BLKIF_RSP_OKAY` only when both succeeded;
/// on a read-only disk it is refused and writes nothing.
#[test]
fn flush_with_segments_writes_its_data_then_flushes() {
    let name = unique_name("hg-fl");
    let ro_name = unique_name("hg-fl-ro");
    let h = Harness::start(
        "flush-data",
        &[
            DiskSpec::new(&name, 16).backend_id(BACKEND_ID),
            DiskSpec::new(&ro_name, 16)
                .backend_id(BACKEND_ID)
                .readonly(),
        ],
    );
    const SECTOR: u64 = 1000;
    let data = pattern(0xf1a5, 2 * PAGE as usize);
    // Page 0 whole, then sectors 2..=5 of page 1: 12 sectors.
    let mut want = data[..PAGE as usize].to_vec();
    want.extend_from_slice(&data[PAGE as usize + 1024..PAGE as usize + 3072]);
    let fill = |front: &BlkFront| {
        for page in 0..2u32 {
            let off = front.data_offset(HOSTILE_SLOT, page).expect("offset");
            let at = page as usize * PAGE as usize;
            front
                .region()
                .write(off, &data[at..at + PAGE as usize])
                .expect("fill page");
        }
    };
    let request = |front: &BlkFront, op: u8, id: u64| {
        let g0 = front.data_gref(HOSTILE_SLOT, 0).expect("gref");
        let g1 = front.data_gref(HOSTILE_SLOT, 1).expect("gref");
        let mut req = rw(op, SECTOR, &[seg(g0, 0, 7), seg(g1, 2, 5)]);
        req.id = id;
        req
    };

    // A fresh image reads zeros; afterwards it holds the data.
    let mut front = BlkFront::attach(h.socket(), &BlkFrontConfig::new(&name)).expect("attach");
    fill(&front);
    let req = request(&front, BLKIF_OP_FLUSH_DISKCACHE, 0xf1);
    let rsp = raw_request(&mut front, req);
    assert_eq!(
        (rsp.id, rsp.operation, rsp.status),
        (0xf1, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY),
        "FLUSH_DISKCACHE with segments"
    );
    let image = h.image(&name);
    assert!(
        image_bytes(&image, SECTOR, want.len()) == want,
        "the image does not hold the data of the FLUSH_DISKCACHE at sector {SECTOR}"
    );
    let around = [
        image_bytes(&image, SECTOR - 1, 512),
        image_bytes(&image, SECTOR + 12, 512),
    ];
    assert!(
        around.iter().flatten().all(|&b| b == 0),
        "the FLUSH_DISKCACHE wrote outside its 12 sectors"
    );
    check(&mut front, SECTOR, &want).expect("read back through the ring");
    front.detach().expect("detach");

    // Read-only disk: refused like a write, nothing written; a flush
    // without data is still fine.
    let mut ro = BlkFront::attach(h.socket(), &BlkFrontConfig::new(&ro_name)).expect("attach");
    assert_eq!(ro.backend().mode, shadowback_xenbus::DiskMode::ReadOnly);
    fill(&ro);
    for (op, id) in [(BLKIF_OP_FLUSH_DISKCACHE, 0xf2), (BLKIF_OP_WRITE, 0xf3)] {
        let req = request(&ro, op, id);
        let rsp = raw_request(&mut ro, req);
        assert_eq!(
            (rsp.id, rsp.operation, rsp.status),
            (id, op, BLKIF_RSP_ERROR),
            "operation {op} with segments on a read-only disk"
        );
    }
    let flush = BlkifRequest {
        operation: BLKIF_OP_FLUSH_DISKCACHE,
        id: 0xf4,
        ..Default::default()
    };
    let rsp = raw_request(&mut ro, flush);
    assert_eq!(
        (rsp.id, rsp.status),
        (0xf4, BLKIF_RSP_OKAY),
        "flush without data on a read-only disk"
    );
    assert!(
        image_bytes(&h.image(&ro_name), SECTOR, want.len())
            .iter()
            .all(|&b| b == 0),
        "a refused request wrote to the read-only image"
    );
    ro.detach().expect("detach");
    h.stop();
}

/// Polls until the device reports an error; a completion means the
/// backend served a corrupt ring.
fn poll_until_error(front: &mut BlkFront) -> DeviceError {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match front.poll_completions(Duration::from_millis(100), &mut out) {
            Ok(()) => assert!(out.is_empty(), "completions on a corrupt ring: {out:?}"),
            Err(e) => return e,
        }
    }
    panic!("no disconnect within {REPLY_TIMEOUT:?}");
}

/// A write then a read through a raw guest's own ring.
fn raw_round_trip(guest: &mut RawGuest) {
    let data = pattern(77, PAGE as usize);
    let region = guest.mem.region.clone();
    region
        .write(RawGuest::data_offset(0), &data)
        .expect("fill page");
    region
        .write(RawGuest::data_offset(1), &[0; PAGE as usize])
        .expect("clear page");
    let mut w = rw(BLKIF_OP_WRITE, 64, &[seg(raw_data_gref(0), 0, 7)]);
    w.id = 1;
    let rsp = guest.request(&w).expect("raw write");
    assert_eq!((rsp.id, rsp.status), (1, BLKIF_RSP_OKAY), "raw write");
    let mut r = rw(BLKIF_OP_READ, 64, &[seg(raw_data_gref(1), 0, 7)]);
    r.id = 2;
    let rsp = guest.request(&r).expect("raw read");
    assert_eq!((rsp.id, rsp.status), (2, BLKIF_RSP_OKAY), "raw read");
    let mut got = vec![0u8; PAGE as usize];
    region
        .read(RawGuest::data_offset(1), &mut got)
        .expect("read page");
    assert!(got == data, "raw guest read back different data");
}

#[test]
fn ring_corruption_disconnects_only_that_guest() {
    let a = unique_name("rc-a");
    let b = unique_name("rc-b");
    let h = Harness::start(
        "ring-corrupt",
        &[
            DiskSpec::new(&a, 16).backend_id(3),
            DiskSpec::new(&b, 16).backend_id(4),
        ],
    );
    let mut guest_b = BlkFront::attach(h.socket(), &BlkFrontConfig::new(&b)).expect("attach B");
    let mut work_b = verify_workload(11, 0, 2048);
    run_clean(&mut work_b, &mut guest_b, "guest B before");
    let pid_a = backend_pid(&a);
    let pid_b = backend_pid(&b);

    // 1. A raw guest on disk A sees the disconnect on its control socket.
    let mut raw = RawGuest::attach(h.socket(), &a, 3).expect("raw guest attaches to A");
    raw_round_trip(&mut raw);
    let hdr = RawGuest::ring_offset();
    let region = raw.mem.region.clone();
    let req_prod: u32 = region.load(hdr, Ordering::Acquire).expect("req_prod");
    region
        .store(req_prod.wrapping_add(1000), hdr, Ordering::Release)
        .expect("corrupt req_prod");
    raw.mem.kick.notify().expect("kick");
    expect_refusal(&raw.control, ErrorCode::Eproto).expect("corrupt ring: error EPROTO then EOF");
    drop(raw);

    run_clean(&mut work_b, &mut guest_b, "guest B after A's disconnect");
    assert_eq!(
        backend_pids(&a, std::process::id()),
        [pid_a],
        "a disconnect is not a backend crash"
    );

    // 2. The supervisor still accepts guests on A; a BlkFront whose ring is
    //    corrupted sees Disconnected.
    let mut guest_a = BlkFront::attach(h.socket(), &BlkFrontConfig::new(&a)).expect("re-attach A");
    verified_io(&mut guest_a, 0, 5).expect("I/O on re-attached A");
    let ring = u64::from(guest_a.layout().ring_frame()) * PAGE;
    let region = guest_a.region().clone();
    let req_prod: u32 = region.load(ring, Ordering::Acquire).expect("req_prod");
    // Let the backend finish its RING_FINAL_CHECK_FOR_REQUESTS (which sets
    // req_event to req_cons + 1) and go to sleep.
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while region
        .load::<u32>(ring + 4, Ordering::Acquire)
        .expect("req_event")
        != req_prod.wrapping_add(1)
    {
        assert!(
            Instant::now() < deadline,
            "the backend never re-armed req_event"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    // req_event two ahead: publishing the next request sends no kick, so
    // the backend first looks at the ring after the corruption below.
    region
        .store(req_prod.wrapping_add(2), ring + 4, Ordering::Release)
        .expect("req_event");
    let flush = BlkifRequest {
        operation: BLKIF_OP_FLUSH_DISKCACHE,
        id: 999,
        ..Default::default()
    };
    guest_a.submit_raw(flush).expect("submit");
    guest_a.kick().expect("publish");
    region
        .store(req_prod.wrapping_add(1 + 1000), ring, Ordering::Release)
        .expect("corrupt req_prod");
    guest_a.event_channels().0.notify().expect("kick");
    let first = poll_until_error(&mut guest_a);
    if let DeviceError::Transport(why) = &first {
        assert!(
            !why.contains("id 999"),
            "the backend answered the flush before seeing the corrupt req_prod: \
             a scheduling race in this test, not a backend bug ({why})"
        );
    }
    assert!(
        matches!(first, DeviceError::Disconnected),
        "expected Disconnected, got {first:?}"
    );
    let second = poll_until_error(&mut guest_a);
    assert!(
        matches!(second, DeviceError::Disconnected),
        "after the error, expected Disconnected, got {second:?}"
    );
    let detach = guest_a.detach();
    assert!(
        matches!(detach, Err(DeviceError::Disconnected)),
        "detach after disconnect: {detach:?}"
    );

    // 3. B never noticed; A serves a new guest; no backend was replaced.
    run_clean(
        &mut work_b,
        &mut guest_b,
        "guest B after the second disconnect",
    );
    let mut guest_a3 =
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&a)).expect("third guest on A");
    verified_io(&mut guest_a3, 512, 6).expect("I/O on the third guest of A");
    check(&mut guest_a3, 0, &pattern(5, 4096)).expect("data written by the second guest of A");
    assert_eq!(backend_pids(&a, std::process::id()), [pid_a]);
    assert_eq!(backend_pids(&b, std::process::id()), [pid_b]);
    guest_a3.detach().expect("detach A");
    guest_b.detach().expect("detach B");
    h.stop();
}

/// A region like [`RawRegion::new`]'s but without `F_SEAL_SEAL`, so that
/// its guest can add seals after connecting.
fn resealable_region() -> Arc<SharedRegion> {
    use shadowback_testsupport::fd::{add_seals, sealable_memfd, SealFlag};
    let file = sealable_memfd(u64::from(RAW_PAGES) * PAGE, true);
    add_seals(&file, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW);
    Arc::new(SharedRegion::from_fd(file.into()).expect("map"))
}

#[test]
fn a_guest_that_makes_its_disk_given_up_leaves_it_to_a_fresh_start() {
    let hostile = unique_name("gu-h");
    let other = unique_name("gu-o");
    let h = Harness::start(
        "given-up",
        &[DiskSpec::new(&hostile, 16), DiskSpec::new(&other, 16)],
    );
    let bystander = Bystander::start(
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&other)).expect("bystander attaches"),
        61,
    );
    bystander.progressing("before");

    // Connected with a writable region, the guest then seals it against
    // writable mappings: the backend serving it keeps its mapping, but no
    // new instance can map it, so every takeover fails.
    let region = resealable_region();
    let mut guest = RawGuest::attach_with(h.socket(), &hostile, RawRegion::on(region.clone(), 0))
        .expect("hostile guest attaches");
    raw_round_trip(&mut guest);
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(region.file()),
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_FUTURE_WRITE),
    )
    .expect("F_SEAL_FUTURE_WRITE");
    let pid = backend_pid(&hostile);
    h.sup()
        .fault(&hostile, Fault::Kill)
        .expect("kill its backend");
    let s = wait_for_state(
        STATS_TIMEOUT,
        "the device given up",
        || h.stats(&hostile),
        |s| s.given_up,
    );
    assert_eq!(s.recoveries, 0, "{s:#?}");
    let told = guest.next_message();
    assert_eq!(
        (told.kind(), told.get("code")),
        ("error", Some("ENODEV")),
        "{told}"
    );
    bystander.progressing("while the other disk is given up");
    drop(guest);

    // A well-behaved guest, after the hold-off: a new backend, a new log.
    std::thread::sleep(FRESH_START_AFTER);
    let mut fresh =
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&hostile)).expect("a fresh start");
    verified_io(&mut fresh, 0, 63).expect("verified I/O after the fresh start");
    let s = h.stats(&hostile);
    assert!(!s.given_up && s.connected && s.fresh_starts == 1, "{s:#?}");
    assert_ne!(backend_pid(&hostile), pid, "a new backend");
    bystander.progressing("after the fresh start");
    let (bystander, _) = bystander.finish("a disk given up and started afresh");
    fresh.detach().expect("detach");
    bystander.detach().expect("detach");
    h.stop();
}
