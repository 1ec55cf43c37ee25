//! A vhost-user-net data plane against a minimal split-ring driver, with
//! the test acting as the supervisor: it holds the guest memory, the
//! eventfds, the cable and one shadow log per virtqueue, starts
//! `shadowback netback` processes, hands them the device with
//! `attach-virtio` (docs/PROTOCOL.md §6b) and kills them while frames
//! arrive. A frame the dying instance had taken from the wire and not
//! delivered is lost, as on any NIC, and the next instance counts it in
//! `rx-dropped-in-crash`, once (docs/ARCHITECTURE.md §11.6).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use shadowback_netback::wire::{
    cable_pair, CableConfig, SendOutcome, VnetHeader, VnetHeaderLen, Wire, WireKind,
};
use shadowback_ring::{EventChannel, SharedRegion};
use shadowback_shadow::{EntryState, ShadowLog};
use shadowback_xenbus::virtio::{MemoryRegion, QueueConfig, VirtioAttachRequest};
use shadowback_xenbus::Message;

mod netback_common;
use netback_common::{check_frame, frame, NetbackProcess, REPLY_TIMEOUT};

const SIZE: u16 = 256;
/// Guest memory: 4 MiB at guest-physical 0.
const PAGES: u32 = 1024;
const PAGE: u64 = 4096;
/// The receive queue (0) and the transmit queue (1): descriptor table,
/// available and used rings.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x4000, 0x5000, 0x6000)];
/// Receive head `h` owns one buffer at `RX_BUFS + h * PAGE`.
const RX_BUFS: u64 = 0x10000;
const RX_BUF_LEN: u32 = 2048;
const F_WRITE: u16 = 2;
/// `VIRTIO_F_VERSION_1` only: a 12-byte header, one head per frame.
const FEATURES: u64 = 1 << 32;
const HDR: usize = 12;

/// What outlives data-plane instances: the driver's side of the device and
/// what the supervisor holds for it.
struct Device {
    mem: SharedRegion,
    /// Per queue: kick, call.
    events: Vec<(EventChannel, EventChannel)>,
    logs: Vec<ShadowLog>,
    /// The data plane's end of the cable, lent to each instance.
    wire: OwnedFd,
    /// The far end, played by the test.
    peer: Wire,
    rx_avail: u16,
    rx_used: u16,
}

impl Device {
    fn new() -> Self {
        let [wire, peer] = cable_pair(CableConfig::default()).unwrap();
        Device {
            mem: SharedRegion::create("vnet-recovery", PAGES).unwrap(),
            events: (0..2)
                .map(|_| (EventChannel::new().unwrap(), EventChannel::new().unwrap()))
                .collect(),
            logs: (0..2)
                .map(|_| ShadowLog::create(u32::from(SIZE)).unwrap())
                .collect(),
            wire,
            peer: Wire::from_fd(WireKind::Cable, peer, VnetHeaderLen::Basic).unwrap(),
            rx_avail: 0,
            rx_used: 0,
        }
    }

    /// Sends `attach-virtio` (`recover`: after a death) and returns the
    /// `attached` answer.
    fn attach(&self, backend: &NetbackProcess, recover: bool) -> Message {
        let req = VirtioAttachRequest {
            frontend: "test-vm".into(),
            features: FEATURES,
            regions: vec![MemoryRegion {
                gpa: 0,
                size: u64::from(PAGES) * PAGE,
                mmap_offset: 0,
            }],
            queues: RINGS
                .iter()
                .enumerate()
                .map(|(i, &(desc, avail, used))| QueueConfig {
                    index: i as u16,
                    size: SIZE,
                    desc,
                    avail,
                    used,
                    next_avail: 0,
                })
                .collect(),
            inflight: None,
            wire: Some("cable".into()),
            wire_queues: 1,
            queue_pairs: 1,
            device_state: false,
            shadow: true,
        };
        let msg = req
            .to_message()
            .with("recover", u8::from(recover))
            // 0: killed from outside, not the requests' fault.
            .with("blame", 0u8);
        let events: Vec<(OwnedFd, OwnedFd)> = self
            .events
            .iter()
            .map(|(k, c)| (k.try_clone_fd().unwrap(), c.try_clone_fd().unwrap()))
            .collect();
        let mut fds = vec![self.mem.file().as_fd()];
        for (kick, call) in &events {
            fds.push(kick.as_fd());
            fds.push(call.as_fd());
        }
        fds.push(self.wire.as_fd());
        fds.extend(self.logs.iter().map(|l| l.file().as_fd()));
        backend.attach(&msg, &fds)
    }

