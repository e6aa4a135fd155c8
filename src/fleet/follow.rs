//! Following a controller's topology feed: a gateway with `topology_feed` set routes from
//! it instead of watching Consul and Redis itself, reconnecting with capped exponential
//! backoff and jitter and routing on the last snapshot meanwhile. The snapshot's JSON
//! document (both directions) lives here too, since the feed's server and its followers
//! must agree on it.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use metrics::gauge;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as TgMessage;
use tokio_util::sync::CancellationToken;

use crate::contract::protocol::{
    ServerDoc, TopologyDoc, BY_CONTROLLER, BY_OPERATOR, PROTOCOL_VERSION,
};
use crate::fleet::topology::{Admin, Count, Server, SourcesSynced, Topology};
use crate::stages::BackoffPolicy;
use crate::telemetry::GW_FEED_CONNECTED;

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
        missing_sources: t
            .sources
            .missing()
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
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
                cordoned_by: match s.admin {
                    Admin::Cordoned {
                        by_operator: true, ..
                    } => Some(BY_OPERATOR.to_string()),
                    _ => None,
                },
                cordoned_since_ms: match s.admin {
                    Admin::Cordoned { since_ms, .. } => Some(since_ms),
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
                    by_operator: s.cordoned_by.as_deref().is_some_and(|b| b != BY_CONTROLLER),
                },
                _ => Admin::Unknown,
            },
            sessions: s.sessions.map_or(Count::Unknown, Count::Known),
            provisioning: s.provisioning,
            starting: false,
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

/// Follows a controller's feed at `url` (from [`crate::contract::urls::watch_url`]) until `shutdown`. The channel
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
                () = shutdown.cancelled() => return,
                c = connected => c,
            };
            match stream {
                Ok(Ok((ws, _))) => {
                    gauge!(GW_FEED_CONNECTED).set(1.0);
                    tracing::info!(%url, "following the controller's topology feed");
                    let (mut sink, messages) = ws.split();
                    // Every message must come within SILENCE (the feed pings more often).
                    let mut messages =
                        std::pin::pin!(tokio_stream::StreamExt::timeout(messages, SILENCE));
                    let why = loop {
                        let next = tokio::select! {
                            () = shutdown.cancelled() => {
                                let _ = sink.close().await;
                                return;
                            }
                            n = messages.next() => n,
                        };
                        match next {
                            Some(Err(_)) => break format!("nothing heard for {SILENCE:?}"),
                            None => break "the controller closed it".to_string(),
                            Some(Ok(Err(e))) => break e.to_string(),
                            Some(Ok(Ok(TgMessage::Text(text)))) => {
                                match serde_json::from_str::<TopologyDoc>(text.as_str()) {
                                    Ok(doc) => {
                                        tx.send_replace(Arc::new(from_doc(&doc)));
                                        delays = policy.delays(); // it works: start over
                                    }
                                    Err(e) => tracing::warn!(%url, error = %e,
                                        "unreadable topology document; keeping the last snapshot"),
                                }
                            }
                            Some(Ok(Ok(TgMessage::Close(_)))) => {
                                break "the controller closed it".to_string()
                            }
                            // Pings are answered by tungstenite while the stream is read.
                            Some(Ok(Ok(_))) => {}
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
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::topology::fixtures::{fleet, server};

    #[test]
    fn a_snapshot_survives_the_round_trip_through_its_document() {
        let mut t = fleet(vec![server("a", 100, 40), server("b", 50, 0)]);
        t.version = 7;
        t.servers[1].admin = Admin::Cordoned {
            since_ms: 12,
            by_operator: true,
        };
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
}
