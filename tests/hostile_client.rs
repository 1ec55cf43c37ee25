//! A hostile local client of the control socket, and a hostile frontend's
//! eventfds (docs/PROTOCOL.md §1.1, §4.3), against a real `shadowback up`
//! or supervisor thread and real `shadowback blkback` processes.
//!
//! - A supervisor whose descriptor limit is far below the number of idle
//!   connections a client opens, or that is hit by a connect/close storm,
//!   keeps answering `status`, keeps a guest on another disk doing verified
//!   I/O, replaces a SIGKILLed backend, stops on SIGTERM, gives its
//!   descriptors back once the clients are gone, and writes a bounded log.
//! - A frontend whose notify (Xen ring) or call (vhost-user) eventfd is
//!   blocking and at its maximum count blocks no backend: its requests
//!   still complete, the disk is neither replaced nor given up, and the
//!   supervisor keeps serving.
//! - A sealed hugetlbfs memfd offered as guest memory is refused with
//!   `EINVAL` (it used to SIGBUS the supervisor), and the supervisor keeps
//!   serving the other guests.
//! - A client of another uid (`nobody`) cannot `fault` anything, sees only
//!   the disk allowed to it in `status`, cannot attach another tenant's
//!   disk over the control socket or vhost-user, and attaches its own;
//!   the owner's guest does verified I/O meanwhile. An operator uid may
//!   `fault` and see every disk, but attaches only what it is allowed.
//! - `[limits]` (docs/PROTOCOL.md §1.3): attach attempts beyond
//!   `attaches_per_second` get `EAGAIN`; guest memory beyond
//!   `max_guest_memory_mib` or `max_memory_regions` is refused, as a Xen
//!   region (`E2BIG`) and as a vhost-user memory table; hugetlbfs
//!   vhost-user memory is served if its huge pages can be allocated up
//!   front and refused otherwise; `fault poison` keeps a bounded list; a
//!   VMM repeating refused vhost-user requests writes a bounded log.
//!
//! Wherever a client misbehaves, a [`Bystander`] guest on another disk
//! runs verified I/O from before to after, and must see no error and no
//! wrong data.
#![deny(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::unistd::Pid;
use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_guest::device::BlockDevice;
use shadowback_guest::vhost_user::VhostUserBlkOptions;
use shadowback_ring::blkif::{BlkifRequest, BlkifRequestSegment, BLKIF_OP_READ, BLKIF_OP_WRITE};
use shadowback_ring::EventChannel;
use shadowback_testsupport::blockio::*;
use shadowback_testsupport::harness::*;
use shadowback_testsupport::process::*;
use shadowback_testsupport::raw_guest::*;
use shadowback_testsupport::temp::*;
use shadowback_testsupport::REPLY_TIMEOUT;
use shadowback_xenbus::{kind, Message, SeqPacket};

const EXE: &str = env!("CARGO_BIN_EXE_shadowback");
/// The supervisor's `RLIMIT_NOFILE` in the descriptor tests.
const SUPERVISOR_NOFILE: u64 = 256;
/// How long `shadowback status` may take to answer (generous: 2 busy
/// cores).
const STATUS_BOUND: Duration = Duration::from_secs(5);
/// How much the supervisor's log (at `info`) may grow while a client
/// misbehaves.
const LOG_GROWTH_BOUND: u64 = 256 * 1024;
/// The largest count an eventfd holds.
const EVENTFD_FULL: u64 = 0xffff_ffff_ffff_fffe;

/// A `shadowback up` child process with a lowered descriptor limit, two
/// disks and its log in a file; SIGKILLed on drop.
struct Up {
    child: Child,
    control: PathBuf,
    log: PathBuf,
    /// The disk a guest uses.
    guest_disk: String,
    /// A disk nobody attaches.
    other_disk: String,
    /// Removed after the process is killed (fields drop after `drop`).
    _dir: TempDir,
}

impl Up {
    /// `control_table`: the `[control]` table's lines.
    fn start(tag: &str, control_table: &str) -> Self {
        Self::start_with(tag, control_table, |_| [String::new(), String::new()])
    }

