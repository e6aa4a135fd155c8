//! Pure decisions: `(snapshot, config, now, history) -> Plan`. No IO, no clocks, no clients,
//! which is what makes them table-testable and lets the simulator run the very same code.

pub mod history;
pub mod rebalance;
pub mod safety;
pub mod scale;

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

pub use history::History;

use crate::fleet::topology::{ServerId, Topology};

/// All knobs of the decision stages.
#[derive(Debug, Clone, PartialEq)]
pub struct DecideConfig {
    pub rebalance: RebalanceConfig,
    pub scale: ScaleConfig,
    pub safety: SafetyConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    pub enabled: bool,
    /// Utilization points above the fleet's `U` before a server counts as over-utilized.
    pub tolerance: f64,
    /// Share of a server's offload shed in one round.
    pub shed_fraction: f64,
    /// Sheds smaller than this are not worth the disruption (dead band).
    pub min_shed: u64,
    pub max_shed: u64,
    /// No server is shed from (or drained) twice within this interval.
    pub round_interval: Duration,
    /// Sessions per round closed on a cordoned server.
    pub drain_rate: u64,
    /// Fraction of the fleet's live sessions that may be shed or drained in any minute.
    pub disruption_budget: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub enabled: bool,
    pub scale_out_at: f64,
    pub scale_in_at: f64,
    pub target_utilization: f64,
    pub min_servers: u32,
    pub max_servers: u32,
    pub scale_in_after: Duration,
    pub cooldown: Duration,
    pub reap_after: Duration,
    pub max_per_round: u32,
    /// A scaler that can start servers is configured.
    pub can_start: bool,
    /// A scaler that can stop servers is configured.
    pub can_reap: bool,
    /// With container scaling: a container not passing within this is discarded.
    pub provision_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SafetyConfig {
    pub halt_unhealthy_fraction: f64,
}

impl Default for DecideConfig {
    /// The documented defaults (those of an empty pipeline file).
    fn default() -> Self {
        DecideConfig {
            rebalance: RebalanceConfig {
                enabled: true,
                tolerance: 0.10,
                shed_fraction: 1.0,
                min_shed: 1,
                max_shed: 1000,
                round_interval: Duration::from_secs(15),
                drain_rate: 100,
                disruption_budget: 0.5,
            },
            scale: ScaleConfig {
                enabled: true,
                scale_out_at: 0.70,
                scale_in_at: 0.40,
                target_utilization: 0.55,
                min_servers: 1,
                max_servers: 100,
                scale_in_after: Duration::from_secs(60),
                cooldown: Duration::from_secs(30),
                reap_after: Duration::from_secs(10),
                max_per_round: 5,
                can_start: false,
                can_reap: false,
                provision_timeout: None,
            },
            safety: SafetyConfig {
                halt_unhealthy_fraction: 0.45,
            },
        }
    }
}

/// Why an action was planned: structured, and rendered as one line only when shown, so a
/// round over a large fleet does not pay for formatting thousands of strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    Overutilized {
        u: f64,
        fleet_u: f64,
        tolerance: f64,
        threshold: u64,
        offload: u64,
    },
    Draining {
        sessions: u64,
        drain_rate: u64,
    },
    ScaleOut {
        u: f64,
        scale_out_at: f64,
        active: u32,
        min_servers: u32,
        needed: u32,
        have: u32,
    },
    ScaleIn {
        u: f64,
        scale_in_at: f64,
        low_for_s: u64,
        sessions: u64,
    },
    Empty {
        zero_for_s: u64,
    },
    /// A container of ours whose server never passed, or that stopped.
    Provision {
        what: &'static str,
        for_s: u64,
    },
    /// Free text, for tests and operator-made actions.
    Text(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Overutilized { u, fleet_u, tolerance, threshold, offload } => write!(
                f,
                "u={u:.2} > U={fleet_u:.2}+{tolerance:.2}; threshold {threshold}, offload {offload}"
            ),
            Reason::Draining { sessions, drain_rate } => {
                write!(f, "cordoned with {sessions} sessions; draining at drain_rate {drain_rate}")
            }
            Reason::ScaleOut { u, scale_out_at, active, min_servers, needed, have } => {
                if active < min_servers {
                    write!(f, "{active} active below min_servers {min_servers}")?;
                } else {
                    write!(f, "U={u:.2} > scale_out_at {scale_out_at:.2}")?;
                }
                write!(f, "; {needed} servers needed, {have} active or pending")
            }
            Reason::ScaleIn { u, scale_in_at, low_for_s, sessions } => write!(
                f,
                "U={u:.2} < scale_in_at {scale_in_at:.2} for {low_for_s}s; fewest sessions ({sessions})"
            ),
            Reason::Empty { zero_for_s } => write!(f, "cordoned with zero sessions for {zero_for_s}s"),
            Reason::Provision { what, for_s } => write!(f, "{what} ({for_s}s)"),
            Reason::Text(t) => f.write_str(t),
        }
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Reason {
        Reason::Text(s.to_string())
    }
}

