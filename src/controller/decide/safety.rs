//! The safety stage: when to halt everything, and when to withhold destructive actions.

use super::SafetyConfig;
use crate::fleet::topology::{Topology, Totals};

/// `Some(reason)` when too much of the fleet is failing health to act on anything.
pub fn halt(totals: &Totals, cfg: &SafetyConfig) -> Option<String> {
    if totals.registered == 0 {
        return None;
    }
    let failing = f64::from(totals.failing) / f64::from(totals.registered);
    (failing > cfg.halt_unhealthy_fraction).then(|| {
        format!(
            "{} of {} registered servers fail health checks (more than {:.0}%): all actions halted",
            totals.failing,
            totals.registered,
            cfg.halt_unhealthy_fraction * 100.0
        )
    })
}

/// `Some(reason)` when the snapshot is stale or partial: no shed, drain, cordon or reap then.
pub fn destructive_gate(t: &Topology, totals: &Totals) -> Option<String> {
    if t.is_stale() {
        return Some(format!(
            "snapshot is stale ({} not synced); nothing destructive",
            t.sources.missing().join(", ")
        ));
    }
    if totals.unknown > 0 {
        return Some(format!(
            "{} passing server(s) have an unknown session count or state; nothing destructive",
            totals.unknown
        ));
    }
    None
}
