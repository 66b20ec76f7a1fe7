//! The `serve` stage: answering MTAs that ask a daemon instead of reading the LMDB map
//! (socketmap), and the optional Prometheus metrics endpoint.

pub mod metrics;
pub mod netstring;
pub mod socketmap;
