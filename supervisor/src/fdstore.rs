//! Listening sockets kept outside the supervisor, so that a supervisor
//! crash never turns into `connection refused` (docs/ARCHITECTURE.md
//! §4.3).
//!
//! Under systemd with `FileDescriptorStoreMax=`, every listening socket
//! the supervisor binds — the control socket and each vhost-user socket —
//! is also handed to systemd's file-descriptor store (`FDSTORE=1`, named
//! `control` or `vhost-user.DEVICE`). If the supervisor dies, the store
//! keeps the sockets listening: a client's `connect` is queued in the
//! backlog instead of refused, and the successor systemd starts gets them
//! back as `LISTEN_FDS` / `LISTEN_FDNAMES` (sd_listen_fds(3)) and accepts
//! what queued. A socket inherited that way is used only if its name and
//! bound path match the configuration and the path is still there (a
//! clean stop unlinks it); otherwise it is dropped from the store and a
//! new one bound. A disk removed at run time takes its socket out of the
//! store (`FDSTOREREMOVE=1`), and so does a clean stop for all of them.
//!
//! Connected sockets and backends are not kept: a crash still ends every
//! guest's and VMM's connection (they reconnect), see §4.3 for why.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use shadowback_xenbus::AsyncSeqPacketListener;

use crate::sd_notify::Notifier;
use crate::upgrade::Adopted;
use crate::SupervisorError;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// More than any configuration needs (one per device, plus one): a larger
/// `LISTEN_FDS` is refused rather than trusted.
const MAX_LISTEN_FDS: usize = 4096;
/// The store name of the control socket.
pub const CONTROL_NAME: &str = "control";

/// The store name of device `name`'s vhost-user socket. Device names are
/// letters, digits, `-` and `_` (`config`), which a store name may hold.
pub fn vhost_user_name(device: &str) -> String {
    format!("vhost-user.{device}")
}

/// The listening sockets a predecessor left in the store, and where new
/// ones are kept.
#[derive(Default)]
pub struct Listeners {
    inherited: Mutex<Vec<(String, OwnedFd)>>,
    store: Option<Arc<Notifier>>,
    /// Names in the store, for a clean stop.
    kept: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("inherited", &lock(&self.inherited).len())
            .field("store", &self.store.is_some())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Lists changed whole under the lock: never torn by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Listeners {
    /// The sockets systemd passed this process (`LISTEN_PID` ours), which
    /// keep new ones in `store`. The `LISTEN_*` variables are removed:
    /// neither a backend nor a binary exec'd by a live upgrade may take
    /// them again. Called once, first thing: the passed numbers must not
    /// have been reused.
    pub fn from_env(store: Option<Arc<Notifier>>) -> Result<Self, SupervisorError> {
        let inherited = take_listen_fds()?;
        if !inherited.is_empty() {
            let names: Vec<&str> = inherited.iter().map(|(n, _)| n.as_str()).collect();
            tracing::info!(?names, "listening sockets from the file-descriptor store");
        }
        Ok(Listeners {
            inherited: Mutex::new(inherited),
            store,
            kept: Mutex::default(),
        })
    }

    /// The inherited socket `name`, if it is bound at `path` and `path`
    /// is still there; one that is not is dropped from the store.
    fn take(&self, name: &str, path: &Path) -> Option<OwnedFd> {
        let fd = {
            let mut inherited = lock(&self.inherited);
            let at = inherited.iter().position(|(n, _)| n == name)?;
            inherited.remove(at).1
        };
        let bound = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd.as_raw_fd())
            .ok()
            .and_then(|a| a.path().map(Path::to_path_buf));
        if bound.as_deref() == Some(path) && path.exists() {
            tracing::info!(name, path = %path.display(), "listening socket kept across a restart");
            return Some(fd);
        }
        tracing::info!(name, ?bound, path = %path.display(), "a stored socket that no longer fits: binding anew");
        self.forget(name);
        None
    }

