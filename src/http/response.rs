//! Response heads from upstreams, held to the same standard as requests: a response whose
//! end the gateway cannot determine unambiguously is refused (and becomes a 502), never guessed.

use std::mem::MaybeUninit;

use super::{
    classify, line_ends_are_crlf, list_items, parse_content_length, BodyLength, ConnectionOptions,
    Header, HeaderKind, Span, Version, MAX_HEADERS_CEILING,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseError {
    Malformed(&'static str),
    TooLarge,
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: Span,
    pub version: Version,
    pub headers: Vec<Header>,
    pub len: usize,
    pub body: BodyLength,
    pub keep_alive: bool,
    pub connection: ConnectionOptions,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            status: 0,
            reason: Span::EMPTY,
            version: Version::Http11,
            headers: Vec::new(),
            len: 0,
            body: BodyLength::None,
            keep_alive: false,
            connection: ConnectionOptions::default(),
        }
    }
}

/// Parses the response head at the start of `buf`. `to_head` says the request was HEAD, whose
/// response has no body whatever its headers say. `Ok(false)`: incomplete.
pub fn parse_response(
    buf: &[u8],
    to_head: bool,
    max_head_bytes: usize,
    max_headers: usize,
    head: &mut ResponseHead,
) -> Result<bool, ResponseError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CEILING];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut slots[..max_headers.min(MAX_HEADERS_CEILING)],
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head_bytes => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(false),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed("unparsable response head")),
    };
    if len > max_head_bytes {
        return Err(ResponseError::TooLarge);
    }
    let (Some(minor), Some(status)) = (resp.version, resp.code) else {
        return Err(ResponseError::Malformed("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(ResponseError::Malformed("status code out of range"));
    }
    if !line_ends_are_crlf(&buf[..len]) {
        return Err(ResponseError::Malformed("bare CR or LF in response head"));
    }
    head.status = status;
    head.reason = resp
        .reason
        .map_or(Span::EMPTY, |r| Span::of(buf, r.as_bytes()));
    head.version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    head.len = len;
    head.headers.clear();
    head.connection.clear();

    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let kind = classify(name);
        head.headers.push(Header {
            kind,
            name: Span::of(buf, name),
            value: Span::of(buf, h.value),
        });
        match kind {
            HeaderKind::ContentLength => {
                let n = parse_content_length(h.value)
                    .ok_or(ResponseError::Malformed("invalid Content-Length"))?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(ResponseError::Malformed(
                        "conflicting Content-Length headers",
                    ));
                }
                content_length = Some(n);
            }
            HeaderKind::TransferEncoding => {
                transfer_encoding = true;
                for coding in list_items(h.value) {
                    if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(ResponseError::Malformed(
                            "Transfer-Encoding other than a single chunked",
                        ));
                    }
                    chunked = true;
                }
            }
            HeaderKind::Connection => {
                for opt in list_items(h.value) {
                    if opt.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if opt.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_token = true;
                    } else if !opt.eq_ignore_ascii_case(b"upgrade")
                        && !head.connection.push(Span::of(buf, opt))
                    {
                        return Err(ResponseError::Malformed("too many Connection options"));
                    }
                }
            }
            _ => {}
        }
    }

    let bodiless = to_head || status < 200 || status == 204 || status == 304;
    head.body = if bodiless {
        BodyLength::None
    } else {
        if transfer_encoding && (content_length.is_some() || head.version == Version::Http10) {
            return Err(ResponseError::Malformed(
                "Transfer-Encoding with Content-Length or on HTTP/1.0",
            ));
        }
        match (transfer_encoding, chunked, content_length) {
            (true, false, _) => {
                return Err(ResponseError::Malformed("empty Transfer-Encoding"));
            }
            (true, true, _) => BodyLength::Chunked,
            (false, _, Some(n)) => BodyLength::Length(n),
            (false, _, None) => BodyLength::UntilClose,
        }
    };
    head.keep_alive = head.body != BodyLength::UntilClose
        && match head.version {
            Version::Http11 => !close,
            Version::Http10 => keep_alive_token && !close,
        };
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], to_head: bool) -> Result<ResponseHead, ResponseError> {
        let mut head = ResponseHead::default();
        assert!(parse_response(raw, to_head, 64 * 1024, 100, &mut head)?);
        Ok(head)
    }

    #[test]
    fn framing_is_decided() {
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false).unwrap();
        assert_eq!(h.body, BodyLength::Length(5));
        assert!(h.keep_alive);
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap();
        assert_eq!(h.body, BodyLength::None);
        let h = parse(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert_eq!(h.body, BodyLength::None);
        let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!(h.body, BodyLength::UntilClose);
        assert!(!h.keep_alive);
        let h = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(h.body, BodyLength::Chunked);
    }

    #[test]
    fn ambiguous_responses_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse(raw, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
