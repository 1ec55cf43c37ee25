//! One exported disk: its backend process and the frontend attached to it.
//!
//! A device task owns the backend's control channel and child process.
//! Connection tasks talk to it through [`DeviceHandle`]; it forwards
//! `attach`/`detach` to the backend and tells the connection when the
//! backend disconnects its frontend (ring corruption) or dies.

use std::time::Duration;

use shadowback_xenbus::protocol::{kind, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::{AsyncSeqPacket, BackendInfo, DiskMode, Message};
use tokio::sync::{mpsc, oneshot};

use crate::config::DiskConfig;
use crate::spawn::{open_disk, spawn_backend, BackendCommand};
use crate::SupervisorError;

/// How long a backend may take to answer `attach`/`detach`.
const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a frontend lost its device (sent to its connection task).
#[derive(Debug, Clone)]
pub enum Lost {
    /// The backend found the ring corrupt.
    Disconnected(String),
    /// The backend process is gone.
    BackendDied(String),
}

/// A frontend's hold on the device: detach with `id`; `lost` fires if the
/// device goes away first.
#[derive(Debug)]
pub struct Attachment {
    pub id: u64,
    pub lost: oneshot::Receiver<Lost>,
}

enum Command {
    Attach {
        req: AttachRequest,
        fds: DeviceFds,
        reply: oneshot::Sender<Result<Attachment, (ErrorCode, String)>>,
    },
    /// Detach attachment `id`; a stale id (already detached, or lost) is
    /// acknowledged without touching the current frontend.
    Detach { id: u64, reply: oneshot::Sender<()> },
}

/// Cheap handle to a device task.
#[derive(Clone)]
pub struct DeviceHandle {
    pub name: String,
    pub info: BackendInfo,
    tx: mpsc::Sender<Command>,
}

impl DeviceHandle {
    /// Asks the backend to attach; on success returns a receiver that fires
    /// if the device is lost while attached.
    pub async fn attach(
        &self,
        req: AttachRequest,
        fds: DeviceFds,
    ) -> Result<Attachment, (ErrorCode, String)> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Attach { req, fds, reply })
            .await
            .map_err(|_| (ErrorCode::Enodev, "device task stopped".to_string()))?;
        rx.await
            .unwrap_or_else(|_| Err((ErrorCode::Enodev, "device task stopped".to_string())))
    }

    /// Detaches attachment `id` (waits until the backend drained it).
    pub async fn detach(&self, id: u64) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Detach { id, reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Opens the disk, starts its backend and the task that owns both.
pub fn start_device(
    cfg: &DiskConfig,
    cmd: &BackendCommand,
) -> Result<DeviceHandle, SupervisorError> {
    let disk = open_disk(cfg)?;
    let (child, control) = spawn_backend(cmd, cfg, &disk)?;
    let control =
        AsyncSeqPacket::new(control).map_err(|e| SupervisorError::Spawn(e.to_string()))?;
    let info = BackendInfo {
        backend_id: cfg.backend_id,
        sectors: disk.sectors,
        sector_size: 512,
        physical_sector_size: 4096,
        mode: if cfg.readonly {
            DiskMode::ReadOnly
        } else {
            DiskMode::ReadWrite
        },
        feature_flush_cache: true,
        feature_discard: cfg.discard && !cfg.readonly,
        discard_granularity: 4096,
        discard_alignment: 0,
        max_indirect_segments: 256,
        max_ring_page_order: cfg.max_ring_page_order,
        info: u32::from(cfg.readonly) * 4,
    };
    let (tx, rx) = mpsc::channel(16);
    let task = DeviceTask {
        name: cfg.name.clone(),
        control,
        child,
        _disk: disk,
        attached: None,
        next_attachment: 1,
        dead: None,
    };
    tokio::spawn(task.run(rx));
    Ok(DeviceHandle {
        name: cfg.name.clone(),
        info,
        tx,
    })
}

struct DeviceTask {
    name: String,
    control: AsyncSeqPacket,
    child: tokio::process::Child,
    /// The supervisor keeps the disk open for as long as the device exists.
    _disk: crate::spawn::Disk,
    /// The current attachment's id, and what fires when it loses the
    /// device. Stays set (with a fired sender) after a loss until the
    /// connection detaches, so the backend is told `detach` exactly once.
    attached: Option<(u64, Option<oneshot::Sender<Lost>>)>,
    next_attachment: u64,
    /// Set once the backend process has exited.
    dead: Option<String>,
}

impl DeviceTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Attach { req, fds, reply }) => {
                        let res = self.attach(req, fds).await;
                        let _ = reply.send(res);
                    }
                    Some(Command::Detach { id, reply }) => {
                        self.detach(id).await;
                        let _ = reply.send(());
                    }
                    None => break,
                },
                msg = self.control.recv(), if self.dead.is_none() => match msg {
                    Ok((msg, _fds)) => self.unsolicited(msg),
                    Err(e) => {
                        tracing::debug!(device = %self.name, error = %e, "backend control channel closed");
                        self.backend_gone().await;
                    }
                },
                status = self.child.wait(), if self.dead.is_none() => {
                    tracing::error!(device = %self.name, ?status, "backend exited");
                    self.dead = Some(format!("backend exited: {status:?}"));
                    self.lose(Lost::BackendDied(format!("{status:?}")));
                }
            }
        }
        let _ = self.child.start_kill();
    }

    async fn backend_gone(&mut self) {
        let status = self.child.wait().await;
        tracing::error!(device = %self.name, ?status, "backend exited");
        self.dead = Some(format!("backend exited: {status:?}"));
        self.lose(Lost::BackendDied(format!("{status:?}")));
    }

    fn lose(&mut self, why: Lost) {
        if let Some(tx) = self.attached.as_mut().and_then(|(_, tx)| tx.take()) {
            let _ = tx.send(why);
        }
    }

    fn unsolicited(&mut self, msg: Message) {
        if msg.kind() == kind::DISCONNECT {
            let reason = msg.get("reason").unwrap_or("ring corrupt").to_string();
            tracing::warn!(device = %self.name, %reason, "backend disconnected the frontend");
            self.lose(Lost::Disconnected(reason));
        } else {
            tracing::warn!(device = %self.name, kind = msg.kind(), "unexpected message from backend");
        }
    }

    /// Waits for the reply to a request, handling unsolicited messages on
    /// the way.
    async fn reply(&mut self) -> Result<Message, String> {
        loop {
            let got = tokio::time::timeout(BACKEND_REPLY_TIMEOUT, self.control.recv()).await;
            match got {
                Err(_) => return Err("backend did not answer".into()),
                Ok(Err(e)) => {
                    self.backend_gone().await;
                    return Err(format!("backend gone: {e}"));
                }
                Ok(Ok((msg, _))) if msg.kind() == kind::DISCONNECT => self.unsolicited(msg),
                Ok(Ok((msg, _))) => return Ok(msg),
            }
        }
    }

    async fn attach(
        &mut self,
        req: AttachRequest,
        fds: DeviceFds,
    ) -> Result<Attachment, (ErrorCode, String)> {
        if let Some(why) = &self.dead {
            return Err((ErrorCode::Enodev, why.clone()));
        }
        if self.attached.is_some() {
            return Err((
                ErrorCode::Ebusy,
                format!("device {} is already connected", self.name),
            ));
        }
        let msg = req
            .to_message()
            .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
        self.control
            .send(&msg, &fds.as_borrowed())
            .await
            .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
        drop(fds);
        let reply = self.reply().await.map_err(|e| (ErrorCode::Enodev, e))?;
        match reply.kind() {
            kind::ATTACHED => {
                let (tx, lost) = oneshot::channel();
                let id = self.next_attachment;
                self.next_attachment += 1;
                self.attached = Some((id, Some(tx)));
                Ok(Attachment { id, lost })
            }
            kind::ERROR => {
                let code = reply
                    .get("code")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(ErrorCode::Einval);
                Err((
                    code,
                    reply
                        .get("message")
                        .unwrap_or("backend refused")
                        .to_string(),
                ))
            }
            other => Err((ErrorCode::Eproto, format!("backend answered {other}"))),
        }
    }

    async fn detach(&mut self, id: u64) {
        if self.attached.as_ref().map(|(current, _)| *current) != Some(id) {
            tracing::debug!(device = %self.name, id, "stale detach ignored");
            return;
        }
        self.attached = None;
        if self.dead.is_some() {
            return;
        }
        if self
            .control
            .send(&Message::new(kind::DETACH), &[])
            .await
            .is_err()
        {
            return;
        }
        match self.reply().await {
            Ok(msg) if msg.kind() == kind::DETACHED => {}
            Ok(msg) => {
                tracing::warn!(device = %self.name, kind = msg.kind(), "unexpected reply to detach")
            }
            Err(e) => tracing::warn!(device = %self.name, error = %e, "detach failed"),
        }
    }
}
