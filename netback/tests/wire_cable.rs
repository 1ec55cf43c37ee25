//! The cable (docs/ARCHITECTURE.md §11.4): frames cross both ways intact,
//! a full queue drops and counts without blocking, hostile messages are
//! dropped and counted, and frames outlive a backend killed with SIGKILL.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{recv_wait, Backend};
use nix::sys::socket::{send, MsgFlags};
use shadowback_netback::wire::{
    cable_pair, CableConfig, DropReason, SendOutcome, VnetHeader, VnetHeaderLen, Wire, WireError,
    WireKind, MAX_FRAME_LEN, VNET_HDR_LEN,
};

/// Entry point of the backend child (see `common`): a no-op in a normal
/// run.
#[test]
fn backend_child_entry() {
    common::run_child_if_asked();
}

fn wire(fd: &OwnedFd, hdr: VnetHeaderLen) -> Wire {
    Wire::from_fd(WireKind::Cable, fd.try_clone().unwrap(), hdr).unwrap()
}

/// A frame with a `hdr`-layout header and `len` bytes of Ethernet frame
/// whose bytes derive from `seq`.
fn frame(hdr: VnetHeaderLen, h: VnetHeader, len: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; hdr.bytes() + len];
    h.encode(&mut f, hdr).unwrap();
    for (i, b) in f[hdr.bytes()..].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(31).wrapping_add(seq) as u8;
    }
    f[hdr.bytes()..hdr.bytes() + 4].copy_from_slice(&seq.to_be_bytes());
    f
}

#[test]
fn frames_cross_both_ways_intact_between_header_layouts() {
    let [a, b] = cable_pair(CableConfig::default()).unwrap();
    let mut a = wire(&a, VnetHeaderLen::Basic);
    let mut b = wire(&b, VnetHeaderLen::MergeableRx);
    let csum = VnetHeader {
        flags: 1, // NEEDS_CSUM
        csum_start: 34,
        csum_offset: 6,
        ..VnetHeader::plain()
    };
    let mut buf_a = vec![0xaa; a.recv_buf_len()];
    let mut buf_b = vec![0xbb; b.recv_buf_len()];
    for (seq, len) in [14usize, 60, 1514, 9014, MAX_FRAME_LEN]
        .into_iter()
        .enumerate()
    {
        let seq = seq as u32;
        // The checksum field at 34 + 6 must lie in the frame.
        let csum = if len >= 42 { csum } else { VnetHeader::plain() };
        // a → b: the 10-byte header arrives as a 12-byte one, num_buffers 0.
        let sent = frame(VnetHeaderLen::Basic, csum, len, seq);
        assert_eq!(a.send(&sent).unwrap(), SendOutcome::Sent);
        let n = recv_wait(&mut b, &mut buf_b, Duration::from_secs(2)).expect("frame at b");
        assert_eq!(n, 12 + len);
        let h = VnetHeader::decode(&buf_b, VnetHeaderLen::MergeableRx).unwrap();
        assert_eq!(h, csum);
        assert_eq!(&buf_b[12..n], &sent[10..]);

        // b → a: a num_buffers set by the sender is not carried.
        let mut back = frame(VnetHeaderLen::MergeableRx, csum, len, seq + 100);
        back[10] = 7;
        assert_eq!(b.send(&back).unwrap(), SendOutcome::Sent);
        let n = recv_wait(&mut a, &mut buf_a, Duration::from_secs(2)).expect("frame at a");
        assert_eq!(n, 10 + len);
        assert_eq!(&buf_a[..10], &back[..10]);
        assert_eq!(&buf_a[10..n], &back[12..]);
    }
    assert_eq!(a.recv(&mut buf_a).unwrap(), None);
    assert_eq!(b.recv(&mut buf_b).unwrap(), None);
    assert_eq!(a.stats().tx_frames, 5);
    assert_eq!(a.stats().rx_frames, 5);
    assert_eq!(b.stats().tx_frames, 5);
}

