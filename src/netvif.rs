//! What the network benchmarks hold in place of the supervisor: per vif,
//! the guest's descriptors, the wire fd, the two shadow logs and a
//! `shadowback netback` process, attached with `attach-net`
//! (docs/PROTOCOL.md §6c) and replaced after a kill as the supervisor
//! replaces it (docs/ARCHITECTURE.md §7.5, §11.6): by a hot standby
//! started beforehand, or with none, by a process started after the kill.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shadowback_guest::netfront::NetFront;
use shadowback_netback::backend::{
    KEY_RX_DROPPED_IN_CRASH, KEY_TX_MAYBE_DUPLICATED, KEY_TX_REPLAYED,
};
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::netif::{MacAddr, NetAttachRequest, NetConnectRequest};
use shadowback_xenbus::SeqPacket;

use crate::CliError;

/// How long a backend may take to answer `attach-net`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries of each shadow log: the netif rings' size.
const LOG_ENTRIES: u32 = 256;

/// The wire a vif's backend is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireType {
    Cable,
    Tap,
}

impl WireType {
    fn key(self) -> &'static str {
        match self {
            WireType::Cable => "cable",
            WireType::Tap => "tap",
        }
    }
}

/// One vif and the backend process serving it.
pub struct BenchVif {
    connect: NetConnectRequest,
    mac: MacAddr,
    guest_fds: Vec<OwnedFd>,
    wire: OwnedFd,
    wire_type: WireType,
    tx_log: ShadowLog,
    rx_log: ShadowLog,
    shadow: bool,
    backend: Option<Backend>,
    /// A started process waiting for its `attach-net` (hot mode).
    standby: Option<Backend>,
    hot: bool,
    /// Each backend's `--poll-us`.
    poll_us: u32,
}

/// How long the steps of one takeover took.
#[derive(Clone, Copy, Debug)]
pub struct Takeover {
    /// SIGKILL to the reaped exit.
    pub reap: Duration,
    /// The reap to a process ready for `attach-net`: 0 with a standby,
    /// else the start of a new one (its `attached` includes its start-up).
    pub spawn: Duration,
    /// `attach-net recover=1` to its `attached` reply: the replay.
    pub attach: Duration,
    /// What the new instance's `attached` reported (PROTOCOL.md §6c).
    pub counts: TakeoverCounts,
}

/// The recovery counters of one `attached` reply.
#[derive(Clone, Copy, Debug, Default)]
pub struct TakeoverCounts {
    /// The new instance's own replay (`replay-us`): planning and applying
    /// the logs, part of `attach`.
    pub replay: Duration,
    pub tx_replayed: u64,
    pub tx_maybe_duplicated: u64,
    pub rx_dropped_in_crash: u64,
}

struct Backend {
    child: Child,
    control: SeqPacket,
}

impl BenchVif {
    /// Starts a backend for `front` on `wire` and attaches it, as
    /// `(shadow, hot, poll_us)` say: `--no-shadow` unless `shadow`; with
    /// `hot` a standby process kept ready for the next takeover, as the
    /// supervisor keeps one; `--poll-us`.
    pub fn start_as(
        front: &NetFront,
        wire: OwnedFd,
        wire_type: WireType,
        (shadow, hot, poll_us): (bool, bool, u32),
    ) -> Result<Self, CliError> {
        let mut vif = BenchVif {
            connect: front.connect_request(),
            mac: front.config().mac,
            guest_fds: front.fds()?,
            wire,
            wire_type,
            tx_log: ShadowLog::create(LOG_ENTRIES)?,
            rx_log: ShadowLog::create(LOG_ENTRIES)?,
            shadow,
            backend: None,
            standby: None,
            hot,
            poll_us,
        };
        let first = spawn_netback(shadow, poll_us)?;
        vif.attach(first, false)?;
        vif.refill_standby()?;
        Ok(vif)
    }

