//! The supervisor: the control socket guests attach through, one backend
//! process per device, and the fds that must outlive a backend.
//!
//! It plays the roles of XenStore and the toolstack (docs/ARCHITECTURE.md
//! §1, §4; docs/PROTOCOL.md): a guest probes a device (`backend`,
//! InitWait), connects with its ring grants and fds (`connected`,
//! Connected) and stays connected for as long as its socket is open.
//! Guests never talk to a backend directly.
//!
//! It also recovers backends (docs/ARCHITECTURE.md §7, `device/`): each
//! device keeps the frontend's fds and a shadow log per ring, detects a
//! dead backend through its pidfd and a hung one through the log's
//! heartbeat, fences it and lets a hot standby (or a new instance) replay
//! the logs, while the frontend stays Connected. Counters per device:
//! [`DeviceStats`], reported by the `status` control message and
//! [`SupervisorThread::status`]; faults are injected with `fault` or
//! [`SupervisorThread::fault`].
//!
//! A `[[nic]]` is a vif served over Xen netif rings by `shadowback
//! netback` (docs/ARCHITECTURE.md §11.6): the supervisor creates its wire
//! (a cable to another vif, or a TAP) at start and lends it to every
//! backend instance, so a takeover keeps the link and its queued frames.
//!
//! A disk with `vhost_user` in its config is also served to a VMM as a
//! vhost-user-blk device on that socket ([`VhostUserServer`],
//! docs/ARCHITECTURE.md §8): the supervisor keeps the VMM's memory,
//! eventfds and in-flight region, so a data-plane failure is recovered
//! exactly like a ring backend's.
//!
//! Layout: `device/` (the handle, the task, takeover) is the same for
//! every device; what depends on the kind of device is asked of its class
//! (`class/`: [`VirtioModel`], backend keys, spawn arguments, I/O fence),
//! and what depends on the wire of the frontend of its transport
//! (`transport.rs`); a `session.rs` session is a transport's frontend and
//! its list of rings. `admission.rs` bounds what clients of the control
//! socket hold (docs/PROTOCOL.md §1.1); `access.rs` says which peer may
//! use which device and who is an operator (docs/PROTOCOL.md §1.2);
//! `limits.rs` bounds what one frontend makes a device hold
//! (docs/PROTOCOL.md §1.3). `upgrade/` hands every descriptor and the
//! protocol state to a new binary exec'd in place (`upgrade`,
//! docs/ARCHITECTURE.md §4.2), and [`resume_notify`] takes them over.

#![deny(unsafe_code)]

mod access;
mod admission;
mod class;
mod config;
mod connection;
mod device;
pub mod fdstore;
mod instance;
mod limits;
pub mod metrics;
mod pool;
pub mod sd_notify;
mod session;
mod spawn;
mod stats;
mod transport;
pub mod upgrade;
mod vhost_user;
mod watchdog;

mod manage;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use shadowback_xenbus::{AsyncSeqPacket, AsyncSeqPacketListener, ErrorCode, Message, XenbusError};
use tokio::sync::watch;

pub use config::{
    BackendPolicy, CacheMode, Config, ControlConfig, DiskConfig, LimitsConfig, MetricsConfig,
    NicConfig, NicWire, DEFAULT_ATTACHES_PER_SECOND, DEFAULT_HANDSHAKE_TIMEOUT_MS,
    DEFAULT_HANG_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER, DEFAULT_MAX_GUEST_MEMORY_MIB, DEFAULT_MAX_MEMORY_REGIONS,
    DEFAULT_MTU, DEFAULT_POLL_US, MAX_HANG_TIMEOUT_MS, MAX_POLL_US, MAX_VHOST_QUEUES,
    MAX_VHOST_QUEUE_SIZE, MIN_HANG_TIMEOUT_MS,
};
pub use device::{DeviceHandle, Fault, FRESH_START_AFTER, MAX_FAILED_TAKEOVERS};
pub use spawn::{BackendCommand, BACKEND_CONTROL_FD, BACKEND_DISK_FD};
pub use stats::{DeviceStats, RecoveryTimes};
#[doc(hidden)]
pub use vhost_user::fuzzing as vhost_user_fuzzing;
pub use vhost_user::{
    inflight_mmap_size, queue_region_size, BlkGeometry, VhostUserServer, VirtioModel,
    CONFIG_SPACE_SIZE,
};

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("disk: {0}")]
    Disk(String),
    #[error("starting a backend: {0}")]
    Spawn(String),
    #[error("control socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
}

