//! The `shadowback` command line as a user meets it: every command the
//! README names is in `--help`, and no subcommand panics when the reader
//! of its output went away (`shadowback status --json | head -c 300`).
#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};

use shadowback_testsupport::harness::{DiskSpec, Harness};

const EXE: &str = env!("CARGO_BIN_EXE_shadowback");

/// The subcommands `shadowback --help` lists.
fn help_commands() -> BTreeSet<String> {
    let out = Command::new(EXE).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let section = text
        .split("Commands:")
        .nth(1)
        .expect("--help has a Commands: section");
    section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every `shadowback WORD` the README shows as code: in a `code span` or
/// a line of a fenced block.
fn readme_commands() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut code = Vec::new();
    let mut fenced = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            code.push(line.to_owned());
        } else {
            // Odd pieces between backticks are code spans.
            code.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
        }
    }
    let mut found = BTreeSet::new();
    for piece in code {
        let words: Vec<&str> = piece.split_whitespace().collect();
        for pair in words.windows(2) {
            let word = pair[1];
            if pair[0] == "shadowback" && word.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                found.insert(word.to_owned());
            }
        }
    }
    found
}

#[test]
fn help_lists_every_command_the_readme_names() {
    let help = help_commands();
    let readme = readme_commands();
    // The parse found the commands a user starts with.
    for known in ["up", "status", "fault", "demo", "guest"] {
        assert!(
            readme.contains(known),
            "README parse missed {known}: {readme:?}"
        );
    }
    let missing: Vec<_> = readme.difference(&help).collect();
    assert!(
        missing.is_empty(),
        "README names commands `shadowback --help` does not list: {missing:?} (help: {help:?})"
    );
}

/// Runs `shadowback ARGS` with stdout (and stderr, with `both`) a pipe
/// whose reader is already gone.
fn run_into_closed_pipe(args: &[&str], both: bool) -> Output {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let write_err: OwnedFd = write.try_clone().unwrap();
    let mut cmd = Command::new(EXE);
    cmd.args(args).stdout(Stdio::from(write));
    if both {
        cmd.stderr(Stdio::from(write_err));
    } else {
        drop(write_err);
        cmd.stderr(Stdio::piped());
    }
    let out = cmd.output().unwrap();
    if !both {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "shadowback {args:?} into a closed pipe: {stderr}"
        );
    }
    out
}

#[test]
fn no_subcommand_panics_on_a_closed_pipe() {
    let h = Harness::start(
        "cli-pipe",
        &[DiskSpec::new("d0", 8), DiskSpec::new("d1", 8)],
    );
    let socket = h.socket().to_str().unwrap().to_owned();
    for args in [
        vec!["status", "--json", "--socket", &socket],
        vec!["status", "--socket", &socket],
        vec!["status", "--format", "prometheus", "--socket", &socket],
        vec!["disk", "list", "--socket", &socket],
        vec!["--help"],
        vec!["--version"],
    ] {
        let out = run_into_closed_pipe(&args, false);
        // A panic exits 101; the output was dropped, the command did its work.
        assert_eq!(out.status.code(), Some(0), "shadowback {args:?}");
    }
    // An error with stderr closed too: reported by the exit code only.
    let out = run_into_closed_pipe(&["status", "--socket", "/nonexistent/control.sock"], true);
    assert_eq!(out.status.code(), Some(1), "a failure, not a panic (101)");
    // The same commands with a reader print what they should.
    let out = Command::new(EXE)
        .args(["status", "--json", "--socket", &socket])
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");
}
