//! The tokio flavour of [`SeqPacket`](crate::SeqPacket): the same datagram
//! rules on a nonblocking socket registered with the reactor.
//!
//! `send` and `recv` are cancel-safe: a datagram is consumed or sent inside
//! one synchronous `try_io` call, so dropping the future never loses or
//! half-sends a message.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::net::SocketFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::XenbusError;
use crate::message::Message;
use crate::socket::{
    accept_on, bind_path, check_seqpacket, decode_datagram, encode_for_send, recv_datagram,
    send_datagram, send_error, set_fd_nonblocking, socket_pair, Received, SeqPacket,
    SeqPacketListener,
};

/// Registers a nonblocking socket with the current tokio reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns an open descriptor that nothing else can close,
    // and its `as_raw_fd` always returns that same descriptor; the `AsyncFd`
    // takes ownership of it, so it stays open for the registration's life.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

/// A connected `SOCK_SEQPACKET` socket driven by tokio. Must be created
/// inside a tokio runtime.
#[derive(Debug)]
pub struct AsyncSeqPacket {
    inner: AsyncFd<OwnedFd>,
}

impl AsyncSeqPacket {
    /// Registers a blocking-flavour socket with the reactor (switching it
    /// to nonblocking).
    pub fn new(sock: SeqPacket) -> Result<Self, XenbusError> {
        Self::register(sock.into_fd())
    }

    /// Wraps an existing socket; fails unless it is `SOCK_SEQPACKET`.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, XenbusError> {
        check_seqpacket(fd.as_fd())?;
        Self::register(fd)
    }

    fn register(fd: OwnedFd) -> Result<Self, XenbusError> {
        set_fd_nonblocking(fd.as_fd(), true)?;
        Ok(Self {
            inner: register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Connects to a listening control socket at `path`. A unix `connect`
    /// completes at once unless the listener's backlog is full, so it is
    /// done in blocking mode.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, XenbusError> {
        Self::new(SeqPacket::connect(path)?)
    }

    /// A connected pair.
    pub fn pair() -> Result<(Self, Self), XenbusError> {
        let (a, b) = socket_pair(SocketFlags::NONBLOCK)?;
        Ok((Self::register(a)?, Self::register(b)?))
    }

    /// Sends `msg` with `fds` (at most [`MAX_FDS`](crate::MAX_FDS)),
    /// waiting while the peer's receive queue is full.
    pub async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), XenbusError> {
        let payload = encode_for_send(msg, fds)?;
        loop {
            let mut guard = self.inner.writable().await?;
            match guard.try_io(|fd| send_datagram(fd.as_fd(), &payload, fds)) {
                Ok(result) => {
                    result.map_err(send_error)?;
                    tracing::trace!(message = %msg, fds = fds.len(), "sent control message");
                    return Ok(());
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends `msg` (without descriptors) only if the socket takes it at
    /// once; never waits. For a last word to a peer that may not be
    /// reading: a full receive queue is an error, not a wait.
    pub fn try_send(&self, msg: &Message) -> Result<(), XenbusError> {
        let payload = encode_for_send(msg, &[])?;
        send_datagram(self.inner.get_ref().as_fd(), &payload, &[]).map_err(send_error)?;
        tracing::trace!(message = %msg, "sent control message");
        Ok(())
    }

    /// Receives one message and its descriptors.
    pub async fn recv(&self) -> Result<Received, XenbusError> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| recv_datagram(fd.as_fd())) {
                Ok(result) => return decode_datagram(result?),
                Err(_would_block) => continue,
            }
        }
    }

    /// Deregisters from the reactor and gives up the (nonblocking) socket.
    pub fn into_fd(self) -> OwnedFd {
        self.inner.into_inner()
    }
}

impl AsFd for AsyncSeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

/// A listening `SOCK_SEQPACKET` socket driven by tokio.
#[derive(Debug)]
pub struct AsyncSeqPacketListener {
    inner: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl AsyncSeqPacketListener {
    /// Binds `path` (replacing a stale socket file) and listens.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, XenbusError> {
        let path = path.as_ref();
        let fd = bind_path(path, SocketFlags::NONBLOCK)?;
        Ok(Self {
            inner: register(fd, Interest::READABLE)?,
            path: path.to_owned(),
        })
    }

    /// A listening socket this process already holds, bound at `path` —
    /// inherited from the supervisor binary this one replaced in a live
    /// upgrade.
    pub fn adopt(fd: OwnedFd, path: impl AsRef<Path>) -> Result<Self, XenbusError> {
        check_seqpacket(fd.as_fd())?;
        set_fd_nonblocking(fd.as_fd(), true)?;
        Ok(Self {
            inner: register(fd, Interest::READABLE)?,
            path: path.as_ref().to_owned(),
        })
    }

    /// Registers a blocking-flavour listener with the reactor.
    pub fn new(listener: SeqPacketListener) -> Result<Self, XenbusError> {
        let path = listener.path().to_owned();
        let fd = listener.into_fd();
        set_fd_nonblocking(fd.as_fd(), true)?;
        Ok(Self {
            inner: register(fd, Interest::READABLE)?,
            path,
        })
    }

    /// Waits for the next connection. A failed `accept` (`EMFILE` and
    /// the like) leaves the connection queued and the listener readable:
    /// calling this again at once fails again, so callers pause first.
    pub async fn accept(&self) -> Result<AsyncSeqPacket, XenbusError> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| accept_on(fd.as_fd(), SocketFlags::NONBLOCK)) {
                Ok(result) => return AsyncSeqPacket::register(result?),
                Err(_would_block) => continue,
            }
        }
    }

    /// The path the listener was bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for AsyncSeqPacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}
