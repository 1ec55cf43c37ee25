//! Guests that attach wrongly, through raw control-socket clients against the
//! real supervisor and `shadowback blkback` processes (PROTOCOL.md §1–4).
//!
//! Each must get one `error` with the right `code`, then EOF; none may
//! disturb the supervisor, the backends or a well-behaved guest attaching
//! afterwards.
#![deny(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_ring::blkif::{
    BlkifRequest, BlkifRequestSegment, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY,
};
use shadowback_ring::grant::{GTF_PERMIT_ACCESS, GTF_SUB_PAGE};
use shadowback_testsupport::blockio::*;
use shadowback_testsupport::fd::{add_seals, eventfd, nonblocking_eventfd, sealable_memfd};
use shadowback_testsupport::harness::*;
use shadowback_testsupport::process::*;
use shadowback_testsupport::raw_guest::*;
use shadowback_xenbus::{kind, ErrorCode, Message, SeqPacket};

const PAGE: u64 = 4096;
const BACKEND_ID: u16 = 5;

/// What a case may use.
struct Ctx<'a> {
    /// A disk with `max-ring-page-order` 4.
    main: &'a str,
    /// A disk with `max-ring-page-order` 1.
    small: &'a str,
    dir: &'a Path,
}

type SendFn = Box<dyn Fn(&SeqPacket, &Ctx<'_>)>;

struct Case {
    name: &'static str,
    code: ErrorCode,
    send: SendFn,
}

fn case(
    name: &'static str,
    code: ErrorCode,
    send: impl Fn(&SeqPacket, &Ctx<'_>) + 'static,
) -> Case {
    Case {
        name,
        code,
        send: Box::new(send),
    }
}

fn must_send(sock: &SeqPacket, payload: &[u8], fds: &[RawFd]) {
    send_raw(sock, payload, fds).expect("sendmsg");
}

/// A valid `connect` for `device` with `keys` edited: `(key, Some(v))`
/// sets, `(key, None)` removes.
fn connect_with(device: &str, edits: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut keys = connect_keys(device);
    for (k, v) in edits {
        keys.retain(|(key, _)| key != k);
        if let Some(v) = v {
            keys.push((k.to_string(), v.to_string()));
        }
    }
    encode_text(kind::CONNECT, &keys)
}

/// Sends `connect` for a fresh, valid [`RawRegion`] with edited keys.
fn connect_edited(sock: &SeqPacket, device: &str, edits: &[(&str, Option<&str>)]) {
    let mem = RawRegion::new(BACKEND_ID);
    must_send(sock, &connect_with(device, edits), &mem.fds());
}

/// A memfd of `bytes` with the ring grant written through the file,
/// `seals` applied (when it allows sealing).
fn memfd(bytes: u64, allow_sealing: bool, seals: SealFlag) -> File {
    let file = sealable_memfd(bytes, allow_sealing);
    write_grant_via_file(&file, RAW_RING_REF, 1, BACKEND_ID, RAW_RING_FRAME);
    add_seals(&file, seals);
    file
}

/// Sends a valid `connect` text for `device` with `region` as descriptor 0
/// and fresh eventfds.
fn connect_region(sock: &SeqPacket, device: &str, region: RawFd) {
    let (kick, notify) = (nonblocking_eventfd(), nonblocking_eventfd());
    must_send(
        sock,
        &encode_text(kind::CONNECT, &connect_keys(device)),
        &[region, kick.as_fd().as_raw_fd(), notify.as_fd().as_raw_fd()],
    );
}

fn cases() -> Vec<Case> {
    use ErrorCode::*;
    vec![
        // Devices.
        case("probe of an unknown device", Enoent, |s, _| {
            s.send(&Message::probe("no-such-disk"), &[]).expect("send");
        }),
        case("connect to an unknown device", Enoent, |s, _| {
            connect_edited(s, "no-such-disk", &[])
        }),
        // Descriptor counts.
        case("connect with 0 fds", Einval, |s, c| {
            must_send(s, &connect_with(c.main, &[]), &[]);
        }),
        case("connect with 2 fds", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            must_send(s, &connect_with(c.main, &[]), &mem.fds()[..2]);
        }),
        case("connect with 4 fds", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            let extra = nonblocking_eventfd();
            let [a, b, d] = mem.fds();
            must_send(
                s,
                &connect_with(c.main, &[]),
                &[a, b, d, extra.as_fd().as_raw_fd()],
            );
        }),
        case("connect with 9 fds (> MAX_FDS)", Einval, |s, c| {
            let fds: Vec<OwnedFd> = (0..9).map(|_| nonblocking_eventfd()).collect();
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
            must_send(s, &connect_with(c.main, &[]), &raw);
        }),
        case("probe carrying an fd", Einval, |s, c| {
            let fd = nonblocking_eventfd();
            must_send(
                s,
                &encode_text(kind::PROBE, &[("device".into(), c.main.into())]),
                &[fd.as_fd().as_raw_fd()],
            );
        }),
        // Descriptor kinds.
        case("region is a regular file, not a memfd", Einval, |s, c| {
            let path = c.dir.join("not-a-memfd");
            let file = File::create(&path).expect("file");
            file.set_len(u64::from(RAW_PAGES) * PAGE).expect("size");
            write_grant_via_file(&file, RAW_RING_REF, 1, BACKEND_ID, RAW_RING_FRAME);
            connect_region(s, c.main, file.as_raw_fd());
        }),
        case("region is an eventfd", Einval, |s, c| {
            let fd = nonblocking_eventfd();
            connect_region(s, c.main, fd.as_fd().as_raw_fd());
        }),
        case("kick and notify are pipes, not eventfds", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
            let region = mem.region.file().as_raw_fd();
            must_send(
                s,
                &connect_with(c.main, &[]),
                &[region, r.as_raw_fd(), w.as_raw_fd()],
            );
        }),
        case("kick is a memfd, not an eventfd", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            let other = memfd(PAGE, false, SealFlag::empty());
            let [region, _, notify] = mem.fds();
            must_send(
                s,
                &connect_with(c.main, &[]),
                &[region, other.as_raw_fd(), notify],
            );
        }),
        // Region seals and sizes.
        case("unsealed memfd (no MFD_ALLOW_SEALING)", Einval, |s, c| {
            let file = memfd(u64::from(RAW_PAGES) * PAGE, false, SealFlag::empty());
            connect_region(s, c.main, file.as_raw_fd());
        }),
        case(
            "memfd sealed against growing only, not shrinking",
            Einval,
            |s, c| {
                let file = memfd(u64::from(RAW_PAGES) * PAGE, true, SealFlag::F_SEAL_GROW);
                connect_region(s, c.main, file.as_raw_fd());
            },
        ),
        case("memfd sealed against writes", Einval, |s, c| {
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_WRITE;
            let file = memfd(u64::from(RAW_PAGES) * PAGE, true, seals);
            connect_region(s, c.main, file.as_raw_fd());
        }),
        case("region size not a multiple of 4096", Einval, |s, c| {
            let file = memfd(
                u64::from(RAW_PAGES) * PAGE + 100,
                true,
                SealFlag::F_SEAL_SHRINK,
            );
            connect_region(s, c.main, file.as_raw_fd());
        }),
        case("region of only the grant table", Einval, |s, c| {
            let file = memfd(PAGE, true, SealFlag::F_SEAL_SHRINK);
            connect_region(s, c.main, file.as_raw_fd());
        }),
        case(
            "region larger than the supervisor accepts (4 GiB + 4 KiB)",
            E2big,
            |s, c| {
                let file = memfd((1 << 32) + PAGE, true, SealFlag::F_SEAL_SHRINK);
                connect_region(s, c.main, file.as_raw_fd());
            },
        ),
        // Keys.
        case("missing device", Einval, |s, c| {
            connect_edited(s, c.main, &[("device", None)])
        }),
        case("missing ring-ref", Einval, |s, c| {
            connect_edited(s, c.main, &[("ring-ref", None)])
        }),
        case("missing grant-frames", Einval, |s, c| {
            connect_edited(s, c.main, &[("grant-frames", None)])
        }),
        case("missing protocol", Einval, |s, c| {
            connect_edited(s, c.main, &[("protocol", None)])
        }),
        case("ring-page-order 9", Einval, |s, c| {
            connect_edited(s, c.main, &[("ring-page-order", Some("9"))]);
        }),
        case(
            "ring-page-order 2 above max-ring-page-order 1",
            E2big,
            |s, c| {
                let edits = [
                    ("ring-page-order", Some("2")),
                    ("ring-ref", None),
                    ("ring-ref0", Some("8")),
                    ("ring-ref1", Some("9")),
                    ("ring-ref2", Some("10")),
                    ("ring-ref3", Some("11")),
                ];
                connect_edited(s, c.small, &edits);
            },
        ),
        case("ring-ref with ring-page-order 1", Einval, |s, c| {
            connect_edited(
                s,
                c.main,
                &[("ring-page-order", Some("1")), ("ring-ref0", Some("8"))],
            );
        }),
        case("non-numeric grant-frames", Einval, |s, c| {
            connect_edited(s, c.main, &[("grant-frames", Some("two"))]);
        }),
        case("grant-frames 0", Einval, |s, c| {
            connect_edited(s, c.main, &[("grant-frames", Some("0"))])
        }),
        case("ring-ref beyond the grant table", Einval, |s, c| {
            connect_edited(s, c.main, &[("ring-ref", Some("512"))]);
        }),
        case("negative frontend-id", Einval, |s, c| {
            connect_edited(s, c.main, &[("frontend-id", Some("-1"))]);
        }),
        case("protocol x86_32-abi", Einval, |s, c| {
            connect_edited(s, c.main, &[("protocol", Some("x86_32-abi"))]);
        }),
        // Ring grant.
        case("ring-ref granted to another domid", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            mem.grants
                .grant(RAW_RING_REF, BACKEND_ID + 1, RAW_RING_FRAME, false)
                .expect("grant");
            must_send(s, &connect_with(c.main, &[]), &mem.fds());
        }),
        case("ring-ref revoked", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            mem.grants.end_access(RAW_RING_REF).expect("end_access");
            must_send(s, &connect_with(c.main, &[]), &mem.fds());
        }),
        case("ring-ref granted read-only", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            mem.grants
                .grant(RAW_RING_REF, BACKEND_ID, RAW_RING_FRAME, true)
                .expect("grant");
            must_send(s, &connect_with(c.main, &[]), &mem.fds());
        }),
        case("ring-ref granted sub-page", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            mem.region
                .store(
                    GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
                    u64::from(RAW_RING_REF) * 8,
                    Ordering::Release,
                )
                .expect("flags");
            must_send(s, &connect_with(c.main, &[]), &mem.fds());
        }),
        case(
            "ring-ref naming a frame outside the region",
            Einval,
            |s, c| {
                let mem = RawRegion::new(BACKEND_ID);
                mem.grants
                    .grant(RAW_RING_REF, BACKEND_ID, RAW_PAGES + 3, false)
                    .expect("grant");
                must_send(s, &connect_with(c.main, &[]), &mem.fds());
            },
        ),
        // Datagrams.
        case("oversize datagram (> 4096 bytes)", Einval, |s, c| {
            let mut keys = vec![("device".to_string(), c.main.to_string())];
            keys.extend((0..20).map(|i| (format!("pad{i}"), "x".repeat(250))));
            let payload = encode_text(kind::PROBE, &keys);
            assert!(payload.len() > 4096);
            must_send(s, &payload, &[]);
        }),
        case("oversize connect carrying its 3 fds", Einval, |s, c| {
            let mem = RawRegion::new(BACKEND_ID);
            let mut keys = connect_keys(c.main);
            keys.extend((0..20).map(|i| (format!("pad{i}"), "x".repeat(250))));
            must_send(s, &encode_text(kind::CONNECT, &keys), &mem.fds());
        }),
        case("garbage bytes", Einval, |s, _| {
            must_send(s, &[0xff, 0x00, 0x13, 0x37, 0x80, 0x0a], &[])
        }),
        case("non-UTF-8 device name", Einval, |s, _| {
            must_send(s, b"probe\ndevice=disk\xff\xfe\n", &[])
        }),
        case("unknown kind", Einval, |s, _| {
            must_send(s, b"hello\ndevice=x\n", &[])
        }),
        case("empty line", Einval, |s, c| {
            must_send(s, format!("probe\n\ndevice={}\n", c.main).as_bytes(), &[])
        }),
        case("duplicate key", Einval, |s, c| {
            must_send(
                s,
                format!("probe\ndevice={0}\ndevice={0}\n", c.main).as_bytes(),
                &[],
            );
        }),
        case("carriage return in a value", Einval, |s, c| {
            must_send(s, format!("probe\r\ndevice={}\r\n", c.main).as_bytes(), &[]);
        }),
        // Sequence.
        case("close before connect", Eproto, |s, _| {
            s.send(&Message::new(kind::CLOSE), &[]).expect("send")
        }),
        case("frontend sends backend", Eproto, |s, _| {
            s.send(&Message::new(kind::BACKEND).with("state", 2), &[])
                .expect("send");
        }),
    ]
}