/// The exported devices, in configuration order (disks added at run time
/// last), and the configuration they stand for (docs/PROTOCOL.md §6a:
/// disks are added and removed at run time).
pub(crate) struct Devices {
    exports: Mutex<Exports>,
    /// How to run a backend (`[backend]` applied).
    backend: BackendCommand,
    /// The block class's spares (docs/ARCHITECTURE.md §7.5), for disks
    /// added at run time too.
    block_pool: pool::StandbyPool,
    /// The net class's spares (handed over in a live upgrade).
    net_pool: pool::StandbyPool,
    /// Where listening sockets are kept outside this process
    /// ([`fdstore`]).
    listeners: Arc<fdstore::Listeners>,
}

struct Exports {
    /// The configuration as it stands: the file's, with the disks added
    /// and removed since. A disk to add is validated as part of it.
    cfg: Config,
    list: Vec<Exported>,
    /// Names being added, removed or reconfigured: one operator at a time
    /// per name.
    busy: Vec<String>,
}

/// One exported device and its vhost-user socket.
struct Exported {
    handle: DeviceHandle,
    vhost: Option<VhostUserServer>,
}

impl Devices {
    fn exports(&self) -> MutexGuard<'_, Exports> {
        // Every change is made whole under the lock: a panic elsewhere
        // cannot leave it torn.
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, name: &str) -> Option<DeviceHandle> {
        self.exports()
            .list
            .iter()
            .find(|d| d.handle.name == name)
            .map(|d| d.handle.clone())
    }

    /// Every device, in order.
    pub(crate) fn list(&self) -> Vec<DeviceHandle> {
        self.exports()
            .list
            .iter()
            .map(|d| d.handle.clone())
            .collect()
    }

    /// Every device's name and counters.
    pub(crate) fn status(&self) -> Vec<(String, DeviceStats)> {
        self.list()
            .into_iter()
            .map(|h| (h.name.clone(), h.stats()))
            .collect()
    }

    /// The vhost-user servers, taken out to be stopped (shutdown).
    fn take_vhost(&self) -> Vec<VhostUserServer> {
        self.exports()
            .list
            .iter_mut()
            .filter_map(|d| d.vhost.take())
            .collect()
    }
}

/// Where [`serve`] publishes its devices for [`SupervisorThread`].
type Registry = Arc<OnceLock<Arc<Devices>>>;

