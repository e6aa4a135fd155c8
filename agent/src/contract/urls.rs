//! URLs as the roles take them: Consul addresses with or without a scheme, and the watch
//! URL of a controller's topology feed.

/// Accepts Consul addresses with or without a scheme, as `CONSUL_HTTP_ADDR` does.
pub fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("topology_feed {url:?}: {why}")]
pub struct FeedUrlError {
    url: String,
    why: &'static str,
}

/// The watch URL of a controller's feed at `base` (`http://host:port`) for `pipeline`.
pub fn watch_url(base: &str, pipeline: &str) -> Result<String, FeedUrlError> {
    let err = |why| FeedUrlError {
        url: base.to_string(),
        why,
    };
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("ws://"))
        .ok_or_else(|| err("must start with http:// (the controller's metrics.listen)"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(err("must be http://host:port, with no path"));
    }
    let name: String = pipeline
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    Ok(format!("ws://{host}/v1/topology/watch?pipeline={name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_urls_are_checked_and_the_pipeline_is_escaped() {
        assert_eq!(
            watch_url("http://127.0.0.1:9464/", "ws").unwrap(),
            "ws://127.0.0.1:9464/v1/topology/watch?pipeline=ws"
        );
        assert_eq!(
            watch_url("http://c:1", "a b&c").unwrap(),
            "ws://c:1/v1/topology/watch?pipeline=a%20b%26c"
        );
        let e = watch_url("https://c:1", "ws").unwrap_err().to_string();
        assert!(e.contains("http://"), "{e}");
        assert!(watch_url("http://c:1/api", "ws").is_err());
    }

    #[test]
    fn consul_addresses_get_http_when_they_have_no_scheme() {
        assert_eq!(with_scheme("127.0.0.1:8500"), "http://127.0.0.1:8500");
        assert_eq!(with_scheme("https://c:8501"), "https://c:8501");
    }
}