#[test]
fn wrong_attaches_get_an_error_and_the_supervisor_keeps_serving() {
    let main = unique_name("ae-main");
    let small = unique_name("ae-small");
    let h = Harness::start(
        "attach-errors",
        &[
            DiskSpec::new(&main, 16).backend_id(BACKEND_ID),
            DiskSpec::new(&small, 16)
                .backend_id(BACKEND_ID)
                .max_ring_page_order(1),
        ],
    );
    let pids = (backend_pid(&main), backend_pid(&small));
    let ctx = Ctx {
        main: &main,
        small: &small,
        dir: h.dir(),
    };
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let sock = SeqPacket::connect(h.socket()).expect("connect to the supervisor");
        (case.send)(&sock, &ctx);
        if let Err(e) = expect_refusal(&sock, case.code) {
            failures.push(format!("{}: {e}", case.name));
        }
    }

    // A well-behaved guest still attaches to both disks and does verified I/O.
    let mut front =
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&main)).expect("attach after the errors");
    verified_io(&mut front, 0, 1).expect("verified I/O");
    let mut work = verify_workload(3, 4096, 2048);
    run_clean(&mut work, &mut front, "main disk after the errors");
    let mut on_small =
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&small)).expect("attach the small disk");
    assert_eq!(on_small.ring_page_order(), 1);
    verified_io(&mut on_small, 0, 2).expect("verified I/O on the small disk");
    assert_eq!(
        (backend_pid(&main), backend_pid(&small)),
        pids,
        "a backend was replaced"
    );

    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    front.detach().expect("detach");
    on_small.detach().expect("detach");
    h.stop();
}

