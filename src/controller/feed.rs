//! The controller's topology feed, served beside `/metrics` on `metrics.listen`:
//! `GET /v1/topology` is the current snapshot as JSON, and the WebSocket
//! `/v1/topology/watch` pushes it again each time it changes. The other end is
//! [`crate::fleet::follow`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::fleet::follow::{to_doc, PING_EVERY};
use crate::fleet::topology::Topology;

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
    let upkeep = crate::telemetry::spawn_upkeep(metrics.clone(), shutdown.clone());
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
    // Sampled when scraped: a task leak shows as a count that only grows.
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    metrics::gauge!(crate::telemetry::RUNTIME_TASKS).set(tasks as f64);
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

/// Sends the current snapshot, then each new one, until the watcher or the controller goes;
/// answers the watcher's frames and pings it meanwhile.
async fn push(mut socket: WebSocket, feed: Feed, shutdown: CancellationToken) {
    let mut snapshots = WatchStream::new(feed.snapshots);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            t = snapshots.next() => match t {
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Some(t) if t.version > 0 => {
                    let doc = to_doc(&t, &feed.pipeline, &feed.service);
                    let text = serde_json::to_string(&doc).expect("a topology document serializes");
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Some(_) => {} // nothing folded yet
            },
            msg = socket.recv() => match msg {
                None | Some(Err(_) | Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(bytes::Bytes::default())).await.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}