/// One thing to do to the outside world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// Tell an over-utilized server to close `count` sessions.
    Shed { server: ServerId, count: u64 },
    /// Tell a cordoned server to close `count` sessions.
    Drain { server: ServerId, count: u64 },
    /// Mark a server cordoned in Consul KV: it takes no new sessions.
    Cordon { server: ServerId },
    /// Mark a cordoned server active again.
    Reactivate { server: ServerId },
    /// Ask the scaler for `count` new servers.
    Start { count: u32 },
    /// Ask the scaler to stop a cordoned, empty server.
    Reap { server: ServerId },
    /// Ask the scaler to remove a container of ours that never became healthy, or stopped.
    Discard { server: ServerId },
}

impl ActionKind {
    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ActionKind::Shed { .. } => "shed",
            ActionKind::Drain { .. } => "drain",
            ActionKind::Cordon { .. } => "cordon",
            ActionKind::Reactivate { .. } => "reactivate",
            ActionKind::Start { .. } => "start",
            ActionKind::Reap { .. } => "reap",
            ActionKind::Discard { .. } => "discard",
        }
    }

    /// Disconnects users or removes capacity: never done from stale or partial data.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            ActionKind::Shed { .. }
                | ActionKind::Drain { .. }
                | ActionKind::Cordon { .. }
                | ActionKind::Reap { .. }
                | ActionKind::Discard { .. }
        )
    }

    pub fn server(&self) -> Option<&ServerId> {
        match self {
            ActionKind::Shed { server, .. }
            | ActionKind::Drain { server, .. }
            | ActionKind::Cordon { server }
            | ActionKind::Reactivate { server }
            | ActionKind::Reap { server }
            | ActionKind::Discard { server } => Some(server),
            ActionKind::Start { .. } => None,
        }
    }
}

/// An action with the one-line reason that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub kind: ActionKind,
    pub reason: Reason,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ActionKind::Shed { server, count } => write!(f, "shed {count} from {server}")?,
            ActionKind::Drain { server, count } => write!(f, "drain {count} from {server}")?,
            ActionKind::Cordon { server } => write!(f, "cordon {server}")?,
            ActionKind::Reactivate { server } => write!(f, "reactivate {server}")?,
            ActionKind::Start { count } => write!(f, "start {count} server(s)")?,
            ActionKind::Reap { server } => write!(f, "reap {server}")?,
            ActionKind::Discard { server } => write!(f, "discard {server}")?,
        }
        write!(f, ": {}", self.reason)
    }
}

/// What one decision round wants done, and why the rest was not.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Everything halted, and why.
    pub halted: Option<String>,
    /// Things that would have been done but were withheld, each with its reason.
    pub withheld: Vec<String>,
    /// Servers needed that nobody can start (no scaler configured).
    pub shortfall: u32,
    /// The fleet's overall utilization `U` this plan was made at.
    pub utilization: f64,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn shed_total(&self) -> u64 {
        self.actions
            .iter()
            .map(|a| match a.kind {
                ActionKind::Shed { count, .. } | ActionKind::Drain { count, .. } => count,
                _ => 0,
            })
            .sum()
    }

    fn has(&self, f: impl Fn(&ActionKind) -> bool) -> bool {
        self.actions.iter().any(|a| f(&a.kind))
    }
}

/// Decides what to do about the fleet in `t`, now.
pub fn decide(t: &Topology, cfg: &DecideConfig, now: Instant, history: &History) -> Plan {
    let totals = t.totals();
    let mut plan = Plan {
        utilization: totals.utilization(),
        ..Plan::default()
    };
    if let Some(why) = safety::halt(&totals, &cfg.safety) {
        plan.halted = Some(why);
        return plan;
    }
    let gate = safety::destructive_gate(t, &totals);
    if cfg.scale.enabled {
        scale::plan(
            t,
            &totals,
            &cfg.scale,
            now,
            history,
            gate.as_deref(),
            &mut plan,
        );
    }
    if cfg.rebalance.enabled {
        let scaling_out = plan
            .has(|k| matches!(k, ActionKind::Reactivate { .. } | ActionKind::Start { .. }))
            || t.pending > 0
            || history.scaled_out_within(now, cfg.scale.cooldown);
        if scaling_out {
            plan.withheld.push(
                "rebalance: scale-out pending, new capacity fills through new connections first"
                    .into(),
            );
        } else if plan.has(|k| matches!(k, ActionKind::Cordon { .. })) {
            plan.withheld
                .push("rebalance: waiting for this round's cordons to show in the snapshot".into());
        } else if let Some(g) = &gate {
            plan.withheld.push(format!("rebalance: {g}"));
        } else {
            rebalance::plan(t, &totals, &cfg.rebalance, now, history, &mut plan);
        }
    }
    debug_assert!(gate.is_none() || !plan.actions.iter().any(|a| a.kind.is_destructive()));
    plan
}
