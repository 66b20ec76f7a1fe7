//! One check per fuzz target: the input's invariants, asserted. The fuzz targets call
//! these; the main crate's tests/fuzz_corpus.rs replays the committed corpus through them,
//! so every `cargo test` is a regression run without cargo-fuzz. Paths to the shared
//! helpers are relative (`super::super`): this tree is also compiled inside that test.

pub mod auth_policy;
pub mod config;
pub mod drac_rpc;
pub mod events;
pub mod journal;
pub mod pg_row;
pub mod policy_request;
pub mod policy_rows;
pub mod push_socket;
pub mod scan;
pub mod scan_forge;
pub mod socketmap;
pub mod state_files;
