//! The tokio flavour against itself and against the blocking flavour.

use std::os::fd::AsFd;

use shadowback_testsupport::fd::{add_seals, sealable_memfd, SealFlag};
use shadowback_testsupport::{eventfd, TempDir};
use shadowback_xenbus::{
    kind, AsyncSeqPacket, AsyncSeqPacketListener, BackendInfo, ConnectRequest, DeviceFds, DiskMode,
    Message, SeqPacket, SeqPacketListener, XenbusError, XenbusState, MAX_FDS,
};

fn disk() -> BackendInfo {
    BackendInfo {
        backend_id: 0,
        sectors: 1 << 21,
        sector_size: 512,
        physical_sector_size: 512,
        mode: DiskMode::ReadWrite,
        feature_flush_cache: true,
        feature_discard: true,
        discard_granularity: 4096,
        discard_alignment: 0,
        max_indirect_segments: 256,
        max_ring_page_order: 4,
        info: 0,
    }
}

#[tokio::test]
async fn listener_probe_connect_close() {
    let dir = TempDir::new("xenbus-async");
    let path = dir.join("control.sock");
    let listener = AsyncSeqPacketListener::bind(&path).unwrap();

    // The "supervisor".
    let server = tokio::spawn(async move {
        let conn = listener.accept().await.unwrap();
        let (probe, fds) = conn.recv().await.unwrap();
        assert_eq!(probe.kind(), kind::PROBE);
        assert!(fds.is_empty());
        conn.send(&disk().backend_message(), &[]).await.unwrap();

        let (msg, fds) = conn.recv().await.unwrap();
        let req = ConnectRequest::from_message(&msg).unwrap();
        let fds = DeviceFds::from_received(&msg, fds).unwrap();
        assert_eq!(req.ring_refs, vec![8, 9]);
        assert_eq!(fds.check(&req).unwrap(), 4);
        // Kick the frontend through the received notify eventfd.
        rustix::io::write(&fds.notify, &1u64.to_ne_bytes()).unwrap();
        conn.send(&disk().connected_message(), &[]).await.unwrap();

        let (msg, _) = conn.recv().await.unwrap();
        assert_eq!(msg.kind(), kind::CLOSE);
        conn.send(
            &Message::new(kind::CLOSED).with("state", XenbusState::Closed),
            &[],
        )
        .await
        .unwrap();
        drop(conn);
        listener
    });

    // The "guest", on a plain blocking thread.
    let guest_path = path.clone();
    let guest = tokio::task::spawn_blocking(move || {
        let sock = SeqPacket::connect(&guest_path).unwrap();
        sock.send(&Message::probe("xvda"), &[]).unwrap();
        let (answer, _) = sock.recv().unwrap();
        assert_eq!(answer.state().unwrap(), XenbusState::InitWait);
        assert_eq!(BackendInfo::from_message(&answer).unwrap(), disk());

        let region = sealable_memfd(4 * 4096, true);
        add_seals(&region, SealFlag::F_SEAL_SHRINK);
        let (kick, notify) = (eventfd(), eventfd());
        let req = ConnectRequest {
            device: "xvda".into(),
            frontend_id: 1,
            ring_refs: vec![8, 9],
            grant_frames: 1,
            feature_persistent: true,
        };
        sock.send(
            &req.to_message().unwrap(),
            &[region.as_fd(), kick.as_fd(), notify.as_fd()],
        )
        .unwrap();
        let (answer, _) = sock.recv().unwrap();
        assert_eq!(answer.kind(), kind::CONNECTED);
        assert_eq!(answer.state().unwrap(), XenbusState::Connected);
        let mut buf = [0u8; 8];
        rustix::io::read(&notify, &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);

        sock.send(&Message::new(kind::CLOSE), &[]).unwrap();
        let (answer, _) = sock.recv().unwrap();
        assert_eq!(answer.state().unwrap(), XenbusState::Closed);
        assert!(matches!(sock.recv(), Err(XenbusError::Closed)));
    });
    guest.await.unwrap();
    let listener = server.await.unwrap();
    assert_eq!(listener.path(), path);
    drop(listener);

    // A stale socket file is replaced on the next bind.
    let again = AsyncSeqPacketListener::bind(&path).unwrap();
    drop(again);
}

#[tokio::test]
async fn pair_round_trip_with_fds() {
    let (a, b) = AsyncSeqPacket::pair().unwrap();
    let fd = eventfd();
    let recv = tokio::spawn(async move { b.recv().await });
    a.send(
        &Message::new("attach").with("frontend", "g1"),
        &[fd.as_fd()],
    )
    .await
    .unwrap();
    let (msg, fds) = recv.await.unwrap().unwrap();
    assert_eq!(msg.get("frontend"), Some("g1"));
    rustix::io::write(&fds[0], &3u64.to_ne_bytes()).unwrap();
    let mut buf = [0u8; 8];
    rustix::io::read(&fd, &mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), 3);
    drop(a);
}

#[tokio::test]
async fn async_peer_close_and_too_many_fds() {
    let (a, b) = AsyncSeqPacket::pair().unwrap();
    let fd = eventfd();
    assert!(matches!(
        a.send(&Message::new("attach"), &[fd.as_fd(); MAX_FDS + 1]).await,
        Err(XenbusError::TooManyFds { count }) if count == MAX_FDS + 1
    ));
    drop(a);
    assert!(matches!(b.recv().await, Err(XenbusError::Closed)));
}

#[tokio::test]
async fn async_send_waits_for_room() {
    let (a, b) = AsyncSeqPacket::pair().unwrap();
    let msg = Message::new("detach").with("pad", "x".repeat(200));
    // Fill the peer's queue, then drain it concurrently; every message must
    // arrive exactly once and in order.
    let count = 2000usize;
    let reader = tokio::spawn(async move {
        for i in 0..count {
            let (m, _) = b.recv().await.unwrap();
            assert_eq!(m.get("seq"), Some(i.to_string().as_str()));
        }
    });
    for i in 0..count {
        a.send(&msg.clone().with("seq", i), &[]).await.unwrap();
    }
    reader.await.unwrap();
}

#[tokio::test]
async fn blocking_and_async_interoperate() {
    let dir = TempDir::new("xenbus-async");
    let path = dir.join("mixed.sock");
    let listener = SeqPacketListener::bind(&path).unwrap();
    let listener = AsyncSeqPacketListener::new(listener).unwrap();
    let client = AsyncSeqPacket::connect(&path);
    let server = listener.accept().await.unwrap();
    let client = client.unwrap();
    client.send(&Message::probe("xvdb"), &[]).await.unwrap();
    let (msg, _) = server.recv().await.unwrap();
    assert_eq!(msg.get("device"), Some("xvdb"));
    // A live listener is not replaced.
    assert!(SeqPacketListener::bind(&path).is_err());
    drop(listener);
}

#[tokio::test]
async fn try_send_never_waits_for_a_peer_that_does_not_read() {
    let (a, b) = AsyncSeqPacket::pair().unwrap();
    let msg = Message::new(kind::STATUS_END);
    // Fill b's receive queue without b ever reading.
    let mut sent = 0usize;
    let refused = loop {
        match a.try_send(&msg) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1_000_000, "the receive queue never filled");
    };
    assert!(sent > 0, "nothing was sent");
    assert!(
        matches!(&refused, XenbusError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a full queue is WouldBlock, got {refused:?}"
    );
    let (first, _) = b.recv().await.unwrap();
    assert_eq!(first.kind(), kind::STATUS_END);
    drop(b);
    assert!(matches!(a.try_send(&msg), Err(XenbusError::Closed)));
}
