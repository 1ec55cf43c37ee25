//! What the network benchmarks hold in place of the supervisor, which does
//! not serve vifs yet: per vif, the guest's descriptors, the wire fd, the
//! two shadow logs and a `shadowback netback` process, attached with
//! `attach-net` (docs/PROTOCOL.md §6c) and replaced after a kill as the
//! supervisor will replace it (docs/ARCHITECTURE.md §11.6).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shadowback_guest::netfront::NetFront;
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
}

struct Backend {
    child: Child,
    control: SeqPacket,
}

impl BenchVif {
    /// Starts a backend (with `--no-shadow` unless `shadow`) for `front`
    /// on `wire` and attaches it.
    pub fn start(
        front: &NetFront,
        wire: OwnedFd,
        wire_type: WireType,
        shadow: bool,
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
        };
        vif.attach_new(false)?;
        Ok(vif)
    }

    /// SIGKILLs the backend, reaps it and hands the vif to a fresh one
    /// (`recover=1`, `blame=0`: killed from outside).
    pub fn kill_and_replace(&mut self) -> Result<(), CliError> {
        self.kill();
        self.attach_new(true)
    }

    /// SIGKILLs the backend (if any) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut b) = self.backend.take() {
            let _ = b.child.kill();
            let _ = b.child.wait();
        }
    }

    fn attach_new(&mut self, recover: bool) -> Result<(), CliError> {
        let backend = spawn_netback(self.shadow)?;
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
        Ok(())
    }
}

impl Drop for BenchVif {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `shadowback netback --device vif0 --control-fd 3` with a fresh control
/// socket as fd 3, as the supervisor will start it.
#[allow(unsafe_code, reason = "`pre_exec`: fd set-up between fork and exec")]
fn spawn_netback(shadow: bool) -> Result<Backend, CliError> {
    let (ours, theirs) = SeqPacket::pair()?;
    let theirs: OwnedFd = theirs.into_fd();
    let src = theirs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["netback", "--device", "vif0", "--control-fd", "3"])
        .stdin(Stdio::null());
    if !shadow {
        cmd.arg("--no-shadow");
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
