//! A hostile Xen netif guest against a real supervisor (docs/PROTOCOL.md
//! §4.8, docs/ARCHITECTURE.md §11.4): every case of netif's validation
//! list on the TX and RX rings of vif `evil`, while two netfronts stream
//! checksummed TCP over `gooda` ↔ `goodb` and a verifying raw guest sits
//! on `peer`, the far end of `evil`'s cable.
//!
//! After each case: the documented outcome (every slot answered
//! `XEN_NETIF_RSP_ERROR`, or the vif disconnected with `EPROTO`), `evil`'s
//! backend still the same process unless the vif was disconnected (and
//! then no crash either), `evil` still carrying a verified frame to `peer`
//! (after reconnecting, for a fatal case), no refused frame ever on the
//! wire, the good stream moving with no error, reset or changed byte, and
//! the supervisor answering `status` with every bystander untouched.

use std::collections::HashMap;
use std::time::Duration;

use shadowback_ring::netif::{
    NetifExtraGso, NetifExtraInfo, NetifRxRequest, NetifTxRequest, NETIF_RSP_ERROR, NETIF_RSP_NULL,
    NETIF_RSP_OKAY, NETTXF_EXTRA_INFO, XEN_NETIF_GSO_TYPE_TCPV4,
};
use shadowback_testsupport::operator::stats_of;

mod net_hostile_common;
mod netback_common;
use net_hostile_common::*;

/// Refused packets carry sequence numbers from here: the peer must never
/// see one.
const REFUSED_SEQ: u32 = 1_000_000;

/// What a case must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Every slot of the packet answered with this status (extras NULL).
    Answered,
    /// The vif disconnected, the reason naming this.
    Fatal(&'static str),
}

/// `data` cut into `1 + following` slots of equal size (the first carries
/// the rest), ids from 0.
fn slots(guest: &RawNetif, following: usize, seq: u32) -> Vec<NetifTxRequest> {
    let len = 60 * (following + 1);
    guest.packet(&frame(seq, len), following + 1, 0)
}

fn extra_slot(extra: NetifExtraInfo) -> NetifTxRequest {
    NetifTxRequest::from_extra(&extra)
}

/// One slot of a valid 100-byte frame with reference `gref`.
fn one_slot(guest: &RawNetif, gref: u32, seq: u32) -> NetifTxRequest {
    let mut s = guest.packet(&frame(seq, 100), 1, 0).remove(0);
    s.gref = gref;
    s
}

