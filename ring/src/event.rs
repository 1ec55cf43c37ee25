use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::RingError;

/// One direction of a Xen event channel, carried by an eventfd.
///
/// A kick sent while nobody waits stays counted in the eventfd, so a backend
/// instance that starts later still sees it.
///
/// Neither [`notify`](Self::notify) nor [`drain`](Self::drain) ever relies
/// on `O_NONBLOCK`: a received eventfd shares its open file description,
/// and so its file status flags, with the peer, which can clear the flag at
/// any time after handing the fd over. Every `read(2)` and `write(2)` is
/// preceded by a zero-timeout `poll(2)` instead (docs/PROTOCOL.md §4.3).
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

    /// Wraps an eventfd received from a peer. Its flags are left as the
    /// peer set them (they are shared with the peer's copy, and changing
    /// them would change the peer's own reads); a fd that is not an
    /// eventfd fails on first use.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RingError> {
        Ok(EventChannel { fd })
    }

    /// Sends one notification (`notify_remote_via_evtchn`); never blocks.
    ///
    /// A counter at its maximum (`0xfffffffffffffffe`) means the peer has
    /// not consumed the earlier notifications: it has a wake-up pending
    /// already, so this one counts as sent. A blocking eventfd would make
    /// `write(2)` wait for the peer to read instead — for ever, if the peer
    /// is hostile. What is left is a peer that fills its own counter
    /// between our `poll` and our `write`: that blocks only the instance
    /// serving that peer, whose heartbeat then stops and the supervisor's
    /// hang watchdog replaces it (docs/ARCHITECTURE.md §7).
    pub fn notify(&self) -> Result<(), RingError> {
        if !self.ready(PollFlags::POLLOUT, 0)? {
            return Ok(());
        }
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
    /// (0 when none was pending). Never blocks.
    pub fn drain(&self) -> Result<u64, RingError> {
        if !self.ready(PollFlags::POLLIN, 0)? {
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
        Ok(self.ready(PollFlags::POLLIN, ms)? && self.drain()? > 0)
    }

    /// Waits up to `ms` milliseconds for `events` (`POLLIN`: the counter
    /// is non-zero; `POLLOUT`: it can take another 1).
    fn ready(&self, events: PollFlags, ms: i32) -> Result<bool, RingError> {
        let mut fds = [PollFd::new(self.fd.as_fd(), events)];
        loop {
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    let got = fds[0].revents().unwrap_or(PollFlags::empty());
                    return Ok(got.intersects(events));
                }
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
    use nix::fcntl::{fcntl, FcntlArg, OFlag};

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

    /// The largest value an eventfd counter holds (`ULLONG_MAX - 1`).
    const FULL: u64 = 0xffff_ffff_ffff_fffe;

    /// A blocking eventfd and the peer's copy of it.
    fn blocking_pair() -> (OwnedFd, OwnedFd) {
        let fd: OwnedFd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap().into();
        let peer = fd.try_clone().unwrap();
        (fd, peer)
    }

    /// Runs `f` on a thread; fails the test (leaving the thread behind)
    /// unless it returns within 5 s.
    fn within_5s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what} blocked"))
    }

    #[test]
    fn notify_on_a_full_blocking_eventfd_returns_at_once() {
        let (fd, peer) = blocking_pair();
        nix::unistd::write(&peer, &FULL.to_ne_bytes()).unwrap();
        let ch = EventChannel::from_fd(fd).unwrap();
        within_5s("notify", move || ch.notify()).unwrap();
        let mut buf = [0u8; 8];
        nix::unistd::read(peer.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), FULL, "the counter was changed");
    }

    #[test]
    fn a_peer_clearing_o_nonblock_after_handing_over_blocks_nothing() {
        let fd: OwnedFd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .unwrap()
            .into();
        let peer = fd.try_clone().unwrap();
        let ch = std::sync::Arc::new(EventChannel::from_fd(fd).unwrap());
        // The open file description is shared: the peer's F_SETFL is ours.
        fcntl(peer.as_raw_fd(), FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        let c = ch.clone();
        assert_eq!(
            within_5s("drain of an empty counter", move || c.drain()).unwrap(),
            0
        );
        nix::unistd::write(&peer, &FULL.to_ne_bytes()).unwrap();
        let c = ch.clone();
        within_5s("notify on a full counter", move || c.notify()).unwrap();
        assert_eq!(ch.drain().unwrap(), FULL);
        // With room again, a notification is counted as usual.
        ch.notify().unwrap();
        assert_eq!(ch.drain().unwrap(), 1);
    }
}
