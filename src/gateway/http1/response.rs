//! Responses as the fast path relays them, pure: the head parsed and rewritten with how its
//! body is framed, and where a chunked body ends.

use super::{connection_values, listed_in, CHUNK, HOP_BY_HOP, MAX_RESPONSE_HEADERS};

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(in crate::gateway) enum Framing {
    Length(u64),
    Chunked,
    /// Until the server closes: the client connection closes after it too.
    Close,
}

/// A parsed response head: the head to send the client, and how to relay what follows.
#[derive(Debug, PartialEq)]
pub(in crate::gateway) struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    pub head: Vec<u8>,
    pub framing: Framing,
    /// The server keeps the connection open after this response.
    pub reusable: bool,
}

/// Why a response head cannot be relayed.
#[derive(Debug, PartialEq)]
pub(in crate::gateway) enum ResponseError {
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
pub(in crate::gateway) fn response_head(
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
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): never both.
        let keep = (name.eq_ignore_ascii_case("content-length") && !encoded)
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
pub(in crate::gateway) enum Chunked {
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
        let both = h(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(both.framing, Framing::Chunked);
        assert_eq!(
            String::from_utf8(both.head).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Content-Length dropped"
        );
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
