//! `rebalancer gateway`: an HTTP and WebSocket reverse proxy that routes new connections by
//! weighted least-connections (power of two choices) over the live fleet. The fleet comes
//! from the same sources and snapshot as the controller (Consul health and KV, Redis
//! counts); active health checks and a per-server circuit breaker take failing servers out;
//! connect failures are retried on another server; static GETs are cached. Every client
//! resource is bounded (`limits.rs`), and WebSocket sessions are tunnelled frame by frame
//! (`ws_upgrade.rs`, `ws_relay.rs`). docs/architecture.md lists the files by job.

mod accept;
mod access;
pub mod accounting;
mod attempt;
mod balancer;
pub mod cache;
mod conn;
mod forward;
mod forwarding;
pub mod health;
mod http1;
mod hyper_headers;
mod hyper_path;
mod limits;
pub mod pool;
mod probe;
mod rewind;
pub mod route;
mod series;
pub mod table;
pub mod tls;
mod websocket;
mod ws_relay;
mod ws_upgrade;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use metrics::{counter, histogram};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use accept::{accept_loop, client_listener, first_view, raise_open_files};
use balancer::Target;
use hyper_path::{
    serve_connection, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_SERVER, RAW_POOL_MAX_IDLE_PER_SERVER,
};

use crate::config::{GatewayConfig, PipelineConfig};
use crate::fleet::events::Events;
use crate::fleet::topology::Topology;
use cache::StaticCache;

use crate::telemetry::GW_REQUEST_DURATION as REQUEST_DURATION;
use crate::telemetry::GW_SERVER_CONNECTIONS as SERVER_CONNECTIONS;

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// The pipeline file: service, Consul and Redis, and the optional [gateway] section.
    #[arg(long)]
    pub pipeline: std::path::PathBuf,
    /// Listen address (overrides gateway.listen).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Event loops, each a thread accepting and serving its own connections: 0 for one per
    /// core.
    #[arg(long, env = "REBALANCER_GATEWAY_THREADS", default_value_t = 0)]
    pub threads: usize,
}

struct Shared {
    cfg: GatewayConfig,
    topology: watch::Receiver<Arc<Topology>>,
    /// The routing table, swapped whole when the fleet changes (`balancer::keep_table`).
    table: arc_swap::ArcSwap<table::Table>,
    /// Every server's state, by id: written by the table's keeper only.
    registry: Mutex<HashMap<Arc<str>, Arc<table::Backend>>>,
    cache: StaticCache,
    http_duration: metrics::Histogram,
    ws_connect: metrics::Histogram,
    /// Idle server connections left by client connections that ended.
    pool: pool::IdlePool<SendRequest<Full<Bytes>>>,
    /// Idle server connections of the plain forwarding path (`forward`), taken by a
    /// request and put back after its response, whichever client connection it came on:
    /// one pool per event loop, so a connection is only ever used on the loop whose poller
    /// watches it (no wake-up crosses threads).
    raw_pools: Vec<pool::IdlePool<forward::Idle>>,
    /// `server_connections_total{source="opened"}` and `{source="pool"}`.
    opened: metrics::Counter,
    pooled: metrics::Counter,
    requests: AtomicU64,
    retries: AtomicU64,
    /// Requests and upgrades no server could take (`requests_total{outcome="no_backend"}`).
    no_backend: AtomicU64,
    accounting: Option<accounting::Accounting>,
    /// Who may hold a client connection, and the count of each limit that bit.
    admission: limits::Admission,
    bitten: limits::Bitten,
    forwarding: forwarding::Forwarding,
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
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
        topology: watch::Receiver<Arc<Topology>>,
        accounting: Option<accounting::Accounting>,
        loops: usize,
    ) -> Gateway {
        let tls = cfg.tls.is_some();
        let cache = StaticCache::new(
            cfg.cache_capacity,
            cfg.cache_max_bytes,
            cfg.cache_max_entry_bytes,
            cfg.cache_ttl,
            cfg.cache_paths.clone(),
        );
        let cfg_limits = cfg.limits.clone();
        let trusted = cfg.trusted_proxies.clone();
        Gateway(Arc::new(Shared {
            cfg,
            topology,
            table: arc_swap::ArcSwap::from_pointee(table::Table::default()),
            registry: Mutex::new(HashMap::new()),
            cache,
            http_duration: histogram!(REQUEST_DURATION, "kind" => "http"),
            ws_connect: histogram!(REQUEST_DURATION, "kind" => "ws_connect"),
            pool: pool::IdlePool::new(POOL_MAX_IDLE_PER_SERVER, POOL_IDLE_TIMEOUT),
            raw_pools: (0..loops.max(1))
                .map(|_| pool::IdlePool::new(RAW_POOL_MAX_IDLE_PER_SERVER, POOL_IDLE_TIMEOUT))
                .collect(),
            opened: counter!(SERVER_CONNECTIONS, "source" => "opened"),
            pooled: counter!(SERVER_CONNECTIONS, "source" => "pool"),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            no_backend: AtomicU64::new(0),
            accounting,
            admission: limits::Admission::new(&cfg_limits),
            bitten: limits::Bitten::new(),
            forwarding: forwarding::Forwarding::new(trusted, tls),
        }))
    }
}

