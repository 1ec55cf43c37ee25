//! `shadowback bench blk` runs end to end, briefly: every row moves I/O,
//! is divided by fio (where installed) and raw io_uring of the same op and
//! depth, and reports the CPU it cost per I/O; `--compare-poll-us` adds
//! the polling rows. (The figures themselves are for the README, not
//! tests.)

use std::process::Command;

fn fio_installed() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn bench_blk_divides_every_row_by_fio_and_reports_its_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowback"))
        .args([
            "bench",
            "blk",
            "--json",
            "--duration",
            "0.4",
            "--rounds",
            "1",
            "--qd",
            "1",
            "--image-mib",
            "16",
            "--cache",
            "writeback",
            "--compare-poll-us",
            "50",
        ])
        .output()
        .expect("run shadowback");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    let rows = v["rows"].as_array().expect("rows");
    let fio = fio_installed();
    let mut want = vec![
        "raw-uring",
        "raw-uring-deferred",
        "xen-ring",
        "xen-ring-noshadow",
        "xen-ring-poll",
    ];
    if fio {
        want.push("fio");
    }
    for op in ["randread", "randwrite"] {
        for path in &want {
            let row = rows
                .iter()
                .find(|r| r["path"] == *path && r["op"] == op && r["qd"] == 1)
                .unwrap_or_else(|| panic!("no row {path} {op}: {v}"));
            assert!(row["iops"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
            // Every row's process tree did some work: at least one tick.
            assert!(row["cpu_us_per_io"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
            let has = |field: &str| row[field].as_f64().is_some_and(|x| x > 0.0);
            assert_eq!(has("vs_raw"), *path != "raw-uring", "{row}");
            assert_eq!(has("vs_fio"), fio && *path != "fio", "{row}");
        }
    }
    assert_eq!(rows.len(), 2 * want.len(), "{v}");
}
