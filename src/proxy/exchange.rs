//! Per-request state, apart from the connection's: the generation the request runs on, who
//! sent it, its ids, what it did (for metrics and the access log), and the edits and lines its
//! filters asked for. One `Exchange` lives in each `Session` and is reset for every request, so
//! its buffers are reused and a proxied request allocates nothing.

use std::cell::Cell;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use crate::auth::Identity;
use crate::cidr::any_contains;
use crate::config::{ListenerId, RouteId, UpstreamId};
use crate::filter::Slot;
use crate::generation::{Generation, RouteEntry};
use crate::http::{HeaderEdits, HeaderKind, RequestHead};
use crate::stamp::Stamp;
use crate::tls::TlsInfo;
use crate::trace::Trace;
use crate::upstream::TargetId;

pub(crate) struct Exchange {
    /// The generation this request runs on, taken when its head arrived.
    pub gen: Rc<Generation>,
    pub listener: ListenerId,
    /// The connection's peer, and as text (what `X-Forwarded-For` gets appended).
    pub peer: IpAddr,
    pub peer_ip: IpText,
    /// The client: the peer, or for a peer in `trusted_proxies`, the rightmost untrusted
    /// `X-Forwarded-For` hop. What IP rules, rate limits, `${client_ip}` and the log see.
    pub client: IpAddr,
    pub client_ip: IpText,
    /// The peer is in `trusted_proxies`: its forwarding headers are believed and kept.
    pub peer_trusted: bool,
    /// What the connection's TLS negotiated; `None` on cleartext.
    pub tls: Option<TlsInfo>,
    /// Who the auth filter found the caller to be.
    pub identity: Option<Identity>,
    pub route: Option<RouteId>,
    pub request_id: Vec<u8>,
    /// What the request did, for metrics and the access log.
    pub log: RequestLog,
    /// The request's method, target, Referer and User-Agent, copied for the access log (only
    /// when it is on) before the head's buffer is reused.
    pub log_text: LogText,
    /// Header lines the gateway adds to this request's response (`RateLimit-*`, `X-Cache`).
    pub extra: Vec<u8>,
    /// The route's edits to the head going upstream.
    pub up_edits: HeaderEdits,
    /// The route's edits to every response head the client gets.
    pub resp_edits: HeaderEdits,
    /// The filters' edits to the upstream's response head (`on_upstream_response`).
    pub upstream_edits: HeaderEdits,
    /// The route's filters' per-request state, one slot per filter, made when a filter first
    /// keeps some (`filter::SlotRef`); empty otherwise.
    pub slots: Vec<Slot>,
}

impl Exchange {
    pub fn new(
        gen: Rc<Generation>,
        listener: ListenerId,
        peer: SocketAddr,
        tls: Option<TlsInfo>,
    ) -> Exchange {
        Exchange {
            gen,
            listener,
            peer: peer.ip(),
            peer_ip: IpText::new(peer.ip()),
            client: peer.ip(),
            client_ip: IpText::new(peer.ip()),
            peer_trusted: false,
            tls,
            identity: None,
            route: None,
            request_id: Vec::with_capacity(64),
            log: RequestLog::new(),
            log_text: LogText::default(),
            extra: Vec::new(),
            up_edits: HeaderEdits::default(),
            resp_edits: HeaderEdits::default(),
            upstream_edits: HeaderEdits::default(),
            slots: Vec::new(),
        }
    }

    /// Starts the next request on this connection, on `gen`; or, when a reload removed the
    /// connection's listener from `gen`, on the generation it had, returning false: the
    /// connection then closes after this request.
    pub fn reset(&mut self, gen: Rc<Generation>) -> bool {
        let mut stays = true;
        if !Rc::ptr_eq(&self.gen, &gen) {
            match gen.listener_after(&self.gen, self.listener) {
                Some(id) => {
                    self.listener = id;
                    self.gen = gen;
                }
                None => stays = false,
            }
        }
        self.route = None;
        self.identity = None;
        self.peer_trusted = false;
        self.log = RequestLog::new();
        self.extra.clear();
        self.up_edits.clear();
        self.resp_edits.clear();
        self.upstream_edits.clear();
        if !self.slots.is_empty() {
            self.slots.clear();
        }
        stays
    }

