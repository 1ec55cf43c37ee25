//! systemd's notification protocol: the notifier (`READY=1`,
//! `STOPPING=1`, `WATCHDOG=1`, `FDSTORE=1`) is the supervisor's
//! (`shadowback_supervisor::sd_notify`, by hand, without libsystemd); here
//! is when to send `WATCHDOG=1`. Without `NOTIFY_SOCKET` (not started by
//! systemd) nothing is sent.

use std::time::Duration;

pub use shadowback_supervisor::sd_notify::Notifier;

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
