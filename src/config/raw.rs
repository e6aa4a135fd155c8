//! The pipeline file as written: serde structs with the documented defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPipeline {
    pub name: String,
    pub service: String,
    pub dry_run: bool,
    pub consul: RawConsul,
    pub redis: RawRedis,
    pub debounce: RawDebounce,
    pub rebalance: RawRebalance,
    pub scale: RawScale,
    pub safety: RawSafety,
    pub leader: RawLeader,
    pub metrics: RawMetrics,
    /// Settings of `rebalancer gateway`; absent: the defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<RawGateway>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    pub listen: String,
    pub metrics_listen: String,
    /// Path of the active health check on every server.
    pub health_path: String,
    pub health_interval: String,
    /// Checks passed in a row to bring a server back; failed to take it out.
    pub rise: i64,
    pub fall: i64,
    pub connect_timeout: String,
    pub request_timeout: String,
    /// A client's keep-alive connection that sends no request for this long is closed.
    pub idle_timeout: String,
    /// Consecutive failures that open a server's circuit breaker, and for how long.
    pub breaker_failures: i64,
    pub breaker_open: String,
    /// Other servers tried after a connect failure (idempotent requests and upgrades).
    pub retries: i64,
    /// Retries allowed as a share of requests (plus 10 spare).
    pub retry_budget: f64,
    /// A server that just joined takes a growing share of new connections over this.
    pub slow_start: String,
    /// Connections routed to a server count toward it this long, until its report shows them.
    pub reservation_ttl: String,
    /// Path prefixes whose GET responses are cached.
    pub cache_paths: Vec<String>,
    pub cache_ttl: String,
    /// Cached responses kept at most.
    pub cache_capacity: i64,
    /// Use this port for every server instead of the one registered in Consul.
    pub target_port: i64,
    /// Request-level least-connections across gateway replicas, through Redis.
    pub shared_accounting: bool,
    /// Longest wait on Redis for the shared accounting.
    pub redis_timeout: String,
    /// The controller's feed (`http://host:port`, its metrics.listen) to route from, instead
    /// of watching Consul and Redis; empty: watch them.
    pub topology_feed: String,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            listen: "127.0.0.1:8080".into(),
            metrics_listen: "127.0.0.1:9466".into(),
            health_path: "/health".into(),
            health_interval: "1s".into(),
            rise: 2,
            fall: 2,
            connect_timeout: "2s".into(),
            request_timeout: "30s".into(),
            idle_timeout: "60s".into(),
            breaker_failures: 5,
            breaker_open: "10s".into(),
            retries: 2,
            retry_budget: 0.2,
            slow_start: "10s".into(),
            reservation_ttl: "2s".into(),
            cache_paths: vec!["/static/".into()],
            cache_ttl: "60s".into(),
            cache_capacity: 1000,
            target_port: 0,
            shared_accounting: false,
            redis_timeout: "50ms".into(),
            topology_feed: String::new(),
        }
    }
}

