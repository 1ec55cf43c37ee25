//! The wires a NIC's frames leave and arrive on (docs/ARCHITECTURE.md
//! §11.5): a TAP interface ([`tap`]) or a cable to another vif of the same
//! supervisor ([`cable`]).
//!
//! The supervisor opens both and holds their fds for the device's
//! lifetime, so a backend crash loses neither the interface (carrier,
//! bridge, routes) nor the frames queued for the guest: they wait in the
//! kernel's queue of the fd, and the next backend instance, given the
//! same fd, reads them. A backend wraps the fd it was given in a [`Wire`]
//! and has one code path for both: every frame is a virtio-net header
//! ([`vnet`]) followed by an Ethernet frame, one frame per system call,
//! never blocking.

pub mod cable;
mod sys;
pub mod tap;
pub mod vnet;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, sendmsg, sockopt, MsgFlags, SockType};
use thiserror::Error;

pub use cable::{cable_pair, CableConfig};
pub use tap::{Offloads, Tap, TapConfig, TapMode};
pub use vnet::{VnetHeader, VnetHeaderError, VnetHeaderLen, VNET_HDR_LEN, VNET_HDR_MRG_LEN};

/// The largest Ethernet frame a wire carries, without the virtio-net
/// header: what a netif TX request's 16-bit size can describe, and more
/// than any GSO frame Linux builds for a TAP.
pub const MAX_FRAME_LEN: usize = 65535;
/// The smallest: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// Frames of a burst [`Wire::recv`] may skip as oversized or invalid
/// before it returns `None` to let its caller run other work.
const MAX_SKIPPED_PER_RECV: usize = 64;

