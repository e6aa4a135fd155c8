//! The `[gateway]` section: its typed settings with their defaults, its compiler, and the
//! Rust balancer's environment variable names accepted as aliases.

use std::net::SocketAddr;
use std::time::Duration;

use super::checker::Checker;
use super::raw::RawGateway;

/// Settings of the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub health_path: String,
    pub health_interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    pub retries: u32,
    pub retry_budget: f64,
    pub slow_start: Duration,
    pub reservation_ttl: Duration,
    pub cache_paths: Vec<String>,
    pub cache_ttl: Duration,
    pub cache_capacity: u64,
    pub target_port: Option<u16>,
    pub shared_accounting: bool,
    pub redis_timeout: Duration,
    /// The watch URL of the controller's topology feed to route from, when set.
    pub topology_feed: Option<String>,
}

impl Default for GatewayConfig {
    /// The documented defaults; the pipeline file's schema takes its own from here.
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9466)),
            health_path: "/health".into(),
            health_interval: Duration::from_secs(1),
            rise: 2,
            fall: 2,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(10),
            retries: 2,
            retry_budget: 0.2,
            slow_start: Duration::from_secs(10),
            reservation_ttl: Duration::from_secs(2),
            cache_paths: vec!["/static/".into()],
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 1000,
            target_port: None,
            shared_accounting: false,
            redis_timeout: Duration::from_millis(50),
            topology_feed: None,
        }
    }
}

pub(super) fn compile(g: &RawGateway, pipeline: &str, ck: &mut Checker) -> GatewayConfig {
    let mut addr = |key: &str, v: &str| match v.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => {
            ck.err(
                key,
                format!("{v:?} is not an address such as 127.0.0.1:8080 ({e})"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    let listen = addr("gateway.listen", &g.listen);
    let metrics_listen = addr("gateway.metrics_listen", &g.metrics_listen);
    if !g.health_path.starts_with('/') {
        ck.err(
            "gateway.health_path",
            format!("{:?} must start with /", g.health_path),
        );
    }
    for (i, p) in g.cache_paths.iter().enumerate() {
        if !p.starts_with('/') {
            ck.err(
                &format!("gateway.cache_paths[{i}]"),
                format!("{p:?} must start with /"),
            );
        }
    }
    let target_port = match g.target_port {
        0 => None,
        p @ 1..=65535 => Some(p as u16),
        p => {
            ck.err(
                "gateway.target_port",
                format!("{p} is not a port (1-65535, or 0 for the registered one)"),
            );
            None
        }
    };
    let topology_feed = match g.topology_feed.trim() {
        "" => None,
        url => match crate::contract::urls::watch_url(url, pipeline) {
            Ok(u) => Some(u),
            Err(e) => {
                ck.err("gateway.topology_feed", e.to_string());
                None
            }
        },
    };
    GatewayConfig {
        listen,
        metrics_listen,
        health_path: g.health_path.clone(),
        health_interval: ck.duration("gateway.health_interval", &g.health_interval),
        rise: ck.count("gateway.rise", g.rise, 1..=100) as u32,
        fall: ck.count("gateway.fall", g.fall, 1..=100) as u32,
        connect_timeout: ck.duration("gateway.connect_timeout", &g.connect_timeout),
        request_timeout: ck.duration("gateway.request_timeout", &g.request_timeout),
        idle_timeout: ck.duration("gateway.idle_timeout", &g.idle_timeout),
        breaker_failures: ck.count("gateway.breaker_failures", g.breaker_failures, 1..=10_000)
            as u32,
        breaker_open: ck.duration("gateway.breaker_open", &g.breaker_open),
        retries: ck.count("gateway.retries", g.retries, 0..=10) as u32,
        retry_budget: ck.range("gateway.retry_budget", g.retry_budget, 0.0..=1.0),
        slow_start: ck.duration("gateway.slow_start", &g.slow_start),
        reservation_ttl: ck.duration("gateway.reservation_ttl", &g.reservation_ttl),
        cache_paths: g.cache_paths.clone(),
        cache_ttl: ck.duration("gateway.cache_ttl", &g.cache_ttl),
        cache_capacity: ck.count("gateway.cache_capacity", g.cache_capacity, 1..=10_000_000),
        target_port,
        shared_accounting: g.shared_accounting,
        redis_timeout: ck.duration("gateway.redis_timeout", &g.redis_timeout),
        topology_feed,
    }
}

/// The Rust balancer's environment variable names, accepted as aliases of gateway keys:
/// `HOST_PORT_HTTP_BALANCER` (the port to listen on, on loopback), `TARGET_PORT`,
/// `CACHE_CAPACITY`, `REQUEST_TIMEOUT` (seconds). The `REBALANCER_GATEWAY_*` names win.
pub fn gateway_env_aliases(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    if let Some(v) = env(name) {
        return Some(v);
    }
    match name {
        "REBALANCER_GATEWAY_LISTEN" => {
            env("HOST_PORT_HTTP_BALANCER").map(|p| format!("127.0.0.1:{}", p.trim()))
        }
        "REBALANCER_GATEWAY_TARGET_PORT" => env("TARGET_PORT"),
        "REBALANCER_GATEWAY_CACHE_CAPACITY" => env("CACHE_CAPACITY"),
        "REBALANCER_GATEWAY_REQUEST_TIMEOUT" => {
            env("REQUEST_TIMEOUT").map(|s| format!("{}s", s.trim()))
        }
        _ => None,
    }
}
