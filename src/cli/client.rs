//! A minimal HTTP/1.1 GET client for `blufio status` and `blufio health`: plain `std::net`,
//! no runtime, a connect and read timeout, and a bound on the reply so a listener that
//! streams garbage cannot make the command buffer without end.
//!
//! It speaks only what blufio answers (a `Content-Length` or close-delimited body); it is no
//! general HTTP client.

use std::{
    fmt, io,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

/// The largest reply read, head and body together.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Why a probe got no usable answer.
#[derive(Debug)]
pub enum ProbeError {
    /// Nothing accepted the connection (not running, or the wrong address).
    Unreachable(io::Error),
    /// No complete answer within the timeout.
    TimedOut(Duration),
    /// The reply was larger than [`MAX_REPLY_BYTES`].
    TooLarge,
    /// The reply was not HTTP.
    Malformed(&'static str),
    /// The connection failed after it was accepted.
    Io(io::Error),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Unreachable(error) => write!(f, "not reachable: {error}"),
            ProbeError::TimedOut(timeout) => {
                write!(f, "timed out after {} s", timeout.as_secs_f64())
            }
            ProbeError::TooLarge => write!(f, "reply larger than {MAX_REPLY_BYTES} bytes"),
            ProbeError::Malformed(what) => write!(f, "not an HTTP reply: {what}"),
            ProbeError::Io(error) => write!(f, "connection failed: {error}"),
        }
    }
}

impl std::error::Error for ProbeError {}

/// A status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The body, lossily decoded as UTF-8.
    pub body: String,
}

/// Sends `GET path` to `addr` (with a bearer token when given) and reads the reply within
/// `timeout` overall and [`MAX_REPLY_BYTES`].
///
/// # Errors
///
/// Returns [`ProbeError`] saying what went wrong.
pub fn get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Reply, ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|error| {
        if error.kind() == io::ErrorKind::TimedOut {
            ProbeError::TimedOut(timeout)
        } else {
            ProbeError::Unreachable(error)
        }
    })?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ProbeError::Io)?;
    // One write: a server that answers after its first read must see the whole request.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|error| timed_out_or(error, timeout))?;

    let mut raw = Vec::with_capacity(4096);
    let mut buffer = [0u8; 8192];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(ProbeError::TimedOut(timeout))?;
        stream
            .set_read_timeout(Some(left))
            .map_err(ProbeError::Io)?;
        let read = match stream.read(&mut buffer) {
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(timed_out_or(error, timeout)),
        };
        if read == 0 {
            break;
        }
        if raw.len() + read > MAX_REPLY_BYTES {
            return Err(ProbeError::TooLarge);
        }
        raw.extend_from_slice(buffer.get(..read).unwrap_or_default());
        if let Some(reply) = complete(&raw)? {
            return Ok(reply);
        }
    }
    complete(&raw)?
        .or_else(|| close_delimited(&raw))
        .ok_or(ProbeError::Malformed("the reply ended early"))
}

/// Splits an `http://host:port/path` URL into an address and a path.
///
/// # Errors
///
/// Returns a message for anything but a plain `http://` URL with a resolvable host.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(index) => rest.split_at(index),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|error| format!("{url}: {error}"))?
        .next()
        .ok_or_else(|| format!("{url}: the host has no address"))?;
    Ok((addr, path.to_owned()))
}

fn timed_out_or(error: io::Error, timeout: Duration) -> ProbeError {
    match error.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ProbeError::TimedOut(timeout),
        _ => ProbeError::Io(error),
    }
}

/// Returns the reply once the head and a `Content-Length` body are in.
fn complete(raw: &[u8]) -> Result<Option<Reply>, ProbeError> {
    let Some(head_end) = raw.windows(4).position(|window| window == b"\r\n\r\n") else {
        if raw.len() > 64 * 1024 || (raw.len() >= 5 && !raw.starts_with(b"HTTP/")) {
            return Err(ProbeError::Malformed("no HTTP status line"));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(raw.get(..head_end).unwrap_or_default());
    let status = status_code(&head)?;
    let length = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    let body = raw.get(head_end + 4..).unwrap_or_default();
    Ok(match length {
        Some(length) if body.len() >= length => Some(Reply {
            status,
            body: String::from_utf8_lossy(body.get(..length).unwrap_or_default()).into_owned(),
        }),
        _ => None,
    })
}

/// Returns the reply of a connection that closed without `Content-Length`.
fn close_delimited(raw: &[u8]) -> Option<Reply> {
    let head_end = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(raw.get(..head_end)?);
    let status = status_code(&head).ok()?;
    Some(Reply {
        status,
        body: String::from_utf8_lossy(raw.get(head_end + 4..)?).into_owned(),
    })
}

fn status_code(head: &str) -> Result<u16, ProbeError> {
    head.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or(ProbeError::Malformed("no HTTP status line"))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn reads_a_content_length_reply() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            complete(raw).unwrap(),
            Some(Reply {
                status: 200,
                body: "{}".to_owned()
            })
        );
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").unwrap(),
            None
        );
        assert!(complete(b"garbage garbage").is_err());
    }

    #[test]
    fn urls_need_http_and_a_host() {
        let (addr, path) = parse_url("http://127.0.0.1:9100/health").unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:9100");
        assert_eq!(path, "/health");
        assert_eq!(parse_url("http://127.0.0.1:1").unwrap().1, "/");
        assert!(parse_url("https://127.0.0.1/").is_err());
    }

    /// Answers one connection with `head`, then `x`s until the client hangs up.
    fn endless_reply(head: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.write_all(head);
            let chunk = [b'x'; 8192];
            while stream.write_all(&chunk).is_ok() {}
        });
        addr
    }

    #[test]
    fn a_listener_streaming_garbage_is_cut_off() {
        let addr = endless_reply(b"");
        let error = get(addr, "/health", None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(error, ProbeError::Malformed(_)), "{error}");
    }

    #[test]
    fn a_silent_listener_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let error = get(addr, "/health", None, Duration::from_millis(200)).unwrap_err();
        assert!(error.to_string().contains("timed out"), "{error}");
        drop(listener);
    }

    #[test]
    fn a_huge_http_body_is_refused() {
        let addr = endless_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n");
        let error = get(addr, "/health", None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(error, ProbeError::TooLarge), "{error}");
    }
}
