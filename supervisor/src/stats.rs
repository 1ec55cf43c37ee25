//! Per-device recovery counters (docs/ARCHITECTURE.md §7), as reported by the `status`
//! control message and [`crate::SupervisorThread::status`].

use std::time::Duration;

use shadowback_shadow::metrics::OCTAVES;
use shadowback_shadow::{IoCounters, Latency};
use shadowback_xenbus::protocol::{key, kind};
use shadowback_xenbus::{Message, XenbusError};

/// Recovery counters and state of one device since the supervisor started.
///
/// A *failure* is a serving backend instance that crashed (or was killed)
/// or that the watchdog declared hung; each is fenced (SIGKILL, then
/// reaped) and followed by a *takeover*: a hot standby or a freshly started
/// instance gets `attach` with `recover=1` and replays the shadow log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Backend instances that exited without being asked to — a crash, an
    /// injected kill, or a new instance dying during its takeover — and
    /// that closed their control channel. An instance killed by `fault
    /// kill` counts here even if the watchdog saw it stall first (it was
    /// still exiting). Hung instances are not counted here.
    pub crashes: u64,
    /// Instances declared hung and killed: the heartbeat did not move for
    /// `hang_timeout_ms` while the ring had unanswered requests, or an
    /// instance did not answer a control request in time.
    pub hangs: u64,
    /// Takeovers that ended with the new instance's `attached`.
    pub recoveries: u64,
    /// Takeovers that failed (the new instance died, hung or refused); five
    /// in a row make the supervisor give up and disconnect the guest.
    pub failed_takeovers: u64,
    /// Successful takeovers by the hot standby.
    pub standby_takeovers: u64,
    /// Successful takeovers by an instance started for the occasion.
    pub cold_takeovers: u64,
    /// Requests re-executed from the shadow log (backend `replayed`).
    pub replayed: u64,
    /// Saved responses re-pushed without re-execution (backend `repushed`).
    pub repushed: u64,
    /// Requests failed by the crash-loop breaker (backend `poisoned`).
    pub poisoned: u64,
    /// Corrupt log entries answered with an error (backend `corrupt`).
    pub corrupt: u64,
    /// A vif's TX packets sent again by recovering instances (backend
    /// `tx-replayed`, summed over recoveries); 0 for a disk.
    pub tx_replayed: u64,
    /// TX packets sent again that may have left the dead instance too (at
    /// most one per recovery on a cable, a batch on a TAP; backend
    /// `tx-maybe-duplicated`, summed).
    pub tx_maybe_duplicated: u64,
    /// Posted RX buffers handed over to recovering instances (backend
    /// `rx-buffers-recovered`, summed).
    pub rx_buffers_recovered: u64,
    /// Frames the wire had handed to an instance that died before
    /// delivering them (backend `rx-dropped-in-crash`, summed): lost as on
    /// any NIC, the guest's TCP sends them again.
    pub rx_dropped_in_crash: u64,
    /// A guest is attached (its connection is in state Connected).
    pub connected: bool,
    /// Process id of the instance serving the device, if one runs.
    pub pid: Option<u32>,
    /// Process id of the spare a takeover of this device would get now
    /// (its class's pool is shared: several devices may show the same);
    /// `None` when none is ready or the device uses no pool.
    pub standby_pid: Option<u32>,
    /// Spares ready in the device's class pool (0 without a pool).
    pub pool_spares: usize,
    /// The pool's configured size (0 without a pool).
    pub pool_size: usize,
    /// The supervisor gave up on the device (too many failed takeovers or
    /// backends dying at start-up). Attaching it fails with `ENODEV` for a
    /// second; the next attach after that gives it a fresh start.
    pub given_up: bool,
    /// Attaches that gave a given-up device a fresh start: a new backend
    /// and a new shadow log (docs/ARCHITECTURE.md §7.5).
    pub fresh_starts: u64,
    /// Breakdown of the last recovery, if there was one.
    pub last_recovery: Option<RecoveryTimes>,
    /// The recoveries' `total_us` added up: how long the guest waited on
    /// failures, as the supervisor measures it.
    pub stall_us: u64,
    /// Requests, bytes, queue depth and latency, from the device's
    /// metrics page (docs/ARCHITECTURE.md §4.1): every instance's counts
    /// added up. Parsed from a `status` message, its latency histogram
    /// has octave resolution (`Latency::from_octaves`).
    pub io: IoCounters,
    /// Latency quantiles from the full histogram (bucket upper bounds,
    /// within 25%); `None` before the first request.
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// How the last failed serving instance ended, e.g. "killed by
    /// SIGSYS" (it broke its seccomp filter, docs/ARCHITECTURE.md §1.1)
    /// or "killed by SIGKILL" (fenced, or `fault kill`).
    pub last_failure: Option<String>,
    /// From the SIGKILL to the last I/O of the dead instance being gone,
    /// for the last fence that ran in the background while the next
    /// instance served (docs/ARCHITECTURE.md §7.3): how long its held-back
    /// requests waited. In process only; not carried by `status`.
    pub background_fence_us: Option<u64>,
    /// Crash notes (`dying`) the serving instances sent before they died
    /// (docs/ARCHITECTURE.md §7.2). In process only.
    pub crash_notes: u64,
    /// Failed instances replaced without a takeover, so without a
    /// recovery: no frontend was attached (a kill between two sessions),
    /// or one without a shadow log (which is told). In process only.
    pub idle_replacements: u64,
}

