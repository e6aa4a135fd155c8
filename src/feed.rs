//! The controller's topology feed, served beside `/metrics` on `metrics.listen`:
//! `GET /v1/topology` is the current snapshot as JSON, and the WebSocket
//! `/v1/topology/watch` pushes it again each time it changes. `follow` is the other end: a
//! gateway with `topology_feed` set routes from it instead of watching Consul and Redis
//! itself, reconnecting with capped exponential backoff and jitter and routing on the last
//! snapshot meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as TgMessage;
use tokio_util::sync::CancellationToken;

use crate::protocol::{ServerDoc, TopologyDoc, PROTOCOL_VERSION};
use crate::stages::BackoffPolicy;
use crate::telemetry::GW_FEED_CONNECTED;
use crate::topology::{Admin, Count, Server, SourcesSynced, Topology};

/// The server pings each watcher this often; a follower that hears nothing for
/// [`SILENCE`] takes the feed for dead and reconnects.
pub const PING_EVERY: Duration = Duration::from_secs(10);
pub const SILENCE: Duration = Duration::from_secs(30);

/// The snapshot of one pipeline, as the JSON document of the feed.
pub fn to_doc(t: &Topology, pipeline: &str, service: &str) -> TopologyDoc {
    TopologyDoc {
        v: PROTOCOL_VERSION,
        pipeline: pipeline.to_string(),
        service: service.to_string(),
        version: t.version,
        stale: t.is_stale(),
        missing_sources: t.sources.missing().iter().map(|s| s.to_string()).collect(),
        pending: t.pending,
        servers: t
            .servers
            .iter()
            .map(|s| ServerDoc {
                id: s.id.to_string(),
                address: s.address.to_string(),
                port: s.port,
                capacity: s.capacity,
                weight: s.weight,
                passing: s.passing,
                state: match s.admin {
                    Admin::Active => "active",
                    Admin::Cordoned { .. } => "cordoned",
                    Admin::Unknown => "unknown",
                }
                .to_string(),
                cordoned_since_ms: match s.admin {
                    Admin::Cordoned { since_ms } => Some(since_ms),
                    _ => None,
                },
                sessions: s.sessions.known(),
                provisioning: s.provisioning,
            })
            .collect(),
    }
}

/// A snapshot rebuilt from the feed's document. A state this version does not know reads as
/// unknown, which routing and decisions treat with care, never as active.
pub fn from_doc(d: &TopologyDoc) -> Topology {
    let mut servers: Vec<Server> = d
        .servers
        .iter()
        .map(|s| Server {
            id: s.id.as_str().into(),
            address: s.address.as_str().into(),
            port: s.port,
            capacity: s.capacity,
            weight: s.weight,
            passing: s.passing,
            admin: match s.state.as_str() {
                "active" => Admin::Active,
                "cordoned" => Admin::Cordoned {
                    since_ms: s.cordoned_since_ms.unwrap_or(0),
                },
                _ => Admin::Unknown,
            },
            sessions: s.sessions.map_or(Count::Unknown, Count::Known),
            provisioning: s.provisioning,
        })
        .collect();
    servers.sort_by(|a, b| a.id.cmp(&b.id));
    let missing = |name: &str| d.missing_sources.iter().any(|m| m == name);
    Topology {
        version: d.version,
        servers,
        pending: d.pending,
        sources: SourcesSynced {
            health: !missing("consul-health"),
            states: !missing("consul-kv"),
            sessions: !missing("redis-sessions"),
        },
        ..Topology::default()
    }
}

/// One pipeline's snapshots, as the feed serves them.
#[derive(Clone)]
pub struct Feed {
    pub pipeline: String,
    pub service: String,
    pub snapshots: watch::Receiver<Arc<Topology>>,
}

/// The pipelines this process runs; each registers its snapshot channel when it starts.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<Vec<Feed>>>);

impl Registry {
    pub fn add(&self, feed: Feed) {
        self.0.lock().expect("not poisoned").push(feed);
    }

    /// The feed `?pipeline=` names, or the only one when it names none.
    fn find(&self, pipeline: Option<&String>) -> Result<Feed, (StatusCode, String)> {
        let feeds = self.0.lock().expect("not poisoned");
        let names = || {
            feeds
                .iter()
                .map(|f| f.pipeline.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match pipeline {
            Some(name) => feeds
                .iter()
                .find(|f| f.pipeline == *name)
                .cloned()
                .ok_or_else(|| {
                    let msg = format!("no pipeline {name:?} runs here (running: {})\n", names());
                    (StatusCode::NOT_FOUND, msg)
                }),
            None if feeds.len() == 1 => Ok(feeds[0].clone()),
            None if feeds.is_empty() => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "no pipeline has started yet\n".to_string(),
            )),
            None => Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "several pipelines run here ({}): add ?pipeline=NAME\n",
                    names()
                ),
            )),
        }
    }
}

#[derive(Clone)]
struct Api {
    metrics: PrometheusHandle,
    feeds: Registry,
    shutdown: CancellationToken,
}

/// Serves `/metrics`, `/v1/topology` and `/v1/topology/watch` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    feeds: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Histograms and summaries need draining now and then (the exporter's own listener
    // does this itself).
    let upkeep = {
        let (m, stop) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => m.run_upkeep(),
                }
            }
        })
    };
    let api = Api {
        metrics,
        feeds,
        shutdown: shutdown.clone(),
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render_metrics))
        .route("/v1/topology", axum::routing::get(topology))
        .route("/v1/topology/watch", axum::routing::get(watch_topology))
        .with_state(api);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    upkeep.abort();
    served
}

async fn render_metrics(State(api): State<Api>) -> String {
    api.metrics.render()
}

