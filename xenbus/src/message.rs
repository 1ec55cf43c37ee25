//! The text codec: one message is a kind line followed by `key=value` lines.
//!
//! Grammar (see `docs/PROTOCOL.md`):
//!
//! ```text
//! message = kind "\n" *(key "=" value "\n")     ; final "\n" optional on decode
//! kind    = [a-z] [a-z0-9-]{0,31}
//! key     = [a-z0-9] [a-z0-9-]{0,63}
//! value   = [\x20-\x7e]{0,256}
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Display};

use crate::error::XenbusError;
use crate::protocol::{key, kind, ErrorCode};

/// Largest payload of one datagram, in bytes.
pub const MAX_MESSAGE: usize = 4096;
/// Most keys one message may carry.
pub const MAX_KEYS: usize = 64;
/// Longest kind, in bytes.
pub const MAX_KIND_LEN: usize = 32;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 64;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 256;

/// One control message: a kind and a set of keys.
///
/// Building a message never fails; [`Message::encode`] validates it against
/// the grammar, so a bad constant is caught on the first send rather than by
/// a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    kind: String,
    keys: BTreeMap<String, String>,
}

impl Message {
    /// A message of `kind` with no keys.
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            keys: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) `key` with the decimal/textual form of `value`.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Display) -> Self {
        self.set(key, value);
        self
    }

    /// Sets (or replaces) `key`.
    pub fn set(&mut self, key: &str, value: impl Display) {
        self.keys.insert(key.to_owned(), value.to_string());
    }

    /// An `error` message. `message` is made wire-safe: bytes outside
    /// printable ASCII become `?` and it is cut to [`MAX_VALUE_LEN`], so the
    /// result always encodes.
    pub fn error(code: ErrorCode, message: &str) -> Self {
        let text: String = message
            .chars()
            .map(|c| if is_value_char(c) { c } else { '?' })
            .take(MAX_VALUE_LEN)
            .collect();
        Self::new(kind::ERROR)
            .with(key::CODE, code)
            .with(key::MESSAGE, text)
    }

    /// The message kind (first line).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.keys.get(key).map(String::as_str)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// All keys and values, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.keys.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the message has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Fails with [`XenbusError::UnexpectedKind`] unless the kind is `expected`.
    pub fn expect_kind(&self, expected: &'static str) -> Result<(), XenbusError> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(XenbusError::UnexpectedKind {
                expected,
                got: self.kind.clone(),
            })
        }
    }

    /// The value of `key`, or [`XenbusError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&str, XenbusError> {
        self.get(key).ok_or_else(|| XenbusError::MissingKey {
            key: key.to_owned(),
        })
    }

    /// `key` as a decimal `u64`, or `None` when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, XenbusError> {
        self.get(key).map(|v| parse_decimal(key, v)).transpose()
    }

    /// `key` as a decimal `u32`, or `None` when absent.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, XenbusError> {
        self.get(key).map(|v| parse_narrow(key, v)).transpose()
    }

    /// `key` as a decimal `u16`, or `None` when absent.
    pub fn get_u16(&self, key: &str) -> Result<Option<u16>, XenbusError> {
        self.get(key).map(|v| parse_narrow(key, v)).transpose()
    }

    /// `key` as a boolean flag (`0` or `1`), or `None` when absent.
    pub fn get_flag(&self, key: &str) -> Result<Option<bool>, XenbusError> {
        self.get(key)
            .map(|v| match v {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(XenbusError::invalid(key, v, "expected 0 or 1")),
            })
            .transpose()
    }

    /// `key` as a decimal `u64`; missing or malformed is an error.
    pub fn require_u64(&self, key: &str) -> Result<u64, XenbusError> {
        parse_decimal(key, self.require(key)?)
    }

    /// `key` as a decimal `u32`; missing, malformed or too large is an error.
    pub fn require_u32(&self, key: &str) -> Result<u32, XenbusError> {
        parse_narrow(key, self.require(key)?)
    }

    /// `key` as a decimal `u16`; missing, malformed or too large is an error.
    pub fn require_u16(&self, key: &str) -> Result<u16, XenbusError> {
        parse_narrow(key, self.require(key)?)
    }

    /// `key` as a flag (`0` or `1`); missing is an error.
    pub fn require_flag(&self, key: &str) -> Result<bool, XenbusError> {
        self.get_flag(key)?.ok_or_else(|| XenbusError::MissingKey {
            key: key.to_owned(),
        })
    }

    /// Serialises the message, validating kind, keys, values and size.
    pub fn encode(&self) -> Result<Vec<u8>, XenbusError> {
        if !is_valid_kind(&self.kind) {
            return Err(XenbusError::BadKind);
        }
        if self.keys.len() > MAX_KEYS {
            return Err(XenbusError::TooManyKeys);
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.kind.as_bytes());
        out.push(b'\n');
        // Line numbers are reported as a decoder would see them.
        for (index, (key, value)) in self.keys.iter().enumerate() {
            let line = index + 2;
            if !is_valid_key(key) {
                return Err(XenbusError::BadKey { line });
            }
            if !is_valid_value(value) {
                return Err(XenbusError::BadValue {
                    key: key.clone(),
                    line,
                });
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
        if out.len() > MAX_MESSAGE {
            return Err(XenbusError::Oversize { len: out.len() });
        }
        Ok(out)
    }

    /// Parses one datagram payload. Never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<Self, XenbusError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(XenbusError::Oversize { len: bytes.len() });
        }
        let text = std::str::from_utf8(bytes).map_err(XenbusError::BadUtf8)?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        // What a reader accepts, a writer must be able to send back: with
        // its final newline the message still fits one datagram.
        if text.len() + 1 > MAX_MESSAGE {
            return Err(XenbusError::Oversize {
                len: text.len() + 1,
            });
        }
        let mut lines = text.split('\n');
        // `split` always yields at least one item, even for "".
        let kind = lines.next().unwrap_or_default();
        if !is_valid_kind(kind) {
            return Err(XenbusError::BadKind);
        }
        let mut keys = BTreeMap::new();
        for (index, entry) in lines.enumerate() {
            let line = index + 2;
            if entry.is_empty() {
                return Err(XenbusError::EmptyLine { line });
            }
            let (key, value) = entry.split_once('=').ok_or(XenbusError::BadLine { line })?;
            if !is_valid_key(key) {
                return Err(XenbusError::BadKey { line });
            }
            if !is_valid_value(value) {
                return Err(XenbusError::BadValue {
                    key: key.to_owned(),
                    line,
                });
            }
            if keys.contains_key(key) {
                return Err(XenbusError::DuplicateKey {
                    key: key.to_owned(),
                });
            }
            if keys.len() == MAX_KEYS {
                return Err(XenbusError::TooManyKeys);
            }
            keys.insert(key.to_owned(), value.to_owned());
        }
        Ok(Self {
            kind: kind.to_owned(),
            keys,
        })
    }
}

