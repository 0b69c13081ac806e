//! Range requests answered from a stored full response (RFC 9110 §14, RFC 9111 §3.4): one byte
//! range gets a 206 with its `Content-Range`; a range that starts past the end gets a 416.
//! Several ranges get the whole response (a 200, which RFC 9110 §14.2 allows): a
//! `multipart/byteranges` body would cost more than it saves for the small entries a gateway
//! caches. `If-Range` is honoured with a strong entity tag or the exact `Last-Modified` date.

use super::policy::http_date;
use super::Entry;

/// What a request's `Range` asks of an entry of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranged {
    /// The whole response, as if no range had been asked.
    Full,
    /// Bytes `first..=last`.
    Part { first: u64, last: u64 },
    /// A 416.
    Unsatisfiable,
}

/// What to answer for `range` (the `Range` value; empty when absent) and `if_range`.
pub fn ranged(range: &[u8], if_range: &[u8], entry: &Entry) -> Ranged {
    if range.is_empty() || entry.status != 200 || !if_range_holds(if_range, entry) {
        return Ranged::Full;
    }
    parse(range, entry.body.len() as u64).unwrap_or(Ranged::Full)
}

/// `If-Range`: absent, or a strong validator of the stored response.
fn if_range_holds(if_range: &[u8], entry: &Entry) -> bool {
    let v = if_range.trim_ascii();
    if v.is_empty() {
        return true;
    }
    if v.starts_with(b"\"") {
        return entry.etag.as_deref().is_some_and(|e| e.trim_ascii() == v);
    }
    if v.starts_with(b"W/") {
        return false;
    }
    match (http_date(v), &entry.last_modified) {
        (Some(date), Some((modified, _))) => date == *modified,
        _ => false,
    }
}

/// One `bytes=` range against `len` bytes; `None` for a value to ignore (another unit, bad
/// syntax, several ranges).
fn parse(value: &[u8], len: u64) -> Option<Ranged> {
    let eq = value.iter().position(|&b| b == b'=')?;
    if !value[..eq].trim_ascii().eq_ignore_ascii_case(b"bytes") {
        return None;
    }
    let spec = value[eq + 1..].trim_ascii();
    if spec.contains(&b',') {
        return None;
    }
    let dash = spec.iter().position(|&b| b == b'-')?;
    let number = |s: &[u8]| -> Option<Option<u64>> {
        let s = s.trim_ascii();
        if s.is_empty() {
            return Some(None);
        }
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok().map(Some)
    };
    let (first, last) = (number(&spec[..dash])?, number(&spec[dash + 1..])?);
    Some(match (first, last) {
        (None, None) => return None,
        // The last n bytes.
        (None, Some(0)) => Ranged::Unsatisfiable,
        (None, Some(_)) if len == 0 => Ranged::Unsatisfiable,
        (None, Some(n)) => Ranged::Part {
            first: len.saturating_sub(n),
            last: len - 1,
        },
        (Some(first), last) => {
            if last.is_some_and(|l| l < first) {
                return None;
            }
            if first >= len {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part {
                    first,
                    last: last.map_or(len - 1, |l| l.min(len - 1)),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_in_all_three_forms() {
        let part = |first, last| Some(Ranged::Part { first, last });
        assert_eq!(parse(b"bytes=0-9", 100), part(0, 9));
        assert_eq!(parse(b"bytes=90-", 100), part(90, 99));
        assert_eq!(parse(b"bytes=-10", 100), part(90, 99));
        assert_eq!(parse(b"bytes=-1000", 100), part(0, 99));
        assert_eq!(parse(b"bytes=50-1000", 100), part(50, 99));
        assert_eq!(parse(b"Bytes = 1-1", 100), part(1, 1));
    }

    #[test]
    fn past_the_end_is_unsatisfiable_and_nonsense_is_ignored() {
        assert_eq!(parse(b"bytes=100-", 100), Some(Ranged::Unsatisfiable));
        assert_eq!(parse(b"bytes=-0", 100), Some(Ranged::Unsatisfiable));
        assert_eq!(parse(b"bytes=0-", 0), Some(Ranged::Unsatisfiable));
        for ignored in [
            &b"bytes=9-1"[..],
            b"bytes=a-b",
            b"bytes=-",
            b"items=0-1",
            b"bytes=0-1,5-6",
            b"bytes 0-1",
        ] {
            assert_eq!(
                parse(ignored, 100),
                None,
                "{:?}",
                String::from_utf8_lossy(ignored)
            );
        }
    }
}
