//! The scale stage: reactivate or start servers when the fleet runs hot, cordon the
//! emptiest when it has run cold for a while, reap cordoned servers that have emptied.

use tokio::time::Instant;

use super::{Action, ActionKind, History, Plan, Reason, ScaleConfig};
use crate::topology::{Server, Topology, Totals};

pub fn plan(
    t: &Topology,
    totals: &Totals,
    cfg: &ScaleConfig,
    now: Instant,
    h: &History,
    gate: Option<&str>,
    plan: &mut Plan,
) {
    let u = totals.utilization();
    let mut budget = cfg.max_per_round;
    if u > cfg.scale_out_at || totals.active < cfg.min_servers {
        scale_out(t, totals, cfg, now, h, &mut budget, plan);
    } else if u < cfg.scale_in_at {
        scale_in(t, totals, cfg, now, h, gate, &mut budget, plan);
    }
    reap(t, cfg, now, h, gate, &mut budget, plan);
}

/// Mean capacity of the servers a new one would resemble.
fn typical_capacity(t: &Topology, totals: &Totals) -> f64 {
    if totals.active > 0 {
        return totals.capacity as f64 / f64::from(totals.active);
    }
    let n = t.servers.len().max(1) as f64;
    (t.servers.iter().map(|s| f64::from(s.capacity)).sum::<f64>() / n).max(1.0)
}

