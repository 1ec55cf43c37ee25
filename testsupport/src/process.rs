//! Processes of a test: the `shadowback` binary, the backends a
//! supervisor spawned (found through `/proc`), children killed on drop, a
//! `shadowback blkback` started the way the supervisor starts it, and a
//! `shadowback guest` process.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use shadowback_guest::workload::Report;
use shadowback_xenbus::{Message, SeqPacket};

use crate::REPLY_TIMEOUT;

/// The `shadowback` binary of this build: next to the test binary's
/// `deps/` directory, where Cargo puts a package's binaries before it runs
/// that package's integration tests.
pub fn shadowback_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test binary directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target profile directory")
    } else {
        dir
    };
    let bin = dir.join(format!("shadowback{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: only the root package's tests can run the binary",
        bin.display()
    );
    bin
}

/// A child process, killed and reaped on drop unless it was waited for.
pub struct ChildGuard(Option<Child>);

/// `shadowback up CONFIG` at `RUST_LOG=info`, without colour codes, its
/// stderr (the log) into the file `log`.
pub fn shadowback_up(config: &Path, log: &Path) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(shadowback_bin())
            .arg("up")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(File::create(log).expect("log file")),
    )
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        ChildGuard(Some(cmd.spawn().expect("spawn a child process")))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("child").id()
    }

    /// SIGKILL and reap.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the exit; kills the child and fails,
    /// naming `what`, on a timeout.
    pub fn wait(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                self.0 = None;
                return status;
            }
            if Instant::now() > deadline {
                self.sigkill();
                panic!("{what} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.sigkill();
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
    backend_pid_under(device, std::process::id())
}

/// The one backend process of `device` whose parent is `parent` (a
/// `shadowback up`), waiting for it like [`backend_pid`].
pub fn backend_pid_under(device: &str, parent: u32) -> u32 {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let pids = backend_pids(device, parent);
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

/// Whether `pid` is still running (gone, zombie and dead all count as not:
/// an orphaned backend is reaped by whatever init the container has).
pub fn alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((_, state)) if state != 'Z' && state != 'X')
}

/// Processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| matches!(proc_stat(p), Some((ppid, _)) if ppid == pid))
        .collect()
}

/// A second reference to the open file description of process `pid`'s fd
/// whose `/proc` link reads `link` (a path, `anon_inode:[io_uring]`), by
/// `pidfd_getfd`: the same description, not a new open. Kept after the
/// process dies, it keeps alive what the description holds — a ring's
/// registered files, a file's locks — as the kernel does while it still
/// has work of the dead process.
pub fn share_fd_of(pid: u32, link: &Path) -> OwnedFd {
    let dir = format!("/proc/{pid}/fd");
    let target: i32 = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == link))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("process {pid} has no fd on {}", link.display()));
    crate::fd::steal_fd(pid, target)
}

/// One `shadowback blkback` process and our end of its control socket.
pub struct BlkbackProcess {
    pub child: Child,
    pub control: SeqPacket,
}

impl BlkbackProcess {
    /// Starts `shadowback blkback` with `disk` as fd 4 and a fresh control
    /// socket as fd 3, like `supervisor/src/spawn.rs`.
    #[allow(unsafe_code, reason = "`pre_exec`: fd set-up between fork and exec")]
    pub fn spawn(disk: &File, sectors: u64, env: &[(&str, &str)]) -> Self {
        let (ours, theirs) = SeqPacket::pair().unwrap();
        let theirs: OwnedFd = theirs.into_fd();
        let control_src = theirs.as_raw_fd();
        let disk_src = disk.as_raw_fd();
        let mut cmd = Command::new(shadowback_bin());
        cmd.args([
            "blkback",
            "--device",
            "vd0",
            "--control-fd",
            "3",
            "--disk-fd",
            "4",
        ])
        .arg("--sectors")
        .arg(sectors.to_string())
        .envs(env.iter().copied());
        // SAFETY: runs in the forked child before exec and calls only fcntl
        // and dup2 (async-signal-safe); both sources are open in the parent
        // for the duration of spawn, and are first copied above fd 10 so
        // neither target number clobbers the other source.
        unsafe {
            cmd.pre_exec(move || {
                let c = libc::fcntl(control_src, libc::F_DUPFD_CLOEXEC, 10);
                let d = libc::fcntl(disk_src, libc::F_DUPFD_CLOEXEC, 10);
                if c < 0 || d < 0 || libc::dup2(c, 3) < 0 || libc::dup2(d, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn shadowback blkback");
        drop(theirs);
        BlkbackProcess {
            child,
            control: ours,
        }
    }

    pub fn recv(&self) -> Message {
        let (msg, _) = self
            .control
            .recv_timeout(REPLY_TIMEOUT)
            .expect("control socket")
            .expect("backend answered in time");
        msg
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// A `shadowback guest blk` process; killed on drop if still running.
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
        let mut cmd = Self::command();
        cmd.args(["--transport", "vhost-user", "--socket"])
            .arg(socket)
            .args(args);
        Self::start(cmd)
    }

    /// `shadowback guest blk`, for [`start`](Self::start) once its
    /// arguments (and, say, its uid) are set.
    pub fn command() -> std::process::Command {
        let mut cmd = std::process::Command::new(shadowback_bin());
        cmd.args(["guest", "blk"]);
        cmd
    }

    /// Starts `cmd` (made by [`command`](Self::command)).
    pub fn start(mut cmd: std::process::Command) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
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
