//! `rebalancer demo-server`: a WebSocket echo server that embeds the agent. Every session is
//! greeted with `{"server":"<id>"}` so clients (and the load generator) know where they
//! landed; new sessions are refused with 503 when the agent says so (full, cordoned,
//! shedding, shutting down).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::agent::{
    Admission, Agent, AgentConfig, SessionGuard, SessionRegistry, Sessions, VictimPolicy,
};
use crate::contract::tls::{ConsulEndpoint, RedisEndpoint};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoServerArgs {
    /// Consul service to register in.
    #[arg(long, env = "REBALANCER_AGENT_SERVICE", default_value = "ws")]
    pub service: String,
    /// Consul service ID (default: `<service>-<port>`).
    #[arg(long, env = "REBALANCER_AGENT_ID")]
    pub id: Option<String>,
    /// Address to listen on.
    #[arg(
        long,
        env = "REBALANCER_AGENT_LISTEN",
        default_value = "127.0.0.1:9001"
    )]
    pub listen: SocketAddr,
    /// Address registered in Consul (default: the listen address's IP).
    #[arg(long, env = "REBALANCER_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Sessions this server holds at most (Consul `Meta.max_sessions`).
    #[arg(long, env = "REBALANCER_AGENT_MAX_SESSIONS", default_value_t = 100)]
    pub max_sessions: u32,
    /// Routing weight (Consul Meta.weight).
    #[arg(long, env = "REBALANCER_AGENT_WEIGHT")]
    pub weight: Option<f32>,
    /// Consul HTTP address (`https://` with `CONSUL_CACERT`, and `CONSUL_CLIENT_CERT` and
    /// `CONSUL_CLIENT_KEY` for mutual TLS).
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    pub consul: String,
    /// Consul ACL token (see docs/security.md for the agent's policy).
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,
    /// Redis URL (`rediss://` with `REDIS_CACERT`, and `REDIS_CLIENT_CERT` and
    /// `REDIS_CLIENT_KEY` for mutual TLS; an ACL user from `REDIS_USERNAME` and
    /// `REDIS_PASSWORD`).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis: String,
    /// Which sessions to close first when told to shed.
    #[arg(
        long,
        env = "REBALANCER_AGENT_POLICY",
        default_value_t = VictimPolicy::Random,
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(VictimPolicy::ALL.map(VictimPolicy::as_str)),
            |s| s.parse::<VictimPolicy>().expect("one of the possible values"),
        ),
    )]
    pub policy: VictimPolicy,
    /// Sheds are spread over this window.
    #[arg(long, env = "REBALANCER_AGENT_SHED_WINDOW", default_value = "2s", value_parser = humantime::parse_duration)]
    pub shed_window: Duration,
    /// Wait this long before registering: a slow-starting server, for trying out
    /// provisioning timeouts.
    #[arg(long, env = "REBALANCER_AGENT_START_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub start_delay: Duration,
    /// Wait this long after draining before exiting: a slow-stopping server, for trying out
    /// `stop_grace`.
    #[arg(long, env = "REBALANCER_AGENT_STOP_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub stop_delay: Duration,
    /// Heartbeat of the session-count report (its TTL is three of these).
    #[arg(long, env = "REBALANCER_AGENT_REPORT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,
}

