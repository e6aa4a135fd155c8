//! WebSocket sessions: the upgrade sent on to a chosen server (another tried when one
//! refuses), its 101 relayed, then the session's bytes passed both ways as they come, as
//! `HAProxy` and nginx tunnel them, but followed frame by frame (`websocket::Frames`): frames
//! and messages over their limits end the session with close 1009, a side silent for
//! `ws_idle_timeout` (pinged every `ws_ping_interval`) ends it with 1001, and closes pass
//! through end to end. An idle session holds no buffer: bytes are read into the stack and
//! written at once; only what a slow reader has not taken yet is kept.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::attempt::{Ask, AttemptError, Tries};
use super::limits::Limit;
use super::route::Kind;
use super::series::WsOpen;
use super::table::Backend;
use super::websocket::{self, Broken, Frames, GOING_AWAY, MAX_HEADER};
use super::Gateway;

/// Header fields as a server sent them.
type Headers = Vec<(String, Vec<u8>)>;

/// The connection hyper gives back after an upgrade.
type HyperIo = hyper_util::rt::TokioIo<super::forward::Rewind<TcpStream>>;

/// A server that took the upgrade: its connection, the headers of its 101 for the client,
/// and any bytes it sent after them.
pub(super) struct Accepted {
    stream: TcpStream,
    pub(super) headers: Headers,
    early: BytesMut,
    backend: Arc<Backend>,
}

/// Headers of a server's 101 that are the gateway's to set, not to pass on.
const NOT_RELAYED: &[&str] = &[
    "connection",
    "upgrade",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "proxy-connection",
    "te",
    "trailer",
];

/// Sends the upgrade `head` (less `Host` and its blank line) to a server picked for a new
/// session, another when one refuses or fails, and returns the one that answered 101, or
/// why none did.
pub(super) async fn upgrade_upstream(g: &Gateway, head: &[u8]) -> Result<Accepted, String> {
    let ask = Ask {
        kind: Kind::Session,
        inflight: None,
        // A WebSocket upgrade is a GET: tried on another server whatever went wrong.
        idempotent: true,
    };
    let mut tries = Tries::new(g, ask);
    let started = Instant::now();
    loop {
        let target = tries.next().map_err(str::to_string)?;
        let attempt = async {
            let mut stream = super::hyper_path::connect(g, &target)
                .await
                .map_err(AttemptError::NotSent)?;
            let mut wire = Vec::with_capacity(head.len() + target.host.len() + 10);
            wire.extend_from_slice(head);
            wire.extend_from_slice(b"host: ");
            wire.extend_from_slice(target.host.as_bytes());
            wire.extend_from_slice(b"\r\n\r\n");
            stream
                .write_all(&wire)
                .await
                .map_err(|e| AttemptError::NotSent(format!("write: {e}")))?;
            let mut buf = BytesMut::with_capacity(1024);
            loop {
                match switched(&buf, g.0.cfg.limits.max_response_header_bytes) {
                    Ok(Some((n, headers))) => {
                        let _ = buf.split_to(n);
                        return Ok((stream, headers, buf));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e),
                }
                match stream.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    Ok(_) => return Err(AttemptError::Sent("the server closed".into())),
                    Err(e) => return Err(AttemptError::Sent(format!("read: {e}"))),
                }
            }
        };
        let error = match tokio::time::timeout(g.0.cfg.connect_timeout, attempt).await {
            Ok(Ok((stream, headers, early))) => {
                g.outcome(&target, true);
                g.0.ws_connect.record(started.elapsed().as_secs_f64());
                target
                    .backend
                    .counts
                    .ws
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Accepted {
                    stream,
                    headers,
                    early,
                    backend: target.backend.clone(),
                });
            }
            Ok(Err(e)) => e,
            Err(_) => {
                AttemptError::NotSent(format!("no upgrade within {:?}", g.0.cfg.connect_timeout))
            }
        };
        if let AttemptError::Refused(why) = &error {
            tracing::debug!(backend = %target.id, why, "upgrade refused");
        }
        if tries.after_failure(target, error).await.is_err() {
            return Err("every server tried refused or failed".into());
        }
    }
}

