//! The safety stage: when to halt everything, and when to withhold destructive actions.

use super::{Gate, Halt, SafetyConfig};
use crate::fleet::topology::{ContainerState, Topology, Totals};

/// `Some(why)` when too much of the fleet is failing health to act on anything.
pub fn halt(totals: &Totals, cfg: &SafetyConfig) -> Option<Halt> {
    if totals.registered == 0 {
        return None;
    }
    let failing = f64::from(totals.failing) / f64::from(totals.registered);
    (failing > cfg.halt_unhealthy_fraction && totals.failing >= cfg.halt_min_failing).then_some(
        Halt::Unhealthy {
            failing: totals.failing,
            registered: totals.registered,
            halt_unhealthy_fraction: cfg.halt_unhealthy_fraction,
        },
    )
}

/// `Some(why)` when the snapshot is stale or partial: no shed, drain, cordon or reap then.
pub fn destructive_gate(t: &Topology, totals: &Totals) -> Option<Gate> {
    if t.is_stale() {
        return Some(Gate::Stale {
            missing: t.sources.missing(),
        });
    }
    let running = t
        .containers
        .iter()
        .filter(|c| c.state != ContainerState::Stopped)
        .count() as u32;
    if t.servers.is_empty() && t.invalid_instances == 0 && running > 0 {
        return Some(Gate::EmptyHealth {
            containers: running,
        });
    }
    if totals.unknown > 0 {
        return Some(Gate::Unknown {
            servers: totals.unknown,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(registered: u32, failing: u32) -> Totals {
        Totals {
            failing,
            registered,
            ..Totals::default()
        }
    }

    #[test]
    fn the_halt_needs_both_the_fraction_and_the_floor_of_failing_servers() {
        let cfg = SafetyConfig::default();
        assert!(
            halt(&totals(2, 1), &cfg).is_none(),
            "one of two is not an outage"
        );
        assert!(
            halt(&totals(4, 2), &cfg).is_some(),
            "2 of 4: 50% > 45%, and 2 fail"
        );
        assert!(halt(&totals(5, 2), &cfg).is_none(), "2 of 5: 40%");
        assert!(halt(&totals(0, 0), &cfg).is_none());
        let one = SafetyConfig {
            halt_min_failing: 1,
            ..SafetyConfig::default()
        };
        assert!(halt(&totals(2, 1), &one).is_some());
    }

    #[test]
    fn servers_whose_checks_have_never_run_do_not_count_toward_the_halt() {
        use crate::fleet::topology::fixtures::{fleet, server};
        // Everything registered at once, as at start-up: the checks start critical.
        let starting = |id: &str| {
            let mut s = server(id, 100, 0);
            s.passing = false;
            s.starting = true;
            s
        };
        let t = fleet(vec![
            server("a", 100, 10),
            starting("b"),
            starting("c"),
            starting("d"),
        ]);
        assert_eq!((t.totals().registered, t.totals().failing), (1, 0));
        assert!(halt(&t.totals(), &SafetyConfig::default()).is_none());
        // The same servers once their checks have run and failed: an outage.
        let mut t = t;
        for s in &mut t.servers[1..] {
            s.starting = false;
        }
        assert!(halt(&t.totals(), &SafetyConfig::default()).is_some());
    }
}
