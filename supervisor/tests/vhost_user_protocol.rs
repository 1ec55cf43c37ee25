//! The supervisor's vhost-user socket driven by a real frontend (the
//! `vhost` crate's `Frontend`, as a VMM would): negotiation, config space,
//! the in-flight region, a queue started on a data plane, `set-call`, a
//! SIGKILLed data plane recovered without the VMM noticing, and hostile
//! requests that get errors while the supervisor keeps serving.
//!
//! The data plane is a fake: this test binary re-executed by the supervisor
//! (see [`fake_backend_entry`], `shadowback_testsupport::fake_backend`). It answers `attach-virtio`, `set-call` and
//! `detach`, beats queue 0's shadow log, and records what it received in an
//! event file. The real virtqueue data plane is the integrator's to test.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use shadowback_shadow::ShadowLog;
use shadowback_supervisor::{CacheMode, DiskConfig, Fault};
use shadowback_testsupport::fake_backend::{FakeBackend, FakeSupervisor};
use shadowback_testsupport::fd::memfd;
use shadowback_testsupport::temp::TempDir;
use shadowback_testsupport::wait_for;
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use shadowback_xenbus::{key, kind, Message};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Sectors of the 1 MiB test disk.
const SECTORS: u64 = 2048;
/// Where the fake VMM "maps" guest memory (never dereferenced).
const USER: u64 = 0x7f00_0000_0000;
const GUEST_SIZE: u64 = 1 << 20;
/// Queue 0's rings, guest-physical.
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;

// ---------------------------------------------------------------------------
// The fake data plane.

/// Entry point of the fake data plane: a no-op in a normal test run; when
/// the supervisor execs this binary as a backend (with `--control-fd`) it
/// becomes one and never returns.
#[test]
fn fake_backend_entry() {
    if let Some(fake) = FakeBackend::from_args() {
        fake.serve(script);
    }
}

/// What the fake data plane answers: `attach-virtio` (beating queue 0's
/// shadow log), `set-call` and `detach`.
fn script(fake: &mut FakeBackend, msg: Message, fds: Vec<OwnedFd>) -> Message {
    let die_on_recover = fake.has_flag("die-on-recover");
    let die_on_first_detach = fake.has_flag("die-on-first-detach");
    match msg.kind() {
        kind::ATTACH_VIRTIO => {
            let got = fds.len();
            let req = VirtioAttachRequest::from_message(&msg).expect("attach-virtio");
            let fds = VirtioFds::from_received(&req, fds).expect("fd count");
            let queues: Vec<String> = req
                .queues
                .iter()
                .map(|q| {
                    format!(
                        "{}:{}:{:x}:{:x}:{:x}:{}",
                        q.index, q.size, q.desc, q.avail, q.used, q.next_avail
                    )
                })
                .collect();
            fake.record(&format!(
                "attach-virtio queues={} fds={got} inflight={} shadow={} recover={}",
                queues.join(","),
                u8::from(req.inflight.is_some()),
                u8::from(req.shadow),
                msg.get(key::RECOVER).unwrap_or("0"),
            ));
            if die_on_recover && msg.get(key::RECOVER) == Some("1") {
                std::process::exit(70);
            }
            let mut generation = 0;
            if let Some(log) = fds.logs.into_iter().next() {
                let log = ShadowLog::open(log).expect("log");
                generation = log.begin_instance().expect("begin");
                fake.heartbeat = Some(log);
            }
            Message::new("attached")
                .with("generation", generation)
                .with("replayed", 0)
                .with("repushed", 0)
                .with("poisoned", 0)
                .with("corrupt", 0)
                .with("replay-us", 0)
        }
        kind::SET_CALL => {
            fake.record(&format!(
                "set-call queue={} fds={}",
                msg.get(key::QUEUE).unwrap_or("?"),
                fds.len()
            ));
            Message::new("ok")
        }
        "detach" => {
            let died = fake.events().count("died-on-detach") > 0;
            if die_on_first_detach && !died {
                // Mid-drain, with requests in flight.
                fake.record("died-on-detach");
                std::process::exit(71);
            }
            fake.detach()
        }
        other => FakeBackend::refuse(other),
    }
}

// ---------------------------------------------------------------------------
// Harness.

/// The fake supervisor exporting `vd` over vhost-user.
fn start() -> FakeSupervisor {
    start_with(&[])
}

