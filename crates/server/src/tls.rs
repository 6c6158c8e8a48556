//! TLS of the HTTP and gRPC addresses (rustls, ring provider), and the one
//! connection type both accept loops hand on: plain TCP or TLS over it.
//!
//! The binary reads the PEM files (`--tls-cert`, `--tls-key`,
//! `--tls-client-ca`) into a [`TlsConfig`]; [`acceptor`] turns it into a
//! rustls acceptor per address, advertising `h2` and `http/1.1` on the
//! HTTP address and `h2` on the gRPC one. With a client CA every client
//! must present a certificate it signed (mutual TLS); the handshake fails
//! otherwise. The handshake runs in each connection's own task, bounded
//! by the header read timeout, so a slow client holds up no other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The server's certificate and key, and optionally the CA of client
/// certificates, as PEM.
#[derive(Clone)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// CA (or CAs) that signed the client certificates: with it, every
    /// client must present one (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in the TLS certificate file")]
    NoCertificate,
    #[error("invalid TLS certificate: {0}")]
    Certificate(String),
    #[error("no usable private key in the TLS key file: {0}")]
    Key(String),
    #[error("invalid TLS client CA: {0}")]
    ClientCa(String),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A rustls acceptor for `config` that offers the given ALPN protocols.
pub(crate) fn acceptor(config: &TlsConfig, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&config.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(&config.key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca_pem) {
                let cert = cert.map_err(|e| TlsError::ClientCa(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key)?;
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(server)))
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection, plain or TLS, holding its place under the
/// connection cap until it is dropped.
pub(crate) struct Conn {
    io: Io,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Conn {
    pub(crate) fn plain(stream: TcpStream, permit: Option<OwnedSemaphorePermit>) -> Self {
        Conn {
            io: Io::Plain(stream),
            _permit: permit,
        }
    }

    pub(crate) fn tls(stream: TlsStream<TcpStream>, permit: Option<OwnedSemaphorePermit>) -> Self {
        Conn {
            io: Io::Tls(Box::new(stream)),
            _permit: permit,
        }
    }

    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Plain(stream) => stream,
            Io::Tls(stream) => stream.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}
