//! Every fuzz target in CI: the seed corpus and every kept finding
//! (`fuzz/regressions/<target>/`) replayed, then a short deterministic
//! mutation run (docs/FUZZING.md). A failure names the saved input: add it
//! to `fuzz/regressions/<target>/` with the fix.

use std::path::Path;

use shadowback_fuzz::mutate::{corpus_dir, fuzz, load, regressions_dir, Finding};
use shadowback_fuzz::Target;

/// Mutants per target: a few seconds each in a debug build on a busy
/// machine (blkif and vhost-user inputs cost more: a region or a socket
/// pair and a thread each).
const ITERATIONS: usize = 20_000;

fn check(target: Target, seed: u64, iterations: usize) {
    let mut inputs: Vec<Vec<u8>> = load(&corpus_dir(target))
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let regressions = load(&regressions_dir(target));
    let save = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings");
    // Findings first: each must pass on its own.
    for (path, input) in &regressions {
        if let Err(f) = shadowback_fuzz::mutate::run_checked(target, input, &save) {
            panic!("regression {} fails again: {}", path.display(), f.message);
        }
    }
    inputs.extend(regressions.into_iter().map(|(_, b)| b));
    if let Err(Finding {
        input,
        message,
        saved,
    }) = fuzz(target, &inputs, seed, iterations, &save)
    {
        panic!(
            "{} panicked: {message}\ninput ({} bytes) saved as {saved:?}",
            target.name(),
            input.len()
        );
    }
}

#[test]
fn blkif() {
    check(Target::Blkif, 0xb1c1f, ITERATIONS / 4);
}

#[test]
fn netif() {
    check(Target::Netif, 0x0e71f, ITERATIONS);
}

#[test]
fn virtio() {
    check(Target::Virtio, 0x71271, ITERATIONS);
}

#[test]
fn vhost_user() {
    check(Target::VhostUser, 0x7405, ITERATIONS / 5);
}

#[test]
fn control() {
    check(Target::Control, 0xc0417, ITERATIONS);
}

#[test]
fn recovery() {
    check(Target::Recovery, 0x4ec0, ITERATIONS);
}

#[test]
fn vnet_ctrl() {
    check(Target::VnetCtrl, 0x7c741, ITERATIONS);
}

#[test]
fn every_target_has_a_seed_corpus() {
    for t in Target::ALL {
        assert!(
            !load(&corpus_dir(t)).is_empty(),
            "fuzz/corpus/{} is empty",
            t.name()
        );
        assert_eq!(Target::from_name(t.name()), Some(t));
    }
}
