//! The compile step: a schema-checked raw file into typed configuration, one function per
//! section, every error collected by the checker (the gateway's and Docker's sections have
//! their own files).

use crate::contract::tls::TlsFiles;
use std::net::SocketAddr;
use std::ops::Bound::{Excluded, Included};
use std::time::Duration;

use super::checker::Checker;
use super::decide::BUDGET_WINDOW;
use super::decide::{DecideConfig, RebalanceConfig, SafetyConfig, ScaleConfig};
use super::raw::{
    RawConsul, RawDebounce, RawPipeline, RawRebalance, RawRedis, RawSafety, RawScale,
};
use super::{
    docker, gateway, ConsulConfig, DebounceConfig, DockerConfig, PipelineConfig, RedisConfig,
};

/// (0, 1]: a share that must be above zero.
const SHARE: (std::ops::Bound<f64>, std::ops::Bound<f64>) = (Excluded(0.0), Included(1.0));

pub(super) fn compile(raw: RawPipeline, ck: &mut Checker) -> PipelineConfig {
    ck.name("name", &raw.name);
    ck.name("service", &raw.service);
    let consul = consul(&raw.consul, ck);
    let redis = redis(&raw.redis, ck);
    let debounce = debounce(&raw.debounce, ck);
    let (rebalance, command_ttl) = rebalance(&raw.rebalance, ck);
    let docker = raw
        .scale
        .docker
        .as_ref()
        .map(|d| docker::compile(d, &raw.name, ck));
    let scale = scale(&raw.scale, docker.as_ref(), ck);
    let safety = safety(&raw.safety, ck);
    let gateway = gateway::compile(&raw.gateway.clone().unwrap_or_default(), &raw.name, ck);

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
        consul,
        redis,
        debounce,
        decide: DecideConfig {
            rebalance,
            scale,
            safety,
        },
        command_ttl,
        leader_session_ttl,
        metrics_listen,
        docker,
        gateway,
    }
}

fn consul(c: &RawConsul, ck: &mut Checker) -> ConsulConfig {
    let address = c.address.trim_end_matches('/').to_string();
    match reqwest::Url::parse(&address) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        Ok(_) => ck.err(
            "consul.address",
            format!("{address:?} must be an http:// or https:// URL with a host"),
        ),
        Err(e) => ck.err("consul.address", format!("{address:?} is not a URL ({e})")),
    }
    let wait = ck.duration("consul.wait", &c.wait);
    if wait > Duration::from_secs(600) {
        ck.err("consul.wait", "Consul caps blocking waits at 10m");
    }
    ConsulConfig {
        address,
        token: Some(c.token.clone())
            .filter(|t| !t.is_empty())
            .map(crate::contract::secret::Secret::new),
        tls: TlsFiles {
            ca_file: path(&c.ca_file),
            client_cert: path(&c.client_cert),
            client_key: path(&c.client_key),
        },
        wait,
    }
}

/// An empty string is unset.
fn path(s: &str) -> Option<std::path::PathBuf> {
    Some(s.trim()).filter(|s| !s.is_empty()).map(Into::into)
}

fn redis(r: &RawRedis, ck: &mut Checker) -> RedisConfig {
    if let Err(e) = redis::Client::open(r.url.as_str()) {
        ck.err(
            "redis.url",
            format!(
                "{:?} is not a Redis URL ({e})",
                crate::contract::secret::redact_url(&r.url)
            ),
        );
    }
    RedisConfig {
        url: r.url.clone(),
        username: Some(r.username.clone()).filter(|u| !u.is_empty()),
        password: Some(r.password.clone())
            .filter(|p| !p.is_empty())
            .map(crate::contract::secret::Secret::new),
        tls: TlsFiles {
            ca_file: path(&r.ca_file),
            client_cert: path(&r.client_cert),
            client_key: path(&r.client_key),
        },
        reconcile: ck.duration("redis.reconcile", &r.reconcile),
        count_ttl: ck.duration("redis.count_ttl", &r.count_ttl),
    }
}

fn debounce(d: &RawDebounce, ck: &mut Checker) -> DebounceConfig {
    let quiet = ck.duration("debounce.quiet", &d.quiet);
    let max_delay = ck.duration("debounce.max_delay", &d.max_delay);
    if quiet > max_delay {
        ck.err(
            "debounce.quiet",
            "must not be longer than debounce.max_delay",
        );
    }
    DebounceConfig { quiet, max_delay }
}

