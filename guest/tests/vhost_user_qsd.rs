//! `VhostUserBlk` (and `virtio-drivers`' `VirtIOBlk` over the same
//! transport) against qemu-storage-daemon's vhost-user-blk export: an
//! independent, libvhost-user based backend on a real image file.
//!
//! Needs `qemu-storage-daemon` (Debian package `qemu-utils`); run
//! `scripts/install-test-deps.sh` if it is missing. The tests fail, rather
//! than skip, without it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, DeviceError, Status};
use shadowback_guest::vhost_user::{connect_simple, VhostUserBlk, VhostUserBlkOptions};
use shadowback_guest::workload::{VerifyConfig, VerifyWorkload};
use shadowback_testsupport::temp::TempDir;

const IMAGE_BYTES: u64 = 64 << 20;
const WAIT: Duration = Duration::from_secs(20);

/// A scratch directory (removed on drop) holding `disk.img`; the export's
/// socket is `vhost.sock` next to it.
fn scratch(name: &str) -> TempDir {
    let dir = TempDir::new(&format!("vu-{name}"));
    dir.create_image("disk.img", IMAGE_BYTES);
    dir
}

#[derive(Clone, Copy, Default)]
struct QsdOpts {
    queues: u16,
}

/// A running qemu-storage-daemon exporting the scratch image.
struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(s: &TempDir, opts: QsdOpts) -> Qsd {
        match Command::new("qemu-storage-daemon")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
        {
            Ok(st) if st.success() => {}
            other => panic!(
                "qemu-storage-daemon is not usable ({other:?}): run scripts/install-test-deps.sh \
                 (Debian package qemu-utils)"
            ),
        }
        let sock = s.join("vhost.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=disk,filename={},cache.direct=off,discard=unmap",
            s.join("disk.img").display()
        ));
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={}",
            sock.display(),
            opts.queues.max(1)
        ));
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let deadline = Instant::now() + WAIT;
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("qemu-storage-daemon exited early: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd { child }
    }

    /// SIGSTOP, and wait until the kernel reports the process stopped.
    fn freeze(&self) {
        let pid = self.child.id();
        let st = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + WAIT;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            // Field 3, after the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
            if state == Some("T") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon never stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Polls until `tag` completes (others are kept in `extra`).
fn wait_for(
    dev: &mut dyn BlockDevice,
    tags: &[u64],
    extra: &mut Vec<Completion>,
) -> Result<Vec<Completion>, DeviceError> {
    let deadline = Instant::now() + WAIT;
    let mut done = Vec::new();
    let mut buf = Vec::new();
    while done.len() < tags.len() {
        assert!(
            Instant::now() < deadline,
            "requests {tags:?} never completed"
        );
        dev.poll_completions(Duration::from_millis(100), &mut buf)?;
        for c in buf.drain(..) {
            if tags.contains(&c.tag) {
                done.push(c);
            } else {
                extra.push(c);
            }
        }
    }
    done.sort_by_key(|c| c.tag);
    Ok(done)
}

fn one(dev: &mut dyn BlockDevice, tag: u64, req: BlockRequest<'_>) -> Completion {
    dev.submit(tag, &req).unwrap();
    dev.kick().unwrap();
    let mut extra = Vec::new();
    let mut c = wait_for(dev, &[tag], &mut extra).unwrap();
    assert!(extra.is_empty(), "unexpected completions {extra:?}");
    c.remove(0)
}

fn read(dev: &mut dyn BlockDevice, sector: u64, sectors: u32) -> Vec<u8> {
    let c = one(dev, 900, BlockRequest::read(sector, sectors, true));
    assert_eq!(c.status, Status::Ok);
    c.data.expect("read data")
}

/// Counts the most requests ever in flight.
struct Peak<'a> {
    dev: &'a mut VhostUserBlk,
    in_flight: usize,
    peak: usize,
}

