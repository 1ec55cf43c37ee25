//! The two halves of a live upgrade: [`upgrade`] in the old binary
//! (pause, describe, `execve`; or resume if that fails) and [`resume`] in
//! the new one (take the descriptors, rebuild the devices, connections
//! and vhost-user sockets around them).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::{AsyncSeqPacket, AsyncSeqPacketListener, Message};
use tokio::sync::oneshot;

use super::{Adopted, Handover, State, STATE_FD_ENV, STATE_VERSION};
use crate::connection::ControlShared;
use crate::device::{self, Attachment, DeviceHandle, Refusal};
use crate::pool::StandbyPool;
use crate::spawn::BackendCommand;
use crate::vhost_user::VhostUserServer;
use crate::{Devices, Exported, Started, SupervisorError};

/// How long a vhost-user thread may take to reach a point between two
/// requests (a request that has started to arrive is given the message
/// timeout to complete).
const VHOST_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// An operator's `upgrade`, for the control loop.
pub(crate) struct UpgradeRequest {
    /// The binary to exec; `None`: this one's path.
    pub binary: Option<PathBuf>,
    /// The connection that asked: the new binary answers it.
    pub requester: OwnedFd,
    /// The old binary's refusal; never sent if the upgrade happened.
    pub reply: oneshot::Sender<Result<(), Refusal>>,
}

/// What the control loop serves, as the upgrade needs it.
pub(crate) struct Serving<'a> {
    pub listener: &'a AsyncSeqPacketListener,
    pub metrics_listener: Option<BorrowedFd<'a>>,
    pub devices: &'a Devices,
    pub shared: &'a ControlShared,
}

/// Everything paused, with what resumes it.
#[derive(Default)]
struct Paused {
    devices: Vec<oneshot::Sender<()>>,
    vhost: Vec<std::sync::mpsc::Sender<()>>,
}

impl Paused {
    /// Dropping the senders resumes every paused task and thread.
    fn resume(self) {
        drop(self);
    }
}

/// Upgrades to `request.binary`: returns only if this binary goes on
/// serving (the refusal was sent to the requester).
pub(crate) async fn upgrade(request: UpgradeRequest, serving: Serving<'_>) {
    let UpgradeRequest {
        binary,
        requester,
        reply,
    } = request;
    let result = prepare_and_exec(binary, &requester, serving).await;
    if let Err((_, why)) = &result {
        tracing::error!(%why, "upgrade failed; this binary goes on serving");
    }
    let _ = reply.send(result);
}

async fn prepare_and_exec(
    binary: Option<PathBuf>,
    requester: &OwnedFd,
    s: Serving<'_>,
) -> Result<(), Refusal> {
    let binary = match binary {
        Some(b) => b,
        None => super::default_binary().map_err(|why| (ErrorCode::Enoent, why))?,
    };
    let check = binary.clone();
    tokio::task::spawn_blocking(move || super::check_binary(&check))
        .await
        .map_err(|e| (ErrorCode::Enodev, format!("version check: {e}")))?
        .map_err(|why| (ErrorCode::Einval, why))?;
    let started = Instant::now();
    // No attach and no device added, removed or changed is half done from
    // here on.
    let gate = s.shared.attach_gate.write().await;
    let (handles, pause_slots): (Vec<DeviceHandle>, Vec<_>) = {
        let exports = s.devices.exports();
        exports
            .list
            .iter()
            .map(|d| (d.handle.clone(), d.vhost.as_ref().map(|v| v.pause_slot())))
            .unzip()
    };
    let mut paused = Paused::default();
    let mut fds = Handover::default();
    let mut vhost = Vec::new();
    for slot in pause_slots.into_iter().flatten() {
        match slot.freeze(VHOST_PAUSE_TIMEOUT).await {
            Ok(frozen) => {
                paused.vhost.push(frozen.resume);
                fds.merge(frozen.fds);
                vhost.push(frozen.state);
            }
            Err(why) => {
                paused.resume();
                return Err((ErrorCode::Eagain, why));
            }
        }
    }
    let mut devices = Vec::new();
    for dev in &handles {
        match dev.freeze().await {
            Ok(frozen) => {
                paused.devices.push(frozen.resume);
                fds.merge(frozen.fds);
                devices.push(frozen.state);
            }
            Err(why) => {
                paused.resume();
                return Err((ErrorCode::Enodev, format!("device {}: {why}", dev.name)));
            }
        }
    }
    // Nothing awaits from here to `execve`: the guests listed are exactly
    // those connected.
    let guests = s.shared.handover(&mut fds);
    let mut state = State {
        version: STATE_VERSION,
        config: s.devices.exports().cfg.clone(),
        control: fds.fd(s.listener),
        metrics_listener: s.metrics_listener.map(|l| fds.fd(l)),
        requester: Some(fds.fd(requester)),
        next_fence_slot: crate::spawn::next_fence_slot(),
        devices,
        block_pool: s.devices.block_pool.handover(&mut fds),
        net_pool: s.devices.net_pool.handover(&mut fds),
        guests,
        vhost,
        fds: Vec::new(),
    };
    state.fds = fds.list();
    let memfd = match state.to_memfd() {
        Ok(f) => f,
        Err(why) => {
            paused.resume();
            return Err((ErrorCode::Enodev, why));
        }
    };
    fds.fd(&memfd);
    let exec_error = match fds.set_inherited(true) {
        Ok(()) => {
            tracing::warn!(binary = %binary.display(), fds = state.fds.len(),
                paused_us = started.elapsed().as_micros() as u64, "upgrading: exec");
            exec(&binary, memfd.as_raw_fd()).to_string()
        }
        Err(why) => why,
    };
    // Still here: nothing may leak into the backends started from now on.
    if let Err(why) = fds.set_inherited(false) {
        tracing::error!(%why, "could not make the handed-over descriptors close-on-exec again");
    }
    drop(gate);
    paused.resume();
    Err((
        ErrorCode::Enoent,
        format!("exec {}: {exec_error}", binary.display()),
    ))
}

