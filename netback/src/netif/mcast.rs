//! A netif guest's multicast list (`feature-multicast-control`,
//! docs/ARCHITECTURE.md §11.6): kept as Linux xen-netback keeps it — up
//! to 64 addresses (`XEN_NETBK_MCAST_MAX`), added and deleted with
//! `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`/`_DEL` — and applied to received
//! multicast frames when the guest asked for it
//! (`request-multicast-control`). An add that finds the list full makes
//! every multicast frame pass (where Linux refuses the add) until the
//! list is emptied again: the guest gets a superset of what it asked for,
//! never less.
//!
//! The list lives in the attachment's device state area
//! (`shadowback_virtio::net_state`, the multicast table and
//! `MULTI_OVERFLOW`), written before the change is answered, so a backend
//! crash loses nothing: a change the dead instance did not answer is in
//! its shadow log and is applied again (an add of an address already
//! listed is not listed twice, so replaying one changes nothing).

use std::fs::File;
use std::os::fd::OwnedFd;

use shadowback_virtio::net_state::{rx_mode, NetDeviceState, NetStateArea, MAC_TABLE_ENTRIES};

use super::tx::MulticastOp;

/// A vif's multicast list and where it is kept.
#[derive(Debug)]
pub struct MulticastFilter {
    state: NetDeviceState,
    area: Option<NetStateArea>,
    /// The guest asked for its list to be applied.
    enabled: bool,
}

impl MulticastFilter {
    /// The list in `area` (the supervisor's device state area of this
    /// attachment; `None`: kept by this instance only), applied to frames
    /// when `enabled`.
    pub fn open(area: Option<OwnedFd>, enabled: bool) -> Result<Self, String> {
        let (area, state) = match area {
            Some(fd) => {
                let (area, state) =
                    NetStateArea::open(File::from(fd)).map_err(|e| e.to_string())?;
                (Some(area), state)
            }
            None => (None, NetDeviceState::netif()),
        };
        Ok(MulticastFilter {
            state,
            area,
            enabled,
        })
    }

    /// Applies `op`, kept in the area before it returns (the caller then
    /// answers the request).
    pub fn apply(&mut self, op: MulticastOp) -> Result<(), String> {
        let mut next = self.state.clone();
        change(&mut next, op);
        if next == self.state {
            return Ok(());
        }
        if let Some(area) = self.area.as_mut() {
            area.store(&next).map_err(|e| e.to_string())?;
        }
        self.state = next;
        Ok(())
    }

    /// Whether a frame for Ethernet destination `dst` reaches the guest:
    /// unicast and broadcast always; multicast if the guest keeps no list,
    /// the list overflowed, or it holds `dst`.
    pub fn accepts(&self, dst: &[u8; 6]) -> bool {
        let multicast = dst[0] & 1 != 0 && dst != &[0xff; 6];
        !multicast
            || !self.enabled
            || self.state.rx_mode & rx_mode::MULTI_OVERFLOW != 0
            || self.state.multicast.contains(dst)
    }

    /// The addresses listed, and whether the list overflowed.
    pub fn list(&self) -> (&[[u8; 6]], bool) {
        (
            &self.state.multicast,
            self.state.rx_mode & rx_mode::MULTI_OVERFLOW != 0,
        )
    }
}

/// One change to the list.
fn change(state: &mut NetDeviceState, op: MulticastOp) {
    match op {
        MulticastOp::Add(addr) => {
            if state.multicast.contains(&addr) {
                return;
            }
            if state.multicast.len() < MAC_TABLE_ENTRIES {
                state.multicast.push(addr);
            } else {
                state.rx_mode |= rx_mode::MULTI_OVERFLOW;
            }
        }
        MulticastOp::Del(addr) => {
            state.multicast.retain(|a| a != &addr);
            if state.multicast.is_empty() {
                state.rx_mode &= !rx_mode::MULTI_OVERFLOW;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u8) -> [u8; 6] {
        [1, 0, 0x5e, 0, 1, n]
    }

    fn memfd() -> OwnedFd {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        memfd_create(c"mcast-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap()
    }

    #[test]
    fn the_list_filters_multicast_only_when_asked_for() {
        let mut f = MulticastFilter::open(None, true).unwrap();
        let unicast = [2, 0, 0, 0, 0, 9];
        assert!(f.accepts(&unicast) && f.accepts(&[0xff; 6]));
        assert!(!f.accepts(&group(1)));
        f.apply(MulticastOp::Add(group(1))).unwrap();
        assert!(f.accepts(&group(1)) && !f.accepts(&group(2)));
        f.apply(MulticastOp::Del(group(1))).unwrap();
        assert!(!f.accepts(&group(1)));
        let off = MulticastFilter::open(None, false).unwrap();
        assert!(
            off.accepts(&group(7)),
            "a guest without the feature gets all"
        );
    }

    /// 64 addresses are kept; one more lets every multicast frame through
    /// until the list is empty again. Adding a listed address again (a
    /// replayed request) changes nothing.
    #[test]
    fn a_full_list_accepts_every_multicast_frame() {
        let mut f = MulticastFilter::open(None, true).unwrap();
        for n in 0..64 {
            f.apply(MulticastOp::Add(group(n))).unwrap();
            f.apply(MulticastOp::Add(group(n))).unwrap();
        }
        assert_eq!(f.list(), (&f.state.multicast[..], false));
        assert_eq!(f.list().0.len(), 64);
        assert!(!f.accepts(&group(200)));
        f.apply(MulticastOp::Add(group(64))).unwrap();
        assert!(f.list().1 && f.accepts(&group(200)));
        for n in 0..63 {
            f.apply(MulticastOp::Del(group(n))).unwrap();
        }
        assert!(f.accepts(&group(200)), "still overflowed");
        f.apply(MulticastOp::Del(group(63))).unwrap();
        assert_eq!(f.list(), (&[][..], false));
        assert!(!f.accepts(&group(200)));
    }

    /// The next instance, opening the same area, filters by the same list.
    #[test]
    fn the_list_outlives_the_instance() {
        let fd = memfd();
        NetStateArea::create(
            File::from(fd.try_clone().unwrap()),
            &NetDeviceState::netif(),
        )
        .unwrap();
        let mut first = MulticastFilter::open(Some(fd.try_clone().unwrap()), true).unwrap();
        first.apply(MulticastOp::Add(group(3))).unwrap();
        drop(first);
        let next = MulticastFilter::open(Some(fd), true).unwrap();
        assert!(next.accepts(&group(3)) && !next.accepts(&group(4)));
    }
}
