//! Predictable sector content.
//!
//! The content of 512-byte sector `s` at write generation `g` under a run
//! seed is a pure function of `(s, g, seed)`, so a reader can verify any
//! sector from the generation the model remembers for it:
//!
//! - `g == 0` means "never written or discarded": all zeros (images start
//!   sparse and discard punches holes).
//! - `g > 0`: a 24-byte header — `s` (u64 LE), `g` (u32 LE), [`MAGIC`],
//!   `seed` (u64 LE) — followed by a splitmix64 stream seeded from
//!   `(s, g, seed)`.
//!
//! The self-describing header lets [`check`] say what it found instead of
//! just "mismatch": data from another sector (misdirected write), an older
//! generation of the same sector (stale/lost write), zeros, or garbage.

use std::fmt;

use crate::device::SECTOR_SIZE;

/// Sector size as a `usize`, for slicing.
const SECTOR: usize = SECTOR_SIZE as usize;

/// Length of the self-describing header at the start of each written sector.
pub const HEADER_LEN: usize = 24;

/// Marks a sector written by this module ("SBk" + format version 1).
pub const MAGIC: [u8; 4] = *b"SBk\x01";

/// Generation of a sector that was never written, or was discarded.
pub const GEN_ZERO: u32 = 0;

/// A small, fast, seedable PRNG (splitmix64), shared by the pattern body, the
/// workloads and the in-memory test disk so every run is reproducible from
/// one seed.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// A uniform value in `[0, bound)`; `bound` must be non-zero.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "SplitMix64::below(0)");
        // Lemire's multiply-shift; the tiny bias (< 2^-64 * bound) is
        // irrelevant for workload generation.
        let wide = u128::from(self.next_u64()) * u128::from(bound);
        (wide >> 64) as u64
    }

    /// A uniform value in `[lo, hi]` (inclusive); requires `lo <= hi`.
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "SplitMix64::range_inclusive({lo}, {hi})");
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.below(span),
            None => self.next_u64(),
        }
    }
}

/// The splitmix64 finaliser: a bijective 64-bit mix.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Body PRNG seed for one sector; mixes all three inputs so neighbouring
/// sectors and generations get unrelated streams.
fn body_seed(sector: u64, gen: u32, seed: u64) -> u64 {
    mix64(seed ^ mix64(sector ^ mix64(u64::from(gen) ^ 0x5348_4144_4f57_424b)))
}

/// Writes the content of `sector` at generation `gen` into `out`.
fn fill_sector(out: &mut [u8], sector: u64, gen: u32, seed: u64) {
    debug_assert_eq!(out.len(), SECTOR);
    if gen == GEN_ZERO {
        out.fill(0);
        return;
    }
    out[0..8].copy_from_slice(&sector.to_le_bytes());
    out[8..12].copy_from_slice(&gen.to_le_bytes());
    out[12..16].copy_from_slice(&MAGIC);
    out[16..24].copy_from_slice(&seed.to_le_bytes());
    let mut rng = SplitMix64::new(body_seed(sector, gen, seed));
    for word in out[HEADER_LEN..].chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// Fills `buf` (a whole number of sectors) with the content of sectors
/// `first_sector..` at the generations `gens(sector)` returns.
///
/// # Panics
/// If `buf.len()` is not a multiple of [`SECTOR_SIZE`] (a caller bug).
pub fn fill(buf: &mut [u8], first_sector: u64, gens: impl Fn(u64) -> u32, seed: u64) {
    assert_eq!(buf.len() % SECTOR, 0, "pattern::fill: partial sector");
    for (sector, chunk) in (first_sector..).zip(buf.chunks_exact_mut(SECTOR)) {
        fill_sector(chunk, sector, gens(sector), seed);
    }
}

/// What a mismatching sector actually held, decoded from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// All zeros: never written, discarded, or the write was lost.
    Zeros,
    /// A well-formed sector written by this module, but not the expected one.
    Written {
        /// Sector number in the header.
        sector: u64,
        /// Generation in the header.
        gen: u32,
        /// Run seed in the header.
        seed: u64,
    },
    /// A valid header whose body does not match the header's own pattern.
    CorruptBody {
        /// Sector number in the header.
        sector: u64,
        /// Generation in the header.
        gen: u32,
        /// Offset of the first differing byte inside the sector.
        offset: usize,
    },
    /// Nothing recognisable.
    Garbage {
        /// The first 8 bytes, for the log.
        head: [u8; 8],
    },
}