/// Where the time of one recovery went, in microseconds.
///
/// A recovery that needed several takeover attempts (a request that kills
/// every instance until the crash-loop breaker fails it) reports the
/// detect, fence and takeover times of its last attempt, and the total
/// from the first failure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryTimes {
    /// Until the failure was declared. Hang: from the later of the
    /// heartbeat's last change and the first check that saw work pending,
    /// to the check that declared the hang (≈ `hang_timeout_ms`). Crash:
    /// from the pidfd (or control channel) waking the supervisor to the
    /// handling starting (≈ 0), except for a kill injected by `fault`:
    /// from the SIGKILL being sent to the exit being seen — or, for an
    /// instance that registered for the membarrier (docs/ARCHITECTURE.md
    /// §7.2), to the handling starting right after the kill.
    pub detect_us: u64,
    /// From the SIGKILL being sent to the old process being reaped and
    /// its I/O gone; for a disk whose instance could be stopped at once,
    /// to it being stopped (the rest of the fence runs in the background,
    /// docs/ARCHITECTURE.md §7.3, [`DeviceStats::background_fence_us`]).
    pub fence_us: u64,
    /// From the standby being released (or a new instance being spawned)
    /// to the instance's `attached`, less its own replay (`replay_us`):
    /// the `poison` replays, a spare's `adopt`, the instance's set-up.
    pub takeover_us: u64,
    /// The new instance's own replay time (its `replay-us`).
    pub replay_us: u64,
    /// From the failure being seen to `attached`.
    pub total_us: u64,
}

