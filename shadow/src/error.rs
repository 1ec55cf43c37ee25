use shadowback_ring::RingError;

/// Errors of the shadow-log layer.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// Creating, mapping or accessing the log's memfd failed.
    #[error("shadow log memory")]
    Region(#[source] RingError),
    #[error("not a shadow log (magic {0:#018x})")]
    BadMagic(u64),
    #[error("not a metrics page (magic {0:#018x})")]
    NotMetricsPage(u64),
    #[error("metrics page: a copy never finished (the writer keeps it changing)")]
    MetricsBusy,
    #[error("shadow log version {0} is not supported")]
    BadVersion(u32),
    #[error("shadow log entry size {0} is not supported")]
    BadEntrySize(u32),
    /// The entry count (ring size) is zero, not a power of two, or too big.
    #[error("invalid shadow log entry count {0}")]
    BadEntryCount(u32),
    #[error("shadow log of {len} bytes is too small, {need} needed")]
    TooSmall { len: u64, need: u64 },
    #[error("the shadow log has {log} entries but the ring has {ring} slots")]
    SizeMismatch { log: u32, ring: u32 },
    /// A writer operation before [`ShadowLog::begin_instance`](crate::ShadowLog::begin_instance).
    #[error("this instance has not taken over the shadow log")]
    NotBegun,
    /// Every entry is live: publish responses before consuming more.
    #[error("no free shadow log entry")]
    LogFull,
    #[error("shadow log entry {0} does not exist")]
    NoSuchEntry(u32),
    #[error("shadow log entry {entry} is in state {state:#x}, not valid for this transition")]
    WrongState { entry: u32, state: u32 },
    /// Requests are consumed strictly in ring order.
    #[error("request consumed at ring index {got}, expected {expected}")]
    OutOfOrder { expected: u32, got: u32 },
    #[error("payload of {len} bytes does not fit the {max} saved")]
    PayloadTooLong { len: usize, max: usize },
    #[error("shadow log sequence numbers exhausted")]
    SeqExhausted,
    /// The logged indices and the ring's `rsp_prod` contradict each other:
    /// ring-level corruption (a scribbled log header or a guest writing
    /// `rsp_prod`).
    #[error(
        "inconsistent ring indices: rsp_prod {rsp_prod}, logged rsp_prod_pvt {rsp_prod_pvt}, \
         logged req_cons {req_cons}, ring size {size}"
    )]
    BadIndices {
        rsp_prod: u32,
        rsp_prod_pvt: u32,
        req_cons: u32,
        size: u32,
    },
    /// `req_prod` is more than a ring ahead of the recovered `req_cons`.
    #[error("request producer {req_prod} overflows the ring (req_cons {req_cons}, size {size})")]
    RequestOverflow {
        req_prod: u32,
        req_cons: u32,
        size: u32,
    },
    /// The log holds more valid outstanding requests than the ring indices
    /// allow: answering them all would overrun the guest.
    #[error("the log holds {found} outstanding requests but the ring allows {expected}")]
    TooManyOutstanding { expected: u32, found: u32 },
}

impl From<RingError> for ShadowError {
    fn from(e: RingError) -> Self {
        ShadowError::Region(e)
    }
}
