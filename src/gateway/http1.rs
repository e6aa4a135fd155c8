//! HTTP/1 as the gateway's fast path reads it, pure: a request head parsed in place and
//! planned (forwarded here, or handed to hyper), a response head parsed and rewritten with
//! how its body is framed, and where a chunked body ends. No I/O; `forward.rs` drives it.

use super::limits::Limit;

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
const MAX_RESPONSE_HEADERS: usize = 128;

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
fn connection_values<'b>(headers: &[httparse::Header<'b>]) -> Vec<&'b [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value)
        .collect()
}

fn listed_in(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|v| has_token(v, name))
}

/// Parses the request head at the start of `buf` and plans its forwarding. Pure: the
/// decision whether this path or hyper serves it, and the bytes to send.
pub(super) fn plan(
    buf: &[u8],
    client_ip: &str,
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
    let mut prior_xff: Vec<&[u8]> = Vec::new();
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
                .and_then(|v| v.trim().parse::<usize>().ok());
            match (n, body_len) {
                (Some(n), None) if n > limits.max_body_bytes => {
                    return Parsed::Refuse(Limit::BodyBytes)
                }
                (Some(n), None) if n <= MAX_BODY => body_len = Some(n),
                _ => return Parsed::Fallback("a large, repeated or invalid Content-Length"),
            }
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            prior_xff.push(h.value);
        }
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
            || name.eq_ignore_ascii_case("x-forwarded-for")
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
    head.extend_from_slice(b"x-forwarded-for: ");
    for prior in prior_xff.iter().filter(|v| !v.trim_ascii().is_empty()) {
        head.extend_from_slice(prior.trim_ascii());
        head.extend_from_slice(b", ");
    }
    head.extend_from_slice(client_ip.as_bytes());
    head.extend_from_slice(b"\r\n");
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

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Framing {
    Length(u64),
    Chunked,
    /// Until the server closes: the client connection closes after it too.
    Close,
}

/// A parsed response head: the head to send the client, and how to relay what follows.
#[derive(Debug, PartialEq)]
pub(super) struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    pub head: Vec<u8>,
    pub framing: Framing,
    /// The server keeps the connection open after this response.
    pub reusable: bool,
}

/// Why a response head cannot be relayed.
#[derive(Debug, PartialEq)]
pub(super) enum ResponseError {
    /// Over `max_response_header_bytes`.
    TooLarge,
    Invalid(String),
}

impl From<String> for ResponseError {
    fn from(m: String) -> ResponseError {
        ResponseError::Invalid(m)
    }
}

impl From<&str> for ResponseError {
    fn from(m: &str) -> ResponseError {
        ResponseError::Invalid(m.to_string())
    }
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::TooLarge => {
                f.write_str("a response head over max_response_header_bytes")
            }
            ResponseError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Parses the response head at the start of `buf` (`None`: more bytes needed) and rewrites
/// it for the client. `close_client` adds `Connection: close`.
pub(super) fn response_head(
    buf: &[u8],
    method_head: bool,
    close_client: bool,
    max_head: usize,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) if n > max_head => return Err(ResponseError::TooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("an invalid response head ({e})").into()),
    };
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(0);
    let connection = connection_values(resp.headers);
    let mut length = None;
    let mut chunked = false;
    let mut encoded = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(n);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // Only the last coding says whether the message is chunked.
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let framing = if method_head || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    let reusable = framing != Framing::Close
        && !listed_in(&connection, "close")
        && (version == 1 || listed_in(&connection, "keep-alive"));
    let close_client = close_client || framing == Framing::Close;
    // Room for the body bytes that came with the head too: the relay sends both at once.
    let mut head = Vec::with_capacity(buf.len().min(head_len + CHUNK) + 32);
    head.extend_from_slice(b"HTTP/1.1 ");
    if !(100..1000).contains(&status) {
        return Err(format!("an invalid status code {status}").into());
    }
    head.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    head.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name;
        let keep = name.eq_ignore_ascii_case("content-length")
            || (name.eq_ignore_ascii_case("transfer-encoding") && chunked);
        if !keep
            && (HOP_BY_HOP.iter().any(|x| x.eq_ignore_ascii_case(name))
                || listed_in(&connection, name))
        {
            continue;
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    if close_client && !(100..200).contains(&status) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        head_len,
        status,
        head,
        framing,
        reusable,
    }))
}

