//! TLS and credentials for the shared services, the same for every role: an endpoint
//! ([`ConsulEndpoint`], [`RedisEndpoint`]) is an address plus what proves who we are and
//! whom we trust, and builds its client. rustls with the `ring` provider throughout (no C
//! toolchain beyond `cc`); a CA file replaces the system roots, as `curl --cacert` does.
//!
//! The environment variables are the ones the services' own tools read: `CONSUL_HTTP_TOKEN`,
//! `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY` (as the `consul` CLI), and
//! `REDIS_CACERT`, `REDIS_CLIENT_CERT`, `REDIS_CLIENT_KEY`, `REDIS_USERNAME`,
//! `REDIS_PASSWORD`.

use std::path::{Path, PathBuf};

use crate::contract::secret::{redact_url, Secret};

/// The variables that name a service's CA file and client certificate and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsVars {
    pub ca_file: &'static str,
    pub client_cert: &'static str,
    pub client_key: &'static str,
}

pub const CONSUL_TLS_VARS: TlsVars = TlsVars {
    ca_file: "CONSUL_CACERT",
    client_cert: "CONSUL_CLIENT_CERT",
    client_key: "CONSUL_CLIENT_KEY",
};

pub const REDIS_TLS_VARS: TlsVars = TlsVars {
    ca_file: "REDIS_CACERT",
    client_cert: "REDIS_CLIENT_CERT",
    client_key: "REDIS_CLIENT_KEY",
};

pub const CONSUL_TOKEN_VAR: &str = "CONSUL_HTTP_TOKEN";
pub const REDIS_USERNAME_VAR: &str = "REDIS_USERNAME";
pub const REDIS_PASSWORD_VAR: &str = "REDIS_PASSWORD";

/// PEM files for one service's TLS: whom to trust (`ca_file`; none: the system's roots) and,
/// for mutual TLS, who we are (`client_cert` with `client_key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} holds no usable PEM: {detail}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("a client certificate needs its key and a key its certificate: set both {cert} and {key} (only {given} is set)")]
    HalfIdentity {
        cert: &'static str,
        key: &'static str,
        given: &'static str,
    },
    #[error("cannot set up TLS for {url}: {detail} (without a CA file the system's roots are used: set {ca_var} to the CA that signed the server's certificate)")]
    Setup {
        url: String,
        ca_var: &'static str,
        detail: String,
    },
    #[error("{what} is set but {url} is not a TLS address: use {scheme}:// or unset it")]
    NotTls {
        what: String,
        url: String,
        scheme: &'static str,
    },
}

