//! Response compression (`compression` on a route). `on_request` negotiates the coding from
//! `Accept-Encoding` (RFC 9110 §12.5.3: the highest q wins, ties go to the route's order, `q=0`
//! excludes, `*` stands for any coding not named, identity wins only with a higher q);
//! `on_upstream_response` decides whether this response is compressed (its type, its size,
//! no Content-Encoding of its own, no `no-transform`, not 204/304/206, not a Range answer) and
//! edits its head (`Content-Encoding`, `Vary: Accept-Encoding` merged, a strong ETag made weak,
//! no Content-Length: the body goes chunked); `on_body` compresses as the body passes and
//! flushes whatever it holds when the upstream pauses, so a slow upstream's first part reaches
//! the client before the upstream ends; `on_done` counts what it did however the exchange ended.
//!
//! Memory per compressing stream is bounded, whatever the body's size: the encoders' state is
//! fixed by their window and level (gzip: level 2, 32 KiB window, zlib memLevel 8, about 256 KiB of
//! tables; brotli quality 3 with a 64 KiB window; zstd level 1 with a 128 KiB window), plus what
//! one read of the upstream's body compresses to.

use std::io::Write;

use super::{BodyStep, Done, Flow, RequestInfo, ResponseOut, ResponseView, Slot, SlotRef};
use crate::config::{Coding, Compression};
use crate::http::{list_items, BodyLength, HeaderEdits, ResponseHead};

/// Levels: fast ones. gzip 2: zlib-rs's level 1 is a quicker strategy than zlib's (its output
/// for a 20 KiB JSON is 43% larger than nginx's at `gzip_comp_level 1`); its level 2 matches
/// that size (3,620 vs 3,679 bytes) at 0.83× nginx's CPU (loadtest `--compression`). Brotli 3
/// is Envoy's default.
const GZIP_LEVEL: u32 = 2;
/// Brotli below 2 compresses each write on its own: a body arriving in small pieces grows.
const BROTLI_QUALITY: u32 = 3;
const BROTLI_LGWIN: u32 = 16;
const ZSTD_LEVEL: i32 = 1;
const ZSTD_WINDOW_LOG: u32 = 17;

pub struct Compress {
    algorithms: Box<[Coding]>,
    min_bytes: u64,
    /// Lower-case `type/subtype`, or `type/` for `type/*`.
    types: Box<[Box<[u8]>]>,
    /// The fields a compressed head replaces, as `HeaderEdits::remove_encoded` takes them.
    content_length: Box<[u8]>,
    etag: Box<[u8]>,
    vary: Box<[u8]>,
}

