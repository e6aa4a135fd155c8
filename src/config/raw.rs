//! The pipeline file as written: serde structs. Their defaults are the typed configs'
//! `Default`s written back as text, so every default is defined once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::decide::{RebalanceConfig, SafetyConfig, ScaleConfig};
use super::{
    ConsulConfig, DebounceConfig, DockerConfig, GatewayConfig, RedisConfig, DEFAULT_COMMAND_TTL,
    DEFAULT_LEADER_SESSION_TTL, DEFAULT_METRICS_LISTEN, DEFAULT_NAME,
};

/// A duration as a pipeline file writes it (`"15s"`, `"200ms"`, `"5m"`).
fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

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
    /// The cache's size in bytes, and the largest response it keeps.
    pub cache_max_bytes: i64,
    pub cache_max_entry_bytes: i64,
    /// Use this port for every server instead of the one registered in Consul.
    pub target_port: i64,
    /// One structured line per request and WebSocket session.
    pub access_log: bool,
    /// Request-level least-connections across gateway replicas, through Redis.
    pub shared_accounting: bool,
    /// Longest wait on Redis for the shared accounting.
    pub redis_timeout: String,
    /// The controller's feed (`http://host:port`, its metrics.listen) to route from, instead
    /// of watching Consul and Redis; empty: watch them.
    pub topology_feed: String,
    /// Client connections open at once; past it accepting pauses `queue_timeout`, then 503.
    pub max_connections: i64,
    pub queue_timeout: String,
    /// Client connections from one IP address at once (429 past it); 0: no limit.
    pub max_connections_per_ip: i64,
    /// A request head must arrive whole within this of its first byte (408).
    pub header_timeout: String,
    /// Largest request head in bytes, and most header fields (431).
    pub max_header_bytes: i64,
    pub max_headers: i64,
    /// Largest request body in bytes (413), and the time the whole of it may take (408).
    pub max_body_bytes: i64,
    pub body_timeout: String,
    /// Largest response head a server may send (502).
    pub max_response_header_bytes: i64,
    /// Relayed `WebSockets`: pinged this often; a side silent for `ws_idle_timeout` ends it.
    pub ws_ping_interval: String,
    pub ws_idle_timeout: String,
    /// Largest WebSocket frame and message, in bytes (close 1009).
    pub ws_max_frame_bytes: i64,
    pub ws_max_message_bytes: i64,
    /// Proxies in front (CIDR blocks or addresses) whose forwarding headers are believed.
    pub trusted_proxies: Vec<String>,
    /// TLS termination: the certificate chain and its private key, PEM files (both or
    /// neither); read again when either changes.
    pub tls_cert: String,
    pub tls_key: String,
}

