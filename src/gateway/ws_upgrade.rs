//! WebSocket upgrades: the client's upgrade checked (400 when RFC 6455 refuses it), sent on
//! to a server picked for a new session (another tried when one refuses), and its 101
//! relayed; then the session is `ws_relay`'s. From the fast path, which read the upgrade
//! itself, or from hyper, on a connection handed over before.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::access;
use super::attempt::{Ask, AttemptError, Tries};
use super::conn::Conn;
use super::route::Kind;
use super::table::Backend;
use super::websocket;
use super::ws_relay::session;
use super::Gateway;

/// The connection hyper gives back after an upgrade.
type HyperIo = hyper_util::rt::TokioIo<super::rewind::Rewind<Conn>>;

/// A server that took the upgrade: its connection, its 101's head as it sent it (checked
/// whole: `relayed` gives the headers for the client), and any bytes it sent after it.
pub(super) struct Accepted {
    pub(super) stream: TcpStream,
    pub(super) head: BytesMut,
    pub(super) early: BytesMut,
    pub(super) backend: std::sync::Arc<Backend>,
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
/// why none did. `head` is given back as it came.
pub(super) async fn upgrade_upstream(g: &Gateway, head: &mut Vec<u8>) -> Result<Accepted, String> {
    let base = head.len();
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
        // This server's `Host` and the blank line, on the head itself (cut off again below).
        head.truncate(base);
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(target.host.as_bytes());
        head.extend_from_slice(b"\r\n\r\n");
        let wire = &*head;
        // Within one deadline, connect included.
        let attempt = async {
            let mut stream = super::hyper_path::connect_unbounded(g, &target)
                .await
                .map_err(AttemptError::NotSent)?;
            stream
                .write_all(wire)
                .await
                .map_err(|e| AttemptError::NotSent(format!("write: {e}")))?;
            let mut buf = BytesMut::new();
            loop {
                match switched(&buf, g.0.cfg.limits.max_response_header_bytes) {
                    Ok(Some(n)) => {
                        let head = buf.split_to(n);
                        return Ok((stream, head, buf));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e),
                }
                match super::conn::read_drain_appending(&stream, &mut buf).await {
                    Ok(n) if n > 0 => {}
                    Ok(_) => return Err(AttemptError::Sent("the server closed".into())),
                    Err(e) => return Err(AttemptError::Sent(format!("read: {e}"))),
                }
            }
        };
        let attempted = tokio::time::timeout(g.0.cfg.connect_timeout, attempt).await;
        head.truncate(base);
        let error = match attempted {
            Ok(Ok((stream, answer, early))) => {
                g.outcome(&target, true);
                g.0.ws_connect.record(started.elapsed().as_secs_f64());
                target
                    .backend
                    .counts
                    .ws
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Accepted {
                    stream,
                    head: answer,
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

/// A server's answer to an upgrade: `Some` with the head's length once it is whole and a
/// 101; a refusal otherwise.
fn switched(buf: &[u8], max_head: usize) -> Result<Option<usize>, AttemptError> {
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
            Ok(Some(n))
        }
        Ok(httparse::Status::Partial) if buf.len() <= max_head => Ok(None),
        Ok(_) => Err(AttemptError::Unrelayable(
            "a response head over max_response_header_bytes".into(),
        )),
        Err(e) => Err(AttemptError::Sent(format!(
            "an invalid response head ({e})"
        ))),
    }
}

/// The headers of a server's 101 (`head`, parsed whole by `switched`) that go on to the
/// client, each passed to `each`.
fn relayed(head: &[u8], mut each: impl FnMut(&str, &[u8])) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    if resp.parse(head).is_err() {
        return; // not after `switched`
    }
    for h in resp.headers.iter() {
        if !NOT_RELAYED.iter().any(|x| x.eq_ignore_ascii_case(h.name)) {
            each(h.name, h.value);
        }
    }
}

/// The 101 for the client, with the server's headers: one buffer, sized once.
pub(super) fn switching_head(server_head: &[u8]) -> Vec<u8> {
    const START: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n";
    let mut out = Vec::with_capacity(START.len() + server_head.len());
    out.extend_from_slice(START);
    relayed(server_head, |name, value| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    });
    out.extend_from_slice(b"\r\n");
    out
}

/// Opens a session for an upgrade the fast path read: the server's 101 relayed, then the
/// session; or 503 when no server takes it.
pub(super) async fn open(
    g: Gateway,
    mut client: Conn,
    early: Vec<u8>,
    head: Vec<u8>,
    stop: CancellationToken,
) {
    let opened = g.0.cfg.access_log.then(|| access::Opened {
        client: client
            .peer_addr()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip()),
        path: access::request_line(&head).1.to_string(),
        started: Instant::now(),
    });
    // Boxed: the upgrade's buffers and the closing's are not held through the session.
    let mut head = head;
    let accepted = Box::pin(upgrade_upstream(&g, &mut head)).await;
    drop(head);
    match accepted {
        Ok(accepted) => {
            let answer = switching_head(&accepted.head);
            session(g, client, answer, early, accepted, stop, opened).await;
        }
        Err(why) => {
            if let Some(o) = &opened {
                access::request(&access::Request {
                    client: o.client,
                    method: "GET",
                    path: &o.path,
                    status: 503,
                    backend: None,
                    bytes: None,
                    started: o.started,
                });
            }
            let text = format!("no server can take this request: {why}\n");
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            Box::pin(async {
                let _ = client.write_all(answer.as_bytes()).await;
                let _ = client.shutdown().await;
            })
            .await;
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
    let mut head = upgrade_head(&g, &req, peer);
    let accepted = match upgrade_upstream(&g, &mut head).await {
        Ok(a) => a,
        Err(why) => return super::unavailable(&why),
    };
    let mut resp = http::Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade");
    relayed(&accepted.head, |name, value| {
        resp = std::mem::take(&mut resp).header(name, value);
    });
    let Ok(resp) = resp.body(axum::body::Body::empty()) else {
        return (
            http::StatusCode::BAD_GATEWAY,
            "the server's 101 has an invalid header\n",
        )
            .into_response();
    };
    let opened = g.0.cfg.access_log.then(|| access::Opened {
        client: peer.ip(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        started: Instant::now(),
    });
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let Ok(parts) = upgraded.downcast::<HyperIo>() else {
            tracing::error!("an upgraded connection of an unexpected type");
            return;
        };
        let (client, prefix) = parts.io.into_inner().into_parts();
        let mut early = prefix.to_vec();
        early.extend_from_slice(&parts.read_buf);
        session(g, client, Vec::new(), early, accepted, stop, opened).await;
    });
    resp
}

/// The upgrade request for a server, from the one hyper read: end-to-end headers kept, the
/// hop-by-hop ones (and those `Connection` names) dropped, the forwarding ones set; less
/// `Host` and the blank line.
fn upgrade_head(g: &Gateway, req: &axum::extract::Request, peer: std::net::SocketAddr) -> Vec<u8> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    let fields = super::hyper_headers::end_to_end(req.headers())
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .chain(super::hyper_headers::forwarding_for(
            &g.0.forwarding,
            req.headers(),
            peer,
        ));
    for (name, value) in fields {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(&value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
    head
}
