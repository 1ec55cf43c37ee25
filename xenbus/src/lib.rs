//! The shadowback control protocol: XenStore-style key/value messages, one
//! per `SOCK_SEQPACKET` datagram, with file descriptors as `SCM_RIGHTS`.
//!
//! It is spoken between a guest frontend and the supervisor (the control
//! socket) and between the supervisor and a backend process (a socketpair).
//! The wire format and every message are specified in `docs/PROTOCOL.md`;
//! this crate is the reference implementation of that document.
//!
//! - [`Message`]: the text codec, hostile-input safe.
//! - [`protocol`]: kinds, keys (every control-message name lives there:
//!   [`kind`], [`key`], [`action`]) and typed views ([`BackendInfo`],
//!   [`ConnectRequest`], [`AttachRequest`], [`DeviceFds`]).
//! - [`SeqPacket`] / [`SeqPacketListener`]: blocking sockets;
//!   [`AsyncSeqPacket`] / [`AsyncSeqPacketListener`]: the tokio flavour.
// The one exception is registering an `OwnedFd` with tokio's reactor
// (`async_socket::register`); received descriptors never pass through raw fds.
#![deny(unsafe_code)]

mod async_socket;
mod error;
mod message;
pub mod netif;
pub mod protocol;
mod socket;
mod state;
pub mod virtio;

pub use async_socket::{AsyncSeqPacket, AsyncSeqPacketListener};
pub use error::XenbusError;
pub use message::{
    is_valid_key, is_valid_kind, is_valid_value, Message, MAX_KEYS, MAX_KEY_LEN, MAX_KIND_LEN,
    MAX_MESSAGE, MAX_VALUE_LEN,
};
pub use protocol::{
    action, expect_no_fds, key, kind, AttachRequest, BackendInfo, ConnectRequest, DeviceFds,
    DiskMode, ErrorCode,
};
pub use socket::{Received, SeqPacket, SeqPacketListener, MAX_FDS};
pub use state::XenbusState;
