//! HTTP/1 as the gateway's fast path reads it, pure: a request head parsed in place and
//! planned (forwarded here, or handed to hyper), a response head parsed and rewritten with
//! how its body is framed, and where a chunked body ends. No I/O; `forward.rs` drives it.

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

/// A request head larger than this goes to hyper (which answers 431 past its own limit).
const MAX_HEAD: usize = 64 * 1024;
/// A request body up to this size is read here (kept for a retry); a larger one goes to
/// hyper.
const MAX_BODY: usize = 1 << 20;
/// Headers parsed in place; a request with more goes to hyper.
const MAX_HEADERS: usize = 64;
/// A response with more headers than this is answered 502.
const MAX_RESPONSE_HEADERS: usize = 128;

/// What a parsed request asks of this path.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed {
    /// More bytes are needed for the head.
    Partial,
    /// Not for this path: hand the connection to hyper.
    Fallback(&'static str),
    Forward(Plan),
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
pub(super) fn plan(buf: &[u8], client_ip: &str, cached: impl Fn(&str) -> bool) -> Parsed {
    // Uninitialized: zeroing 64 headers per request showed in the profile.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parsed::Fallback("a large head")
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Fallback("a head httparse refuses"),
    };
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
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
        {
            return Parsed::Fallback("an upgrade, a chunked body or an expectation");
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            match (n, body_len) {
                (Some(n), None) if n <= MAX_BODY => body_len = Some(n),
                _ => return Parsed::Fallback("a large, repeated or invalid Content-Length"),
            }
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            prior_xff.push(h.value);
        }
    }
    if listed_in(&connection, "upgrade") {
        return Parsed::Fallback("an upgrade");
    }
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
    if let Some(n) = body_len {
        head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    head.extend_from_slice(b"x-forwarded-for: ");
    for prior in prior_xff.iter().filter(|v| !v.trim_ascii().is_empty()) {
        head.extend_from_slice(prior.trim_ascii());
        head.extend_from_slice(b", ");
    }
    head.extend_from_slice(client_ip.as_bytes());
    head.extend_from_slice(b"\r\n");
    Parsed::Forward(Plan {
        head_len,
        body_len: body_len.unwrap_or(0),
        head,
        idempotent: idempotent_name(method),
        method_head: method == "HEAD",
        client_close: listed_in(&connection, "close"),
    })
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

/// Parses the response head at the start of `buf` (`None`: more bytes needed) and rewrites
/// it for the client. `close_client` adds `Connection: close`.
pub(super) fn response_head(
    buf: &[u8],
    method_head: bool,
    close_client: bool,
) -> Result<Option<ResponseHead>, String> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("a response head over 64 KiB".into())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("an invalid response head ({e})")),
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
        return Err(format!("an invalid status code {status}"));
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

    fn forward(raw: &str) -> Plan {
        match plan(raw.as_bytes(), "127.0.0.9", |p| p.starts_with("/static/")) {
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
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "GET /a HTTP/1.0\r\n\r\n",
            "GET http://example/a HTTP/1.1\r\n\r\n",
            "CONNECT example:443 HTTP/1.1\r\n\r\n",
            "GET /static/app.js HTTP/1.1\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            "GET /a HTTP/1.1\r\nBad Header\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                matches!(
                    plan(raw.as_bytes(), "1.1.1.1", |p| p.starts_with("/static/")),
                    Parsed::Fallback(_)
                ),
                "{raw:?}"
            );
        }
        assert_eq!(
            plan(b"GET /a HTTP/1.1\r\nHost:", "1.1.1.1", |_| false),
            Parsed::Partial
        );
        // A cached path is only the cache's for GET.
        forward("POST /static/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn response_framing_follows_the_rules_of_http_1_1() {
        let h =
            |raw: &str, head: bool| response_head(raw.as_bytes(), head, false).unwrap().unwrap();
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
            false
        )
        .is_err());
        assert!(response_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            false
        )
        .is_err());
        assert_eq!(
            response_head(b"HTTP/1.1 200 OK\r\nContent", false, false).unwrap(),
            None
        );
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
