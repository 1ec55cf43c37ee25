//! Descriptors that arrive with a rejected datagram must be closed.
//!
//! One test function only: it counts `/proc/self/fd` and changes
//! `RLIMIT_NOFILE`, both process-wide, so nothing may run beside it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use shadowback_xenbus::{SeqPacket, XenbusError, MAX_FDS, MAX_MESSAGE};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The `count` lowest descriptor numbers not open in this process.
fn lowest_free_fds(count: usize) -> Vec<u64> {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).filter(|n| !open.contains(n)).take(count).collect()
}

/// Sends `payload` with `fds` as SCM_RIGHTS, bypassing the crate's checks.
fn send_raw(sock: &SeqPacket, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let sent = sendmsg(
        sock.as_fd(),
        &[std::io::IoSlice::new(payload)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    assert_eq!(sent, payload.len());
}

/// `count` pipes; returns (read ends, write ends).
fn pipes(count: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
    (0..count).map(|_| rustix::pipe::pipe().unwrap()).unzip()
}

/// With every read end gone, a write fails with EPIPE: proof that no copy
/// of the read end survives anywhere in the process.
fn assert_no_reader(writers: &[OwnedFd]) {
    for w in writers {
        assert_eq!(rustix::io::write(w, b"x"), Err(Errno::PIPE));
    }
}

/// Sends the read ends of fresh pipes with `payload`, drops our copies,
/// checks that `recv` fails as `check` expects and that nothing leaked.
fn case(
    a: &SeqPacket,
    b: &SeqPacket,
    pipe_count: usize,
    payload: &[u8],
    check: impl Fn(&Result<shadowback_xenbus::Received, XenbusError>) -> bool,
) {
    let (readers, writers) = pipes(pipe_count);
    let borrowed: Vec<_> = readers.iter().map(|r| r.as_fd()).collect();
    send_raw(a, payload, &borrowed);
    drop(borrowed);
    drop(readers);
    let before = open_fds();
    let result = b.recv();
    assert!(check(&result), "unexpected result {result:?}");
    drop(result);
    assert_eq!(open_fds(), before, "received fds leaked");
    assert_no_reader(&writers);
}

#[test]
fn rejected_datagrams_close_their_fds() {
    let (a, b) = SeqPacket::pair().unwrap();

    // More than MAX_FDS descriptors.
    case(
        &a,
        &b,
        MAX_FDS + 1,
        b"connect\n",
        |r| matches!(r, Err(XenbusError::TooManyFds { count }) if *count == MAX_FDS + 1),
    );
    case(
        &a,
        &b,
        MAX_FDS + 40,
        b"connect\n",
        |r| matches!(r, Err(XenbusError::TooManyFds { count }) if *count == MAX_FDS + 40),
    );

    // Truncated payload (MSG_TRUNC) with fds.
    let mut big = b"connect\n".to_vec();
    big.resize(MAX_MESSAGE + 1, b'a');
    case(&a, &b, 3, &big, |r| {
        matches!(r, Err(XenbusError::Truncated))
    });

    // Malformed payload with fds.
    case(&a, &b, 3, b"Connect\n", |r| {
        matches!(r, Err(XenbusError::BadKind))
    });

    // Truncated control data (MSG_CTRUNC): the kernel installs fds until
    // RLIMIT_NOFILE stops it, then flags the rest as truncated. Those it did
    // install must be closed too.
    let (readers, writers) = pipes(MAX_FDS);
    let borrowed: Vec<_> = readers.iter().map(|r| r.as_fd()).collect();
    send_raw(&a, b"connect\n", &borrowed);
    drop(borrowed);
    drop(readers);
    let old = getrlimit(Resource::Nofile);
    let before = open_fds();
    // New descriptors take the lowest free numbers; leave room for only a
    // few, so the kernel installs some of them and then truncates.
    let room = lowest_free_fds(3).last().unwrap() + 1;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(room),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let result = b.recv();
    setrlimit(Resource::Nofile, old).unwrap();
    assert!(
        matches!(result, Err(XenbusError::Truncated)),
        "unexpected result {result:?}"
    );
    assert_eq!(open_fds(), before, "fds of a MSG_CTRUNC datagram leaked");
    assert_no_reader(&writers);

    // The socket still works afterwards.
    a.send(&shadowback_xenbus::Message::new("close"), &[])
        .unwrap();
    let (msg, fds) = b.recv().unwrap();
    assert_eq!(msg.kind(), "close");
    assert!(fds.is_empty());
}
