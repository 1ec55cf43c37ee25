//! The network device class: a vif (docs/PROTOCOL.md §4.7) served by
//! `shadowback netback` over a wire the supervisor holds
//! (docs/ARCHITECTURE.md §11.5, §11.6).
//!
//! A NIC has no disk file and nothing to fence after the reap: a frame is
//! written to the wire with one non-blocking `send`, so nothing a dead
//! instance submitted can land later. What must outlive every instance is
//! the wire: a cable end or a TAP queue fd, opened when the supervisor
//! starts ([`open_wires`]) and lent, as a duplicate, with every
//! `attach-net`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use shadowback_virtio::net;
use shadowback_virtio::net_state::{NetDeviceState, NetStateArea};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

use shadowback_netback::wire::{cable_pair, CableConfig, Tap, TapConfig, TapMode, VnetHeaderLen};
use shadowback_xenbus::netif::{NetBackendInfo, NetFeatures};

use super::{ClassInfo, DeviceClass, InstanceSetup};
use crate::config::{NicConfig, NicWire};
use crate::transport::NetWire;
use crate::upgrade::{Adopted, ClassState, Handover};
use crate::vhost_user::VirtioModel;
use crate::SupervisorError;

/// `wire=` of `attach-net` for a cable end.
pub(crate) const WIRE_CABLE: &str = "cable";
/// `wire=` of `attach-net` for a TAP queue.
pub(crate) const WIRE_TAP: &str = "tap";

/// What the backend offers a netfront on a cable: scatter-gather, and
/// IPv6 packets with a blank checksum (the backend completes it in
/// software). A vif on a TAP is offered GSO TCPv4/v6 besides.
pub const OFFERED: NetFeatures = NetFeatures {
    sg: true,
    gso_tcpv4: false,
    gso_tcpv6: false,
    ipv6_csum_offload: true,
};

/// A vif's wire, held by the supervisor for its whole life.
#[derive(Debug)]
pub enum HeldWire {
    /// One end of a cable between two vifs of this supervisor.
    Cable(OwnedFd),
    /// A TAP interface (a queue fd per queue pair and its ioctl socket).
    Tap(Tap),
}

impl HeldWire {
    /// The wire a previous binary held (a live upgrade); `None` if the
    /// class state is not a vif's.
    pub fn adopt(state: &ClassState, fds: &Adopted) -> Result<Option<Self>, SupervisorError> {
        Ok(match state {
            ClassState::Disk { .. } => None,
            ClassState::Cable { fd } => Some(HeldWire::Cable(fds.fd(*fd)?)),
            ClassState::Tap {
                name,
                queues,
                vnet_hdr,
                ctl,
            } => {
                let queues = queues
                    .iter()
                    .map(|q| fds.fd(*q))
                    .collect::<Result<Vec<_>, _>>()?;
                let vnet_hdr = VnetHeaderLen::from_bytes(*vnet_hdr).ok_or_else(|| {
                    SupervisorError::Runtime(format!("upgrade state: vnet header of {vnet_hdr}"))
                })?;
                let tap = Tap::from_parts(name.clone(), queues, vnet_hdr, fds.fd(*ctl)?)
                    .map_err(|e| SupervisorError::Runtime(format!("tap {name}: {e}")))?;
                Some(HeldWire::Tap(tap))
            }
        })
    }

    fn handover(&self, fds: &mut Handover) -> ClassState {
        match self {
            HeldWire::Cable(fd) => ClassState::Cable { fd: fds.fd(fd) },
            HeldWire::Tap(tap) => ClassState::Tap {
                name: tap.name().to_string(),
                queues: tap.queue_fds().iter().map(|q| fds.fd(q)).collect(),
                vnet_hdr: tap.vnet_hdr().bytes(),
                ctl: fds.fd(tap.ctl_fd()),
            },
        }
    }

    /// Duplicates for one attachment (the cable end, or every TAP queue),
    /// with the `wire=` value, for a vif of `pairs` queue pairs.
    fn lend(&self, pairs: u16) -> Result<NetWire, SupervisorError> {
        let (kind, fds) = match self {
            HeldWire::Cable(fd) => (WIRE_CABLE, std::slice::from_ref(fd)),
            HeldWire::Tap(tap) => (WIRE_TAP, tap.queue_fds()),
        };
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SupervisorError::Spawn(format!("dup of the wire: {e}")))?;
        if fds.is_empty() {
            return Err(SupervisorError::Spawn("a wire without descriptor".into()));
        }
        Ok(NetWire { kind, fds, pairs })
    }
}