/// A server's answer to an upgrade: `Some` once its head is whole and it is a 101, with the
/// head's length and its headers to relay; a refusal otherwise.
fn switched(buf: &[u8], max_head: usize) -> Result<Option<(usize, Headers)>, AttemptError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => {
            if resp.code != Some(101) {
                return Err(AttemptError::Refused(format!(
                    "upgrade refused: {}",
                    resp.code.unwrap_or(0)
                )));
            }
            let keep = resp
                .headers
                .iter()
                .filter(|h| !NOT_RELAYED.iter().any(|x| x.eq_ignore_ascii_case(h.name)))
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect();
            Ok(Some((n, keep)))
        }
        Ok(httparse::Status::Partial) if buf.len() <= max_head => Ok(None),
        Ok(_) => Err(AttemptError::Sent(
            "a response head over max_response_header_bytes".into(),
        )),
        Err(e) => Err(AttemptError::Sent(format!(
            "an invalid response head ({e})"
        ))),
    }
}

/// The 101 for the client, with the server's headers.
pub(super) fn switching_head(headers: &Headers) -> Vec<u8> {
    let mut out =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            .to_vec();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Opens a session for an upgrade the fast path read: the server's 101 relayed, then the
/// session; or 503 when no server takes it.
pub(super) async fn open(
    g: Gateway,
    mut client: TcpStream,
    early: Vec<u8>,
    head: Vec<u8>,
    stop: CancellationToken,
) {
    let accepted = upgrade_upstream(&g, &head).await;
    drop(head);
    match accepted {
        Ok(accepted) => {
            if client
                .write_all(&switching_head(&accepted.headers))
                .await
                .is_ok()
            {
                session(g, client, early, accepted, stop).await;
            }
        }
        Err(why) => {
            let text = format!("no server can take this request: {why}\n");
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = client.write_all(answer.as_bytes()).await;
            let _ = client.shutdown().await;
        }
    }
}

/// An upgrade hyper read (on a connection the fast path handed over): checked, sent to a
/// server, and answered with its 101; the session runs on the connection hyper gives back.
pub(super) async fn from_hyper(
    g: Gateway,
    peer: std::net::SocketAddr,
    mut req: axum::extract::Request,
    stop: CancellationToken,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let headers = req.headers();
    if let Err(why) =
        websocket::check_upgrade(headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
    {
        return (
            http::StatusCode::BAD_REQUEST,
            [("sec-websocket-version", "13"), ("connection", "close")],
            format!("not a valid WebSocket upgrade: {why}\n"),
        )
            .into_response();
    }
    let head = upgrade_head(&req, peer);
    let accepted = match upgrade_upstream(&g, &head).await {
        Ok(a) => a,
        Err(why) => return super::unavailable(&why),
    };
    let mut resp = http::Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade");
    for (name, value) in &accepted.headers {
        resp = resp.header(name.as_str(), value.as_slice());
    }
    let Ok(resp) = resp.body(axum::body::Body::empty()) else {
        return (
            http::StatusCode::BAD_GATEWAY,
            "the server's 101 has an invalid header\n",
        )
            .into_response();
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let Ok(parts) = upgraded.downcast::<HyperIo>() else {
            tracing::error!("an upgraded connection of an unexpected type");
            return;
        };
        let (tcp, prefix) = parts.io.into_inner().into_parts();
        let mut early = prefix.to_vec();
        early.extend_from_slice(&parts.read_buf);
        session(g, tcp, early, accepted, stop).await;
    });
    resp
}

/// The upgrade request for a server, from the one hyper read: end-to-end headers kept, the
/// hop-by-hop ones (and those `Connection` names) dropped, less `Host` and the blank line.
fn upgrade_head(req: &axum::extract::Request, peer: std::net::SocketAddr) -> Vec<u8> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    let connection: Vec<String> = req
        .headers()
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    for (name, value) in req.headers() {
        let n = name.as_str();
        if super::http1::HOP_BY_HOP.contains(&n)
            || n == "x-forwarded-for"
            || connection.iter().any(|c| c == n)
        {
            continue;
        }
        head.extend_from_slice(n.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\nx-forwarded-for: ");
    head.extend_from_slice(super::hyper_path::forwarded_for(req.headers(), peer).as_bytes());
    head.extend_from_slice(b"\r\n");
    head
}

/// How long a closing session may take to finish its close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One side of a session.
struct Side {
    stream: TcpStream,
    /// Frames the gateway writes to it are masked: it is the server.
    server: bool,
    /// Frames from this side.
    frames: Frames,
    /// A frame header from this side cut short at the end of a read, kept for the next.
    held: Vec<u8>,
    /// Bytes for this side not yet written (only while it reads slower than the other
    /// sends).
    out: Vec<u8>,
    last_heard: Instant,
    /// It closed its sending half.
    eof: bool,
}

impl Side {
    fn mask(&self) -> Option<[u8; 4]> {
        self.server.then(rand::random)
    }

    /// Writes `bytes` now, keeping what the socket does not take.
    fn pass(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.out.is_empty() {
            self.out.extend_from_slice(bytes);
            return Ok(());
        }
        let written = match self.stream.try_write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        self.out.extend_from_slice(&bytes[written..]);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.stream.try_write(&self.out) {
            Ok(n) => {
                self.out.drain(..n);
                if self.out.is_empty() {
                    self.out = Vec::new(); // frees what a burst grew
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// What reading one side came to.
enum Read {
    Nothing,
    Passed,
    Eof,
    Broken(Broken),
}

/// Reads what `from` has sent into the stack and passes its whole frames on to `to`.
fn pump(from: &mut Side, to: &mut Side) -> io::Result<Read> {
    let mut buf = [0u8; 16 * 1024];
    let held = from.held.len();
    buf[..held].copy_from_slice(&from.held);
    let n = match from.stream.try_read(&mut buf[held..]) {
        Ok(0) => return Ok(Read::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Read::Nothing),
        Err(e) => return Err(e),
    };
    from.last_heard = Instant::now();
    let data = &buf[..held + n];
    let (passed, broken) = match from.frames.scan(data) {
        Ok(k) => (k, None),
        Err((k, why)) => (k, Some(why)),
    };
    to.pass(&data[..passed])?;
    from.held.clear();
    if broken.is_none() {
        debug_assert!(data.len() - passed < MAX_HEADER);
        from.held.extend_from_slice(&data[passed..]);
    }
    Ok(broken.map_or(Read::Passed, Read::Broken))
}

/// Why the gateway ends a session itself.
enum End {
    /// One side broke a rule: the close code for it; the other is told 1001.
    Broken { client: bool, why: Broken },
    /// A side was silent past `ws_idle_timeout`.
    Idle,
    /// The gateway is stopping.
    Stopping,
}

/// Relays a session until it ends. `client_early` and the server's early bytes are what each
/// side sent before the relay began.
pub(super) async fn session(
    g: Gateway,
    client: TcpStream,
    client_early: Vec<u8>,
    accepted: Accepted,
    stop: CancellationToken,
) {
    let _open = WsOpen::new(&accepted.backend.counts.ws_open);
    let limits = &g.0.cfg.limits;
    let now = Instant::now();
    let side = |stream, server: bool| Side {
        stream,
        server,
        // Frames from the client are masked; from the server not.
        frames: Frames::new(
            !server,
            limits.ws_max_frame_bytes,
            limits.ws_max_message_bytes,
        ),
        held: Vec::new(),
        out: Vec::new(),
        last_heard: now,
        eof: false,
    };
    let (mut c, mut s) = (side(client, false), side(accepted.stream, true));
    let early = (
        relay_early(&mut c, &mut s, &client_early),
        relay_early(&mut s, &mut c, &accepted.early),
    );
    drop((client_early, accepted.early));
    let end = match early {
        (Err(_), _) | (_, Err(_)) => return,
        (Ok(Some(why)), _) => Some(End::Broken { client: true, why }),
        (_, Ok(Some(why))) => Some(End::Broken { client: false, why }),
        _ => None,
    };
    let end = match end {
        Some(end) => end,
        None => match relay(&g, &mut c, &mut s, &stop).await {
            Some(end) => end,
            None => return,
        },
    };
    let (to_client, to_server) = match &end {
        End::Broken { client: true, why } => {
            count_broken(&g, *why);
            (
                (why.close_code(), why.reason()),
                (GOING_AWAY, "the client broke the protocol"),
            )
        }
        End::Broken { client: false, why } => {
            count_broken(&g, *why);
            (
                (GOING_AWAY, "the server broke the protocol"),
                (why.close_code(), why.reason()),
            )
        }
        End::Idle => {
            g.0.bitten.count(Limit::WsIdle);
            ((GOING_AWAY, "idle"), (GOING_AWAY, "idle"))
        }
        End::Stopping => (
            (GOING_AWAY, "the gateway is stopping"),
            (GOING_AWAY, "the gateway is stopping"),
        ),
    };
    // Each side is sent a close frame, where the bytes it was sent end with a whole frame
    // (the other side's frames say), then is given a moment to answer and close.
    let whole = (s.frames.at_boundary(), c.frames.at_boundary());
    for (side, whole, (code, reason)) in
        [(&mut c, whole.0, to_client), (&mut s, whole.1, to_server)]
    {
        if whole && !side.eof {
            let frame = websocket::close(code, reason, side.mask());
            side.out.extend_from_slice(&frame);
        }
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        tokio::join!(closing(&mut c), closing(&mut s));
    })
    .await;
}

fn count_broken(g: &Gateway, why: Broken) {
    if let Broken::Limit(limit) = why {
        g.0.bitten.count(limit);
    }
}

/// The early bytes of one side, passed on like any others.
fn relay_early(from: &mut Side, to: &mut Side, bytes: &[u8]) -> io::Result<Option<Broken>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let (passed, broken) = match from.frames.scan(bytes) {
        Ok(k) => (k, None),
        Err((k, why)) => (k, Some(why)),
    };
    to.pass(&bytes[..passed])?;
    if broken.is_none() {
        from.held.extend_from_slice(&bytes[passed..]);
    }
    Ok(broken)
}

/// Writes what is left for `side`, closes its writing half, and reads until it closes.
async fn closing(side: &mut Side) {
    if side
        .stream
        .write_all(&std::mem::take(&mut side.out))
        .await
        .is_ok()
    {
        let _ = side.stream.shutdown().await;
    }
    let mut sink = [0u8; 1024];
    while !side.eof {
        match side.stream.read(&mut sink).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Passes bytes both ways until the session ends by itself (`None`: both sides closed, or
/// one failed) or the gateway ends it.
async fn relay(g: &Gateway, c: &mut Side, s: &mut Side, stop: &CancellationToken) -> Option<End> {
    let limits = &g.0.cfg.limits;
    let mut tick = tokio::time::interval_at(
        Instant::now() + limits.ws_ping_interval,
        limits.ws_ping_interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Once one side has closed, the other has `CLOSE_WAIT` to close too.
    let mut half_closed: Option<Instant> = None;
    loop {
        let deadline = half_closed.map_or_else(
            || Instant::now() + Duration::from_secs(86_400),
            |t| t + CLOSE_WAIT,
        );
        let step = tokio::select! {
            r = c.stream.readable(), if !c.eof && s.out.is_empty() => r.and_then(|()| pump(c, s)).map(|r| (true, r)),
            r = s.stream.readable(), if !s.eof && c.out.is_empty() => r.and_then(|()| pump(s, c)).map(|r| (false, r)),
            r = c.stream.writable(), if !c.out.is_empty() => r.and_then(|()| c.flush()).map(|()| (true, Read::Nothing)),
            r = s.stream.writable(), if !s.out.is_empty() => r.and_then(|()| s.flush()).map(|()| (false, Read::Nothing)),
            _ = tick.tick() => {
                let now = Instant::now();
                for side in [&mut *c, &mut *s] {
                    if !side.eof && now.duration_since(side.last_heard) >= limits.ws_idle_timeout {
                        return Some(End::Idle);
                    }
                }
                ping_the_silent(c, &s.frames, now, limits.ws_ping_interval);
                ping_the_silent(s, &c.frames, now, limits.ws_ping_interval);
                Ok((true, Read::Nothing))
            }
            () = stop.cancelled() => return Some(End::Stopping),
            () = tokio::time::sleep_until(deadline), if half_closed.is_some() => return None,
        };
        match step {
            Err(_) => return None,
            Ok((_, Read::Nothing | Read::Passed)) => {}
            Ok((client, Read::Broken(why))) => return Some(End::Broken { client, why }),
            Ok((client, Read::Eof)) => {
                let (from, to) = if client {
                    (&mut *c, &mut *s)
                } else {
                    (&mut *s, &mut *c)
                };
                from.eof = true;
                // What it sent is passed on, then the other side is told it will get no
                // more.
                if to
                    .stream
                    .write_all(&std::mem::take(&mut to.out))
                    .await
                    .is_err()
                {
                    return None;
                }
                let _ = to.stream.shutdown().await;
                if c.eof && s.eof {
                    return None;
                }
                half_closed.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// Pings a side that has sent nothing for a ping interval, when the bytes it was sent end
/// with a whole frame (`toward` follows them) and none are waiting.
fn ping_the_silent(side: &mut Side, toward: &Frames, now: Instant, interval: Duration) {
    if side.eof || !side.out.is_empty() || !toward.at_boundary() {
        return;
    }
    if now.duration_since(side.last_heard) + Duration::from_millis(50) >= interval {
        let frame = websocket::ping(side.mask());
        let _ = side.pass(&frame);
    }
}