/// Runs the supervisor until `shutdown` turns true.
pub async fn serve(
    cfg: Config,
    backend: BackendCommand,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SupervisorError> {
    let listeners = Arc::default();
    serve_registered(cfg, backend, shutdown, None, None, listeners).await
}

/// [`serve`], calling `ready` once the control socket listens and every
/// device has its backend (for systemd's `READY=1`); the listening
/// sockets come from and go to `listeners` (systemd's file-descriptor
/// store, [`fdstore`]).
pub async fn serve_notify(
    cfg: Config,
    backend: BackendCommand,
    shutdown: watch::Receiver<bool>,
    ready: Box<dyn FnOnce() + Send>,
    listeners: fdstore::Listeners,
) -> Result<(), SupervisorError> {
    let listeners = Arc::new(listeners);
    serve_registered(cfg, backend, shutdown, None, Some(ready), listeners).await
}

/// [`serve_notify`] in a binary exec'd by a live upgrade
/// (docs/ARCHITECTURE.md §4.2): `state` is the memfd the previous binary
/// described everything in ([`upgrade::take_state_fd`]); the devices,
/// backends and connections are taken over, not started.
pub async fn resume_notify(
    state: std::fs::File,
    backend: BackendCommand,
    shutdown: watch::Receiver<bool>,
    ready: Box<dyn FnOnce() + Send>,
    listeners: fdstore::Listeners,
) -> Result<(), SupervisorError> {
    let started = upgrade::resume(state, &backend, Arc::new(listeners))?;
    run(started, shutdown, None, Some(ready)).await
}

/// What the control loop serves.
pub(crate) struct Started {
    /// The configuration as it stands (see [`Exports::cfg`]).
    cfg: Config,
    /// How to run a backend (`[backend]` applied).
    backend: BackendCommand,
    listener: AsyncSeqPacketListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    list: Vec<Exported>,
    block_pool: pool::StandbyPool,
    net_pool: pool::StandbyPool,
    /// Where listening sockets are kept outside this process.
    listeners: Arc<fdstore::Listeners>,
    /// Connections taken over in a live upgrade.
    pending: Option<upgrade::Pending>,
}

async fn serve_registered(
    cfg: Config,
    backend: BackendCommand,
    shutdown: watch::Receiver<bool>,
    registry: Option<Registry>,
    ready: Option<Box<dyn FnOnce() + Send>>,
    listeners: Arc<fdstore::Listeners>,
) -> Result<(), SupervisorError> {
    let started = start(cfg, backend, listeners).await?;
    run(started, shutdown, registry, ready).await
}

/// Binds the control socket (or takes it from `listeners`) and starts
/// every device.
async fn start(
    cfg: Config,
    backend: BackendCommand,
    listeners: Arc<fdstore::Listeners>,
) -> Result<Started, SupervisorError> {
    cfg.validate()?;
    let backend = if cfg.backend.confine {
        backend
    } else {
        backend.unconfined()
    };
    // `/run/shadowback` does not exist on a fresh host.
    if let Some(dir) = cfg.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| SupervisorError::Socket {
            path: cfg.socket.clone(),
            reason: format!("creating {}: {e}", dir.display()),
        })?;
    }
    let listener = listeners.control(&cfg.socket)?;
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => match metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = std::fs::remove_file(&cfg.socket);
                return Err(e);
            }
        },
        None => None,
    };
    let mut list: Vec<Exported> = Vec::new();
    let (block_pool, net_pool) = pool::StandbyPool::per_class(&cfg, &backend);
    tracing::info!(
        block = cfg.block_pool(),
        net = cfg.net_pool(),
        "standby pools"
    );
    for disk in &cfg.disks {
        let pool = disk.standby.then(|| block_pool.clone());
        let started = device::start_device(disk, &cfg.limits, &backend, pool).and_then(|handle| {
            let vhost = match disk.vhost_user {
                Some(_) => Some(VhostUserServer::start(disk, handle.clone(), &listeners)?),
                None => None,
            };
            Ok(Exported { handle, vhost })
        });
        let exported = match started {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_file(&cfg.socket);
                stop_vhost(list.into_iter().filter_map(|d| d.vhost).collect()).await;
                return Err(e);
            }
        };
        tracing::info!(
            device = %disk.name, path = %disk.path.display(),
            shadow = disk.shadow, standby = disk.standby, hang_timeout_ms = disk.hang_timeout_ms,
            vhost_user = ?disk.vhost_user, "disk exported"
        );
        list.push(exported);
    }
    // The wires of every vif exist before any backend starts, and live as
    // long as their device tasks (docs/ARCHITECTURE.md §11.5).
    let started = class::net::open_wires(&cfg.nics).and_then(|mut wires| {
        cfg.nics
            .iter()
            .map(|nic| {
                let wire = wires
                    .remove(&nic.name)
                    .ok_or_else(|| SupervisorError::Device {
                        device: nic.name.clone(),
                        reason: "no wire".into(),
                    })?;
                let pool = nic.standby.then(|| net_pool.clone());
                let handle = device::start_nic(nic, &cfg.limits, wire, &backend, pool)?;
                let vhost = match nic.vhost_user {
                    Some(_) => Some(VhostUserServer::start(nic, handle.clone(), &listeners)?),
                    None => None,
                };
                tracing::info!(
                    device = %nic.name, wire = ?nic.wire(), mtu = nic.mtu,
                    shadow = nic.shadow, standby = nic.standby,
                    vhost_user = ?nic.vhost_user, "vif exported"
                );
                Ok(Exported { handle, vhost })
            })
            .collect::<Result<Vec<_>, _>>()
    });
    match started {
        Ok(handles) => list.extend(handles),
        Err(e) => {
            let _ = std::fs::remove_file(&cfg.socket);
            stop_vhost(list.into_iter().filter_map(|d| d.vhost).collect()).await;
            return Err(e);
        }
    }
    Ok(Started {
        cfg,
        backend,
        listener,
        metrics_listener,
        list,
        block_pool,
        net_pool,
        listeners,
        pending: None,
    })
}