impl Display for Message {
    /// One-line rendering for logs: `kind{key=value, …}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{", self.kind)?;
        for (i, (k, v)) in self.keys.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k}={v}")?;
        }
        f.write_str("}")
    }
}

/// `[a-z][a-z0-9-]{0,31}`
pub fn is_valid_kind(kind: &str) -> bool {
    let b = kind.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_lowercase())
        && b.len() <= MAX_KIND_LEN
        && b.iter().all(|&c| is_name_byte(c))
}

/// `[a-z0-9][a-z0-9-]{0,63}`
pub fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.len() <= MAX_KEY_LEN
        && b.iter().all(|&c| is_name_byte(c))
}

/// Printable ASCII (0x20–0x7e), at most [`MAX_VALUE_LEN`] bytes.
pub fn is_valid_value(value: &str) -> bool {
    value.len() <= MAX_VALUE_LEN && value.chars().all(is_value_char)
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
}

fn is_value_char(c: char) -> bool {
    matches!(c, ' '..='~')
}

/// Strict decimal: one or more ASCII digits, no sign, no whitespace; leading
/// zeros are allowed (`0008` is 8) as long as the value fits `u64`.
fn parse_decimal(key: &str, value: &str) -> Result<u64, XenbusError> {
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return Err(XenbusError::invalid(
            key,
            value,
            "expected a decimal number",
        ));
    }
    value
        .parse::<u64>()
        .map_err(|_| XenbusError::invalid(key, value, "number out of range"))
}

