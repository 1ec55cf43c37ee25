//! Shared harness of the end-to-end tests: temporary directories and disk
//! images, a real supervisor whose backends are `shadowback blkback`
//! processes, a hand-rolled frontend for raw control-socket clients, and
//! verified block I/O.
//!
//! Each test binary uses a different subset of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, Status};
use shadowback_guest::vhost_user::{VhostUserBlk, VhostUserBlkOptions};
use shadowback_guest::workload::{Report, VerifyConfig, VerifyWorkload};
use shadowback_ring::blkif::{Blkif, BlkifRequest, BlkifResponse};
use shadowback_ring::grant::GrantTable;
use shadowback_ring::sring::{FrontRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion, PAGE_SIZE};
use shadowback_supervisor::{
    BackendCommand, CacheMode, Config, DeviceStats, DiskConfig, Fault, SupervisorThread,
};
use shadowback_xenbus::{kind, ErrorCode, Message, SeqPacket, XenbusError};

/// How long any single control-socket answer or block request may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: u64 = PAGE_SIZE as u64;

/// A directory under the system temp dir, removed (with its content) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sbt-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A device name no other test (or concurrent run) uses: the backend
/// process is found by it.
pub fn unique_name(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// A sparse image of `mib` MiB.
pub fn make_image(path: &Path, mib: u64) {
    File::create(path)
        .and_then(|f| f.set_len(mib * 1024 * 1024))
        .expect("create disk image");
}

/// `cache = "none"` (O_DIRECT) where the file system supports it.
pub fn cache_for(image: &Path) -> CacheMode {
    CacheMode::best_for(image)
}

/// `shadowback blkback`, the real backend binary.
pub fn backend_command() -> BackendCommand {
    BackendCommand {
        program: env!("CARGO_BIN_EXE_shadowback").into(),
        args: vec!["blkback".into()],
        env: Vec::new(),
    }
}

/// One disk to export in a [`Harness`].
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub mib: u64,
    pub backend_id: u16,
    pub max_ring_page_order: u8,
    /// Exported read-only (`mode=r`).
    pub readonly: bool,
}

impl DiskSpec {
    pub fn new(name: impl Into<String>, mib: u64) -> Self {
        DiskSpec {
            name: name.into(),
            mib,
            backend_id: 0,
            max_ring_page_order: 4,
            readonly: false,
        }
    }

    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    pub fn backend_id(mut self, id: u16) -> Self {
        self.backend_id = id;
        self
    }

    pub fn max_ring_page_order(mut self, order: u8) -> Self {
        self.max_ring_page_order = order;
        self
    }
}

/// A supervisor thread serving temp images; stopped (backends killed) and
/// its directory removed on drop.
pub struct Harness {
    // Dropped first: stop the supervisor before removing its files.
    supervisor: Option<SupervisorThread>,
    socket: PathBuf,
    dir: TempDir,
}