fn seg(gref: u32) -> BlkifRequestSegment {
    BlkifRequestSegment {
        gref,
        first_sect: 0,
        last_sect: 7,
        _pad: [0; 2],
    }
}

fn raw_rw(op: u8, id: u64, sector: u64, gref: u32) -> BlkifRequest {
    let mut req = BlkifRequest {
        operation: op,
        nr_segments: 1,
        id,
        sector_number: sector,
        ..Default::default()
    };
    req.seg[0] = seg(gref);
    req
}

#[test]
fn a_connected_device_is_busy_until_its_guest_detaches() {
    let name = unique_name("ae-busy");
    let h = Harness::start(
        "attach-busy",
        &[DiskSpec::new(&name, 16).backend_id(BACKEND_ID)],
    );
    let pid = backend_pid(&name);

    // A second guest may probe a connected device, but not connect.
    let mut first = BlkFront::attach(h.socket(), &BlkFrontConfig::new(&name)).expect("first guest");
    verified_io(&mut first, 0, 1).expect("I/O of the first guest");
    let sock = SeqPacket::connect(h.socket()).expect("connect");
    sock.send(&Message::probe(&name), &[]).expect("probe");
    expect_kind(&sock, kind::BACKEND).expect("probe of a connected device");
    connect_edited(&sock, &name, &[]);
    expect_refusal(&sock, ErrorCode::Ebusy).expect("second connect");
    verified_io(&mut first, 64, 2).expect("the first guest is undisturbed");

    // `close` → `closed` (state 6) → EOF, then the device is free.
    first.detach().expect("clean detach");
    let raw = RawGuest::attach(h.socket(), &name, BACKEND_ID).expect("attach after close");
    raw.control
        .send(&Message::new(kind::CLOSE), &[])
        .expect("send close");
    let closed = expect_kind(&raw.control, kind::CLOSED).expect("closed");
    assert_eq!(
        closed.get("state"),
        Some("6"),
        "closed must carry state=6: {closed}"
    );
    expect_eof(&raw.control).expect("EOF after closed");
    drop(raw);

    // Closing the socket without `close` detaches too.
    let mut raw = RawGuest::attach(h.socket(), &name, BACKEND_ID).expect("attach after closed");
    let data = pattern(9, PAGE as usize);
    raw.mem
        .region
        .write(RawGuest::data_offset(0), &data)
        .expect("fill page");
    let rsp = raw
        .request(&raw_rw(BLKIF_OP_WRITE, 41, 128, raw_data_gref(0)))
        .expect("raw write");
    assert_eq!((rsp.id, rsp.status), (41, BLKIF_RSP_OKAY));
    let rsp = raw
        .request(&raw_rw(BLKIF_OP_READ, 42, 0, raw_data_gref(1)))
        .expect("raw read");
    assert_eq!((rsp.id, rsp.status), (42, BLKIF_RSP_OKAY));
    let mut got = vec![0u8; PAGE as usize];
    raw.mem
        .region
        .read(RawGuest::data_offset(1), &mut got)
        .expect("read page");
    assert!(
        got == pattern(1, PAGE as usize),
        "raw guest read other data than the first guest wrote"
    );
    drop(raw);

    let mut last =
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&name)).expect("attach after EOF");
    check(&mut last, 128, &data).expect("data of the raw guest");
    verified_io(&mut last, 256, 3).expect("I/O of the last guest");
    assert_eq!(backend_pids(&name, std::process::id()), [pid]);
    last.detach().expect("detach");
    h.stop();
}

