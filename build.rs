//! Build steps:
//! - embed every `patterns/*.toml` file in the binary (`$OUT_DIR/embedded_patterns.rs`);
//! - refuse to build against anything but the system liblmdb. Postfix reads the map with
//!   Debian's liblmdb; lmdb-rkv-sys silently compiles its bundled copy when pkg-config
//!   cannot find `liblmdb` (Debian names it `lmdb`). The shim in `build-support/pkgconfig`
//!   maps one name to the other; this check turns a missing `liblmdb-dev` into a clear error.
use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=patterns");
    if let Err(e) = pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("lmdb")
    {
        panic!("dovegate links the system liblmdb, which pkg-config cannot find ({e}); install it with: apt-get install liblmdb-dev pkg-config");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("patterns");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("patterns/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    let mut out = String::from("/// Pattern files embedded at build time: (file name, text).\npub const EMBEDDED: &[(&str, &str)] = &[\n");
    for n in &names {
        let path = dir.join(n);
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(
            out,
            "    ({n:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded_patterns.rs");
    std::fs::write(dest, out).expect("write embedded_patterns.rs");
}
