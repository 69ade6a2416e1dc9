//! Who a client is (an IPv4 address or an IPv6 /64), the throttle's limits, which faults
//! count as malformed requests, and what a blocked client is answered.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use crate::{logging, metrics::ErrorKind};

/// Failed authentications from one client within [`AUTH_WINDOW`] that start a block, by
/// default (`[gateway] auth_failure_limit`).
pub const AUTH_FAILURE_LIMIT: u32 = 10;

/// The window failed authentications are counted in.
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);

/// How long a blocked client gets `429` for every authenticated request.
pub const AUTH_BLOCK: Duration = Duration::from_secs(60);

/// How long a client must stay quiet for its episode to end.
pub const EPISODE: Duration = logging::EPISODE;

/// Clients tracked at once (about 100 bytes each).
pub const MAX_CLIENTS: usize = 4096;

/// Lines naming a client written per [`EPISODE`], over all clients.
pub const NAMED_LINES_PER_EPISODE: u32 = 20;

/// The faults counted as malformed requests, in the order they are reported.
pub(super) const MALFORMED: [ErrorKind; 6] = [
    ErrorKind::BadRequest,
    ErrorKind::PayloadTooLarge,
    ErrorKind::HeaderTooLarge,
    ErrorKind::UriTooLong,
    ErrorKind::Http2Refused,
    ErrorKind::WebSocketProtocol,
];

/// Returns whether `kind` is a malformed request (a client that does not speak the protocol),
/// as opposed to one that merely asked for something absent or was refused for load.
pub fn is_malformed(kind: ErrorKind) -> bool {
    MALFORMED.contains(&kind)
}

/// One client: an IPv4 address, or an IPv6 address reduced to its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Client(IpAddr);

impl Client {
    /// Returns the client `ip` belongs to (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(_) => Client(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(IpAddr::V4(v4)),
                None => Client(IpAddr::V6(Ipv6Addr::from_bits(
                    v6.to_bits() & !u128::from(u64::MAX),
                ))),
            },
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// What to answer a request from a blocked client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// Seconds until the block ends (at least 1), for `Retry-After`.
    pub retry_after_secs: u64,
}

/// A client at 127.0.0.`last`, for tests.
#[cfg(test)]
pub(super) fn v4(last: u8) -> Client {
    Client::of(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_of_a_request_the_client_got_wrong_is_malformed_and_absence_is_not() {
        for kind in [
            ErrorKind::BadRequest,
            ErrorKind::PayloadTooLarge,
            ErrorKind::HeaderTooLarge,
            ErrorKind::UriTooLong,
            ErrorKind::Http2Refused,
            ErrorKind::WebSocketProtocol,
        ] {
            assert!(is_malformed(kind), "{}", kind.as_str());
        }
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::Unauthorized,
            ErrorKind::ConnectionLimit,
        ] {
            assert!(!is_malformed(kind), "{}", kind.as_str());
        }
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.5".parse().unwrap();
        assert_eq!(Client::of(a), Client::of(b));
        assert_ne!(Client::of(a), Client::of(c));
        assert_eq!(Client::of(a).to_string(), "2001:db8:1:2::/64");
        assert_eq!(Client::of(mapped), v4(5));
    }
}