impl DemoServerArgs {
    pub fn agent_config(&self) -> Result<AgentConfig, DemoError> {
        if self.max_sessions == 0 {
            return Err(DemoError::Config(
                "--max-sessions must be at least 1".into(),
            ));
        }
        if let Some(w) = self.weight {
            if !(w.is_finite() && w > 0.0 && w <= 1000.0) {
                return Err(DemoError::Config("--weight must be in (0, 1000]".into()));
            }
        }
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.service, self.listen.port()));
        if !crate::contract::protocol::valid_server_id(&id) {
            return Err(DemoError::Config(format!(
                "--id {id:?} must be 1 to 128 of [A-Za-z0-9._-]: controllers ignore other IDs"
            )));
        }
        let address = self
            .advertise
            .clone()
            .unwrap_or_else(|| self.listen.ip().to_string());
        let mut cfg = AgentConfig::new(
            &self.service,
            &id,
            &address,
            self.listen.port(),
            self.max_sessions,
        );
        cfg.weight = self.weight;
        // TLS files and credentials from the variables the services' own tools read.
        let env = |k: &str| std::env::var(k).ok();
        cfg.consul = ConsulEndpoint::from_env(&self.consul, &env);
        if let Some(t) = self.consul_token.clone().filter(|t| !t.is_empty()) {
            cfg.consul.token = Some(crate::contract::secret::Secret::new(t));
        }
        cfg.redis = RedisEndpoint::from_env(&self.redis, &env);
        cfg.policy = self.policy;
        cfg.shed_window = self.shed_window;
        cfg.report_interval = self.report_interval;
        cfg.keys = crate::contract::signing::CommandKeys::from_env(&|k| std::env::var(k).ok())
            .map_err(|e| DemoError::Config(format!("command keys: {e}")))?;
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct App {
    agent: Agent,
    registry: SessionRegistry,
    id: Arc<str>,
    max: u64,
    /// The agent's metrics (`rebalancer_agent_*`), when this process holds the recorder.
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// Serves until `shutdown`; then the agent deregisters and drains before the listener closes.
pub async fn run(args: DemoServerArgs, shutdown: CancellationToken) -> Result<(), DemoError> {
    let cfg = args.agent_config()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| DemoError::Listen {
            addr: args.listen,
            source,
        })?;
    let registry = SessionRegistry::new();
    let agent = Agent::new(cfg.clone(), Arc::new(registry.clone()));
    let app = App {
        agent: agent.clone(),
        registry,
        id: cfg.id.as_str().into(),
        max: u64::from(cfg.max_sessions),
        // One recorder per process: embedded in a test, the test's own is kept.
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .ok(),
    };
    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/", get(upgrade))
        .route("/ws", get(upgrade))
        .route("/hello", get(hello))
        .route("/slow", get(slow))
        .route("/echo", axum::routing::any(echo))
        .route("/large-head", get(large_head))
        .route("/request-headers", axum::routing::any(request_headers))
        .route("/static/{*file}", get(static_file))
        .with_state(app);
    let http_stop = CancellationToken::new();
    let server = {
        let stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    tracing::info!(id = %cfg.id, listen = %args.listen, max_sessions = cfg.max_sessions, "demo server up");
    let delayed = tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(args.start_delay) => true,
    };
    let result = if delayed {
        agent.run(shutdown).await
    } else {
        Ok(())
    };
    tokio::time::sleep(args.stop_delay).await;
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    result.map_err(DemoError::from)
}

async fn render_metrics(State(app): State<App>) -> Response {
    match &app.metrics {
        Some(h) => h.render().into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are recorded elsewhere in this process",
        )
            .into_response(),
    }
}

async fn health(State(app): State<App>) -> Response {
    if app.agent.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        (StatusCode::OK, "ok").into_response()
    }
}

/// Plain HTTP: who answered (for trying out a gateway).
/// Names the server, and the client a proxy in front says it forwarded for.
async fn hello(State(app): State<App>, headers: axum::http::HeaderMap) -> Response {
    let forwarded_for = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    axum::Json(serde_json::json!({ "server": &*app.id, "forwarded_for": forwarded_for }))
        .into_response()
}

/// Answers after `?ms=` milliseconds (at most 10 s): for trying timeouts and aborts.
async fn slow(
    State(app): State<App>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, u64>>,
) -> Response {
    let ms = q.get("ms").copied().unwrap_or(100).min(10_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    axum::Json(serde_json::json!({ "server": &*app.id, "slept_ms": ms })).into_response()
}

/// Sends back the method and the request body, in pieces of unknown total length (so
/// `Transfer-Encoding: chunked`): for trying how a proxy relays bodies.
async fn echo(
    State(app): State<App>,
    method: axum::http::Method,
    body: axum::body::Bytes,
) -> Response {
    let pieces: Vec<Result<axum::body::Bytes, std::convert::Infallible>> = vec![
        Ok(format!("{method} {} bytes from {}\n", body.len(), app.id).into()),
        Ok(body),
        Ok("\nend\n".into()),
    ];
    axum::body::Body::from_stream(futures::stream::iter(pieces)).into_response()
}

/// A response whose head carries an `x-filler` header of `?bytes=` bytes (at most 1 MiB):
/// for trying a proxy's limit on response heads.
async fn large_head(
    axum::extract::Query(q): axum::extract::Query<HashMap<String, usize>>,
) -> Response {
    let n = q.get("bytes").copied().unwrap_or(1000).min(1 << 20);
    ([("x-filler", "f".repeat(n))], "a large head\n").into_response()
}

/// The request as this server got it (method, every header field in order, body length):
/// for trying what a proxy passes on. A WebSocket upgrade (offering the `chat` subprotocol,
/// which is chosen) gets the same as its first message, then a normal close.
async fn request_headers(
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    body: axum::body::Bytes,
) -> Response {
    let fields: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let seen =
        serde_json::json!({ "method": method.as_str(), "headers": fields, "body": body.len() });
    match ws {
        Ok(ws) => ws
            .protocols(["chat"])
            .on_upgrade(move |mut socket| async move {
                let _ = socket.send(Message::Text(seen.to_string().into())).await;
                let frame = CloseFrame {
                    code: 1000,
                    reason: "done".into(),
                };
                let _ = socket.send(Message::Close(Some(frame))).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.recv()).await;
            }),
        Err(_) => axum::Json(seen).into_response(),
    }
}

