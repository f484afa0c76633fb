//! The import graph between the crate's top-level modules has no circle,
//! and every import runs down the layers of docs/ARCHITECTURE.md ("Layers").
//!
//! Reads `src/` as text: every `crate::a::...` path (and each name in
//! `use crate::{a, b}`) in a file of module `m` is an edge `m → a`.
//! Comments are skipped; the crate root's re-exports (`crate::Gateway`,
//! `crate::Config`) count as their modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top to bottom. An import may point within its layer or to a lower one;
/// circles are refused within a layer too.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["gateway"],
    &["http"],
    &["connection"],
    &[
        "dispatcher",
        "drain",
        "outbox",
        "sectors",
        "revocation",
        "acks",
        "presence",
    ],
    &["hub"],
    &["broker"],
    &[
        "auth",
        "channel",
        "event",
        "metrics",
        "config",
        "close",
        "reply",
        "drop_rate",
        "unknown_types",
        "tls",
        "postgres",
    ],
];

/// Imports allowed to run up the layers (at most one, each said why).
const UPWARD: &[(&str, &str)] = &[];

/// Not checked: `bench` is the load generator, on its way to a crate of its
/// own; `lib` and `main` are the roots.
const IGNORED: &[&str] = &["bench", "lib", "main"];

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn the_module_graph_has_no_circle_and_runs_down_the_layers() {
    let graph = read_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let layer_of = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    for module in graph.keys() {
        assert!(
            layer_of(module).is_some(),
            "module `{module}` is in no layer: add it to LAYERS here and in docs/ARCHITECTURE.md"
        );
    }
    assert!(UPWARD.len() <= 1, "at most one upward import");
    let mut upward = Vec::new();
    for (from, tos) in &graph {
        for to in tos {
            if let (Some(a), Some(b)) = (layer_of(from), layer_of(to))
                && b < a
                && !UPWARD.contains(&(from.as_str(), to.as_str()))
            {
                upward.push(format!("{from} → {to}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports up the layers: {upward:?}");
    if let Some(circle) = find_circle(&graph) {
        panic!("import circle: {}", circle.join(" → "));
    }
}

#[test]
fn the_check_finds_circles_and_reads_grouped_imports() {
    let mut graph = Graph::new();
    fn edge(graph: &mut Graph, a: &str, b: &str) {
        graph.entry(a.into()).or_default().insert(b.into());
    }
    edge(&mut graph, "gateway", "http");
    edge(&mut graph, "http", "connection");
    edge(&mut graph, "connection", "hub");
    assert_eq!(find_circle(&graph), None);
    edge(&mut graph, "connection", "gateway");
    let circle = find_circle(&graph).expect("a circle");
    assert_eq!(circle.first(), circle.last());
    assert!(circle.contains(&"http".to_owned()) && circle.len() == 4);

    let text = "use crate::{hub::{Hub, Member}, metrics::Metrics};\n\
                // use crate::gateway::Shared;\n\
                let s = \"http://x\"; crate::Gateway::new(c);\n\
                /* crate::http */ x(crate::close::GOING_AWAY);";
    let found: Vec<_> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["close", "gateway", "hub", "metrics"]);
}

fn read_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    assert!(files.len() > 20, "read {} files from {src:?}", files.len());
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs").to_owned();
        if IGNORED.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let targets = graph.entry(module.clone()).or_default();
        for target in crate_paths(&text) {
            if target != module && !IGNORED.contains(&target.as_str()) {
                targets.insert(target);
            }
        }
    }
    graph
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules named by `crate::` paths in `text`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = strip_comments(text);
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let preceded = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `{a::x, b, c::{y, z}}`: the first name of each item at depth 1.
            let mut depth = 1;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && depth == 1 && !c.is_whitespace() => {
                        item_start = false;
                        found.insert(module_name(ident(&group[j..])));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(module_name(ident(rest)));
        }
    }
    found.remove("");
    found
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The crate root's re-exports, as their modules.
fn module_name(name: &str) -> String {
    match name {
        "Gateway" => "gateway".into(),
        "Config" => "config".into(),
        other => other.into(),
    }
}

/// `text` without `//` and `/* */` comments; string literals are kept.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for n in chars.by_ref() {
                    if last == '*' && n == '/' {
                        break;
                    }
                    last = n;
                }
            }
            // A char literal such as '"' does not open a string.
            ('\'', _) => {
                out.push(c);
                let ahead: String = chars.clone().take(3).collect();
                if ahead.starts_with("\"'") || ahead.starts_with("\\\"'") {
                    for _ in 0..ahead.find('\'').unwrap() + 1 {
                        out.push(chars.next().unwrap());
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// A circle, as its modules from one back to itself, if there is one.
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut circle = path[start..].to_vec();
                circle.push(node.to_owned());
                return Some(circle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, marks, path) {
                return Some(circle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}
