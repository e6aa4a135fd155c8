//! `rebalancer gateway`: an HTTP and WebSocket reverse proxy that routes new connections by
//! weighted least-connections (power of two choices) over the live fleet. The fleet comes
//! from the same sources and snapshot as the controller (Consul health and KV, Redis
//! counts); active health checks and a per-server circuit breaker take failing servers out;
//! connect failures are retried on another server; static GETs are cached.

pub mod accounting;
pub mod cache;
mod forward;
pub mod health;
pub mod pool;
pub mod route;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::{counter, gauge, histogram};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TgCloseFrame;
use tokio_tungstenite::tungstenite::Message as TgMessage;
use tokio_util::sync::CancellationToken;

use crate::config::{GatewayConfig, PipelineConfig};
use crate::fleet::events::Events;
use crate::fleet::topology::{Admin, Topology};
use cache::StaticCache;
use health::{Active, Breaker};
use route::{choose, ramp, Candidate, Kind};

use crate::telemetry::GW_SERVER_CONNECTIONS as SERVER_CONNECTIONS;
use crate::telemetry::{GW_BACKEND_UP as BACKEND_UP, GW_CACHE as CACHE, GW_CIRCUIT as CIRCUIT};
use crate::telemetry::{GW_REQUESTS as REQUESTS, GW_REQUEST_DURATION as REQUEST_DURATION};
use crate::telemetry::{GW_RETRIES as RETRIES, GW_WS_OPEN as WS_OPEN};

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// The pipeline file: service, Consul and Redis, and the optional [gateway] section.
    #[arg(long)]
    pub pipeline: std::path::PathBuf,
    /// Listen address (overrides gateway.listen).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Runtime worker threads: 0 for one per core, 1 for a single-threaded event loop.
    #[arg(long, env = "REBALANCER_GATEWAY_THREADS", default_value_t = 0)]
    pub threads: usize,
}

#[derive(Default)]
struct Backend {
    first_seen: Option<Instant>,
    active: Active,
    breaker: Breaker,
    reservations: VecDeque<Instant>,
    /// `requests_total{backend, outcome="ok"}`, looked up once instead of per request.
    ok: Option<metrics::Counter>,
    /// `address:port` as last formatted, with the address and port it came from.
    host: Option<(Arc<str>, u16, Arc<str>)>,
    /// Plain requests this gateway has in flight there.
    inflight: Arc<AtomicU64>,
}

/// One plain request in flight at a server, counted until dropped (whatever way the request
/// ends: answered, failed, or its client gone).
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A routable server as of one request.
struct Target {
    id: Arc<str>,
    host: Arc<str>,
    ok: metrics::Counter,
    _inflight: Option<InFlight>,
}

struct Shared {
    cfg: GatewayConfig,
    topology: watch::Receiver<Arc<Topology>>,
    backends: Mutex<HashMap<Arc<str>, Backend>>,
    cache: StaticCache,
    http_duration: metrics::Histogram,
    /// Idle server connections left by client connections that ended.
    pool: pool::IdlePool<SendRequest<Full<Bytes>>>,
    /// Idle server connections of the plain forwarding path (`forward`), taken by a
    /// request and put back after its response, whichever client connection it came on.
    raw_pool: pool::IdlePool<forward::Idle>,
    /// `server_connections_total{source="opened"}` and `{source="pool"}`.
    opened: metrics::Counter,
    pooled: metrics::Counter,
    requests: AtomicU64,
    retries: AtomicU64,
    accounting: Option<accounting::Accounting>,
}

