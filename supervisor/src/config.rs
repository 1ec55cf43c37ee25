//! `shadowback up CONFIG.toml`: which disks and network interfaces to
//! serve and where.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shadowback_xenbus::netif::{MacAddr, MAX_MTU, MIN_MTU};
use shadowback_xenbus::protocol::QosLimits;

use crate::SupervisorError;

/// How the disk image is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// `O_DIRECT`: guest I/O bypasses the host page cache (the default, as
    /// for production VM disks).
    #[default]
    None,
    /// Buffered through the host page cache; flushes still `fdatasync`.
    Writeback,
}

impl CacheMode {
    /// `None` (O_DIRECT) where the file system holding `image` supports it,
    /// else `Writeback`: for temporary images (demo, benchmarks, tests).
    pub fn best_for(image: &Path) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(image)
            .is_ok();
        if direct {
            CacheMode::None
        } else {
            CacheMode::Writeback
        }
    }
}

/// One disk to export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Device name guests ask for (`device=` key).
    pub name: String,
    /// Image file; its size (a multiple of 512 bytes) is the disk size.
    pub path: PathBuf,
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default)]
    pub readonly: bool,
    /// Domain id the backend uses (what guests name in their grants).
    #[serde(default)]
    pub backend_id: u16,
    /// Largest ring a guest may set up (`max-ring-page-order`, 0–4).
    #[serde(default = "default_ring_order")]
    pub max_ring_page_order: u8,
    /// Offer `feature-discard` (hole punching).
    #[serde(default = "default_true")]
    pub discard: bool,
    /// Take over with a spare of the block standby pool
    /// (docs/ARCHITECTURE.md §7.5, `[standby]`): a backend already
    /// exec'd, set up and confined, waiting for a device, so a takeover
    /// skips process start-up. Without it (or with no spare ready) a
    /// takeover is a cold restart.
    #[serde(default = "default_true")]
    pub standby: bool,
    /// The shadow layer (docs/ARCHITECTURE.md §6, §7): the supervisor hands the backend a
    /// shadow log and recovers a crashed or hung backend transparently.
    /// `false` starts backends with `--no-shadow`, sends `attach` without
    /// a log and does no recovery: a backend failure then disconnects the
    /// attached guest with `ENODEV` (for overhead comparisons).
    #[serde(default = "default_true")]
    pub shadow: bool,
    /// Hang watchdog: a backend whose shadow-log heartbeat has not moved
    /// for this long while the guest's ring has unanswered requests is
    /// declared hung and replaced. The backend beats at least every 20 ms,
    /// so values below [`MIN_HANG_TIMEOUT_MS`] are refused.
    #[serde(default = "default_hang_timeout_ms")]
    pub hang_timeout_ms: u64,
    /// Also export the disk as a vhost-user-blk device on this unix socket
    /// (docs/ARCHITECTURE.md §8). A stale socket file is replaced; the directory is
    /// created. The disk stays attachable through the control socket, but
    /// only one frontend uses it at a time.
    #[serde(default)]
    pub vhost_user: Option<PathBuf>,
    /// Virtqueues offered to a vhost-user frontend (1–16).
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    /// Largest virtqueue a vhost-user frontend may set up (a power of two
    /// up to [`MAX_VHOST_QUEUE_SIZE`]).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Peer uids (`SO_PEERCRED`) that may probe, connect and see the disk
    /// on the control socket and use its vhost-user socket, besides root
    /// and the supervisor's own uid (docs/PROTOCOL.md §1.2).
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Peer primary gids that may, as `allow_uids`.
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// Adaptive polling (docs/ARCHITECTURE.md §11.2): after activity, the
    /// backend polls the rings and its completion queue for this many µs
    /// before it sleeps, and the guest is not asked to kick meanwhile.
    /// Buys QD1 latency with CPU; 0 never polls. At most [`MAX_POLL_US`].
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
    /// QoS (docs/ARCHITECTURE.md §11.2): requests per second the backend
    /// takes from the guest; 0 (the default) is no limit.
    #[serde(default)]
    pub iops_limit: u64,
    /// Requests the IOPS bucket holds (a burst at full speed after a
    /// quiet spell); 0 is a tenth of a second's worth.
    #[serde(default)]
    pub iops_burst: u64,
    /// QoS: MiB per second the guest's reads and writes move; 0 (the
    /// default) is no limit.
    #[serde(default)]
    pub bandwidth_limit_mib: u64,
    /// MiB the bandwidth bucket holds; 0 is a tenth of a second's worth.
    #[serde(default)]
    pub bandwidth_burst_mib: u64,
    /// Take over without waiting for the dead instance's I/O: the next
    /// instance serves at once and holds back only the dead instance's
    /// unanswered requests and what conflicts with them, until its fence is
    /// down (docs/ARCHITECTURE.md §7.3). Off by default (§7.3 says why).
    #[serde(default)]
    pub fast_takeover: bool,
}

/// The `[[disk]]` keys `disk set` may change at run time (docs/PROTOCOL.md
/// §6a): the QoS limits. The others need a `disk remove` and `disk add`.
pub const RUNTIME_DISK_KEYS: [&str; 4] = [
    "iops_limit",
    "iops_burst",
    "bandwidth_limit_mib",
    "bandwidth_burst_mib",
];
/// Largest accepted `iops_limit` and `iops_burst`.
pub const MAX_IOPS_LIMIT: u64 = 100_000_000;
/// Largest accepted `bandwidth_limit_mib` and `bandwidth_burst_mib` (1 TiB).
pub const MAX_BANDWIDTH_MIB: u64 = 1 << 20;

/// Smallest accepted `hang_timeout_ms`: comfortably above the backend's
/// 20 ms heartbeat period.
pub const MIN_HANG_TIMEOUT_MS: u64 = 40;
/// Largest accepted `hang_timeout_ms` (one hour).
pub const MAX_HANG_TIMEOUT_MS: u64 = 3_600_000;
/// Default `hang_timeout_ms`.
pub const DEFAULT_HANG_TIMEOUT_MS: u64 = 100;
/// Default `poll_us`: 0, from `shadowback bench blk --poll-us` on two
/// shared cores (README, "Performance"): polling took a core from the
/// guest and the device for little gain.
pub const DEFAULT_POLL_US: u32 = 0;
/// Largest accepted `poll_us` (the backend's cap, 1 ms).
pub const MAX_POLL_US: u32 = 1000;
/// Most virtqueues per vhost-user disk.
pub const MAX_VHOST_QUEUES: u16 = 16;
/// Largest accepted `queue_size`.
pub const MAX_VHOST_QUEUE_SIZE: u16 = 1024;

