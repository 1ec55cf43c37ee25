//! Blocking `SOCK_SEQPACKET` endpoints and the datagram primitives shared
//! with the async flavour.
//!
//! Received descriptors are `OwnedFd` from the moment the kernel installs
//! them (rustix's ancillary buffer wraps them and closes any left over when
//! it is dropped), so every error path — truncation, too many fds, a
//! malformed payload — closes them instead of leaking them.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::io::Errno;
use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::error::XenbusError;
use crate::message::{Message, MAX_MESSAGE};

/// Most descriptors one message may carry: enough for the largest
/// `attach-virtio` (8 memory regions, 16 queues × kick/call/log, the
/// in-flight region = 57), well under the kernel's `SCM_MAX_FD` (253).
pub const MAX_FDS: usize = 64;

/// Linux's `SCM_MAX_FD`: no datagram can carry more, so a control buffer of
/// this size never truncates `SCM_RIGHTS` and an over-long fd list is
/// reported as [`XenbusError::TooManyFds`] rather than [`XenbusError::Truncated`].
const SCM_MAX_FD: usize = 253;

const LISTEN_BACKLOG: i32 = 64;

/// A message and the descriptors that came with it.
pub type Received = (Message, Vec<OwnedFd>);

/// One raw datagram, before decoding.
pub(crate) struct Datagram {
    payload: Vec<u8>,
    truncated: bool,
    fds: Vec<OwnedFd>,
}

/// One `recvmsg` with `MSG_CMSG_CLOEXEC`. Only the syscall's own failure is
/// an `Err` here (so async callers can see `WouldBlock`); protocol checks
/// happen in [`decode_datagram`].
pub(crate) fn recv_datagram(fd: BorrowedFd<'_>) -> io::Result<Datagram> {
    let mut payload = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match net::recvmsg(
            fd,
            &mut [io::IoSliceMut::new(&mut payload)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    payload.truncate(received.bytes.min(MAX_MESSAGE));
    Ok(Datagram {
        payload,
        truncated: received
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC),
        fds,
    })
}

/// Applies the transport rules to a received datagram. On every error the
/// datagram's descriptors are dropped, which closes them.
pub(crate) fn decode_datagram(datagram: Datagram) -> Result<Received, XenbusError> {
    let Datagram {
        payload,
        truncated,
        fds,
    } = datagram;
    if truncated {
        tracing::debug!(fds = fds.len(), "dropping truncated control datagram");
        return Err(XenbusError::Truncated);
    }
    if payload.is_empty() {
        return Err(XenbusError::Closed);
    }
    if fds.len() > MAX_FDS {
        tracing::debug!(
            fds = fds.len(),
            "dropping control datagram with too many fds"
        );
        return Err(XenbusError::TooManyFds { count: fds.len() });
    }
    let message = Message::decode(&payload)?;
    tracing::trace!(%message, fds = fds.len(), "received control message");
    Ok((message, fds))
}

/// Checks and encodes a message for sending.
pub(crate) fn encode_for_send(
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<Vec<u8>, XenbusError> {
    if fds.len() > MAX_FDS {
        return Err(XenbusError::TooManyFds { count: fds.len() });
    }
    msg.encode()
}

/// One `sendmsg` of an encoded message with `fds` as `SCM_RIGHTS`.
pub(crate) fn send_datagram(
    fd: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd list does not fit the control buffer",
        ));
    }
    // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a process-killing
    // SIGPIPE.
    let sent = loop {
        match net::sendmsg(
            fd,
            &[io::IoSlice::new(payload)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(Errno::INTR) => continue,
            other => break other?,
        }
    };
    if sent == payload.len() {
        Ok(())
    } else {
        // SEQPACKET sends are atomic; a short count would be a kernel bug.
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short datagram send",
        ))
    }
}

/// Maps a send failure: a gone peer is [`XenbusError::Closed`].
pub(crate) fn send_error(err: io::Error) -> XenbusError {
    match err.raw_os_error() {
        Some(code)
            if code == Errno::PIPE.raw_os_error() || code == Errno::CONNRESET.raw_os_error() =>
        {
            XenbusError::Closed
        }
        _ => XenbusError::Io(err),
    }
}