#[test]
fn a_burst_beyond_the_queue_drops_and_counts_without_blocking() {
    let [a, b] = cable_pair(CableConfig::default()).unwrap();
    let mut tx = wire(&a, VnetHeaderLen::Basic);
    let mut rx = wire(&b, VnetHeaderLen::Basic);
    const BURST: u32 = 5000;
    let start = Instant::now();
    let mut sent = Vec::new();
    for seq in 0..BURST {
        match tx
            .send(&frame(VnetHeaderLen::Basic, VnetHeader::plain(), 1514, seq))
            .unwrap()
        {
            SendOutcome::Sent => sent.push(seq),
            SendOutcome::Dropped(reason) => assert_eq!(reason, DropReason::QueueFull),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "sending blocked: {:?}",
        start.elapsed()
    );
    let stats = tx.stats();
    assert!(!sent.is_empty(), "nothing fitted the queue");
    assert!(
        stats.tx_dropped_full > 0,
        "a 5000-frame burst never filled the queue"
    );
    assert_eq!(stats.tx_frames, sent.len() as u64);
    assert_eq!(stats.tx_frames + stats.tx_dropped_full, u64::from(BURST));
    // Exactly the frames reported sent arrive, in order, intact.
    let mut buf = vec![0u8; rx.recv_buf_len()];
    for &seq in &sent {
        let n = rx.recv(&mut buf).unwrap().expect("a sent frame is queued");
        assert_eq!(
            &buf[..n],
            &frame(VnetHeaderLen::Basic, VnetHeader::plain(), 1514, seq)[..]
        );
    }
    assert_eq!(rx.recv(&mut buf).unwrap(), None);
    // The queue drained: sending works again.
    let again = frame(VnetHeaderLen::Basic, VnetHeader::plain(), 60, 9);
    assert_eq!(tx.send(&again).unwrap(), SendOutcome::Sent);
}

#[test]
fn hostile_messages_from_the_peer_are_dropped_and_counted() {
    let [raw, b] = cable_pair(CableConfig::default()).unwrap();
    let mut rx = wire(&b, VnetHeaderLen::MergeableRx);
    let raw_send = |bytes: &[u8]| {
        send(
            std::os::fd::AsRawFd::as_raw_fd(&raw),
            bytes,
            MsgFlags::MSG_DONTWAIT,
        )
        .unwrap()
    };
    raw_send(&[1, 2, 3]); // shorter than a header
    raw_send(&[0u8; VNET_HDR_LEN + 13]); // shorter than an Ethernet header
    let mut bad_flags = vec![0u8; VNET_HDR_LEN + 60];
    bad_flags[0] = 0x40;
    raw_send(&bad_flags);
    let mut bad_csum = vec![0u8; VNET_HDR_LEN + 60];
    bad_csum[0] = 1;
    bad_csum[6] = 59; // csum_start 59 + offset 0 + 2 > 60
    raw_send(&bad_csum);
    raw_send(&vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1]); // oversized
    let good = frame(VnetHeaderLen::Basic, VnetHeader::plain(), 60, 42);
    raw_send(&good);

    let mut buf = vec![0u8; rx.recv_buf_len()];
    let n = rx.recv(&mut buf).unwrap().expect("the good frame");
    assert_eq!(n, 12 + 60);
    assert_eq!(&buf[12..n], &good[10..]);
    let stats = rx.stats();
    assert_eq!(stats.rx_dropped_invalid, 4);
    assert_eq!(stats.rx_dropped_oversized, 1);
    assert_eq!(stats.rx_frames, 1);
    assert_eq!(rx.recv(&mut buf).unwrap(), None);
}

#[test]
fn bad_frames_and_buffers_and_fds_are_refused() {
    let [a, _b] = cable_pair(CableConfig::default()).unwrap();
    let mut tx = wire(&a, VnetHeaderLen::Basic);
    let short = vec![0u8; 10 + 13];
    assert!(matches!(
        tx.send(&short),
        Err(WireError::FrameTooShort { len: 23 })
    ));
    let long = vec![0u8; 10 + MAX_FRAME_LEN + 1];
    assert!(matches!(
        tx.send(&long),
        Err(WireError::FrameTooLong { .. })
    ));
    let mut bad = vec![0u8; 10 + 60];
    bad[1] = 9; // unknown gso_type
    assert!(matches!(tx.send(&bad), Err(WireError::Header(_))));
    assert_eq!(tx.stats().tx_frames, 0);

    let mut small = vec![0u8; tx.recv_buf_len() - 1];
    assert!(matches!(
        tx.recv(&mut small),
        Err(WireError::BufferTooSmall { .. })
    ));

    // A cable end is no TAP queue, and a pipe is no cable.
    let dup = a.try_clone().unwrap();
    assert!(matches!(
        Wire::from_fd(WireKind::Tap, dup, VnetHeaderLen::Basic),
        Err(WireError::WrongFd { .. })
    ));
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    assert!(matches!(
        Wire::from_fd(WireKind::Cable, pipe_r, VnetHeaderLen::Basic),
        Err(WireError::WrongFd { .. })
    ));
}

#[test]
fn a_cable_end_with_no_holder_left_reads_as_closed() {
    let [a, b] = cable_pair(CableConfig::default()).unwrap();
    let mut rx = wire(&b, VnetHeaderLen::Basic);
    drop(a);
    let mut buf = vec![0u8; rx.recv_buf_len()];
    assert!(matches!(rx.recv(&mut buf), Err(WireError::Closed)));
    let mut tx = rx;
    let f = frame(VnetHeaderLen::Basic, VnetHeader::plain(), 60, 1);
    assert!(matches!(tx.send(&f), Err(WireError::Closed)));
}

#[test]
fn frames_outlive_a_backend_killed_with_sigkill() {
    // The supervisor holds both ends for the whole test.
    let [guest_a, guest_b] = cable_pair(CableConfig::default()).unwrap();
    let hdr = VnetHeaderLen::Basic;

    // Backend 1 of vif A sends three frames, then is killed.
    let mut backend = Backend::start("backend_child_entry", "cable", hdr, guest_a.as_fd());
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|seq| frame(hdr, VnetHeader::plain(), 100 + seq as usize, seq))
        .collect();
    for f in &frames {
        assert_eq!(backend.send(f), "sent");
    }
    backend.kill();

    // What the dead process sent is read at the other end.
    let mut b = wire(&guest_b, hdr);
    let mut buf = vec![0u8; b.recv_buf_len()];
    for f in &frames {
        let n =
            recv_wait(&mut b, &mut buf, Duration::from_secs(2)).expect("frame of the dead backend");
        assert_eq!(&buf[..n], &f[..]);
    }
    assert_eq!(b.recv(&mut buf).unwrap(), None);

    // Frames for vif A sent while no backend serves it wait for the next
    // instance, which gets the same end from the supervisor.
    let waiting = frame(hdr, VnetHeader::plain(), 200, 77);
    assert_eq!(b.send(&waiting).unwrap(), SendOutcome::Sent);
    let mut next = Backend::start("backend_child_entry", "cable", hdr, guest_a.as_fd());
    assert_eq!(next.recv(2000).as_deref(), Some(&waiting[..]));
    assert_eq!(next.recv(50), None);
    assert!(next.exit().success());
}