impl DiskConfig {
    /// A disk with every optional setting at its default (as if only
    /// `name` and `path` were written in the TOML file).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            name: name.into(),
            path: path.into(),
            cache: CacheMode::default(),
            readonly: false,
            backend_id: 0,
            max_ring_page_order: default_ring_order(),
            discard: true,
            standby: true,
            shadow: true,
            hang_timeout_ms: DEFAULT_HANG_TIMEOUT_MS,
            vhost_user: None,
            num_queues: default_num_queues(),
            queue_size: default_queue_size(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            poll_us: DEFAULT_POLL_US,
            iops_limit: 0,
            iops_burst: 0,
            bandwidth_limit_mib: 0,
            bandwidth_burst_mib: 0,
            fast_takeover: false,
        }
    }

    /// The QoS limits its backends apply.
    pub fn qos(&self) -> QosLimits {
        QosLimits {
            iops: self.iops_limit,
            iops_burst: self.iops_burst,
            bytes: self.bandwidth_limit_mib.saturating_mul(1 << 20),
            bytes_burst: self.bandwidth_burst_mib.saturating_mul(1 << 20),
        }
    }

    /// A `[[disk]]` table given as `key=value` pairs (a `disk-add`
    /// message, docs/PROTOCOL.md §6a): each key is a `[[disk]]` key with
    /// `-` for `_`, each value a TOML value. Parsed by the configuration
    /// file's own parser (`toml` and serde, unknown keys refused); validate
    /// the result with [`Config::validate`] like any configuration.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SupervisorError> {
        let table = pairs_to_table(pairs, toml::Table::new())?;
        table
            .try_into()
            .map_err(|e: toml::de::Error| SupervisorError::Config(format!("[[disk]]: {e}")))
    }

    /// This disk with `pairs` (as [`from_pairs`](Self::from_pairs))
    /// changed; only [`RUNTIME_DISK_KEYS`] may be named.
    pub fn with_pairs<'a>(
        &self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SupervisorError> {
        let pairs: Vec<_> = pairs.into_iter().collect();
        if let Some((k, _)) = pairs
            .iter()
            .find(|(k, _)| !RUNTIME_DISK_KEYS.contains(&k.replace('-', "_").as_str()))
        {
            return Err(SupervisorError::Config(format!(
                "{k}: only {} change at run time",
                RUNTIME_DISK_KEYS.join(", ")
            )));
        }
        let current = toml::Table::try_from(self)
            .map_err(|e| SupervisorError::Config(format!("[[disk]]: {e}")))?;
        let table = pairs_to_table(pairs, current)?;
        table
            .try_into()
            .map_err(|e: toml::de::Error| SupervisorError::Config(format!("[[disk]]: {e}")))
    }
}

/// `key=value` pairs into `table`, each value parsed as one TOML value.
fn pairs_to_table<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    mut table: toml::Table,
) -> Result<toml::Table, SupervisorError> {
    for (key, text) in pairs {
        let key = key.replace('-', "_");
        // One value, whatever the text holds: `v = <text>` must parse as a
        // document of exactly that key.
        let doc: toml::Table = toml::from_str(&format!("v = {text}"))
            .map_err(|e| SupervisorError::Config(format!("{key} = {text}: {e}")))?;
        let value = match (doc.len(), doc.get("v")) {
            (1, Some(v)) => v.clone(),
            _ => {
                return Err(SupervisorError::Config(format!(
                    "{key} = {text}: not one value"
                )))
            }
        };
        table.insert(key, value);
    }
    Ok(table)
}

fn default_poll_us() -> u32 {
    DEFAULT_POLL_US
}

fn default_num_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    256
}

fn default_hang_timeout_ms() -> u64 {
    DEFAULT_HANG_TIMEOUT_MS
}

fn default_ring_order() -> u8 {
    4
}

fn default_true() -> bool {
    true
}

/// Limits of the control socket (`[control]`, docs/PROTOCOL.md §1.1): how
/// many connections it holds and how long one may stay silent before it
/// is attached. An attached guest's connection counts against none of
/// them (there is at most one per disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Connections held at once that are not attached. Never more than
    /// half the process's soft `RLIMIT_NOFILE`: the rest stays for the
    /// devices and takeovers, whatever the clients do.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Of those, connections one peer process may hold (the peer is the
    /// pid and uid of `SO_PEERCRED`).
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: u32,
    /// A connection whose first message has not arrived this long after
    /// it was accepted is closed.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A connection that is not attached and has sent nothing for this
    /// long is closed; so is one that does not read its answers for this
    /// long.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Peer uids (`SO_PEERCRED`) that are operators — may `fault` any
    /// device and see every device in `status` — besides root and the
    /// supervisor's own uid (docs/PROTOCOL.md §1.2).
    #[serde(default)]
    pub operator_uids: Vec<u32>,
    /// Peer primary gids that are operators, as `operator_uids`.
    #[serde(default)]
    pub operator_gids: Vec<u32>,
}

/// Default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Largest accepted `max_connections`.
pub const MAX_MAX_CONNECTIONS: u32 = 65_536;
/// Default `max_connections_per_peer`.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 32;
/// Default `handshake_timeout_ms`.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default `idle_timeout_ms`.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Smallest accepted `handshake_timeout_ms` and `idle_timeout_ms`.
pub const MIN_CONTROL_TIMEOUT_MS: u64 = 100;
/// Largest accepted `handshake_timeout_ms` and `idle_timeout_ms` (one hour).
pub const MAX_CONTROL_TIMEOUT_MS: u64 = 3_600_000;

fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}

fn default_max_connections_per_peer() -> u32 {
    DEFAULT_MAX_CONNECTIONS_PER_PEER
}

fn default_handshake_timeout_ms() -> u64 {
    DEFAULT_HANDSHAKE_TIMEOUT_MS
}

fn default_idle_timeout_ms() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            operator_uids: Vec::new(),
            operator_gids: Vec::new(),
        }
    }
}

/// What one frontend may make the supervisor and a backend hold for one
/// device (`[limits]`, docs/PROTOCOL.md §1.3). Every device gets these
/// limits; what else bounds a guest is the device's own keys (its ring or
/// virtqueue sizes bound the requests in flight and the shadow logs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Guest memory a frontend may hand one device, in MiB: a Xen
    /// region's size, or the sum of a vhost-user memory table's regions.
    /// Backends map all of it.
    #[serde(default = "default_max_guest_memory_mib")]
    pub max_guest_memory_mib: u64,
    /// Regions of a vhost-user memory table (1–8).
    #[serde(default = "default_max_memory_regions")]
    pub max_memory_regions: u32,
    /// Attach attempts one device takes per second, over the control
    /// socket and vhost-user together, with a burst of as many; more get
    /// `EAGAIN`. Only clients allowed to use the device can spend them.
    #[serde(default = "default_attaches_per_second")]
    pub attaches_per_second: u32,
}

