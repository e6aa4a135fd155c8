//! The scale stage: reactivate or start servers when the fleet runs hot, cordon the
//! emptiest when it has run cold for a while, reap cordoned servers that have emptied.

use tokio::time::Instant;

use super::{Action, ActionKind, Capabilities, Gate, History, Plan, Reason, ScaleConfig, Withheld};
use crate::fleet::topology::{Server, Topology, Totals};

/// Everything one scale round is judged on.
pub struct Round<'a> {
    pub t: &'a Topology,
    pub totals: &'a Totals,
    pub cfg: &'a ScaleConfig,
    pub can: Capabilities,
    pub now: Instant,
    pub history: &'a History,
    /// Why nothing destructive may be done this round, if so.
    pub gate: Option<&'a Gate>,
}

impl Round<'_> {
    /// Adds this round's scale actions (at most `max_per_round` servers) to `plan`.
    pub fn plan(&self, plan: &mut Plan) {
        let u = self.totals.utilization();
        let mut budget = self.cfg.max_per_round;
        // Passing servers whose count is unknown are capacity all the same: a Redis outage
        // must not look like an empty fleet.
        let serving = self.totals.active + self.totals.unknown;
        if u > self.cfg.scale_out_at || serving < self.cfg.min_servers {
            self.scale_out(&mut budget, plan);
        } else if u < self.cfg.scale_in_at {
            self.scale_in(&mut budget, plan);
        }
        self.reap(&mut budget, plan);
        self.discard(&mut budget, plan);
    }

    /// With container scaling, actions on containers need a current container list.
    pub(super) fn containers_gate(&self) -> Option<Gate> {
        (self.cfg.provision_timeout.is_some() && !self.t.containers_synced)
            .then_some(Gate::ContainersNotSynced)
    }

    /// The round's gate, or else the container list's.
    pub(super) fn destructive_gate(&self) -> Option<Gate> {
        self.gate.cloned().or_else(|| self.containers_gate())
    }

    /// Mean capacity of the servers a new one would resemble.
    fn typical_capacity(&self) -> f64 {
        let (t, totals) = (self.t, self.totals);
        if totals.active > 0 {
            return totals.capacity as f64 / f64::from(totals.active);
        }
        let n = t.servers.len().max(1) as f64;
        (t.servers.iter().map(|s| f64::from(s.capacity)).sum::<f64>() / n).max(1.0)
    }

    fn scale_out(&self, budget: &mut u32, plan: &mut Plan) {
        let (t, totals, cfg, now, h) = (self.t, self.totals, self.cfg, self.now, self.history);
        let u = totals.utilization();
        let per_server = self.typical_capacity() * cfg.target_utilization;
        let needed = ((totals.sessions as f64 / per_server).ceil() as u32)
            .clamp(cfg.min_servers, cfg.max_servers);
        let have = totals.active + totals.unknown + t.pending;
        let missing = needed.saturating_sub(have);
        if missing == 0 {
            return;
        }
        if h.scaled_out_within(now, cfg.cooldown) {
            plan.withheld.push(Withheld::ScaleOutCooldown { missing });
            return;
        }
        if h.backing_off(now, cfg.cooldown) {
            plan.withheld.push(Withheld::ScaleOutBackingOff { missing });
            return;
        }
        let reason = Reason::ScaleOut {
            u,
            scale_out_at: cfg.scale_out_at,
            active: totals.active,
            min_servers: cfg.min_servers,
            needed,
            have,
        };
        let mut want = missing.min(*budget);

        let mut cordoned: Vec<&Server> = t
            .servers
            .iter()
            .filter(|s| s.passing && s.is_cordoned() && !s.is_held_by_operator())
            .collect();
        let held = t
            .servers
            .iter()
            .filter(|s| s.passing && s.is_held_by_operator())
            .count() as u32;
        // Servers still holding sessions are the warmest: bring those back first.
        cordoned.sort_by(|a, b| {
            b.sessions
                .known()
                .cmp(&a.sessions.known())
                .then(a.id.cmp(&b.id))
        });
        for s in cordoned.into_iter().take(want as usize) {
            plan.actions.push(Action {
                kind: ActionKind::Reactivate {
                    server: s.id.clone(),
                },
                reason: reason.clone(),
            });
            want -= 1;
            *budget -= 1;
        }
        if want == 0 {
            return;
        }
        if held > 0 {
            plan.withheld
                .push(Withheld::OperatorCordons { servers: held });
        }
        let room = cfg
            .max_servers
            .saturating_sub(t.servers.len() as u32 + t.pending);
        // On stale or partial data a scale-out is allowed, but one server per cooldown.
        let start = if self.gate.is_some() {
            want.min(room).min(1)
        } else {
            want.min(room)
        };
        if start == 0 {
            plan.withheld.push(Withheld::ScaleOutMaxServers {
                want,
                max_servers: cfg.max_servers,
            });
        } else if !self.can.can_start {
            plan.shortfall = start;
            plan.withheld
                .push(Withheld::ScaleOutNoScaler { start, reason });
        } else if let Some(gate) = self.containers_gate() {
            plan.shortfall = start;
            plan.withheld.push(Withheld::ScaleOutGated { start, gate });
        } else {
            plan.actions.push(Action {
                kind: ActionKind::Start { count: start },
                reason,
            });
            *budget -= start;
        }
    }

    fn scale_in(&self, budget: &mut u32, plan: &mut Plan) {
        let (t, totals, cfg, now, h) = (self.t, self.totals, self.cfg, self.now, self.history);
        let u = totals.utilization();
        let Some(low_for) = h.low_for(now) else {
            return;
        };
        if low_for < cfg.scale_in_after || totals.active <= cfg.min_servers {
            return;
        }
        if let Some(g) = self.gate {
            plan.withheld.push(Withheld::ScaleInGated(g.clone()));
            return;
        }
        if h.scaled_within(now, cfg.cooldown) {
            plan.withheld.push(Withheld::ScaleInCooldown);
            return;
        }
        let mut candidates: Vec<&Server> = t
            .servers
            .iter()
            .filter(|s| s.is_live() && !s.is_cordoned())
            .collect();
        // Fewest sessions first; among equals, servers in our containers (they can be reaped),
        // newest first.
        candidates.sort_by(|a, b| {
            let created = |s: &Server| t.container(&s.id).map(|c| c.created_s);
            a.sessions
                .known()
                .cmp(&b.sessions.known())
                .then(created(b).is_some().cmp(&created(a).is_some()))
                .then(created(b).cmp(&created(a)))
                .then(a.id.cmp(&b.id))
        });
        let mut capacity = totals.capacity;
        let mut active = totals.active;
        for s in candidates {
            if *budget == 0 || active <= cfg.min_servers {
                break;
            }
            let left = capacity - u64::from(s.capacity);
            // Stop before the remaining servers would run above the target.
            if left == 0 || totals.sessions as f64 / left as f64 > cfg.target_utilization {
                continue;
            }
            capacity = left;
            active -= 1;
            *budget -= 1;
            plan.actions.push(Action {
                kind: ActionKind::Cordon {
                    server: s.id.clone(),
                },
                reason: Reason::ScaleIn {
                    u,
                    scale_in_at: cfg.scale_in_at,
                    low_for_s: low_for.as_secs(),
                    sessions: s.sessions.known().unwrap_or(0),
                },
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::controller::decide::{decide, Capabilities, DecideConfig};
    use crate::fleet::topology::fixtures::{fleet, server};
    use crate::fleet::topology::{Admin, ContainerState, OwnedContainer, Topology};

    pub(crate) fn cfg() -> DecideConfig {
        let mut c = DecideConfig::default();
        c.rebalance.enabled = false;
        c
    }

    pub(crate) fn kinds(p: &Plan) -> Vec<String> {
        p.actions
            .iter()
            .map(|a| match &a.kind {
                ActionKind::Start { count } => format!("start {count}"),
                k => format!("{} {}", k.label(), k.server().unwrap()),
            })
            .collect()
    }

    pub(crate) fn cordoned(id: &str, cap: u32, sessions: u64) -> crate::fleet::topology::Server {
        let mut s = server(id, cap, sessions);
        s.admin = Admin::Cordoned {
            since_ms: 0,
            by_operator: false,
        };
        s
    }

    #[test]
    fn a_hot_fleet_reactivates_cordoned_servers_first() {
        let can = Capabilities::default();
        // 160 sessions over 200 capacity: U = 0.8. Needed = ceil(160 / 55) = 3.
        let t = fleet(vec![
            server("a", 100, 80),
            server("b", 100, 80),
            cordoned("c", 100, 0),
        ]);
        let p = decide(&t, &cfg(), can, Instant::now(), &History::default());
        assert_eq!(kinds(&p), vec!["reactivate c"]);
    }

    #[test]
    fn what_reactivation_cannot_cover_is_started_or_reported_as_shortfall() {
        let mut can = Capabilities::default();
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let p = decide(&t, &cfg(), can, Instant::now(), &History::default());
        assert!(p.is_empty());
        assert_eq!(p.shortfall, 2); // ceil(180 / 55) = 4 needed, 2 active
        let c = cfg();
        can.can_start = true;
        let p = decide(&t, &c, can, Instant::now(), &History::default());
        assert_eq!(kinds(&p), vec!["start 2"]);
    }

    #[test]
    fn pending_servers_count_as_coming_capacity() {
        let mut can = Capabilities::default();
        let mut t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        t.pending = 2;
        let c = cfg();
        can.can_start = true;
        assert!(decide(&t, &c, can, Instant::now(), &History::default()).is_empty());
    }

    #[test]
    fn scale_out_respects_cooldown_and_max_servers() {
        let mut can = Capabilities::default();
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let mut c = cfg();
        can.can_start = true;
        let t0 = Instant::now();
        let mut h = History::default();
        let p = decide(&t, &c, can, t0, &h);
        h.record(&p, &t, t0);
        assert!(decide(&t, &c, can, t0 + Duration::from_secs(29), &h).is_empty());
        c.scale.max_servers = 3;
        let p = decide(&t, &c, can, t0 + Duration::from_secs(31), &h);
        assert_eq!(kinds(&p), vec!["start 1"]);
    }

    #[test]
    fn a_cold_fleet_cordons_the_emptiest_only_after_scale_in_after() {
        let can = Capabilities::default();
        // 60 sessions over 400: U = 0.15.
        let t = fleet(vec![
            server("a", 100, 30),
            server("b", 100, 20),
            server("c", 100, 5),
            server("d", 100, 5),
        ]);
        let c = cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert!(decide(&t, &c, can, t0 + Duration::from_secs(59), &h).is_empty());
        let p = decide(&t, &c, can, t0 + Duration::from_secs(60), &h);
        // Removing c, d, b leaves 60/100 = 0.6 > 0.55: stop at two.
        assert_eq!(kinds(&p), vec!["cordon c", "cordon d"]);
    }

    #[test]
    fn scale_in_never_goes_below_min_servers() {
        let can = Capabilities::default();
        let t = fleet(vec![
            server("a", 100, 1),
            server("b", 100, 1),
            server("c", 100, 1),
        ]);
        let mut c = cfg();
        c.scale.min_servers = 2;
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        let p = decide(&t, &c, can, t0 + Duration::from_secs(120), &h);
        assert_eq!(kinds(&p), vec!["cordon a"]);
    }

    #[test]
    fn a_stale_snapshot_resets_the_low_utilization_clock() {
        let can = Capabilities::default();
        let mut t = fleet(vec![server("a", 100, 1), server("b", 100, 1)]);
        let c = cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        t.sources.states = false;
        h.observe(&t, &c, t0 + Duration::from_secs(30));
        t.sources.states = true;
        h.observe(&t, &c, t0 + Duration::from_secs(40));
        assert!(decide(&t, &c, can, t0 + Duration::from_secs(90), &h).is_empty());
        assert_eq!(
            kinds(&decide(&t, &c, can, t0 + Duration::from_secs(100), &h)),
            vec!["cordon a"]
        );
    }

    pub(crate) fn docker_cfg() -> DecideConfig {
        let mut c = cfg();
        c.scale.provision_timeout = Some(Duration::from_secs(20));
        c
    }

    pub(crate) fn owned(t: &mut Topology, server: &str, state: ContainerState, created_s: i64) {
        t.containers.push(OwnedContainer {
            server: server.into(),
            state,
            created_s,
        });
        t.containers.sort_by(|a, b| a.server.cmp(&b.server));
        t.containers_synced = true;
    }

    #[test]
    fn scale_in_cordons_our_newest_containers_first_among_equals() {
        let can = Capabilities::SCALER;
        let mut t = fleet(vec![
            server("a", 100, 5),
            server("b", 100, 5),
            server("c-old", 100, 5),
            server("d-new", 100, 5),
        ]);
        owned(&mut t, "c-old", ContainerState::Running, 100);
        owned(&mut t, "d-new", ContainerState::Running, 200);
        let mut c = docker_cfg();
        c.scale.max_per_round = 1;
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert_eq!(
            kinds(&decide(&t, &c, can, t0 + Duration::from_secs(60), &h)),
            vec!["cordon d-new"]
        );
    }

    #[test]
    fn an_operators_cordon_is_never_undone_and_the_shortfall_is_said() {
        // 160 sessions over 200: U = 0.8, three servers needed; one cordoned by an operator,
        // one by the controller.
        let mut held = cordoned("op", 100, 0);
        held.admin = Admin::Cordoned {
            since_ms: 0,
            by_operator: true,
        };
        let t = fleet(vec![
            server("a", 100, 80),
            server("b", 100, 80),
            held,
            cordoned("c", 100, 0),
        ]);
        let p = decide(
            &t,
            &cfg(),
            Capabilities::default(),
            Instant::now(),
            &History::default(),
        );
        assert_eq!(
            kinds(&p),
            vec!["reactivate c"],
            "the controller's own cordon only"
        );
        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 90),
            t.get("op").unwrap().clone(),
        ]);
        let p = decide(
            &t,
            &cfg(),
            Capabilities::default(),
            Instant::now(),
            &History::default(),
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.shortfall, 2, "needed, and not taken from the operator");
        assert!(
            p.withheld.iter().any(|w| w
                .to_string()
                .contains("1 server(s) cordoned by an operator")),
            "{p:?}"
        );
        // Nor is an operator's empty server reaped.
        let mut t = fleet(vec![server("a", 100, 50), t.get("op").unwrap().clone()]);
        owned(&mut t, "op", ContainerState::Running, 1);
        let c = cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert!(decide(
            &t,
            &c,
            Capabilities::SCALER,
            t0 + Duration::from_secs(60),
            &h
        )
        .is_empty());
    }

    #[test]
    fn passing_servers_with_unknown_counts_are_capacity_not_a_reason_to_scale_out() {
        // A Redis outage: every count unknown. Before, this was an empty fleet below
        // min_servers, and a Start fired every cooldown up to max_servers.
        let mut t = fleet(vec![
            server("a", 100, 0),
            server("b", 100, 0),
            server("c", 100, 0),
        ]);
        for s in &mut t.servers {
            s.sessions = crate::fleet::topology::Count::Unknown;
        }
        t.sources.sessions = false;
        let mut c = cfg();
        c.scale.min_servers = 3;
        let p = decide(
            &t,
            &c,
            Capabilities::SCALER,
            Instant::now(),
            &History::default(),
        );
        assert!(p.is_empty(), "{p:?}");
        // With min_servers above what is there, one Start, not all that are missing.
        c.scale.min_servers = 6;
        let p = decide(
            &t,
            &c,
            Capabilities::SCALER,
            Instant::now(),
            &History::default(),
        );
        assert_eq!(kinds(&p), vec!["start 1"], "{p:?}");
        t.sources.sessions = true;
        for s in &mut t.servers {
            s.sessions = crate::fleet::topology::Count::Known(0);
        }
        let p = decide(
            &t,
            &c,
            Capabilities::SCALER,
            Instant::now(),
            &History::default(),
        );
        assert_eq!(
            kinds(&p),
            vec!["start 3"],
            "on a complete snapshot, all of them"
        );
    }
}
