//! `shadowback demo`: the whole system on an embedded default.
//!
//! A temporary sparse disk image, the supervisor with one blkback process
//! for it, and a guest process running the verifying workload through a
//! Xen ring; next to it (unless `--no-net`) two vifs on a cable with a
//! guest on each moving a verified TCP stream ([`crate::demo_net`]). The
//! faults of `--faults` hit the disk's and both vifs' backends alike.
//! Prints live progress, then a report (or one JSON object).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use clap::Args;
use serde::Serialize;
use shadowback_guest::workload::Report;
use shadowback_supervisor::{BackendCommand, CacheMode, Config, DiskConfig, SupervisorThread};

use crate::demo_net::{self, NetPair, NetReport};
use crate::faults::{self, FaultSpec, Injector};
use crate::out::{errln, errout, outln};
use crate::scratch::TempDir;
use crate::CliError;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seconds of random I/O (the final image check comes after).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Requests the guest keeps in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Size of the temporary disk image in MiB.
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to put the temporary image and socket (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Faults to inject while the guest runs, e.g. `kill:every=200ms,hang:every=3s`.
    #[arg(long)]
    faults: Option<String>,
    /// Where to write the timeline plot (SVG) of a run with faults; the
    /// network pair's goes next to it, with `-net` added to the name.
    #[arg(long, default_value = "shadowback-demo-timeline.svg")]
    plot: PathBuf,
    /// Run the disk alone, without the network pair.
    #[arg(long)]
    no_net: bool,
    /// Length of the network pair's TCP stream in MiB.
    #[arg(long, default_value_t = 128)]
    net_mib: u64,
}

/// The demo's JSON report.
#[derive(Serialize)]
struct DemoReport {
    ops: u64,
    bytes: u64,
    iops: f64,
    mb_per_s: f64,
    verify_failures: u64,
    io_errors: u64,
    reads_verified: u64,
    sectors_verified_final: u64,
    lat_us: LatUs,
    cache: &'static str,
    image_bytes: u64,
    failures: Vec<String>,
    crashes: u64,
    hangs: u64,
    recoveries: u64,
    replayed: u64,
    repushed: u64,
    poisoned: u64,
    lost: u64,
    duplicates: u64,
    stall_us: StallUs,
    plot: Option<PathBuf>,
    /// The network pair (absent with `--no-net`).
    net: Option<NetReport>,
}

#[derive(Serialize, Default, Clone, Copy)]
pub struct StallUs {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Serialize)]
struct LatUs {
    p50: f64,
    p99: f64,
    max: f64,
}

