//! `shadowback blkback` and `shadowback netback`: the backend processes the
//! supervisor execs.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use shadowback_blkback::backend::Backend;
use shadowback_blkback::instance::BackendConfig;
use shadowback_blkback::request::{DiskGeometry, DEFAULT_MAX_INDIRECT_SEGMENTS};
use shadowback_dataplane::confine::Adopted;
use shadowback_dataplane::control::{recv_control, refuse_unexpected, sanitize};
use shadowback_dataplane::event_loop::BackendError;
use shadowback_dataplane::recovery::{CrashAction, CrashSpec};
use shadowback_dataplane::uring::{Engine, EngineConfig};
use shadowback_netback::backend::{NetBackend, NetConfig};
use shadowback_netback::tapbatch::TapBatch;
use shadowback_shadow::{MetricsPage, MetricsWriter};
use shadowback_xenbus::protocol::{key, kind, ErrorCode, QosLimits};
use shadowback_xenbus::{Message, SeqPacket};

use crate::CliError;

#[derive(Parser, Debug)]
pub struct BlkbackArgs {
    /// Device name (for logs).
    #[arg(long)]
    device: String,
    /// Inherited control socket (SOCK_SEQPACKET) to the supervisor.
    #[arg(long)]
    control_fd: RawFd,
    /// Inherited disk image fd (required but with `--spare`, which gets
    /// its disk with `adopt`).
    #[arg(long)]
    disk_fd: Option<RawFd>,
    /// Inherited metrics page (a sealed memfd) of the device.
    #[arg(long)]
    metrics_fd: Option<RawFd>,
    /// Domain id the guest's grants must name.
    #[arg(long, default_value_t = 0)]
    backend_id: u16,
    /// Disk size in 512-byte sectors.
    #[arg(long, required_unless_present = "spare")]
    sectors: Option<u64>,
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
    /// QoS: requests per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    iops_limit: u64,
    /// QoS: requests the bucket holds (0: a tenth of a second's worth).
    #[arg(long, default_value_t = 0)]
    iops_burst: u64,
    /// QoS: bytes per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    bytes_limit: u64,
    /// QoS: bytes the bucket holds (0: a tenth of a second's worth).
    #[arg(long, default_value_t = 0)]
    bytes_burst: u64,
    /// Start as a spare of the standby pool (docs/ARCHITECTURE.md §7.5):
    /// no device yet; set up, confine, and wait for `adopt`.
    #[arg(long)]
    spare: bool,
}

/// Confines the process (docs/ARCHITECTURE.md §1.1) unless told not to:
/// called once its engine is set up and its fds are open, before the
/// first control message, so before anything a guest wrote is read.
fn confine(device: &str, no_confine: bool) -> Result<(), CliError> {
    register_for_fencing(device);
    if no_confine {
        tracing::warn!(device, "not confined (--no-confine)");
        return Ok(());
    }
    shadowback_dataplane::confine::confine()
        .map_err(|e| format!("{device}: {e}: {}", error_chain(&e)))?;
    Ok(())
}

/// docs/ARCHITECTURE.md §7.2: registers for the supervisor's membarrier,
/// before the filter, which does not allow `membarrier`.
fn register_for_fencing(device: &str) {
    if !shadowback_dataplane::death::register_for_fencing() {
        tracing::warn!(
            device,
            "membarrier unavailable: a takeover waits for this process's exit"
        );
    }
}

/// A spare's confinement (docs/ARCHITECTURE.md §1.1, §7.5): before it
/// reads its first control message, with what adoption needs besides;
/// `None` unconfined.
fn confine_spare(device: &str, no_confine: bool) -> Result<Option<Adopted>, CliError> {
    register_for_fencing(device);
    if no_confine {
        tracing::warn!(device, "not confined (--no-confine)");
        return Ok(None);
    }
    let then = shadowback_dataplane::confine::confine_spare()
        .map_err(|e| format!("{device}: {e}: {}", error_chain(&e)))?;
    Ok(Some(then))
}

/// Tightens an adopted spare's filter to a backend's, passing `set_up`'s
/// result through.
fn adopted<T>(then: Option<Adopted>, set_up: T) -> Result<T, CliError> {
    if let Some(then) = then {
        then.tighten()
            .map_err(|e| format!("{e}: {}", error_chain(&e)))?;
    }
    Ok(set_up)
}

/// What `adopt` tells a spare (docs/PROTOCOL.md §6): the command line a
/// backend started for the device would have (each key `--key=value`, an
/// empty value a bare `--key`), and the descriptors that came with it.
struct Adoption {
    argv: Vec<String>,
    fds: Vec<OwnedFd>,
}

