//! One guest's control connection: probe → connect → connected until the
//! socket closes.
//!
//! Until it is attached, a connection holds a slot of the control socket
//! ([`Ticket`]) and must keep talking: its first message is due within the
//! handshake timeout, each later one within the idle timeout, and it must
//! read its answers within the idle timeout too (docs/PROTOCOL.md §1.1).

use std::sync::Arc;
use std::time::Duration;

use std::os::fd::OwnedFd;

use shadowback_xenbus::netif::{NetAttachRequest, NetBackendInfo, NetConnectRequest, NetFds};
use shadowback_xenbus::protocol::{
    expect_no_fds, key, kind, AttachRequest, ConnectRequest, DeviceFds, ErrorCode,
};
use shadowback_xenbus::{AsyncSeqPacket, Message, Received, XenbusError, XenbusState};

use crate::access::Caller;
use crate::admission::Ticket;
use crate::class::ClassInfo;
use crate::config::ControlConfig;
use crate::device::{Attachment, DeviceHandle, Fault, Lost};
use crate::transport::check_net_fds;
use crate::Devices;

static NEXT_FRONTEND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long a connection that is not attached may stay silent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// Until the first message.
    pub handshake: Duration,
    /// Between later messages, and for the guest to read an answer.
    pub idle: Duration,
}

impl Timeouts {
    pub(crate) fn new(cfg: &ControlConfig) -> Self {
        Timeouts {
            handshake: Duration::from_millis(cfg.handshake_timeout_ms),
            idle: Duration::from_millis(cfg.idle_timeout_ms),
        }
    }
}

/// Serves one guest connection to its end. Protocol errors are answered
/// with an `error` message and the socket is closed; nothing a guest sends
/// can stop the supervisor or disturb another guest.
pub async fn serve_guest(
    conn: AsyncSeqPacket,
    devices: Arc<Devices>,
    ticket: Ticket,
    caller: Caller,
    timeouts: Timeouts,
) {
    let frontend = format!(
        "fe{}",
        NEXT_FRONTEND.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let session = Session {
        conn: &conn,
        ticket: &ticket,
        caller,
        timeouts,
    };
    match handshake(&session, &devices, &frontend).await {
        Ok(Some((device, attachment))) => {
            // Attached: at most one connection per disk, it no longer
            // counts against the socket's limits and may stay silent.
            ticket.release();
            let end = connected(&conn, &device, attachment.lost, &frontend).await;
            // Exactly one detach per attachment, tagged so that it can never
            // detach a guest that attached after us.
            device.detach(attachment.id).await;
            tracing::info!(%frontend, device = %device.name, "guest detached");
            let reply = match end {
                End::Closed => Message::new(kind::CLOSED).with(key::STATE, XenbusState::Closed),
                End::Refused(code, why) => Message::error(code, &clean(&why)),
                End::Gone => return,
            };
            let _ = session.send(&reply).await;
        }
        Ok(None) => {}
        Err((code, why)) => {
            // A client can repeat this as fast as it can connect.
            if let Some(suppressed) = ticket.admission().log_allowed() {
                tracing::info!(%frontend, ?code, %why, suppressed, "guest refused");
            }
            // Never wait for a client that does not read.
            let _ = conn.try_send(&Message::error(code, &clean(&why)));
        }
    }
}

/// A connection before it is attached.
struct Session<'a> {
    conn: &'a AsyncSeqPacket,
    ticket: &'a Ticket,
    caller: Caller,
    timeouts: Timeouts,
}

impl Session<'_> {
    /// The next message, within the handshake timeout for the `first`
    /// one and the idle timeout after that; a refusal if it does not come
    /// or the slot was taken for another connection. `Ok(None)`: EOF.
    async fn recv(&self, first: bool) -> Result<Option<Received>, Refusal> {
        let (limit, what) = if first {
            (self.timeouts.handshake, "handshake_timeout_ms")
        } else {
            (self.timeouts.idle, "idle_timeout_ms")
        };
        tokio::select! {
            got = tokio::time::timeout(limit, self.conn.recv()) => match got {
                Ok(Ok(m)) => Ok(Some(m)),
                Ok(Err(XenbusError::Closed)) => Ok(None),
                Ok(Err(e)) => Err(refuse(e)),
                Err(_) => Err((
                    ErrorCode::Eproto,
                    format!("no message within {} ms ({what})", limit.as_millis()),
                )),
            },
            _ = self.ticket.evicted() => Err((
                ErrorCode::Ebusy,
                "closed to make room for another client (max_connections)".to_string(),
            )),
        }
    }

    /// Sends an answer, waiting at most the idle timeout for the guest to
    /// make room for it.
    async fn send(&self, msg: &Message) -> Result<(), Refusal> {
        match tokio::time::timeout(self.timeouts.idle, self.conn.send(msg, &[])).await {
            Ok(sent) => sent.map_err(refuse),
            Err(_) => Err((
                ErrorCode::Eproto,
                format!(
                    "answer not read within {} ms (idle_timeout_ms)",
                    self.timeouts.idle.as_millis()
                ),
            )),
        }
    }
}

