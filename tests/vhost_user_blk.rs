//! virtio-blk over vhost-user end to end: a real supervisor exporting a
//! disk on its vhost-user socket, the real `shadowback blkback` data plane,
//! and the native client ([`VhostUserBlk`]) in this process as the VMM and
//! the guest driver. Config space, every request type (IN, OUT, FLUSH,
//! GET_ID, DISCARD, WRITE_ZEROES), a read-only disk, four queues, a VMM
//! that reconnects, and a VMM that sends garbage; and the `virtio-drivers`
//! crate's own `VirtIOBlk` driver as a second, independent driver.
#![deny(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, Status};
use shadowback_guest::vhost_user::{connect_simple, VhostUserBlk, VhostUserBlkOptions};
use shadowback_testsupport::blockio::{
    check, complete_one, pattern, read, run_clean, verify_workload, write,
};
use shadowback_testsupport::harness::{with_vhost_user, DiskSetup};
use shadowback_testsupport::REPLY_TIMEOUT;

// virtio 1.2 §5.2.3 (feature bits), §5.2.4 (config layout), §5.2.6
// (request types); §6 and §2.7 for the ring features.
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_MQ: u32 = 12;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;
const F_EVENT_IDX: u32 = 29;
const F_VERSION_1: u32 = 32;
const CFG_CAPACITY: usize = 0;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;
const CFG_NUM_QUEUES: usize = 34;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const T_OUT: u32 = 1;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

fn cfg_u16(cfg: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(cfg[off..off + 2].try_into().expect("2 bytes"))
}

fn cfg_u32(cfg: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(cfg[off..off + 4].try_into().expect("4 bytes"))
}

fn cfg_u64(cfg: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(cfg[off..off + 8].try_into().expect("8 bytes"))
}

/// Sends one request with [`VhostUserBlk::submit_raw`] and waits for it.
fn raw(dev: &mut VhostUserBlk, type_: u32, sector: u64, out: &[u8], in_bytes: u32) -> Completion {
    const TAG: u64 = 0xfeed;
    dev.submit_raw(TAG, type_, sector, out, in_bytes)
        .expect("submit");
    dev.kick().expect("kick");
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut done = Vec::new();
    while done.is_empty() {
        assert!(
            Instant::now() < deadline,
            "request type {type_} not answered"
        );
        dev.poll_completions(Duration::from_millis(100), &mut done)
            .expect("poll");
    }
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].tag, TAG);
    done.remove(0)
}

/// A `virtio_blk_discard_write_zeroes` segment.
fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

/// The config space and features a driver sees match the disk and its
/// configuration; a driver wanting more queues than offered is refused
/// and the socket still serves the next one.
#[test]
fn config_space_shows_the_disk_and_its_queues() {
    const MIB: u64 = 8;
    let setup = DiskSetup::start(
        "vu-config",
        "vu-config",
        MIB,
        with_vhost_user(|d| d.num_queues = 3),
        &[],
    );
    let mut dev = setup.connect(3);
    let f = dev.transport().device_features();
    for bit in [
        F_VERSION_1,
        F_EVENT_IDX,
        F_MQ,
        F_FLUSH,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_BLK_SIZE,
        F_SEG_MAX,
    ] {
        assert!(has(f, bit), "feature {bit} offered: {f:#x}");
    }
    assert!(!has(f, F_RO), "a writable disk: {f:#x}");
    let cfg = dev.transport().config().to_vec();
    assert_eq!(cfg_u64(&cfg, CFG_CAPACITY), MIB * 2048, "capacity");
    assert_eq!(cfg_u32(&cfg, CFG_BLK_SIZE), 512, "blk_size");
    assert_eq!(cfg_u32(&cfg, CFG_SEG_MAX), 128, "seg_max");
    assert_eq!(cfg_u16(&cfg, CFG_NUM_QUEUES), 3, "num_queues");
    assert!(cfg_u32(&cfg, CFG_MAX_WRITE_ZEROES_SECTORS) > 0);
    assert_eq!(dev.transport().max_queues(), 3);
    let limits = *dev.limits();
    assert_eq!(limits.capacity, MIB * 2048);
    assert!(
        limits.flush && limits.discard && !limits.read_only,
        "{limits:?}"
    );
    assert_eq!(dev.capacity_sectors(), MIB * 2048);
    // The device works, and its id is its name.
    write(&mut dev, 0, &pattern(1, 4096)).expect("write");
    check(&mut dev, 0, &pattern(1, 4096)).expect("read back");
    assert_eq!(dev.get_id(REPLY_TIMEOUT).expect("GET_ID"), "vu-config");
    drop(dev);

    let four = VhostUserBlk::connect(
        setup.vhost_socket(),
        VhostUserBlkOptions {
            queues: 4,
            ..VhostUserBlkOptions::default()
        },
    );
    assert!(four.is_err(), "4 queues on a 3-queue device");
    drop(four);
    let mut dev = setup.connect(1);
    check(&mut dev, 0, &pattern(1, 4096)).expect("still served");
    let s = setup.stats();
    assert_eq!((s.crashes, s.hangs), (0, 0), "{s:#?}");
}

