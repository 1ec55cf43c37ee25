//! What configures and counts one block backend instance, whatever the
//! transport.

use shadowback_dataplane::recovery::CrashSpec;
use shadowback_dataplane::uring::EngineConfig;

use shadowback_xenbus::protocol::QosLimits;

use crate::request::DiskGeometry;

/// Static configuration of one backend instance.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Device name, for logs.
    pub device: String,
    /// Domain id the guest's grants must name.
    pub backend_id: u16,
    /// What the disk offers.
    pub disk: DiskGeometry,
    /// Largest accepted `ring-page-order`.
    pub max_ring_page_order: u8,
    /// io_uring parameters.
    pub engine: EngineConfig,
    /// Log every request in the shadow log the supervisor passes (off only
    /// for the overhead benchmark: a crash then loses in-flight requests).
    pub shadow: bool,
    /// Fault injection for crash tests (`SHADOWBACK_CRASH_AT`).
    pub crash_at: CrashSpec,
    /// Adaptive polling window in µs (`poll_us` of the disk; 0: never
    /// poll), at most
    /// [`shadowback_dataplane::event_loop::MAX_POLL_WINDOW`].
    pub poll_us: u32,
    /// IOPS and bandwidth limits (`--iops-limit` …; docs/ARCHITECTURE.md
    /// §11.2), until a `qos` message changes them.
    pub qos: QosLimits,
}