fn scale_out(
    t: &Topology,
    totals: &Totals,
    cfg: &ScaleConfig,
    now: Instant,
    h: &History,
    budget: &mut u32,
    plan: &mut Plan,
) {
    let u = totals.utilization();
    let per_server = typical_capacity(t, totals) * cfg.target_utilization;
    let needed = ((totals.sessions as f64 / per_server).ceil() as u32)
        .clamp(cfg.min_servers, cfg.max_servers);
    let have = totals.active + t.pending;
    let missing = needed.saturating_sub(have);
    if missing == 0 {
        return;
    }
    if h.scaled_out_within(now, cfg.cooldown) {
        plan.withheld.push(format!(
            "scale-out of {missing}: within cooldown of the last scale-out"
        ));
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
        .filter(|s| s.passing && s.is_cordoned())
        .collect();
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
    let room = cfg
        .max_servers
        .saturating_sub(t.servers.len() as u32 + t.pending);
    let start = want.min(room);
    if start == 0 {
        plan.withheld.push(format!(
            "scale-out: {want} more needed but max_servers {} reached",
            cfg.max_servers
        ));
    } else if cfg.can_start {
        plan.actions.push(Action {
            kind: ActionKind::Start { count: start },
            reason: reason.clone(),
        });
        *budget -= start;
    } else {
        plan.shortfall = start;
        plan.withheld.push(format!(
            "scale-out: {start} more server(s) needed ({reason}) but no scaler is configured"
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn scale_in(
    t: &Topology,
    totals: &Totals,
    cfg: &ScaleConfig,
    now: Instant,
    h: &History,
    gate: Option<&str>,
    budget: &mut u32,
    plan: &mut Plan,
) {
    let u = totals.utilization();
    let Some(low_for) = h.low_for(now) else {
        return;
    };
    if low_for < cfg.scale_in_after || totals.active <= cfg.min_servers {
        return;
    }
    if let Some(g) = gate {
        plan.withheld.push(format!("scale-in: {g}"));
        return;
    }
    if h.scaled_within(now, cfg.cooldown) {
        plan.withheld
            .push("scale-in: within cooldown of the last scale action".into());
        return;
    }
    let mut candidates: Vec<&Server> = t
        .servers
        .iter()
        .filter(|s| s.is_live() && !s.is_cordoned())
        .collect();
    candidates.sort_by(|a, b| {
        a.sessions
            .known()
            .cmp(&b.sessions.known())
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

fn reap(
    t: &Topology,
    cfg: &ScaleConfig,
    now: Instant,
    h: &History,
    gate: Option<&str>,
    budget: &mut u32,
    plan: &mut Plan,
) {
    if !cfg.can_reap {
        return;
    }
    for s in &t.servers {
        if *budget == 0 {
            break;
        }
        let Some(zero_for) = h.zero_for(&s.id, now) else {
            continue;
        };
        if zero_for < cfg.reap_after || !s.is_cordoned() || s.sessions.known() != Some(0) {
            continue;
        }
        if let Some(g) = gate {
            plan.withheld.push(format!("reap {}: {g}", s.id));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::decide::{decide, DecideConfig};
    use crate::topology::fixtures::{fleet, server};
    use crate::topology::Admin;

    fn cfg() -> DecideConfig {
        let mut c = DecideConfig::default();
        c.rebalance.enabled = false;
        c
    }

    fn kinds(p: &Plan) -> Vec<String> {
        p.actions
            .iter()
            .map(|a| match &a.kind {
                ActionKind::Start { count } => format!("start {count}"),
                k => format!("{} {}", k.label(), k.server().unwrap()),
            })
            .collect()
    }

    fn cordoned(id: &str, cap: u32, sessions: u64) -> crate::topology::Server {
        let mut s = server(id, cap, sessions);
        s.admin = Admin::Cordoned { since_ms: 0 };
        s
    }

    #[test]
    fn a_hot_fleet_reactivates_cordoned_servers_first() {
        // 160 sessions over 200 capacity: U = 0.8. Needed = ceil(160 / 55) = 3.
        let t = fleet(vec![
            server("a", 100, 80),
            server("b", 100, 80),
            cordoned("c", 100, 0),
        ]);
        let p = decide(&t, &cfg(), Instant::now(), &History::default());
        assert_eq!(kinds(&p), vec!["reactivate c"]);
    }

    #[test]
    fn what_reactivation_cannot_cover_is_started_or_reported_as_shortfall() {
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let p = decide(&t, &cfg(), Instant::now(), &History::default());
        assert!(p.is_empty());
        assert_eq!(p.shortfall, 2); // ceil(180 / 55) = 4 needed, 2 active
        let mut c = cfg();
        c.scale.can_start = true;
        let p = decide(&t, &c, Instant::now(), &History::default());
        assert_eq!(kinds(&p), vec!["start 2"]);
    }

    #[test]
    fn pending_servers_count_as_coming_capacity() {
        let mut t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        t.pending = 2;
        let mut c = cfg();
        c.scale.can_start = true;
        assert!(decide(&t, &c, Instant::now(), &History::default()).is_empty());
    }

    #[test]
    fn scale_out_respects_cooldown_and_max_servers() {
        let t = fleet(vec![server("a", 100, 90), server("b", 100, 90)]);
        let mut c = cfg();
        c.scale.can_start = true;
        let t0 = Instant::now();
        let mut h = History::default();
        let p = decide(&t, &c, t0, &h);
        h.record(&p, t0);
        assert!(decide(&t, &c, t0 + Duration::from_secs(29), &h).is_empty());
        c.scale.max_servers = 3;
        let p = decide(&t, &c, t0 + Duration::from_secs(31), &h);
        assert_eq!(kinds(&p), vec!["start 1"]);
    }

    #[test]
    fn a_cold_fleet_cordons_the_emptiest_only_after_scale_in_after() {
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
        assert!(decide(&t, &c, t0 + Duration::from_secs(59), &h).is_empty());
        let p = decide(&t, &c, t0 + Duration::from_secs(60), &h);
        // Removing c, d, b leaves 60/100 = 0.6 > 0.55: stop at two.
        assert_eq!(kinds(&p), vec!["cordon c", "cordon d"]);
    }

    #[test]
    fn scale_in_never_goes_below_min_servers() {
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
        let p = decide(&t, &c, t0 + Duration::from_secs(120), &h);
        assert_eq!(kinds(&p), vec!["cordon a"]);
    }

    #[test]
    fn a_stale_snapshot_resets_the_low_utilization_clock() {
        let mut t = fleet(vec![server("a", 100, 1), server("b", 100, 1)]);
        let c = cfg();
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        t.sources.states = false;
        h.observe(&t, &c, t0 + Duration::from_secs(30));
        t.sources.states = true;
        h.observe(&t, &c, t0 + Duration::from_secs(40));
        assert!(decide(&t, &c, t0 + Duration::from_secs(90), &h).is_empty());
        assert_eq!(
            kinds(&decide(&t, &c, t0 + Duration::from_secs(100), &h)),
            vec!["cordon a"]
        );
    }

    #[test]
    fn empty_cordoned_servers_are_reaped_after_reap_after_when_a_scaler_can() {
        let t = fleet(vec![server("a", 100, 50), cordoned("z", 100, 0)]);
        let mut c = cfg();
        c.scale.can_reap = true;
        let t0 = Instant::now();
        let mut h = History::default();
        h.observe(&t, &c, t0);
        assert!(decide(&t, &c, t0 + Duration::from_secs(9), &h).is_empty());
        assert_eq!(
            kinds(&decide(&t, &c, t0 + Duration::from_secs(10), &h)),
            vec!["reap z"]
        );
        c.scale.can_reap = false;
        assert!(decide(&t, &c, t0 + Duration::from_secs(10), &h).is_empty());
    }
}