/// GET_ID answers the device name, cut to the 20 bytes of the field
/// (without a terminating NUL then), and I/O around it is unaffected.
#[test]
fn get_id_returns_the_device_name() {
    let name = "vu-get-id-0123456789abcdef";
    let setup = DiskSetup::start("vu-id", name, 4, with_vhost_user(|_| {}), &[]);
    let mut dev = setup.connect(1);
    let data = pattern(7, 8192);
    write(&mut dev, 16, &data).expect("write");
    assert_eq!(dev.get_id(REPLY_TIMEOUT).expect("GET_ID"), &name[..20]);
    // GET_ID among reads in flight: their completions are kept.
    for tag in 0..8u64 {
        dev.submit(tag, &BlockRequest::read(16, 16, true))
            .expect("submit");
    }
    dev.kick().expect("kick");
    assert_eq!(dev.get_id(REPLY_TIMEOUT).expect("GET_ID"), &name[..20]);
    let mut done = Vec::new();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while done.len() < 8 {
        assert!(Instant::now() < deadline, "{} of 8 reads", done.len());
        dev.poll_completions(Duration::from_millis(100), &mut done)
            .expect("poll");
    }
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..8).collect::<Vec<_>>());
    for c in done {
        assert_eq!(c.status, Status::Ok);
        assert!(c.data.as_deref() == Some(&data[..]), "read {}", c.tag);
    }
}

/// An independent driver — `virtio-drivers`' `VirtIOBlk` over the same
/// vhost-user transport — reads what ours wrote and the other way round,
/// and sees the same capacity and serial.
#[test]
fn virtio_drivers_blk_interoperates_with_the_data_plane() {
    let name = "vu-virtio-drivers";
    let setup = DiskSetup::start("vu-vd", name, 4, with_vhost_user(|_| {}), &[]);
    let ours = pattern(11, 8192);
    let theirs = pattern(12, 4096);
    {
        let mut dev = setup.connect(1);
        write(&mut dev, 64, &ours).expect("write");
    }
    {
        let mut blk = connect_simple(setup.vhost_socket(), 64 << 20).expect("VirtIOBlk set-up");
        assert_eq!(blk.capacity(), 4 * 1024 * 1024 / 512);
        let mut buf = vec![0u8; 8192];
        blk.read_blocks(64, &mut buf).expect("VirtIOBlk read");
        assert!(buf == ours, "VirtIOBlk reads what VhostUserBlk wrote");
        blk.write_blocks(200, &theirs).expect("VirtIOBlk write");
        blk.flush().expect("VirtIOBlk flush");
        let mut raw = [0u8; 20];
        let n = blk.device_id(&mut raw).expect("VirtIOBlk GET_ID");
        assert_eq!(String::from_utf8_lossy(&raw[..n]), name);
    }
    let mut dev = setup.connect(1);
    assert!(
        read(&mut dev, 200, 8).expect("read") == theirs,
        "VhostUserBlk reads VirtIOBlk's write"
    );
    let mut on_disk = vec![0u8; 4096];
    std::fs::File::open(setup.image())
        .expect("image")
        .read_exact_at(&mut on_disk, 200 * 512)
        .expect("image read");
    assert!(
        on_disk == theirs,
        "VirtIOBlk's flushed write is in the image"
    );
}