/// The TX cases: a name, the slots (built on the current guest), and the
/// outcome. Answered cases list the statuses expected, one per slot.
fn tx_cases(guest: &RawNetif) -> Vec<(&'static str, Vec<NetifTxRequest>, Outcome, Vec<i16>)> {
    let err = |n: usize| vec![NETIF_RSP_ERROR; n];
    let mut cases = Vec::new();
    // Answered with errors; the vif carries on.
    let mut runt = one_slot(guest, tx_gref(0), REFUSED_SEQ);
    runt.size = 13;
    cases.push((
        "a frame under 14 bytes",
        vec![runt],
        Outcome::Answered,
        err(1),
    ));
    let mut big = slots(guest, 1, REFUSED_SEQ + 1);
    big[0].size = 100;
    big[1].size = 200;
    cases.push((
        "a slot larger than what the packet has left",
        big,
        Outcome::Answered,
        err(2),
    ));
    cases.push((
        "19 slots after the first",
        slots(guest, 19, REFUSED_SEQ + 2),
        Outcome::Answered,
        err(20),
    ));
    cases.push((
        "20 slots after the first",
        slots(guest, 20, REFUSED_SEQ + 3),
        Outcome::Answered,
        err(21),
    ));
    cases.push((
        "a grant reference beyond the table",
        vec![one_slot(guest, 5000, REFUSED_SEQ + 4)],
        Outcome::Answered,
        err(1),
    ));
    cases.push((
        "a grant reference never granted",
        vec![one_slot(guest, UNGRANTED_GREF, REFUSED_SEQ + 5)],
        Outcome::Answered,
        err(1),
    ));
    cases.push((
        "a grant to another domain",
        vec![one_slot(guest, UNGRANTED_GREF + 1, REFUSED_SEQ + 6)],
        Outcome::Answered,
        err(1),
    ));
    cases.push((
        "a grant of a frame beyond the region",
        vec![one_slot(guest, UNGRANTED_GREF + 2, REFUSED_SEQ + 7)],
        Outcome::Answered,
        err(1),
    ));
    // A GSO extra on a vif offered no GSO: the packet is valid netif, the
    // cable cannot carry it.
    let gso = NetifExtraGso {
        size: 1400,
        type_: XEN_NETIF_GSO_TYPE_TCPV4,
        ..Default::default()
    };
    let mut with_gso = slots(guest, 0, REFUSED_SEQ + 8);
    with_gso[0].flags |= NETTXF_EXTRA_INFO;
    with_gso.insert(1, extra_slot(NetifExtraInfo::from_gso(0, &gso)));
    cases.push((
        "a GSO packet on a vif offered no GSO",
        with_gso,
        Outcome::Answered,
        vec![NETIF_RSP_ERROR, NETIF_RSP_NULL],
    ));

    // Fatal: the vif is disconnected.
    let mut missing_extra = slots(guest, 0, REFUSED_SEQ + 20);
    missing_extra[0].flags |= NETTXF_EXTRA_INFO;
    cases.push((
        "an extra-info slot promised and not published",
        missing_extra,
        Outcome::Fatal("extra-info slot promised"),
        Vec::new(),
    ));
    for (name, type_) in [
        ("an extra-info slot of type 0", 0u8),
        ("an extra-info slot of unknown type", 9u8),
    ] {
        let mut bad = slots(guest, 0, REFUSED_SEQ + 21);
        bad[0].flags |= NETTXF_EXTRA_INFO;
        let mut extra = NetifExtraInfo::from_gso(0, &gso);
        extra.type_ = type_;
        bad.insert(1, extra_slot(extra));
        cases.push((name, bad, Outcome::Fatal("invalid type"), Vec::new()));
    }
    let mut gso0 = slots(guest, 0, REFUSED_SEQ + 22);
    gso0[0].flags |= NETTXF_EXTRA_INFO;
    let zero = NetifExtraGso { size: 0, ..gso };
    gso0.insert(1, extra_slot(NetifExtraInfo::from_gso(0, &zero)));
    cases.push((
        "a GSO extra of size 0",
        gso0,
        Outcome::Fatal("segment size 0"),
        Vec::new(),
    ));
    let mut crossing = one_slot(guest, tx_gref(0), REFUSED_SEQ + 23);
    crossing.offset = 4000;
    cases.push((
        "a slot crossing its page",
        vec![crossing],
        Outcome::Fatal("crosses its page"),
        Vec::new(),
    ));
    cases.push((
        "21 slots after the first",
        slots(guest, 21, REFUSED_SEQ + 24),
        Outcome::Fatal("more than 20 slots"),
        Vec::new(),
    ));
    let mut cut = slots(guest, 2, REFUSED_SEQ + 25);
    cut.pop();
    cases.push((
        "a packet whose last slot says more data follows",
        cut,
        Outcome::Fatal("ring holds no more"),
        Vec::new(),
    ));
    cases
}

/// Makes the grants the bad-grant cases name.
fn bad_grants(guest: &RawNetif) {
    let other = guest.backend_id.wrapping_add(1);
    guest
        .grants
        .grant(UNGRANTED_GREF + 1, other, TX_BUF_FRAME, false)
        .unwrap();
    guest
        .grants
        .grant(UNGRANTED_GREF + 2, guest.backend_id, PAGES + 10, false)
        .unwrap();
}

/// The hostile guest's valid frames, checked at the peer in order.
struct Valid {
    next: u32,
}

impl Valid {
    /// `evil` sends the next valid frame in `pieces` slots; the peer gets
    /// it intact, right after the previous one.
    fn send(&mut self, evil: &mut RawNetif, peer: &mut Peer, pieces: usize) {
        let seq = self.next;
        self.next += 1;
        evil.send(&frame(seq, 60 * pieces.max(2)), pieces, NETIF_RSP_OKAY);
        peer.expect(seq);
        assert_eq!(
            peer.received,
            (0..self.next).collect::<Vec<_>>(),
            "the peer saw a refused frame, or lost one"
        );
    }
}

