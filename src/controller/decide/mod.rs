//! Pure decisions: `(snapshot, config, now, history) -> Plan`. No IO, no clocks, no clients,
//! which is what makes them table-testable and lets the simulator run the very same code.

pub mod history;
pub mod plan;
pub mod rebalance;
pub mod safety;
pub mod scale;

use std::time::Duration;

use tokio::time::Instant;

pub use history::History;
pub use plan::{Action, ActionKind, Gate, Halt, Plan, Reason, Withheld};

use crate::fleet::topology::Topology;

/// All knobs of the decision stages. `Default` is the documented defaults (those of an
/// empty pipeline file): the pipeline file's schema takes its defaults from here.
#[derive(Debug, Clone, PartialEq, Default)]
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

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            enabled: true,
            tolerance: 0.10,
            shed_fraction: 1.0,
            min_shed: 1,
            max_shed: 1000,
            round_interval: Duration::from_secs(15),
            drain_rate: 100,
            disruption_budget: 0.5,
        }
    }
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
    /// With container scaling: a container not passing within this is discarded.
    pub provision_timeout: Option<Duration>,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
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
            provision_timeout: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SafetyConfig {
    pub halt_unhealthy_fraction: f64,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            halt_unhealthy_fraction: 0.45,
        }
    }
}

/// What the actuator can do besides commands and state writes: given to [`decide`] apart
/// from the configuration, which says what the operator wants, not what is possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// A scaler that can start servers is configured.
    pub can_start: bool,
    /// A scaler that can stop servers is configured.
    pub can_reap: bool,
}

impl Capabilities {
    /// Both starting and stopping servers.
    pub const SCALER: Capabilities = Capabilities {
        can_start: true,
        can_reap: true,
    };
}

/// Decides what to do about the fleet in `t`, now, with what the actuator `can` do.
pub fn decide(
    t: &Topology,
    cfg: &DecideConfig,
    can: Capabilities,
    now: Instant,
    history: &History,
) -> Plan {
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
        let round = scale::Round {
            t,
            totals: &totals,
            cfg: &cfg.scale,
            can,
            now,
            history,
            gate: gate.as_ref(),
        };
        round.plan(&mut plan);
    }
    if cfg.rebalance.enabled {
        let scaling_out = plan
            .has(|k| matches!(k, ActionKind::Reactivate { .. } | ActionKind::Start { .. }))
            || t.pending > 0
            || history.scaled_out_within(now, cfg.scale.cooldown);
        if scaling_out {
            plan.withheld.push(Withheld::RebalanceScalingOut);
        } else if plan.has(|k| matches!(k, ActionKind::Cordon { .. })) {
            plan.withheld.push(Withheld::RebalanceCordonsPending);
        } else if let Some(g) = &gate {
            plan.withheld.push(Withheld::RebalanceGated(g.clone()));
        } else {
            rebalance::plan(t, &totals, &cfg.rebalance, now, history, &mut plan);
        }
    }
    debug_assert!(gate.is_none() || !plan.actions.iter().any(|a| a.kind.is_destructive()));
    plan
}
