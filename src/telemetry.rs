//! Observability: every metric name with its description, the Prometheus exporter, tracing
//! set-up, and the named events that log and count one occurrence in one place.
//!
//! Labels are bounded: `pipeline` (from config), `source` (three values), `kind` (action
//! kinds), `result`, `state`, `outcome`. No server or session id is ever a label.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::fleet::source::SourceKind;
use crate::fleet::topology::Topology;

pub const SOURCE_EVENTS: &str = "rebalancer_source_events_total";
pub const SOURCE_ERRORS: &str = "rebalancer_source_errors_total";
pub const SOURCE_RESYNCS: &str = "rebalancer_source_resyncs_total";
pub const SOURCE_UP: &str = "rebalancer_source_up";
pub const INVALID_META: &str = "rebalancer_invalid_meta_total";
pub const INVALID_STATES: &str = "rebalancer_invalid_states_total";
pub const INVALID_COUNTS: &str = "rebalancer_invalid_counts_total";
pub const SNAPSHOT_VERSION: &str = "rebalancer_snapshot_version";
pub const SNAPSHOT_STALE: &str = "rebalancer_snapshot_stale";
pub const SERVERS: &str = "rebalancer_servers";
pub const GHOSTS: &str = "rebalancer_ghost_counts";
pub const SESSIONS: &str = "rebalancer_sessions";
pub const CAPACITY: &str = "rebalancer_capacity_sessions";
pub const UTILIZATION: &str = "rebalancer_utilization_ratio";
pub const DECISIONS: &str = "rebalancer_decisions_total";
pub const DECISION_DURATION: &str = "rebalancer_decision_duration_seconds";
pub const SHORTFALL: &str = "rebalancer_scale_shortfall_servers";
pub const ACTIONS: &str = "rebalancer_actions_total";
pub const ACTION_DURATION: &str = "rebalancer_action_duration_seconds";
pub const SHED_REQUESTED: &str = "rebalancer_sessions_shed_requested_total";
pub const EVENT_TO_ACTION: &str = "rebalancer_event_to_action_seconds";
pub const LEADER: &str = "rebalancer_leader";
pub const EPOCH: &str = "rebalancer_leader_epoch";
pub const CONTAINERS: &str = "rebalancer_containers";
pub const GW_REQUESTS: &str = "rebalancer_gateway_requests_total";
pub const GW_REQUEST_DURATION: &str = "rebalancer_gateway_request_duration_seconds";
pub const GW_WS_OPEN: &str = "rebalancer_gateway_websockets_open";
pub const GW_RETRIES: &str = "rebalancer_gateway_retries_total";
pub const GW_CIRCUIT: &str = "rebalancer_gateway_circuit_state";
pub const GW_BACKEND_UP: &str = "rebalancer_gateway_backend_up";
pub const GW_FEED_CONNECTED: &str = "rebalancer_gateway_feed_connected";
pub const GW_SERVER_CONNECTIONS: &str = "rebalancer_gateway_server_connections_total";
pub const GW_CACHE: &str = "rebalancer_gateway_cache_total";
pub const PROVISION: &str = "rebalancer_provision_seconds";

