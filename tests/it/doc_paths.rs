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
    "docs/OUTBOX.md",
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

/// The README is a newcomer's page (issue #29): the details live in docs/.
#[test]
fn the_readme_is_at_most_300_lines() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = text.lines().count();
    assert!(lines <= 300, "README.md has {lines} lines");
}

/// A heading's anchor as GitHub makes it: lower case, spaces to `-`, other
/// punctuation dropped, `-1`, `-2`… on repeats.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    let mut out = BTreeSet::new();
    for heading in headings(markdown) {
        let slug: String = heading
            .1
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// `(level, text)` of each heading outside code blocks.
fn headings(markdown: &str) -> Vec<(usize, String)> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        let level = line.chars().take_while(|&c| c == '#').count();
        if !in_code && level > 0 && line[level..].starts_with(' ') {
            out.push((level, line[level..].trim().to_owned()));
        }
    }
    out
}

/// The relative links of `markdown`: `(path, anchor)`, path empty for the
/// same file.
fn links(markdown: &str) -> Vec<(String, Option<String>)> {
    markdown
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|target| !target.contains("://") && !target.starts_with("mailto:"))
        .filter(|target| !target.contains(char::is_whitespace))
        .map(|target| match target.split_once('#') {
            Some((path, anchor)) => (path.to_owned(), Some(anchor.to_owned())),
            None => (target.to_owned(), None),
        })
        .collect()
}

/// Every link between the docs lands: on a file that exists and, with an
/// anchor, on a heading of it. A renamed section fails here.
#[test]
fn every_link_in_the_docs_lands_on_a_file_and_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    let docs = DOCS.iter().copied().chain(["clients/typescript/README.md"]);
    for doc in docs {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        let dir = Path::new(doc).parent().unwrap();
        for (path, anchor) in links(&text) {
            checked += 1;
            let target = if path.is_empty() {
                root().join(doc)
            } else {
                root().join(dir).join(&path)
            };
            if !target.exists() {
                broken.push(format!("{doc}: ({path}) does not exist"));
                continue;
            }
            if let Some(anchor) = anchor
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&target).unwrap()).contains(&anchor)
            {
                broken.push(format!("{doc}: ({path}#{anchor}) names no heading"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 50, "only {checked} links found in the docs");
}

/// Every document of docs/ opens with its contents, and they list every
/// section (`##`): a section added without its entry fails here.
#[test]
fn every_document_lists_its_sections_in_its_contents() {
    let mut problems = Vec::new();
    for doc in DOCS.iter().filter(|d| d.starts_with("docs/")) {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        let Some(start) = text.find("Contents") else {
            problems.push(format!("{doc}: no contents"));
            continue;
        };
        let contents: BTreeSet<String> = links(&text[start..])
            .into_iter()
            .filter(|(path, _)| path.is_empty())
            .filter_map(|(_, anchor)| anchor)
            .collect();
        let sections: Vec<String> = headings(&text)
            .into_iter()
            .filter(|(level, text)| *level == 2 && text != "Contents")
            .map(|(_, text)| text)
            .collect();
        let wanted = anchors(&text);
        for section in sections {
            let anchor = anchors(&format!("## {section}"))
                .into_iter()
                .next()
                .unwrap();
            if wanted.contains(&anchor) && !contents.contains(&anchor) {
                problems.push(format!("{doc}: contents lack \"{section}\""));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_link_reader_finds_relative_links_and_anchors() {
    let text = "[a](docs/X.md#b-c) [w](https://x.y/#z) [s](#here) [f](LICENSE-MIT)";
    assert_eq!(
        links(text),
        [
            ("docs/X.md".to_owned(), Some("b-c".to_owned())),
            (String::new(), Some("here".to_owned())),
            ("LICENSE-MIT".to_owned(), None),
        ]
    );
    let anchors =
        anchors("# T\n## Run it: `dev`, (#29)\n```\n## not\n```\n## Run it: `dev`, (#29)\n");
    assert!(anchors.contains("run-it-dev-29"));
    assert!(anchors.contains("run-it-dev-29-1"));
    assert!(!anchors.contains("not"));
}