/// Waits for `adopt`, refusing anything else; `None` when the supervisor
/// lets the spare go first. The supervisor wrote every byte of it: nothing
/// here comes from a guest.
fn await_adoption(
    control: &SeqPacket,
    control_fd: RawFd,
    subcommand: &str,
) -> Result<Option<Adoption>, CliError> {
    loop {
        let (msg, fds) = match recv_control(control) {
            Ok(m) => m,
            Err(BackendError::SupervisorGone) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if msg.kind() != kind::ADOPT {
            refuse_unexpected(control, msg.kind())?;
            continue;
        }
        let mut argv = vec![subcommand.to_string(), format!("--control-fd={control_fd}")];
        argv.extend(msg.iter().map(|(k, v)| match v {
            "" => format!("--{k}"),
            v => format!("--{k}={v}"),
        }));
        return Ok(Some(Adoption { argv, fds }));
    }
}

/// `ok` to `adopt`, with the µs since it was `told`.
fn adopted_reply(told: Instant) -> Message {
    let us = u64::try_from(told.elapsed().as_micros()).unwrap_or(u64::MAX);
    Message::new(kind::OK).with(key::ADOPT_US, us)
}

/// Answers a failed adoption and ends the spare: the supervisor starts
/// the device a backend of its own instead.
fn refuse_adoption(control: &SeqPacket, e: CliError) -> Result<ExitCode, CliError> {
    let why = sanitize(&e.to_string());
    tracing::error!(error = %why, "adoption failed");
    control.send(&Message::error(ErrorCode::Einval, &why), &[])?;
    Err(e)
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
/// instead (`shadowback_virtio::inflight::RegionCrashPoint`). A `stop:`
/// prefix stops the instance there instead of aborting it
/// ([`CrashAction::Stop`]).
pub(crate) fn crash_at_from_env() -> Result<CrashSpec, CliError> {
    let Ok(spec) = std::env::var("SHADOWBACK_CRASH_AT") else {
        return Ok(CrashSpec::default());
    };
    let (action, spec) = match spec.strip_prefix("stop:") {
        Some(rest) => (CrashAction::Stop, rest.to_string()),
        None => (CrashAction::Abort, spec),
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
            action,
            ..CrashSpec::default()
        });
    }
    let point = point
        .parse()
        .map_err(|e| format!("SHADOWBACK_CRASH_AT: {e}"))?;
    Ok(CrashSpec {
        log: Some((point, nth)),
        action,
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

/// The io_uring of a block backend, spare or not.
fn blk_engine_config() -> EngineConfig {
    EngineConfig {
        entries: 512,
        ..EngineConfig::default()
    }
}

pub fn run(args: BlkbackArgs) -> Result<ExitCode, CliError> {
    let control = SeqPacket::from_fd(inherited(args.control_fd)?)?;
    // docs/ARCHITECTURE.md §7.2: a crash tells the supervisor at once.
    shadowback_dataplane::death::announce_crashes(args.control_fd);
    if args.spare {
        return run_blk_spare(&args, control);
    }
    let disk_fd = args.disk_fd.ok_or("--disk-fd is required")?;
    let disk = File::from(inherited(disk_fd)?);
    let engine = Engine::new(&disk, &blk_engine_config())?;
    drop(disk);
    let metrics = metrics_page(args.metrics_fd)?;
    confine(&args.device, args.no_confine)?;
    serve_blk(&args, control, engine, metrics)
}

/// A spare block backend: its engine set up with an empty file table,
/// confined, waiting for `adopt`; then the adopted disk's backend.
fn run_blk_spare(spare: &BlkbackArgs, control: SeqPacket) -> Result<ExitCode, CliError> {
    let mut engine = Engine::spare(&blk_engine_config())?;
    let then = confine_spare(&spare.device, spare.no_confine)?;
    let Some(adoption) = await_adoption(&control, spare.control_fd, "blkback")? else {
        return Ok(ExitCode::SUCCESS);
    };
    let told = Instant::now();
    let set_up = |engine: &mut Engine| -> Result<_, CliError> {
        let args =
            BlkbackArgs::try_parse_from(&adoption.argv).map_err(|e| format!("adopt: {e}"))?;
        let Ok([metrics, disk]) = <[OwnedFd; 2]>::try_from(adoption.fds) else {
            return Err("adopt: expected the metrics page and the disk".into());
        };
        engine.adopt_disk(&disk)?;
        let metrics = MetricsPage::open(metrics).map_err(|e| format!("metrics page: {e}"))?;
        Ok((args, MetricsWriter::new(metrics)))
    };
    let (args, metrics) = match set_up(&mut engine).and_then(|x| adopted(then, x)) {
        Ok(x) => x,
        Err(e) => return refuse_adoption(&control, e),
    };
    control.send(&adopted_reply(told), &[])?;
    serve_blk(&args, control, engine, Some(metrics))
}

/// Serves the disk `args` names on `engine` (which has it) until the
/// supervisor lets go; the process is confined already.
fn serve_blk(
    args: &BlkbackArgs,
    control: SeqPacket,
    engine: Engine,
    metrics: Option<MetricsWriter>,
) -> Result<ExitCode, CliError> {
    let cfg = BackendConfig {
        device: args.device.clone(),
        backend_id: args.backend_id,
        disk: DiskGeometry {
            sectors: args.sectors.ok_or("--sectors is required")?,
            readonly: args.readonly,
            discard: !args.no_discard && !args.readonly,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
        },
        max_ring_page_order: args.max_ring_page_order,
        engine: blk_engine_config(),
        shadow: !args.no_shadow,
        crash_at: crash_at_from_env()?,
        poll_us: args.poll_us,
        qos: QosLimits {
            iops: args.iops_limit,
            iops_burst: args.iops_burst,
            bytes: args.bytes_limit,
            bytes_burst: args.bytes_burst,
        },
    };
    let mut backend = Backend::with_engine(cfg, control, engine);
    if let Some(page) = metrics {
        backend.set_metrics(page);
    }
    tracing::info!(device = %args.device, pid = std::process::id(), "blkback running");
    match backend.run() {
        Ok(()) | Err(BackendError::SupervisorGone) => {
            tracing::info!(device = %args.device, stats = ?backend.stats(), "blkback exiting");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Parser, Debug)]
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
    /// As for `blkback`: poll the rings for this many µs after activity
    /// before sleeping (0: never poll; at most 1000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    poll_us: u32,
    /// As for `blkback`.
    #[arg(long)]
    no_confine: bool,
    /// As for `blkback`.
    #[arg(long)]
    metrics_fd: Option<RawFd>,
    /// As for `blkback`.
    #[arg(long)]
    spare: bool,
}

/// The network backend: serves one vif per `attach-net` until the
/// supervisor closes the control channel.
pub fn run_netback(args: NetbackArgs) -> Result<ExitCode, CliError> {
    let control = SeqPacket::from_fd(inherited(args.control_fd)?)?;
    // docs/ARCHITECTURE.md §7.2: a crash tells the supervisor at once.
    shadowback_dataplane::death::announce_crashes(args.control_fd);
    let engine = Engine::for_polls(&EngineConfig::default())?;
    // The TAP's batch ring too is set up before confinement.
    let tap_batch = TapBatch::new()?;
    if args.spare {
        let then = confine_spare(&args.device, args.no_confine)?;
        let Some(adoption) = await_adoption(&control, args.control_fd, "netback")? else {
            return Ok(ExitCode::SUCCESS);
        };
        let told = Instant::now();
        let set_up = || -> Result<_, CliError> {
            let args =
                NetbackArgs::try_parse_from(&adoption.argv).map_err(|e| format!("adopt: {e}"))?;
            let Ok([metrics]) = <[OwnedFd; 1]>::try_from(adoption.fds) else {
                return Err("adopt: expected the metrics page".into());
            };
            let metrics = MetricsPage::open(metrics).map_err(|e| format!("metrics page: {e}"))?;
            Ok((args, MetricsWriter::new(metrics)))
        };
        let (args, metrics) = match set_up().and_then(|x| adopted(then, x)) {
            Ok(x) => x,
            Err(e) => return refuse_adoption(&control, e),
        };
        control.send(&adopted_reply(told), &[])?;
        return serve_net(&args, control, (engine, tap_batch), Some(metrics));
    }
    let metrics = metrics_page(args.metrics_fd)?;
    confine(&args.device, args.no_confine)?;
    serve_net(&args, control, (engine, tap_batch), metrics)
}

/// Serves the vif `args` names until the supervisor lets go; the process
/// is confined already.
fn serve_net(
    args: &NetbackArgs,
    control: SeqPacket,
    (engine, tap_batch): (Engine, TapBatch),
    metrics: Option<MetricsWriter>,
) -> Result<ExitCode, CliError> {
    let cfg = NetConfig {
        device: args.device.clone(),
        backend_id: args.backend_id,
        shadow: !args.no_shadow,
        crash_at: crash_at_from_env()?,
        poll_us: args.poll_us,
    };
    let mut backend = NetBackend::with_engine(cfg, control, engine, tap_batch);
    backend.metrics = metrics;
    tracing::info!(device = %args.device, pid = std::process::id(), "netback running");
    match backend.run() {
        Ok(()) | Err(BackendError::SupervisorGone) => {
            tracing::info!(device = %args.device, stats = ?backend.stats(), "netback exiting");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}
