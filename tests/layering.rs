//! The layering rule, checked: the pure core (`limit/`, `crdt/`, the gossip state machine and
//! its codec) refers to nothing from the shells and to no IO crate, so that it runs the same
//! under the simulator, the fuzzers and production, and takes time only as `now`.
//!
//! The sources are parsed (`syn`), so comments and strings do not count, grouped imports
//! (`use crate::{a, b::c}`) are expanded, and `super`/`self` are resolved from each item's
//! module, inline modules included. `cargo test --release --test layering -- --nocapture`
//! also prints the core's module edges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use syn::visit::{self, Visit};

/// The core's files: every `.rs` under these, and these files themselves.
const CORE: &[&str] = &[
    "src/limit",
    "src/crdt",
    "src/gossip/proto",
    "src/gossip/proto.rs",
    "src/gossip/codec.rs",
];

/// Crate modules the core may refer to, as path prefixes.
const CORE_MODULES: &[&[&str]] = &[
    &["limit"],
    &["crdt"],
    &["gossip", "proto"],
    &["gossip", "codec"],
];

/// Crates that do IO, read a clock or belong to a shell; `tokio` also covers `tokio_util` and
/// the like.
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
    "arc_swap",
];

/// Items of `std` that read a clock, the file system or the network.
const SHELL_STD: &[&[&str]] = &[
    &["std", "time", "Instant"],
    &["std", "time", "SystemTime"],
    &["std", "fs"],
    &["std", "net", "TcpStream"],
    &["std", "net", "UdpSocket"],
    &["std", "net", "TcpListener"],
    &["std", "thread"],
    &["std", "process"],
];

/// The module path of a file under `src/`: `src/gossip/proto/input.rs` is
/// `gossip::proto::input`, `src/limit/mod.rs` is `limit`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix("src").unwrap();
    let mut segments: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    segments
}

/// Every path a file refers to, made absolute where it starts with `crate`, `self` or
/// `super` (`None` module prefix for the rest: external crates and items in scope).
struct Paths {
    module: Vec<String>,
    found: Vec<(bool, Vec<String>)>,
}

