//! One controller pipeline, composed in one place:
//! sources → merge → debounce → fold (snapshot) → decide → act.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::act::{ActContext, Actuator};
use crate::config::PipelineConfig;
use crate::consul::Consul;
use crate::decide::{decide, History};
use crate::fold::Fold;
use crate::source::{
    consul_health, consul_kv, docker, redis_sessions, Change, SourceKind, Stamped,
};
use crate::stages::{BackoffPolicy, StreamStages};
use crate::telemetry::Events;
use crate::topology::Topology;

/// How often decisions are re-made without a new snapshot: conditions that must hold for a
/// while (scale-in, reap, round intervals) are judged on time as well as on change.
pub const DECISION_TICK: Duration = Duration::from_secs(1);
/// Full relist of owned containers, besides the one after each Docker event.
pub const DOCKER_RECONCILE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
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

/// Starts the sources and the fold; returns the snapshot channel. Reused by every role that
/// needs the live fleet (controller, gateway).
pub fn spawn_topology(
    cfg: &PipelineConfig,
    events: Events,
    shutdown: CancellationToken,
) -> Result<(watch::Receiver<Arc<Topology>>, JoinHandle<()>), PipelineError> {
    let consul = Consul::new(&cfg.consul.address, cfg.consul.token.clone());
    let sessions = redis_sessions::stream(&cfg.redis.url, &cfg.service, cfg.redis.reconcile)
        .map_err(|source| PipelineError::RedisUrl {
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

/// Runs the controller for one pipeline until `shutdown`; its snapshots join `feeds` (the
/// topology feed) when given.
pub async fn run(
    cfg: PipelineConfig,
    actuator: Arc<dyn Actuator>,
    shutdown: CancellationToken,
    feeds: Option<crate::feed::Registry>,
) -> Result<(), PipelineError> {
    let events = Events::new(&cfg.name);
    let mut decide_cfg = cfg.decide.clone();
    (decide_cfg.scale.can_start, decide_cfg.scale.can_reap) = actuator.can_scale();

    let (mut snapshots, fold_task) = spawn_topology(&cfg, events.clone(), shutdown.clone())?;
    if let Some(feeds) = feeds {
        feeds.add(crate::feed::Feed {
            pipeline: cfg.name.clone(),
            service: cfg.service.clone(),
            snapshots: snapshots.clone(),
        });
    }
    let (epoch_tx, epoch_rx) = watch::channel(None);
    let leader_task = tokio::spawn(crate::leader::run(
        Consul::new(&cfg.consul.address, cfg.consul.token.clone()),
        cfg.name.clone(),
        cfg.leader_session_ttl,
        events.clone(),
        epoch_tx,
        shutdown.clone(),
    ));
    tracing::info!(pipeline = %cfg.name, service = %cfg.service, dry_run = cfg.dry_run, file = %cfg.file.display(), "pipeline started");

    let mut history = History::default();
    let mut tick = tokio::time::interval(DECISION_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report: Option<(Option<String>, Vec<String>)> = None;
    let mut measured_version = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = snapshots.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        let t = snapshots.borrow_and_update().clone();
        if t.version == 0 {
            continue; // nothing folded yet
        }
        let now = Instant::now();
        history.observe(&t, &decide_cfg, now);
        let started = std::time::Instant::now();
        let plan = decide(&t, &decide_cfg, now, &history);
        let report = (plan.halted.clone(), plan.withheld.clone());
        let changed = last_report.as_ref() != Some(&report);
        events.decision(&plan, started.elapsed(), t.version, changed);
        last_report = Some(report);
        if plan.is_empty() {
            continue;
        }
        let epoch = *epoch_rx.borrow();
        let result = match (cfg.dry_run, epoch) {
            (true, _) => "dry_run",
            (false, None) => "not_leader",
            (false, Some(_)) => "ok",
        };
        if result != "ok" {
            for a in &plan.actions {
                events.action(a, result, Duration::ZERO, t.version, None);
            }
            if cfg.dry_run {
                history.record(&plan, now); // decide as if it had acted, so the log reads true
            }
            continue;
        }
        let ctx = ActContext {
            epoch: epoch.unwrap_or(0),
            version: t.version,
        };
        // Remember the plan before acting: a slow or failed action must not be repeated
        // before its round interval or cooldown anyway.
        history.record(&plan, now);
        let first_action_at = std::sync::Mutex::new(None::<Instant>);
        let results = futures::future::join_all(plan.actions.iter().map(|a| {
            let actuator = actuator.clone();
            let events = events.clone();
            let first = &first_action_at;
            async move {
                let t0 = Instant::now();
                let r = actuator.execute(a, ctx).await;
                let done = Instant::now();
                let mut f = first.lock().expect("not poisoned");
                *f = Some(f.map_or(done, |x| x.min(done)));
                drop(f);
                let ok = r.is_ok();
                match r {
                    Ok(()) => events.action(a, "ok", done - t0, ctx.version, None),
                    Err(e) => {
                        events.action(a, "error", done - t0, ctx.version, Some(&e.to_string()))
                    }
                }
                (a, ok)
            }
        }))
        .await;
        if results
            .iter()
            .any(|(a, ok)| !ok && matches!(a.kind, crate::decide::ActionKind::Start { .. }))
        {
            history.failed(Instant::now()); // the engine refused: back off, do not wait on it
        }
        if let (Some(changed_at), Some(acted)) = (
            t.changed_at,
            first_action_at.into_inner().expect("not poisoned"),
        ) {
            if t.version != measured_version {
                measured_version = t.version;
                events.event_to_action(acted.saturating_duration_since(changed_at));
            }
        }
    }
    let _ = fold_task.await;
    let _ = leader_task.await;
    tracing::info!(pipeline = %cfg.name, "pipeline stopped");
    Ok(())
}
