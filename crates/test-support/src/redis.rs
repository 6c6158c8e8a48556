//! A real `redis-server` on a free loopback port, for the cache tests.
//! Started without persistence; killed when dropped. Fails loudly (never
//! skips) when redis-server is not installed.
//!
//! [`RedisServer::start_with`] adds a password or TLS. A TLS server listens
//! on its TLS port only (`--port 0`), so nothing can fall back to plain
//! text; the harness itself then talks to it through redis-rs with the
//! test CA.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TestPki;

/// How a test's redis-server is set up beyond the defaults.
#[derive(Default)]
pub struct RedisOptions<'a> {
    /// `--requirepass`.
    pub password: Option<&'a str>,
    /// TLS with these certificates (`--tls-port`, `--port 0`).
    pub tls: Option<&'a TestPki>,
    /// `--tls-auth-clients yes`: clients must show a certificate of the CA.
    pub require_client_cert: bool,
}

/// How long a starting redis-server may take to answer PING (generous: the
/// CI machine runs tests in parallel on two cores).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Free ports tried before giving up.
const PORT_ATTEMPTS: usize = 5;

/// How a launch of redis-server ended.
enum Launch {
    Ready,
    /// It exited before answering: its port was taken.
    Exited,
    /// It runs but did not answer within [`READY_WITHIN`].
    Silent,
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
    /// Client for the harness's own commands on a TLS server.
    tls_client: Option<::redis::Client>,
    password: Option<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&RedisOptions::default())
    }

    /// Starts redis-server on a free port. The port is free when picked but
    /// not reserved: when another process takes it first (tests run in
    /// parallel, and every outgoing connection takes an ephemeral port),
    /// redis-server exits at once and another port is tried.
    pub fn start_with(options: &RedisOptions<'_>) -> RedisServer {
        for _ in 0..PORT_ATTEMPTS {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = RedisServer::configure(options, port);
            match server.launch() {
                Launch::Ready => return server,
                Launch::Exited => continue,
                Launch::Silent => panic!(
                    "redis-server on port {port} did not answer PING in {} s",
                    READY_WITHIN.as_secs()
                ),
            }
        }
        panic!("redis-server could not bind a free port in {PORT_ATTEMPTS} attempts");
    }

    fn configure(options: &RedisOptions<'_>, port: u16) -> RedisServer {
        let mut args = Vec::new();
        let mut tls_client = None;
        match options.tls {
            None => args.extend(["--port".to_owned(), port.to_string()]),
            Some(pki) => {
                let file = |name: &str| pki.path(name).to_str().unwrap().to_owned();
                args.extend(["--port".to_owned(), "0".to_owned()]);
                args.extend(["--tls-port".to_owned(), port.to_string()]);
                args.extend(["--tls-cert-file".to_owned(), file("server.crt")]);
                args.extend(["--tls-key-file".to_owned(), file("server.key")]);
                args.extend(["--tls-ca-cert-file".to_owned(), file("ca.crt")]);
                let auth = if options.require_client_cert {
                    "yes"
                } else {
                    "no"
                };
                args.extend(["--tls-auth-clients".to_owned(), auth.to_owned()]);
                let info = format!(
                    "rediss://{}127.0.0.1:{port}/0",
                    options
                        .password
                        .map(|p| format!(":{p}@"))
                        .unwrap_or_default()
                );
                tls_client = Some(
                    ::redis::Client::build_with_tls(
                        info.as_str(),
                        ::redis::TlsCertificates {
                            client_tls: Some(::redis::ClientTlsConfig {
                                client_cert: pki.read("client.crt"),
                                client_key: pki.read("client.key"),
                            }),
                            root_cert: Some(pki.read("ca.crt")),
                        },
                    )
                    .unwrap(),
                );
            }
        }
        if let Some(password) = options.password {
            args.extend(["--requirepass".to_owned(), password.to_owned()]);
        }
        RedisServer {
            port,
            child: None,
            args,
            tls_client,
            password: options.password.map(str::to_owned),
        }
    }

    /// `redis://` or `rediss://`, with the password when there is one.
    pub fn url(&self) -> String {
        let scheme = if self.tls_client.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// Starts redis-server (again) on the same port and waits for PONG.
    pub fn restart(&mut self) {
        match self.launch() {
            Launch::Ready => {}
            Launch::Exited => panic!(
                "redis-server exited at once: port {} is taken by another process",
                self.port
            ),
            Launch::Silent => panic!(
                "redis-server on port {} did not answer PING in {} s",
                self.port,
                READY_WITHIN.as_secs()
            ),
        }
    }

    /// Spawns redis-server with this server's arguments and waits until it
    /// answers PING or exits.
    fn launch(&mut self) -> Launch {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(&self.args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", std::env::temp_dir().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the cache tests need it; install the \
                     Debian package with `apt-get install -y redis-server` (scripts/test.sh \
                     does this when run as root)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if self.ping() {
                return Launch::Ready;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return Launch::Exited;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Launch::Silent
    }

    fn ping(&self) -> bool {
        if self.tls_client.is_some() || self.password.is_some() {
            return self.command::<String>(0, &::redis::cmd("PING")).is_ok();
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Kills redis-server (SIGKILL: a crash, not a clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `cmd` in database `db` through redis-rs (TLS and/or password).
    pub fn command<T: ::redis::FromRedisValue>(
        &self,
        db: i64,
        cmd: &::redis::Cmd,
    ) -> ::redis::RedisResult<T> {
        let client = match &self.tls_client {
            Some(client) => {
                let mut info = client.get_connection_info().clone();
                info.redis.db = db;
                // The same TLS parameters, another database.
                ::redis::Client::open(info)?
            }
            None => {
                let mut info =
                    ::redis::IntoConnectionInfo::into_connection_info(self.url().as_str())?;
                info.redis.db = db;
                ::redis::Client::open(info)?
            }
        };
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        cmd.query(&mut connection)
    }

    /// Keys in database `db`.
    pub fn dbsize(&self, db: i64) -> i64 {
        if self.tls_client.is_some() || self.password.is_some() {
            return self.command(db, &::redis::cmd("DBSIZE")).unwrap();
        }
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let select = format!("SELECT {db}\r\n");
        stream.write_all(select.as_bytes()).unwrap();
        stream.write_all(b"DBSIZE\r\n").unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 64];
        while !text.contains("\r\n:") || !text.ends_with("\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "redis closed the connection");
            text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        text.split("\r\n:").nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_seen_as_an_exit_and_start_moves_on() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut server = RedisServer::configure(&RedisOptions::default(), port);
        assert!(matches!(server.launch(), Launch::Exited));
        assert!(server.child.is_none());
        let started = RedisServer::start();
        assert_ne!(started.port, port);
        assert!(started.ping());
    }
}
