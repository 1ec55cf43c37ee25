//! A cable: a point-to-point wire between two vifs of one supervisor,
//! with no root, no interface and no bridge (docs/ARCHITECTURE.md §11.5).
//!
//! It is a `socketpair(AF_UNIX, SOCK_SEQPACKET)`: one message per frame,
//! each a 10-byte `virtio_net_hdr` and the Ethernet frame, so a backend
//! drives it exactly as it drives a TAP ([`super::Wire`]). The supervisor
//! creates the pair and holds both ends; each vif's backend gets a
//! duplicate of its end.
//!
//! Why a socketpair and not a ring buffer in some process: the frames in
//! flight must outlive the backends at both ends. The kernel keeps a
//! sent message queued on the receiving socket, which lives as long as
//! any process (the supervisor) holds that end: a frame sent just before
//! its sender was killed, or sent while the receiving backend was dead,
//! is read by the receiver's next instance. A ring in a backend's memory
//! dies with it; one in the supervisor would need a copy through the
//! supervisor per frame, or shared memory the supervisor must guard
//! against both backends.
//!
//! The queue is bounded by the sender's socket buffer (`SO_SNDBUF`: a
//! unix socket charges queued messages to their sender): a peer that
//! never reads fills it, after which sends fail with `EAGAIN`
//! ([`super::SendOutcome::Dropped`] with `QueueFull`). The netif model
//! then holds its TX back until the cable has room rather than drop the
//! frame (docs/ARCHITECTURE.md §11.5).

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::{
    getsockopt, setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType,
};

use super::{WireError, MAX_FRAME_LEN, VNET_HDR_LEN};

/// What a cable's socket must be able to hold at least: the largest
/// message, with room for the kernel's per-message overhead.
const MIN_QUEUE_BYTES: usize = 2 * (VNET_HDR_LEN + MAX_FRAME_LEN);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CableConfig {
    /// `SO_SNDBUF` asked for each end: the bytes (data and the kernel's
    /// per-message overhead) a direction may hold unread. Linux doubles
    /// the value and caps it by `net.core.wmem_max`.
    pub queue_bytes: usize,
}

impl Default for CableConfig {
    fn default() -> Self {
        CableConfig {
            queue_bytes: 256 * 1024,
        }
    }
}

/// Creates a cable: two connected, non-blocking, close-on-exec ends, to
/// be wrapped by backends with `Wire::from_fd(WireKind::Cable, …)`.
pub fn cable_pair(cfg: CableConfig) -> Result<[OwnedFd; 2], WireError> {
    let io = |op| {
        move |e: nix::errno::Errno| WireError::Io {
            op,
            source: e.into(),
        }
    };
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io("socketpair"))?;
    for end in [&a, &b] {
        setsockopt(end, sockopt::SndBuf, &cfg.queue_bytes).map_err(io("SO_SNDBUF"))?;
        let got = getsockopt(&end.as_fd(), sockopt::SndBuf).map_err(io("SO_SNDBUF"))?;
        if got < MIN_QUEUE_BYTES {
            return Err(WireError::Config(
                "cable queue_bytes too small for one largest frame",
            ));
        }
    }
    tracing::debug!(queue_bytes = cfg.queue_bytes, "cable created");
    Ok([a, b])
}
