//! The journal source's trust settings (the source is `source::journal`).

/// The trusted fields an entry must carry to be believed.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub units: Vec<String>,
    pub comms: Vec<String>,
    pub exes: Vec<String>,
    pub uids: Vec<u32>,
}