/// Checks after every case, and the reconnect after a fatal one.
fn after_case(
    what: &str,
    fatal: Option<&str>,
    evil: RawNetif,
    pid: Option<u32>,
    h: &Harness<'_>,
    valid: &mut Valid,
    peer: &mut Peer,
) -> RawNetif {
    let mut evil = match fatal {
        Some(why) => {
            evil.expect_disconnect(why);
            let s = stats_of(h.socket, "evil");
            assert_eq!(
                (s.connected, s.crashes, s.given_up),
                (false, 0, false),
                "{what}: {s:?}"
            );
            let again = RawNetif::attach(h.socket, "evil");
            bad_grants(&again);
            // The same process serves the guest's next connect.
            assert_eq!(stats_of(h.socket, "evil").pid, pid, "{what}");
            again
        }
        None => {
            evil.assert_connected();
            let s = stats_of(h.socket, "evil");
            assert_eq!(s.pid, pid, "{what}: evil's backend changed");
            assert_eq!(s.crashes, 0, "{what}: {s:?}");
            evil
        }
    };
    valid.send(&mut evil, peer, 1);
    h.good.assert_moving(what);
    h.bystanders.assert_untouched(what);
    evil
}

struct Harness<'a> {
    socket: &'a std::path::Path,
    good: &'a GoodStream,
    bystanders: &'a Bystanders,
}

