//! The trust boundary, derived from the rest of the config: the request headers the gateway
//! vouches for (removed from every client request, set only by the gateway), and warnings for
//! caching routes whose upstream request carries per-client values the cache key does not.

use super::{AuthKind, AuthProvider, Route, TemplatePart};

/// Besides `X-Consumer`, which the codec always knows as one: every JWT provider's
/// `claims_to_headers` target, and every header a route's request transform fills from
/// `${consumer}`, `${client_ip}` or a `${tls_*}` variable. Lower-case, each once.
pub fn identity_headers(auth: &[AuthProvider], routes: &[Route]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        let lower = name.to_ascii_lowercase();
        if lower != "x-consumer" && !names.contains(&lower) {
            names.push(lower);
        }
    };
    for p in auth {
        if let AuthKind::Jwt(settings) = &p.kind {
            for (header, _) in &settings.claims_to_headers {
                add(header);
            }
        }
    }
    for r in routes {
        let Some(t) = &r.request_headers else {
            continue;
        };
        for (name, template) in t.set.iter().chain(&t.add) {
            if template.parts.iter().any(per_client) {
                add(name);
            }
        }
    }
    names
}

/// A template variable whose value is a fact about the client the gateway vouches for.
fn per_client(part: &TemplatePart) -> bool {
    matches!(
        part,
        TemplatePart::Consumer | TemplatePart::ClientIp | TemplatePart::Tls(_)
    )
}

/// Warnings for a caching route whose request transforms send per-client values upstream that
/// its cache key does not hold: the response may depend on them. `${consumer}` is covered by
/// `per_consumer` on a route with `auth`; the others only by a `key_headers` entry naming the
/// header (a deliberate choice to share).
pub fn cache_warnings(r: &Route) -> Vec<String> {
    let (Some(cache), Some(t)) = (&r.cache, &r.request_headers) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, template) in t.set.iter().chain(&t.add) {
        let keyed = cache.key_headers.contains(&name.to_ascii_lowercase());
        for part in &template.parts {
            let covered = match part {
                TemplatePart::Consumer => keyed || (cache.per_consumer && !r.auth.is_empty()),
                p if per_client(p) => keyed,
                _ => true,
            };
            if !covered {
                out.push(format!(
                    "route {:?} caches responses, but its request_headers send {name} from a per-client value the cache key does not hold; a response that depends on it could reach another client (add {name:?} to cache.key_headers to share deliberately{})",
                    r.name,
                    if matches!(part, TemplatePart::Consumer) {
                        ", or keep per_consumer with auth"
                    } else {
                        ""
                    }
                ));
                break;
            }
        }
    }
    out
}
