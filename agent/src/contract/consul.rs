//! A thin Consul HTTP client: the few endpoints the controller, agent and tools use.

use crate::contract::secret::Secret;
use crate::contract::tls::{ConsulEndpoint, TlsError};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;

/// Margin added to a blocking query's timeout on top of `wait + wait/16`.
pub const BLOCKING_MARGIN: Duration = Duration::from_secs(5);
/// Timeout of a non-blocking request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("Consul request {method} {url} failed: {source}")]
    Request {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Consul answered {status} to {method} {url}: {body}{}", acl_hint(*.status, .method, .url))]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("Consul lost its data (its index went backwards): reading {url} again in full")]
    DataLost { url: String },
    #[error("Consul answer to {url} has no valid X-Consul-Index header")]
    NoIndex { url: String },
    #[error("Consul answer to {url} is not the expected JSON: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// For a 403, the ACL rule (Consul 1.8 syntax) the token lacks for this request.
fn acl_hint(status: StatusCode, method: &Method, url: &str) -> String {
    if status != StatusCode::FORBIDDEN {
        return String::new();
    }
    let path = url.find("/v1/").map_or(url, |i| &url[i..]);
    let path = path.split('?').next().unwrap_or(path);
    let access = if *method == Method::GET {
        "read"
    } else {
        "write"
    };
    let rule = if let Some(svc) = path.strip_prefix("/v1/health/service/") {
        format!("service \"{svc}\" {{ policy = \"read\" }} and node_prefix \"\" {{ policy = \"read\" }}")
    } else if let Some(key) = path.strip_prefix("/v1/kv/") {
        format!("key_prefix \"{key}\" {{ policy = \"{access}\" }}")
    } else if path.starts_with("/v1/session/") {
        "session_prefix \"\" { policy = \"write\" }".to_string()
    } else if path.starts_with("/v1/agent/service/") || path.starts_with("/v1/agent/check/") {
        "service \"<the service>\" { policy = \"write\" } (registering, deregistering, checks)"
            .to_string()
    } else {
        format!("a rule allowing {method} {path}")
    };
    format!(" (the ACL token lacks {rule}; see docs/security.md)")
}

/// One answer of a (blocking) read.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub index: u64,
    /// `false` for a 404, which Consul uses for "no such key".
    pub found: bool,
    pub body: bytes::Bytes,
}

#[derive(Clone, Debug)]
pub struct Consul {
    http: reqwest::Client,
    base: String,
    token: Option<Secret>,
}

impl Consul {
    /// A client of `endpoint`: its TLS files are read now, so a missing or wrong one fails
    /// at start, naming it.
    pub fn connect(endpoint: &ConsulEndpoint) -> Result<Consul, TlsError> {
        Ok(Consul {
            http: endpoint.http_client()?,
            base: endpoint.address.trim_end_matches('/').to_string(),
            token: endpoint.token.clone(),
        })
    }

