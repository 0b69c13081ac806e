//! Writing heads: the only place wire bytes of a head are produced, one writer per kind —
//! `upstream_request` (the request going upstream), `client_response` (a proxied response),
//! `interim_response` (a relayed 1xx) and `generated_response` (everything the gateway answers
//! itself: errors, `respond` routes, cache hits and their 304s).
//!
//! A head sent on is copied from the buffer it was read into (never rebuilt from owned
//! strings): each run of header lines that passes is copied as received, in one piece;
//! hop-by-hop lines and fields dropped by the request's `HeaderEdits` are left out; then come
//! the gateway's fields, the edits' appended lines, and exactly one framing field chosen by the
//! gateway.

use super::edits::HeaderEdits;
use super::{BodyLength, Header, HeaderKind, RequestHead, ResponseHead, Version};

/// What the gateway adds to a forwarded request.
pub struct Forwarding<'a> {
    /// The connection's peer, appended to `X-Forwarded-For` (and `Forwarded`'s `for=`).
    pub client_ip: &'a [u8],
    pub proto: &'a [u8],
    /// `X-Forwarded-Port`: the port the client addressed (`forwarded_port`).
    pub port: &'a [u8],
    /// Also send an RFC 7239 `Forwarded` element (`[clients] forwarded`).
    pub forwarded: bool,
    pub request_id: &'a [u8],
    /// `Host` for an HTTP/1.0 request that had none (upstreams speak HTTP/1.1).
    pub fallback_host: &'a [u8],
    /// Removed from the start of the path before forwarding (and sent as
    /// `X-Forwarded-Prefix`).
    pub strip_prefix: Option<&'a [u8]>,
    /// The `traceparent` for the upstream (the incoming one is replaced).
    pub traceparent: &'a [u8],
    /// The route's edits to the request head (a cache's conditionals among them).
    pub edits: &'a HeaderEdits,
}

/// The port a client addressed: the one in its Host (or absolute-form authority), else the
/// scheme's default. What `X-Forwarded-Port` says, as frameworks building URLs expect.
pub fn forwarded_port(host: Option<&[u8]>, tls: bool) -> &[u8] {
    let default: &[u8] = if tls { b"443" } else { b"80" };
    let Some(host) = host else { return default };
    // The digits at the end, after a colon (`[::1]` ends in `]`: no port).
    let digits = host.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    match host.len().checked_sub(digits + 1).map(|colon| host[colon]) {
        Some(b':') if digits > 0 => &host[host.len() - digits..],
        _ => default,
    }
}

/// Appends the header line `name: value`. Inlined into each caller, where the name is a
/// constant: its copy becomes a few moves instead of a call to `memcpy`.
#[inline(always)]
pub fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[inline]
fn content_length(out: &mut Vec<u8>, n: u64) {
    let mut b = itoa::Buffer::new();
    field(out, b"content-length", b.format(n).as_bytes());
}

/// Copies the header lines that `keep` accepts exactly as received, each run of consecutive
/// kept lines in one piece. `head_len` is the head's length, blank line included. Lines are
/// consecutive (the parser refuses obs-fold and bare LF), so line `i` is the bytes from its
/// name to the next line's name.
pub(crate) fn copy_lines(
    out: &mut Vec<u8>,
    buf: &[u8],
    headers: &[Header],
    head_len: usize,
    mut keep: impl FnMut(&Header) -> bool,
) {
    let mut run: Option<usize> = None;
    for h in headers {
        let line = h.name.start as usize;
        if keep(h) {
            run.get_or_insert(line);
        } else if let Some(start) = run.take() {
            out.extend_from_slice(&buf[start..line]);
        }
    }
    if let Some(start) = run {
        out.extend_from_slice(&buf[start..head_len - 2]);
    }
}

/// The path to send upstream after `strip_prefix`; "/" stands in for an empty path.
pub fn upstream_path<'a>(path: &'a [u8], strip_prefix: Option<&[u8]>) -> (&'static [u8], &'a [u8]) {
    let rest = match strip_prefix {
        Some(p) if path.starts_with(p) => &path[p.len()..],
        _ => path,
    };
    if rest.first() == Some(&b'/') || rest == b"*" {
        (b"", rest)
    } else {
        (b"/", rest)
    }
}