#[test]
fn a_hostile_netif_guest_hurts_only_its_own_vif() {
    let setup = start("netif-hostile", false);
    let socket = setup.socket.clone();
    let good = GoodStream::start(&socket);
    let mut peer = Peer::attach(&socket);
    let mut evil = RawNetif::attach(&socket, "evil");
    bad_grants(&evil);
    good.assert_moving("the start");
    let bystanders = Bystanders::record(&socket);
    let h = Harness {
        socket: &socket,
        good: &good,
        bystanders: &bystanders,
    };
    let mut valid = Valid { next: 0 };
    valid.send(&mut evil, &mut peer, 1);
    // The boundary: 18 slots after the first are a valid packet.
    valid.send(&mut evil, &mut peer, 19);
    let mut fatal_seen = 0;

    // ---- TX -------------------------------------------------------------
    let count = tx_cases(&evil).len();
    for i in 0..count {
        // Built on the current guest: a fatal case replaced it.
        let (what, slots, outcome, statuses) = tx_cases(&evil).swap_remove(i);
        eprintln!("case: {what}");
        let pid = stats_of(&socket, "evil").pid;
        evil.put_tx(&slots);
        let fatal = match outcome {
            Outcome::Answered => {
                let rsps = evil.tx_responses(slots.len());
                let got: Vec<i16> = rsps.iter().map(|r| r.status).collect();
                assert_eq!(got, statuses, "{what}: {rsps:?}");
                for (s, r) in slots.iter().zip(&rsps) {
                    if r.status != NETIF_RSP_NULL {
                        assert_eq!(r.id, s.id, "{what}: {rsps:?}");
                    }
                }
                None
            }
            Outcome::Fatal(why) => {
                evil.assert_no_tx_response(Duration::from_millis(20));
                fatal_seen += 1;
                Some(why)
            }
        };
        evil = after_case(what, fatal, evil, pid, &h, &mut valid, &mut peer);
    }

    // Ring indices more than a ring ahead of the responses: fatal.
    for (what, ring) in [
        ("TX req_prod beyond the ring", TX_RING_FRAME),
        ("RX req_prod beyond the ring", RX_RING_FRAME),
    ] {
        eprintln!("case: {what}");
        let pid = stats_of(&socket, "evil").pid;
        evil.req_prod_ahead(ring, 257);
        fatal_seen += 1;
        evil = after_case(
            what,
            Some("ring corrupt"),
            evil,
            pid,
            &h,
            &mut valid,
            &mut peer,
        );
    }

    // ---- RX -------------------------------------------------------------
    // No buffer posted while the peer sends 16 MiB towards the vif: the
    // frames wait in the cable's bounded queue, and once it is full the
    // peer's backend holds the peer's TX back (answers and takes nothing
    // more: the peer's ring fills) rather than drop (docs/ARCHITECTURE.md
    // §11.5); nothing in either backend grows.
    let what = "no RX buffers posted while 16 MiB wait to be sent to it";
    eprintln!("case: {what}");
    evil.close();
    let mut evil = RawNetif::attach(&socket, "evil");
    let pid = stats_of(&socket, "evil").pid.expect("evil's backend");
    let peer_pid = stats_of(&socket, "peer").pid.expect("the peer's backend");
    let blast = blast_at_silent_vif(&mut peer, [pid, peer_pid], what);
    // Buffers posted: every frame arrives, in order, none lost, and the
    // peer's TX moves again.
    for id in 0..RX_BUFS as u16 {
        evil.post_rx_id(id);
    }
    evil.push();
    drain_blast(&mut peer, blast, what, || {
        let (req, rsp) = evil.next_rx();
        let seq = check_frame(&evil.rx_data(&req, &rsp));
        evil.post_rx(req);
        evil.push();
        seq
    });
    assert_eq!(stats_of(&socket, "evil").pid, Some(pid));
    assert_eq!(stats_of(&socket, "peer").pid, Some(peer_pid));
    h.good.assert_moving(what);
    h.bystanders.assert_untouched(what);
    evil.close();

    // Buffers the backend cannot write: each answered with an error, the
    // frame for it dropped; the next good buffer gets the next frame.
    let what = "RX buffers with bad grants";
    eprintln!("case: {what}");
    let mut evil = RawNetif::attach(&socket, "evil");
    bad_grants(&evil);
    let pid = stats_of(&socket, "evil").pid;
    evil.grants
        .grant(rx_gref(9), evil.backend_id, RX_BUF_FRAME + 9, true)
        .unwrap();
    let bad = [
        (UNGRANTED_GREF, "never granted"),
        (UNGRANTED_GREF + 1, "another domain's"),
        (UNGRANTED_GREF + 2, "a frame beyond the region"),
        (rx_gref(9), "read-only"),
        (5000, "beyond the table"),
    ];
    for (id, (gref, _)) in bad.iter().enumerate() {
        evil.post_rx(NetifRxRequest {
            id: id as u16,
            pad: 0,
            gref: *gref,
        });
    }
    evil.post_rx_id(100);
    evil.push();
    let first = 2 * REFUSED_SEQ;
    peer.guest.send(&frame(first, 200), 1, NETIF_RSP_OKAY);
    for (id, (_, why)) in bad.iter().enumerate() {
        if id > 0 {
            peer.guest
                .send(&frame(first + id as u32, 200), 1, NETIF_RSP_OKAY);
        }
        let (req, rsp) = evil.next_rx();
        assert_eq!(
            (rsp.id, rsp.status),
            (id as u16, NETIF_RSP_ERROR),
            "{what}: a {why} buffer: {req:?} {rsp:?}"
        );
    }
    peer.guest
        .send(&frame(first + bad.len() as u32, 200), 1, NETIF_RSP_OKAY);
    let (req, rsp) = evil.next_rx();
    assert_eq!(
        check_frame(&evil.rx_data(&req, &rsp)),
        first + bad.len() as u32
    );
    evil = after_case(what, None, evil, pid, &h, &mut valid, &mut peer);

    // Several buffers posted under one id: each answered in its own slot,
    // with that id, its own frame in its own page.
    let what = "RX buffers posted under one id";
    eprintln!("case: {what}");
    let pid = stats_of(&socket, "evil").pid;
    for page in [20u16, 21, 22] {
        evil.post_rx(NetifRxRequest {
            id: 7,
            pad: 0,
            gref: rx_gref(page),
        });
    }
    evil.push();
    let mut got = HashMap::new();
    for k in 0..3u32 {
        peer.guest
            .send(&frame(3 * REFUSED_SEQ + k, 300), 1, NETIF_RSP_OKAY);
        let (req, rsp) = evil.next_rx();
        assert_eq!(rsp.id, 7, "{what}");
        got.insert(req.gref, check_frame(&evil.rx_data(&req, &rsp)));
    }
    assert_eq!(got.len(), 3, "{what}: {got:?}");
    evil = after_case(what, None, evil, pid, &h, &mut valid, &mut peer);

    assert!(fatal_seen >= 8, "only {fatal_seen} fatal cases");
    let moved = good.finish();
    eprintln!("the good stream moved {moved} bytes during the cases");
    evil.close();
    let s = stats_of(&socket, "evil");
    assert_eq!((s.crashes, s.hangs, s.given_up), (0, 0, false), "{s:?}");
    setup.sup.stop().expect("supervisor stop");
}

/// A frame to `dst` from `peer`, carrying `tag` (an experimental
/// ethertype the stacks ignore).
fn tagged(dst: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[2, 0x77, 0, 0, 0, 2]);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.push(tag);
    f.resize(60, 0);
    f
}

