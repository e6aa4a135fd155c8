//! What bounds each client's share of the gateway (`[gateway]` limits): admission of new
//! connections (a cap on all of them with a short wait, and a cap per client address), the
//! answers a limit gives, and the counter of every time one bites
//! (`rebalancer_gateway_limited_total{limit}`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Limits;
use crate::telemetry::{GW_CLIENT_CONNECTIONS, GW_LIMITED};

/// Each limit, as its `limit` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// `max_connections`: answered 503 after `queue_timeout`.
    MaxConnections,
    /// `max_connections_per_ip`: answered 429.
    PerIp,
    /// No request for `idle_timeout` on a keep-alive connection: closed.
    IdleTimeout,
    /// A head not whole within `header_timeout` of its first byte: 408.
    HeaderTimeout,
    /// `max_header_bytes`, `max_headers`: 431.
    HeaderBytes,
    HeaderCount,
    /// `max_body_bytes`: 413; `body_timeout`: 408.
    BodyBytes,
    BodyTimeout,
    /// `max_response_header_bytes`: the client gets 502.
    ResponseHeaderBytes,
    /// A relayed WebSocket side silent (no pong either) for `ws_idle_timeout`.
    WsIdle,
    /// `ws_max_frame_bytes`, `ws_max_message_bytes`: close 1009.
    WsFrameBytes,
    WsMessageBytes,
}

impl Limit {
    pub(super) const ALL: [Limit; 12] = [
        Limit::MaxConnections,
        Limit::PerIp,
        Limit::IdleTimeout,
        Limit::HeaderTimeout,
        Limit::HeaderBytes,
        Limit::HeaderCount,
        Limit::BodyBytes,
        Limit::BodyTimeout,
        Limit::ResponseHeaderBytes,
        Limit::WsIdle,
        Limit::WsFrameBytes,
        Limit::WsMessageBytes,
    ];

    /// The `limit` label: the `[gateway]` key that bit.
    pub(super) fn label(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::PerIp => "max_connections_per_ip",
            Limit::IdleTimeout => "idle_timeout",
            Limit::HeaderTimeout => "header_timeout",
            Limit::HeaderBytes => "max_header_bytes",
            Limit::HeaderCount => "max_headers",
            Limit::BodyBytes => "max_body_bytes",
            Limit::BodyTimeout => "body_timeout",
            Limit::ResponseHeaderBytes => "max_response_header_bytes",
            Limit::WsIdle => "ws_idle_timeout",
            Limit::WsFrameBytes => "ws_max_frame_bytes",
            Limit::WsMessageBytes => "ws_max_message_bytes",
        }
    }

    /// The status a client is answered with, and why, when the limit bites on a request.
    pub(super) fn answer(self) -> (u16, &'static str, &'static str) {
        match self {
            Limit::MaxConnections => (
                503,
                "Service Unavailable",
                "the gateway holds as many connections as it may (max_connections)\n",
            ),
            Limit::PerIp => (
                429,
                "Too Many Requests",
                "too many connections from your address (max_connections_per_ip)\n",
            ),
            Limit::HeaderTimeout | Limit::IdleTimeout => (
                408,
                "Request Timeout",
                "the request head did not arrive in time (header_timeout)\n",
            ),
            Limit::BodyTimeout => (
                408,
                "Request Timeout",
                "the request body did not arrive in time (body_timeout)\n",
            ),
            Limit::HeaderBytes => (
                431,
                "Request Header Fields Too Large",
                "the request head is too large (max_header_bytes)\n",
            ),
            Limit::HeaderCount => (
                431,
                "Request Header Fields Too Large",
                "the request has too many header fields (max_headers)\n",
            ),
            Limit::BodyBytes => (
                413,
                "Content Too Large",
                "the request body is too large (max_body_bytes)\n",
            ),
            Limit::ResponseHeaderBytes => (
                502,
                "Bad Gateway",
                "the server's response head is too large (max_response_header_bytes)\n",
            ),
            Limit::WsIdle | Limit::WsFrameBytes | Limit::WsMessageBytes => {
                (400, "Bad Request", "a WebSocket limit\n")
            }
        }
    }
}

/// The counters of every limit, registered at start so that each series shows 0 until it
/// bites.
pub(super) struct Bitten([metrics::Counter; Limit::ALL.len()]);

impl Bitten {
    pub(super) fn new() -> Bitten {
        Bitten(Limit::ALL.map(|l| metrics::counter!(GW_LIMITED, "limit" => l.label())))
    }

