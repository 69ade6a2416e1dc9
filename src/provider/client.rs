//! The HTTP(S) client the providers share: trillium-client on trillium-smol, with rustls
//! (ring provider, webpki root bundle) behind the `tls` feature.
//!
//! Roots ship in the binary (webpki-roots) rather than coming from the host's store: a
//! Raspberry Pi image or a minimal container may have an outdated store or none, and the
//! bundle keeps the binary's behaviour the same everywhere. `[agent] ca_file` replaces the
//! bundle with the operator's CA for a private endpoint. Only HTTP/1.1 is offered over ALPN:
//! the daemon sends one request at a time per connection, and it keeps the tested path the
//! production path. Connections are pooled and reused by trillium-client.

use std::{io, net::SocketAddr, path::Path};

use trillium_client::Client;
use trillium_server_common::{Connector, Destination, url::Url};
use trillium_smol::{SmolTransport, SmolUdpSocket, async_net::TcpStream};

use crate::runtime::Runtime;

/// trillium-smol's TCP connector with the daemon's executor as its runtime: the stock one
/// spawns on smol's process-wide executor, which would start threads of its own.
#[derive(Debug, Clone)]
pub(crate) struct Tcp {
    tcp: trillium_smol::ClientConfig,
    runtime: Runtime,
}

impl Connector for Tcp {
    type Runtime = Runtime;
    type Transport = SmolTransport<TcpStream>;
    type Udp = SmolUdpSocket;

    fn runtime(&self) -> Runtime {
        self.runtime.clone()
    }

    async fn connect(&self, url: &Url) -> io::Result<Self::Transport> {
        self.tcp.connect(url).await
    }

    async fn connect_to(&self, destination: Destination) -> io::Result<Self::Transport> {
        self.tcp.connect_to(destination).await
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        self.tcp.resolve(host, port).await
    }
}

/// Request bodies sent whole, without first asking `Expect: 100-continue`: every body blufio
/// sends is already in memory (at most `[gateway] max_request_bytes` of conversation and the
/// system prompt), and trillium-client's default (1 KiB) made any larger one wait a round trip
/// for the upstream's `100 Continue` (a full second against a server that sends none, which
/// RFC 9110 allows) before sending it.
const WHOLE_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Builds the client.
///
/// # Errors
///
/// Returns a message naming the problem when `ca_file` cannot be read or holds no
/// certificate.
pub(crate) fn build(ca_file: Option<&Path>, runtime: Runtime) -> Result<Client, String> {
    let tcp = Tcp {
        tcp: trillium_smol::ClientConfig::new().with_nodelay(true),
        runtime,
    };
    #[cfg(feature = "tls")]
    {
        let tls = tls_config(ca_file)?;
        Ok(Client::new(trillium_rustls::RustlsConfig::new(tls, tcp))
            .with_max_buffered_request_body(WHOLE_BODY_BYTES))
    }
    #[cfg(not(feature = "tls"))]
    {
        if let Some(path) = ca_file {
            return Err(format!(
                "{} is set but this build has no TLS (cargo feature `tls`)",
                path.display()
            ));
        }
        Ok(Client::new(tcp).with_max_buffered_request_body(WHOLE_BODY_BYTES))
    }
}

#[cfg(feature = "tls")]
fn tls_config(ca_file: Option<&Path>) -> Result<trillium_rustls::RustlsClientConfig, String> {
    use std::sync::Arc;

    use trillium_rustls::rustls::{
        ClientConfig, RootCertStore,
        crypto::ring,
        pki_types::{CertificateDer, pem::PemObject},
    };

    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            // Bounded and refusing FIFOs and devices, like every file blufio reads.
            let pem = crate::small_file::read_capped_bytes(path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            for certificate in CertificateDer::pem_slice_iter(&pem) {
                let certificate = certificate.map_err(|error| {
                    format!("{} is not a PEM certificate file: {error}", path.display())
                })?;
                roots.add(certificate).map_err(|error| {
                    format!("{} holds an unusable certificate: {error}", path.display())
                })?;
            }
            if roots.is_empty() {
                return Err(format!("{} holds no PEM certificate", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS setup failed: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config.into())
}