/// The rebalance stage's settings, and the commands' time to live.
fn rebalance(r: &RawRebalance, ck: &mut Checker) -> (RebalanceConfig, Duration) {
    let tolerance = ck.range("rebalance.tolerance", r.tolerance, 0.0..1.0);
    let shed_fraction = ck.range("rebalance.shed_fraction", r.shed_fraction, SHARE);
    let min_shed = ck.count("rebalance.min_shed", r.min_shed, 1..=1_000_000);
    let max_shed = ck.count("rebalance.max_shed", r.max_shed, 1..=1_000_000);
    if min_shed > max_shed {
        ck.err("rebalance.min_shed", "must not be above rebalance.max_shed");
    }
    let round_interval = ck.duration("rebalance.round_interval", &r.round_interval);
    let drain_rate = ck.count("rebalance.drain_rate", r.drain_rate, 1..=1_000_000);
    let disruption_budget = ck.range("rebalance.disruption_budget", r.disruption_budget, SHARE);
    let command_ttl = ck.duration("rebalance.command_ttl", &r.command_ttl);
    if command_ttl > crate::contract::protocol::MAX_COMMAND_LIFETIME {
        ck.err(
            "rebalance.command_ttl",
            "is longer than servers accept a command to live (10m)",
        );
    }
    let settle = ck.duration("rebalance.settle", &r.settle);
    let in_transit = ck.duration("rebalance.in_transit", &r.in_transit);
    if in_transit > BUDGET_WINDOW {
        ck.err(
            "rebalance.in_transit",
            "must not be longer than the disruption budget's window (1m)",
        );
    }
    let cfg = RebalanceConfig {
        enabled: r.enabled,
        tolerance,
        shed_fraction,
        min_shed,
        max_shed,
        round_interval,
        drain_rate,
        disruption_budget,
        settle,
        in_transit,
    };
    (cfg, command_ttl)
}

fn scale(s: &RawScale, docker: Option<&DockerConfig>, ck: &mut Checker) -> ScaleConfig {
    let scale_out_at = ck.range("scale.scale_out_at", s.scale_out_at, SHARE);
    let scale_in_at = ck.range("scale.scale_in_at", s.scale_in_at, 0.0..1.0);
    let target = ck.range("scale.target_utilization", s.target_utilization, SHARE);
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
    let min_servers = ck.count("scale.min_servers", s.min_servers, 1..=100_000);
    let max_servers = ck.count("scale.max_servers", s.max_servers, 1..=100_000);
    if min_servers > max_servers {
        ck.err("scale.min_servers", "must not be above scale.max_servers");
    }
    ScaleConfig {
        enabled: s.enabled,
        scale_out_at,
        scale_in_at,
        target_utilization: target,
        min_servers: min_servers as u32,
        max_servers: max_servers as u32,
        scale_in_after: ck.duration("scale.scale_in_after", &s.scale_in_after),
        cooldown: ck.duration("scale.cooldown", &s.cooldown),
        reap_after: ck.duration("scale.reap_after", &s.reap_after),
        max_per_round: ck.count("scale.max_per_round", s.max_per_round, 1..=10_000) as u32,
        provision_timeout: docker.map(|d| d.provision_timeout),
    }
}

fn safety(s: &RawSafety, ck: &mut Checker) -> SafetyConfig {
    SafetyConfig {
        halt_unhealthy_fraction: ck.range(
            "safety.halt_unhealthy_fraction",
            s.halt_unhealthy_fraction,
            SHARE,
        ),
        halt_min_failing: ck.count("safety.halt_min_failing", s.halt_min_failing, 1..=100_000)
            as u32,
        max_count_ratio: ck.count("safety.max_count_ratio", s.max_count_ratio, 1..=1_000) as u32,
        max_capacity: ck.count("safety.max_capacity", s.max_capacity, 1..=100_000_000) as u32,
        capacity_outlier_ratio: ck.count(
            "safety.capacity_outlier_ratio",
            s.capacity_outlier_ratio,
            2..=1_000_000,
        ) as u32,
    }
}