type Refusal = (ErrorCode, String);

fn refuse(e: XenbusError) -> Refusal {
    (ErrorCode::Einval, e.to_string())
}

/// Until Connected. `Ok(None)` means the guest went away.
async fn handshake(
    session: &Session<'_>,
    devices: &Arc<Devices>,
    frontend: &str,
) -> Result<Option<(DeviceHandle, Attachment)>, Refusal> {
    let mut first = true;
    loop {
        let Some((msg, fds)) = session.recv(std::mem::take(&mut first)).await? else {
            return Ok(None);
        };
        let caller = session.caller;
        let find = |msg: &Message| -> Result<DeviceHandle, Refusal> {
            let name = msg.require(key::DEVICE).map_err(refuse)?;
            devices
                .get(name)
                .ok_or_else(|| (ErrorCode::Enoent, format!("no device {name:?}")))
        };
        // A device the caller may use (docs/PROTOCOL.md §1.2).
        let lookup = |msg: &Message| -> Result<DeviceHandle, Refusal> {
            let dev = find(msg)?;
            caller.may_use(&dev)?;
            Ok(dev)
        };
        match msg.kind() {
            kind::PROBE => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                let dev = lookup(&msg)?;
                let answer = match &dev.info() {
                    ClassInfo::Disk(info) => info.backend_message(),
                    ClassInfo::Net(info) => info.to_message(kind::BACKEND, XenbusState::InitWait),
                };
                session.send(&answer).await?;
            }
            kind::STATUS => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                for dev in devices.list().iter().filter(|d| caller.sees(d)) {
                    session.send(&dev.stats().to_message(&dev.name)).await?;
                }
                session.send(&Message::new(kind::STATUS_END)).await?;
            }
            kind::FAULT => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                caller.may_operate(kind::FAULT)?;
                let dev = find(&msg)?;
                let fault = Fault::from_message(&msg).map_err(refuse)?;
                tracing::warn!(%frontend, device = %dev.name, ?fault, "fault requested");
                dev.fault(fault).await?;
                session.send(&Message::new(kind::OK)).await?;
            }
            operator @ (kind::DISK_ADD
            | kind::DISK_REMOVE
            | kind::DISK_LIST
            | kind::DISK_RESIZE
            | kind::DISK_SET) => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                caller.may_operate(operator)?;
                tracing::info!(%frontend, request = %msg, "device management");
                for answer in crate::manage::serve(devices, &msg).await? {
                    session.send(&answer).await?;
                }
            }
            kind::CONNECT => {
                // A vif's keys are its own (docs/PROTOCOL.md §4.7); an
                // unknown device is refused after the disk keys are
                // parsed, as it always was.
                let vif = msg
                    .get(key::DEVICE)
                    .and_then(|name| devices.get(name))
                    .and_then(|dev| match dev.info() {
                        ClassInfo::Net(info) => Some((dev, info)),
                        ClassInfo::Disk(_) => None,
                    });
                if let Some((dev, info)) = vif {
                    caller.may_use(&dev)?;
                    let attachment = connect_vif(&msg, fds, &dev, &info, frontend).await?;
                    let connected = info.to_message(kind::CONNECTED, XenbusState::Connected);
                    if let Err(e) = session.send(&connected).await {
                        dev.detach(attachment.id).await;
                        return Err(e);
                    }
                    tracing::info!(%frontend, device = %dev.name, "vif connected");
                    return Ok(Some((dev, attachment)));
                }
                let req = ConnectRequest::from_message(&msg).map_err(refuse)?;
                let fds = DeviceFds::from_received(&msg, fds).map_err(refuse)?;
                let dev = lookup(&msg)?;
                let ClassInfo::Disk(info) = dev.info() else {
                    return Err((ErrorCode::Einval, "not a disk".into()));
                };
                fds.check(&req).map_err(refuse)?;
                if req.ring_page_order().unwrap_or(u8::MAX) > info.max_ring_page_order {
                    return Err((
                        ErrorCode::E2big,
                        format!(
                            "ring-page-order above max-ring-page-order {}",
                            info.max_ring_page_order
                        ),
                    ));
                }
                let connected = info.connected_message();
                let attach = AttachRequest {
                    frontend: frontend.to_string(),
                    connect: req,
                };
                let attachment = dev.attach(attach, fds).await?;
                if let Err(e) = session.send(&connected).await {
                    dev.detach(attachment.id).await;
                    return Err(e);
                }
                tracing::info!(%frontend, device = %dev.name, "guest connected");
                return Ok(Some((dev, attachment)));
            }
            known
            @ (kind::CLOSE | kind::BACKEND | kind::CONNECTED | kind::CLOSED | kind::ERROR) => {
                return Err((
                    ErrorCode::Eproto,
                    format!("unexpected {known:?} before connect"),
                ))
            }
            other => return Err((ErrorCode::Einval, format!("unknown message kind {other:?}"))),
        }
    }
}

