//! `shadowback demo`: the whole system on an embedded default.
//!
//! A temporary sparse disk image, the supervisor with one blkback process
//! for it, and a guest process running the verifying workload through a
//! Xen ring. Prints live progress, then a report (or one JSON object).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Args;
use serde::Serialize;
use shadowback_guest::workload::Report;
use shadowback_supervisor::{BackendCommand, CacheMode, Config, DiskConfig, SupervisorThread};

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
}

#[derive(Serialize)]
struct LatUs {
    p50: f64,
    p99: f64,
    max: f64,
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: Option<&Path>) -> Result<Self, CliError> {
        let base = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("shadowback-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// O_DIRECT where the file system supports it, else the page cache.
fn pick_cache(image: &Path) -> CacheMode {
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

pub fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    let dir = TempDir::new(args.dir.as_deref())?;
    let image = dir.0.join("disk0.img");
    let image_bytes = args.image_mib.max(1) * 1024 * 1024;
    std::fs::File::create(&image)?.set_len(image_bytes)?;
    let cache = pick_cache(&image);
    let cfg = Config {
        socket: dir.0.join("control.sock"),
        disks: vec![DiskConfig {
            name: "disk0".into(),
            path: image.clone(),
            cache,
            readonly: false,
            backend_id: 0,
            max_ring_page_order: 4,
            discard: true,
        }],
    };
    let cache_name = match cache {
        CacheMode::None => "none (O_DIRECT)",
        CacheMode::Writeback => "writeback",
    };
    if !args.json {
        eprintln!(
            "shadowback demo: disk0 = {} MiB sparse image, cache {cache_name}; guest QD{} for {} s, then a full-image check",
            args.image_mib, args.qd, args.duration
        );
    }
    let supervisor = SupervisorThread::start(cfg.clone(), BackendCommand::current_exe()?)?;
    let exe = std::env::current_exe()?;
    let mut guest = Command::new(exe)
        .args(["guest", "blk", "--device", "disk0", "--socket"])
        .arg(&cfg.socket)
        .args(["--duration", &args.duration.to_string()])
        .args(["--qd", &args.qd.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = guest.stdout.take().ok_or("guest stdout missing")?;
    let mut report: Option<Report> = None;
    let mut guest_error: Option<String> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match v["event"].as_str() {
            Some("progress") if !args.json => {
                let phase = if v["phase"] == "FinalCheck" {
                    "final check"
                } else {
                    "random I/O"
                };
                eprint!(
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
    if !args.json {
        eprintln!();
    }
    supervisor.stop()?;
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
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print_report(&r);
    }
    Ok(if r.verify_failures == 0 && r.io_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(r: &Report) {
    println!("shadowback demo report");
    println!(
        "  ops               {:>10}  (reads {}, writes {}, flushes {}, discards {})",
        r.ops, r.reads, r.writes, r.flushes, r.discards
    );
    println!(
        "  throughput        {:>10.0} IOPS, {:.1} MB/s over {:.1} s",
        r.iops, r.mb_per_s, r.elapsed_s
    );
    println!(
        "  latency           p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        r.lat_us.p50_us, r.lat_us.p99_us, r.lat_us.max_us
    );
    println!(
        "  verified          {} reads; {} sectors in the final image check",
        r.reads_verified, r.sectors_verified_final
    );
    println!("  verify failures   {:>10}", r.verify_failures);
    println!("  I/O errors        {:>10}", r.io_errors);
    for f in &r.failures {
        println!("    ! {f}");
    }
}
