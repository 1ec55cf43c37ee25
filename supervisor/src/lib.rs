//! The supervisor: the control socket guests attach through, one backend
//! process per disk, and the fds that must outlive a backend.
//!
//! It plays the roles of XenStore and the toolstack (DESIGN §1, §3): a
//! guest probes a device (`backend`, InitWait), connects with its ring
//! grants and fds (`connected`, Connected) and stays connected for as long
//! as its socket is open. Guests never talk to a backend directly.

mod config;
mod connection;
mod device;
mod spawn;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use shadowback_xenbus::AsyncSeqPacketListener;
use tokio::sync::watch;

pub use config::{CacheMode, Config, DiskConfig};
pub use device::DeviceHandle;
pub use spawn::{BackendCommand, BACKEND_CONTROL_FD, BACKEND_DISK_FD};

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
}

/// Runs the supervisor until `shutdown` turns true.
pub async fn serve(
    cfg: Config,
    backend: BackendCommand,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SupervisorError> {
    cfg.validate()?;
    let listener =
        AsyncSeqPacketListener::bind(&cfg.socket).map_err(|e| SupervisorError::Socket {
            path: cfg.socket.clone(),
            reason: e.to_string(),
        })?;
    let mut devices = HashMap::new();
    for disk in &cfg.disks {
        let handle = device::start_device(disk, &backend)?;
        tracing::info!(device = %disk.name, sectors = handle.info.sectors, path = %disk.path.display(), "disk exported");
        devices.insert(disk.name.clone(), handle);
    }
    let devices = Arc::new(devices);
    tracing::info!(socket = %cfg.socket.display(), "supervisor listening");
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => {
                    tokio::spawn(connection::serve_guest(conn, devices.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// A supervisor running on its own thread (for `demo`, `bench` and tests).
pub struct SupervisorThread {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<(), SupervisorError>>>,
}

impl SupervisorThread {
    /// Starts [`serve`] on a new thread with its own runtime; returns once
    /// the control socket accepts connections.
    pub fn start(cfg: Config, backend: BackendCommand) -> Result<Self, SupervisorError> {
        let (stop, rx) = watch::channel(false);
        let socket = cfg.socket.clone();
        let thread = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| SupervisorError::Runtime(e.to_string()))?;
                rt.block_on(serve(cfg, backend, rx))
            })
            .map_err(|e| SupervisorError::Runtime(e.to_string()))?;
        let mut me = SupervisorThread {
            stop,
            thread: Some(thread),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
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