    pub(super) fn count(&self, limit: Limit) {
        let i = Limit::ALL
            .iter()
            .position(|l| *l == limit)
            .expect("every limit is in ALL");
        self.0[i].increment(1);
    }
}

/// Who may hold a client connection: `max_connections` slots, and at most
/// `max_connections_per_ip` of them from one address.
pub(super) struct Admission {
    slots: Arc<Semaphore>,
    queue_timeout: Duration,
    /// Since when every slot has been taken and the wait has begun.
    full_since: Mutex<Option<Instant>>,
    per_ip: usize,
    by_ip: ByIp,
    open: metrics::Gauge,
    /// Refusals being written at once (each holds a socket for a moment).
    refusing: Arc<Semaphore>,
}

/// Client connections open by address (only addresses with one).
type ByIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Refusals written at once; past it, a refused connection is closed without an answer.
const REFUSING_AT_ONCE: usize = 256;

/// A client connection's slot, given back (and its address's count) when dropped.
pub(super) struct Admitted {
    _slot: OwnedSemaphorePermit,
    ip: Option<(IpAddr, ByIp)>,
    open: metrics::Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.decrement(1.0);
        if let Some((ip, by_ip)) = &self.ip {
            let mut by_ip = by_ip.lock().expect("not poisoned");
            if let Some(n) = by_ip.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(ip);
                }
            }
        }
    }
}

impl Admission {
    pub(super) fn new(l: &Limits) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(l.max_connections)),
            queue_timeout: l.queue_timeout,
            full_since: Mutex::new(None),
            per_ip: l.max_connections_per_ip,
            by_ip: Arc::new(Mutex::new(HashMap::new())),
            open: metrics::gauge!(GW_CLIENT_CONNECTIONS),
            refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
        }
    }

    /// A slot for the next connection to accept. When every slot is taken, this waits (and
    /// so accepting pauses, new connections queueing in the kernel) until one frees or
    /// `queue_timeout` has passed since they were all taken; then `None`, at once, until a
    /// slot frees: the connections waiting are answered 503.
    pub(super) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            *self.full_since.lock().expect("not poisoned") = None;
            return Some(p);
        }
        let since = *self
            .full_since
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(Instant::now);
        let p = tokio::time::timeout_at(
            since + self.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        .ok()?
        .expect("the semaphore is never closed");
        *self.full_since.lock().expect("not poisoned") = None;
        Some(p)
    }

    /// Admits a connection from `ip` on `slot`, or `Err` when its address holds its share.
    pub(super) fn admit(&self, slot: OwnedSemaphorePermit, ip: IpAddr) -> Result<Admitted, Limit> {
        let ip = if self.per_ip == 0 {
            None
        } else {
            let mut by_ip = self.by_ip.lock().expect("not poisoned");
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= self.per_ip {
                return Err(Limit::PerIp);
            }
            *n += 1;
            Some((ip, self.by_ip.clone()))
        };
        self.open.increment(1.0);
        Ok(Admitted {
            _slot: slot,
            ip,
            open: self.open.clone(),
        })
    }

    /// Answers a connection that a limit keeps out, without reading its request (a moment's
    /// work, bounded; past the bound it is closed unanswered).
    pub(super) fn refuse(&self, stream: TcpStream, limit: Limit) {
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            answer_and_close(stream, limit, true).await;
        });
    }
}

/// The bytes of a limit's answer, `Connection: close` when `close`.
pub(super) fn answer_bytes(limit: Limit, close: bool) -> Vec<u8> {
    let (status, reason, text) = limit.answer();
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\n{}",
        text.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    if limit == Limit::MaxConnections {
        out.push_str("retry-after: 1\r\n");
    }
    out.push_str("\r\n");
    out.push_str(text);
    out.into_bytes()
}

/// How long a refused client may take to read its answer before the socket closes.
const LINGER: Duration = Duration::from_secs(1);

/// Writes a limit's answer and closes the connection. The client may still be sending (a
/// request head or a body the answer refuses), so what it sends is read and dropped for a
/// moment first: closing a socket with unread bytes resets it, and the reset can destroy the
/// answer before the client reads it.
pub(super) async fn answer_and_close<S>(mut stream: S, limit: Limit, close: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let bytes = answer_bytes(limit, close);
    if tokio::time::timeout(LINGER, stream.write_all(&bytes))
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        let mut drained = 0usize;
        while drained < (1 << 20) {
            match stream.read(&mut sink).await {
                Ok(n) if n > 0 => drained += n,
                _ => return,
            }
        }
    })
    .await;
}