fn start_with(fake_args: &[&str]) -> FakeSupervisor {
    let dir = TempDir::new("vu-protocol");
    let image = dir.create_image("vd.img", SECTORS * 512);
    // A directory that does not exist yet, and a stale file.
    let vhost = dir.join("run/vd.vhost");
    let disks = vec![DiskConfig {
        cache: CacheMode::Writeback,
        vhost_user: Some(vhost.clone()),
        num_queues: 2,
        queue_size: 256,
        ..DiskConfig::new("vd", image)
    }];
    std::fs::create_dir_all(dir.join("run")).unwrap();
    // A stale socket left by a dead supervisor.
    drop(std::os::unix::net::UnixListener::bind(&vhost).unwrap());
    FakeSupervisor::start(dir, disks, fake_args, &[])
}

fn vhost_socket(s: &FakeSupervisor) -> PathBuf {
    s.dir().join("run/vd.vhost")
}

/// A frontend that asks for REPLY_ACK on every request.
fn connect(s: &FakeSupervisor) -> Frontend {
    let fe = Frontend::connect(vhost_socket(s), 16).expect("connect");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// SET_OWNER, features and protocol features as QEMU negotiates them.
fn negotiate(fe: &mut Frontend) -> u64 {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol).unwrap();
    fe.set_features(features).unwrap();
    features
}

fn guest_memory() -> File {
    memfd(GUEST_SIZE)
}

/// One memory-table entry (struct literal: `new` is test-utils only).
fn region(
    gpa: u64,
    size: u64,
    user: u64,
    offset: u64,
    fd: std::os::fd::RawFd,
) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: user,
        mmap_offset: offset,
        mmap_handle: fd,
    }
}

fn ring_config(size: u16) -> VringConfigData {
    VringConfigData {
        queue_max_size: 256,
        queue_size: size,
        flags: 0,
        desc_table_addr: USER + DESC,
        used_ring_addr: USER + USED,
        avail_ring_addr: USER + AVAIL,
        log_addr: None,
    }
}

/// Sends a vhost-user request (version 1, no fds) on a raw socket.
fn raw_request(sock: &mut UnixStream, code: u32, payload: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    msg.extend_from_slice(payload);
    sock.write_all(&msg).unwrap();
}

/// Reads a reply header and `body` bytes.
fn raw_reply(sock: &mut UnixStream, body: usize) -> Vec<u8> {
    let mut buf = vec![0; 12 + body];
    sock.read_exact(&mut buf).unwrap();
    buf
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn negotiation_config_space_and_inflight_region() {
    let s = start();
    let mut fe = connect(&s);
    let features = negotiate(&mut fe);
    for bit in [32, 29, 28, 2, 6, 9, 12, 13, 14] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    assert_eq!(features & (1 << 5), 0, "not read-only");
    let protocol = fe.get_protocol_features().unwrap();
    for p in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    ] {
        assert!(protocol.contains(p), "{p:?}");
    }
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let flags = VhostUserConfigFlags::empty();
    let (_, config) = fe.get_config(0, 96, flags, &[0; 96]).unwrap();
    assert_eq!(config[..8], SECTORS.to_le_bytes());
    assert_eq!(config[34..36], 2u16.to_le_bytes(), "num_queues");
    assert_eq!(config[20..24], 512u32.to_le_bytes(), "blk_size");
    let (_, capacity) = fe.get_config(0, 8, flags, &[0; 8]).unwrap();
    assert_eq!(capacity, SECTORS.to_le_bytes());
    // (A refused GET_CONFIG is an empty reply, which the `vhost` crate's
    // frontend cannot read; see the raw check in the next test.)
    assert!(fe.set_config(0, flags, &[1; 8]).is_err(), "read-only");

    let ask = VhostUserInflight {
        num_queues: 2,
        queue_size: 256,
        ..Default::default()
    };
    let (reply, file) = fe.get_inflight_fd(&ask).unwrap();
    let (size, offset, queues) = (reply.mmap_size, reply.mmap_offset, reply.num_queues);
    assert_eq!((size, offset, queues), (2 * 4160, 0, 2));
    assert_eq!(file.metadata().unwrap().len(), 2 * 4160);
    // Still one connection, still answering.
    assert_eq!(fe.get_queue_num().unwrap(), 2);
}

