//! What an operator does on a supervisor's control socket, for tests that
//! run a real supervisor: `fault kill` and `status` (docs/PROTOCOL.md §6a).

use std::path::Path;
use std::time::Duration;

use shadowback_supervisor::DeviceStats;
use shadowback_xenbus::protocol::kind;
use shadowback_xenbus::{Message, SeqPacket};

/// How long the supervisor may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// `fault kill` for `device`. False when the supervisor answers `EBUSY`:
/// the instance the last kill hit has not been found dead and replaced yet,
/// so this kill would be no crash of its own (docs/PROTOCOL.md §6a);
/// panics on any other answer but `ok`.
pub fn fault_kill(socket: &Path, device: &str) -> bool {
    let control = SeqPacket::connect(socket).expect("control socket");
    let msg = Message::new(kind::FAULT)
        .with("device", device)
        .with("action", "kill");
    control.send(&msg, &[]).unwrap();
    let (reply, _) = control
        .recv_timeout(REPLY_TIMEOUT)
        .expect("control socket")
        .expect("an answer to fault");
    if reply.kind() == kind::ERROR && reply.get("code") == Some("EBUSY") {
        return false;
    }
    assert_eq!(reply.kind(), kind::OK, "fault kill {device}: {reply:?}");
    true
}

/// `status`: every device's counters, by name.
pub fn status(socket: &Path) -> Vec<(String, DeviceStats)> {
    let control = SeqPacket::connect(socket).expect("control socket");
    control.send(&Message::new(kind::STATUS), &[]).unwrap();
    let mut devices = Vec::new();
    loop {
        let (msg, _) = control
            .recv_timeout(REPLY_TIMEOUT)
            .expect("control socket")
            .expect("an answer to status");
        if msg.kind() == kind::STATUS_END {
            return devices;
        }
        devices.push(DeviceStats::from_message(&msg).expect("a status message"));
    }
}

/// `status` of one device; panics if the supervisor lists no such device.
pub fn stats_of(socket: &Path, device: &str) -> DeviceStats {
    status(socket)
        .into_iter()
        .find(|(name, _)| name == device)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("status lists no {device}"))
}
