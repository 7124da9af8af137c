//! The layers point one way: reads the crate's own sources and fails when a module imports
//! one it must not (the wire layer the hub, the hub the services, the domain modules the web
//! layer...) or when the modules import each other in a circle. The application's root
//! (`AppState`, built in `lib.rs`) is the composition root: the services, the workspace
//! functions and the web layer receive it, and it is left out of the circle check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level modules and the modules each must never import (space-separated; `*`: none at
/// all). Every module below the web and service layers is kept from them and from the root.
const FORBIDDEN: &[(&str, &str)] = &[
    ("ids", "*"),
    ("latency", "*"),
    ("options", "*"),
    ("memory", "*"),
    ("logging", "*"),
    ("store", "auth rpc hub http services workspace cluster lib"),
    ("auth", "rpc hub http services workspace cluster lib"),
    ("rpc", "hub http services workspace cluster error lib"),
    ("turn", "rpc hub http services workspace lib"),
    ("net", "hub http services workspace lib"),
    ("registry", "hub http services workspace cluster lib"),
    ("cluster", "hub http services workspace lib"),
    ("hub", "http services workspace lib"),
    ("demo", "hub http services workspace lib"),
    ("error", "hub http services workspace lib"),
];

/// Modules allowed to use the root (`crate::AppState` and the like).
const ROOT_USERS: &[&str] = &["http", "services", "workspace", "config", "admin"];

fn module_of(path: &Path, src: &Path) -> String {
    let relative = path.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_string_lossy().to_string();
    name.trim_end_matches(".rs").to_string()
}

/// `crate::x` references in code (comments left out), as the module names they reach.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) || name.is_empty() {
                found.insert("lib".to_string());
            } else {
                found.insert(name);
            }
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_layers_point_one_way_and_there_are_no_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(file, &src);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        for target in imports(&text) {
            if target != module {
                edges.insert(target);
            }
        }
    }
    let mut wrong = Vec::new();
    for (module, edges) in &graph {
        if let Some((_, forbidden)) = FORBIDDEN.iter().find(|(m, _)| m == module) {
            let forbidden: Vec<&str> = forbidden.split_whitespace().collect();
            for target in edges {
                if forbidden.contains(&"*") || forbidden.contains(&target.as_str()) {
                    wrong.push(format!("{module} imports {target}"));
                }
            }
        }
        if edges.contains("lib") && !ROOT_USERS.contains(&module.as_str()) {
            wrong.push(format!("{module} uses the application root"));
        }
    }
    assert!(wrong.is_empty(), "layer violations: {wrong:#?}");

    // No circles among the modules (the root left out).
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if next == "lib" {
                continue;
            }
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let circle = visit(module, &graph, &mut Vec::new(), &mut done);
        assert!(
            circle.is_none(),
            "the modules import each other in a circle: {circle:?}"
        );
    }
}

#[test]
fn the_check_sees_imports() {
    let found = imports("use crate::hub::Hub; // crate::ignored\nlet x = crate::AppState;");
    assert!(found.contains("hub") && found.contains("lib") && !found.contains("ignored"));
}