pub(crate) fn new_socket(flags: SocketFlags) -> io::Result<OwnedFd> {
    Ok(net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | flags,
        None,
    )?)
}

pub(crate) fn socket_pair(flags: SocketFlags) -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | flags,
        None,
    )?)
}

pub(crate) fn connect_path(path: &Path) -> Result<OwnedFd, XenbusError> {
    let addr = SocketAddrUnix::new(path)?;
    let fd = new_socket(SocketFlags::empty())?;
    loop {
        match net::connect(&fd, &addr) {
            Err(Errno::INTR) => continue,
            other => break other?,
        }
    }
    Ok(fd)
}

/// Binds and listens on `path`, replacing a stale socket file left by a
/// dead process. A socket someone still accepts on is `AddrInUse`; a path
/// that is not a socket is never removed.
pub(crate) fn bind_path(path: &Path, flags: SocketFlags) -> Result<OwnedFd, XenbusError> {
    use std::os::unix::fs::FileTypeExt;

    let addr = SocketAddrUnix::new(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match connect_path(path) {
            Ok(_) => {
                return Err(XenbusError::Io(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by a live listener", path.display()),
                )))
            }
            Err(XenbusError::Io(err))
                if err.raw_os_error() == Some(Errno::CONNREFUSED.raw_os_error()) =>
            {
                tracing::info!(path = %path.display(), "removing stale control socket");
                std::fs::remove_file(path)?;
            }
            Err(err) => return Err(err),
        },
        Ok(_) => {
            return Err(XenbusError::Io(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            )))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    let fd = new_socket(flags)?;
    net::bind(&fd, &addr)?;
    net::listen(&fd, LISTEN_BACKLOG)?;
    Ok(fd)
}

pub(crate) fn accept_on(fd: BorrowedFd<'_>, flags: SocketFlags) -> io::Result<OwnedFd> {
    loop {
        match net::accept_with(fd, SocketFlags::CLOEXEC | flags) {
            Err(Errno::INTR) => continue,
            other => return Ok(other?),
        }
    }
}

pub(crate) fn set_fd_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    let flags = fcntl_getfl(fd)?;
    let flags = if nonblocking {
        flags | OFlags::NONBLOCK
    } else {
        flags - OFlags::NONBLOCK
    };
    Ok(fcntl_setfl(fd, flags)?)
}

/// Fails unless `fd` is a `SOCK_SEQPACKET` socket.
pub(crate) fn check_seqpacket(fd: BorrowedFd<'_>) -> Result<(), XenbusError> {
    match net::sockopt::socket_type(fd) {
        Ok(SocketType::SEQPACKET) => Ok(()),
        Ok(_) | Err(Errno::NOTSOCK) => Err(XenbusError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a SOCK_SEQPACKET socket",
        ))),
        Err(err) => Err(err.into()),
    }
}

/// A connected, blocking `SOCK_SEQPACKET` unix socket carrying one
/// [`Message`] per datagram.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
}