#[derive(Clone)]
pub struct Gateway(Arc<Shared>);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    View(#[from] crate::fleet::view::ViewError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

const HOP_BY_HOP: &[&str] = &[
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

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
        topology: watch::Receiver<Arc<Topology>>,
        accounting: Option<accounting::Accounting>,
    ) -> Gateway {
        let cache = StaticCache::new(cfg.cache_capacity, cfg.cache_ttl, cfg.cache_paths.clone());
        Gateway(Arc::new(Shared {
            cfg,
            topology,
            backends: Mutex::new(HashMap::new()),
            cache,
            http_duration: histogram!(REQUEST_DURATION, "kind" => "http"),
            pool: pool::IdlePool::new(POOL_MAX_IDLE_PER_SERVER, POOL_IDLE_TIMEOUT),
            raw_pool: pool::IdlePool::new(RAW_POOL_MAX_IDLE_PER_SERVER, POOL_IDLE_TIMEOUT),
            opened: counter!(SERVER_CONNECTIONS, "source" => "opened"),
            pooled: counter!(SERVER_CONNECTIONS, "source" => "pool"),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            accounting,
        }))
    }

    fn host_of(&self, s: &crate::fleet::topology::Server) -> String {
        format!("{}:{}", s.address, self.0.cfg.target_port.unwrap_or(s.port))
    }

    /// Picks a server for a new connection, other than those in `tried`; reserves a slot on it.
    fn pick(&self, tried: &[Arc<str>]) -> Option<Target> {
        self.pick_with(tried, Kind::Session, None)
    }

    /// As `pick`; with shared accounting, `inflight` requests stand for session counts.
    fn pick_with(
        &self,
        tried: &[Arc<str>],
        kind: Kind,
        inflight: Option<&HashMap<String, f64>>,
    ) -> Option<Target> {
        let t = self.0.topology.borrow().clone();
        let now = Instant::now();
        let cfg = &self.0.cfg;
        let mut backends = self.0.backends.lock().expect("not poisoned");
        let mut ids = Vec::new();
        let mut cands = Vec::new();
        let mut exclude = Vec::new();
        for s in &t.servers {
            if !s.passing || s.admin != Admin::Active {
                continue;
            }
            let b = backends.entry(s.id.clone()).or_default();
            let first = *b.first_seen.get_or_insert(now);
            if !b.active.up()
                || b.breaker.state(now, cfg.breaker_open) == health::BreakerState::Open
            {
                continue;
            }
            while b
                .reservations
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) > cfg.reservation_ttl)
            {
                b.reservations.pop_front();
            }
            if tried.iter().any(|x| **x == *s.id) {
                exclude.push(cands.len());
            }
            ids.push(s);
            let sessions = match inflight {
                Some(m) => m.get(&*s.id).copied().unwrap_or(0.0).max(0.0) as u64,
                None => s.sessions.known().unwrap_or(0),
            };
            cands.push(Candidate {
                sessions,
                reserved: b.reservations.len() as u64,
                // With shared accounting, `sessions` are every gateway's requests already.
                inflight: match inflight {
                    Some(_) => 0,
                    None => b.inflight.load(Ordering::Relaxed),
                },
                capacity: s.capacity,
                weight: s.weight,
                ramp: ramp(
                    now.saturating_duration_since(first).as_secs_f64(),
                    cfg.slow_start.as_secs_f64(),
                ),
            });
        }
        let i = choose(&cands, &exclude, kind, &mut rand::rng())?;
        let s = ids[i];
        let b = backends.get_mut(&s.id).expect("present");
        if !b.breaker.allow(now, cfg.breaker_open) {
            return None;
        }
        if kind == Kind::Session {
            b.reservations.push_back(now);
        }
        let ok =
            b.ok.get_or_insert_with(|| {
                let id = metrics::SharedString::from_shared(s.id.clone());
                counter!(REQUESTS, "backend" => id, "outcome" => "ok")
            })
            .clone();
        let port = self.0.cfg.target_port.unwrap_or(s.port);
        let host = match &b.host {
            Some((a, p, h)) if *a == s.address && *p == port => h.clone(),
            _ => {
                let h: Arc<str> = self.host_of(s).into();
                b.host = Some((s.address.clone(), port, h.clone()));
                h
            }
        };
        let inflight = (kind == Kind::Request).then(|| {
            b.inflight.fetch_add(1, Ordering::Relaxed);
            InFlight(b.inflight.clone())
        });
        Some(Target {
            id: s.id.clone(),
            host,
            ok,
            _inflight: inflight,
        })
    }

    fn outcome(&self, target: &Target, ok: bool) {
        let now = Instant::now();
        let mut backends = self.0.backends.lock().expect("not poisoned");
        let Some(b) = backends.get_mut(&target.id) else {
            return;
        };
        let before = b.breaker.state(now, self.0.cfg.breaker_open);
        if ok {
            b.breaker.success();
        } else if b.breaker.failure(now, self.0.cfg.breaker_failures) {
            tracing::warn!(backend = %target.id, "circuit breaker opened");
        }
        // Set the gauge when the state changes, not on every request (it is on the hot path).
        let after = b.breaker.state(now, self.0.cfg.breaker_open);
        if after != before {
            gauge!(CIRCUIT, "backend" => target.id.to_string()).set(after.as_f64());
        }
    }

    /// May one more retry be spent? (A budget: a share of requests, plus 10 spare.)
    fn retry_allowed(&self) -> bool {
        let req = self.0.requests.load(Ordering::Relaxed) as f64;
        let ret = self.0.retries.load(Ordering::Relaxed) as f64;
        if ret < req * self.0.cfg.retry_budget + 10.0 {
            self.0.retries.fetch_add(1, Ordering::Relaxed);
            counter!(RETRIES).increment(1);
            true
        } else {
            false
        }
    }

    /// Active health checks of every server the snapshot knows, until `stop`.
    pub async fn check_health(self, stop: CancellationToken) {
        let client = crate::contract::tls::plain_http_builder()
            .timeout(self.0.cfg.health_interval.max(Duration::from_millis(500)))
            .build()
            .expect("a plain HTTP client builds");
        loop {
            let t = self.0.topology.borrow().clone();
            let checks = t.servers.iter().map(|s| {
                let url = format!("http://{}{}", self.host_of(s), self.0.cfg.health_path);
                let id = s.id.clone();
                let client = client.clone();
                async move {
                    (
                        id,
                        matches!(client.get(url).send().await, Ok(r) if r.status().is_success()),
                    )
                }
            });
            let results = futures::future::join_all(checks).await;
            {
                let mut backends = self.0.backends.lock().expect("not poisoned");
                for (id, passed) in results {
                    let b = backends.entry(id.clone()).or_default();
                    if let Some(up) = b.active.record(passed, self.0.cfg.rise, self.0.cfg.fall) {
                        tracing::info!(backend = %id, up, "health check state changed");
                    }
                    gauge!(BACKEND_UP, "backend" => id.to_string()).set(if b.active.up() {
                        1.0
                    } else {
                        0.0
                    });
                }
                // A server that left the fleet is not up: say so, not its last check.
                backends.retain(|id, _| {
                    let stays = t.get(id).is_some();
                    if !stays {
                        gauge!(BACKEND_UP, "backend" => id.to_string()).set(0.0);
                    }
                    stays
                });
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.0.cfg.health_interval) => {}
            }
        }
    }
}

