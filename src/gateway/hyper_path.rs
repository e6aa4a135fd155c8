//! The hyper path: every client connection the fast path hands over (upgrades, chunked or
//! large bodies, cached paths, shared accounting, …), served by hyper, with keep-alive
//! server connections driven on the client connection's own task.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::counter;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry::GW_CACHE as CACHE;

use super::access;
use super::attempt::{Ask, AttemptError, Failed, Tries};
use super::balancer::Target;
use super::cache;
use super::http1::idempotent_name;
use super::hyper_headers::{end_to_end, forwarding_for, response_headers};
use super::limits::Limit;
use super::route::Kind;
use super::{is_upgrade, unavailable, Gateway};

/// A server connection's future, to be polled by the task of the client connection it serves.
pub(super) type Drive = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A kept HTTP/1 connection to one server.
pub(super) type Kept = (Arc<str>, SendRequest<Full<Bytes>>);

/// Idle server connections kept in the shared pool, per server, and for how long.
pub(super) const POOL_MAX_IDLE_PER_SERVER: usize = 256;
pub(super) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The plain path puts every connection back after each response, so its pool holds as many
/// as were in use at the busiest moment: more room before connections churn.
pub(super) const RAW_POOL_MAX_IDLE_PER_SERVER: usize = 1024;

/// The servers' side of one client connection: a keep-alive connection to each server its
/// requests went to. Their connection futures are polled by the client connection's own task
/// (handed over on `drive`), so a request and its answer never cross to another task: with
/// every connection in a pool task of its own, those wake-ups cost more than the proxying
/// itself (BENCHMARKS.md). Only connections left by ended client connections are shared.
pub(super) struct Upstreams {
    peer: SocketAddr,
    stop: CancellationToken,
    kept: Mutex<Vec<Kept>>,
    drive: mpsc::UnboundedSender<Drive>,
}

impl Upstreams {
    /// Sends `req` to `target` on a kept connection, or a new one when there is none or the
    /// server closed it meanwhile; returns the response head, its body streaming behind.
    pub(super) async fn send(
        &self,
        g: &Gateway,
        target: &Target,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
        let kept = {
            let mut kept = self.kept.lock().expect("not poisoned");
            kept.iter()
                .position(|(id, _)| *id == target.id)
                .map(|i| kept.swap_remove(i).1)
        };
        // None of its own: one another client connection left idle, before a new one.
        let kept = kept.or_else(|| {
            let s =
                g.0.pool
                    .take(&target.id, Instant::now(), |s| !s.is_closed());
            if s.is_some() {
                g.0.pooled.increment(1);
            }
            s
        });
        if let Some(mut sender) = kept {
            if sender.ready().await.is_ok() {
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.keep(target, sender);
                        return Ok(resp);
                    }
                    Err(mut e) => match e.take_message() {
                        // The connection closed before the request went out: open a new one.
                        Some(r) => req = r,
                        None => return Err(sent_failed(g, &e.into_error())),
                    },
                }
            }
        }
        let tcp = connect(g, target).await.map_err(AttemptError::NotSent)?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_header_size(g.0.cfg.limits.max_response_header_bytes)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| AttemptError::NotSent(format!("handshake: {e}")))?;
        let id = target.id.clone();
        let driven: Drive = Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %id, error = %e, "server connection ended");
            }
        });
        if self.drive.send(driven).is_err() {
            return Err(AttemptError::NotSent(
                "the client connection is closing".into(),
            ));
        }
        match sender.send_request(req).await {
            Ok(resp) => {
                self.keep(target, sender);
                Ok(resp)
            }
            Err(e) => Err(sent_failed(g, &e)),
        }
    }

    pub(super) fn keep(&self, target: &Target, sender: SendRequest<Full<Bytes>>) {
        self.kept
            .lock()
            .expect("not poisoned")
            .push((target.id.clone(), sender));
    }
}

/// A request that failed after it was sent; a response head over its limit is counted.
fn sent_failed(g: &Gateway, e: &hyper::Error) -> AttemptError {
    if e.is_parse_too_large() {
        g.0.bitten.count(Limit::ResponseHeaderBytes);
        return AttemptError::Sent("a response head over max_response_header_bytes".to_string());
    }
    AttemptError::Sent(e.to_string())
}

/// A new connection to `target`, within the connect timeout; counted as opened.
pub(super) async fn connect(g: &Gateway, target: &Target) -> Result<TcpStream, String> {
    match tokio::time::timeout(g.0.cfg.connect_timeout, connect_unbounded(g, target)).await {
        Ok(connected) => connected,
        Err(_) => Err(format!(
            "connect: no answer within {:?}",
            g.0.cfg.connect_timeout
        )),
    }
}

