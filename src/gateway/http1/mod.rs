//! HTTP/1 as the gateway's fast path reads it, pure: a request head parsed in place and
//! planned (forwarded here, or handed to hyper), a response head parsed and rewritten with
//! how its body is framed, and where a chunked body ends. No I/O; `forward.rs` drives it.

use std::net::IpAddr;

use super::forwarding::{Forwarding, Prior, FORWARDING};
use super::limits::Limit;

mod response;
pub(super) use response::{response_head, Chunked, Framing, ResponseError, ResponseHead};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the gateway sets itself: never relayed.
pub(super) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Read size for relayed bodies.
pub(super) const CHUNK: usize = 16 * 1024;

/// Whether a request with this method may be sent again after a failure.
pub(super) fn idempotent_name(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
}

/// A request body up to this size is read here (kept for a retry); a larger one, within
/// `max_body_bytes`, goes to hyper.
const MAX_BODY: usize = 1 << 20;
/// Headers parsed in place; a request with more, within `max_headers`, goes to hyper.
const MAX_HEADERS: usize = 64;
/// A response with more headers than this is answered 502.
pub(super) const MAX_RESPONSE_HEADERS: usize = 128;

/// The `[gateway]` limits a request head is held to.
#[allow(clippy::struct_field_names)] // the keys' own names
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
}

impl From<&crate::config::Limits> for HeadLimits {
    fn from(l: &crate::config::Limits) -> HeadLimits {
        HeadLimits {
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            max_body_bytes: l.max_body_bytes,
        }
    }
}

/// What a parsed request asks of this path.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed {
    /// More bytes are needed for the head.
    Partial,
    /// Not for this path: hand the connection to hyper.
    Fallback(&'static str),
    /// A limit refuses it: answer and close.
    Refuse(Limit),
    /// A WebSocket upgrade that RFC 6455 refuses: 400.
    BadUpgrade(&'static str),
    Forward(Plan),
    /// A WebSocket upgrade: `head` is to go to a server; the connection becomes the session.
    Upgrade(Plan),
}

/// A request this path forwards: its head rewritten, less `Host` and the blank line (they
/// depend on the server chosen), and what the response relay needs to know.
#[derive(Debug, PartialEq)]
pub(super) struct Plan {
    pub head_len: usize,
    pub body_len: usize,
    pub head: Vec<u8>,
    pub idempotent: bool,
    pub method_head: bool,
    pub client_close: bool,
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The values of every `Connection` header (no allocation when there is none).
pub(super) fn connection_values<'b>(headers: &[httparse::Header<'b>]) -> Vec<&'b [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value)
        .collect()
}

pub(super) fn listed_in(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|v| has_token(v, name))
}

