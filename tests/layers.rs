//! The source's layers: every top-level module under `src/` belongs to one layer, and imports
//! only from its own layer and the ones below, so no two modules depend on each other, however
//! indirectly. Read from the `crate::NAME` paths in the source (outside `#[cfg(test)]`).
//!
//! From the bottom:
//! - leaves: what knows nothing of the gateway (hashing, addresses, the HTTP codec, buffers and
//!   bodies, deadlines, key and certificate files).
//! - config: the TOML file, validated into plain data; it imports leaves only.
//! - services: what the request path and the admin use, each with its own types (errors,
//!   metrics, TLS, rate limits, the cache, upstream pools, authentication, the access log).
//! - request: routing, filters, a worker's generation and state, the proxy, accepting.
//! - process: threads and what runs beside the workers (control messages, socket handover,
//!   upgrade, reload, the admin listener, side services, the runtime).
//!
//! A new module goes into the table below, in the lowest layer its imports allow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: [(&str, &[&str]); 5] = [
    (
        "leaves",
        &[
            "hash", "cidr", "stamp", "rng", "trace", "http", "deadline", "buffer", "body",
            "keyset", "pki", "startup",
        ],
    ),
    ("config", &["config"]),
    (
        "services",
        &[
            "error",
            "metrics",
            "tls",
            "ratelimit",
            "cache",
            "upstream",
            "auth",
            "access_log",
        ],
    ),
    (
        "request",
        &[
            "router",
            "filter",
            "generation",
            "worker",
            "proxy",
            "accept",
        ],
    ),
    (
        "process",
        &[
            "control", "handover", "upgrade", "bind", "reload", "admin", "services", "runtime",
        ],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Top-level modules: the files and folders directly under `src/` (but the crate roots).
fn modules() -> BTreeSet<String> {
    std::fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "main.rs" && n != "lib.rs")
        .map(|n| n.trim_end_matches(".rs").to_owned())
        .collect()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module → the other top-level modules it names, with a place for each.
fn imports(modules: &BTreeSet<String>) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for m in modules {
        let mut paths = Vec::new();
        let (dir, file) = (src().join(m), src().join(format!("{m}.rs")));
        if dir.is_dir() {
            files(&dir, &mut paths);
        }
        if file.is_file() {
            paths.push(file);
        }
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap();
            // Test modules may reach anywhere: only the code before one counts.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in code.lines().enumerate() {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    assert!(
                        !line[i + 7..].starts_with('{'),
                        "{}:{}: name each module in its own `use crate::NAME` (this test reads them)",
                        p.display(),
                        n + 1
                    );
                    if &name != m && modules.contains(&name) {
                        out.entry(m.clone())
                            .or_default()
                            .entry(name)
                            .or_insert_with(|| format!("{}:{}", p.display(), n + 1));
                    }
                }
            }
        }
    }
    out
}

fn layer_of(m: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&m))
}

#[test]
fn every_module_is_in_a_layer_and_imports_only_its_own_and_those_below() {
    let modules = modules();
    for m in &modules {
        assert!(
            layer_of(m).is_some(),
            "src/{m}: a new top-level module; put it in tests/layers.rs's LAYERS"
        );
    }
    let mut wrong = Vec::new();
    for (m, names) in imports(&modules) {
        for (name, at) in names {
            let (from, to) = (layer_of(&m).unwrap(), layer_of(&name).unwrap());
            if to > from {
                wrong.push(format!(
                    "{at}: {m} ({}) imports {name} ({})",
                    LAYERS[from].0, LAYERS[to].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports from a layer above:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_modules_depend_on_each_other_however_indirectly() {
    let modules = modules();
    let graph = imports(&modules);
    // Depth-first search for a back edge; the path to it is the cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flat_map(|n| n.keys()) {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("an import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn config_imports_only_leaves() {
    let modules = modules();
    let leaves = LAYERS[0].1;
    for (name, at) in imports(&modules).remove("config").unwrap_or_default() {
        assert!(
            leaves.contains(&name.as_str()),
            "{at}: config imports {name}, which is not a leaf"
        );
    }
}

#[test]
fn the_reader_finds_what_it_should() {
    // Guards the test itself: known imports are seen.
    let graph = imports(&modules());
    assert!(graph["proxy"].contains_key("http"));
    assert!(graph["config"].contains_key("http"));
    assert!(graph["runtime"].contains_key("worker"));
}