/// A cacheable "static" file that names the server it came from.
/// For trying a cache: `?cache_control=` replaces `public, max-age=60`, `?set_cookie=1`
/// adds a `Set-Cookie`, `?vary=<header>` varies on a request header (and names its value
/// in the body), `?bytes=N` pads the body to N bytes (at most 16 MiB).
async fn static_file(
    State(app): State<App>,
    axum::extract::Path(file): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
    request: axum::http::HeaderMap,
) -> Response {
    let mut headers = axum::http::HeaderMap::new();
    let cc = q
        .get("cache_control")
        .map_or("public, max-age=60", String::as_str);
    if let Ok(v) = axum::http::HeaderValue::from_str(cc) {
        headers.insert(axum::http::header::CACHE_CONTROL, v);
    }
    if q.contains_key("set_cookie") {
        headers.insert(
            axum::http::header::SET_COOKIE,
            axum::http::HeaderValue::from_static("session=personal"),
        );
    }
    let mut body = format!("{file} from {}\n", app.id);
    if let Some(name) = q.get("vary") {
        if let Ok(v) = axum::http::HeaderValue::from_str(name) {
            headers.insert(axum::http::header::VARY, v);
        }
        let value = request.get(name.as_str()).and_then(|v| v.to_str().ok());
        body = body + name + ": " + value.unwrap_or("-") + "\n";
    }
    if let Some(n) = q.get("bytes").and_then(|n| n.parse::<usize>().ok()) {
        let n = n.min(16 << 20);
        body.extend(std::iter::repeat_n('p', n.saturating_sub(body.len())));
    }
    (headers, body).into_response()
}

async fn upgrade(State(app): State<App>, ws: WebSocketUpgrade) -> Response {
    let admission = app.agent.admission();
    if admission != Admission::Accept {
        return (StatusCode::SERVICE_UNAVAILABLE, admission.reason()).into_response();
    }
    // Reserve the slot before upgrading so concurrent upgrades cannot exceed the maximum.
    let guard = app.registry.open();
    if app.registry.count() > app.max {
        drop(guard);
        return (StatusCode::SERVICE_UNAVAILABLE, Admission::Full.reason()).into_response();
    }
    let id = app.id.clone();
    ws.on_upgrade(move |socket| session(socket, guard, id))
}

async fn session(mut socket: WebSocket, mut guard: SessionGuard, id: Arc<str>) {
    let hello = serde_json::json!({ "server": &*id }).to_string();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            reason = guard.closed() => {
                let frame = CloseFrame { code: reason.code(), reason: reason.text().into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
                // Give the client a moment to answer the close handshake.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(m)) = socket.recv().await {
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
                return;
            }
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    if socket.send(Message::Text(t)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if socket.send(Message::Binary(b)).await.is_err() {
                        return;
                    }
                }
                // The client closes: answer its close frame (RFC 6455 §5.5.1; tungstenite
                // queued the answer and sends it on close), then the TCP connection closes.
                Some(Ok(Message::Close(_))) => {
                    let _ = futures::SinkExt::close(&mut socket).await;
                    return;
                }
                Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: DemoServerArgs,
    }

    #[test]
    fn the_demo_servers_flags_default_to_the_agents_own_defaults() {
        let args = Cli::try_parse_from(["demo-server"]).unwrap().args;
        let got = args.agent_config().unwrap();
        let want = AgentConfig::new("ws", "ws-9001", "127.0.0.1", 9001, 100);
        assert_eq!(
            (
                got.consul,
                got.redis,
                got.policy,
                got.shed_window,
                got.report_interval
            ),
            (
                want.consul,
                want.redis,
                want.policy,
                want.shed_window,
                want.report_interval
            )
        );
    }
}