/// Where a chunked body is, byte by byte: enough to know where it ends, so that it can be
/// relayed as it came.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Chunked {
    /// In a chunk-size line (size so far, whether an extension started).
    Size(u64, bool),
    /// After the size line's CR.
    SizeLf(u64),
    /// In chunk data, bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataCr,
    DataLf,
    /// In the trailer section: at the start of a line, or inside one.
    TrailerStart,
    TrailerLine,
    TrailerLf(bool),
    Done,
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked::Size(0, false)
    }

    /// Consumes from `data` up to the end of the body; returns how many bytes belong to it.
    /// The body is complete when the state is `Done`.
    pub fn advance(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() && *self != Chunked::Done {
            let b = data[i];
            *self = match *self {
                Chunked::Size(n, ext) => match b {
                    b'\r' => Chunked::SizeLf(n),
                    _ if ext => Chunked::Size(n, true),
                    b';' | b' ' | b'\t' => Chunked::Size(n, true),
                    _ => {
                        let d = (b as char).to_digit(16).ok_or("an invalid chunk size")?;
                        let n = n
                            .checked_mul(16)
                            .and_then(|n| n.checked_add(u64::from(d)))
                            .ok_or("a chunk size overflows")?;
                        Chunked::Size(n, false)
                    }
                },
                Chunked::SizeLf(n) => match (b, n) {
                    (b'\n', 0) => Chunked::TrailerStart,
                    (b'\n', n) => Chunked::Data(n),
                    _ => return Err("a chunk size line without LF"),
                },
                Chunked::Data(n) => {
                    let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 {
                        Chunked::DataCr
                    } else {
                        Chunked::Data(left)
                    };
                    continue;
                }
                Chunked::DataCr if b == b'\r' => Chunked::DataLf,
                Chunked::DataLf if b == b'\n' => Chunked::Size(0, false),
                Chunked::DataCr | Chunked::DataLf => return Err("chunk data without CRLF"),
                Chunked::TrailerStart => match b {
                    b'\r' => Chunked::TrailerLf(true),
                    _ => Chunked::TrailerLine,
                },
                Chunked::TrailerLine => match b {
                    b'\r' => Chunked::TrailerLf(false),
                    _ => Chunked::TrailerLine,
                },
                Chunked::TrailerLf(last) => match (b, last) {
                    (b'\n', true) => Chunked::Done,
                    (b'\n', false) => Chunked::TrailerStart,
                    _ => return Err("a trailer line without LF"),
                },
                Chunked::Done => Chunked::Done,
            };
            i += 1;
        }
        Ok(i)
    }
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

    fn planned(raw: &[u8]) -> Parsed {
        plan(raw, "1.1.1.1", LIMITS, |p| p.starts_with("/static/"))
    }

    fn forward(raw: &str) -> Plan {
        match plan(raw.as_bytes(), "127.0.0.9", LIMITS, |p| {
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
    fn a_plain_request_loses_its_hop_by_hop_headers_and_gains_x_forwarded_for() {
        let raw = "GET /hello?x=1 HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\nX-Forwarded-For: 203.0.113.9\r\n\r\nNEXT";
        let p = forward(raw);
        assert_eq!(p.head_len, raw.len() - 4);
        assert_eq!(
            head_text(&p),
            "GET /hello?x=1 HTTP/1.1\r\nAccept: */*\r\nx-forwarded-for: 203.0.113.9, 127.0.0.9\r\n"
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
            plan(fields(11).as_bytes(), "1.1.1.1", few, |_| false),
            Parsed::Refuse(Limit::HeaderCount)
        );
        assert_eq!(
            plan(fields(70).as_bytes(), "1.1.1.1", few, |_| false),
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
                "1.1.1.1",
                roomy,
                |_| false
            ),
            Parsed::Fallback(_)
        ));
    }

    #[test]
    fn response_framing_follows_the_rules_of_http_1_1() {
        let h = |raw: &str, head: bool| {
            response_head(raw.as_bytes(), head, false, 65536)
                .unwrap()
                .unwrap()
        };
        assert_eq!(
            h("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false).framing,
            Framing::Length(3)
        );
        assert_eq!(
            h("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            Framing::Length(0)
        );
        assert_eq!(
            h("HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            Framing::Length(0)
        );
        let chunked = h(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(String::from_utf8(chunked.head)
            .unwrap()
            .contains("Transfer-Encoding: gzip, chunked\r\n"));
        let until_close = h("HTTP/1.1 200 OK\r\n\r\nabc", false);
        assert_eq!(until_close.framing, Framing::Close);
        assert!(!until_close.reusable);
        assert!(String::from_utf8(until_close.head)
            .unwrap()
            .ends_with("connection: close\r\n\r\n"));
        let closing = h("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close, x-a\r\nX-A: 1\r\nKeep-Alive: 1\r\n\r\n", false);
        assert!(!closing.reusable);
        assert_eq!(
            String::from_utf8(closing.head).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        );
        assert!(!h("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).reusable);
        assert!(
            h(
                "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
                false
            )
            .reusable
        );
        assert!(response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            false,
            false,
            65536
        )
        .is_err());
        assert!(response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            false,
            65536
        )
        .is_err());
        assert_eq!(
            response_head(b"HTTP/1.1 200 OK\r\nContent", false, false, 65536).unwrap(),
            None
        );
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(
            response_head(big.as_bytes(), false, false, 8192),
            Err(ResponseError::TooLarge)
        );
        assert_eq!(
            response_head(&big.as_bytes()[..8500], false, false, 8192),
            Err(ResponseError::TooLarge)
        );
        assert!(response_head(big.as_bytes(), false, false, 65536).is_ok());
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end() {
        let body = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let whole = body.len() - 4;
        // Whole, and fed one byte at a time: the same end.
        let mut c = Chunked::new();
        assert_eq!(c.advance(body).unwrap(), whole);
        assert_eq!(c, Chunked::Done);
        let mut c = Chunked::new();
        let mut used = 0;
        for b in body {
            if c == Chunked::Done {
                break;
            }
            used += c.advance(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(used, whole);
        let mut c = Chunked::new();
        assert_eq!(c.advance(b"0\r\n\r\n").unwrap(), 5);
        assert_eq!(c, Chunked::Done);
        assert!(Chunked::new().advance(b"zz\r\n").is_err());
        assert!(Chunked::new().advance(b"2\r\nabX").is_err());
        assert!(Chunked::new().advance(b"fffffffffffffffff\r\n").is_err());
    }
}
