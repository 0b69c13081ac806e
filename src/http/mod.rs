//! The HTTP/1.1 codec: parsing request and response heads (httparse, no allocation, header
//! names and values kept as spans of the caller's read buffer), deciding message framing
//! strictly per RFC 9112 §6, the chunked coding, and writing heads. It knows nothing of routes
//! or upstreams; `proxy` drives it.

pub mod chunked;
mod edits;
pub mod path;
mod request;
mod response;
pub mod write;

pub use edits::{HeaderEdits, NameSet};
pub use request::{parse_request, Method, RequestError, RequestHead};
pub use response::{parse_response, ResponseError, ResponseHead};

/// The most headers a request or response may have, whatever `max_headers` says: the parser
/// keeps its header table on the stack.
pub const MAX_HEADERS_CEILING: usize = 256;

/// The sizes the codec enforces. The caller takes them from its own configuration; these
/// defaults are also `[limits]`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    pub max_request_line_bytes: usize,
    /// Total size of the header lines.
    pub max_header_bytes: usize,
    /// At most `MAX_HEADERS_CEILING`.
    pub max_headers: usize,
    /// Per chunk.
    pub max_chunk_extension_bytes: usize,
    pub max_trailer_bytes: usize,
}

impl ParseLimits {
    pub const DEFAULT: ParseLimits = ParseLimits {
        max_request_line_bytes: 8192,
        max_header_bytes: 32768,
        max_headers: 100,
        max_chunk_extension_bytes: 4096,
        max_trailer_bytes: 16384,
    };

    /// The longest response head a peer may send.
    pub fn max_response_head(&self) -> usize {
        self.max_request_line_bytes + self.max_header_bytes
    }
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits::DEFAULT
    }
}

/// The value of the first header named `name` (compared ignoring ASCII case) among `headers`,
/// parsed from `buf`. The one header lookup: every "find a field" goes through it.
#[inline]
pub fn find_header<'b>(buf: &'b [u8], headers: &[Header], name: &[u8]) -> Option<&'b [u8]> {
    headers
        .iter()
        .find(|h| h.name.len() == name.len() && h.name.get(buf).eq_ignore_ascii_case(name))
        .map(|h| h.value.get(buf))
}

/// A byte range of the buffer a head was parsed from, relative to the head's first byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub const EMPTY: Span = Span { start: 0, end: 0 };

    /// The span of `part`, which must be a sub-slice of `base`.
    #[inline]
    pub fn of(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    #[inline]
    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    #[inline]
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How long a message body is, decided from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body runs until the upstream closes the connection.
    UntilClose,
}

/// The forwarding header kinds, as a pattern: one list for `HeaderKind::is_forwarding` and
/// the parser's match (where an arm of its own keeps the match a jump table).
macro_rules! forwarding_kinds {
    () => {
        HeaderKind::XForwardedFor
            | HeaderKind::XForwardedProto
            | HeaderKind::XForwardedHost
            | HeaderKind::XForwardedPort
            | HeaderKind::XForwardedPrefix
            | HeaderKind::XForwardedOther
            | HeaderKind::Forwarded
            | HeaderKind::XRealIp
            | HeaderKind::RewriteUrl
    };
}
pub(crate) use forwarding_kinds;

/// Headers the proxy treats specially, recognised once while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderKind {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Expect,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    XForwardedPort,
    XForwardedPrefix,
    /// Any other `X-Forwarded-*`.
    XForwardedOther,
    /// RFC 7239 `Forwarded`.
    Forwarded,
    XRealIp,
    /// `X-Original-URL`, `X-Rewrite-URL`: routing overrides some servers honour.
    RewriteUrl,
    XRequestId,
    TraceParent,
    /// A header the gateway vouches for, as the client sent it: `X-Consumer`, or one of the
    /// request parser's `vouched` set (claim headers and the like).
    Identity,
    /// Removed from the request before its filters ran: the writers leave it out and lookups
    /// do not find it (its name span is empty).
    Dropped,
}

impl HeaderKind {
    /// The forwarding headers: what proxies tell the next hop about the client and the
    /// request as it arrived. Believed only from `trusted_proxies`.
    #[inline]
    pub fn is_forwarding(self) -> bool {
        matches!(self, forwarding_kinds!())
    }

