//! Per-device QoS (docs/ARCHITECTURE.md §11.2): an IOPS and a bandwidth
//! limit, each a token bucket with a rate and a size (as QEMU's throttle
//! groups and Cloud Hypervisor's rate limiter).
//!
//! The loop asks [`Qos::admit`] before it takes a request from a ring and
//! charges the request's bytes with [`Qos::charge`] once it has parsed it.
//! A request is admitted while the request bucket holds a whole token and
//! the byte bucket is not in debt; its bytes may take the byte bucket below
//! zero (its size is not known before it is taken), and that debt is paid
//! before the next request goes. Over any window of `t` seconds a device
//! therefore starts at most `iops_burst + iops × t` requests and moves at
//! most `bytes_burst + bytes × t` bytes plus one request's worth.
//!
//! A throttled loop stops taking requests and sleeps until the buckets
//! allow the next one ([`Qos::admit`] says how long); it keeps beating its
//! heartbeat meanwhile (every turn, at least every 20 ms), so the hang
//! watchdog never takes throttling for a hang.

use std::time::{Duration, Instant};

use shadowback_xenbus::protocol::QosLimits;

/// One token bucket: `rate` tokens a second, at most `size` held.
#[derive(Clone, Copy, Debug)]
struct TokenBucket {
    rate: f64,
    size: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket; `size` 0 is a tenth of a second's worth (at least 1).
    fn new(rate: u64, size: u64, now: Instant) -> Self {
        let size = if size == 0 { (rate / 10).max(1) } else { size };
        TokenBucket {
            rate: rate as f64,
            size: size as f64,
            tokens: size as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.size);
        self.at = now;
    }

    /// How long until the bucket holds `want` tokens (zero: now).
    fn wait_for(&self, want: f64) -> Duration {
        if self.tokens >= want {
            return Duration::ZERO;
        }
        // At least a microsecond: `tokens` must end up at `want`, not just
        // below it.
        Duration::from_secs_f64((want - self.tokens) / self.rate).max(Duration::from_micros(1))
    }
}

/// The limits of one device, applied by its backend's loop.
#[derive(Clone, Copy, Debug, Default)]
pub struct Qos {
    limits: QosLimits,
    ops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl Qos {
    /// Buckets for `limits`, full at `now`.
    pub fn new(limits: QosLimits, now: Instant) -> Self {
        Qos {
            limits,
            ops: (limits.iops > 0).then(|| TokenBucket::new(limits.iops, limits.iops_burst, now)),
            bytes: (limits.bytes > 0)
                .then(|| TokenBucket::new(limits.bytes, limits.bytes_burst, now)),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> QosLimits {
        self.limits
    }

    /// Whether no limit is set (the loop then reads no clock for it).
    pub fn is_off(&self) -> bool {
        self.ops.is_none() && self.bytes.is_none()
    }

    /// `Ok` if a request may be taken at `now` (its token is taken), else
    /// how long until one may.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        if let Some(b) = self.ops.as_mut() {
            b.refill(now);
            wait = wait.max(b.wait_for(1.0));
        }
        if let Some(b) = self.bytes.as_mut() {
            b.refill(now);
            // Not in debt: the last request's bytes are paid for.
            wait = wait.max(b.wait_for(f64::MIN_POSITIVE));
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = self.ops.as_mut() {
            b.tokens -= 1.0;
        }
        Ok(())
    }

    /// How long from `now` until a request may be taken; `None`: now.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let mut probe = *self;
        probe.admit(now).err()
    }

    /// Charges an admitted request's `bytes` (the byte bucket may go into
    /// debt).
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = self.bytes.as_mut() {
            b.tokens -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(iops: u64, iops_burst: u64, bytes: u64, bytes_burst: u64) -> QosLimits {
        QosLimits {
            iops,
            iops_burst,
            bytes,
            bytes_burst,
        }
    }

    /// Requests admitted from `t0` until `secs` seconds later, each taken
    /// as soon as the buckets allow, `size` bytes each.
    fn admitted(qos: &mut Qos, t0: Instant, secs: f64, size: u64) -> u64 {
        let end = t0 + Duration::from_secs_f64(secs);
        let (mut now, mut n) = (t0, 0);
        while now < end {
            match qos.admit(now) {
                Ok(()) => {
                    qos.charge(size);
                    n += 1;
                }
                Err(wait) => now += wait,
            }
        }
        n
    }

    #[test]
    fn no_limit_admits_everything() {
        let t0 = Instant::now();
        let mut qos = Qos::new(QosLimits::default(), t0);
        assert!(qos.is_off());
        for _ in 0..100_000 {
            assert_eq!(qos.admit(t0), Ok(()));
        }
        assert_eq!(qos.wait(t0), None);
    }

    #[test]
    fn the_request_bucket_holds_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut qos = Qos::new(limits(1000, 50, 0, 0), t0);
        // The burst at once, then nothing at the same instant.
        for _ in 0..50 {
            assert_eq!(qos.admit(t0), Ok(()));
        }
        let wait = qos.admit(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(1) && wait > Duration::ZERO);
        // Ten seconds: the burst again plus the rate.
        let mut qos = Qos::new(limits(1000, 50, 0, 0), t0);
        let n = admitted(&mut qos, t0, 10.0, 4096);
        assert!((10_049..=10_051).contains(&n), "{n}");
    }

    #[test]
    fn the_default_burst_is_a_tenth_of_a_second() {
        let t0 = Instant::now();
        let mut qos = Qos::new(limits(2000, 0, 0, 0), t0);
        let burst = (0..).take_while(|_| qos.admit(t0).is_ok()).count();
        assert_eq!(burst, 200);
        let mut tiny = Qos::new(limits(3, 0, 0, 0), t0);
        assert_eq!((0..).take_while(|_| tiny.admit(t0).is_ok()).count(), 1);
    }

    #[test]
    fn the_byte_bucket_limits_bandwidth_with_one_request_of_debt() {
        let t0 = Instant::now();
        let (rate, size) = (1 << 20, 64 * 1024);
        let mut qos = Qos::new(limits(0, 0, rate, rate / 4), t0);
        let n = admitted(&mut qos, t0, 4.0, size);
        let bytes = n * size;
        // burst + rate × t, plus the one request that may overdraw.
        let most = rate / 4 + 4 * rate + size;
        assert!(
            bytes <= most && bytes >= most - 2 * size,
            "{bytes} vs {most}"
        );
    }

    #[test]
    fn both_buckets_must_allow_a_request() {
        let t0 = Instant::now();
        // Requests plenty, bytes scarce: the byte rate decides.
        let mut qos = Qos::new(limits(100_000, 0, 1 << 20, 1 << 20), t0);
        let n = admitted(&mut qos, t0, 2.0, 1 << 20);
        assert!((3..=4).contains(&n), "{n}");
        // Bytes plenty, requests scarce: the request rate decides.
        let mut qos = Qos::new(limits(10, 10, 1 << 30, 0), t0);
        let n = admitted(&mut qos, t0, 2.0, 512);
        assert!((29..=31).contains(&n), "{n}");
    }
}
