//! Network interfaces over Xen netif rings: the keys of `backend` and
//! `connect` for a vif, and the supervisor → backend `attach-net`
//! (docs/PROTOCOL.md §4.7 and §6c).
//!
//! A vif is probed, announced and connected with the same messages as a
//! disk (`probe`, `backend`, `connect`, `connected`, `close`); what differs
//! is the keys, chosen so that a frontend written against Linux netfront's
//! XenStore keys maps one to one:
//!
//! ```text
//! backend (supervisor → frontend, state=2)
//! device=vif0 state=2 backend-id=0 mac=02:00:00:00:00:01 mtu=1500
//! feature-rx-copy=1 feature-rx-flip=0 feature-sg=1
//! feature-gso-tcpv4=1 feature-gso-tcpv6=1 feature-ipv6-csum-offload=1
//! feature-split-event-channels=1 multi-queue-max-queues=1
//! feature-multicast-control=1
//!
//! connect (frontend → supervisor)
//! device=vif0 frontend-id=1 grant-frames=1 protocol=x86_64-abi
//! tx-ring-ref=<gref> rx-ring-ref=<gref> request-rx-copy=1
//! feature-rx-notify=1 [feature-sg=1] [feature-gso-tcpv4=1]
//! [feature-gso-tcpv6=1] [feature-ipv6-csum-offload=1]
//! [feature-no-csum-offload=1] [split-event-channels=1]
//! [request-multicast-control=1]
//! [multi-queue-num-queues=1]
//! ```
//!
//! Descriptors of `connect`: the region memfd, then one event channel as a
//! pair of eventfds (`kick` frontend → backend, `notify` backend →
//! frontend) — Xen's `event-channel` — or, with `split-event-channels=1`,
//! two pairs, TX then RX — Xen's `event-channel-tx` and `event-channel-rx`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::protocol::{key as common, GRANT_ENTRIES_PER_FRAME};
use crate::protocol::{kind, PROTOCOL_X86_64};
use crate::{Message, XenbusError};

/// Message kind of the supervisor → backend netif attach.
pub const ATTACH_NET: &str = "attach-net";

/// Keys of a vif (besides `device`, `state`, `backend-id`, `frontend-id`,
/// `grant-frames` and `protocol`, shared with disks).
pub mod key {
    /// `backend`: the vif's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub const MAC: &str = "mac";
    /// `backend`: the link MTU in bytes.
    pub const MTU: &str = "mtu";
    /// `backend`: RX by copy into buffers the frontend posts (always 1).
    pub const FEATURE_RX_COPY: &str = "feature-rx-copy";
    /// `backend`: RX by page flipping (never offered: 0).
    pub const FEATURE_RX_FLIP: &str = "feature-rx-flip";
    /// Both: packets of several slots (`NETTXF_more_data`, `NETRXF_more_data`).
    pub const FEATURE_SG: &str = "feature-sg";
    /// Both: TCPv4 segmentation offload (GSO extra-info slots).
    pub const FEATURE_GSO_TCPV4: &str = "feature-gso-tcpv4";
    /// Both: TCPv6 segmentation offload.
    pub const FEATURE_GSO_TCPV6: &str = "feature-gso-tcpv6";
    /// Both: checksum offload for IPv6.
    pub const FEATURE_IPV6_CSUM_OFFLOAD: &str = "feature-ipv6-csum-offload";
    /// `connect`: the frontend cannot take partial (blank) checksums.
    pub const FEATURE_NO_CSUM_OFFLOAD: &str = "feature-no-csum-offload";
    /// `backend`: TX and RX may have an event channel each.
    pub const FEATURE_SPLIT_EVENT_CHANNELS: &str = "feature-split-event-channels";
    /// `backend`: most queue pairs the backend serves.
    pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";
    /// `1`: the backend filters multicast frames by the list a frontend
    /// keeps with `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`/`_DEL`.
    pub const FEATURE_MULTICAST_CONTROL: &str = "feature-multicast-control";
    /// `1`: this frontend wants its multicast list applied.
    pub const REQUEST_MULTICAST_CONTROL: &str = "request-multicast-control";
    /// `connect`: grant ref of the TX ring page.
    pub const TX_RING_REF: &str = "tx-ring-ref";
    /// `connect`: grant ref of the RX ring page.
    pub const RX_RING_REF: &str = "rx-ring-ref";
    /// `connect`: the frontend wants RX by copy (must be 1).
    pub const REQUEST_RX_COPY: &str = "request-rx-copy";
    /// `connect`: the frontend sets `rx_req_event` and wants a notification
    /// when RX requests are consumed past it (must be 1, as Linux netback
    /// requires).
    pub const FEATURE_RX_NOTIFY: &str = "feature-rx-notify";
    /// `connect`: two event channels (TX, RX) instead of one.
    pub const SPLIT_EVENT_CHANNELS: &str = "split-event-channels";
    /// `connect`: queue pairs the frontend uses (only 1 today).
    pub const MULTI_QUEUE_NUM_QUEUES: &str = "multi-queue-num-queues";
}