    /// SIGKILLs the backend, reaps it and hands the vif to the standby or
    /// a fresh process (`recover=1`, `blame=0`: killed from outside). Says
    /// how long each step took. The next standby is the caller's to start
    /// ([`refill_standby`](Self::refill_standby)), once the stream runs
    /// again: started at once, it competes for the CPUs with the replay.
    pub fn kill_and_replace(&mut self) -> Result<Takeover, CliError> {
        let t0 = Instant::now();
        self.kill();
        let t1 = Instant::now();
        // The spawn step is a started process's, none with a standby (the
        // clock read around taking one said 1 µs once in a while).
        let (next, spawn) = match self.standby.take() {
            Some(b) => (b, Duration::ZERO),
            None => (spawn_netback(self.shadow, self.poll_us)?, t1.elapsed()),
        };
        let t2 = Instant::now();
        let counts = self.attach(next, true)?;
        let t3 = Instant::now();
        Ok(Takeover {
            reap: t1 - t0,
            spawn,
            attach: t3 - t2,
            counts,
        })
    }

    /// The wire fd the backends are given (this process's copy).
    pub fn wire(&self) -> BorrowedFd<'_> {
        self.wire.as_fd()
    }

    /// SIGKILLs the backend (if any) and reaps it.
    pub fn kill(&mut self) {
        if let Some(b) = self.backend.take() {
            b.kill();
        }
    }

    /// Starts a standby if the vif keeps one and has none.
    pub fn refill_standby(&mut self) -> Result<(), CliError> {
        if self.hot && self.standby.is_none() {
            self.standby = Some(spawn_netback(self.shadow, self.poll_us)?);
        }
        Ok(())
    }

    fn attach(&mut self, backend: Backend, recover: bool) -> Result<TakeoverCounts, CliError> {
        let msg = NetAttachRequest {
            frontend: "bench-guest".into(),
            connect: self.connect.clone(),
            mac: self.mac,
            mtu: 1500,
        }
        .to_message()
        .with("wire", self.wire_type.key())
        // The logs always go along; `--no-shadow` makes the backend ignore
        // them, so the attach is the same with and without.
        .with("shadow", 1)
        .with("recover", u8::from(recover))
        .with("blame", 0);
        let mut fds: Vec<BorrowedFd<'_>> = self.guest_fds.iter().map(|f| f.as_fd()).collect();
        fds.extend([
            self.wire.as_fd(),
            self.tx_log.file().as_fd(),
            self.rx_log.file().as_fd(),
        ]);
        // Kept before the answer is checked, so a refusal still reaps it.
        let backend = self.backend.insert(backend);
        backend.control.send(&msg, &fds)?;
        let (answer, _) = backend
            .control
            .recv_timeout(ATTACH_TIMEOUT)?
            .ok_or("netback did not answer attach-net in time")?;
        if answer.kind() != "attached" {
            return Err(format!("netback refused attach-net: {answer}").into());
        }
        let count = |key| answer.get_u64(key).map(Option::unwrap_or_default);
        Ok(TakeoverCounts {
            replay: Duration::from_micros(count(shadowback_xenbus::protocol::key::REPLAY_US)?),
            tx_replayed: count(KEY_TX_REPLAYED)?,
            tx_maybe_duplicated: count(KEY_TX_MAYBE_DUPLICATED)?,
            rx_dropped_in_crash: count(KEY_RX_DROPPED_IN_CRASH)?,
        })
    }
}

impl Drop for BenchVif {
    fn drop(&mut self) {
        self.kill();
        if let Some(b) = self.standby.take() {
            b.kill();
        }
    }
}

impl Backend {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shadowback netback --device vif0 --control-fd 3` with a fresh control
/// socket as fd 3, as the supervisor will start it.
#[allow(unsafe_code, reason = "`pre_exec`: fd set-up between fork and exec")]
fn spawn_netback(shadow: bool, poll_us: u32) -> Result<Backend, CliError> {
    let (ours, theirs) = SeqPacket::pair()?;
    let theirs: OwnedFd = theirs.into_fd();
    let src = theirs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["netback", "--device", "vif0", "--control-fd", "3"])
        .stdin(Stdio::null());
    if !shadow {
        cmd.arg("--no-shadow");
    }
    if poll_us > 0 {
        cmd.args(["--poll-us", &poll_us.to_string()]);
    }
    // SAFETY: runs in the forked child before exec and calls only fcntl
    // and dup2 (async-signal-safe) on an fd open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            let c = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 10);
            if c < 0 || libc::dup2(c, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start shadowback netback: {e}"))?;
    drop(theirs);
    Ok(Backend {
        child,
        control: ours,
    })
}