impl Default for RawGateway {
    fn default() -> Self {
        let d = GatewayConfig::default();
        RawGateway {
            listen: d.listen.to_string(),
            metrics_listen: d.metrics_listen.to_string(),
            health_path: d.health_path,
            health_interval: text(d.health_interval),
            rise: d.rise.into(),
            fall: d.fall.into(),
            connect_timeout: text(d.connect_timeout),
            request_timeout: text(d.request_timeout),
            idle_timeout: text(d.idle_timeout),
            breaker_failures: d.breaker_failures.into(),
            breaker_open: text(d.breaker_open),
            retries: d.retries.into(),
            retry_budget: d.retry_budget,
            slow_start: text(d.slow_start),
            reservation_ttl: text(d.reservation_ttl),
            cache_paths: d.cache_paths,
            cache_ttl: text(d.cache_ttl),
            cache_capacity: d.cache_capacity as i64,
            cache_max_bytes: d.cache_max_bytes as i64,
            cache_max_entry_bytes: d.cache_max_entry_bytes as i64,
            target_port: d.target_port.map_or(0, i64::from),
            access_log: d.access_log,
            shared_accounting: d.shared_accounting,
            redis_timeout: text(d.redis_timeout),
            topology_feed: d.topology_feed.unwrap_or_default(),
            max_connections: d.limits.max_connections as i64,
            queue_timeout: text(d.limits.queue_timeout),
            max_connections_per_ip: d.limits.max_connections_per_ip as i64,
            header_timeout: text(d.limits.header_timeout),
            max_header_bytes: d.limits.max_header_bytes as i64,
            max_headers: d.limits.max_headers as i64,
            max_body_bytes: d.limits.max_body_bytes as i64,
            body_timeout: text(d.limits.body_timeout),
            max_response_header_bytes: d.limits.max_response_header_bytes as i64,
            ws_ping_interval: text(d.limits.ws_ping_interval),
            ws_idle_timeout: text(d.limits.ws_idle_timeout),
            ws_max_frame_bytes: d.limits.ws_max_frame_bytes as i64,
            ws_max_message_bytes: d.limits.ws_max_message_bytes as i64,
            trusted_proxies: d.trusted_proxies.iter().map(ToString::to_string).collect(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl Default for RawPipeline {
    fn default() -> Self {
        RawPipeline {
            name: DEFAULT_NAME.into(),
            service: DEFAULT_NAME.into(),
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

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsul {
    pub address: String,
    /// ACL token sent as `X-Consul-Token` (empty: none).
    pub token: String,
    /// PEM CA file that verifies an `https://` Consul (empty: `CONSUL_CACERT`, else the
    /// system's roots).
    pub ca_file: String,
    /// PEM client certificate and key for mutual TLS (empty: `CONSUL_CLIENT_CERT`/`_KEY`).
    pub client_cert: String,
    pub client_key: String,
    /// How long one blocking query may wait for a change.
    pub wait: String,
}

impl Default for RawConsul {
    fn default() -> Self {
        let d = ConsulConfig::default();
        RawConsul {
            address: d.address,
            token: d.token.map(|t| t.expose().to_string()).unwrap_or_default(),
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
            wait: text(d.wait),
        }
    }
}

/// The token never shows.
impl std::fmt::Debug for RawConsul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConsul")
            .field("address", &self.address)
            .field("token", &if self.token.is_empty() { "" } else { "***" })
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("wait", &self.wait)
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: String,
    /// ACL user and password (empty: `REDIS_USERNAME`/`REDIS_PASSWORD`, else the URL's).
    pub username: String,
    pub password: String,
    /// PEM CA file that verifies a `rediss://` Redis (empty: `REDIS_CACERT`, else the
    /// system's roots).
    pub ca_file: String,
    /// PEM client certificate and key for mutual TLS (empty: `REDIS_CLIENT_CERT`/`_KEY`).
    pub client_cert: String,
    pub client_key: String,
    /// Full SCAN + MGET resync period, on top of the one after every reconnect.
    pub reconcile: String,
    /// The TTL servers give their counts; after the source is down this long, counts are unknown.
    pub count_ttl: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        let d = RedisConfig::default();
        RawRedis {
            url: d.url,
            username: String::new(),
            password: String::new(),
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
            reconcile: text(d.reconcile),
            count_ttl: text(d.count_ttl),
        }
    }
}

/// The URL's password never shows.
impl std::fmt::Debug for RawRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRedis")
            .field("url", &crate::contract::secret::redact_url(&self.url))
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("reconcile", &self.reconcile)
            .field("count_ttl", &self.count_ttl)
            .finish()
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
        let d = DebounceConfig::default();
        RawDebounce {
            quiet: text(d.quiet),
            max_delay: text(d.max_delay),
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
    /// No shed until a complete snapshot has been held this long (after start, election).
    pub settle: String,
    /// Sessions shed this recently still count in U while they reconnect.
    pub in_transit: String,
}

impl Default for RawRebalance {
    fn default() -> Self {
        let d = RebalanceConfig::default();
        RawRebalance {
            enabled: d.enabled,
            tolerance: d.tolerance,
            shed_fraction: d.shed_fraction,
            min_shed: d.min_shed as i64,
            max_shed: d.max_shed as i64,
            round_interval: text(d.round_interval),
            drain_rate: d.drain_rate as i64,
            disruption_budget: d.disruption_budget,
            command_ttl: text(DEFAULT_COMMAND_TTL),
            settle: text(d.settle),
            in_transit: text(d.in_transit),
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
        let d = DockerConfig::default();
        RawDocker {
            host: format!("unix://{}", d.socket),
            image: d.image,
            command: d.command,
            env: d.env,
            network_mode: d.network_mode,
            port_range: format!("{}-{}", d.ports.start(), d.ports.end()),
            labels: d.labels,
            name_prefix: d.name_prefix,
            provision_timeout: text(d.provision_timeout),
            stop_grace: text(d.stop_grace),
            max_per_round: d.max_per_round.into(),
        }
    }
}

impl Default for RawScale {
    fn default() -> Self {
        let d = ScaleConfig::default();
        RawScale {
            enabled: d.enabled,
            scale_out_at: d.scale_out_at,
            scale_in_at: d.scale_in_at,
            target_utilization: d.target_utilization,
            min_servers: d.min_servers.into(),
            max_servers: d.max_servers.into(),
            scale_in_after: text(d.scale_in_after),
            cooldown: text(d.cooldown),
            reap_after: text(d.reap_after),
            max_per_round: d.max_per_round.into(),
            docker: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSafety {
    /// Above this fraction of registered servers failing health, every action halts...
    pub halt_unhealthy_fraction: f64,
    /// ...provided at least this many servers fail.
    pub halt_min_failing: i64,
    /// A count above this many times its server's `max_sessions` is unknown.
    pub max_count_ratio: i64,
    /// A registration with a larger `max_sessions` is invalid.
    pub max_capacity: i64,
    /// A registration with more than this × the fleet's median `max_sessions` is invalid.
    pub capacity_outlier_ratio: i64,
}

impl Default for RawSafety {
    fn default() -> Self {
        let d = SafetyConfig::default();
        RawSafety {
            halt_unhealthy_fraction: d.halt_unhealthy_fraction,
            halt_min_failing: d.halt_min_failing.into(),
            max_count_ratio: d.max_count_ratio.into(),
            max_capacity: d.max_capacity.into(),
            capacity_outlier_ratio: d.capacity_outlier_ratio.into(),
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
            session_ttl: text(DEFAULT_LEADER_SESSION_TTL),
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
            listen: DEFAULT_METRICS_LISTEN.to_string(),
        }
    }
}
