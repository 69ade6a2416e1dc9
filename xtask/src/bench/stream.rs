//! The bench's client for streamed answers (`text/event-stream`): sends one request, waits
//! for the first `chat.completion.chunk`, and later reads the stream to its end, telling
//! whether it ended with `data: [DONE]`.
//!
//! It reads chunked, `Content-Length` and until-close bodies, counts data events and
//! comments (blufio's keep-alives) and leaves the events' JSON unread: the gateway's
//! translation is tested elsewhere, this only holds streams open and checks how they end.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::IO_TIMEOUT;
use super::chunked::{self, find};
use crate::project::Result;

/// The events of a stream so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tally {
    /// `data:` events other than `[DONE]`.
    pub(super) chunks: usize,
    /// Comment-only events (`: keep-alive`).
    pub(super) comments: usize,
    /// Whether `data: [DONE]` arrived.
    pub(super) done: bool,
    /// Whether a data event came after `[DONE]`.
    pub(super) data_after_done: bool,
}

/// Counts the complete events at the start of `body` into `tally`; returns the bytes they
/// took. Events end with a blank line (`\n\n` or `\r\n\r\n`).
pub(super) fn scan_events(body: &[u8], tally: &mut Tally) -> usize {
    let mut at = 0;
    loop {
        let rest = &body[at..];
        let end = match (find(rest, b"\n\n"), find(rest, b"\r\n\r\n")) {
            (Some(lf), Some(crlf)) if crlf < lf => (crlf, 4),
            (Some(lf), _) => (lf, 2),
            (None, Some(crlf)) => (crlf, 4),
            (None, None) => return at,
        };
        let event = String::from_utf8_lossy(&rest[..end.0]);
        let mut data = None::<String>;
        for line in event.lines() {
            if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                data.get_or_insert_with(String::new).push_str(value);
            }
        }
        match data {
            Some(data) if data.trim() == "[DONE]" => tally.done = true,
            Some(_) if tally.done => tally.data_after_done = true,
            Some(_) => tally.chunks += 1,
            None => tally.comments += 1,
        }
        at += end.0 + end.1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

/// One streamed request on its own connection.
#[derive(Debug)]
pub(super) struct StreamClient {
    stream: TcpStream,
    framing: Framing,
    /// Received bytes not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet scanned into events.
    body: Vec<u8>,
    /// Body bytes received, for `Content-Length` framing.
    body_received: usize,
    complete: bool,
    pub(super) tally: Tally,
}

impl StreamClient {
    /// Connects, sends `request` in one write and reads the response head, which must be 200.
    pub(super) fn open(addr: SocketAddr, request: &[u8]) -> Result<StreamClient> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(request)?;
        let mut raw = Vec::with_capacity(4 * 1024);
        let mut scratch = [0u8; 4 * 1024];
        let head_end = loop {
            if let Some(end) = find(&raw, b"\r\n\r\n") {
                break end;
            }
            let read = stream.read(&mut scratch)?;
            if read == 0 {
                return Err("the server closed a stream before its response head".into());
            }
            raw.extend_from_slice(&scratch[..read]);
        };
        let (status, framing) = parse_response_head(&raw[..head_end])?;
        raw.drain(..head_end + 4);
        if status != 200 {
            let said = String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned();
            return Err(format!("a streamed request got {status}: {said}").into());
        }
        let mut client = StreamClient {
            stream,
            framing,
            raw,
            body: Vec::new(),
            body_received: 0,
            complete: false,
            tally: Tally::default(),
        };
        client.absorb()?;
        Ok(client)
    }

    /// Reads until the first data event has arrived.
    pub(super) fn wait_first_chunk(&mut self) -> Result<()> {
        while self.tally.chunks == 0 {
            if self.complete {
                return Err("a stream ended before its first chunk".into());
            }
            self.read_more()?;
        }
        Ok(())
    }

    /// Reads the stream to its end; returns whether it ended with `data: [DONE]` and
    /// nothing after it.
    pub(super) fn finish(&mut self) -> Result<bool> {
        while !self.complete {
            self.read_more()?;
        }
        Ok(self.tally.done && !self.tally.data_after_done)
    }

    fn read_more(&mut self) -> Result<()> {
        let mut scratch = [0u8; 4 * 1024];
        let read = self.stream.read(&mut scratch)?;
        if read == 0 {
            if self.framing == Framing::UntilClose {
                self.complete = true;
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed a stream before its end",
            )
            .into());
        }
        self.raw.extend_from_slice(&scratch[..read]);
        self.absorb()
    }

    /// Moves received bytes through the framing and counts the events they complete.
    fn absorb(&mut self) -> Result<()> {
        match self.framing {
            Framing::Chunked => {
                let decoded = chunked::decode(&self.raw, &mut self.body)?;
                self.raw.drain(..decoded.consumed);
                self.complete = decoded.done;
            }
            Framing::Length(length) => {
                let take = self.raw.len().min(length - self.body_received);
                self.body.extend(self.raw.drain(..take));
                self.body_received += take;
                self.complete = self.body_received == length;
            }
            Framing::UntilClose => self.body.append(&mut self.raw),
        }
        let scanned = scan_events(&self.body, &mut self.tally);
        self.body.drain(..scanned);
        Ok(())
    }
}

/// Reads the status and the body framing of a response head (without its blank line).
fn parse_response_head(bytes: &[u8]) -> std::result::Result<(u16, Framing), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or("malformed status line")?;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(
                value
                    .parse()
                    .map_err(|_| format!("malformed Content-Length `{value}`"))?,
            );
        }
    }
    Ok((status, framing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_when_complete() {
        let body =
            b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\ndata: [DONE]\n\ndata: {";
        let mut tally = Tally::default();
        let consumed = scan_events(body, &mut tally);
        assert_eq!(&body[consumed..], b"data: {");
        assert_eq!(
            tally,
            Tally {
                chunks: 2,
                comments: 1,
                done: true,
                data_after_done: false
            }
        );
    }

    #[test]
    fn data_after_done_is_flagged() {
        let mut tally = Tally::default();
        scan_events(b"data: [DONE]\n\ndata: {}\n\n", &mut tally);
        assert!(tally.done && tally.data_after_done);
    }

    #[test]
    fn response_heads_give_status_and_framing() {
        let chunked =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked";
        assert_eq!(parse_response_head(chunked), Ok((200, Framing::Chunked)));
        let length = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 12";
        assert_eq!(parse_response_head(length), Ok((429, Framing::Length(12))));
        let close = b"HTTP/1.1 200 OK\r\nConnection: close";
        assert_eq!(parse_response_head(close), Ok((200, Framing::UntilClose)));
        assert!(parse_response_head(b"nonsense").is_err());
    }
}