#[test]
fn a_started_queue_survives_a_data_plane_kill() {
    let s = start();
    let mut fe = connect(&s);
    negotiate(&mut fe);
    let ask = VhostUserInflight {
        num_queues: 2,
        queue_size: 256,
        ..Default::default()
    };
    let (inflight, inflight_file) = fe.get_inflight_fd(&ask).unwrap();
    fe.set_inflight_fd(&inflight, inflight_file.as_raw_fd())
        .unwrap();
    let guest = guest_memory();
    let entry = region(0, GUEST_SIZE, USER, 0, guest.as_raw_fd());
    fe.set_mem_table(&[entry]).unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    fe.set_vring_num(0, 256).unwrap();
    fe.set_vring_base(0, 7).unwrap();
    fe.set_vring_addr(0, &ring_config(256)).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    assert_eq!(s.events.count("attach-virtio"), 0, "not enabled yet");
    fe.set_vring_enable(0, true).unwrap();

    // Queue 1 has no addresses: the session runs queue 0 alone, at the
    // guest-physical addresses, from SET_VRING_BASE. One region, kick and
    // call, the in-flight region, one shadow log.
    let line = s.events.wait_for(&["attach-virtio", "recover=0"]);
    assert!(
        line.contains("queues=0:256:10000:11000:12000:7 fds=5 inflight=1 shadow=1"),
        "{line}"
    );
    s.wait_for("vd", "connected", |st| st.connected);

    // Interrupt masking: the call fd changes, nothing restarts.
    let masked = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &masked).unwrap();
    s.events.wait_for(&["set-call queue=0 fds=1"]);
    assert_eq!(s.events.count("detach"), 0);

    // SIGKILL the data plane: a new instance takes over with recover=1;
    // the VMM's connection never notices.
    s.sup().fault("vd", Fault::Kill).expect("fault");
    s.wait_for("vd", "a recovery", |st| st.recoveries == 1);
    let line = s.events.wait_for(&["attach-virtio", "recover=1"]);
    assert!(line.contains("fds=5"), "{line}");
    assert_eq!(fe.get_queue_num().unwrap(), 2, "connection still up");

    // GET_VRING_BASE stops the ring; after the drain, the next avail index
    // is used->idx as the data plane left it.
    guest.write_all_at(&42u16.to_le_bytes(), USED + 2).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 42);
    s.events.wait_for(&["detach"]);
    s.wait_for("vd", "detached", |st| !st.connected);

    // QEMU starts the device again: kick, and the session resumes at 42.
    fe.set_vring_kick(0, &kick).unwrap();
    s.events.wait_for(&["attach-virtio", "12000:42"]);
    // The backend records the attach before it answers: wait for the
    // device to count the session, or the EOF below may find it not yet
    // attached (and the stats still saying "detached").
    s.wait_for("vd", "attached again", |st| st.connected);
    drop(fe);
    s.wait_for("vd", "detached on EOF", |st| !st.connected && !st.given_up);
    assert_eq!(s.events.count("detach"), 2);
}

/// Negotiates, sets up memory and queue 0, enables it; returns what must
/// stay alive (memory, kick, call).
fn start_queue0(fe: &mut Frontend) -> (File, EventFd, EventFd) {
    negotiate(fe);
    let guest = guest_memory();
    let entry = region(0, GUEST_SIZE, USER, 0, guest.as_raw_fd());
    fe.set_mem_table(&[entry]).unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_num(0, 256).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &ring_config(256)).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (guest, kick, call)
}

#[test]
fn the_vmm_is_disconnected_only_when_the_device_gives_up() {
    let s = start_with(&["die-on-recover"]);
    let mut fe = connect(&s);
    let _keep = start_queue0(&mut fe);
    s.events.wait_for(&["attach-virtio", "recover=0"]);
    s.sup().fault("vd", Fault::Kill).expect("fault");
    s.wait_for("vd", "giving up", |st| st.given_up);
    // The supervisor closes the socket: the VMM sees the failure.
    wait_for(Duration::from_secs(15), "the connection to close", || {
        fe.get_queue_num().is_err()
    });
    assert!(s.events.count("recover=1") >= 1);
    // A new connection after the hold-off gives the device a fresh start:
    // a new instance, attached without recovery.
    let attaches = s.events.count("recover=0");
    std::thread::sleep(shadowback_supervisor::FRESH_START_AFTER);
    let mut fe = connect(&s);
    let (guest, kick, call) = (
        guest_memory(),
        EventFd::new(0).unwrap(),
        EventFd::new(0).unwrap(),
    );
    negotiate(&mut fe);
    fe.set_mem_table(&[region(0, GUEST_SIZE, USER, 0, guest.as_raw_fd())])
        .unwrap();
    fe.set_vring_num(0, 256).unwrap();
    fe.set_vring_addr(0, &ring_config(256)).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_enable(0, true).expect("a fresh start");
    // SET_VRING_ENABLE is not acknowledged (no NEED_REPLY): the attach it
    // starts (a new instance, then `attach-virtio`) may still be running
    // when it returns. Read right away, the stats once showed the fresh
    // start counted and no instance yet.
    let st = s.wait_for("vd", "the fresh start to attach", |st| st.connected);
    assert!(!st.given_up && st.connected, "{st:#?}");
    assert_eq!(st.fresh_starts, 1);
    assert_eq!(s.events.count("recover=0"), attaches + 1);
}

