//! The ring crate against the real Xen public headers (`libxen-dev`).
//!
//! `tests/c/xen_abi.c` is compiled at test time against
//! `/usr/include/xen/io/{ring,blkif,netif}.h` and `xen/grant_table.h`. It
//! prints every size, offset, constant and ring size the crate mirrors, and
//! it runs a blkif frontend or backend built from the `ring.h` macros on a
//! memfd shared with this process, so each wire struct and each index and
//! event-index update is checked against the C that real Xen drivers use.
//!
//! The two processes take turns: the C side acts only on a command line from
//! its stdin and answers with one line; this side touches the ring only
//! between commands. Request and response contents are functions of a
//! sequence number, written identically here and in the C source.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use shadowback_ring::blkif::*;
use shadowback_ring::grant::{
    DomId, GrantEntryV1, GrantRef, GTF_PAT, GTF_PCD, GTF_PERMIT_ACCESS, GTF_PWT, GTF_READING,
    GTF_READONLY, GTF_SUB_PAGE, GTF_TYPE_MASK, GTF_WRITING,
};
use shadowback_ring::netif::*;
use shadowback_ring::sring::{
    ring_size, BackRing, FrontRing, RingPages, RingProtocol, SRING_HEADER_SIZE,
};
use shadowback_ring::{SharedRegion, PAGE_SIZE};
use shadowback_testsupport::TempDir;
use vm_memory::ByteValued;

const XEN_RING_H: &str = "/usr/include/xen/io/ring.h";

// ------------------------------------------------------------ C reference

/// The compiled C program, in a directory removed on drop.
struct Reference {
    _dir: TempDir,
    bin: PathBuf,
}

/// Compiles `tests/c/xen_abi.c`; `tag` keeps concurrent tests apart.
fn build_reference(tag: &str) -> Reference {
    assert!(
        Path::new(XEN_RING_H).exists(),
        "{XEN_RING_H} not found: the Xen public headers are not installed. \
         Run scripts/install-test-deps.sh (it installs libxen-dev) and re-run."
    );
    let dir = TempDir::new(&format!("xen-abi-{tag}"));
    let bin = dir.join("xen_abi");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/xen_abi.c");
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-O0", "-Wall", "-Wextra", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc:?} (install gcc): {e}"));
    assert!(
        out.status.success(),
        "compiling {} against the Xen headers failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Reference { _dir: dir, bin }
}

/// A running `front`/`back` half of the C program.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    mode: &'static str,
}