impl Paths {
    fn record(&mut self, segments: Vec<String>) {
        let Some(first) = segments.first() else {
            return;
        };
        let absolute = match first.as_str() {
            "crate" => Some(segments[1..].to_vec()),
            "self" => Some([self.module.clone(), segments[1..].to_vec()].concat()),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                let keep = self.module.len().saturating_sub(ups);
                Some([self.module[..keep].to_vec(), segments[ups..].to_vec()].concat())
            }
            _ => None,
        };
        match absolute {
            Some(path) => self.found.push((true, path)),
            None => self.found.push((false, segments)),
        }
    }

    fn expand(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.expand(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.record(prefix.clone()),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.expand(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.expand(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.segments.len() > 1 {
            self.record(path.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        visit::visit_path(self, path);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        // An inline module (`mod tests { .. }`) is one level deeper for `super`.
        self.module.push(item.ident.to_string());
        visit::visit_item_mod(self, item);
        self.module.pop();
    }
}

fn paths_of(file: &Path, source: &str) -> Vec<(bool, Vec<String>)> {
    let ast = syn::parse_file(source).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut paths = Paths {
        module: module_of(file),
        found: Vec::new(),
    };
    paths.visit_file(&ast);
    paths.found
}

fn starts_with(path: &[String], prefix: &[&str]) -> bool {
    path.len() >= prefix.len() && path.iter().zip(prefix).all(|(a, b)| a == b)
}

/// Every rule `source` (the file `file`) breaks.
fn violations(file: &Path, source: &str) -> Vec<String> {
    let mut broken = BTreeSet::new();
    for (absolute, path) in paths_of(file, source) {
        let shown = path.join("::");
        if absolute {
            // A core module's parent alone (`crate::gossip`, as in `use crate::gossip;`) is
            // fine; its shell children are not.
            let core = CORE_MODULES.iter().any(|m| starts_with(&path, m))
                || (path.len() <= 1
                    && CORE_MODULES
                        .iter()
                        .any(|m| path.first() == Some(&m[0].to_owned())));
            if !core {
                broken.insert(format!("{}: refers to crate::{shown}", file.display()));
            }
        } else if let Some(first) = path.first() {
            let shell_crate = SHELL_CRATES
                .iter()
                .any(|c| first == c || first.starts_with(&format!("{c}_")));
            let shell_std = SHELL_STD.iter().any(|p| starts_with(&path, p));
            if shell_crate || shell_std {
                broken.insert(format!("{}: depends on {shown}", file.display()));
            }
        }
    }
    broken.into_iter().collect()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

fn core_files() -> Vec<PathBuf> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    let mut files = Vec::new();
    for path in CORE {
        rust_files(Path::new(path), &mut files);
    }
    files.sort();
    files
}

#[test]
fn the_pure_core_refers_to_no_shell() {
    let files = core_files();
    assert!(files.len() > 20, "found only {files:?}");
    let mut broken = Vec::new();
    let mut edges = BTreeSet::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        broken.extend(violations(file, &source));
        let from = module_of(file)[0].clone();
        for (absolute, path) in paths_of(file, &source) {
            if let Some(to) = path.first().filter(|_| absolute)
                && *to != from
            {
                edges.insert(format!("{from} -> {to}"));
            }
        }
    }
    eprintln!("core module edges:");
    for edge in &edges {
        eprintln!("  {edge}");
    }
    assert!(
        broken.is_empty(),
        "the core reaches a shell:\n{}",
        broken.join("\n")
    );
}

/// The check itself: each way of reaching a shell is caught, and prose about one is not.
#[test]
fn every_way_to_reach_a_shell_is_caught_and_prose_is_not() {
    let lease = Path::new("src/limit/lease.rs");
    let input = Path::new("src/gossip/proto/input.rs");
    let codec = Path::new("src/gossip/codec.rs");
    let caught = |file: &Path, source: &str| violations(file, source).len();
    assert_eq!(caught(lease, "use crate::store::BucketOutcome;"), 1);
    assert_eq!(
        caught(lease, "use crate::{limit::rate::Rate, store::X};"),
        1
    );
    assert_eq!(
        caught(lease, "fn f() { let _ = crate::problem::Problem::new(); }"),
        1
    );
    assert_eq!(caught(lease, "fn f() { tokio::spawn(async {}); }"), 1);
    assert_eq!(caught(lease, "use tokio_util::sync::CancellationToken;"), 1);
    assert_eq!(
        caught(lease, "fn f() { let _ = std::time::Instant::now(); }"),
        1
    );
    assert_eq!(caught(lease, "use std::time::{Duration, SystemTime};"), 1);
    assert_eq!(caught(input, "use super::super::driver::Handle;"), 1);
    assert_eq!(
        caught(input, "use super::super::{codec, driver::Handle};"),
        1
    );
    assert_eq!(caught(input, "use crate::gossip::{driver, proto};"), 1);
    assert_eq!(caught(codec, "use super::quic::Endpoint;"), 1);
    assert_eq!(
        caught(
            input,
            "mod tests { use super::super::super::clock::now_us; }"
        ),
        1
    );
    // What the core may do.
    let fine = [
        "/// Unlike `crate::store`, this is pure. \n use crate::limit::bucket;",
        r#"const URL: &str = "crate::store and tokio::spawn";"#,
        "use super::super::codec::encode; use super::{Gossip, Message};",
        "use std::time::Duration; use std::collections::HashMap;",
        "mod tests { use super::*; use crate::crdt::Actor; }",
    ];
    for source in fine {
        assert!(
            violations(input, source).is_empty(),
            "{source}: {:?}",
            violations(input, source)
        );
    }
}

/// The node a module path belongs to in the crate graph: its top-level module.
fn node_of(path: &[String]) -> Option<String> {
    path.first().cloned()
}

/// Every edge between top-level modules of the library (`src/main.rs` is the binary).
fn crate_edges() -> BTreeSet<(String, String)> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    let mut files = Vec::new();
    rust_files(Path::new("src"), &mut files);
    let mut edges = BTreeSet::new();
    for file in files
        .iter()
        .filter(|f| !f.ends_with("main.rs") && !f.ends_with("lib.rs"))
    {
        let source = std::fs::read_to_string(file).unwrap();
        let Some(from) = node_of(&module_of(file)) else {
            continue;
        };
        for (absolute, path) in paths_of(file, &source) {
            if let Some(to) = node_of(&path).filter(|_| absolute)
                && to != from
            {
                edges.insert((from.clone(), to));
            }
        }
    }
    edges
}

/// The cycles of a graph: its strongly connected components of more than one node.
fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let reaches = |from: &String, to: &String| {
        let mut seen = BTreeSet::from([from]);
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            for (a, b) in edges {
                if a == n && seen.insert(b) {
                    stack.push(b);
                }
            }
        }
        seen.contains(to)
    };
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for n in &nodes {
        if done.contains(*n) {
            continue;
        }
        let component: Vec<String> = nodes
            .iter()
            .filter(|m| reaches(n, m) && reaches(m, n))
            .map(|m| (*m).clone())
            .collect();
        done.extend(component.iter().cloned());
        if component.len() > 1 {
            found.push(component);
        }
    }
    found
}

/// `cargo test --test layering -- --nocapture the_crate` prints the graph.
#[test]
fn the_crate_module_graph_has_no_cycle() {
    let edges = crate_edges();
    assert!(edges.len() > 20, "found only {edges:?}");
    eprintln!("crate module edges (top-level modules of the library):");
    for (from, to) in &edges {
        eprintln!("  {from} -> {to}");
    }
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "modules that depend on each other: {found:?}"
    );
}