impl Gateway {
    /// Serves `/metrics` until `stop`: the recorder's series, then the per-backend ones
    /// rendered from the routing table (a server's go with it when it leaves).
    async fn serve_metrics(
        self,
        listener: tokio::net::TcpListener,
        recorder: metrics_exporter_prometheus::PrometheusHandle,
        stop: CancellationToken,
    ) {
        let upkeep = crate::telemetry::spawn_upkeep(recorder.clone(), stop.clone());
        let render = move || {
            metrics::gauge!(crate::telemetry::GW_CACHE_BYTES).set(self.0.cache.weight() as f64);
            let mut out = recorder.render();
            series::render(
                &self.0.table.load(),
                self.0.no_backend.load(std::sync::atomic::Ordering::Relaxed),
                Instant::now(),
                self.0.cfg.breaker_open,
                &mut out,
            );
            out
        };
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move { render() }
            }),
        );
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
        upkeep.abort();
    }
}

impl Gateway {
    /// The client's connection, after its TLS handshake when the gateway terminates TLS: it
    /// must end within `header_timeout`, like a request head.
    async fn tls_conn(
        &self,
        stream: tokio::net::TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Option<conn::Conn> {
        let deadline = self.0.cfg.limits.header_timeout;
        match tokio::time::timeout(deadline, conn::TlsConn::accept(stream, config)).await {
            Ok(Ok(c)) => Some(conn::Conn::Tls(Box::new(c))),
            Ok(Err(e)) => {
                metrics::counter!(crate::telemetry::GW_TLS_HANDSHAKES).increment(1);
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                metrics::counter!(crate::telemetry::GW_TLS_HANDSHAKES).increment(1);
                self.0.bitten.count(limits::Limit::HeaderTimeout);
                None
            }
        }
    }
}

/// A 503 naming why no server can take the request (counted where it is decided).
pub(super) fn unavailable(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no server can take this request: {why}\n"),
    )
        .into_response()
}

pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