impl SeqPacket {
    /// Connects to a listening control socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, XenbusError> {
        connect_path(path.as_ref()).map(|fd| Self { fd })
    }

    /// A connected pair, e.g. supervisor ↔ backend before `exec`. Both ends
    /// are close-on-exec; clear it on the end a child should inherit.
    pub fn pair() -> Result<(Self, Self), XenbusError> {
        let (a, b) = socket_pair(SocketFlags::empty())?;
        Ok((Self { fd: a }, Self { fd: b }))
    }

    /// Wraps an existing socket (e.g. inherited across `exec`); fails
    /// unless it is `SOCK_SEQPACKET`.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, XenbusError> {
        check_seqpacket(fd.as_fd())?;
        Ok(Self { fd })
    }

    /// Sends `msg` with `fds` (at most [`MAX_FDS`]) in one datagram.
    pub fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), XenbusError> {
        let payload = encode_for_send(msg, fds)?;
        send_datagram(self.fd.as_fd(), &payload, fds).map_err(send_error)?;
        tracing::trace!(message = %msg, fds = fds.len(), "sent control message");
        Ok(())
    }

    /// Receives one message and its descriptors, blocking until one arrives
    /// (or failing with `WouldBlock` in nonblocking mode).
    pub fn recv(&self) -> Result<Received, XenbusError> {
        decode_datagram(recv_datagram(self.fd.as_fd())?)
    }

    /// Like [`recv`](Self::recv), but gives up after `timeout` with
    /// `Ok(None)`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>, XenbusError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, Some(&wait)) {
                Ok(0) => return Ok(None),
                // Readable, or hung up / errored: recv reports which.
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(err) => return Err(err.into()),
            }
            match recv_datagram(self.fd.as_fd()) {
                Ok(datagram) => return decode_datagram(datagram).map(Some),
                // Nonblocking socket and another reader won the race.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Switches `O_NONBLOCK` on or off.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), XenbusError> {
        Ok(set_fd_nonblocking(self.fd.as_fd(), nonblocking)?)
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SeqPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<SeqPacket> for OwnedFd {
    fn from(sock: SeqPacket) -> Self {
        sock.fd
    }
}

/// A listening, blocking `SOCK_SEQPACKET` unix socket.
///
/// The socket file is not removed on drop: the next [`bind`](Self::bind)
/// replaces it once nothing accepts on it any more.
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl SeqPacketListener {
    /// Binds `path` (replacing a stale socket file) and listens.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, XenbusError> {
        let path = path.as_ref();
        Ok(Self {
            fd: bind_path(path, SocketFlags::empty())?,
            path: path.to_owned(),
        })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<SeqPacket, XenbusError> {
        let fd = accept_on(self.fd.as_fd(), SocketFlags::empty())?;
        Ok(SeqPacket { fd })
    }

    /// The path the listener was bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Switches `O_NONBLOCK` on or off (for use in a poll loop).
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), XenbusError> {
        Ok(set_fd_nonblocking(self.fd.as_fd(), nonblocking)?)
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for SeqPacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kind, ErrorCode, XenbusError};

    fn eventfd() -> OwnedFd {
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
    }

    fn eventfd_add(fd: BorrowedFd<'_>, n: u64) {
        assert_eq!(rustix::io::write(fd, &n.to_ne_bytes()).unwrap(), 8);
    }

    fn eventfd_take(fd: BorrowedFd<'_>) -> u64 {
        let mut buf = [0u8; 8];
        assert_eq!(rustix::io::read(fd, &mut buf).unwrap(), 8);
        u64::from_ne_bytes(buf)
    }

    #[test]
    fn message_round_trip_over_pair() {
        let (a, b) = SeqPacket::pair().unwrap();
        let msg = Message::probe("xvda");
        a.send(&msg, &[]).unwrap();
        let (got, fds) = b.recv().unwrap();
        assert_eq!(got, msg);
        assert!(fds.is_empty());
        b.send(&Message::error(ErrorCode::Enoent, "no such device"), &[])
            .unwrap();
        let (got, _) = a.recv().unwrap();
        assert_eq!(got.kind(), kind::ERROR);
        assert_eq!(got.get("code"), Some("ENOENT"));
    }

    #[test]
    fn fds_pass_and_stay_usable() {
        let (a, b) = SeqPacket::pair().unwrap();
        let kick = eventfd();
        let notify = eventfd();
        a.send(&Message::new("connect"), &[kick.as_fd(), notify.as_fd()])
            .unwrap();
        let (_, fds) = b.recv().unwrap();
        assert_eq!(fds.len(), 2);
        // Written through the received copy, read on the original.
        eventfd_add(fds[0].as_fd(), 5);
        assert_eq!(eventfd_take(kick.as_fd()), 5);
        eventfd_add(fds[1].as_fd(), 7);
        assert_eq!(eventfd_take(notify.as_fd()), 7);
        // MSG_CMSG_CLOEXEC
        for fd in &fds {
            let flags = rustix::io::fcntl_getfd(fd).unwrap();
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        }
    }

    #[test]
    fn one_fd_too_many_rejected_on_send() {
        let (a, b) = SeqPacket::pair().unwrap();
        let fd = eventfd();
        let fds = [fd.as_fd(); MAX_FDS + 1];
        assert!(matches!(
            a.send(&Message::new("connect"), &fds),
            Err(XenbusError::TooManyFds { count }) if count == MAX_FDS + 1
        ));
        a.send(&Message::new("connect"), &fds[..MAX_FDS]).unwrap();
        assert_eq!(b.recv().unwrap().1.len(), MAX_FDS);
    }

    #[test]
    fn invalid_message_rejected_on_send() {
        let (a, _b) = SeqPacket::pair().unwrap();
        assert!(matches!(
            a.send(&Message::new("probe").with("k", "a\nb"), &[]),
            Err(XenbusError::BadValue { .. })
        ));
    }

    #[test]
    fn oversize_datagram_is_truncated() {
        let (a, b) = SeqPacket::pair().unwrap();
        let mut raw = b"probe\n".to_vec();
        raw.resize(MAX_MESSAGE + 1000, b'a');
        net::send(a.as_fd(), &raw, SendFlags::empty()).unwrap();
        assert!(matches!(b.recv(), Err(XenbusError::Truncated)));
        // The rest of the record is discarded: the next message is intact.
        a.send(&Message::new("close"), &[]).unwrap();
        assert_eq!(b.recv().unwrap().0.kind(), "close");
    }

    #[test]
    fn exactly_max_message_is_accepted() {
        let (a, b) = SeqPacket::pair().unwrap();
        let mut raw = b"probe\nk=".to_vec();
        raw.resize(MAX_MESSAGE - 1, b'a');
        raw.push(b'\n');
        // Too long a value for the grammar, but not truncated.
        net::send(a.as_fd(), &raw, SendFlags::empty()).unwrap();
        assert!(matches!(b.recv(), Err(XenbusError::BadValue { .. })));
    }

    #[test]
    fn malformed_datagram_is_typed_error() {
        let (a, b) = SeqPacket::pair().unwrap();
        net::send(a.as_fd(), b"probe\n\xff", SendFlags::empty()).unwrap();
        assert!(matches!(b.recv(), Err(XenbusError::BadUtf8(_))));
    }

    #[test]
    fn peer_close_is_closed() {
        let (a, b) = SeqPacket::pair().unwrap();
        drop(a);
        assert!(matches!(b.recv(), Err(XenbusError::Closed)));
        assert!(matches!(
            b.send(&Message::new("close"), &[]),
            Err(XenbusError::Closed)
        ));
    }

    #[test]
    fn recv_timeout_times_out_then_receives() {
        let (a, b) = SeqPacket::pair().unwrap();
        let start = Instant::now();
        assert!(b.recv_timeout(Duration::from_millis(50)).unwrap().is_none());
        assert!(start.elapsed() >= Duration::from_millis(50));
        a.send(&Message::new("close"), &[]).unwrap();
        let (msg, _) = b.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(msg.kind(), "close");
    }

    #[test]
    fn nonblocking_recv_would_block() {
        let (_a, b) = SeqPacket::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        match b.recv() {
            Err(XenbusError::Io(err)) => assert_eq!(err.kind(), io::ErrorKind::WouldBlock),
            other => panic!("expected WouldBlock, got {other:?}"),
        }
    }

    #[test]
    fn from_fd_checks_socket_type() {
        let (a, _b) = SeqPacket::pair().unwrap();
        let sock = SeqPacket::from_fd(a.into_fd()).unwrap();
        drop(sock);
        assert!(SeqPacket::from_fd(eventfd()).is_err());
        let (stream, _) = net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(SeqPacket::from_fd(stream).is_err());
    }
}