#[test]
fn bad_requests_get_errors_and_the_socket_keeps_serving() {
    let s = start();
    let mut fe = connect(&s);
    negotiate(&mut fe);
    // Refused with a NACK; the connection stays.
    assert!(fe.set_vring_num(0, 300).is_err(), "not a power of two");
    assert!(fe.set_vring_num(0, 512).is_err(), "above queue_size");
    assert!(fe.set_vring_num(5, 256).is_err(), "no such queue");
    assert!(fe.set_vring_enable(9, true).is_err(), "no such queue");
    assert!(
        fe.set_vring_addr(0, &ring_config(256)).is_err(),
        "addresses before memory"
    );
    let guest = guest_memory();
    let entry = region(0, GUEST_SIZE, USER, 0, guest.as_raw_fd());
    fe.set_mem_table(&[entry]).unwrap();
    let outside = VringConfigData {
        desc_table_addr: USER + GUEST_SIZE,
        ..ring_config(256)
    };
    assert!(fe.set_vring_addr(0, &outside).is_err(), "outside memory");
    let overlapping = [
        region(0, 0x2000, USER, 0, guest.as_raw_fd()),
        region(0x1000, 0x2000, USER + GUEST_SIZE, 0, guest.as_raw_fd()),
    ];
    assert!(fe.set_mem_table(&overlapping).is_err(), "overlap");
    let too_many = VhostUserInflight {
        num_queues: 3,
        queue_size: 256,
        ..Default::default()
    };
    assert_eq!(fe.get_queue_num().unwrap(), 2, "still serving");
    // A request with a reply the device cannot give closes the connection.
    assert!(fe.get_inflight_fd(&too_many).is_err());
    assert!(fe.get_queue_num().is_err(), "closed");
    drop(fe);

    // Garbage: an unknown request code. The supervisor hangs up.
    let mut raw = UnixStream::connect(vhost_socket(&s)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(&0xffffu32.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    raw.write_all(&header).unwrap();
    let mut buf = [0u8; 64];
    // A signal landing on this thread makes a read with a timeout fail
    // with EINTR (signal(7)): read again.
    let got = loop {
        match raw.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => break other,
        }
    };
    assert_eq!(got.unwrap(), 0, "EOF from the supervisor, nothing else");
    drop(raw);

    // GET_CONFIG past the end of the config space: an empty reply (how
    // the spec signals failure), and the connection stays.
    let mut raw = UnixStream::connect(vhost_socket(&s)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let features = (1u64 << 30) | (1 << 32);
    raw_request(&mut raw, 1, &[]);
    assert_eq!(
        raw_reply(&mut raw, 8)[..4],
        1u32.to_le_bytes(),
        "GET_FEATURES"
    );
    raw_request(&mut raw, 2, &features.to_le_bytes());
    raw_request(&mut raw, 16, &0x200u64.to_le_bytes());
    let mut get_config = Vec::new();
    for v in [90u32, 10, 0] {
        get_config.extend_from_slice(&v.to_le_bytes());
    }
    get_config.extend_from_slice(&[0; 10]);
    raw_request(&mut raw, 24, &get_config);
    let reply = raw_reply(&mut raw, 12);
    assert_eq!(reply[..4], 24u32.to_le_bytes());
    assert_eq!(reply[8..12], 12u32.to_le_bytes(), "no payload");
    assert_eq!(reply[16..20], 0u32.to_le_bytes(), "size 0: refused");
    raw_request(&mut raw, 1, &[]);
    raw_reply(&mut raw, 8);
    drop(raw);

    // A truncated message followed by EOF.
    let mut raw = UnixStream::connect(vhost_socket(&s)).unwrap();
    raw.write_all(&[1, 0, 0]).unwrap();
    drop(raw);

    // And the next VMM is served as if nothing happened.
    let mut fe = connect(&s);
    negotiate(&mut fe);
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert!(!s.stats("vd").given_up);
    assert_eq!(s.events.count("attach-virtio"), 0);
}

#[test]
fn the_socket_is_removed_on_shutdown() {
    let mut s = start();
    let path = vhost_socket(&s);
    assert!(path.exists());
    s.harness.stop_keeping_files();
    assert!(!path.exists());
}

/// Sends `bytes` with `fds` attached in one `sendmsg`.
fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[std::os::fd::RawFd]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let iov = [std::io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None).unwrap();
}

/// Reads until the supervisor hangs up, or fails after 15 s of silence.
fn expect_hangup(sock: &mut UnixStream, what: &str) {
    shadowback_testsupport::socket::expect_hangup(sock, Duration::from_secs(15), what);
}

/// A VMM that stalls, floods or desynchronises the stream — without ever
/// closing its end — is disconnected, never waited for: half a header, a
/// message with more fds than a message may carry (the kernel drops the
/// excess, the header is read and the rest of the stream would be parsed
/// from the middle of the message), a kick with two fds, and replies never
/// read. The next VMM is served, and the supervisor stops promptly.
#[test]
fn stalled_or_desynchronised_vmms_are_hung_up_on() {
    let s = start();
    let null = File::open("/dev/null").unwrap();
    let kick_header = |flags: u32| {
        let mut msg = Vec::new();
        for v in [12u32, flags, 8] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        msg.extend_from_slice(&0u64.to_le_bytes());
        msg
    };

    let mut half = UnixStream::connect(vhost_socket(&s)).unwrap();
    half.write_all(&1u32.to_le_bytes()).unwrap();
    expect_hangup(&mut half, "half a header");

    let mut many = UnixStream::connect(vhost_socket(&s)).unwrap();
    send_with_fds(&many, &kick_header(1), &[null.as_raw_fd(); 40]);
    expect_hangup(&mut many, "40 fds");

    let mut two = UnixStream::connect(vhost_socket(&s)).unwrap();
    send_with_fds(&two, &kick_header(1 | 8), &[null.as_raw_fd(); 2]);
    expect_hangup(&mut two, "SET_VRING_KICK with 2 fds");

    // GET_FEATURES until our send buffer is full; the replies pile up.
    let mut deaf = UnixStream::connect(vhost_socket(&s)).unwrap();
    deaf.set_nonblocking(true).unwrap();
    let get_features = [1u32, 1, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<_>>();
    let mut sent = 0;
    while sent < 200_000 {
        match deaf.write(&get_features) {
            Ok(n) if n == get_features.len() => sent += 1,
            // A partial header: stalled mid-message, hung up on too.
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("send: {e}"),
        }
    }
    // Reading would make room for the replies: wait for the hang-up
    // without reading.
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&deaf, PollFlags::RDHUP)];
    let timeout = Timespec {
        tv_sec: 15,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&timeout)).unwrap();
    assert!(
        fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP),
        "replies never read: the supervisor did not hang up ({sent} requests)"
    );

    let mut fe = connect(&s);
    negotiate(&mut fe);
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    drop((half, many, two, deaf));
}