    /// Posts receive heads `heads` (one writable buffer each) and kicks.
    fn post_rx(&mut self, heads: std::ops::Range<u16>) {
        let (desc, avail, _) = RINGS[0];
        for head in heads {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&(RX_BUFS + u64::from(head) * PAGE).to_le_bytes());
            d[8..12].copy_from_slice(&RX_BUF_LEN.to_le_bytes());
            d[12..14].copy_from_slice(&F_WRITE.to_le_bytes());
            self.mem.write(desc + 16 * u64::from(head), &d).unwrap();
            let at = avail + 4 + 2 * u64::from(self.rx_avail % SIZE);
            self.mem.write(at, &head.to_le_bytes()).unwrap();
            self.rx_avail = self.rx_avail.wrapping_add(1);
        }
        self.mem
            .write(avail + 2, &self.rx_avail.to_le_bytes())
            .unwrap();
        self.events[0].0.notify().unwrap();
    }

    /// Sends frame `seq` on the cable, towards the guest.
    fn send(&mut self, seq: u32) {
        let mut out = vec![0u8; VnetHeaderLen::Basic.bytes()];
        VnetHeader::plain()
            .encode(&mut out, VnetHeaderLen::Basic)
            .unwrap();
        out.extend(frame(seq, 60 + (seq as usize * 97) % 1400));
        assert_eq!(self.peer.send(&out).unwrap(), SendOutcome::Sent);
    }

    /// The sequence numbers of the frames in the used elements published
    /// since the last call, each frame checked byte for byte.
    fn reap(&mut self) -> Vec<u32> {
        let (_, _, used) = RINGS[0];
        let mut idx = [0u8; 2];
        self.mem.read(used + 2, &mut idx).unwrap();
        let idx = u16::from_le_bytes(idx);
        let mut seqs = Vec::new();
        while self.rx_used != idx {
            let mut elem = [0u8; 8];
            let at = used + 4 + 8 * u64::from(self.rx_used % SIZE);
            self.mem.read(at, &mut elem).unwrap();
            self.rx_used = self.rx_used.wrapping_add(1);
            let head = u32::from_le_bytes(elem[..4].try_into().unwrap());
            let len = u32::from_le_bytes(elem[4..].try_into().unwrap()) as usize;
            assert!(head < u32::from(SIZE), "used head {head}");
            assert!(len > HDR, "head {head} used with {len} bytes");
            let mut buf = vec![0u8; len];
            self.mem
                .read(RX_BUFS + u64::from(head) * PAGE, &mut buf)
                .unwrap();
            seqs.push(check_frame(&buf[HDR..]));
        }
        seqs
    }

    /// Reaps until `want` frames were received in all (`got` so far).
    fn reap_until(&mut self, got: &mut Vec<u32>, want: usize) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "{} of {want} frames received: {got:?}",
                got.len()
            );
            got.extend(self.reap());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Receive-queue entries in flight and marked (`RX_TAKEN`).
    fn marked(&self) -> usize {
        let snap = self.logs[0].snapshot().unwrap();
        snap.entries
            .iter()
            .filter(|e| e.state() == Some(EntryState::Inflight) && e.progress != 0)
            .count()
    }
}

fn dropped(attached: &Message) -> u64 {
    attached
        .get_u64("rx-dropped-in-crash")
        .unwrap()
        .unwrap_or_else(|| panic!("no rx-dropped-in-crash in {attached:?}"))
}