fn parse_narrow<T: TryFrom<u64>>(key: &str, value: &str) -> Result<T, XenbusError> {
    T::try_from(parse_decimal(key, value)?)
        .map_err(|_| XenbusError::invalid(key, value, "number out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_str(s: &str) -> Result<Message, XenbusError> {
        Message::decode(s.as_bytes())
    }

    #[test]
    fn round_trip() {
        let msg = Message::new("connect")
            .with("device", "xvda")
            .with("frontend-id", 7u16)
            .with("ring-ref", 8u32)
            .with("empty", "")
            .with("eq", "a=b=c");
        let bytes = msg.encode().unwrap();
        assert_eq!(
            bytes,
            b"connect\ndevice=xvda\nempty=\neq=a=b=c\nfrontend-id=7\nring-ref=8\n"
        );
        let back = Message::decode(&bytes).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.get("eq"), Some("a=b=c"));
        assert_eq!(back.require_u16("frontend-id").unwrap(), 7);
    }

    #[test]
    fn final_newline_optional() {
        let a = decode_str("probe\ndevice=xvda").unwrap();
        let b = decode_str("probe\ndevice=xvda\n").unwrap();
        assert_eq!(a, b);
        assert_eq!(decode_str("close").unwrap().kind(), "close");
    }

    #[test]
    fn oversize() {
        let mut s = String::from("probe\n");
        while s.len() <= MAX_MESSAGE {
            s.push_str("k=v\n");
        }
        assert!(matches!(decode_str(&s), Err(XenbusError::Oversize { .. })));
        let mut msg = Message::new("probe");
        for i in 0..MAX_KEYS {
            msg.set(&format!("k{i}"), "v".repeat(MAX_VALUE_LEN));
        }
        assert!(matches!(msg.encode(), Err(XenbusError::Oversize { .. })));
    }

    #[test]
    fn what_decodes_fits_when_encoded() {
        // 4096 bytes without the final newline: the writer's form (with
        // it) would not fit a datagram, so the reader refuses it too.
        let mut s = String::from("status\nk=");
        s.push_str(&"v".repeat(200));
        let mut i = 0;
        while s.len() < MAX_MESSAGE - 220 {
            s.push_str(&format!("\nk{i}={}", "v".repeat(200)));
            i += 1;
        }
        s.push_str("\nlast=");
        s.push_str(&"v".repeat(MAX_MESSAGE - s.len()));
        assert_eq!(s.len(), MAX_MESSAGE);
        assert!(matches!(
            decode_str(&s),
            Err(XenbusError::Oversize { len }) if len == MAX_MESSAGE + 1
        ));
        // One byte less decodes, and encodes to exactly MAX_MESSAGE.
        s.pop();
        let msg = decode_str(&s).unwrap();
        assert_eq!(msg.encode().unwrap().len(), MAX_MESSAGE);
        assert_eq!(decode_str(&(s + "\n")).unwrap(), msg);
    }

    #[test]
    fn bad_utf8() {
        assert!(matches!(
            Message::decode(b"probe\ndevice=\xff\xfe"),
            Err(XenbusError::BadUtf8(_))
        ));
    }

    #[test]
    fn bad_kind() {
        for s in [
            "",
            "\n",
            "Probe",
            "1probe",
            "-x",
            "pro_be",
            "probe ",
            &"a".repeat(33),
        ] {
            assert!(
                matches!(decode_str(s), Err(XenbusError::BadKind)),
                "{s:?} accepted"
            );
        }
        assert!(decode_str(&"a".repeat(32)).is_ok());
        assert!(matches!(
            Message::new("Bad").encode(),
            Err(XenbusError::BadKind)
        ));
    }

    #[test]
    fn bad_key() {
        for s in [
            "probe\n=v",
            "probe\n-k=v",
            "probe\nKey=v",
            "probe\nk y=v",
            "probe\nk_y=v",
        ] {
            assert!(
                matches!(decode_str(s), Err(XenbusError::BadKey { line: 2 })),
                "{s:?} accepted"
            );
        }
        let long = format!("probe\n{}=v", "k".repeat(65));
        assert!(matches!(decode_str(&long), Err(XenbusError::BadKey { .. })));
        assert!(decode_str(&format!("probe\n{}=v", "k".repeat(64))).is_ok());
        assert!(decode_str("probe\n0k-1=v").is_ok());
        assert!(matches!(
            Message::new("probe").with("Bad", 1).encode(),
            Err(XenbusError::BadKey { .. })
        ));
    }

    #[test]
    fn bad_value() {
        let too_long = format!("probe\nk={}", "v".repeat(257));
        for s in [
            "probe\nk=a\rb",
            "probe\nk=\t",
            "probe\nk=\x7f",
            "probe\nk=é",
            &too_long,
        ] {
            assert!(
                matches!(decode_str(s), Err(XenbusError::BadValue { .. })),
                "{s:?} accepted"
            );
        }
        assert!(decode_str(&format!("probe\nk={}", "~".repeat(256))).is_ok());
        // A newline inside a value can only be caught on encode; on the wire
        // it splits the line.
        assert!(matches!(
            Message::new("probe").with("k", "a\nb").encode(),
            Err(XenbusError::BadValue { .. })
        ));
        assert!(matches!(
            Message::new("probe").with("k", "\u{1}").encode(),
            Err(XenbusError::BadValue { .. })
        ));
    }

    #[test]
    fn bad_line_and_empty_line() {
        assert!(matches!(
            decode_str("probe\ndevice"),
            Err(XenbusError::BadLine { line: 2 })
        ));
        assert!(matches!(
            decode_str("probe\n\ndevice=x"),
            Err(XenbusError::EmptyLine { line: 2 })
        ));
        assert!(matches!(
            decode_str("probe\ndevice=x\n\n"),
            Err(XenbusError::EmptyLine { line: 3 })
        ));
    }

    #[test]
    fn duplicate_key() {
        assert!(matches!(
            decode_str("probe\na=1\nb=2\na=1"),
            Err(XenbusError::DuplicateKey { key }) if key == "a"
        ));
    }

    #[test]
    fn key_count_limit() {
        let mut s = String::from("probe\n");
        for i in 0..MAX_KEYS {
            s.push_str(&format!("k{i}=v\n"));
        }
        assert_eq!(decode_str(&s).unwrap().len(), MAX_KEYS);
        s.push_str("k64=v\n");
        assert!(matches!(decode_str(&s), Err(XenbusError::TooManyKeys)));
        let mut msg = Message::new("probe");
        for i in 0..=MAX_KEYS {
            msg.set(&format!("k{i}"), "v");
        }
        assert!(matches!(msg.encode(), Err(XenbusError::TooManyKeys)));
    }

    #[test]
    fn numbers() {
        let m = decode_str("x\na=65535\nb=65536\nc=+1\nd=\ne=18446744073709551616\nf=007\ng=1")
            .unwrap();
        assert_eq!(m.require_u16("a").unwrap(), 65535);
        assert!(matches!(
            m.require_u16("b"),
            Err(XenbusError::InvalidValue { .. })
        ));
        assert_eq!(m.require_u32("b").unwrap(), 65536);
        assert!(matches!(
            m.require_u64("c"),
            Err(XenbusError::InvalidValue { .. })
        ));
        assert!(matches!(
            m.require_u64("d"),
            Err(XenbusError::InvalidValue { .. })
        ));
        assert!(matches!(
            m.require_u64("e"),
            Err(XenbusError::InvalidValue { .. })
        ));
        assert_eq!(m.require_u64("f").unwrap(), 7);
        assert!(matches!(m.require_u64("zz"), Err(XenbusError::MissingKey { key }) if key == "zz"));
        assert_eq!(m.get_u32("zz").unwrap(), None);
        assert!(m.require_flag("g").unwrap());
        assert!(matches!(
            m.require_flag("a"),
            Err(XenbusError::InvalidValue { .. })
        ));
    }

    #[test]
    fn error_message_is_sanitised() {
        let msg = Message::error(
            ErrorCode::Einval,
            &format!("bad\npath é {}", "x".repeat(400)),
        );
        let back = Message::decode(&msg.encode().unwrap()).unwrap();
        assert_eq!(back.kind(), "error");
        assert_eq!(back.get("code"), Some("EINVAL"));
        let text = back.get("message").unwrap();
        assert!(text.starts_with("bad?path ? x"));
        assert_eq!(text.len(), MAX_VALUE_LEN);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_near_valid_text(
            s in "[a-z]{1,4}(\n[a-z0-9=\\- ]{0,8}){0,70}\n?"
        ) {
            if let Ok(msg) = Message::decode(s.as_bytes()) {
                // Whatever decodes re-encodes to something that decodes equal.
                let again = Message::decode(&msg.encode().unwrap()).unwrap();
                prop_assert_eq!(again, msg);
            }
        }
    }
}