/// Opens every vif's wire, by vif name: a cable per pair of vifs that
/// name each other, a TAP (adopted if it exists, else created) per `tap`.
/// Runs in the calling thread's network namespace. `nics` was validated.
pub fn open_wires(nics: &[NicConfig]) -> Result<HashMap<String, HeldWire>, SupervisorError> {
    let mut wires = HashMap::new();
    for nic in nics {
        if wires.contains_key(&nic.name) {
            continue;
        }
        let err = |why: String| SupervisorError::Device {
            device: nic.name.clone(),
            reason: why,
        };
        match nic.wire() {
            Some(NicWire::Cable(peer)) => {
                let [ours, theirs] =
                    cable_pair(CableConfig::default()).map_err(|e| err(format!("cable: {e}")))?;
                wires.insert(nic.name.clone(), HeldWire::Cable(ours));
                wires.insert(peer.to_string(), HeldWire::Cable(theirs));
                tracing::info!(nic = %nic.name, %peer, "cable created");
            }
            Some(NicWire::Tap(ifname)) => {
                let tap = open_tap(ifname, nic.mtu, nic.queues)
                    .map_err(|e| err(format!("tap {ifname}: {e}")))?;
                wires.insert(nic.name.clone(), HeldWire::Tap(tap));
            }
            None => return Err(err("no wire".into())),
        }
    }
    Ok(wires)
}

/// Adopts `ifname` if it exists, else creates it, with the vif's MTU and
/// a queue per queue pair (`IFF_MULTI_QUEUE` for more than one: an
/// adopted interface must have been made multi-queue too).
fn open_tap(
    ifname: &str,
    mtu: u16,
    queues: u16,
) -> Result<Tap, shadowback_netback::wire::WireError> {
    use shadowback_netback::wire::WireError;
    let cfg = |mode| TapConfig {
        mtu: Some(u32::from(mtu)),
        queues,
        ..TapConfig::new(ifname, mode)
    };
    match Tap::open(&cfg(TapMode::Adopt)) {
        Err(WireError::NotFound(_)) => Tap::open(&cfg(TapMode::Create)),
        other => other,
    }
}

/// The virtio-net face of a vif (`[[nic]] vhost_user`): the features and
/// config space of `shadowback_virtio::net`, with the vif's MAC, MTU and
/// queue pairs. The link status in it is always up: the supervisor
/// answers `GET_CONFIG`, so no backend restart can take it down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetModel {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// The vif is on a TAP: TCP segmentation is offered both ways
    /// (`shadowback_virtio::net::TAP_FEATURES`).
    pub tap: bool,
    /// `max_virtqueue_pairs` (`[[nic]] queues`); `VIRTIO_NET_F_MQ` is
    /// offered when more than one.
    pub pairs: u16,
}

impl NetModel {
    fn config(&self, mac: [u8; 6], offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        net::config_space(mac, self.mtu, self.pairs)
            .get(start..end)
            .map(<[u8]>::to_vec)
    }
}

impl VirtioModel for NetModel {
    fn features(&self) -> u64 {
        let mut features = net::OFFERED_FEATURES;
        if !self.tap {
            features &= !net::TAP_FEATURES;
        }
        if self.pairs <= 1 {
            features &= !net::MQ_FEATURE;
        }
        features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// No `INFLIGHT_SHMFD`: QEMU's vhost-user-net never asks for the
    /// region, and the shadow logs are the authority after a data-plane
    /// crash anyway (docs/ARCHITECTURE.md §8.1).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn num_queues(&self) -> u16 {
        net::num_queues(self.pairs)
    }

    fn min_queues(&self) -> u16 {
        net::MIN_QUEUES
    }

    /// The first pair is waited for; QEMU enables only the pairs its
    /// driver uses (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` on its own control
    /// queue), and keeps the control queue.
    fn may_stay_disabled(&self, index: u16) -> bool {
        index >= net::MIN_QUEUES
    }