    /// As [`start`](Self::start); `disk_lines` gives, from the directory
    /// of the run, more lines for the guest disk's and the other disk's
    /// `[[disk]]` tables.
    fn start_with(
        tag: &str,
        control_table: &str,
        disk_lines: impl FnOnce(&Path) -> [String; 2],
    ) -> Self {
        let dir = TempDir::new(tag);
        let control = dir.path().join("control.sock");
        let guest_disk = unique_name(&format!("{tag}-g"));
        let other_disk = unique_name(&format!("{tag}-o"));
        let mut text = format!("socket = {control:?}\n[control]\n{control_table}\n");
        for (name, lines) in [&guest_disk, &other_disk]
            .into_iter()
            .zip(disk_lines(dir.path()))
        {
            let image = dir.path().join(format!("{name}.img"));
            make_image(&image, 16 << 20);
            let cache = match cache_for(&image) {
                shadowback_supervisor::CacheMode::None => "none",
                shadowback_supervisor::CacheMode::Writeback => "writeback",
            };
            text.push_str(&format!(
                "\n[[disk]]\nname = {name:?}\npath = {image:?}\ncache = {cache:?}\n{lines}\n"
            ));
        }
        let config = dir.path().join("shadowback.toml");
        std::fs::write(&config, text).expect("config");
        let log = dir.path().join("up.log");
        let mut cmd = Command::new(EXE);
        cmd.arg("up")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        lower_nofile(&mut cmd, SUPERVISOR_NOFILE);
        let child = cmd.spawn().expect("spawn shadowback up");
        let up = Up {
            child,
            control,
            log,
            guest_disk,
            other_disk,
            _dir: dir,
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Ok(list) = up.status() {
                let ready = list.iter().filter(|d| d["pid"].as_u64() > Some(0)).count();
                if ready == 2 {
                    return up;
                }
            }
            assert!(
                Instant::now() < deadline,
                "shadowback up did not come up:\n{}",
                up.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `shadowback status --json`, killed unless it answers within
    /// [`STATUS_BOUND`].
    fn status(&self) -> Result<Vec<serde_json::Value>, String> {
        self.status_as(Command::new(EXE))
    }

    /// `status` from `cmd` (`shadowback`, perhaps set to run as another
    /// user).
    fn status_as(&self, mut cmd: Command) -> Result<Vec<serde_json::Value>, String> {
        cmd.args(["status", "--json", "--socket"])
            .arg(&self.control);
        let out = run_bounded(cmd, STATUS_BOUND)?;
        if !out.status.success() {
            return Err(format!(
                "status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map_err(|e| format!("status output: {e}"))?
            .as_array()
            .cloned()
            .ok_or_else(|| "status output is not a list".to_string())
    }

    /// The status of `device`, failing the test if none comes.
    fn device(&self, device: &str) -> serde_json::Value {
        let list = self
            .status()
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
        list.into_iter()
            .find(|d| d["device"].as_str() == Some(device))
            .unwrap_or_else(|| panic!("{device} not in the status list"))
    }

    /// Descriptors the supervisor holds.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("--- shadowback up log (last 30 lines)\n{tail}")
    }

    /// The guest on [`guest_disk`](Self::guest_disk).
    fn attach_guest(&self) -> BlkFront {
        let mut cfg = BlkFrontConfig::new(&self.guest_disk);
        cfg.max_request_bytes = 64 * 1024;
        BlkFront::attach(&self.control, &cfg).expect("guest attaches")
    }

    /// SIGKILLs the guest disk's backend and waits (within 20 s) for the
    /// recovery counter to move past `before`.
    fn kill_backend_and_see_it_replaced(&self) {
        let dev = self.device(&self.guest_disk);
        let before = dev["recoveries"].as_u64().expect("recoveries");
        let pid = dev["pid"].as_u64().expect("pid") as i32;
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL the backend");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.device(&self.guest_disk);
            if now["recoveries"].as_u64() > Some(before) {
                assert_ne!(now["pid"].as_u64(), Some(pid as u64), "same backend");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the killed backend was not replaced: {now}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the supervisor's descriptors to come back to `baseline`
    /// (plus a little slack for backend pipes and timers).
    fn wait_fds_back_to(&self, baseline: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.fds();
            if now <= baseline + 8 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the supervisor still holds {now} descriptors (baseline {baseline})\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then a clean exit within 10 s.
    fn sigterm(mut self) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "shadowback up exited with {status}\n{}",
                    self.log_tail()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "shadowback up ignored SIGTERM for 10 s\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to its end with its output captured; killed, and an error,
/// if it takes longer than `bound`.
fn run_bounded(mut cmd: Command, bound: Duration) -> Result<std::process::Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {what}: {e}"))?;
    let deadline = Instant::now() + bound;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {bound:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().map_err(|e| e.to_string())
}

/// Sets the child's soft and hard `RLIMIT_NOFILE` to `n` before it execs.
#[allow(unsafe_code, reason = "`pre_exec`: setrlimit between fork and exec")]
fn lower_nofile(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit(2), which is async-signal-safe, on a stack value.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// One non-blocking connect to the control socket: `Ok(None)` when the
/// listener's backlog is full (the supervisor is not accepting).
fn connect_nonblocking(path: &Path) -> Result<Option<OwnedFd>, Errno> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => Ok(Some(fd)),
        Err(Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens up to `n` connections that never send anything, for at most 10 s.
fn open_idle(path: &Path, n: usize) -> Vec<OwnedFd> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = Vec::with_capacity(n);
    while held.len() < n && Instant::now() < deadline {
        match connect_nonblocking(path).expect("connect") {
            Some(fd) => held.push(fd),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    held
}

#[test]
fn idle_connections_beyond_the_descriptor_limit_wedge_nothing() {
    let up = Up::start("hc-idle", "");
    let mut guest = up.attach_guest();
    verified_io(&mut guest, 0, 1).expect("verified I/O before");
    let baseline_fds = up.fds();
    let log_before = up.log_len();
    let bystander = Bystander::start(guest, 2);

    // Far more idle connections than the supervisor has descriptors.
    let held = open_idle(&up.control, 3 * SUPERVISOR_NOFILE as usize);
    assert!(
        held.len() > SUPERVISOR_NOFILE as usize,
        "only {} connections could be opened: the supervisor stopped accepting\n{}",
        held.len(),
        up.log_tail()
    );
    // While they are held.
    assert_eq!(
        up.device(&up.other_disk)["given-up"].as_u64(),
        Some(0),
        "status while held"
    );
    bystander.progressing("while held");
    up.kill_backend_and_see_it_replaced();
    bystander.progressing("after the takeover");
    let while_held = up.fds();
    assert!(
        while_held < SUPERVISOR_NOFILE as usize,
        "the supervisor ran out of descriptors ({while_held})"
    );

    // After they are gone.
    drop(held);
    up.wait_fds_back_to(baseline_fds);
    assert!(up.device(&up.guest_disk)["connected"].as_u64() == Some(1));
    bystander.progressing("after");
    let (guest, _) = bystander.finish("idle connections");
    let grown = up.log_len() - log_before;
    assert!(
        grown < LOG_GROWTH_BOUND,
        "the log grew by {grown} bytes\n{}",
        up.log_tail()
    );

    // A fresh batch held while SIGTERM arrives.
    guest.detach().expect("guest detaches");
    let _held = open_idle(&up.control, SUPERVISOR_NOFILE as usize);
    up.sigterm();
}

#[test]
fn one_client_filling_the_socket_cannot_lock_out_another() {
    // No per-peer limit to speak of: the socket's own (half the
    // descriptors) is what holds.
    let up = Up::start(
        "hc-fill",
        "max_connections = 4096\nmax_connections_per_peer = 4096\nhandshake_timeout_ms = 600000",
    );
    // The guest attaches first: it connects from this process, the peer
    // that fills the socket, and a full socket never gives the peer
    // holding the most slots another one. (Attached after the `status`
    // calls below, it depended on the supervisor seeing the last status
    // client's EOF before its connect: refused 1 run in 9 with two busy
    // cores.) An attached guest holds no slot.
    let bystander = Bystander::start(up.attach_guest(), 31);
    let held = open_idle(&up.control, 2 * SUPERVISOR_NOFILE as usize);
    assert!(
        held.len() > SUPERVISOR_NOFILE as usize,
        "only {} connections could be opened\n{}",
        held.len(),
        up.log_tail()
    );
    // `status` comes from another process: it takes a slot of ours.
    for _ in 0..3 {
        assert_eq!(up.device(&up.other_disk)["given-up"].as_u64(), Some(0));
    }
    bystander.progressing("while the socket is full");
    up.kill_backend_and_see_it_replaced();
    bystander.progressing("after the takeover");
    let fds = up.fds();
    assert!(
        fds < SUPERVISOR_NOFILE as usize,
        "the supervisor ran out of descriptors ({fds})"
    );
    let (guest, _) = bystander.finish("a full socket");
    guest.detach().expect("guest detaches");
    up.sigterm();
}

#[test]
fn a_connect_close_storm_wedges_nothing() {
    let up = Up::start("hc-storm", "");
    let mut guest = up.attach_guest();
    verified_io(&mut guest, 0, 11).expect("verified I/O before");
    let baseline_fds = up.fds();
    let log_before = up.log_len();

    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let stormers: Vec<_> = (0..3)
        .map(|i| {
            let (stop, cycles) = (stop.clone(), cycles.clone());
            let path = up.control.clone();
            let device = up.other_disk.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(fd)) = connect_nonblocking(&path) else {
                        std::thread::yield_now();
                        continue;
                    };
                    // One thread only connects and closes, one probes
                    // first, one sends bytes that are not a message.
                    if i % 3 == 1 {
                        let sock = SeqPacket::from_fd(fd).expect("seqpacket");
                        let _ = send_raw(
                            &sock,
                            &Message::probe(&device).encode().unwrap_or_default(),
                            &[],
                        );
                    } else if i % 3 == 2 {
                        let sock = SeqPacket::from_fd(fd).expect("seqpacket");
                        let _ = send_raw(&sock, b"\xff\xfe not a message", &[]);
                    }
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let bystander = Bystander::start(guest, 20);
    let storm_end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < storm_end {
        let dev = up.device(&up.other_disk);
        assert_eq!(dev["given-up"].as_u64(), Some(0), "status during the storm");
        bystander.progressing("during the storm");
    }
    up.kill_backend_and_see_it_replaced();
    bystander.progressing("after the takeover");
    stop.store(true, Ordering::Relaxed);
    for s in stormers {
        s.join().expect("storm thread");
    }
    let cycles = cycles.load(Ordering::Relaxed);
    assert!(cycles > 500, "the storm made only {cycles} connections");

    up.wait_fds_back_to(baseline_fds);
    bystander.progressing("after the storm");
    let (guest, _) = bystander.finish("a connect/close storm");
    let grown = up.log_len() - log_before;
    assert!(
        grown < LOG_GROWTH_BOUND,
        "the log grew by {grown} bytes over {cycles} connections\n{}",
        up.log_tail()
    );
    guest.detach().expect("guest detaches");
    up.sigterm();
}

// ---------------------------------------------------------------------
// A blocking eventfd at its maximum count.
// ---------------------------------------------------------------------

/// A blocking eventfd already at its maximum count.
fn full_blocking_eventfd() -> OwnedFd {
    let fd: OwnedFd =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
            .expect("eventfd")
            .into();
    nix::unistd::write(&fd, &EVENTFD_FULL.to_ne_bytes()).expect("fill the eventfd");
    fd
}

/// The count of an eventfd, read without blocking (0 when empty).
fn eventfd_count(fd: &impl std::os::fd::AsFd) -> u64 {
    let ch = EventChannel::from_fd(fd.as_fd().try_clone_to_owned().expect("dup")).expect("wrap");
    ch.drain().expect("drain")
}

/// Waits (without reading any eventfd) for the response to the one
/// outstanding request on `guest`'s ring.
fn ring_response(guest: &mut RawGuest, id: u64) -> Result<i16, String> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        if let Some(rsp) = guest
            .mem
            .ring
            .take_response()
            .map_err(|e| format!("take_response: {e}"))?
        {
            if rsp.id != id {
                return Err(format!("response to id {} instead of {id}", rsp.id));
            }
            return Ok(rsp.status);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "request {id} not answered within {REPLY_TIMEOUT:?}: the backend is blocked"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Puts one one-page request on the ring and kicks.
fn put(guest: &mut RawGuest, op: u8, sector: u64, id: u64) {
    let mut req = BlkifRequest {
        operation: op,
        nr_segments: 1,
        sector_number: sector,
        id,
        ..Default::default()
    };
    req.seg[0] = BlkifRequestSegment {
        gref: raw_data_gref(0),
        first_sect: 0,
        last_sect: 7,
        _pad: [0; 2],
    };
    guest.mem.ring.put_request(&req).expect("put_request");
    if guest.mem.ring.push_requests().expect("push") {
        guest.mem.kick.notify().expect("kick");
    }
}

#[test]
fn a_full_blocking_notify_eventfd_blocks_no_ring_backend() {
    let hostile = unique_name("hc-evtchn");
    let other = unique_name("hc-evtchn-o");
    let h = Harness::start(
        "hc-evtchn",
        &[DiskSpec::new(&hostile, 16), DiskSpec::new(&other, 16)],
    );
    let mut mem = RawRegion::new(0);
    mem.notify = EventChannel::from_fd(full_blocking_eventfd()).expect("notify");
    let control = SeqPacket::connect(h.socket()).expect("connect");
    control.send(&Message::probe(&hostile), &[]).expect("probe");
    expect_kind(&control, kind::BACKEND).expect("backend");
    send_raw(
        &control,
        &encode_text(kind::CONNECT, &connect_keys(&hostile)),
        &mem.fds(),
    )
    .expect("send connect");
    expect_kind(&control, kind::CONNECTED).expect("connected");
    let mut guest = RawGuest { control, mem };
    let backend = backend_pid(&hostile);

    let bystander = Bystander::start(
        BlkFront::attach(h.socket(), &BlkFrontConfig::new(&other)).expect("attach"),
        100,
    );
    for round in 0..6u64 {
        let data = pattern(round, 4096);
        let sector = 8 * round;
        guest
            .mem
            .region
            .write(RawGuest::data_offset(0), &data)
            .expect("fill page");
        put(&mut guest, BLKIF_OP_WRITE, sector, 2 * round);
        assert_eq!(ring_response(&mut guest, 2 * round), Ok(0), "write {round}");
        guest
            .mem
            .region
            .write(RawGuest::data_offset(0), &[0u8; 4096])
            .expect("clear page");
        put(&mut guest, BLKIF_OP_READ, sector, 2 * round + 1);
        assert_eq!(
            ring_response(&mut guest, 2 * round + 1),
            Ok(0),
            "read {round}"
        );
        let mut back = vec![0u8; 4096];
        guest
            .mem
            .region
            .read(RawGuest::data_offset(0), &mut back)
            .expect("read page");
        assert!(back == data, "round {round}: read back other data");
        bystander.progressing(&format!("round {round}"));
    }
    assert_eq!(
        eventfd_count(&guest.mem.notify),
        EVENTFD_FULL,
        "the notify counter moved"
    );
    assert_eq!(backend_pid(&hostile), backend, "the backend was replaced");
    let (front, _) = bystander.finish("a full blocking notify eventfd");
    front.detach().expect("detach");
    guest
        .control
        .send(&Message::new(kind::CLOSE), &[])
        .expect("close");
    expect_kind(&guest.control, kind::CLOSED).expect("closed");
    h.stop();
}

/// `VIRTIO_BLK_T_OUT` (virtio 1.2 §5.2.6).
const VIRTIO_BLK_T_OUT: u32 = 1;

#[test]
fn a_full_blocking_call_eventfd_blocks_no_vhost_user_backend() {
    let name = unique_name("hc-call");
    let setup = DiskSetup::start("hc-call", &name, 16, with_vhost_user(|_| {}), &[]);
    let mut dev = setup.connect_with(VhostUserBlkOptions {
        queues: 1,
        event_idx: false,
        ..VhostUserBlkOptions::default()
    });
    // The frontend fills the counter of the call eventfd it handed over
    // and clears O_NONBLOCK on it (the open file description is shared).
    let call = dev
        .transport()
        .call_fd(0)
        .expect("call fd")
        .try_clone_to_owned()
        .expect("dup");
    let flags =
        OFlag::from_bits_truncate(fcntl(call.as_raw_fd(), FcntlArg::F_GETFL).expect("getfl"));
    assert!(flags.contains(OFlag::O_NONBLOCK), "the client's call fd");
    loop {
        // The backend may have signalled already: empty the counter first.
        eventfd_count(&call);
        match nix::unistd::write(&call, &EVENTFD_FULL.to_ne_bytes()) {
            Ok(_) => break,
            Err(Errno::EAGAIN) => continue,
            Err(e) => panic!("filling the call eventfd: {e}"),
        }
    }
    fcntl(
        call.as_raw_fd(),
        FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK),
    )
    .expect("setfl");

    let image = std::fs::File::open(setup.image()).expect("image");
    for round in 0..8u64 {
        let before = dev.transport().used_idx(0).expect("used idx");
        let data = pattern(round, 4096);
        let sector = 8 * round;
        dev.submit_raw(round, VIRTIO_BLK_T_OUT, sector, &data, 0)
            .expect("submit");
        dev.kick().expect("kick");
        // Completion seen in the used ring; the call eventfd is never read.
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while dev.transport().used_idx(0).expect("used idx") == before {
            assert!(
                Instant::now() < deadline,
                "write {round} not completed within {REPLY_TIMEOUT:?}: {:#?}",
                setup.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut back = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&image, &mut back, sector * 512)
            .expect("read the image");
        assert!(back == data, "write {round} did not land");
    }
    // The supervisor still answers on its control socket.
    let sock = SeqPacket::connect(setup.dir().join("control.sock")).expect("connect");
    sock.send(&Message::new(kind::STATUS), &[]).expect("status");
    expect_kind(&sock, kind::STATUS).expect("a status answer");
    let stats = setup.stats();
    assert!(
        !stats.given_up && stats.hangs == 0 && stats.crashes == 0 && stats.recoveries == 0,
        "the disk was disturbed: {stats:#?}"
    );
    assert_eq!(eventfd_count(&call), EVENTFD_FULL, "the call counter moved");
    // Hand the client its non-blocking eventfd back before it shuts down.
    fcntl(call.as_raw_fd(), FcntlArg::F_SETFL(flags)).expect("setfl");
    drop(dev);
    setup.stop();
}

// ---------------------------------------------------------------------
// Guest memory that can fault.
// ---------------------------------------------------------------------

/// A `connect` of `device` offering `region` as guest memory (with two
/// fresh eventfds); the socket, for its answer.
fn connect_with_region(control: &Path, device: &str, region: &impl AsRawFd) -> SeqPacket {
    let (kick, notify) = (
        EventChannel::new().expect("eventfd"),
        EventChannel::new().expect("eventfd"),
    );
    let sock = SeqPacket::connect(control).expect("connect");
    send_raw(
        &sock,
        &encode_text(kind::CONNECT, &connect_keys(device)),
        &[
            region.as_raw_fd(),
            kick.as_fd().as_raw_fd(),
            notify.as_fd().as_raw_fd(),
        ],
    )
    .expect("send connect");
    sock
}

#[test]
fn hugetlbfs_guest_memory_is_refused_and_the_supervisor_keeps_serving() {
    let up = Up::start("hc-huge", "");
    let bystander = Bystander::start(up.attach_guest(), 51);
    bystander.progressing("before");

    // Sealed like a good region: only its file system tells it apart.
    let region = shadowback_testsupport::fd::hugetlbfs_memfd(
        2 << 20,
        SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
    );
    let hostile = connect_with_region(&up.control, &up.other_disk, &region);
    expect_refusal(&hostile, shadowback_xenbus::ErrorCode::Einval)
        .unwrap_or_else(|e| panic!("{e}\n{}", up.log_tail()));

    bystander.progressing("after the refusal");
    let other = up.device(&up.other_disk);
    assert_eq!(
        (
            other["given-up"].as_u64(),
            other["connected"].as_u64(),
            other["crashes"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{other}"
    );
    // The other disk is still there for a well-behaved guest.
    let mut cfg = BlkFrontConfig::new(&up.other_disk);
    cfg.max_request_bytes = 64 * 1024;
    let mut second = BlkFront::attach(&up.control, &cfg).expect("a good guest attaches");
    verified_io(&mut second, 0, 53).expect("verified I/O on the other disk");
    second.detach().expect("detach");
    let (guest, _) = bystander.finish("a hugetlbfs region");
    guest.detach().expect("guest detaches");
    up.sigterm();
}

// ---------------------------------------------------------------------
// Tenants and roles.
// ---------------------------------------------------------------------

/// The uid and gid another tenant's clients run as (`nobody`).
const NOBODY: u32 = 65534;
/// How long a client of another tenant may take (a guest process runs
/// its workload for a second, then checks the whole disk).
const CLIENT_BOUND: Duration = Duration::from_secs(60);

/// `shadowback`, to be run as `nobody`.
fn as_nobody() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(EXE);
    cmd.uid(NOBODY).gid(NOBODY);
    cmd
}

/// A `shadowback guest blk` process as `nobody` with `args`.
fn guest_as_nobody(args: &[&str]) -> GuestProcess {
    use std::os::unix::process::CommandExt;
    let mut cmd = GuestProcess::command();
    cmd.uid(NOBODY).gid(NOBODY).args(args);
    GuestProcess::start(cmd)
}

impl Up {
    /// A verifying Xen guest process as `nobody` on `device` for a second:
    /// its report, or why it failed.
    fn xen_guest_as_nobody(
        &self,
        device: &str,
    ) -> Result<shadowback_guest::workload::Report, String> {
        let socket = self.control.to_str().expect("utf-8 path");
        guest_as_nobody(&["--socket", socket, "--device", device, "--duration", "1"])
            .finish(CLIENT_BOUND)
    }

    /// `shadowback fault DEVICE ACTION` as `nobody`.
    fn fault_as_nobody(&self, device: &str, action: &str) -> std::process::Output {
        let mut cmd = as_nobody();
        cmd.args(["fault", device, action, "--socket"])
            .arg(&self.control);
        run_bounded(cmd, STATUS_BOUND).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `shadowback fault DEVICE ACTION` as `nobody`: its stderr, or a panic if
/// the fault was accepted.
fn refused_fault(up: &Up, device: &str, action: &str) -> String {
    let out = up.fault_as_nobody(device, action);
    assert!(
        !out.status.success(),
        "fault {device} {action} was accepted"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Lets every local user connect to the socket at `path`: its file mode is
/// the first gate, the supervisor's allow lists the second.
fn open_to_everyone(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

#[test]
fn a_client_of_another_uid_reaches_only_what_it_is_allowed() {
    let mut vhost = PathBuf::new();
    let up = Up::start_with("hc-uid", "", |dir| {
        vhost = dir.join("guest.vhost");
        [
            format!("vhost_user = {vhost:?}"),
            format!("allow_uids = [{NOBODY}]"),
        ]
    });
    open_to_everyone(&up.control);
    open_to_everyone(&vhost);

    // The guest disk is free, but not nobody's: over the control socket
    // and over vhost-user alike.
    let refused = up
        .xen_guest_as_nobody(&up.guest_disk)
        .expect_err("nobody attached the guest disk");
    assert!(refused.contains("EACCES"), "{refused}");
    let refused = guest_as_nobody(&[
        "--transport",
        "vhost-user",
        "--socket",
        vhost.to_str().unwrap(),
        "--duration",
        "1",
    ])
    .finish(CLIENT_BOUND)
    .expect_err("nobody attached the guest disk over vhost-user");
    let dev = up.device(&up.guest_disk);
    assert_eq!(dev["connected"].as_u64(), Some(0), "{refused}\n{dev}");

    // Its owner's guest does verified I/O while nobody tries everything.
    let bystander = Bystander::start(up.attach_guest(), 70);
    for (device, action) in [
        (&up.guest_disk, "kill"),
        (&up.guest_disk, "poison"),
        (&up.other_disk, "kill"),
    ] {
        let why = refused_fault(&up, device, action);
        assert!(why.contains("EACCES") && why.contains("operator"), "{why}");
    }
    let seen: Vec<_> = up
        .status_as(as_nobody())
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|d| d["device"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        seen,
        std::slice::from_ref(&up.other_disk),
        "nobody's status"
    );
    let report = up
        .xen_guest_as_nobody(&up.other_disk)
        .expect("nobody's own disk");
    assert!(
        report.ops > 0 && report.io_errors == 0 && report.verify_failures == 0,
        "{report:?}"
    );

    bystander.progressing("after nobody's attempts");
    let (guest, _) = bystander.finish("another uid's client");
    guest.detach().expect("guest detaches");
    let dev = up.device(&up.guest_disk);
    // No fault reached it. (Its backend may still have been replaced: on
    // two busy cores the watchdog can find a heartbeat 100 ms late — a
    // hang, not a crash; seen once in six runs.)
    assert_eq!(
        (dev["crashes"].as_u64(), dev["poisoned"].as_u64()),
        (Some(0), Some(0)),
        "{dev}"
    );
    assert_eq!(
        up.status().expect("status").len(),
        2,
        "root sees every disk"
    );
    up.sigterm();
}

#[test]
fn an_operator_uid_may_fault_and_see_every_disk() {
    let up = Up::start("hc-op", &format!("operator_uids = [{NOBODY}]"));
    open_to_everyone(&up.control);
    let seen = up.status_as(as_nobody()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen.len(), 2, "an operator's status: {seen:?}");
    let before = up.device(&up.other_disk)["pid"].as_u64();
    let out = up.fault_as_nobody(&up.other_disk, "kill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.device(&up.other_disk)["pid"].as_u64() == before {
        assert!(
            Instant::now() < deadline,
            "the killed backend was not replaced"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // An operator is not a tenant: attaching still takes the disk's lists.
    let refused = up
        .xen_guest_as_nobody(&up.guest_disk)
        .expect_err("an operator attached a disk not allowed to it");
    assert!(refused.contains("EACCES"), "{refused}");
    up.sigterm();
}

// ---------------------------------------------------------------------
// Bounded resources per device (`[limits]`, docs/PROTOCOL.md §1.3).
// ---------------------------------------------------------------------

/// A `[limits]` table with `lines`, to follow the `[control]` lines given
/// to [`Up::start`].
fn limits_table(lines: &str) -> String {
    format!("\n[limits]\n{lines}\n")
}

/// A raw `connect` of `device` with a good raw region: the error code of
/// the answer, or `connected` (then the connection is closed again).
fn raw_connect_answer(control: &Path, device: &str) -> String {
    let mem = RawRegion::new(0);
    let sock = SeqPacket::connect(control).expect("connect");
    send_raw(
        &sock,
        &encode_text(kind::CONNECT, &connect_keys(device)),
        &mem.fds(),
    )
    .expect("send connect");
    let (answer, _) = sock
        .recv_timeout(REPLY_TIMEOUT)
        .expect("recv")
        .expect("an answer to connect");
    match answer.kind() {
        kind::ERROR => answer.get("code").unwrap_or("no code").to_string(),
        other => other.to_string(),
    }
}

#[test]
fn attach_attempts_beyond_attaches_per_second_get_eagain() {
    let up = Up::start("hc-rate", &limits_table("attaches_per_second = 2"));
    let bystander = Bystander::start(up.attach_guest(), 81);
    // The other disk's first attach stays: later attempts that get past
    // the rate are EBUSY, and cost nothing but the refusal.
    let mut cfg = BlkFrontConfig::new(&up.other_disk);
    cfg.max_request_bytes = 64 * 1024;
    let first = BlkFront::attach(&up.control, &cfg).expect("the first attach");
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..50 {
        answers.push(raw_connect_answer(&up.control, &up.other_disk));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let busy = answers.iter().filter(|a| *a == "EBUSY").count();
    let again = answers.iter().filter(|a| *a == "EAGAIN").count();
    assert_eq!(busy + again, answers.len(), "{answers:?}");
    assert!(
        again > 0,
        "no attempt was refused for its rate: {answers:?}"
    );
    // One token was left after the first attach, and 2 more a second.
    let allowed = 1 + (2.0 * elapsed).ceil() as usize;
    assert!(
        busy <= allowed,
        "{busy} attempts in {elapsed:.2} s got past a rate of 2/s: {answers:?}"
    );
    bystander.progressing("while the other disk's attaches are refused");
    // The rate refills: a second later a new guest attaches.
    first.detach().expect("detach");
    std::thread::sleep(Duration::from_secs(1));
    let mut again = BlkFront::attach(&up.control, &cfg).expect("an attach a second later");
    verified_io(&mut again, 0, 82).expect("verified I/O on the other disk");
    again.detach().expect("detach");
    let (guest, _) = bystander.finish("attach attempts beyond the rate");
    guest.detach().expect("guest detaches");
    up.sigterm();
}

/// Runs `f` on a raw vhost-user frontend connected to `path` and set up
/// as a VMM would: features, `REPLY_ACK` (every request then asks for an
/// acknowledgement), `SET_OWNER`. The socket is shut down if the
/// supervisor takes more than [`REPLY_TIMEOUT`], so nothing hangs.
fn with_raw_vhost_frontend<T>(
    path: &Path,
    f: impl FnOnce(&mut vhost::vhost_user::Frontend) -> Result<T, String>,
) -> Result<T, String> {
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
    use vhost::VhostBackend;

    const VERSION_1: u64 = 1 << 32;
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    let watched = stream.try_clone().map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + REPLY_TIMEOUT;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !done.load(Ordering::Relaxed) {
                let _ = watched.shutdown(std::net::Shutdown::Both);
            }
        })
    };
    let answer = (|| {
        let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
        let mut fe = Frontend::from_stream(stream, 1);
        let features = fe.get_features().map_err(e("GET_FEATURES"))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_features(features & (VERSION_1 | protocol))
            .map_err(e("SET_FEATURES"))?;
        let offered = fe
            .get_protocol_features()
            .map_err(e("GET_PROTOCOL_FEATURES"))?;
        assert!(offered.contains(VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .map_err(e("SET_PROTOCOL_FEATURES"))?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_owner().map_err(e("SET_OWNER"))?;
        f(&mut fe)
    })();
    done.store(true, Ordering::Relaxed);
    watchdog.join().expect("watchdog");
    answer
}

/// Offers `regions` (memfd, size) as guest memory over the vhost-user
/// socket at `path` with `SET_MEM_TABLE`: `Ok` if it was acknowledged,
/// else why not.
fn offer_memory_table(path: &Path, regions: &[(&std::fs::File, u64)]) -> Result<(), String> {
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
    with_raw_vhost_frontend(path, |fe| {
        let mut gpa = 0u64;
        let table: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|(file, size)| {
                let region = VhostUserMemoryRegionInfo {
                    guest_phys_addr: gpa,
                    memory_size: *size,
                    userspace_addr: 0x7f00_0000_0000 + gpa,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                };
                gpa += size;
                region
            })
            .collect();
        fe.set_mem_table(&table)
            .map(|_| ())
            .map_err(|e| format!("SET_MEM_TABLE: {e}"))
    })
}

/// A shmem memfd of `bytes`, sealed against shrinking.
fn sealed_memfd(bytes: u64) -> std::fs::File {
    use shadowback_testsupport::fd::{add_seals, sealable_memfd};
    let file = sealable_memfd(bytes, true);
    add_seals(&file, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW);
    file
}

#[test]
fn guest_memory_beyond_the_limits_is_refused() {
    const MIB: u64 = 1 << 20;
    let mut vhost = PathBuf::new();
    let up = Up::start_with(
        "hc-mem",
        &limits_table("max_guest_memory_mib = 8\nmax_memory_regions = 1"),
        |dir| {
            vhost = dir.join("other.vhost");
            [String::new(), format!("vhost_user = {vhost:?}")]
        },
    );
    let bystander = Bystander::start(up.attach_guest(), 91);

    // A Xen region of 16 MiB, good in every other way.
    let region = sealed_memfd(16 * MIB);
    let hostile = connect_with_region(&up.control, &up.other_disk, &region);
    expect_refusal(&hostile, shadowback_xenbus::ErrorCode::E2big)
        .unwrap_or_else(|e| panic!("{e}\n{}", up.log_tail()));
    // A small one that could grow after the check: it counts as the
    // 4 GiB a Xen region may grow to.
    let growable = shadowback_testsupport::fd::sealable_memfd(MIB, true);
    shadowback_testsupport::fd::add_seals(&growable, SealFlag::F_SEAL_SHRINK);
    let hostile = connect_with_region(&up.control, &up.other_disk, &growable);
    expect_refusal(&hostile, shadowback_xenbus::ErrorCode::E2big)
        .unwrap_or_else(|e| panic!("a growable region: {e}\n{}", up.log_tail()));
    bystander.progressing("after the Xen refusals");

    // A vhost-user memory table: too large, too many regions, then one
    // within both limits.
    let big = sealed_memfd(16 * MIB);
    let small = [sealed_memfd(MIB), sealed_memfd(MIB)];
    let why =
        offer_memory_table(&vhost, &[(&big, 16 * MIB)]).expect_err("a 16 MiB table was accepted");
    assert!(why.contains("SET_MEM_TABLE"), "{why}");
    let why = offer_memory_table(&vhost, &[(&small[0], MIB), (&small[1], MIB)])
        .expect_err("two regions were accepted");
    assert!(why.contains("SET_MEM_TABLE"), "{why}");
    offer_memory_table(&vhost, &[(&small[0], MIB)]).expect("one region of 1 MiB");
    bystander.progressing("after the vhost-user refusals");

    let other = up.device(&up.other_disk);
    assert_eq!(
        (other["crashes"].as_u64(), other["given-up"].as_u64()),
        (Some(0), Some(0)),
        "{other}"
    );
    let log = std::fs::read_to_string(&up.log).unwrap_or_default();
    assert!(
        log.contains("max_guest_memory_mib") && log.contains("max_memory_regions"),
        "the refusals do not name their limits\n{}",
        up.log_tail()
    );
    // The other disk still serves a guest within the limits.
    let mut cfg = BlkFrontConfig::new(&up.other_disk);
    cfg.max_request_bytes = 64 * 1024;
    let mut second = BlkFront::attach(&up.control, &cfg).expect("a guest within the limits");
    verified_io(&mut second, 0, 92).expect("verified I/O on the other disk");
    second.detach().expect("detach");
    let (guest, _) = bystander.finish("guest memory beyond the limits");
    guest.detach().expect("guest detaches");
    up.sigterm();
}

/// Huge pages free on this host (`HugePages_Free`).
fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn hugetlbfs_vhost_user_memory_is_served_or_refused_and_the_supervisor_keeps_serving() {
    const HUGE: u64 = 2 << 20;
    let mut vhost = PathBuf::new();
    let up = Up::start_with("hc-vhuge", "", |dir| {
        vhost = dir.join("other.vhost");
        [String::new(), format!("vhost_user = {vhost:?}")]
    });
    let bystander = Bystander::start(up.attach_guest(), 101);
    // Served when the host can supply its huge page up front (the
    // supervisor allocates it), refused otherwise: never a SIGBUS later.
    let can_back = free_huge_pages() >= 1;
    let region = shadowback_testsupport::fd::hugetlbfs_memfd(HUGE, SealFlag::empty());
    let answer = offer_memory_table(&vhost, &[(&region, HUGE)]);
    match (can_back, &answer) {
        (true, Ok(())) => {}
        (false, Err(why)) => assert!(why.contains("SET_MEM_TABLE"), "{why}"),
        _ => panic!(
            "huge pages free: {can_back}; the table was answered {answer:?}\n{}",
            up.log_tail()
        ),
    }
    bystander.progressing("after the hugetlbfs table");
    let other = up.device(&up.other_disk);
    assert_eq!(
        (other["crashes"].as_u64(), other["given-up"].as_u64()),
        (Some(0), Some(0)),
        "{other}"
    );
    // A VMM with ordinary memory is served on the same socket.
    let report = GuestProcess::start({
        let mut cmd = GuestProcess::command();
        cmd.args(["--transport", "vhost-user", "--socket"])
            .arg(&vhost)
            .args(["--duration", "1"]);
        cmd
    })
    .finish(CLIENT_BOUND)
    .expect("a vhost-user guest with shmem memory");
    assert!(
        report.ops > 0 && report.io_errors == 0 && report.verify_failures == 0,
        "{report:?}"
    );
    let (guest, _) = bystander.finish("hugetlbfs vhost-user memory");
    guest.detach().expect("guest detaches");
    up.sigterm();
}

#[test]
fn poisoned_sectors_are_bounded_per_device() {
    use shadowback_supervisor::Fault;
    let up = Up::start("hc-poison", "");
    let sock = SeqPacket::connect(&up.control).expect("connect");
    let mut answers = Vec::new();
    for sector in 0..=64u64 {
        let msg = Fault::Poison {
            sector: 1_000_000 + sector,
        }
        .to_message(&up.other_disk);
        sock.send(&msg, &[]).expect("send fault");
        let (answer, _) = sock
            .recv_timeout(REPLY_TIMEOUT)
            .expect("recv")
            .expect("an answer to fault");
        answers.push(answer);
    }
    let (last, kept) = answers.split_last().expect("answers");
    assert!(kept.iter().all(|a| a.kind() == kind::OK), "{kept:?}");
    assert_eq!(
        (last.kind(), last.get("code")),
        (kind::ERROR, Some("E2BIG")),
        "{last}"
    );
    // A sector poisoned already is no new entry.
    let sock = SeqPacket::connect(&up.control).expect("connect");
    sock.send(
        &Fault::Poison { sector: 1_000_000 }.to_message(&up.other_disk),
        &[],
    )
    .expect("send fault");
    expect_kind(&sock, kind::OK).expect("a repeated poison");
    up.sigterm();
}

#[test]
fn a_vmm_repeating_refused_requests_writes_a_bounded_log() {
    use vhost::VhostBackend;
    const REFUSED: u32 = 3000;
    let mut vhost = PathBuf::new();
    let up = Up::start_with("hc-vlog", "", |dir| {
        vhost = dir.join("other.vhost");
        [String::new(), format!("vhost_user = {vhost:?}")]
    });
    let bystander = Bystander::start(up.attach_guest(), 111);
    let log_before = up.log_len();
    // A virtqueue size that is not a power of two, over and over: each
    // is refused (a failed acknowledgement) and the connection stays.
    let refused = with_raw_vhost_frontend(&vhost, |fe| {
        let mut refused = 0;
        for _ in 0..REFUSED {
            if fe.set_vring_num(0, 3).is_err() {
                refused += 1;
            }
        }
        Ok(refused)
    })
    .expect("a raw vhost-user frontend");
    assert_eq!(refused, REFUSED, "every bad SET_VRING_NUM is refused");
    // And connections that hang up at once.
    for _ in 0..300 {
        drop(std::os::unix::net::UnixStream::connect(&vhost).expect("connect"));
    }
    bystander.progressing("after the refused requests");
    let grown = up.log_len() - log_before;
    assert!(
        grown < LOG_GROWTH_BOUND,
        "the log grew by {grown} bytes over {REFUSED} refused requests\n{}",
        up.log_tail()
    );
    let other = up.device(&up.other_disk);
    assert_eq!(other["crashes"].as_u64(), Some(0), "{other}");
    let (guest, _) = bystander.finish("a VMM repeating refused requests");
    guest.detach().expect("guest detaches");
    up.sigterm();
}