/// Parses the request head at the start of `buf` and plans its forwarding. Pure: the
/// decision whether this path or hyper serves it, and the bytes to send.
pub(super) fn plan(
    buf: &[u8],
    peer: IpAddr,
    forwarding: &Forwarding,
    limits: HeadLimits,
    cached: impl Fn(&str) -> bool,
) -> Parsed {
    // Uninitialized: zeroing 64 headers per request showed in the profile.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_header_bytes => {
            return Parsed::Refuse(Limit::HeaderBytes)
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header_bytes => {
            return Parsed::Refuse(Limit::HeaderBytes)
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return many_headers(buf, limits),
        Err(_) => return Parsed::Fallback("a head httparse refuses"),
    };
    if req.headers.len() > limits.max_headers {
        return Parsed::Refuse(Limit::HeaderCount);
    }
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Fallback("not HTTP/1.1");
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Parsed::Fallback("not an origin-form request");
    }
    if method == "GET" && cached(path.split('?').next().unwrap_or(path)) {
        return Parsed::Fallback("a cached path");
    }
    let connection = connection_values(req.headers);
    let mut body_len = None;
    let mut prior = Prior::default();
    let mut upgrade = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(has_token(h.value, "websocket"));
        }
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("expect") {
            return Parsed::Fallback("a chunked body or an expectation");
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                // 1*DIGIT (RFC 9110 §8.6): Rust's parse would take "+5" too.
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (n, body_len) {
                (Some(n), None) if n > limits.max_body_bytes => {
                    return Parsed::Refuse(Limit::BodyBytes)
                }
                (Some(n), None) if n <= MAX_BODY => body_len = Some(n),
                _ => return Parsed::Fallback("a large, repeated or invalid Content-Length"),
            }
        }
        prior.note(name, h.value);
    }
    let websocket = match (upgrade, listed_in(&connection, "upgrade")) {
        (None, false) => false,
        (Some(true), true) if method == "GET" && body_len.unwrap_or(0) == 0 => {
            if let Err(why) =
                super::websocket::check_upgrade(req.headers.iter().map(|h| (h.name, h.value)))
            {
                return Parsed::BadUpgrade(why);
            }
            true
        }
        _ => return Parsed::Fallback("an upgrade other than WebSocket's"),
    };
    let mut head = Vec::with_capacity(head_len + 64);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        if HOP_BY_HOP.iter().any(|x| x.eq_ignore_ascii_case(name))
            || FORWARDING.iter().any(|x| x.eq_ignore_ascii_case(name))
            || listed_in(&connection, name)
        {
            continue;
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(n) = body_len.filter(|_| !websocket) {
        head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    if websocket {
        head.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
    }
    forwarding.write(peer, &prior, &mut head);
    let plan = Plan {
        head_len,
        body_len: body_len.unwrap_or(0),
        head,
        idempotent: idempotent_name(method),
        method_head: method == "HEAD",
        client_close: listed_in(&connection, "close"),
    };
    if websocket {
        Parsed::Upgrade(plan)
    } else {
        Parsed::Forward(plan)
    }
}

/// A head with more fields than this path parses in place: within `max_headers`, hyper's
/// (configured with the same limit); past it, refused.
fn many_headers(buf: &[u8], limits: HeadLimits) -> Parsed {
    if limits.max_headers > MAX_HEADERS {
        let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(buf), Err(httparse::Error::TooManyHeaders)) {
            return Parsed::Fallback("many header fields");
        }
    }
    Parsed::Refuse(Limit::HeaderCount)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    const LIMITS: HeadLimits = HeadLimits {
        max_header_bytes: 16 * 1024,
        max_headers: 100,
        max_body_bytes: 1 << 20,
    };

    fn peer(ip: &str) -> IpAddr {
        ip.parse().unwrap()
    }

    fn fwd() -> Forwarding {
        Forwarding::new(Vec::new(), false)
    }

    fn planned(raw: &[u8]) -> Parsed {
        plan(raw, peer("1.1.1.1"), &fwd(), LIMITS, |p| {
            p.starts_with("/static/")
        })
    }

    fn forward(raw: &str) -> Plan {
        match plan(raw.as_bytes(), peer("127.0.0.9"), &fwd(), LIMITS, |p| {
            p.starts_with("/static/")
        }) {
            Parsed::Forward(p) => p,
            other => panic!("not forwarded: {other:?}"),
        }
    }

    fn head_text(p: &Plan) -> String {
        String::from_utf8(p.head.clone()).unwrap()
    }

    #[test]
    fn a_plain_request_loses_its_hop_by_hop_headers_and_gains_the_forwarding_ones() {
        let raw = "GET /hello?x=1 HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\nX-Forwarded-For: 203.0.113.9\r\nForwarded: for=1.2.3.4\r\n\r\nNEXT";
        let p = forward(raw);
        assert_eq!(p.head_len, raw.len() - 4);
        // The client is no trusted proxy: what it said of forwarding is replaced.
        assert_eq!(
            head_text(&p),
            "GET /hello?x=1 HTTP/1.1\r\nAccept: */*\r\nx-forwarded-for: 127.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: gw\r\n\
             forwarded: for=127.0.0.9;host=\"gw\";proto=http\r\n"
        );
        assert!(p.idempotent && !p.method_head && !p.client_close);
        assert_eq!(p.body_len, 0);
    }

    #[test]
    fn a_body_is_counted_and_close_is_noticed() {
        let p = forward("POST /a HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
        assert_eq!(p.body_len, 5);
        assert!(!p.idempotent && p.client_close);
        assert!(head_text(&p).contains("content-length: 5\r\n"));
    }

    #[test]
    fn anything_unusual_goes_to_hyper() {
        let cases = [
            "GET /a HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "GET /a HTTP/1.0\r\n\r\n",
            "GET http://example/a HTTP/1.1\r\n\r\n",
            "CONNECT example:443 HTTP/1.1\r\n\r\n",
            "GET /static/app.js HTTP/1.1\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "GET /a HTTP/1.1\r\nBad Header\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                matches!(planned(raw.as_bytes()), Parsed::Fallback(_)),
                "{raw:?}"
            );
        }
        assert_eq!(planned(b"GET /a HTTP/1.1\r\nHost:"), Parsed::Partial);
        // A cached path is only the cache's for GET.
        forward("POST /static/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn a_websocket_upgrade_keeps_its_end_to_end_headers_and_a_bad_one_is_refused() {
        let raw = "GET /ws?room=1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: chat\r\nOrigin: http://app\r\nCookie: a=1\r\n\r\n";
        let Parsed::Upgrade(p) = planned(raw.as_bytes()) else {
            panic!("not an upgrade: {:?}", planned(raw.as_bytes()));
        };
        let head = head_text(&p);
        for kept in [
            "GET /ws?room=1 HTTP/1.1\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Protocol: chat\r\n",
            "Origin: http://app\r\n",
            "Cookie: a=1\r\n",
            "connection: upgrade\r\nupgrade: websocket\r\n",
        ] {
            assert!(head.contains(kept), "{kept:?} in {head}");
        }
        assert!(
            !head.contains("keep-alive") && !head.contains("Host: gw"),
            "{head}"
        );
        let bad_key = raw.replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        assert!(matches!(planned(bad_key.as_bytes()), Parsed::BadUpgrade(_)));
        let bad_version = raw.replace("Version: 13", "Version: 12");
        assert!(matches!(
            planned(bad_version.as_bytes()),
            Parsed::BadUpgrade(_)
        ));
    }

    #[test]
    fn a_head_past_its_limits_is_refused_with_the_limit_that_bit() {
        let big = format!("GET /a HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
        assert_eq!(planned(big.as_bytes()), Parsed::Refuse(Limit::HeaderBytes));
        // Known before the head ends.
        assert_eq!(
            planned(&big.as_bytes()[..17_000]),
            Parsed::Refuse(Limit::HeaderBytes)
        );
        let fields = |n: usize| {
            let mut raw = String::from("GET /a HTTP/1.1\r\n");
            for i in 0..n {
                let _ = write!(raw, "X-{i}: v\r\n");
            }
            raw + "\r\n"
        };
        assert!(matches!(planned(fields(64).as_bytes()), Parsed::Forward(_)));
        // More than this path parses in place, within max_headers: hyper's.
        assert!(matches!(
            planned(fields(80).as_bytes()),
            Parsed::Fallback(_)
        ));
        assert_eq!(
            planned(fields(101).as_bytes()),
            Parsed::Refuse(Limit::HeaderCount)
        );
        let few = HeadLimits {
            max_headers: 10,
            ..LIMITS
        };
        assert_eq!(
            plan(fields(11).as_bytes(), peer("1.1.1.1"), &fwd(), few, |_| {
                false
            }),
            Parsed::Refuse(Limit::HeaderCount)
        );
        assert_eq!(
            plan(fields(70).as_bytes(), peer("1.1.1.1"), &fwd(), few, |_| {
                false
            }),
            Parsed::Refuse(Limit::HeaderCount)
        );
        assert_eq!(
            planned(b"POST /a HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
            Parsed::Refuse(Limit::BodyBytes)
        );
        let roomy = HeadLimits {
            max_body_bytes: 1 << 30,
            ..LIMITS
        };
        assert!(matches!(
            plan(
                b"POST /a HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                peer("1.1.1.1"),
                &fwd(),
                roomy,
                |_| false
            ),
            Parsed::Fallback(_)
        ));
    }
}
