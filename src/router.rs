//! Route selection. Each worker builds its own `Router` from the config. Precedence, most
//! specific first: exact host, then wildcard hosts (longest suffix first), then routes without a
//! host; within each, exact path, then prefixes from longest to shortest, then regexes in file
//! order; ties go to file order. A route whose methods exclude the request's is skipped; if
//! every route that matched the path was skipped, the answer is 405 with their methods.
//! Hosts compare case-insensitively without the port; paths compare byte for byte, without the
//! query, after the session normalized them (`http::path`).

use std::cell::RefCell;

use ahash::AHashMap;
use regex_automata::meta::{Cache, Regex};
use regex_automata::Input;

use crate::config::{Config, HostMatch, ListenerId, PathMatch, RouteId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    Found(RouteId),
    /// The path matched, but no matching route allows the method; lists the allowed ones.
    MethodNotAllowed(String),
    NotFound,
}

pub struct Router {
    listeners: Vec<HostTable>,
    /// Per route: allowed methods, `None` for any.
    methods: Vec<Option<Vec<Box<[u8]>>>>,
    regexes: Vec<Regex>,
    caches: RefCell<Vec<Cache>>,
}

#[derive(Default)]
struct HostTable {
    exact: AHashMap<Box<[u8]>, PathTable>,
    /// `(".example.com", table)`, longest suffix first.
    suffixes: Vec<(Box<[u8]>, PathTable)>,
    any: PathTable,
}

impl HostTable {
    /// Whether any route on the listener names a host.
    fn by_host(&self) -> bool {
        !self.exact.is_empty() || !self.suffixes.is_empty()
    }
}

#[derive(Default)]
struct PathTable {
    exact: AHashMap<Box<[u8]>, Vec<RouteId>>,
    prefixes: Trie,
    /// `(index into Router::regexes, route)`, in file order.
    regexes: Vec<(usize, RouteId)>,
}

impl PathTable {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.nodes.len() <= 1 && self.regexes.is_empty()
    }
}

/// A byte trie of path prefixes; a node lists the routes whose prefix ends there.
struct Trie {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    routes: Vec<RouteId>,
}

impl Default for Trie {
    fn default() -> Self {
        Trie {
            nodes: vec![TrieNode::default()],
        }
    }
}

/// The most prefix matches one lookup considers; longer chains keep only the longest.
const MAX_PREFIX_MATCHES: usize = 32;

