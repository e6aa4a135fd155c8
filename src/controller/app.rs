//! The controller's composition root: from validated pipeline configs to running pipelines.
//! It builds the clients (Redis, Consul, the Docker scaler), the actuator, the metrics and
//! feed server, and for each pipeline its topology view, its leader election and its
//! decision loop; then it waits for `shutdown` and gives in-flight work a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::contract::consul::Consul;
use crate::contract::protocol::leader_key;
use crate::contract::signing::{CommandKeys, KeyError, KEYS_ENV, KEYS_FILE_ENV};
use crate::contract::tls::{RedisOpenError, TlsError};
use crate::controller::act::{docker::DockerScaler, Actuator, LiveActuator, Scaler};
use crate::controller::{acks, feed, leader, pipeline};
use crate::fleet::events::Events;
use crate::fleet::view::{self, ViewError};
use crate::telemetry::TelemetryError;

/// How long in-flight work may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Metrics(#[from] TelemetryError),
    #[error("cannot listen on {addr} (metrics.listen): {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Redis {
        file: String,
        #[source]
        source: RedisOpenError,
    },
    #[error("{file}: Consul: {source}")]
    Consul {
        file: String,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("command keys: {0}")]
    Keys(#[from] KeyError),
    #[error("a pipeline task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("pipelines did not stop within {0:?}")]
    StopTimeout(Duration),
}

impl AppError {
    /// A configuration the services refuse, as opposed to a resource that cannot be had.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::Redis { .. }
                | AppError::Consul { .. }
                | AppError::View(_)
                | AppError::Keys(_)
        )
    }
}

/// The real actuator of one pipeline: Redis for commands, Consul for states, Docker when
/// the pipeline scales with it.
fn actuator(
    cfg: &PipelineConfig,
    keys: Option<&CommandKeys>,
) -> Result<Arc<dyn Actuator>, AppError> {
    let file = || cfg.file.display().to_string();
    let redis = cfg
        .redis
        .endpoint()
        .client()
        .map_err(|source| AppError::Redis {
            file: file(),
            source,
        })?;
    let consul = Consul::connect(&cfg.consul.endpoint()).map_err(|source| AppError::Consul {
        file: file(),
        source,
    })?;
    let scaler = cfg
        .docker
        .clone()
        .map(|d| Arc::new(DockerScaler::new(d, &cfg.name, &cfg.service)) as Arc<dyn Scaler>);
    Ok(Arc::new(LiveActuator::new(
        &cfg.service,
        cfg.command_ttl,
        redis,
        consul,
        scaler,
        keys.cloned(),
    )))
}

/// Starts one pipeline with `actuator`: its topology view (registered on `feeds` when
/// given), its leader election and its decision loop, all stopping on `shutdown`. The task
/// ends once all three have.
pub fn spawn_pipeline(
    cfg: PipelineConfig,
    actuator: Arc<dyn Actuator>,
    feeds: Option<&feed::Registry>,
    shutdown: &CancellationToken,
) -> Result<JoinHandle<()>, ViewError> {
    let events = Events::new(&cfg.name);
    let (snapshots, fold) = view::spawn(
        &cfg,
        view::Pacing::Debounced,
        events.clone(),
        shutdown.clone(),
    )?;
    if let Some(feeds) = feeds {
        feeds.add(feed::Feed {
            pipeline: cfg.name.clone(),
            service: cfg.service.clone(),
            snapshots: snapshots.clone(),
        });
    }
    // The election and the decision loop stand or fall together: if either ends (or
    // panics), the other is stopped, so no controller renews a lock with nobody acting.
    let together = shutdown.child_token();
    let (lease_tx, leadership) = tokio::sync::watch::channel(None);
    let consul = Consul::connect(&cfg.consul.endpoint()).map_err(ViewError::consul(&cfg.name))?;
    let election = tokio::spawn(leader::run(
        consul.clone(),
        cfg.name.clone(),
        cfg.leader_session_ttl,
        events.clone(),
        lease_tx,
        together.clone(),
    ));
    let redis = cfg
        .redis
        .endpoint()
        .client()
        .map_err(ViewError::redis(&cfg.name))?;
    let inputs = pipeline::Inputs {
        acks: acks::spawn(redis, &cfg.service, together.clone()),
        snapshots,
        leadership,
        lock: Arc::new(leader::ConsulLockCheck {
            consul,
            key: leader_key(&cfg.name),
        }),
        actuator,
    };
    let name = cfg.name.clone();
    let decisions = tokio::spawn(pipeline::run(cfg, inputs, events, together.clone()));
    Ok(tokio::spawn(async move {
        let (mut election, mut decisions) = (election, decisions);
        // Whichever ends first; the other is awaited once stopped (a finished JoinHandle
        // must not be polled again).
        let (what, ended, other) = tokio::select! {
            r = &mut election => ("election", r, decisions),
            r = &mut decisions => ("decision loop", r, election),
        };
        if !together.is_cancelled() {
            match ended {
                Err(e) => {
                    tracing::error!(pipeline = %name, error = %e, "the {what} failed; stopping the pipeline");
                }
                Ok(()) => {
                    tracing::error!(pipeline = %name, "the {what} ended; stopping the pipeline");
                }
            }
        }
        together.cancel();
        let _ = other.await;
        let _ = fold.await;
    }))
}

/// Runs every pipeline in `cfgs` until `shutdown`, serving metrics and the topology feed on
/// the first pipeline's `metrics.listen`.
pub async fn run(cfgs: Vec<PipelineConfig>, shutdown: CancellationToken) -> Result<(), AppError> {
    // One exporter per process: the first pipeline's address serves every pipeline's metrics,
    // each labelled with its pipeline name.
    let listen = cfgs[0].metrics_listen;
    for c in cfgs.iter().skip(1).filter(|c| c.metrics_listen != listen) {
        tracing::warn!(file = %c.file.display(), listen = %c.metrics_listen, using = %listen,
            "metrics.listen differs from the first pipeline's; one endpoint serves all pipelines");
    }
    let metrics = crate::telemetry::install_recorder(listen)?;
    let keys = CommandKeys::from_env(&|k| std::env::var(k).ok())?;
    if let Some(k) = &keys {
        tracing::info!(signing_key = k.ids()[0], verify = ?k.ids(), "commands are signed");
    } else {
        tracing::warn!(
            "{KEYS_ENV} and {KEYS_FILE_ENV} are not set: commands are unsigned, so anyone who \
             can PUBLISH on the commands channel can make servers shed"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: listen,
            source,
        })?;
    // Pipelines stop on `stop`; the feed server stays up until they have.
    let stop = CancellationToken::new();
    let feeds = feed::Registry::default();
    tokio::spawn(feed::serve(listener, metrics, feeds.clone(), stop.clone()));
    tracing::info!(%listen, "metrics on http://{listen}/metrics, topology on http://{listen}/v1/topology");

    let mut tasks = Vec::new();
    for cfg in cfgs {
        let actuator = actuator(&cfg, keys.as_ref())?;
        tasks.push(spawn_pipeline(cfg, actuator, Some(&feeds), &stop)?);
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    stop.cancel();
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(SHUTDOWN_GRACE, all)
        .await
        .map_err(|_| AppError::StopTimeout(SHUTDOWN_GRACE))?;
    for r in results {
        r?;
    }
    Ok(())
}