    /// MAC, receive mode, filter tables and guest offloads set on the
    /// control queue outlive the backends (docs/ARCHITECTURE.md §8.1).
    fn keeps_device_state(&self) -> bool {
        true
    }

    fn reset_device_state(&self, file: std::fs::File, features: u64) -> Result<(), String> {
        let state = NetDeviceState::initial(self.mac, features);
        NetStateArea::create(file, &state)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        self.config(self.mac, offset, size)
    }

    /// The MAC is the one the driver set (`VIRTIO_NET_CTRL_MAC_ADDR_SET`),
    /// as the device state area says: a backend writes it there before it
    /// acks the command, and the area outlives every backend, so after a
    /// crash too the config shows what the driver was told took effect.
    fn read_config_in(&self, offset: u32, size: u32, state: &std::fs::File) -> Option<Vec<u8>> {
        let mac = match NetStateArea::read(state) {
            Ok(s) => s.mac,
            Err(e) => {
                tracing::warn!(error = %e, "device state area unreadable: the vif's MAC shown");
                self.mac
            }
        };
        self.config(mac, offset, size)
    }
}

/// A vif: its configuration and its wire.
#[derive(Debug)]
pub struct NetClass {
    info: NetBackendInfo,
    wire: HeldWire,
    /// Queue pairs (`[[nic]] queues`).
    pairs: u16,
    /// The backend's adaptive polling window (`[[nic]] poll_us`).
    poll_us: u32,
}

impl NetClass {
    /// The `shadowback` subcommand that runs a network backend.
    pub const SUBCOMMAND: &'static str = "netback";

    /// The class of vif `cfg` on `wire` (from [`open_wires`]).
    pub fn new(cfg: &NicConfig, wire: HeldWire) -> Result<Self, SupervisorError> {
        Ok(NetClass {
            info: NetBackendInfo {
                device: cfg.name.clone(),
                backend_id: cfg.backend_id,
                mac: cfg.mac_addr()?,
                mtu: cfg.mtu,
                features: match wire {
                    // The TAP segments and checksums what the guest leaves
                    // undone (docs/ARCHITECTURE.md §11.6).
                    HeldWire::Tap(_) => NetFeatures {
                        gso_tcpv4: true,
                        gso_tcpv6: true,
                        ..OFFERED
                    },
                    HeldWire::Cable(_) => OFFERED,
                },
            },
            wire,
            pairs: cfg.queues,
            poll_us: cfg.poll_us,
        })
    }
}

impl DeviceClass for NetClass {
    fn backend_info(&self) -> ClassInfo {
        ClassInfo::Net(self.info.clone())
    }

    fn virtio_model(&self) -> Option<std::sync::Arc<dyn VirtioModel>> {
        Some(std::sync::Arc::new(NetModel {
            mac: self.info.mac.0,
            mtu: self.info.mtu,
            tap: matches!(self.wire, HeldWire::Tap(_)),
            pairs: self.pairs,
        }))
    }

    fn prepare_instance(&self) -> Result<InstanceSetup, SupervisorError> {
        Ok(InstanceSetup {
            args: vec![
                "--backend-id".into(),
                self.info.backend_id.to_string().into(),
                "--poll-us".into(),
                self.poll_us.to_string().into(),
            ],
            device_file: None,
            io_fence: None,
        })
    }

    fn lend_wire(&self) -> Result<Option<NetWire>, SupervisorError> {
        self.wire.lend(self.pairs).map(Some)
    }

