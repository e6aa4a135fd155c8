//! Pure decisions: `(snapshot, config, now, history) -> Plan`. No IO, no clocks, no clients,
//! which is what makes them table-testable and lets the simulator run the very same code.

pub mod history;
pub mod plan;
mod reap;
pub mod rebalance;
pub mod safety;
pub mod scale;

use tokio::time::Instant;

pub use crate::config::decide::{DecideConfig, RebalanceConfig, SafetyConfig, ScaleConfig};
pub use history::History;
pub use plan::{Action, ActionKind, Gate, Halt, Plan, Reason, Withheld};

use crate::fleet::topology::Topology;

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
    let mut totals = t.totals();
    // Sessions shed in the last `in_transit` that have left are on their way to other
    // servers: counted, so U does not dip while they reconnect and nobody is shed again for
    // the dip.
    totals.in_transit = history.in_transit(t, now, cfg.rebalance.in_transit);
    totals.sessions = totals.sessions.saturating_add(totals.in_transit);
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
        } else if history.settling(now, cfg.rebalance.settle).is_some() {
            // The same line each round while it lasts, so it is logged once.
            plan.withheld.push(Withheld::Settling {
                settle_ms: cfg.rebalance.settle.as_millis() as u64,
            });
        } else {
            rebalance::plan(t, &totals, &cfg.rebalance, now, history, &mut plan);
        }
    }
    debug_assert!(gate.is_none() || !plan.actions.iter().any(|a| a.kind.is_destructive()));
    plan
}
