//! placeholder: the network backend is not built yet
//! (docs/ARCHITECTURE.md §9).

#![deny(unsafe_code)]

pub mod wire;