thread_local! {
    /// Which event loop this thread runs (0: the first, or any other thread).
    static LOOP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Gateway {
    /// The idle server connections of this thread's event loop.
    fn raw_pool(&self) -> &pool::IdlePool<forward::Idle> {
        let pools = &self.0.raw_pools;
        &pools[LOOP.get() % pools.len()]
    }
}

/// Runs the gateway until `shutdown`.
pub async fn run(
    cfg: PipelineConfig,
    listen: Option<std::net::SocketAddr>,
    loops: usize,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let gw_cfg = cfg.gateway.clone();
    let addr = listen.unwrap_or(gw_cfg.listen);
    raise_open_files(gw_cfg.limits.max_connections);
    let tls = match &gw_cfg.tls {
        Some(files) => Some(Arc::new(tls::Tls::new(files)?)),
        None => None,
    };
    let recorder = crate::telemetry::install_recorder(gw_cfg.metrics_listen)?;
    let metrics_listener = tokio::net::TcpListener::bind(gw_cfg.metrics_listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: gw_cfg.metrics_listen,
            source,
        })?;
    let listener = client_listener(addr).map_err(|source| GatewayError::Listen { addr, source })?;
    // The fleet: from the controller's feed when one is set, else from the controller's own
    // sources and snapshot code, run here.
    let (topology, _fold) = match &gw_cfg.topology_feed {
        Some(url) => crate::fleet::follow::follow(url.clone(), shutdown.clone()),
        None => crate::fleet::view::spawn(
            &cfg,
            crate::fleet::view::Pacing::EveryChange,
            Events::new(&cfg.name),
            shutdown.clone(),
        )?,
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
    let gateway = Gateway::new(gw_cfg.clone(), topology, accounting, loops);
    gateway
        .0
        .cache
        .spawn_collector(Duration::from_secs(5), shutdown.clone());
    gateway.rebuild_table(&gateway.0.topology.borrow().clone());
    tokio::spawn(gateway.clone().keep_table(shutdown.clone()));
    tokio::spawn(
        gateway
            .clone()
            .serve_metrics(metrics_listener, recorder, shutdown.clone()),
    );
    tokio::spawn(gateway.clone().check_health(shutdown.clone()));
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().reload_on_change(shutdown.clone()));
    }
    {
        let (g, stop) = (gateway.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(POOL_IDLE_TIMEOUT / 4);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => {
                        g.0.pool.prune(Instant::now());
                        for pool in &g.0.raw_pools {
                            pool.prune(Instant::now());
                        }
                    }
                }
            }
        });
    }
    // Connections wait in the listener's backlog until the fleet is known, not routed by
    // least-connections over counts not read yet (every server would look empty).
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        () = first_view(gateway.0.topology.clone()) => {}
    }
    tracing::info!(%addr, service = %cfg.service, metrics = %gw_cfg.metrics_listen, tls = tls.is_some(), "gateway up");
    // One event loop per thread, each with its own listening socket on the address
    // (SO_REUSEPORT: the kernel spreads new connections over them), serving what it
    // accepted to the end: no task, socket or wake-up crosses threads, as in HAProxy and
    // nginx. This thread's loop also runs the shared tasks above.
    let mut others = Vec::new();
    for i in 1..loops.max(1) {
        let listener = client_listener(addr)
            .and_then(tokio::net::TcpListener::into_std)
            .map_err(|source| GatewayError::Listen { addr, source })?;
        // Each loop's own token: connections poll it on every wake-up, and a child's state
        // is its own (the parent's lock, shared by every thread, is taken only to cancel).
        let (g, tls, shutdown) = (gateway.clone(), tls.clone(), shutdown.child_token());
        let started = std::thread::Builder::new()
            .name(format!("gateway-loop-{i}"))
            .spawn(move || {
                // Sockets and timers only: no signal or child-process driver to consult at
                // every turn (signals are the first loop's runtime's).
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    accept_loop(g, i, listener, addr, tls, shutdown).await;
                    Ok::<(), std::io::Error>(())
                })
            })
            .map_err(|source| GatewayError::Listen { addr, source })?;
        others.push(started);
    }
    accept_loop(gateway, 0, listener, addr, tls, shutdown.child_token()).await;
    // Waited for off this loop, which keeps serving what the others may still use (hyper's
    // pooled server connections) until they end.
    let joined = tokio::task::spawn_blocking(move || {
        for t in others {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "an event loop could not start"),
                Err(_) => tracing::error!("an event loop panicked"),
            }
        }
    });
    let _ = joined.await;
    Ok(())
}
