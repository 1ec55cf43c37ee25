//! systemd's notification protocol, by hand: one datagram per state
//! change to the socket in `NOTIFY_SOCKET` (`READY=1`, `STOPPING=1`,
//! `WATCHDOG=1`, and `FDSTORE=1` with descriptors), as sd_notify(3)
//! describes it, without libsystemd. Without `NOTIFY_SOCKET` (not started
//! by systemd) nothing is sent.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// Where to send, from the environment.
pub struct Notifier {
    socket: UnixDatagram,
    addr: UnixAddr,
}

impl Notifier {
    /// `None` without `NOTIFY_SOCKET` or when it cannot be used (logged).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let made = (|| -> Result<Self, String> {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            let addr = match bytes.strip_prefix(b"@") {
                // An abstract socket (systemd's own default).
                Some(name) => UnixAddr::new_abstract(name),
                None => UnixAddr::new(path.as_os_str()),
            }
            .map_err(|e| e.to_string())?;
            Ok(Notifier {
                socket: UnixDatagram::unbound().map_err(|e| e.to_string())?,
                addr,
            })
        })();
        match made {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, socket = ?path, "NOTIFY_SOCKET unusable");
                None
            }
        }
    }

    /// Sends `state` (`READY=1`, …); a failure is logged, never fatal.
    pub fn send(&self, state: &str) {
        self.send_with_fds(state, &[]);
    }

    /// Sends `state` with `fds` attached (`FDSTORE=1`); a failure is
    /// logged, never fatal.
    pub fn send_with_fds(&self, state: &str, fds: &[BorrowedFd<'_>]) {
        let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [std::io::IoSlice::new(state.as_bytes())];
        if let Err(e) = sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::empty(),
            Some(&self.addr),
        ) {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }
}