/// Read and write buffers per relayed WebSocket side. tungstenite's default is 128 KiB
/// each, which made an idle relayed connection cost ~270 KB (measured, benches/proxy.sh);
/// the buffers grow as needed for large messages anyway.
const WS_BUFFER: usize = 4 * 1024;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
}

fn unavailable(why: &str) -> Response {
    counter!(REQUESTS, "backend" => "none", "outcome" => "no_backend").increment(1);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no server can take this request: {why}\n"),
    )
        .into_response()
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A server connection's future, to be polled by the task of the client connection it serves.
type Drive = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A kept HTTP/1 connection to one server.
type Kept = (Arc<str>, SendRequest<Full<Bytes>>);

/// Idle server connections kept in the shared pool, per server, and for how long.
const POOL_MAX_IDLE_PER_SERVER: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The plain path puts every connection back after each response, so its pool holds as many
/// as were in use at the busiest moment: more room before connections churn.
const RAW_POOL_MAX_IDLE_PER_SERVER: usize = 1024;

/// The servers' side of one client connection: a keep-alive connection to each server its
/// requests went to. Their connection futures are polled by the client connection's own task
/// (handed over on `drive`), so a request and its answer never cross to another task: with
/// every connection in a pool task of its own, those wake-ups cost more than the proxying
/// itself (BENCHMARKS.md). Only connections left by ended client connections are shared.
struct Upstreams {
    peer: SocketAddr,
    kept: Mutex<Vec<Kept>>,
    drive: mpsc::UnboundedSender<Drive>,
}

/// Why forwarding to a server failed.
enum SendFailure {
    /// The request never reached the server: safe to send elsewhere.
    NotSent(String),
    /// It may have been sent: only an idempotent request may be sent again.
    Sent(String),
}

