use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::RingError;

/// One direction of a Xen event channel, carried by a non-blocking eventfd.
///
/// A kick sent while nobody waits stays counted in the eventfd, so a backend
/// instance that starts later still sees it.
#[derive(Debug)]
pub struct EventChannel {
    fd: OwnedFd,
}

impl EventChannel {
    /// Creates a fresh channel (close-on-exec, non-blocking).
    pub fn new() -> Result<Self, RingError> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| RingError::Event(e.into()))?;
        Ok(EventChannel { fd: fd.into() })
    }

    /// Wraps an eventfd received from a peer. The fd is switched to
    /// non-blocking mode; a fd that is not an eventfd fails on first use.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RingError> {
        let raw = fd.as_raw_fd();
        let flags = fcntl(raw, FcntlArg::F_GETFL).map_err(|e| RingError::Event(e.into()))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(raw, FcntlArg::F_SETFL(flags)).map_err(|e| RingError::Event(e.into()))?;
        Ok(EventChannel { fd })
    }

    /// Sends one notification (`notify_remote_via_evtchn`).
    pub fn notify(&self) -> Result<(), RingError> {
        loop {
            match nix::unistd::write(&self.fd, &1u64.to_ne_bytes()) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                // The counter is saturated: the peer has a wake-up pending.
                Err(Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(RingError::Event(e.into())),
            }
        }
    }

    /// Consumes pending notifications; returns how many were counted
    /// (0 when none was pending).
    pub fn drain(&self) -> Result<u64, RingError> {
        let mut buf = [0u8; 8];
        loop {
            return match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(8) => Ok(u64::from_ne_bytes(buf)),
                Ok(n) => Err(RingError::Event(io::Error::other(format!(
                    "short eventfd read of {n} bytes"
                )))),
                Err(Errno::EAGAIN) => Ok(0),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(RingError::Event(e.into())),
            };
        }
    }

    /// Blocks until a notification is pending or `timeout` passes; consumes
    /// it. Returns whether one arrived.
    pub fn wait(&self, timeout: Duration) -> Result<bool, RingError> {
        if self.drain()? > 0 {
            return Ok(true);
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(self.drain()? > 0),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(RingError::Event(e.into())),
            }
        }
    }

    /// Duplicates the underlying fd, e.g. to hand it to another process.
    pub fn try_clone_fd(&self) -> Result<OwnedFd, RingError> {
        self.fd.try_clone().map_err(RingError::Event)
    }
}

impl AsRawFd for EventChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_counted_until_drained() {
        let ch = EventChannel::new().unwrap();
        assert_eq!(ch.drain().unwrap(), 0);
        ch.notify().unwrap();
        ch.notify().unwrap();
        let peer = EventChannel::from_fd(ch.try_clone_fd().unwrap()).unwrap();
        assert_eq!(peer.drain().unwrap(), 2);
        assert!(!ch.wait(Duration::from_millis(10)).unwrap());
        peer.notify().unwrap();
        assert!(ch.wait(Duration::from_secs(1)).unwrap());
    }
}