/// One request's compression.
pub struct CompressSlot {
    /// The coding negotiated for the request; `None`: identity.
    coding: Option<Coding>,
    /// Compressing this response's body.
    encoder: Option<Encoder>,
    /// The response is compressed (its head says so), with this coding.
    compressed: Option<Coding>,
    bytes_in: u64,
    bytes_out: u64,
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    fn new(coding: Coding) -> Option<Encoder> {
        Some(match coding {
            Coding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(GZIP_LEVEL),
            )),
            Coding::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                BROTLI_QUALITY,
                BROTLI_LGWIN,
            ))),
            Coding::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).ok()?;
                e.window_log(ZSTD_WINDOW_LOG).ok()?;
                Encoder::Zstd(e)
            }
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Br(e) => e.write_all(data),
            Encoder::Zstd(e) => e.write_all(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Br(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }

    /// What it produced so far.
    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Br(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Br(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

/// The coding `accept` (the Accept-Encoding values) asks for among `algorithms`; `None`:
/// identity (no header, nothing acceptable, or identity preferred).
pub fn negotiate<'a>(
    accept: impl Iterator<Item = &'a [u8]>,
    algorithms: &[Coding],
) -> Option<Coding> {
    let mut q = [None::<u16>; 3];
    let (mut star, mut identity) = (None, None);
    let mut any = false;
    for value in accept {
        any = true;
        for item in list_items(value) {
            let mut parts = item.split(|&b| b == b';');
            let name = parts.next().unwrap_or_default().trim_ascii();
            let weight = parts
                .filter_map(|p| {
                    let p = p.trim_ascii();
                    (p.len() > 2 && p[..2].eq_ignore_ascii_case(b"q=")).then(|| qvalue(&p[2..]))
                })
                .next()
                .unwrap_or(Some(1000));
            let Some(weight) = weight else { continue };
            if name == b"*" {
                star = Some(weight);
            } else if name.eq_ignore_ascii_case(b"identity") {
                identity = Some(weight);
            } else if let Some(i) = Coding::ALL
                .iter()
                .position(|c| name.eq_ignore_ascii_case(c.token().as_bytes()))
            {
                q[i] = Some(weight);
            }
        }
    }
    if !any {
        return None;
    }
    let mut best: Option<(Coding, u16)> = None;
    for &c in algorithms {
        let i = Coding::ALL.iter().position(|&a| a == c).unwrap_or(0);
        let w = q[i].or(star).unwrap_or(0);
        if w > 0 && best.is_none_or(|(_, b)| w > b) {
            best = Some((c, w));
        }
    }
    // Identity is acceptable anyway; it wins only when the client rates it above the best.
    best.filter(|&(_, w)| identity.is_none_or(|i| w >= i))
        .map(|(c, _)| c)
}

/// A qvalue in thousandths (`0`, `0.5`, `1.000`); `None` if it is not one.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

impl Compress {
    pub fn new(c: &Compression) -> Compress {
        Compress {
            algorithms: c.algorithms.as_slice().into(),
            min_bytes: c.min_bytes,
            types: c
                .types
                .iter()
                .map(|t| t.strip_suffix('*').unwrap_or(t).as_bytes().into())
                .collect(),
            content_length: encoded(b"content-length"),
            etag: encoded(b"etag"),
            vary: encoded(b"vary"),
        }
    }

    /// The coding this route would choose for the request (the cache keys by it).
    pub fn coding_for(&self, req: &RequestInfo<'_>) -> Option<Coding> {
        let (buf, head) = (req.view.buf, req.view.head);
        let accept = head
            .headers
            .iter()
            .filter(|h| h.name.get(buf).eq_ignore_ascii_case(b"accept-encoding"))
            .map(|h| h.value.get(buf));
        negotiate(accept, &self.algorithms)
    }

    /// Negotiates; a Range request is never compressed (its parts are of the identity body).
    pub fn on_request(&self, req: &RequestInfo<'_>, slot: SlotRef<'_>) {
        if req.view.header(b"range").is_some() {
            return;
        }
        slot.set(Slot::Compress(Box::new(CompressSlot {
            coding: self.coding_for(req),
            encoder: None,
            compressed: None,
            bytes_in: 0,
            bytes_out: 0,
        })));
    }

    /// Whether the response is one to compress, whatever the client accepts.
    fn compressible(&self, resp: ResponseView<'_>) -> bool {
        let (buf, head) = (resp.buf, resp.head);
        if matches!(head.status, 100..=199 | 204 | 206 | 304) {
            return false;
        }
        if let BodyLength::Length(n) = head.body {
            if n < self.min_bytes || n == 0 {
                return false;
            }
        }
        let mut typed = false;
        for h in &head.headers {
            let (name, value) = (h.name.get(buf), h.value.get(buf));
            if name.eq_ignore_ascii_case(b"content-encoding") {
                if !list_items(value).all(|c| c.eq_ignore_ascii_case(b"identity")) {
                    return false;
                }
            } else if name.eq_ignore_ascii_case(b"content-range") {
                return false;
            } else if name.eq_ignore_ascii_case(b"cache-control") {
                if list_items(value).any(|d| d.eq_ignore_ascii_case(b"no-transform")) {
                    return false;
                }
            } else if name.eq_ignore_ascii_case(b"content-type") {
                let media = value.split(|&b| b == b';').next().unwrap_or_default();
                let media = media.trim_ascii();
                typed = self.types.iter().any(|t| {
                    if t.ends_with(b"/") {
                        media.len() > t.len() && media[..t.len()].eq_ignore_ascii_case(t)
                    } else {
                        media.eq_ignore_ascii_case(t)
                    }
                });
            }
        }
        typed
    }

    pub fn on_upstream_response(
        &self,
        slot: &mut Slot,
        resp: ResponseView<'_>,
        out: &mut ResponseOut<'_>,
    ) -> Flow {
        let Slot::Compress(s) = slot else {
            return Flow::Continue;
        };
        if resp.head.status == 304 && s.coding.is_some() {
            // It revalidates what this client would get compressed: its tag stays weak.
            self.weaken_etag(resp.buf, resp.head, out.edits);
        }
        if !self.compressible(resp) {
            return Flow::Continue;
        }
        let (buf, head) = (resp.buf, resp.head);
        self.merge_vary(buf, head, out.edits);
        let Some(coding) = s.coding else {
            return Flow::Continue;
        };
        // The encoder first: a head must not say a coding its body will not have.
        let encoder = match head.body {
            BodyLength::None => None,
            _ => match Encoder::new(coding) {
                Some(e) => Some(e),
                None => return Flow::Continue,
            },
        };
        let edits = &mut *out.edits;
        // A HEAD's answer gets the headers GET's would: no length (the body would go chunked).
        edits.remove_encoded(&self.content_length);
        edits.append_lines(b"content-encoding: ");
        edits.append_lines(coding.token().as_bytes());
        edits.append_lines(b"\r\n");
        self.weaken_etag(buf, head, edits);
        // A HEAD's answer says what GET's would, and counts as nothing compressed.
        s.compressed = encoder.is_some().then_some(coding);
        out.reframes = encoder.is_some();
        s.encoder = encoder;
        Flow::Continue
    }

    /// A strong ETag made weak: the compressed body is not the upstream's byte for byte.
    fn weaken_etag(&self, buf: &[u8], head: &ResponseHead, edits: &mut HeaderEdits) {
        let etag = head
            .headers
            .iter()
            .find(|h| h.name.get(buf).eq_ignore_ascii_case(b"etag"))
            .map(|h| h.value.get(buf));
        if let Some(tag) = etag.filter(|t| t.starts_with(b"\"")) {
            edits.remove_encoded(&self.etag);
            edits.append_lines(b"etag: W/");
            edits.append_lines(tag);
            edits.append_lines(b"\r\n");
        }
    }

    /// `Vary: Accept-Encoding` on a response that depends on it, merged into the upstream's own
    /// (unless that says it already, or `*`).
    fn merge_vary(&self, buf: &[u8], head: &ResponseHead, edits: &mut HeaderEdits) {
        let varies = head
            .headers
            .iter()
            .filter(|h| h.name.get(buf).eq_ignore_ascii_case(b"vary"));
        let items = || varies.clone().flat_map(|h| list_items(h.value.get(buf)));
        if items().any(|i| i == b"*" || i.eq_ignore_ascii_case(b"accept-encoding")) {
            return;
        }
        if varies.clone().next().is_some() {
            edits.remove_encoded(&self.vary);
        }
        edits.append_lines(b"vary: ");
        for item in items() {
            edits.append_lines(item);
            edits.append_lines(b", ");
        }
        edits.append_lines(b"Accept-Encoding\r\n");
    }
}

/// The name list `HeaderEdits::remove_encoded` takes, for one name.
fn encoded(name: &[u8]) -> Box<[u8]> {
    let mut list = Vec::with_capacity(1 + 2 * name.len());
    HeaderEdits::encode_name(&mut list, name);
    list.into()
}

/// One body step through the slot's encoder, what it produced handed to `pass` (the filters
/// after it). Returns false when the slot does not compress this body (the step goes on as is).
pub fn step(slot: &mut Slot, step: BodyStep<'_>, pass: &mut dyn FnMut(&[u8])) -> bool {
    let Slot::Compress(s) = slot else {
        return false;
    };
    let Some(encoder) = s.encoder.as_mut() else {
        return false;
    };
    let result = match step {
        BodyStep::Data(data) => {
            s.bytes_in += data.len() as u64;
            encoder.write(data)
        }
        BodyStep::Flush => encoder.flush(),
        BodyStep::End => {
            if let Some(encoder) = s.encoder.take() {
                match encoder.finish() {
                    Ok(rest) => {
                        s.bytes_out += rest.len() as u64;
                        pass(&rest);
                    }
                    Err(e) => tracing::debug!(error = %e, "compression failed at the end"),
                }
            }
            return true;
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "compression failed");
    }
    let produced = encoder.output();
    if !produced.is_empty() {
        s.bytes_out += produced.len() as u64;
        pass(produced);
        produced.clear();
    }
    true
}

/// However the exchange ended: what was compressed is counted.
pub fn on_done(slot: &mut Slot, done: &Done<'_>) -> Flow {
    if let Slot::Compress(s) = std::mem::take(slot) {
        if let Some(coding) = s.compressed {
            let i = Coding::ALL.iter().position(|&c| c == coding).unwrap_or(0);
            done.metrics
                .borrow_mut()
                .record_compression(done.route, i, s.bytes_in, s.bytes_out);
        }
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> Vec<u8> {
        (0..600)
            .flat_map(|i| {
                format!("{{\"id\":{i},\"name\":\"item {i}\",\"tags\":[\"a\",\"b\"]}},").into_bytes()
            })
            .collect()
    }

    #[test]
    fn every_encoder_shrinks_text_and_flushes_what_it_has() {
        for coding in Coding::ALL {
            let mut e = Encoder::new(coding).unwrap();
            let input = text();
            e.write(&input[..input.len() / 2]).unwrap();
            e.flush().unwrap();
            let flushed = e.output().len();
            assert!(flushed > 0, "{coding:?} flushed nothing");
            e.write(&input[input.len() / 2..]).unwrap();
            let mut out = std::mem::take(e.output());
            out.extend(e.finish().unwrap());
            assert!(
                out.len() < input.len() / 3,
                "{coding:?}: {} of {}",
                out.len(),
                input.len()
            );
        }
    }

    #[test]
    fn negotiation() {
        let all = [Coding::Zstd, Coding::Br, Coding::Gzip];
        let n = |v: &str| negotiate(std::iter::once(v.as_bytes()), &all);
        assert_eq!(n("gzip, br"), Some(Coding::Br));
        assert_eq!(n("gzip;q=0.8, br;q=0.5"), Some(Coding::Gzip));
        assert_eq!(n("*;q=0.5, zstd;q=0"), Some(Coding::Br));
        assert_eq!(n("identity;q=1, gzip;q=0.5"), None);
        assert_eq!(n("GZIP;Q=0.001"), Some(Coding::Gzip));
        assert_eq!(n("gzip;q=1.5"), None);
        assert_eq!(n(""), None);
        assert_eq!(negotiate(std::iter::empty(), &all), None);
        assert_eq!(
            negotiate(
                std::iter::once(&b"br, gzip"[..]),
                &[Coding::Gzip, Coding::Br]
            ),
            Some(Coding::Gzip)
        );
    }
}