    /// Hop-by-hop fields (RFC 9110 §7.6.1) plus the framing fields the gateway always rewrites.
    #[inline]
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            HeaderKind::ContentLength
                | HeaderKind::TransferEncoding
                | HeaderKind::Connection
                | HeaderKind::KeepAlive
                | HeaderKind::ProxyConnection
                | HeaderKind::Te
                | HeaderKind::Trailer
                | HeaderKind::Upgrade
        )
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub kind: HeaderKind,
    pub name: Span,
    pub value: Span,
}

/// Recognises the headers in `HeaderKind`, case-insensitively. Length and first letter rule
/// out almost every other header before any comparison.
#[inline]
pub fn classify(name: &[u8]) -> HeaderKind {
    let Some(&first) = name.first() else {
        return HeaderKind::Other;
    };
    let is = |s: &str| matches_lowercase(name, s.as_bytes());
    match (name.len(), first | 0x20) {
        (2, b't') if is("te") => HeaderKind::Te,
        (4, b'h') if is("host") => HeaderKind::Host,
        (6, b'e') if is("expect") => HeaderKind::Expect,
        (7, b'u') if is("upgrade") => HeaderKind::Upgrade,
        (7, b't') if is("trailer") => HeaderKind::Trailer,
        (9, b'f') if is("forwarded") => HeaderKind::Forwarded,
        (9, b'x') if is("x-real-ip") => HeaderKind::XRealIp,
        (10, b'c') if is("connection") => HeaderKind::Connection,
        (10, b'k') if is("keep-alive") => HeaderKind::KeepAlive,
        (10, b'x') if is("x-consumer") => HeaderKind::Identity,
        (11, b't') if is("traceparent") => HeaderKind::TraceParent,
        (12, b'x') if is("x-request-id") => HeaderKind::XRequestId,
        (13, b'x') if is("x-rewrite-url") => HeaderKind::RewriteUrl,
        (14, b'c') if is("content-length") => HeaderKind::ContentLength,
        (14, b'x') if is("x-original-url") => HeaderKind::RewriteUrl,
        (15, b'x') if is("x-forwarded-for") => HeaderKind::XForwardedFor,
        (16, b'p') if is("proxy-connection") => HeaderKind::ProxyConnection,
        (16, b'x') if is("x-forwarded-host") => HeaderKind::XForwardedHost,
        (16, b'x') if is("x-forwarded-port") => HeaderKind::XForwardedPort,
        (17, b't') if is("transfer-encoding") => HeaderKind::TransferEncoding,
        (17, b'x') if is("x-forwarded-proto") => HeaderKind::XForwardedProto,
        (18, b'x') if is("x-forwarded-prefix") => HeaderKind::XForwardedPrefix,
        (n, b'x') if n > 12 && matches_lowercase(&name[..12], b"x-forwarded-") => {
            HeaderKind::XForwardedOther
        }
        _ => HeaderKind::Other,
    }
}

/// Whether `name` is `lower` (lowercase ASCII) in any case. Inlined with a constant `lower`,
/// each byte is one OR and one compare: 0x20 is ORed in only where `lower` has a letter, so a
/// letter matches in either case and any other byte only itself.
#[inline(always)]
fn matches_lowercase(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name.iter().zip(lower).all(|(&b, &l)| {
            let fold = if l.is_ascii_lowercase() { 0x20 } else { 0 };
            b | fold == l
        })
}

/// A host name, an IPv4 address or a bracketed IPv6 literal: nothing that could turn a
/// `Location` into another URL (`/`, `@`, `?`, `#`, `\\`).
pub fn valid_redirect_host(h: &[u8]) -> bool {
    match h {
        [] => false,
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || b".:".contains(b))
        }
        _ => {
            h.len() <= 253
                && h.iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(b))
        }
    }
}

/// The value of an ASCII hex digit.
pub(crate) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 9110 `token`.
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Splits a comma-separated field value into trimmed, non-empty elements.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|item| item.trim_ascii())
        .filter(|item| !item.is_empty())
}

/// The names listed in a `Connection` header: fields that must not be forwarded.
/// Bounded so that a hostile header cannot make removal quadratic.
#[derive(Debug, Clone, Default)]
pub struct ConnectionOptions {
    names: [Span; Self::MAX],
    len: u8,
}

