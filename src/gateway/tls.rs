//! TLS termination (`tls_cert`, `tls_key`): the certificate chain and key are read at start
//! (an error there stops the gateway, naming the file) and read again whenever either file
//! changes, as when a certificate is renewed or a Kubernetes secret is updated. A new pair
//! that does not load (half written, a key that does not match) is reported and counted,
//! and the old one goes on serving. Connections are HTTP/1.1 (ALPN `http/1.1`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use metrics::counter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::gateway::TlsFiles;
use crate::telemetry::GW_TLS_RELOADS;

/// How often the files are looked at for a change (two `stat` calls).
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS {what} {} holds no usable PEM: {detail}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("the TLS key {} does not belong to the certificate {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The certificate rustls serves: the latest pair that loaded.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The gateway's TLS: its rustls configuration and the files it reloads.
pub(super) struct Tls {
    pub(super) config: Arc<rustls::ServerConfig>,
    current: Arc<Current>,
    files: TlsFiles,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the pair: the chain (leaf first) and a key that signs for its leaf.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let pem = |what, path: &Path, detail: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        detail,
    };
    let cert_pem = read("certificate", &files.cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("certificate", &files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(
            "certificate",
            &files.cert,
            "no CERTIFICATE block".into(),
        ));
    }
    let key_pem = read("key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem("key", &files.key, e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| pem("key", &files.key, e.to_string()))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|_| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
    })?;
    Ok(pair)
}

/// What says a file changed: its modification time and size.
fn stamp(files: &TlsFiles) -> Option<[(SystemTime, u64); 2]> {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(&files.cert)?, one(&files.key)?])
}

impl Tls {
    /// The configuration for `files`, or why they do not load.
    pub(super) fn new(files: &TlsFiles) -> Result<Tls, TlsError> {
        let current = Arc::new(Current(ArcSwap::from_pointee(load(files)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            current,
            files: files.clone(),
        })
    }

    /// Loads the files again whenever they change, until `stop`.
    pub(super) async fn reload_on_change(self: Arc<Tls>, stop: CancellationToken) {
        let ok = counter!(GW_TLS_RELOADS, "result" => "ok");
        let failed = counter!(GW_TLS_RELOADS, "result" => "error");
        let mut seen = stamp(&self.files);
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let now = stamp(&self.files);
            if now == seen || now.is_none() {
                continue; // unchanged, or a file missing for a moment while it is replaced
            }
            seen = now;
            match load(&self.files) {
                Ok(pair) => {
                    self.current.0.store(Arc::new(pair));
                    ok.increment(1);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    failed.increment(1);
                    tracing::warn!(error = %e, "TLS certificate not reloaded: still serving the previous one");
                }
            }
        }
    }
}
