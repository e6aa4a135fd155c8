//! The access log (`access_log = true`): one structured line per request and per WebSocket
//! session, through `tracing` at target `rebalancer::access` (JSON with `--log-json`): what
//! was asked, what was answered, by which server, how many bytes, how long it took, and for
//! a session the close codes and who ended it.

use std::net::IpAddr;

use tokio::time::Instant;

/// One request's line.
pub(super) struct Request<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// The server that answered; `cache` for a cache hit; none when the gateway did.
    pub backend: Option<&'a str>,
    /// Bytes sent to the client, head included; none when not counted (a streamed body).
    pub bytes: Option<u64>,
    pub started: Instant,
}

pub(super) fn request(r: &Request<'_>) {
    tracing::info!(
        target: "rebalancer::access",
        kind = "http",
        client = %r.client,
        method = r.method,
        path = r.path,
        status = r.status,
        backend = r.backend.unwrap_or("-"),
        bytes = r.bytes,
        duration_ms = r.started.elapsed().as_secs_f64() * 1000.0,
    );
}

/// What a session's line needs from its start.
pub(super) struct Opened {
    pub client: IpAddr,
    pub path: String,
    pub started: Instant,
}

/// How a session ended.
pub(super) struct Outcome<'a> {
    pub backend: &'a str,
    /// Bytes from the client to the server, and back.
    pub up: u64,
    pub down: u64,
    /// The close codes each side sent, if any.
    pub client_close: Option<u16>,
    pub server_close: Option<u16>,
    /// `client`, `server`, or the gateway's reason (a limit, stopping).
    pub ended_by: &'a str,
}

pub(super) fn session(o: &Opened, e: &Outcome<'_>) {
    tracing::info!(
        target: "rebalancer::access",
        kind = "ws",
        client = %o.client,
        path = o.path.as_str(),
        status = 101u16,
        backend = e.backend,
        bytes_up = e.up,
        bytes_down = e.down,
        client_close = e.client_close,
        server_close = e.server_close,
        ended_by = e.ended_by,
        duration_ms = o.started.elapsed().as_secs_f64() * 1000.0,
    );
}

/// The method and path of a request line at the start of `head` ("GET /a HTTP/1.1\r\n…").
pub(super) fn request_line(head: &[u8]) -> (&str, &str) {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or("- - -");
    let mut parts = line.split(' ');
    (parts.next().unwrap_or("-"), parts.next().unwrap_or("-"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_request_line_gives_its_method_and_path() {
        assert_eq!(
            super::request_line(b"POST /a?b=1 HTTP/1.1\r\nhost: x\r\n"),
            ("POST", "/a?b=1")
        );
        assert_eq!(super::request_line(b""), ("", "-"));
    }
}
