//! `shadowback blkback` and `shadowback netback`: the backend processes the
//! supervisor execs.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use clap::Args;
use shadowback_blkback::backend::Backend;
use shadowback_blkback::instance::BackendConfig;
use shadowback_blkback::request::{DiskGeometry, DEFAULT_MAX_INDIRECT_SEGMENTS};
use shadowback_dataplane::event_loop::BackendError;
use shadowback_dataplane::recovery::CrashSpec;
use shadowback_dataplane::uring::EngineConfig;
use shadowback_netback::backend::{NetBackend, NetConfig};
use shadowback_shadow::{MetricsPage, MetricsWriter};
use shadowback_xenbus::SeqPacket;

use crate::CliError;

#[derive(Args, Debug)]
pub struct BlkbackArgs {
    /// Device name (for logs).
    #[arg(long)]
    device: String,
    /// Inherited control socket (SOCK_SEQPACKET) to the supervisor.
    #[arg(long)]
    control_fd: RawFd,
    /// Inherited disk image fd.
    #[arg(long)]
    disk_fd: RawFd,
    /// Inherited metrics page (a sealed memfd) of the device.
    #[arg(long)]
    metrics_fd: Option<RawFd>,
    /// Domain id the guest's grants must name.
    #[arg(long, default_value_t = 0)]
    backend_id: u16,
    /// Disk size in 512-byte sectors.
    #[arg(long)]
    sectors: u64,
    /// Largest ring-page-order accepted.
    #[arg(long, default_value_t = 4)]
    max_ring_page_order: u8,
    #[arg(long)]
    readonly: bool,
    #[arg(long)]
    no_discard: bool,
    /// Do not write the shadow log (overhead benchmark only: a crash then
    /// loses the requests in flight).
    #[arg(long)]
    no_shadow: bool,
    /// Adaptive polling: after activity, poll the rings and the completion
    /// queue for this many µs before sleeping (0: never poll; at most 1000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    poll_us: u32,
    /// Do not confine the process (seccomp, capabilities, limits): for
    /// debugging with tools the filter would kill (docs/ARCHITECTURE.md
    /// §1.1).
    #[arg(long)]
    no_confine: bool,
}

/// Confines the process (docs/ARCHITECTURE.md §1.1) unless told not to:
/// called once its engine is set up and its fds are open, before the
/// first control message, so before anything a guest wrote is read.
fn confine(device: &str, no_confine: bool) -> Result<(), CliError> {
    // docs/ARCHITECTURE.md §7.2: before the filter, which does not allow
    // `membarrier`.
    if !shadowback_dataplane::death::register_for_fencing() {
        tracing::warn!(
            device,
            "membarrier unavailable: a takeover waits for this process's exit"
        );
    }
    if no_confine {
        tracing::warn!(device, "not confined (--no-confine)");
        return Ok(());
    }
    shadowback_dataplane::confine::confine()
        .map_err(|e| format!("{device}: {e}: {}", error_chain(&e)))?;
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `SHADOWBACK_CRASH_AT=consume.3` or `consume.3@100`: abort at that shadow
/// log crash point (on its 100th occurrence), in the first instance only;
/// `region-finish.3@2` names a crash point of the VMM's in-flight region
/// instead (`shadowback_virtio::inflight::RegionCrashPoint`).
pub(crate) fn crash_at_from_env() -> Result<CrashSpec, CliError> {
    let Ok(spec) = std::env::var("SHADOWBACK_CRASH_AT") else {
        return Ok(CrashSpec::default());
    };
    let (point, nth) = match spec.split_once('@') {
        Some((p, n)) => (
            p,
            n.parse::<u64>()
                .map_err(|e| format!("SHADOWBACK_CRASH_AT {spec:?}: {e}"))?,
        ),
        None => (spec.as_str(), 1),
    };
    let nth = nth.max(1);
    if point.starts_with("region-") {
        let point = point
            .parse()
            .map_err(|e| format!("SHADOWBACK_CRASH_AT: {e}"))?;
        return Ok(CrashSpec {
            region: Some((point, nth)),
            ..CrashSpec::default()
        });
    }
    let point = point
        .parse()
        .map_err(|e| format!("SHADOWBACK_CRASH_AT: {e}"))?;
    Ok(CrashSpec {
        log: Some((point, nth)),
        ..CrashSpec::default()
    })
}

/// Takes ownership of an fd inherited across exec, after checking it is open.
#[allow(
    unsafe_code,
    reason = "`OwnedFd::from_raw_fd`: the fd number comes from exec"
)]
pub(crate) fn inherited(fd: RawFd) -> Result<OwnedFd, CliError> {
    if fd < 3 {
        return Err(format!("fd {fd} is a standard stream, not an inherited fd").into());
    }
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| format!("fd {fd} is not open: {e}"))?;
    // Close-on-exec: nothing we might start inherits it.
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    // SAFETY: the fd is open (F_GETFD succeeded) and was handed to this
    // process at exec for it to own; nothing else in the process uses it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Maps the metrics page inherited at `fd`, if one was.