/// Queue pairs a vif serves today.
pub const MAX_QUEUES: u16 = 1;
/// Smallest and largest MTU a vif may be configured with (Ethernet's
/// minimum; the largest frame a netif TX packet can carry, less the
/// Ethernet header).
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 65535 - 14;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the group bit is clear (a unicast address a NIC may own).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or("a MAC address has six parts")?;
            if part.len() != 2 {
                return Err("each part of a MAC address is two hex digits");
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| "not a hex digit")?;
        }
        if parts.next().is_some() {
            return Err("a MAC address has six parts");
        }
        Ok(MacAddr(mac))
    }
}

/// Offloads a side offers (`backend`) or asks for (`connect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetFeatures {
    pub sg: bool,
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
    pub ipv6_csum_offload: bool,
}

impl NetFeatures {
    /// Everything the backend implements.
    pub const ALL: NetFeatures = NetFeatures {
        sg: true,
        gso_tcpv4: true,
        gso_tcpv6: true,
        ipv6_csum_offload: true,
    };

    /// What both sides have.
    pub fn intersect(self, other: NetFeatures) -> NetFeatures {
        NetFeatures {
            sg: self.sg && other.sg,
            gso_tcpv4: self.gso_tcpv4 && other.gso_tcpv4,
            gso_tcpv6: self.gso_tcpv6 && other.gso_tcpv6,
            ipv6_csum_offload: self.ipv6_csum_offload && other.ipv6_csum_offload,
        }
    }

    fn pairs(self) -> [(&'static str, bool); 4] {
        [
            (key::FEATURE_SG, self.sg),
            (key::FEATURE_GSO_TCPV4, self.gso_tcpv4),
            (key::FEATURE_GSO_TCPV6, self.gso_tcpv6),
            (key::FEATURE_IPV6_CSUM_OFFLOAD, self.ipv6_csum_offload),
        ]
    }

    fn write(self, mut msg: Message, always: bool) -> Message {
        for (name, on) in self.pairs() {
            if on || always {
                msg.set(name, u8::from(on));
            }
        }
        msg
    }

    fn read(msg: &Message) -> Result<Self, XenbusError> {
        let flag = |name| msg.get_flag(name).map(|f| f.unwrap_or(false));
        Ok(NetFeatures {
            sg: flag(key::FEATURE_SG)?,
            gso_tcpv4: flag(key::FEATURE_GSO_TCPV4)?,
            gso_tcpv6: flag(key::FEATURE_GSO_TCPV6)?,
            ipv6_csum_offload: flag(key::FEATURE_IPV6_CSUM_OFFLOAD)?,
        })
    }
}

/// The backend keys of a vif, sent in `backend` (InitWait) and `connected`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetBackendInfo {
    pub device: String,
    pub backend_id: u16,
    pub mac: MacAddr,
    pub mtu: u16,
    pub features: NetFeatures,
}

impl NetBackendInfo {
    /// The keys, on a message of kind `kind` (`backend`, `connected`).
    pub fn to_message(&self, kind: &str, state: crate::XenbusState) -> Message {
        let msg = Message::new(kind)
            .with(common::DEVICE, &self.device)
            .with(common::STATE, state as u8)
            .with(common::BACKEND_ID, self.backend_id)
            .with(key::MAC, self.mac)
            .with(key::MTU, self.mtu)
            .with(key::FEATURE_RX_COPY, 1)
            .with(key::FEATURE_RX_FLIP, 0)
            .with(key::FEATURE_SPLIT_EVENT_CHANNELS, 1)
            .with(key::MULTI_QUEUE_MAX_QUEUES, MAX_QUEUES)
            .with(key::FEATURE_MULTICAST_CONTROL, 1);
        self.features.write(msg, true)
    }

    /// Parses the keys of a `backend` or `connected` message (frontend side).
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        let mac = msg.require(key::MAC)?;
        let mtu = msg.require_u16(key::MTU)?;
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(XenbusError::invalid(
                key::MTU,
                &mtu.to_string(),
                "MTU out of range",
            ));
        }
        Ok(NetBackendInfo {
            device: msg.require(common::DEVICE)?.to_owned(),
            backend_id: msg.require_u16(common::BACKEND_ID)?,
            mac: mac
                .parse()
                .map_err(|why| XenbusError::invalid(key::MAC, mac, why))?,
            mtu,
            features: NetFeatures::read(msg)?,
        })
    }
}