/// `execve`s `binary` in place of this process, with this process's
/// arguments and the state memfd's number in [`STATE_FD_ENV`]; returns
/// only on failure.
fn exec(binary: &Path, state: RawFd) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| binary.as_os_str().to_owned());
    std::process::Command::new(binary)
        .arg0(argv0)
        .args(args)
        .env(STATE_FD_ENV, state.to_string())
        .exec()
}

/// The state this process was exec'd with, if it was (the variable is
/// removed: backends must not inherit it).
pub fn take_state_fd() -> Result<Option<std::fs::File>, SupervisorError> {
    let Some(value) = std::env::var_os(STATE_FD_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(STATE_FD_ENV);
    let raw: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|&fd| fd >= 0)
        .ok_or_else(|| SupervisorError::Runtime(format!("{STATE_FD_ENV}={value:?}")))?;
    let adopted = Adopted::take(&[raw])?;
    Ok(Some(adopted.file(raw)?))
}

/// The connections a resumed binary serves once its control loop runs.
pub(crate) struct Pending {
    /// Connected guests, each with its device's attachment.
    guests: Vec<(AsyncSeqPacket, DeviceHandle, Attachment, String)>,
    /// Attachments nobody holds any more (the frontend went while the
    /// old binary was paused): detached once serving.
    orphans: Vec<(DeviceHandle, u64)>,
    requester: Option<AsyncSeqPacket>,
}

