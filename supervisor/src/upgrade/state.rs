//! The state one supervisor binary hands the next across `execve`: JSON
//! in a memfd, its descriptors named by number (they are inherited at the
//! same numbers).
//!
//! [`STATE_VERSION`] names the format. A binary reads only the versions
//! it lists for `--state-version`, and the old binary asks before it
//! execs; a state of another version is refused with an error, never
//! half-read. Change the version whenever a field changes meaning or a
//! field a reader needs is added.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::SupervisorError;

/// The format this binary writes (and the one it reads).
pub const STATE_VERSION: u32 = 1;
/// The environment variable naming the state memfd's descriptor.
pub const STATE_FD_ENV: &str = "SHADOWBACK_UPGRADE_STATE_FD";
/// The flag a binary answers with the state versions it reads.
pub(crate) const STATE_VERSION_FLAG: &str = "--state-version";
/// A state larger than this is refused (a config of many devices is tens
/// of KiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// The versions a `--state-version` answer lists.
pub(crate) fn versions_read(answer: &str) -> Vec<u32> {
    answer
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Everything a new supervisor binary takes over.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub version: u32,
    /// The configuration the devices were started with (not re-read from
    /// the file, which may have changed since).
    pub config: Config,
    /// The listening control socket.
    pub control: RawFd,
    /// The `[metrics] listen` TCP listener.
    pub metrics_listener: Option<RawFd>,
    /// The control connection that asked for the upgrade: the new binary
    /// answers it.
    pub requester: Option<RawFd>,
    /// The next I/O fence slot (`spawn`): never reused.
    pub next_fence_slot: i64,
    pub devices: Vec<DeviceState>,
    /// The block class's standby pool (docs/ARCHITECTURE.md §7.5).
    pub block_pool: PoolState,
    /// The net class's standby pool.
    pub net_pool: PoolState,
    /// Guests connected over the control socket.
    pub guests: Vec<GuestState>,
    /// Vhost-user sockets.
    pub vhost: Vec<VhostState>,
    /// Every descriptor named above, once.
    pub fds: Vec<RawFd>,
}

impl State {
    /// Writes the state into a new memfd (its `FD_CLOEXEC` is still set).
    pub fn to_memfd(&self) -> Result<std::fs::File, String> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let bytes = serde_json::to_vec(self).map_err(|e| format!("encoding the state: {e}"))?;
        let fd = memfd_create(c"shadowback-upgrade-state", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| format!("state memfd: {e}"))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&bytes)
            .and_then(|()| file.rewind())
            .map_err(|e| format!("writing the state: {e}"))?;
        Ok(file)
    }

    /// Reads a state from `file` (the memfd the previous binary wrote);
    /// one of another version is refused.
    pub fn read(mut file: std::fs::File) -> Result<Self, SupervisorError> {
        let err = |why: String| SupervisorError::Runtime(format!("upgrade state: {why}"));
        let mut text = String::new();
        file.rewind()
            .and_then(|_| {
                Read::by_ref(&mut file)
                    .take(MAX_STATE_BYTES)
                    .read_to_string(&mut text)
            })
            .map_err(|e| err(format!("fd {}: {e}", file.as_raw_fd())))?;
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } =
            serde_json::from_str(&text).map_err(|e| err(format!("no version: {e}")))?;
        if version != STATE_VERSION {
            return Err(err(format!(
                "version {version}; this binary reads {STATE_VERSION}"
            )));
        }
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }
}

/// One device's state.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DeviceState {
    pub name: String,
    pub class: ClassState,
    /// The metrics page (docs/ARCHITECTURE.md §4.1).
    pub metrics: RawFd,
    pub current: Option<InstanceState>,
    pub attached: Option<AttachedState>,
    pub next_attachment: u64,
    pub poisons: Vec<u64>,
    pub blame: bool,
    pub startup_deaths: u32,
    /// Why the device was given up, if it was.
    pub given_up: Option<String>,
    /// The counters, as the `status` message carries them.
    pub stats: String,
}

/// A class's standby pool: its size (grown by a disk added at run time)
/// and its spares.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PoolState {
    pub size: usize,
    pub spares: Vec<InstanceState>,
}

/// What a device class holds for the device's life.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ClassState {
    /// A disk: the supervisor's description of the image, which holds the
    /// image's `flock`, and the capacity its guests were shown.
    Disk { image: RawFd, sectors: u64 },
    /// A vif on a cable end.
    Cable { fd: RawFd },
    /// A vif on a TAP.
    Tap {
        name: String,
        queues: Vec<RawFd>,
        vnet_hdr: usize,
        ctl: RawFd,
    },
}

/// A running backend instance.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InstanceState {
    pub pid: u32,
    pub pidfd: RawFd,
    pub control: RawFd,
    pub poisons_sent: usize,
    pub serving: bool,
    pub fence: Option<FenceState>,
    /// It registered for `MEMBARRIER_CMD_GLOBAL_EXPEDITED`
    /// (`Instance::membarrier`): the binary that takes over can prove a
    /// kill of it final at once (docs/ARCHITECTURE.md §7.2). A state
    /// written without it reads `false`: that instance's kill waits for
    /// its exit, as it did before.
    #[serde(default)]
    pub membarrier: bool,
}

/// An instance's I/O fence (`spawn::IoFence`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FenceState {
    pub disk: RawFd,
    pub slot: Option<i64>,
}

