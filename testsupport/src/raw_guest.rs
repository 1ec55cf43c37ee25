//! A hand-rolled Xen frontend for tests that talk to the control socket
//! themselves: a sealed region with a grant table, a one-page blkif ring and
//! a few data pages, two eventfds, and helpers for raw (possibly malformed)
//! control datagrams.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use shadowback_ring::blkif::{Blkif, BlkifRequest, BlkifResponse};
use shadowback_ring::grant::GrantTable;
use shadowback_ring::sring::{FrontRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion, PAGE_SIZE};
use shadowback_xenbus::{
    kind, ConnectRequest, DeviceFds, ErrorCode, Message, SeqPacket, XenbusError,
};

use crate::REPLY_TIMEOUT;

/// How long a `connect` may wait for its answer: a backend that dies
/// during the first attach is recovered before the guest is answered.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

const PAGE: u64 = PAGE_SIZE as u64;

/// Sends `payload` as one datagram with `fds` as `SCM_RIGHTS`, bypassing
/// the message codec (for malformed datagrams).
pub fn send_raw(sock: &SeqPacket, payload: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let iov = [IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
}

/// Expects an `error` with `code`, then EOF. A socket that was answered
/// `connected` instead is closed cleanly (so the device is free for the
/// next client) and reported as an error.
pub fn expect_refusal(sock: &SeqPacket, code: ErrorCode) -> Result<(), String> {
    let first = match sock.recv_timeout(REPLY_TIMEOUT) {
        Ok(Some((msg, fds))) => {
            if !fds.is_empty() {
                return Err(format!("answer {msg} carried {} fds", fds.len()));
            }
            msg
        }
        Ok(None) => return Err(format!("no answer within {REPLY_TIMEOUT:?}")),
        Err(e) => return Err(format!("expected error {code}, got {e:?}")),
    };
    if first.kind() == kind::CONNECTED {
        let _ = sock.send(&Message::new(kind::CLOSE), &[]);
        let _ = sock.recv_timeout(REPLY_TIMEOUT);
        let _ = sock.recv_timeout(REPLY_TIMEOUT);
        return Err(format!(
            "expected error {code}, but the device was connected: {first}"
        ));
    }
    if first.kind() != kind::ERROR || first.get("code") != Some(code.as_str()) {
        return Err(format!("expected error code={code}, got {first}"));
    }
    expect_eof(sock).map_err(|e| format!("after {first}: {e}"))
}

/// Expects the peer to close the socket, with nothing more sent.
pub fn expect_eof(sock: &SeqPacket) -> Result<(), String> {
    match sock.recv_timeout(REPLY_TIMEOUT) {
        Err(XenbusError::Closed) => Ok(()),
        Ok(None) => Err(format!("socket still open after {REPLY_TIMEOUT:?}")),
        Ok(Some((msg, _))) => Err(format!("expected EOF, got another message {msg}")),
        Err(e) => Err(format!("expected EOF, got {e:?}")),
    }
}

/// Frames of a [`RawRegion`]: 0 = grant table, 1 = ring, 2.. = data.
pub const RAW_PAGES: u32 = 8;
/// Grant ref of the ring page of a [`RawRegion`].
pub const RAW_RING_REF: u32 = 8;
/// Frame of the ring page.
pub const RAW_RING_FRAME: u32 = 1;

/// Grant ref of data page `i` (frame `2 + i`).
pub fn raw_data_gref(i: u32) -> u32 {
    RAW_RING_REF + 1 + i
}

/// What a hand-rolled frontend sets up before `connect`: a sealed region
/// with a one-page ring and a few data pages, all granted to the backend,
/// and two eventfds.
pub struct RawRegion {
    pub region: Arc<SharedRegion>,
    pub grants: GrantTable,
    pub ring: FrontRing<Blkif>,
    pub kick: EventChannel,
    pub notify: EventChannel,
}

impl RawRegion {
    pub fn new(backend_id: u16) -> Self {
        let region = Arc::new(SharedRegion::create("raw-guest", RAW_PAGES).expect("region"));
        Self::on(region, backend_id)
    }

    /// The same layout on `region` (of at least [`RAW_PAGES`] pages), for
    /// a guest that does something to its memory later.
    pub fn on(region: Arc<SharedRegion>, backend_id: u16) -> Self {
        let grants = GrantTable::new(region.clone(), 1).expect("grant table");
        grants
            .grant(RAW_RING_REF, backend_id, RAW_RING_FRAME, false)
            .expect("grant ring");
        for i in 0..RAW_PAGES - 2 {
            grants
                .grant(raw_data_gref(i), backend_id, 2 + i, false)
                .expect("grant data");
        }
        let ring = FrontRing::init(
            RingPages::contiguous(region.clone(), RAW_RING_FRAME, 1).expect("ring pages"),
        )
        .expect("ring init");
        RawRegion {
            region,
            grants,
            ring,
            kick: EventChannel::new().expect("eventfd"),
            notify: EventChannel::new().expect("eventfd"),
        }
    }

    /// The three descriptors of `connect`, in wire order.
    pub fn fds(&self) -> [RawFd; 3] {
        [
            self.region.file().as_raw_fd(),
            self.kick.as_fd().as_raw_fd(),
            self.notify.as_fd().as_raw_fd(),
        ]
    }
}

/// The keys of a valid order-0 `connect` for a [`RawRegion`], in wire
/// order; tests edit them to make bad ones.
pub fn connect_keys(device: &str) -> Vec<(String, String)> {
    [
        ("device", device),
        ("frontend-id", "1"),
        ("ring-ref", "8"),
        ("grant-frames", "1"),
        ("protocol", "x86_64-abi"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Encodes `kind` and `keys` exactly as given (no validation).
pub fn encode_text(kind: &str, keys: &[(String, String)]) -> Vec<u8> {
    let mut text = format!("{kind}\n");
    for (k, v) in keys {
        text.push_str(&format!("{k}={v}\n"));
    }
    text.into_bytes()
}

/// A frontend attached through a raw socket: it sees every control
/// message itself.
pub struct RawGuest {
    pub control: SeqPacket,
    pub mem: RawRegion,
}

impl RawGuest {
    /// Probes and connects `device` with a fresh [`RawRegion`].
    pub fn attach(socket: &Path, device: &str, backend_id: u16) -> Result<Self, String> {
        Self::attach_with(socket, device, RawRegion::new(backend_id))
    }

    /// Probes and connects `device` with `mem`.
    pub fn attach_with(socket: &Path, device: &str, mem: RawRegion) -> Result<Self, String> {
        let control = SeqPacket::connect(socket).map_err(|e| format!("connect: {e}"))?;
        control
            .send(&Message::probe(device), &[])
            .map_err(|e| format!("probe: {e}"))?;
        expect_kind(&control, kind::BACKEND)?;
        send_raw(
            &control,
            &encode_text(kind::CONNECT, &connect_keys(device)),
            &mem.fds(),
        )
        .map_err(|e| format!("send connect: {e}"))?;
        expect_kind(&control, kind::CONNECTED)?;
        Ok(RawGuest { control, mem })
    }

    /// Connects `device` with a fresh [`RawRegion`] through the message
    /// codec, without a probe; a refusal is returned as the answer.
    pub fn connect(socket: &Path, device: &str, backend_id: u16) -> Result<Self, Message> {
        let mem = RawRegion::new(backend_id);
        let req = ConnectRequest {
            device: device.into(),
            frontend_id: 1,
            ring_refs: vec![RAW_RING_REF],
            grant_frames: 1,
            feature_persistent: false,
        };
        let fds = DeviceFds {
            region: mem.region.file().try_clone().expect("dup region").into(),
            kick: mem.kick.try_clone_fd().expect("dup kick"),
            notify: mem.notify.try_clone_fd().expect("dup notify"),
        };
        let control = SeqPacket::connect(socket).expect("connect to the control socket");
        control
            .send(
                &req.to_message().expect("connect message"),
                &fds.as_borrowed(),
            )
            .expect("send connect");
        let (reply, _) = control
            .recv_timeout(CONNECT_TIMEOUT)
            .expect("control socket")
            .expect("an answer to connect");
        if reply.kind() == kind::CONNECTED {
            Ok(RawGuest { control, mem })
        } else {
            Err(reply)
        }
    }

    /// Publishes `req_prod = n` without writing any request (for a backend
    /// that never serves the ring), so the ring has pending work.
    pub fn post(&self, n: u32) {
        // Release: like RING_PUSH_REQUESTS, the index is published last.
        self.mem
            .region
            .store(n, Self::ring_offset(), Ordering::Release)
            .expect("store req_prod");
    }

    /// Nothing arrives on the control socket for `wait`: the guest is still
    /// Connected.
    pub fn assert_undisturbed(&self, wait: Duration) {
        if let Some((msg, _)) = self.control.recv_timeout(wait).expect("control socket") {
            panic!("the guest was told {msg}");
        }
    }

    /// The next control message for the guest.
    pub fn next_message(&self) -> Message {
        self.control
            .recv_timeout(CONNECT_TIMEOUT)
            .expect("control socket")
            .expect("a message for the guest")
            .0
    }

    /// Puts `req` on the ring, publishes, kicks if asked, and waits for one
    /// response.
    pub fn request(&mut self, req: &BlkifRequest) -> Result<BlkifResponse, String> {
        let ring = &mut self.mem.ring;
        ring.put_request(req)
            .map_err(|e| format!("put_request: {e}"))?;
        if ring.push_requests().map_err(|e| format!("push: {e}"))? {
            self.mem.kick.notify().map_err(|e| format!("kick: {e}"))?;
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(rsp) = ring
                .take_response()
                .map_err(|e| format!("take_response: {e}"))?
            {
                return Ok(rsp);
            }
            if ring
                .final_check_for_responses()
                .map_err(|e| format!("final check: {e}"))?
            {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no response to request id {} within {REPLY_TIMEOUT:?}",
                    req.id
                ));
            }
            self.mem
                .notify
                .wait(left)
                .map_err(|e| format!("wait: {e}"))?;
        }
    }

    /// Offset of data page `i` in the region.
    pub fn data_offset(i: u32) -> u64 {
        u64::from(2 + i) * PAGE
    }

    /// Byte offset of the ring's shared header.
    pub fn ring_offset() -> u64 {
        u64::from(RAW_RING_FRAME) * PAGE
    }
}

/// Receives one message and checks its kind (an `error` is reported with
/// its code and text).
pub fn expect_kind(sock: &SeqPacket, want: &str) -> Result<Message, String> {
    match sock.recv_timeout(REPLY_TIMEOUT) {
        Ok(Some((msg, _))) if msg.kind() == want => Ok(msg),
        Ok(Some((msg, _))) => Err(format!("expected {want}, got {msg}")),
        Ok(None) => Err(format!("no {want} within {REPLY_TIMEOUT:?}")),
        Err(e) => Err(format!("expected {want}, got {e:?}")),
    }
}

/// Writes a `grant_entry_v1` through the file (for regions a
/// [`SharedRegion`] refuses to map).
pub fn write_grant_via_file(file: &File, gref: u32, flags: u16, domid: u16, frame: u32) {
    let mut entry = [0u8; 8];
    entry[0..2].copy_from_slice(&flags.to_le_bytes());
    entry[2..4].copy_from_slice(&domid.to_le_bytes());
    entry[4..8].copy_from_slice(&frame.to_le_bytes());
    file.write_all_at(&entry, u64::from(gref) * 8)
        .expect("write grant entry");
}
