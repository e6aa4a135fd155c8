//! The `[scale.docker]` section: container scaling's typed settings with their defaults,
//! and its compiler.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::checker::Checker;
use super::raw::RawDocker;

/// Container scaling with Docker.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// Path of the engine's unix socket.
    pub socket: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub network_mode: String,
    pub ports: RangeInclusive<u16>,
    pub labels: BTreeMap<String, String>,
    /// Prefix of new servers' ids and container names (`<pipeline name>-` unless set; in
    /// the defaults, empty for that).
    pub name_prefix: String,
    pub provision_timeout: Duration,
    pub stop_grace: Duration,
    pub max_per_round: u32,
}

impl Default for DockerConfig {
    /// The documented defaults of the section (no image: a file that has the section names one).
    fn default() -> Self {
        DockerConfig {
            socket: "/var/run/docker.sock".into(),
            image: String::new(),
            command: Vec::new(),
            env: BTreeMap::new(),
            network_mode: "host".into(),
            ports: 20000..=20999,
            labels: BTreeMap::new(),
            name_prefix: String::new(),
            provision_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
            max_per_round: 2,
        }
    }
}

pub(super) fn compile(d: &RawDocker, pipeline: &str, ck: &mut Checker) -> DockerConfig {
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
    let max_per_round = ck.count("scale.docker.max_per_round", d.max_per_round, 1..=1_000) as u32;
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
