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
    /// `O_NONBLOCK` is set on the open file. A received fd shares its file
    /// status flags with the peer, so we never change them; a blocking one
    /// is polled before every read instead.
    nonblocking: bool,
}

impl EventChannel {
    /// Creates a fresh channel (close-on-exec, non-blocking).
    pub fn new() -> Result<Self, RingError> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| RingError::Event(e.into()))?;
        Ok(EventChannel {
            fd: fd.into(),
            nonblocking: true,
        })
    }

    /// Wraps an eventfd received from a peer. Its flags are left as the
    /// peer set them (they are shared with the peer's copy); a fd that is not
    /// an eventfd fails on first use.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RingError> {
        let flags =
            fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| RingError::Event(e.into()))?;
        let nonblocking = OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK);
        Ok(EventChannel { fd, nonblocking })
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
        if !self.nonblocking && !self.readable(0)? {
            return Ok(0);
        }
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
        Ok(self.readable(ms)? && self.drain()? > 0)
    }

    /// Waits up to `ms` milliseconds for the counter to be non-zero.
    fn readable(&self, ms: i32) -> Result<bool, RingError> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
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

    #[test]
    fn a_received_blocking_fd_keeps_its_flags_and_never_blocks() {
        let fd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
            .unwrap();
        let fd: OwnedFd = fd.into();
        let peer_copy = fd.try_clone().unwrap();
        let ch = EventChannel::from_fd(fd).unwrap();
        let flags = fcntl(peer_copy.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(!OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK));
        // Nothing pending: a blocking eventfd must not block drain().
        assert_eq!(ch.drain().unwrap(), 0);
        ch.notify().unwrap();
        assert_eq!(ch.drain().unwrap(), 1);
    }
}