/// A new connection to `target`, for a caller whose own deadline covers the connect (one
/// timer per attempt, not two); counted as opened.
pub(super) async fn connect_unbounded(g: &Gateway, target: &Target) -> Result<TcpStream, String> {
    let connect = async {
        let tcp = TcpStream::connect(&*target.host).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(tcp)
    };
    match connect.await {
        Ok(tcp) => {
            g.0.opened.increment(1);
            Ok(tcp)
        }
        Err(e) => Err(format!("connect: {e}")),
    }
}

/// Serves one client connection until it closes, or until `stop` (then after the request in
/// progress). Keep-alive connections that send nothing for `idle_timeout` are closed.
pub(super) async fn serve_connection(
    g: Gateway,
    stream: super::rewind::Rewind<super::conn::Conn>,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let (drive, mut driven) = mpsc::unbounded_channel::<Drive>();
    let up = Arc::new(Upstreams {
        peer,
        stop: stop.clone(),
        kept: Mutex::new(Vec::new()),
        drive,
    });
    let idle = g.0.cfg.idle_timeout;
    let (gw, ups) = (g.clone(), up.clone());
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let g = gw.clone();
        let up = ups.clone();
        async move { Ok::<_, Infallible>(handle(g, up, req.map(Body::new)).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper answers 431 past these itself. Its head timer runs from when it starts waiting
    // for a head, idle keep-alive included, so it is the idle timeout here.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_headers(g.0.cfg.limits.max_headers)
        .max_header_size(g.0.cfg.limits.max_header_bytes);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut upstream = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended");
                }
                break;
            }
            Some(f) = driven.recv() => upstream.push(f),
            Some(()) = upstream.next(), if !upstream.is_empty() => {}
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    // The idle server connections outlive this client: into the shared pool, driven from
    // now on by a task of their own, which ends when the last of them closes.
    let kept = std::mem::take(&mut *up.kept.lock().expect("not poisoned"));
    let now = Instant::now();
    for (id, sender) in kept {
        if sender.is_ready() && !stopping {
            let _ = g.0.pool.put(id, sender, now); // when full, dropping it closes it
        }
    }
    while let Ok(f) = driven.try_recv() {
        upstream.push(f);
    }
    if !upstream.is_empty() {
        tokio::spawn(async move { while upstream.next().await.is_some() {} });
    }
}

/// Every request: a WebSocket upgrade is relayed to a chosen server, anything else forwarded.
pub(super) async fn handle(g: Gateway, up: Arc<Upstreams>, req: Request) -> Response {
    g.0.requests.fetch_add(1, Ordering::Relaxed);
    if is_upgrade(req.headers()) {
        // A session logs itself when it ends.
        return super::ws_upgrade::from_hyper(g, up.peer, req, up.stop.clone()).await;
    }
    let asked = g.0.cfg.access_log.then(|| {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        (req.method().clone(), path.to_string(), Instant::now())
    });
    let resp = http(g, &up, req).await;
    if let Some((method, path, started)) = asked {
        let backend = resp.extensions().get::<AnsweredBy>().map(|a| a.0.clone());
        let bytes = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        access::request(&access::Request {
            client: up.peer.ip(),
            method: method.as_str(),
            path: &path,
            status: resp.status().as_u16(),
            backend: backend.as_deref(),
            bytes,
            started,
        });
    }
    resp
}

/// Who answered a response, for the access log: a server's id, or `cache`.
#[derive(Clone)]
struct AnsweredBy(Arc<str>);

/// A limit's answer to a request, counted; the connection closes after it.
pub(super) fn refused(g: &Gateway, limit: Limit) -> Response {
    g.0.bitten.count(limit);
    let (status, _, text) = limit.answer();
    let mut resp = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        text,
    )
        .into_response();
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Whether reading a body failed on its length limit (`http_body_util::LengthLimitError`).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

pub(super) fn idempotent(m: &axum::http::Method) -> bool {
    idempotent_name(m.as_str())
}