pub fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    let specs: Vec<FaultSpec> = match &args.faults {
        Some(text) => faults::parse_faults(text)?,
        None => Vec::new(),
    };
    let dir = TempDir::new(args.dir.as_deref(), "demo")?;
    let image = dir.0.join("disk0.img");
    let image_bytes = args.image_mib.max(1) * 1024 * 1024;
    std::fs::File::create(&image)?.set_len(image_bytes)?;
    let cache = CacheMode::best_for(&image);
    let cfg = Config {
        socket: dir.0.join("control.sock"),
        control: Default::default(),
        backend: Default::default(),
        standby: Default::default(),
        limits: Default::default(),
        metrics: Default::default(),
        disks: vec![DiskConfig {
            cache,
            ..DiskConfig::new("disk0", image.clone())
        }],
        nics: if args.no_net {
            Vec::new()
        } else {
            demo_net::nics()
        },
    };
    let cache_name = match cache {
        CacheMode::None => "none (O_DIRECT)",
        CacheMode::Writeback => "writeback",
    };
    if !args.json {
        errln!(
            "shadowback demo: disk0 = {} MiB sparse image, cache {cache_name}; guest QD{} for {} s, then a full-image check",
            args.image_mib, args.qd, args.duration
        );
        if !args.no_net {
            errln!(
                "  and {} <-> cable <-> {}: a guest on each, one verified TCP stream of {} MiB",
                demo_net::VIF_A,
                demo_net::VIF_B,
                args.net_mib
            );
        }
    }
    let supervisor = SupervisorThread::start(cfg.clone(), BackendCommand::current_exe()?)?;
    let net = if args.no_net {
        None
    } else {
        Some(NetPair::start(
            &cfg.socket,
            args.net_mib.max(1) << 20,
            args.seed,
            &specs,
        )?)
    };
    let exe = std::env::current_exe()?;
    let stamps_path = dir.0.join("completions.bin");
    let mut guest = Command::new(exe)
        .args(["guest", "blk", "--device", "disk0", "--socket"])
        .arg(&cfg.socket)
        .arg("--completions-file")
        .arg(&stamps_path)
        .args(["--duration", &args.duration.to_string()])
        .args(["--qd", &args.qd.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = guest.stdout.take().ok_or("guest stdout missing")?;
    let injector = (!specs.is_empty())
        .then(|| Injector::start(cfg.socket.clone(), "disk0".into(), specs.clone()));
    let mut injected = Vec::new();
    let mut injector = injector;
    let mut report: Option<Report> = None;
    let mut guest_error: Option<String> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match v["event"].as_str() {
            Some("progress") if v["phase"] == "FinalCheck" && injector.is_some() => {
                // Faults stop with the random-I/O phase.
                injected = injector.take().map(Injector::finish).unwrap_or_default();
            }
            Some("progress") if !args.json => {
                let phase = if v["phase"] == "FinalCheck" {
                    "final check"
                } else {
                    "random I/O"
                };
                errout!(
                    "\r  {:6.1} s  {:<11} {:>9} ops  {:>8.0} IOPS  errors {}  verify failures {}   ",
                    v["elapsed_s"].as_f64().unwrap_or(0.0),
                    phase,
                    v["ops"].as_u64().unwrap_or(0),
                    v["ops_per_s"].as_f64().unwrap_or(0.0),
                    v["io_errors"].as_u64().unwrap_or(0),
                    v["verify_failures"].as_u64().unwrap_or(0),
                );
                let _ = std::io::stderr().flush();
            }
            Some("report") => report = serde_json::from_value(v["report"].clone()).ok(),
            Some("error") => guest_error = v["message"].as_str().map(str::to_string),
            _ => {}
        }
    }
    let status = guest.wait()?;
    if let Some(inj) = injector.take() {
        injected = inj.finish();
    }
    if !args.json {
        errln!();
    }
    let net = net.map(NetPair::finish).transpose()?;
    let devices = crate::control_cmd::query_status(&cfg.socket).unwrap_or_default();
    supervisor.stop()?;
    // `key` of the status of each device in `names`, summed.
    let sum = |names: &[&str], key: &str| -> u64 {
        devices
            .iter()
            .filter(|m| m.get("device").is_some_and(|d| names.contains(&d)))
            .filter_map(|m| m.get(key).and_then(|v| v.parse::<u64>().ok()))
            .sum()
    };
    let count = |key: &str| sum(&["disk0"], key);
    let net_report = net.as_ref().map(|o| {
        NetReport::new(
            o,
            |key| sum(&[demo_net::VIF_A, demo_net::VIF_B], key),
            &args.plot,
        )
    });
    let mut stall = StallUs::default();
    let mut plot = None;
    if !injected.is_empty() {
        let mut stamps = faults::read_stamps(&stamps_path).unwrap_or_default();
        stamps.sort_unstable();
        let (p50, p99, max) = faults::percentiles(&faults::stalls_us(&injected, &stamps));
        stall = StallUs { p50, p99, max };
        if faults::write_timeline_svg(&args.plot, &stamps, &injected).is_ok() {
            plot = Some(args.plot.clone());
        }
    }
    let Some(r) = report else {
        return Err(format!(
            "the guest failed ({status}): {}",
            guest_error.unwrap_or_else(|| "no report".into())
        )
        .into());
    };
    let out = DemoReport {
        ops: r.ops,
        bytes: r.bytes,
        iops: r.iops,
        mb_per_s: r.mb_per_s,
        verify_failures: r.verify_failures,
        io_errors: r.io_errors,
        reads_verified: r.reads_verified,
        sectors_verified_final: r.sectors_verified_final,
        lat_us: LatUs {
            p50: r.lat_us.p50_us,
            p99: r.lat_us.p99_us,
            max: r.lat_us.max_us,
        },
        cache: match cache {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        },
        image_bytes,
        failures: r.failures.clone(),
        crashes: count("crashes"),
        hangs: count("hangs"),
        recoveries: count("recoveries"),
        replayed: count("replayed"),
        repushed: count("repushed"),
        poisoned: count("poisoned"),
        lost: r.lost,
        duplicates: r.duplicates,
        stall_us: stall,
        plot,
        net: net_report,
    };
    if args.json {
        outln!("{}", serde_json::to_string(&out)?);
    } else {
        print_report(&r);
        if !injected.is_empty() {
            faults::print_recovery_head(
                "recovery",
                &injected,
                [out.crashes, out.hangs, out.recoveries],
            );
            outln!(
                "  replayed          {:>10}  requests re-executed",
                out.replayed
            );
            outln!(
                "  re-pushed         {:>10}  saved responses published again",
                out.repushed
            );
            outln!("  poisoned          {:>10}", out.poisoned);
            outln!("  lost / duplicate  {:>10} / {}", out.lost, out.duplicates);
            outln!(
                "  guest-visible stall per fault: p50 {} us, p99 {} us, max {} us",
                stall.p50,
                stall.p99,
                stall.max
            );
            outln!(
                "  last recovery     detect {} us, fence {} us, takeover {} us, replay {} us, total {} us",
                count("last-detect-us"),
                count("last-fence-us"),
                count("last-takeover-us"),
                count("last-replay-us"),
                count("last-total-us")
            );
            if let Some(p) = &out.plot {
                outln!("  timeline plot     {}", p.display());
            }
        }
        if let (Some(n), Some(o)) = (&out.net, &net) {
            n.print(&o.faults);
        }
    }
    let net_ok = out.net.as_ref().is_none_or(NetReport::passed);
    Ok(if r.verify_failures == 0 && r.io_errors == 0 && net_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(r: &Report) {
    outln!("shadowback demo report");
    outln!(
        "  ops               {:>10}  (reads {}, writes {}, flushes {}, discards {})",
        r.ops,
        r.reads,
        r.writes,
        r.flushes,
        r.discards
    );
    outln!(
        "  throughput        {:>10.0} IOPS, {:.1} MB/s over {:.1} s",
        r.iops,
        r.mb_per_s,
        r.elapsed_s
    );
    outln!(
        "  latency           p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        r.lat_us.p50_us,
        r.lat_us.p99_us,
        r.lat_us.max_us
    );
    outln!(
        "  verified          {} reads; {} sectors in the final image check",
        r.reads_verified,
        r.sectors_verified_final
    );
    outln!("  verify failures   {:>10}", r.verify_failures);
    outln!("  I/O errors        {:>10}", r.io_errors);
    for f in &r.failures {
        outln!("    ! {f}");
    }
}
