//! W3C Trace Context (`traceparent`): the gateway joins the client's trace, or starts one, and
//! sends the upstream a `traceparent` with the same trace id and a new span id (its own hop).
//! `tracestate` is passed through untouched.

use crate::rng::Rng;

/// `00-<trace-id>-<span-id>-<flags>`.
pub const TRACEPARENT_LEN: usize = 55;

/// The trace a request belongs to and the span the gateway opened for it.
#[derive(Debug, Clone, Copy)]
pub struct Trace {
    /// `traceparent` for the upstream.
    pub header: [u8; TRACEPARENT_LEN],
}

impl Trace {
    /// Joins the trace in `incoming` (a `traceparent` value) if it is valid, else starts one.
    pub fn new(incoming: Option<&[u8]>, rng: &Rng) -> Trace {
        let mut header = *b"00-00000000000000000000000000000000-0000000000000000-01";
        match incoming.and_then(parse) {
            Some((trace_id, flags)) => {
                header[3..35].copy_from_slice(trace_id);
                header[53..55].copy_from_slice(flags);
            }
            None => rng.fill_hex(&mut header[3..35]),
        }
        rng.fill_hex(&mut header[36..52]);
        Trace { header }
    }

    pub fn trace_id(&self) -> &[u8] {
        &self.header[3..35]
    }
}

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `(trace-id, flags)` of a valid `traceparent` (version 00, or a later version's first four
/// fields); `None` for anything the spec says to ignore.
fn parse(v: &[u8]) -> Option<(&[u8], &[u8])> {
    if v.len() < TRACEPARENT_LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (version, trace_id, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let valid = is_lower_hex(version)
        && version != b"ff"
        && (version != b"00" || v.len() == TRACEPARENT_LEN)
        && (v.len() == TRACEPARENT_LEN || v[55] == b'-')
        && is_lower_hex(trace_id)
        && trace_id.iter().any(|&b| b != b'0')
        && is_lower_hex(parent)
        && parent.iter().any(|&b| b != b'0')
        && is_lower_hex(flags);
    valid.then_some((trace_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_a_valid_trace_with_a_new_span() {
        let rng = Rng::seeded(3);
        let incoming = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = Trace::new(Some(incoming), &rng);
        let h = std::str::from_utf8(&t.header).unwrap();
        assert!(h.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{h}");
        assert!(h.ends_with("-01"));
        assert_ne!(&h[36..52], "00f067aa0ba902b7");
        assert!(is_lower_hex(&t.header[36..52]));
    }

    #[test]
    fn starts_a_trace_when_the_incoming_one_is_invalid() {
        let rng = Rng::seeded(4);
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"garbage",
        ] {
            let t = Trace::new(Some(bad), &rng);
            assert_ne!(t.trace_id(), bad.get(3..35).unwrap_or_default());
            assert!(is_lower_hex(t.trace_id()));
        }
        // A later version may carry more fields.
        let future = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert_eq!(Trace::new(Some(future), &rng).trace_id(), &future[3..35]);
    }
}
