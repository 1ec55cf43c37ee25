//! Live upgrade (docs/ARCHITECTURE.md §4.2, docs/PROTOCOL.md §6a): the
//! running supervisor hands every descriptor and the protocol state of
//! every device to a new binary, which it `execve`s in its own place.
//!
//! The backends are children of this process and the pid does not change
//! across `execve`, so they keep running — and keep serving, since the
//! supervisor is not on the data path — while the old code stops and the
//! new one starts. Every connection (a guest's control socket, a VMM's
//! vhost-user socket) stays open, so no frontend sees EOF.
//!
//! How: the control loop that took the `upgrade` request asks the new
//! binary which state versions it reads (`NEW --state-version`), then
//! pauses everything at a safe point — new Xen attaches wait on a gate,
//! each vhost-user thread parks between two requests, each device task
//! between two events — and collects a [`State`]: the configuration, per
//! device its class's descriptors, instances (pid, pidfd, control socket,
//! I/O fence), the attached frontend's session (its attach message and
//! descriptors, its shadow logs), counters and metrics page; per
//! vhost-user device the listening socket, the VMM's connection and what
//! was negotiated on it; per connected guest its socket and attachment.
//! The state is written as JSON into a memfd, `FD_CLOEXEC` is cleared on
//! every descriptor it names, and the new binary is exec'd with the same
//! arguments and the memfd's number in [`STATE_FD_ENV`]. If `execve`
//! fails, the flags are set back and everything resumes where it paused.
//!
//! - `state.rs`: the serialised [`State`], its version, writing and
//!   reading it;
//! - `fds.rs`: [`Handover`] (descriptors named by a state being built) and
//!   [`Adopted`] (the descriptors a new process took over).

mod fds;
mod run;
mod state;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) use fds::{Adopted, Handover};
pub use run::take_state_fd;
pub(crate) use run::{resume, upgrade, Pending, Serving, UpgradeRequest};
pub(crate) use state::{
    AttachedState, ClassState, DeviceState, FenceState, GuestState, InflightState, InstanceState,
    PoolState, RegionState, SessionState, State, VhostConnState, VhostState, VringState,
    WireFeatures,
};
pub use state::{STATE_FD_ENV, STATE_VERSION};

/// How long the new binary may take to say which state versions it reads.
const VERSION_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The binary `upgrade` execs when none is named: this one's path as it
/// is on disk now (a package upgrade replaced the file at that path).
pub fn default_binary() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("/proc/self/exe: {e}"))
}

/// Runs `binary --state-version` and checks that it reads
/// [`STATE_VERSION`]: after `execve` there is no way back, so a binary
/// that would refuse the state (or is not a shadowback at all) is refused
/// before anything is paused. Blocks for up to [`VERSION_CHECK_TIMEOUT`].
pub fn check_binary(binary: &Path) -> Result<(), String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(binary)
        .arg(state::STATE_VERSION_FLAG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let deadline = std::time::Instant::now() + VERSION_CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} {} did not answer within {VERSION_CHECK_TIMEOUT:?}",
                    binary.display(),
                    state::STATE_VERSION_FLAG
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", binary.display())),
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        // At most a line of numbers is expected.
        let _ = stdout.by_ref().take(4096).read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!(
            "{} {} failed ({status}): not a shadowback that can take over",
            binary.display(),
            state::STATE_VERSION_FLAG
        ));
    }
    if state::versions_read(&out).contains(&STATE_VERSION) {
        Ok(())
    } else {
        Err(format!(
            "{} reads state versions {:?}, not {STATE_VERSION}",
            binary.display(),
            out.trim()
        ))
    }
}

/// What the `--state-version` flag prints: the state versions this binary
/// reads.
pub fn state_versions() -> String {
    STATE_VERSION.to_string()
}
