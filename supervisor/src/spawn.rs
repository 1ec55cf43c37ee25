//! Starting a backend process with the fds it inherits.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;

use shadowback_xenbus::SeqPacket;

use crate::config::{CacheMode, DiskConfig};
use crate::SupervisorError;

/// fd number of the control socketpair in the backend.
pub const BACKEND_CONTROL_FD: i32 = 3;
/// fd number of the disk image in the backend.
pub const BACKEND_DISK_FD: i32 = 4;

/// An opened disk image.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

/// Opens the image as the config says (`O_DIRECT` for `cache = "none"`).
pub fn open_disk(cfg: &DiskConfig) -> Result<Disk, SupervisorError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!cfg.readonly);
    if cfg.cache == CacheMode::None {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts
        .open(&cfg.path)
        .map_err(|e| SupervisorError::Disk(format!("{}: {e}", cfg.path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| SupervisorError::Disk(format!("{}: {e}", cfg.path.display())))?
        .len();
    if len == 0 || len % 512 != 0 {
        return Err(SupervisorError::Disk(format!(
            "{}: size {len} is not a non-zero multiple of 512 bytes",
            cfg.path.display()
        )));
    }
    Ok(Disk {
        file,
        sectors: len / 512,
    })
}

/// How to run a backend: the program and the arguments before ours
/// (`shadowback blkback` by default).
#[derive(Clone, Debug)]
pub struct BackendCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra environment for the **first** backend instance of each device
    /// only (not its standby, not any replacement), e.g.
    /// `SHADOWBACK_CRASH_AT` in tests: a crash point then fires once and
    /// the recovery it provokes can succeed.
    pub env: Vec<(OsString, OsString)>,
}

impl BackendCommand {
    /// `<this executable> blkback`.
    pub fn current_exe() -> Result<Self, SupervisorError> {
        let exe = std::env::current_exe().map_err(|e| SupervisorError::Spawn(e.to_string()))?;
        Ok(BackendCommand {
            program: exe.into_os_string(),
            args: vec!["blkback".into()],
            env: Vec::new(),
        })
    }
}

/// Starts a backend for `cfg`; it inherits the control socket as fd 3 and
/// the disk as fd 4, nothing else. `first` marks the device's first
/// instance, the only one that gets [`BackendCommand::env`].
pub fn spawn_backend(
    cmd: &BackendCommand,
    cfg: &DiskConfig,
    disk: &Disk,
    first: bool,
) -> Result<(tokio::process::Child, SeqPacket), SupervisorError> {
    let (ours, theirs) = SeqPacket::pair().map_err(|e| SupervisorError::Spawn(e.to_string()))?;
    let theirs: OwnedFd = theirs.into_fd();
    let control_src = theirs.as_raw_fd();
    let disk_src = disk.file.as_raw_fd();
    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .arg("--device")
        .arg(&cfg.name)
        .arg("--control-fd")
        .arg(BACKEND_CONTROL_FD.to_string())
        .arg("--disk-fd")
        .arg(BACKEND_DISK_FD.to_string())
        .arg("--backend-id")
        .arg(cfg.backend_id.to_string())
        .arg("--sectors")
        .arg(disk.sectors.to_string())
        .arg("--max-ring-page-order")
        .arg(cfg.max_ring_page_order.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if cfg.readonly {
        command.arg("--readonly");
    }
    if !cfg.discard {
        command.arg("--no-discard");
    }
    if !cfg.shadow {
        command.arg("--no-shadow");
    }
    if first {
        command.envs(cmd.env.iter().map(|(k, v)| (k, v)));
    }
    // SAFETY: the closure runs in the forked child before exec and calls
    // only fcntl and dup2, which are async-signal-safe; the source fds are
    // open in the parent (owned by `theirs` and `disk`, alive across the
    // spawn call). Both are first copied above fd 10 so that neither target
    // number can clobber the other source; dup2 then clears FD_CLOEXEC on
    // the copies at 3 and 4, and the high copies close on exec.
    unsafe {
        command.pre_exec(move || {
            let control = libc::fcntl(control_src, libc::F_DUPFD_CLOEXEC, 10);
            let disk = libc::fcntl(disk_src, libc::F_DUPFD_CLOEXEC, 10);
            if control < 0
                || disk < 0
                || libc::dup2(control, BACKEND_CONTROL_FD) < 0
                || libc::dup2(disk, BACKEND_DISK_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| SupervisorError::Spawn(format!("{}: {e}", cmd.program.to_string_lossy())))?;
    drop(theirs);
    Ok((child, ours))
}
