//! `shadowback bench net` and `bench failover --class net` run end to end,
//! briefly: every row moves frames, and a stream through killed backends
//! arrives whole. (The figures themselves are for the README, not tests.)

use std::process::Command;

fn run_json(args: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowback"))
        .args(args)
        .output()
        .expect("run shadowback");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{args:?}: no JSON on stdout ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn bench_net_measures_every_row() {
    let (ok, v) = run_json(&[
        "bench",
        "net",
        "--seconds",
        "0.3",
        "--rounds",
        "1",
        "--json",
    ]);
    assert!(ok, "{v}");
    let rows = v["rows"].as_array().expect("rows");
    let mut want = vec![
        ("raw-cable", "64"),
        ("netif-cable", "64"),
        ("netif-cable-noshadow", "64"),
        ("raw-cable", "1500"),
        ("netif-cable", "1500"),
        ("netif-cable-noshadow", "1500"),
        ("raw-cable", "tcp"),
        ("netif-cable", "tcp"),
        ("netif-cable-noshadow", "tcp"),
    ];
    if is_root() {
        for frame in ["64", "1500", "tcp"] {
            for path in [
                "raw-tap",
                "netif-tap",
                "netif-tap-noshadow",
                "vhost-user-net-tap",
                "vhost-user-net-tap-noshadow",
            ] {
                want.push((path, frame));
            }
        }
    } else {
        // Not silently: the skip is in the report.
        assert_eq!(v["skipped"].as_array().map(Vec::len), Some(1), "{v}");
    }
    assert_eq!(rows.len(), want.len(), "{v}");
    for (path, frame) in want {
        let row = rows
            .iter()
            .find(|r| r["path"] == path && r["frame"] == frame)
            .unwrap_or_else(|| panic!("no row {path} {frame}: {v}"));
        let pps = row["pps"].as_f64().unwrap_or(0.0);
        let gbps = row["gbps"].as_f64().unwrap_or(0.0);
        assert!(pps > 0.0 && gbps > 0.0, "{row}");
        if path.starts_with("raw-") {
            assert!(row.get("ratio").is_none(), "{row}");
        } else {
            let ratio = row["ratio"].as_f64().expect("ratio");
            assert!(ratio > 0.0, "{row}");
        }
        // Frame rows and the TCP rows on the TAP: CPU time per frame,
        // the backends' part of it (not for a raw row, which has none) no
        // more than the whole.
        if frame != "tcp" || path.contains("tap") {
            let cpu = row["cpu_us_per_frame"].as_f64().expect("cpu");
            assert!(cpu > 0.0, "{row}");
            match row.get("backend_cpu_us_per_frame") {
                None => assert!(path.starts_with("raw-"), "{row}"),
                Some(b) => {
                    let b = b.as_f64().expect("backend cpu");
                    assert!(b > 0.0 && b <= cpu, "{row}");
                }
            }
        }
    }
}

/// `--poll-us`: the backends poll (`netback --poll-us`) and still move
/// every row's frames; the table says which window was used.
#[test]
fn bench_net_runs_polling_backends() {
    let (ok, v) = run_json(&[
        "bench",
        "net",
        "--seconds",
        "0.3",
        "--rounds",
        "1",
        "--paths",
        "raw-cable,netif-cable",
        "--frames",
        "64",
        "--poll-us",
        "200",
        "--json",
    ]);
    assert!(ok, "{v}");
    let row = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["path"] == "netif-cable")
        .unwrap_or_else(|| panic!("no netif-cable row: {v}"));
    assert!(row["pps"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
    assert_eq!(v["poll_us"], 200, "{v}");
    let out = Command::new(env!("CARGO_BIN_EXE_shadowback"))
        .args(["bench", "net", "--poll-us", "1001"])
        .output()
        .expect("run shadowback");
    assert!(!out.status.success(), "--poll-us above 1000 accepted");
}

#[test]
fn bench_failover_net_loses_nothing() {
    let (ok, v) = run_json(&[
        "bench",
        "failover",
        "--class",
        "net",
        "--kills",
        "4",
        "--stream-mib",
        "4",
        "--json",
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["kills"], 4, "{v}");
    for key in [
        "lost",
        "duplicates",
        "corrupt",
        "failed_streams",
        "bad_responses",
    ] {
        assert_eq!(v[key], 0, "{key}: {v}");
    }
    let gap = &v["gap_us"];
    let measured = 4 - v["unmeasured"].as_u64().expect("unmeasured");
    assert!(measured >= 1, "{v}");
    assert!(gap["max"].as_u64().expect("max") > 0, "{v}");
    assert!(gap["p50"].as_u64() <= gap["max"].as_u64(), "{v}");
    let long_gaps = v["long_gaps"].as_array().expect("long_gaps");
    assert_eq!(
        Some(long_gaps.len() as u64),
        v["retransmission_timeouts"].as_u64(),
        "{v}"
    );
    for g in long_gaps {
        assert!(g["gap_us"].as_u64() > Some(200_000), "{v}");
    }
    // A standby per vif (the default): no takeover started a process.
    assert_eq!(v["mode"], "hot", "{v}");
    assert_eq!(v["takeover_us"]["spawn"]["max"], 0, "{v}");
    assert!(v["takeover_us"]["reap"]["max"].as_u64() > Some(0), "{v}");
    assert!(v["takeover_us"]["attach"]["max"].as_u64() > Some(0), "{v}");
    for key in ["tx_replayed", "tx_maybe_duplicated", "rx_dropped_in_crash"] {
        assert!(v[key].is_u64(), "{key}: {v}");
    }
}
