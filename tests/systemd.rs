//! `shadowback up` under systemd's `Type=notify` (contrib/systemd): a fake
//! `NOTIFY_SOCKET` receives `READY=1` once the control socket answers,
//! `WATCHDOG=1` at half of `WATCHDOG_USEC`, and `STOPPING=1` on SIGTERM;
//! the log written to a file (as journald gets it) has no colour codes.
#![deny(unsafe_code)]

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowback_testsupport::harness::cache_for;
use shadowback_testsupport::temp::TempDir;

const EXE: &str = env!("CARGO_BIN_EXE_shadowback");
const WAIT: Duration = Duration::from_secs(30);

/// The next datagram, or a failure naming `what` after [`WAIT`].
fn next(sock: &UnixDatagram, what: &str) -> String {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no {what}: {e}"));
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn up_notifies_ready_watchdog_and_stopping_and_logs_without_colour() {
    let dir = TempDir::new("systemd");
    let image = dir.create_image("s0.img", 8 << 20);
    let cache = match cache_for(&image) {
        shadowback_supervisor::CacheMode::None => "none",
        shadowback_supervisor::CacheMode::Writeback => "writeback",
    };
    let control = dir.join("control.sock");
    let config = dir.join("shadowback.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {control:?}\n[[disk]]\nname = \"s0\"\npath = {image:?}\ncache = {cache:?}\n"
        ),
    )
    .unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.join("up.log");
    let mut child = Command::new(EXE)
        .arg("up")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Watchdog pings may come first, and the listening socket goes to
    // the file-descriptor store (tests/supervisor_crash.rs); READY comes
    // once, when serving.
    let mut pings = 0;
    let mut stored = Vec::new();
    loop {
        let msg = next(&notify, "READY=1");
        if msg == "READY=1" {
            break;
        }
        if msg.starts_with("FDSTORE=1\n") {
            stored.push(msg);
            continue;
        }
        assert_eq!(msg, "WATCHDOG=1");
        pings += 1;
        assert!(started.elapsed() < WAIT, "no READY=1");
    }
    assert_eq!(stored, ["FDSTORE=1\nFDNAME=control"]);
    assert!(control.exists(), "READY=1 before the control socket");
    let status = Command::new(EXE)
        .args(["status", "--format", "keys", "--socket"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(status.status.success(), "status right after READY=1");
    // Pings keep coming, about every 100 ms.
    while pings < 3 {
        assert_eq!(next(&notify, "WATCHDOG=1"), "WATCHDOG=1");
        pings += 1;
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    loop {
        let msg = next(&notify, "STOPPING=1");
        if msg == "STOPPING=1" {
            break;
        }
        assert_eq!(msg, "WATCHDOG=1");
    }
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "up did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("supervisor listening"), "{text}");
    assert!(!text.contains('\x1b'), "colour codes in the log:\n{text}");
}
