//! The chunked transfer coding (RFC 9112 §7.1). The decoder is a byte-at-a-time state machine
//! over framing bytes that hands back ranges of chunk data, so a body can be decoded across any
//! split of reads without copying. Sizes, extensions and trailers are checked strictly: a proxy
//! that tolerates what the next hop reads differently is a request-smuggling vector.
//! Trailers are validated and dropped (most HTTP/1.1 recipients ignore them).

use std::ops::Range;

use super::hex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    InvalidSize,
    SizeOverflow,
    BadLineEnd,
    ExtensionTooLong,
    InvalidExtension,
    InvalidTrailer,
    TrailersTooLarge,
}

impl ChunkError {
    pub fn reason(self) -> &'static str {
        match self {
            ChunkError::InvalidSize => "invalid chunk size",
            ChunkError::SizeOverflow => "chunk size overflows",
            ChunkError::BadLineEnd => "chunk framing without CRLF",
            ChunkError::ExtensionTooLong => "chunk extension too long",
            ChunkError::InvalidExtension => "invalid chunk extension",
            ChunkError::InvalidTrailer => "invalid trailer field",
            ChunkError::TrailersTooLarge => "trailers too large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits; `digits` so far.
    Size,
    /// Whitespace after the size, before `;`.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line, or the final CRLF.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// What one `decode` call found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Chunk data at this range of the input.
    Data(Range<usize>),
    /// The body ended (last chunk and trailers consumed).
    Done,
    /// All input was framing; more is needed.
    NeedMore,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u32,
    ext_len: usize,
    trailer_len: usize,
    max_ext: usize,
    max_trailers: usize,
}

impl ChunkedDecoder {
    pub fn new(max_ext: usize, max_trailers: usize) -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            digits: 0,
            ext_len: 0,
            trailer_len: 0,
            max_ext,
            max_trailers,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `input` up to the next chunk data, which it returns as a range
    /// (bounded by the input). Returns how many bytes were consumed, data included.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Decoded), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => match hex(b) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 16 + 64 {
                            // Leading zeros are legal but unbounded; cap the line.
                            return Err(ChunkError::InvalidSize);
                        }
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or(ChunkError::SizeOverflow)?;
                    }
                    None if self.digits == 0 => return Err(ChunkError::InvalidSize),
                    None => match b {
                        b'\r' => self.state = State::SizeLf,
                        b';' => self.state = State::Extension,
                        b' ' | b'\t' => self.state = State::SizeSpace,
                        _ => return Err(ChunkError::InvalidSize),
                    },
                },
                State::SizeSpace => match b {
                    b' ' | b'\t' => self.bump_ext()?,
                    b';' => self.state = State::Extension,
                    _ => return Err(ChunkError::InvalidSize),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => self.bump_ext()?,
                    _ => return Err(ChunkError::InvalidExtension),
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok((i + n, Decoded::Data(i..i + n)));
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Size;
                    self.digits = 0;
                    self.ext_len = 0;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if super::is_token(&[b]) {
                        self.bump_trailer()?;
                        self.state = State::TrailerName;
                    } else {
                        return Err(ChunkError::InvalidTrailer);
                    }
                }
                State::TrailerName => {
                    self.bump_trailer()?;
                    if b == b':' {
                        self.state = State::TrailerValue;
                    } else if !super::is_token(&[b]) {
                        return Err(ChunkError::InvalidTrailer);
                    }
                }
                State::TrailerValue => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => self.bump_trailer()?,
                    _ => return Err(ChunkError::InvalidTrailer),
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Done;
                    return Ok((i + 1, Decoded::Done));
                }
                State::Done => return Ok((i, Decoded::Done)),
            }
            i += 1;
        }
        if self.state == State::Done {
            return Ok((i, Decoded::Done));
        }
        Ok((i, Decoded::NeedMore))
    }

    fn bump_ext(&mut self) -> Result<(), ChunkError> {
        self.ext_len += 1;
        if self.ext_len > self.max_ext {
            return Err(ChunkError::ExtensionTooLong);
        }
        Ok(())
    }

    fn bump_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailer_len += 1;
        if self.trailer_len > self.max_trailers {
            return Err(ChunkError::TrailersTooLarge);
        }
        Ok(())
    }
}

/// The chunk-size line for `len` bytes of data.
pub fn write_chunk_header(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns the data and whether it ended.
    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut dec = ChunkedDecoder::new(64, 256);
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            loop {
                let (n, ev) = dec.decode(&pending)?;
                match ev {
                    Decoded::Data(r) => out.extend_from_slice(&pending[r]),
                    Decoded::Done => return Ok((out, true)),
                    Decoded::NeedMore => {}
                }
                pending.drain(..n);
                if pending.is_empty() {
                    break;
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_across_any_split() {
        let body = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for step in 1..body.len() {
            let (data, done) = decode_all(body, step).unwrap();
            assert_eq!(data, b"hello world");
            assert!(done);
        }
    }

    #[test]
    fn strict_framing() {
        for bad in [
            &b"-5\r\nhello\r\n0\r\n\r\n"[..],
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"\r\n",
            b"0\r\n bad\r\n\r\n",
            b"0\r\nno-colon\r\n\r\n",
        ] {
            assert!(
                decode_all(bad, bad.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode_all(
                b"5;xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n",
                8
            ),
            Err(ChunkError::ExtensionTooLong)
        );
    }

    #[test]
    fn chunk_header_is_lower_hex() {
        let mut out = Vec::new();
        write_chunk_header(&mut out, 0x1f3);
        assert_eq!(out, b"1f3\r\n");
        out.clear();
        write_chunk_header(&mut out, 0);
        assert_eq!(out, b"0\r\n");
    }
}
