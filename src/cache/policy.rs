//! What RFC 9111 lets a shared cache do with a request and a response: whether a response may
//! be stored, for how long it is fresh, and what a request asks of the cache.

use std::time::{Duration, SystemTime};

use crate::config::Implicit;
use crate::http::list_items;

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    /// RFC 5861: how long past freshness a stale response may answer when the origin fails.
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
}

impl CacheControl {
    /// Folds one `Cache-Control` (or `Pragma`) field value into `self`.
    pub fn add(&mut self, value: &[u8]) {
        for item in list_items(value) {
            let (name, arg) = match item.iter().position(|&b| b == b'=') {
                Some(eq) => (&item[..eq], Some(item[eq + 1..].trim_ascii())),
                None => (item, None),
            };
            let seconds = || {
                let arg = arg?;
                let arg = arg
                    .strip_prefix(b"\"")
                    .and_then(|a| a.strip_suffix(b"\""))
                    .unwrap_or(arg);
                std::str::from_utf8(arg).ok()?.parse::<u64>().ok()
            };
            let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
            if is("no-store") {
                self.no_store = true;
            } else if is("no-cache") {
                // `no-cache="field"` qualifies only fields; treating it as plain no-cache errs safe.
                self.no_cache = true;
            } else if is("private") {
                self.private = true;
            } else if is("public") {
                self.public = true;
            } else if is("must-revalidate") {
                self.must_revalidate = true;
            } else if is("proxy-revalidate") {
                self.proxy_revalidate = true;
            } else if is("max-age") {
                self.max_age = seconds().or(Some(0));
            } else if is("s-maxage") {
                self.s_maxage = seconds().or(Some(0));
            } else if is("only-if-cached") {
                self.only_if_cached = true;
            } else if is("stale-while-revalidate") {
                self.stale_while_revalidate = seconds();
            } else if is("stale-if-error") {
                self.stale_if_error = seconds();
            }
        }
    }
}

/// Whether a targeted cache-control value (`CDN-Cache-Control`, RFC 9213) is a valid Structured
/// Field dictionary (RFC 8941) whose delta directives are integers: an invalid one is ignored
/// whole. Member parameters (`;...`) are allowed and not examined.
pub fn targeted_valid(value: &[u8]) -> bool {
    const DELTAS: [&[u8]; 4] = [
        b"max-age",
        b"s-maxage",
        b"stale-while-revalidate",
        b"stale-if-error",
    ];
    let key_ok = |k: &[u8]| {
        k.first()
            .is_some_and(|&c| c.is_ascii_lowercase() || c == b'*')
            && k.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(&c))
    };
    let integer = |v: &[u8]| {
        let digits = v.strip_prefix(b"-").unwrap_or(v);
        (1..=15).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
    };
    let bare_item = |v: &[u8]| {
        let token = v
            .first()
            .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'*')
            && v.iter()
                .all(|&c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c));
        let string = v.len() >= 2 && v.starts_with(b"\"") && v.ends_with(b"\"");
        let decimal = v
            .iter()
            .all(|&c| c.is_ascii_digit() || c == b'.' || c == b'-');
        integer(v) || token || string || decimal || v == b"?0" || v == b"?1"
    };
    value.split(|&b| b == b',').all(|member| {
        let member = member.trim_ascii();
        let item = member.split(|&b| b == b';').next().unwrap_or_default();
        match item.iter().position(|&b| b == b'=') {
            None => key_ok(item),
            Some(eq) => {
                let (key, v) = (&item[..eq], &item[eq + 1..]);
                key_ok(key)
                    && if DELTAS.contains(&key) {
                        integer(v)
                    } else {
                        bare_item(v)
                    }
            }
        }
    })
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1, "heuristically
/// cacheable").
pub fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The facts about a response that decide whether and how it is stored.
pub struct ResponseFacts<'a> {
    pub status: u16,
    pub cc: &'a CacheControl,
    pub expires: Option<SystemTime>,
    pub date: Option<SystemTime>,
    pub last_modified: Option<SystemTime>,
    pub has_set_cookie: bool,
    pub vary_star: bool,
    pub request_has_authorization: bool,
}

