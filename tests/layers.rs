//! The library's floors look down only: each top-level module of `src/` may name, through
//! `crate::`, only the modules below it in `ALLOWED`, the table of docs/architecture.md.
//!
//! A string scan, not a compiler pass: it reads every library source file, drops comments
//! and the inline `#[cfg(test)] mod tests` at a file's end (tests may use test helpers),
//! skips `tests.rs` files and `tests/` folders, and collects the first segment after each
//! `crate::` (in `use crate::{a, b::c}` groups too). `main.rs` and `cli/` are the binary,
//! which sees the library as `grant_agent::`, so they are not scanned.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot read the sources should fail loudly"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Each top-level module and the modules it may import, lowest floors first. A module
/// missing here fails the test, so a new one gets its place in the table.
const ALLOWED: &[(&str, &[&str])] = &[
    ("hex", &[]),
    ("maskinporten", &[]),
    ("process", &[]),
    ("telemetry", &[]),
    ("proto", &[]),
    ("testing", &[]),
    // OCSP and CRLs over a client it is given; knows nothing of keys or config.
    ("fetch", &[]),
    ("revocation", &["fetch"]),
    ("hsm", &["hex"]),
    ("grant", &["maskinporten", "proto"]),
    ("cert", &["grant", "hex"]),
    // hsm owns its settings types (token selector, key locator, PIN source); config
    // parses into them.
    (
        "config",
        &["cert", "grant", "hex", "hsm", "maskinporten", "telemetry"],
    ),
    ("p12", &["cert"]),
    ("agent", &["cert", "config", "grant", "hsm", "revocation"]),
    (
        "admin",
        &["agent", "cert", "config", "grant", "hex", "hsm", "p12"],
    ),
    ("metrics", &["agent", "hsm"]),
    (
        "token",
        &[
            "agent",
            "config",
            "fetch",
            "grant",
            "maskinporten",
            "metrics",
            "telemetry",
        ],
    ),
    ("client", &["agent", "proto"]),
    (
        "server",
        &[
            "agent",
            "cert",
            "config",
            "grant",
            "metrics",
            "process",
            "proto",
            "revocation",
            "telemetry",
            "token",
        ],
    ),
    ("dev", &["config", "hsm"]),
];

#[test]
fn modules_import_only_the_floors_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (module, file) in library_files(&src) {
        let Some(may) = allowed.get(module.as_str()) else {
            wrong.push(format!(
                "{}: module `{module}` is not in ALLOWED",
                file.display()
            ));
            continue;
        };
        let text = fs::read_to_string(&file).expect("read source file");
        for target in crate_references(&code_only(&text)) {
            if target != module && !may.contains(&target.as_str()) {
                wrong.push(format!("{}: `{module}` imports `{target}`", file.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn an_upward_import_is_caught() {
    let text = "use crate::hex;\n// use crate::agent;\nfn f() { crate::server::run(); }\n";
    let found = crate_references(&code_only(text));
    assert_eq!(
        found,
        BTreeSet::from(["hex".to_owned(), "server".to_owned()])
    );
    let grouped = "use crate::{\n    config::{A, B},\n    grant::C,\n    hex,\n};\n";
    let found = crate_references(&code_only(grouped));
    let expected = ["config", "grant", "hex"].map(str::to_owned);
    assert_eq!(found, BTreeSet::from(expected));
}

#[test]
fn the_table_is_ordered_bottom_up() {
    let mut seen = BTreeSet::new();
    for (module, may) in ALLOWED {
        for below in *may {
            assert!(
                seen.contains(below),
                "`{module}` imports `{below}`, listed later"
            );
        }
        assert!(seen.insert(*module), "`{module}` is listed twice");
    }
}

/// Every library source file with its top-level module: `src/x.rs` and `src/x/**` are `x`.
fn library_files(src: &Path) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                if name != "tests" && path != src.join("cli") {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" {
                let relative = path.strip_prefix(src).expect("under src");
                let first = relative.components().next().expect("a component");
                let top = first.as_os_str().to_str().expect("utf-8 name");
                let module = top.trim_end_matches(".rs").to_owned();
                if module != "lib" && module != "main" {
                    files.push((module, path));
                }
            }
        }
    }
    files
}

/// The text without `//` comments (doc comments included) and without the inline test
/// module at the end of the file.
fn code_only(text: &str) -> String {
    let end = text.find("\n#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|line| match line.trim_start().starts_with("//") {
            true => "",
            false => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named after `crate::`, with `crate::{a, b::c}` groups opened.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => found.extend(group_heads(group)),
            None => found.extend(ident(rest)),
        }
    }
    found
}

/// The first identifier of each item in a `{ ... }` group (the text after its `{`).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && !c.is_whitespace() => {
                heads.extend(ident(&group[i..]));
                item_start = false;
            }
            _ => {}
        }
    }
    heads
}

/// The identifier at the start of `text`, if any.
fn ident(text: &str) -> Option<String> {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| text[..end].to_owned())
}
