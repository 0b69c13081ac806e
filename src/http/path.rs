//! Path normalization (RFC 3986 §6.2.2), done once, in place, right after a request head is
//! parsed, so that the router, every filter, the cache key and the upstream read one path: the
//! one the upstream will serve. Upstreams normalize (nginx, Go's net/http, servlet containers);
//! a gateway that routed on the path as sent would let `/public/../admin` or `/%61dmin` past a
//! route's authentication.
//!
//! What changes: percent-encoded unreserved characters are decoded, the hex of the encodings
//! that remain is upper-cased, dot segments are removed (`%2e` counting as `.`), and repeated
//! slashes are merged. What is refused: dot segments that climb above the root, a bad
//! percent-encoding, `%00`, a raw backslash or `#` in the path, and (by default) an encoded
//! slash or backslash. The query is left as sent; `;` parameters are left as they are.
//!
//! The common path needs nothing: one scan finds no `%`, `\`, `#`, `/.` or `//`.

use super::{hex, RequestHead, Span};

/// What an encoded slash or backslash (`%2F`, `%5C`) in a path does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncodedSlashes {
    /// 400: the path is ambiguous between hops that decode it and hops that do not.
    #[default]
    Reject,
    /// Routed and forwarded still encoded (hex upper-cased), as part of its segment.
    Keep,
    /// Decoded to `/` before routing: a segment separator like any other.
    Decode,
}

/// Why a path was refused (400); each is counted under a reason of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Dot segments climb above the root (`/..`, `/a/../..`).
    Traversal,
    /// `%2F` or `%5C` while `encoded_slashes = "reject"`.
    EncodedSlash,
    /// A `%` not followed by two hex digits, `%00`, a raw `\` or `#`.
    Invalid(&'static str),
}

impl PathError {
    pub fn reason(self) -> &'static str {
        match self {
            PathError::Traversal => "path climbs above the root",
            PathError::EncodedSlash => "encoded slash or backslash in the path",
            PathError::Invalid(why) => why,
        }
    }
}

/// What a byte may start, for `scan`: 1 something to normalize or refuse (`%`, `\`, `#`); 2 a
/// dot segment or a repeated slash, after a `/` (`.`, `/`); 3 the query (`?`); 4 nothing a
/// request-target may hold (a non-ASCII byte).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0x80;
    while b < 256 {
        t[b] = 4;
        b += 1;
    }
    t[b'%' as usize] = 1;
    t[b'\\' as usize] = 1;
    t[b'#' as usize] = 1;
    t[b'.' as usize] = 2;
    t[b'/' as usize] = 2;
    t[b'?' as usize] = 3;
    t
};

/// Whether `path` (the path and query as sent) may change when normalized: one scan of the
/// path, up to its query, that finds no `%`, `\`, `#`, `/.` or `//`.
#[inline]
pub fn needs_normalizing(path: &[u8]) -> bool {
    scan(path) == Some(true)
}

/// One pass over an origin-form target: `None` if it holds a non-ASCII byte, else whether its
/// path may change when normalized (the parser's check of the target and the normalizer's
/// test in one loop: the common path costs nothing more).
#[inline]
pub fn scan(target: &[u8]) -> Option<bool> {
    let mut prev = 0u8;
    for (i, &b) in target.iter().enumerate() {
        match CLASS[usize::from(b)] {
            0 => {}
            2 if prev != b'/' => {}
            3 => return target[i..].is_ascii().then_some(false),
            4 => return None,
            _ => return target[i..].is_ascii().then_some(true),
        }
        prev = b;
    }
    Some(false)
}

/// Normalizes `head.path` in place in `buf` (its bytes are rewritten; the query moves up to
/// follow the shorter path) and shortens `head.path` and `head.target` to match. Returns
/// whether the path changed. Only an origin-form path or an absolute-form one starting with
/// `/` is touched (`*` and an empty path are left alone).
pub fn normalize(
    buf: &mut [u8],
    head: &mut RequestHead,
    slashes: EncodedSlashes,
) -> Result<bool, PathError> {
    let start = head.path.start as usize;
    let end = head.path.end as usize;
    let whole = &mut buf[start..end];
    if whole.first() != Some(&b'/') || !needs_normalizing(whole) {
        return Ok(false);
    }
    let path_len = memchr::memchr(b'?', whole).unwrap_or(whole.len());
    let (written, changed) = normalize_in_place(&mut whole[..path_len], slashes)?;
    if written == path_len {
        return Ok(changed);
    }
    whole.copy_within(path_len.., written);
    let shorter = (path_len - written) as u32;
    head.path = Span {
        start: head.path.start,
        end: head.path.end - shorter,
    };
    debug_assert_eq!(head.target.end, end as u32, "the path ends the target");
    head.target.end -= shorter;
    Ok(true)
}

