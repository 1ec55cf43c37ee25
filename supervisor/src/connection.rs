//! One guest's control connection: probe → connect → connected until the
//! socket closes.

use std::sync::Arc;

use std::os::fd::OwnedFd;

use shadowback_xenbus::netif::{NetAttachRequest, NetBackendInfo, NetConnectRequest, NetFds};
use shadowback_xenbus::protocol::{
    expect_no_fds, key, kind, AttachRequest, ConnectRequest, DeviceFds, ErrorCode,
};
use shadowback_xenbus::{AsyncSeqPacket, Message, XenbusError, XenbusState};

use crate::class::ClassInfo;
use crate::device::{Attachment, DeviceHandle, Fault, Lost};
use crate::transport::check_net_fds;
use crate::Devices;

static NEXT_FRONTEND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves one guest connection to its end. Protocol errors are answered
/// with an `error` message and the socket is closed; nothing a guest sends
/// can stop the supervisor or disturb another guest.
pub async fn serve_guest(conn: AsyncSeqPacket, devices: Arc<Devices>) {
    let frontend = format!(
        "fe{}",
        NEXT_FRONTEND.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    match handshake(&conn, &devices, &frontend).await {
        Ok(Some((device, attachment))) => {
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
            let _ = conn.send(&reply, &[]).await;
        }
        Ok(None) => {}
        Err((code, why)) => {
            tracing::info!(%frontend, ?code, %why, "guest refused");
            let _ = conn.send(&Message::error(code, &clean(&why)), &[]).await;
        }
    }
}

type Refusal = (ErrorCode, String);

fn refuse(e: XenbusError) -> Refusal {
    (ErrorCode::Einval, e.to_string())
}

/// Until Connected. `Ok(None)` means the guest went away.
async fn handshake(
    conn: &AsyncSeqPacket,
    devices: &Devices,
    frontend: &str,
) -> Result<Option<(DeviceHandle, Attachment)>, Refusal> {
    loop {
        let (msg, fds) = match conn.recv().await {
            Ok(m) => m,
            Err(XenbusError::Closed) => return Ok(None),
            Err(e) => return Err(refuse(e)),
        };
        let lookup = |msg: &Message| -> Result<DeviceHandle, Refusal> {
            let name = msg.require(key::DEVICE).map_err(refuse)?;
            devices
                .get(name)
                .cloned()
                .ok_or_else(|| (ErrorCode::Enoent, format!("no device {name:?}")))
        };
        match msg.kind() {
            kind::PROBE => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                let dev = lookup(&msg)?;
                let answer = match &dev.info {
                    ClassInfo::Disk(info) => info.backend_message(),
                    ClassInfo::Net(info) => info.to_message(kind::BACKEND, XenbusState::InitWait),
                };
                conn.send(&answer, &[]).await.map_err(refuse)?;
            }
            kind::STATUS => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                for dev in devices.iter() {
                    conn.send(&dev.stats().to_message(&dev.name), &[])
                        .await
                        .map_err(refuse)?;
                }
                conn.send(&Message::new(kind::STATUS_END), &[])
                    .await
                    .map_err(refuse)?;
            }
            kind::FAULT => {
                expect_no_fds(&msg, fds).map_err(refuse)?;
                let dev = lookup(&msg)?;
                let fault = Fault::from_message(&msg).map_err(refuse)?;
                tracing::warn!(%frontend, device = %dev.name, ?fault, "fault requested");
                dev.fault(fault).await?;
                conn.send(&Message::new(kind::OK), &[])
                    .await
                    .map_err(refuse)?;
            }
            kind::CONNECT => {
                // A vif's keys are its own (docs/PROTOCOL.md §4.7); an
                // unknown device is refused after the disk keys are
                // parsed, as it always was.
                let vif = msg
                    .get(key::DEVICE)
                    .and_then(|name| devices.get(name))
                    .and_then(|dev| match &dev.info {
                        ClassInfo::Net(info) => Some((dev.clone(), info.clone())),
                        ClassInfo::Disk(_) => None,
                    });
                if let Some((dev, info)) = vif {
                    let attachment = connect_vif(&msg, fds, &dev, &info, frontend).await?;
                    let connected = info.to_message(kind::CONNECTED, XenbusState::Connected);
                    if let Err(e) = conn.send(&connected, &[]).await {
                        dev.detach(attachment.id).await;
                        return Err(refuse(e));
                    }
                    tracing::info!(%frontend, device = %dev.name, "vif connected");
                    return Ok(Some((dev, attachment)));
                }
                let req = ConnectRequest::from_message(&msg).map_err(refuse)?;
                let fds = DeviceFds::from_received(&msg, fds).map_err(refuse)?;
                let dev = lookup(&msg)?;
                let ClassInfo::Disk(info) = &dev.info else {
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
                if let Err(e) = conn.send(&connected, &[]).await {
                    dev.detach(attachment.id).await;
                    return Err(refuse(e));
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
    lost: tokio::sync::oneshot::Receiver<Lost>,
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
