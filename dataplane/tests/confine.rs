//! The seccomp filter in a real process: this test binary runs itself
//! again with `CONFINE_CHILD=<case>`, the child confines itself and does
//! what the case says; the parent reads how it ended.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use shadowback_dataplane::confine;

const CHILD: &str = "CONFINE_CHILD";

/// What a confined child does.
fn child(case: &str) {
    confine::confine().expect("confine");
    match case {
        // The data path's own kind of syscalls: memory, clock, a log
        // line, exit.
        "allowed" => {
            let v: Vec<u8> = vec![7; 1 << 20];
            assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 7 << 20);
            let _ = std::time::Instant::now();
            eprintln!("confined child still running");
            std::process::exit(0);
        }
        "socket" => {
            let _ = confine::forbidden_syscall();
        }
        "open" => {
            let _ = std::fs::File::open("/etc/hostname");
        }
        "exec-memory" => {
            let _ = rustix_mmap_exec();
        }
        "signal-another" => {
            // Signals go to this process only (a panic's abort).
            let parent = rustix::process::getppid().expect("parent");
            let _ = rustix::process::test_kill_process(parent);
        }
        other => panic!("unknown case {other}"),
    }
    // Reaching this means the filter let the call through.
    std::process::exit(3);
}

fn rustix_mmap_exec() -> std::io::Result<()> {
    use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
    // SAFETY: a fresh anonymous private mapping at a kernel-chosen address
    // aliases nothing (and the filter kills the process before it exists).
    let _ = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            4096,
            ProtFlags::READ | ProtFlags::EXEC,
            MapFlags::PRIVATE,
        )
    }?;
    Ok(())
}

/// Runs `case` in a confined child; its exit code, or the signal that
/// killed it as a negative number.
fn run(case: &str) -> i32 {
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "confined_children",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, case)
        .status()
        .expect("run the child");
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => -sig,
        _ => unreachable!("{status:?}"),
    }
}

#[test]
fn confined_children() {
    if let Ok(case) = std::env::var(CHILD) {
        child(&case);
        return;
    }
    assert_eq!(run("allowed"), 0, "what the data path does is allowed");
    for case in ["socket", "open", "exec-memory", "signal-another"] {
        assert_eq!(run(case), -libc::SIGSYS, "{case}: killed by SIGSYS");
    }
}