impl Trie {
    fn insert(&mut self, prefix: &[u8], route: RouteId) {
        let mut node = 0usize;
        for &b in prefix {
            let children = &self.nodes[node].children;
            node = match children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => children[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.insert(i, (b, next as u32));
                    next
                }
            };
        }
        self.nodes[node].routes.push(route);
    }

    /// Calls `f` with the route lists of every prefix of `path`, longest first.
    fn matches(&self, path: &[u8], mut f: impl FnMut(&[RouteId]) -> bool) -> bool {
        let mut found = [0u32; MAX_PREFIX_MATCHES];
        let mut n = 0usize;
        let mut node = 0usize;
        let mut depth = 0;
        loop {
            if !self.nodes[node].routes.is_empty() {
                found[n % MAX_PREFIX_MATCHES] = node as u32;
                n += 1;
            }
            let Some(&b) = path.get(depth) else { break };
            let children = &self.nodes[node].children;
            match children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => node = children[i].1 as usize,
                Err(_) => break,
            }
            depth += 1;
        }
        let kept = n.min(MAX_PREFIX_MATCHES);
        (0..kept).any(|k| {
            let idx = (n - 1 - k) % MAX_PREFIX_MATCHES;
            f(&self.nodes[found[idx] as usize].routes)
        })
    }
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut listeners: Vec<HostTable> = (0..config.listeners.len())
            .map(|_| HostTable::default())
            .collect();
        let mut regexes = Vec::new();
        let mut methods = Vec::with_capacity(config.routes.len());
        for (i, route) in config.routes.iter().enumerate() {
            let id = RouteId(i as u16);
            let hosts = &mut listeners[usize::from(route.listener.0)];
            let table = match &route.host {
                HostMatch::Any => &mut hosts.any,
                HostMatch::Exact(h) => hosts.exact.entry(h.as_bytes().into()).or_default(),
                HostMatch::Suffix(s) => {
                    let pos = match hosts
                        .suffixes
                        .iter()
                        .position(|(k, _)| **k == *s.as_bytes())
                    {
                        Some(pos) => pos,
                        None => {
                            hosts
                                .suffixes
                                .push((s.as_bytes().into(), PathTable::default()));
                            hosts.suffixes.len() - 1
                        }
                    };
                    &mut hosts.suffixes[pos].1
                }
            };
            match &route.path {
                PathMatch::Exact(p) => table.exact.entry(p.as_bytes().into()).or_default().push(id),
                PathMatch::Prefix(p) => table.prefixes.insert(p.as_bytes(), id),
                PathMatch::Regex(r) => {
                    // Validated when the config was loaded.
                    let re = Regex::new(r).expect("path_regex validated at load");
                    table.regexes.push((regexes.len(), id));
                    regexes.push(re);
                }
            }
            methods.push(
                route
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|s| s.as_bytes().into()).collect()),
            );
        }
        for hosts in &mut listeners {
            hosts
                .suffixes
                .sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        }
        let caches = RefCell::new(regexes.iter().map(Regex::create_cache).collect());
        Router {
            listeners,
            methods,
            regexes,
            caches,
        }
    }

    /// Finds the route for a request. `host` is the Host value as sent (any case, any port).
    pub fn route(
        &self,
        listener: ListenerId,
        host: Option<&[u8]>,
        path: &[u8],
        method: &[u8],
    ) -> RouteMatch {
        let Some(hosts) = self.listeners.get(usize::from(listener.0)) else {
            return RouteMatch::NotFound;
        };
        let path = match path.iter().position(|&b| b == b'?') {
            Some(q) => &path[..q],
            None => path,
        };
        let mut lower = [0u8; 256];
        // Without host-specific routes the Host value decides nothing: not even lower-cased.
        let host = host
            .filter(|_| hosts.by_host())
            .and_then(|h| normalize_host(h, &mut lower));

        let mut path_matched = false;
        let mut found = None;
        self.for_each_table(hosts, host, |table| {
            self.candidates(table, path, |routes| {
                for &id in routes {
                    path_matched = true;
                    if self.allows(id, method) {
                        found = Some(id);
                        return true;
                    }
                }
                false
            })
        });
        match (found, path_matched) {
            (Some(id), _) => RouteMatch::Found(id),
            (None, true) => RouteMatch::MethodNotAllowed(self.allowed_methods(hosts, host, path)),
            (None, false) => RouteMatch::NotFound,
        }
    }

    fn allows(&self, id: RouteId, method: &[u8]) -> bool {
        match &self.methods[usize::from(id.0)] {
            None => true,
            Some(list) => list.iter().any(|m| **m == *method),
        }
    }

    /// The `Allow` value for a 405: every method of every route that matched the path.
    fn allowed_methods(&self, hosts: &HostTable, host: Option<&[u8]>, path: &[u8]) -> String {
        let mut allow: Vec<&[u8]> = Vec::new();
        self.for_each_table(hosts, host, |table| {
            self.candidates(table, path, |routes| {
                for &id in routes {
                    for m in self.methods[usize::from(id.0)].iter().flatten() {
                        if !allow.contains(&&**m) {
                            allow.push(m);
                        }
                    }
                }
                false
            })
        });
        allow
            .iter()
            .map(|m| String::from_utf8_lossy(m))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Visits the path tables that apply to `host`, most specific first, until `f` says stop.
    fn for_each_table(
        &self,
        hosts: &HostTable,
        host: Option<&[u8]>,
        mut f: impl FnMut(&PathTable) -> bool,
    ) {
        if let Some(host) = host {
            if let Some(t) = hosts.exact.get(host) {
                if f(t) {
                    return;
                }
            }
            for (suffix, t) in &hosts.suffixes {
                if host.len() > suffix.len() && host.ends_with(suffix) && f(t) {
                    return;
                }
            }
        }
        if !hosts.any.is_empty() {
            f(&hosts.any);
        }
    }

    /// Calls `f` with route lists matching `path` in precedence order until it returns true.
    fn candidates(
        &self,
        table: &PathTable,
        path: &[u8],
        mut f: impl FnMut(&[RouteId]) -> bool,
    ) -> bool {
        if let Some(routes) = table.exact.get(path) {
            if f(routes) {
                return true;
            }
        }
        if table.prefixes.matches(path, &mut f) {
            return true;
        }
        if table.regexes.is_empty() {
            return false;
        }
        let mut caches = self.caches.borrow_mut();
        for &(re, id) in &table.regexes {
            let input = Input::new(path).earliest(true);
            if self.regexes[re]
                .search_half_with(&mut caches[re], &input)
                .is_some()
                && f(&[id])
            {
                return true;
            }
        }
        false
    }
}