/// A vif's `connect` (docs/PROTOCOL.md §4.7): its keys, its 3 or 5
/// descriptors (checked like a disk's), offloads within what `backend`
/// offered; then `attach-net` with the vif's MAC and MTU.
async fn connect_vif(
    msg: &Message,
    fds: Vec<OwnedFd>,
    dev: &DeviceHandle,
    info: &NetBackendInfo,
    frontend: &str,
) -> Result<Attachment, Refusal> {
    let req = NetConnectRequest::from_message(msg).map_err(refuse)?;
    let fds = NetFds::from_received(msg, &req, fds).map_err(refuse)?;
    check_net_fds(&fds, req.grant_frames)?;
    if req.features.intersect(info.features) != req.features {
        return Err((
            ErrorCode::Einval,
            "an offload the backend did not offer was asked for".into(),
        ));
    }
    let attach = NetAttachRequest {
        frontend: frontend.to_string(),
        connect: req,
        mac: info.mac,
        mtu: info.mtu,
    };
    dev.attach_net(attach, fds).await
}

/// How a connected session ended.
enum End {
    /// The guest sent `close`: answer `closed` after detaching.
    Closed,
    /// Answer `error` after detaching.
    Refused(ErrorCode, String),
    /// The guest closed its socket.
    Gone,
}

/// While Connected: wait for `close`, EOF, or the device being lost;
/// whichever comes first ends the session.
async fn connected(
    conn: &AsyncSeqPacket,
    device: &DeviceHandle,
    mut lost: tokio::sync::oneshot::Receiver<Lost>,
    frontend: &str,
) -> End {
    let mut info = device.info.clone();
    info.borrow_and_update();
    let mut watching = true;
    loop {
        tokio::select! {
            changed = info.changed(), if watching => {
                watching = changed.is_ok();
                if watching {
                    announce_change(conn, &info.borrow_and_update(), frontend, &device.name);
                }
            }
            end = ended(conn, &mut lost, device, frontend) => return end,
        }
    }
}

/// `changed` (docs/PROTOCOL.md §4.4): the backend keys of a resized disk,
/// sent without waiting — a guest that does not read its socket misses it
/// and finds the new size on its next look.
fn announce_change(conn: &AsyncSeqPacket, info: &ClassInfo, frontend: &str, device: &str) {
    let ClassInfo::Disk(info) = info else {
        return;
    };
    let mut msg = Message::new(kind::CHANGED);
    for (k, v) in info.connected_message().iter() {
        msg.set(k, v);
    }
    match conn.try_send(&msg) {
        Ok(()) => {
            tracing::info!(%frontend, %device, sectors = info.sectors, "guest told of a resize")
        }
        Err(e) => tracing::warn!(%frontend, %device, error = %e, "guest not told of a resize"),
    }
}

/// The end of a connected session: `close`, EOF, or the device lost.
async fn ended(
    conn: &AsyncSeqPacket,
    lost: &mut tokio::sync::oneshot::Receiver<Lost>,
    device: &DeviceHandle,
    frontend: &str,
) -> End {
    tokio::select! {
        msg = conn.recv() => match msg {
            Ok((msg, _fds)) if msg.kind() == kind::CLOSE => End::Closed,
            Ok((msg, _fds)) => End::Refused(
                ErrorCode::Eproto,
                format!("unexpected {:?} while connected", msg.kind()),
            ),
            // EOF or a broken socket.
            Err(_) => End::Gone,
        },
        why = lost => {
            let (code, text) = match why {
                Ok(Lost::Disconnected(r)) => (ErrorCode::Eproto, format!("ring corrupt: {r}")),
                Ok(Lost::BackendDied(r)) => (ErrorCode::Enodev, format!("backend died: {r}")),
                Ok(Lost::Removed) => (ErrorCode::Enodev, "device removed by an operator".to_string()),
                Err(_) => (ErrorCode::Enodev, "device stopped".to_string()),
            };
            tracing::warn!(%frontend, device = %device.name, %text, "guest disconnected");
            End::Refused(code, text)
        }
    }
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { ' ' })
        .take(200)
        .collect()
}