/// Appends `target` without the query parameters `edits` drops (and without the `?` when
/// none is left).
fn target_without(out: &mut Vec<u8>, target: &[u8], edits: &HeaderEdits) {
    let Some(q) = target.iter().position(|&b| b == b'?') else {
        out.extend_from_slice(target);
        return;
    };
    out.extend_from_slice(&target[..q]);
    let mut sep = b'?';
    for pair in target[q + 1..].split(|&b| b == b'&') {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        if edits.drops_query_param(name) {
            continue;
        }
        out.push(sep);
        out.extend_from_slice(pair);
        sep = b'&';
    }
}

/// Which forwarding headers a trusted peer sent (the others' were dropped before the filters).
#[derive(Default)]
struct Sent {
    xff: bool,
    proto: bool,
    host: bool,
    port: bool,
    prefix: bool,
    forwarded: bool,
}

/// Appends the request head to send upstream. `buf` is the buffer `head` was parsed from.
pub fn upstream_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, fwd: &Forwarding<'_>) {
    out.extend_from_slice(head.method_span.get(buf));
    out.push(b' ');
    let edits = fwd.edits;
    let (slash, path) = upstream_path(head.path.get(buf), fwd.strip_prefix);
    out.extend_from_slice(slash);
    if edits.drops_any_query_param() {
        target_without(out, path, edits);
    } else {
        out.extend_from_slice(path);
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The prefix actually stripped, without its trailing slash: `X-Forwarded-Prefix`.
    let stripped = fwd
        .strip_prefix
        .filter(|p| head.path.get(buf).starts_with(p))
        .map(|p| p.strip_suffix(b"/").unwrap_or(p))
        .filter(|p| !p.is_empty());

    let removing = edits.removes_any();
    let mut sent = Sent::default();
    copy_lines(out, buf, &head.headers, head.len, |h| match h.kind {
        HeaderKind::Upgrade if head.upgrade => true,
        HeaderKind::Host
        | HeaderKind::Expect
        | HeaderKind::XRequestId
        | HeaderKind::TraceParent
        | HeaderKind::RewriteUrl
        | HeaderKind::Dropped => false,
        // Combined with the gateway's own below.
        HeaderKind::XForwardedFor => {
            sent.xff = true;
            false
        }
        HeaderKind::Forwarded if fwd.forwarded => {
            sent.forwarded = true;
            false
        }
        HeaderKind::XForwardedPrefix if stripped.is_some() => {
            sent.prefix = true;
            false
        }
        // A trusted peer's own, kept instead of the gateway's.
        kind @ (HeaderKind::XForwardedProto
        | HeaderKind::XForwardedHost
        | HeaderKind::XForwardedPort) => {
            let name = h.name.get(buf);
            let kept = !(head.connection.names(buf, name) || removing && edits.removes(name));
            let seen = match kind {
                HeaderKind::XForwardedProto => &mut sent.proto,
                HeaderKind::XForwardedHost => &mut sent.host,
                _ => &mut sent.port,
            };
            *seen |= kept;
            kept
        }
        kind if kind.is_hop_by_hop() => false,
        _ => {
            let name = h.name.get(buf);
            !(head.connection.names(buf, name) || removing && edits.removes(name))
        }
    });

    let host = head.host.map_or(fwd.fallback_host, |h| h.get(buf));
    let keep = |name: &[u8]| !(removing && edits.removes(name));
    if removing || head.forwarding {
        field(out, b"host", host);
        forwarding_fields(out, buf, head, fwd, &sent, &keep);
    } else {
        // The common case, nothing removed and no forwarding header kept: the gateway's own,
        // written as one run of pieces (each constant joins the end of a line to the next).
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\nx-forwarded-for: ");
        out.extend_from_slice(fwd.client_ip);
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(fwd.proto);
        if let Some(h) = head.host {
            out.extend_from_slice(b"\r\nx-forwarded-host: ");
            out.extend_from_slice(h.get(buf));
        }
        out.extend_from_slice(b"\r\nx-forwarded-port: ");
        out.extend_from_slice(fwd.port);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(prefix) = stripped.filter(|_| keep(b"x-forwarded-prefix")) {
        out.extend_from_slice(b"x-forwarded-prefix: ");
        if sent.prefix {
            // A trusted proxy's prefix comes first: the path was stripped there, then here.
            for h in head
                .headers
                .iter()
                .filter(|h| h.kind == HeaderKind::XForwardedPrefix)
            {
                let v = h.value.get(buf);
                out.extend_from_slice(v.strip_suffix(b"/").unwrap_or(v));
            }
        }
        out.extend_from_slice(prefix);
        out.extend_from_slice(b"\r\n");
    }
    if fwd.forwarded && keep(b"forwarded") {
        out.extend_from_slice(b"forwarded: ");
        if sent.forwarded {
            values_of(out, buf, head, HeaderKind::Forwarded, b", ");
        }
        forwarded_element(out, fwd.client_ip, head.host.map(|h| h.get(buf)), fwd.proto);
        out.extend_from_slice(b"\r\n");
    }
    field(out, b"x-request-id", fwd.request_id);
    if keep(b"traceparent") {
        field(out, b"traceparent", fwd.traceparent);
    }
    edits.write_appended(out);
    if head.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    match head.body {
        BodyLength::Length(n) => content_length(out, n),
        BodyLength::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyLength::None | BodyLength::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// `X-Forwarded-For`, `-Proto`, `-Host` and `-Port` where a trusted peer sent some or the
/// route's edits remove some: a kept `X-Forwarded-For` gets the peer appended, the others keep
/// the peer's value instead of the gateway's, and a removed one is not written.
fn forwarding_fields(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fwd: &Forwarding<'_>,
    sent: &Sent,
    keep: &impl Fn(&[u8]) -> bool,
) {
    if keep(b"x-forwarded-for") {
        out.extend_from_slice(b"x-forwarded-for: ");
        if sent.xff {
            values_of(out, buf, head, HeaderKind::XForwardedFor, b", ");
        }
        out.extend_from_slice(fwd.client_ip);
        out.extend_from_slice(b"\r\n");
    }
    if !sent.proto && keep(b"x-forwarded-proto") {
        field(out, b"x-forwarded-proto", fwd.proto);
    }
    if let Some(h) = head
        .host
        .filter(|_| !sent.host && keep(b"x-forwarded-host"))
    {
        field(out, b"x-forwarded-host", h.get(buf));
    }
    if !sent.port && keep(b"x-forwarded-port") {
        field(out, b"x-forwarded-port", fwd.port);
    }
}

/// Appends the values of every header of `kind`, each followed by `sep`.
fn values_of(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, kind: HeaderKind, sep: &[u8]) {
    for h in head.headers.iter().filter(|h| h.kind == kind) {
        out.extend_from_slice(h.value.get(buf));
        out.extend_from_slice(sep);
    }
}

/// This hop's RFC 7239 element: `for` (an IPv6 address quoted in brackets), `host` (quoted:
/// a port's `:` is not a token character) and `proto`.
fn forwarded_element(out: &mut Vec<u8>, client_ip: &[u8], host: Option<&[u8]>, proto: &[u8]) {
    out.extend_from_slice(b"for=");
    if client_ip.contains(&b':') {
        out.extend_from_slice(b"\"[");
        out.extend_from_slice(client_ip);
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(client_ip);
    }
    if let Some(h) = host {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(h);
        out.push(b'"');
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto);
}

/// How the response body is framed towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// No body (HEAD, 1xx, 204, 304): pass Content-Length through untouched, as it describes
    /// the representation rather than this message.
    Bodiless,
    Length(u64),
    Chunked,
    /// Ends when the connection closes.
    Close,
}

/// What the gateway decides about a response head it sends the client.
pub struct ClientHead<'a> {
    pub framing: ClientFraming,
    pub client_version: Version,
    pub keep_alive: bool,
    pub request_id: &'a [u8],
    /// Header lines the gateway adds (each ending in CRLF), e.g. `RateLimit-*`; the edits may
    /// drop them too.
    pub extra: &'a [u8],
    /// The route's edits to the response head.
    pub edits: &'a HeaderEdits,
    /// The filters' edits to the upstream's head (`on_upstream_response`), which the route's
    /// edits apply to as to the upstream's own lines.
    pub upstream_edits: &'a HeaderEdits,
}

/// Appends the response head for the client from the upstream's.
pub fn client_response(out: &mut Vec<u8>, buf: &[u8], resp: &ResponseHead, head: &ClientHead<'_>) {
    let framing = head.framing;
    status_line(out, resp.status, resp.reason.get(buf));
    let upgrade = resp.status == 101;
    let bodiless = framing == ClientFraming::Bodiless && resp.status != 204 && resp.status >= 200;
    let (edits, changed) = (head.edits, head.upstream_edits);
    let removing = edits.removes_any() || changed.removes_any();
    copy_lines(out, buf, &resp.headers, resp.len, |h| match h.kind {
        HeaderKind::XRequestId => false,
        HeaderKind::Upgrade if upgrade => true,
        // A HEAD's length, unless a filter changes the body's (compression).
        HeaderKind::ContentLength if bodiless => !(removing && changed.removes(h.name.get(buf))),
        kind if kind.is_hop_by_hop() => false,
        _ => {
            let name = h.name.get(buf);
            !(resp.connection.names(buf, name)
                || removing && (edits.removes(name) || changed.removes(name)))
        }
    });
    edits.copy_kept(out, changed.appended());
    edits.copy_kept(out, head.extra);
    edits.write_appended(out);
    field(out, b"x-request-id", head.request_id);
    match framing {
        ClientFraming::Length(n) => content_length(out, n),
        ClientFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ClientFraming::Bodiless | ClientFraming::Close => {}
    }
    connection(out, upgrade, head.keep_alive, head.client_version);
    out.extend_from_slice(b"\r\n");
}

fn connection(out: &mut Vec<u8>, upgrade: bool, keep_alive: bool, client_version: Version) {
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client_version == Version::Http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// An interim (1xx) response passed through to an HTTP/1.1 client, e.g. 103 Early Hints.
pub fn interim_response(out: &mut Vec<u8>, buf: &[u8], resp: &ResponseHead) {
    status_line(out, resp.status, resp.reason.get(buf));
    copy_lines(out, buf, &resp.headers, resp.len, |h| {
        !h.kind.is_hop_by_hop()
    });
    out.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    // A status code is three digits (RFC 9110, 15): parsed ones are checked (100..=999), and
    // configured ones (200..=599), and the gateway's own are constants.
    debug_assert!((100..=999).contains(&status), "status {status}");
    let digit = |n: u16| b'0' + (n % 10) as u8;
    out.extend_from_slice(&[digit(status / 100), digit(status / 10), digit(status), b' ']);
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response generated by the gateway itself: an error, a `respond` route's fixed answer, or a
/// cache hit (or the 304 a cache hit becomes).
pub struct Generated<'a> {
    pub status: u16,
    /// The reason phrase; empty for the standard one.
    pub reason: &'a [u8],
    /// The response's own header lines, each ending in CRLF (the route's, the error's, the
    /// stored response's).
    pub headers: &'a [u8],
    /// Only the lines of `headers` whose name this accepts are sent (a 304's subset).
    pub only: Option<fn(&[u8]) -> bool>,
    /// The gateway's lines (`RateLimit-*`, `X-Cache`, `Age`), which the edits may drop.
    pub extra: &'a [u8],
    pub edits: &'a HeaderEdits,
    /// Copied after the head unless `head_only`; a larger body may be written separately, with
    /// its length in `content_length`.
    pub body: &'a [u8],
    /// `None`: no Content-Length (204, 304).
    pub content_length: Option<u64>,
    /// The request was HEAD: send the length but not the body.
    pub head_only: bool,
    pub keep_alive: bool,
    pub client_version: Version,
    pub request_id: &'a [u8],
}

pub fn generated_response(out: &mut Vec<u8>, r: &Generated<'_>) {
    let reason = if r.reason.is_empty() {
        reason_phrase(r.status).as_bytes()
    } else {
        r.reason
    };
    status_line(out, r.status, reason);
    match r.only {
        None => r.edits.copy_kept(out, r.headers),
        Some(only) => {
            for line in r.headers.split_inclusive(|&b| b == b'\n') {
                let name = line.split(|&b| b == b':').next().unwrap_or_default();
                if only(name) && !(r.edits.removes_any() && r.edits.removes(name)) {
                    out.extend_from_slice(line);
                }
            }
        }
    }
    r.edits.copy_kept(out, r.extra);
    r.edits.write_appended(out);
    field(out, b"x-request-id", r.request_id);
    if let Some(n) = r.content_length {
        content_length(out, n);
    }
    connection(out, false, r.keep_alive, r.client_version);
    out.extend_from_slice(b"\r\n");
    if !r.head_only {
        out.extend_from_slice(r.body);
    }
}

/// The standard reason phrase, or "" for codes without one here.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, NameSet, ParseLimits};

    fn forwarded(raw: &[u8], strip: Option<&[u8]>) -> String {
        let mut head = RequestHead::default();
        assert!(
            parse_request(raw, &ParseLimits::default(), &NameSet::default(), &mut head).unwrap()
        );
        let mut out = Vec::new();
        upstream_request(
            &mut out,
            raw,
            &head,
            &Forwarding {
                client_ip: b"10.0.0.1",
                proto: b"http",
                port: b"80",
                forwarded: false,
                request_id: b"rid",
                fallback_host: b"backend:80",
                strip_prefix: strip,
                traceparent: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                edits: &HeaderEdits::default(),
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hop_by_hop_fields_are_removed_and_forwarding_added() {
        let s = forwarded(
            b"POST /api/x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 1.1.1.1\r\nContent-Length: 3\r\nAccept: */*\r\n\r\n",
            Some(b"/api"),
        );
        assert!(s.starts_with("POST /x HTTP/1.1\r\n"), "{s}");
        for gone in ["X-Secret", "Keep-Alive", "TE:", "Connection"] {
            assert!(!s.contains(gone), "{gone} in {s}");
        }
        assert!(s.contains("x-forwarded-for: 1.1.1.1, 10.0.0.1\r\n"), "{s}");
        assert!(s.contains("Accept: */*\r\n"));
        assert!(s.contains("content-length: 3\r\n"));
        assert!(s.contains("x-forwarded-host: h\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn kept_lines_are_copied_as_received_including_empty_values() {
        let s = forwarded(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-A:  spaced \r\nTE: x\r\nX-B: b\r\n\r\n",
            None,
        );
        assert!(
            s.contains("\r\nX-Empty:\r\nX-A:  spaced \r\nX-B: b\r\nhost: h\r\n"),
            "{s}"
        );
    }

    #[test]
    fn the_forwarded_port_is_the_hosts_or_the_schemes() {
        assert_eq!(forwarded_port(Some(b"a.example:8443"), false), b"8443");
        assert_eq!(forwarded_port(Some(b"[::1]:8080"), true), b"8080");
        for host in [&b"a.example"[..], b"[::1]", b"a:", b"10.0.0.1", b"1234"] {
            assert_eq!(forwarded_port(Some(host), false), b"80");
            assert_eq!(forwarded_port(Some(host), true), b"443");
        }
        assert_eq!(forwarded_port(None, true), b"443");
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        assert_eq!(upstream_path(b"/api", Some(b"/api")), (&b"/"[..], &b""[..]));
        assert_eq!(
            upstream_path(b"/api?q", Some(b"/api")),
            (&b"/"[..], &b"?q"[..])
        );
        assert_eq!(
            upstream_path(b"/apix", Some(b"/api/")),
            (&b""[..], &b"/apix"[..])
        );
    }
}