/// Normalizes `path` (starting with `/`, no query) into its own first bytes; returns the
/// normalized length (at most the original: every step shortens or keeps) and whether any
/// byte changed.
fn normalize_in_place(
    path: &mut [u8],
    slashes: EncodedSlashes,
) -> Result<(usize, bool), PathError> {
    let len = path.len();
    let mut r = 0;
    let mut w = 0;
    // A kept encoding whose hex was lower case changes bytes without changing the length.
    let mut recased = false;
    // Whether the output must end with `/` (the input did, or its last segment was a dot one).
    let mut trailing = false;
    loop {
        // Skip separators: merged slashes.
        let mut skipped = false;
        while r < len {
            match separator(path, r, slashes)? {
                0 => break,
                n => {
                    r += n;
                    skipped = true;
                }
            }
        }
        if r == len {
            trailing |= skipped;
            break;
        }
        path[w] = b'/';
        w += 1;
        let segment = w;
        while r < len && separator(path, r, slashes)? == 0 {
            let (byte, used) = decode_one(path, r, slashes)?;
            match byte {
                Decoded::Byte(b) => {
                    path[w] = b;
                    w += 1;
                }
                Decoded::Encoded(h, l) => {
                    recased |= path[r + 1] != h || path[r + 2] != l;
                    path[w..w + 3].copy_from_slice(&[b'%', h, l]);
                    w += 3;
                }
            }
            r += used;
        }
        match &path[segment..w] {
            b"." => {
                w = segment - 1;
                trailing = true;
            }
            b".." => {
                if segment == 1 {
                    return Err(PathError::Traversal);
                }
                // Drop this segment and the one before it.
                let before = &path[..segment - 1];
                w = before.iter().rposition(|&b| b == b'/').unwrap_or(0);
                trailing = true;
            }
            _ => trailing = false,
        }
    }
    if trailing || w == 0 {
        path[w] = b'/';
        w += 1;
    }
    Ok((w, recased || w != len))
}

/// How many bytes at `at` are a segment separator: 1 for `/`, 3 for `%2F` / `%5C` when they
/// are decoded, 0 for anything else. An encoded slash refused here is refused at once.
#[inline]
fn separator(path: &[u8], at: usize, slashes: EncodedSlashes) -> Result<usize, PathError> {
    match path[at] {
        b'/' => Ok(1),
        b'%' => match encoded_slash(path, at) {
            false => Ok(0),
            true => match slashes {
                EncodedSlashes::Reject => Err(PathError::EncodedSlash),
                EncodedSlashes::Keep => Ok(0),
                EncodedSlashes::Decode => Ok(3),
            },
        },
        _ => Ok(0),
    }
}

fn encoded_slash(path: &[u8], at: usize) -> bool {
    matches!(
        path.get(at + 1..at + 3),
        Some([b'2', b'f' | b'F']) | Some([b'5', b'c' | b'C'])
    )
}

enum Decoded {
    Byte(u8),
    /// A percent-encoding kept, with upper-case hex digits.
    Encoded(u8, u8),
}

/// The byte at `at` as it is written out, and how many input bytes it took.
#[inline]
fn decode_one(
    path: &[u8],
    at: usize,
    slashes: EncodedSlashes,
) -> Result<(Decoded, usize), PathError> {
    match path[at] {
        b'%' => {
            let (Some(h), Some(l)) = (
                path.get(at + 1).copied().and_then(hex),
                path.get(at + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::Invalid("invalid percent-encoding in the path"));
            };
            let value = h << 4 | l;
            if value == 0 {
                return Err(PathError::Invalid("encoded NUL in the path"));
            }
            if unreserved(value) {
                return Ok((Decoded::Byte(value), 3));
            }
            // An encoded slash here is kept (`separator` refused or split the others).
            debug_assert!(slashes == EncodedSlashes::Keep || !matches!(value, b'/' | b'\\'));
            let upper = |b: u8| b.to_ascii_uppercase();
            Ok((
                Decoded::Encoded(upper(path[at + 1]), upper(path[at + 2])),
                3,
            ))
        }
        b'\\' => Err(PathError::Invalid("backslash in the path")),
        b'#' => Err(PathError::Invalid("fragment in the request-target")),
        b => Ok((Decoded::Byte(b), 1)),
    }
}