/// Whether a shared cache may store the response (RFC 9111 §3).
pub fn storable(f: &ResponseFacts<'_>) -> bool {
    if f.cc.no_store || f.cc.private || f.has_set_cookie || f.vary_star {
        return false;
    }
    // §3.5: a response to an authorized request only with explicit permission.
    if f.request_has_authorization
        && !(f.cc.public || f.cc.s_maxage.is_some() || f.cc.must_revalidate)
    {
        return false;
    }
    let explicit = f.cc.s_maxage.is_some() || f.cc.max_age.is_some() || f.expires.is_some();
    match f.status {
        206 | 304 | 100..=199 => false,
        s if heuristically_cacheable(s) => true,
        _ => explicit || f.cc.public,
    }
}

/// How long the response is fresh (RFC 9111 §4.2.1), with `implicit` when it says nothing.
pub fn freshness(f: &ResponseFacts<'_>, implicit: Implicit) -> Duration {
    if f.cc.no_cache {
        return Duration::ZERO;
    }
    if let Some(s) = f.cc.s_maxage.or(f.cc.max_age) {
        return Duration::from_secs(s);
    }
    let date = f.date.unwrap_or_else(SystemTime::now);
    if let Some(expires) = f.expires {
        return expires.duration_since(date).unwrap_or(Duration::ZERO);
    }
    match (implicit.heuristic_percent, f.last_modified) {
        (Some(percent), Some(modified)) if heuristically_cacheable(f.status) => {
            let since = date.duration_since(modified).unwrap_or(Duration::ZERO);
            (since * percent / 100).min(implicit.ttl)
        }
        _ => implicit.ttl,
    }
}

/// What a request asks of the cache (RFC 9111 §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestDirectives {
    /// Do not store the response (and do not answer from the cache).
    pub no_store: bool,
    /// Do not answer from the cache without revalidating.
    pub revalidate: bool,
    /// Answer from the cache or not at all (504).
    pub only_if_cached: bool,
}

pub fn request_directives(cc: &CacheControl) -> RequestDirectives {
    RequestDirectives {
        no_store: cc.no_store,
        revalidate: cc.no_cache || cc.max_age == Some(0),
        only_if_cached: cc.only_if_cached,
    }
}

/// Parses an HTTP date: IMF-fixdate and the obsolete RFC 850 and asctime forms (RFC 9110
/// §5.6.7), in any letter case (RFC 9111 §4.2), and with a weekday that does not match the date
/// (which says nothing the date does not).
pub fn http_date(v: &[u8]) -> Option<SystemTime> {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const LONG_DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let text = std::str::from_utf8(v).ok()?.trim();
    if let Ok(t) = httpdate::parse_http_date(text) {
        return Some(t);
    }
    // httpdate wants the canonical case and the right weekday: give it both.
    let (weekday, rest) = text.split_at(text.find([',', ' '])?);
    let mut rest = rest.to_ascii_uppercase();
    for m in MONTHS {
        rest = rest.replace(&m.to_ascii_uppercase(), m);
    }
    let long = weekday.len() > 3;
    (0..7).find_map(|d| {
        let day = if long { LONG_DAYS[d] } else { DAYS[d] };
        httpdate::parse_http_date(&format!("{day}{rest}")).ok()
    })
}