    /// Hands `fd` to the store as `name` (nothing without a store).
    fn keep(&self, name: &str, fd: BorrowedFd<'_>) {
        let Some(store) = &self.store else {
            return;
        };
        store.send_with_fds(&format!("FDSTORE=1\nFDNAME={name}"), &[fd]);
        let mut kept = lock(&self.kept);
        if !kept.iter().any(|n| n == name) {
            kept.push(name.to_string());
        }
    }

    /// Notes that `name` is in the store already (put there by the binary
    /// this one replaced in a live upgrade), so that a clean stop takes it
    /// out.
    pub(crate) fn kept_before(&self, name: &str) {
        if self.store.is_some() {
            lock(&self.kept).push(name.to_string());
        }
    }

    /// Takes `name` out of the store.
    pub fn forget(&self, name: &str) {
        if let Some(store) = &self.store {
            store.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
            lock(&self.kept).retain(|n| n != name);
        }
    }

    /// Takes every socket out of the store (a clean stop: nothing must
    /// come back).
    pub fn forget_all(&self) {
        let names = std::mem::take(&mut *lock(&self.kept));
        for name in names {
            self.forget(&name);
        }
    }

    /// The control socket at `path`: the stored one, or a new one bound
    /// (and stored).
    pub(crate) fn control(&self, path: &Path) -> Result<AsyncSeqPacketListener, SupervisorError> {
        let err = |reason: String| SupervisorError::Socket {
            path: path.to_owned(),
            reason,
        };
        let listener = match self.take(CONTROL_NAME, path) {
            Some(fd) => AsyncSeqPacketListener::adopt(fd, path).map_err(|e| err(e.to_string()))?,
            None => AsyncSeqPacketListener::bind(path).map_err(|e| err(e.to_string()))?,
        };
        self.keep(CONTROL_NAME, listener.as_fd());
        Ok(listener)
    }

    /// Device `device`'s vhost-user socket at `path`: the stored one, or
    /// whatever `bind` makes (then stored).
    pub(crate) fn vhost_user(
        &self,
        device: &str,
        path: &Path,
        bind: impl FnOnce() -> Result<UnixListener, String>,
    ) -> Result<UnixListener, String> {
        let name = vhost_user_name(device);
        let listener = match self.take(&name, path) {
            Some(fd) => {
                let kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
                    .map_err(|e| e.to_string())?;
                if kind != nix::sys::socket::SockType::Stream {
                    return Err(format!("stored socket {name} is not a stream socket"));
                }
                UnixListener::from(fd)
            }
            None => bind()?,
        };
        self.keep(&name, listener.as_fd());
        Ok(listener)
    }
}

/// `LISTEN_FDS` descriptors with their `LISTEN_FDNAMES` names (unnamed:
/// `unknown`), if `LISTEN_PID` is this process.
fn take_listen_fds() -> Result<Vec<(String, OwnedFd)>, SupervisorError> {
    let var = |k: &str| std::env::var(k).ok();
    let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let ours = pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Some(count) = count.filter(|_| ours) else {
        return Ok(Vec::new());
    };
    let count: usize = count
        .parse()
        .ok()
        .filter(|&n| n <= MAX_LISTEN_FDS)
        .ok_or_else(|| SupervisorError::Runtime(format!("LISTEN_FDS={count:?}")))?;
    let raw: Vec<RawFd> = (LISTEN_FDS_START..).take(count).collect();
    let adopted = Adopted::take(&raw)?;
    let names: Vec<String> = names
        .unwrap_or_default()
        .split(':')
        .map(str::to_string)
        .collect();
    let mut out = Vec::with_capacity(count);
    for (i, &fd) in raw.iter().enumerate() {
        let name = names.get(i).cloned().unwrap_or_else(|| "unknown".into());
        out.push((name, adopted.fd(fd)?));
    }
    // `adopted` closes the passed numbers; `out` holds close-on-exec
    // duplicates.
    Ok(out)
}
