//! dovegate: POP/IMAP-before-SMTP for Dovecot and Postfix.
//!
//! A pipeline, one module per stage, data flowing one way:
//! `source` (bytes from log files) -> `scan` (literal prefilter, line boundaries) ->
//! `frame` (timestamp and message) -> `pattern` (versioned Dovecot patterns) ->
//! `grant` (policy: exclusions, canonical IP, expiry) -> `store` (the Postfix LMDB map).
//! `engine` runs the pipeline; `daemon` starts, reloads and stops it (`dovegate run`); `cli`
//! wires the other commands; `setup` is what both share; `telemetry` counts.

pub mod blocks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod drac;
pub mod engine;
pub mod events;
pub mod frame;
pub mod fsread;
pub mod grant;
pub mod model;
pub mod net;
pub mod notify;
pub mod ofd;
pub mod pattern;
pub mod policy;
pub mod postfix;
pub mod push;
pub mod replica;
pub mod scan;
pub mod serve;
pub mod session;
pub mod setup;
pub mod source;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod timefmt;