/// The attached frontend.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AttachedState {
    pub id: u64,
    /// The frontend was told it lost the device (its connection is
    /// closing).
    pub lost: bool,
    pub session: Option<SessionState>,
}

/// A session: the attach message every instance gets and its
/// descriptors, in message order, then the shadow logs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionState {
    pub message: String,
    pub fds: Vec<RawFd>,
    pub logs: Vec<RawFd>,
}

/// A guest connected over the control socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GuestState {
    pub socket: RawFd,
    pub device: String,
    pub attachment: u64,
    pub frontend: String,
}

/// A vhost-user socket and the VMM connected to it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VhostState {
    pub device: String,
    pub listener: RawFd,
    pub connections: u64,
    pub connection: Option<VhostConnState>,
}

/// What a VMM set up on its vhost-user connection.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VhostConnState {
    pub socket: RawFd,
    pub frontend: String,
    pub wire: WireFeatures,
    pub acked_features: u64,
    pub features_set: bool,
    pub memory: Option<Vec<RegionState>>,
    pub vrings: Vec<VringState>,
    pub inflight: Option<InflightState>,
    pub device_state: Option<RawFd>,
    pub running: Option<Vec<u16>>,
    pub attachment: Option<u64>,
    /// The VMM's backend request channel (`SET_BACKEND_REQ_FD`), for
    /// config-change messages.
    pub backend_channel: Option<RawFd>,
}

/// One region of the VMM's memory table.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RegionState {
    pub gpa: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub fd: RawFd,
}

/// The VMM's in-flight region (`INFLIGHT_SHMFD`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InflightState {
    pub fd: RawFd,
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// What the `vhost` crate's request handler keeps of the negotiation
/// (it has no setter: the new process replays these requests to it).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct WireFeatures {
    /// `GET_FEATURES` was asked.
    pub features_asked: bool,
    /// The last `SET_FEATURES` value.
    pub acked: Option<u64>,
    /// The last `SET_PROTOCOL_FEATURES` value.
    pub protocol: Option<u64>,
}

/// One vring.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VringState {
    pub size: u16,
    /// `(desc, avail, used)` guest-physical.
    pub addr: Option<(u64, u64, u64)>,
    pub base: u16,
    pub kick: Option<RawFd>,
    pub call: Option<RawFd>,
    pub enabled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let cfg = Config::parse(
            "socket = \"/tmp/none.sock\"\n[[disk]]\nname = \"d\"\npath = \"/tmp/none.img\"\n",
        )
        .unwrap();
        State {
            version: STATE_VERSION,
            config: cfg,
            control: 7,
            metrics_listener: None,
            requester: Some(9),
            next_fence_slot: 3,
            devices: Vec::new(),
            block_pool: PoolState::default(),
            net_pool: PoolState::default(),
            guests: Vec::new(),
            vhost: Vec::new(),
            fds: vec![7, 9],
        }
    }

    #[test]
    fn a_state_reads_back_and_another_version_is_refused() {
        let file = state().to_memfd().unwrap();
        let back = State::read(file).unwrap();
        assert_eq!(
            (back.control, back.requester, back.fds),
            (7, Some(9), vec![7, 9])
        );
        let mut newer = state();
        newer.version = STATE_VERSION + 1;
        let err = State::read(newer.to_memfd().unwrap()).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }

    /// The configuration as it stands goes through the state whole:
    /// QoS limits, the standby pool sizes, a multiqueue vif.
    #[test]
    fn the_configuration_as_it_stands_reads_back_unchanged() {
        let cfg = Config::parse(
            "socket = \"/tmp/none.sock\"\n[standby]\nblock_pool = 3\n\
             [[disk]]\nname = \"d\"\npath = \"/tmp/none.img\"\niops_limit = 50\n\
             iops_burst = 5\nbandwidth_limit_mib = 7\nstandby = false\n\
             [[nic]]\nname = \"n\"\ntap = \"t0\"\nqueues = 4\n\
             vhost_user = \"/tmp/n.sock\"\n",
        )
        .unwrap();
        let mut st = state();
        st.config = cfg.clone();
        st.block_pool = PoolState {
            size: 3,
            spares: Vec::new(),
        };
        let back = State::read(st.to_memfd().unwrap()).unwrap();
        assert_eq!(back.config, cfg);
        assert_eq!(back.block_pool.size, 3);
    }

    #[test]
    fn an_instance_keeps_its_membarrier_and_an_older_state_reads_without_it() {
        let instance = InstanceState {
            pid: 10,
            pidfd: 11,
            control: 12,
            poisons_sent: 0,
            serving: true,
            fence: None,
            membarrier: true,
        };
        let text = serde_json::to_string(&instance).unwrap();
        let back: InstanceState = serde_json::from_str(&text).unwrap();
        assert!(back.membarrier);
        // As a binary from before the field wrote it.
        let older = text.replace(",\"membarrier\":true", "");
        assert_ne!(older, text);
        let back: InstanceState = serde_json::from_str(&older).unwrap();
        assert!(!back.membarrier);
    }

    #[test]
    fn version_answers_are_lists_of_numbers() {
        assert_eq!(versions_read("1\n"), vec![1]);
        assert_eq!(versions_read("1 2"), vec![1, 2]);
        assert!(versions_read("shadowback 0.1.0").is_empty());
    }
}