impl Default for RawPipeline {
    fn default() -> Self {
        RawPipeline {
            name: "ws".into(),
            service: "ws".into(),
            dry_run: false,
            consul: RawConsul::default(),
            redis: RawRedis::default(),
            debounce: RawDebounce::default(),
            rebalance: RawRebalance::default(),
            scale: RawScale::default(),
            safety: RawSafety::default(),
            leader: RawLeader::default(),
            metrics: RawMetrics::default(),
            gateway: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsul {
    pub address: String,
    /// ACL token sent as `X-Consul-Token` (empty: none).
    pub token: String,
    /// How long one blocking query may wait for a change.
    pub wait: String,
}

impl Default for RawConsul {
    fn default() -> Self {
        RawConsul {
            address: "http://127.0.0.1:8500".into(),
            token: String::new(),
            wait: "5m".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: String,
    /// Full SCAN + MGET resync period, on top of the one after every reconnect.
    pub reconcile: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: "redis://127.0.0.1:6379/0".into(),
            reconcile: "30s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDebounce {
    pub quiet: String,
    pub max_delay: String,
}

impl Default for RawDebounce {
    fn default() -> Self {
        RawDebounce {
            quiet: "200ms".into(),
            max_delay: "1s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRebalance {
    pub enabled: bool,
    pub tolerance: f64,
    pub shed_fraction: f64,
    pub min_shed: i64,
    pub max_shed: i64,
    pub round_interval: String,
    /// Sessions per round closed on a cordoned server.
    pub drain_rate: i64,
    /// Fraction of the fleet's live sessions that may be shed or drained per minute.
    pub disruption_budget: f64,
    /// How long a command stays valid after it is issued.
    pub command_ttl: String,
}

impl Default for RawRebalance {
    fn default() -> Self {
        RawRebalance {
            enabled: true,
            tolerance: 0.10,
            shed_fraction: 1.0,
            min_shed: 1,
            max_shed: 1000,
            round_interval: "15s".into(),
            drain_rate: 100,
            disruption_budget: 0.5,
            command_ttl: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawScale {
    pub enabled: bool,
    pub scale_out_at: f64,
    pub scale_in_at: f64,
    pub target_utilization: f64,
    pub min_servers: i64,
    pub max_servers: i64,
    pub scale_in_after: String,
    pub cooldown: String,
    pub reap_after: String,
    /// Most servers reactivated, started, cordoned or reaped in one round.
    pub max_per_round: i64,
    /// Container scaling; absent means none (reactivation and cordon still work).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<RawDocker>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDocker {
    /// The Docker engine's socket.
    pub host: String,
    pub image: String,
    /// Command of the new containers; `{id}` and `{port}` are replaced.
    pub command: Vec<String>,
    /// Environment of the new containers; `{id}` and `{port}` are replaced in values.
    pub env: BTreeMap<String, String>,
    /// `"host"` or the name of a Docker network.
    pub network_mode: String,
    /// Ports handed to new servers, e.g. `"20000-20999"`.
    pub port_range: String,
    /// Extra labels (the ownership labels `rebalancer.*` are always added).
    pub labels: BTreeMap<String, String>,
    /// Prefix of new servers' ids and container names (default: `<pipeline name>-`).
    pub name_prefix: String,
    /// A container whose server does not pass in Consul within this is removed.
    pub provision_timeout: String,
    /// Grace between SIGTERM and SIGKILL when stopping a container.
    pub stop_grace: String,
    /// Most containers created or stopped in one round.
    pub max_per_round: i64,
}

impl Default for RawDocker {
    fn default() -> Self {
        RawDocker {
            host: "unix:///var/run/docker.sock".into(),
            image: String::new(),
            command: Vec::new(),
            env: BTreeMap::new(),
            network_mode: "host".into(),
            port_range: "20000-20999".into(),
            labels: BTreeMap::new(),
            name_prefix: String::new(),
            provision_timeout: "60s".into(),
            stop_grace: "10s".into(),
            max_per_round: 2,
        }
    }
}

impl Default for RawScale {
    fn default() -> Self {
        RawScale {
            enabled: true,
            scale_out_at: 0.70,
            scale_in_at: 0.40,
            target_utilization: 0.55,
            min_servers: 1,
            max_servers: 100,
            scale_in_after: "60s".into(),
            cooldown: "30s".into(),
            reap_after: "10s".into(),
            max_per_round: 5,
            docker: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSafety {
    /// Above this fraction of registered servers failing health, every action halts.
    pub halt_unhealthy_fraction: f64,
}

impl Default for RawSafety {
    fn default() -> Self {
        RawSafety {
            halt_unhealthy_fraction: 0.45,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLeader {
    /// TTL of the Consul session that holds the leader lock.
    pub session_ttl: String,
}

impl Default for RawLeader {
    fn default() -> Self {
        RawLeader {
            session_ttl: "15s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: "127.0.0.1:9464".into(),
        }
    }
}