/// The control loop: accepts connections, serves `upgrade`, until
/// `shutdown`.
async fn run(
    started: Started,
    mut shutdown: watch::Receiver<bool>,
    registry: Option<Registry>,
    ready: Option<Box<dyn FnOnce() + Send>>,
) -> Result<(), SupervisorError> {
    let Started {
        cfg,
        backend,
        listener,
        metrics_listener,
        list,
        block_pool,
        net_pool,
        listeners,
        pending,
    } = started;
    block_pool.start();
    net_pool.start();
    let devices = Arc::new(Devices {
        exports: Mutex::new(Exports {
            cfg: cfg.clone(),
            list,
            busy: Vec::new(),
        }),
        backend,
        block_pool,
        net_pool,
        listeners,
    });
    // Kept for an upgrade: the listener itself moves into its task.
    let metrics_fd = match &metrics_listener {
        Some(l) => Some(
            std::os::fd::AsFd::as_fd(l)
                .try_clone_to_owned()
                .map_err(|e| SupervisorError::Runtime(format!("metrics listener: {e}")))?,
        ),
        None => None,
    };
    if let Some(listener) = metrics_listener {
        tracing::info!(listen = ?listener.local_addr().ok(), "metrics listener");
        tokio::spawn(metrics::serve(listener, devices.clone(), shutdown.clone()));
    }
    if let Some(registry) = registry {
        let _ = registry.set(devices.clone());
    }
    let fd_limit = admission::fd_limit();
    let limits = admission::Limits::new(&cfg.control, fd_limit);
    if usize::try_from(cfg.control.max_connections).is_ok_and(|m| m > limits.max) {
        tracing::warn!(
            configured = cfg.control.max_connections,
            max_connections = limits.max,
            ?fd_limit,
            "max_connections capped at half the descriptor limit (RLIMIT_NOFILE)"
        );
    }
    let admission = admission::Admission::new(limits);
    let (upgrades, mut upgrade_requests) = tokio::sync::mpsc::channel(1);
    let shared = Arc::new(connection::ControlShared::new(
        connection::Timeouts::new(&cfg.control),
        upgrades,
    ));
    if let Some(pending) = pending {
        pending.start(&shared);
    }
    let operators = access::AccessList::new(&cfg.control.operator_uids, &cfg.control.operator_gids);
    tracing::info!(
        socket = %cfg.socket.display(), max_connections = limits.max,
        max_connections_per_peer = limits.per_peer, "supervisor listening"
    );
    if let Some(ready) = ready {
        ready();
    }
    let mut pacer = admission::AcceptPacer::default();
    let mut accept_log = admission::LogLimiter::new(admission::LOG_INTERVAL);
    let mut refusal_log = admission::LogLimiter::new(admission::LOG_INTERVAL);
    loop {
        tokio::select! {
            conn = accept_paced(&listener, pacer.pause()) => match conn {
                Ok(conn) => {
                    pacer.succeeded();
                    match admit(&conn, &admission) {
                        Ok((ticket, peer)) => {
                            let caller = access::Caller::new(peer, &operators);
                            tokio::spawn(connection::serve_guest(
                                conn, devices.clone(), ticket, caller, shared.clone(),
                            ));
                        }
                        Err(why) => {
                            if let Some(suppressed) = refusal_log.allow(std::time::Instant::now()) {
                                tracing::warn!(%why, suppressed, "control connection refused");
                            }
                            let _ = conn.try_send(&Message::error(ErrorCode::Ebusy, &why));
                        }
                    }
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays
                    // queued and the listener readable; accepting again at
                    // once would spin and starve every other task.
                    let pause = pacer.failed();
                    if let Some(suppressed) = accept_log.allow(std::time::Instant::now()) {
                        tracing::warn!(
                            error = ?e, pause_ms = pause.as_millis() as u64, suppressed,
                            "accept failed"
                        );
                    }
                }
            },
            Some(request) = upgrade_requests.recv() => {
                // Returns only if this binary goes on serving.
                upgrade::upgrade(request, upgrade::Serving {
                    listener: &listener,
                    metrics_listener: metrics_fd.as_ref().map(std::os::fd::AsFd::as_fd),
                    devices: &devices,
                    shared: &shared,
                }).await;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
        // The runtime has one thread, and under a connect storm `accept`
        // is always ready: without this the loop never lets the
        // connections it admitted (status, guests, the storm's own, which
        // free their slots on EOF) or the device tasks run — seen as
        // `status` unanswered for seconds while a peer stormed.
        tokio::task::yield_now().await;
    }
    // A clean stop: no successor may take these sockets.
    devices.listeners.forget_all();
    let _ = std::fs::remove_file(&cfg.socket);
    stop_vhost(devices.take_vhost()).await;
    Ok(())
}

/// Accepts the next connection after `pause` (the back-off of
/// [`admission::AcceptPacer`]).
async fn accept_paced(
    listener: &AsyncSeqPacketListener,
    pause: Option<std::time::Duration>,
) -> Result<AsyncSeqPacket, XenbusError> {
    if let Some(pause) = pause {
        tokio::time::sleep(pause).await;
    }
    listener.accept().await
}

/// A slot for `conn`'s peer (and who the peer is), or why there is none.
fn admit(
    conn: &AsyncSeqPacket,
    admission: &Arc<admission::Admission>,
) -> Result<(admission::Ticket, admission::PeerKey), String> {
    let peer = admission::PeerKey::of(conn).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    admission
        .admit(peer)
        .map(|ticket| (ticket, peer))
        .map_err(|e| format!("{peer}: {e}; try again later"))
}

/// Stops the vhost-user servers off the runtime's threads: each may wait
/// for its device task to detach a session.
async fn stop_vhost(servers: Vec<VhostUserServer>) {
    if servers.is_empty() {
        return;
    }
    let stopping =
        tokio::task::spawn_blocking(move || servers.into_iter().for_each(VhostUserServer::stop));
    if stopping.await.is_err() {
        tracing::error!("stopping the vhost-user servers panicked");
    }
}

/// A supervisor running on its own thread (for `demo`, `bench` and tests).
pub struct SupervisorThread {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<(), SupervisorError>>>,
    devices: Registry,
}

impl SupervisorThread {
    /// Starts [`serve`] on a new thread with its own runtime; returns once
    /// the control socket accepts connections and every device is up.
    pub fn start(cfg: Config, backend: BackendCommand) -> Result<Self, SupervisorError> {
        let (stop, rx) = watch::channel(false);
        let socket = cfg.socket.clone();
        let devices = Registry::default();
        let registry = devices.clone();
        let thread = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| SupervisorError::Runtime(e.to_string()))?;
                let listeners = Arc::default();
                rt.block_on(serve_registered(
                    cfg,
                    backend,
                    rx,
                    Some(registry),
                    None,
                    listeners,
                ))
            })
            .map_err(|e| SupervisorError::Runtime(e.to_string()))?;
        let mut me = SupervisorThread {
            stop,
            thread: Some(thread),
            devices,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() || me.devices.get().is_none() {
            if me.thread.as_ref().is_some_and(|t| t.is_finished())
                || std::time::Instant::now() > deadline
            {
                let res = me.thread.take().map(|t| t.join());
                return Err(match res {
                    Some(Ok(Err(e))) => e,
                    _ => SupervisorError::Runtime("supervisor did not start".into()),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(me)
    }

    /// Every device's counters and state, in configuration order (empty
    /// until the devices are up, which [`start`](Self::start) waits for).
    pub fn status(&self) -> Vec<(String, DeviceStats)> {
        self.devices.get().map(|d| d.status()).unwrap_or_default()
    }

    /// Injects `fault` into `device`'s current backend, as the `fault`
    /// control message does. Blocks until the device task has done it;
    /// call it from a plain thread, not from async code.
    pub fn fault(&self, device: &str, fault: Fault) -> Result<(), SupervisorError> {
        let err = |reason: String| SupervisorError::Device {
            device: device.to_string(),
            reason,
        };
        let handle = self
            .devices
            .get()
            .and_then(|d| d.get(device))
            .ok_or_else(|| err("no such device".into()))?;
        handle
            .fault_blocking(fault)
            .map_err(|(code, why)| err(format!("{code}: {why}")))
    }

    /// Stops the supervisor (its backends are killed) and waits for it.
    pub fn stop(mut self) -> Result<(), SupervisorError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), SupervisorError> {
        let _ = self.stop.send(true);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(res)) => res,
            Some(Err(_)) => Err(SupervisorError::Runtime(
                "supervisor thread panicked".into(),
            )),
            None => Ok(()),
        }
    }
}

impl Drop for SupervisorThread {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
