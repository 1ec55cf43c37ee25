//! A hostile vhost-user-net driver against a real supervisor
//! (docs/PROTOCOL.md §4.8, docs/ARCHITECTURE.md §8.1): every malformed
//! descriptor chain, header and ring index a driver can hand the transmit
//! and receive virtqueues of vif `evil`, while two netfronts stream
//! checksummed TCP over `gooda` ↔ `goodb` and a verifying raw netif guest
//! sits on `peer`, the far end of `evil`'s cable.
//!
//! After each case: the documented outcome (the head used with length 0
//! and nothing sent, or — for a broken ring — the VMM's vhost-user
//! connection closed, after which a new one is served), `evil`'s backend
//! the same process with no crash, `evil` still sending a verified frame
//! to `peer` and receiving one from it, no refused frame ever on the wire,
//! the good stream moving with no error, reset or changed byte, and the
//! supervisor answering `status` with every bystander untouched.
//!
//! The transmit cases run again with `evil` on a TAP, where valid frames
//! are written in batches straight from the driver's buffers: a packet
//! socket on the TAP sees exactly the valid frames.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::vhost_user::memory::DmaBuffer;
use shadowback_guest::vhost_user::{GuestRam, TransportOptions, VhostUserTransport};
use shadowback_ring::netif::NETIF_RSP_OKAY;
use shadowback_testsupport::operator::stats_of;
use virtio_drivers::transport::{DeviceStatus, Transport};

mod net_hostile_common;
mod netback_common;
use net_hostile_common::*;

const RX: u16 = 0;
const TX: u16 = 1;
const QUEUE_SIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const VERSION_1: u64 = 1 << 32;
const INDIRECT_DESC: u64 = 1 << 28;
const MRG_RXBUF: u64 = 1 << 15;
/// `virtio_net_hdr_mrg_rxbuf`, the header with VERSION_1.
const HDR: usize = 12;
const RAM_BYTES: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// Refused frames carry sequence numbers from here: the peer must never
/// see one.
const REFUSED_SEQ: u32 = 1_000_000;

/// One split virtqueue in guest RAM, written by the test.
struct Queue {
    mem: DmaBuffer,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    fn desc(&self) -> u64 {
        self.mem.gpa()
    }
    fn avail(&self) -> u64 {
        self.mem.gpa() + PAGE
    }
    fn used(&self) -> u64 {
        self.mem.gpa() + 2 * PAGE
    }
}

/// A virtio-net driver whose every descriptor and index the test writes.
struct RawVnet {
    ram: &'static GuestRam,
    t: VhostUserTransport,
    rx: Queue,
    tx: Queue,
    /// Buffer pages: 0..256 for transmit, 256..512 for receive.
    bufs: DmaBuffer,
}

impl RawVnet {
    fn connect(path: &Path) -> Self {
        Self::connect_with(path, 0)
    }

    /// Connects acking VERSION_1, INDIRECT_DESC and `more` features.
    fn connect_with(path: &Path, more: u64) -> Self {
        let ram = GuestRam::global(RAM_BYTES).expect("guest RAM");
        let mut t = VhostUserTransport::connect(
            path,
            TransportOptions {
                queues: 2,
                queue_size: QUEUE_SIZE,
                connect_timeout: Duration::from_secs(5),
                reply_timeout: REPLY_TIMEOUT,
                config_bytes: 12,
            },
            ram,
        )
        .expect("vhost-user connect");
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let wanted = VERSION_1 | INDIRECT_DESC | more;
        let acked = t.read_device_features() & wanted;
        assert_eq!(acked, wanted, "features offered");
        t.write_driver_features(acked);
        let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        t.set_status(ok);
        let queue = |t: &mut VhostUserTransport, index: u16| {
            let mem = ram.alloc(3 * PAGE).expect("queue memory");
            let q = Queue {
                mem,
                avail_idx: 0,
                last_used: 0,
            };
            t.queue_set(index, u32::from(QUEUE_SIZE), q.desc(), q.avail(), q.used());
            q
        };
        let rx = queue(&mut t, RX);
        let tx = queue(&mut t, TX);
        t.set_status(ok | DeviceStatus::DRIVER_OK);
        t.take_error().expect("queue set-up");
        let bufs = ram.alloc(512 * PAGE).expect("buffers");
        RawVnet {
            ram,
            t,
            rx,
            tx,
            bufs,
        }
    }