/// `If-None-Match` against an entity tag, with weak comparison (RFC 9110 §13.1.2).
pub fn if_none_match_matches(header: &[u8], etag: &[u8]) -> bool {
    let strip = |t: &[u8]| t.strip_prefix(b"W/").map_or(t.to_vec(), <[u8]>::to_vec);
    let etag = strip(etag.trim_ascii());
    list_items(header).any(|t| t == b"*" || strip(t) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(v: &str) -> CacheControl {
        let mut c = CacheControl::default();
        c.add(v.as_bytes());
        c
    }

    fn facts(status: u16, c: &CacheControl) -> ResponseFacts<'_> {
        ResponseFacts {
            status,
            cc: c,
            expires: None,
            date: None,
            last_modified: None,
            has_set_cookie: false,
            vary_star: false,
            request_has_authorization: false,
        }
    }

    #[test]
    fn directives_parse() {
        let c =
            cc("public, max-age=60, s-maxage=\"120\", stale-while-revalidate=30, Must-Revalidate");
        assert!(c.public && c.must_revalidate);
        assert_eq!(
            (c.max_age, c.s_maxage, c.stale_while_revalidate),
            (Some(60), Some(120), Some(30))
        );
    }

    #[test]
    fn storability_follows_rfc_9111() {
        assert!(storable(&facts(200, &cc(""))));
        assert!(!storable(&facts(200, &cc("no-store"))));
        assert!(!storable(&facts(200, &cc("private, max-age=60"))));
        assert!(!storable(&facts(302, &cc(""))));
        assert!(storable(&facts(302, &cc("max-age=60"))));
        assert!(!storable(&facts(206, &cc("max-age=60"))));
        let public = cc("public");
        let mut f = facts(200, &public);
        f.request_has_authorization = true;
        assert!(storable(&f));
        let plain = cc("max-age=60");
        let mut f = facts(200, &plain);
        f.request_has_authorization = true;
        assert!(!storable(&f));
        f.has_set_cookie = true;
        f.request_has_authorization = false;
        assert!(!storable(&f));
    }

    #[test]
    fn freshness_prefers_s_maxage_then_max_age_then_expires_then_default() {
        let d = Implicit::ttl(Duration::from_secs(7));
        assert_eq!(
            freshness(&facts(200, &cc("max-age=5, s-maxage=9")), d),
            Duration::from_secs(9)
        );
        assert_eq!(
            freshness(&facts(200, &cc("max-age=5")), d),
            Duration::from_secs(5)
        );
        assert_eq!(
            freshness(&facts(200, &cc("max-age=5, no-cache")), d),
            Duration::ZERO
        );
        assert_eq!(freshness(&facts(200, &cc("")), d), d.ttl);
        let empty = cc("");
        let mut f = facts(200, &empty);
        f.date = http_date(b"Sun, 06 Nov 1994 08:49:37 GMT");
        f.expires = http_date(b"Sun, 06 Nov 1994 08:50:37 GMT");
        assert_eq!(freshness(&f, d), Duration::from_secs(60));
    }

    #[test]
    fn heuristic_freshness_is_a_share_of_the_age_since_last_modified_capped_by_the_ttl() {
        let empty = cc("");
        let mut f = facts(200, &empty);
        f.date = http_date(b"Sun, 06 Nov 1994 08:49:37 GMT");
        f.last_modified = f.date.map(|d| d - Duration::from_secs(1000));
        let rule = |percent, ttl| Implicit {
            ttl: Duration::from_secs(ttl),
            heuristic_percent: Some(percent),
        };
        assert_eq!(freshness(&f, rule(10, 3600)), Duration::from_secs(100));
        assert_eq!(freshness(&f, rule(10, 60)), Duration::from_secs(60));
        f.status = 302; // not heuristically cacheable: the route's TTL as before
        assert_eq!(freshness(&f, rule(10, 3600)), Duration::from_secs(3600));
    }

    #[test]
    fn dates_parse_in_any_case_in_all_three_forms_and_with_a_wrong_weekday() {
        let t = http_date(b"Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        for v in [
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "monday, 06-nov-94 08:49:37 gmt",
            "Sun Nov  6 08:49:37 1994",
            "tue nov  6 08:49:37 1994",
        ] {
            assert_eq!(http_date(v.as_bytes()), Some(t), "{v}");
        }
        assert_eq!(http_date(b"yesterday"), None);
        assert_eq!(http_date(b"Sun, 32 Nov 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn targeted_fields_must_be_valid_dictionaries() {
        for ok in [
            "max-age=60",
            "no-store",
            "foobar, max-age=3600",
            "max-age=60;x=1, private",
        ] {
            assert!(targeted_valid(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age =100",
            "MaX-aGe=1",
            "",
        ] {
            assert!(!targeted_valid(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn etags_compare_weakly() {
        assert!(if_none_match_matches(b"\"a\", W/\"b\"", b"\"b\""));
        assert!(if_none_match_matches(b"*", b"\"x\""));
        assert!(!if_none_match_matches(b"\"a\"", b"\"b\""));
    }
}