/// The data plane dies while a vhost-user session is being detached (here
/// by GET_VRING_BASE): the VMM resumes the ring at `used->idx` afterwards,
/// so what the dead instance consumed must be answered first. The session
/// is taken over (`recover=1`) and the new instance detached.
#[test]
fn a_data_plane_dying_in_a_detach_is_recovered_before_the_ring_stops() {
    let s = start_with(&["die-on-first-detach"]);
    let mut fe = connect(&s);
    let (guest, kick, _call) = start_queue0(&mut fe);
    s.events.wait_for(&["attach-virtio", "recover=0"]);
    guest.write_all_at(&9u16.to_le_bytes(), USED + 2).unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 9);
    let died = s.events.wait_for(&["died-on-detach"]);
    let recovered = s.events.wait_for(&["attach-virtio", "recover=1"]);
    let pid = |line: &str| line.split(' ').next().unwrap().to_string();
    assert_ne!(pid(&died), pid(&recovered), "a new instance took over");
    s.events.wait_for(&[&format!("{} detach", pid(&recovered))]);
    let st = s.wait_for("vd", "detached", |st| !st.connected);
    assert_eq!((st.crashes, st.recoveries), (1, 1), "{st:#?}");
    assert!(!st.given_up);
    // And the ring starts again where the VMM expects.
    fe.set_vring_kick(0, &kick).unwrap();
    s.events.wait_for(&["attach-virtio", "12000:9"]);
}
