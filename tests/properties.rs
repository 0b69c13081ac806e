//! Properties of the codec, checked on generated input: a valid request parses to the same head
//! and body however its bytes are split across reads, mutated input never panics, never
//! loops, and is either refused or parsed into spans that lie inside the buffer, and a
//! normalized path is normalized (normalizing it again changes nothing).

use proptest::prelude::*;
use ringway::http::chunked::{ChunkedDecoder, Decoded};
use ringway::http::path::{self, EncodedSlashes};
use ringway::http::write::{upstream_request, Forwarding};
use ringway::http::{parse_request, BodyLength, HeaderEdits, NameSet, ParseLimits, RequestHead};

#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunks: Option<Vec<usize>>,
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]);
    let path = "/[a-z0-9/._-]{0,40}(\\?[a-z0-9=&]{0,20})?";
    let header = ("X-[A-Za-z]{1,12}", "[ -~]{0,30}").prop_map(|(n, v)| (n, v.trim().to_owned()));
    let headers = prop::collection::vec(header, 0..8);
    let body = prop::collection::vec(any::<u8>(), 0..300);
    let chunks = prop::option::of(prop::collection::vec(1usize..64, 1..6));
    (method, path, headers, body, chunks).prop_map(|(method, path, headers, body, chunks)| {
        Request {
            method,
            path,
            headers,
            body,
            chunks,
        }
    })
}

impl Request {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: example.com\r\n",
            self.method, self.path
        );
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        let mut out = match &self.chunks {
            Some(_) => format!("{out}Transfer-Encoding: chunked\r\n\r\n").into_bytes(),
            None => format!("{out}Content-Length: {}\r\n\r\n", self.body.len()).into_bytes(),
        };
        match &self.chunks {
            None => out.extend_from_slice(&self.body),
            Some(sizes) => {
                let mut rest = &self.body[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = sizes[i % sizes.len()].min(rest.len());
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                    i += 1;
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        out
    }
}

/// What the gateway takes from a request: its head as forwarded, and its body.
fn process(pieces: &[&[u8]]) -> Option<(Vec<u8>, Vec<u8>)> {
    let limits = ParseLimits::default();
    let mut head = RequestHead::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut pieces = pieces.iter();
    loop {
        if !buf.is_empty() && parse_request(&buf, &limits, &NameSet::default(), &mut head).ok()? {
            break;
        }
        buf.extend_from_slice(pieces.next()?);
    }
    let mut forwarded = Vec::new();
    upstream_request(
        &mut forwarded,
        &buf,
        &head,
        &Forwarding {
            client_ip: b"10.0.0.1",
            proto: b"http",
            port: b"80",
            forwarded: false,
            request_id: b"id",
            fallback_host: b"up",
            strip_prefix: None,
            traceparent: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            edits: &HeaderEdits::default(),
        },
    );
    let mut pending = buf.split_off(head.len);
    let mut body = Vec::new();
    match head.body {
        BodyLength::None => {}
        BodyLength::Length(n) => {
            while (pending.len() as u64) < n {
                pending.extend_from_slice(pieces.next()?);
            }
            body.extend_from_slice(&pending[..n as usize]);
        }
        BodyLength::Chunked => {
            let mut decoder = ChunkedDecoder::new(4096, 4096);
            loop {
                let (used, found) = decoder.decode(&pending).ok()?;
                match found {
                    Decoded::Data(r) => body.extend_from_slice(&pending[r]),
                    Decoded::Done => break,
                    Decoded::NeedMore => pending.extend_from_slice(pieces.next()?),
                }
                pending.drain(..used);
            }
        }
        BodyLength::UntilClose => unreachable!("requests are never close-delimited"),
    }
    Some((forwarded, body))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_split_of_a_valid_request_parses_the_same(req in request(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let bytes = req.bytes();
        let whole = process(&[&bytes]).expect("a valid request parses");
        prop_assert_eq!(&whole.1, &req.body);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for p in points.into_iter().chain([bytes.len()]) {
            pieces.push(&bytes[from..p]);
            from = p;
        }
        prop_assert_eq!(process(&pieces), Some(whole));
    }

    #[test]
    fn mutated_requests_never_panic_or_escape_their_buffer(req in request(), edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)) {
        let mut bytes = req.bytes();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => { bytes.remove(i); }
            }
            if bytes.is_empty() { bytes.push(byte); }
        }
        // Either refused, incomplete, or parsed with every span inside the buffer.
        let _ = process(&[&bytes]);
        let mut head = RequestHead::default();
        if let Ok(true) = parse_request(&bytes, &ParseLimits::default(), &NameSet::default(), &mut head) {
            prop_assert!(head.len <= bytes.len());
            for h in &head.headers {
                prop_assert!(h.name.end as usize <= head.len && h.value.end as usize <= head.len);
            }
        }
    }

    #[test]
    fn chunked_decoding_is_split_invariant(body in prop::collection::vec(any::<u8>(), 0..2000), sizes in prop::collection::vec(1usize..300, 1..5), step in 1usize..64) {
        let req = Request { method: "POST", path: "/".into(), headers: vec![], body: body.clone(), chunks: Some(sizes) };
        let bytes = req.bytes();
        let pieces: Vec<&[u8]> = bytes.chunks(step).collect();
        let (_, got) = process(&pieces).expect("parses");
        prop_assert_eq!(got, body);
    }
}

/// Parses `GET {target}` and normalizes it; the path, or `None` when refused.
fn normalize(target: &str, mode: EncodedSlashes) -> Option<String> {
    let mut buf = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").into_bytes();
    let mut head = RequestHead::default();
    if !matches!(
        parse_request(
            &buf,
            &ParseLimits::default(),
            &NameSet::default(),
            &mut head
        ),
        Ok(true)
    ) {
        return None;
    }
    path::normalize(&mut buf, &mut head, mode).ok()?;
    assert!(head.path.end as usize <= head.len && head.target.end == head.path.end);
    Some(String::from_utf8_lossy(head.path.get(&buf)).into_owned())
}

proptest! {
    #[test]
    fn normalized_paths_are_fixed_points(
        raw in "/[/.%2eEfF5cC4a1;x?~\\#-]{0,30}",
        mode in prop::sample::select(vec![EncodedSlashes::Reject, EncodedSlashes::Keep, EncodedSlashes::Decode]),
    ) {
        let Some(once) = normalize(&raw, mode) else { return Ok(()) };
        prop_assert_eq!(normalize(&once, mode), Some(once.clone()), "{}", raw);
        let p = once.split('?').next().unwrap_or_default();
        prop_assert!(p.starts_with('/'));
        prop_assert!(!p.contains("//"), "{}", once);
        for seg in p.split('/') {
            prop_assert!(seg != "." && seg != "..", "{}", once);
        }
        // What remains encoded is upper-case and not an unreserved character.
        for (i, _) in p.match_indices('%') {
            let hex = &p[i + 1..i + 3];
            prop_assert_eq!(hex, hex.to_ascii_uppercase());
            let b = u8::from_str_radix(hex, 16).unwrap();
            prop_assert!(!(b.is_ascii_alphanumeric() || b"-._~".contains(&b)), "{}", once);
        }
    }
}

#[test]
fn the_generator_makes_parseable_requests() {
    // Guards the generator itself: a fixed sample must parse.
    let req = Request {
        method: "GET",
        path: "/a?b=c".into(),
        headers: vec![("X-A".into(), "1".into())],
        body: vec![],
        chunks: None,
    };
    assert!(process(&[&req.bytes()]).is_some());
}
