//! The topology view: sources → merge → debounce → fold, behind a `watch` channel. The
//! controller decides from it and the gateway routes from it; neither builds its own.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::contract::consul::Consul;
use crate::contract::consul_watch::{Restarts, RESTART_PROBE_EVERY};
use crate::contract::protocol::leader_key;
use crate::contract::tls::{RedisOpenError, TlsError};
use crate::fleet::events::Events;
use crate::fleet::fold::{Fold, Limits};
use crate::fleet::source::{
    consul_health, consul_kv, docker, redis_sessions, Change, SessionsUpdate, SourceKind, Stamped,
};
use crate::fleet::topology::Topology;
use crate::stages::{BackoffPolicy, StreamStages};

/// Full relist of owned containers, besides the one after each Docker event.
pub const DOCKER_RECONCILE: Duration = Duration::from_secs(5);
/// How often the fold is asked whether counts have aged out while Redis is unreachable.
const COUNT_EXPIRY_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("pipeline {pipeline}: Redis: {source}")]
    Redis {
        pipeline: String,
        #[source]
        source: RedisOpenError,
    },
    #[error("pipeline {pipeline}: Consul: {source}")]
    Consul {
        pipeline: String,
        #[source]
        source: TlsError,
    },
}

impl ViewError {
    pub fn redis(pipeline: &str) -> impl FnOnce(RedisOpenError) -> ViewError + '_ {
        move |source| ViewError::Redis {
            pipeline: pipeline.to_string(),
            source,
        }
    }

    pub fn consul(pipeline: &str) -> impl FnOnce(TlsError) -> ViewError + '_ {
        move |source| ViewError::Consul {
            pipeline: pipeline.to_string(),
            source,
        }
    }
}

/// Any source's error (each source has its own type). A named type, not a bare boxed trait
/// object, so the merged stream's closure is provably `Send` across the spawn.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct SourceError(Box<dyn std::error::Error + Send + Sync>);
type SourceStream = BoxStream<'static, Result<Change, SourceError>>;

/// One source, paced by backoff after each error, its changes wrapped by `wrap`.
fn source<T, E, S>(s: S, wrap: fn(T) -> Change) -> SourceStream
where
    S: Stream<Item = Result<T, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    T: Send + 'static,
{
    s.backoff(BackoffPolicy::default())
        .map(move |r| r.map(wrap).map_err(|e| SourceError(Box::new(e))))
        .boxed()
}

/// How changes are gathered into folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Gathered for `debounce.quiet` (at most `debounce.max_delay`): the controller decides
    /// on a settled fleet, not on every blip.
    Debounced,
    /// Every change folded as soon as it comes, with whatever else is already waiting: the
    /// gateway routes on the newest fleet (a server gone is not routed to for a second more).
    EveryChange,
}

/// Most changes folded at once when folding every change: a burst already queued.
const EVERY_CHANGE_BATCH: usize = 1024;

/// Starts the sources and the fold of one pipeline's fleet; returns the snapshot channel
/// (version 0 until the first fold) and the task that owns its only writer.
pub fn spawn(
    cfg: &PipelineConfig,
    pacing: Pacing,
    events: Events,
    shutdown: CancellationToken,
) -> Result<(watch::Receiver<Arc<Topology>>, JoinHandle<()>), ViewError> {
    let consul = Consul::connect(&cfg.consul.endpoint()).map_err(ViewError::consul(&cfg.name))?;
    let restarts = Restarts::probe(
        consul.clone(),
        format!("/v1/kv/{}", leader_key(&cfg.name)),
        RESTART_PROBE_EVERY,
        shutdown.clone(),
    );
    let redis = cfg
        .redis
        .endpoint()
        .client()
        .map_err(ViewError::redis(&cfg.name))?;
    let sessions = redis_sessions::stream(redis, &cfg.service, cfg.redis.reconcile);
    // Merged by kind, so every item says which source it came from.
    let mut sources = StreamMap::new();
    sources.insert(
        SourceKind::Health,
        source(
            consul_health::stream(
                consul.clone(),
                &cfg.service,
                cfg.consul.wait,
                restarts.clone(),
            ),
            Change::Health,
        ),
    );
    sources.insert(
        SourceKind::States,
        source(
            consul_kv::stream(consul, &cfg.service, cfg.consul.wait, restarts),
            Change::States,
        ),
    );
    sources.insert(SourceKind::Sessions, source(sessions, Change::Sessions));
    if let Some(d) = &cfg.docker {
        sources.insert(
            SourceKind::Containers,
            source(
                docker::stream(&d.socket, &cfg.name, DOCKER_RECONCILE),
                Change::Containers,
            ),
        );
    }
    let ev = events.clone();
    let changes = sources.map(move |(kind, r)| {
        let change = r.unwrap_or_else(|e| {
            ev.source_error(kind, &e);
            Change::Down(kind)
        });
        // A read of changed counts dates from its first notification, not its answer.
        let at = match &change {
            Change::Sessions(SessionsUpdate::Patch { noticed_at, .. }) => *noticed_at,
            _ => Instant::now(),
        };
        Stamped { at, change }
    });
    let batches: BoxStream<'static, Vec<Stamped>> = match pacing {
        Pacing::Debounced => changes
            .debounce(cfg.debounce.quiet, cfg.debounce.max_delay)
            .boxed(),
        Pacing::EveryChange => changes.ready_chunks(EVERY_CHANGE_BATCH).boxed(),
    };
    let limits = Limits {
        count_ttl: cfg.redis.count_ttl,
        ..Limits::from(&cfg.decide.safety)
    };
    let (mut fold, rx) = Fold::new(events, limits);
    let task = tokio::spawn(async move {
        let mut batches = std::pin::pin!(batches.take_until(shutdown.cancelled()));
        // Counts age out while the sessions source is down: looked at every so often.
        let mut expiry = tokio::time::interval(COUNT_EXPIRY_CHECK);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = batches.next() => match batch {
                    Some(batch) => { fold.apply(batch); }
                    None => break,
                },
                _ = expiry.tick() => { fold.expire(Instant::now()); }
            }
        }
    });
    Ok((rx, task))
}
