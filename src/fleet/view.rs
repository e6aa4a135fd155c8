//! The topology view: sources → merge → debounce → fold, behind a `watch` channel. The
//! controller decides from it and the gateway routes from it; neither builds its own.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::contract::consul::Consul;
use crate::fleet::fold::Fold;
use crate::fleet::source::{
    consul_health, consul_kv, docker, redis_sessions, Change, SourceKind, Stamped,
};
use crate::fleet::topology::Topology;
use crate::stages::{BackoffPolicy, StreamStages};
use crate::telemetry::Events;

/// Full relist of owned containers, besides the one after each Docker event.
pub const DOCKER_RECONCILE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("pipeline {pipeline}: invalid Redis URL: {source}")]
    RedisUrl {
        pipeline: String,
        #[source]
        source: redis::RedisError,
    },
}

type SourceError = Box<dyn std::error::Error + Send + Sync>;
type SourceStream = BoxStream<'static, Result<Change, (SourceKind, SourceError)>>;

fn source<T, E, S>(kind: SourceKind, s: S, wrap: fn(T) -> Change) -> SourceStream
where
    S: futures::Stream<Item = Result<T, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    T: Send + 'static,
{
    Box::pin(s)
        .backoff(BackoffPolicy::default())
        .map(move |r| r.map(wrap).map_err(|e| (kind, Box::new(e) as SourceError)))
        .boxed()
}

/// Starts the sources and the fold of one pipeline's fleet; returns the snapshot channel
/// (version 0 until the first fold) and the task that owns its only writer.
pub fn spawn(
    cfg: &PipelineConfig,
    events: Events,
    shutdown: CancellationToken,
) -> Result<(watch::Receiver<Arc<Topology>>, JoinHandle<()>), ViewError> {
    let consul = Consul::new(&cfg.consul.address, cfg.consul.token.clone());
    let sessions = redis_sessions::stream(&cfg.redis.url, &cfg.service, cfg.redis.reconcile)
        .map_err(|source| ViewError::RedisUrl {
            pipeline: cfg.name.clone(),
            source,
        })?;
    let mut sources = vec![
        source(
            SourceKind::Health,
            consul_health::stream(consul.clone(), &cfg.service, cfg.consul.wait),
            Change::Health,
        ),
        source(
            SourceKind::States,
            consul_kv::stream(consul, &cfg.service, cfg.consul.wait),
            Change::States,
        ),
        source(SourceKind::Sessions, sessions, Change::Sessions),
    ];
    if let Some(d) = &cfg.docker {
        sources.push(source(
            SourceKind::Containers,
            docker::stream(&d.socket, &cfg.name, DOCKER_RECONCILE),
            Change::Containers,
        ));
    }
    let ev = events.clone();
    let mut batches = stream::select_all(sources)
        .map(move |r: Result<Change, (SourceKind, SourceError)>| {
            let change = match r {
                Ok(c) => c,
                Err((kind, e)) => {
                    ev.source_error(kind, &*e);
                    Change::Down(kind)
                }
            };
            Stamped {
                at: Instant::now(),
                change,
            }
        })
        // Erase the closure's type: rustc cannot prove its Send-ness across the spawn otherwise.
        .boxed()
        .debounce(cfg.debounce.quiet, cfg.debounce.max_delay);
    let (mut fold, rx) = Fold::new(events);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = batches.next() => match batch {
                    Some(batch) => { fold.apply(batch); }
                    None => break,
                },
            }
        }
    });
    Ok((rx, task))
}
