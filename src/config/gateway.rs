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
    /// The cache's size in bytes (each entry weighing its size), and the largest entry.
    pub cache_max_bytes: u64,
    pub cache_max_entry_bytes: usize,
    pub target_port: Option<u16>,
    /// One structured line per request and WebSocket session (target `rebalancer::access`).
    pub access_log: bool,
    pub shared_accounting: bool,
    pub redis_timeout: Duration,
    /// The watch URL of the controller's topology feed to route from, when set.
    pub topology_feed: Option<String>,
    /// The limits that keep every client's share of the gateway bounded.
    pub limits: Limits,
    /// Proxies in front whose own forwarding headers are believed (else replaced).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// TLS termination: the certificate chain and private key (PEM), reloaded on change.
    pub tls: Option<TlsFiles>,
}

/// `tls_cert` and `tls_key`: the gateway's certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// What one client may hold or send, each a `[gateway]` key; every time one bites, it is
/// counted in `rebalancer_gateway_limited_total{limit}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Client connections open at once; past it, accepting pauses for `queue_timeout`, then
    /// new connections are answered 503 until one closes.
    pub max_connections: usize,
    pub queue_timeout: Duration,
    /// Client connections open at once from one IP address; 0: no limit. Past it, 429.
    pub max_connections_per_ip: usize,
    /// A request head must arrive whole within this of its first byte (else 408).
    pub header_timeout: Duration,
    /// Largest request head, request line included (else 431), and most header fields.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Largest request body (else 413), and how long the whole of it may take (else 408).
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    /// Largest response head a server may send (else the client gets 502).
    pub max_response_header_bytes: usize,
    /// A relayed WebSocket's sides are pinged this often; a side that sends nothing (pongs
    /// included) for `ws_idle_timeout` ends the session.
    pub ws_ping_interval: Duration,
    pub ws_idle_timeout: Duration,
    /// Largest WebSocket frame and message either side may send (else close 1009).
    pub ws_max_frame_bytes: usize,
    pub ws_max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            queue_timeout: Duration::from_secs(1),
            max_connections_per_ip: 0,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_body_bytes: 1 << 20,
            body_timeout: Duration::from_secs(30),
            max_response_header_bytes: 64 * 1024,
            ws_ping_interval: Duration::from_secs(20),
            ws_idle_timeout: Duration::from_secs(60),
            ws_max_frame_bytes: 1 << 20,
            ws_max_message_bytes: 1 << 20,
        }
    }
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
            cache_max_bytes: 64 << 20,
            cache_max_entry_bytes: 1 << 20,
            target_port: None,
            access_log: false,
            shared_accounting: false,
            redis_timeout: Duration::from_millis(50),
            topology_feed: None,
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            tls: None,
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
        cache_max_bytes: ck.count("gateway.cache_max_bytes", g.cache_max_bytes, 1024..=1 << 40),
        cache_max_entry_bytes: ck.count(
            "gateway.cache_max_entry_bytes",
            g.cache_max_entry_bytes,
            1..=1 << 30,
        ) as usize,
        target_port,
        access_log: g.access_log,
        shared_accounting: g.shared_accounting,
        redis_timeout: ck.duration("gateway.redis_timeout", &g.redis_timeout),
        topology_feed,
        limits: limits(g, ck),
        trusted_proxies: trusted_proxies(&g.trusted_proxies, ck),
        tls: tls_files(g, ck),
    }
}

/// `tls_cert` and `tls_key`: both, or neither.
fn tls_files(g: &RawGateway, ck: &mut Checker) -> Option<TlsFiles> {
    match (g.tls_cert.trim(), g.tls_key.trim()) {
        ("", "") => None,
        ("", _) => {
            ck.err(
                "gateway.tls_cert",
                "tls_key is set without tls_cert: set both (PEM files) or neither",
            );
            None
        }
        (_, "") => {
            ck.err(
                "gateway.tls_key",
                "tls_cert is set without tls_key: set both (PEM files) or neither",
            );
            None
        }
        (cert, key) => Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
        }),
    }
}

/// `trusted_proxies`: CIDR blocks, or single addresses.
fn trusted_proxies(list: &[String], ck: &mut Checker) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let s = s.trim();
        match s
            .parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => out.push(net),
            Err(_) => ck.err(
                &format!("gateway.trusted_proxies[{i}]"),
                format!("{s:?} is not an address or a CIDR block such as 10.0.0.0/8"),
            ),
        }
    }
    out
}

fn limits(g: &RawGateway, ck: &mut Checker) -> Limits {
    const MIB: i64 = 1 << 20;
    let bytes = |ck: &mut Checker, key: &str, v: i64, lo: i64, hi: i64| {
        ck.count(&format!("gateway.{key}"), v, lo..=hi) as usize
    };
    let l = Limits {
        max_connections: bytes(ck, "max_connections", g.max_connections, 1, 1_000_000),
        queue_timeout: ck.duration("gateway.queue_timeout", &g.queue_timeout),
        max_connections_per_ip: bytes(
            ck,
            "max_connections_per_ip",
            g.max_connections_per_ip,
            0,
            1_000_000,
        ),
        header_timeout: ck.duration("gateway.header_timeout", &g.header_timeout),
        // hyper reads a head into a buffer of at least 8 KiB.
        max_header_bytes: bytes(ck, "max_header_bytes", g.max_header_bytes, 8192, MIB),
        max_headers: bytes(ck, "max_headers", g.max_headers, 1, 10_000),
        max_body_bytes: bytes(ck, "max_body_bytes", g.max_body_bytes, 0, 1 << 30),
        body_timeout: ck.duration("gateway.body_timeout", &g.body_timeout),
        max_response_header_bytes: bytes(
            ck,
            "max_response_header_bytes",
            g.max_response_header_bytes,
            8192,
            MIB,
        ),
        ws_ping_interval: ck.duration("gateway.ws_ping_interval", &g.ws_ping_interval),
        ws_idle_timeout: ck.duration("gateway.ws_idle_timeout", &g.ws_idle_timeout),
        ws_max_frame_bytes: bytes(
            ck,
            "ws_max_frame_bytes",
            g.ws_max_frame_bytes,
            1024,
            1 << 30,
        ),
        ws_max_message_bytes: bytes(
            ck,
            "ws_max_message_bytes",
            g.ws_max_message_bytes,
            1024,
            1 << 30,
        ),
    };
    if l.ws_max_frame_bytes > l.ws_max_message_bytes {
        ck.err(
            "gateway.ws_max_frame_bytes",
            format!(
                "{} is more than ws_max_message_bytes ({}): a frame is part of a message",
                l.ws_max_frame_bytes, l.ws_max_message_bytes
            ),
        );
    }
    if l.ws_idle_timeout <= l.ws_ping_interval {
        ck.err(
            "gateway.ws_idle_timeout",
            format!(
                "{:?} must be longer than ws_ping_interval ({:?}), or an idle session that \
                 answers every ping is closed",
                l.ws_idle_timeout, l.ws_ping_interval
            ),
        );
    }
    l
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
