//! HTTP/1.1 chunked framing, both ways: the encoder the fake upstream writes its streams
//! with, and the decoder that reads blufio's streamed answers (and a chunked request body,
//! should blufio's client send one).
//!
//! `find`, the byte search all of the bench's framing uses, is here too.
//!
//! The decoder is a pure function over the bytes received so far, so a read that ends in the
//! middle of a size line or of a chunk's data simply waits for more; it does not read trailers
//! beyond skipping them.

use std::fmt::Write as _;

/// Appends `data` to `out` as one chunk; empty data is skipped, since a zero-length chunk
/// would end the body.
pub(super) fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut size = String::with_capacity(8);
    let _ = write!(size, "{:x}\r\n", data.len());
    out.extend_from_slice(size.as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The chunk that ends a body (no trailers).
pub(super) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// What [`decode`] made of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Decoded {
    /// Bytes of the input consumed: whole chunks (and the last chunk with its trailers).
    pub(super) consumed: usize,
    /// Whether the last chunk was among them; the body is then complete.
    pub(super) done: bool,
}

/// Decodes the complete chunks at the start of `input`, appending their data to `body`.
///
/// # Errors
///
/// A size line that is not hexadecimal, or chunk data not followed by CRLF.
pub(super) fn decode(input: &[u8], body: &mut Vec<u8>) -> Result<Decoded, String> {
    let mut at = 0;
    loop {
        let rest = &input[at..];
        let Some(line_end) = find(rest, b"\r\n") else {
            return Ok(Decoded {
                consumed: at,
                done: false,
            });
        };
        let line = std::str::from_utf8(&rest[..line_end])
            .map_err(|_| "chunk size line is not text".to_owned())?;
        // Chunk extensions (`;name=value`) carry nothing the bench needs.
        let digits = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(digits, 16)
            .map_err(|_| format!("malformed chunk size line `{line}`"))?;
        let data_start = line_end + 2;
        if size == 0 {
            // Trailers end with an empty line; without trailers that is the next CRLF.
            let trailers = &rest[line_end..];
            let Some(end) = find(trailers, b"\r\n\r\n") else {
                return Ok(Decoded {
                    consumed: at,
                    done: false,
                });
            };
            return Ok(Decoded {
                consumed: at + line_end + end + 4,
                done: true,
            });
        }
        let Some(data_end) = data_start.checked_add(size) else {
            return Err(format!("chunk size {size} overflows"));
        };
        if rest.len() < data_end + 2 {
            return Ok(Decoded {
                consumed: at,
                done: false,
            });
        }
        if &rest[data_end..data_end + 2] != b"\r\n" {
            return Err(format!("chunk of {size} bytes is not followed by CRLF"));
        }
        body.extend_from_slice(&rest[data_start..data_end]);
        at += data_end + 2;
    }
}

/// Returns where `needle` first occurs in `haystack`.
///
/// Through the C library's `memmem`: xtask runs in the debug profile, where a search by
/// `windows` costs about 5 µs per 100 bytes, more than the fake upstream's whole answer
/// should, and the load generator searches every response head.
pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    // SAFETY: both pointers and lengths come from live slices, which memmem only reads; the
    // result is null or points into `haystack`.
    let found = unsafe {
        libc::memmem(
            haystack.as_ptr().cast(),
            haystack.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    (!found.is_null()).then(|| found as usize - haystack.as_ptr() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_chunks_decode_to_the_same_bytes() {
        let mut wire = Vec::new();
        encode_chunk(&mut wire, b"data: one\n\n");
        encode_chunk(&mut wire, b"");
        encode_chunk(&mut wire, &[b'x'; 300]);
        wire.extend_from_slice(LAST_CHUNK);
        assert!(wire.starts_with(b"b\r\ndata: one\n\n\r\n12c\r\n"));
        let mut body = Vec::new();
        let decoded = decode(&wire, &mut body).unwrap();
        assert_eq!(
            decoded,
            Decoded {
                consumed: wire.len(),
                done: true
            }
        );
        assert_eq!(body.len(), 11 + 300);
        assert!(body.starts_with(b"data: one\n\n"));
    }

    #[test]
    fn a_split_chunk_waits_for_the_rest_at_every_cut() {
        let mut wire = Vec::new();
        encode_chunk(&mut wire, b"hello");
        encode_chunk(&mut wire, b"world!");
        wire.extend_from_slice(LAST_CHUNK);
        for cut in 0..wire.len() {
            let mut body = Vec::new();
            let first = decode(&wire[..cut], &mut body).unwrap();
            assert!(!first.done, "cut at {cut}");
            let second = decode(&wire[first.consumed..], &mut body).unwrap();
            assert_eq!(first.consumed + second.consumed, wire.len(), "cut at {cut}");
            assert!(second.done);
            assert_eq!(body, b"helloworld!");
        }
    }

    #[test]
    fn extensions_and_trailers_are_skipped() {
        let wire = b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nnext";
        let mut body = Vec::new();
        let decoded = decode(wire, &mut body).unwrap();
        assert!(decoded.done);
        assert_eq!(&wire[decoded.consumed..], b"next");
        assert_eq!(body, b"hello");
    }

    #[test]
    fn find_gives_the_first_occurrence() {
        assert_eq!(find(b"a\r\n\r\nb\r\n\r\n", b"\r\n\r\n"), Some(1));
        assert_eq!(find(b"abc", b"c"), Some(2));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"abc", b""), Some(0));
    }

    #[test]
    fn malformed_framing_is_an_error_naming_it() {
        let mut body = Vec::new();
        let error = decode(b"zz\r\nhello\r\n", &mut body).unwrap_err();
        assert!(error.contains("`zz`"), "{error}");
        let error = decode(b"2\r\nhello\r\n", &mut body).unwrap_err();
        assert!(error.contains("not followed by CRLF"), "{error}");
    }
}
