//! The rebalance stage: which over-utilized servers shed how many sessions this round, and
//! how much each cordoned server drains.
//!
//! `U = Σ sessions of live servers / Σ capacity of live active servers`; a server is
//! over-utilized when `u > U + tolerance` — or, while some server is more than `tolerance`
//! below U, when `u > U` at all; `threshold = ceil(capacity × U)`;
//! `offload = sessions − threshold`. Each round sheds `ceil(offload × shed_fraction)`,
//! clamped to `max_shed`, zero below `min_shed`, never more in total than the
//! under-utilized servers can absorb, never from a server shed within `round_interval`,
//! never beyond the fleet's disruption budget per minute.

use tokio::time::Instant;

use super::{Action, ActionKind, History, Plan, Reason, RebalanceConfig, Withheld};
use crate::fleet::topology::{Server, Topology, Totals};

/// `ceil(capacity × S / C)` in exact integer arithmetic.
pub fn threshold(capacity: u32, totals: &Totals) -> u64 {
    if totals.capacity == 0 {
        return 0;
    }
    // u64 when it fits (always, in practice); u128 division is a slow library call.
    match u64::from(capacity).checked_mul(totals.sessions) {
        Some(num) => num.div_ceil(totals.capacity),
        None => (u128::from(capacity) * u128::from(totals.sessions))
            .div_ceil(u128::from(totals.capacity)) as u64,
    }
}

/// Sessions the under-utilized (`u < U`) active servers can take before reaching their threshold.
pub fn absorbable(t: &Topology, totals: &Totals) -> u64 {
    let u = totals.utilization();
    live_active(t)
        .filter(|s| s.utilization().is_some_and(|x| x < u))
        .map(|s| threshold(s.capacity, totals).saturating_sub(s.sessions.known().unwrap_or(0)))
        .sum()
}

fn live_active(t: &Topology) -> impl Iterator<Item = &Server> {
    t.servers.iter().filter(|s| s.is_live() && !s.is_cordoned())
}