/// RFC 3986 §2.3.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The normalized form of `path` (no query), for checking configured paths at load.
pub fn normalized(path: &str, slashes: EncodedSlashes) -> Result<String, PathError> {
    let mut bytes = path.as_bytes().to_vec();
    if bytes.first() != Some(&b'/') {
        return Ok(path.to_owned());
    }
    let (n, _) = normalize_in_place(&mut bytes, slashes)?;
    bytes.truncate(n);
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, NameSet, ParseLimits};

    fn parsed(raw: String) -> (Vec<u8>, RequestHead) {
        let buf = raw.into_bytes();
        let mut head = RequestHead::default();
        let limits = ParseLimits::default();
        assert!(parse_request(&buf, &limits, &NameSet::default(), &mut head).unwrap());
        (buf, head)
    }

    fn norm(path: &str, slashes: EncodedSlashes) -> Result<String, PathError> {
        let (mut buf, mut head) = parsed(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n"));
        normalize(&mut buf, &mut head, slashes)?;
        assert_eq!(head.path.get(&buf), head.target.get(&buf));
        Ok(String::from_utf8(head.path.get(&buf).to_vec()).unwrap())
    }

    fn ok(path: &str) -> String {
        norm(path, EncodedSlashes::Reject).unwrap()
    }

    #[test]
    fn the_issues_spellings_all_become_the_admin_path() {
        for p in [
            "/public/../admin/secret",
            "/%61dmin/secret",
            "/%61%64%6d%69%6e/secret",
            "/%61%64%6D%69%6E/secret",
            "//admin/secret",
            "/./admin/secret",
            "/public/%2e%2e/admin/secret",
            "/public/%2E%2E/admin/secret",
            "/x/..//admin/secret",
            "/public/.%2e/admin/secret",
            "///admin///secret",
            "/admin/./secret",
            "/admin/x/../secret",
        ] {
            assert_eq!(ok(p), "/admin/secret", "{p}");
        }
    }

    #[test]
    fn one_scan_checks_the_target_and_finds_what_to_normalize() {
        assert_eq!(scan(b"/api/v1?x=/../%41"), Some(false));
        assert_eq!(scan(b"/a/../b?q"), Some(true));
        assert_eq!(scan(b"/%61"), Some(true));
        assert_eq!(scan("/é".as_bytes()), None);
        assert_eq!(scan("/a?é".as_bytes()), None);
        assert_eq!(scan("/a/./é".as_bytes()), None);
    }

    #[test]
    fn ordinary_paths_are_untouched() {
        for p in [
            "/",
            "/api/v1/users/42",
            "/a.b/c..d/.e",
            "/.well-known/x",
            "/a/b/",
            "/a;b=c/d",
        ] {
            assert_eq!(ok(p), p);
        }
        assert!(!needs_normalizing(b"/api/v1/users?x=/../y//z%41"));
    }

    #[test]
    fn dot_segments_and_trailing_slashes() {
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/a//"), "/a/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/a/..;x/b"), "/a/..;x/b");
        for p in ["/..", "/../a", "/a/../..", "/%2e%2e", "/a/%2E%2E/.."] {
            assert_eq!(
                norm(p, EncodedSlashes::Reject),
                Err(PathError::Traversal),
                "{p}"
            );
        }
    }

    #[test]
    fn the_query_is_left_as_sent() {
        assert_eq!(ok("/a/../b?x=/../%61&y=//"), "/b?x=/../%61&y=//");
        assert_eq!(ok("/%7euser?q"), "/~user?q");
    }

    #[test]
    fn remaining_encodings_get_upper_case_hex() {
        assert_eq!(ok("/a%3ab"), "/a%3Ab");
        assert_eq!(ok("/%e2%82%ac"), "/%E2%82%AC");
        assert_eq!(ok("/%25%32%65"), "/%252e");
    }

    #[test]
    fn bad_bytes_are_refused() {
        for p in ["/a%2", "/a%zz", "/%00x", "/a\\b", "/a#b", "/%"] {
            assert!(
                matches!(norm(p, EncodedSlashes::Keep), Err(PathError::Invalid(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn encoded_slashes_follow_the_setting() {
        let p = "/files/a%2fb/..%5Cc";
        assert_eq!(
            norm(p, EncodedSlashes::Reject),
            Err(PathError::EncodedSlash)
        );
        assert_eq!(
            norm(p, EncodedSlashes::Keep).unwrap(),
            "/files/a%2Fb/..%5Cc"
        );
        assert_eq!(norm(p, EncodedSlashes::Decode).unwrap(), "/files/a/c");
        assert_eq!(
            norm("/public/..%2Fadmin/secret", EncodedSlashes::Decode).unwrap(),
            "/admin/secret"
        );
    }

    #[test]
    fn absolute_form_paths_are_normalized_too() {
        let (mut buf, mut head) =
            parsed("GET http://h/a/../%62?q HTTP/1.1\r\nHost: h\r\n\r\n".into());
        assert!(normalize(&mut buf, &mut head, EncodedSlashes::Reject).unwrap());
        assert_eq!(head.path.get(&buf), b"/b?q");
        assert_eq!(head.target.get(&buf), b"http://h/b?q");
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in ["/a/./b/../c//d/%7e/%e2%82%ac/", "/x%2Fy/../z", "/q?a=/../b"] {
            for mode in [EncodedSlashes::Keep, EncodedSlashes::Decode] {
                let once = norm(p, mode).unwrap();
                assert_eq!(norm(&once, mode).unwrap(), once, "{p} {mode:?}");
            }
        }
    }
}
