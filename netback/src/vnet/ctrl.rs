//! Control-queue commands (virtio 1.2 §5.1.6.5): parsed from the bytes a
//! driver wrote, checked against what it negotiated, and applied to a
//! [`NetDeviceState`] — all or nothing. Every byte is the driver's: lengths
//! are exact, counts are bounded by the bytes that carry them, and an
//! unknown class or command is an error (`VIRTIO_NET_ERR`), never a panic.

use shadowback_virtio::net_state::{
    rx_mode, NetDeviceState, GUEST_OFFLOAD_BITS, MAC_TABLE_ENTRIES,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_MQ,
};

/// Most command bytes (class, command and data) read from a chain: two
/// full MAC tables of a Linux guest with many addresses fit; more is an
/// error, not a bigger allocation.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// Why a command is answered `VIRTIO_NET_ERR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    #[error("{0} command bytes: fewer than a class and a command")]
    Short(usize),
    #[error("class {class} command {cmd} is not supported")]
    Unsupported { class: u8, cmd: u8 },
    #[error("class {class} command {cmd} needs feature bit {feature}, not negotiated")]
    NotNegotiated { class: u8, cmd: u8, feature: u32 },
    #[error("{what}: {got} data bytes, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("MAC table: {0}")]
    Table(&'static str),
    #[error("{0:02x?} is not a unicast address")]
    Mac([u8; 6]),
    #[error("guest offloads {0:#x} are not all negotiated, or not a valid set")]
    Offloads(u64),
    #[error("{got} queue pairs: the device has 1 to {max}")]
    Pairs { got: u16, max: u16 },
}

/// What the device is, as the commands see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlDevice {
    /// The virtio features the driver acked.
    pub features: u64,
    /// `max_virtqueue_pairs` of the config space.
    pub max_pairs: u16,
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Applies the command in `bytes` (class, command, data) for a driver on
/// `device`; `state` is left as it was on an error.
pub fn execute(
    state: &mut NetDeviceState,
    device: CtrlDevice,
    bytes: &[u8],
) -> Result<(), CtrlError> {
    let features = device.features;
    let (&class, &cmd, data) = match bytes {
        [class, cmd, data @ ..] => (class, cmd, data),
        _ => return Err(CtrlError::Short(bytes.len())),
    };
    let need = |feature: u32| {
        if features & bit(feature) == 0 {
            Err(CtrlError::NotNegotiated {
                class,
                cmd,
                feature,
            })
        } else {
            Ok(())
        }
    };
    let exact = |what, expected: usize| {
        if data.len() == expected {
            Ok(())
        } else {
            Err(CtrlError::Length {
                what,
                got: data.len(),
                expected,
            })
        }
    };
    match (u32::from(class), u32::from(cmd)) {
        (VIRTIO_NET_CTRL_RX, c @ (VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI)) => {
            need(VIRTIO_NET_F_CTRL_RX)?;
            exact("rx mode", 1)?;
            let mode = if c == VIRTIO_NET_CTRL_RX_PROMISC {
                rx_mode::PROMISC
            } else {
                rx_mode::ALLMULTI
            };
            if data[0] != 0 {
                state.rx_mode |= mode;
            } else {
                state.rx_mode &= !mode;
            }
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
            need(VIRTIO_NET_F_CTRL_RX)?;
            let (unicast, rest) = mac_table(data)?;
            let (multicast, rest) = mac_table(rest)?;
            if !rest.is_empty() {
                return Err(CtrlError::Table("bytes after the multicast table"));
            }
            state.rx_mode &= !(rx_mode::UNI_OVERFLOW | rx_mode::MULTI_OVERFLOW);
            for (table, overflow, macs) in [
                (&mut state.unicast, rx_mode::UNI_OVERFLOW, unicast),
                (&mut state.multicast, rx_mode::MULTI_OVERFLOW, multicast),
            ] {
                table.clear();
                match macs {
                    Some(macs) => table.extend(macs),
                    None => state.rx_mode |= overflow,
                }
            }
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
            need(VIRTIO_NET_F_CTRL_MAC_ADDR)?;
            exact("MAC address", 6)?;
            let mac = [data[0], data[1], data[2], data[3], data[4], data[5]];
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(CtrlError::Mac(mac));
            }
            state.mac = mac;
        }
        (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) => {
            need(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)?;
            exact("guest offloads", 8)?;
            let mut le = [0u8; 8];
            le.copy_from_slice(data);
            let offloads = u64::from_le_bytes(le);
            if !valid_offloads(offloads, features) {
                return Err(CtrlError::Offloads(offloads));
            }
            state.offloads = offloads;
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
            need(VIRTIO_NET_F_MQ)?;
            exact("queue pairs", 2)?;
            let pairs = u16::from_le_bytes([data[0], data[1]]);
            // virtio 1.2 §5.1.6.5.5: 1 to max_virtqueue_pairs.
            if pairs == 0 || pairs > device.max_pairs {
                return Err(CtrlError::Pairs {
                    got: pairs,
                    max: device.max_pairs,
                });
            }
            state.pairs = pairs;
        }
        _ => return Err(CtrlError::Unsupported { class, cmd }),
    }
    Ok(())
}

