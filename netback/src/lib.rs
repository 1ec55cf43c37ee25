//! placeholder: the network backend is not built yet
//! (docs/ARCHITECTURE.md §9).

#![forbid(unsafe_code)]

pub mod netif;
pub mod record;