pub fn plan(
    t: &Topology,
    totals: &Totals,
    cfg: &RebalanceConfig,
    now: Instant,
    h: &History,
    plan: &mut Plan,
) {
    let u = totals.utilization();
    if totals.capacity == 0 || !u.is_finite() {
        return;
    }
    let mut absorb = absorbable(t, totals);
    let allowed = (cfg.disruption_budget * totals.sessions as f64).ceil() as u64;
    let mut budget = allowed.saturating_sub(h.disrupted(now));
    // Withheld servers are summarized, not listed one line each: fleets can be large.
    let (mut recent, mut no_budget, mut no_room, mut unacked) = (0usize, 0usize, 0usize, 0usize);

    // Cordoned servers have target 0: drain them first, at drain_rate.
    let mut cordoned: Vec<&Server> = t
        .servers
        .iter()
        .filter(|s| s.is_live() && s.is_cordoned() && s.sessions.known().unwrap_or(0) > 0)
        .collect();
    cordoned.sort_by(|a, b| {
        b.sessions
            .known()
            .cmp(&a.sessions.known())
            .then(a.id.cmp(&b.id))
    });
    for s in cordoned {
        if h.shed_within(&s.id, now, cfg.round_interval) {
            continue;
        }
        if h.held_unacked(&s.id) {
            unacked += 1;
            continue;
        }
        let sessions = s.sessions.known().unwrap_or(0);
        let n = sessions.min(cfg.drain_rate).min(absorb).min(budget);
        if n == 0 {
            if budget == 0 {
                no_budget += 1;
            } else {
                no_room += 1;
            }
            continue;
        }
        absorb -= n;
        budget -= n;
        plan.actions.push(Action {
            kind: ActionKind::Drain {
                server: s.id.clone(),
                count: n,
            },
            reason: Reason::Draining {
                sessions,
                drain_rate: cfg.drain_rate,
            },
        });
    }

    // A server far below U (an empty one after a restart, in a large fleet) is an imbalance
    // even when nobody is far above: then every server above its threshold gives.
    let pull = live_active(t).any(|s| s.utilization().is_some_and(|x| x < u - cfg.tolerance));
    // Servers are sorted by id, so their index breaks ties in id order without chasing
    // pointers to compare strings (ties are common: capacities are round numbers).
    let mut over: Vec<(usize, f64)> = t
        .servers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_live() && !s.is_cordoned())
        .filter_map(|(i, s)| s.utilization().map(|x| (i, x)))
        .filter(|(_, x)| *x > u + cfg.tolerance || (pull && *x > u))
        .collect();
    over.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, ui) in over {
        let s = &t.servers[i];
        let sessions = s.sessions.known().unwrap_or(0);
        let th = threshold(s.capacity, totals);
        let offload = sessions.saturating_sub(th);
        if offload == 0 {
            continue;
        }
        if h.shed_within(&s.id, now, cfg.round_interval) {
            recent += 1;
            continue;
        }
        if h.held_unacked(&s.id) {
            unacked += 1;
            continue;
        }
        let paced = ((offload as f64 * cfg.shed_fraction).ceil() as u64).min(cfg.max_shed);
        if paced < cfg.min_shed {
            continue; // dead band: not worth disconnecting anyone for
        }
        let n = paced.min(absorb).min(budget);
        if n < cfg.min_shed {
            if budget < paced {
                no_budget += 1;
            } else {
                no_room += 1;
            }
            continue;
        }
        absorb -= n;
        budget -= n;
        plan.actions.push(Action {
            kind: ActionKind::Shed {
                server: s.id.clone(),
                count: n,
            },
            reason: Reason::Overutilized {
                u: ui,
                fleet_u: u,
                tolerance: cfg.tolerance,
                threshold: th,
                offload,
                pull: ui <= u + cfg.tolerance,
                in_transit: totals.in_transit,
            },
        });
    }
    if recent > 0 {
        plan.withheld
            .push(Withheld::ShedRecently { servers: recent });
    }
    if unacked > 0 {
        plan.withheld.push(Withheld::Unacked { servers: unacked });
    }
    if no_budget > 0 {
        plan.withheld.push(Withheld::NoBudget {
            servers: no_budget,
            per_minute: allowed,
        });
    }
    if no_room > 0 {
        plan.withheld.push(Withheld::NoRoom { servers: no_room });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::controller::decide::{decide, Capabilities, DecideConfig};
    use crate::fleet::topology::fixtures::{fleet, server};
    use crate::fleet::topology::{Admin, Count};

    fn cfg() -> DecideConfig {
        let mut c = DecideConfig::default();
        c.scale.enabled = false;
        c.rebalance.settle = Duration::ZERO; // settling has a test of its own, with the default
        c
    }

    #[test]
    fn no_shed_until_a_complete_snapshot_has_been_held_for_settle_and_again_after_an_election() {
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 10)]);
        let mut c = DecideConfig::default();
        c.scale.enabled = false;
        let can = Capabilities::default();
        let t0 = now();
        let mut h = History::default();
        let p = decide(&t, &c, can, t0, &h);
        assert!(p.is_empty(), "nothing held yet: {p:?}");
        h.observe(&t, &c, t0);
        let p = decide(&t, &c, can, t0 + Duration::from_millis(4900), &h);
        assert!(p.is_empty());
        assert!(
            p.withheld[0]
                .to_string()
                .contains("settling, no shed before a complete snapshot is 5000 ms old"),
            "{p:?}"
        );
        let p = decide(&t, &c, can, t0 + c.rebalance.settle, &h);
        assert_eq!(p.shed_total(), 40, "{p:?}");

        // Leadership changes hands: the new leader settles again.
        h.restart_settle();
        let later = t0 + Duration::from_secs(60);
        h.observe(&t, &c, later);
        assert!(decide(&t, &c, can, later + Duration::from_secs(4), &h).is_empty());
        assert_eq!(
            decide(&t, &c, can, later + Duration::from_secs(5), &h).shed_total(),
            40
        );
        // A stale snapshot does not start the clock.
        let mut stale = t.clone();
        stale.sources.sessions = false;
        let mut h = History::default();
        h.observe(&stale, &c, t0);
        h.observe(&t, &c, t0 + Duration::from_secs(10));
        assert!(decide(&t, &c, can, t0 + Duration::from_secs(12), &h).is_empty());
    }

    fn sheds(p: &Plan) -> Vec<(String, String, u64)> {
        p.actions
            .iter()
            .filter_map(|a| match &a.kind {
                ActionKind::Shed { server, count } => {
                    Some(("shed".into(), server.to_string(), *count))
                }
                ActionKind::Drain { server, count } => {
                    Some(("drain".into(), server.to_string(), *count))
                }
                _ => None,
            })
            .collect()
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn the_seed_example_sheds_forty_from_the_busiest_server() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 50),
            server("c", 100, 10),
        ]);
        let p = decide(&t, &cfg(), can, now(), &History::default());
        assert_eq!(sheds(&p), vec![("shed".into(), "a".into(), 40)]);
        let why = p.actions[0].reason.to_string();
        assert!(why.contains("threshold 50, offload 40"), "{why}");
    }

    #[test]
    fn an_empty_server_joining_three_full_ones_takes_exactly_the_minimum() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 100),
            server("b", 100, 100),
            server("c", 100, 100),
            server("d", 100, 0),
        ]);
        let p = decide(&t, &cfg(), can, now(), &History::default());
        assert_eq!(p.shed_total(), 75);
        assert_eq!(sheds(&p).len(), 3);
    }

    #[test]
    fn shed_fraction_paces_and_max_shed_clamps() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 50),
            server("c", 100, 10),
        ]);
        let mut c = cfg();
        c.rebalance.shed_fraction = 0.5;
        assert_eq!(
            decide(&t, &c, can, now(), &History::default()).shed_total(),
            20
        );
        c.rebalance.max_shed = 7;
        assert_eq!(
            decide(&t, &c, can, now(), &History::default()).shed_total(),
            7
        );
    }

    #[test]
    fn sheds_below_min_shed_fall_in_the_dead_band() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 50),
            server("c", 100, 10),
        ]);
        let mut c = cfg();
        c.rebalance.min_shed = 41;
        assert!(decide(&t, &c, can, now(), &History::default()).is_empty());
    }

    #[test]
    fn an_empty_server_in_a_large_fleet_pulls_from_every_server_above_its_threshold() {
        let can = Capabilities::default();
        // Ten servers of 1000 at 6000 sessions: the nine others hold 667 each, U = 0.6;
        // none is above U + 0.10, but the empty one is 0.6 below.
        let mut servers: Vec<_> = (0..9)
            .map(|i| server(&format!("s{i}"), 1000, 667))
            .collect();
        servers.push(server("new", 1000, 0));
        let t = fleet(servers);
        let p = decide(&t, &cfg(), can, now(), &History::default());
        assert_eq!(sheds(&p).len(), 9);
        // threshold = ceil(1000 × 6003/10000) = 601: 66 each, 594 in all (the minimum).
        assert_eq!(p.shed_total(), 594);
    }

    #[test]
    fn servers_within_tolerance_are_left_alone() {
        let can = Capabilities::default();
        // U = 0.5; a is at 0.59 < 0.5 + 0.10.
        let t = fleet(vec![server("a", 100, 59), server("b", 100, 41)]);
        assert!(decide(&t, &cfg(), can, now(), &History::default()).is_empty());
    }

    #[test]
    fn a_server_is_not_shed_from_twice_within_round_interval() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 50),
            server("c", 100, 10),
        ]);
        let c = cfg();
        let t0 = now();
        let mut h = History::default();
        let p = decide(&t, &c, can, t0, &h);
        h.record(&p, &t, t0);
        let again = decide(&t, &c, can, t0 + Duration::from_secs(14), &h);
        assert!(again.is_empty(), "{again:?}");
        assert!(again
            .withheld
            .iter()
            .any(|w| w.to_string().contains("round_interval")));
        // After the round interval it sheds again, within what is left of the minute's
        // disruption budget (75 of 150 sessions, 40 already spent).
        let later = decide(&t, &c, can, t0 + Duration::from_secs(15), &h);
        assert_eq!(later.shed_total(), 35);
        let much_later = decide(&t, &c, can, t0 + Duration::from_secs(60), &h);
        assert_eq!(much_later.shed_total(), 40);
    }

    #[test]
    fn the_disruption_budget_caps_sheds_per_minute() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 50),
            server("c", 100, 10),
        ]);
        let mut c = cfg();
        c.rebalance.disruption_budget = 0.1; // 15 of 150 sessions per minute
        let p = decide(&t, &c, can, now(), &History::default());
        assert_eq!(p.shed_total(), 15);
    }

    #[test]
    fn cordoned_servers_are_drained_at_drain_rate_into_the_headroom() {
        let can = Capabilities::default();
        let mut cordoned = server("z", 100, 60);
        cordoned.admin = Admin::Cordoned {
            since_ms: 1,
            by_operator: false,
        };
        let t = fleet(vec![server("a", 100, 30), server("b", 100, 30), cordoned]);
        let mut c = cfg();
        c.rebalance.drain_rate = 25;
        let p = decide(&t, &c, can, now(), &History::default());
        assert_eq!(sheds(&p), vec![("drain".into(), "z".into(), 25)]);
    }

    #[test]
    fn nothing_is_shed_while_a_count_is_unknown_or_a_source_is_down() {
        let can = Capabilities::default();
        let mut unknown = server("c", 100, 0);
        unknown.sessions = Count::Unknown;
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 50), unknown]);
        let p = decide(&t, &cfg(), can, now(), &History::default());
        assert!(p.is_empty());
        assert!(
            p.withheld.iter().any(|w| w.to_string().contains("unknown")),
            "{:?}",
            p.withheld
        );

        let mut t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 50),
            server("c", 100, 10),
        ]);
        t.sources.sessions = false;
        let p = decide(&t, &cfg(), can, now(), &History::default());
        assert!(p.is_empty());
        assert!(
            p.withheld
                .iter()
                .any(|w| w.to_string().contains("stale (redis-sessions")),
            "{:?}",
            p.withheld
        );
    }

    #[test]
    fn too_many_failing_servers_halt_everything() {
        let can = Capabilities::default();
        let mut f1 = server("x", 100, 0);
        f1.passing = false;
        let mut f2 = server("y", 100, 0);
        f2.passing = false;
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 10), f1, f2]);
        let p = decide(&t, &cfg(), can, now(), &History::default());
        assert!(p.is_empty());
        assert!(p.halted.unwrap().to_string().contains("2 of 4"));
    }

    #[test]
    fn sessions_in_transit_keep_u_from_dipping_and_nobody_is_shed_again_for_the_dip() {
        let c = cfg();
        let can = Capabilities::default();
        let t0 = now();
        // U = 0.5: a sheds 40 toward its threshold of 50.
        let before = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 45),
            server("c", 100, 15),
        ]);
        let mut h = History::default();
        let p = decide(&before, &c, can, t0, &h);
        assert_eq!(p.shed_total(), 40, "{p:?}");
        h.record(&p, &before, t0);
        // A second later the 40 have left a and are still reconnecting: without them U would
        // be 0.37, c far below it, and b (0.45 > 0.37) shed for a dip that is not real.
        let during = fleet(vec![
            server("a", 100, 50),
            server("b", 100, 45),
            server("c", 100, 15),
        ]);
        let soon = t0 + Duration::from_secs(1);
        let p = decide(&during, &c, can, soon, &h);
        assert!(p.is_empty(), "{p:?}");
        assert!(
            (p.utilization - 0.5).abs() < 1e-9,
            "U counts them: {}",
            p.utilization
        );
        // Past in_transit they no longer count, whether or not they came back.
        let later = t0 + c.rebalance.in_transit;
        let p = decide(&during, &c, can, later, &h);
        assert!(
            p.actions.iter().any(|a| a
                .reason
                .to_string()
                .contains("a server is more than 0.10 below U")),
            "the reason names the rule that applied: {p:?}"
        );
    }

    #[test]
    fn sessions_a_server_still_holds_are_not_counted_again_as_in_transit() {
        let c = cfg();
        let can = Capabilities::default();
        let t0 = now();
        let before = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 45),
            server("c", 100, 15),
        ]);
        let mut h = History::default();
        let p = decide(&before, &c, can, t0, &h);
        assert_eq!(p.shed_total(), 40, "{p:?}");
        h.record(&p, &before, t0);
        let soon = t0 + Duration::from_secs(1);
        // A deaf or slow server: its count has not moved, so nothing is on its way anywhere.
        // Counting the 40 again would read U as 0.63 and could start servers nobody needs.
        let p = decide(&before, &c, can, soon, &h);
        assert!(
            (p.utilization - 0.5).abs() < 1e-9,
            "the 40 are counted once: {}",
            p.utilization
        );
        // Half have left: those 20 are in transit, the other 20 still in a's count.
        let half = fleet(vec![
            server("a", 100, 70),
            server("b", 100, 45),
            server("c", 100, 15),
        ]);
        assert_eq!(h.in_transit(&half, soon, c.rebalance.in_transit), 20);
        // A server gone with its sessions: all it was told to shed are on their way.
        let gone = fleet(vec![server("b", 100, 45), server("c", 100, 15)]);
        assert_eq!(h.in_transit(&gone, soon, c.rebalance.in_transit), 40);
    }

    /// The snapshot the fold makes of these registrations and counts, as the controller's.
    fn folded(servers: &[(&str, u32, u64)]) -> Topology {
        use crate::fleet::events::Events;
        use crate::fleet::fold::{Fold, Limits};
        use crate::fleet::source::{Change, HealthList, Instance, SessionsUpdate, Stamped};
        let (mut f, _rx) = Fold::new(Events::new("t"), Limits::default());
        let instances = servers
            .iter()
            .map(|(id, cap, _)| Instance {
                id: (*id).into(),
                address: "127.0.0.1".into(),
                port: 1,
                capacity: *cap,
                weight: 1.0,
                passing: true,
                starting: false,
            })
            .collect();
        let counts = servers
            .iter()
            .map(|(id, _, n)| ((*id).into(), Ok(*n)))
            .collect();
        let at = |change| Stamped { at: now(), change };
        let t = f.apply(vec![
            at(Change::Health(HealthList {
                instances,
                invalid: vec![],
            })),
            at(Change::States(crate::fleet::source::StateList::default())),
            at(Change::Sessions(SessionsUpdate::Resync(counts))),
        ]);
        (*t.expect("a first snapshot")).clone()
    }

    #[test]
    fn one_servers_absurd_numbers_shed_from_no_other_server() {
        let sheds = |t: &Topology| {
            decide(
                t,
                &cfg(),
                Capabilities::default(),
                now(),
                &History::default(),
            )
            .actions
            .iter()
            .filter(|a| matches!(a.kind, ActionKind::Shed { .. }))
            .count()
        };
        let fleet = [("a", 100, 60), ("b", 100, 60), ("c", 100, 60)];
        assert_eq!(sheds(&folded(&fleet)), 0, "a balanced fleet");
        // A registration claiming the most any server may hold: U would fall to ~0 and
        // every other server would look over-utilized.
        let mut big = fleet.to_vec();
        big.push(("d", 1_000_000, 0));
        assert_eq!(
            sheds(&folded(&big)),
            0,
            "capacity outlier: {:?}",
            folded(&big)
        );
        // A count of 10^15 on one server: U would rise past every other server.
        let mut loud = fleet.to_vec();
        loud.push(("d", 100, 1_000_000_000_000_000));
        assert_eq!(sheds(&folded(&loud)), 0);
        // u64::MAX: the sums saturate instead of wrapping to a small U.
        let mut max = fleet.to_vec();
        max.push(("d", 100, u64::MAX));
        assert_eq!(sheds(&folded(&max)), 0);
    }

    fn arb_fleet() -> impl Strategy<Value = Topology> {
        prop::collection::vec((1u32..500, 0u64..600, any::<bool>()), 1..40).prop_map(|v| {
            fleet(
                v.into_iter()
                    .enumerate()
                    .map(|(i, (cap, s, cordon))| {
                        let mut srv = server(&format!("s{i:03}"), cap, s.min(u64::from(cap) * 2));
                        if cordon && i > 0 {
                            srv.admin = Admin::Cordoned {
                                since_ms: 0,
                                by_operator: false,
                            };
                        }
                        srv
                    })
                    .collect(),
            )
        })
    }

    proptest! {
        #[test]
        fn a_balanced_fleet_yields_an_empty_plan(
            // Capacities of 50 and more: flooring the sessions moves u by 0.02 at most, so
            // every server is within tolerance of U (the definition of balanced).
            caps in prop::collection::vec(50u32..1000, 1..50),
            u in 0.0f64..1.0,
        ) {
            let t = fleet(caps.iter().enumerate()
                .map(|(i, c)| server(&format!("s{i}"), *c, (f64::from(*c) * u).floor() as u64)).collect());
            let p = decide(&t, &cfg(), Capabilities::default(), now(), &History::default());
            prop_assert!(p.is_empty(), "{:?}", p);
        }

        #[test]
        fn total_shed_never_exceeds_what_the_others_can_absorb(t in arb_fleet(), frac in 0.1f64..1.0) {
            let mut c = cfg();
            c.rebalance.shed_fraction = frac;
            let totals = t.totals();
            let p = decide(&t, &c, Capabilities::default(), now(), &History::default());
            prop_assert!(p.shed_total() <= absorbable(&t, &totals));
            for a in &p.actions {
                if let ActionKind::Shed { server, count } = &a.kind {
                    let s = t.get(server).unwrap();
                    prop_assert!(*count <= s.sessions.known().unwrap() - threshold(s.capacity, &totals));
                }
            }
        }

        #[test]
        fn nothing_destructive_comes_from_a_snapshot_with_unknowns(t in arb_fleet(), which in any::<prop::sample::Index>(), stale in any::<bool>()) {
            let mut t = t;
            let i = which.index(t.servers.len());
            if stale { t.sources.health = false } else { t.servers[i].sessions = Count::Unknown }
            let c = DecideConfig::default();
            let mut h = History::default();
            let t0 = now();
            h.observe(&t, &c, t0);
            let p = decide(&t, &c, Capabilities::SCALER, t0 + Duration::from_secs(3600), &h);
            prop_assert!(p.actions.iter().all(|a| !a.kind.is_destructive()), "{:?}", p);
        }
    }
}
