//! Device management at run time (docs/PROTOCOL.md §6a): the operator
//! messages `disk-add`, `disk-remove`, `disk-list`, `disk-resize` and
//! `disk-set`, served on the control socket.
//!
//! A disk to add is a `[[disk]]` table parsed by the configuration file's
//! own parser and validated as part of the configuration as it stands
//! ([`Config::validate`]), so a name, a vhost-user socket or a key is
//! refused at run time exactly when the file would refuse it. One
//! operation at a time per name: a name being added, removed or changed
//! is `EBUSY` to a second operator until the first is done, and a removed
//! disk's name (and image, and socket) can be added again once its removal
//! is answered.

use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::Message;

use crate::class::{BlockClass, ClassInfo};
use crate::config::DiskConfig;
use crate::device::{self, DeviceHandle, Refusal};
use crate::{Devices, Exported, SupervisorError, VhostUserServer};

/// Serves one operator message; the answers to send, in order.
pub(crate) async fn serve(devices: &Devices, msg: &Message) -> Result<Vec<Message>, Refusal> {
    match msg.kind() {
        kind::DISK_ADD => add(devices, msg).await.map(|m| vec![m]),
        kind::DISK_REMOVE => remove(devices, msg).await.map(|m| vec![m]),
        kind::DISK_LIST => Ok(list(devices)),
        kind::DISK_RESIZE => resize(devices, msg).await.map(|m| vec![m]),
        kind::DISK_SET => set(devices, msg).await.map(|m| vec![m]),
        other => Err((ErrorCode::Einval, format!("unknown message kind {other:?}"))),
    }
}

fn invalid(e: SupervisorError) -> Refusal {
    (ErrorCode::Einval, e.to_string())
}

/// A name held for one operation; let go on drop, whatever happened.
struct Reservation<'a> {
    devices: &'a Devices,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.devices.exports().busy.retain(|n| *n != self.name);
    }
}

impl Devices {
    /// Holds `name` for one operation: `EBUSY` if another holds it.
    fn reserve(
        &self,
        exports: &mut crate::Exports,
        name: &str,
    ) -> Result<Reservation<'_>, Refusal> {
        if exports.busy.iter().any(|n| n == name) {
            return Err((
                ErrorCode::Ebusy,
                format!("{name} is being added, removed or changed by another request"),
            ));
        }
        exports.busy.push(name.to_string());
        Ok(Reservation {
            devices: self,
            name: name.to_string(),
        })
    }

    /// Holds the exported disk `name`; its handle and configuration.
    fn reserve_disk(
        &self,
        name: &str,
    ) -> Result<(Reservation<'_>, DeviceHandle, DiskConfig), Refusal> {
        let mut exports = self.exports();
        let handle = exports
            .list
            .iter()
            .find(|d| d.handle.name == name)
            .map(|d| d.handle.clone())
            .ok_or_else(|| (ErrorCode::Enoent, format!("no device {name:?}")))?;
        let cfg = exports
            .cfg
            .disks
            .iter()
            .find(|d| d.name == name)
            .cloned()
            .ok_or_else(|| (ErrorCode::Einval, format!("{name} is not a disk")))?;
        let held = self.reserve(&mut exports, name)?;
        Ok((held, handle, cfg))
    }
}

/// `disk-add`: validate, open the image off the runtime's thread (its
/// lock may be waited for), start the device (and its vhost-user socket),
/// then publish it.
async fn add(devices: &Devices, msg: &Message) -> Result<Message, Refusal> {
    let disk = DiskConfig::from_pairs(msg.iter()).map_err(invalid)?;
    let (held, limits, pool_size) = {
        let mut exports = devices.exports();
        let mut next = exports.cfg.clone();
        next.disks.push(disk.clone());
        next.validate().map_err(invalid)?;
        let pool_size = next.block_pool();
        (
            devices.reserve(&mut exports, &disk.name)?,
            next.limits,
            pool_size,
        )
    };
    let opening = disk.clone();
    let class = tokio::task::spawn_blocking(move || BlockClass::open(&opening))
        .await
        .map_err(|e| (ErrorCode::Enodev, format!("opening the image: {e}")))?
        .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
    // Backends are forked from the runtime's thread (`spawn` module docs).
    let handle = device::start_disk(
        &disk,
        class,
        &limits,
        &devices.backend,
        disk.standby.then(|| devices.block_pool.clone()),
    )
    .map_err(|e| (ErrorCode::Enodev, e.to_string()))?;
    // The first disk that may use a spare gets the pool its default size
    // (docs/ARCHITECTURE.md §7.5) when the file left it at 0.
    devices.block_pool.grow_to(pool_size);
    let vhost = match disk.vhost_user {
        Some(_) => match VhostUserServer::start(&disk, handle.clone(), &devices.listeners) {
            Ok(server) => Some(server),
            Err(e) => {
                let _ = handle.remove(true).await;
                return Err((ErrorCode::Einval, e.to_string()));
            }
        },
        None => None,
    };
    tracing::info!(
        device = %disk.name, path = %disk.path.display(), vhost_user = ?disk.vhost_user,
        qos = ?disk.qos(), "disk added"
    );
    let mut exports = devices.exports();
    exports.cfg.disks.push(disk);
    exports.list.push(Exported { handle, vhost });
    drop(exports);
    drop(held);
    Ok(Message::new(kind::OK))
}