    /// A client of `base` with no TLS files (an `https://` base is verified with the
    /// system's roots).
    pub fn new(base: &str, token: Option<Secret>) -> Consul {
        Consul::connect(&ConsulEndpoint {
            address: base.to_string(),
            token,
            tls: crate::contract::tls::TlsFiles::default(),
        })
        .expect("an HTTP client with no TLS files builds")
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> (reqwest::RequestBuilder, String) {
        let url = format!("{}{}", self.base, path);
        let mut rb = self.http.request(method, &url);
        if let Some(t) = &self.token {
            rb = rb.header("X-Consul-Token", t.expose());
        }
        (rb, url)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        timeout: Duration,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, bytes::Bytes, String), ConsulError> {
        let (mut rb, url) = self.request(method.clone(), path);
        rb = rb.timeout(timeout);
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let err = |source| ConsulError::Request {
            method: method.clone(),
            url: url.clone(),
            source,
        };
        let resp = rb.send().await.map_err(err)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(err)?;
        Ok((status, headers, bytes, url))
    }

    /// A blocking read of `path` (which may carry a query string) at `index` (0: return at once).
    pub async fn blocking_get(
        &self,
        path: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Fetched, ConsulError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let full = if index > 0 {
            format!("{path}{sep}index={index}&wait={}ms", wait.as_millis())
        } else {
            path.to_string()
        };
        // Consul adds up to wait/16 of jitter to the wait; allow for it and the network.
        let timeout = wait + wait / 16 + BLOCKING_MARGIN;
        let (status, headers, body, url) = self.send(Method::GET, &full, timeout, None).await?;
        if !(status.is_success() || status == StatusCode::NOT_FOUND) {
            return Err(ConsulError::Status {
                method: Method::GET,
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        let index = headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(ConsulError::NoIndex { url })?;
        Ok(Fetched {
            index,
            found: status != StatusCode::NOT_FOUND,
            body,
        })
    }

    /// PUT with a body; returns the response body.
    pub async fn put(&self, path: &str, body: Vec<u8>) -> Result<bytes::Bytes, ConsulError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<bytes::Bytes, ConsulError> {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn get(&self, path: &str) -> Result<Option<bytes::Bytes>, ConsulError> {
        let (status, _, body, url) = self.send(Method::GET, path, REQUEST_TIMEOUT, None).await?;
        match status {
            s if s.is_success() => Ok(Some(body)),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(ConsulError::Status {
                method: Method::GET,
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            }),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, ConsulError> {
        let (status, _, body, url) = self
            .send(method.clone(), path, REQUEST_TIMEOUT, body)
            .await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ConsulError::Status {
                method,
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            })
        }
    }

    pub fn decode<T: for<'de> Deserialize<'de>>(path: &str, body: &[u8]) -> Result<T, ConsulError> {
        serde_json::from_slice(body).map_err(|source| ConsulError::Decode {
            url: path.to_string(),
            source,
        })
    }

    /// Writes a KV value.
    pub async fn kv_put(&self, key: &str, value: Vec<u8>) -> Result<(), ConsulError> {
        self.put(&format!("/v1/kv/{key}"), value).await.map(|_| ())
    }

    pub async fn kv_delete(&self, key: &str) -> Result<(), ConsulError> {
        self.delete(&format!("/v1/kv/{key}")).await.map(|_| ())
    }

    /// Reads one KV entry with a consistent read, with the index a check-and-set names.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvValue>, ConsulError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            modify_index: u64,
            #[serde(default)]
            value: Option<String>,
        }
        use base64::Engine;
        let path = format!("/v1/kv/{key}?consistent");
        let Some(body) = self.get(&path).await? else {
            return Ok(None);
        };
        let entries: Vec<Entry> = Consul::decode(&path, &body)?;
        let Some(e) = entries.into_iter().next() else {
            return Ok(None);
        };
        let value = match e.value {
            None => Vec::new(),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| ConsulError::Decode {
                    url: path.clone(),
                    source: serde::de::Error::custom(format!("value is not base64: {e}")),
                })?,
        };
        Ok(Some(KvValue {
            modify_index: e.modify_index,
            value,
        }))
    }

    /// Writes a KV value only if the entry is still at `index` (0: only if it does not
    /// exist). `false`: someone else wrote it first.
    pub async fn kv_cas(&self, key: &str, value: Vec<u8>, index: u64) -> Result<bool, ConsulError> {
        let body = self
            .put(&format!("/v1/kv/{key}?cas={index}"), value)
            .await?;
        Ok(body.trim_ascii() == b"true")
    }

    /// Deletes a KV entry only if it is still at `index`. `false`: it changed meanwhile.
    pub async fn kv_delete_cas(&self, key: &str, index: u64) -> Result<bool, ConsulError> {
        let body = self.delete(&format!("/v1/kv/{key}?cas={index}")).await?;
        Ok(body.trim_ascii() == b"true")
    }
}

/// A KV entry read for a check-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvValue {
    pub modify_index: u64,
    pub value: Vec<u8>,
}