impl Upstreams {
    /// Sends `req` to `target` on a kept connection, or a new one when there is none or the
    /// server closed it meanwhile; returns the response head, its body streaming behind.
    async fn send(
        &self,
        g: &Gateway,
        target: &Target,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendFailure> {
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
                        None => return Err(SendFailure::Sent(e.into_error().to_string())),
                    },
                }
            }
        }
        let tcp = connect(g, target).await.map_err(SendFailure::NotSent)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| SendFailure::NotSent(format!("handshake: {e}")))?;
        let id = target.id.clone();
        let driven: Drive = Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %id, error = %e, "server connection ended");
            }
        });
        if self.drive.send(driven).is_err() {
            return Err(SendFailure::NotSent(
                "the client connection is closing".into(),
            ));
        }
        match sender.send_request(req).await {
            Ok(resp) => {
                self.keep(target, sender);
                Ok(resp)
            }
            Err(e) => Err(SendFailure::Sent(e.to_string())),
        }
    }

    fn keep(&self, target: &Target, sender: SendRequest<Full<Bytes>>) {
        self.kept
            .lock()
            .expect("not poisoned")
            .push((target.id.clone(), sender));
    }
}

/// A new connection to `target`, within the connect timeout; counted as opened.
async fn connect(g: &Gateway, target: &Target) -> Result<TcpStream, String> {
    let connect = async {
        let tcp = TcpStream::connect(&*target.host).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(tcp)
    };
    match tokio::time::timeout(g.0.cfg.connect_timeout, connect).await {
        Ok(Ok(tcp)) => {
            g.0.opened.increment(1);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err(format!(
            "connect: no answer within {:?}",
            g.0.cfg.connect_timeout
        )),
    }
}

/// Serves one client connection until it closes, or until `stop` (then after the request in
/// progress). Keep-alive connections that send nothing for `idle_timeout` are closed.
async fn serve_connection<S>(g: Gateway, stream: S, peer: SocketAddr, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (drive, mut driven) = mpsc::unbounded_channel::<Drive>();
    let up = Arc::new(Upstreams {
        peer,
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
    builder.timer(TokioTimer::new()).header_read_timeout(idle);
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
async fn handle(g: Gateway, up: Arc<Upstreams>, req: Request) -> Response {
    g.0.requests.fetch_add(1, Ordering::Relaxed);
    if is_upgrade(req.headers()) {
        ws(g, req).await
    } else {
        http(g, &up, req).await
    }
}

async fn ws(g: Gateway, req: Request) -> Response {
    let started = Instant::now();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".into(), |p| p.as_str().to_string());
    let (mut parts, _body) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let mut tried: Vec<Arc<str>> = Vec::new();
    loop {
        let Some(target) = g.pick(&tried) else {
            return unavailable(if tried.is_empty() {
                "no live server"
            } else {
                "every server tried refused"
            });
        };
        let url = format!("ws://{}{}", target.host, path);
        let connect =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true);
        let attempt = tokio::time::timeout(g.0.cfg.connect_timeout, connect).await;
        match attempt {
            Ok(Ok((backend, _))) => {
                g.outcome(&target, true);
                histogram!(REQUEST_DURATION, "kind" => "ws_connect")
                    .record(started.elapsed().as_secs_f64());
                counter!(REQUESTS, "backend" => target.id.to_string(), "outcome" => "ws")
                    .increment(1);
                let id = target.id.clone();
                return upgrade
                    .read_buffer_size(WS_BUFFER)
                    .write_buffer_size(WS_BUFFER)
                    .on_upgrade(move |client| relay(client, backend, id));
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                // The server is up but refuses (full, cordoned, shedding): try another.
                tracing::debug!(backend = %target.id, status = %resp.status(), "upgrade refused");
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = %target.id, error = %e, "cannot connect");
                g.outcome(&target, false);
            }
            Err(_) => g.outcome(&target, false),
        }
        tried.push(target.id.clone());
        if tried.len() > g.0.cfg.retries as usize || !g.retry_allowed() {
            counter!(REQUESTS, "backend" => target.id.to_string(), "outcome" => "error")
                .increment(1);
            return unavailable("every server tried refused or failed");
        }
        tokio::time::sleep(Duration::from_millis(20 * tried.len() as u64)).await;
    }
}

type BackendStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Relays messages both ways until either side closes, passing close codes through.
async fn relay(client: WebSocket, backend: BackendStream, id: Arc<str>) {
    gauge!(WS_OPEN, "backend" => id.to_string()).increment(1.0);
    let (mut c_tx, mut c_rx) = client.split();
    let (mut b_tx, mut b_rx) = backend.split();
    let up = async {
        while let Some(Ok(m)) = c_rx.next().await {
            let m = match m {
                AxMessage::Text(t) => TgMessage::Text(t.as_str().into()),
                AxMessage::Binary(b) => TgMessage::Binary(b),
                AxMessage::Ping(p) => TgMessage::Ping(p),
                AxMessage::Pong(p) => TgMessage::Pong(p),
                AxMessage::Close(f) => {
                    let f = f.map(|f| TgCloseFrame {
                        code: CloseCode::from(f.code),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = b_tx.send(TgMessage::Close(f)).await;
                    break;
                }
            };
            if b_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        while let Some(Ok(m)) = b_rx.next().await {
            let m = match m {
                TgMessage::Text(t) => AxMessage::Text(t.as_str().into()),
                TgMessage::Binary(b) => AxMessage::Binary(b),
                TgMessage::Ping(p) => AxMessage::Ping(p),
                TgMessage::Pong(p) => AxMessage::Pong(p),
                TgMessage::Close(f) => {
                    let f = f.map(|f| CloseFrame {
                        code: u16::from(f.code),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = c_tx.send(AxMessage::Close(f)).await;
                    break;
                }
                TgMessage::Frame(_) => continue,
            };
            if c_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
    gauge!(WS_OPEN, "backend" => id.to_string()).decrement(1.0);
}

/// `X-Forwarded-For` as the server should see it: the client's list, then the client.
fn forwarded_for(headers: &HeaderMap, peer: SocketAddr) -> HeaderValue {
    let ip = peer.ip().to_string();
    let joined = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    HeaderValue::from_str(&joined).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn idempotent(m: &axum::http::Method) -> bool {
    idempotent_name(m.as_str())
}

fn idempotent_name(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
}

async fn http(g: Gateway, up: &Upstreams, req: Request) -> Response {
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
        if let Some(hit) = g.0.cache.get(path.as_str()) {
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
            return resp;
        }
        counter!(CACHE, "result" => "miss").increment(1);
    }
    // The request body is kept so that a retry can send it again (most requests have none).
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body over 16 MiB\n").into_response();
    };
    let mut tried: Vec<Arc<str>> = Vec::new();
    let inflight = match &g.0.accounting {
        Some(acc) => acc.inflight().await,
        None => None,
    };
    loop {
        let Some(target) = g.pick_with(&tried, Kind::Request, inflight.as_ref()) else {
            return unavailable(if tried.is_empty() {
                "no live server"
            } else {
                "every server tried failed"
            });
        };
        // Held until this iteration ends or the future is dropped (the client went away).
        let _slot = match &g.0.accounting {
            Some(acc) => acc.acquire(&target.id).await,
            None => None,
        };
        let mut upstream = http::Request::new(Full::new(body.clone()));
        *upstream.method_mut() = method.clone();
        *upstream.uri_mut() = http::Uri::from(path.clone());
        let headers = upstream.headers_mut();
        for (k, v) in &parts.headers {
            if !HOP_BY_HOP.contains(&k.as_str()) && k != "x-forwarded-for" {
                headers.append(k, v.clone());
            }
        }
        if let Ok(host) = HeaderValue::from_str(&target.host) {
            headers.insert(http::header::HOST, host);
        }
        headers.insert("x-forwarded-for", forwarded_for(&parts.headers, up.peer));
        let err =
            match tokio::time::timeout(g.0.cfg.request_timeout, up.send(&g, &target, upstream))
                .await
            {
                Ok(Ok(r)) => {
                    let status = r.status();
                    g.outcome(
                        &target,
                        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
                    );
                    let (mut rparts, incoming) = r.into_parts();
                    for h in HOP_BY_HOP {
                        if *h != "content-length" {
                            rparts.headers.remove(*h);
                        }
                    }
                    g.0.http_duration.record(started.elapsed().as_secs_f64());
                    target.ok.increment(1);
                    if cacheable && status == StatusCode::OK {
                        // Only cached responses are read whole; the rest stream through.
                        let Ok(collected) = http_body_util::BodyExt::collect(incoming).await else {
                            return (
                                StatusCode::BAD_GATEWAY,
                                format!("reading the response from {} failed\n", target.id),
                            )
                                .into_response();
                        };
                        let bytes = collected.to_bytes();
                        let headers = rparts
                            .headers
                            .iter()
                            .filter_map(|(k, v)| {
                                v.to_str().ok().map(|v| (k.to_string(), v.to_string()))
                            })
                            .collect();
                        if g.0
                            .cache
                            .put(path.as_str(), status.as_u16(), headers, bytes.clone())
                        {
                            counter!(CACHE, "result" => "store").increment(1);
                        }
                        return Response::from_parts(rparts, Body::from(bytes));
                    }
                    return Response::from_parts(rparts, Body::new(incoming));
                }
                Ok(Err(SendFailure::NotSent(m))) => (m, true),
                Ok(Err(SendFailure::Sent(m))) => (m, false),
                Err(_) => (
                    format!("no answer within {:?}", g.0.cfg.request_timeout),
                    false,
                ),
            };
        let (message, not_sent) = err;
        g.outcome(&target, false);
        tried.push(target.id.clone());
        // Retried on another server: a request that never reached one (connect failure), or
        // an idempotent one that failed or timed out.
        let retry = not_sent || idempotent(&method);
        if !retry || tried.len() > g.0.cfg.retries as usize || !g.retry_allowed() {
            counter!(REQUESTS, "backend" => target.id.to_string(), "outcome" => "error")
                .increment(1);
            return (
                StatusCode::BAD_GATEWAY,
                format!("{} failed: {message}\n", target.id),
            )
                .into_response();
        }
        tokio::time::sleep(Duration::from_millis(20 * tried.len() as u64)).await;
    }
}

/// Runs the gateway until `shutdown`.
pub async fn run(
    cfg: PipelineConfig,
    listen: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let gw_cfg = cfg.gateway.clone();
    let addr = listen.unwrap_or(gw_cfg.listen);
    crate::telemetry::install_exporter(gw_cfg.metrics_listen)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Listen { addr, source })?;
    // The fleet: from the controller's feed when one is set, else from the controller's own
    // sources and snapshot code, run here.
    let (topology, _fold) = match &gw_cfg.topology_feed {
        Some(url) => crate::fleet::follow::follow(url.clone(), shutdown.clone()),
        None => crate::fleet::view::spawn(&cfg, Events::new(&cfg.name), shutdown.clone())?,
    };
    let accounting = if gw_cfg.shared_accounting {
        let redis = cfg
            .redis
            .endpoint()
            .client()
            .map_err(crate::fleet::view::ViewError::redis(&cfg.name))?;
        match accounting::Accounting::new(redis, &cfg.service, gw_cfg.redis_timeout) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "shared accounting disabled: Redis refused its settings");
                None
            }
        }
    } else {
        None
    };
    let gateway = Gateway::new(gw_cfg.clone(), topology, accounting);
    gateway
        .0
        .cache
        .spawn_collector(Duration::from_secs(5), shutdown.clone());
    tokio::spawn(gateway.clone().check_health(shutdown.clone()));
    {
        let (g, stop) = (gateway.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(POOL_IDLE_TIMEOUT / 4);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => {
                        g.0.pool.prune(Instant::now());
                        g.0.raw_pool.prune(Instant::now());
                    }
                }
            }
        });
    }
    tracing::info!(%addr, service = %cfg.service, metrics = %gw_cfg.metrics_listen, "gateway up");
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(%addr, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if gateway.0.accounting.is_some() {
            // Shared accounting holds a slot in Redis per request: hyper's path does that.
            connections.spawn(serve_connection(
                gateway.clone(),
                stream,
                peer,
                shutdown.clone(),
            ));
        } else {
            connections.spawn(forward::serve(
                gateway.clone(),
                stream,
                peer,
                shutdown.clone(),
            ));
        }
    }
    // Requests in progress finish (each connection closes after its current one).
    connections.close();
    if tokio::time::timeout(gw_cfg.request_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "stopping with requests still in progress"
        );
    }
    Ok(())
}