#[test]
fn messages_after_connected_other_than_close_are_eproto() {
    let name = unique_name("ae-seq");
    let h = Harness::start(
        "attach-seq",
        &[DiskSpec::new(&name, 16).backend_id(BACKEND_ID)],
    );

    let raw = RawGuest::attach(h.socket(), &name, BACKEND_ID).expect("attach");
    raw.control
        .send(&Message::probe(&name), &[])
        .expect("probe");
    expect_refusal(&raw.control, ErrorCode::Eproto).expect("probe after connected");
    drop(raw);

    let raw = RawGuest::attach(h.socket(), &name, BACKEND_ID).expect("attach after EPROTO");
    let again = RawRegion::new(BACKEND_ID);
    must_send(&raw.control, &connect_with(&name, &[]), &again.fds());
    expect_refusal(&raw.control, ErrorCode::Eproto).expect("second connect");
    drop(raw);

    let mut front =
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&name)).expect("attach after EPROTO");
    verified_io(&mut front, 0, 1).expect("verified I/O");
    front.detach().expect("detach");
    h.stop();
}

/// PROTOCOL.md §6: the backend gets duplicates of the guest's own
/// descriptors and must not change their file status flags.
#[test]
fn attaching_leaves_the_guests_descriptor_flags_alone() {
    let name = unique_name("ae-flags");
    let h = Harness::start(
        "attach-flags",
        &[DiskSpec::new(&name, 16).backend_id(BACKEND_ID)],
    );
    let mem = RawRegion::new(BACKEND_ID);
    // Blocking eventfds, as a C frontend may well use.
    let (kick, notify) = (eventfd(), eventfd());
    let fds = [
        mem.region.file().as_raw_fd(),
        kick.as_fd().as_raw_fd(),
        notify.as_fd().as_raw_fd(),
    ];
    let flags =
        |fd: RawFd| OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("F_GETFL"));
    let before: Vec<OFlag> = fds.iter().map(|&fd| flags(fd)).collect();

    let sock = SeqPacket::connect(h.socket()).expect("connect");
    must_send(&sock, &connect_with(&name, &[]), &fds);
    expect_kind(&sock, kind::CONNECTED).expect("connected");
    let after: Vec<OFlag> = fds.iter().map(|&fd| flags(fd)).collect();
    sock.send(&Message::new(kind::CLOSE), &[]).expect("close");
    expect_kind(&sock, kind::CLOSED).expect("closed");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(
            b, a,
            "the backend changed the file status flags of descriptor {i}"
        );
    }
    h.stop();
}