impl Peer {
    /// Starts `mode` on the ring made of `frames` of `region`; the child
    /// inherits a duplicate of the memfd and maps it itself.
    fn spawn(
        reference: &Reference,
        mode: &'static str,
        region: &SharedRegion,
        frames: &[u32],
    ) -> (Peer, u32) {
        // A dup without FD_CLOEXEC, so exec keeps it open in the child. A
        // child another test thread spawns meanwhile inherits it too, which
        // only costs that child one idle descriptor.
        let inherited = region.file().try_clone().expect("dup memfd");
        fcntl(inherited.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");
        let frames_arg = frames
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new(&reference.bin)
            .arg(mode)
            .arg(inherited.as_raw_fd().to_string())
            .arg(frames_arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the C peer");
        // The child has its own copy now.
        drop(inherited);
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut peer = Peer {
            child,
            stdin,
            stdout,
            mode,
        };
        let [size] = peer.reply("ready");
        (peer, size)
    }

    /// Sends one command and parses the `want` reply's numbers.
    fn call<const N: usize>(&mut self, cmd: &str, want: &str) -> [u32; N] {
        writeln!(self.stdin, "{cmd}").expect("write to the C peer");
        self.stdin.flush().expect("flush to the C peer");
        self.reply(want)
    }

    fn reply<const N: usize>(&mut self, want: &str) -> [u32; N] {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read from the C peer");
        if n == 0 {
            let status = self.child.wait().expect("wait for the C peer");
            panic!(
                "C {} exited ({status}) instead of answering {want}",
                self.mode
            );
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some(w) if w == want => {}
            Some("fail") => panic!("C {} reports: {}", self.mode, line.trim_end()),
            _ => panic!(
                "C {}: expected {want}, got {:?}",
                self.mode,
                line.trim_end()
            ),
        }
        let vals: Vec<u32> = words
            .map(|w| {
                w.parse()
                    .unwrap_or_else(|_| panic!("bad number in {line:?}"))
            })
            .collect();
        vals.try_into()
            .unwrap_or_else(|v: Vec<u32>| panic!("{want}: expected {N} numbers, got {v:?}"))
    }

    /// Ends the child and returns the private indices it reports.
    fn quit<const N: usize>(mut self) -> [u32; N] {
        let bye = self.call("quit", "bye");
        let status = self.child.wait().expect("wait for the C peer");
        assert!(status.success(), "C {} exited with {status}", self.mode);
        bye
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // After a failed assertion the child may still wait for a command.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------ test data shared with the C side

fn request_id(s: u32) -> u64 {
    0xFEED_0000_0000_0000 | u64::from(s) << 16 | 0x1234
}

fn request_sector(s: u32) -> u64 {
    0x0000_0100_0000_0000 + u64::from(s) * 8
}

fn request_handle(s: u32) -> u16 {
    0xA000 | (s & 0xFFF) as u16
}

fn response_status(s: u32) -> i16 {
    match s % 3 {
        1 => BLKIF_RSP_ERROR,
        2 => BLKIF_RSP_EOPNOTSUPP,
        _ => BLKIF_RSP_OKAY,
    }
}

/// Request number `s` (`make_request` in the C source). `s % 6`: read,
/// write, discard, indirect, write, flush.
fn expected_request(s: u32) -> BlkifRequest {
    match s % 6 {
        2 => BlkifRequest::from_discard(&BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            flag: if (s / 6) % 2 == 1 {
                BLKIF_DISCARD_SECURE
            } else {
                0
            },
            handle: request_handle(s),
            id: request_id(s),
            sector_number: request_sector(s),
            nr_sectors: 0x1_0000_0000 + u64::from(s) * 16,
            ..Default::default()
        }),
        3 => BlkifRequest::from_indirect(&BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: if (s / 6) % 2 == 1 {
                BLKIF_OP_WRITE
            } else {
                BLKIF_OP_READ
            },
            nr_segments: 100 + (s % 400) as u16,
            id: request_id(s),
            sector_number: request_sector(s),
            handle: request_handle(s),
            indirect_grefs: std::array::from_fn(|i| 0x4000_0000 | s << 4 | i as u32),
            ..Default::default()
        }),
        kind => {
            let operation = match kind {
                0 => BLKIF_OP_READ,
                5 => BLKIF_OP_FLUSH_DISKCACHE,
                _ => BLKIF_OP_WRITE,
            };
            BlkifRequest {
                operation,
                nr_segments: if operation == BLKIF_OP_FLUSH_DISKCACHE {
                    0
                } else {
                    1 + (s % 11) as u8
                },
                handle: request_handle(s),
                id: request_id(s),
                sector_number: request_sector(s),
                seg: std::array::from_fn(|i| BlkifRequestSegment {
                    gref: 0x8000_0000 | s << 8 | i as u32,
                    first_sect: (i % 8) as u8,
                    last_sect: 7,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    }
}

fn expected_response(s: u32) -> BlkifResponse {
    BlkifResponse {
        id: request_id(s),
        operation: expected_request(s).operation,
        status: response_status(s),
        ..Default::default()
    }
}

/// Checks a received request through the view its operation selects, then
/// every byte of the slot.
fn check_request(s: u32, got: &BlkifRequest) {
    let want = expected_request(s);
    match want.operation {
        BLKIF_OP_DISCARD => assert_eq!(got.as_discard(), want.as_discard(), "discard request {s}"),
        BLKIF_OP_INDIRECT => assert_eq!(
            got.as_indirect(),
            want.as_indirect(),
            "indirect request {s}"
        ),
        _ => {}
    }
    assert_eq!(*got, want, "request {s}");
}

// ----------------------------------------------------------------- layout

/// Where the crate's ring code really writes in a blkif ring page: the
/// header offsets of the four indices (found by their values), and the
/// ring start and entry size (found from where requests 3 and 4 land).
struct WrittenLayout {
    req_prod: usize,
    req_event: usize,
    rsp_prod: usize,
    rsp_event: usize,
    ring: usize,
    entry: usize,
}

fn sring_layout_written_by_the_crate() -> WrittenLayout {
    let region = Arc::new(SharedRegion::create("xen-abi-probe", 2).unwrap());
    let pages = RingPages::contiguous(region.clone(), 1, 1).unwrap();
    let mut front = FrontRing::<Blkif>::init(pages.clone()).unwrap();
    let mut back = BackRing::<Blkif>::attach(pages).unwrap();
    for s in 0..5 {
        front.put_request(&expected_request(s)).unwrap();
    }
    front.push_requests().unwrap(); // req_prod = 5
    for _ in 0..5 {
        back.take_request().unwrap();
    }
    assert!(!back.final_check_for_requests().unwrap()); // req_event = 6
    for s in 0..2 {
        back.put_response(&expected_response(s)).unwrap();
    }
    back.push_responses().unwrap(); // rsp_prod = 2
    for _ in 0..2 {
        front.take_response().unwrap().unwrap();
    }
    assert!(!front.final_check_for_responses().unwrap()); // rsp_event = 3

    let mut page = vec![0u8; PAGE_SIZE];
    region.read(PAGE_SIZE as u64, &mut page).unwrap();
    let word_at = |value: u32| -> usize {
        let hits: Vec<usize> = (0..SRING_HEADER_SIZE)
            .step_by(4)
            .filter(|&off| page[off..off + 4] == value.to_ne_bytes())
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "index value {value} found at header offsets {hits:?}"
        );
        hits[0]
    };
    let request_at = |s: u32| -> usize {
        let req = expected_request(s);
        let bytes = req.as_slice();
        let hits: Vec<usize> = (0..=PAGE_SIZE - bytes.len())
            .filter(|&off| page[off..off + bytes.len()] == *bytes)
            .collect();
        assert_eq!(hits.len(), 1, "request {s} found at page offsets {hits:?}");
        hits[0]
    };
    let (third, fourth) = (request_at(3), request_at(4));
    WrittenLayout {
        req_prod: word_at(5),
        req_event: word_at(6),
        rsp_prod: word_at(2),
        rsp_event: word_at(3),
        ring: third - 3 * (fourth - third),
        entry: fourth - third,
    }
}

/// Where the crate's `from_mcast` puts the address in an extra-info slot.
fn mcast_addr_offset() -> usize {
    let addr = [0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6];
    let slot = NetifExtraInfo::from_mcast(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, addr);
    let bytes = slot.as_slice();
    (0..=bytes.len() - addr.len())
        .find(|&off| bytes[off..off + addr.len()] == addr)
        .expect("the address is in the slot")
}

/// Every value the C side prints, as the crate has it.
fn rust_layout(written: &WrittenLayout) -> Vec<(&'static str, i64)> {
    macro_rules! entries {
        ($($name:literal => $val:expr),* $(,)?) => {
            vec![$(($name, i64::try_from($val).expect($name))),*]
        };
    }
    entries! {
        "sizeof.blkif_sring" => SRING_HEADER_SIZE + Blkif::ENTRY_SIZE,
        "offsetof.blkif_sring.req_prod" => written.req_prod,
        "offsetof.blkif_sring.req_event" => written.req_event,
        "offsetof.blkif_sring.rsp_prod" => written.rsp_prod,
        "offsetof.blkif_sring.rsp_event" => written.rsp_event,
        "offsetof.blkif_sring.ring" => SRING_HEADER_SIZE,
        "sizeof.blkif_sring_entry" => Blkif::ENTRY_SIZE,

        "sizeof.blkif_request" => size_of::<BlkifRequest>(),
        "offsetof.blkif_request.operation" => offset_of!(BlkifRequest, operation),
        "offsetof.blkif_request.nr_segments" => offset_of!(BlkifRequest, nr_segments),
        "offsetof.blkif_request.handle" => offset_of!(BlkifRequest, handle),
        "offsetof.blkif_request.id" => offset_of!(BlkifRequest, id),
        "offsetof.blkif_request.sector_number" => offset_of!(BlkifRequest, sector_number),
        "offsetof.blkif_request.seg" => offset_of!(BlkifRequest, seg),

        "sizeof.blkif_request_segment" => size_of::<BlkifRequestSegment>(),
        "offsetof.blkif_request_segment.gref" => offset_of!(BlkifRequestSegment, gref),
        "offsetof.blkif_request_segment.first_sect" => offset_of!(BlkifRequestSegment, first_sect),
        "offsetof.blkif_request_segment.last_sect" => offset_of!(BlkifRequestSegment, last_sect),

        "sizeof.blkif_request_discard" => size_of::<BlkifRequestDiscard>(),
        "offsetof.blkif_request_discard.operation" => offset_of!(BlkifRequestDiscard, operation),
        "offsetof.blkif_request_discard.flag" => offset_of!(BlkifRequestDiscard, flag),
        "offsetof.blkif_request_discard.handle" => offset_of!(BlkifRequestDiscard, handle),
        "offsetof.blkif_request_discard.id" => offset_of!(BlkifRequestDiscard, id),
        "offsetof.blkif_request_discard.sector_number" => offset_of!(BlkifRequestDiscard, sector_number),
        "offsetof.blkif_request_discard.nr_sectors" => offset_of!(BlkifRequestDiscard, nr_sectors),

        "sizeof.blkif_request_indirect" => size_of::<BlkifRequestIndirect>(),
        "offsetof.blkif_request_indirect.operation" => offset_of!(BlkifRequestIndirect, operation),
        "offsetof.blkif_request_indirect.indirect_op" => offset_of!(BlkifRequestIndirect, indirect_op),
        "offsetof.blkif_request_indirect.nr_segments" => offset_of!(BlkifRequestIndirect, nr_segments),
        "offsetof.blkif_request_indirect.id" => offset_of!(BlkifRequestIndirect, id),
        "offsetof.blkif_request_indirect.sector_number" => offset_of!(BlkifRequestIndirect, sector_number),
        "offsetof.blkif_request_indirect.handle" => offset_of!(BlkifRequestIndirect, handle),
        "offsetof.blkif_request_indirect.indirect_grefs" => offset_of!(BlkifRequestIndirect, indirect_grefs),

        "sizeof.blkif_response" => size_of::<BlkifResponse>(),
        "offsetof.blkif_response.id" => offset_of!(BlkifResponse, id),
        "offsetof.blkif_response.operation" => offset_of!(BlkifResponse, operation),
        "offsetof.blkif_response.status" => offset_of!(BlkifResponse, status),

        "sizeof.netif_tx_request" => size_of::<NetifTxRequest>(),
        "offsetof.netif_tx_request.gref" => offset_of!(NetifTxRequest, gref),
        "offsetof.netif_tx_request.offset" => offset_of!(NetifTxRequest, offset),
        "offsetof.netif_tx_request.flags" => offset_of!(NetifTxRequest, flags),
        "offsetof.netif_tx_request.id" => offset_of!(NetifTxRequest, id),
        "offsetof.netif_tx_request.size" => offset_of!(NetifTxRequest, size),

        "sizeof.netif_tx_response" => size_of::<NetifTxResponse>(),
        "offsetof.netif_tx_response.id" => offset_of!(NetifTxResponse, id),
        "offsetof.netif_tx_response.status" => offset_of!(NetifTxResponse, status),

        "sizeof.netif_rx_request" => size_of::<NetifRxRequest>(),
        "offsetof.netif_rx_request.id" => offset_of!(NetifRxRequest, id),
        "offsetof.netif_rx_request.pad" => offset_of!(NetifRxRequest, pad),
        "offsetof.netif_rx_request.gref" => offset_of!(NetifRxRequest, gref),

        "sizeof.netif_rx_response" => size_of::<NetifRxResponse>(),
        "offsetof.netif_rx_response.id" => offset_of!(NetifRxResponse, id),
        "offsetof.netif_rx_response.offset" => offset_of!(NetifRxResponse, offset),
        "offsetof.netif_rx_response.flags" => offset_of!(NetifRxResponse, flags),
        "offsetof.netif_rx_response.status" => offset_of!(NetifRxResponse, status),

        "sizeof.netif_extra_info" => size_of::<NetifExtraInfo>(),
        "offsetof.netif_extra_info.type" => offset_of!(NetifExtraInfo, type_),
        "offsetof.netif_extra_info.flags" => offset_of!(NetifExtraInfo, flags),
        "offsetof.netif_extra_info.u" => offset_of!(NetifExtraInfo, u),
        "offsetof.netif_extra_info.u.gso.size" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraGso, size),
        "offsetof.netif_extra_info.u.gso.type" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraGso, type_),
        "offsetof.netif_extra_info.u.gso.pad" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraGso, pad),
        "offsetof.netif_extra_info.u.gso.features" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraGso, features),
        "offsetof.netif_extra_info.u.mcast.addr" => mcast_addr_offset(),
        "offsetof.netif_extra_info.u.hash.type" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraHash, type_),
        "offsetof.netif_extra_info.u.hash.algorithm" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraHash, algorithm),
        "offsetof.netif_extra_info.u.hash.value" => NETIF_EXTRA_UNION_OFFSET + offset_of!(NetifExtraHash, value),
        "sizeof.netif_extra_info.u" => size_of::<NetifExtraInfo>() - offset_of!(NetifExtraInfo, u),
        "alignof.netif_extra_info" => std::mem::align_of::<NetifExtraInfo>(),

