//! HTTP clients for tests. reqwest is built without a default TLS provider (the roles
//! install rustls's `ring` at start, see `rebalancer::contract::tls`); a test installs the
//! same before any client, so these are the one way tests make one.

pub fn http() -> reqwest::Client {
    http_builder().build().expect("a plain HTTP client builds")
}

/// For `http://` only (see [`Certs::http_builder`] for HTTPS).
pub fn http_builder() -> reqwest::ClientBuilder {
    rebalancer::contract::tls::plain_http_builder()
}

/// `reqwest::get`, with the provider installed.
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    http().get(url).send().await
}
