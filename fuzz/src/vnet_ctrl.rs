//! vnet_ctrl: virtio-net control-queue commands a driver writes, through
//! `netback::vnet::ctrl::execute` as the virtio-net loop runs them, on a
//! device of any negotiated features and queue pairs, from any state a
//! backend can hold.
//!
//! Checked besides "no panic": a refused command leaves the state as it
//! was; an accepted one leaves a state a backend may keep (known receive
//! mode bits, tables of at most 64 entries, offloads the driver
//! negotiated, 1 to `max_virtqueue_pairs` pairs, a unicast MAC), which
//! the device state area stores and reads back unchanged; and executing
//! an accepted command again changes nothing (the next instance does,
//! when its predecessor died before the ack).

use std::fs::File;

use arbitrary::{Result, Unstructured};
use shadowback_netback::vnet::ctrl::{execute, CtrlDevice};
use shadowback_virtio::net::OFFERED_FEATURES;
use shadowback_virtio::net_state::{
    rx_mode, NetDeviceState, NetStateArea, GUEST_OFFLOAD_BITS, MAC_TABLE_ENTRIES,
};

/// Most commands per input.
const MAX_COMMANDS: usize = 16;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = commands(&mut u);
}

fn commands(u: &mut Unstructured) -> Result<()> {
    let device = CtrlDevice {
        features: u.arbitrary::<u64>()? & OFFERED_FEATURES,
        max_pairs: u.int_in_range(1..=7)?,
    };
    let mut state = start_state(u, device)?;
    let area = area();
    for _ in 0..u.int_in_range(1..=MAX_COMMANDS)? {
        let bytes = command(u)?;
        let before = state.clone();
        match execute(&mut state, device, &bytes) {
            Err(_) => assert_eq!(state, before, "a refused command changed the state"),
            Ok(()) => {
                check(&state, device);
                let mut again = state.clone();
                assert!(
                    execute(&mut again, device, &bytes).is_ok(),
                    "an accepted command refused the second time"
                );
                assert_eq!(again, state, "a command executed twice did more");
                if let Some(file) = &area {
                    let copy = file.try_clone().expect("dup");
                    NetStateArea::create(copy, &state).expect("store");
                    assert_eq!(NetStateArea::read(file).expect("read"), state);
                }
            }
        }
        if u.is_empty() {
            break;
        }
    }
    Ok(())
}

/// A memfd for the device state area; `None` if none can be made (the
/// rest still runs).
fn area() -> Option<File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    memfd_create(c"fuzz-net-state", MemFdCreateFlag::MFD_CLOEXEC)
        .ok()
        .map(File::from)
}

/// What a backend may hold: the reset state or one a driver set.
fn start_state(u: &mut Unstructured, device: CtrlDevice) -> Result<NetDeviceState> {
    let mut mac: [u8; 6] = u.arbitrary()?;
    mac[0] &= !1;
    mac[5] |= 1;
    let mut state = NetDeviceState::initial(mac, device.features);
    if u.arbitrary()? {
        state.rx_mode = u.arbitrary::<u8>()? & rx_mode::KNOWN;
        state.offloads &= u.arbitrary::<u64>()?;
        state.unicast = macs(u)?;
        state.multicast = macs(u)?;
        state.pairs = u.int_in_range(1..=device.max_pairs)?;
    }
    Ok(state)
}

fn macs(u: &mut Unstructured) -> Result<Vec<[u8; 6]>> {
    let n = u.int_in_range(0..=MAC_TABLE_ENTRIES)?;
    (0..n).map(|_| u.arbitrary()).collect()
}

/// The invariants of a state a backend keeps.
fn check(s: &NetDeviceState, device: CtrlDevice) {
    assert_eq!(s.rx_mode & !rx_mode::KNOWN, 0, "{s:?}");
    assert!(s.unicast.len() <= MAC_TABLE_ENTRIES && s.multicast.len() <= MAC_TABLE_ENTRIES);
    assert_eq!(
        s.offloads & !(device.features & GUEST_OFFLOAD_BITS),
        0,
        "offloads not negotiated: {s:?}"
    );
    assert!((1..=device.max_pairs).contains(&s.pairs), "{s:?}");
    assert!(s.mac[0] & 1 == 0 && s.mac != [0; 6], "{s:?}");
}

/// A command as a driver would write it (known classes and commands,
/// data of the right shape or nearly), or raw bytes.
fn command(u: &mut Unstructured) -> Result<Vec<u8>> {
    let (class, cmd): (u8, u8) = *u.choose(&[
        (0, 0), // RX PROMISC
        (0, 1), // RX ALLMULTI
        (0, 2), // RX ALLUNI (not offered)
        (1, 0), // MAC TABLE_SET
        (1, 1), // MAC ADDR_SET
        (2, 0), // VLAN ADD (not offered)
        (3, 0), // ANNOUNCE ACK (not offered)
        (4, 0), // MQ VQ_PAIRS_SET
        (4, 1), // MQ RSS_CONFIG (not offered)
        (5, 0), // GUEST_OFFLOADS_SET
        (0xff, 0xff),
    ])?;
    let mut bytes = vec![class, cmd];
    match u.int_in_range(0..=3)? {
        0 => bytes.extend(u.arbitrary::<Vec<u8>>()?),
        _ => match (class, cmd) {
            (0, _) => bytes.push(u.arbitrary()?),
            (1, 0) => {
                for _ in 0..2 {
                    let entries = macs(u)?;
                    // A count that may lie about the entries that follow.
                    let count = if u.arbitrary()? {
                        u.arbitrary::<u32>()?
                    } else {
                        entries.len() as u32
                    };
                    bytes.extend(count.to_le_bytes());
                    bytes.extend(entries.iter().flatten());
                }
            }
            (1, 1) => bytes.extend(u.arbitrary::<[u8; 6]>()?),
            (4, 0) => bytes.extend(u.int_in_range(0u16..=9)?.to_le_bytes()),
            (5, 0) => bytes.extend(u.arbitrary::<u64>()?.to_le_bytes()),
            _ => bytes.extend(u.arbitrary::<Vec<u8>>()?),
        },
    }
    Ok(bytes)
}
