//! The `serve` stage: answering MTAs that ask a daemon instead of reading the LMDB map
//! (socketmap), and the optional Prometheus metrics endpoint; `servers` runs both.

pub mod metrics;
pub mod netstring;
pub mod servers;
pub mod socketmap;