/// The PEM contents of [`TlsFiles`], read once at start.
pub struct TlsPems {
    pub ca: Option<Vec<u8>>,
    /// Certificate, then key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// The files named by `vars` in `env` (empty values are unset).
    pub fn from_env(vars: TlsVars, env: &dyn Fn(&str) -> Option<String>) -> TlsFiles {
        let path = |name: &str| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        };
        TlsFiles {
            ca_file: path(vars.ca_file),
            client_cert: path(vars.client_cert),
            client_key: path(vars.client_key),
        }
    }

    /// Fills what is unset from `other` (the file's keys win over the environment).
    #[must_use]
    pub fn or(self, other: TlsFiles) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.or(other.ca_file),
            client_cert: self.client_cert.or(other.client_cert),
            client_key: self.client_key.or(other.client_key),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }

    /// What is set, for a message: `CONSUL_CACERT, CONSUL_CLIENT_CERT`.
    fn named(&self, vars: TlsVars) -> String {
        [
            (self.ca_file.is_some(), vars.ca_file),
            (self.client_cert.is_some(), vars.client_cert),
            (self.client_key.is_some(), vars.client_key),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(", ")
    }

    /// Reads and checks the files: each must hold PEM of the right kind.
    pub fn read(&self, vars: TlsVars) -> Result<TlsPems, TlsError> {
        let ca = match &self.ca_file {
            Some(p) => {
                let pem = read_file("CA file", p)?;
                check_pem("CA file", p, &pem, &["CERTIFICATE"])?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(TlsError::HalfIdentity {
                    cert: vars.client_cert,
                    key: vars.client_key,
                    given: vars.client_cert,
                })
            }
            (None, Some(_)) => {
                return Err(TlsError::HalfIdentity {
                    cert: vars.client_cert,
                    key: vars.client_key,
                    given: vars.client_key,
                })
            }
            (Some(c), Some(k)) => {
                let cert = read_file("client certificate", c)?;
                check_pem("client certificate", c, &cert, &["CERTIFICATE"])?;
                let key = read_file("client key", k)?;
                check_pem(
                    "client key",
                    k,
                    &key,
                    &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
                )?;
                Some((cert, key))
            }
        };
        Ok(TlsPems { ca, identity })
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The file holds at least one PEM block of one of `labels`, and every block parses.
fn check_pem(what: &'static str, path: &Path, pem: &[u8], labels: &[&str]) -> Result<(), TlsError> {
    let err = |detail: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        detail,
    };
    let text = std::str::from_utf8(pem).map_err(|_| err("not text".to_string()))?;
    let mut found = false;
    for line in text.lines() {
        let Some(label) = line
            .trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        if labels.contains(&label) {
            found = true;
        }
    }
    if found {
        Ok(())
    } else {
        Err(err(format!("no {} block", labels.join(" or "))))
    }
}

/// Installs rustls's `ring` provider as the process default, once; a provider already
/// installed (by an embedding program) is kept.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client builder for `http://` only: no CA roots are loaded (a host without system
/// certificates, such as a minimal container, builds it too), so an `https://` URL fails.
pub fn plain_http_builder() -> reqwest::ClientBuilder {
    install_crypto();
    reqwest::Client::builder().tls_certs_only(Vec::new())
}

/// How a role reaches Consul: the address, the ACL token and TLS.
#[derive(Clone, Default, PartialEq)]
pub struct ConsulEndpoint {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub address: String,
    pub token: Option<Secret>,
    pub tls: TlsFiles,
}

impl std::fmt::Debug for ConsulEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulEndpoint")
            .field("address", &redact_url(&self.address))
            .field("token", &self.token)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ConsulEndpoint {
    /// `address` with what the environment adds: `CONSUL_HTTP_TOKEN` and the TLS files.
    pub fn from_env(address: &str, env: &dyn Fn(&str) -> Option<String>) -> ConsulEndpoint {
        ConsulEndpoint {
            address: crate::contract::urls::with_scheme(address)
                .trim_end_matches('/')
                .to_string(),
            token: env(CONSUL_TOKEN_VAR)
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new),
            tls: TlsFiles::from_env(CONSUL_TLS_VARS, env),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.address.starts_with("https://")
    }

    /// The HTTP client for this endpoint: TLS files read and checked now, so a missing or
    /// wrong file fails at start, naming it.
    pub fn http_client(&self) -> Result<reqwest::Client, TlsError> {
        if !self.tls.is_empty() && !self.is_tls() {
            return Err(TlsError::NotTls {
                what: self.tls.named(CONSUL_TLS_VARS),
                url: redact_url(&self.address),
                scheme: "https",
            });
        }
        let pems = self.tls.read(CONSUL_TLS_VARS)?;
        let mut b = if self.is_tls() {
            install_crypto();
            reqwest::Client::builder()
        } else {
            plain_http_builder()
        }
        .connect_timeout(std::time::Duration::from_secs(3))
        .pool_idle_timeout(std::time::Duration::from_secs(90));
        if let Some(ca) = &pems.ca {
            let path = self.tls.ca_file.clone().unwrap_or_default();
            let certs = reqwest::Certificate::from_pem_bundle(ca).map_err(|e| TlsError::Pem {
                what: "CA file",
                path,
                detail: e.to_string(),
            })?;
            b = b.tls_certs_only(certs);
        }
        if let Some((cert, key)) = &pems.identity {
            let mut both = cert.clone();
            both.push(b'\n');
            both.extend_from_slice(key);
            let id = reqwest::Identity::from_pem(&both).map_err(|e| TlsError::Pem {
                what: "client certificate and key",
                path: self.tls.client_cert.clone().unwrap_or_default(),
                detail: e.to_string(),
            })?;
            b = b.identity(id);
        }
        b.build().map_err(|e| TlsError::Setup {
            url: redact_url(&self.address),
            ca_var: CONSUL_TLS_VARS.ca_file,
            detail: std::error::Error::source(&e)
                .map_or_else(|| e.to_string(), ToString::to_string),
        })
    }
}

/// How a role reaches Redis: the URL (`redis://` or `rediss://`), the ACL user and TLS.
/// A username or password given here wins over the URL's.
#[derive(Clone, Default, PartialEq)]
pub struct RedisEndpoint {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: TlsFiles,
}

impl std::fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisOpenError {
    #[error("{url:?} is not a Redis URL: {source}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl RedisEndpoint {
    /// `url` with what the environment adds: `REDIS_USERNAME`, `REDIS_PASSWORD` and the TLS
    /// files.
    pub fn from_env(url: &str, env: &dyn Fn(&str) -> Option<String>) -> RedisEndpoint {
        let set = |name: &str| env(name).filter(|v| !v.is_empty());
        RedisEndpoint {
            url: url.to_string(),
            username: set(REDIS_USERNAME_VAR),
            password: set(REDIS_PASSWORD_VAR).map(Secret::new),
            tls: TlsFiles::from_env(REDIS_TLS_VARS, env),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// The URL with its password redacted, for messages.
    pub fn shown(&self) -> String {
        redact_url(&self.url)
    }

    /// The Redis client: URL parsed, TLS files read and checked now.
    pub fn client(&self) -> Result<redis::Client, RedisOpenError> {
        use redis::IntoConnectionInfo;
        let url_err = |source| RedisOpenError::Url {
            url: self.shown(),
            source,
        };
        let mut info = self.url.as_str().into_connection_info().map_err(url_err)?;
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p.expose());
        }
        info = info.set_redis_settings(settings);
        if !self.tls.is_empty() && !self.is_tls() {
            return Err(TlsError::NotTls {
                what: self.tls.named(REDIS_TLS_VARS),
                url: self.shown(),
                scheme: "rediss",
            }
            .into());
        }
        install_crypto();
        if self.tls.is_empty() {
            return redis::Client::open(info).map_err(url_err);
        }
        let pems = self.tls.read(REDIS_TLS_VARS)?;
        let certs = redis::TlsCertificates {
            client_tls: pems
                .identity
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: pems.ca,
        };
        redis::Client::build_with_tls(info, certs).map_err(url_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn a_ca_file_with_a_plain_address_is_refused_naming_the_variable() {
        let env = env_of(&[("CONSUL_CACERT", "/nonexistent/ca.pem")]);
        let e = ConsulEndpoint::from_env("127.0.0.1:8500", &env)
            .http_client()
            .unwrap_err()
            .to_string();
        assert!(e.contains("CONSUL_CACERT is set"), "{e}");
        assert!(e.contains("https://"), "{e}");
        let env = env_of(&[("REDIS_CLIENT_CERT", "/x"), ("REDIS_CLIENT_KEY", "/y")]);
        let e = RedisEndpoint::from_env("redis://127.0.0.1:6379", &env)
            .client()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("REDIS_CLIENT_CERT, REDIS_CLIENT_KEY is set"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_or_wrong_file_fails_at_start_naming_it() {
        let dir = std::env::temp_dir().join(format!("tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("notpem.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let env = env_of(&[("CONSUL_CACERT", not_pem.to_str().unwrap())]);
        let e = ConsulEndpoint::from_env("https://127.0.0.1:8501", &env)
            .http_client()
            .unwrap_err()
            .to_string();
        assert!(e.contains("CA file") && e.contains("notpem.txt"), "{e}");
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        let env = env_of(&[("REDIS_CACERT", "/nonexistent/ca.pem")]);
        let e = RedisEndpoint::from_env("rediss://127.0.0.1:6380", &env)
            .client()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read the CA file /nonexistent/ca.pem"),
            "{e}"
        );
        let env = env_of(&[("REDIS_CLIENT_KEY", "/k.pem")]);
        let e = RedisEndpoint::from_env("rediss://127.0.0.1:6380", &env)
            .client()
            .unwrap_err()
            .to_string();
        assert!(e.contains("only REDIS_CLIENT_KEY is set"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_from_the_environment_win_and_never_show() {
        let env = env_of(&[
            ("REDIS_USERNAME", "ctl"),
            ("REDIS_PASSWORD", "hunter2"),
            ("CONSUL_HTTP_TOKEN", "tok-secret"),
        ]);
        let r = RedisEndpoint::from_env("redis://u:urlpass@127.0.0.1:6379", &env);
        let info = r.client().unwrap().get_connection_info().clone();
        assert_eq!(info.redis_settings().username(), Some("ctl"));
        assert_eq!(info.redis_settings().password(), Some("hunter2"));
        let c = ConsulEndpoint::from_env("127.0.0.1:8500", &env);
        assert_eq!(c.address, "http://127.0.0.1:8500");
        let shown = format!("{r:?} {c:?}");
        for secret in ["hunter2", "urlpass", "tok-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