    /// Whether the connection's listener is still in `gen` (a reload may remove it).
    pub fn listener_in(&self, gen: &Rc<Generation>) -> bool {
        Rc::ptr_eq(&self.gen, gen) || gen.listener_after(&self.gen, self.listener).is_some()
    }

    /// Finds the request's client: the peer, unless it is a trusted proxy, in which case the
    /// `X-Forwarded-For` hops are walked from the right past every trusted one. A hop that is
    /// not an address stops the walk at the last address found.
    pub fn resolve_client(&mut self, buf: &[u8], head: &RequestHead) {
        let trusted = &self.gen.trusted_proxies;
        let mut client = self.peer;
        self.peer_trusted = any_contains(trusted, client);
        if self.peer_trusted {
            let hops = head
                .headers
                .iter()
                .rev()
                .filter(|h| h.kind == HeaderKind::XForwardedFor)
                .flat_map(|h| h.value.get(buf).rsplit(|&b| b == b','));
            for hop in hops {
                let Some(ip) = std::str::from_utf8(hop)
                    .ok()
                    .and_then(|s| s.trim().parse::<IpAddr>().ok())
                else {
                    break;
                };
                client = ip;
                if !any_contains(trusted, ip) {
                    break;
                }
            }
        }
        if client != self.client {
            self.client = client;
            self.client_ip = IpText::new(client);
        }
    }

    /// The request's route entry, once routed.
    pub fn route_entry(&self) -> Option<&RouteEntry> {
        self.route.map(|id| self.gen.route(id))
    }
}

#[derive(Default)]
pub(crate) struct LogText {
    bytes: Vec<u8>,
    /// Ends of method, target, referer, user-agent and normalized path within `bytes`.
    ends: [usize; 5],
}

impl LogText {
    /// Copies what the log shows of the request: the target as sent (`sent_target` when
    /// normalizing changed it, which also records the normalized path, unless `normalized` is
    /// false: a path refused half-way through has none).
    pub fn capture(
        &mut self,
        buf: &[u8],
        head: &RequestHead,
        sent_target: &[u8],
        normalized: bool,
    ) {
        self.bytes.clear();
        let header = |name: &str| head.header(buf, name.as_bytes()).unwrap_or_default();
        let (target, path) = match sent_target {
            [] => (head.target.get(buf), &b""[..]),
            sent if normalized => (sent, head.path.get(buf)),
            sent => (sent, &b""[..]),
        };
        for (i, part) in [
            head.method_span.get(buf),
            target,
            header("referer"),
            header("user-agent"),
            path,
        ]
        .into_iter()
        .enumerate()
        {
            self.bytes.extend_from_slice(part);
            self.ends[i] = self.bytes.len();
        }
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends = [0; 5];
    }

    pub fn part(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// The facts about one request that metrics and the access log record when it ends.
pub(crate) struct RequestLog {
    pub start: Stamp,
    /// The status sent; 0 while none has been.
    pub status: u16,
    pub upstream: Option<(UpstreamId, TargetId)>,
    pub upstream_us: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: Cell<u64>,
    /// Client-sent copies of headers the gateway vouches for, removed.
    pub identity_dropped: u32,
    /// Set when the request was forwarded (or logged).
    pub trace: Option<Trace>,
}

impl RequestLog {
    fn new() -> RequestLog {
        RequestLog {
            start: Stamp::now(),
            status: 0,
            upstream: None,
            upstream_us: None,
            bytes_in: 0,
            bytes_out: Cell::new(0),
            identity_dropped: 0,
            trace: None,
        }
    }
}

/// The client's address, formatted once per connection.
pub(crate) struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> IpText {
        let mut buf = [0u8; 45];
        let mut cursor = io::Cursor::new(&mut buf[..]);
        // 45 bytes hold the longest IPv6 text form.
        let _ = write!(cursor, "{ip}");
        let len = cursor.position() as usize;
        IpText { buf, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