/// Lower-cases `host` without its port into `out`; `None` if it cannot be a route's host.
fn normalize_host<'a>(host: &[u8], out: &'a mut [u8; 256]) -> Option<&'a [u8]> {
    let name = if host.first() == Some(&b'[') {
        let end = host.iter().position(|&b| b == b']')?;
        &host[..=end]
    } else {
        match host.iter().position(|&b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > out.len() {
        return None;
    }
    let out = &mut out[..name.len()];
    out.copy_from_slice(name);
    out.make_ascii_lowercase();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(routes: &str) -> Router {
        let src = format!(
            "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:9\"]\n{routes}"
        );
        Router::new(&crate::config::parse(Path::new("t.toml"), &src).unwrap())
    }

    fn route(name: &str, extra: &str) -> String {
        format!("[[routes]]\nname = \"{name}\"\nlistener = \"l\"\nupstream = \"u\"\n{extra}\n")
    }

    fn find(r: &Router, host: &str, path: &str, method: &str) -> RouteMatch {
        r.route(
            ListenerId(0),
            Some(host.as_bytes()),
            path.as_bytes(),
            method.as_bytes(),
        )
    }

    #[test]
    fn precedence() {
        let r = router(
            &[
                route("regex", "path_regex = \"^/api/v[0-9]+\""),
                route("short", "path_prefix = \"/api/\""),
                route("long", "path_prefix = \"/api/v1/\""),
                route("exact", "path = \"/api/v1/users\""),
                route("host", "host = \"a.example.com\"\npath_prefix = \"/\""),
                route("wild", "host = \"*.example.com\"\npath_prefix = \"/api/\""),
            ]
            .concat(),
        );
        let id = |n: u16| RouteMatch::Found(RouteId(n));
        assert_eq!(find(&r, "x", "/api/v1/users", "GET"), id(3));
        assert_eq!(find(&r, "x", "/api/v1/users?x=1", "GET"), id(3));
        assert_eq!(find(&r, "x", "/api/v1/other", "GET"), id(2));
        assert_eq!(find(&r, "x", "/api/v2", "GET"), id(1));
        assert_eq!(find(&r, "x", "/apiv2", "GET"), RouteMatch::NotFound);
        assert_eq!(
            find(&r, "A.Example.com:8080", "/api/v1/users", "GET"),
            id(4)
        );
        assert_eq!(find(&r, "b.example.com", "/api/v1/users", "GET"), id(5));
        assert_eq!(
            find(&r, "b.example.com", "/other", "GET"),
            RouteMatch::NotFound
        );
        assert_eq!(find(&r, "example.com", "/api/v1/users", "GET"), id(3));
    }

    #[test]
    fn methods_fall_through_then_405() {
        let r = router(
            &[
                route("get", "path_prefix = \"/a\"\nmethods = [\"GET\", \"HEAD\"]"),
                route("post", "path_prefix = \"/a\"\nmethods = [\"POST\"]"),
            ]
            .concat(),
        );
        assert_eq!(find(&r, "x", "/a", "POST"), RouteMatch::Found(RouteId(1)));
        assert_eq!(
            find(&r, "x", "/a", "DELETE"),
            RouteMatch::MethodNotAllowed("GET, HEAD, POST".into())
        );
    }

    #[test]
    fn file_order_breaks_ties() {
        let r = router(
            &[
                route("first", "path_prefix = \"/\""),
                route("second", "path_prefix = \"/\""),
            ]
            .concat(),
        );
        assert_eq!(find(&r, "x", "/", "GET"), RouteMatch::Found(RouteId(0)));
    }
}
