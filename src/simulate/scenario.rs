//! Scenarios: a fleet, its load, and what happens to it. TOML files; the built-in ones are
//! also selectable by name.

use serde::Deserialize;

/// How reconnecting and new clients pick a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// The gateway's choice: the less utilized of two random servers.
    P2c,
    /// Uniformly random, as clients reconnecting by DNS or by a plain load balancer.
    Random,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub duration_s: u64,
    #[serde(default = "p2c")]
    pub routing: Routing,
    /// Shed clients reconnect 1 s plus up to this long later (the agent's spread window).
    #[serde(default = "two")]
    pub reconnect_jitter_s: f64,
    /// Mean session lifetime; absent: sessions never end on their own (no churn).
    #[serde(default)]
    pub session_lifetime_s: Option<f64>,
    /// Seconds from a scale-out to the new server taking sessions.
    #[serde(default = "twenty")]
    pub provisioning_s: u64,
    /// Run the scale stage too (start, cordon, reap).
    #[serde(default)]
    pub autoscale: bool,
    pub servers: Vec<ServerGroup>,
    #[serde(default)]
    pub events: Vec<Event>,
}

fn p2c() -> Routing {
    Routing::P2c
}
fn two() -> f64 {
    2.0
}
fn twenty() -> u64 {
    20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerGroup {
    pub count: u32,
    pub capacity: u32,
    pub sessions: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub at_s: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    /// New, empty servers join.
    Join { count: u32, capacity: u32 },
    /// Every server restarts, one after another: down for `down_s`, back empty.
    RollingRestart { every_s: u64, down_s: u64 },
    /// The busiest server dies for good; its clients reconnect elsewhere.
    Crash,
    /// The load changes by `factor` over `over_s` (new clients arrive, or clients leave).
    Load { factor: f64, over_s: u64 },
}

/// The built-in scenarios, by name.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("server-joins", include_str!("scenarios/server-joins.toml")),
    (
        "rolling-deploy",
        include_str!("scenarios/rolling-deploy.toml"),
    ),
    ("flash-crowd", include_str!("scenarios/flash-crowd.toml")),
    ("nightly-drop", include_str!("scenarios/nightly-drop.toml")),
    ("crash", include_str!("scenarios/crash.toml")),
    (
        "heterogeneous",
        include_str!("scenarios/heterogeneous.toml"),
    ),
    (
        "internet-scale",
        include_str!("scenarios/internet-scale.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario file {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("scenario {file}: {message}")]
    Invalid { file: String, message: String },
}

impl Scenario {
    /// A built-in scenario by name, or a scenario file.
    pub fn load(name_or_file: &str) -> Result<Scenario, ScenarioError> {
        if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_file) {
            return Scenario::parse(name_or_file, text);
        }
        let text = std::fs::read_to_string(name_or_file).map_err(|source| ScenarioError::Read {
            file: format!(
                "{name_or_file} (not a file, nor one of: {})",
                BUILT_IN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            source,
        })?;
        Scenario::parse(name_or_file, &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid {
            file: file.to_string(),
            message,
        };
        let s: Scenario =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim().to_string()))?;
        if s.servers.iter().all(|g| g.count == 0) {
            return Err(invalid("servers: at least one server is needed".into()));
        }
        if s.servers.iter().any(|g| g.capacity == 0) {
            return Err(invalid("servers: capacity must be positive".into()));
        }
        if s.duration_s == 0 || s.duration_s > 7 * 24 * 3600 {
            return Err(invalid("duration_s must be between 1 and 604800".into()));
        }
        if s.session_lifetime_s.is_some_and(|l| l.is_nan() || l < 1.0) {
            return Err(invalid("session_lifetime_s must be at least 1".into()));
        }
        for e in &s.events {
            if let EventKind::Load { factor, .. } = e.kind {
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(invalid(format!(
                        "event at {}s: factor must be positive",
                        e.at_s
                    )));
                }
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_scenario_parses() {
        for (name, _) in BUILT_IN {
            let s = Scenario::load(name).unwrap();
            assert_eq!(&s.name, name);
        }
    }

    #[test]
    fn a_bad_scenario_names_the_file_and_the_problem() {
        let e =
            Scenario::parse("x.toml", "name = \"x\"\nduration_s = 10\nservers = []\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("x.toml: servers: at least one server"),
            "{e}"
        );
        let e = Scenario::parse("x.toml", "name = \"x\"\nduraton_s = 10\n").unwrap_err();
        assert!(e.to_string().contains("duraton_s"), "{e}");
    }
}