fn metrics_page(fd: Option<RawFd>) -> Result<Option<MetricsWriter>, CliError> {
    let Some(fd) = fd else {
        return Ok(None);
    };
    let page = MetricsPage::open(inherited(fd)?).map_err(|e| format!("metrics page: {e}"))?;
    Ok(Some(MetricsWriter::new(page)))
}

pub fn run(args: BlkbackArgs) -> Result<ExitCode, CliError> {
    let control = SeqPacket::from_fd(inherited(args.control_fd)?)?;
    // docs/ARCHITECTURE.md §7.2: a crash tells the supervisor at once.
    shadowback_dataplane::death::announce_crashes(args.control_fd);
    let disk = File::from(inherited(args.disk_fd)?);
    let cfg = BackendConfig {
        device: args.device.clone(),
        backend_id: args.backend_id,
        disk: DiskGeometry {
            sectors: args.sectors,
            readonly: args.readonly,
            discard: !args.no_discard && !args.readonly,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
        },
        max_ring_page_order: args.max_ring_page_order,
        engine: EngineConfig {
            entries: 512,
            ..EngineConfig::default()
        },
        shadow: !args.no_shadow,
        crash_at: crash_at_from_env()?,
        poll_us: args.poll_us,
    };
    let mut backend = Backend::new(cfg, control, &disk)?;
    if let Some(page) = metrics_page(args.metrics_fd)? {
        backend.set_metrics(page);
    }
    confine(&args.device, args.no_confine)?;
    tracing::info!(device = %args.device, pid = std::process::id(), "blkback running");
    match backend.run() {
        Ok(()) | Err(BackendError::SupervisorGone) => {
            tracing::info!(device = %args.device, stats = ?backend.stats(), "blkback exiting");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Args, Debug)]
pub struct NetbackArgs {
    /// Device name (for logs).
    #[arg(long)]
    device: String,
    /// Inherited control socket (SOCK_SEQPACKET) to the supervisor.
    #[arg(long)]
    control_fd: RawFd,
    /// Domain id the guest's grants must name.
    #[arg(long, default_value_t = 0)]
    backend_id: u16,
    /// Do not write the shadow logs (overhead benchmark only).
    #[arg(long)]
    no_shadow: bool,
    /// As for `blkback`.
    #[arg(long)]
    no_confine: bool,
    /// As for `blkback`.
    #[arg(long)]
    metrics_fd: Option<RawFd>,
}

/// The network backend: serves one vif per `attach-net` until the
/// supervisor closes the control channel.
pub fn run_netback(args: NetbackArgs) -> Result<ExitCode, CliError> {
    let control = SeqPacket::from_fd(inherited(args.control_fd)?)?;
    // docs/ARCHITECTURE.md §7.2: a crash tells the supervisor at once.
    shadowback_dataplane::death::announce_crashes(args.control_fd);
    let cfg = NetConfig {
        device: args.device.clone(),
        backend_id: args.backend_id,
        shadow: !args.no_shadow,
        crash_at: crash_at_from_env()?,
    };
    let mut backend = NetBackend::new(cfg, control)?;
    backend.metrics = metrics_page(args.metrics_fd)?;
    confine(&args.device, args.no_confine)?;
    tracing::info!(device = %args.device, pid = std::process::id(), "netback running");
    match backend.run() {
        Ok(()) | Err(BackendError::SupervisorGone) => {
            tracing::info!(device = %args.device, stats = ?backend.stats(), "netback exiting");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}
