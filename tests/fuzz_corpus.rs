//! The fuzz targets' committed corpora (fuzz/corpus/TARGET/*) replayed through the same
//! checks the targets assert (fuzz/src/checks), on every `cargo test`: a regression run
//! that needs neither nightly nor cargo-fuzz. `scripts/fuzz` searches for new inputs;
//! what it finds and keeps in the corpus is checked here from then on.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod dovegate_fuzz;

use std::path::Path;

use dovegate_fuzz::checks;

/// Every file of `fuzz/corpus/TARGET` through `check`; how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} breaks an invariant",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "{target}: empty corpus in {}", dir.display());
    n
}

macro_rules! corpus {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            replay(stringify!($name), checks::$name::check);
        }
    )*};
}

corpus!(
    auth_policy,
    config,
    drac_rpc,
    events,
    journal,
    pg_row,
    policy_request,
    policy_rows,
    push_socket,
    scan,
    socketmap,
    state_files,
);

/// scan_forge builds its lines from structured input (no corpus of its own): the scan
/// corpus's bytes, read as forges.
#[test]
fn scan_forge() {
    replay("scan", checks::scan_forge::check_bytes);
}
