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
    // A shadow cost for each row with the log, from its one slice.
    let costs = v["shadow_cost"].as_array().expect("shadow_cost");
    let with_log: Vec<_> = want
        .iter()
        .filter(|(p, _)| !p.starts_with("raw-") && !p.ends_with("-noshadow"))
        .collect();
    assert_eq!(costs.len(), with_log.len(), "{v}");
    for (path, frame) in with_log {
        let c = costs
            .iter()
            .find(|c| c["path"] == *path && c["frame"] == *frame)
            .unwrap_or_else(|| panic!("no shadow cost {path} {frame}: {v}"));
        assert_eq!(c["baseline"], format!("{path}-noshadow"), "{c}");
        assert_eq!(c["pps_cost"].as_array().map(Vec::len), Some(1), "{c}");
        assert_eq!(c["pps_cost_median"], c["pps_cost"][0], "{c}");
    }
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

/// The shadow log's cost: one entry per pair of rows with and without
/// it, a figure per pair of slices (`--rounds`), the median among them.
#[test]
fn bench_net_pairs_the_shadow_cost_by_slice() {
    let args = [
        "bench",
        "net",
        "--seconds",
        "0.9",
        "--rounds",
        "3",
        "--paths",
        "netif-cable,netif-cable-noshadow",
        "--frames",
        "64",
    ];
    let (ok, v) = run_json(&[&args[..], &["--json"]].concat());
    assert!(ok, "{v}");
    let costs = v["shadow_cost"].as_array().expect("shadow_cost");
    assert_eq!(costs.len(), 1, "{v}");
    let c = &costs[0];
    assert_eq!(c["path"], "netif-cable", "{v}");
    assert_eq!(c["baseline"], "netif-cable-noshadow", "{v}");
    assert_eq!(c["frame"], "64", "{v}");
    for (key, median) in [
        ("pps_cost", "pps_cost_median"),
        ("backend_cpu_cost", "backend_cpu_cost_median"),
    ] {
        let mut by_slice: Vec<f64> = c[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {v}"))
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        assert_eq!(by_slice.len(), 3, "{key}: {v}");
        // Both rows moved frames in every slice: no cost is -100% or more.
        assert!(by_slice.iter().all(|x| x.is_finite() && *x > -1.0), "{v}");
        by_slice.sort_by(f64::total_cmp);
        assert_eq!(c[median].as_f64(), Some(by_slice[1]), "{median}: {v}");
    }
    // The table says the same in its line for the pair.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shadowback"))
        .args(args)
        .output()
        .expect("run shadowback");
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("shadow log cost, netif-cable 64: pps "))
        .unwrap_or_else(|| panic!("no shadow cost line: {table}"));
    assert!(
        line.contains("median of 3 slice pairs") && line.contains("backend CPU per frame"),
        "{line}"
    );
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
