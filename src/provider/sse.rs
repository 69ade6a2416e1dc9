//! An incremental parser for server-sent events (`text/event-stream`), as both providers
//! stream their replies.
//!
//! Bytes go in as they arrive from the socket, in chunks of any size; complete events come
//! out. It is pure (no I/O) so it is tested on every way a stream can be split. A line or
//! event longer than the limit is an error: a broken or hostile upstream cannot make it
//! buffer without bound. It handles only what the providers send: `event:` and `data:`
//! fields, comments, `\n` or `\r\n` line ends; `id:` and `retry:` are ignored.

use std::fmt;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, empty when absent.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// The stream broke the parser's limits or encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseError(String);

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a byte stream into events.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
    max_bytes: usize,
}

impl SseParser {
    /// Creates a parser that refuses lines and events longer than `max_bytes`.
    pub fn new(max_bytes: usize) -> SseParser {
        SseParser {
            line: Vec::new(),
            event: String::new(),
            data: String::new(),
            has_data: false,
            max_bytes,
        }
    }

    /// Feeds `bytes` and appends every event they complete to `out`.
    ///
    /// # Errors
    ///
    /// Returns [`SseError`] for a line or event above the limit, or a line that is not UTF-8.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|byte| *byte == b'\n') {
            let (head, tail) = rest.split_at(end);
            self.extend_line(head)?;
            rest = tail.get(1..).unwrap_or_default();
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.take_line(&line, out)?;
        }
        self.extend_line(rest)
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > self.max_bytes {
            return Err(SseError(format!(
                "an event-stream line is longer than {} bytes",
                self.max_bytes
            )));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn take_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.has_data = false;
            return Ok(());
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| SseError("an event-stream line is not UTF-8".to_owned()))?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                if self.data.len() + value.len() + 1 > self.max_bytes {
                    return Err(SseError(format!(
                        "an event is longer than {} bytes",
                        self.max_bytes
                    )));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: message_start\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\n\
                          event: delta\ndata: one\ndata: two\n\ndata: [DONE]\n\n";

    fn expected() -> Vec<SseEvent> {
        vec![
            SseEvent {
                event: "message_start".into(),
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                event: "delta".into(),
                data: "one\ntwo".into(),
            },
            SseEvent {
                event: String::new(),
                data: "[DONE]".into(),
            },
        ]
    }

    #[test]
    fn every_split_of_the_stream_gives_the_same_events() {
        let bytes = STREAM.as_bytes();
        for split in 0..=bytes.len() {
            let mut parser = SseParser::new(1024);
            let mut events = Vec::new();
            parser.push(&bytes[..split], &mut events).unwrap();
            parser.push(&bytes[split..], &mut events).unwrap();
            assert_eq!(events, expected(), "split at {split}");
        }
        let mut parser = SseParser::new(1024);
        let mut events = Vec::new();
        for byte in bytes {
            parser
                .push(std::slice::from_ref(byte), &mut events)
                .unwrap();
        }
        assert_eq!(events, expected());
    }

    #[test]
    fn an_unterminated_event_is_not_emitted() {
        let mut parser = SseParser::new(1024);
        let mut events = Vec::new();
        parser.push(b"data: partial\n", &mut events).unwrap();
        assert!(events.is_empty());
    }

    #[test]
    fn overlong_lines_and_events_are_refused() {
        let mut parser = SseParser::new(16);
        let mut events = Vec::new();
        assert!(parser.push(&[b'x'; 17], &mut events).is_err());
        let mut parser = SseParser::new(16);
        let error = parser
            .push(b"data: 12345678\ndata: 12345678\n", &mut events)
            .unwrap_err();
        assert!(error.to_string().contains("longer than 16"), "{error}");
    }
}
