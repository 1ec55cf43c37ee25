//! The one error type of the control protocol layer.

use std::io;

use crate::protocol::ErrorCode;

/// Everything that can go wrong while encoding, decoding, sending or
/// receiving a control message.
///
/// Decoding treats its input as hostile: every malformed datagram maps to
/// one of these variants, never to a panic. Values quoted in an error are
/// already bounded by the codec limits (a key is at most 64 bytes, a value at
/// most 256 printable bytes), so errors are safe to log.
#[derive(Debug, thiserror::Error)]
pub enum XenbusError {
    /// The encoded message would exceed, or a datagram exceeds,
    /// [`MAX_MESSAGE`](crate::MAX_MESSAGE) bytes.
    #[error("message of {len} bytes exceeds the {max}-byte limit", max = crate::MAX_MESSAGE)]
    Oversize {
        /// Length of the offending message in bytes.
        len: usize,
    },
    /// The payload is not UTF-8.
    #[error("message is not valid UTF-8")]
    BadUtf8(#[source] std::str::Utf8Error),
    /// The first line is not a valid kind (`[a-z][a-z0-9-]{0,31}`).
    #[error("invalid message kind")]
    BadKind,
    /// A key is not `[a-z0-9][a-z0-9-]{0,63}`.
    #[error("invalid key on line {line}")]
    BadKey {
        /// 1-based line number in the message.
        line: usize,
    },
    /// A value is longer than 256 bytes or holds a byte outside 0x20..=0x7e.
    #[error("invalid value for key {key:?} on line {line}")]
    BadValue {
        /// The (valid) key the value belongs to.
        key: String,
        /// 1-based line number in the message.
        line: usize,
    },
    /// A key line has no `=`.
    #[error("line {line} is not key=value")]
    BadLine {
        /// 1-based line number in the message.
        line: usize,
    },
    /// An empty line (other than the optional final newline).
    #[error("empty line {line}")]
    EmptyLine {
        /// 1-based line number in the message.
        line: usize,
    },
    /// The same key appears twice.
    #[error("duplicate key {key:?}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// More than [`MAX_KEYS`](crate::MAX_KEYS) keys.
    #[error("more than {max} keys", max = crate::MAX_KEYS)]
    TooManyKeys,
    /// More than [`MAX_FDS`](crate::MAX_FDS) descriptors were passed or
    /// received (received ones have already been closed).
    #[error("{count} file descriptors exceed the limit of {max}", max = crate::MAX_FDS)]
    TooManyFds {
        /// Number of descriptors offered or received.
        count: usize,
    },
    /// The datagram (`MSG_TRUNC`) or its control data (`MSG_CTRUNC`) was
    /// truncated; any descriptors that arrived have been closed.
    #[error("datagram or its ancillary data was truncated")]
    Truncated,
    /// A message lacks a key its kind requires.
    #[error("missing key {key:?}")]
    MissingKey {
        /// The required key.
        key: String,
    },
    /// A key is present but its value is out of range for its meaning.
    #[error("invalid value {value:?} for key {key:?}: {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A message arrived with the wrong number of descriptors for its kind
    /// (the descriptors have been closed).
    #[error("message {kind:?} needs {expected} file descriptors, got {got}")]
    FdCount {
        /// Kind of the message.
        kind: String,
        /// Descriptors the kind requires.
        expected: usize,
        /// Descriptors that arrived.
        got: usize,
    },
    /// A received descriptor is not what its position requires (e.g. the
    /// region is not a memfd sealed against shrinking).
    #[error("file descriptor {index}: {reason}")]
    BadFd {
        /// Position in the message's descriptor list.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The message kind is valid but not the one expected at this point.
    #[error("unexpected message {got:?}, expected {expected}")]
    UnexpectedKind {
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// A socket call failed.
    #[error("control socket I/O failed")]
    Io(#[source] io::Error),
    /// The peer closed the connection (`recv` returned 0 bytes, or `send`
    /// failed with `EPIPE`/`ECONNRESET`).
    #[error("peer closed the control socket")]
    Closed,
}

impl XenbusError {
    /// The `code` to answer with when this error was caused by the peer's
    /// message (PROTOCOL.md §4.6), or `None` when there is no one to answer
    /// (`Io`, `Closed`).
    pub fn wire_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Io(_) | Self::Closed => None,
            Self::UnexpectedKind { .. } => Some(ErrorCode::Eproto),
            Self::Oversize { .. }
            | Self::BadUtf8(_)
            | Self::BadKind
            | Self::BadKey { .. }
            | Self::BadValue { .. }
            | Self::BadLine { .. }
            | Self::EmptyLine { .. }
            | Self::DuplicateKey { .. }
            | Self::TooManyKeys
            | Self::TooManyFds { .. }
            | Self::Truncated
            | Self::MissingKey { .. }
            | Self::InvalidValue { .. }
            | Self::FdCount { .. }
            | Self::BadFd { .. } => Some(ErrorCode::Einval),
        }
    }

    /// Builds an [`XenbusError::InvalidValue`].
    pub(crate) fn invalid(key: &str, value: &str, reason: &'static str) -> Self {
        Self::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason,
        }
    }
}

impl From<io::Error> for XenbusError {
    fn from(err: io::Error) -> Self {
        Self::Io(err)
    }
}

impl From<rustix::io::Errno> for XenbusError {
    fn from(err: rustix::io::Errno) -> Self {
        Self::Io(err.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes() {
        assert_eq!(XenbusError::BadKind.wire_code(), Some(ErrorCode::Einval));
        assert_eq!(XenbusError::Truncated.wire_code(), Some(ErrorCode::Einval));
        assert_eq!(
            XenbusError::UnexpectedKind {
                expected: "close",
                got: "connect".into()
            }
            .wire_code(),
            Some(ErrorCode::Eproto)
        );
        assert_eq!(XenbusError::Closed.wire_code(), None);
        assert_eq!(XenbusError::Io(io::Error::other("x")).wire_code(), None);
    }
}
