//! A scriptable fake backend: the test binary itself, re-executed by the
//! supervisor as a backend process. It adopts the control socket on fd 3,
//! beats the shadow log's heartbeat while a test's script holds one, answers
//! each control message with what the script returns, and records what it
//! saw, one line per event, in an event file the test reads. Started as a
//! spare of the standby pool (`--spare`), it takes `adopt` itself: the
//! keys become arguments as on a backend's command line, and it answers
//! `ok`.
//!
//! A test binary using it has an entry test, which is a no-op in a normal
//! run:
//!
//! ```text
//! #[test]
//! fn fake_backend_entry() {
//!     if let Some(fake) = FakeBackend::from_args() {
//!         fake.serve(|fake, msg, fds| script(fake, msg, fds));
//!     }
//! }
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shadowback_shadow::ShadowLog;
use shadowback_supervisor::{BackendCommand, DiskConfig};
use shadowback_xenbus::{Message, SeqPacket};

use crate::harness::Harness;
use crate::temp::TempDir;
use crate::wait::wait_for_state;

/// The name of the entry test the supervisor runs.
pub const ENTRY: &str = "fake_backend_entry";

/// How long a test waits for an event line.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How this test binary is exec'd as a fake backend: only the entry test,
/// with `events=<events>` and `fake_args` after `--`; `first_env` is the
/// environment of each device's first instance.
pub fn fake_backend_command(
    events: &Path,
    fake_args: &[&str],
    first_env: &[(&str, &str)],
) -> BackendCommand {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--exact".into(),
        "--nocapture".into(),
        "--quiet".into(),
        ENTRY.into(),
        "--".into(),
        format!("events={}", events.display()).into(),
    ];
    args.extend(fake_args.iter().map(Into::into));
    BackendCommand {
        program: std::env::current_exe().expect("current_exe").into(),
        args,
        env: first_env
            .iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    }
}

/// A [`Harness`] (which it derefs to) whose backends are fake backends
/// (see [`fake_backend_command`]), and the event file they record to.
pub struct FakeSupervisor {
    pub harness: Harness,
    pub events: EventLog,
}

impl FakeSupervisor {
    /// Serves `disks` (whose files the caller made in `dir`); the events
    /// go to `events` in `dir`.
    pub fn start(
        dir: TempDir,
        disks: Vec<DiskConfig>,
        fake_args: &[&str],
        first_env: &[(&str, &str)],
    ) -> Self {
        let events = EventLog(dir.join("events"));
        let cmd = fake_backend_command(&events.0, fake_args, first_env);
        FakeSupervisor {
            harness: Harness::start_with(dir, disks, cmd),
            events,
        }
    }
}

impl std::ops::Deref for FakeSupervisor {
    type Target = Harness;

    fn deref(&self) -> &Harness {
        &self.harness
    }
}

/// One fake backend process.
pub struct FakeBackend {
    /// The control socket the supervisor handed over.
    pub control: SeqPacket,
    /// The shadow log whose heartbeat is beaten between messages.
    pub heartbeat: Option<ShadowLog>,
    events: PathBuf,
    args: Vec<String>,
}

impl FakeBackend {
    /// `Some` when the supervisor exec'd this binary as a backend (it
    /// passes `--control-fd`); `None` in a normal test run.
    pub fn from_args() -> Option<Self> {
        let args: Vec<String> = std::env::args().collect();
        if !args.iter().any(|a| a == "--control-fd") {
            return None;
        }
        let events = args
            .iter()
            .find_map(|a| a.strip_prefix("events="))
            .map(PathBuf::from)
            .expect("events=PATH");
        #[allow(unsafe_code, reason = "adopting the inherited control socket")]
        // SAFETY: the supervisor hands every backend its control socket as
        // fd 3 (BACKEND_CONTROL_FD); this process owns it and nothing else
        // in it uses fd 3.
        let fd = unsafe { OwnedFd::from_raw_fd(3) };
        let control = SeqPacket::from_fd(fd).expect("fd 3");
        Some(FakeBackend {
            control,
            heartbeat: None,
            events,
            args,
        })
    }

    /// Whether `flag` is among the arguments.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// The value of a `name=value` argument.
    pub fn arg(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    }

    /// The event file.
    pub fn events(&self) -> EventLog {
        EventLog(self.events.clone())
    }

    /// Appends `<pid> <line>` to the event file.
    pub fn record(&self, line: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.events)
            .expect("event file");
        // One write per line: appends from several processes interleave
        // by whole lines.
        f.write_all(format!("{} {line}\n", std::process::id()).as_bytes())
            .expect("write event");
    }

    /// The usual answer to `detach`: the heartbeat stops, `detach` is
    /// recorded.
    pub fn detach(&mut self) -> Message {
        self.heartbeat = None;
        self.record("detach");
        Message::new("detached")
    }

    /// A spare's `adopt` (docs/PROTOCOL.md §6): its keys become the
    /// arguments a backend started for the device has (`--no-shadow`,
    /// `--sectors 2048`).
    fn adopt(&mut self, msg: &Message) -> Message {
        for (k, v) in msg.iter() {
            self.args.push(format!("--{k}"));
            if !v.is_empty() {
                self.args.push(v.to_string());
            }
        }
        self.record("adopt");
        Message::new("ok")
    }

    /// The answer to a message kind the script does not know.
    pub fn refuse(kind: &str) -> Message {
        Message::new("error")
            .with("code", "EPROTO")
            .with("message", kind)
    }

    /// Answers every control message with `script`'s reply, beating the
    /// heartbeat every 5 ms; exits when the supervisor closes the socket.
    pub fn serve(
        mut self,
        mut script: impl FnMut(&mut Self, Message, Vec<OwnedFd>) -> Message,
    ) -> ! {
        loop {
            if let Some(log) = &self.heartbeat {
                log.heartbeat().expect("heartbeat");
            }
            let (msg, fds) = match self.control.recv_timeout(Duration::from_millis(5)) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(_) => std::process::exit(0),
            };
            let reply = if msg.kind() == "adopt" {
                self.adopt(&msg)
            } else {
                script(&mut self, msg, fds)
            };
            if self.control.send(&reply, &[]).is_err() {
                std::process::exit(0);
            }
        }
    }
}

/// The event file of the fake backends of one test, read by the test.
#[derive(Clone, Debug)]
pub struct EventLog(pub PathBuf);

impl EventLog {
    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many lines contain `part`.
    pub fn count(&self, part: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(part)).count()
    }

    /// Waits until some line contains every one of `parts`, and returns it.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        let found = wait_for_state(
            EVENT_TIMEOUT,
            &format!("an event with {parts:?}"),
            || self.lines(),
            |lines| lines.iter().any(|l| parts.iter().all(|p| l.contains(p))),
        );
        found
            .into_iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .expect("the accepted line")
    }
}

/// The lines of process `pid` among `events`, without the pid.
pub fn lines_of(events: &[String], pid: u32) -> Vec<String> {
    let prefix = format!("{pid} ");
    events
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}