impl Harness {
    pub fn start(tag: &str, disks: &[DiskSpec]) -> Self {
        let dir = TempDir::new(tag);
        let disks = disks
            .iter()
            .map(|d| {
                let path = dir.path().join(format!("{}.img", d.name));
                make_image(&path, d.mib);
                DiskConfig {
                    name: d.name.clone(),
                    cache: cache_for(&path),
                    path,
                    readonly: d.readonly,
                    backend_id: d.backend_id,
                    max_ring_page_order: d.max_ring_page_order,
                    discard: true,
                    // backend_pid() expects one blkback process per device.
                    standby: false,
                    ..DiskConfig::new(d.name.clone(), "")
                }
            })
            .collect();
        let socket = dir.path().join("control.sock");
        let cfg = Config {
            socket: socket.clone(),
            control: Default::default(),
            disks,
        };
        let supervisor = SupervisorThread::start(cfg, backend_command()).expect("start supervisor");
        Harness {
            supervisor: Some(supervisor),
            socket,
            dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The image file of the disk named `name`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    /// Stops the supervisor and reports how that went.
    pub fn stop(mut self) {
        if let Some(s) = self.supervisor.take() {
            s.stop().expect("supervisor stopped with an error");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            let _ = s.stop();
        }
    }
}

/// `(pid, ppid, state)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: parse after the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Live (non-zombie) processes whose command line is
/// `… blkback … --device <device> …` and whose parent is `parent`.
pub fn backend_pids(device: &str, parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_blkback = args.iter().any(|a| *a == b"blkback");
        let names_device = args
            .windows(2)
            .any(|w| w[0] == b"--device" && w[1] == device.as_bytes());
        if !(is_blkback && names_device) {
            continue;
        }
        match proc_stat(pid) {
            Some((ppid, state)) if ppid == parent && state != 'Z' => found.push(pid),
            _ => {}
        }
    }
    found
}

/// The one backend process of `device`, a child of this test process.
/// Waits for it: the control socket is listening before the backends are
/// spawned, and a forked child shows its parent's command line until it
/// has exec'd.
pub fn backend_pid(device: &str) -> u32 {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let pids = backend_pids(device, std::process::id());
        if pids.len() == 1 || Instant::now() > deadline {
            assert_eq!(
                pids.len(),
                1,
                "expected exactly one blkback process for {device}, found {pids:?}"
            );
            return pids[0];
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is still running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((_, state)) if state != 'Z')
}

/// Deterministic bytes for a seed (splitmix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Submits one request and waits for its completion.
pub fn complete_one(
    dev: &mut dyn BlockDevice,
    req: &BlockRequest<'_>,
) -> Result<Completion, String> {
    const TAG: u64 = 0x7e57;
    dev.submit(TAG, req)
        .map_err(|e| format!("submit {:?}: {e}", req.op))?;
    dev.kick().map_err(|e| format!("kick: {e}"))?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut out = Vec::new();
    while out.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "{:?} at sector {} not completed within {REPLY_TIMEOUT:?}",
                req.op, req.sector
            ));
        }
        dev.poll_completions(Duration::from_millis(100), &mut out)
            .map_err(|e| format!("poll for {:?}: {e}", req.op))?;
    }
    if out.len() != 1 || out[0].tag != TAG {
        return Err(format!(
            "expected one completion with tag {TAG}, got {out:?}"
        ));
    }
    Ok(out.remove(0))
}

/// Writes `data` at `sector`.
pub fn write(dev: &mut dyn BlockDevice, sector: u64, data: &[u8]) -> Result<(), String> {
    let c = complete_one(dev, &BlockRequest::write(sector, data))?;
    if c.status != Status::Ok {
        return Err(format!(
            "write of {} bytes at sector {sector}: {:?}",
            data.len(),
            c.status
        ));
    }
    Ok(())
}

/// Reads `sectors` at `sector` and returns the data.
pub fn read(dev: &mut dyn BlockDevice, sector: u64, sectors: u32) -> Result<Vec<u8>, String> {
    let c = complete_one(dev, &BlockRequest::read(sector, sectors, true))?;
    match (c.status, c.data) {
        (Status::Ok, Some(data)) => Ok(data),
        (status, _) => Err(format!("read of {sectors} sectors at {sector}: {status:?}")),
    }
}

/// Reads back `expected.len()` bytes at `sector` and compares.
pub fn check(dev: &mut dyn BlockDevice, sector: u64, expected: &[u8]) -> Result<(), String> {
    let sectors = u32::try_from(expected.len() / 512).expect("small request");
    let got = read(dev, sector, sectors)?;
    match got.iter().zip(expected).position(|(a, b)| a != b) {
        None if got.len() == expected.len() => Ok(()),
        None => Err(format!(
            "read {} bytes at sector {sector}, expected {}",
            got.len(),
            expected.len()
        )),
        Some(i) => Err(format!(
            "data at sector {sector} differs at byte {i}: got {:#04x}, expected {:#04x}",
            got[i], expected[i]
        )),
    }
}