/// `(name, unit, description)` of every metric, for registration and the README.
pub const METRICS: &[(&str, Unit, &str)] = &[
    (SOURCE_EVENTS, Unit::Count, "Changes received, by source"),
    (
        SOURCE_ERRORS,
        Unit::Count,
        "Source errors (disconnects, bad answers), by source",
    ),
    (
        SOURCE_RESYNCS,
        Unit::Count,
        "Full resyncs after a source reconnected, by source",
    ),
    (
        SOURCE_UP,
        Unit::Count,
        "1 while a source is connected and synced, by source",
    ),
    (
        INVALID_META,
        Unit::Count,
        "Instances newly excluded for missing or invalid Consul meta",
    ),
    (
        INVALID_STATES,
        Unit::Count,
        "Unreadable state records newly seen in Consul KV",
    ),
    (
        INVALID_COUNTS,
        Unit::Count,
        "Session counts newly seen that are not non-negative integers",
    ),
    (
        SNAPSHOT_VERSION,
        Unit::Count,
        "Version of the latest topology snapshot",
    ),
    (
        SNAPSHOT_STALE,
        Unit::Count,
        "1 while a source is disconnected (no destructive action then)",
    ),
    (
        SERVERS,
        Unit::Count,
        "Registered servers by state: active, cordoned, failing, unknown, invalid",
    ),
    (
        GHOSTS,
        Unit::Count,
        "Session counts with no registration behind them (ignored)",
    ),
    (SESSIONS, Unit::Count, "Sessions on live servers"),
    (CAPACITY, Unit::Count, "Capacity of live, active servers"),
    (
        UTILIZATION,
        Unit::Count,
        "Overall utilization U = sessions / capacity",
    ),
    (
        DECISIONS,
        Unit::Count,
        "Decision rounds by outcome: act, idle, halted",
    ),
    (
        DECISION_DURATION,
        Unit::Seconds,
        "Time to compute one decision",
    ),
    (
        SHORTFALL,
        Unit::Count,
        "Servers needed that no scaler can start",
    ),
    (
        ACTIONS,
        Unit::Count,
        "Actions by kind and result: ok, error, dry_run, not_leader",
    ),
    (
        ACTION_DURATION,
        Unit::Seconds,
        "Time to carry out one action, retries included, by kind",
    ),
    (
        SHED_REQUESTED,
        Unit::Count,
        "Sessions servers were asked to close, by kind (shed, drain)",
    ),
    (
        EVENT_TO_ACTION,
        Unit::Seconds,
        "From the change that triggered a decision to its first action",
    ),
    (
        LEADER,
        Unit::Count,
        "1 while this process holds the pipeline's leader lock",
    ),
    (
        EPOCH,
        Unit::Count,
        "Lock index of the held leader lock (the command epoch)",
    ),
    (
        CONTAINERS,
        Unit::Count,
        "Containers this pipeline owns, by state: pending, running, stopping, stopped",
    ),
    (
        PROVISION,
        Unit::Seconds,
        "From creating a container to its server passing in Consul",
    ),
    (
        GW_REQUESTS,
        Unit::Count,
        "Gateway requests by backend and outcome: ok, ws, error, no_backend",
    ),
    (
        GW_REQUEST_DURATION,
        Unit::Seconds,
        "Gateway latency by kind: http, ws_connect",
    ),
    (
        GW_WS_OPEN,
        Unit::Count,
        "WebSocket connections the gateway relays, by backend",
    ),
    (
        GW_RETRIES,
        Unit::Count,
        "Requests and upgrades retried on another server",
    ),
    (
        GW_CIRCUIT,
        Unit::Count,
        "Circuit breaker by backend: 0 closed, 1 half-open, 2 open",
    ),
    (
        GW_BACKEND_UP,
        Unit::Count,
        "Active health by backend: 1 up, 0 down",
    ),
    (
        GW_CACHE,
        Unit::Count,
        "Static cache lookups and stores by result: hit, miss, store",
    ),
    (
        GW_SERVER_CONNECTIONS,
        Unit::Count,
        "Keep-alive connections to the servers a client connection took, by source: opened, pool",
    ),
    (
        GW_FEED_CONNECTED,
        Unit::Count,
        "1 while the gateway follows the controller's topology feed, 0 while it is away",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot start the metrics endpoint on {addr}: {source}")]
    Exporter {
        addr: SocketAddr,
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn describe() {
    for (name, unit, help) in METRICS {
        metrics::describe_counter!(*name, *unit, *help);
    }
}

/// Starts the Prometheus endpoint (`/metrics` and any path) on `addr` and describes every
/// metric. Call once per process, inside the runtime.
pub fn install_exporter(addr: SocketAddr) -> Result<(), TelemetryError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
        .and_then(|b| b.install())
        .map_err(|source| TelemetryError::Exporter { addr, source })?;
    describe();
    Ok(())
}

/// Installs the Prometheus recorder without an endpoint of its own: the controller serves
/// `/metrics` itself, beside its topology feed (`feed::serve`).
pub fn install_recorder(addr: SocketAddr) -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
        .and_then(|b| b.install_recorder())
        .map_err(|source| TelemetryError::Exporter { addr, source })?;
    describe();
    Ok(handle)
}

/// Logs as text (default) or JSON, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// The named events of one pipeline.
#[derive(Clone, Debug)]
pub struct Events {
    pub(crate) pipeline: Arc<str>,
}

impl Events {
    pub fn new(pipeline: &str) -> Events {
        Events {
            pipeline: pipeline.into(),
        }
    }

    pub(crate) fn p(&self) -> String {
        self.pipeline.to_string()
    }

    pub fn source_change(&self, kind: SourceKind, resync_after_error: bool) {
        counter!(SOURCE_EVENTS, "pipeline" => self.p(), "source" => kind.as_str()).increment(1);
        gauge!(SOURCE_UP, "pipeline" => self.p(), "source" => kind.as_str()).set(1.0);
        if resync_after_error {
            counter!(SOURCE_RESYNCS, "pipeline" => self.p(), "source" => kind.as_str())
                .increment(1);
            tracing::info!(pipeline = %self.pipeline, source = kind.as_str(), "source reconnected and resynced");
        }
    }

    pub fn source_error(&self, kind: SourceKind, error: &dyn std::error::Error) {
        counter!(SOURCE_ERRORS, "pipeline" => self.p(), "source" => kind.as_str()).increment(1);
        gauge!(SOURCE_UP, "pipeline" => self.p(), "source" => kind.as_str()).set(0.0);
        tracing::warn!(pipeline = %self.pipeline, source = kind.as_str(), error = %error, "source failed; retrying with backoff");
    }

    pub fn invalid_meta(&self, server: &str, why: &str) {
        counter!(INVALID_META, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, why, "instance excluded: invalid Consul meta");
    }

    pub fn invalid_state(&self, server: &str, why: &str) {
        counter!(INVALID_STATES, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, why, "unreadable state record; server treated as unknown");
    }

    pub fn invalid_count(&self, server: &str, raw: &str) {
        counter!(INVALID_COUNTS, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, value = raw, "session count is not a non-negative integer; treated as unknown");
    }

    pub fn snapshot(&self, t: &Topology) {
        let p = self.p();
        let totals = t.totals();
        gauge!(SNAPSHOT_VERSION, "pipeline" => p.clone()).set(t.version as f64);
        gauge!(SNAPSHOT_STALE, "pipeline" => p.clone()).set(if t.is_stale() { 1.0 } else { 0.0 });
        for (state, n) in [
            ("active", totals.active),
            ("cordoned", totals.cordoned),
            ("failing", totals.failing),
            ("unknown", totals.unknown),
            ("invalid", t.invalid_instances),
        ] {
            gauge!(SERVERS, "pipeline" => p.clone(), "state" => state).set(f64::from(n));
        }
        gauge!(GHOSTS, "pipeline" => p.clone()).set(f64::from(t.ghosts));
        gauge!(SESSIONS, "pipeline" => p.clone()).set(totals.sessions as f64);
        gauge!(CAPACITY, "pipeline" => p.clone()).set(totals.capacity as f64);
        let u = totals.utilization();
        gauge!(UTILIZATION, "pipeline" => p).set(if u.is_finite() { u } else { -1.0 });
        tracing::debug!(pipeline = %self.pipeline, version = t.version, servers = t.servers.len(),
            sessions = totals.sessions, capacity = totals.capacity, stale = t.is_stale(), "snapshot");
    }

    pub fn containers(&self, t: &Topology) {
        let running = t
            .containers
            .iter()
            .filter(|c| {
                c.state == crate::fleet::topology::ContainerState::Running
                    && t.get(&c.server).is_some_and(|s| s.passing)
            })
            .count();
        let stopped = t
            .containers
            .iter()
            .filter(|c| c.state == crate::fleet::topology::ContainerState::Stopped)
            .count();
        gauge!(CONTAINERS, "pipeline" => self.p(), "state" => "pending").set(f64::from(t.pending));
        gauge!(CONTAINERS, "pipeline" => self.p(), "state" => "running").set(running as f64);
        gauge!(CONTAINERS, "pipeline" => self.p(), "state" => "stopped").set(stopped as f64);
    }

    pub fn provisioned(&self, server: &str, took: Duration) {
        histogram!(PROVISION, "pipeline" => self.p()).record(took.as_secs_f64());
        tracing::info!(pipeline = %self.pipeline, server, seconds = took.as_secs(), "container's server passing");
    }
}