impl BlockDevice for Peak<'_> {
    fn capacity_sectors(&self) -> u64 {
        self.dev.capacity_sectors()
    }
    fn max_in_flight(&self) -> usize {
        self.dev.max_in_flight()
    }
    fn max_request_sectors(&self) -> u32 {
        self.dev.max_request_sectors()
    }
    fn supports_discard(&self) -> bool {
        self.dev.supports_discard()
    }
    fn supports_flush(&self) -> bool {
        self.dev.supports_flush()
    }
    fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        self.dev.submit(tag, req)?;
        self.in_flight += 1;
        self.peak = self.peak.max(self.in_flight);
        Ok(())
    }
    fn kick(&mut self) -> Result<(), DeviceError> {
        self.dev.kick()
    }
    fn poll_completions(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<(), DeviceError> {
        let before = out.len();
        self.dev.poll_completions(timeout, out)?;
        self.in_flight -= out.len() - before;
        Ok(())
    }
}

#[test]
fn verify_workload_runs_clean_at_high_queue_depth() {
    let s = scratch("verify");
    let _qsd = Qsd::start(&s, QsdOpts { queues: 2 });
    let mut dev = VhostUserBlk::connect(
        s.join("vhost.sock"),
        VhostUserBlkOptions {
            queues: 2,
            ..VhostUserBlkOptions::default()
        },
    )
    .unwrap();
    assert_eq!(dev.capacity_sectors(), IMAGE_BYTES / 512);
    assert!(dev.max_in_flight() >= 128, "2 queues of 256 descriptors");
    assert!(dev.supports_flush() && dev.supports_discard());
    let ops = 6000;
    let mut work = VerifyWorkload::new(VerifyConfig {
        seed: 7,
        queue_depth: 64,
        duration: Some(Duration::from_secs(120)),
        max_ops: Some(ops),
        ..VerifyConfig::default()
    });
    let mut peak = Peak {
        dev: &mut dev,
        in_flight: 0,
        peak: 0,
    };
    let report = work.run(&mut peak, &mut |_| {}).unwrap();
    let peak = peak.peak;
    assert_eq!(report.verify_failures, 0, "{:?}", report.failures);
    assert_eq!(report.io_errors, 0);
    assert_eq!(report.ops, ops);
    assert_eq!(
        report.reads + report.writes + report.flushes + report.discards,
        ops
    );
    assert!(report.reads_verified > 0 && report.writes > 0);
    assert!(report.flushes > 0 && report.discards > 0);
    assert_eq!(report.sectors_verified_final, IMAGE_BYTES / 512);
    assert!(peak >= 32, "only {peak} requests were ever in flight");
    let id = dev.get_id(WAIT).unwrap();
    assert!(!id.is_empty(), "GET_ID answered an empty serial");
}

#[test]
fn virtio_drivers_blk_cross_checks_our_driver() {
    let s = scratch("smoke");
    let _qsd = Qsd::start(&s, QsdOpts::default());
    let ours = pattern(1, 8192);
    let (id, capacity) = {
        let mut dev =
            VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
        let c = one(&mut dev, 1, BlockRequest::write(64, &ours));
        assert_eq!(c.status, Status::Ok);
        (dev.get_id(WAIT).unwrap(), dev.capacity_sectors())
    };
    // The same transport under virtio-drivers' own driver and queue code.
    let theirs = pattern(2, 4096);
    {
        let mut blk = connect_simple(s.join("vhost.sock"), 256 << 20).unwrap();
        assert_eq!(blk.capacity(), capacity);
        let mut buf = vec![0u8; 8192];
        blk.read_blocks(64, &mut buf).unwrap();
        assert_eq!(buf, ours, "VirtIOBlk reads what VhostUserBlk wrote");
        blk.write_blocks(200, &theirs).unwrap();
        blk.flush().unwrap();
        let mut raw = [0u8; 20];
        let n = blk.device_id(&mut raw).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&raw[..n]),
            id,
            "both drivers read the same serial"
        );
    }
    let mut dev =
        VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
    assert_eq!(
        read(&mut dev, 200, 8),
        theirs,
        "VhostUserBlk reads VirtIOBlk's write"
    );
    assert_eq!(read(&mut dev, 64, 16), ours);
}

