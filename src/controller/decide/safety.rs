//! The safety stage: when to halt everything, and when to withhold destructive actions.

use super::{Gate, Halt, SafetyConfig};
use crate::fleet::topology::{Topology, Totals};

/// `Some(why)` when too much of the fleet is failing health to act on anything.
pub fn halt(totals: &Totals, cfg: &SafetyConfig) -> Option<Halt> {
    if totals.registered == 0 {
        return None;
    }
    let failing = f64::from(totals.failing) / f64::from(totals.registered);
    (failing > cfg.halt_unhealthy_fraction).then_some(Halt::Unhealthy {
        failing: totals.failing,
        registered: totals.registered,
        halt_unhealthy_fraction: cfg.halt_unhealthy_fraction,
    })
}

/// `Some(why)` when the snapshot is stale or partial: no shed, drain, cordon or reap then.
pub fn destructive_gate(t: &Topology, totals: &Totals) -> Option<Gate> {
    if t.is_stale() {
        return Some(Gate::Stale {
            missing: t.sources.missing(),
        });
    }
    if totals.unknown > 0 {
        return Some(Gate::Unknown {
            servers: totals.unknown,
        });
    }
    None
}