/// FLUSH succeeds and the data is in the image; DISCARD and WRITE_ZEROES
/// (with and without the unmap flag) read back as zeros and touch
/// nothing around them; out-of-range and unknown requests fail with the
/// statuses virtio-blk prescribes.
#[test]
fn flush_discard_and_write_zeroes() {
    const MIB: u64 = 4;
    let setup = DiskSetup::start(
        "vu-ops",
        "vu-ops",
        MIB,
        with_vhost_user(|d| d.num_queues = 2),
        &[],
    );
    let mut dev = setup.connect(2);
    let mut model = pattern(3, 512 * 512); // sectors 0..512
    for chunk in 0..4u64 {
        let at = (chunk * 128) as usize * 512;
        write(&mut dev, chunk * 128, &model[at..at + 128 * 512]).expect("write");
    }
    let flush = complete_one(&mut dev, &BlockRequest::flush()).expect("flush");
    assert_eq!(flush.status, Status::Ok, "flush");
    let mut on_disk = vec![0u8; model.len()];
    std::fs::File::open(setup.image())
        .and_then(|f| f.read_exact_at(&mut on_disk, 0))
        .expect("read the image");
    assert!(on_disk == model, "written data is in the image");

    let zero = |model: &mut Vec<u8>, sector: usize, sectors: usize| {
        model[sector * 512..(sector + sectors) * 512].fill(0);
    };
    let discard = complete_one(&mut dev, &BlockRequest::discard(64, 64)).expect("discard");
    assert_eq!(discard.status, Status::Ok, "discard");
    zero(&mut model, 64, 64);
    let wz = raw(&mut dev, T_WRITE_ZEROES, 0, &segment(200, 24, 0), 0);
    assert_eq!(wz.status, Status::Ok, "write zeroes");
    zero(&mut model, 200, 24);
    let wz = raw(
        &mut dev,
        T_WRITE_ZEROES,
        0,
        &segment(300, 16, WRITE_ZEROES_FLAG_UNMAP),
        0,
    );
    assert_eq!(wz.status, Status::Ok, "write zeroes, unmap allowed");
    zero(&mut model, 300, 16);
    // Two segments in one request.
    let mut two = segment(400, 8, 0).to_vec();
    two.extend_from_slice(&segment(420, 3, 0));
    assert_eq!(raw(&mut dev, T_WRITE_ZEROES, 0, &two, 0).status, Status::Ok);
    zero(&mut model, 400, 8);
    zero(&mut model, 420, 3);
    for chunk in 0..4u64 {
        let at = (chunk * 128) as usize * 512;
        check(&mut dev, chunk * 128, &model[at..at + 128 * 512])
            .unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
    }

    // Past the end of the disk: an I/O error, nothing written.
    let end = MIB * 2048;
    let wz = raw(&mut dev, T_WRITE_ZEROES, 0, &segment(end - 8, 16, 0), 0);
    assert_eq!(wz.status, Status::IoError, "write zeroes past the end");
    let d = raw(&mut dev, T_DISCARD, 0, &segment(end, 8, 0), 0);
    assert_eq!(d.status, Status::IoError, "discard past the end");
    let w = raw(&mut dev, T_OUT, end - 4, &pattern(9, 4096), 0);
    assert_eq!(w.status, Status::IoError, "write past the end");
    // An unknown request type: UNSUPP.
    assert_eq!(raw(&mut dev, 0x7f, 0, &[], 0).status, Status::NotSupported);
    let last = read(&mut dev, end - 8, 8).expect("last sectors");
    assert!(last.iter().all(|&b| b == 0), "nothing written past the end");
    check(&mut dev, 0, &model[..128 * 512]).expect("still served");
}

/// A read-only disk offers `VIRTIO_BLK_F_RO` and no discard or write
/// zeroes; its data reads back, and a write the driver sends anyway is
/// answered VIRTIO_BLK_S_IOERR with the image unchanged.
#[test]
fn a_readonly_disk_refuses_writes_with_ioerr() {
    let content = pattern(5, 64 * 1024);
    let setup = DiskSetup::start(
        "vu-ro",
        "vu-ro",
        4,
        with_vhost_user(|d| {
            d.readonly = true;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&d.path)
                .and_then(|f| f.write_all_at(&content, 0))
                .expect("fill the image");
        }),
        &[],
    );
    let mut dev = setup.connect(1);
    let f = dev.transport().device_features();
    assert!(has(f, F_RO), "{f:#x}");
    assert!(!has(f, F_DISCARD) && !has(f, F_WRITE_ZEROES), "{f:#x}");
    assert!(dev.limits().read_only);
    check(&mut dev, 0, &content).expect("the image's content");
    // The client refuses on its own ...
    assert!(write(&mut dev, 0, &pattern(6, 4096)).is_err());
    // ... and the device refuses what a driver sends regardless.
    let w = raw(&mut dev, T_OUT, 0, &pattern(6, 4096), 0);
    assert_eq!(w.status, Status::IoError, "write to a read-only disk");
    let wz = raw(&mut dev, T_WRITE_ZEROES, 0, &segment(0, 8, 0), 0);
    assert_ne!(wz.status, Status::Ok, "write zeroes to a read-only disk");
    let d = raw(&mut dev, T_DISCARD, 0, &segment(0, 8, 0), 0);
    assert_ne!(d.status, Status::Ok, "discard on a read-only disk");
    check(&mut dev, 0, &content).expect("unchanged");
    let mut on_disk = vec![0u8; content.len()];
    std::fs::File::open(setup.image())
        .and_then(|f| f.read_exact_at(&mut on_disk, 0))
        .expect("read the image");
    assert!(on_disk == content, "the image is unchanged");
}