async fn topology(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    match api.feeds.find(q.get("pipeline")) {
        Ok(f) => {
            let t = f.snapshots.borrow().clone();
            axum::Json(to_doc(&t, &f.pipeline, &f.service)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn watch_topology(
    State(api): State<Api>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    match api.feeds.find(q.get("pipeline")) {
        Ok(f) => upgrade.on_upgrade(move |socket| push(socket, f, api.shutdown)),
        Err(e) => e.into_response(),
    }
}

/// Sends the current snapshot, then each new one, until the watcher or the controller goes.
async fn push(mut socket: WebSocket, feed: Feed, shutdown: CancellationToken) {
    let mut rx = feed.snapshots;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        let t = rx.borrow_and_update().clone();
        if t.version > 0 {
            let doc = to_doc(&t, &feed.pipeline, &feed.service);
            let text = serde_json::to_string(&doc).expect("a topology document serializes");
            if socket.send(Message::Text(text.into())).await.is_err() {
                return;
            }
        }
        // Wait for a new snapshot; answer the watcher's frames and ping it meanwhile.
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    break;
                }
                msg = socket.recv() => match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                _ = shutdown.cancelled() => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("topology_feed {url:?}: {why}")]
pub struct FeedUrlError {
    url: String,
    why: &'static str,
}

/// The watch URL of a controller's feed at `base` (`http://host:port`) for `pipeline`.
pub fn watch_url(base: &str, pipeline: &str) -> Result<String, FeedUrlError> {
    let err = |why| FeedUrlError {
        url: base.to_string(),
        why,
    };
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("ws://"))
        .ok_or_else(|| err("must start with http:// (the controller's metrics.listen)"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(err("must be http://host:port, with no path"));
    }
    let name: String = pipeline
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    Ok(format!("ws://{host}/v1/topology/watch?pipeline={name}"))
}

/// Follows a controller's feed at `url` (from [`watch_url`]) until `shutdown`. The channel
/// starts empty (version 0) and keeps the last snapshot while the feed is away.
pub fn follow(
    url: String,
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Topology>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Topology::default()));
    let task = tokio::spawn(async move {
        let policy = BackoffPolicy::default();
        let mut delays = policy.delays();
        loop {
            let connected = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            );
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = connected => c,
            };
            match stream {
                Ok(Ok((mut ws, _))) => {
                    gauge!(GW_FEED_CONNECTED).set(1.0);
                    tracing::info!(%url, "following the controller's topology feed");
                    let why = loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => {
                                let _ = ws.close(None).await;
                                return;
                            }
                            n = tokio::time::timeout(SILENCE, ws.next()) => n,
                        };
                        match next {
                            Err(_) => break format!("nothing heard for {SILENCE:?}"),
                            Ok(None) => break "the controller closed it".to_string(),
                            Ok(Some(Err(e))) => break e.to_string(),
                            Ok(Some(Ok(TgMessage::Text(text)))) => {
                                match serde_json::from_str::<TopologyDoc>(text.as_str()) {
                                    Ok(doc) => {
                                        tx.send_replace(Arc::new(from_doc(&doc)));
                                        delays = policy.delays(); // it works: start over
                                    }
                                    Err(e) => tracing::warn!(%url, error = %e,
                                        "unreadable topology document; keeping the last snapshot"),
                                }
                            }
                            Ok(Some(Ok(TgMessage::Close(_)))) => {
                                break "the controller closed it".to_string()
                            }
                            Ok(Some(Ok(_))) => {} // pings are answered by tungstenite
                        }
                    };
                    gauge!(GW_FEED_CONNECTED).set(0.0);
                    tracing::warn!(%url, why, "topology feed lost; routing on the last snapshot");
                }
                Ok(Err(e)) => tracing::warn!(%url, error = %e, "cannot reach the topology feed"),
                Err(_) => tracing::warn!(%url, "cannot reach the topology feed: no answer in 5s"),
            }
            let wait = delays.next().unwrap_or(policy.max);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::fixtures::{fleet, server};

    #[test]
    fn a_snapshot_survives_the_round_trip_through_its_document() {
        let mut t = fleet(vec![server("a", 100, 40), server("b", 50, 0)]);
        t.version = 7;
        t.servers[1].admin = Admin::Cordoned { since_ms: 12 };
        t.servers[1].sessions = Count::Unknown;
        t.servers[0].weight = 0.5;
        t.sources.sessions = false;
        let doc = to_doc(&t, "p", "ws");
        assert!(doc.stale);
        assert_eq!(doc.missing_sources, vec!["redis-sessions"]);
        let json = serde_json::to_string(&doc).unwrap();
        let back = from_doc(&serde_json::from_str(&json).unwrap());
        assert_eq!(back.version, 7);
        assert!(back.same_content(&t), "{back:?}\n{t:?}");
    }

    #[test]
    fn a_state_this_version_does_not_know_is_unknown_not_active() {
        let mut doc = to_doc(&fleet(vec![server("a", 10, 1)]), "p", "ws");
        doc.servers[0].state = "draining".into();
        assert_eq!(from_doc(&doc).servers[0].admin, Admin::Unknown);
    }

    #[test]
    fn watch_urls_are_checked_and_the_pipeline_is_escaped() {
        assert_eq!(
            watch_url("http://127.0.0.1:9464/", "ws").unwrap(),
            "ws://127.0.0.1:9464/v1/topology/watch?pipeline=ws"
        );
        assert_eq!(
            watch_url("http://c:1", "a b&c").unwrap(),
            "ws://c:1/v1/topology/watch?pipeline=a%20b%26c"
        );
        let e = watch_url("https://c:1", "ws").unwrap_err().to_string();
        assert!(e.contains("http://"), "{e}");
        assert!(watch_url("http://c:1/api", "ws").is_err());
    }
}