/// Default `max_guest_memory_mib` (256 GiB).
pub const DEFAULT_MAX_GUEST_MEMORY_MIB: u64 = 256 << 10;
/// Largest accepted `max_guest_memory_mib` (8 TiB: 8 regions of the 1 TiB
/// a backend maps at most).
pub const MAX_MAX_GUEST_MEMORY_MIB: u64 = 8 << 20;
/// Default and largest `max_memory_regions` (the protocol's maximum).
pub const DEFAULT_MAX_MEMORY_REGIONS: u32 = 8;
/// Default `attaches_per_second`.
pub const DEFAULT_ATTACHES_PER_SECOND: u32 = 50;
/// Largest accepted `attaches_per_second`.
pub const MAX_ATTACHES_PER_SECOND: u32 = 10_000;

fn default_max_guest_memory_mib() -> u64 {
    DEFAULT_MAX_GUEST_MEMORY_MIB
}

fn default_max_memory_regions() -> u32 {
    DEFAULT_MAX_MEMORY_REGIONS
}

fn default_attaches_per_second() -> u32 {
    DEFAULT_ATTACHES_PER_SECOND
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_guest_memory_mib: DEFAULT_MAX_GUEST_MEMORY_MIB,
            max_memory_regions: DEFAULT_MAX_MEMORY_REGIONS,
            attaches_per_second: DEFAULT_ATTACHES_PER_SECOND,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), SupervisorError> {
        let bad = |key: &str, value: u64, max: u64| {
            Err(SupervisorError::Config(format!(
                "[limits] {key} {value} is outside 1..={max}"
            )))
        };
        if !(1..=MAX_MAX_GUEST_MEMORY_MIB).contains(&self.max_guest_memory_mib) {
            return bad(
                "max_guest_memory_mib",
                self.max_guest_memory_mib,
                MAX_MAX_GUEST_MEMORY_MIB,
            );
        }
        if !(1..=DEFAULT_MAX_MEMORY_REGIONS).contains(&self.max_memory_regions) {
            return bad(
                "max_memory_regions",
                self.max_memory_regions.into(),
                DEFAULT_MAX_MEMORY_REGIONS.into(),
            );
        }
        if !(1..=MAX_ATTACHES_PER_SECOND).contains(&self.attaches_per_second) {
            return bad(
                "attaches_per_second",
                self.attaches_per_second.into(),
                MAX_ATTACHES_PER_SECOND.into(),
            );
        }
        Ok(())
    }
}

/// What every backend process of this supervisor may do (`[backend]`,
/// docs/ARCHITECTURE.md §1.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPolicy {
    /// Backends confine themselves once set up, before they read guest
    /// data: no capabilities, `no_new_privs`, bounded `RLIMIT_NOFILE`, no
    /// core dumps, a seccomp filter that kills on any other syscall and an
    /// io_uring restricted to its opcodes. `false` starts them with
    /// `--no-confine`, for debugging (strace is fine either way; gdb and
    /// core dumps are not).
    #[serde(default = "default_true")]
    pub confine: bool,
}

impl Default for BackendPolicy {
    fn default() -> Self {
        BackendPolicy { confine: true }
    }
}

/// One network interface (vif) to export over Xen netif
/// (docs/PROTOCOL.md §4.7): the guest's side of a link whose other side
/// — the *wire* — the supervisor creates at start and holds for its
/// lifetime, lending it to every backend instance.
///
/// Exactly one of `cable` and `tap` says what the wire is. A cable joins
/// two vifs of this supervisor point to point, and both must name each
/// other (`cable = "b"` in vif `a`, `cable = "a"` in vif `b`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Device name guests ask for (`device=` key).
    pub name: String,
    /// The vif's MAC address (`xx:xx:xx:xx:xx:xx`, unicast); by default a
    /// locally administered address derived from `name`
    /// ([`NicConfig::mac_addr`]).
    #[serde(default)]
    pub mac: Option<String>,
    /// Link MTU, 68–65521.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// The other vif of a point-to-point cable (it must name this one).
    #[serde(default)]
    pub cable: Option<String>,
    /// A TAP interface: adopted if it exists, else created; the
    /// supervisor holds its fd, so its carrier stays up across backend
    /// restarts.
    #[serde(default)]
    pub tap: Option<String>,
    /// Keep a hot-standby backend process, as for a disk.
    #[serde(default = "default_true")]
    pub standby: bool,
    /// The shadow layer: two shadow logs (TX, RX) per attached vif and
    /// transparent recovery; `false` disconnects the guest when its
    /// backend fails.
    #[serde(default = "default_true")]
    pub shadow: bool,
    /// Domain id the backend uses (what guests name in their grants).
    #[serde(default)]
    pub backend_id: u16,
    /// Hang watchdog, as for a disk (a vif is hung when TX requests wait
    /// and the heartbeat stalls).
    #[serde(default = "default_hang_timeout_ms")]
    pub hang_timeout_ms: u64,
    /// Peer uids that may probe, connect and see the vif, as for a disk.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Peer primary gids that may, as `allow_uids`.
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// Also serve the vif as a vhost-user-net device on this unix socket
    /// (docs/ARCHITECTURE.md §8.1), on the same wire; one frontend at a
    /// time, as for a disk.
    #[serde(default)]
    pub vhost_user: Option<PathBuf>,
    /// Largest virtqueue a vhost-user frontend may set up (a power of two
    /// up to [`MAX_VHOST_QUEUE_SIZE`]).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Receive/transmit queue pairs offered to a vhost-user-net driver
    /// (`VIRTIO_NET_F_MQ`, `max_virtqueue_pairs`; 1 to
    /// [`MAX_NIC_QUEUES`]). A TAP gets one queue per pair
    /// (`IFF_MULTI_QUEUE`); a cable carries every pair's frames
    /// (docs/ARCHITECTURE.md §8.1). A netif guest uses the first.
    #[serde(default = "default_nic_queues")]
    pub queues: u16,
    /// Adaptive polling, as for a disk: after activity, the netif backend
    /// polls its rings for this many µs before it sleeps, and the guest is
    /// not asked to kick meanwhile. 0 (the default) never polls; at most
    /// [`MAX_POLL_US`].
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
}

/// Most queue pairs of a vif: with its control queue, the virtqueues one
/// `attach-virtio` carries.
pub const MAX_NIC_QUEUES: u16 = shadowback_xenbus::virtio::MAX_QUEUE_PAIRS;

fn default_nic_queues() -> u16 {
    1
}

