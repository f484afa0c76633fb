//! Every file or folder the documentation names exists: a renamed or
//! deleted module, test or script fails here, not in a reader's hands.
//!
//! A name is a backticked word that looks like a path (a known file
//! extension, or a trailing `/`). One that starts at a top folder of the
//! repository (`src/`, `tests/`, ...) must exist exactly there; a shorter one
//! (`hub/audience.rs`, `resume.rs`, read in its section's context) must be
//! the end of some path in the repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const DOCS: &[&str] = &[
    "README.md",
    "docs/ARCHITECTURE.md",
    "docs/CONFIGURATION.md",
    "docs/OPERATING.md",
    "docs/POSTGRES.md",
    "docs/REDIS.md",
    "docs/RESUME.md",
    "docs/TESTING.md",
    "docs/USAGE.md",
    "docs/PROTOCOL.md",
    "BENCHMARKS.md",
];

const EXTENSIONS: &[&str] = &[
    ".rs", ".md", ".sh", ".lua", ".sql", ".toml", ".yml", ".yaml", ".json", ".html", ".ts", ".js",
    ".mjs",
];

/// Folders a repository path starts with.
const TOP: &[&str] = &[
    "src/", "tests/", "docs/", "scripts/", "bench/", "fuzz/", "clients/", ".ci/",
];

/// Folders that hold no documented source.
const SKIPPED: &[&str] = &["target", ".git", "node_modules", "dist"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file and folder of the repository, relative to its root, with `/`.
fn repository_paths() -> BTreeSet<String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if SKIPPED.contains(&name.as_str()) {
                continue;
            }
            let path = format!("{rel}{name}");
            if entry.file_type().unwrap().is_dir() {
                out.insert(format!("{path}/"));
                walk(&entry.path(), &format!("{path}/"), out);
            } else {
                out.insert(path);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root(), "", &mut out);
    out
}

/// The backticked words of `text` that name a file or folder.
fn named_paths(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && !w.contains(char::is_whitespace))
        // URLs, absolute paths, HTTP routes, `.await` and the like.
        .filter(|w| {
            !w.contains(':') && !w.starts_with('/') && !w.starts_with('.') || w.starts_with(".ci/")
        })
        .filter(|w| !w.contains(['*', '{', '<', '$', '=', '?']))
        // Build output, made by the commands the docs give.
        .filter(|w| !w.starts_with("target/"))
        .filter(|w| w.ends_with('/') || EXTENSIONS.iter().any(|e| w.ends_with(e)))
        .map(str::to_owned)
        .collect()
}

fn exists(name: &str, paths: &BTreeSet<String>) -> bool {
    let name = name.strip_prefix("./").unwrap_or(name);
    if TOP.iter().any(|t| name.starts_with(t)) {
        return paths.contains(name);
    }
    paths
        .iter()
        .any(|p| p == name || p.ends_with(&format!("/{name}")))
}

#[test]
fn every_path_the_docs_name_exists() {
    let paths = repository_paths();
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in DOCS {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        for name in named_paths(&text) {
            checked += 1;
            if !exists(&name, &paths) {
                missing.push(format!("{doc}: `{name}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs name paths that do not exist:\n{}",
        missing.join("\n")
    );
    // The check reads what it should: the map names dozens of files.
    assert!(checked > 50, "only {checked} paths found in the docs");
}

/// The map stays a five-minute read (issue #16): past this, cut it, and
/// leave the details to the module docs.
#[test]
fn the_architecture_map_is_at_most_250_lines() {
    let text = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let lines = text.lines().count();
    assert!(lines <= 250, "docs/ARCHITECTURE.md has {lines} lines");
}

#[test]
fn the_path_reader_finds_paths_and_only_paths() {
    let text = "see `src/hub/mod.rs`, `hub/` and `resume.rs`; not `.await`, \
                `/ws/waiter`, `http://x/y.json`, `a b.rs`, `{id}.rs` or `Cargo.lock`";
    assert_eq!(named_paths(text), ["src/hub/mod.rs", "hub/", "resume.rs"]);
    let paths = repository_paths();
    assert!(exists("src/hub/mod.rs", &paths));
    assert!(exists("hub/audience.rs", &paths));
    assert!(
        !exists("src/audience.rs", &paths),
        "a top path must be exact"
    );
    assert!(!exists("nowhere.rs", &paths));
}
