//! The engine `cargo test` runs: replay the seed corpus and every kept
//! finding, then a bounded, deterministic mutation loop (no coverage
//! feedback; libFuzzer, `scripts/fuzz.sh`, is the long-run engine).
//!
//! Deterministic on purpose: a fixed seed and iteration count make a CI
//! failure reproduce exactly with the same command.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::Target;

/// Longest input the loop builds.
pub const MAX_LEN: usize = 8192;

/// `fuzz/corpus/<target>`: seed inputs.
pub fn corpus_dir(target: Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target.name())
}

/// `fuzz/regressions/<target>`: every input that once failed, kept.
pub fn regressions_dir(target: Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target.name())
}

/// The files of `dir` (none if it does not exist), sorted by name.
pub fn load(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    files.sort();
    files
}

/// An input that made a target panic.
#[derive(Debug)]
pub struct Finding {
    pub input: Vec<u8>,
    pub message: String,
    /// Where the input was written (for `fuzz/regressions/<target>/`).
    pub saved: Option<PathBuf>,
}

/// Runs `input`, turning a panic into a [`Finding`] saved under `save_dir`.
pub fn run_checked(target: Target, input: &[u8], save_dir: &Path) -> Result<(), Finding> {
    match catch_unwind(AssertUnwindSafe(|| target.run(input))) {
        Ok(()) => Ok(()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            let name = format!("{}-{:016x}", target.name(), fnv1a(input));
            let saved = std::fs::create_dir_all(save_dir)
                .and_then(|()| std::fs::write(save_dir.join(&name), input))
                .ok()
                .map(|()| save_dir.join(name));
            Err(Finding {
                input: input.to_vec(),
                message,
                saved,
            })
        }
    }
}

/// Replays `seeds`, then runs `iterations` mutants of them.
pub fn fuzz(
    target: Target,
    seeds: &[Vec<u8>],
    seed: u64,
    iterations: usize,
    save_dir: &Path,
) -> Result<(), Finding> {
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    for input in &pool {
        run_checked(target, input, save_dir)?;
    }
    let mut rng = Rng(seed);
    for i in 0..iterations {
        let input = mutate(&mut rng, &pool);
        run_checked(target, &input, save_dir)?;
        // Without coverage feedback, keep a few mutants as new parents so
        // that mutations stack.
        if i % 64 == 0 && pool.len() < 256 {
            pool.push(input);
        }
    }
    Ok(())
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One mutant of an input of `pool`: 1 to 8 edits.
pub fn mutate(rng: &mut Rng, pool: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, 0x10, 0x40, 0xfe];
    let mut b = pool[rng.below(pool.len())].clone();
    for _ in 0..1 + rng.below(8) {
        match rng.below(8) {
            0 | 1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next_u64() as u8;
            }
            4 if b.len() < MAX_LEN => {
                let i = rng.below(b.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(i..i, bytes);
            }
            5 if !b.is_empty() => {
                let i = rng.below(b.len());
                let n = 1 + rng.below((b.len() - i).min(16));
                b.drain(i..i + n);
            }
            6 if !b.is_empty() && b.len() < MAX_LEN => {
                // Copy a run of the input elsewhere in it.
                let from = rng.below(b.len());
                let n = 1 + rng.below((b.len() - from).min(32));
                let run: Vec<u8> = b[from..from + n].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, run);
            }
            _ => {
                // Splice with another input.
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let cut = rng.below(b.len() + 1);
                    let from = rng.below(other.len());
                    b.truncate(cut);
                    b.extend_from_slice(&other[from..]);
                }
            }
        }
    }
    b.truncate(MAX_LEN);
    b
}

/// FNV-1a, to name saved findings.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}
