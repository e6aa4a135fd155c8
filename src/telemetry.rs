//! Observability: every metric name with its kind, unit and description, the Prometheus
//! exporter and tracing set-up. The named events that log and count one occurrence in one
//! place are [`crate::fleet::events`] (sources, snapshots) and `controller/events.rs`
//! (decisions, actions, leadership).
//!
//! Labels are bounded: `pipeline` (from config), `source` (four values), `kind` (action
//! kinds), `result`, `state`, `outcome`. No session id is ever a label, and the controller's
//! metrics carry no server id. The gateway's per-backend metrics (`rebalancer_gateway_*`)
//! carry `backend`, a server id: bounded by the servers the gateway has seen (at most
//! `scale.max_servers` at a time); a server that leaves keeps its series, at 0.

use std::net::SocketAddr;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SOURCE_EVENTS: &str = "rebalancer_source_events_total";
pub const SOURCE_ERRORS: &str = "rebalancer_source_errors_total";
pub const SOURCE_RESYNCS: &str = "rebalancer_source_resyncs_total";
pub const SOURCE_UP: &str = "rebalancer_source_up";
pub const SOURCE_LAG: &str = "rebalancer_source_lag_seconds";
pub const NOTIFICATIONS: &str = "rebalancer_source_notifications_total";
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
pub const UNREAPED: &str = "rebalancer_scale_unreaped_servers";
pub const ACTIONS: &str = "rebalancer_actions_total";
pub const ACTION_DURATION: &str = "rebalancer_action_duration_seconds";
pub const SHED_REQUESTED: &str = "rebalancer_sessions_shed_requested_total";
pub const UNHEARD: &str = "rebalancer_commands_unheard_total";
pub const SHED_ACKED: &str = "rebalancer_sessions_shed_acked_total";
pub const REFUSED: &str = "rebalancer_commands_refused_total";
pub const UNACKED: &str = "rebalancer_commands_unacked_total";
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
pub const GW_CACHE_BYTES: &str = "rebalancer_gateway_cache_bytes";
pub const GW_LIMITED: &str = "rebalancer_gateway_limited_total";
pub const GW_CLIENT_CONNECTIONS: &str = "rebalancer_gateway_client_connections";
pub const GW_TLS_RELOADS: &str = "rebalancer_gateway_tls_reloads_total";
pub const GW_TLS_HANDSHAKES: &str = "rebalancer_gateway_tls_handshake_errors_total";
pub const PROVISION: &str = "rebalancer_provision_seconds";
pub const RUNTIME_TASKS: &str = "rebalancer_runtime_tasks";