/// Sends a multicast list change from `guest` (a first slot with
/// `NETTXF_extra_info`, then the extra) and checks both slots' answers.
fn mcast(guest: &mut RawNetif, kind: u8, addr: [u8; 6]) {
    use shadowback_ring::netif::NETIF_RSP_NULL;
    let first = NetifTxRequest {
        gref: tx_gref(0),
        offset: 0,
        flags: NETTXF_EXTRA_INFO,
        id: 0,
        size: 0,
    };
    let extra = NetifTxRequest::from_extra(&NetifExtraInfo::from_mcast(kind, 0, addr));
    guest.put_tx(&[first, extra]);
    let rsps = guest.tx_responses(2);
    assert_eq!(
        (rsps[0].status, rsps[1].status),
        (NETIF_RSP_OKAY, NETIF_RSP_NULL),
        "{rsps:?}"
    );
}

/// Sends one frame to each of `dsts` from `peer`, tagged `base + i`, then
/// one to `evil`'s unicast address tagged `base + 9`; returns the tags
/// `evil` receives up to that last one.
fn round(peer: &mut RawNetif, evil: &mut RawNetif, dsts: &[[u8; 6]], base: u8) -> Vec<u8> {
    let unicast = [2, 0x55, 0, 0, 0, 1];
    for (i, dst) in dsts.iter().enumerate() {
        peer.send(&tagged(*dst, base + i as u8), 1, NETIF_RSP_OKAY);
    }
    peer.send(&tagged(unicast, base + 9), 1, NETIF_RSP_OKAY);
    let mut tags = Vec::new();
    loop {
        let (req, rsp) = evil.next_rx();
        let data = evil.rx_data(&req, &rsp);
        evil.post_rx(req);
        evil.push();
        if data.len() >= 15 && data[12..14] == 0x88b5u16.to_be_bytes() {
            tags.push(data[14]);
            if data[14] == base + 9 {
                return tags;
            }
        }
    }
}

/// `feature-multicast-control`: a guest that asks for it gets the
/// multicast frames of the groups it listed (and broadcast and unicast),
/// not the others; the list is the attachment's, not the backend's, so it
/// filters the same after `fault kill`s; a delete takes a group off; more
/// than 64 groups let every multicast frame through.
#[test]
fn a_netif_guest_gets_the_multicast_groups_it_listed_through_kills() {
    use shadowback_ring::netif::{XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL};
    use shadowback_testsupport::operator::fault_kill;
    let setup = start("netif-mcast", false);
    let mut evil = RawNetif::attach_with(&setup.socket, "evil", true);
    for id in 0..RX_BUFS as u16 {
        evil.post_rx_id(id);
    }
    evil.push();
    let mut peer = RawNetif::attach(&setup.socket, "peer");
    let (joined, other) = ([1, 0, 0x5e, 0, 0, 1], [1, 0, 0x5e, 0, 0, 2]);
    let dsts = [joined, other, [0xff; 6]];
    // Before any list: no multicast frame but broadcast.
    assert_eq!(round(&mut peer, &mut evil, &dsts, 10), [12, 19]);
    mcast(&mut evil, XEN_NETIF_EXTRA_TYPE_MCAST_ADD, joined);
    assert_eq!(round(&mut peer, &mut evil, &dsts, 20), [20, 22, 29]);
    let kill = |n: u32| {
        let before = stats_of(&setup.socket, "evil").recoveries;
        assert!(fault_kill(&setup.socket, "evil"), "kill {n}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while stats_of(&setup.socket, "evil").recoveries <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no recovery after kill {n}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    kill(1);
    assert_eq!(
        round(&mut peer, &mut evil, &dsts, 30),
        [30, 32, 39],
        "after a kill"
    );
    mcast(&mut evil, XEN_NETIF_EXTRA_TYPE_MCAST_DEL, joined);
    kill(2);
    assert_eq!(round(&mut peer, &mut evil, &dsts, 40), [42, 49], "deleted");
    // 65 groups, neither of the two: the list overflows, every multicast
    // frame passes, after a kill too.
    for n in 0..65u8 {
        mcast(
            &mut evil,
            XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
            [1, 0, 0x5e, 1, 0, n],
        );
    }
    assert_eq!(round(&mut peer, &mut evil, &dsts, 50), [50, 51, 52, 59]);
    kill(3);
    assert_eq!(round(&mut peer, &mut evil, &dsts, 60), [60, 61, 62, 69]);
    let s = stats_of(&setup.socket, "evil");
    assert_eq!((s.failed_takeovers, s.given_up), (0, false), "{s:?}");
    evil.close();
    peer.close();
    setup.sup.stop().expect("supervisor stop");
}