pub(super) async fn http(g: Gateway, up: &Upstreams, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let cacheable = method == axum::http::Method::GET && g.0.cache.covers(parts.uri.path());
    if cacheable {
        if let Some(hit) = g.0.cache.get(path.as_str(), &parts.headers) {
            counter!(CACHE, "result" => "hit").increment(1);
            let mut resp = Response::new(Body::from(hit.body.clone()));
            *resp.status_mut() = StatusCode::from_u16(hit.status).unwrap_or(StatusCode::OK);
            for (k, v) in &hit.headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::try_from(k.as_str()),
                    HeaderValue::try_from(v.as_str()),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            resp.headers_mut()
                .insert("x-cache", HeaderValue::from_static("hit"));
            resp.extensions_mut().insert(AnsweredBy("cache".into()));
            return resp;
        }
        counter!(CACHE, "result" => "miss").increment(1);
    }
    // The request body is kept so that a retry can send it again (most requests have none):
    // read whole, within `max_body_bytes` and `body_timeout`.
    let limits = &g.0.cfg.limits;
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return refused(&g, Limit::BodyBytes);
    }
    let body = match tokio::time::timeout(
        limits.body_timeout,
        axum::body::to_bytes(body, limits.max_body_bytes),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if is_length_limit(&e) => return refused(&g, Limit::BodyBytes),
        Ok(Err(e)) => {
            return (
                StatusCode::BAD_REQUEST,
                [(http::header::CONNECTION, "close")],
                format!("the request body could not be read: {e}\n"),
            )
                .into_response()
        }
        Err(_) => return refused(&g, Limit::BodyTimeout),
    };
    let inflight = match &g.0.accounting {
        Some(acc) => acc.inflight().await,
        None => None,
    };
    let ask = Ask {
        kind: Kind::Request,
        inflight: inflight.as_ref(),
        // Sent again after it may have reached a server only when idempotent.
        idempotent: idempotent(&method),
    };
    let forwarding = forwarding_for(&g.0.forwarding, &parts.headers, up.peer);
    let mut tries = Tries::new(&g, ask);
    let (target, r, _slot) = loop {
        let target = match tries.next() {
            Ok(t) => t,
            Err(why) => return unavailable(why),
        };
        // Held until this attempt fails, or the response is made (or the client went away).
        let slot = match &g.0.accounting {
            Some(acc) => acc.acquire(&target.id).await,
            None => None,
        };
        let mut upstream = http::Request::new(Full::new(body.clone()));
        *upstream.method_mut() = method.clone();
        *upstream.uri_mut() = http::Uri::from(path.clone());
        let headers = upstream.headers_mut();
        for (k, v) in end_to_end(&parts.headers) {
            headers.append(k, v.clone());
        }
        if let Ok(host) = HeaderValue::from_str(&target.host) {
            headers.insert(http::header::HOST, host);
        }
        for (k, v) in &forwarding {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_bytes(v)) {
                headers.append(k, v);
            }
        }
        let sent = tokio::time::timeout(g.0.cfg.request_timeout, up.send(&g, &target, upstream))
            .await
            .unwrap_or_else(|_| {
                Err(AttemptError::Sent(format!(
                    "no answer within {:?}",
                    g.0.cfg.request_timeout
                )))
            });
        match sent {
            Ok(r) => break (target, r, slot),
            Err(e) => {
                drop(slot);
                if let Err(Failed { server, error }) = tries.after_failure(target, e).await {
                    return (
                        StatusCode::BAD_GATEWAY,
                        format!("{server} failed: {}\n", error.message()),
                    )
                        .into_response();
                }
            }
        }
    };
    let status = r.status();
    g.outcome(
        &target,
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
    );
    let (mut rparts, incoming) = r.into_parts();
    response_headers(&mut rparts.headers);
    g.0.http_duration.record(started.elapsed().as_secs_f64());
    target.backend.counts.ok.fetch_add(1, Ordering::Relaxed);
    let cache = &g.0.cache;
    let ttl = cacheable
        .then(|| {
            cache::storable(
                &parts.headers,
                status.as_u16(),
                &rparts.headers,
                cache.ttl(),
                cache.max_entry(),
            )
            .ok()
        })
        .flatten();
    if let Some(ttl) = ttl {
        // Streamed to the client as it comes, and kept (up to the per-entry limit) to be
        // stored once it has all passed.
        let entry = cache::Cached {
            status: status.as_u16(),
            headers: rparts
                .headers
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.to_string(), v.to_string())))
                .collect(),
            body: bytes::Bytes::new(),
            expires: Instant::now() + ttl,
            vary: cache::vary_of(&parts.headers, &rparts.headers),
        };
        let (cache, key) = (cache.clone(), path.as_str().to_string());
        let teed = Teed {
            inner: incoming,
            kept: Some(Vec::new()),
            limit: cache.max_entry(),
            store: Some(Box::new(move |body| {
                if cache.put(&key, cache::Cached { body, ..entry }) {
                    counter!(CACHE, "result" => "store").increment(1);
                }
            })),
        };
        rparts.extensions.insert(AnsweredBy(target.id.clone()));
        return Response::from_parts(rparts, Body::new(teed));
    }
    rparts.extensions.insert(AnsweredBy(target.id.clone()));
    Response::from_parts(rparts, Body::new(incoming))
}

/// A response body streamed to the client and kept, up to the cache's per-entry limit, to
/// be stored once all of it has passed (a body that fails or grows past it is not).
struct Teed {
    inner: hyper::body::Incoming,
    kept: Option<Vec<u8>>,
    limit: usize,
    store: Option<Box<dyn FnOnce(Bytes) + Send>>,
}

impl Teed {
    fn finish(&mut self) {
        if let (Some(kept), Some(store)) = (self.kept.take(), self.store.take()) {
            store(kept.into());
        }
    }
}

impl hyper::body::Body for Teed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(kept)) = (frame.data_ref(), this.kept.as_mut()) {
                    if kept.len() + data.len() > this.limit {
                        this.kept = None;
                    } else {
                        kept.extend_from_slice(data);
                    }
                }
                // hyper may not ask again once a sized body is whole.
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.kept = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