/// What a vif's wire is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicWire<'a> {
    /// A cable to the named vif.
    Cable(&'a str),
    /// The named TAP interface.
    Tap(&'a str),
}

/// Default `mtu`.
pub const DEFAULT_MTU: u16 = 1500;
/// Longest TAP interface name (`IFNAMSIZ` less the NUL).
const MAX_IFNAME: usize = 15;

fn default_mtu() -> u16 {
    DEFAULT_MTU
}

impl NicConfig {
    /// A vif on a cable to `peer`, every other setting at its default.
    pub fn cable(name: impl Into<String>, peer: impl Into<String>) -> Self {
        NicConfig {
            cable: Some(peer.into()),
            ..Self::bare(name.into())
        }
    }

    /// A vif on TAP interface `ifname`, every other setting at its
    /// default.
    pub fn tap(name: impl Into<String>, ifname: impl Into<String>) -> Self {
        NicConfig {
            tap: Some(ifname.into()),
            ..Self::bare(name.into())
        }
    }

    fn bare(name: String) -> Self {
        NicConfig {
            name,
            mac: None,
            mtu: DEFAULT_MTU,
            cable: None,
            tap: None,
            standby: true,
            shadow: true,
            backend_id: 0,
            hang_timeout_ms: DEFAULT_HANG_TIMEOUT_MS,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            vhost_user: None,
            queue_size: default_queue_size(),
            queues: default_nic_queues(),
            poll_us: DEFAULT_POLL_US,
        }
    }

    /// The configured MAC, or `02:` followed by five bytes of a hash of
    /// the name: locally administered, unicast, stable across restarts.
    pub fn mac_addr(&self) -> Result<MacAddr, SupervisorError> {
        let bad = |why: &str| {
            SupervisorError::Config(format!("nic {:?}: mac {:?}: {why}", self.name, self.mac))
        };
        let Some(text) = &self.mac else {
            // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
            let hash = self.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let b = hash.to_be_bytes();
            return Ok(MacAddr([0x02, b[0], b[1], b[2], b[3], b[4]]));
        };
        let mac: MacAddr = text.parse().map_err(|why: &str| bad(why))?;
        if !mac.is_unicast() {
            return Err(bad("the multicast bit is set"));
        }
        if mac.0 == [0; 6] {
            return Err(bad("all zeros"));
        }
        Ok(mac)
    }

    /// The wire, once [`Config::validate`] has checked there is exactly
    /// one.
    pub fn wire(&self) -> Option<NicWire<'_>> {
        match (&self.cable, &self.tap) {
            (Some(peer), None) => Some(NicWire::Cable(peer)),
            (None, Some(tap)) => Some(NicWire::Tap(tap)),
            _ => None,
        }
    }
}

impl ControlConfig {
    fn validate(&self) -> Result<(), SupervisorError> {
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
        ] {
            if !(1..=MAX_MAX_CONNECTIONS).contains(&value) {
                return Err(SupervisorError::Config(format!(
                    "[control] {key} {value} is outside 1..={MAX_MAX_CONNECTIONS}"
                )));
            }
        }
        for (key, value) in [
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if !(MIN_CONTROL_TIMEOUT_MS..=MAX_CONTROL_TIMEOUT_MS).contains(&value) {
                return Err(SupervisorError::Config(format!(
                    "[control] {key} {value} is outside {MIN_CONTROL_TIMEOUT_MS}..={MAX_CONTROL_TIMEOUT_MS}"
                )));
            }
        }
        Ok(())
    }
}

/// `[metrics]`: the Prometheus listener (docs/ARCHITECTURE.md §4.1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve the Prometheus text format on (any path);
    /// none by default. Meant for a loopback address: the page has no
    /// access control beyond the address.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `[standby]`: the standby pools (docs/ARCHITECTURE.md §7.5), one per
/// device class, shared by its devices with `standby = true`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyConfig {
    /// Spares for the disks; by default one (one disk failing at a time
    /// takes over warm), none if no disk has `standby = true`.
    #[serde(default)]
    pub block_pool: Option<usize>,
    /// Spares for the vifs, as `block_pool`.
    #[serde(default)]
    pub net_pool: Option<usize>,
}

/// The whole supervisor configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket guests connect to.
    pub socket: PathBuf,
    /// Its limits.
    #[serde(default)]
    pub control: ControlConfig,
    /// What backends may do.
    #[serde(default)]
    pub backend: BackendPolicy,
    /// The standby pools.
    #[serde(default)]
    pub standby: StandbyConfig,
    /// What one frontend may make a device hold.
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, rename = "nic")]
    pub nics: Vec<NicConfig>,
    /// The metrics listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

impl Config {
    /// Spares in the block pool: `[standby] block_pool`, else one if a
    /// disk may use it.
    pub fn block_pool(&self) -> usize {
        let wanted = self.disks.iter().any(|d| d.standby);
        self.standby.block_pool.unwrap_or(usize::from(wanted))
    }

    /// Spares in the net pool, as [`block_pool`](Self::block_pool).
    pub fn net_pool(&self) -> usize {
        let wanted = self.nics.iter().any(|n| n.standby);
        self.standby.net_pool.unwrap_or(usize::from(wanted))
    }
}