/// Sends `frames` frames on the cable, then posts `heads` receive heads to
/// a data plane that aborts as it logs the 4th frame's used element
/// (`complete.0@4`): it has taken that frame from the wire and written it
/// into a head. Its successor is attached and must report exactly that
/// frame and leave no mark; the other frames taken so far are reaped.
/// Returns the successor, the frames received and the count reported.
fn die_while_delivering(
    dev: &mut Device,
    frames: u32,
    heads: u16,
) -> (NetbackProcess, Vec<u32>, u64) {
    let mut backend = NetbackProcess::spawn(&[("SHADOWBACK_CRASH_AT", "complete.0@4".into())]);
    assert_eq!(dropped(&dev.attach(&backend, false)), 0);
    // No head posted yet: the frames wait on the wire.
    for seq in 0..frames {
        dev.send(seq);
    }
    dev.post_rx(0..heads);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let status = loop {
        if let Some(status) = backend.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the data plane never reached complete.0@4"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        !status.success(),
        "the data plane exited on its own: {status}"
    );
    assert_eq!(dev.marked(), 1, "the head the lost frame was written to");
    backend = NetbackProcess::spawn(&[]);
    let attached = dev.attach(&backend, true);
    let reported = dropped(&attached);
    assert_eq!(reported, 1, "{attached:?}");
    assert_eq!(dev.marked(), 0, "the mark outlived its count");
    let mut got = Vec::new();
    dev.reap_until(&mut got, frames.min(u32::from(heads)) as usize - 1);
    (backend, got, reported)
}

/// Frames wait on the cable when receive heads are posted: they are
/// written into heads one at a time, each frame's used element logged
/// before the next is read. A data plane dying as it logs the 4th frame's
/// loses that frame and no other; its successor reports exactly it in
/// `rx-dropped-in-crash` and delivers the rest, in order. A successor
/// killed (SIGKILL) with nothing taken counts nothing, and the next one
/// serves the head left.
#[test]
fn a_vhost_user_net_data_plane_dying_while_frames_arrive_counts_the_frame_it_lost() {
    const FRAMES: u32 = 16;
    let mut dev = Device::new();
    let (mut backend, mut got, mut reported) =
        die_while_delivering(&mut dev, FRAMES, FRAMES as u16 + 1);
    backend.kill_in_place();
    backend = NetbackProcess::spawn(&[]);
    reported += dropped(&dev.attach(&backend, true));
    dev.send(FRAMES);
    dev.reap_until(&mut got, FRAMES as usize);
    backend.kill_in_place();

    let sent = u64::from(FRAMES) + 1;
    assert_eq!(
        sent - got.len() as u64,
        reported,
        "frames the driver never got vs rx-dropped-in-crash: {got:?}"
    );
    let expected: Vec<u32> = (0..=FRAMES).filter(|&s| s != 3).collect();
    assert_eq!(got, expected, "in order, once each, only the 4th lost");
}

/// The head the lost frame was written to goes back to the pool unmarked:
/// a successor killed (SIGKILL) while it is still there, nothing taken
/// from the wire, leaves the next instance nothing to count, and that
/// head takes the next frame.
#[test]
fn a_frame_lost_in_a_crash_is_not_counted_again_by_the_next_death() {
    const FRAMES: u32 = 4;
    let mut dev = Device::new();
    let (mut backend, mut got, mut reported) = die_while_delivering(&mut dev, FRAMES, 8);
    backend.kill_in_place();
    backend = NetbackProcess::spawn(&[]);
    let attached = dev.attach(&backend, true);
    assert_eq!(dropped(&attached), 0, "counted again: {attached:?}");
    reported += dropped(&attached);
    for seq in FRAMES..FRAMES + 2 {
        dev.send(seq);
    }
    dev.reap_until(&mut got, FRAMES as usize + 1);
    backend.kill_in_place();

    let sent = u64::from(FRAMES) + 2;
    assert_eq!(
        sent - got.len() as u64,
        reported,
        "frames the driver never got vs rx-dropped-in-crash: {got:?}"
    );
    assert_eq!(
        got,
        [0, 1, 2, 4, 5],
        "in order, once each, only the 4th lost"
    );
}