impl ConnectionOptions {
    pub const MAX: usize = 8;

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Records `name`; false when there are already `MAX` names.
    pub fn push(&mut self, name: Span) -> bool {
        if usize::from(self.len) == Self::MAX {
            return false;
        }
        self.names[usize::from(self.len)] = name;
        self.len += 1;
        true
    }

    /// Whether the header `name` was listed in `Connection`.
    #[inline(always)]
    pub fn names(&self, head: &[u8], name: &[u8]) -> bool {
        self.len > 0
            && self.names[..usize::from(self.len)]
                .iter()
                .any(|s| s.get(head).eq_ignore_ascii_case(name))
    }
}

/// Whether every line end in a head that httparse accepted is CRLF. httparse refuses a CR that
/// is not followed by LF but accepts a bare LF (RFC 9112 §2.2 lets a recipient do either); a
/// proxy must not, or two hops may disagree about where lines end. With no bare CR, there is no
/// bare LF exactly when the counts match.
pub fn line_ends_are_crlf(head: &[u8]) -> bool {
    // Per-block u8 counters (at most 255 per block) let the loop run 16 bytes at a time.
    let (lf, cr) = head.chunks(255).fold((0usize, 0usize), |(lf, cr), block| {
        let (l, c) = block.iter().fold((0u8, 0u8), |(l, c), &b| {
            (l + u8::from(b == b'\n'), c + u8::from(b == b'\r'))
        });
        (lf + usize::from(l), cr + usize::from(c))
    });
    lf == cr
}

/// Parses a Content-Length value: ASCII digits only, no sign, no overflow.
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_is_case_insensitive() {
        assert_eq!(classify(b"Content-Length"), HeaderKind::ContentLength);
        assert_eq!(classify(b"TE"), HeaderKind::Te);
        assert_eq!(classify(b"X-Forwarded-Proto"), HeaderKind::XForwardedProto);
        assert_eq!(classify(b"content-lengthx"), HeaderKind::Other);
        // Only letters fold: a byte that ORs to '-' is not a dash.
        assert_eq!(classify(b"content\rlength"), HeaderKind::Other);
        assert_eq!(classify(b"CONNECTION"), HeaderKind::Connection);
        assert_eq!(classify(b"connectioN"), HeaderKind::Connection);
        assert_eq!(classify(b"connectiom"), HeaderKind::Other);
        assert_eq!(classify(b"X-Forwarded-Port"), HeaderKind::XForwardedPort);
        assert_eq!(
            classify(b"x-forwarded-prefix"),
            HeaderKind::XForwardedPrefix
        );
        assert_eq!(classify(b"X-FORWARDED-SSL"), HeaderKind::XForwardedOther);
        assert_eq!(classify(b"x-forwarded-"), HeaderKind::Other);
        assert_eq!(classify(b"x-forwardedx-y"), HeaderKind::Other);
        assert_eq!(classify(b"Forwarded"), HeaderKind::Forwarded);
        assert_eq!(classify(b"X-Real-IP"), HeaderKind::XRealIp);
        assert_eq!(classify(b"X-Original-URL"), HeaderKind::RewriteUrl);
        assert_eq!(classify(b"x-rewrite-url"), HeaderKind::RewriteUrl);
    }

    #[test]
    fn content_length_is_strict() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"18446744073709551615"), None);
        assert_eq!(
            parse_content_length(b"1234567890123456789"),
            Some(1234567890123456789)
        );
        assert_eq!(parse_content_length(b"+5"), None);
        assert_eq!(parse_content_length(b"5 "), None);
        assert_eq!(parse_content_length(b""), None);
    }

    #[test]
    fn bare_line_ends_are_found() {
        assert!(line_ends_are_crlf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!line_ends_are_crlf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(!line_ends_are_crlf(b"GET / HTTP/1.1\r\nHost: a\r\n\n"));
        // Long heads are counted in blocks; a CRLF across a block boundary is still one.
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(235));
        assert_eq!(long.find("\r\n\r\n"), Some(254));
        assert!(line_ends_are_crlf(long.as_bytes()));
    }

    #[test]
    fn httparse_refuses_bare_cr_so_counting_suffices() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"[..],
            b"GET / HTTP/1.1\rHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n",
            b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let parsed = httparse::Request::new(&mut headers).parse(raw);
            assert!(parsed.is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
    }
}