        "sizeof.netif_tx_sring_entry" => NetifTx::ENTRY_SIZE,
        "sizeof.netif_rx_sring_entry" => NetifRx::ENTRY_SIZE,
        "offsetof.netif_tx_sring.ring" => SRING_HEADER_SIZE,
        "offsetof.netif_rx_sring.ring" => SRING_HEADER_SIZE,

        "sizeof.grant_entry_v1" => size_of::<GrantEntryV1>(),
        "offsetof.grant_entry_v1.flags" => offset_of!(GrantEntryV1, flags),
        "offsetof.grant_entry_v1.domid" => offset_of!(GrantEntryV1, domid),
        "offsetof.grant_entry_v1.frame" => offset_of!(GrantEntryV1, frame),
        "sizeof.grant_ref_t" => size_of::<GrantRef>(),
        "sizeof.domid_t" => size_of::<DomId>(),

        "const.BLKIF_OP_READ" => BLKIF_OP_READ,
        "const.BLKIF_OP_WRITE" => BLKIF_OP_WRITE,
        "const.BLKIF_OP_WRITE_BARRIER" => BLKIF_OP_WRITE_BARRIER,
        "const.BLKIF_OP_FLUSH_DISKCACHE" => BLKIF_OP_FLUSH_DISKCACHE,
        "const.BLKIF_OP_RESERVED_1" => BLKIF_OP_RESERVED_1,
        "const.BLKIF_OP_DISCARD" => BLKIF_OP_DISCARD,
        "const.BLKIF_OP_INDIRECT" => BLKIF_OP_INDIRECT,
        "const.BLKIF_RSP_EOPNOTSUPP" => BLKIF_RSP_EOPNOTSUPP,
        "const.BLKIF_RSP_ERROR" => BLKIF_RSP_ERROR,
        "const.BLKIF_RSP_OKAY" => BLKIF_RSP_OKAY,
        "const.BLKIF_MAX_SEGMENTS_PER_REQUEST" => BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "const.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST" => BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        "const.BLKIF_DISCARD_SECURE" => BLKIF_DISCARD_SECURE,

