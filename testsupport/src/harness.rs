//! A real supervisor (in a thread of the test) whose backends are processes:
//! `shadowback blkback`, or any [`BackendCommand`] such as the fake backend.
//! Stopped (backends killed) and its directory removed on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shadowback_guest::vhost_user::{VhostUserBlk, VhostUserBlkOptions};
use shadowback_supervisor::{
    BackendCommand, CacheMode, Config, DeviceStats, DiskConfig, Fault, SupervisorThread,
};

use crate::process::shadowback_bin;
use crate::temp::{make_image, TempDir};
use crate::wait::wait_for_state;

/// How long a device's counters may take to show what a test waits for.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(20);

/// A device name no other test (or concurrent run) uses: the backend
/// process is found by it.
/// Failures of a device's instances that the supervisor is done with:
/// taken over (a recovery) or, with nothing to take over (no frontend
/// attached, a kill between two sessions), replaced by an idle backend.
/// A test that injects a fault at a random moment waits for this to grow,
/// not for a recovery: its fault may land between sessions.
pub fn failures_handled(s: &DeviceStats) -> u64 {
    s.recoveries + s.idle_replacements
}

pub fn unique_name(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// `cache = "none"` (O_DIRECT) where the file system supports it.
pub fn cache_for(image: &Path) -> CacheMode {
    CacheMode::best_for(image)
}

/// `shadowback blkback`, the real backend binary.
pub fn backend_command() -> BackendCommand {
    BackendCommand {
        program: shadowback_bin().into(),
        args: vec!["blkback".into()],
        env: Vec::new(),
    }
}

/// Writes `toml` as `dir`'s `shadowback.toml` and starts a supervisor on
/// it with the real backend binary.
pub fn supervisor_from_toml(dir: &TempDir, toml: &str) -> SupervisorThread {
    let path = dir.join("shadowback.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = Config::from_file(&path).expect("the test's config");
    SupervisorThread::start(cfg, backend_command()).expect("start the supervisor")
}

/// [`backend_command`] with `first_env` as the environment of each
/// device's first backend instance (`SHADOWBACK_CRASH_AT`).
pub fn backend_command_with_env(first_env: &[(&str, &str)]) -> BackendCommand {
    BackendCommand {
        env: first_env
            .iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
        ..backend_command()
    }
}

/// One disk to export in a [`Harness`].
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub mib: u64,
    pub backend_id: u16,
    pub max_ring_page_order: u8,
    /// Exported read-only (`mode=r`).
    pub readonly: bool,
}

impl DiskSpec {
    pub fn new(name: impl Into<String>, mib: u64) -> Self {
        DiskSpec {
            name: name.into(),
            mib,
            backend_id: 0,
            max_ring_page_order: 4,
            readonly: false,
        }
    }

    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    pub fn backend_id(mut self, id: u16) -> Self {
        self.backend_id = id;
        self
    }

    pub fn max_ring_page_order(mut self, order: u8) -> Self {
        self.max_ring_page_order = order;
        self
    }
}

/// A supervisor thread serving disks from a temporary directory, with its
/// control socket at `control.sock` in it.
pub struct Harness {
    // Dropped first: stop the supervisor before removing its files.
    supervisor: Option<SupervisorThread>,
    socket: PathBuf,
    dir: TempDir,
}

impl Harness {
    /// Real `shadowback blkback` backends serving fresh sparse images
    /// `<name>.img`.
    pub fn start(tag: &str, disks: &[DiskSpec]) -> Self {
        let dir = TempDir::new(tag);
        let disks = disks
            .iter()
            .map(|d| {
                let path = dir.create_image(&format!("{}.img", d.name), d.mib << 20);
                DiskConfig {
                    name: d.name.clone(),
                    cache: cache_for(&path),
                    path,
                    readonly: d.readonly,
                    backend_id: d.backend_id,
                    max_ring_page_order: d.max_ring_page_order,
                    discard: true,
                    // backend_pid() expects one blkback process per device.
                    standby: false,
                    ..DiskConfig::new(d.name.clone(), "")
                }
            })
            .collect();
        Self::start_with(dir, disks, backend_command())
    }

    /// `disks` (whose files the caller made, usually in `dir`) served by
    /// backends started with `backend`.
    pub fn start_with(dir: TempDir, disks: Vec<DiskConfig>, backend: BackendCommand) -> Self {
        let socket = dir.join("control.sock");
        let cfg = Config {
            socket: socket.clone(),
            disks,
            control: Default::default(),
            backend: Default::default(),
            standby: Default::default(),
            limits: Default::default(),
            metrics: Default::default(),
            nics: Vec::new(),
        };
        let supervisor = SupervisorThread::start(cfg, backend).expect("start supervisor");
        Harness {
            supervisor: Some(supervisor),
            socket,
            dir,
        }
    }

    pub fn sup(&self) -> &SupervisorThread {
        self.supervisor.as_ref().expect("supervisor running")
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The image file of the disk named `name` (made by [`Self::start`]).
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    /// The counters of `device`.
    pub fn stats(&self, device: &str) -> DeviceStats {
        self.sup()
            .status()
            .into_iter()
            .find(|(n, _)| n == device)
            .expect("device listed")
            .1
    }

    /// Waits until `pred` holds for `device`'s counters (or fails after
    /// [`STATS_TIMEOUT`]).
    pub fn wait_for(
        &self,
        device: &str,
        what: &str,
        pred: impl Fn(&DeviceStats) -> bool,
    ) -> DeviceStats {
        wait_for_state(STATS_TIMEOUT, what, || self.stats(device), pred)
    }

    /// Waits until `pred` holds for one of `devices`; returns its index.
    pub fn wait_for_any(
        &self,
        devices: &[String],
        what: &str,
        pred: impl Fn(&DeviceStats) -> bool,
    ) -> usize {
        let found = wait_for_state(
            STATS_TIMEOUT,
            what,
            || devices.iter().position(|d| pred(&self.stats(d))),
            Option::is_some,
        );
        found.expect("checked by the wait")
    }

    /// Stops the supervisor and reports how that went.
    pub fn stop(mut self) {
        self.stop_keeping_files();
    }

    /// Stops the supervisor (once) and keeps the directory, for a look at
    /// what the supervisor left behind.
    pub fn stop_keeping_files(&mut self) {
        if let Some(s) = self.supervisor.take() {
            s.stop().expect("supervisor stopped with an error");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            let _ = s.stop();
        }
    }
}

/// A disk of the default configuration per name, on a fresh image
/// `<name>.img` of `mib` MiB in `dir`, opened with O_DIRECT where the file
/// system allows it.
pub fn default_disks(dir: &TempDir, names: &[String], mib: u64) -> Vec<DiskConfig> {
    names
        .iter()
        .map(|name| {
            let image = dir.create_image(&format!("{name}.img"), mib << 20);
            let mut disk = DiskConfig::new(name, &image);
            disk.cache = CacheMode::best_for(&image);
            disk
        })
        .collect()
}

/// An `edit` for [`DiskSetup::start`] that also exports the disk on the
/// vhost-user socket `vhost.sock` next to its image, then applies `edit`.
pub fn with_vhost_user(edit: impl FnOnce(&mut DiskConfig)) -> impl FnOnce(&mut DiskConfig) {
    |disk: &mut DiskConfig| {
        disk.vhost_user = Some(disk.path.with_file_name("vhost.sock"));
        edit(disk);
    }
}

/// A [`Harness`] exporting one fresh disk (`disk.img`) with real
/// backends, on the control socket and optionally over vhost-user
/// ([`with_vhost_user`]).
pub struct DiskSetup {
    harness: Harness,
    name: String,
    vhost: Option<PathBuf>,
    image: PathBuf,
}

impl DiskSetup {
    /// A disk named `name` of `mib` MiB on the control socket; `edit` may
    /// change its configuration (and write the image, at `disk.path`,
    /// before the supervisor opens it). `first_env` is the environment of
    /// the device's first backend instance (`SHADOWBACK_CRASH_AT`).
    pub fn start(
        tag: &str,
        name: &str,
        mib: u64,
        edit: impl FnOnce(&mut DiskConfig),
        first_env: &[(&str, &str)],
    ) -> Self {
        let dir = TempDir::new(tag);
        let image = dir.join("disk.img");
        make_image(&image, mib << 20);
        let mut disk = DiskConfig::new(name, &image);
        disk.cache = cache_for(&image);
        edit(&mut disk);
        let vhost = disk.vhost_user.clone();
        let harness = Harness::start_with(dir, vec![disk], backend_command_with_env(first_env));
        DiskSetup {
            harness,
            name: name.to_owned(),
            vhost,
            image,
        }
    }

    pub fn sup(&self) -> &SupervisorThread {
        self.harness.sup()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        self.harness.socket()
    }

    pub fn vhost_socket(&self) -> &Path {
        self.vhost.as_deref().expect("exported over vhost-user")
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn dir(&self) -> &Path {
        self.harness.dir()
    }

    pub fn stats(&self) -> DeviceStats {
        self.harness.stats(&self.name)
    }

    /// Waits until `pred` holds (or fails after [`STATS_TIMEOUT`]).
    pub fn wait_for(&self, what: &str, pred: impl Fn(&DeviceStats) -> bool) -> DeviceStats {
        self.harness.wait_for(&self.name, what, pred)
    }

    /// Injects `fault` and waits for the recovery it causes.
    pub fn fault_and_recover(&self, fault: Fault) {
        let before = self.inject(fault).recoveries;
        self.wait_for("the recovery", |s| s.recoveries > before);
    }

    /// Injects `fault`, again while the supervisor answers `EBUSY` (the
    /// instance an earlier fault ended, or one the watchdog found hung, is
    /// still being replaced: nothing was done, docs/PROTOCOL.md §6a), and
    /// returns the device's counters read just before the accepted one.
    pub fn inject(&self, fault: Fault) -> DeviceStats {
        let deadline = Instant::now() + STATS_TIMEOUT;
        loop {
            let before = self.stats();
            match self.sup().fault(&self.name, fault) {
                Ok(()) => return before,
                Err(e) if e.to_string().contains("EBUSY") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("inject {fault:?} into {}: {e}", self.name),
            }
        }
    }

    /// The native client with `queues` virtqueues (EVENT_IDX on).
    pub fn connect(&self, queues: u16) -> VhostUserBlk {
        self.connect_with(VhostUserBlkOptions {
            queues,
            ..VhostUserBlkOptions::default()
        })
    }

    pub fn connect_with(&self, opts: VhostUserBlkOptions) -> VhostUserBlk {
        VhostUserBlk::connect(self.vhost_socket(), opts).expect("vhost-user client connects")
    }

    /// Stops the supervisor and reports how that went.
    pub fn stop(self) {
        self.harness.stop();
    }
}