    fn queue(&mut self, q: u16) -> &mut Queue {
        if q == TX {
            &mut self.tx
        } else {
            &mut self.rx
        }
    }

    /// Guest address of buffer page `page`.
    fn buf(&self, page: u64) -> u64 {
        self.bufs.gpa() + page * PAGE
    }

    /// Writes descriptor `i` of the table at `table`.
    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.ram
            .write(table + 16 * u64::from(i), &d)
            .expect("descriptor");
    }

    /// Writes descriptor `i` of queue `q`'s table.
    fn desc(&self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let table = if q == TX {
            self.tx.desc()
        } else {
            self.rx.desc()
        };
        self.write_desc(table, i, addr, len, flags, next);
    }

    /// Makes `head` available on queue `q` and kicks.
    fn make_available(&mut self, q: u16, head: u16) {
        let ram = self.ram;
        let queue = self.queue(q);
        let slot = u64::from(queue.avail_idx % QUEUE_SIZE);
        ram.write(queue.avail() + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        // Release: the ring entry before the index (§2.7.13).
        ram.store(queue.avail() + 2, queue.avail_idx, Ordering::Release)
            .unwrap();
        self.t.kick(q).unwrap();
    }

    /// Moves queue `q`'s avail index `ahead` entries past the used index
    /// and kicks: no driver can have that many heads out.
    fn avail_ahead(&mut self, q: u16, ahead: u16) {
        let ram = self.ram;
        let queue = self.queue(q);
        let used: u16 = ram.load(queue.used() + 2, Ordering::Acquire).unwrap();
        ram.store(
            queue.avail() + 2,
            used.wrapping_add(ahead),
            Ordering::Release,
        )
        .unwrap();
        self.t.kick(q).unwrap();
    }

    /// The next used element of queue `q`, if one is published.
    fn take_used(&mut self, q: u16) -> Option<(u32, u32)> {
        let ram = self.ram;
        let queue = self.queue(q);
        let idx: u16 = ram.load(queue.used() + 2, Ordering::Acquire).unwrap();
        if idx == queue.last_used {
            return None;
        }
        let elem = queue.used() + 4 + 8 * u64::from(queue.last_used % QUEUE_SIZE);
        queue.last_used = queue.last_used.wrapping_add(1);
        let id: u32 = ram.load(elem, Ordering::Relaxed).unwrap();
        let len: u32 = ram.load(elem + 4, Ordering::Relaxed).unwrap();
        Some((id, len))
    }

    /// Waits for the next used element of queue `q`.
    fn wait_used(&mut self, q: u16, what: &str) -> (u32, u32) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(u) = self.take_used(q) {
                return u;
            }
            assert!(Instant::now() < deadline, "{what}: no used element");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Asserts queue `q` publishes nothing within `wait`.
    fn assert_no_used(&mut self, q: u16, wait: Duration, what: &str) {
        thread::sleep(wait);
        assert_eq!(self.take_used(q), None, "{what}");
    }

    /// Writes a header and `frame` into transmit page `page`; returns its
    /// address and length.
    fn tx_data(&self, page: u64, frame: &[u8]) -> (u64, u32) {
        let addr = self.buf(page);
        self.ram.write(addr, &[0u8; HDR]).unwrap();
        self.ram.write(addr + HDR as u64, frame).unwrap();
        (addr, (HDR + frame.len()) as u32)
    }

    /// Sends `frame` from head 0 (one descriptor) and waits for its used
    /// element.
    fn send(&mut self, frame: &[u8]) {
        let (addr, len) = self.tx_data(0, frame);
        self.desc(TX, 0, addr, len, 0, 0);
        self.make_available(TX, 0);
        assert_eq!(self.wait_used(TX, "a valid frame"), (0, 0));
    }

    /// Posts receive head `head`: one device-writable buffer of `len`
    /// bytes in receive page `head`.
    fn post(&mut self, head: u16, len: u32) {
        let addr = self.buf(256 + u64::from(head));
        self.desc(RX, head, addr, len, F_WRITE, 0);
        self.make_available(RX, head);
    }

    /// The frame in receive head `head` used with `len` bytes: one buffer,
    /// `num_buffers` 1.
    fn received(&self, head: u32, len: u32) -> Vec<u8> {
        assert!(len as usize >= HDR + 14, "used length {len}");
        let mut data = vec![0u8; len as usize];
        self.ram
            .read(self.buf(256 + u64::from(head)), &mut data)
            .unwrap();
        assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
        data.split_off(HDR)
    }

    /// Waits for the supervisor to close this VMM's connection.
    fn expect_hangup(&self, what: &str) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while !self.t.peer_gone().unwrap_or(true) {
            assert!(
                Instant::now() < deadline,
                "{what}: the connection stayed open"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Sequence numbers of the frames `evil` sends and receives.
struct Seqs {
    tx: u32,
    rx: u32,
}

/// Checks after every case, and the reconnect after a broken ring.
fn after_case(
    what: &str,
    fatal: bool,
    evil: RawVnet,
    pid: Option<u32>,
    h: &Harness<'_>,
    seqs: &mut Seqs,
    peer: &mut Peer,
) -> RawVnet {
    let mut evil = if fatal {
        evil.expect_hangup(what);
        drop(evil);
        RawVnet::connect(h.vhost)
    } else {
        assert!(
            !evil.t.peer_gone().unwrap(),
            "{what}: the connection closed"
        );
        evil
    };
    let s = stats_of(h.socket, "evil");
    assert_eq!(s.pid, pid, "{what}: evil's backend changed: {s:?}");
    assert_eq!(
        (s.crashes, s.hangs, s.given_up),
        (0, 0, false),
        "{what}: {s:?}"
    );
    // Transmit: the next valid frame, and nothing refused, reaches the peer.
    let seq = seqs.tx;
    seqs.tx += 1;
    evil.send(&frame(seq, 200));
    peer.expect(seq);
    assert_eq!(
        peer.received,
        (0..seqs.tx).collect::<Vec<_>>(),
        "{what}: the peer saw a refused frame, or lost one"
    );
    // Receive: a posted head gets the peer's next frame.
    let rseq = 2 * REFUSED_SEQ + seqs.rx;
    seqs.rx += 1;
    evil.post(0, 2048);
    peer.guest.send(&frame(rseq, 300), 1, NETIF_RSP_OKAY);
    let (id, len) = evil.wait_used(RX, what);
    assert_eq!(id, 0, "{what}");
    assert_eq!(check_frame(&evil.received(id, len)), rseq, "{what}");
    h.good.assert_moving(what);
    h.bystanders.assert_untouched(what);
    evil
}

struct Harness<'a> {
    socket: &'a Path,
    vhost: &'a Path,
    good: &'a GoodStream,
    bystanders: &'a Bystanders,
}

/// A transmit case: writes its chain (head 0) and makes it available.
type TxCase = (&'static str, fn(&mut RawVnet, u32));

fn tx_cases() -> Vec<TxCase> {
    vec![
        ("a descriptor loop", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            v.desc(TX, 0, a, l, F_NEXT, 1);
            v.desc(TX, 1, a, 8, F_NEXT, 0);
        }),
        (
            "a chain longer than the queue (indirect, 300 descriptors)",
            |v, seq| {
                let (a, _) = v.tx_data(0, &frame(seq, 100));
                let table = v.buf(100);
                for i in 0..300u16 {
                    v.write_desc(table, i, a, 4, if i < 299 { F_NEXT } else { 0 }, i + 1);
                }
                v.desc(TX, 0, table, 300 * 16, F_INDIRECT, 0);
            },
        ),
        ("an indirect table of length 0", |v, _| {
            v.desc(TX, 0, v.buf(100), 0, F_INDIRECT, 0);
        }),
        ("an indirect table of 20 bytes", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            v.write_desc(v.buf(100), 0, a, l, 0, 0);
            v.desc(TX, 0, v.buf(100), 20, F_INDIRECT, 0);
        }),
        ("an indirect table larger than any queue", |v, _| {
            v.desc(TX, 0, v.buf(100), 16 * 32769, F_INDIRECT, 0);
        }),
        ("an indirect descriptor with NEXT", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            v.write_desc(v.buf(100), 0, a, l, 0, 0);
            v.desc(TX, 0, v.buf(100), 16, F_INDIRECT | F_NEXT, 1);
            v.desc(TX, 1, a, l, 0, 0);
        }),
        ("an indirect table outside guest memory", |v, _| {
            v.desc(TX, 0, RAM_BYTES + PAGE, 16, F_INDIRECT, 0);
        }),
        ("an indirect descriptor inside an indirect table", |v, _| {
            let table = v.buf(100);
            v.write_desc(table, 0, table, 16, F_INDIRECT, 0);
            v.desc(TX, 0, table, 16, F_INDIRECT, 0);
        }),
        (
            "an indirect entry whose next is past its table",
            |v, seq| {
                let (a, l) = v.tx_data(0, &frame(seq, 100));
                v.write_desc(v.buf(100), 0, a, l, F_NEXT, 1);
                v.desc(TX, 0, v.buf(100), 16, F_INDIRECT, 0);
            },
        ),
        ("a next index beyond the queue", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            v.desc(TX, 0, a, l, F_NEXT, QUEUE_SIZE + 3);
        }),
        ("a buffer outside guest memory", |v, _| {
            v.desc(TX, 0, RAM_BYTES + PAGE, 200, 0, 0);
        }),
        ("a buffer whose end wraps the address space", |v, _| {
            v.desc(TX, 0, u64::MAX - 16, 200, 0, 0);
        }),
        ("a chain shorter than the virtio-net header", |v, seq| {
            let (a, _) = v.tx_data(0, &frame(seq, 100));
            v.desc(TX, 0, a, 8, 0, 0);
        }),
        ("a frame under 14 bytes after the header", |v, seq| {
            let (a, _) = v.tx_data(0, &frame(seq, 100));
            v.desc(TX, 0, a, (HDR + 13) as u32, 0, 0);
        }),
        ("a device-writable buffer on transmit", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            v.desc(TX, 0, a, l, F_NEXT, 1);
            v.desc(TX, 1, v.buf(1), 100, F_WRITE, 0);
        }),
        ("a frame over 65535 bytes", |v, seq| {
            let (a, _) = v.tx_data(0, &frame(seq, 100));
            let table = v.buf(100);
            for i in 0..17u16 {
                v.write_desc(table, i, a, 4096, if i < 16 { F_NEXT } else { 0 }, i + 1);
            }
            v.desc(TX, 0, table, 17 * 16, F_INDIRECT, 0);
        }),
        ("a segmentation header (no TSO offered)", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            // gso_type TCPV4, gso_size 1400.
            v.ram.write(a + 1, &[1]).unwrap();
            v.ram.write(a + 4, &1400u16.to_le_bytes()).unwrap();
            v.desc(TX, 0, a, l, 0, 0);
        }),
        ("a partial checksum without CSUM acked", |v, seq| {
            let (a, l) = v.tx_data(0, &frame(seq, 100));
            // NEEDS_CSUM, csum_start 14, csum_offset 16.
            v.ram.write(a, &[1]).unwrap();
            v.ram.write(a + 6, &14u16.to_le_bytes()).unwrap();
            v.ram.write(a + 8, &16u16.to_le_bytes()).unwrap();
            v.desc(TX, 0, a, l, 0, 0);
        }),
    ]
}

