//! Pipeline files: parsed, overridden from the environment, checked (every error at once,
//! each naming the file and key) and compiled into typed configuration.

pub mod raw;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::controller::decide::{DecideConfig, RebalanceConfig, SafetyConfig, ScaleConfig};
use raw::RawPipeline;

/// Prefix of the environment variables that override pipeline keys.
pub const ENV_PREFIX: &str = "REBALANCER_";

/// One thing wrong with one key of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Every error found in the files given, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub file: PathBuf,
    pub name: String,
    pub service: String,
    pub dry_run: bool,
    pub consul: ConsulConfig,
    pub redis: RedisConfig,
    pub debounce: DebounceConfig,
    pub decide: DecideConfig,
    pub command_ttl: Duration,
    pub leader_session_ttl: Duration,
    pub metrics_listen: SocketAddr,
    pub docker: Option<DockerConfig>,
    pub gateway: GatewayConfig,
}

#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// Base address without a trailing slash, e.g. `http://127.0.0.1:8500`.
    pub address: String,
    pub token: Option<String>,
    pub wait: Duration,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub reconcile: Duration,
}

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

/// Container scaling with Docker.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// Path of the engine's unix socket.
    pub socket: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub network_mode: String,
    pub ports: std::ops::RangeInclusive<u16>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub name_prefix: String,
    pub provision_timeout: Duration,
    pub stop_grace: Duration,
    pub max_per_round: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct DebounceConfig {
    pub quiet: Duration,
    pub max_delay: Duration,
}

/// Every overridable key as `(dotted.key, ENV_NAME)`, in file order, for docs and `--help`.
pub fn env_overrides() -> Vec<(String, String)> {
    let mut out = Vec::new();
    leaves(&schema(), &mut Vec::new(), &mut |path, _| {
        out.push((path.join("."), env_name(path)));
    });
    out
}

