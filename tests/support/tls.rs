//! Certificates made per test with the `openssl` CLI: a CA, a server certificate for
//! 127.0.0.1 and `localhost`, and a client certificate, all PEM, in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::procs::{temp_dir, INSTALL_HINT};

#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}; {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A fresh CA and the certificates it signs (EC P-256, valid for a day).
    pub fn generate() -> Certs {
        let dir = temp_dir("certs");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "1"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=rebalancer test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&dir, &ca);
        for (name, cn, ext) in [
            (
                "server",
                "server.dc1.consul",
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "rebalancer test client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            std::fs::write(dir.join(&extfile), ext).unwrap();
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-nodes"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&dir, &req);
            openssl(
                &dir,
                &[
                    "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "1", "-out", &pem, "-extfile", &extfile,
                ],
            );
        }
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            dir,
        }
    }

    /// A client builder that trusts the CA and presents the client certificate.
    pub fn http_builder(&self) -> reqwest::ClientBuilder {
        let ca = std::fs::read(&self.ca).unwrap();
        let mut id = std::fs::read(&self.client_cert).unwrap();
        id.extend(std::fs::read(&self.client_key).unwrap());
        rebalancer::contract::tls::install_crypto();
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .identity(reqwest::Identity::from_pem(&id).unwrap())
    }

    /// The files as the roles take them.
    pub fn files(&self) -> rebalancer::contract::tls::TlsFiles {
        rebalancer::contract::tls::TlsFiles {
            ca_file: Some(self.ca.clone()),
            client_cert: Some(self.client_cert.clone()),
            client_key: Some(self.client_key.clone()),
        }
    }

    /// The variables that point a role's Consul (`CONSUL_…`) or Redis (`REDIS_…`) client
    /// at these files.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            (format!("{prefix}_CACERT"), self.ca.display().to_string()),
            (
                format!("{prefix}_CLIENT_CERT"),
                self.client_cert.display().to_string(),
            ),
            (
                format!("{prefix}_CLIENT_KEY"),
                self.client_key.display().to_string(),
            ),
        ]
    }
}

impl Certs {
    /// A TLS connection to 127.0.0.1:`port` that trusts only this CA (ALPN `http/1.1`).
    pub async fn connect(
        &self,
        port: u16,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// A client for `https://127.0.0.1:…` that trusts only this CA and keeps no connection
    /// between requests: each request makes a handshake, so it sees the certificate the
    /// server has now.
    pub fn fresh_https(&self) -> reqwest::Client {
        let ca = std::fs::read(&self.ca).unwrap();
        rebalancer::contract::tls::install_crypto();
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .pool_max_idle_per_host(0)
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap()
    }
}