/// What a netfront sets up: the keys of its `connect` (and of
/// `attach-net`, which adds `frontend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConnectRequest {
    pub device: String,
    pub frontend_id: u16,
    /// Grant-table frames at the start of the region (≥ 1).
    pub grant_frames: u32,
    pub tx_ring_ref: u32,
    pub rx_ring_ref: u32,
    /// Offloads the frontend asks for.
    pub features: NetFeatures,
    /// The frontend cannot take blank checksums on RX.
    pub no_csum_offload: bool,
    /// TX and RX have an event channel each (two eventfd pairs).
    pub split_event_channels: bool,
    /// Multicast frames are filtered by the frontend's list
    /// (`request-multicast-control`).
    pub multicast_control: bool,
}

impl NetConnectRequest {
    /// Descriptors that come with `connect`: the region and one or two
    /// event channels (a kick and a notify eventfd each).
    pub fn fd_count(&self) -> usize {
        if self.split_event_channels {
            5
        } else {
            3
        }
    }

    /// The `connect` message.
    pub fn to_message(&self) -> Message {
        self.write_keys(Message::new(kind::CONNECT))
    }

    fn write_keys(&self, msg: Message) -> Message {
        let mut msg = msg
            .with(common::DEVICE, &self.device)
            .with(common::FRONTEND_ID, self.frontend_id)
            .with(common::GRANT_FRAMES, self.grant_frames)
            .with(common::PROTOCOL, PROTOCOL_X86_64)
            .with(key::TX_RING_REF, self.tx_ring_ref)
            .with(key::RX_RING_REF, self.rx_ring_ref)
            .with(key::REQUEST_RX_COPY, 1)
            .with(key::FEATURE_RX_NOTIFY, 1);
        msg = self.features.write(msg, false);
        if self.no_csum_offload {
            msg.set(key::FEATURE_NO_CSUM_OFFLOAD, 1);
        }
        if self.split_event_channels {
            msg.set(key::SPLIT_EVENT_CHANNELS, 1);
        }
        if self.multicast_control {
            msg.set(key::REQUEST_MULTICAST_CONTROL, 1);
        }
        msg
    }

    /// Parses a vif's `connect` message.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(kind::CONNECT)?;
        Self::from_keys(msg)
    }

    fn from_keys(msg: &Message) -> Result<Self, XenbusError> {
        let device = msg.require(common::DEVICE)?;
        if device.is_empty() {
            return Err(XenbusError::invalid(
                common::DEVICE,
                device,
                "empty device name",
            ));
        }
        let protocol = msg.require(common::PROTOCOL)?;
        if protocol != PROTOCOL_X86_64 {
            return Err(XenbusError::invalid(
                common::PROTOCOL,
                protocol,
                "only x86_64-abi is supported",
            ));
        }
        let grant_frames = msg.require_u32(common::GRANT_FRAMES)?;
        if grant_frames == 0 {
            return Err(XenbusError::invalid(
                common::GRANT_FRAMES,
                "0",
                "at least one grant-table frame is required",
            ));
        }
        let entries = u64::from(grant_frames) * GRANT_ENTRIES_PER_FRAME;
        let gref = |name| {
            let gref = msg.require_u32(name)?;
            if u64::from(gref) >= entries {
                return Err(XenbusError::invalid(
                    name,
                    &gref.to_string(),
                    "grant ref beyond the grant table",
                ));
            }
            Ok(gref)
        };
        let tx_ring_ref = gref(key::TX_RING_REF)?;
        let rx_ring_ref = gref(key::RX_RING_REF)?;
        if tx_ring_ref == rx_ring_ref {
            return Err(XenbusError::invalid(
                key::RX_RING_REF,
                &rx_ring_ref.to_string(),
                "the TX and RX rings share a page",
            ));
        }
        // RX by page flipping was removed from Linux long ago, and a
        // frontend that does not set rx_req_event would have to be polled.
        if msg.get_flag(key::REQUEST_RX_COPY)? != Some(true) {
            return Err(XenbusError::invalid(
                key::REQUEST_RX_COPY,
                msg.get(key::REQUEST_RX_COPY).unwrap_or(""),
                "only RX by copy is supported: request-rx-copy=1 is required",
            ));
        }
        if msg.get_flag(key::FEATURE_RX_NOTIFY)? != Some(true) {
            return Err(XenbusError::invalid(
                key::FEATURE_RX_NOTIFY,
                msg.get(key::FEATURE_RX_NOTIFY).unwrap_or(""),
                "feature-rx-notify=1 is required",
            ));
        }
        if let Some(n) = msg.get_u16(key::MULTI_QUEUE_NUM_QUEUES)? {
            if n == 0 || n > MAX_QUEUES {
                return Err(XenbusError::invalid(
                    key::MULTI_QUEUE_NUM_QUEUES,
                    &n.to_string(),
                    "this backend serves one queue pair",
                ));
            }
        }
        Ok(NetConnectRequest {
            device: device.to_owned(),
            frontend_id: msg.require_u16(common::FRONTEND_ID)?,
            grant_frames,
            tx_ring_ref,
            rx_ring_ref,
            features: NetFeatures::read(msg)?,
            no_csum_offload: msg.get_flag(key::FEATURE_NO_CSUM_OFFLOAD)?.unwrap_or(false),
            split_event_channels: msg.get_flag(key::SPLIT_EVENT_CHANNELS)?.unwrap_or(false),
            multicast_control: msg
                .get_flag(key::REQUEST_MULTICAST_CONTROL)?
                .unwrap_or(false),
        })
    }
}