/// What a metric is, so it is described as what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `(name, kind, unit, description)` of every metric, for registration and the README.
pub const METRICS: &[(&str, Kind, Unit, &str)] = &[
    (
        RUNTIME_TASKS,
        Kind::Gauge,
        Unit::Count,
        "Tasks alive in the controller's runtime, sampled at each scrape",
    ),
    (
        SOURCE_EVENTS,
        Kind::Counter,
        Unit::Count,
        "Changes received, by source (for redis-sessions: reads of the changed counts)",
    ),
    (
        NOTIFICATIONS,
        Kind::Counter,
        Unit::Count,
        "Keyspace notifications of counts, coalesced into reads (a key changed twice before it is read is read once)",
    ),
    (
        SOURCE_LAG,
        Kind::Gauge,
        Unit::Seconds,
        "From a source's oldest change in a batch (for counts: its first notification) to the fold of that batch, by source",
    ),
    (
        SOURCE_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Source errors (disconnects, bad answers), by source",
    ),
    (
        SOURCE_RESYNCS,
        Kind::Counter,
        Unit::Count,
        "Full resyncs after a source reconnected, by source",
    ),
    (
        SOURCE_UP,
        Kind::Gauge,
        Unit::Count,
        "1 while a source is connected and synced, by source",
    ),
    (
        INVALID_META,
        Kind::Counter,
        Unit::Count,
        "Instances newly excluded for missing or invalid Consul meta",
    ),
    (
        INVALID_STATES,
        Kind::Counter,
        Unit::Count,
        "Unreadable state records newly seen in Consul KV",
    ),
    (
        INVALID_COUNTS,
        Kind::Counter,
        Unit::Count,
        "Session counts newly seen that are not non-negative integers",
    ),
    (
        SNAPSHOT_VERSION,
        Kind::Gauge,
        Unit::Count,
        "Version of the latest topology snapshot",
    ),
    (
        SNAPSHOT_STALE,
        Kind::Gauge,
        Unit::Count,
        "1 while a source is disconnected (no destructive action then)",
    ),
    (
        SERVERS,
        Kind::Gauge,
        Unit::Count,
        "Registered servers by state: active, cordoned, failing, unknown, invalid",
    ),
    (
        GHOSTS,
        Kind::Gauge,
        Unit::Count,
        "Session counts with no registration behind them (ignored)",
    ),
    (
        SESSIONS,
        Kind::Gauge,
        Unit::Count,
        "Sessions on live servers",
    ),
    (
        CAPACITY,
        Kind::Gauge,
        Unit::Count,
        "Capacity of live, active servers",
    ),
    (
        UTILIZATION,
        Kind::Gauge,
        Unit::Count,
        "Overall utilization U = sessions / capacity",
    ),
    (
        DECISIONS,
        Kind::Counter,
        Unit::Count,
        "Decision rounds by outcome: act, idle, halted",
    ),
    (
        DECISION_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Time to compute one decision",
    ),
    (
        SHORTFALL,
        Kind::Gauge,
        Unit::Count,
        "Servers needed that no scaler can start",
    ),
    (
        UNREAPED,
        Kind::Gauge,
        Unit::Count,
        "Cordoned, empty servers past reap_after that no scaler can stop",
    ),
    (
        ACTIONS,
        Kind::Counter,
        Unit::Count,
        "Actions by kind and result: ok, error, dry_run, not_leader",
    ),
    (
        ACTION_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Time to carry out one action, retries included, by kind",
    ),
    (
        SHED_REQUESTED,
        Kind::Counter,
        Unit::Count,
        "Sessions servers were asked to close, by kind (shed, drain)",
    ),
    (
        UNHEARD,
        Kind::Counter,
        Unit::Count,
        "Shed and drain commands published while no server was subscribed (PUBLISH answered 0)",
    ),
    (
        SHED_ACKED,
        Kind::Counter,
        Unit::Count,
        "Sessions the servers closed on this controller's commands, as acked",
    ),
    (
        REFUSED,
        Kind::Counter,
        Unit::Count,
        "This controller's commands refused by their server, by reason (stale_epoch, expired, unknown_version)",
    ),
    (
        UNACKED,
        Kind::Counter,
        Unit::Count,
        "This controller's commands with no ack by their expiry plus rebalance.in_transit",
    ),
    (
        EVENT_TO_ACTION,
        Kind::Histogram,
        Unit::Seconds,
        "From the change that triggered a decision to its first action",
    ),
    (
        LEADER,
        Kind::Gauge,
        Unit::Count,
        "1 while this process holds the pipeline's leader lock",
    ),
    (
        EPOCH,
        Kind::Gauge,
        Unit::Count,
        "Lock index of the held leader lock (the command epoch)",
    ),
    (
        CONTAINERS,
        Kind::Gauge,
        Unit::Count,
        "Containers this pipeline owns, by state: pending, running, stopping, stopped",
    ),
    (
        PROVISION,
        Kind::Histogram,
        Unit::Seconds,
        "From creating a container to its server passing in Consul",
    ),
    (
        GW_REQUESTS,
        Kind::Counter,
        Unit::Count,
        "Gateway requests by backend and outcome: ok, ws, error, no_backend",
    ),
    (
        GW_REQUEST_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Gateway latency by kind: http, ws_connect",
    ),
    (
        GW_WS_OPEN,
        Kind::Gauge,
        Unit::Count,
        "WebSocket connections the gateway relays, by backend",
    ),
    (
        GW_RETRIES,
        Kind::Counter,
        Unit::Count,
        "Requests and upgrades retried on another server",
    ),
    (
        GW_CIRCUIT,
        Kind::Gauge,
        Unit::Count,
        "Circuit breaker by backend: 0 closed, 1 half-open, 2 open",
    ),
    (
        GW_BACKEND_UP,
        Kind::Gauge,
        Unit::Count,
        "Active health by backend: 1 up, 0 down",
    ),
    (
        GW_CACHE,
        Kind::Counter,
        Unit::Count,
        "Static cache lookups and stores by result: hit, miss, store",
    ),
    (
        GW_SERVER_CONNECTIONS,
        Kind::Counter,
        Unit::Count,
        "Keep-alive connections to the servers a client connection took, by source: opened, pool",
    ),
    (
        GW_CACHE_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        "Bytes the static cache holds, as its entries weigh against cache_max_bytes",
    ),
    (
        GW_LIMITED,
        Kind::Counter,
        Unit::Count,
        "Connections, requests and WebSocket sessions a [gateway] limit stopped, by limit",
    ),
    (
        GW_CLIENT_CONNECTIONS,
        Kind::Gauge,
        Unit::Count,
        "Client connections the gateway holds open",
    ),
    (
        GW_TLS_RELOADS,
        Kind::Counter,
        Unit::Count,
        "Reloads of the TLS certificate after its files changed, by result (ok, error)",
    ),
    (
        GW_TLS_HANDSHAKES,
        Kind::Counter,
        Unit::Count,
        "Client TLS handshakes that failed or timed out (header_timeout)",
    ),
    (
        GW_FEED_CONNECTED,
        Kind::Gauge,
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
    for (name, kind, unit, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *unit, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *unit, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *unit, *help),
        }
    }
}

/// Installs the Prometheus recorder without an endpoint of its own: the controller serves
/// `/metrics` itself, beside its topology feed (`feed::serve`), and the gateway beside its
/// per-backend series. Call once per process.
pub fn install_recorder(addr: SocketAddr) -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
        .and_then(metrics_exporter_prometheus::PrometheusBuilder::install_recorder)
        .map_err(|source| TelemetryError::Exporter { addr, source })?;
    describe();
    Ok(handle)
}

/// Drains the recorder's histograms every 5 s until `stop` (an exporter with its own
/// listener does this itself; a role serving `/metrics` itself needs it).
pub fn spawn_upkeep(
    recorder: PrometheusHandle,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => recorder.run_upkeep(),
            }
        }
    })
}

/// Logs as text (default) or JSON, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_metric_is_described_as_what_its_name_says_it_is() {
        for (name, kind, unit, _) in METRICS {
            assert_eq!(
                *kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
            if *kind == Kind::Histogram {
                assert!(name.ends_with("_seconds"), "{name}");
                assert_eq!(*unit, Unit::Seconds, "{name}");
            }
        }
    }
}