/// A normal verified write and read: one 4 KiB request and one 64 KiB
/// request (indirect when the device uses indirect descriptors).
pub fn verified_io(dev: &mut dyn BlockDevice, sector: u64, seed: u64) -> Result<(), String> {
    let small = pattern(seed, 4096);
    write(dev, sector, &small)?;
    check(dev, sector, &small)?;
    let big = pattern(seed ^ 0xb16, 64 * 1024);
    write(dev, sector + 8, &big)?;
    check(dev, sector + 8, &big)
}

/// A short [`VerifyWorkload`] run on `[start, start + sectors)`; keep the
/// workload to verify across runs.
pub fn verify_workload(seed: u64, start: u64, sectors: u64) -> VerifyWorkload {
    VerifyWorkload::new(VerifyConfig {
        seed,
        queue_depth: 8,
        max_bytes: 64 * 1024,
        duration: Some(Duration::from_secs(5)),
        max_ops: Some(150),
        final_check: true,
        region: Some((start, sectors)),
        assume_zeroed: true,
        stall_timeout: REPLY_TIMEOUT,
        ..VerifyConfig::default()
    })
}

/// Runs `w` on `dev` and checks the report is clean.
pub fn run_clean(w: &mut VerifyWorkload, dev: &mut dyn BlockDevice, what: &str) -> Report {
    let report = w
        .run(dev, &mut |_| {})
        .unwrap_or_else(|e| panic!("{what}: verify workload failed: {e}"));
    assert!(report.ops > 0, "{what}: no ops completed: {report:?}");
    assert_eq!(
        report.verify_failures, 0,
        "{what}: verify failures: {:?}",
        report.failures
    );
    assert_eq!(report.io_errors, 0, "{what}: I/O errors: {report:?}");
    assert!(
        report.sectors_verified_final > 0,
        "{what}: final check verified nothing"
    );
    report
}

