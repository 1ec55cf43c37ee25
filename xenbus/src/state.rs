//! XenBus device states, numbered as in Xen's `xen/io/xenbus.h`.

use std::fmt;
use std::str::FromStr;

use crate::error::XenbusError;

/// The state of one end of a device connection (`enum xenbus_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum XenbusState {
    /// 0: no state yet.
    Unknown = 0,
    /// 1: setting up.
    Initialising = 1,
    /// 2: the backend has published its keys and waits for the frontend.
    InitWait = 2,
    /// 3: the frontend has published its ring references.
    Initialised = 3,
    /// 4: rings mapped, I/O may flow.
    Connected = 4,
    /// 5: tearing down.
    Closing = 5,
    /// 6: torn down.
    Closed = 6,
    /// 7: reconfiguration requested.
    Reconfiguring = 7,
    /// 8: reconfiguration done.
    Reconfigured = 8,
}

impl XenbusState {
    /// The Xen number of the state.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The state with Xen number `n`, if there is one.
    pub fn from_number(n: u64) -> Option<Self> {
        Some(match n {
            0 => Self::Unknown,
            1 => Self::Initialising,
            2 => Self::InitWait,
            3 => Self::Initialised,
            4 => Self::Connected,
            5 => Self::Closing,
            6 => Self::Closed,
            7 => Self::Reconfiguring,
            8 => Self::Reconfigured,
            _ => return None,
        })
    }

    /// The Xen name, e.g. `InitWait`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "Unknown",
            Self::Initialising => "Initialising",
            Self::InitWait => "InitWait",
            Self::Initialised => "Initialised",
            Self::Connected => "Connected",
            Self::Closing => "Closing",
            Self::Closed => "Closed",
            Self::Reconfiguring => "Reconfiguring",
            Self::Reconfigured => "Reconfigured",
        }
    }
}

impl fmt::Display for XenbusState {
    /// Writes the number, as it appears in a `state=` key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

impl FromStr for XenbusState {
    type Err = XenbusError;

    /// Parses the decimal number used on the wire.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || XenbusError::invalid(crate::key::STATE, s, "not a XenBus state (0..=8)");
        if s.is_empty() || s.len() > 3 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(invalid());
        }
        s.parse::<u64>()
            .ok()
            .and_then(Self::from_number)
            .ok_or_else(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_matches_xen() {
        for n in 0..=8u64 {
            let state = XenbusState::from_number(n).unwrap();
            assert_eq!(u64::from(state.number()), n);
            assert_eq!(state.to_string(), n.to_string());
            assert_eq!(state.to_string().parse::<XenbusState>().unwrap(), state);
        }
        assert_eq!(XenbusState::InitWait.number(), 2);
        assert_eq!(XenbusState::Connected.number(), 4);
        assert_eq!(XenbusState::Closed.number(), 6);
        assert_eq!(XenbusState::from_number(9), None);
        for bad in ["9", "", "-1", "04x", "1000", "+4"] {
            assert!(bad.parse::<XenbusState>().is_err(), "{bad:?}");
        }
    }
}
