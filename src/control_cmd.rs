//! `shadowback status`, `shadowback fault` and `shadowback upgrade`:
//! small clients of the supervisor's control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use shadowback_supervisor::{metrics, DeviceStats};
use shadowback_xenbus::{Message, SeqPacket};

use crate::out::outln;
use crate::CliError;

/// Where `shadowback up` listens unless its config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/shadowback/control.sock";
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The supervisor's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// What to print (README "Status fields").
    #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
    format: StatusFormat,
    /// The same as `--format json`.
    #[arg(long, conflicts_with = "format")]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    /// One line per device a person can read.
    Table,
    /// Every `status` key of every device, one per line.
    Keys,
    /// One JSON object per device, in a JSON array.
    Json,
    /// The Prometheus text exposition format.
    Prometheus,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FaultAction {
    /// SIGKILL the device's backend process.
    Kill,
    /// SIGSTOP it (the watchdog replaces it if the guest has work pending).
    Hang,
    /// Make every instance abort on a request covering `--sector`.
    Poison,
    /// Make it spin in a busy loop (a hang that burns a CPU).
    Spin,
    /// Make it call a syscall its seccomp filter forbids (killed by SIGSYS).
    Syscall,
}

#[derive(Args, Debug)]
pub struct FaultArgs {
    /// Device name.
    device: String,
    action: FaultAction,
    /// The poisoned sector (512-byte units), for `poison`.
    #[arg(long, default_value_t = 0)]
    sector: u64,
    /// The supervisor's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// The new binary (default: the running supervisor's path, i.e. the
    /// file a package upgrade put there).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// The supervisor's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

/// An upgrade pauses every device and vhost-user thread (each up to the
/// message timeout) before the new binary answers.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

fn recv(sock: &SeqPacket) -> Result<Message, CliError> {
    recv_within(sock, REPLY_TIMEOUT)
}

fn recv_within(sock: &SeqPacket, timeout: Duration) -> Result<Message, CliError> {
    let (msg, _fds) = sock
        .recv_timeout(timeout)?
        .ok_or("the supervisor did not answer")?;
    if msg.kind() == "error" {
        return Err(format!(
            "supervisor: {} ({})",
            msg.get("message").unwrap_or("error"),
            msg.get("code").unwrap_or("?")
        )
        .into());
    }
    Ok(msg)
}

/// Asks for the per-device counters; returns one message per device.
pub fn query_status(socket: &std::path::Path) -> Result<Vec<Message>, CliError> {
    let sock = SeqPacket::connect(socket)?;
    sock.send(&Message::new("status"), &[])?;
    let mut devices = Vec::new();
    loop {
        let msg = recv(&sock)?;
        match msg.kind() {
            "status" => devices.push(msg),
            "status-end" => return Ok(devices),
            other => return Err(format!("unexpected {other:?} in a status reply").into()),
        }
    }
}

pub fn status(args: StatusArgs) -> Result<ExitCode, CliError> {
    let devices = query_status(&args.socket)?;
    let format = if args.json {
        StatusFormat::Json
    } else {
        args.format
    };
    if matches!(format, StatusFormat::Table | StatusFormat::Prometheus) {
        let parsed = devices
            .iter()
            .map(DeviceStats::from_message)
            .collect::<Result<Vec<_>, _>>()?;
        if format == StatusFormat::Prometheus {
            // The text ends with its own newline.
            let text = metrics::prometheus(&parsed);
            outln!("{}", text.trim_end());
        } else {
            for (name, stats) in &parsed {
                outln!("{}", metrics::human_line(name, stats));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if format == StatusFormat::Json {
        let list: Vec<serde_json::Value> = devices
            .iter()
            .map(|m| {
                let obj = m
                    .iter()
                    .map(|(k, v)| {
                        let value = v
                            .parse::<u64>()
                            .map(serde_json::Value::from)
                            .unwrap_or_else(|_| serde_json::Value::from(v));
                        (k.to_string(), value)
                    })
                    .collect::<serde_json::Map<_, _>>();
                serde_json::Value::Object(obj)
            })
            .collect();
        outln!("{}", serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    for m in &devices {
        outln!("{}", m.get("device").unwrap_or("?"));
        for (k, v) in m.iter().filter(|(k, _)| *k != "device") {
            outln!("  {k:<18} {v}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fault(args: FaultArgs) -> Result<ExitCode, CliError> {
    let action = match args.action {
        FaultAction::Kill => "kill",
        FaultAction::Hang => "hang",
        FaultAction::Poison => "poison",
        FaultAction::Spin => "spin",
        FaultAction::Syscall => "syscall",
    };
    let mut msg = Message::new("fault")
        .with("device", &args.device)
        .with("action", action);
    if matches!(args.action, FaultAction::Poison) {
        msg.set("sector", args.sector);
    }
    let sock = SeqPacket::connect(&args.socket)?;
    sock.send(&msg, &[])?;
    let reply = recv(&sock)?;
    outln!("{} {action}: {}", args.device, reply.kind());
    Ok(ExitCode::SUCCESS)
}

pub fn upgrade(args: UpgradeArgs) -> Result<ExitCode, CliError> {
    use shadowback_xenbus::protocol::{key, kind};
    let mut msg = Message::new(kind::UPGRADE);
    if let Some(binary) = &args.binary {
        // The supervisor runs elsewhere: a relative path is made absolute
        // here (its existence is the supervisor's to check).
        let path = std::path::absolute(binary)?;
        msg.set(key::BINARY, path.display());
    }
    let sock = SeqPacket::connect(&args.socket)?;
    sock.send(&msg, &[])?;
    let reply = recv_within(&sock, UPGRADE_TIMEOUT)?;
    if reply.kind() != kind::UPGRADED {
        return Err(format!("unexpected {:?} in answer to upgrade", reply.kind()).into());
    }
    outln!(
        "upgraded: pid {}, state version {}",
        reply.get(key::PID).unwrap_or("?"),
        reply.get(key::STATE_VERSION).unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}