/// Supervisor → backend: a [`NetConnectRequest`] plus the frontend's name
/// and the negotiated device state the backend applies before serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetAttachRequest {
    pub frontend: String,
    pub connect: NetConnectRequest,
    pub mac: MacAddr,
    pub mtu: u16,
}

impl NetAttachRequest {
    /// The `attach-net` message (without `recover`/`blame`, which the
    /// caller adds).
    pub fn to_message(&self) -> Message {
        self.connect
            .write_keys(Message::new(ATTACH_NET))
            .with(common::FRONTEND, &self.frontend)
            .with(key::MAC, self.mac)
            .with(key::MTU, self.mtu)
    }

    /// Parses an `attach-net` message.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(ATTACH_NET)?;
        let info = |name: &str| msg.require(name);
        let mac = info(key::MAC)?;
        let mtu = msg.require_u16(key::MTU)?;
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(XenbusError::invalid(
                key::MTU,
                &mtu.to_string(),
                "MTU out of range",
            ));
        }
        Ok(NetAttachRequest {
            frontend: info(common::FRONTEND)?.to_owned(),
            connect: NetConnectRequest::from_keys(msg)?,
            mac: mac
                .parse()
                .map_err(|why| XenbusError::invalid(key::MAC, mac, why))?,
            mtu,
        })
    }
}

/// One event channel: the frontend kicks, the backend notifies.
#[derive(Debug)]
pub struct EventFds {
    pub kick: OwnedFd,
    pub notify: OwnedFd,
}

/// The descriptors of a vif's `connect`, in wire order.
#[derive(Debug)]
pub struct NetFds {
    /// \[0\] memfd of the guest's granted region; grant table first.
    pub region: OwnedFd,
    /// \[1, 2\] the TX ring's event channel (the only one unless split).
    pub tx: EventFds,
    /// \[3, 4\] the RX ring's own event channel, with
    /// `split-event-channels=1`.
    pub rx: Option<EventFds>,
}

