//! A supervisor crash under systemd (docs/ARCHITECTURE.md §4.3): the test
//! plays systemd — a `NOTIFY_SOCKET` that takes `FDSTORE=1` descriptors,
//! and a successor started with them as `LISTEN_FDS` — around a real
//! `shadowback up` killed with a real SIGKILL.
//!
//! While no supervisor runs, a client connecting to the control socket or
//! to a vhost-user socket is queued, not refused; the successor takes the
//! same listening sockets back and answers both. A clean stop takes the
//! sockets out of the store.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use shadowback_testsupport::process::{shadowback_bin, ChildGuard};
use shadowback_testsupport::temp::TempDir;
use shadowback_xenbus::protocol::{key, kind};
use shadowback_xenbus::{Message, SeqPacket};

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the fake systemd keeps: the store, by name.
#[derive(Default)]
struct Store {
    fds: BTreeMap<String, OwnedFd>,
    removed: Vec<String>,
}

/// One notification, if one comes within the socket's read timeout:
/// its text; `FDSTORE=1` descriptors are kept, `FDSTOREREMOVE=1` noted.
fn notification(notify: &UnixDatagram, store: &mut Store) -> Option<String> {
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = match recvmsg::<()>(
        notify.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return None,
        Err(e) => panic!("recvmsg on the notify socket: {e}"),
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed `fd` in this process for
                // this message; nothing else owns it.
                #[allow(unsafe_code)]
                fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }
    let text = String::from_utf8_lossy(msg.iovs().next().unwrap_or(&[])).into_owned();
    let name = || {
        text.lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no FDNAME in {text:?}"))
    };
    if text.lines().any(|l| l == "FDSTORE=1") {
        assert_eq!(fds.len(), 1, "{text:?}");
        store.fds.insert(name(), fds.remove(0));
    }
    if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
        store.fds.remove(&name());
        store.removed.push(name());
    }
    Some(text)
}

/// Reads notifications until one says `until` (e.g. `READY=1`).
fn notifications(notify: &UnixDatagram, store: &mut Store, until: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no {until} within {STEP_TIMEOUT:?}"
        );
        if notification(notify, store).is_some_and(|t| t.lines().any(|l| l == until)) {
            return;
        }
    }
}

/// `shadowback up CONFIG` with `notify` as its `NOTIFY_SOCKET`, and
/// `passed` as its `LISTEN_FDS` (fds 3, 4, … named in that order).
fn up(config: &Path, notify: &Path, log: &Path, passed: &[(&str, &OwnedFd)]) -> ChildGuard {
    // `sh` sets `LISTEN_PID` to its own pid, which `exec` keeps.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg(shadowback_bin())
        .arg("up")
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log"),
        );
    if !passed.is_empty() {
        let names: Vec<&str> = passed.iter().map(|(n, _)| *n).collect();
        cmd.env("LISTEN_FDS", passed.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let sources: Vec<RawFd> = passed.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        // SAFETY: the closure runs in the forked child before exec and
        // calls only fcntl and dup2 (async-signal-safe), allocating
        // nothing. The sources are open in the parent (`passed` outlives
        // the spawn). Each is first copied above every target number so
        // that placing one cannot clobber another; the copies are
        // close-on-exec, the placed fds are not.
        #[allow(unsafe_code)]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let mut high = [0; 8];
                for (i, &src) in sources.iter().enumerate() {
                    high[i] = nix::libc::fcntl(src, nix::libc::F_DUPFD_CLOEXEC, 64);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &fd) in high[..sources.len()].iter().enumerate() {
                    if nix::libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    ChildGuard::spawn(&mut cmd)
}

/// A vhost-user `GET_FEATURES` on `stream`, answered.
fn get_features(stream: &mut UnixStream) -> u64 {
    const GET_FEATURES: u32 = 1;
    const VERSION: u32 = 1;
    const REPLY: u32 = 0x4;
    let mut header = [0u8; 12];
    header[..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
    header[4..8].copy_from_slice(&VERSION.to_le_bytes());
    stream.write_all(&header).expect("send GET_FEATURES");
    let mut reply = [0u8; 20];
    stream
        .read_exact(&mut reply)
        .expect("GET_FEATURES answered");
    let word = |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().unwrap());
    assert_eq!(word(0), GET_FEATURES, "{reply:?}");
    assert_eq!(word(4) & REPLY, REPLY, "{reply:?}");
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

#[test]
fn after_a_sigkill_the_successor_answers_clients_that_connected_meanwhile() {
    let dir = TempDir::new("sup-crash");
    let control = dir.join("control.sock");
    let vhost = dir.join("vb.sock");
    let mut text = format!("socket = {control:?}\n");
    for name in ["xa", "vb"] {
        let image = dir.join(format!("{name}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(8 << 20))
            .expect("image");
        text.push_str(&format!("[[disk]]\nname = {name:?}\npath = {image:?}\n"));
    }
    text.push_str(&format!("vhost_user = {vhost:?}\n"));
    let config = dir.join("shadowback.toml");
    std::fs::write(&config, text).expect("config");
    let log = dir.join("up.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    let mut first = up(&config, &notify_path, &log, &[]);
    let mut store = Store::default();
    notifications(&notify, &mut store, "READY=1");
    assert_eq!(
        store.fds.keys().collect::<Vec<_>>(),
        ["control", "vhost-user.vb"],
        "{}",
        logs()
    );

    // The crash, then clients while nothing serves.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    first.wait(STEP_TIMEOUT, "the killed supervisor");
    let operator = SeqPacket::connect(&control)
        .unwrap_or_else(|e| panic!("control socket refused while no supervisor runs: {e}"));
    operator
        .send(&Message::new(kind::STATUS), &[])
        .expect("status");
    let mut vmm = UnixStream::connect(&vhost)
        .unwrap_or_else(|e| panic!("vhost-user socket refused while no supervisor runs: {e}"));
    vmm.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");

    let passed = [
        ("control", &store.fds["control"]),
        ("vhost-user.vb", &store.fds["vhost-user.vb"]),
    ];
    let mut second = up(&config, &notify_path, &log, &passed);
    let mut again = Store::default();
    notifications(&notify, &mut again, "READY=1");
    let mut answered = Vec::new();
    loop {
        let (msg, _) = operator
            .recv_timeout(STEP_TIMEOUT)
            .expect("control socket")
            .unwrap_or_else(|| panic!("status unanswered\n{}", logs()));
        if msg.kind() == kind::STATUS_END {
            break;
        }
        assert_eq!(msg.kind(), kind::STATUS, "{msg:?}");
        answered.push(msg.get(key::DEVICE).unwrap_or_default().to_string());
    }
    assert_eq!(answered, ["xa", "vb"], "{}", logs());
    assert_ne!(get_features(&mut vmm), 0, "no virtio features offered");
    let log_text = logs();
    assert_eq!(
        log_text
            .matches("listening socket kept across a restart")
            .count(),
        2,
        "{log_text}"
    );
    // The successor stores the same sockets again (systemd keeps one copy).
    assert_eq!(
        again.fds.keys().collect::<Vec<_>>(),
        ["control", "vhost-user.vb"]
    );

    // A clean stop takes them out of the store.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    notifications(&notify, &mut again, "STOPPING=1");
    let status = second.wait(STEP_TIMEOUT, "the stopped supervisor");
    assert!(status.success(), "{status}\n{}", logs());
    // Sent after STOPPING=1, before the exit: all queued by now.
    while notification(&notify, &mut again).is_some() {}
    again.removed.sort();
    assert_eq!(again.removed, ["control", "vhost-user.vb"], "{}", logs());
    assert!(again.fds.is_empty());
}
