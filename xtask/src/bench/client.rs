//! The bench's keep-alive HTTP/1.1 client, which reuses one buffer so the load generator
//! allocates nothing per request.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::IO_TIMEOUT;
use super::chunked::find;
use crate::project::Result;

/// A keep-alive HTTP/1.1 client that reads `Content-Length` framed responses into one buffer
/// it reuses, so the load generator itself allocates nothing per request.
#[derive(Debug)]
pub(super) struct Client {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// Bytes of `buffer` that hold received data.
    filled: usize,
}

impl Client {
    pub(super) fn connect(addr: SocketAddr) -> Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            stream,
            buffer: vec![0; 16 * 1024],
            filled: 0,
        })
    }

    /// Sends `request` in one write and returns the status and the body.
    pub(super) fn send(&mut self, request: &[u8]) -> io::Result<(u16, &[u8])> {
        self.stream.write_all(request)?;
        // Nothing is pipelined, so the buffer holds no bytes of a previous response.
        self.filled = 0;
        loop {
            if let Some(head) = parse_head(&self.buffer[..self.filled])? {
                let total = head.length + head.body_length;
                if total > self.buffer.len() {
                    self.buffer.resize(total, 0);
                }
                while self.filled < total {
                    self.read_more()?;
                }
                return Ok((head.status, &self.buffer[head.length..total]));
            }
            if self.filled == self.buffer.len() {
                self.buffer.resize(self.buffer.len() * 2, 0);
            }
            self.read_more()?;
        }
    }

    pub(super) fn read_more(&mut self) -> io::Result<()> {
        let read = self.stream.read(&mut self.buffer[self.filled..])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.filled += read;
        Ok(())
    }
}

/// The parts of a response head the client needs.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Head {
    status: u16,
    /// Length of the head including the blank line.
    length: usize,
    body_length: usize,
}

/// Parses a response head once it is complete; `Ok(None)` while more bytes are needed.
pub(super) fn parse_head(bytes: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        return Ok(None);
    };
    let invalid = |message: &str| io::Error::new(io::ErrorKind::InvalidData, message.to_owned());
    let head =
        std::str::from_utf8(&bytes[..end]).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("malformed status line"))?;
    let mut body_length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            body_length = value
                .trim()
                .parse()
                .map_err(|_| invalid("malformed Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "chunked responses are not supported by the bench client",
            ));
        }
    }
    Ok(Some(Head {
        status,
        length: end + 4,
        body_length,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_are_parsed_when_complete() {
        let response = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nServer: x\r\n\r\nhello";
        assert_eq!(parse_head(&response[..20]).unwrap(), None);
        let head = parse_head(response).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                length: response.len() - 5,
                body_length: 5
            }
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_head(chunked).is_err());
    }
}