impl NetFds {
    /// Takes the descriptors received with `connect` for `req`; any other
    /// count is [`XenbusError::FdCount`] (and they are closed).
    pub fn from_received(
        msg: &Message,
        req: &NetConnectRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<Self, XenbusError> {
        let got = fds.len();
        let count_err = || XenbusError::FdCount {
            kind: msg.kind().to_owned(),
            expected: req.fd_count(),
            got,
        };
        if got != req.fd_count() {
            return Err(count_err());
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().ok_or_else(count_err);
        let region = next()?;
        let tx = EventFds {
            kick: next()?,
            notify: next()?,
        };
        let rx = if req.split_event_channels {
            Some(EventFds {
                kick: next()?,
                notify: next()?,
            })
        } else {
            None
        };
        Ok(NetFds { region, tx, rx })
    }

    /// Borrowed descriptors in wire order.
    pub fn as_borrowed(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![
            self.region.as_fd(),
            self.tx.kick.as_fd(),
            self.tx.notify.as_fd(),
        ];
        if let Some(rx) = &self.rx {
            fds.extend([rx.kick.as_fd(), rx.notify.as_fd()]);
        }
        fds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::XenbusState;

    fn connect() -> NetConnectRequest {
        NetConnectRequest {
            device: "vif0".into(),
            frontend_id: 1,
            grant_frames: 1,
            tx_ring_ref: 8,
            rx_ring_ref: 9,
            features: NetFeatures {
                sg: true,
                gso_tcpv4: true,
                ..NetFeatures::default()
            },
            no_csum_offload: false,
            split_event_channels: true,
            multicast_control: true,
        }
    }

    /// The message after a round trip through its text form, as a peer
    /// would receive it.
    fn wire(msg: &Message) -> Message {
        Message::decode(&msg.encode().unwrap()).unwrap()
    }

    #[test]
    fn connect_round_trips() {
        let req = connect();
        let back = NetConnectRequest::from_message(&wire(&req.to_message())).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.fd_count(), 5);
        let single = NetConnectRequest {
            split_event_channels: false,
            ..req
        };
        assert_eq!(single.fd_count(), 3);
    }

    #[test]
    fn attach_net_round_trips() {
        let req = NetAttachRequest {
            frontend: "guest-1".into(),
            connect: connect(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            mtu: 1500,
        };
        let back = NetAttachRequest::from_message(&wire(&req.to_message())).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn backend_info_round_trips_and_offers_what_linux_reads() {
        let info = NetBackendInfo {
            device: "vif0".into(),
            backend_id: 0,
            mac: MacAddr([2, 0, 0, 0, 0, 0x2a]),
            mtu: 9000,
            features: NetFeatures::ALL,
        };
        let msg = wire(&info.to_message(kind::BACKEND, XenbusState::InitWait));
        assert_eq!(msg.get(key::MAC), Some("02:00:00:00:00:2a"));
        assert_eq!(msg.get(key::FEATURE_RX_COPY), Some("1"));
        assert_eq!(msg.get(key::FEATURE_RX_FLIP), Some("0"));
        assert_eq!(msg.get(key::FEATURE_SPLIT_EVENT_CHANNELS), Some("1"));
        assert_eq!(msg.get(key::MULTI_QUEUE_MAX_QUEUES), Some("1"));
        assert_eq!(NetBackendInfo::from_message(&msg).unwrap(), info);
    }

    /// Each broken `connect` is refused, naming the key at fault.
    #[test]
    fn bad_connects_are_refused_by_key() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (key::TX_RING_REF, None, key::TX_RING_REF),
            (key::TX_RING_REF, Some("512"), key::TX_RING_REF),
            (key::RX_RING_REF, Some("8"), key::RX_RING_REF),
            (key::REQUEST_RX_COPY, None, key::REQUEST_RX_COPY),
            (key::REQUEST_RX_COPY, Some("0"), key::REQUEST_RX_COPY),
            (key::FEATURE_RX_NOTIFY, Some("0"), key::FEATURE_RX_NOTIFY),
            (
                key::MULTI_QUEUE_NUM_QUEUES,
                Some("2"),
                key::MULTI_QUEUE_NUM_QUEUES,
            ),
            (
                key::MULTI_QUEUE_NUM_QUEUES,
                Some("0"),
                key::MULTI_QUEUE_NUM_QUEUES,
            ),
            (common::GRANT_FRAMES, Some("0"), common::GRANT_FRAMES),
            (common::PROTOCOL, Some("x86_32-abi"), common::PROTOCOL),
            (key::FEATURE_SG, Some("yes"), key::FEATURE_SG),
            (common::DEVICE, Some(""), common::DEVICE),
        ];
        for &(name, value, blamed) in cases {
            let good = connect().to_message();
            let mut msg = Message::new(kind::CONNECT);
            for (k, v) in good.iter() {
                if k != name {
                    msg.set(k, v);
                }
            }
            if let Some(v) = value {
                msg.set(name, v);
            }
            let err = NetConnectRequest::from_message(&msg)
                .expect_err(&format!("{name}={value:?} accepted"));
            let text = err.to_string();
            assert!(
                text.contains(&format!("{blamed:?}")),
                "{name}={value:?}: {text}"
            );
        }
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!(
            "02:ab:CD:00:10:ff".parse::<MacAddr>(),
            Ok(MacAddr([2, 0xab, 0xcd, 0, 0x10, 0xff]))
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:00:00:00:00:00",
            "0g:00:00:00:00:00",
            "02-00-00-00-00-00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
        assert!(MacAddr([2, 0, 0, 0, 0, 1]).is_unicast());
        assert!(!MacAddr([1, 0, 0x5e, 0, 0, 1]).is_unicast());
    }

    #[test]
    fn feature_intersection() {
        let guest = NetFeatures {
            sg: true,
            gso_tcpv6: true,
            ..NetFeatures::default()
        };
        assert_eq!(NetFeatures::ALL.intersect(guest), guest);
        assert_eq!(
            guest.intersect(NetFeatures::default()),
            NetFeatures::default()
        );
    }
}
