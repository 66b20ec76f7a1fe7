//! ARCHITECTURE.md's layer table is the rule: a module imports only modules of its own
//! layer or of a layer above it in the table (upstream), and no two modules import each
//! other (directly or around a loop). This test reads the table and the sources, so a new
//! module must be placed in the table, and an import against the flow fails here rather
//! than in a reviewer's reading.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The table's rows in order: (layer, its modules).
fn layers(architecture: &str) -> Vec<(String, Vec<String>)> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in architecture.lines() {
        if line.starts_with("| layer |") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || cells[1].starts_with("---") {
            continue;
        }
        // Only the module column's own top-level names: `model`, not `model::address`.
        let modules = cells[2]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .map(str::to_string)
            .collect();
        rows.push((cells[1].to_string(), modules));
    }
    rows
}

/// The top-level modules of the crate (src/X.rs or src/X/), but `main`.
fn top_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let m = name.strip_suffix(".rs").unwrap_or(&name).to_string();
            (m != "main" && m != "lib").then_some(m)
        })
        .collect()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if path.is_file() && path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The crate modules `module`'s non-test code names (`crate::X`). Unit tests sit at the end
/// of a file after `#[cfg(test)]`; what they import is not the module's dependency.
fn imports(src: &Path, module: &str) -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&src.join(format!("{module}.rs")), &mut files);
    rust_files(&src.join(module), &mut files);
    let mut found = BTreeSet::new();
    for f in files {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        let code = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        // Comments may name any module (`crate::drac` serves them); only code imports.
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for part in code.split("crate::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn modules_import_only_upstream_and_never_in_a_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let table = layers(&std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap());
    assert!(table.len() >= 5, "ARCHITECTURE.md's layer table not found");
    let mut layer_of: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (_, modules)) in table.iter().enumerate() {
        for m in modules {
            if let Some(before) = layer_of.insert(m.clone(), i) {
                assert_eq!(before, i, "`{m}` is in two rows of the layer table");
            }
        }
    }
    let modules = top_modules(&src);
    let unplaced: Vec<&String> = modules
        .iter()
        .filter(|m| !layer_of.contains_key(*m))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from ARCHITECTURE.md's layer table: {unplaced:?}"
    );
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| {
            let deps = imports(&src, m)
                .into_iter()
                .filter(|d| modules.contains(d))
                .collect();
            (m.clone(), deps)
        })
        .collect();
    let mut against = Vec::new();
    for (m, deps) in &graph {
        for d in deps {
            if layer_of[d] > layer_of[m] {
                against.push(format!(
                    "{m} ({}) imports {d} ({}), downstream of it",
                    table[layer_of[m]].0, table[layer_of[d]].0
                ));
            }
        }
    }
    assert!(against.is_empty(), "{}", against.join("\n"));
    // A loop: a module that reaches itself through others.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = graph[start]
            .iter()
            .map(|d| (d.clone(), vec![start.clone(), d.clone()]))
            .collect();
        while let Some((m, path)) = stack.pop() {
            assert!(&m != start, "import loop: {}", path.join(" -> "));
            if seen.insert(m.clone()) {
                for d in &graph[&m] {
                    let mut p = path.clone();
                    p.push(d.clone());
                    stack.push((d.clone(), p));
                }
            }
        }
    }
}
