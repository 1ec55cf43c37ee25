//! The descriptors of a live upgrade: those a state names on the way out
//! ([`Handover`]), and those the new binary takes over on the way in
//! ([`Adopted`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use crate::SupervisorError;

/// The descriptors a state being built names. They stay owned where they
/// are (the paused tasks and threads hold them); only their numbers are
/// collected, and whether they survive `execve`.
#[derive(Debug, Default)]
pub(crate) struct Handover {
    fds: Vec<RawFd>,
}

impl Handover {
    /// Names `fd` in the state; returns its number.
    pub fn fd(&mut self, fd: impl AsFd) -> RawFd {
        let raw = fd.as_fd().as_raw_fd();
        if !self.fds.contains(&raw) {
            self.fds.push(raw);
        }
        raw
    }

    /// Takes over the descriptors `other` named.
    pub fn merge(&mut self, other: Handover) {
        for fd in other.fds {
            if !self.fds.contains(&fd) {
                self.fds.push(fd);
            }
        }
    }

    /// The numbers, for the state's `fds`.
    pub fn list(&self) -> Vec<RawFd> {
        self.fds.clone()
    }

    /// Lets every named descriptor survive `execve` (`inherit`), or not.
    /// Every descriptor is open: their owners are paused, not gone.
    pub fn set_inherited(&self, inherit: bool) -> Result<(), String> {
        let flags = if inherit {
            FdFlag::empty()
        } else {
            FdFlag::FD_CLOEXEC
        };
        for &fd in &self.fds {
            fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(|e| format!("fd {fd}: {e}"))?;
        }
        Ok(())
    }
}

/// The descriptors a new binary inherited, by the number the state gives
/// them (or systemd's `LISTEN_FDS`, `fdstore`). Each is owned here once; users get duplicates (close-on-exec),
/// and the inherited numbers are closed when this is dropped.
#[derive(Debug)]
pub(crate) struct Adopted {
    fds: HashMap<RawFd, OwnedFd>,
}

impl Adopted {
    /// Takes ownership of `list`, the state's descriptors. Called once,
    /// before anything else could have closed or reused a number the
    /// previous binary left open.
    pub fn take(list: &[RawFd]) -> Result<Self, SupervisorError> {
        let mut fds = HashMap::new();
        for &raw in list {
            if raw < 0 || fds.contains_key(&raw) {
                return Err(SupervisorError::Runtime(format!(
                    "inherited descriptors: bad descriptor {raw}"
                )));
            }
            // Open (F_GETFD succeeds) before it is owned.
            fcntl(raw, FcntlArg::F_GETFD).map_err(|e| {
                SupervisorError::Runtime(format!("inherited descriptor {raw}: {e}"))
            })?;
            // SAFETY: `raw` is open (checked just above) and was inherited
            // across `execve` from the previous binary, which named it in
            // the state once, or from systemd, which passed it in
            // `LISTEN_FDS` (duplicates refused above). This process has
            // not opened it — an inherited number is taken when it starts,
            // so nothing it opened can have that number — and nothing else
            // here owns it, so this is its one owner.
            #[allow(unsafe_code)]
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            fds.insert(raw, fd);
        }
        Ok(Adopted { fds })
    }

    /// A close-on-exec duplicate of inherited descriptor `raw`.
    pub fn fd(&self, raw: RawFd) -> Result<OwnedFd, SupervisorError> {
        let fd = self.fds.get(&raw).ok_or_else(|| {
            SupervisorError::Runtime(format!(
                "upgrade state: descriptor {raw} was not handed over"
            ))
        })?;
        fd.try_clone()
            .map_err(|e| SupervisorError::Runtime(format!("dup of descriptor {raw}: {e}")))
    }

    /// [`fd`](Self::fd) as a `File`.
    pub fn file(&self, raw: RawFd) -> Result<std::fs::File, SupervisorError> {
        self.fd(raw).map(std::fs::File::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_over_descriptors_lose_cloexec_and_get_it_back() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut h = Handover::default();
        let raw = h.fd(&file);
        assert_eq!(h.fd(&file), raw, "named once");
        assert_eq!(h.list(), vec![raw]);
        let cloexec = || {
            FdFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFD).unwrap())
                .contains(FdFlag::FD_CLOEXEC)
        };
        assert!(cloexec());
        h.set_inherited(true).unwrap();
        assert!(!cloexec());
        h.set_inherited(false).unwrap();
        assert!(cloexec());
    }
}
