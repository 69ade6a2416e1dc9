//! The request head as the deadline transport sees it arrive: where it ends, across reads,
//! so the parser's buffer grows only with bytes received.

/// What the transport knows of the request head arriving on it, to bound the parser's buffer.
///
/// trillium-http 1.6.1 doubles its head buffer before every read of a head, however few bytes
/// the previous read returned, so a client dripping a head one byte per read grew it
/// geometrically (a 50-byte drip reached 471 MiB). After the first read of a head, this
/// transport therefore returns a read only once it fills the buffer it was given, or ends
/// the head (`CRLF CRLF`), or the peer closes; until then the bytes wait here. Each doubling
/// of the parser's buffer is then matched by bytes received, so it never holds more than
/// twice the head (at most 16 KiB for the 8 KiB limit), however the head is split.
#[derive(Debug, Default)]
pub(super) struct HeadReads {
    /// Bytes read but not yet returned (fewer than the caller's buffer holds).
    pub(super) staged: Vec<u8>,
    /// The last four bytes of the head so far, to spot its end across reads.
    pub(super) tail: u32,
    /// Whether the head has a byte other than CR and LF: empty lines before a request line
    /// (which the parser skips) do not end it, beyond one release for the parser to see them.
    pub(super) content: bool,
    /// Whether an end was already released before any content.
    pub(super) released_empty: bool,
    /// The capacity of `staged` charged to the connection.
    pub(super) charged: u64,
}

impl HeadReads {
    /// Starts a new head with the bytes of its first read (which is returned as it is).
    pub(super) fn start(&mut self, first: &[u8]) {
        // Per request, so no byte loop: the tail, and whether any byte is content (usually
        // the first one).
        self.tail = first
            .iter()
            .rev()
            .take(4)
            .rev()
            .fold(0, |tail, byte| (tail << 8) | u32::from(*byte));
        self.content = first.iter().any(|byte| !matches!(byte, b'\r' | b'\n'));
        self.released_empty = !self.content && first.windows(4).any(|four| four == b"\r\n\r\n");
    }

    /// Feeds received head bytes; returns true when they end the head.
    pub(super) fn scan(&mut self, bytes: &[u8]) -> bool {
        let mut ended = false;
        for byte in bytes {
            self.tail = (self.tail << 8) | u32::from(*byte);
            self.content |= !matches!(byte, b'\r' | b'\n');
            if self.tail == u32::from_be_bytes(*b"\r\n\r\n")
                && (self.content || !self.released_empty)
            {
                ended = true;
                self.released_empty |= !self.content;
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_lines_before_a_request_release_one_short_read_at_most() {
        let mut reads = HeadReads::default();
        reads.start(b"\r\n");
        // The parser skips these, so each end of "head" here would be a read for nothing.
        assert!(reads.scan(b"\r\n"));
        assert!(!reads.scan(b"\r\n"));
        assert!(!reads.scan(b"\r\n\r\n"));
        assert!(!reads.scan(b"GET / HTTP/1.1\r\n"));
        assert!(reads.scan(b"\r\n"));
        // A first read that ends a head of empty lines already was that one short read.
        reads.start(b"\r\n\r\n");
        assert!(!reads.scan(b"\r\n"));
        // A head split after its first read ends where its CRLF CRLF arrives, across reads.
        reads.start(b"GET / HTTP/1.1\r\nHost: x\r");
        assert!(!reads.scan(b"\n"));
        assert!(reads.scan(b"\r\n"));
    }
}