/// Errors of the wire layer.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid wire configuration: {0}")]
    Config(&'static str),
    #[error("interface {0} already exists (asked to create it)")]
    AlreadyExists(String),
    #[error("interface {0} does not exist (asked to adopt it)")]
    NotFound(String),
    #[error("cannot open /dev/net/tun (tun module loaded? CAP_NET_ADMIN?)")]
    OpenTun(#[source] std::io::Error),
    #[error("{op} on {name}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the fd is not a {expected}")]
    WrongFd { expected: &'static str },
    #[error("frame of {len} bytes (with header) is shorter than header + Ethernet header")]
    FrameTooShort { len: usize },
    #[error("frame of {len} bytes (with header) is longer than header + {MAX_FRAME_LEN}")]
    FrameTooLong { len: usize },
    #[error("receive buffer of {len} bytes, {need} needed")]
    BufferTooSmall { len: usize, need: usize },
    #[error(transparent)]
    Header(#[from] VnetHeaderError),
    #[error("the other end of the cable is closed")]
    Closed,
    #[error("{op} on the wire")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Which wire an fd is; decides how a frame is moved through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireKind {
    /// A queue of a TAP interface: the kernel reads and writes the
    /// virtio-net header itself.
    Tap,
    /// One end of a cable (`AF_UNIX`, `SOCK_SEQPACKET`): each message is a
    /// 10-byte `virtio_net_hdr` and the frame, whatever header length
    /// either end uses.
    Cable,
}

/// What became of a frame handed to [`Wire::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// Not sent, and counted in [`WireStats`]. A TAP's frame is lost like
    /// on a full TX queue of a real NIC, and the caller answers its
    /// request as sent; a cable's (`QueueFull`) may be sent again once
    /// the cable has room, which is what the netif model does
    /// (docs/ARCHITECTURE.md §11.5).
    Dropped(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The kernel queue is full (a cable's peer does not read fast
    /// enough).
    QueueFull,
    /// The interface is down.
    LinkDown,
}

/// Counters of one [`Wire`], for the backend's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames written to the wire.
    pub tx_frames: u64,
    /// Frames dropped because the wire's queue was full.
    pub tx_dropped_full: u64,
    /// Frames dropped because the interface was down.
    pub tx_dropped_down: u64,
    /// Frames read from the wire and handed to the caller.
    pub rx_frames: u64,
    /// Frames read and dropped: longer than [`MAX_FRAME_LEN`].
    pub rx_dropped_oversized: u64,
    /// Frames read and dropped: too short, or a header that fails
    /// [`VnetHeader::validate`] (a cable's peer is another guest's
    /// backend, and is not trusted).
    pub rx_dropped_invalid: u64,
}

/// A backend's handle on a wire fd.
#[derive(Debug)]
pub struct Wire {
    kind: WireKind,
    fd: OwnedFd,
    hdr: VnetHeaderLen,
    stats: WireStats,
    /// A cable whose far end is closed: nothing more can arrive.
    closed: bool,
}

impl Wire {
    /// Wraps an fd the supervisor handed over, after checking that it is
    /// what `kind` says: a TAP queue with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR` and a `hdr`-byte header, or a `SOCK_SEQPACKET`
    /// socket. The fd is made non-blocking (a flag of the open file, so
    /// the supervisor's copy becomes non-blocking too: it never reads).
    pub fn from_fd(kind: WireKind, fd: OwnedFd, hdr: VnetHeaderLen) -> Result<Self, WireError> {
        match kind {
            WireKind::Tap => tap::check_queue_fd(fd.as_fd(), hdr)?,
            WireKind::Cable => {
                let ty = nix::sys::socket::getsockopt(&fd, sockopt::SockType)
                    .map_err(|_| WireError::WrongFd { expected: "socket" })?;
                if ty != SockType::SeqPacket {
                    return Err(WireError::WrongFd {
                        expected: "SOCK_SEQPACKET socket",
                    });
                }
            }
        }
        set_nonblocking(fd.as_fd())?;
        Ok(Wire {
            kind,
            fd,
            hdr,
            stats: WireStats::default(),
            closed: false,
        })
    }

    pub fn kind(&self) -> WireKind {
        self.kind
    }

    pub fn header_len(&self) -> VnetHeaderLen {
        self.hdr
    }

    pub fn stats(&self) -> WireStats {
        self.stats
    }

    /// Tells a TAP which offloads the guest accepts on receive
    /// (`TUNSETOFFLOAD`, see [`Offloads`]); the kernel then hands over
    /// frames with partial checksums or TCP super-frames accordingly. A
    /// cable has nothing to set: asking it for any offload is an error.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), WireError> {
        let flags = offloads.tun_flags()?;
        match self.kind {
            WireKind::Tap => {
                sys::tun_set_offload(self.fd.as_fd(), flags).map_err(|e| WireError::Io {
                    op: "TUNSETOFFLOAD",
                    source: e,
                })
            }
            WireKind::Cable if flags == 0 => Ok(()),
            WireKind::Cable => Err(WireError::Config("a cable takes no receive offloads")),
        }
    }

    /// The far end of this cable was found closed by a read
    /// ([`WireError::Closed`]): nothing more can arrive, and a poll would
    /// report its end at once, every time (docs/ARCHITECTURE.md §11.5).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The buffer size [`Wire::recv`] needs: header and largest frame.
    pub fn recv_buf_len(&self) -> usize {
        self.hdr.bytes() + MAX_FRAME_LEN
    }

    /// Sends one frame: `frame` is the header ([`Wire::header_len`]
    /// bytes) followed by the Ethernet frame. The header is validated
    /// first (the bytes come from a guest). Never blocks: a full queue
    /// gives [`SendOutcome::Dropped`], counted; the frame was not sent.
    pub fn send(&mut self, frame: &[u8]) -> Result<SendOutcome, WireError> {
        let hdr_len = self.hdr.bytes();
        let len = frame.len();
        if len < hdr_len + MIN_FRAME_LEN {
            return Err(WireError::FrameTooShort { len });
        }
        self.check_frame(&frame[..hdr_len], len - hdr_len)?;
        let result = loop {
            let r = match self.kind {
                WireKind::Tap => nix::sys::uio::writev(&self.fd, &[IoSlice::new(frame)]),
                // The basic header on the socket: `num_buffers` means
                // nothing to the receiving end, which zeroes its own.
                WireKind::Cable => sendmsg::<()>(
                    self.fd.as_raw_fd(),
                    &[
                        IoSlice::new(&frame[..VNET_HDR_LEN]),
                        IoSlice::new(&frame[hdr_len..]),
                    ],
                    &[],
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                    None,
                ),
            };
            if r != Err(Errno::EINTR) {
                break r;
            }
        };
        self.count_send(result)
    }

    /// Checks a frame the caller writes itself (a batch to a TAP,
    /// [`crate::tapbatch`]) as [`Wire::send`] does: `header` is its
    /// virtio-net header, `frame_len` the Ethernet frame's length.
    pub fn check_frame(&self, header: &[u8], frame_len: usize) -> Result<(), WireError> {
        let len = header.len() + frame_len;
        if header.len() < self.hdr.bytes() || frame_len < MIN_FRAME_LEN {
            return Err(WireError::FrameTooShort { len });
        }
        if frame_len > MAX_FRAME_LEN {
            return Err(WireError::FrameTooLong { len });
        }
        VnetHeader::decode(header, self.hdr)?.validate(frame_len)?;
        Ok(())
    }

    /// What a write of a frame the caller made itself (bytes written or
    /// `-errno`, as io_uring reports it) means, counted as [`Wire::send`]
    /// counts its own.
    pub fn count_write(&mut self, result: i32) -> Result<SendOutcome, WireError> {
        let r = if result < 0 {
            Err(Errno::from_raw(-result))
        } else {
            Ok(result as usize)
        };
        self.count_send(r)
    }

    fn count_send(&mut self, result: Result<usize, Errno>) -> Result<SendOutcome, WireError> {
        match result {
            Ok(_) => {
                self.stats.tx_frames += 1;
                Ok(SendOutcome::Sent)
            }
            Err(Errno::EAGAIN | Errno::ENOBUFS) => {
                self.stats.tx_dropped_full += 1;
                tracing::trace!(kind = ?self.kind, "wire queue full: frame dropped");
                Ok(SendOutcome::Dropped(DropReason::QueueFull))
            }
            Err(Errno::EIO | Errno::ENETDOWN) if self.kind == WireKind::Tap => {
                self.stats.tx_dropped_down += 1;
                tracing::trace!("tap down: frame dropped");
                Ok(SendOutcome::Dropped(DropReason::LinkDown))
            }
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN)
                if self.kind == WireKind::Cable =>
            {
                Err(WireError::Closed)
            }
            Err(e) => Err(WireError::Io {
                op: "send",
                source: e.into(),
            }),
        }
    }

    /// Receives one frame into `buf` (at least [`Wire::recv_buf_len`]
    /// bytes): its header ([`Wire::header_len`] bytes, `num_buffers`
    /// zero) and the Ethernet frame; returns the total length, or `None`
    /// when nothing is queued. Frames that are oversized or fail
    /// validation are dropped and counted, up to a bound per call, after
    /// which `None` is returned too; so `None` means "poll before calling
    /// again", with a level-triggered poll.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, WireError> {
        let need = self.recv_buf_len();
        if buf.len() < need {
            return Err(WireError::BufferTooSmall {
                len: buf.len(),
                need,
            });
        }
        let hdr_len = self.hdr.bytes();
        for _ in 0..MAX_SKIPPED_PER_RECV {
            let Some(read) = self.read_one(&mut buf[..need])? else {
                return Ok(None);
            };
            let Some(total) = read else {
                self.stats.rx_dropped_oversized += 1;
                tracing::debug!(kind = ?self.kind, "oversized frame dropped");
                continue;
            };
            if total < hdr_len + MIN_FRAME_LEN {
                self.stats.rx_dropped_invalid += 1;
                tracing::debug!(kind = ?self.kind, total, "short frame dropped");
                continue;
            }
            buf[VNET_HDR_LEN..hdr_len].fill(0);
            let valid = VnetHeader::decode(buf, self.hdr).and_then(|h| h.validate(total - hdr_len));
            if let Err(e) = valid {
                self.stats.rx_dropped_invalid += 1;
                tracing::debug!(kind = ?self.kind, error = %e, "frame with a bad header dropped");
                continue;
            }
            self.stats.rx_frames += 1;
            return Ok(Some(total));
        }
        Ok(None)
    }

    /// One read from the fd into `buf` (exactly header + largest frame).
    /// `Ok(None)`: nothing queued; `Ok(Some(None))`: a frame was read
    /// and was too large; `Ok(Some(Some(n)))`: `n` bytes laid out as
    /// header + frame.
    fn read_one(&mut self, buf: &mut [u8]) -> Result<Option<Option<usize>>, WireError> {
        let hdr_len = self.hdr.bytes();
        // One byte past the buffer tells a frame that fits exactly from a
        // longer one the kernel cut (a TAP truncates silently).
        let mut spill = [0u8; 1];
        loop {
            let r = match self.kind {
                WireKind::Tap => {
                    let mut iov = [IoSliceMut::new(buf), IoSliceMut::new(&mut spill)];
                    nix::sys::uio::readv(&self.fd, &mut iov).map(|n| (n, n))
                }
                WireKind::Cable => {
                    let (head, rest) = buf.split_at_mut(hdr_len);
                    let mut iov = [
                        IoSliceMut::new(&mut head[..VNET_HDR_LEN]),
                        IoSliceMut::new(rest),
                        IoSliceMut::new(&mut spill),
                    ];
                    recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, None, MsgFlags::MSG_DONTWAIT).map(
                        |m| {
                            // A message cut short by MSG_TRUNC also fills the
                            // spill byte, so the length check below sees it.
                            let n = m.bytes;
                            let laid_out = if n >= VNET_HDR_LEN {
                                n - VNET_HDR_LEN + hdr_len
                            } else {
                                n
                            };
                            (n, laid_out)
                        },
                    )
                }
            };
            return match r {
                Ok((0, _)) if self.kind == WireKind::Cable => {
                    self.closed = true;
                    Err(WireError::Closed)
                }
                Ok((_, laid_out)) if laid_out > buf.len() => Ok(Some(None)),
                Ok((_, laid_out)) => Ok(Some(Some(laid_out))),
                Err(Errno::EAGAIN) => Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(WireError::Io {
                    op: "recv",
                    source: e.into(),
                }),
            };
        }
    }
}

impl AsFd for Wire {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), WireError> {
    let io = |e: Errno| WireError::Io {
        op: "fcntl",
        source: e.into(),
    };
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io)?;
    Ok(())
}
