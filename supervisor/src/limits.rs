//! What one frontend may make a device hold (`[limits]`,
//! docs/PROTOCOL.md §1.3): the guest memory its backends map, and how
//! often it may be attached.
//!
//! The other resources a guest drives are bounded by the device's own
//! configuration: requests in flight and shadow-log entries by the ring
//! (`max_ring_page_order`; a vif's rings are 256 slots each) or the
//! virtqueues (`num_queues` × `queue_size`), and the control connections a
//! client holds by `[control]` (`admission.rs`).

use std::time::Instant;

use shadowback_xenbus::protocol::ErrorCode;

use crate::config::LimitsConfig;
use crate::device::Refusal;

/// Sectors `fault poison` may mark per device: every instance is told all
/// of them before its attach, so the list is bounded like the rest.
pub(crate) const MAX_POISONED_SECTORS: usize = 64;

/// A device's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceLimits {
    /// Bytes of guest memory a frontend may hand the device.
    pub max_memory_bytes: u64,
    /// Regions of a vhost-user memory table.
    pub max_regions: usize,
    /// Attach attempts per second (and the burst).
    pub attaches_per_second: u32,
}

impl DeviceLimits {
    pub(crate) fn new(cfg: &LimitsConfig) -> Self {
        DeviceLimits {
            max_memory_bytes: cfg.max_guest_memory_mib.saturating_mul(1 << 20),
            max_regions: usize::try_from(cfg.max_memory_regions).unwrap_or(usize::MAX),
            attaches_per_second: cfg.attaches_per_second,
        }
    }

    /// `E2BIG` unless guest memory of regions of `sizes` bytes is within
    /// `max_memory_regions` and `max_guest_memory_mib`.
    pub(crate) fn check_memory(&self, sizes: &[u64]) -> Result<(), Refusal> {
        if sizes.len() > self.max_regions {
            return Err((
                ErrorCode::E2big,
                format!(
                    "{} guest memory regions, more than max_memory_regions {}",
                    sizes.len(),
                    self.max_regions
                ),
            ));
        }
        let total = sizes
            .iter()
            .try_fold(0u64, |sum, &s| sum.checked_add(s))
            .unwrap_or(u64::MAX);
        if total > self.max_memory_bytes {
            return Err((
                ErrorCode::E2big,
                format!(
                    "{total} bytes of guest memory, more than max_guest_memory_mib {} allows",
                    self.max_memory_bytes >> 20
                ),
            ));
        }
        Ok(())
    }
}

/// A token bucket of attach attempts: `per_second` tokens, refilled
/// continuously at `per_second` a second.
#[derive(Debug)]
pub(crate) struct AttachRate {
    per_second: u32,
    tokens: f64,
    refilled: Option<Instant>,
}

impl AttachRate {
    pub(crate) fn new(per_second: u32) -> Self {
        AttachRate {
            per_second,
            tokens: f64::from(per_second),
            refilled: None,
        }
    }

    /// Takes a token for an attempt at `now`, or `EAGAIN`.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Refusal> {
        let cap = f64::from(self.per_second);
        if let Some(last) = self.refilled {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * cap).min(cap);
        }
        self.refilled = Some(now);
        if self.tokens < 1.0 {
            return Err((
                ErrorCode::Eagain,
                format!(
                    "more than {} attaches of the device in a second (attaches_per_second)",
                    self.per_second
                ),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn memory_is_bounded_in_bytes_and_regions() {
        let limits = DeviceLimits::new(&LimitsConfig {
            max_guest_memory_mib: 2,
            max_memory_regions: 2,
            ..LimitsConfig::default()
        });
        assert_eq!(limits.check_memory(&[1 << 20, 1 << 20]), Ok(()));
        let (code, why) = limits.check_memory(&[1 << 20, (1 << 20) + 1]).unwrap_err();
        assert_eq!(code, ErrorCode::E2big);
        assert!(why.contains("max_guest_memory_mib"), "{why}");
        let (code, why) = limits.check_memory(&[4096; 3]).unwrap_err();
        assert_eq!(code, ErrorCode::E2big);
        assert!(why.contains("max_memory_regions"), "{why}");
        // Sizes that wrap a u64 when summed are too big, not small.
        assert!(limits.check_memory(&[u64::MAX, 2]).is_err());
    }

    #[test]
    fn attaches_take_a_burst_then_the_rate() {
        let mut rate = AttachRate::new(4);
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(rate.take(t0), Ok(()));
        }
        let (code, _) = rate.take(t0).unwrap_err();
        assert_eq!(code, ErrorCode::Eagain);
        // A quarter of a second gives one token back, and no more.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(rate.take(t1), Ok(()));
        assert!(rate.take(t1).is_err());
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(rate.take(t2), Ok(()));
        }
        assert!(rate.take(t2).is_err());
    }
}