#[test]
fn discard_zeroes_and_flush_completes() {
    let s = scratch("discard");
    let _qsd = Qsd::start(&s, QsdOpts::default());
    let mut dev =
        VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
    let data = pattern(3, 64 * 1024);
    assert_eq!(
        one(&mut dev, 1, BlockRequest::write(2048, &data)).status,
        Status::Ok
    );
    assert_eq!(read(&mut dev, 2048, 128), data);
    assert_eq!(
        one(&mut dev, 2, BlockRequest::discard(2048, 128)).status,
        Status::Ok
    );
    assert!(
        read(&mut dev, 2048, 128).iter().all(|&b| b == 0),
        "discarded range reads as zeros"
    );
    assert_eq!(one(&mut dev, 3, BlockRequest::flush()).status, Status::Ok);
    // Out of range and oversized requests are refused before the device.
    let cap = dev.capacity_sectors();
    assert!(matches!(
        dev.submit(4, &BlockRequest::read(cap - 4, 8, true)),
        Err(DeviceError::InvalidRequest(_))
    ));
    assert!(matches!(
        dev.submit(5, &BlockRequest::read(0, 1 << 20, true)),
        Err(DeviceError::InvalidRequest(_))
    ));
    assert_eq!(dev.in_flight(), 0);
}

#[test]
fn backend_death_is_reported_as_disconnected() {
    let s = scratch("death");
    let mut qsd = Qsd::start(&s, QsdOpts::default());
    let mut dev =
        VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
    for tag in 0..16 {
        dev.submit(tag, &BlockRequest::read(tag * 8, 8, false))
            .unwrap();
    }
    dev.kick().unwrap();
    qsd.kill();
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    let err = loop {
        assert!(Instant::now() < deadline, "death never noticed");
        match dev.poll_completions(Duration::from_millis(100), &mut out) {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, DeviceError::Disconnected), "{err:?}");
    assert!(matches!(
        dev.submit(99, &BlockRequest::read(0, 8, false)),
        Err(DeviceError::Disconnected)
    ));
    assert!(matches!(dev.kick(), Err(DeviceError::Disconnected)));
    assert!(matches!(
        dev.poll_completions(Duration::ZERO, &mut out),
        Err(DeviceError::Disconnected)
    ));
}

#[test]
fn reconnect_completes_requests_in_flight_at_a_backend_kill() {
    let s = scratch("reconnect");
    let mut qsd = Qsd::start(&s, QsdOpts::default());
    let mut dev = VhostUserBlk::connect(
        s.join("vhost.sock"),
        VhostUserBlkOptions {
            reconnect: true,
            ..VhostUserBlkOptions::default()
        },
    )
    .unwrap();
    let first = pattern(9, 4096);
    assert_eq!(
        one(&mut dev, 100, BlockRequest::write(8, &first)).status,
        Status::Ok
    );
    // Requests published while the backend is frozen, then the backend is
    // killed: none was popped, so they are in the avail ring only, beyond
    // the used index the new backend starts from. (qemu-storage-daemon 10
    // does not offer INFLIGHT_SHMFD, so requests it popped but had not
    // completed would be lost: a backend with an in-flight region resubmits
    // those; see `VhostUserTransport::reconnect`.)
    qsd.freeze();
    let writes: Vec<Vec<u8>> = (0..16u8).map(|i| pattern(10 + i, 8192)).collect();
    let tags: Vec<u64> = (0..16).collect();
    for (tag, data) in tags.iter().zip(&writes) {
        dev.submit(*tag, &BlockRequest::write(64 + tag * 64, data))
            .unwrap();
    }
    dev.kick().unwrap();
    qsd.kill();
    let _qsd = Qsd::start(&s, QsdOpts::default());
    let mut extra = Vec::new();
    let finished = wait_for(&mut dev, &tags, &mut extra).unwrap();
    assert!(extra.is_empty(), "duplicate completions {extra:?}");
    assert!(finished.iter().all(|c| c.status == Status::Ok));
    assert_eq!(dev.reconnects(), 1);
    assert_eq!(read(&mut dev, 8, 8), first);
    for (tag, data) in tags.iter().zip(&writes) {
        assert_eq!(
            &read(&mut dev, 64 + tag * 64, 16),
            data,
            "write {tag} landed"
        );
    }
}

#[test]
fn missing_socket_fails_cleanly() {
    let s = scratch("missing");
    let err = VhostUserBlk::connect(
        Path::new(&s.join("vhost.sock")),
        VhostUserBlkOptions {
            connect_timeout: Duration::from_millis(100),
            ..VhostUserBlkOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DeviceError::Io(_)), "{err:?}");
}