/// `disk-remove`: the device task refuses while a frontend is attached
/// unless `force=1`; once it has fenced every instance and dropped the
/// image, the device is unlisted and its vhost-user socket closed.
async fn remove(devices: &Devices, msg: &Message) -> Result<Message, Refusal> {
    let name = msg
        .require(key::DEVICE)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    let force = msg
        .get_flag(key::FORCE)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?
        .unwrap_or(false);
    let (held, handle, cfg) = devices.reserve_disk(name)?;
    handle.remove(force).await?;
    // The fence waited for the dead instances' I/O, but each one's own
    // description of the image (and its share of the image's lock) goes
    // only when the kernel has torn its io_uring down, which a loaded host
    // may delay for seconds: wait for that too, so that the image can be
    // added again, by us or another supervisor, once we answer.
    let path = cfg.path.clone();
    let waited = tokio::task::spawn_blocking(move || wait_until_unlocked(&path))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match waited {
        Ok(waited) => {
            tracing::debug!(device = %name, waited_ms = waited.as_millis() as u64, "image let go")
        }
        Err(why) => {
            tracing::warn!(device = %name, %why, "the removed disk's image is still in use")
        }
    }
    let gone = {
        let mut exports = devices.exports();
        exports.cfg.disks.retain(|d| d.name != name);
        let at = exports.list.iter().position(|d| d.handle.name == name);
        at.map(|i| exports.list.remove(i))
    };
    if let Some(vhost) = gone.and_then(|d| d.vhost) {
        devices
            .listeners
            .forget(&crate::fdstore::vhost_user_name(name));
        // Blocks until its thread has let go of the connection.
        let _ = tokio::task::spawn_blocking(move || vhost.stop()).await;
    }
    tracing::info!(device = %name, force, "disk removed");
    drop(held);
    Ok(Message::new(kind::OK))
}

/// How long a removal waits for the image's lock to be let go.
const IMAGE_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until nobody holds the lock of the image at `path` (the removed
/// disk's instances' descriptions are gone); how long that took.
fn wait_until_unlocked(path: &std::path::Path) -> Result<std::time::Duration, String> {
    use std::os::fd::AsRawFd;
    let started = std::time::Instant::now();
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    loop {
        // An exclusive lock through a description of our own, let go at
        // once (closing the file drops it).
        #[allow(deprecated)]
        match nix::fcntl::flock(
            file.as_raw_fd(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(()) => return Ok(started.elapsed()),
            Err(nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("flock: {e}")),
        }
        if started.elapsed() >= IMAGE_RELEASE_TIMEOUT {
            return Err(format!("still locked after {IMAGE_RELEASE_TIMEOUT:?}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `disk-list`: one `disk` per disk, then `disk-list-end`.
fn list(devices: &Devices) -> Vec<Message> {
    let (disks, handles) = {
        let exports = devices.exports();
        (
            exports.cfg.disks.clone(),
            exports
                .list
                .iter()
                .map(|d| d.handle.clone())
                .collect::<Vec<_>>(),
        )
    };
    let mut out = Vec::new();
    for disk in &disks {
        let Some(handle) = handles.iter().find(|h| h.name == disk.name) else {
            continue;
        };
        let sectors = match handle.info() {
            ClassInfo::Disk(info) => info.sectors,
            ClassInfo::Net(_) => 0,
        };
        let qos = disk.qos();
        let mut msg = Message::new(kind::DISK)
            .with(key::DEVICE, &disk.name)
            .with(key::PATH, printable(&disk.path.display().to_string()))
            .with(key::SECTORS, sectors)
            .with(key::READONLY, u8::from(disk.readonly))
            .with(key::CONNECTED, u8::from(handle.stats().connected))
            .with(key::IOPS_LIMIT, qos.iops)
            .with(key::IOPS_BURST, qos.iops_burst)
            .with(key::BYTES_LIMIT, qos.bytes)
            .with(key::BYTES_BURST, qos.bytes_burst);
        if let Some(sock) = &disk.vhost_user {
            msg.set(key::VHOST_USER, printable(&sock.display().to_string()));
        }
        out.push(msg);
    }
    out.push(Message::new(kind::DISK_LIST_END));
    out
}

/// A value a message may carry: printable ASCII, at most 256 bytes.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(256)
        .collect()
}

/// `disk-resize`: `size` bytes (absent: re-read a block device).
async fn resize(devices: &Devices, msg: &Message) -> Result<Message, Refusal> {
    let name = msg
        .require(key::DEVICE)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    let bytes = msg
        .get_u64(key::SIZE)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    let (held, handle, _) = devices.reserve_disk(name)?;
    let sectors = handle.resize(bytes).await?;
    drop(held);
    Ok(Message::new(kind::OK).with(key::SECTORS, sectors))
}

/// `disk-set`: `[[disk]]` keys that may change at run time (the QoS
/// limits), validated as the file's would be.
async fn set(devices: &Devices, msg: &Message) -> Result<Message, Refusal> {
    let name = msg
        .require(key::DEVICE)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    let (held, handle, current) = devices.reserve_disk(name)?;
    let pairs = msg.iter().filter(|(k, _)| *k != key::DEVICE);
    let changed = current.with_pairs(pairs).map_err(invalid)?;
    {
        let exports = devices.exports();
        let mut next = exports.cfg.clone();
        if let Some(d) = next.disks.iter_mut().find(|d| d.name == name) {
            *d = changed.clone();
        }
        next.validate().map_err(invalid)?;
    }
    handle.set_qos(changed.qos()).await?;
    let mut exports = devices.exports();
    if let Some(d) = exports.cfg.disks.iter_mut().find(|d| d.name == name) {
        *d = changed;
    }
    drop(exports);
    drop(held);
    Ok(Message::new(kind::OK))
}
