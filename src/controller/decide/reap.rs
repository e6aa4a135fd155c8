//! Stopping servers: reap cordoned servers that have stayed empty for `reap_after`, and
//! discard containers of ours whose server never came up. Part of the scale round.

use super::scale::Round;
use super::{Action, ActionKind, Plan, Reason, Withheld};
use crate::fleet::topology::ContainerState;

impl Round<'_> {
    pub(super) fn reap(&self, budget: &mut u32, plan: &mut Plan) {
        let (t, cfg, now, h) = (self.t, self.cfg, self.now, self.history);
        if !self.can.can_reap {
            // Said and counted, as a scale-out nobody can start is.
            plan.unreaped = t
                .servers
                .iter()
                .filter(|s| {
                    s.is_cordoned()
                        && !s.is_held_by_operator()
                        && s.sessions.known() == Some(0)
                        && h.zero_for(&s.id, now).is_some_and(|z| z >= cfg.reap_after)
                })
                .count() as u32;
            if plan.unreaped > 0 {
                plan.withheld.push(Withheld::ReapNoScaler {
                    servers: plan.unreaped,
                });
            }
            return;
        }
        for s in &t.servers {
            if *budget == 0 {
                break;
            }
            let Some(zero_for) = h.zero_for(&s.id, now) else {
                continue;
            };
            if zero_for < cfg.reap_after
                || !s.is_cordoned()
                || s.is_held_by_operator()
                || s.sessions.known() != Some(0)
            {
                continue;
            }
            // Only servers running in a container this pipeline owns can be stopped.
            if t.container(&s.id).is_none() {
                continue;
            }
            if let Some(gate) = self.destructive_gate() {
                plan.withheld.push(Withheld::ReapGated {
                    server: s.id.clone(),
                    gate,
                });
                continue;
            }
            *budget -= 1;
            plan.actions.push(Action {
                kind: ActionKind::Reap {
                    server: s.id.clone(),
                },
                reason: Reason::Empty {
                    zero_for_s: zero_for.as_secs(),
                },
            });
        }
    }

    /// Containers of ours whose server never passed within the provision timeout, or that
    /// stopped, are removed: at most the round's budget, and not within a cooldown of the
    /// last discard. A server that passed once and fails now is failing, not a provisioning
    /// that did not work, and its container is kept; so is one created long before this
    /// controller began watching (whether it passed is not known).
    pub(super) fn discard(&self, budget: &mut u32, plan: &mut Plan) {
        let (t, now, h) = (self.t, self.now, self.history);
        let Some(timeout) = self.cfg.provision_timeout else {
            return;
        };
        if !self.can.can_reap {
            return;
        }
        for c in &t.containers {
            let passing = t.get(&c.server).is_some_and(|s| s.passing);
            if passing {
                continue;
            }
            let reason = if c.state == ContainerState::Stopped {
                Reason::Provision {
                    what: "container stopped",
                    for_s: 0,
                }
            } else if h.has_passed(&c.server) || !h.watched_from_birth(c.created_s, timeout) {
                continue;
            } else {
                match h.pending_for(&c.server, now) {
                    Some(d) if d >= timeout => Reason::Provision {
                        what: "not passing within provision_timeout",
                        for_s: d.as_secs(),
                    },
                    _ => continue,
                }
            };
            if let Some(gate) = self.destructive_gate() {
                plan.withheld.push(Withheld::DiscardGated {
                    server: c.server.clone(),
                    gate,
                });
                continue;
            }
            if *budget == 0 || h.discarded_within(now, self.cfg.cooldown) {
                plan.withheld.push(Withheld::DiscardPaced {
                    server: c.server.clone(),
                });
                continue;
            }
            *budget -= 1;
            plan.actions.push(Action {
                kind: ActionKind::Discard {
                    server: c.server.clone(),
                },
                reason,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::super::scale::tests::{cfg, cordoned, docker_cfg, kinds, owned};
    use crate::controller::decide::{decide, Capabilities, History};
    use crate::fleet::topology::fixtures::{fleet, server};
    use crate::fleet::topology::{ContainerState, Topology};

    #[test]
    fn empty_cordoned_servers_are_reaped_after_reap_after_when_a_scaler_can() {
        let mut can = Capabilities::default();
        let mut t = fleet(vec![server("a", 100, 50), cordoned("z", 100, 0)]);
        owned(&mut t, "z", ContainerState::Running, 1);
        let c = cfg();
        can.can_reap = true;
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert!(decide(&t, &c, can, t0 + Duration::from_secs(9), &h).is_empty());
        assert_eq!(
            kinds(&decide(&t, &c, can, t0 + Duration::from_secs(10), &h)),
            vec!["reap z"]
        );
        can.can_reap = false;
        assert!(decide(&t, &c, can, t0 + Duration::from_secs(10), &h).is_empty());
    }

    #[test]
    fn only_servers_in_our_containers_are_reaped() {
        let can = Capabilities::SCALER;
        let mut t = fleet(vec![
            server("a", 100, 50),
            cordoned("mine", 100, 0),
            cordoned("theirs", 100, 0),
        ]);
        owned(&mut t, "mine", ContainerState::Running, 1);
        let c = docker_cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert_eq!(
            kinds(&decide(&t, &c, can, t0 + Duration::from_secs(10), &h)),
            vec!["reap mine"]
        );
    }

    #[test]
    fn a_container_that_never_passes_is_discarded_and_scale_out_backs_off() {
        let can = Capabilities::SCALER;
        let mut t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let mut stuck = server("new", 100, 0);
        stuck.passing = false;
        stuck.provisioning = true;
        t.servers.push(stuck);
        t.pending = 1;
        owned(&mut t, "new", ContainerState::Running, 1);
        let c = docker_cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert_eq!(
            t.totals().failing,
            0,
            "a provisioning server is pending, not failing"
        );
        assert!(
            !kinds(&decide(&t, &c, can, t0 + Duration::from_secs(19), &h))
                .contains(&"discard new".to_string())
        );
        let p = decide(&t, &c, can, t0 + Duration::from_secs(20), &h);
        assert!(kinds(&p).contains(&"discard new".to_string()), "{p:?}");
        h.record(&p, &t, t0 + Duration::from_secs(20));

        // Gone, and the scale-out it was part of backs off for a cooldown (30 s).
        let t2 = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let mut t2 = t2;
        t2.containers_synced = true;
        let later = t0 + Duration::from_secs(25);
        assert!(decide(&t2, &c, can, later, &h)
            .withheld
            .iter()
            .any(|w| w.to_string().contains("backing off")));
        assert_eq!(
            kinds(&decide(&t2, &c, can, t0 + Duration::from_secs(51), &h)),
            vec!["start 2"]
        );
    }

    #[test]
    fn no_container_is_started_or_stopped_while_the_container_list_is_unknown() {
        let can = Capabilities::SCALER;
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let p = decide(&t, &docker_cfg(), can, Instant::now(), &History::default());
        assert!(p.is_empty());
        assert!(
            p.withheld
                .iter()
                .any(|w| w.to_string().contains("container list is not synced")),
            "{:?}",
            p.withheld
        );
        assert_eq!(p.shortfall, 2, "what cannot be started is reported");
    }

    #[test]
    fn a_reap_nobody_can_do_is_said_and_counted() {
        let t = fleet(vec![server("a", 100, 50), cordoned("z", 100, 0)]);
        let c = cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        let p = decide(
            &t,
            &c,
            Capabilities::default(),
            t0 + Duration::from_secs(5),
            &h,
        );
        assert_eq!((p.unreaped, p.withheld.len()), (0, 0), "not yet reap_after");
        let p = decide(
            &t,
            &c,
            Capabilities::default(),
            t0 + Duration::from_secs(10),
            &h,
        );
        assert!(p.is_empty());
        assert_eq!(p.unreaped, 1);
        assert!(
            p.withheld[0]
                .to_string()
                .contains("no scaler is configured"),
            "{p:?}"
        );
    }

    /// a, b serving; `ours` in a container of ours, passing or not as asked.
    fn with_ours(passing: bool) -> Topology {
        let mut t = fleet(vec![server("a", 100, 50), server("b", 100, 50)]);
        let mut ours = server("ours", 100, 10);
        ours.passing = passing;
        t.servers.push(ours);
        t.servers.sort_by(|x, y| x.id.cmp(&y.id));
        owned(&mut t, "ours", ContainerState::Running, 1);
        t
    }

    fn discards(p: &crate::controller::decide::Plan) -> usize {
        kinds(p).iter().filter(|k| k.starts_with("discard")).count()
    }

    #[test]
    fn a_server_that_passed_then_fails_past_the_timeout_is_kept_as_failing() {
        let c = docker_cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&with_ours(true), &c, t0);
        let failing = with_ours(false);
        for s in [1, 30, 120] {
            let now = t0 + Duration::from_secs(s);
            h.observe(&failing, &c, now);
            let p = decide(&failing, &c, Capabilities::SCALER, now, &h);
            assert_eq!(discards(&p), 0, "at {s} s: {p:?}");
        }
        // Absent from the health answer after passing: unknown, kept too.
        let mut absent = with_ours(true);
        absent.servers.retain(|s| &*s.id != "ours");
        let later = t0 + Duration::from_secs(300);
        h.observe(&absent, &c, later);
        assert_eq!(
            discards(&decide(&absent, &c, Capabilities::SCALER, later, &h)),
            0
        );
    }

    #[test]
    fn a_container_older_than_this_controllers_watch_is_never_discarded_for_provisioning() {
        let c = docker_cfg(); // provision_timeout 20 s
        let t = with_ours(false); // created at 1 (unix s)
        let t0 = Instant::now();
        // Discards a minute on, by a controller watching since `watching_from` (unix s).
        let discarded = |watching_from: i64| {
            let mut h = History::watching_from(watching_from);
            h.observe(&t, &c, t0);
            let p = decide(
                &t,
                &c,
                Capabilities::SCALER,
                t0 + Duration::from_secs(60),
                &h,
            );
            discards(&p)
        };
        assert_eq!(
            discarded(1_000),
            0,
            "watching since long after: it may well have passed"
        );
        assert_eq!(
            discarded(10),
            1,
            "watching since just after its creation: it never passed"
        );
    }

    #[test]
    fn an_empty_health_answer_while_our_containers_run_destroys_nothing() {
        // A 200 [] from Consul (an ACL-filtered token, a catalog restore).
        let mut t = fleet(vec![]);
        owned(&mut t, "x1", ContainerState::Running, 1);
        owned(&mut t, "x2", ContainerState::Running, 1);
        let c = docker_cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        let p = decide(
            &t,
            &c,
            Capabilities::SCALER,
            t0 + Duration::from_secs(120),
            &h,
        );
        assert_eq!(discards(&p), 0, "{p:?}");
        assert!(
            p.withheld.iter().any(|w| w
                .to_string()
                .contains("Consul lists no server while 2 container(s)")),
            "{p:?}"
        );
    }

    #[test]
    fn discards_are_capped_per_round_and_spaced_by_the_cooldown() {
        let mut t = fleet(vec![server("a", 100, 50), server("b", 100, 50)]);
        for i in 0..8 {
            owned(&mut t, &format!("x{i}"), ContainerState::Running, 1);
        }
        let c = docker_cfg(); // max_per_round 5, cooldown 30 s
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        let first = t0 + Duration::from_secs(20);
        let p = decide(&t, &c, Capabilities::SCALER, first, &h);
        assert_eq!(discards(&p), 5, "{p:?}");
        h.record(&p, &t, first);
        let again = decide(
            &t,
            &c,
            Capabilities::SCALER,
            first + Duration::from_secs(10),
            &h,
        );
        assert_eq!(discards(&again), 0, "within the cooldown: {again:?}");
        let later = first + c.scale.cooldown;
        assert_eq!(
            discards(&decide(&t, &c, Capabilities::SCALER, later, &h)),
            3,
            "the other three, after the cooldown"
        );
    }
}
