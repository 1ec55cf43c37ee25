//! `shadowback`: the command-line entry to every part of the system.
//!
//! - `demo` runs the whole thing on an embedded default and reports;
//! - `up CONFIG.toml` runs the supervisor for the disks a config names;
//! - `bench blk` measures the Xen-ring path against raw io_uring;
//! - `bench net` measures netfront → netback → cable or TAP against the raw
//!   wire, `bench failover` the stall of backend crashes (disk or vif);
//! - `blkback`, `netback` and `guest` are the processes the others start.
//!
//! `unsafe` is denied; the one exception is taking ownership of the fds a
//! backend inherits at exec (`backend_cmd::inherited`).
#![deny(unsafe_code)]

mod backend_cmd;
mod bench;
mod control_cmd;
mod demo;
mod demo_net;
mod failover;
mod faults;
mod guest_cmd;
mod netbench;
mod netfailover;
mod netns;
mod netvif;
mod out;
mod scalebench;
mod scratch;
mod sd_notify;
mod upgradebench;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use out::errln;

#[derive(Parser)]
#[command(
    name = "shadowback",
    version,
    about = "Restartable, guest-transparent I/O backends over Xen-compatible rings"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a disk, its backend and a verifying guest on a temporary image, then report.
    Demo(demo::DemoArgs),
    /// Run the supervisor for the disks in CONFIG (TOML) until SIGINT/SIGTERM.
    Up {
        /// Configuration file (see fixtures/shadowback.toml).
        config: PathBuf,
    },
    /// Per-device counters of a running supervisor (crashes, recoveries, …).
    Status(control_cmd::StatusArgs),
    /// Inject a fault into a device's backend: kill, hang, spin, syscall or poison.
    Fault(control_cmd::FaultArgs),
    /// Add, remove, list, resize and reconfigure disks of a running supervisor.
    Disk {
        #[command(subcommand)]
        what: control_cmd::DiskCommand,
    },
    /// Replace a running supervisor's binary in place, keeping every backend and connection.
    Upgrade(control_cmd::UpgradeArgs),
    /// Benchmarks (commands, not tests: they print ratios measured in one run).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Block backend process (the supervisor starts it with its fds; not run by hand).
    Blkback(backend_cmd::BlkbackArgs),
    /// Network backend process (the supervisor starts it with its control fd; not run by hand).
    Netback(backend_cmd::NetbackArgs),
    /// Guest process: a frontend plus a verifying workload, reporting JSON lines on stdout.
    Guest {
        #[command(subcommand)]
        what: guest_cmd::GuestCommand,
    },
}

/// The flag a running supervisor asks a binary it is about to exec in a
/// live upgrade: which state versions it reads (docs/PROTOCOL.md §6a).
const STATE_VERSION_FLAG: &str = "--state-version";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(STATE_VERSION_FLAG))
        && args.next().is_none()
    {
        out::outln!("{}", shadowback_supervisor::upgrade::state_versions());
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    // The demo and the benchmarks kill backends on purpose: unless asked
    // for, keep the expected failure logs of the whole process tree (the
    // backends inherit the variable) out of their reports.
    if matches!(cli.command, Command::Demo(_) | Command::Bench { .. })
        && std::env::var_os("RUST_LOG").is_none()
    {
        std::env::set_var("RUST_LOG", "error,shadowback_supervisor=off,shadowback=off");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Up { config } => up(config),
        Command::Status(args) => control_cmd::status(args),
        Command::Fault(args) => control_cmd::fault(args),
        Command::Disk { what } => control_cmd::disk(what),
        Command::Upgrade(args) => control_cmd::upgrade(args),
        Command::Bench { what } => bench::run(what),
        Command::Blkback(args) => backend_cmd::run(args),
        Command::Netback(args) => backend_cmd::run_netback(args),
        Command::Guest { what } => guest_cmd::run(what),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            errln!("shadowback: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A boxed error for the command layer: every library error has its own
/// typed enum; here they only need to be shown.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

fn up(config: PathBuf) -> Result<ExitCode, CliError> {
    // Under systemd (`Type=notify`): READY once serving, STOPPING on
    // SIGTERM/SIGINT, WATCHDOG from the runtime that serves everything;
    // the listening sockets a crashed predecessor left in the
    // file-descriptor store, taken before anything could reuse their
    // numbers.
    let notifier = sd_notify::Notifier::from_env().map(std::sync::Arc::new);
    let listeners = shadowback_supervisor::fdstore::Listeners::from_env(notifier.clone())?;
    // Exec'd by a live upgrade: the previous binary's state, not the file,
    // says what to serve.
    let state = shadowback_supervisor::upgrade::take_state_fd()?;
    let cfg = match state {
        Some(_) => None,
        None => Some(shadowback_supervisor::Config::from_file(&config)?),
    };
    let backend = shadowback_supervisor::BackendCommand::current_exe()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stopping = notifier.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            if let Some(n) = &stopping {
                n.send("STOPPING=1");
            }
            let _ = tx.send(true);
        });
        if let (Some(n), Some(every)) = (notifier.clone(), sd_notify::watchdog_interval()) {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    n.send("WATCHDOG=1");
                }
            });
        }
        let ready: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let Some(n) = notifier {
                n.send("READY=1");
            }
        });
        match (state, cfg) {
            (Some(state), _) => {
                shadowback_supervisor::resume_notify(state, backend, rx, ready, listeners).await
            }
            (None, Some(cfg)) => {
                shadowback_supervisor::serve_notify(cfg, backend, rx, ready, listeners).await
            }
            (None, None) => unreachable!("a config is read unless a state is given"),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