/// Whether a driver that negotiated `features` may switch to `offloads`:
/// negotiated guest offloads only, segmentation only with checksums, ECN
/// only with TCP segmentation (what the TAP accepts too).
fn valid_offloads(offloads: u64, features: u64) -> bool {
    let has = |f: u32| offloads & bit(f) != 0;
    offloads & !(features & GUEST_OFFLOAD_BITS) == 0
        && (!(has(VIRTIO_NET_F_GUEST_TSO4)
            || has(VIRTIO_NET_F_GUEST_TSO6)
            || has(VIRTIO_NET_F_GUEST_UFO))
            || has(VIRTIO_NET_F_GUEST_CSUM))
        && (!has(VIRTIO_NET_F_GUEST_ECN)
            || has(VIRTIO_NET_F_GUEST_TSO4)
            || has(VIRTIO_NET_F_GUEST_TSO6))
}

type Macs = Option<Vec<[u8; 6]>>;

/// One `virtio_net_ctrl_mac` (le32 entries, then the MACs): its entries,
/// `None` if more than the device keeps, and the bytes after it.
fn mac_table(data: &[u8]) -> Result<(Macs, &[u8]), CtrlError> {
    let (count, rest) = match data {
        [a, b, c, d, rest @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]), rest),
        _ => return Err(CtrlError::Table("no entry count")),
    };
    let len = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(6))
        .filter(|&n| n <= rest.len())
        .ok_or(CtrlError::Table("more entries than bytes"))?;
    let (macs, rest) = rest.split_at(len);
    if count as usize > MAC_TABLE_ENTRIES {
        return Ok((None, rest));
    }
    let macs = macs
        .chunks_exact(6)
        .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
        .collect();
    Ok((Some(macs), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const ALL_FEATURES: u64 = bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_MQ);
    const ALL: CtrlDevice = CtrlDevice {
        features: ALL_FEATURES,
        max_pairs: 4,
    };
    const NONE: CtrlDevice = CtrlDevice {
        features: 0,
        max_pairs: 4,
    };

    fn table(macs: &[[u8; 6]]) -> Vec<u8> {
        let mut v = (macs.len() as u32).to_le_bytes().to_vec();
        for m in macs {
            v.extend_from_slice(m);
        }
        v
    }

    fn cmd(class: u32, cmd: u32, data: &[u8]) -> Vec<u8> {
        let mut v = vec![class as u8, cmd as u8];
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn commands_change_the_state() {
        let mut s = NetDeviceState::initial(MAC, ALL_FEATURES);
        let new_mac = [2, 0xaa, 0, 0, 0, 7];
        execute(&mut s, ALL, &cmd(1, 1, &new_mac)).unwrap();
        execute(&mut s, ALL, &cmd(0, 0, &[0])).unwrap();
        execute(&mut s, ALL, &cmd(0, 1, &[1])).unwrap();
        let uc = [[2, 1, 1, 1, 1, 1]];
        let mc = [[0x33, 0x33, 0, 0, 0, 1]];
        let mut tables = table(&uc);
        tables.extend(table(&mc));
        execute(&mut s, ALL, &cmd(1, 0, &tables)).unwrap();
        execute(&mut s, ALL, &cmd(5, 0, &0u64.to_le_bytes())).unwrap();
        execute(&mut s, ALL, &cmd(4, 0, &4u16.to_le_bytes())).unwrap();
        assert_eq!(
            s,
            NetDeviceState {
                mac: new_mac,
                rx_mode: rx_mode::ALLMULTI,
                offloads: 0,
                unicast: uc.to_vec(),
                multicast: mc.to_vec(),
                pairs: 4,
            }
        );
        // An oversized multicast table: every multicast frame instead.
        let mut big = table(&[]);
        big.extend(table(&vec![[1, 0, 0x5e, 0, 0, 1]; MAC_TABLE_ENTRIES + 1]));
        execute(&mut s, ALL, &cmd(1, 0, &big)).unwrap();
        assert_eq!(s.rx_mode, rx_mode::ALLMULTI | rx_mode::MULTI_OVERFLOW);
        assert!(s.multicast.is_empty() && s.unicast.is_empty());
    }

    #[test]
    fn hostile_commands_are_errors_and_change_nothing() {
        let start = NetDeviceState::initial(MAC, ALL_FEATURES);
        let huge_count = {
            let mut v = u32::MAX.to_le_bytes().to_vec();
            v.extend_from_slice(&[0; 12]);
            v
        };
        let cases: Vec<(Vec<u8>, CtrlDevice)> = vec![
            (vec![], ALL),
            (vec![0], ALL),
            (cmd(0, 0, &[]), ALL),
            (cmd(0, 0, &[1, 1]), ALL),
            (cmd(0, 2, &[1]), ALL),  // ALLUNI: CTRL_RX_EXTRA not offered
            (cmd(0, 0, &[1]), NONE), // CTRL_RX not negotiated
            (cmd(1, 1, &MAC), NONE), // CTRL_MAC_ADDR not negotiated
            (cmd(1, 1, &[1, 2, 3, 4, 5, 6]), ALL), // multicast MAC
            (cmd(1, 1, &[0; 6]), ALL),
            (cmd(1, 1, &[2; 7]), ALL),
            (cmd(1, 0, &huge_count), ALL),
            (cmd(1, 0, &table(&[MAC])), ALL), // no multicast table
            (cmd(1, 0, &[table(&[]), table(&[]), vec![0]].concat()), ALL),
            (cmd(5, 0, &(1u64 << 7).to_le_bytes()), ALL), // TSO4 not negotiated
            (cmd(5, 0, &(1u64 << 40).to_le_bytes()), ALL),
            (cmd(5, 0, &[0; 7]), ALL),
            (cmd(4, 0, &1u16.to_le_bytes()), NONE), // MQ not negotiated
            (cmd(4, 0, &0u16.to_le_bytes()), ALL),
            (cmd(4, 0, &5u16.to_le_bytes()), ALL), // beyond max_virtqueue_pairs
            (cmd(4, 0, &[1]), ALL),
            (cmd(4, 0, &[1, 0, 0]), ALL),
            (cmd(4, 1, &[0; 8]), ALL),             // RSS not offered
            (cmd(2, 0, &1u16.to_le_bytes()), ALL), // VLAN not offered
            (cmd(255, 255, &[0; 64]), ALL),
        ];
        for (bytes, features) in cases {
            let mut s = start.clone();
            assert!(
                execute(&mut s, features, &bytes).is_err(),
                "{bytes:?} with {features:?} was accepted"
            );
            assert_eq!(s, start, "{bytes:?} changed the state");
        }
    }

    #[test]
    fn segmentation_offloads_need_checksums() {
        let f = GUEST_OFFLOAD_BITS;
        let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
        let tso4 = bit(VIRTIO_NET_F_GUEST_TSO4);
        let ecn = bit(VIRTIO_NET_F_GUEST_ECN);
        assert!(valid_offloads(csum | tso4 | ecn, f));
        assert!(!valid_offloads(tso4, f));
        assert!(!valid_offloads(csum | ecn, f));
        assert!(!valid_offloads(csum | tso4, csum));
    }
}
