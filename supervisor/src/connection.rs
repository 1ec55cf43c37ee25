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
use crate::upgrade::{GuestState, Handover, UpgradeRequest};
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

/// What every connection task shares with the control loop: for a live
/// upgrade (docs/ARCHITECTURE.md §4.2), the guests that are connected and
/// a gate that attaches hold while they are under way.
pub(crate) struct ControlShared {
    guests: std::sync::Mutex<std::collections::HashMap<u64, Connected>>,
    next_guest: std::sync::atomic::AtomicU64,
    /// Read-held from a guest's `connect` until it is registered as
    /// connected; the upgrade write-holds it, so it sees no attach half
    /// done.
    pub attach_gate: tokio::sync::RwLock<()>,
    /// Where `upgrade` requests go (the control loop).
    pub upgrades: tokio::sync::mpsc::Sender<UpgradeRequest>,
    pub timeouts: Timeouts,
}

/// A connected guest, as the upgrade hands it over.
struct Connected {
    /// A duplicate of its socket: open for as long as the entry is.
    socket: OwnedFd,
    device: String,
    attachment: u64,
    frontend: String,
}

/// Removes a guest from [`ControlShared`]'s list when its session ends.
struct Registered<'a> {
    shared: &'a ControlShared,
    key: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.guests().remove(&self.key);
    }
}

impl ControlShared {
    pub(crate) fn new(
        timeouts: Timeouts,
        upgrades: tokio::sync::mpsc::Sender<UpgradeRequest>,
    ) -> Self {
        ControlShared {
            guests: Default::default(),
            next_guest: std::sync::atomic::AtomicU64::new(1),
            attach_gate: tokio::sync::RwLock::new(()),
            upgrades,
            timeouts,
        }
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Connected>> {
        // A map changed by whole entries: a panic cannot leave it torn.
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connected guests, for the upgrade's state.
    pub(crate) fn handover(&self, fds: &mut Handover) -> Vec<GuestState> {
        self.guests()
            .values()
            .map(|g| GuestState {
                socket: fds.fd(&g.socket),
                device: g.device.clone(),
                attachment: g.attachment,
                frontend: g.frontend.clone(),
            })
            .collect()
    }

    fn register(
        &self,
        conn: &AsyncSeqPacket,
        device: &str,
        attachment: u64,
        frontend: &str,
    ) -> Option<Registered<'_>> {
        use std::os::fd::AsFd;
        let socket = match conn.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                // Only an upgrade would miss it: the guest then sees EOF.
                tracing::warn!(%frontend, error = %e, "cannot keep the guest for an upgrade");
                return None;
            }
        };
        let key = self
            .next_guest
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.guests().insert(
            key,
            Connected {
                socket,
                device: device.to_string(),
                attachment,
                frontend: frontend.to_string(),
            },
        );
        Some(Registered { shared: self, key })
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
    shared: Arc<ControlShared>,
) {
    let frontend = format!(
        "fe{}",
        NEXT_FRONTEND.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let session = Session {
        conn: &conn,
        ticket: &ticket,
        caller,
        timeouts: shared.timeouts,
        shared: &shared,
    };
    match handshake(&session, &devices, &frontend).await {
        Ok(Some((device, attachment, gate))) => {
            // Attached: at most one connection per disk, it no longer
            // counts against the socket's limits and may stay silent.
            ticket.release();
            serve_attached(&conn, device, attachment, frontend, &shared, Some(gate)).await;
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

/// A guest's connection once it is attached, until its session ends:
/// after `connect`, or in the binary that took over from the one it
/// connected to (a live upgrade, `gate` then `None`).
pub(crate) async fn serve_attached(
    conn: &AsyncSeqPacket,
    device: DeviceHandle,
    attachment: Attachment,
    frontend: String,
    shared: &ControlShared,
    gate: Option<tokio::sync::RwLockReadGuard<'_, ()>>,
) {
    let registered = shared.register(conn, &device.name, attachment.id, &frontend);
    drop(gate);
    let end = connected(conn, &device, attachment.lost, &frontend).await;
    // Before anything waits: an upgrade from now on hands over no
    // connection for this attachment, and the new binary detaches it.
    drop(registered);
    // Exactly one detach per attachment, tagged so that it can never
    // detach a guest that attached after us.
    device.detach(attachment.id).await;
    tracing::info!(%frontend, device = %device.name, "guest detached");
    let reply = match end {
        End::Closed => Message::new(kind::CLOSED).with(key::STATE, XenbusState::Closed),
        End::Refused(code, why) => Message::error(code, &clean(&why)),
        End::Gone => return,
    };
    let _ = tokio::time::timeout(shared.timeouts.idle, conn.send(&reply, &[])).await;
}

/// A connection before it is attached.
struct Session<'a> {
    conn: &'a AsyncSeqPacket,
    ticket: &'a Ticket,
    caller: Caller,
    timeouts: Timeouts,
    shared: &'a ControlShared,
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

/// Connected: the device, the attachment and the attach gate, held until
/// the guest is registered (see [`ControlShared::attach_gate`]).
type Attached<'a> = (
    DeviceHandle,
    Attachment,
    tokio::sync::RwLockReadGuard<'a, ()>,
);

/// Until Connected. `Ok(None)` means the guest went away.
async fn handshake<'a>(
    session: &Session<'a>,
    devices: &Arc<Devices>,
    frontend: &str,
) -> Result<Option<Attached<'a>>, Refusal> {
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
                // A live upgrade waits for the change, and a change waits
                // for an upgrade that failed to resume.
                let _gate = session.shared.attach_gate.read().await;
                tracing::info!(%frontend, request = %msg, "device management");
                for answer in crate::manage::serve(devices, &msg).await? {
                    session.send(&answer).await?;
                }
            }
            kind::UPGRADE => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                caller.may_operate(kind::UPGRADE)?;
                upgrade(session, &msg, frontend).await?;
                return Ok(None);
            }
            kind::CONNECT => {
                let gate = session.shared.attach_gate.read().await;
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
                    return Ok(Some((dev, attachment, gate)));
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
                return Ok(Some((dev, attachment, gate)));
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

/// `upgrade` (docs/PROTOCOL.md §6a): hands the request to the control
/// loop. If the new binary takes over, it answers on this connection; an
/// `Err` is the old one's refusal.
async fn upgrade(session: &Session<'_>, msg: &Message, frontend: &str) -> Result<(), Refusal> {
    use std::os::fd::AsFd;
    let binary = msg.get(key::BINARY).map(std::path::PathBuf::from);
    tracing::warn!(%frontend, ?binary, "upgrade requested");
    let requester = session
        .conn
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| (ErrorCode::Enodev, format!("dup: {e}")))?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = UpgradeRequest {
        binary,
        requester,
        reply,
    };
    let stopped = || (ErrorCode::Enodev, "the supervisor is stopping".to_string());
    session
        .shared
        .upgrades
        .send(request)
        .await
        .map_err(|_| stopped())?;
    answer.await.unwrap_or_else(|_| Err(stopped()))
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