#[test]
fn forged_used_entries_are_protocol_errors_not_panics() {
    use shadowback_guest::vhost_user::GuestRam;
    use std::sync::atomic::Ordering;

    let s = scratch("forged");
    let qsd = Qsd::start(&s, QsdOpts::default());
    let mut dev =
        VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
    // One real request the frozen backend never answers.
    qsd.freeze();
    dev.submit(1, &BlockRequest::read(0, 8, true)).unwrap();
    dev.kick().unwrap();
    // Play a hostile device: guest RAM is ours, so write its used ring.
    let ram = GuestRam::installed().unwrap();
    let used = dev.transport().used_ring(0).unwrap();
    let idx = dev.transport().used_idx(0).unwrap();
    let elem = used + 4 + 8 * u64::from(idx % 256);
    // An id whose low 16 bits name descriptor 0, the head in flight: it
    // must not be truncated into a valid token.
    ram.store(elem, 0x1_0000u32, Ordering::Relaxed).unwrap();
    ram.store(used + 2, idx.wrapping_add(1), Ordering::Release)
        .unwrap();
    let mut out = Vec::new();
    let err = dev
        .poll_completions(Duration::from_millis(10), &mut out)
        .unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(m) if m.contains("not a request in flight")),
        "{err:?}"
    );
    assert!(out.is_empty());
    // A used index running ahead of what is in flight.
    ram.store(used + 2, idx.wrapping_add(5), Ordering::Release)
        .unwrap();
    let err = dev
        .poll_completions(Duration::from_millis(10), &mut out)
        .unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(m) if m.contains("advanced by 5")),
        "{err:?}"
    );
    drop(qsd);
}

#[test]
fn a_hung_backend_fails_connect_instead_of_hanging() {
    let s = scratch("hung");
    let qsd = Qsd::start(&s, QsdOpts::default());
    // The kernel still accepts the connection (listen backlog), but
    // nothing answers GET_FEATURES; the vhost crate alone would wait for
    // the reply forever.
    qsd.freeze();
    let socket = s.join("vhost.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = VhostUserBlk::connect(
            socket,
            VhostUserBlkOptions {
                reply_timeout: Duration::from_millis(200),
                ..VhostUserBlkOptions::default()
            },
        );
        let _ = tx.send(r.map(|_| ()));
    });
    let result = rx
        .recv_timeout(WAIT)
        .expect("connect to a frozen backend never returned");
    assert!(
        matches!(result, Err(DeviceError::Disconnected)),
        "{result:?}"
    );
    drop(qsd);
}

#[test]
fn a_get_id_answered_after_its_timeout_does_not_cut_polls_short() {
    let s = scratch("late-id");
    let _qsd = Qsd::start(&s, QsdOpts::default());
    let mut dev =
        VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
    // Gives up at once; the request stays in flight and is answered later.
    assert!(dev.get_id(Duration::ZERO).is_err());
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while dev.in_flight() > 0 {
        assert!(Instant::now() < deadline, "GET_ID never answered");
        dev.poll_completions(Duration::from_millis(50), &mut out)
            .unwrap();
    }
    assert!(out.is_empty(), "GET_ID is no block completion: {out:?}");
    // Nothing in flight: a poll must wait its whole timeout (a lower
    // bound, not a performance figure); the late answer used to make every
    // later poll return at once, a busy loop for the caller.
    let wait = Duration::from_millis(200);
    let started = Instant::now();
    dev.poll_completions(wait, &mut out).unwrap();
    assert!(started.elapsed() >= wait, "poll returned early");
    assert!(out.is_empty());
    // A new GET_ID still gets its own answer.
    assert!(!dev.get_id(WAIT).unwrap().is_empty());
    assert_eq!(dev.in_flight(), 0);
}

#[test]
fn an_endless_poll_timeout_is_accepted() {
    let s = scratch("endless");
    let _qsd = Qsd::start(&s, QsdOpts::default());
    let mut dev =
        VhostUserBlk::connect(s.join("vhost.sock"), VhostUserBlkOptions::default()).unwrap();
    dev.submit(7, &BlockRequest::read(0, 8, true)).unwrap();
    dev.kick().unwrap();
    let mut out = Vec::new();
    // `Instant::now() + Duration::MAX` overflows.
    dev.poll_completions(Duration::MAX, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].tag, out[0].status), (7, Status::Ok));
}