/// Reads, overrides from `env`, checks and compiles the given files. All errors of all files
/// come back together; duplicate pipeline names across files are an error too.
pub fn load_all<P: AsRef<Path>>(
    paths: &[P],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<PipelineConfig>, ConfigErrors> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        match std::fs::read_to_string(p) {
            Ok(text) => match parse(p, &text, env) {
                Ok(c) => out.push(c),
                Err(mut e) => errors.append(&mut e.0),
            },
            Err(e) => errors.push(ConfigError {
                file: p.to_path_buf(),
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }),
        }
    }
    let mut seen = BTreeSet::new();
    for c in &out {
        if !seen.insert(c.name.clone()) {
            errors.push(ConfigError {
                file: c.file.clone(),
                key: "name".into(),
                message: format!("pipeline name {:?} is used by another file", c.name),
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The process environment, for [`load_all`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Parses one file's text (the file name is only for messages).
pub fn parse(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineConfig, ConfigErrors> {
    let mut ck = Checker {
        file,
        errors: Vec::new(),
    };
    let mut value: toml::Table = match text.parse() {
        Ok(v) => v,
        Err(e) => {
            ck.err("", format!("not valid TOML: {}", e.to_string().trim()));
            return Err(ConfigErrors(ck.errors));
        }
    };
    let schema = schema();
    check_tree(&schema, &mut value, &mut Vec::new(), &mut ck);
    apply_env(&schema, &mut value, env, &mut ck);
    let raw: RawPipeline = match toml::Value::Table(value).try_into() {
        Ok(r) => r,
        Err(e) => {
            ck.err("", e.to_string().trim().to_string());
            return Err(ConfigErrors(ck.errors));
        }
    };
    let cfg = compile(raw, &mut ck);
    if ck.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(ck.errors))
    }
}

/// The defaults with every optional section present: the keys a file may use.
fn schema() -> toml::Table {
    let mut all = RawPipeline::default();
    all.scale.docker = Some(raw::RawDocker::default());
    all.gateway = Some(raw::RawGateway::default());
    toml::Table::try_from(all).expect("defaults serialize to TOML")
}

fn env_name(path: &[String]) -> String {
    format!("{ENV_PREFIX}{}", path.join("_").to_uppercase())
}

fn leaves(table: &toml::Table, path: &mut Vec<String>, f: &mut dyn FnMut(&[String], &toml::Value)) {
    for (k, v) in table {
        path.push(k.clone());
        match v {
            toml::Value::Table(t) => leaves(t, path, f),
            _ => f(path, v),
        }
        path.pop();
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Reports unknown keys and wrong types against the defaults, all of them, and removes
/// them so the remaining keys can still be range-checked; widens integers written where
/// numbers are expected.
fn check_tree(
    schema: &toml::Table,
    value: &mut toml::Table,
    path: &mut Vec<String>,
    ck: &mut Checker,
) {
    let mut bad = Vec::new();
    for (k, v) in value.iter_mut() {
        path.push(k.clone());
        let key = path.join(".");
        match (schema.get(k), &mut *v) {
            (None, _) => {
                let known: Vec<&str> = schema.keys().map(String::as_str).collect();
                ck.err(
                    &key,
                    format!("unknown key (known here: {})", known.join(", ")),
                );
                bad.push(k.clone());
            }
            // An empty table in the schema is a free-form map of strings (env, labels).
            (Some(toml::Value::Table(s)), toml::Value::Table(t)) if s.is_empty() => {
                for (k2, v2) in t.iter() {
                    if !v2.is_str() {
                        ck.err(
                            &format!("{key}.{k2}"),
                            format!("expected a string, found {}", type_name(v2)),
                        );
                    }
                }
                t.retain(|_, v2| v2.is_str());
            }
            (Some(toml::Value::Table(s)), toml::Value::Table(t)) => check_tree(s, t, path, ck),
            (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => {
                *v = toml::Value::Float(*i as f64)
            }
            (Some(expected), found) => {
                if std::mem::discriminant(expected) != std::mem::discriminant(found) {
                    ck.err(
                        &key,
                        format!(
                            "expected {}, found {}",
                            type_name(expected),
                            type_name(found)
                        ),
                    );
                    bad.push(k.clone());
                }
            }
        }
        path.pop();
    }
    for k in bad {
        value.remove(&k);
    }
}

fn apply_env(
    schema: &toml::Table,
    value: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    ck: &mut Checker,
) {
    let mut sets = Vec::new();
    leaves(schema, &mut Vec::new(), &mut |path, default| {
        let name = env_name(path);
        let Some(text) = env(&name) else { return };
        let parsed = match default {
            toml::Value::String(_) => Ok(toml::Value::String(text.clone())),
            toml::Value::Boolean(_) => text
                .trim()
                .parse()
                .map(toml::Value::Boolean)
                .map_err(|_| "expected true or false"),
            toml::Value::Integer(_) => text
                .trim()
                .parse()
                .map(toml::Value::Integer)
                .map_err(|_| "expected an integer"),
            toml::Value::Float(_) => text
                .trim()
                .parse()
                .map(toml::Value::Float)
                .map_err(|_| "expected a number"),
            _ => Err("cannot be set from the environment"),
        };
        match parsed {
            Ok(v) => sets.push((path.to_vec(), v)),
            Err(why) => ck.err(
                &path.join("."),
                format!("environment variable {name}={text:?}: {why}"),
            ),
        }
    });
    for (path, v) in sets {
        let mut t = &mut *value;
        for k in &path[..path.len() - 1] {
            let entry = t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(inner) => t = inner,
                _ => return, // already reported as a type error by check_tree
            }
        }
        t.insert(path[path.len() - 1].clone(), v);
    }
}

struct Checker<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn err(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, text: &str) -> Duration {
        match humantime::parse_duration(text) {
            Ok(d) if d > Duration::ZERO => d,
            Ok(_) => {
                self.err(key, "must be longer than zero");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.err(
                    key,
                    format!("{text:?} is not a duration such as \"250ms\" or \"15s\" ({e})"),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn range(
        &mut self,
        key: &str,
        v: f64,
        lo: f64,
        lo_inclusive: bool,
        hi: f64,
        hi_inclusive: bool,
    ) -> f64 {
        let above = if lo_inclusive { v >= lo } else { v > lo };
        let below = if hi_inclusive { v <= hi } else { v < hi };
        if !(above && below && v.is_finite()) {
            let l = if lo_inclusive { '[' } else { '(' };
            let h = if hi_inclusive { ']' } else { ')' };
            self.err(key, format!("{v} is outside {l}{lo}, {hi}{h}"));
        }
        v
    }

    fn at_least(&mut self, key: &str, v: i64, lo: i64) -> u64 {
        if v < lo {
            self.err(key, format!("{v} must be at least {lo}"));
            return lo.max(0) as u64;
        }
        v as u64
    }

    fn name(&mut self, key: &str, v: &str) {
        let ok = !v.is_empty()
            && v.len() <= 128
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.err(
                key,
                format!("{v:?} must be 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.'"),
            );
        }
    }
}

fn compile(raw: RawPipeline, ck: &mut Checker) -> PipelineConfig {
    ck.name("name", &raw.name);
    ck.name("service", &raw.service);

    let address = raw.consul.address.trim_end_matches('/').to_string();
    match reqwest::Url::parse(&address) {
        Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
        Ok(u) if u.scheme() == "https" => ck.err(
            "consul.address",
            "https is not supported by this build; reach Consul over http on loopback or through a local agent",
        ),
        Ok(_) => ck.err("consul.address", format!("{address:?} must be an http:// URL with a host")),
        Err(e) => ck.err("consul.address", format!("{address:?} is not a URL ({e})")),
    }
    let wait = ck.duration("consul.wait", &raw.consul.wait);
    if wait > Duration::from_secs(600) {
        ck.err("consul.wait", "Consul caps blocking waits at 10m");
    }

    if let Err(e) = redis::Client::open(raw.redis.url.as_str()) {
        ck.err(
            "redis.url",
            format!("{:?} is not a Redis URL ({e})", raw.redis.url),
        );
    }
    let reconcile = ck.duration("redis.reconcile", &raw.redis.reconcile);

    let quiet = ck.duration("debounce.quiet", &raw.debounce.quiet);
    let max_delay = ck.duration("debounce.max_delay", &raw.debounce.max_delay);
    if quiet > max_delay {
        ck.err(
            "debounce.quiet",
            "must not be longer than debounce.max_delay",
        );
    }

    let r = &raw.rebalance;
    let tolerance = ck.range("rebalance.tolerance", r.tolerance, 0.0, true, 1.0, false);
    let shed_fraction = ck.range(
        "rebalance.shed_fraction",
        r.shed_fraction,
        0.0,
        false,
        1.0,
        true,
    );
    let min_shed = ck.at_least("rebalance.min_shed", r.min_shed, 1);
    let max_shed = ck.at_least("rebalance.max_shed", r.max_shed, 1);
    if min_shed > max_shed {
        ck.err("rebalance.min_shed", "must not be above rebalance.max_shed");
    }
    let round_interval = ck.duration("rebalance.round_interval", &r.round_interval);
    let drain_rate = ck.at_least("rebalance.drain_rate", r.drain_rate, 1);
    let disruption_budget = ck.range(
        "rebalance.disruption_budget",
        r.disruption_budget,
        0.0,
        false,
        1.0,
        true,
    );
    let command_ttl = ck.duration("rebalance.command_ttl", &r.command_ttl);

    let s = &raw.scale;
    let scale_out_at = ck.range("scale.scale_out_at", s.scale_out_at, 0.0, false, 1.0, true);
    let scale_in_at = ck.range("scale.scale_in_at", s.scale_in_at, 0.0, true, 1.0, false);
    let target = ck.range(
        "scale.target_utilization",
        s.target_utilization,
        0.0,
        false,
        1.0,
        true,
    );
    if scale_in_at >= scale_out_at {
        ck.err(
            "scale.scale_in_at",
            format!("{scale_in_at} must be below scale.scale_out_at ({scale_out_at})"),
        );
    } else if !(scale_in_at < target && target < scale_out_at) {
        ck.err(
            "scale.target_utilization",
            format!("{target} must lie between scale.scale_in_at ({scale_in_at}) and scale.scale_out_at ({scale_out_at}), or scaling would flap"),
        );
    }
    let min_servers = ck.at_least("scale.min_servers", s.min_servers, 1);
    let max_servers = ck.at_least("scale.max_servers", s.max_servers, 1);
    if min_servers > max_servers {
        ck.err("scale.min_servers", "must not be above scale.max_servers");
    }
    let scale_in_after = ck.duration("scale.scale_in_after", &s.scale_in_after);
    let cooldown = ck.duration("scale.cooldown", &s.cooldown);
    let reap_after = ck.duration("scale.reap_after", &s.reap_after);
    let max_per_round = ck.at_least("scale.max_per_round", s.max_per_round, 1);

    let docker = s.docker.as_ref().map(|d| compile_docker(d, &raw.name, ck));
    let gateway = compile_gateway(&raw.gateway.clone().unwrap_or_default(), &raw.name, ck);

    let halt = ck.range(
        "safety.halt_unhealthy_fraction",
        raw.safety.halt_unhealthy_fraction,
        0.0,
        false,
        1.0,
        true,
    );
    let leader_session_ttl = ck.duration("leader.session_ttl", &raw.leader.session_ttl);
    if !(Duration::from_secs(10)..=Duration::from_secs(86400)).contains(&leader_session_ttl) {
        ck.err(
            "leader.session_ttl",
            "Consul accepts session TTLs from 10s to 24h",
        );
    }

    let metrics_listen = match raw.metrics.listen.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => {
            ck.err(
                "metrics.listen",
                format!(
                    "{:?} is not an address such as 127.0.0.1:9464 ({e})",
                    raw.metrics.listen
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 9464))
        }
    };

    PipelineConfig {
        file: ck.file.to_path_buf(),
        name: raw.name,
        service: raw.service,
        dry_run: raw.dry_run,
        consul: ConsulConfig {
            address,
            token: Some(raw.consul.token).filter(|t| !t.is_empty()),
            wait,
        },
        redis: RedisConfig {
            url: raw.redis.url,
            reconcile,
        },
        debounce: DebounceConfig { quiet, max_delay },
        decide: DecideConfig {
            rebalance: RebalanceConfig {
                enabled: r.enabled,
                tolerance,
                shed_fraction,
                min_shed,
                max_shed,
                round_interval,
                drain_rate,
                disruption_budget,
            },
            scale: ScaleConfig {
                enabled: s.enabled,
                scale_out_at,
                scale_in_at,
                target_utilization: target,
                min_servers: min_servers as u32,
                max_servers: max_servers as u32,
                scale_in_after,
                cooldown,
                reap_after,
                max_per_round: max_per_round as u32,
                can_start: false,
                can_reap: false,
                provision_timeout: docker.as_ref().map(|d: &DockerConfig| d.provision_timeout),
            },
            safety: SafetyConfig {
                halt_unhealthy_fraction: halt,
            },
        },
        command_ttl,
        leader_session_ttl,
        metrics_listen,
        docker,
        gateway,
    }
}

fn compile_gateway(g: &raw::RawGateway, pipeline: &str, ck: &mut Checker) -> GatewayConfig {
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
        rise: ck.at_least("gateway.rise", g.rise, 1) as u32,
        fall: ck.at_least("gateway.fall", g.fall, 1) as u32,
        connect_timeout: ck.duration("gateway.connect_timeout", &g.connect_timeout),
        request_timeout: ck.duration("gateway.request_timeout", &g.request_timeout),
        idle_timeout: ck.duration("gateway.idle_timeout", &g.idle_timeout),
        breaker_failures: ck.at_least("gateway.breaker_failures", g.breaker_failures, 1) as u32,
        breaker_open: ck.duration("gateway.breaker_open", &g.breaker_open),
        retries: ck.at_least("gateway.retries", g.retries, 0) as u32,
        retry_budget: ck.range("gateway.retry_budget", g.retry_budget, 0.0, true, 1.0, true),
        slow_start: ck.duration("gateway.slow_start", &g.slow_start),
        reservation_ttl: ck.duration("gateway.reservation_ttl", &g.reservation_ttl),
        cache_paths: g.cache_paths.clone(),
        cache_ttl: ck.duration("gateway.cache_ttl", &g.cache_ttl),
        cache_capacity: ck.at_least("gateway.cache_capacity", g.cache_capacity, 1),
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

fn compile_docker(d: &raw::RawDocker, pipeline: &str, ck: &mut Checker) -> DockerConfig {
    let socket = match d.host.strip_prefix("unix://") {
        Some(p) if !p.is_empty() => p.to_string(),
        _ => {
            ck.err(
                "scale.docker.host",
                format!(
                    "{:?} must be a unix socket such as unix:///var/run/docker.sock",
                    d.host
                ),
            );
            String::new()
        }
    };
    if d.image.trim().is_empty() {
        ck.err(
            "scale.docker.image",
            "is required: the image the new servers run",
        );
    }
    let ok_name = |v: &str| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !ok_name(&d.network_mode) {
        ck.err(
            "scale.docker.network_mode",
            format!(
                "{:?} must be \"host\" or a Docker network name",
                d.network_mode
            ),
        );
    }
    let ports = match d
        .port_range
        .split_once('-')
        .map(|(a, b)| (a.trim().parse::<u16>(), b.trim().parse::<u16>()))
    {
        Some((Ok(a), Ok(b))) if a >= 1 && a <= b => a..=b,
        _ => {
            ck.err(
                "scale.docker.port_range",
                format!("{:?} is not a range such as \"20000-20999\"", d.port_range),
            );
            20000..=20999
        }
    };
    for k in d.labels.keys() {
        if k.starts_with("rebalancer.") {
            ck.err(
                &format!("scale.docker.labels.{k}"),
                "labels under rebalancer. are reserved for ownership",
            );
        }
    }
    for (i, arg) in d.command.iter().enumerate() {
        if let Some(bad) = unknown_placeholder(arg) {
            ck.err(
                &format!("scale.docker.command[{i}]"),
                format!("unknown placeholder {bad} (known: {{id}}, {{port}})"),
            );
        }
    }
    for (k, v) in &d.env {
        if let Some(bad) = unknown_placeholder(v) {
            ck.err(
                &format!("scale.docker.env.{k}"),
                format!("unknown placeholder {bad} (known: {{id}}, {{port}})"),
            );
        }
    }
    let name_prefix = if d.name_prefix.is_empty() {
        format!("{pipeline}-")
    } else {
        d.name_prefix.clone()
    };
    if !ok_name(&name_prefix) {
        ck.err(
            "scale.docker.name_prefix",
            format!("{name_prefix:?} may hold only A-Z, a-z, 0-9, '-', '_', '.'"),
        );
    }
    let provision_timeout = ck.duration("scale.docker.provision_timeout", &d.provision_timeout);
    let stop_grace = ck.duration("scale.docker.stop_grace", &d.stop_grace);
    let max_per_round = ck.at_least("scale.docker.max_per_round", d.max_per_round, 1) as u32;
    DockerConfig {
        socket,
        image: d.image.clone(),
        command: d.command.clone(),
        env: d.env.clone(),
        network_mode: d.network_mode.clone(),
        ports,
        labels: d.labels.clone(),
        name_prefix,
        provision_timeout,
        stop_grace,
        max_per_round,
    }
}

/// The first `{…}` in `s` that is not `{id}` or `{port}`.
fn unknown_placeholder(s: &str) -> Option<String> {
    let mut rest = s;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i..];
        let end = tail.find('}')?;
        let p = &tail[..=end];
        if p != "{id}" && p != "{port}" {
            return Some(p.to_string());
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn errors(text: &str) -> Vec<String> {
        parse(Path::new("p.toml"), text, &no_env)
            .err()
            .map(|e| e.0.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let c = parse(Path::new("p.toml"), "", &no_env).unwrap();
        assert_eq!(c.name, "ws");
        assert_eq!(c.consul.address, "http://127.0.0.1:8500");
        assert_eq!(c.debounce.quiet, Duration::from_millis(200));
        assert_eq!(c.decide.rebalance.round_interval, Duration::from_secs(15));
        assert_eq!(c.decide.scale.scale_out_at, 0.70);
        assert_eq!(c.metrics_listen.port(), 9464);
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_reported_at_once() {
        let errs = errors(
            r#"
            nmae = "x"
            [rebalance]
            tolerance = "lots"
            shed_fraction = 0
            round_interval = "soon"
            [scale]
            scale_in_at = 0.8
            colour = "red"
            "#,
        );
        let all = errs.join("\n");
        assert!(all.contains("p.toml: nmae: unknown key"), "{all}");
        assert!(
            all.contains("p.toml: rebalance.tolerance: expected a number, found a string"),
            "{all}"
        );
        assert!(all.contains("p.toml: scale.colour: unknown key"), "{all}");
        assert!(
            all.contains("rebalance.shed_fraction: 0 is outside (0, 1]"),
            "{all}"
        );
        assert!(
            all.contains("rebalance.round_interval: \"soon\" is not a duration"),
            "{all}"
        );
        assert!(
            all.contains("scale.scale_in_at: 0.8 must be below scale.scale_out_at"),
            "{all}"
        );
        assert_eq!(errs.len(), 6, "{all}");
    }

    #[test]
    fn integers_are_accepted_where_numbers_are_expected() {
        let c = parse(
            Path::new("p.toml"),
            "[rebalance]\nshed_fraction = 1\n",
            &no_env,
        )
        .unwrap();
        assert_eq!(c.decide.rebalance.shed_fraction, 1.0);
    }

    #[test]
    fn environment_variables_override_the_file_and_bad_ones_name_the_variable() {
        let env = |k: &str| match k {
            "REBALANCER_REDIS_URL" => Some("redis://127.0.0.1:7000/2".to_string()),
            "REBALANCER_DRY_RUN" => Some("true".to_string()),
            "REBALANCER_SCALE_MIN_SERVERS" => Some("3".to_string()),
            _ => None,
        };
        let c = parse(Path::new("p.toml"), "dry_run = false\n", &env).unwrap();
        assert_eq!(c.redis.url, "redis://127.0.0.1:7000/2");
        assert!(c.dry_run);
        assert_eq!(c.decide.scale.min_servers, 3);

        let bad = |k: &str| (k == "REBALANCER_REBALANCE_MAX_SHED").then(|| "many".to_string());
        let e = parse(Path::new("p.toml"), "", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "rebalance.max_shed: environment variable REBALANCER_REBALANCE_MAX_SHED=\"many\""
            ),
            "{e}"
        );
    }

    #[test]
    fn the_override_list_names_every_key() {
        let names: Vec<String> = env_overrides().into_iter().map(|(_, e)| e).collect();
        assert!(names.contains(&"REBALANCER_CONSUL_ADDRESS".to_string()));
        assert!(names.contains(&"REBALANCER_SCALE_SCALE_OUT_AT".to_string()));
        assert!(names.contains(&"REBALANCER_METRICS_LISTEN".to_string()));
    }

    #[test]
    fn a_docker_section_is_checked_and_its_maps_are_free_form() {
        let c = parse(
            Path::new("p.toml"),
            "[scale.docker]\nimage = \"srv:1\"\ncommand = [\"demo-server\", \"--id\", \"{id}\"]\n\
             env = { PORT = \"{port}\" }\nlabels = { team = \"a\" }\n",
            &no_env,
        )
        .unwrap();
        let d = c.docker.unwrap();
        assert_eq!(d.socket, "/var/run/docker.sock");
        assert_eq!(d.name_prefix, "ws-");
        assert_eq!(d.ports, 20000..=20999);
        assert_eq!(
            c.decide.scale.provision_timeout,
            Some(Duration::from_secs(60))
        );
        assert!(
            parse(Path::new("p.toml"), "", &no_env)
                .unwrap()
                .docker
                .is_none(),
            "no section, no containers"
        );

        let errs = errors(
            "[scale.docker]\nhost = \"tcp://x\"\nport_range = \"9-1\"\ncommand = [\"{name}\"]\n\
             labels = { \"rebalancer.pipeline\" = \"x\", n = 3 }\nimgae = \"x\"\n",
        );
        let all = errs.join("\n");
        for want in [
            "scale.docker.imgae: unknown key",
            "scale.docker.labels.n: expected a string",
            "scale.docker.host: \"tcp://x\" must be a unix socket",
            "scale.docker.image: is required",
            "scale.docker.port_range: \"9-1\" is not a range",
            "scale.docker.labels.rebalancer.pipeline: labels under rebalancer. are reserved",
            "scale.docker.command[0]: unknown placeholder {name}",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn the_gateway_section_has_defaults_and_takes_the_rust_balancers_variable_names() {
        let c = parse(Path::new("p.toml"), "", &no_env).unwrap();
        assert_eq!(c.gateway.listen.port(), 8080);
        assert_eq!(c.gateway.cache_paths, vec!["/static/".to_string()]);
        let env = |k: &str| match k {
            "HOST_PORT_HTTP_BALANCER" => Some("9090".to_string()),
            "CACHE_CAPACITY" => Some("5".to_string()),
            "REQUEST_TIMEOUT" => Some("7".to_string()),
            "TARGET_PORT" => Some("9001".to_string()),
            _ => None,
        };
        let aliased = |k: &str| gateway_env_aliases(&env, k);
        let c = parse(Path::new("p.toml"), "", &aliased).unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.gateway.cache_capacity, 5);
        assert_eq!(c.gateway.request_timeout, Duration::from_secs(7));
        assert_eq!(c.gateway.target_port, Some(9001));
        let bad = |k: &str| {
            gateway_env_aliases(
                &|k2: &str| (k2 == "REQUEST_TIMEOUT").then(|| "soon".to_string()),
                k,
            )
        };
        let e = parse(Path::new("p.toml"), "", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.request_timeout"), "{e}");
    }

    #[test]
    fn broken_toml_is_one_error_with_a_position() {
        let errs = errors("name = \n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("p.toml: not valid TOML"), "{errs:?}");
    }

    #[test]
    fn duplicate_pipeline_names_across_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("rb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.toml");
        let b = dir.join("b.toml");
        std::fs::write(&a, "name = \"x\"\n").unwrap();
        std::fs::write(&b, "name = \"x\"\n").unwrap();
        let e = load_all(&[a, b], &no_env).unwrap_err();
        assert!(
            e.to_string()
                .contains("b.toml: name: pipeline name \"x\" is used by another file"),
            "{e}"
        );
    }
}
