//! `tickserve serve` settings of authentication, TLS and the connection
//! limits (docs/security.md): their flags and environment variables, and
//! how they merge with the TOML file's keys of the same names into the
//! server's [`AuthConfig`], [`TlsConfig`] and [`Limits`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tickserve_server::{AuthConfig, Limits, TlsConfig};

use crate::config::humantime_duration;

#[derive(Debug, Default, Args)]
pub struct SecurityArgs {
    /// Bearer token required on the inference, repository and cache admin
    /// routes, HTTP and gRPC (`Authorization: Bearer <token>`); health
    /// checks and the metrics address stay open. Prefer --auth-token-file
    /// (rotation on SIGHUP). [default: unset (open)]
    #[arg(
        long,
        env = "TICKSERVE_AUTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "auth_token_file"
    )]
    pub auth_token: Option<String>,

    /// File of bearer tokens, one a line ('#' comments); any of them is
    /// accepted. Read again on SIGHUP, so a token is rotated by adding
    /// the new one, moving clients over, and removing the old one.
    /// [default: unset]
    #[arg(long, env = "TICKSERVE_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// PEM certificate chain of the HTTP and gRPC addresses: with it (and
    /// --tls-key) both speak only TLS; the metrics address stays plain.
    /// [default: unset (plain text)]
    #[arg(long, env = "TICKSERVE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert. [default: unset]
    #[arg(long, env = "TICKSERVE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) of client certificates: with it, every
    /// client must present a certificate it signed (mutual TLS); needs
    /// --tls-cert. [default: unset]
    #[arg(long, env = "TICKSERVE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Longest time for a connection's TLS handshake, and for a request's
    /// headers; past it the connection is closed. A kept-alive HTTP/1.1
    /// connection idle this long is closed too: keep clients' pool idle
    /// timeouts below it, e.g. "20s". [default: 120s, above the idle
    /// timeouts of nginx (60 s) and reqwest (90 s) upstream pools]
    #[arg(long, env = "TICKSERVE_HEADER_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime_duration)]
    pub header_read_timeout: Option<Duration>,

    /// Longest wait for the next piece of an HTTP request body; past it
    /// the request is answered 408, e.g. "30s". [default: 30s]
    #[arg(long, env = "TICKSERVE_BODY_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime_duration)]
    pub body_read_timeout: Option<Duration>,

    /// Most open connections per address (HTTP and gRPC each); past it an
    /// HTTP client gets 503 and a gRPC client UNAVAILABLE.
    /// [default: 4096]
    #[arg(long, env = "TICKSERVE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest gRPC request message in bytes; larger ones get
    /// OUT_OF_RANGE. [default: --max-body-bytes]
    #[arg(long, env = "TICKSERVE_GRPC_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub grpc_max_message_bytes: Option<usize>,

    /// Most concurrent HTTP/2 streams (gRPC calls) per connection.
    /// [default: 1024]
    #[arg(long, env = "TICKSERVE_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub max_concurrent_streams: Option<u32>,

    /// Connections the kernel queues per listener until the server accepts
    /// them (the kernel caps it at net.core.somaxconn). Past it new
    /// connections are dropped during their handshake, which a client that
    /// already sent its request sees as a reset connection. [default: 4096]
    #[arg(long, env = "TICKSERVE_LISTEN_BACKLOG", value_name = "N")]
    pub listen_backlog: Option<u32>,
}

/// The same settings from the TOML file (keys as the long flags, with
/// underscores).
#[derive(Debug, Default)]
pub struct SecurityFile {
    pub auth_token: Option<String>,
    pub auth_token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub header_read_timeout: Option<Duration>,
    pub body_read_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub grpc_max_message_bytes: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub listen_backlog: Option<u32>,
}

/// The merged settings.
#[derive(Debug)]
pub struct Security {
    pub auth: Option<AuthConfig>,
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
}

/// Reads a PEM file now (before the runtime starts); `what` names it in
/// the error.
pub(crate) fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// A certificate (chain) and its private key, read now: both or neither.
/// `what` names the pair in errors ("TLS"), `settings` the two settings
/// that must go together.
pub(crate) fn read_cert_and_key(
    what: &str,
    settings: [&str; 2],
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some((
            read_pem(&format!("{what} certificate"), &cert)?,
            read_pem(&format!("{what} key"), &key)?,
        ))),
        _ => anyhow::bail!("{} and {} go together", settings[0], settings[1]),
    }
}