/// Whole microseconds, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl DeviceStats {
    /// The `status` message for device `name`: every counter, `pid` and
    /// `standby-pid` (0 when none), the last recovery's breakdown (0 when
    /// none).
    pub fn to_message(&self, name: &str) -> Message {
        let last = self.last_recovery.unwrap_or_default();
        let msg = Message::new(kind::STATUS)
            .with(key::DEVICE, name)
            .with(key::CRASHES, self.crashes)
            .with(key::HANGS, self.hangs)
            .with(key::RECOVERIES, self.recoveries)
            .with(key::REPLAYED, self.replayed)
            .with(key::REPUSHED, self.repushed)
            .with(key::POISONED, self.poisoned)
            .with(key::CORRUPT, self.corrupt)
            .with(STATUS_TX_REPLAYED, self.tx_replayed)
            .with(STATUS_TX_MAYBE_DUPLICATED, self.tx_maybe_duplicated)
            .with(STATUS_RX_BUFFERS_RECOVERED, self.rx_buffers_recovered)
            .with(STATUS_RX_DROPPED_IN_CRASH, self.rx_dropped_in_crash)
            .with(STATUS_FAILED_TAKEOVERS, self.failed_takeovers)
            .with(STATUS_STANDBY_TAKEOVERS, self.standby_takeovers)
            .with(STATUS_COLD_TAKEOVERS, self.cold_takeovers)
            .with(STATUS_GIVEN_UP, u8::from(self.given_up))
            .with(STATUS_FRESH_STARTS, self.fresh_starts)
            .with(key::CONNECTED, u8::from(self.connected))
            .with(key::PID, self.pid.unwrap_or(0))
            .with(key::STANDBY_PID, self.standby_pid.unwrap_or(0))
            .with(STATUS_POOL_SPARES, self.pool_spares)
            .with(STATUS_POOL_SIZE, self.pool_size)
            .with(key::LAST_DETECT_US, last.detect_us)
            .with(key::LAST_FENCE_US, last.fence_us)
            .with(key::LAST_TAKEOVER_US, last.takeover_us)
            .with(key::LAST_REPLAY_US, last.replay_us)
            .with(key::LAST_TOTAL_US, last.total_us);
        let io = &self.io;
        let lat = &io.latency;
        let msg = msg
            .with(STATUS_STALL_US, self.stall_us)
            .with(STATUS_REQUESTS, io.requests)
            .with(STATUS_IO_ERRORS, io.errors)
            .with(STATUS_BYTES_TO_GUEST, io.bytes_to_guest)
            .with(STATUS_BYTES_FROM_GUEST, io.bytes_from_guest)
            .with(STATUS_PACKETS_TO_GUEST, io.packets_to_guest)
            .with(STATUS_PACKETS_FROM_GUEST, io.packets_from_guest)
            .with(STATUS_DROPPED, io.dropped)
            .with(STATUS_IN_FLIGHT, io.in_flight)
            .with(STATUS_LATENCY_COUNT, lat.count)
            .with(STATUS_LATENCY_SUM_US, lat.sum_us)
            .with(STATUS_LATENCY_P50_US, self.latency_p50_us.unwrap_or(0))
            .with(STATUS_LATENCY_P99_US, self.latency_p99_us.unwrap_or(0));
        let mut msg = msg;
        for (part, value) in encode_octaves(&lat.octaves()).iter().enumerate() {
            msg.set(&octaves_key(part), value);
        }
        match &self.last_failure {
            Some(how) => msg.with(STATUS_LAST_FAILURE, how),
            None => msg,
        }
    }

    /// Parses a `status` message; returns the device name and its stats.
    /// Keys this version does not send are taken as 0, so a newer
    /// supervisor's extra keys and an older one's missing ones both parse.
    pub fn from_message(msg: &Message) -> Result<(String, Self), XenbusError> {
        msg.expect_kind(kind::STATUS)?;
        let n = |k: &str| -> Result<u64, XenbusError> { Ok(msg.get_u64(k)?.unwrap_or(0)) };
        let pid = |k: &str| -> Result<Option<u32>, XenbusError> {
            Ok(msg.get_u32(k)?.filter(|&p| p != 0))
        };
        let count = |k: &str| -> Result<usize, XenbusError> {
            Ok(msg.get_u32(k)?.map_or(0, |c| c as usize))
        };
        let last = RecoveryTimes {
            detect_us: n(key::LAST_DETECT_US)?,
            fence_us: n(key::LAST_FENCE_US)?,
            takeover_us: n(key::LAST_TAKEOVER_US)?,
            replay_us: n(key::LAST_REPLAY_US)?,
            total_us: n(key::LAST_TOTAL_US)?,
        };
        let parts: Vec<&str> = (0..OCTAVE_KEYS)
            .filter_map(|part| msg.get(&octaves_key(part)))
            .collect();
        let octaves = decode_octaves(&parts).ok_or_else(|| XenbusError::BadValue {
            key: STATUS_LATENCY_OCTAVES.into(),
            line: 0,
        })?;
        let stats = DeviceStats {
            crashes: n(key::CRASHES)?,
            hangs: n(key::HANGS)?,
            recoveries: n(key::RECOVERIES)?,
            failed_takeovers: n(STATUS_FAILED_TAKEOVERS)?,
            standby_takeovers: n(STATUS_STANDBY_TAKEOVERS)?,
            cold_takeovers: n(STATUS_COLD_TAKEOVERS)?,
            replayed: n(key::REPLAYED)?,
            repushed: n(key::REPUSHED)?,
            poisoned: n(key::POISONED)?,
            corrupt: n(key::CORRUPT)?,
            tx_replayed: n(STATUS_TX_REPLAYED)?,
            tx_maybe_duplicated: n(STATUS_TX_MAYBE_DUPLICATED)?,
            rx_buffers_recovered: n(STATUS_RX_BUFFERS_RECOVERED)?,
            rx_dropped_in_crash: n(STATUS_RX_DROPPED_IN_CRASH)?,
            connected: msg.get_flag(key::CONNECTED)?.unwrap_or(false),
            pid: pid(key::PID)?,
            standby_pid: pid(key::STANDBY_PID)?,
            pool_spares: count(STATUS_POOL_SPARES)?,
            pool_size: count(STATUS_POOL_SIZE)?,
            given_up: msg.get_flag(STATUS_GIVEN_UP)?.unwrap_or(false),
            fresh_starts: n(STATUS_FRESH_STARTS)?,
            last_recovery: (last != RecoveryTimes::default()).then_some(last),
            last_failure: msg.get(STATUS_LAST_FAILURE).map(str::to_owned),
            background_fence_us: None,
            crash_notes: 0,
            idle_replacements: 0,
            stall_us: n(STATUS_STALL_US)?,
            io: IoCounters {
                requests: n(STATUS_REQUESTS)?,
                errors: n(STATUS_IO_ERRORS)?,
                bytes_to_guest: n(STATUS_BYTES_TO_GUEST)?,
                bytes_from_guest: n(STATUS_BYTES_FROM_GUEST)?,
                packets_to_guest: n(STATUS_PACKETS_TO_GUEST)?,
                packets_from_guest: n(STATUS_PACKETS_FROM_GUEST)?,
                dropped: n(STATUS_DROPPED)?,
                in_flight: n(STATUS_IN_FLIGHT)?,
                latency: Latency::from_octaves(
                    n(STATUS_LATENCY_COUNT)?,
                    n(STATUS_LATENCY_SUM_US)?,
                    &octaves,
                ),
            },
            latency_p50_us: Some(n(STATUS_LATENCY_P50_US)?).filter(|&us| us > 0),
            latency_p99_us: Some(n(STATUS_LATENCY_P99_US)?).filter(|&us| us > 0),
        };
        Ok((msg.require(key::DEVICE)?.to_owned(), stats))
    }
}