/// Four virtqueues: the verifying workload's requests are spread over all
/// of them (each queue's used index moved) and verify clean.
#[test]
fn four_queues_are_all_used_and_verify_clean() {
    let setup = DiskSetup::start(
        "vu-mq",
        "vu-mq",
        16,
        with_vhost_user(|d| d.num_queues = 4),
        &[],
    );
    let mut dev = setup.connect(4);
    let mut w = verify_workload(77, 0, 16 * 2048);
    run_clean(&mut w, &mut dev, "four queues");
    let used: Vec<u16> = (0..4)
        .map(|q| dev.transport().used_idx(q).expect("used index"))
        .collect();
    assert!(
        used.iter().all(|&u| u >= 10),
        "every queue served requests: {used:?}"
    );
}

/// A VMM that disconnects and connects again (a new connection, new
/// queues) finds the same disk with its data, also after disconnecting
/// with requests in flight; the data plane is never treated as failed.
#[test]
fn a_vmm_that_reconnects_finds_its_data() {
    let setup = DiskSetup::start(
        "vu-reconn",
        "vu-reconn",
        8,
        with_vhost_user(|d| d.num_queues = 2),
        &[],
    );
    let mut expected: Vec<(u64, Vec<u8>)> = Vec::new();
    for round in 0..4u64 {
        let mut dev = setup.connect(if round % 2 == 0 { 2 } else { 1 });
        setup.wait_for("the attachment", |s| s.connected);
        for (sector, data) in &expected {
            check(&mut dev, *sector, data).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let data = pattern(100 + round, 16 * 1024);
        let sector = 256 * round;
        write(&mut dev, sector, &data).expect("write");
        expected.push((sector, data));
        if round == 2 {
            // Leave with writes in flight (elsewhere on the disk).
            let junk = pattern(999, 64 * 1024);
            for tag in 0..16u64 {
                dev.submit(tag, &BlockRequest::write(4096 + 128 * tag, &junk))
                    .expect("submit");
            }
            dev.kick().expect("kick");
        }
        drop(dev);
        setup.wait_for("the detach", |s| !s.connected);
    }
    let mut dev = setup.connect(2);
    for (sector, data) in &expected {
        check(&mut dev, *sector, data).expect("after the last reconnect");
    }
    // Beyond everything written above (assumed zeros).
    let mut w = verify_workload(78, 8192, 2048);
    run_clean(&mut w, &mut dev, "after reconnects");
    let s = setup.stats();
    assert_eq!((s.crashes, s.hangs, s.recoveries), (0, 0, 0), "{s:#?}");
    assert!(!s.given_up, "{s:#?}");
}

// vhost-user messages (QEMU docs/interop/vhost-user.rst).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const VERSION: u32 = 1;
const NEED_REPLY: u32 = 1 << 3;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
const PROTOCOL_F_CONFIG: u64 = 1 << 9;

fn vu_raw(sock: &UnixStream, code: u32, flags: u32, size: u32, payload: &[u8], fds: &[i32]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(payload);
    let iov = [std::io::IoSlice::new(&msg)];
    let rights = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let cmsgs: &[nix::sys::socket::ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    // The peer may already have hung up: that is an answer too.
    let _ = nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    );
}

fn vu_send(sock: &UnixStream, code: u32, flags: u32, payload: &[u8]) {
    let size = u32::try_from(payload.len()).expect("small payload");
    vu_raw(sock, code, VERSION | flags, size, payload, &[]);
}

/// One reply's payload, or `None` on EOF or a timeout.
fn vu_reply(sock: &mut UnixStream) -> Option<Vec<u8>> {
    let mut hdr = [0u8; 12];
    sock.read_exact(&mut hdr).ok()?;
    let size = u32::from_le_bytes(hdr[8..12].try_into().ok()?) as usize;
    if size > 4096 {
        return None;
    }
    let mut body = vec![0u8; size];
    sock.read_exact(&mut body).ok()?;
    Some(body)
}

/// One reply's payload, or `None` if the supervisor hung up; fails if
/// neither happens before the read timeout.
fn vu_reply_or_eof(sock: &mut UnixStream, what: &str) -> Option<Vec<u8>> {
    let mut hdr = [0u8; 12];
    let mut got = 0;
    while got < hdr.len() {
        match sock.read(&mut hdr[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("{what}: neither a reply nor a hang-up: {e}"),
        }
    }
    let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
    assert!(size <= 4096, "{what}: reply of {size} bytes");
    let mut body = vec![0u8; size];
    sock.read_exact(&mut body)
        .unwrap_or_else(|e| panic!("{what}: reply body: {e}"));
    Some(body)
}

fn u64_of(body: &[u8]) -> u64 {
    body.get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(u64::MAX, u64::from_le_bytes)
}

fn vu_connect(setup: &DiskSetup) -> UnixStream {
    let sock = UnixStream::connect(setup.vhost_socket()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    sock
}

/// Reads until the supervisor hangs up, or fails after 15 s of silence.
fn expect_hangup(sock: &mut UnixStream, what: &str) {
    shadowback_testsupport::socket::expect_hangup(sock, Duration::from_secs(15), what);
}

/// QEMU's virtio-net enables its first queue pair when the device is
/// realized, before SET_FEATURES: `vhost` refuses the request (the
/// PROTOCOL_FEATURES bit is not acked yet) without a reply, and the
/// supervisor must keep the connection rather than hang up on the VMM.
#[test]
fn an_early_set_vring_enable_keeps_the_connection() {
    let setup = DiskSetup::start("vu-early", "vu-early", 8, with_vhost_user(|_| {}), &[]);
    let mut s = vu_connect(&setup);
    vu_send(&s, GET_FEATURES, 0, &[]);
    let offered = u64_of(&vu_reply(&mut s).expect("GET_FEATURES answered"));
    assert!(has(offered, 30), "PROTOCOL_FEATURES offered: {offered:#x}");
    let mut state = Vec::new();
    state.extend_from_slice(&0u32.to_le_bytes());
    state.extend_from_slice(&1u32.to_le_bytes());
    vu_send(&s, SET_VRING_ENABLE, 0, &state);
    vu_send(&s, GET_FEATURES, 0, &[]);
    let again = vu_reply_or_eof(&mut s, "after an early SET_VRING_ENABLE")
        .expect("the supervisor hung up on an early SET_VRING_ENABLE");
    assert_eq!(u64_of(&again), offered);
}

/// Garbage on the vhost-user socket the protocol tests do not send: a bad
/// version, a payload size beyond any message, a memory table without its
/// fds, a message carrying a pile of fds, a write to the read-only config
/// space, features never offered, replies never read, and a message cut
/// off by EOF. The supervisor hangs up or refuses each, never dies, never
/// starts a data plane for them, and the next VMM is served with its data
/// intact.
#[test]
fn hostile_vmm_messages_do_not_take_the_device_down() {
    let setup = DiskSetup::start(
        "vu-hostile",
        "vu-hostile",
        8,
        with_vhost_user(|d| d.num_queues = 2),
        &[],
    );
    let data = pattern(11, 32 * 1024);
    {
        let mut dev = setup.connect(2);
        write(&mut dev, 512, &data).expect("write");
    }
    setup.wait_for("the detach", |s| !s.connected);

    // Protocol version 2.
    let mut s = vu_connect(&setup);
    vu_raw(&s, GET_FEATURES, 2, 0, &[], &[]);
    expect_hangup(&mut s, "version 2");

    // A header announcing a 4 GiB payload.
    let mut s = vu_connect(&setup);
    vu_raw(&s, SET_FEATURES, VERSION, u32::MAX, &[0; 8], &[]);
    expect_hangup(&mut s, "4 GiB payload");

    // SET_MEM_TABLE: one 1 GiB region, no fd.
    let mut s = vu_connect(&setup);
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, 1 << 30, 0x7f00_0000_0000, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    vu_send(&s, SET_MEM_TABLE, 0, &table);
    expect_hangup(&mut s, "memory table without fds");

    // SET_VRING_KICK with 40 fds.
    let mut s = vu_connect(&setup);
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let fds = vec![null.as_raw_fd(); 40];
    vu_raw(&s, SET_VRING_KICK, VERSION, 8, &0u64.to_le_bytes(), &fds);
    // The fds beyond what the supervisor receives are dropped by the
    // kernel. Refused without a reply (none is asked for); the next
    // request is answered or the connection closed, not left hanging.
    vu_send(&s, GET_FEATURES, 0, &[]);
    if let Some(body) = vu_reply_or_eof(&mut s, "after 40 fds") {
        assert!(has(u64_of(&body), F_VERSION_1), "{body:?}");
    }
    drop(s);

    // Negotiated properly, then: SET_CONFIG on the read-only config space
    // (capacity = 2^64 - 1), and features never offered.
    let mut s = vu_connect(&setup);
    vu_send(&s, GET_FEATURES, 0, &[]);
    let offered = u64_of(&vu_reply(&mut s).expect("GET_FEATURES"));
    vu_send(&s, SET_FEATURES, 0, &offered.to_le_bytes());
    vu_send(&s, GET_PROTOCOL_FEATURES, 0, &[]);
    let protocol = u64_of(&vu_reply(&mut s).expect("GET_PROTOCOL_FEATURES"));
    assert_ne!(protocol & PROTOCOL_F_CONFIG, 0, "{protocol:#x}");
    let protocol = protocol & (PROTOCOL_F_CONFIG | PROTOCOL_F_REPLY_ACK);
    vu_send(&s, SET_PROTOCOL_FEATURES, 0, &protocol.to_le_bytes());
    let mut set_config = Vec::new();
    for v in [0u32, 8, 0] {
        set_config.extend_from_slice(&v.to_le_bytes());
    }
    set_config.extend_from_slice(&u64::MAX.to_le_bytes());
    vu_send(&s, SET_CONFIG, NEED_REPLY, &set_config);
    let ack = vu_reply(&mut s).expect("SET_CONFIG answered");
    assert_ne!(u64_of(&ack), 0, "SET_CONFIG must be NACKed");
    let mut get_config = Vec::new();
    for v in [0u32, 8, 0] {
        get_config.extend_from_slice(&v.to_le_bytes());
    }
    get_config.extend_from_slice(&[0; 8]);
    vu_send(&s, GET_CONFIG, 0, &get_config);
    let cfg = vu_reply(&mut s).expect("GET_CONFIG");
    assert_eq!(cfg.len(), 20, "{cfg:?}");
    assert_eq!(cfg_u64(&cfg, 12), 8 * 2048, "capacity unchanged");
    vu_send(&s, SET_FEATURES, NEED_REPLY, &u64::MAX.to_le_bytes());
    let ack = vu_reply(&mut s).expect("SET_FEATURES answered");
    assert_ne!(u64_of(&ack), 0, "features never offered must be NACKed");
    vu_send(&s, GET_FEATURES, 0, &[]);
    let again = u64_of(&vu_reply(&mut s).expect("still serving"));
    assert_eq!(again, offered);
    drop(s);

    // Thousands of requests whose replies are never read, then EOF.
    let s = vu_connect(&setup);
    s.set_nonblocking(true).expect("non-blocking");
    for _ in 0..5_000 {
        vu_send(&s, GET_FEATURES, 0, &[]);
    }
    drop(s);

    // Half a header, then EOF.
    let mut s = vu_connect(&setup);
    s.write_all(&GET_FEATURES.to_le_bytes()).expect("send");
    drop(s);

    // The next VMM: served, config intact, data intact, verified I/O.
    let mut dev = setup.connect(2);
    assert_eq!(dev.capacity_sectors(), 8 * 2048);
    check(&mut dev, 512, &data).expect("data written before");
    let mut w = verify_workload(12, 2048, 4096);
    run_clean(&mut w, &mut dev, "after the garbage");
    let st = setup.stats();
    assert_eq!((st.crashes, st.hangs, st.recoveries), (0, 0, 0), "{st:#?}");
    assert!(st.connected && !st.given_up, "{st:#?}");
}
