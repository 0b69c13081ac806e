//! A gigabyte each way streams through bounded buffers: the gateway's peak RSS stays small.

mod common;

use std::io::{Read, Write};
use std::thread;

use common::*;

const GIB: u64 = 1 << 30;
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// The byte at `offset` of the test stream, so both ends can check every byte.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn fill_pattern(buf: &mut [u8], start: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(start + i as u64);
    }
}

/// Reads exactly `len` bytes from `r`, checking each against the pattern.
fn check_pattern(r: &mut impl Read, len: u64) {
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0;
    while offset < len {
        let want = ((len - offset) as usize).min(buf.len());
        let n = r.read(&mut buf[..want]).unwrap();
        assert!(n > 0, "stream ended at {offset} of {len}");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(offset + i as u64), "byte {}", offset + i as u64);
        }
        offset += n as u64;
    }
}

fn write_pattern(w: &mut impl Write, len: u64) {
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0;
    while offset < len {
        let n = ((len - offset) as usize).min(buf.len());
        fill_pattern(&mut buf[..n], offset);
        w.write_all(&buf[..n]).unwrap();
        offset += n as u64;
    }
}

#[test]
fn a_gigabyte_upload_streams_through_with_bounded_memory() {
    let (listener, addr) = raw_upstream();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let head = String::from_utf8(read_head(&mut s)).unwrap();
        assert!(
            head.contains(&format!("content-length: {GIB}\r\n")),
            "{head}"
        );
        check_pattern(&mut s, GIB);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nreceived")
            .unwrap();
    });
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let mut s = connect(gw.addr("public"));
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {GIB}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    write_pattern(&mut s, GIB);
    let resp = ResponseReader::new(s).read_response(false).unwrap();
    assert_eq!((resp.status, resp.text().as_str()), (200, "received"));
    let rss = gw.peak_rss_kib();
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");
}

#[test]
fn a_gigabyte_chunked_download_streams_through_with_bounded_memory() {
    let (listener, addr) = raw_upstream();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        let mut chunk = vec![0u8; 1 << 16];
        let mut offset = 0;
        while offset < GIB {
            fill_pattern(&mut chunk, offset);
            s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .unwrap();
            s.write_all(&chunk).unwrap();
            s.write_all(b"\r\n").unwrap();
            offset += chunk.len() as u64;
        }
        s.write_all(b"0\r\n\r\n").unwrap();
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    });
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let mut s = connect(gw.addr("public"));
    // HTTP/1.0: the gateway decodes the chunks and delimits the body by closing.
    s.write_all(b"GET /download HTTP/1.0\r\n\r\n").unwrap();
    let head = read_head(&mut s);
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    check_pattern(&mut s, GIB);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes past the body", rest.len());
    let rss = gw.peak_rss_kib();
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");
}
