//! The HTTP/1 forwarding path for plain requests: its I/O (the parsing is `http1.rs`).
//!
//! Most of what a gateway forwards is small keep-alive requests. For those, hyper's server
//! and client on either side cost the gateway about twice `HAProxy`'s CPU per request
//! (BENCHMARKS.md), almost all of it building and copying header maps that a proxy only
//! passes on. Here a request's head is parsed in place with `httparse`, rewritten into one
//! buffer (hop-by-hop headers out; `Host` and `X-Forwarded-For` set) and written to a
//! keep-alive server connection; the response head is parsed the same way and relayed with
//! its body, framed by `Content-Length`, `chunked` or the server closing.
//!
//! Server connections belong to no client connection: a request takes an idle one from the
//! shared pool (or opens one) and puts it back after its response, as `HAProxy`'s `http-reuse`
//! does. So the gateway holds about as many as there are requests in flight, not one per
//! client connection and server, and each server sees few, busy connections.
//!
//! Everything else is hyper's: a request with an upgrade, a chunked or large body, an
//! `Expect`, HTTP/1.0, a cached path, a head `httparse` refuses, or shared accounting. The
//! connection, with the bytes already read, goes to `serve_connection` for the rest of its
//! life, so the rules of HTTP that this path does not implement are never guessed at.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::access;
use super::attempt::{Ask, AttemptError, Failed, Tries};
use super::conn::{read_drain, Conn};
use super::http1::{
    plan, response_head, Chunked, Framing, HeadLimits, Parsed, Plan, ResponseError, ResponseHead,
    CHUNK,
};
use super::limits::{answer_and_close, Limit};
use super::route::Kind;
use super::{Gateway, Target};

/// A connection to one server, in use for one request.
struct ServerConn {
    id: Arc<str>,
    stream: TcpStream,
    buf: BytesMut,
    /// Reused from the pool: a failure before the first response byte may mean the server
    /// closed it while idle.
    reused: bool,
}

/// An idle keep-alive connection to a server, in the shared pool between requests (with its
/// read buffer, empty, to keep the allocation).
pub(super) struct Idle {
    stream: TcpStream,
    buf: BytesMut,
}

