//! Which headers hyper's path passes on, pure: a request's end-to-end ones and the
//! forwarding ones the gateway sets, a response's without the hop-by-hop ones.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::forwarding::{Forwarding, Prior, FORWARDING};
use super::http1::HOP_BY_HOP;

/// The names a message's `Connection` headers list (lowercased): hop-by-hop too.
pub(super) fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty())
        .collect()
}

/// A request's end-to-end headers: not hop-by-hop, not named in `Connection`, and not the
/// forwarding headers (which the gateway sets).
pub(super) fn end_to_end(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let listed = connection_listed(headers);
    headers.iter().filter(move |(k, _)| {
        let k = k.as_str();
        !HOP_BY_HOP.contains(&k) && !FORWARDING.contains(&k) && !listed.iter().any(|l| l == k)
    })
}

/// The forwarding headers for a request hyper read from `peer`.
pub(super) fn forwarding_for(
    forwarding: &Forwarding,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Vec<(String, Vec<u8>)> {
    let mut prior = Prior::default();
    for (k, v) in headers {
        prior.note(k.as_str(), v.as_bytes());
    }
    forwarding.pairs(peer.ip(), &prior)
}

/// A response's headers as the client gets them: hop-by-hop ones (and those `Connection`
/// names) out, `Content-Length` kept for hyper to frame by, unless the server also sent
/// `Transfer-Encoding`, which overrides it (RFC 9112 §6.3): the body was decoded by that.
pub(super) fn response_headers(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        headers.remove(http::header::CONTENT_LENGTH);
    }
    for h in HOP_BY_HOP {
        if *h != "content-length" {
            headers.remove(*h);
        }
    }
    for l in listed {
        if l != "content-length" {
            headers.remove(l.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_response_loses_its_hop_by_hop_headers_and_a_content_length_beside_an_encoding() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        response_headers(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-kept"]);
        let mut h = HeaderMap::new();
        h.append("content-length", HeaderValue::from_static("3"));
        response_headers(&mut h);
        assert!(
            h.contains_key("content-length"),
            "kept for hyper to frame by"
        );
        let mut req = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=x"),
            ("origin", "https://app"),
        ] {
            req.append(k, HeaderValue::from_static(v));
        }
        let kept: Vec<&str> = end_to_end(&req).map(|(k, _)| k.as_str()).collect();
        assert_eq!(kept, vec!["origin"]);
    }
}
