//! Configuration diagnostics: every problem in a file as one line `FILE:LINE:COLUMN: key:
//! problem`, with the nearest known key suggested for a misspelt one.
//!
//! The file is parsed once more with `toml_edit`, which keeps spans, so that problems found
//! later (a wrong type, a bad value) can still point at the line an administrator must fix.
//! Known keys are those of the embedded default configuration: one list, no second schema.

use std::collections::BTreeMap;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table};

/// Where each key of a user's files stands, by dotted path (`grant.ttl`): the file (the
/// main one or a drop-in) that set it last, line and column.
#[derive(Debug, Clone, Default)]
pub struct Locations {
    origin: String,
    at: BTreeMap<String, (usize, usize, usize)>,
    /// Files, indexed by `at`'s third field.
    origins: Vec<String>,
}

impl Locations {
    /// `origin:line:col: ` for `key` (or its nearest located parent), else `origin: `.
    pub fn prefix(&self, key: &str) -> String {
        let mut k = key.split('[').next().unwrap_or(key).to_string();
        loop {
            if let Some((l, c, o)) = self.at.get(&k) {
                let origin = self.origins.get(*o).unwrap_or(&self.origin);
                return format!("{origin}:{l}:{c}: ");
            }
            match k.rfind('.') {
                Some(i) => k.truncate(i),
                None => return format!("{}: ", self.origin),
            }
        }
    }
}

impl Locations {
    /// The keys `later` (a drop-in read after) sets are located there from now on; the
    /// fallback origin stays the main file's.
    pub fn overlay(&mut self, later: Locations) {
        let base = self.origins.len();
        self.origins.extend(later.origins);
        for (k, (l, c, o)) in later.at {
            self.at.insert(k, (l, c, o + base));
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses `text` for spans. Err: one line per syntax problem.
pub fn locate(text: &str, origin: &str) -> Result<Locations, String> {
    let doc = ImDocument::parse(text.to_string()).map_err(|e| {
        let at = e.span().map_or((1, 1), |s| line_col(text, s.start));
        format!("{origin}:{}:{}: {}", at.0, at.1, one_line(e.message()))
    })?;
    let mut locs = Locations {
        origin: origin.to_string(),
        at: BTreeMap::new(),
        origins: vec![origin.to_string()],
    };
    walk(doc.as_table(), "", text, &mut locs.at);
    Ok(locs)
}

fn walk(
    table: &Table,
    prefix: &str,
    text: &str,
    out: &mut BTreeMap<String, (usize, usize, usize)>,
) {
    for (name, item) in table.iter() {
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        let span: Option<Range<usize>> = table
            .key(name)
            .and_then(|k| k.span())
            .or_else(|| item.span());
        if let Some(s) = span {
            let (l, c) = line_col(text, s.start);
            out.insert(path.clone(), (l, c, 0));
        }
        match item {
            Item::Table(t) => walk(t, &path, text, out),
            Item::Value(toml_edit::Value::InlineTable(t)) => {
                for (k, v) in t.iter() {
                    let p = format!("{path}.{k}");
                    if let Some(s) = t.key(k).and_then(|k| k.span()).or_else(|| v.span()) {
                        let (l, c) = line_col(text, s.start);
                        out.insert(p, (l, c, 0));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Keys of `user` that the default configuration does not have, each as one line with a
/// suggestion. Sections and their keys are checked; the values of a key that holds a table
/// (`serve.socketmap_values`) are free-form.
pub fn unknown_keys(user: &toml::Table, default: &toml::Table, locs: &Locations) -> Vec<String> {
    let all: Vec<String> = default
        .iter()
        .flat_map(|(s, v)| match v {
            toml::Value::Table(t) => t.keys().map(|k| format!("{s}.{k}")).collect(),
            _ => vec![s.clone()],
        })
        .collect();
    let mut out = Vec::new();
    for (section, value) in user {
        let Some(known) = default.get(section) else {
            let hint = suggest(section, default.keys().map(String::as_str));
            out.push(format!(
                "{}{section}: unknown section{hint}",
                locs.prefix(section)
            ));
            continue;
        };
        let (toml::Value::Table(keys), toml::Value::Table(known)) = (value, known) else {
            continue;
        };
        for key in keys.keys() {
            if known.contains_key(key) {
                continue;
            }
            let path = format!("{section}.{key}");
            let mut hint = suggest(key, known.keys().map(String::as_str));
            if hint.is_empty() {
                // Right key, wrong section (`[grant] path = ...`).
                hint = suggest(key, all.iter().map(|k| k.rsplit('.').next().unwrap_or(k)));
                if let Some(full) = all.iter().find(|k| k.ends_with(&format!(".{key}"))) {
                    hint = format!(" (did you mean {full}?)");
                }
            }
            out.push(format!("{}{path}: unknown key{hint}", locs.prefix(&path)));
        }
    }
    out
}

/// ` (did you mean X?)` for the nearest candidate within a small edit distance.
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    candidates
        .map(|c| (distance(word, c), c))
        .filter(|&(d, c)| d <= 2.max(c.len() / 4))
        .min()
        .map_or(String::new(), |(_, c)| format!(" (did you mean {c}?)"))
}

/// Levenshtein distance, with a transposition counting as one edit (`tll` -> `ttl`).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_suggestions() {
        assert_eq!(distance("tll", "ttl"), 1);
        assert_eq!(distance("ttl", "ttl"), 0);
        assert_eq!(
            suggest("tll", ["ttl", "exclude"].into_iter()),
            " (did you mean ttl?)"
        );
        assert_eq!(suggest("zzzzzz", ["ttl"].into_iter()), "");
    }

    #[test]
    fn lines_and_columns() {
        let text = "[grant]\nttl = \"5m\"\n  exclude = []\n";
        let l = locate(text, "f.toml").unwrap();
        assert_eq!(l.prefix("grant.ttl"), "f.toml:2:1: ");
        assert_eq!(l.prefix("grant.exclude[0]"), "f.toml:3:3: ");
        assert_eq!(l.prefix("map.path"), "f.toml: ");
        let e = locate("[grant]\nttl = \n", "f.toml").unwrap_err();
        assert!(e.starts_with("f.toml:2:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