    fn handover(&self, fds: &mut Handover) -> ClassState {
        self.wire.handover(fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cable_pair_gets_one_cable_and_lends_duplicates() {
        let nics = [NicConfig::cable("a", "b"), NicConfig::cable("b", "a")];
        let mut wires = open_wires(&nics).unwrap();
        assert_eq!(wires.len(), 2);
        let a = NetClass::new(&nics[0], wires.remove("a").unwrap()).unwrap();
        let b = NetClass::new(&nics[1], wires.remove("b").unwrap()).unwrap();
        let (la, lb) = (
            a.lend_wire().unwrap().unwrap(),
            b.lend_wire().unwrap().unwrap(),
        );
        assert_eq!((la.kind, lb.kind), (WIRE_CABLE, WIRE_CABLE));
        // The two ends are connected: what one lent copy sends, the other
        // side's lent copy receives.
        nix::unistd::write(&la.fds[0], b"frame").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&lb.fds[0]), &mut buf).unwrap(),
            5
        );
        assert_eq!((la.fds.len(), la.pairs), (1, 1));
        let ClassInfo::Net(info) = a.backend_info() else {
            panic!("not a vif");
        };
        assert_eq!(info.mac, nics[0].mac_addr().unwrap());
        assert_ne!(info.mac, nics[1].mac_addr().unwrap());
        let setup = a.prepare_instance().unwrap();
        assert!(setup.device_file.is_none() && setup.io_fence.is_none());
    }

    /// The backend is started with the nic's polling window.
    #[test]
    fn the_backend_gets_the_nics_poll_window() {
        let nics = [
            NicConfig {
                poll_us: 50,
                ..NicConfig::cable("a", "b")
            },
            NicConfig::cable("b", "a"),
        ];
        let mut wires = open_wires(&nics).unwrap();
        for (nic, want) in nics.iter().zip(["50", "0"]) {
            let class = NetClass::new(nic, wires.remove(nic.name.as_str()).unwrap()).unwrap();
            let args = class.prepare_instance().unwrap().args;
            let at = args.iter().position(|a| a == "--poll-us");
            let value = at.and_then(|at| args.get(at + 1));
            assert_eq!(value.and_then(|v| v.to_str()), Some(want), "{args:?}");
        }
    }

    /// A vif on a cable, one queue pair, MTU `mtu`.
    fn model(mtu: u16) -> NetModel {
        NetModel {
            mac: [2, 0xaa, 0, 0, 0, 1],
            mtu,
            tap: false,
            pairs: 1,
        }
    }

    #[test]
    fn the_virtio_model_shows_mac_mtu_and_a_link_that_is_up() {
        let model = model(9000);
        assert_eq!(model.read_config(0, 6).unwrap(), vec![2, 0xaa, 0, 0, 0, 1]);
        assert_eq!(model.read_config(6, 2).unwrap(), vec![1, 0], "LINK_UP");
        assert_eq!(model.read_config(10, 2).unwrap(), 9000u16.to_le_bytes());
        assert!(model.read_config(10, 3).is_none());
        assert!(model.read_config(u32::MAX, 2).is_none());
        assert_eq!((model.num_queues(), model.min_queues()), (3, 2));
        assert_ne!(model.features() & (1 << 30), 0, "PROTOCOL_FEATURES");
        assert!(!model
            .protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert_eq!(model.features() & net::TAP_FEATURES, 0, "no TSO on a cable");
        let tap = NetModel { tap: true, ..model };
        assert_eq!(tap.features() & net::TAP_FEATURES, net::TAP_FEATURES);
        assert_eq!(model.features() & net::MQ_FEATURE, 0, "one pair: no MQ");
        let mq = NetModel { pairs: 4, ..model };
        assert_eq!(mq.features() & net::MQ_FEATURE, net::MQ_FEATURE);
        assert_eq!(mq.num_queues(), 9);
        assert_eq!(mq.read_config(8, 2).unwrap(), 4u16.to_le_bytes());
        assert!(!mq.may_stay_disabled(1) && mq.may_stay_disabled(2) && mq.may_stay_disabled(8));
    }

    /// `GET_CONFIG` shows the MAC a driver set on the control queue: the
    /// device state area says it, whichever backend wrote it.
    #[test]
    fn the_config_space_shows_the_mac_the_driver_set() {
        use shadowback_virtio::net_state::NetStateArea;
        let model = model(1500);
        let fd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::empty()).unwrap();
        let file = std::fs::File::from(fd);
        model
            .reset_device_state(file.try_clone().unwrap(), 0)
            .unwrap();
        assert_eq!(model.read_config_in(0, 6, &file).unwrap(), model.mac);
        let (mut area, mut state) = NetStateArea::open(file.try_clone().unwrap()).unwrap();
        state.mac = [2, 0x5b, 0, 0, 0, 0x42];
        area.store(&state).unwrap();
        assert_eq!(model.read_config_in(0, 6, &file).unwrap(), state.mac);
        assert_eq!(model.read_config_in(6, 2, &file).unwrap(), vec![1, 0]);
        assert_eq!(
            model.read_config(0, 6).unwrap(),
            model.mac,
            "no session: the vif's"
        );
    }
}
