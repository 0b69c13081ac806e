//! Request heads: httparse finds the structure; this module adds what a proxy must be strict
//! about (RFC 9112 §2-§7): line endings, request-target form, Host, and one unambiguous framing.

use std::mem::MaybeUninit;

use super::{
    classify, find_header, forwarding_kinds, line_ends_are_crlf, list_items, parse_content_length,
    BodyLength, ConnectionOptions, Header, HeaderKind, NameSet, ParseLimits, Span, Version,
    MAX_HEADERS_CEILING,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Trace,
    Connect,
    Other,
}

impl Method {
    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"PATCH" => Method::Patch,
            b"TRACE" => Method::Trace,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// RFC 9110 §9.2.1: asks for nothing to change (so it does not invalidate cached URLs).
    pub fn is_safe(self) -> bool {
        matches!(
            self,
            Method::Get | Method::Head | Method::Options | Method::Trace
        )
    }

    /// RFC 9110 §9.2.2: safe to send twice, so a request lost on a stale connection may be.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// Why a request head was refused; `proxy` maps each to exactly one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// 400, with the reason for the log and the error body.
    Malformed(&'static str),
    /// 414
    UriTooLong,
    /// 431
    HeadersTooLarge,
    /// 417
    ExpectationFailed,
    /// 501
    NotImplemented(&'static str),
    /// 505
    VersionNotSupported,
}

/// A parsed request head. Every byte string is a `Span` of the buffer it was parsed from, so
/// parsing allocates nothing once `headers` has grown to its working size.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub method_span: Span,
    /// The request-target as received.
    pub target: Span,
    /// What to send upstream as the target: the target itself for origin-form, the part after
    /// the authority for absolute-form (empty means "/").
    pub path: Span,
    pub version: Version,
    pub headers: Vec<Header>,
    /// Bytes from the start of the buffer to the end of the blank line.
    pub len: usize,
    pub body: BodyLength,
    /// The authority: the Host value, or the absolute-form target's authority.
    pub host: Option<Span>,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// `Upgrade` present and named in `Connection`, on HTTP/1.1.
    pub upgrade: bool,
    pub connection: ConnectionOptions,
    pub request_id: Option<Span>,
    /// The first `traceparent`, if any (checked when the trace is joined).
    pub traceparent: Option<Span>,
    /// Some header is a forwarding one (`HeaderKind::is_forwarding`).
    pub forwarding: bool,
    /// Some header is one the gateway vouches for (`HeaderKind::Identity`).
    pub identity: bool,
    /// The path may change when normalized (`path::needs_normalizing`, found while the
    /// target was checked).
    pub unnormalized: bool,
}

impl RequestHead {
    /// The value of the first header named `name`; `buf` is the buffer the head was parsed from.
    #[inline]
    pub fn header<'b>(&self, buf: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
        find_header(buf, &self.headers, name)
    }

    /// Classifies the headers again with another `vouched` set, as `parse_request` would
    /// have: for a request that moved to another generation's config.
    pub fn mark_vouched(&mut self, buf: &[u8], vouched: &NameSet) {
        self.identity = false;
        for h in &mut self.headers {
            if matches!(h.kind, HeaderKind::Identity | HeaderKind::Other) {
                let name = h.name.get(buf);
                h.kind = match classify(name) {
                    HeaderKind::Other if vouched.contains(name) => HeaderKind::Identity,
                    kind => kind,
                };
                self.identity |= h.kind == HeaderKind::Identity;
            }
        }
    }

    /// Removes, before any filter sees them, the client's copies of the headers the gateway
    /// vouches for (`identity`) and of the forwarding headers (`forwarding`; routing overrides
    /// such as `X-Original-URL` always): each becomes `Dropped`, with an empty name, so the
    /// writers leave it out and no lookup finds it. Returns how many identity headers went.
    pub fn drop_untrusted(&mut self, identity: bool, forwarding: bool) -> u32 {
        let mut dropped = 0;
        for h in &mut self.headers {
            let drop = match h.kind {
                HeaderKind::Identity if identity => {
                    dropped += 1;
                    true
                }
                HeaderKind::RewriteUrl => true,
                kind => forwarding && kind.is_forwarding(),
            };
            if drop {
                h.kind = HeaderKind::Dropped;
                h.name.end = h.name.start;
            }
        }
        // What is left is trusted (and flagged still, if any).
        self.identity &= !identity;
        self.forwarding &= !forwarding;
        dropped
    }
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            method: Method::Get,
            method_span: Span::EMPTY,
            target: Span::EMPTY,
            path: Span::EMPTY,
            version: Version::Http11,
            headers: Vec::new(),
            len: 0,
            body: BodyLength::None,
            host: None,
            keep_alive: true,
            expect_continue: false,
            upgrade: false,
            connection: ConnectionOptions::default(),
            request_id: None,
            traceparent: None,
            forwarding: false,
            identity: false,
            unnormalized: false,
        }
    }
}