/// Rebuilds everything the previous binary described in `file`.
pub(crate) fn resume(
    file: std::fs::File,
    backend: &BackendCommand,
    listeners: Arc<crate::fdstore::Listeners>,
) -> Result<Started, SupervisorError> {
    let state = State::read(file)?;
    let fds = Adopted::take(&state.fds)?;
    crate::spawn::continue_fence_slots(state.next_fence_slot);
    let cfg = state.config.clone();
    let backend = if cfg.backend.confine {
        backend.clone()
    } else {
        backend.unconfined()
    };
    let err = |why: String| SupervisorError::Runtime(format!("upgrade state: {why}"));
    let listener = AsyncSeqPacketListener::adopt(fds.fd(state.control)?, &cfg.socket)
        .map_err(|e| err(format!("control socket: {e}")))?;
    listeners.kept_before(crate::fdstore::CONTROL_NAME);
    let metrics_listener = match state.metrics_listener {
        Some(fd) => {
            let l = std::net::TcpListener::from(fds.fd(fd)?);
            l.set_nonblocking(true)
                .map_err(|e| err(format!("metrics listener: {e}")))?;
            Some(
                tokio::net::TcpListener::from_std(l)
                    .map_err(|e| err(format!("metrics listener: {e}")))?,
            )
        }
        None => None,
    };
    // docs/ARCHITECTURE.md §7.5: the pools as they were (a disk added at
    // run time may have grown the block pool), with their spares.
    let (block_pool, net_pool) = StandbyPool::per_class(&cfg, &backend);
    block_pool.inherit(&state.block_pool, &fds)?;
    net_pool.inherit(&state.net_pool, &fds)?;
    let mut devices = Vec::new();
    let mut attachments: HashMap<String, Attachment> = HashMap::new();
    let missing = |name: &str| err(format!("no state for device {name}"));
    // In the order the previous binary listed them (disks added at run
    // time after the vifs).
    for st in &state.devices {
        let name = st.name.as_str();
        let (handle, attachment) = match (
            cfg.disks.iter().find(|d| d.name == name),
            cfg.nics.iter().find(|n| n.name == name),
        ) {
            (Some(disk), _) => {
                let pool = disk.standby.then(|| block_pool.clone());
                device::adopt_disk(disk, &cfg.limits, &backend, st, &fds, pool)?
            }
            (None, Some(nic)) => {
                let pool = nic.standby.then(|| net_pool.clone());
                device::adopt_nic(nic, &cfg.limits, &backend, st, &fds, pool)?
            }
            (None, None) => return Err(err(format!("device {name} is not configured"))),
        };
        if let Some(a) = attachment {
            attachments.insert(st.name.clone(), a);
        }
        devices.push(handle);
    }
    if let Some(gone) = cfg
        .disks
        .iter()
        .map(|d| &d.name)
        .chain(cfg.nics.iter().map(|n| &n.name))
        .find(|n| !devices.iter().any(|d| d.name == **n))
    {
        return Err(missing(gone));
    }
    let handle = |name: &str| {
        devices
            .iter()
            .find(|d| d.name == name)
            .cloned()
            .ok_or_else(|| missing(name))
    };
    // Whoever held an attachment takes it back: a vhost-user connection
    // or a guest's control connection, by its id.
    let mut claim = |device: &str, id: Option<u64>| -> Option<Attachment> {
        let held = attachments.get(device)?;
        (Some(held.id) == id).then(|| attachments.remove(device))?
    };
    let mut vhost: HashMap<String, VhostUserServer> = HashMap::new();
    for vs in &state.vhost {
        let dev = handle(&vs.device)?;
        let attachment = claim(
            &vs.device,
            vs.connection.as_ref().and_then(|c| c.attachment),
        );
        let server = match (
            cfg.disks.iter().find(|d| d.name == vs.device),
            cfg.nics.iter().find(|n| n.name == vs.device),
        ) {
            (Some(disk), _) => VhostUserServer::adopt(disk, dev, vs, attachment, &fds)?,
            (None, Some(nic)) => VhostUserServer::adopt(nic, dev, vs, attachment, &fds)?,
            (None, None) => return Err(missing(&vs.device)),
        };
        listeners.kept_before(&crate::fdstore::vhost_user_name(&vs.device));
        vhost.insert(vs.device.clone(), server);
    }
    let mut guests = Vec::new();
    for g in &state.guests {
        let dev = handle(&g.device)?;
        let Some(attachment) = claim(&g.device, Some(g.attachment)) else {
            tracing::warn!(device = %g.device, frontend = %g.frontend,
                "a connected guest without its attachment: closing it");
            continue;
        };
        let conn = AsyncSeqPacket::from_fd(fds.fd(g.socket)?)
            .map_err(|e| err(format!("guest socket: {e}")))?;
        guests.push((conn, dev, attachment, g.frontend.clone()));
    }
    let mut orphans = Vec::new();
    for (name, attachment) in attachments {
        orphans.push((handle(&name)?, attachment.id));
    }
    let requester = match state.requester {
        Some(fd) => AsyncSeqPacket::from_fd(fds.fd(fd)?).ok(),
        None => None,
    };
    tracing::info!(
        devices = devices.len(),
        guests = guests.len(),
        vhost = vhost.len(),
        orphans = orphans.len(),
        block_spares = block_pool.ready(),
        net_spares = net_pool.ready(),
        "took over from the previous binary"
    );
    let list = devices
        .into_iter()
        .map(|handle| Exported {
            vhost: vhost.remove(&handle.name),
            handle,
        })
        .collect();
    Ok(Started {
        cfg,
        backend,
        listener,
        metrics_listener,
        list,
        block_pool,
        net_pool,
        listeners,
        pending: Some(Pending {
            guests,
            orphans,
            requester,
        }),
    })
}

impl Pending {
    /// Starts serving the connections taken over and answers the
    /// operator who asked for the upgrade; `shared` is the control loop's.
    pub(crate) fn start(self, shared: &std::sync::Arc<ControlShared>) {
        for (conn, dev, attachment, frontend) in self.guests {
            let shared = shared.clone();
            tokio::spawn(async move {
                crate::connection::serve_attached(&conn, dev, attachment, frontend, &shared, None)
                    .await;
            });
        }
        for (dev, id) in self.orphans {
            tracing::info!(device = %dev.name, id, "detaching a frontend that left during the upgrade");
            tokio::spawn(async move { dev.detach(id).await });
        }
        if let Some(conn) = self.requester {
            let msg = Message::new(kind::UPGRADED)
                .with(key::PID, std::process::id())
                .with(key::STATE_VERSION, STATE_VERSION);
            if let Err(e) = conn.try_send(&msg) {
                tracing::warn!(error = %e, "could not answer the upgrade request");
            }
        }
    }
}