/// The first sector of a buffer that did not hold what the model expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The sector that mismatched.
    pub sector: u64,
    /// The generation the model expected (0 = zeros).
    pub expected_gen: u32,
    /// The seed the model expected.
    pub expected_seed: u64,
    /// What was there instead.
    pub found: Found,
    /// How many sectors of the checked buffer mismatched in total.
    pub bad_sectors: u64,
}

impl Mismatch {
    /// A short guess at the failure class, for humans reading a report.
    pub fn diagnosis(&self) -> &'static str {
        match self.found {
            Found::Zeros => "lost write (zeros where data was acknowledged)",
            Found::Written { seed, .. } if seed != self.expected_seed => {
                "data from another run (different seed)"
            }
            Found::Written { sector, .. } if sector != self.sector => {
                "misdirected write (data belongs to another sector)"
            }
            Found::Written { .. } if self.expected_gen == GEN_ZERO => {
                "stale data (discard not applied or write after discard)"
            }
            Found::Written { gen, .. } if gen < self.expected_gen => {
                "stale data (older generation: lost or reordered write)"
            }
            Found::Written { .. } => {
                "newer generation than acknowledged (unacknowledged write applied)"
            }
            Found::CorruptBody { .. } => "corrupted data (header intact, body differs)",
            Found::Garbage { .. } => "garbage (unrecognisable content)",
        }
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Zeros => write!(f, "zeros"),
            Found::Written { sector, gen, seed } => {
                write!(f, "sector {sector} gen {gen} (seed {seed:#x})")
            }
            Found::CorruptBody {
                sector,
                gen,
                offset,
            } => write!(
                f,
                "header of sector {sector} gen {gen} with a corrupt body from byte {offset}"
            ),
            Found::Garbage { head } => write!(f, "garbage (starts {head:02x?})"),
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected = if self.expected_gen == GEN_ZERO {
            "zeros".to_string()
        } else {
            format!("gen {}", self.expected_gen)
        };
        write!(
            f,
            "sector {}: expected {expected}, found {} — {}",
            self.sector,
            self.found,
            self.diagnosis()
        )?;
        if self.bad_sectors > 1 {
            write!(f, " ({} bad sectors in this buffer)", self.bad_sectors)?;
        }
        Ok(())
    }
}

impl std::error::Error for Mismatch {}