impl Idle {
    /// False when the server closed the idle connection (or sent something unasked). Costs
    /// a system call only when the connection became readable since it was last read.
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// What became of a request after its response head.
enum Relayed {
    /// The response went out whole; the client connection stays open.
    KeepAlive,
    /// The response went out, or broke after it started; close the client connection.
    Close,
}

/// Serves one client connection until it closes, `stop`, or a request this path leaves to
/// hyper (then hyper serves the rest).
pub(super) async fn serve(g: Gateway, mut client: Conn, peer: SocketAddr, stop: CancellationToken) {
    let mut cbuf = BytesMut::new();
    let mut wire: Vec<u8> = Vec::new();
    let limits = &g.0.cfg.limits;
    let head_limits = HeadLimits::from(limits);
    // Made once (see `ws_relay::relay`).
    let stopped = stop.clone().cancelled_owned();
    tokio::pin!(stopped);
    loop {
        // The next request's head: its first byte within the idle timeout, the whole of it
        // within the header timeout of that.
        let mut started = !cbuf.is_empty();
        let mut deadline = Instant::now()
            + if started {
                limits.header_timeout
            } else {
                g.0.cfg.idle_timeout
            };
        let plan = loop {
            match plan(&cbuf, peer.ip(), &g.0.forwarding, head_limits, |p| {
                g.0.cache.covers(p)
            }) {
                Parsed::Forward(p) => break p,
                Parsed::Fallback(why) => {
                    tracing::trace!(%peer, why, "to hyper");
                    // A WebSocket relayed by hyper lives long: keep nothing of this path.
                    drop(wire);
                    let rest = super::rewind::Rewind {
                        prefix: cbuf,
                        inner: client,
                    };
                    // Boxed, like every long or large part of a connection's life, so that
                    // a connection waiting for its next request holds only this loop.
                    Box::pin(super::serve_connection(g, rest, peer, stop)).await;
                    return;
                }
                Parsed::Refuse(limit) => return Box::pin(refuse(&g, client, limit)).await,
                Parsed::BadUpgrade(why) => {
                    Box::pin(async {
                        let _ = client.write_all(&super::websocket::bad_upgrade(why)).await;
                        let _ = client.shutdown().await;
                    })
                    .await;
                    return;
                }
                Parsed::Upgrade(p) => {
                    // The connection becomes the session: keep nothing of this path but
                    // what the client sent after its head.
                    g.0.requests.fetch_add(1, Ordering::Relaxed);
                    let early = cbuf[p.head_len..].to_vec();
                    drop((cbuf, wire));
                    Box::pin(super::ws_upgrade::open(g, client, early, p.head, stop)).await;
                    return;
                }
                Parsed::Partial => {}
            }
            let read = tokio::select! {
                () = &mut stopped => return,
                r = tokio::time::timeout_at(deadline, read_some(&mut client, &mut cbuf)) => r,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {
                    if !started {
                        started = true;
                        deadline = Instant::now() + limits.header_timeout;
                    }
                }
                Ok(_) => return,
                Err(_) if started => {
                    return Box::pin(refuse(&g, client, Limit::HeaderTimeout)).await
                }
                Err(_) => {
                    g.0.bitten.count(Limit::IdleTimeout);
                    return;
                }
            }
        };
        cbuf.advance(plan.head_len);
        // The whole body within the body timeout.
        let deadline = Instant::now() + limits.body_timeout;
        while cbuf.len() < plan.body_len {
            // Grown as the body comes, not reserved for what the head declares: a slow
            // client holds only what it sent.
            match tokio::time::timeout_at(deadline, read_some(&mut client, &mut cbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => return Box::pin(refuse(&g, client, Limit::BodyTimeout)).await,
            }
        }
        let body = cbuf.split_to(plan.body_len);
        g.0.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match Box::pin(forward(&g, &mut client, &mut wire, &plan, &body)).await {
            Relayed::KeepAlive if !plan.client_close => {}
            _ => {
                let _ = client.shutdown().await;
                return;
            }
        }
    }
}

/// Reads what the client sends next into `buf`, which grows by what came
/// (`conn::read_appending`). While `buf` holds nothing, it holds no memory either: an idle
/// keep-alive connection costs no buffer.
async fn read_some(client: &mut Conn, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
    loop {
        client.readable().await?;
        match super::conn::read_appending(buf, |scratch| client.try_read_buf(scratch)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

/// Answers a request a limit refuses, counted, and closes the connection.
async fn refuse(g: &Gateway, client: Conn, limit: Limit) {
    g.0.bitten.count(limit);
    if g.0.cfg.access_log {
        if let Ok(peer) = client.peer_addr() {
            access::request(&access::Request {
                client: peer.ip(),
                method: "-",
                path: "-",
                status: limit.answer().0,
                backend: None,
                bytes: None,
                started: Instant::now(),
            });
        }
    }
    Box::pin(answer_and_close(client, limit, true)).await;
}

/// Sends one request (on another server when it fails and may be sent again) and relays
/// its response.
async fn forward(
    g: &Gateway,
    client: &mut Conn,
    wire: &mut Vec<u8>,
    plan: &Plan,
    body: &[u8],
) -> Relayed {
    let started = Instant::now();
    let peer = if g.0.cfg.access_log {
        client.peer_addr().ok().map(|a| a.ip())
    } else {
        None
    };
    let log = |status: u16, backend: Option<&str>, bytes: Option<u64>| {
        if let Some(client) = peer {
            let (method, path) = access::request_line(&plan.head);
            access::request(&access::Request {
                client,
                method,
                path,
                status,
                backend,
                bytes,
                started,
            });
        }
    };
    let ask = Ask {
        kind: Kind::Request,
        inflight: None,
        idempotent: plan.idempotent,
    };
    let mut tries = Tries::new(g, ask);
    let (target, mut conn, mut head) = loop {
        let target = match tries.next() {
            Ok(t) => t,
            Err(why) => {
                let text = format!("no server can take this request: {why}\n");
                log(503, None, None);
                return answer(client, 503, "Service Unavailable", &text, plan.client_close).await;
            }
        };
        wire.clear();
        wire.extend_from_slice(&plan.head);
        wire.extend_from_slice(b"host: ");
        wire.extend_from_slice(target.host.as_bytes());
        wire.extend_from_slice(b"\r\n\r\n");
        wire.extend_from_slice(body);
        let exchanged = tokio::time::timeout(
            g.0.cfg.request_timeout,
            exchange(g, &target, wire, plan.method_head, plan.client_close),
        )
        .await
        .unwrap_or_else(|_| {
            Err(AttemptError::Sent(format!(
                "no answer within {:?}",
                g.0.cfg.request_timeout
            )))
        });
        match exchanged {
            Ok((conn, head)) => break (target, conn, head),
            Err(e) => {
                if let Err(Failed { server, error }) = tries.after_failure(target, e).await {
                    let text = format!("{server} failed: {}\n", error.message());
                    log(502, None, None);
                    return answer(client, 502, "Bad Gateway", &text, plan.client_close).await;
                }
            }
        }
    };
    let ok = head.status < 500 || head.status == 503;
    g.outcome(&target, ok);
    g.0.http_duration.record(started.elapsed().as_secs_f64());
    target.backend.counts.ok.fetch_add(1, Ordering::Relaxed);
    drop(target);
    let mut sent = 0;
    let relayed = relay(g, client, &mut conn, &mut head, &mut sent).await;
    log(head.status, Some(&conn.id), Some(sent));
    if head.reusable && conn.buf.is_empty() && relayed.is_ok() {
        let idle = Idle {
            stream: conn.stream,
            buf: conn.buf,
        };
        // When the pool is full, dropping it closes it.
        let _ = g.raw_pool().put(conn.id, idle, Instant::now());
    }
    match relayed {
        Ok(()) if head.framing != Framing::Close => Relayed::KeepAlive,
        _ => Relayed::Close,
    }
}

/// Writes `wire` to a connection to `target` and reads the response head. Interim (1xx)
/// responses are not expected (requests with `Expect` go to hyper) and are dropped.
async fn exchange(
    g: &Gateway,
    target: &Target,
    wire: &[u8],
    method_head: bool,
    client_close: bool,
) -> Result<(ServerConn, ResponseHead), AttemptError> {
    let mut conn = take(g, target).await?;
    if let Err(e) = conn.stream.write_all(wire).await {
        let m = format!("write: {e}");
        return Err(if conn.reused {
            AttemptError::NotSent(m)
        } else {
            AttemptError::Sent(m)
        });
    }
    let max_head = g.0.cfg.limits.max_response_header_bytes;
    loop {
        match response_head(&conn.buf, method_head, client_close, max_head) {
            Ok(Some(head)) if (100..200).contains(&head.status) => {
                conn.buf.advance(head.head_len);
            }
            Ok(Some(head)) => {
                conn.buf.advance(head.head_len);
                return Ok((conn, head));
            }
            Ok(None) => {}
            Err(e @ ResponseError::TooLarge) => {
                g.0.bitten.count(Limit::ResponseHeaderBytes);
                return Err(AttemptError::Unrelayable(e.to_string()));
            }
            Err(e) => return Err(AttemptError::Sent(e.to_string())),
        }
        conn.buf.reserve(4096);
        match read_drain(&conn.stream, &mut conn.buf).await {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                return Err(AttemptError::Sent(
                    "the server closed the connection".into(),
                ))
            }
            Err(e) => return Err(AttemptError::Sent(format!("read: {e}"))),
        }
    }
}

/// A connection to `target`: an idle one from the shared pool (the most recently used), or a
/// new one.
async fn take(g: &Gateway, target: &Target) -> Result<ServerConn, AttemptError> {
    if let Some(idle) = g
        .raw_pool()
        .take(&target.id, Instant::now(), Idle::still_open)
    {
        g.0.pooled.increment(1);
        return Ok(ServerConn {
            id: target.id.clone(),
            stream: idle.stream,
            buf: idle.buf,
            reused: true,
        });
    }
    let stream = super::hyper_path::connect(g, target)
        .await
        .map_err(AttemptError::NotSent)?;
    Ok(ServerConn {
        id: target.id.clone(),
        stream,
        buf: BytesMut::with_capacity(4096),
        reused: false,
    })
}

/// Relays the response head and body to the client.
async fn relay(
    g: &Gateway,
    client: &mut Conn,
    conn: &mut ServerConn,
    head: &mut ResponseHead,
    sent: &mut u64,
) -> io::Result<()> {
    async fn read_more(
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        timeout: Duration,
    ) -> Result<io::Result<usize>, tokio::time::error::Elapsed> {
        buf.reserve(CHUNK);
        tokio::time::timeout(timeout, read_drain(stream, buf)).await
    }
    let timeout = g.0.cfg.request_timeout;
    let mut out = std::mem::take(&mut head.head);
    match head.framing {
        Framing::Length(mut left) => loop {
            let n = conn
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            out.extend_from_slice(&conn.buf[..n]);
            conn.buf.advance(n);
            left -= n as u64;
            send(client, &out, timeout, sent).await?;
            out.clear();
            if left == 0 {
                return Ok(());
            }
            match read_more(&mut conn.stream, &mut conn.buf, timeout).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(io::Error::other("the server stopped mid-body")),
            }
        },
        Framing::Chunked => {
            let mut state = Chunked::new();
            loop {
                let n = state
                    .advance(&conn.buf)
                    .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
                out.extend_from_slice(&conn.buf[..n]);
                conn.buf.advance(n);
                send(client, &out, timeout, sent).await?;
                out.clear();
                if state == Chunked::Done {
                    return Ok(());
                }
                match read_more(&mut conn.stream, &mut conn.buf, timeout).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Err(io::Error::other("the server stopped mid-body")),
                }
            }
        }
        Framing::Close => loop {
            out.extend_from_slice(&conn.buf);
            conn.buf.clear();
            send(client, &out, timeout, sent).await?;
            out.clear();
            match read_more(&mut conn.stream, &mut conn.buf, timeout).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                _ => return Err(io::Error::other("the server stopped mid-body")),
            }
        },
    }
}

/// Writes `bytes` to the client, counted in `sent`; a client that takes nothing for
/// `timeout` is given up.
async fn send(
    client: &mut Conn,
    bytes: &[u8],
    timeout: Duration,
    sent: &mut u64,
) -> io::Result<()> {
    match tokio::time::timeout(timeout, client.write_all(bytes)).await {
        Ok(r) => {
            *sent += bytes.len() as u64;
            r
        }
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for the request timeout",
        )),
    }
}

