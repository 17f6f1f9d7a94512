//! The layering rule, checked: the pure core (`limit/`, `crdt/`, the gossip state machine and
//! its codec) imports nothing from the shells and depends on no IO crate, so that it runs
//! the same under the simulator, the fuzzers and production, and takes time only as `now`.
//!
//! `cargo test --release --test layering -- --nocapture` also prints the core's module
//! dependency edges (which top-level module each core file refers to).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The core's files: every `.rs` under these, and these files themselves.
const CORE: &[&str] = &[
    "src/limit",
    "src/crdt",
    "src/gossip/proto",
    "src/gossip/proto.rs",
    "src/gossip/codec.rs",
];

/// Crate modules the core may refer to (`crate::<name>`).
const CORE_MODULES: &[&str] = &["limit", "crdt", "gossip"];

/// Inside `gossip`, the submodules that are core.
const CORE_GOSSIP: &[&str] = &["proto", "codec"];

/// Crates that do IO, read a clock or belong to a shell.
const SHELL_CRATES: &[&str] = &[
    "tokio",
    "quinn",
    "rustls",
    "redis",
    "hyper",
    "axum",
    "tower",
    "reqwest",
    "metrics",
    "tracing",
    "opentelemetry",
    "nix",
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The code of a file without its comments (line comments, doc comments), so that prose
/// naming a shell does not count.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `<prefix>::<ident>` in `code`, as `<ident>`.
fn idents_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let ident: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !ident.is_empty() {
            found.insert(ident);
        }
    }
    found
}

/// One rule broken in a core file.
fn violations(file: &Path, code: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for module in idents_after(code, "crate::") {
        if !CORE_MODULES.contains(&module.as_str()) {
            broken.push(format!("{}: uses crate::{module}", file.display()));
        }
    }
    for sub in idents_after(code, "gossip::") {
        if !CORE_GOSSIP.contains(&sub.as_str()) {
            broken.push(format!("{}: uses gossip::{sub}", file.display()));
        }
    }
    // `super::` from `gossip/proto.rs` and `super::super::` from `gossip/proto/*.rs` name
    // gossip's submodules.
    let in_gossip = file.starts_with("src/gossip");
    if in_gossip {
        let from_proto_root = file == Path::new("src/gossip/proto.rs");
        let prefix = if from_proto_root {
            "super::"
        } else {
            "super::super::"
        };
        for sub in idents_after(code, prefix) {
            let is_shell = ["driver", "quic", "tls", "clock", "log_limit"].contains(&sub.as_str());
            if is_shell {
                broken.push(format!("{}: uses {prefix}{sub}", file.display()));
            }
        }
    }
    for shell in SHELL_CRATES {
        let uses = code.contains(&format!("use {shell}::"))
            || code.contains(&format!("use {shell};"))
            || idents_after(code, &format!("{shell}::"))
                .into_iter()
                .next()
                .is_some();
        if uses {
            broken.push(format!("{}: depends on {shell}", file.display()));
        }
    }
    broken
}

fn core_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).unwrap();
    let mut files = Vec::new();
    for path in CORE {
        rust_files(Path::new(path), &mut files);
    }
    files.sort();
    files
}

#[test]
fn the_pure_core_imports_no_shell() {
    let files = core_files();
    assert!(files.len() > 20, "found only {files:?}");
    let mut broken = Vec::new();
    let mut edges = BTreeSet::new();
    for file in &files {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        broken.extend(violations(file, &code));
        let from = file
            .iter()
            .nth(1)
            .unwrap()
            .to_string_lossy()
            .replace(".rs", "");
        for to in idents_after(&code, "crate::") {
            if to != from {
                edges.insert(format!("{from} -> {to}"));
            }
        }
    }
    eprintln!("core module edges (crate:: references):");
    for edge in &edges {
        eprintln!("  {edge}");
    }
    assert!(
        broken.is_empty(),
        "the core reaches a shell:\n{}",
        broken.join("\n")
    );
}

/// The check itself: a shell import in a core file is caught, prose about one is not.
#[test]
fn a_shell_import_is_caught_and_a_comment_is_not() {
    let file = Path::new("src/limit/lease.rs");
    let bad = code_of("use crate::store::BucketOutcome;\nlet t = tokio::time::Instant::now();");
    assert_eq!(
        violations(file, &bad).len(),
        2,
        "{:?}",
        violations(file, &bad)
    );
    let prose = code_of("/// Unlike `crate::store`, this is pure.\nuse crate::limit::bucket;");
    assert!(violations(file, &prose).is_empty());
    let proto = Path::new("src/gossip/proto/input.rs");
    let driver = code_of("use super::super::driver::Handle;");
    assert_eq!(violations(proto, &driver).len(), 1);
    let sibling = code_of("use super::super::codec::encode;");
    assert!(violations(proto, &sibling).is_empty());
}