        "const.NETTXF_csum_blank" => NETTXF_CSUM_BLANK,
        "const.NETTXF_data_validated" => NETTXF_DATA_VALIDATED,
        "const.NETTXF_more_data" => NETTXF_MORE_DATA,
        "const.NETTXF_extra_info" => NETTXF_EXTRA_INFO,
        "const.NETRXF_data_validated" => NETRXF_DATA_VALIDATED,
        "const.NETRXF_csum_blank" => NETRXF_CSUM_BLANK,
        "const.NETRXF_more_data" => NETRXF_MORE_DATA,
        "const.NETRXF_extra_info" => NETRXF_EXTRA_INFO,
        "const.NETRXF_gso_prefix" => NETRXF_GSO_PREFIX,
        "const.XEN_NETIF_EXTRA_TYPE_NONE" => XEN_NETIF_EXTRA_TYPE_NONE,
        "const.XEN_NETIF_EXTRA_TYPE_GSO" => XEN_NETIF_EXTRA_TYPE_GSO,
        "const.XEN_NETIF_EXTRA_TYPE_MCAST_ADD" => XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
        "const.XEN_NETIF_EXTRA_TYPE_MCAST_DEL" => XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
        "const.XEN_NETIF_EXTRA_TYPE_HASH" => XEN_NETIF_EXTRA_TYPE_HASH,
        "const.XEN_NETIF_EXTRA_TYPE_MAX" => XEN_NETIF_EXTRA_TYPE_MAX,
        "const.XEN_NETIF_EXTRA_FLAG_MORE" => XEN_NETIF_EXTRA_FLAG_MORE,
        "const.XEN_NETIF_GSO_TYPE_NONE" => XEN_NETIF_GSO_TYPE_NONE,
        "const.XEN_NETIF_GSO_TYPE_TCPV4" => XEN_NETIF_GSO_TYPE_TCPV4,
        "const.XEN_NETIF_GSO_TYPE_TCPV6" => XEN_NETIF_GSO_TYPE_TCPV6,
        "const.XEN_NETIF_NR_SLOTS_MIN" => XEN_NETIF_NR_SLOTS_MIN,
        "const.XEN_NETIF_MAX_TX_SIZE" => XEN_NETIF_MAX_TX_SIZE,
        "const.NETIF_RSP_DROPPED" => NETIF_RSP_DROPPED,
        "const.NETIF_RSP_ERROR" => NETIF_RSP_ERROR,
        "const.NETIF_RSP_OKAY" => NETIF_RSP_OKAY,
        "const.NETIF_RSP_NULL" => NETIF_RSP_NULL,

