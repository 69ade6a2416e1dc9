//! Just enough HTTP/1.1 and WebSocket for the soak's loads: keep-alive requests with JSON
//! bodies, response heads, masked client frames.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::{IO_TIMEOUT, TOKEN};
use crate::json;

pub(super) fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Writes a whole request in one write, as curl and browsers do.
///
/// `write!` on an unbuffered stream makes one write per formatted piece (eight for a message
/// head); whether the daemon then reads the head in few or many reads depends on the timing of
/// the machine, and a head read in more than seven reads is closed without a status by the
/// daemon as of this writing (about 3 in 1,000 nine-write heads on loopback). Split heads are
/// the drip load's business, with a fixed number of pieces; the other loads must not depend on
/// scheduling.
pub(super) fn send(stream: &mut TcpStream, request: &str) -> io::Result<()> {
    stream.write_all(request.as_bytes())
}

pub(super) fn auth_header() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

pub(super) fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Sends one keep-alive request with a JSON body and returns the response body.
pub(super) fn request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    body: &str,
    status: u16,
) -> io::Result<String> {
    send(
        stream,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: soak\r\n{}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            auth_header(),
            body.len()
        ),
    )?;
    let head = read_head(stream)?;
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    if status_of(&head) != Some(status) {
        return Err(invalid(&format!(
            "{method} {path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

pub(super) fn expect_status(stream: &mut TcpStream, status: u16) -> io::Result<()> {
    let head = read_head(stream)?;
    let mut sink = Vec::new();
    let _ = stream.take(1 << 20).read_to_end(&mut sink);
    if status_of(&head) == Some(status) {
        Ok(())
    } else {
        Err(invalid("unexpected status"))
    }
}

pub(super) fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Reads up to and including the blank line that ends a response head.
pub(super) fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || stream.read(&mut byte)? == 0 {
            return Err(invalid("truncated response head"));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Writes one masked client frame (RFC 6455 §5.2); payloads here are under 64 KiB.
pub(super) fn write_frame(stream: &mut TcpStream, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        length @ 0..=125 => frame.push(0x80 | length as u8),
        length => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(
                &u16::try_from(length)
                    .map_err(|_| invalid("frame"))?
                    .to_be_bytes(),
            );
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, key)| byte ^ key),
    );
    stream.write_all(&frame)
}

/// Reads one unmasked server frame and returns its opcode and payload.
pub(super) fn read_frame(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0; 2];
    stream.read_exact(&mut header)?;
    let length = match header[1] & 0x7f {
        126 => {
            let mut bytes = [0; 2];
            stream.read_exact(&mut bytes)?;
            u64::from(u16::from_be_bytes(bytes))
        }
        127 => {
            let mut bytes = [0; 8];
            stream.read_exact(&mut bytes)?;
            u64::from_be_bytes(bytes)
        }
        length => u64::from(length),
    };
    if length > 1 << 20 {
        return Err(invalid("oversized WebSocket frame"));
    }
    let mut payload = vec![0; length as usize];
    stream.read_exact(&mut payload)?;
    Ok((header[0] & 0x0f, payload))
}

/// Returns the `id` of a `POST /v1/sessions` answer.
pub(super) fn session_id(answer: &str) -> Option<String> {
    json::string(answer, "id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_is_read_from_the_json_answer() {
        let body = r#"{"id":"abc123","created_at":5}"#;
        assert_eq!(session_id(body).as_deref(), Some("abc123"));
        // Whitespace and key order are the serializer's choice, not a format change.
        let spaced = "{ \"created_at\": 5,\n  \"id\" : \"abc123\" }";
        assert_eq!(session_id(spaced).as_deref(), Some("abc123"));
        assert_eq!(session_id(r#"{"created_at":5}"#), None);
        assert_eq!(session_id(r#"{"id":7}"#), None);
        assert_eq!(session_id("not json"), None);
    }
}