/// A response of the gateway's own (503, 502).
async fn answer(client: &mut Conn, status: u16, reason: &str, text: &str, close: bool) -> Relayed {
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n",
        text.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(text.as_bytes());
    match client.write_all(&out).await {
        Ok(()) if !close => Relayed::KeepAlive,
        _ => Relayed::Close,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use crate::config::GatewayConfig;
    use crate::fleet::topology::Topology;
    use crate::gateway::conn::Conn;

    /// What every client connection holds while it waits for a request, and every relayed
    /// WebSocket while it is idle, is the future of its task: the long or large parts of
    /// their lives are boxed, so that these stay small (what more they cost is measured in
    /// BENCHMARKS.md).
    #[tokio::test]
    async fn a_waiting_connection_and_an_idle_session_hold_small_futures() {
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Topology::default()));
        let g = super::Gateway::new(GatewayConfig::default(), rx, None, 1);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = || TcpStream::connect(l.local_addr().unwrap());
        let c = conn().await.unwrap();
        let peer = c.local_addr().unwrap();
        let waiting = super::serve(g.clone(), Conn::Tcp(c), peer, CancellationToken::new());
        let session = crate::gateway::ws_upgrade::open(
            g,
            Conn::Tcp(conn().await.unwrap()),
            Vec::new(),
            Vec::new(),
            CancellationToken::new(),
        );
        let (waiting, session) = (
            std::mem::size_of_val(&waiting),
            std::mem::size_of_val(&session),
        );
        println!("a waiting connection: {waiting} bytes; a session: {session} bytes");
        assert!(waiting <= 1536, "{waiting} bytes");
        assert!(session <= 3072, "{session} bytes");
    }
}
