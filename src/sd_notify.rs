//! systemd's notification protocol, by hand: one datagram per state
//! change to the socket in `NOTIFY_SOCKET` (`READY=1`, `STOPPING=1`,
//! `WATCHDOG=1`), as sd_notify(3) describes it, without libsystemd.
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where to send, from the environment.
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// `None` without `NOTIFY_SOCKET` or when it cannot be used (logged).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let made = (|| -> std::io::Result<Self> {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            let addr = match bytes.strip_prefix(b"@") {
                // An abstract socket (systemd's own default).
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name)?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
            };
            Ok(Notifier {
                socket: UnixDatagram::unbound()?,
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
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if it is set
/// and meant for this process (`WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
