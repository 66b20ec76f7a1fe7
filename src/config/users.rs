//! Who may connect to a server's unix socket: the users a section names (`push.users`,
//! `events.users`, `policy.users`), resolved to uids when the configuration is checked;
//! the servers compare them with the peer's SO_PEERCRED (`net::peers`). One place for
//! every section, so a name resolves the same way everywhere.

use serde::{Deserialize, Serialize};

/// A user allowed to connect: a name (resolved when the configuration is checked) or a
/// uid.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum UserSpec {
    Uid(u32),
    Name(String),
}

/// The uid of a user name.
pub fn uid_of(name: &str) -> Option<u32> {
    let user = nix::unistd::User::from_name(name).ok()??;
    Some(user.uid.as_raw())
}

/// The uids of `users`, names resolved now (a name that is a number is that uid). The
/// error names the entry: `[I]: no user ...`, for the caller to prefix with its key.
pub fn uids_of(users: &[UserSpec]) -> Result<Vec<u32>, String> {
    users
        .iter()
        .enumerate()
        .map(|(i, u)| match u {
            UserSpec::Uid(n) => Ok(*n),
            UserSpec::Name(n) => n.parse::<u32>().ok().or_else(|| uid_of(n)).ok_or_else(|| {
                format!("[{i}]: no user `{n}` on this system (give a name or a uid)")
            }),
        })
        .collect()
}