impl SecurityArgs {
    /// Flags and environment over the file over the defaults; the TLS
    /// files are read now. `max_body_bytes` is the default gRPC message
    /// limit.
    pub fn resolve(self, file: SecurityFile, max_body_bytes: usize) -> anyhow::Result<Security> {
        // A flag of one kind replaces the file's setting of either kind.
        let auth = match (self.auth_token, self.auth_token_file) {
            (Some(token), _) => Some(AuthConfig::Token(token)),
            (None, Some(path)) => Some(AuthConfig::File(path)),
            (None, None) => match (file.auth_token, file.auth_token_file) {
                (Some(_), Some(_)) => {
                    anyhow::bail!("auth_token and auth_token_file exclude each other")
                }
                (Some(token), None) => Some(AuthConfig::Token(token)),
                (None, Some(path)) => Some(AuthConfig::File(path)),
                (None, None) => None,
            },
        };
        anyhow::ensure!(
            auth != Some(AuthConfig::Token(String::new())),
            "auth_token must not be empty"
        );
        let client_ca = self.tls_client_ca.or(file.tls_client_ca);
        let tls = match read_cert_and_key(
            "TLS",
            ["tls_cert", "tls_key"],
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
        )? {
            None => {
                anyhow::ensure!(
                    client_ca.is_none(),
                    "tls_client_ca needs tls_cert and tls_key"
                );
                None
            }
            Some((cert_pem, key_pem)) => Some(TlsConfig {
                cert_pem,
                key_pem,
                client_ca_pem: client_ca
                    .map(|ca| read_pem("TLS client CA", &ca))
                    .transpose()?,
            }),
        };
        let d = Limits::default();
        // The flag, else the file's key of the same name, else `default`.
        macro_rules! merged {
            ($setting:ident, $default:expr) => {
                self.$setting.or(file.$setting).unwrap_or($default)
            };
        }
        let limits = Limits {
            header_read_timeout: merged!(header_read_timeout, d.header_read_timeout),
            body_read_timeout: merged!(body_read_timeout, d.body_read_timeout),
            max_connections: merged!(max_connections, d.max_connections),
            grpc_max_message_bytes: merged!(grpc_max_message_bytes, max_body_bytes),
            max_concurrent_streams: merged!(max_concurrent_streams, d.max_concurrent_streams),
            listen_backlog: merged!(listen_backlog, d.listen_backlog),
        };
        anyhow::ensure!(
            !limits.header_read_timeout.is_zero() && !limits.body_read_timeout.is_zero(),
            "header_read_timeout and body_read_timeout must be positive"
        );
        anyhow::ensure!(
            limits.max_connections > 0
                && limits.grpc_max_message_bytes > 0
                && limits.max_concurrent_streams > 0
                && limits.listen_backlog > 0,
            "max_connections, grpc_max_message_bytes, max_concurrent_streams and listen_backlog must be positive"
        );
        Ok(Security { auth, tls, limits })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_are_open_plain_with_the_default_limits() {
        let security = SecurityArgs::default()
            .resolve(SecurityFile::default(), 1234)
            .unwrap();
        assert!(security.auth.is_none() && security.tls.is_none());
        assert_eq!(security.limits.grpc_max_message_bytes, 1234);
        assert_eq!(
            security.limits.header_read_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(security.limits.max_connections, 4096);
        assert_eq!(security.limits.listen_backlog, 4096);
    }

    #[test]
    fn flags_override_the_file_and_bad_combinations_are_refused() {
        let file = || SecurityFile {
            auth_token_file: Some("/etc/tokens".into()),
            max_connections: Some(10),
            body_read_timeout: Some(Duration::from_secs(5)),
            ..SecurityFile::default()
        };
        let args = SecurityArgs {
            auth_token: Some("flag".into()),
            max_connections: Some(20),
            ..SecurityArgs::default()
        };
        let security = args.resolve(file(), 1).unwrap();
        assert_eq!(security.auth, Some(AuthConfig::Token("flag".into())));
        assert_eq!(security.limits.max_connections, 20);
        assert_eq!(security.limits.body_read_timeout, Duration::from_secs(5));
        let security = SecurityArgs::default().resolve(file(), 1).unwrap();
        assert_eq!(security.auth, Some(AuthConfig::File("/etc/tokens".into())));

        let both = SecurityFile {
            auth_token: Some("a".into()),
            ..file()
        };
        assert!(SecurityArgs::default().resolve(both, 1).is_err());
        let half_tls = SecurityArgs {
            tls_cert: Some("cert.pem".into()),
            ..SecurityArgs::default()
        };
        assert!(half_tls.resolve(SecurityFile::default(), 1).is_err());
        let ca_alone = SecurityArgs {
            tls_client_ca: Some("ca.pem".into()),
            ..SecurityArgs::default()
        };
        assert!(ca_alone.resolve(SecurityFile::default(), 1).is_err());
        let zero = SecurityArgs {
            max_connections: Some(0),
            ..SecurityArgs::default()
        };
        assert!(zero.resolve(SecurityFile::default(), 1).is_err());
    }
}
