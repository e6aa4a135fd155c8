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

    /// Containers of ours that never became healthy in time, or that stopped: removed.
    pub(super) fn discard(&self, plan: &mut Plan) {
        let (t, now, h) = (self.t, self.now, self.history);
        let Some(timeout) = self.cfg.provision_timeout else {
            return;
        };
        if !self.can.can_reap {
            return;
        }
        for c in &t.containers {
            let passing = t.get(&c.server).is_some_and(|s| s.passing);
            let reason = if c.state == ContainerState::Stopped && !passing {
                Reason::Provision {
                    what: "container stopped",
                    for_s: 0,
                }
            } else {
                match h.pending_for(&c.server, now) {
                    Some(d) if d >= timeout && !passing => Reason::Provision {
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
    use crate::fleet::topology::ContainerState;

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
        h.record(&p, t0 + Duration::from_secs(20));

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
}
