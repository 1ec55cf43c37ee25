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

#[derive(clap::Subcommand, Debug)]
pub enum DiskCommand {
    /// Export a new disk: KEY=VALUE pairs of a `[[disk]]` table (README
    /// "Configuration"), e.g. `name=d1 path=/srv/d1.img iops_limit=2000`.
    /// Values are TOML (`readonly=true`, `allow_uids=[1000]`); a value
    /// that is not TOML is sent as a string.
    Add {
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// The supervisor's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Stop exporting a disk; refused while a frontend is attached unless
    /// `--force` (its guest then loses the disk, as a given-up one).
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
        /// The supervisor's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// The exported disks: name, size, attached, QoS, path.
    List {
        /// The supervisor's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Resize a disk's image to SIZE (bytes, or with a K/M/G/T suffix);
    /// without SIZE a block device's size is read again. The attached
    /// guest is told the new capacity.
    Resize {
        name: String,
        size: Option<String>,
        /// The supervisor's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Change run-time settings of a disk (the QoS keys `iops_limit`,
    /// `iops_burst`, `bandwidth_limit_mib`, `bandwidth_burst_mib`).
    Set {
        name: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// The supervisor's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// `KEY=VALUE` as a message key and a TOML value: `_` in the key becomes
/// `-` (message keys have no `_`), a value that is not TOML is quoted.
fn pair(text: &str) -> Result<(String, String), CliError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    let is_toml = format!("v = {value}").parse::<toml::Table>().is_ok();
    let value = if is_toml {
        value.to_string()
    } else {
        toml::Value::String(value.to_string()).to_string()
    };
    Ok((key.trim().replace('_', "-"), value))
}

/// A size in bytes: digits with an optional K, M, G or T (powers of 1024).
fn parse_size(text: &str) -> Result<u64, CliError> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{text:?}: unknown size suffix").into()),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|e| format!("{text:?}: {e}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?}: too large").into())
}

/// How long a `disk` command waits for its answer: a removal waits for
/// the disk's backends and their I/O, an add may wait for the image's lock.
const DISK_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// One request, its answers until `ok` (or the end of a list).
fn ask(socket: &std::path::Path, msg: &Message, end: &str) -> Result<Vec<Message>, CliError> {
    let sock = SeqPacket::connect(socket)?;
    sock.send(msg, &[])?;
    let mut answers = Vec::new();
    loop {
        let reply = recv_within(&sock, DISK_REPLY_TIMEOUT)?;
        let last = reply.kind() == end;
        answers.push(reply);
        if last {
            return Ok(answers);
        }
    }
}

pub fn disk(cmd: DiskCommand) -> Result<ExitCode, CliError> {
    match cmd {
        DiskCommand::Add { pairs, socket } => {
            let mut msg = Message::new("disk-add");
            for text in &pairs {
                let (k, v) = pair(text)?;
                msg.set(&k, v);
            }
            ask(&socket, &msg, "ok")?;
            outln!("disk added");
        }
        DiskCommand::Remove {
            name,
            force,
            socket,
        } => {
            let msg = Message::new("disk-remove")
                .with("device", &name)
                .with("force", u8::from(force));
            ask(&socket, &msg, "ok")?;
            outln!("{name} removed");
        }
        DiskCommand::List { socket } => {
            let answers = ask(&socket, &Message::new("disk-list"), "disk-list-end")?;
            outln!(
                "{:<16} {:>14} {:>9} {:>10} {:>12}  path",
                "name",
                "bytes",
                "attached",
                "iops-limit",
                "MiB/s-limit"
            );
            for d in answers.iter().filter(|m| m.kind() == "disk") {
                let n = |k| d.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                outln!(
                    "{:<16} {:>14} {:>9} {:>10} {:>12}  {}",
                    d.get("device").unwrap_or("?"),
                    n("sectors") * 512,
                    if n("connected") == 1 { "yes" } else { "no" },
                    n("iops-limit"),
                    n("bytes-limit") >> 20,
                    d.get("path").unwrap_or("?")
                );
            }
        }
        DiskCommand::Resize { name, size, socket } => {
            let mut msg = Message::new("disk-resize").with("device", &name);
            if let Some(size) = size {
                msg.set("size", parse_size(&size)?);
            }
            let answers = ask(&socket, &msg, "ok")?;
            let sectors = answers.last().and_then(|m| m.get("sectors")).unwrap_or("?");
            outln!("{name} resized to {sectors} sectors");
        }
        DiskCommand::Set {
            name,
            pairs,
            socket,
        } => {
            let mut msg = Message::new("disk-set").with("device", &name);
            for text in &pairs {
                let (k, v) = pair(text)?;
                msg.set(&k, v);
            }
            ask(&socket, &msg, "ok")?;
            outln!("{name} updated");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_become_message_keys_and_toml_values() {
        assert_eq!(
            pair("iops_limit=2000").unwrap(),
            ("iops-limit".into(), "2000".into())
        );
        assert_eq!(
            pair("path=/srv/a b.img").unwrap(),
            ("path".into(), "\"/srv/a b.img\"".into())
        );
        assert_eq!(
            pair("readonly=true").unwrap(),
            ("readonly".into(), "true".into())
        );
        assert_eq!(
            pair("name=\"d1\"").unwrap(),
            ("name".into(), "\"d1\"".into())
        );
        assert!(pair("novalue").is_err());
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