/// A device name usable as a key value.
fn good_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, SupervisorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SupervisorError::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, SupervisorError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| SupervisorError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Names are unique (disks and nics together) and usable as key
    /// values, ring orders in range, each nic's wire well-formed.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        if self.disks.is_empty() && self.nics.is_empty() {
            return Err(SupervisorError::Config(
                "no [[disk]] or [[nic]] configured".into(),
            ));
        }
        self.control.validate()?;
        self.limits.validate()?;
        for (class, size) in [
            ("block_pool", self.standby.block_pool),
            ("net_pool", self.standby.net_pool),
        ] {
            if size.is_some_and(|n| n > crate::pool::MAX_POOL) {
                return Err(SupervisorError::Config(format!(
                    "[standby] {class} is above {}",
                    crate::pool::MAX_POOL
                )));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !good_name(&d.name) {
                return Err(SupervisorError::Config(format!(
                    "disk name {:?}: use 1-64 characters of [A-Za-z0-9_-]",
                    d.name
                )));
            }
            if self.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(SupervisorError::Config(format!(
                    "disk name {:?} used twice",
                    d.name
                )));
            }
            if d.max_ring_page_order > 4 {
                return Err(SupervisorError::Config(format!(
                    "disk {:?}: max_ring_page_order {} is above 4",
                    d.name, d.max_ring_page_order
                )));
            }
            if !(MIN_HANG_TIMEOUT_MS..=MAX_HANG_TIMEOUT_MS).contains(&d.hang_timeout_ms) {
                return Err(SupervisorError::Config(format!(
                    "disk {:?}: hang_timeout_ms {} is outside {MIN_HANG_TIMEOUT_MS}..={MAX_HANG_TIMEOUT_MS}",
                    d.name, d.hang_timeout_ms
                )));
            }
            if d.poll_us > MAX_POLL_US {
                return Err(SupervisorError::Config(format!(
                    "disk {:?}: poll_us {} is above {MAX_POLL_US}",
                    d.name, d.poll_us
                )));
            }
            if !(1..=MAX_VHOST_QUEUES).contains(&d.num_queues) {
                return Err(SupervisorError::Config(format!(
                    "disk {:?}: num_queues {} is outside 1..={MAX_VHOST_QUEUES}",
                    d.name, d.num_queues
                )));
            }
            if !d.queue_size.is_power_of_two() || d.queue_size > MAX_VHOST_QUEUE_SIZE {
                return Err(SupervisorError::Config(format!(
                    "disk {:?}: queue_size {} is not a power of two up to {MAX_VHOST_QUEUE_SIZE}",
                    d.name, d.queue_size
                )));
            }
            for (key, value, max) in [
                ("iops_limit", d.iops_limit, MAX_IOPS_LIMIT),
                ("iops_burst", d.iops_burst, MAX_IOPS_LIMIT),
                (
                    "bandwidth_limit_mib",
                    d.bandwidth_limit_mib,
                    MAX_BANDWIDTH_MIB,
                ),
                (
                    "bandwidth_burst_mib",
                    d.bandwidth_burst_mib,
                    MAX_BANDWIDTH_MIB,
                ),
            ] {
                if value > max {
                    return Err(SupervisorError::Config(format!(
                        "disk {:?}: {key} {value} is above {max}",
                        d.name
                    )));
                }
            }
            for (burst, burst_value, limit, limit_value) in [
                ("iops_burst", d.iops_burst, "iops_limit", d.iops_limit),
                (
                    "bandwidth_burst_mib",
                    d.bandwidth_burst_mib,
                    "bandwidth_limit_mib",
                    d.bandwidth_limit_mib,
                ),
            ] {
                if burst_value > 0 && limit_value == 0 {
                    return Err(SupervisorError::Config(format!(
                        "disk {:?}: {burst} without {limit}",
                        d.name
                    )));
                }
            }
            if let Some(sock) = &d.vhost_user {
                let earlier = self.disks[..i].iter().map(|o| &o.vhost_user);
                self.check_vhost_socket(sock, earlier)
                    .map_err(|why| SupervisorError::Config(format!("disk {:?}: {why}", d.name)))?;
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            self.validate_nic(i, n)?;
        }
        Ok(())
    }

    /// A vhost-user socket is a path of its own: not the control socket,
    /// not one an `earlier` device (disk or nic) serves.
    fn check_vhost_socket<'a>(
        &self,
        sock: &Path,
        mut earlier: impl Iterator<Item = &'a Option<PathBuf>>,
    ) -> Result<(), String> {
        if sock.as_os_str().is_empty() || sock == self.socket {
            return Err("vhost_user must be a socket path of its own".into());
        }
        if earlier.any(|o| o.as_deref() == Some(sock)) {
            return Err(format!("vhost_user socket {} used twice", sock.display()));
        }
        Ok(())
    }

    fn validate_nic(&self, i: usize, n: &NicConfig) -> Result<(), SupervisorError> {
        let bad = |why: String| Err(SupervisorError::Config(format!("nic {:?}: {why}", n.name)));
        if let Some(sock) = &n.vhost_user {
            let earlier = self.disks.iter().map(|d| &d.vhost_user);
            if let Err(why) = self.check_vhost_socket(
                sock,
                earlier.chain(self.nics[..i].iter().map(|o| &o.vhost_user)),
            ) {
                return bad(why);
            }
        }
        if !n.queue_size.is_power_of_two() || n.queue_size > MAX_VHOST_QUEUE_SIZE {
            return bad(format!(
                "queue_size {} is not a power of two up to {MAX_VHOST_QUEUE_SIZE}",
                n.queue_size
            ));
        }
        if n.poll_us > MAX_POLL_US {
            return bad(format!("poll_us {} is above {MAX_POLL_US}", n.poll_us));
        }
        if !(1..=MAX_NIC_QUEUES).contains(&n.queues) {
            return bad(format!(
                "queues {} is outside 1..={MAX_NIC_QUEUES}",
                n.queues
            ));
        }
        if !good_name(&n.name) {
            return bad("use 1-64 characters of [A-Za-z0-9_-] in a name".into());
        }
        if self.disks.iter().any(|d| d.name == n.name) {
            return bad("the name is a disk's too".into());
        }
        if self.nics[..i].iter().any(|o| o.name == n.name) {
            return bad("name used twice".into());
        }
        if !(MIN_MTU..=MAX_MTU).contains(&n.mtu) {
            return bad(format!("mtu {} is outside {MIN_MTU}..={MAX_MTU}", n.mtu));
        }
        if !(MIN_HANG_TIMEOUT_MS..=MAX_HANG_TIMEOUT_MS).contains(&n.hang_timeout_ms) {
            return bad(format!(
                "hang_timeout_ms {} is outside {MIN_HANG_TIMEOUT_MS}..={MAX_HANG_TIMEOUT_MS}",
                n.hang_timeout_ms
            ));
        }
        let mac = n.mac_addr()?;
        for o in &self.nics[..i] {
            if o.mac_addr()? == mac {
                return bad(format!("mac {mac} is nic {:?}'s too", o.name));
            }
        }
        match n.wire() {
            None => bad("set exactly one of `cable` and `tap`".into()),
            Some(NicWire::Cable(peer)) => {
                if peer == n.name {
                    return bad("a cable cannot join a nic to itself".into());
                }
                match self.nics.iter().find(|o| o.name == peer) {
                    None => bad(format!("cable to unknown nic {peer:?}")),
                    Some(o) if o.cable.as_deref() != Some(n.name.as_str()) => bad(format!(
                        "cable to nic {peer:?}, which does not name {:?} as its cable",
                        n.name
                    )),
                    Some(_) => Ok(()),
                }
            }
            Some(NicWire::Tap(ifname)) => {
                let ok = !ifname.is_empty()
                    && ifname.len() <= MAX_IFNAME
                    && ifname
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return bad(format!(
                        "tap {ifname:?}: use 1-{MAX_IFNAME} characters of [A-Za-z0-9_.-]"
                    ));
                }
                if self.nics[..i]
                    .iter()
                    .any(|o| o.tap.as_deref() == Some(ifname))
                {
                    return bad(format!("tap {ifname:?} used twice"));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example() {
        let cfg = Config::parse(
            r#"
            socket = "/run/shadowback/control.sock"
            [[disk]]
            name = "disk0"
            path = "/var/lib/shadowback/disk0.img"
            cache = "writeback"
            [[disk]]
            name = "scratch"
            path = "/tmp/scratch.img"
            readonly = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.disks.len(), 2);
        assert_eq!(cfg.control, ControlConfig::default());
        assert_eq!(cfg.disks[0].cache, CacheMode::Writeback);
        assert_eq!(cfg.disks[1].cache, CacheMode::None);
        assert!(cfg.disks[1].readonly);
        assert_eq!(cfg.disks[1].max_ring_page_order, 4);
        for d in &cfg.disks {
            assert!(d.standby && d.shadow);
            assert_eq!(d.hang_timeout_ms, DEFAULT_HANG_TIMEOUT_MS);
        }
        assert_eq!(
            cfg.disks[0],
            DiskConfig {
                cache: CacheMode::Writeback,
                ..DiskConfig::new("disk0", "/var/lib/shadowback/disk0.img")
            }
        );
    }

    #[test]
    fn parses_recovery_settings() {
        let cfg = Config::parse(
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n\
             standby = false\nshadow = false\nhang_timeout_ms = 250",
        )
        .unwrap();
        assert!(!cfg.disks[0].standby);
        assert!(!cfg.disks[0].shadow);
        assert_eq!(cfg.disks[0].hang_timeout_ms, 250);
    }

    #[test]
    fn parses_control_limits() {
        let cfg = Config::parse(
            "socket = \"/s\"\n[control]\nmax_connections = 8\nmax_connections_per_peer = 2\n\
             handshake_timeout_ms = 500\nidle_timeout_ms = 2000\noperator_uids = [1000]\n\
             operator_gids = [10, 11]\n[[disk]]\nname = \"a\"\npath = \"/x\"\nallow_uids = [1001]\n\
             allow_gids = [100]\n[[nic]]\nname = \"n\"\ntap = \"t0\"\nallow_uids = [1002]",
        )
        .unwrap();
        assert_eq!(
            cfg.control,
            ControlConfig {
                max_connections: 8,
                max_connections_per_peer: 2,
                handshake_timeout_ms: 500,
                idle_timeout_ms: 2000,
                operator_uids: vec![1000],
                operator_gids: vec![10, 11],
            }
        );
        assert_eq!(
            (&cfg.disks[0].allow_uids, &cfg.disks[0].allow_gids),
            (&vec![1001], &vec![100])
        );
        assert_eq!(
            (&cfg.nics[0].allow_uids, &cfg.nics[0].allow_gids),
            (&vec![1002], &vec![])
        );
        let partial =
            Config::parse("socket = \"/s\"\n[control]\nmax_connections = 9\n[[disk]]\nname = \"a\"\npath = \"/x\"")
                .unwrap();
        assert_eq!(partial.control.max_connections, 9);
        assert_eq!(
            partial.control.max_connections_per_peer,
            DEFAULT_MAX_CONNECTIONS_PER_PEER
        );
    }

    #[test]
    fn parses_limits_with_defaults() {
        let base = "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n";
        assert_eq!(Config::parse(base).unwrap().limits, LimitsConfig::default());
        let cfg = Config::parse(&format!(
            "{base}[limits]\nmax_guest_memory_mib = 64\nmax_memory_regions = 2\nattaches_per_second = 5\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.limits,
            LimitsConfig {
                max_guest_memory_mib: 64,
                max_memory_regions: 2,
                attaches_per_second: 5,
            }
        );
        let partial = Config::parse(&format!("{base}[limits]\nattaches_per_second = 1\n")).unwrap();
        assert_eq!(
            partial.limits.max_guest_memory_mib,
            DEFAULT_MAX_GUEST_MEMORY_MIB
        );
        for (bad, says) in [
            ("max_guest_memory_mib = 0", "max_guest_memory_mib"),
            ("max_guest_memory_mib = 8388609", "max_guest_memory_mib"),
            ("max_memory_regions = 0", "max_memory_regions"),
            ("max_memory_regions = 9", "max_memory_regions"),
            ("attaches_per_second = 0", "attaches_per_second"),
            ("attaches_per_second = 10001", "attaches_per_second"),
            ("max_inflight = 5", "max_inflight"),
        ] {
            let err = Config::parse(&format!("{base}[limits]\n{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_metrics_listener_is_off_unless_configured() {
        let disk = "[[disk]]\nname = \"a\"\npath = \"/x\"\n";
        let off = Config::parse(&format!("socket = \"/s\"\n{disk}")).unwrap();
        assert_eq!(off.metrics.listen, None);
        let on = Config::parse(&format!(
            "socket = \"/s\"\n[metrics]\nlisten = \"127.0.0.1:9100\"\n{disk}"
        ))
        .unwrap();
        assert_eq!(on.metrics.listen, Some("127.0.0.1:9100".parse().unwrap()));
        for bad in ["listen = \"localhost\"", "port = 9100"] {
            let text = format!("socket = \"/s\"\n[metrics]\n{bad}\n{disk}");
            assert!(Config::parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_nic_takes_a_vhost_user_socket_of_its_own() {
        let nic = |name: &str, peer: &str, sock: &str| {
            format!("[[nic]]\nname = \"{name}\"\ncable = \"{peer}\"\nvhost_user = \"{sock}\"\n")
        };
        let cfg = Config::parse(&format!(
            "socket = \"/s\"\n{}{}",
            nic("a", "b", "/a.sock"),
            nic("b", "a", "/b.sock")
        ))
        .unwrap();
        assert_eq!(
            cfg.nics[0].vhost_user.as_deref(),
            Some(Path::new("/a.sock"))
        );
        assert_eq!(cfg.nics[1].queue_size, 256);
        for bad in [
            format!("{}{}", nic("a", "b", "/v"), nic("b", "a", "/v")),
            format!("{}{}", nic("a", "b", "/s"), nic("b", "a", "/b")),
            format!(
                "[[disk]]\nname = \"d\"\npath = \"/x\"\nvhost_user = \"/v\"\n{}{}",
                nic("a", "b", "/v"),
                nic("b", "a", "/b")
            ),
            format!(
                "{}queue_size = 100\n{}",
                nic("a", "b", "/a"),
                nic("b", "a", "/b")
            ),
        ] {
            let err = Config::parse(&format!("socket = \"/s\"\n{bad}")).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("nic \"")
                    && (msg.contains("vhost_user") || msg.contains("queue_size")),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_disk_from_message_pairs_is_parsed_like_the_file() {
        let d = DiskConfig::from_pairs([
            ("name", "\"d1\""),
            ("path", "\"/x\""),
            ("hang-timeout-ms", "200"),
            ("allow-uids", "[1, 2]"),
            ("iops-limit", "2000"),
        ])
        .unwrap();
        assert_eq!(
            d,
            DiskConfig {
                hang_timeout_ms: 200,
                allow_uids: vec![1, 2],
                iops_limit: 2000,
                ..DiskConfig::new("d1", "/x")
            }
        );
        for bad in [
            vec![("name", "\"d\"")],
            vec![("name", "\"d\""), ("path", "\"/x\""), ("colour", "1")],
            vec![
                ("name", "\"d\""),
                ("path", "\"/x\""),
                ("readonly", "\"yes\""),
            ],
            vec![
                ("name", "\"d\""),
                ("path", "\"/x\""),
                ("standby", "true\nshadow = false"),
            ],
            vec![("name", "\"d\""), ("path", "\"/x\" \n[control]")],
            vec![("name", "\"d\""), ("path", "1, extra = 2")],
        ] {
            assert!(DiskConfig::from_pairs(bad.clone()).is_err(), "{bad:?}");
        }
        let changed = d
            .with_pairs([("iops_limit", "50"), ("bandwidth-limit-mib", "10")])
            .unwrap();
        assert_eq!((changed.iops_limit, changed.bandwidth_limit_mib), (50, 10));
        assert_eq!(changed.qos().bytes, 10 << 20);
        assert_eq!(
            DiskConfig {
                iops_limit: 0,
                ..changed.clone()
            }
            .hang_timeout_ms,
            200
        );
        let err = d.with_pairs([("readonly", "true")]).unwrap_err();
        assert!(err.to_string().contains("only iops_limit"), "{err}");
    }

    #[test]
    fn qos_keys_are_checked() {
        let base = "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n";
        let cfg = Config::parse(&format!(
            "{base}iops_limit = 100\nbandwidth_limit_mib = 5\n"
        ))
        .unwrap();
        assert_eq!(cfg.disks[0].qos().iops, 100);
        assert_eq!(DiskConfig::new("a", "/x").qos(), QosLimits::default());
        for (bad, says) in [
            ("iops_burst = 5", "iops_burst without iops_limit"),
            ("bandwidth_burst_mib = 5", "bandwidth_burst_mib without"),
            ("iops_limit = 100000001", "iops_limit"),
            ("bandwidth_limit_mib = 1048577", "bandwidth_limit_mib"),
            ("iops_limit = -1", "iops_limit"),
        ] {
            let err = Config::parse(&format!("{base}{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn fast_takeover_is_off_unless_turned_on() {
        assert!(!DiskConfig::new("a", "/x").fast_takeover);
        let disk = |extra: &str| {
            let text = format!("socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n{extra}");
            Config::parse(&text).unwrap().disks[0].fast_takeover
        };
        assert!(!disk(""));
        assert!(disk("fast_takeover = true"));
    }

    #[test]
    fn poll_us_defaults_to_zero_and_is_read() {
        assert_eq!(DiskConfig::new("a", "/x").poll_us, DEFAULT_POLL_US);
        assert_eq!(DEFAULT_POLL_US, 0);
        let cfg =
            Config::parse("socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\npoll_us = 50")
                .unwrap();
        assert_eq!(cfg.disks[0].poll_us, 50);
    }

    #[test]
    fn a_nics_poll_us_defaults_to_zero_is_read_and_bounded() {
        assert_eq!(NicConfig::tap("t", "t0").poll_us, DEFAULT_POLL_US);
        let nic = |extra: &str| {
            Config::parse(&format!(
                "socket = \"/s\"\n[[nic]]\nname = \"t\"\ntap = \"t0\"\n{extra}"
            ))
            .map(|cfg| cfg.nics[0].poll_us)
        };
        assert_eq!(nic("").unwrap(), 0);
        assert_eq!(nic("poll_us = 50").unwrap(), 50);
        assert_eq!(nic("poll_us = 1000").unwrap(), MAX_POLL_US);
        let err = nic("poll_us = 1001").unwrap_err().to_string();
        assert!(err.contains("poll_us 1001 is above 1000"), "{err}");
    }

    #[test]
    fn parses_vhost_user_settings() {
        let cfg = Config::parse(
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n\
             vhost_user = \"/run/a.vhost\"\nnum_queues = 4\nqueue_size = 1024",
        )
        .unwrap();
        let d = &cfg.disks[0];
        assert_eq!(d.vhost_user.as_deref(), Some(Path::new("/run/a.vhost")));
        assert_eq!((d.num_queues, d.queue_size), (4, 1024));
        let plain = DiskConfig::new("b", "/y");
        assert_eq!(
            (plain.vhost_user, plain.num_queues, plain.queue_size),
            (None, 1, 256)
        );
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            "socket = \"/s\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a b\"\npath = \"/x\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n[[disk]]\nname = \"a\"\npath = \"/y\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nmax_ring_page_order = 5",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\npoll_us = 1001",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\ncolour = 1",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\ncache = \"sometimes\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nhang_timeout_ms = 10",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nstandby = \"yes\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nnum_queues = 0",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nnum_queues = 17",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nqueue_size = 100",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nqueue_size = 2048",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nvhost_user = \"/s\"",
            "socket = \"/s\"\n[control]\nmax_connections = 0\n[[disk]]\nname = \"a\"\npath = \"/x\"",
            "socket = \"/s\"\n[control]\nmax_connections_per_peer = 0\n[[disk]]\nname = \"a\"\npath = \"/x\"",
            "socket = \"/s\"\n[control]\nmax_connections = 70000\n[[disk]]\nname = \"a\"\npath = \"/x\"",
            "socket = \"/s\"\n[control]\nhandshake_timeout_ms = 10\n[[disk]]\nname = \"a\"\npath = \"/x\"",
            "socket = \"/s\"\n[control]\nidle_timeout_ms = 4000000\n[[disk]]\nname = \"a\"\npath = \"/x\"",
            "socket = \"/s\"\n[control]\nbacklog = 5\n[[disk]]\nname = \"a\"\npath = \"/x\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nvhost_user = \"/v\"\n\
             [[disk]]\nname = \"b\"\npath = \"/y\"\nvhost_user = \"/v\"",
        ] {
            assert!(Config::parse(bad).is_err(), "accepted: {bad}");
        }
    }
}

#[cfg(test)]
mod nic_tests {
    use super::*;

    const CABLE: &str = "socket = \"/s\"\n\
        [[nic]]\nname = \"a\"\ncable = \"b\"\n\
        [[nic]]\nname = \"b\"\ncable = \"a\"\nmac = \"02:00:00:00:00:0b\"\nmtu = 9000\n";

    #[test]
    fn parses_nics_with_defaults() {
        let cfg = Config::parse(CABLE).unwrap();
        assert!(cfg.disks.is_empty());
        let [a, b] = &cfg.nics[..] else {
            panic!("two nics: {:?}", cfg.nics);
        };
        assert_eq!(a, &NicConfig::cable("a", "b"));
        assert_eq!(
            (a.mtu, a.standby, a.shadow, a.backend_id),
            (1500, true, true, 0)
        );
        assert_eq!(a.wire(), Some(NicWire::Cable("b")));
        assert_eq!(b.mtu, 9000);
        assert_eq!(b.mac_addr().unwrap(), MacAddr([2, 0, 0, 0, 0, 0x0b]));
        let tap = Config::parse(
            "socket = \"/s\"\n[[nic]]\nname = \"t\"\ntap = \"sbtap0\"\nstandby = false\nshadow = false\nbackend_id = 3",
        )
        .unwrap();
        let t = &tap.nics[0];
        assert_eq!(t.wire(), Some(NicWire::Tap("sbtap0")));
        assert_eq!((a.queues, t.queues), (1, 1));
        let mq = Config::parse("socket = \"/s\"\n[[nic]]\nname = \"t\"\ntap = \"t0\"\nqueues = 7")
            .unwrap();
        assert_eq!(mq.nics[0].queues, 7);
        for n in [0, 8] {
            let toml =
                format!("socket = \"/s\"\n[[nic]]\nname = \"t\"\ntap = \"t0\"\nqueues = {n}");
            assert!(Config::parse(&toml).is_err(), "queues = {n}");
        }
        assert_eq!((t.standby, t.shadow, t.backend_id), (false, false, 3));
    }

    #[test]
    fn the_default_mac_is_local_unicast_and_stable() {
        let a = NicConfig::tap("vif0", "t0").mac_addr().unwrap();
        assert_eq!(a, NicConfig::tap("vif0", "t1").mac_addr().unwrap());
        assert_ne!(a, NicConfig::tap("vif1", "t0").mac_addr().unwrap());
        assert!(a.is_unicast());
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
    }

    /// Each bad config is refused, with an error that says why.
    #[test]
    fn rejects_bad_nics_with_clear_errors() {
        let nic = |name: &str, extra: &str| format!("[[nic]]\nname = \"{name}\"\n{extra}\n");
        let with = |nics: &[String]| format!("socket = \"/s\"\n{}", nics.concat());
        let disk = "[[disk]]\nname = \"a\"\npath = \"/x\"\n".to_string();
        for (text, says) in [
            (with(&[nic("a", "cable = \"zz\"")]), "unknown nic"),
            (with(&[nic("a", "cable = \"a\"")]), "itself"),
            (
                with(&[nic("a", "cable = \"b\""), nic("b", "tap = \"t0\"")]),
                "does not name",
            ),
            (
                with(&[
                    nic("a", "cable = \"b\""),
                    nic("b", "cable = \"c\""),
                    nic("c", "cable = \"b\""),
                ]),
                "does not name",
            ),
            (with(&[nic("a", "")]), "exactly one"),
            (
                with(&[nic("a", "tap = \"t0\"\ncable = \"a\"")]),
                "exactly one",
            ),
            (
                with(&[disk.clone(), nic("a", "tap = \"t0\"")]),
                "disk's too",
            ),
            (
                with(&[nic("a", "tap = \"t0\""), nic("a", "tap = \"t1\"")]),
                "used twice",
            ),
            (
                with(&[nic("a", "tap = \"t0\""), nic("b", "tap = \"t0\"")]),
                "used twice",
            ),
            (
                with(&[nic("a", "tap = \"t0\"\nmac = \"03:00:00:00:00:01\"")]),
                "multicast",
            ),
            (
                with(&[nic("a", "tap = \"t0\"\nmac = \"02:00:00:00:01\"")]),
                "six parts",
            ),
            (
                with(&[nic("a", "tap = \"t0\"\nmac = \"00:00:00:00:00:00\"")]),
                "zeros",
            ),
            (
                with(&[
                    nic("a", "tap = \"t0\"\nmac = \"02:00:00:00:00:01\""),
                    nic("b", "tap = \"t1\"\nmac = \"02:00:00:00:00:01\""),
                ]),
                "nic \"a\"'s too",
            ),
            (with(&[nic("a", "tap = \"t0\"\nmtu = 67")]), "mtu 67"),
            (with(&[nic("a", "tap = \"t0\"\nmtu = 65522")]), "mtu 65522"),
            (with(&[nic("a", "tap = \"a-name-far-too-long\"")]), "tap"),
            (with(&[nic("a", "tap = \"t/0\"")]), "tap"),
            (with(&[nic("a b", "tap = \"t0\"")]), "name"),
            (
                with(&[nic("a", "tap = \"t0\"\nhang_timeout_ms = 1")]),
                "hang_timeout_ms",
            ),
            (with(&[nic("a", "tap = \"t0\"\ncolour = 1")]), "colour"),
            ("socket = \"/s\"".to_string(), "no [[disk]] or [[nic]]"),
        ] {
            match Config::parse(&text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(
                    e.to_string().contains(says),
                    "{text}\n=> {e}\n(wanted {says:?})"
                ),
            }
        }
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let cfg = Config::parse(include_str!("../../fixtures/shadowback.toml")).unwrap();
        assert_eq!(cfg.disks[0].name, "disk0");
        assert_eq!(cfg.disks[0].cache, CacheMode::None);
        assert_eq!(cfg.disks[0].vhost_user, None);
        assert_eq!(cfg.control, ControlConfig::default());
        assert_eq!(cfg.backend, BackendPolicy::default());
        assert_eq!(cfg.limits, LimitsConfig::default());
        assert!(cfg.backend.confine);
    }

    #[test]
    fn backends_are_confined_unless_the_config_says_otherwise() {
        let base = "socket = \"/s\"\n[[disk]]\nname = \"d\"\npath = \"/d\"\n";
        assert!(Config::parse(base).unwrap().backend.confine);
        let off = Config::parse(&format!("{base}[backend]\nconfine = false\n")).unwrap();
        assert!(!off.backend.confine);
        assert!(Config::parse(&format!("{base}[backend]\nconfine = 1\n")).is_err());
        assert!(Config::parse(&format!("{base}[backend]\nseccomp = false\n")).is_err());
    }

    /// One spare per class that a device may use, unless `[standby]`
    /// says otherwise; `standby = false` everywhere needs none.
    #[test]
    fn the_standby_pools_default_to_one_spare_per_class_in_use() {
        let disk = "socket = \"/s\"\n[[disk]]\nname = \"d\"\npath = \"/d\"\n";
        let cfg = Config::parse(disk).unwrap();
        assert_eq!((cfg.block_pool(), cfg.net_pool()), (1, 0));
        let cold = Config::parse(&format!("{disk}standby = false\n")).unwrap();
        assert_eq!(cold.block_pool(), 0);
        let sized =
            Config::parse(&format!("{disk}[standby]\nblock_pool = 3\nnet_pool = 2\n")).unwrap();
        assert_eq!((sized.block_pool(), sized.net_pool()), (3, 2));
        let none = Config::parse(&format!("{disk}[standby]\nblock_pool = 0\n")).unwrap();
        assert_eq!(none.block_pool(), 0);
        assert!(Config::parse(&format!("{disk}[standby]\nblock_pool = 65\n")).is_err());
        assert!(Config::parse(&format!("{disk}[standby]\npool = 1\n")).is_err());
    }

    #[test]
    fn the_commented_vhost_user_example_is_valid() {
        let text = include_str!("../../fixtures/shadowback.toml");
        let start = text.find("# [[disk]]").expect("a commented example");
        let uncommented: String = text[..start]
            .lines()
            .chain(
                text[start..]
                    .lines()
                    .map(|l| l.strip_prefix("# ").unwrap_or(l)),
            )
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = Config::parse(&uncommented).unwrap();
        let d = &cfg.disks[1];
        assert_eq!(d.name, "vdisk0");
        assert_eq!(
            d.vhost_user.as_deref(),
            Some(Path::new("/run/shadowback/vdisk0.vhost"))
        );
        assert_eq!((d.num_queues, d.queue_size), (1, 256));
        let names: Vec<_> = cfg.nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["vif0", "vif1", "vif2"]);
        assert_eq!(cfg.nics[0].wire(), Some(NicWire::Tap("sbtap0")));
        assert_eq!(cfg.nics[1].wire(), Some(NicWire::Cable("vif2")));
    }
}