/// `status` keys beyond the ones the protocol names (supervisor-only
/// diagnostics).
const STATUS_FAILED_TAKEOVERS: &str = "failed-takeovers";
const STATUS_STANDBY_TAKEOVERS: &str = "standby-takeovers";
const STATUS_COLD_TAKEOVERS: &str = "cold-takeovers";
const STATUS_GIVEN_UP: &str = "given-up";
const STATUS_FRESH_STARTS: &str = "fresh-starts";
const STATUS_POOL_SPARES: &str = "pool-spares";
const STATUS_POOL_SIZE: &str = "pool-size";
const STATUS_LAST_FAILURE: &str = "last-failure";
/// The stall total and the metrics page's counters.
const STATUS_STALL_US: &str = "stall-us";
const STATUS_REQUESTS: &str = "requests";
const STATUS_IO_ERRORS: &str = "io-errors";
const STATUS_BYTES_TO_GUEST: &str = "bytes-to-guest";
const STATUS_BYTES_FROM_GUEST: &str = "bytes-from-guest";
const STATUS_PACKETS_TO_GUEST: &str = "packets-to-guest";
const STATUS_PACKETS_FROM_GUEST: &str = "packets-from-guest";
const STATUS_DROPPED: &str = "dropped";
const STATUS_IN_FLIGHT: &str = "in-flight";
const STATUS_LATENCY_COUNT: &str = "latency-count";
const STATUS_LATENCY_SUM_US: &str = "latency-sum-us";
const STATUS_LATENCY_P50_US: &str = "latency-p50-us";
const STATUS_LATENCY_P99_US: &str = "latency-p99-us";
/// The latency histogram by octaves (`shadowback_shadow::metrics::OCTAVES`):
/// `octave:count` of the non-empty ones, comma separated (`7:120,8:3`),
/// split over `latency-octaves`, `latency-octaves-2`, … so that no value
/// is longer than a message allows.
const STATUS_LATENCY_OCTAVES: &str = "latency-octaves";
/// At most this many keys for the octaves (28 pairs of at most 24 bytes).
const OCTAVE_KEYS: usize = 4;

fn octaves_key(part: usize) -> String {
    if part == 0 {
        STATUS_LATENCY_OCTAVES.to_string()
    } else {
        format!("{STATUS_LATENCY_OCTAVES}-{}", part + 1)
    }
}

/// The non-empty octaves as `k:count` lists of at most `MAX_VALUE_LEN` bytes.
fn encode_octaves(octaves: &[u64; OCTAVES]) -> Vec<String> {
    let mut parts = vec![String::new()];
    for (k, &n) in octaves.iter().enumerate().filter(|(_, &n)| n > 0) {
        let pair = format!("{k}:{n}");
        let last = parts.last_mut().expect("one part at least");
        if last.len() + 1 + pair.len() > shadowback_xenbus::MAX_VALUE_LEN {
            parts.push(pair);
        } else {
            if !last.is_empty() {
                last.push(',');
            }
            last.push_str(&pair);
        }
    }
    parts
}