#[test]
fn a_hostile_virtio_net_driver_hurts_only_its_own_vif() {
    let setup = start("vnet-hostile", true);
    let socket = setup.socket.clone();
    let vhost = setup.vhost.clone();
    let good = GoodStream::start(&socket);
    let mut peer = Peer::attach(&socket);
    let mut evil = RawVnet::connect(&vhost);
    good.assert_moving("the start");
    let bystanders = Bystanders::record(&socket);
    let h = Harness {
        socket: &socket,
        vhost: &vhost,
        good: &good,
        bystanders: &bystanders,
    };
    let mut seqs = Seqs { tx: 0, rx: 0 };
    let wait_attached = || {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let s = stats_of(&socket, "evil");
            if s.connected && s.pid.is_some() {
                return s.pid;
            }
            assert!(Instant::now() < deadline, "evil never attached: {s:?}");
            thread::sleep(Duration::from_millis(5));
        }
    };
    let pid = wait_attached();
    evil = after_case("nothing", false, evil, pid, &h, &mut seqs, &mut peer);

    // ---- transmit: each bad chain used with length 0, nothing sent -------
    for (i, (what, build)) in tx_cases().into_iter().enumerate() {
        eprintln!("case: {what}");
        build(&mut evil, REFUSED_SEQ + i as u32);
        evil.make_available(TX, 0);
        assert_eq!(evil.wait_used(TX, what), (0, 0), "{what}");
        evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);
    }

    // ---- receive: bad heads given back at once or when a frame comes -----
    let what = "a device-readable buffer on receive";
    eprintln!("case: {what}");
    evil.desc(RX, 5, evil.buf(256 + 5), 2048, 0, 0);
    evil.make_available(RX, 5);
    assert_eq!(evil.wait_used(RX, what), (5, 0), "{what}");
    evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);

    for (what, head, addr, len, flags, next) in [
        (
            "a receive descriptor loop",
            6u16,
            0u64,
            2048u32,
            F_WRITE | F_NEXT,
            6u16,
        ),
        (
            "a receive indirect table of 20 bytes",
            7,
            0,
            20,
            F_INDIRECT,
            0,
        ),
        ("a receive buffer of 4 bytes", 8, 0, 4, F_WRITE, 0),
        (
            "a receive buffer that holds no frame",
            9,
            0,
            (HDR + 13) as u32,
            F_WRITE,
            0,
        ),
    ] {
        eprintln!("case: {what}");
        let addr = if addr == 0 {
            evil.buf(256 + u64::from(head))
        } else {
            addr
        };
        evil.desc(RX, head, addr, len, flags, next);
        evil.make_available(RX, head);
        assert_eq!(evil.wait_used(RX, what), (u32::from(head), 0), "{what}");
        evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);
    }

    // A buffer outside guest memory takes the next frame (lost), the next
    // buffer the frame after it.
    let what = "a receive buffer outside guest memory";
    eprintln!("case: {what}");
    evil.desc(RX, 10, RAM_BYTES + PAGE, 2048, F_WRITE, 0);
    evil.make_available(RX, 10);
    evil.post(11, 2048);
    evil.assert_no_used(RX, Duration::from_millis(20), what);
    peer.guest
        .send(&frame(3 * REFUSED_SEQ, 300), 1, NETIF_RSP_OKAY);
    assert_eq!(evil.wait_used(RX, what), (10, 0), "{what}");
    peer.guest
        .send(&frame(3 * REFUSED_SEQ + 1, 300), 1, NETIF_RSP_OKAY);
    let (id, len) = evil.wait_used(RX, what);
    assert_eq!(id, 11, "{what}");
    assert_eq!(check_frame(&evil.received(id, len)), 3 * REFUSED_SEQ + 1);
    evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);

    // A buffer too small for a frame keeps its place: that frame is
    // dropped, the next one that fits goes there.
    let what = "a receive buffer too small for the frame";
    eprintln!("case: {what}");
    evil.post(12, (HDR + 40) as u32);
    evil.post(13, 2048);
    peer.guest
        .send(&frame(3 * REFUSED_SEQ + 2, 300), 1, NETIF_RSP_OKAY);
    evil.assert_no_used(RX, Duration::from_millis(20), what);
    peer.guest
        .send(&frame(3 * REFUSED_SEQ + 3, 40), 1, NETIF_RSP_OKAY);
    let (id, len) = evil.wait_used(RX, what);
    assert_eq!(id, 12, "{what}");
    assert_eq!(check_frame(&evil.received(id, len)), 3 * REFUSED_SEQ + 3);
    peer.guest
        .send(&frame(3 * REFUSED_SEQ + 4, 300), 1, NETIF_RSP_OKAY);
    let (id, len) = evil.wait_used(RX, what);
    assert_eq!(id, 13, "{what}");
    assert_eq!(check_frame(&evil.received(id, len)), 3 * REFUSED_SEQ + 4);
    evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);

    // One head made available twice: used twice, each time with the
    // frame it then holds.
    let what = "a receive head made available twice";
    eprintln!("case: {what}");
    evil.post(14, 2048);
    evil.make_available(RX, 14);
    for k in 5..7 {
        peer.guest
            .send(&frame(3 * REFUSED_SEQ + k, 300), 1, NETIF_RSP_OKAY);
        let (id, len) = evil.wait_used(RX, what);
        assert_eq!(id, 14, "{what}");
        assert_eq!(check_frame(&evil.received(id, len)), 3 * REFUSED_SEQ + k);
    }
    evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);

    // No head posted while 16 MiB wait to be sent to it: the cable fills
    // and the peer's backend holds the peer's TX back; nothing in either
    // backend grows; once heads come every frame is delivered, in order.
    let what = "no receive heads posted while 16 MiB wait to be sent to it";
    eprintln!("case: {what}");
    let peer_pid = stats_of(&socket, "peer").pid.expect("the peer's backend");
    let blast = blast_at_silent_vif(&mut peer, [pid.expect("evil's backend"), peer_pid], what);
    for head in 0..QUEUE_SIZE {
        evil.post(head, 2048);
    }
    drain_blast(&mut peer, blast, what, || {
        let (id, len) = evil.wait_used(RX, what);
        let seq = check_frame(&evil.received(id, len));
        evil.post(id as u16, 2048);
        seq
    });
    h.good.assert_moving(what);
    h.bystanders.assert_untouched(what);
    // Every receive head is posted now: the ring is full.
    let what = "a receive avail index more than a ring ahead of the used index";
    eprintln!("case: {what}");
    thread::sleep(Duration::from_millis(20));
    evil.avail_ahead(RX, QUEUE_SIZE + 1);
    evil = after_case(what, true, evil, pid, &h, &mut seqs, &mut peer);

    // ---- broken rings: the VMM's connection is closed ----------------------
    let what = "a transmit avail index more than a ring ahead";
    eprintln!("case: {what}");
    evil.avail_ahead(TX, QUEUE_SIZE + 1);
    evil = after_case(what, true, evil, pid, &h, &mut seqs, &mut peer);

    for (what, q) in [
        ("a transmit head out of range", TX),
        ("a receive head out of range", RX),
    ] {
        eprintln!("case: {what}");
        evil.make_available(q, QUEUE_SIZE + 44);
        evil = after_case(what, true, evil, pid, &h, &mut seqs, &mut peer);
    }

    // With MRG_RXBUF a buffer needs only hold the header: a smaller one
    // goes back at once, one of the header's size starts a merged frame.
    let what = "with MRG_RXBUF, a receive buffer of 4 bytes";
    eprintln!("case: {what}");
    drop(evil);
    evil = RawVnet::connect_with(&vhost, MRG_RXBUF);
    evil.post(20, 4);
    assert_eq!(evil.wait_used(RX, what), (20, 0), "{what}");
    evil.post(21, HDR as u32);
    evil.post(22, 2048);
    peer.guest
        .send(&frame(3 * REFUSED_SEQ + 7, 300), 1, NETIF_RSP_OKAY);
    assert_eq!(evil.wait_used(RX, what), (21, HDR as u32), "{what}");
    let mut hdr = [0u8; HDR];
    evil.ram.read(evil.buf(256 + 21), &mut hdr).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 2, "num_buffers");
    assert_eq!(evil.wait_used(RX, what), (22, 300), "{what}");
    let mut data = vec![0u8; 300];
    evil.ram.read(evil.buf(256 + 22), &mut data).unwrap();
    assert_eq!(check_frame(&data), 3 * REFUSED_SEQ + 7);
    evil = after_case(what, false, evil, pid, &h, &mut seqs, &mut peer);

    let moved = good.finish();
    eprintln!("the good stream moved {moved} bytes during the cases");
    drop(evil);
    let s = stats_of(&socket, "evil");
    assert_eq!((s.crashes, s.hangs, s.given_up), (0, 0, false), "{s:?}");
    setup.sup.stop().expect("supervisor stop");
}

