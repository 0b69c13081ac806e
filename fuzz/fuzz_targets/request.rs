//! Fuzzes the request path's codec: the head parser, path normalization (no panic, and a
//! normalized path normalizes to itself), the upstream head writer and the chunked decoder,
//! with the input split in two at a point the input chooses, as reads split it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::http::chunked::{ChunkedDecoder, Decoded};
use ringway::http::write::{upstream_request, Forwarding};
use ringway::http::path::{normalize, EncodedSlashes};
use ringway::http::{parse_request, BodyLength, HeaderEdits, NameSet, ParseLimits, RequestHead};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = usize::from(cut).min(data.len());
    let limits = ParseLimits::default();
    let mut head = RequestHead::default();
    let complete = match parse_request(&data[..cut], &limits, &NameSet::default(), &mut head) {
        Ok(true) => true,
        Ok(false) => matches!(parse_request(data, &limits, &NameSet::default(), &mut head), Ok(true)),
        Err(_) => false,
    };
    if !complete {
        return;
    }
    let buf = if head.len <= cut { &data[..cut] } else { data };
    let mode = match cut % 3 {
        0 => EncodedSlashes::Reject,
        1 => EncodedSlashes::Keep,
        _ => EncodedSlashes::Decode,
    };
    let mut owned = buf.to_vec();
    if normalize(&mut owned, &mut head, mode).is_err() {
        return;
    }
    let buf = &owned[..];
    // Idempotent: the normalized path, normalized again, is unchanged.
    let mut again = owned.clone();
    let mut head2 = head.clone();
    assert_eq!(normalize(&mut again, &mut head2, mode), Ok(false));
    assert_eq!(head2.path.get(&again), head.path.get(buf));
    let mut out = Vec::new();
    upstream_request(
        &mut out,
        buf,
        &head,
        &Forwarding {
            client_ip: b"10.0.0.1",
            proto: b"http",
            port: b"80",
            forwarded: false,
            request_id: b"id",
            fallback_host: b"up",
            strip_prefix: Some(b"/a"),
            traceparent: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            edits: &HeaderEdits::default(),
        },
    );
    if head.body == BodyLength::Chunked {
        let mut decoder = ChunkedDecoder::new(limits.max_chunk_extension_bytes, limits.max_trailer_bytes);
        let mut rest = &data[head.len.min(data.len())..];
        // Every call consumes input or ends: bounded by the input length.
        for _ in 0..=rest.len() {
            match decoder.decode(rest) {
                Ok((used, Decoded::Data(_))) | Ok((used, Decoded::NeedMore)) => {
                    rest = &rest[used..];
                    if rest.is_empty() {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
});
