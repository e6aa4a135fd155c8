//! WebSocket sessions, once upgraded (`ws_upgrade`): the session's bytes passed both ways as
//! they come, as
//! `HAProxy` and nginx tunnel them, but followed frame by frame (`websocket::Frames`): frames
//! and messages over their limits end the session with close 1009, a side silent for
//! `ws_idle_timeout` (pinged every `ws_ping_interval`) ends it with 1001, and closes pass
//! through end to end. An idle session holds no buffer: bytes are read into the loop's
//! scratch buffer and written at once; only what a slow reader has not taken yet is kept.

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::access;
use super::conn::Conn;
use super::limits::Limit;
use super::series::WsOpen;
use super::websocket::{self, Broken, Frames, GOING_AWAY, MAX_HEADER};
use super::ws_upgrade::Accepted;
use super::Gateway;

/// How long a closing session may take to finish its close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One side of a session.
struct Side {
    stream: Conn,
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
    /// Bytes passed to it from the other side.
    passed: u64,
}

impl Side {
    fn mask(&self) -> Option<[u8; 4]> {
        self.server.then(rand::random)
    }

    /// Writes `bytes` now, keeping what the socket does not take.
    fn pass(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.passed += bytes.len() as u64;
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

    /// Bytes for this side wait: the relay reads nothing more for it until they are sent.
    fn backlogged(&self) -> bool {
        !self.out.is_empty() || self.stream.wants_flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.try_flush()?;
        if self.out.is_empty() {
            return Ok(());
        }
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

/// Reads what `from` has sent into the loop's scratch buffer (`conn::with_scratch`) and
/// passes its whole frames on to `to`.
fn pump(from: &mut Side, to: &mut Side) -> io::Result<Read> {
    super::conn::with_scratch(|buf| {
        buf.extend_from_slice(&from.held);
        // Into the spare capacity (the scratch's, less the held bytes): nothing to zero.
        let read = from.stream.try_read_buf(buf);
        pass_read(from, to, read, buf)
    })
}

fn pass_read(
    from: &mut Side,
    to: &mut Side,
    read: io::Result<usize>,
    buf: &[u8],
) -> io::Result<Read> {
    match read {
        Ok(0) => return Ok(Read::Eof),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Read::Nothing),
        Err(e) => return Err(e),
    }
    from.last_heard = Instant::now();
    let data = buf;
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

/// Relays a session until it ends. `answer` is what the gateway still has to send the
/// client first (the 101, unless hyper sent it): it goes out with the server's first bytes,
/// in one write. `client_early` and the server's early bytes are what each side sent before
/// the relay began; `opened` is for the access log.
pub(super) async fn session(
    g: Gateway,
    client: Conn,
    answer: Vec<u8>,
    client_early: Vec<u8>,
    accepted: Accepted,
    stop: CancellationToken,
    opened: Option<access::Opened>,
) {
    let Accepted {
        stream,
        head,
        early,
        backend,
    } = accepted;
    drop(head);
    let _open = WsOpen::new(&backend.counts.ws_open);
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
        passed: 0,
    };
    let (mut c, mut s) = (side(client, false), side(Conn::Tcp(stream), true));
    c.out = answer;
    let ended_by = run(&g, &mut c, &mut s, client_early, early, &stop).await;
    if let Some(opened) = opened {
        access::session(
            &opened,
            &access::Outcome {
                backend: &backend.id,
                up: s.passed,
                down: c.passed,
                client_close: c.frames.close_code,
                server_close: s.frames.close_code,
                ended_by,
            },
        );
    }
}

/// The session between `c` and `s` from its first bytes to its end; what ended it.
async fn run(
    g: &Gateway,
    c: &mut Side,
    s: &mut Side,
    client_early: Vec<u8>,
    server_early: bytes::BytesMut,
    stop: &CancellationToken,
) -> &'static str {
    let early = (
        relay_early(c, s, &client_early),
        relay_early(s, c, &server_early),
    );
    // Not held through the session.
    drop((client_early, server_early));
    // The 101 and the server's first message, written together.
    if c.backlogged() && c.flush().is_err() {
        return "error";
    }
    let end = match early {
        (Err(_), _) | (_, Err(_)) => return "error",
        (Ok(Some(why)), _) => Some(End::Broken { client: true, why }),
        (_, Ok(Some(why))) => Some(End::Broken { client: false, why }),
        _ => None,
    };
    let end = match end {
        Some(end) => end,
        None => match relay(g, c, s, stop).await {
            Some(end) => end,
            None => return "peers",
        },
    };
    let (to_client, to_server, ended_by) = match &end {
        End::Broken { client: true, why } => {
            count_broken(g, *why);
            (
                (why.close_code(), why.reason()),
                (GOING_AWAY, "the client broke the protocol"),
                why.label(),
            )
        }
        End::Broken { client: false, why } => {
            count_broken(g, *why);
            (
                (GOING_AWAY, "the server broke the protocol"),
                (why.close_code(), why.reason()),
                why.label(),
            )
        }
        End::Idle => {
            g.0.bitten.count(Limit::WsIdle);
            (
                (GOING_AWAY, "idle"),
                (GOING_AWAY, "idle"),
                Limit::WsIdle.label(),
            )
        }
        End::Stopping => (
            (GOING_AWAY, "the gateway is stopping"),
            (GOING_AWAY, "the gateway is stopping"),
            "stopping",
        ),
    };
    // Each side is sent a close frame, where the bytes it was sent end with a whole frame
    // (the other side's frames say), then is given a moment to answer and close.
    let whole = (s.frames.at_boundary(), c.frames.at_boundary());
    for (side, whole, (code, reason)) in
        [(&mut *c, whole.0, to_client), (&mut *s, whole.1, to_server)]
    {
        if whole && !side.eof {
            let frame = websocket::close(code, reason, side.mask());
            side.out.extend_from_slice(&frame);
        }
    }
    let _ = Box::pin(tokio::time::timeout(CLOSE_WAIT, async {
        tokio::join!(closing(c), closing(s));
    }))
    .await;
    ended_by
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

/// Writes what is left for `side` (its close frame), and reads until it closes. To the
/// client the gateway is the server, which closes the TCP connection first (RFC 6455
/// §7.1.1): its writing half at once. A server is left to close first.
async fn closing(side: &mut Side) {
    let out = std::mem::take(&mut side.out);
    if side.stream.write_all(&out).await.is_err() {
        return;
    }
    if !side.server {
        let _ = side.stream.shutdown().await;
    }
    let mut sink = [0u8; 1024];
    while !side.eof {
        match side.stream.read(&mut sink).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = side.stream.shutdown().await;
}

/// What a relay's wait came to.
enum Woke {
    Readable { client: bool },
    Writable { client: bool },
    Tick,
    Stopping,
    CloseWaitOver,
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
    // Once one side has closed, the other has `CLOSE_WAIT` to close too. Both futures are
    // made once: polling a new one on every wake-up would take the stop token's lock each
    // time, shared by every connection.
    let mut half_closed = false;
    let close_wait = tokio::time::sleep(Duration::from_secs(86_400));
    let stopped = stop.cancelled();
    tokio::pin!(close_wait, stopped);
    // Which side is looked at first, turn about, so that neither starves the other.
    let mut client_first = true;
    loop {
        client_first = !client_first;
        // Everything the session waits on, polled in place: no future kept per source (a
        // session's memory), none made per wake-up.
        let woke = std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Woke::Stopping));
            }
            if half_closed && close_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Woke::CloseWaitOver));
            }
            if tick.poll_tick(cx).is_ready() {
                return Poll::Ready(Ok(Woke::Tick));
            }
            for client in [client_first, !client_first] {
                let (this, other) = if client { (&*c, &*s) } else { (&*s, &*c) };
                if this.backlogged() {
                    if let Poll::Ready(r) = this.stream.poll_writable(cx) {
                        return Poll::Ready(r.map(|()| Woke::Writable { client }));
                    }
                }
                if !this.eof && !other.backlogged() {
                    if let Poll::Ready(r) = this.stream.poll_readable(cx) {
                        return Poll::Ready(r.map(|()| Woke::Readable { client }));
                    }
                }
            }
            Poll::Pending
        })
        .await;
        let step = match woke {
            Err(e) => Err(e),
            Ok(Woke::Readable { client: true }) => pump(c, s).map(|r| (true, r)),
            Ok(Woke::Readable { client: false }) => pump(s, c).map(|r| (false, r)),
            Ok(Woke::Writable { client: true }) => c.flush().map(|()| (true, Read::Nothing)),
            Ok(Woke::Writable { client: false }) => s.flush().map(|()| (false, Read::Nothing)),
            Ok(Woke::Tick) => {
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
            Ok(Woke::Stopping) => return Some(End::Stopping),
            Ok(Woke::CloseWaitOver) => return None,
        };
        match step {
            Err(_) => return None,
            Ok((_, Read::Nothing | Read::Passed)) => {}
            Ok((client, Read::Broken(why))) => return Some(End::Broken { client, why }),
            Ok((client, Read::Eof)) => {
                let handshake_done = c.frames.closed && s.frames.closed;
                let (from, to) = if client {
                    (&mut *c, &mut *s)
                } else {
                    (&mut *s, &mut *c)
                };
                from.eof = true;
                if to.eof {
                    return None; // both closed: dropping the sockets is all that is left
                }
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
                if handshake_done && !client {
                    // The server closed after the closing handshake (each side's close
                    // frame passed on): nothing more may come from the client, so its
                    // connection is closed now, as a WebSocket server's is (RFC 6455
                    // §7.1.1), not half-closed while its FIN is awaited. Over TLS, its
                    // close_notify first; plain, dropping the socket sends the FIN.
                    if matches!(to.stream, Conn::Tls(_)) {
                        let _ = to.stream.shutdown().await;
                    }
                    return None;
                }
                let _ = to.stream.shutdown().await;
                if !half_closed {
                    half_closed = true;
                    close_wait.as_mut().reset(Instant::now() + CLOSE_WAIT);
                }
            }
        }
    }
}

/// Pings a side that has sent nothing for a ping interval, when the bytes it was sent end
/// with a whole frame (`toward` follows them) and none are waiting.
fn ping_the_silent(side: &mut Side, toward: &Frames, now: Instant, interval: Duration) {
    if side.eof || side.backlogged() || !toward.at_boundary() {
        return;
    }
    if now.duration_since(side.last_heard) + Duration::from_millis(50) >= interval {
        let frame = websocket::ping(side.mask());
        let _ = side.pass(&frame);
    }
}