        "const.GTF_permit_access" => GTF_PERMIT_ACCESS,
        "const.GTF_readonly" => GTF_READONLY,
        "const.GTF_type_mask" => GTF_TYPE_MASK,
        "const.GTF_reading" => GTF_READING,
        "const.GTF_writing" => GTF_WRITING,
        "const.GTF_PWT" => GTF_PWT,
        "const.GTF_PCD" => GTF_PCD,
        "const.GTF_PAT" => GTF_PAT,
        "const.GTF_sub_page" => GTF_SUB_PAGE,

        "ring_size.blkif.4096" => ring_size(1, Blkif::ENTRY_SIZE),
        "ring_size.blkif.8192" => ring_size(2, Blkif::ENTRY_SIZE),
        "ring_size.blkif.28672" => ring_size(7, Blkif::ENTRY_SIZE),
        "ring_size.blkif.65536" => ring_size(16, Blkif::ENTRY_SIZE),
        "ring_size.netif_tx.4096" => NET_TX_RING_SIZE,
        "ring_size.netif_rx.4096" => NET_RX_RING_SIZE,
    }
}

#[test]
fn layout_and_constants_match_the_xen_headers() {
    let reference = build_reference("layout");
    let out = Command::new(&reference.bin)
        .arg("layout")
        .output()
        .expect("run the C layout dump");
    assert!(
        out.status.success(),
        "C layout dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 layout dump");
    let mut c: BTreeMap<&str, i64> = BTreeMap::new();
    for line in stdout.lines() {
        let (name, value) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(c.insert(name, value).is_none(), "{name} printed twice");
    }

    let written = sring_layout_written_by_the_crate();
    let rust = rust_layout(&written);
    let mut mismatches = Vec::new();
    for (name, value) in &rust {
        match c.get(name) {
            None => mismatches.push(format!("{name}: not printed by the C side")),
            Some(cv) if cv != value => {
                mismatches.push(format!("{name}: Xen headers say {cv}, crate has {value}"))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::BTreeSet<&str> = rust.iter().map(|(n, _)| *n).collect();
    for name in c.keys().filter(|n| !known.contains(*n)) {
        mismatches.push(format!("{name}: printed by the C side but not checked"));
    }
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n  {}",
        mismatches.join("\n  ")
    );

    // Where the crate really puts entries, not only what its constants say.
    assert_eq!(
        i64::try_from(written.ring).unwrap(),
        c["offsetof.blkif_sring.ring"],
        "first ring entry as written by FrontRing"
    );
    assert_eq!(
        i64::try_from(written.entry).unwrap(),
        c["sizeof.blkif_sring_entry"],
        "ring entry stride as written by FrontRing"
    );
}

// ------------------------------------------------------------ round trips

/// Rounds per ring: enough for the free-running indices to lap the ring
/// several times.
const ROUNDS: u32 = 14;

/// The two batches a producer pushes in round `r` of a ring of `size`
/// entries: each at least one entry, together at most a full ring (round 2
/// fills it exactly).
fn batches(r: u32, size: u32) -> [u32; 2] {
    if r == 2 {
        return [size - 1, 1];
    }
    let half = size / 2;
    [1 + (r * 7) % half, 1 + (r * 11 + 3) % half]
}

/// Rounds whose consumer drains and re-arms between the producer's two
/// pushes, so the second push must notify too.
fn drains_requests_between_pushes(r: u32) -> bool {
    r % 4 == 3
}
fn drains_responses_between_pushes(r: u32) -> bool {
    r % 4 == 1
}
/// Rounds whose consumer re-arms its event index when done; after the
/// others the next round's first push must not notify.
fn rearms_requests(r: u32) -> bool {
    r % 3 != 1
}
fn rearms_responses(r: u32) -> bool {
    r % 3 != 2
}

fn frame_offsets(frames: &[u32]) -> Vec<u64> {
    frames
        .iter()
        .map(|&f| u64::from(f) * PAGE_SIZE as u64)
        .collect()
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// A C frontend (`SHARED_RING_INIT`, `FRONT_RING_INIT`, `RING_GET_REQUEST`,
/// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`, `RING_GET_RESPONSE`,
/// `RING_FINAL_CHECK_FOR_RESPONSES`) against the crate's `BackRing`.
fn c_frontend_rust_backend(reference: &Reference, frames: &[u32]) {
    let region = Arc::new(SharedRegion::create("xen-abi-front", 8).unwrap());
    let (mut c, c_size) = Peer::spawn(reference, "front", &region, frames);
    // Attached after the C side's SHARED_RING_INIT, like a backend on connect.
    let pages = RingPages::new(region.clone(), frame_offsets(frames)).unwrap();
    let mut back = BackRing::<Blkif>::attach(pages).unwrap();
    let size = back.size();
    assert_eq!(size, c_size, "RING_SIZE of a {}-page ring", frames.len());

    let (mut produced, mut consumed, mut uncollected) = (0u32, 0u32, 0u32);
    let mut unanswered = VecDeque::new();
    // SHARED_RING_INIT leaves both event indices at 1: the first push notifies.
    let (mut req_armed, mut rsp_armed) = (true, true);
    let mut consume_all =
        |back: &mut BackRing<Blkif>, produced: u32, unanswered: &mut VecDeque<u32>| {
            let n = back.unconsumed_requests().unwrap();
            assert_eq!(
                n,
                produced - consumed,
                "unconsumed_requests after {consumed} consumed"
            );
            for _ in 0..n {
                let (idx, req) = back.take_request().unwrap();
                assert_eq!(idx, consumed, "slot index");
                check_request(consumed, &req);
                unanswered.push_back(consumed);
                consumed += 1;
            }
        };

    for r in 0..ROUNDS {
        for (i, k) in batches(r, size).into_iter().enumerate() {
            let [req_prod, notify] = c.call(&format!("push {k}"), "pushed");
            produced += k;
            assert_eq!(req_prod, produced, "round {r}: req_prod");
            assert_eq!(
                notify == 1,
                req_armed,
                "round {r} push {i}: C notify against the req_event the crate left"
            );
            req_armed = false;
            if i == 0 && drains_requests_between_pushes(r) {
                consume_all(&mut back, produced, &mut unanswered);
                assert!(!back.final_check_for_requests().unwrap());
                req_armed = true;
            }
        }
        consume_all(&mut back, produced, &mut unanswered);
        if rearms_requests(r) {
            assert!(!back.final_check_for_requests().unwrap());
            req_armed = true;
        }

        let n = u32::try_from(unanswered.len()).unwrap();
        for (i, j) in [n / 2, n - n / 2].into_iter().enumerate() {
            for _ in 0..j {
                let s = unanswered.pop_front().unwrap();
                back.put_response(&expected_response(s)).unwrap();
            }
            let notify = back.push_responses().unwrap();
            let [c_notify] = c.call("rsp_pushed", "notify");
            assert_eq!(
                notify,
                c_notify == 1,
                "round {r} push {i}: push_responses against RING_PUSH_RESPONSES_AND_CHECK_NOTIFY"
            );
            assert_eq!(
                notify, rsp_armed,
                "round {r} push {i}: push_responses notify"
            );
            rsp_armed = false;
            uncollected += j;
            if i == 0 && drains_responses_between_pushes(r) {
                let [got] = c.call("collect 1", "collected");
                assert_eq!(got, uncollected, "round {r}: responses the C side saw");
                uncollected = 0;
                rsp_armed = true;
            }
        }
        let arm = rearms_responses(r);
        let [got] = c.call(&format!("collect {}", flag(arm)), "collected");
        assert_eq!(got, uncollected, "round {r}: responses the C side saw");
        uncollected = 0;
        rsp_armed = arm;
    }

    assert!(
        produced > 4 * size,
        "indices must lap the ring: {produced} requests, size {size}"
    );
    assert_eq!((back.req_cons(), back.rsp_prod_pvt()), (produced, produced));
    assert_eq!(back.shared_rsp_prod().unwrap(), produced);
    let [req_prod_pvt, rsp_cons] = c.quit();
    assert_eq!(
        (req_prod_pvt, rsp_cons),
        (produced, produced),
        "C front's private indices"
    );
}

/// The crate's `FrontRing` (requests built with `from_discard` and
/// `from_indirect` among plain ones) against a C backend (`BACK_RING_INIT`,
/// `RING_COPY_REQUEST`, `RING_FINAL_CHECK_FOR_REQUESTS`,
/// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
fn rust_frontend_c_backend(reference: &Reference, frames: &[u32]) {
    let region = Arc::new(SharedRegion::create("xen-abi-back", 8).unwrap());
    let pages = RingPages::new(region.clone(), frame_offsets(frames)).unwrap();
    let mut front = FrontRing::<Blkif>::init(pages).unwrap();
    let (mut c, c_size) = Peer::spawn(reference, "back", &region, frames);
    let size = front.size();
    assert_eq!(size, c_size, "RING_SIZE of a {}-page ring", frames.len());

    let (mut produced, mut answered) = (0u32, 0u32);
    // FrontRing::init leaves both event indices at 1: the first push notifies.
    let (mut req_armed, mut rsp_armed) = (true, true);
    for r in 0..ROUNDS {
        let mut unconsumed = 0;
        for (i, k) in batches(r, size).into_iter().enumerate() {
            for _ in 0..k {
                let idx = front.put_request(&expected_request(produced)).unwrap();
                assert_eq!(idx, produced, "slot index");
                produced += 1;
            }
            let notify = front.push_requests().unwrap();
            let [c_notify] = c.call("req_pushed", "notify");
            assert_eq!(
                notify,
                c_notify == 1,
                "round {r} push {i}: push_requests against RING_PUSH_REQUESTS_AND_CHECK_NOTIFY"
            );
            assert_eq!(
                notify, req_armed,
                "round {r} push {i}: push_requests notify"
            );
            req_armed = false;
            unconsumed += k;
            if i == 0 && drains_requests_between_pushes(r) {
                let [n] = c.call("consume 1", "consumed");
                assert_eq!(n, unconsumed, "round {r}: requests the C side saw");
                unconsumed = 0;
                req_armed = true;
            }
        }
        let arm = rearms_requests(r);
        let [n] = c.call(&format!("consume {}", flag(arm)), "consumed");
        assert_eq!(n, unconsumed, "round {r}: requests the C side saw");
        req_armed = arm;

        let n = produced - answered;
        for (i, j) in [n / 2, n - n / 2].into_iter().enumerate() {
            let [rsp_prod, notify] = c.call(&format!("respond {j}"), "pushed");
            assert_eq!(rsp_prod, answered + j, "round {r}: rsp_prod");
            assert_eq!(
                notify == 1,
                rsp_armed,
                "round {r} push {i}: C notify against the rsp_event the crate left"
            );
            rsp_armed = false;
            assert_eq!(front.unconsumed_responses().unwrap(), j);
            for _ in 0..j {
                let rsp = front
                    .take_response()
                    .unwrap()
                    .expect("a published response");
                assert_eq!(rsp, expected_response(answered), "response {answered}");
                answered += 1;
            }
            assert_eq!(front.take_response().unwrap(), None);
            if i == 0 && drains_responses_between_pushes(r) {
                assert!(!front.final_check_for_responses().unwrap());
                rsp_armed = true;
            }
        }
        if rearms_responses(r) {
            assert!(!front.final_check_for_responses().unwrap());
            rsp_armed = true;
        }
        assert_eq!(front.free_requests(), size);
    }

    assert!(
        produced > 4 * size,
        "indices must lap the ring: {produced} requests, size {size}"
    );
    assert_eq!(front.req_prod_pvt(), produced);
    let [req_cons, rsp_prod_pvt] = c.quit();
    assert_eq!(
        (req_cons, rsp_prod_pvt),
        (produced, produced),
        "C back's private indices"
    );
}

#[test]
fn c_frontend_to_rust_backend() {
    let reference = build_reference("front");
    // Order 0 on frame 1, then an order-1 ring.
    c_frontend_rust_backend(&reference, &[1]);
    c_frontend_rust_backend(&reference, &[2, 3]);
}

#[test]
fn rust_frontend_to_c_backend() {
    let reference = build_reference("back");
    rust_frontend_c_backend(&reference, &[1]);
    // Scattered, descending frames: entries straddle a page boundary that is
    // not one in the memfd (the C side maps the frames side by side).
    rust_frontend_c_backend(&reference, &[6, 3]);
}

// ------------------------------------------------------ netif round trip

// Netif test data, written identically in the C source (`make_tx_request`,
// `make_tx_response`, `make_rx_request`, `make_rx_response`).

fn tx_is_extra(s: u32) -> bool {
    s % 7 == 1
}

fn rx_is_extra(r: u32) -> bool {
    r % 5 == 1
}

fn gso_extra(s: u32) -> NetifExtraInfo {
    NetifExtraInfo::from_gso(
        if s % 2 == 1 {
            XEN_NETIF_EXTRA_FLAG_MORE
        } else {
            0
        },
        &NetifExtraGso {
            size: (1000 + s % 500) as u16,
            type_: if !s.is_multiple_of(3) {
                XEN_NETIF_GSO_TYPE_TCPV4
            } else {
                XEN_NETIF_GSO_TYPE_TCPV6
            },
            pad: 0,
            features: (s % 4) as u16,
        },
    )
}

fn expected_tx_request(s: u32) -> NetifTxRequest {
    if tx_is_extra(s) {
        return NetifTxRequest::from_extra(&gso_extra(s));
    }
    let mut flags = 0;
    if s.is_multiple_of(7) {
        flags |= NETTXF_EXTRA_INFO;
    }
    if s.is_multiple_of(3) {
        flags |= NETTXF_MORE_DATA;
    }
    if s % 2 == 1 {
        flags |= NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED;
    }
    NetifTxRequest {
        gref: 0x7000_0000 | s,
        offset: ((s * 64) % PAGE_SIZE as u32) as u16,
        flags,
        id: s.wrapping_mul(3) as u16,
        size: (14 + s % 1500) as u16,
    }
}

fn expected_tx_response(s: u32) -> NetifTxResponse {
    if tx_is_extra(s) {
        return NetifTxResponse {
            id: 0,
            status: NETIF_RSP_NULL,
        };
    }
    NetifTxResponse {
        id: expected_tx_request(s).id,
        status: match s % 4 {
            1 => NETIF_RSP_ERROR,
            2 => NETIF_RSP_DROPPED,
            _ => NETIF_RSP_OKAY,
        },
    }
}

fn expected_rx_request(r: u32) -> NetifRxRequest {
    NetifRxRequest {
        id: (r * 5 + 1) as u16,
        pad: 0,
        gref: 0x6000_0000 | r,
    }
}

fn expected_rx_response(r: u32) -> NetifRxResponse {
    if rx_is_extra(r) {
        return NetifRxResponse::from_extra(&gso_extra(r));
    }
    let mut flags = 0;
    if r.is_multiple_of(3) {
        flags |= NETRXF_MORE_DATA;
    }
    if r.is_multiple_of(5) {
        flags |= NETRXF_EXTRA_INFO | NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED;
    }
    NetifRxResponse {
        id: (r * 5 + 1) as u16,
        offset: ((r * 16) % PAGE_SIZE as u32) as u16,
        flags,
        status: (1 + r % PAGE_SIZE as u32) as i16,
    }
}

/// Consumes what the C side pushed on one ring with the crate's
/// `BackRing`, checks each request, answers each, and lets the C side
/// collect and check the answers.
fn netif_round<P: RingProtocol>(
    c: &mut Peer,
    back: &mut BackRing<P>,
    ring: &str,
    k: u32,
    seq: &mut u32,
    expected_request: impl Fn(u32) -> P::Request,
    expected_response: impl Fn(u32) -> P::Response,
) where
    P::Request: PartialEq + std::fmt::Debug,
{
    let [req_prod, _notify] = c.call(&format!("{ring} {k}"), "pushed");
    assert_eq!(req_prod, *seq + k, "{ring} req_prod");
    assert_eq!(back.unconsumed_requests().unwrap(), k, "{ring} unconsumed");
    for _ in 0..k {
        let (idx, req) = back.take_request().unwrap();
        assert_eq!(idx, *seq, "{ring} slot index");
        assert_eq!(req, expected_request(*seq), "{ring} request {seq}");
        // The response goes to the slot of its request (netif.h's rule).
        let at = back.put_response(&expected_response(*seq)).unwrap();
        assert_eq!(at, idx, "{ring} response slot");
        *seq += 1;
    }
    back.push_responses().unwrap();
    let [got] = c.call(&format!("{ring}_collect"), "collected");
    assert_eq!(got, k, "{ring} responses the C side saw");
}

/// A C netfront (`SHARED_RING_INIT`, `FRONT_RING_INIT`, `RING_GET_REQUEST`,
/// `RING_GET_RESPONSE` on `netif_tx`/`netif_rx` rings, extra-info slots
/// through `netif_extra_info_t`) against the crate's two `BackRing`s.
#[test]
fn c_netfront_to_rust_netback() {
    let reference = build_reference("netfront");
    let region = Arc::new(SharedRegion::create("xen-abi-netfront", 8).unwrap());
    let frames = [5, 2];
    let (mut c, tx_size) = Peer::spawn(&reference, "netfront", &region, &frames);
    let [c_tx, c_rx] = c.call("sizes", "sizes");
    assert_eq!(tx_size, c_tx);
    let tx_pages = RingPages::new(region.clone(), frame_offsets(&frames[..1])).unwrap();
    let rx_pages = RingPages::new(region.clone(), frame_offsets(&frames[1..])).unwrap();
    let mut tx = BackRing::<NetifTx>::attach(tx_pages).unwrap();
    let mut rx = BackRing::<NetifRx>::attach(rx_pages).unwrap();
    assert_eq!(
        (tx.size(), rx.size()),
        (c_tx, c_rx),
        "RING_SIZE of netif_tx, netif_rx"
    );

    let (mut tx_seq, mut rx_seq) = (0u32, 0u32);
    for r in 0..ROUNDS {
        for k in batches(r, tx.size()) {
            netif_round(
                &mut c,
                &mut tx,
                "tx",
                k,
                &mut tx_seq,
                expected_tx_request,
                expected_tx_response,
            );
        }
        for k in batches(r + 5, rx.size()) {
            netif_round(
                &mut c,
                &mut rx,
                "rx",
                k,
                &mut rx_seq,
                expected_rx_request,
                expected_rx_response,
            );
        }
    }
    assert!(
        tx_seq > 4 * tx.size() && rx_seq > 4 * rx.size(),
        "indices must lap the rings"
    );
    let bye: [u32; 4] = c.quit();
    assert_eq!(
        bye,
        [tx_seq, tx_seq, rx_seq, rx_seq],
        "C netfront's private indices"
    );
}