/// A guest whose `connect` arrives while another guest's `close` is being
/// handled either gets `EBUSY` or a device that stays connected: the
/// detach of the first guest must never take the second one's device.
#[test]
fn a_guest_connecting_while_another_closes_keeps_its_device() {
    let name = unique_name("ae-race");
    let h = Harness::start(
        "attach-race",
        &[DiskSpec::new(&name, 16).backend_id(BACKEND_ID)],
    );
    let mut outcomes = Vec::new();
    for round in 0..120u64 {
        let first = RawGuest::attach(h.socket(), &name, BACKEND_ID).expect("first guest");
        let sock = SeqPacket::connect(h.socket()).expect("connect");
        sock.send(&Message::probe(&name), &[]).expect("probe");
        expect_kind(&sock, kind::BACKEND).expect("backend");
        let mem = RawRegion::new(BACKEND_ID);
        first
            .control
            .send(&Message::new(kind::CLOSE), &[])
            .expect("close");
        // Sweep the moment the connect arrives across the close's handling.
        std::thread::sleep(std::time::Duration::from_micros(round % 40 * 50));
        must_send(&sock, &connect_with(&name, &[]), &mem.fds());
        let answer = expect_kind(&sock, kind::CONNECTED);
        expect_kind(&first.control, kind::CLOSED).expect("closed");
        expect_eof(&first.control).expect("EOF after closed");
        match answer {
            Ok(_) => {
                let mut second = RawGuest { control: sock, mem };
                match second
                    .control
                    .recv_timeout(std::time::Duration::from_millis(100))
                {
                    Ok(None) => {}
                    other => panic!(
                        "round {round}: the second guest was connected while the first closed, \
                         then lost its device: {other:?}"
                    ),
                }
                let rsp = second
                    .request(&raw_rw(BLKIF_OP_READ, 7, 0, raw_data_gref(0)))
                    .unwrap_or_else(|e| {
                        panic!("round {round}: the second guest's ring is dead: {e}")
                    });
                assert_eq!((rsp.id, rsp.status), (7, BLKIF_RSP_OKAY));
                second
                    .control
                    .send(&Message::new(kind::CLOSE), &[])
                    .expect("close");
                expect_kind(&second.control, kind::CLOSED).expect("closed");
                outcomes.push("connected");
                if outcomes.iter().filter(|o| **o == "connected").count() == 5 {
                    break;
                }
            }
            Err(e) if e.contains("EBUSY") => outcomes.push("EBUSY"),
            Err(e) => panic!("round {round}: second connect: {e}"),
        }
    }
    eprintln!("outcomes: {outcomes:?}");
    h.stop();
}