/// Sends `payload` as one datagram with `fds` as `SCM_RIGHTS`, bypassing
/// the message codec (for malformed datagrams).
pub fn send_raw(sock: &SeqPacket, payload: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let iov = [IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
}

/// Expects an `error` with `code`, then EOF. A socket that was answered
/// `connected` instead is closed cleanly (so the device is free for the
/// next client) and reported as an error.
pub fn expect_refusal(sock: &SeqPacket, code: ErrorCode) -> Result<(), String> {
    let first = match sock.recv_timeout(REPLY_TIMEOUT) {
        Ok(Some((msg, fds))) => {
            if !fds.is_empty() {
                return Err(format!("answer {msg} carried {} fds", fds.len()));
            }
            msg
        }
        Ok(None) => return Err(format!("no answer within {REPLY_TIMEOUT:?}")),
        Err(e) => return Err(format!("expected error {code}, got {e:?}")),
    };
    if first.kind() == kind::CONNECTED {
        let _ = sock.send(&Message::new(kind::CLOSE), &[]);
        let _ = sock.recv_timeout(REPLY_TIMEOUT);
        let _ = sock.recv_timeout(REPLY_TIMEOUT);
        return Err(format!(
            "expected error {code}, but the device was connected: {first}"
        ));
    }
    if first.kind() != kind::ERROR || first.get("code") != Some(code.as_str()) {
        return Err(format!("expected error code={code}, got {first}"));
    }
    expect_eof(sock).map_err(|e| format!("after {first}: {e}"))
}

/// Expects the peer to close the socket, with nothing more sent.
pub fn expect_eof(sock: &SeqPacket) -> Result<(), String> {
    match sock.recv_timeout(REPLY_TIMEOUT) {
        Err(XenbusError::Closed) => Ok(()),
        Ok(None) => Err(format!("socket still open after {REPLY_TIMEOUT:?}")),
        Ok(Some((msg, _))) => Err(format!("expected EOF, got another message {msg}")),
        Err(e) => Err(format!("expected EOF, got {e:?}")),
    }
}

/// Frames of a [`RawRegion`]: 0 = grant table, 1 = ring, 2.. = data.
pub const RAW_PAGES: u32 = 8;
/// Grant ref of the ring page of a [`RawRegion`].
pub const RAW_RING_REF: u32 = 8;
/// Frame of the ring page.
pub const RAW_RING_FRAME: u32 = 1;

/// Grant ref of data page `i` (frame `2 + i`).
pub fn raw_data_gref(i: u32) -> u32 {
    RAW_RING_REF + 1 + i
}

/// What a hand-rolled frontend sets up before `connect`: a sealed region
/// with a one-page ring and a few data pages, all granted to the backend,
/// and two eventfds.
pub struct RawRegion {
    pub region: Arc<SharedRegion>,
    pub grants: GrantTable,
    pub ring: FrontRing<Blkif>,
    pub kick: EventChannel,
    pub notify: EventChannel,
}

impl RawRegion {
    pub fn new(backend_id: u16) -> Self {
        let region = Arc::new(SharedRegion::create("raw-guest", RAW_PAGES).expect("region"));
        let grants = GrantTable::new(region.clone(), 1).expect("grant table");
        grants
            .grant(RAW_RING_REF, backend_id, RAW_RING_FRAME, false)
            .expect("grant ring");
        for i in 0..RAW_PAGES - 2 {
            grants
                .grant(raw_data_gref(i), backend_id, 2 + i, false)
                .expect("grant data");
        }
        let ring = FrontRing::init(
            RingPages::contiguous(region.clone(), RAW_RING_FRAME, 1).expect("ring pages"),
        )
        .expect("ring init");
        RawRegion {
            region,
            grants,
            ring,
            kick: EventChannel::new().expect("eventfd"),
            notify: EventChannel::new().expect("eventfd"),
        }
    }

    /// The three descriptors of `connect`, in wire order.
    pub fn fds(&self) -> [RawFd; 3] {
        [
            self.region.file().as_raw_fd(),
            self.kick.as_fd().as_raw_fd(),
            self.notify.as_fd().as_raw_fd(),
        ]
    }
}

/// The keys of a valid order-0 `connect` for a [`RawRegion`], in wire
/// order; tests edit them to make bad ones.
pub fn connect_keys(device: &str) -> Vec<(String, String)> {
    [
        ("device", device),
        ("frontend-id", "1"),
        ("ring-ref", "8"),
        ("grant-frames", "1"),
        ("protocol", "x86_64-abi"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Encodes `kind` and `keys` exactly as given (no validation).
pub fn encode_text(kind: &str, keys: &[(String, String)]) -> Vec<u8> {
    let mut text = format!("{kind}\n");
    for (k, v) in keys {
        text.push_str(&format!("{k}={v}\n"));
    }
    text.into_bytes()
}

/// A frontend attached through a raw socket: it sees every control
/// message itself.
pub struct RawGuest {
    pub control: SeqPacket,
    pub mem: RawRegion,
}

impl RawGuest {
    /// Probes and connects `device` with a fresh [`RawRegion`].
    pub fn attach(socket: &Path, device: &str, backend_id: u16) -> Result<Self, String> {
        let control = SeqPacket::connect(socket).map_err(|e| format!("connect: {e}"))?;
        let mem = RawRegion::new(backend_id);
        control
            .send(&Message::probe(device), &[])
            .map_err(|e| format!("probe: {e}"))?;
        expect_kind(&control, kind::BACKEND)?;
        send_raw(
            &control,
            &encode_text(kind::CONNECT, &connect_keys(device)),
            &mem.fds(),
        )
        .map_err(|e| format!("send connect: {e}"))?;
        expect_kind(&control, kind::CONNECTED)?;
        Ok(RawGuest { control, mem })
    }

    /// Puts `req` on the ring, publishes, kicks if asked, and waits for one
    /// response.
    pub fn request(&mut self, req: &BlkifRequest) -> Result<BlkifResponse, String> {
        let ring = &mut self.mem.ring;
        ring.put_request(req)
            .map_err(|e| format!("put_request: {e}"))?;
        if ring.push_requests().map_err(|e| format!("push: {e}"))? {
            self.mem.kick.notify().map_err(|e| format!("kick: {e}"))?;
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(rsp) = ring
                .take_response()
                .map_err(|e| format!("take_response: {e}"))?
            {
                return Ok(rsp);
            }
            if ring
                .final_check_for_responses()
                .map_err(|e| format!("final check: {e}"))?
            {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no response to request id {} within {REPLY_TIMEOUT:?}",
                    req.id
                ));
            }
            self.mem
                .notify
                .wait(left)
                .map_err(|e| format!("wait: {e}"))?;
        }
    }

    /// Offset of data page `i` in the region.
    pub fn data_offset(i: u32) -> u64 {
        u64::from(2 + i) * PAGE
    }

    /// Byte offset of the ring's shared header.
    pub fn ring_offset() -> u64 {
        u64::from(RAW_RING_FRAME) * PAGE
    }
}

/// Receives one message and checks its kind (an `error` is reported with
/// its code and text).
pub fn expect_kind(sock: &SeqPacket, want: &str) -> Result<Message, String> {
    match sock.recv_timeout(REPLY_TIMEOUT) {
        Ok(Some((msg, _))) if msg.kind() == want => Ok(msg),
        Ok(Some((msg, _))) => Err(format!("expected {want}, got {msg}")),
        Ok(None) => Err(format!("no {want} within {REPLY_TIMEOUT:?}")),
        Err(e) => Err(format!("expected {want}, got {e:?}")),
    }
}

/// Writes a `grant_entry_v1` through the file (for regions a
/// [`SharedRegion`] refuses to map).
pub fn write_grant_via_file(file: &File, gref: u32, flags: u16, domid: u16, frame: u32) {
    let mut entry = [0u8; 8];
    entry[0..2].copy_from_slice(&flags.to_le_bytes());
    entry[2..4].copy_from_slice(&domid.to_le_bytes());
    entry[4..8].copy_from_slice(&frame.to_le_bytes());
    file.write_all_at(&entry, u64::from(gref) * 8)
        .expect("write grant entry");
}

// ---------------------------------------------------------------------
// vhost-user: a supervisor exporting one disk on a vhost-user socket, the
// native client in-process or as a `shadowback guest blk` process.
// ---------------------------------------------------------------------

/// A supervisor thread exporting one fresh disk over vhost-user (and its
/// control socket, for status and faults); stopped (backends killed) and
/// its directory removed on drop.
pub struct VhostSetup {
    // Dropped first: stop the supervisor before removing its files.
    sup: Option<SupervisorThread>,
    name: String,
    vhost: PathBuf,
    image: PathBuf,
    dir: TempDir,
}

impl VhostSetup {
    /// A disk named `name` of `mib` MiB, exported on a vhost-user socket;
    /// `edit` may change its configuration (and write the image, at
    /// `disk.path`, before the supervisor opens it). `first_env` is the
    /// environment of the device's first backend instance
    /// (`SHADOWBACK_CRASH_AT`).
    pub fn start(
        tag: &str,
        name: &str,
        mib: u64,
        edit: impl FnOnce(&mut DiskConfig),
        first_env: &[(&str, &str)],
    ) -> Self {
        let dir = TempDir::new(tag);
        let image = dir.path().join("disk.img");
        make_image(&image, mib);
        let vhost = dir.path().join("vhost.sock");
        let mut disk = DiskConfig::new(name, &image);
        disk.cache = cache_for(&image);
        disk.vhost_user = Some(vhost.clone());
        edit(&mut disk);
        let cfg = Config {
            socket: dir.path().join("control.sock"),
            control: Default::default(),
            disks: vec![disk],
        };
        let cmd = BackendCommand {
            env: first_env
                .iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            ..backend_command()
        };
        let sup = SupervisorThread::start(cfg, cmd).expect("start supervisor");
        VhostSetup {
            sup: Some(sup),
            name: name.to_owned(),
            vhost,
            image,
            dir,
        }
    }

    pub fn sup(&self) -> &SupervisorThread {
        self.sup.as_ref().expect("supervisor running")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vhost_socket(&self) -> &Path {
        &self.vhost
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stats(&self) -> DeviceStats {
        self.sup()
            .status()
            .into_iter()
            .find(|(n, _)| *n == self.name)
            .expect("device listed")
            .1
    }

    /// Waits until `pred` holds (or fails after 20 s).
    pub fn wait_for(&self, what: &str, pred: impl Fn(&DeviceStats) -> bool) -> DeviceStats {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:#?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Injects `fault` and waits for the recovery it causes.
    pub fn fault_and_recover(&self, fault: Fault) {
        let before = self.stats().recoveries;
        self.sup().fault(&self.name, fault).expect("inject fault");
        self.wait_for("the recovery", |s| s.recoveries > before);
    }

    /// The native client with `queues` virtqueues (EVENT_IDX on).
    pub fn connect(&self, queues: u16) -> VhostUserBlk {
        self.connect_with(VhostUserBlkOptions {
            queues,
            ..VhostUserBlkOptions::default()
        })
    }

    pub fn connect_with(&self, opts: VhostUserBlkOptions) -> VhostUserBlk {
        VhostUserBlk::connect(&self.vhost, opts).expect("vhost-user client connects")
    }

    /// Stops the supervisor and reports how that went.
    pub fn stop(mut self) {
        if let Some(s) = self.sup.take() {
            s.stop().expect("supervisor stopped with an error");
        }
    }
}

impl Drop for VhostSetup {
    fn drop(&mut self) {
        if let Some(s) = self.sup.take() {
            let _ = s.stop();
        }
    }
}

/// A `shadowback guest blk --transport vhost-user` process; killed on drop
/// if still running.
pub struct GuestProcess {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<GuestOutput>>,
}

/// What a guest process printed.
#[derive(Debug, Default)]
pub struct GuestOutput {
    pub report: Option<Report>,
    pub error: Option<String>,
    /// Every line, for failure messages.
    pub lines: Vec<String>,
}

impl GuestProcess {
    /// Starts the guest on the vhost-user socket `socket` with `args`
    /// after `guest blk --transport vhost-user --socket SOCKET`.
    pub fn spawn(socket: &Path, args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shadowback"))
            .args(["guest", "blk", "--transport", "vhost-user", "--socket"])
            .arg(socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the guest process");
        let stdout = child.stdout.take().expect("guest stdout");
        let reader = std::thread::spawn(move || {
            let mut out = GuestOutput::default();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    match v["event"].as_str() {
                        Some("report") => {
                            out.report = serde_json::from_value(v["report"].clone()).ok();
                        }
                        Some("error") => out.error = v["message"].as_str().map(str::to_owned),
                        _ => {}
                    }
                }
                out.lines.push(line);
            }
            out
        });
        GuestProcess {
            child,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit (killing it after
    /// that) and returns its report, or what went wrong.
    pub fn finish(mut self, timeout: Duration) -> Result<Report, String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        let out = self
            .reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        match (status, out.report) {
            (Some(_), Some(report)) => Ok(report),
            (None, _) => Err(format!(
                "guest still running after {timeout:?}; output: {:?}",
                out.lines
            )),
            (Some(status), None) => Err(format!(
                "guest exited ({status}) without a report: {:?}; output: {:?}",
                out.error, out.lines
            )),
        }
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Checks a verifying run: operations done, nothing lost, duplicated,
/// wrong or failed, and a final check that verified something.
pub fn assert_clean_report(report: &Report, what: &str) {
    assert!(report.ops > 0, "{what}: no ops: {report:?}");
    assert_eq!(report.lost, 0, "{what}: lost: {:?}", report.failures);
    assert_eq!(
        report.duplicates, 0,
        "{what}: duplicates: {:?}",
        report.failures
    );
    assert_eq!(
        report.verify_failures, 0,
        "{what}: verify failures: {:?}",
        report.failures
    );
    assert_eq!(report.io_errors, 0, "{what}: I/O errors: {report:?}");
    assert!(
        report.sectors_verified_final > 0,
        "{what}: final check verified nothing"
    );
}