/// The frames of the test's EtherType a packet socket on a TAP has seen,
/// by sequence number, each checked byte for byte.
struct TapSeen {
    sock: std::os::fd::OwnedFd,
    seqs: Vec<u32>,
}

impl TapSeen {
    /// Waits until frame `seq` arrived; the frames seen must then be
    /// exactly `0..=seq`, in order: none refused, none lost, none twice.
    fn expect(&mut self, seq: u32, what: &str) {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut buf = vec![0u8; 70_000];
        while !self.seqs.contains(&seq) {
            assert!(
                Instant::now() < deadline,
                "{what}: frame {seq} never reached the TAP"
            );
            match nix::sys::socket::recv(
                self.sock.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                // The kernel's virtio-net header, then the frame.
                Ok(n) if n >= 10 + 18 && buf[10 + 12..10 + 14] == [0x88, 0xb5] => {
                    self.seqs.push(check_frame(&buf[10..n]));
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert_eq!(
            self.seqs,
            (0..=seq).collect::<Vec<_>>(),
            "{what}: the TAP saw a refused frame, or lost one"
        );
    }
}

/// The transmit cases on a TAP, where valid frames are written in
/// batches straight from the driver's buffers (docs/ARCHITECTURE.md
/// §8.1): every bad chain used with length 0 and nothing of it on the TAP,
/// valid frames in odd chains arriving whole, the backend the same process,
/// the good stream and every bystander (`peer`, a netif guest on another
/// TAP) untouched.
#[test]
fn a_hostile_virtio_net_driver_on_a_tap_sends_only_valid_frames() {
    use shadowback_testsupport::netns::enter_fresh_netns;
    thread::spawn(|| {
        enter_fresh_netns();
        let setup = start_on(
            "vnet-hostile-tap",
            true,
            "tap = \"sbevil0\"",
            "tap = \"sbpeer0\"",
        );
        let socket = setup.socket.clone();
        let good = GoodStream::start(&socket);
        let peer = Peer::attach(&socket);
        let mut evil = RawVnet::connect(&setup.vhost);
        let mut seen = TapSeen {
            sock: netback_common::packet_socket("sbevil0"),
            seqs: Vec::new(),
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let pid = loop {
            let s = stats_of(&socket, "evil");
            if s.connected && s.pid.is_some() {
                break s.pid;
            }
            assert!(Instant::now() < deadline, "evil never attached: {s:?}");
            thread::sleep(Duration::from_millis(5));
        };
        good.assert_moving("the start");
        let bystanders = Bystanders::record(&socket);
        let mut next = 0u32;
        // After each case: the backend alive and the same, the next valid
        // frame on the TAP, the bystanders untouched.
        let after = |evil: &mut RawVnet, seen: &mut TapSeen, next: &mut u32, what: &str| {
            let s = stats_of(&socket, "evil");
            assert_eq!(s.pid, pid, "{what}: evil's backend changed: {s:?}");
            assert_eq!((s.crashes, s.hangs), (0, 0), "{what}: {s:?}");
            evil.send(&frame(*next, 200));
            seen.expect(*next, what);
            *next += 1;
            good.assert_moving(what);
            bystanders.assert_untouched(what);
        };
        after(&mut evil, &mut seen, &mut next, "nothing");
        for (i, (what, build)) in tx_cases().into_iter().enumerate() {
            eprintln!("case (TAP): {what}");
            build(&mut evil, REFUSED_SEQ + i as u32);
            evil.make_available(TX, 0);
            assert_eq!(evil.wait_used(TX, what), (0, 0), "{what}");
            after(&mut evil, &mut seen, &mut next, what);
        }
        // Valid frames in chains a batch writes as they are: the header
        // split over two buffers, and a frame in 20 pieces (more iovecs
        // than one write holds in place).
        let what = "a header split over two buffers";
        eprintln!("case (TAP): {what}");
        let (a, l) = evil.tx_data(0, &frame(next, 300));
        evil.desc(TX, 0, a, 5, F_NEXT, 1);
        evil.desc(TX, 1, a + 5, l - 5, 0, 0);
        evil.make_available(TX, 0);
        assert_eq!(evil.wait_used(TX, what), (0, 0), "{what}");
        seen.expect(next, what);
        next += 1;
        after(&mut evil, &mut seen, &mut next, what);
        let what = "a frame in 20 buffers";
        eprintln!("case (TAP): {what}");
        let (a, _) = evil.tx_data(0, &frame(next, 1000));
        let table = evil.buf(100);
        evil.write_desc(table, 0, a, HDR as u32, F_NEXT, 1);
        for i in 1..20u16 {
            let at = a + HDR as u64 + 50 * u64::from(i - 1);
            let len = if i < 19 { 50 } else { 1000 - 50 * 18 };
            let flags = if i < 19 { F_NEXT } else { 0 };
            evil.write_desc(table, i, at, len, flags, i + 1);
        }
        evil.desc(TX, 0, table, 20 * 16, F_INDIRECT, 0);
        evil.make_available(TX, 0);
        assert_eq!(evil.wait_used(TX, what), (0, 0), "{what}");
        seen.expect(next, what);
        next += 1;
        after(&mut evil, &mut seen, &mut next, what);

        let moved = good.finish();
        eprintln!("the good stream moved {moved} bytes during the cases");
        drop(evil);
        drop(peer);
        let s = stats_of(&socket, "evil");
        assert_eq!((s.crashes, s.hangs, s.given_up), (0, 0, false), "{s:?}");
        setup.sup.stop().expect("supervisor stop");
    })
    .join()
    .expect("the test thread");
}