/// `None` for a malformed list or an octave out of range.
fn decode_octaves(parts: &[&str]) -> Option<[u64; OCTAVES]> {
    let mut octaves = [0u64; OCTAVES];
    for pair in parts
        .iter()
        .flat_map(|p| p.split(','))
        .filter(|p| !p.is_empty())
    {
        let (k, n) = pair.split_once(':')?;
        let slot = octaves.get_mut(k.parse::<usize>().ok()?)?;
        *slot = slot.checked_add(n.parse().ok()?)?;
    }
    Some(octaves)
}
/// A vif's recovery counters, named as the backend's `attached` keys
/// (docs/PROTOCOL.md §6c).
const STATUS_TX_REPLAYED: &str = "tx-replayed";
const STATUS_TX_MAYBE_DUPLICATED: &str = "tx-maybe-duplicated";
const STATUS_RX_BUFFERS_RECOVERED: &str = "rx-buffers-recovered";
const STATUS_RX_DROPPED_IN_CRASH: &str = "rx-dropped-in-crash";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_round_trip() {
        let stats = DeviceStats {
            crashes: 3,
            hangs: 1,
            recoveries: 4,
            failed_takeovers: 2,
            standby_takeovers: 1,
            cold_takeovers: 3,
            replayed: 17,
            repushed: 5,
            poisoned: 1,
            corrupt: 0,
            tx_replayed: 9,
            tx_maybe_duplicated: 1,
            rx_buffers_recovered: 256,
            rx_dropped_in_crash: 2,
            connected: true,
            pid: Some(4242),
            standby_pid: None,
            pool_spares: 1,
            pool_size: 2,
            given_up: false,
            fresh_starts: 2,
            last_recovery: Some(RecoveryTimes {
                detect_us: 100_512,
                fence_us: 230,
                takeover_us: 40,
                replay_us: 800,
                total_us: 1_200,
            }),
            last_failure: Some("killed by SIGSYS".into()),
            // In process only: not carried by `status`.
            background_fence_us: None,
            crash_notes: 0,
            idle_replacements: 0,
            stall_us: 2_400,
            io: IoCounters {
                requests: 1000,
                errors: 2,
                bytes_to_guest: 1 << 20,
                bytes_from_guest: 3 << 20,
                packets_to_guest: 7,
                packets_from_guest: 8,
                dropped: 1,
                in_flight: 5,
                latency: Latency::from_octaves(998, 123_456, &{
                    let mut o = [0u64; OCTAVES];
                    o[7] = 900;
                    o[10] = 98;
                    o
                }),
            },
            latency_p50_us: Some(111),
            latency_p99_us: Some(1279),
        };
        let msg = Message::decode(&stats.to_message("xvda").encode().unwrap()).unwrap();
        assert_eq!(msg.get("latency-octaves"), Some("7:900,10:98"));
        for k in [
            "device",
            "crashes",
            "hangs",
            "recoveries",
            "replayed",
            "repushed",
            "poisoned",
            "connected",
            "pid",
            "standby-pid",
            "last-detect-us",
            "last-fence-us",
            "last-takeover-us",
            "last-replay-us",
            "last-total-us",
            "tx-replayed",
            "tx-maybe-duplicated",
            "rx-buffers-recovered",
            "given-up",
            "fresh-starts",
            "rx-dropped-in-crash",
            "pool-spares",
            "pool-size",
        ] {
            assert!(msg.contains(k), "status lacks {k}");
        }
        assert_eq!(msg.get("standby-pid"), Some("0"));
        assert_eq!(msg.get("connected"), Some("1"));
        assert_eq!(
            DeviceStats::from_message(&msg).unwrap(),
            ("xvda".to_string(), stats)
        );
        let fresh = DeviceStats::default().to_message("a");
        assert_eq!(
            DeviceStats::from_message(&fresh).unwrap().1,
            DeviceStats::default()
        );
    }

    #[test]
    fn the_fullest_histogram_fits_a_message_and_bad_ones_are_refused() {
        let mut stats = DeviceStats::default();
        stats.io.latency = Latency::from_octaves(u64::MAX, u64::MAX, &[u64::MAX; OCTAVES]);
        stats.io.requests = u64::MAX;
        let bytes = stats.to_message("a-long-device-name").encode().unwrap();
        let msg = Message::decode(&bytes).unwrap();
        assert!(msg.contains("latency-octaves-3"), "split over keys");
        let (_, back) = DeviceStats::from_message(&msg).unwrap();
        assert_eq!(back.io.latency.octaves(), [u64::MAX; OCTAVES]);
        for bad in ["28:1", "x:1", "1:-1", "1", "1:2:3"] {
            let msg = DeviceStats::default()
                .to_message("a")
                .with("latency-octaves", bad);
            assert!(DeviceStats::from_message(&msg).is_err(), "{bad}");
        }
    }

    #[test]
    fn micros_saturates() {
        assert_eq!(micros(Duration::from_millis(3)), 3_000);
        assert_eq!(micros(Duration::MAX), u64::MAX);
    }
}
