//! Who may do what (docs/PROTOCOL.md §1.2): a peer of the control socket
//! or of a vhost-user socket is known by its `SO_PEERCRED` uid and primary
//! gid, and
//!
//! - may use a device (`probe`, `connect`, its line in `status`, its
//!   vhost-user socket) if the device's `allow_uids`/`allow_gids` admit it;
//! - is an operator (`fault`, every device in `status`) if `[control]`
//!   `operator_uids`/`operator_gids` admit it.
//!
//! Root and the supervisor's own uid are always admitted, so a
//! configuration that says nothing keeps everyone else out. Supplementary
//! groups are not consulted: `SO_PEERCRED` does not carry them.

use shadowback_xenbus::protocol::ErrorCode;

use crate::admission::PeerKey;
use crate::device::{DeviceHandle, Refusal};

/// The uids and gids admitted besides root and the supervisor's own
/// (effective) uid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AccessList {
    own_uid: u32,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl AccessList {
    pub(crate) fn new(uids: &[u32], gids: &[u32]) -> Self {
        AccessList {
            own_uid: rustix::process::geteuid().as_raw(),
            uids: uids.to_vec(),
            gids: gids.to_vec(),
        }
    }

    pub(crate) fn admits(&self, peer: &PeerKey) -> bool {
        peer.uid == 0
            || peer.uid == self.own_uid
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
    }
}

/// The peer of one control connection and whether it is an operator.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    pub peer: PeerKey,
    pub operator: bool,
}

impl Caller {
    pub(crate) fn new(peer: PeerKey, operators: &AccessList) -> Self {
        Caller {
            peer,
            operator: operators.admits(&peer),
        }
    }

    /// Whether the caller may see `dev` in `status`.
    pub(crate) fn sees(&self, dev: &DeviceHandle) -> bool {
        self.operator || dev.access.admits(&self.peer)
    }

    /// `EACCES` unless the caller may probe and connect `dev`.
    pub(crate) fn may_use(&self, dev: &DeviceHandle) -> Result<(), Refusal> {
        if dev.access.admits(&self.peer) {
            return Ok(());
        }
        Err((
            ErrorCode::Eacces,
            format!(
                "uid {} gid {} may not use device {} (not in its allow_uids or allow_gids)",
                self.peer.uid, self.peer.gid, dev.name
            ),
        ))
    }

    /// `EACCES` unless the caller is an operator.
    pub(crate) fn may_operate(&self, verb: &str) -> Result<(), Refusal> {
        if self.operator {
            return Ok(());
        }
        Err((
            ErrorCode::Eacces,
            format!(
                "{verb} is for operators; uid {} gid {} is not one ([control] operator_uids, operator_gids)",
                self.peer.uid, self.peer.gid
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> PeerKey {
        PeerKey { uid, gid, pid: 1 }
    }

    #[test]
    fn root_and_our_uid_always_the_lists_otherwise() {
        let list = |uids: &[u32], gids: &[u32]| AccessList {
            own_uid: 500,
            ..AccessList::new(uids, gids)
        };
        let empty = list(&[], &[]);
        assert!(empty.admits(&peer(0, 9)), "root");
        assert!(empty.admits(&peer(500, 9)), "the supervisor's uid");
        assert!(!empty.admits(&peer(1001, 2002)));
        let some = list(&[1001], &[2002]);
        assert!(some.admits(&peer(1001, 7)), "by uid");
        assert!(some.admits(&peer(7, 2002)), "by primary gid");
        assert!(!some.admits(&peer(7, 7)));
        assert!(!some.admits(&peer(2002, 1001)), "uids and gids apart");
    }
}
