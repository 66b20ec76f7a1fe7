//! Who may connect to a server's unix socket: the uids the configuration resolved
//! (`config::users`), compared with the peer's SO_PEERCRED by each server.

pub use crate::config::users::{uid_of, uids_of, UserSpec};