/// Parses the request head at the start of `buf` into `head`, classifying `X-Consumer` and the
/// headers named in `vouched` as `Identity`. `Ok(false)` means the head is not complete yet; errors are final.
pub fn parse_request(
    buf: &[u8],
    limits: &ParseLimits,
    vouched: &NameSet,
    head: &mut RequestHead,
) -> Result<bool, RequestError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CEILING];
    let mut req = httparse::Request::new(&mut []);
    let status = req.parse_with_uninit_headers(buf, &mut slots[..limits.max_headers]);
    let len = match status {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            check_partial_size(buf, limits)?;
            return Ok(false);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadersTooLarge),
        Err(httparse::Error::Version) => {
            // httparse accepts only HTTP/1.0 and 1.1; tell a well-formed other version
            // (`HTTP/2.0`, `HTTP/3.0`) apart from noise.
            let line = &buf[..memchr::memchr(b'\n', buf).unwrap_or(buf.len())];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let well_formed = line.len() >= 9
                && line[line.len() - 9..].starts_with(b" HTTP/")
                && matches!(line[line.len() - 3..], [a, b'.', b] if a.is_ascii_digit() && b.is_ascii_digit());
            return Err(if well_formed {
                RequestError::VersionNotSupported
            } else {
                RequestError::Malformed("invalid HTTP version")
            });
        }
        Err(e) => return Err(RequestError::Malformed(httparse_reason(e))),
    };
    let head_bytes = &buf[..len];
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(RequestError::Malformed("incomplete request line"));
    };

    let line_end = memchr::memchr(b'\n', head_bytes).unwrap_or(len);
    if line_end > limits.max_request_line_bytes {
        return Err(RequestError::UriTooLong);
    }
    if len - line_end > limits.max_header_bytes {
        return Err(RequestError::HeadersTooLarge);
    }
    if !line_ends_are_crlf(head_bytes) {
        return Err(RequestError::Malformed("bare CR or LF in request head"));
    }

    head.method = Method::from_bytes(method.as_bytes());
    head.method_span = Span::of(buf, method.as_bytes());
    head.target = Span::of(buf, target.as_bytes());
    head.version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    head.len = len;
    head.headers.clear();
    head.connection.clear();
    head.request_id = None;
    head.traceparent = None;
    head.expect_continue = false;
    head.forwarding = false;
    head.identity = false;

    let authority = parse_target(head, buf, target.as_bytes())?;

    let mut host: Option<Span> = None;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut upgrade_token = false;
    let mut upgrade_header = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let mut kind = classify(name);
        if kind == HeaderKind::Other && vouched.contains(name) {
            kind = HeaderKind::Identity;
        }
        let value_span = Span::of(buf, value);
        head.headers.push(Header {
            kind,
            name: Span::of(buf, name),
            value: value_span,
        });
        match kind {
            HeaderKind::Host => {
                if host.is_some() {
                    return Err(RequestError::Malformed("more than one Host header"));
                }
                if !is_authority(value) {
                    return Err(RequestError::Malformed("invalid Host header"));
                }
                host = Some(value_span);
            }
            HeaderKind::ContentLength => {
                let n = parse_content_length(value)
                    .ok_or(RequestError::Malformed("invalid Content-Length"))?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(RequestError::Malformed(
                        "conflicting Content-Length headers",
                    ));
                }
                content_length = Some(n);
            }
            HeaderKind::TransferEncoding => {
                transfer_encoding = true;
                for coding in list_items(value) {
                    // Only "chunked", once: any other coding would leave the body's end
                    // to a decoder the gateway does not run.
                    if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(RequestError::Malformed(
                            "Transfer-Encoding other than a single chunked",
                        ));
                    }
                    chunked = true;
                }
            }
            HeaderKind::Connection => {
                for opt in list_items(value) {
                    if opt.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if opt.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_token = true;
                    } else if opt.eq_ignore_ascii_case(b"upgrade") {
                        upgrade_token = true;
                    } else if !super::is_token(opt) {
                        return Err(RequestError::Malformed("invalid Connection header"));
                    } else if !head.connection.push(Span::of(buf, opt)) {
                        return Err(RequestError::Malformed("too many Connection options"));
                    }
                }
            }
            HeaderKind::Expect => {
                if value.eq_ignore_ascii_case(b"100-continue") {
                    head.expect_continue = true;
                } else {
                    return Err(RequestError::ExpectationFailed);
                }
            }
            HeaderKind::Upgrade => upgrade_header = true,
            HeaderKind::TraceParent if head.traceparent.is_none() => {
                head.traceparent = Some(value_span);
            }
            HeaderKind::XRequestId
                if head.request_id.is_none() && !value.is_empty() && value.len() <= 200 =>
            {
                head.request_id = Some(value_span);
            }
            HeaderKind::Identity => head.identity = true,
            forwarding_kinds!() => head.forwarding = true,
            _ => {}
        }
    }

    if transfer_encoding && !chunked {
        return Err(RequestError::Malformed("empty Transfer-Encoding"));
    }
    if transfer_encoding && head.version == Version::Http10 {
        return Err(RequestError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    if transfer_encoding && content_length.is_some() {
        return Err(RequestError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if head.version == Version::Http11 && host.is_none() {
        return Err(RequestError::Malformed("missing Host header"));
    }
    if let Some(authority) = authority {
        if let Some(h) = host {
            if !h.get(buf).eq_ignore_ascii_case(authority.get(buf)) {
                return Err(RequestError::Malformed(
                    "Host disagrees with the absolute-form target",
                ));
            }
        }
        host = Some(authority);
    }
    head.host = host;
    head.body = match (chunked, content_length) {
        (true, _) => BodyLength::Chunked,
        (false, Some(n)) => BodyLength::Length(n),
        (false, None) => BodyLength::None,
    };
    head.keep_alive = match head.version {
        Version::Http11 => !close,
        Version::Http10 => keep_alive_token && !close,
    };
    head.upgrade = head.version == Version::Http11 && upgrade_header && upgrade_token;
    Ok(true)
}

/// Checks the request-target's form (RFC 9112 §3.2) and sets `head.path`; returns the
/// authority of an absolute-form target.
fn parse_target(
    head: &mut RequestHead,
    buf: &[u8],
    target: &[u8],
) -> Result<Option<Span>, RequestError> {
    let origin_form = target.first() == Some(&b'/');
    let scanned = if origin_form {
        super::path::scan(target)
    } else {
        target.is_ascii().then_some(false)
    };
    let Some(unnormalized) = scanned else {
        return Err(RequestError::Malformed("non-ASCII byte in request-target"));
    };
    if head.method == Method::Connect {
        return Err(RequestError::NotImplemented("CONNECT is not supported"));
    }
    if origin_form {
        head.path = Span::of(buf, target);
        head.unnormalized = unnormalized;
        return Ok(None);
    }
    if target == b"*" {
        if head.method != Method::Options {
            return Err(RequestError::Malformed(
                "'*' target on a method other than OPTIONS",
            ));
        }
        head.path = Span::of(buf, target);
        head.unnormalized = false;
        return Ok(None);
    }
    let rest = strip_prefix_ignore_case(target, b"http://")
        .or_else(|| strip_prefix_ignore_case(target, b"https://"))
        .ok_or(RequestError::Malformed(
            "request-target is not origin-form or absolute-form",
        ))?;
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || !is_authority(authority) {
        return Err(RequestError::Malformed(
            "invalid authority in request-target",
        ));
    }
    let path = &rest[end..];
    head.path = Span::of(buf, path);
    head.unnormalized = path.first() == Some(&b'/') && super::path::needs_normalizing(path);
    Ok(Some(Span::of(buf, authority)))
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// RFC 3986 `host [ ":" port ]`, loosely: the characters a reg-name, IP literal or port may use.
fn is_authority(v: &[u8]) -> bool {
    static ALLOWED: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b'%'
                        | b':'
                        | b'['
                        | b']'
                );
            b += 1;
        }
        t
    };
    v.iter().all(|&b| ALLOWED[usize::from(b)])
}

/// A partial head is refused as soon as it is already over a limit.
fn check_partial_size(buf: &[u8], limits: &ParseLimits) -> Result<(), RequestError> {
    let line_end = memchr::memchr(b'\n', buf);
    match line_end {
        None if buf.len() > limits.max_request_line_bytes => Err(RequestError::UriTooLong),
        Some(end) if end > limits.max_request_line_bytes => Err(RequestError::UriTooLong),
        Some(end) if buf.len() - end > limits.max_header_bytes => {
            Err(RequestError::HeadersTooLarge)
        }
        _ => Ok(()),
    }
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::Status => "invalid status",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<RequestHead, RequestError> {
        let mut head = RequestHead::default();
        match parse_request(raw, &ParseLimits::default(), &NameSet::default(), &mut head)? {
            true => Ok(head),
            false => Err(RequestError::Malformed("partial")),
        }
    }

    #[test]
    fn simple_get() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n";
        let h = parse(raw).unwrap();
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path.get(raw), b"/a?b");
        assert_eq!(h.host.unwrap().get(raw), b"x");
        assert_eq!(h.body, BodyLength::None);
        assert!(h.keep_alive);
        assert_eq!(h.len, raw.len());
    }

    #[test]
    fn absolute_form_sets_authority_and_path() {
        let raw = b"GET http://Example.com:8080/p HTTP/1.1\r\nHost: example.com:8080\r\n\r\n";
        let h = parse(raw).unwrap();
        assert_eq!(h.host.unwrap().get(raw), b"Example.com:8080");
        assert_eq!(h.path.get(raw), b"/p");
        let raw = b"GET http://a/p HTTP/1.1\r\nHost: b\r\n\r\n";
        assert!(matches!(parse(raw), Err(RequestError::Malformed(_))));
    }

    #[test]
    fn framing_ambiguities_are_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(RequestError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn identical_content_lengths_fold() {
        let raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(parse(raw).unwrap().body, BodyLength::Length(3));
    }

    #[test]
    fn http10_keep_alive_needs_the_token() {
        let raw = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!parse(raw).unwrap().keep_alive);
        let raw = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        assert!(parse(raw).unwrap().keep_alive);
    }

    #[test]
    fn limits_map_to_414_and_431() {
        let limits = ParseLimits {
            max_request_line_bytes: 64,
            max_header_bytes: 1024,
            ..ParseLimits::default()
        };
        let mut head = RequestHead::default();
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(100));
        assert_eq!(
            parse_request(long.as_bytes(), &limits, &NameSet::default(), &mut head),
            Err(RequestError::UriTooLong)
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(
            parse_request(big.as_bytes(), &limits, &NameSet::default(), &mut head),
            Err(RequestError::HeadersTooLarge)
        );
    }

    #[test]
    fn vouched_and_forwarding_headers_are_classified_and_dropped() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-CONSUMER: eve\r\nX-Forwarded-Port: 1\r\nX-Original-URL: /a\r\nAccept: */*\r\nx-consumer: eve\r\n\r\n";
        let mut head = RequestHead::default();
        let vouched = NameSet::of([&b"x-consumer"[..]]);
        assert!(parse_request(raw, &ParseLimits::default(), &vouched, &mut head).unwrap());
        assert!(head.identity && head.forwarding);
        assert_eq!(head.header(raw, b"x-consumer"), Some(&b"eve"[..]));
        // A trusted peer keeps its forwarding headers, never a routing override.
        assert_eq!(head.drop_untrusted(true, false), 2);
        assert_eq!(head.header(raw, b"x-consumer"), None);
        assert_eq!(head.header(raw, b"x-original-url"), None);
        assert_eq!(head.header(raw, b"x-forwarded-port"), Some(&b"1"[..]));
        assert_eq!(head.header(raw, b"accept"), Some(&b"*/*"[..]));
        head.drop_untrusted(true, true);
        assert_eq!(head.header(raw, b"x-forwarded-port"), None);
    }

    #[test]
    fn connection_options_are_recorded() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: X-Foo, close\r\nX-Foo: 1\r\n\r\n";
        let h = parse(raw).unwrap();
        assert!(!h.keep_alive);
        assert!(h.connection.names(raw, b"x-foo"));
        assert!(!h.connection.names(raw, b"x-bar"));
    }
}