/// Decodes what a sector holds, assuming it is not what was expected.
fn decode(actual: &[u8], scratch: &mut [u8; SECTOR]) -> Found {
    if actual.iter().all(|&b| b == 0) {
        return Found::Zeros;
    }
    let mut head = [0u8; 8];
    head.copy_from_slice(&actual[0..8]);
    if actual[12..16] != MAGIC {
        return Found::Garbage { head };
    }
    let sector = u64::from_le_bytes(head);
    let gen = u32::from_le_bytes([actual[8], actual[9], actual[10], actual[11]]);
    let mut seed_bytes = [0u8; 8];
    seed_bytes.copy_from_slice(&actual[16..24]);
    let seed = u64::from_le_bytes(seed_bytes);
    if gen == GEN_ZERO {
        return Found::Garbage { head };
    }
    fill_sector(scratch, sector, gen, seed);
    match first_difference(actual, scratch) {
        None => Found::Written { sector, gen, seed },
        Some(offset) => Found::CorruptBody {
            sector,
            gen,
            offset,
        },
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Checks that `buf` holds sectors `first_sector..` at the generations
/// `expected(sector)` returns; `None` means "unknown, don't judge" (e.g. the
/// range of a failed write).
///
/// Returns the first mismatching sector, with the total count of bad sectors.
///
/// # Panics
/// If `buf.len()` is not a multiple of [`SECTOR_SIZE`]; callers check the
/// length of device data before calling.
pub fn check(
    buf: &[u8],
    first_sector: u64,
    expected: impl Fn(u64) -> Option<u32>,
    seed: u64,
) -> Result<(), Mismatch> {
    assert_eq!(buf.len() % SECTOR, 0, "pattern::check: partial sector");
    let mut want = [0u8; SECTOR];
    let mut first: Option<Mismatch> = None;
    for (sector, actual) in (first_sector..).zip(buf.chunks_exact(SECTOR)) {
        let Some(gen) = expected(sector) else {
            continue;
        };
        let ok = if gen == GEN_ZERO {
            actual.iter().all(|&b| b == 0)
        } else {
            fill_sector(&mut want, sector, gen, seed);
            actual == want.as_slice()
        };
        if ok {
            continue;
        }
        match &mut first {
            Some(m) => m.bad_sectors += 1,
            None => {
                first = Some(Mismatch {
                    sector,
                    expected_gen: gen,
                    expected_seed: seed,
                    found: decode(actual, &mut want),
                    bad_sectors: 1,
                })
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEED: u64 = 0xfeed_f00d;

    fn filled(first: u64, sectors: usize, gen: u32) -> Vec<u8> {
        let mut buf = vec![0u8; sectors * SECTOR];
        fill(&mut buf, first, |_| gen, SEED);
        buf
    }

    #[test]
    fn fill_then_check_round_trips() {
        let buf = filled(100, 8, 7);
        assert_eq!(check(&buf, 100, |_| Some(7), SEED), Ok(()));
        assert_eq!(&buf[0..8], &100u64.to_le_bytes());
        assert_eq!(&buf[SECTOR..SECTOR + 8], &101u64.to_le_bytes());
        assert_eq!(&buf[12..16], &MAGIC);
    }

    #[test]
    fn gen_zero_is_zeros() {
        let buf = filled(0, 2, 0);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(check(&buf, 0, |_| Some(0), SEED), Ok(()));
    }

    #[test]
    fn distinct_sectors_and_generations_differ() {
        let a = filled(5, 1, 1);
        let b = filled(5, 1, 2);
        let c = filled(6, 1, 1);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        assert_ne!(a[HEADER_LEN..], c[HEADER_LEN..]);
    }

    #[test]
    fn stale_generation_is_diagnosed() {
        let buf = filled(40, 8, 3);
        let m = check(&buf, 40, |_| Some(4), SEED).unwrap_err();
        assert_eq!(m.sector, 40);
        assert_eq!(m.bad_sectors, 8);
        assert_eq!(
            m.found,
            Found::Written {
                sector: 40,
                gen: 3,
                seed: SEED
            }
        );
        assert!(m.to_string().contains("found sector 40 gen 3"), "{m}");
        assert!(m.diagnosis().contains("stale"));
    }

    #[test]
    fn misdirected_data_is_diagnosed() {
        let buf = filled(800, 1, 9);
        let m = check(&buf, 64, |_| Some(9), SEED).unwrap_err();
        assert!(m.to_string().contains("found sector 800 gen 9"), "{m}");
        assert!(m.diagnosis().contains("misdirected"));
    }

    #[test]
    fn zeros_garbage_and_corruption_are_diagnosed() {
        let zeros = vec![0u8; SECTOR];
        let m = check(&zeros, 1, |_| Some(2), SEED).unwrap_err();
        assert_eq!(m.found, Found::Zeros);
        assert!(m.to_string().contains("zeros"));

        let garbage = vec![0xa5u8; SECTOR];
        let m = check(&garbage, 1, |_| Some(2), SEED).unwrap_err();
        assert!(matches!(m.found, Found::Garbage { .. }));
        assert!(m.to_string().contains("garbage"));

        let mut corrupt = filled(1, 1, 2);
        corrupt[300] ^= 0x10;
        let m = check(&corrupt, 1, |_| Some(2), SEED).unwrap_err();
        assert_eq!(
            m.found,
            Found::CorruptBody {
                sector: 1,
                gen: 2,
                offset: 300
            }
        );

        let data = filled(1, 1, 2);
        let m = check(&data, 1, |_| Some(0), SEED).unwrap_err();
        assert!(m.diagnosis().contains("discard"));
    }

    #[test]
    fn unknown_sectors_are_not_judged() {
        let mut buf = filled(0, 4, 5);
        buf[SECTOR * 2..SECTOR * 3].fill(0xff);
        assert_eq!(check(&buf, 0, |s| (s != 2).then_some(5), SEED), Ok(()));
        let m = check(&buf, 0, |_| Some(5), SEED).unwrap_err();
        assert_eq!((m.sector, m.bad_sectors), (2, 1));
    }

    #[test]
    fn rng_ranges_stay_in_bounds() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..10_000 {
            let v = rng.range_inclusive(3, 9);
            assert!((3..=9).contains(&v));
        }
        let _ = rng.range_inclusive(0, u64::MAX);
    }

    proptest! {
        #[test]
        fn any_single_byte_flip_is_detected(
            first in 0u64..1 << 40,
            gen in 1u32..u32::MAX,
            at in 0usize..SECTOR * 2,
            bit in 0u8..8,
        ) {
            let mut buf = vec![0u8; SECTOR * 2];
            fill(&mut buf, first, |_| gen, SEED);
            prop_assert!(check(&buf, first, |_| Some(gen), SEED).is_ok());
            buf[at] ^= 1 << bit;
            let m = check(&buf, first, |_| Some(gen), SEED).unwrap_err();
            prop_assert_eq!(m.sector, first + (at / SECTOR) as u64);
            prop_assert_eq!(m.bad_sectors, 1);
        }
    }
}
