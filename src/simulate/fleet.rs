//! The fleet model: discrete time in one-second ticks, everything random drawn from one
//! seeded generator, so a seed gives the same figures every time. Each tick: events, churn,
//! reconnects landing through the routing model, then the algorithm's decision applied —
//! for `ours`, the controller's own `decide()` on a snapshot built like the controller's.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::baselines::{clb_round, naive_round};
use super::scenario::{EventKind, Routing, Scenario};
use crate::controller::decide::{decide, ActionKind, Capabilities, DecideConfig, History};
use crate::fleet::topology::{
    Admin, ContainerState, Count, OwnedContainer, Server, ServerId, SourcesSynced, Topology,
};

/// Which decisions run the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// The controller's `decide()`: paced, absorb-capped, with the scale stage when enabled.
    Ours,
    /// Elixir `ClusterLoadBalancer`: most loaded node only, above average × 1.25, half its
    /// excess capped at 100, a round every 10 s.
    Clb,
    /// The original design without pacing: every over-utilized server sheds its whole
    /// excess, every round (each second).
    Naive,
}

/// A shedding server refuses new sessions this long (the agent's window + 2 s).
pub const HOLD_S: u64 = 4;

#[derive(Debug, Clone)]
struct SimServer {
    id: ServerId,
    capacity: u32,
    sessions: u64,
    cordoned: bool,
    /// Running and taking part (false while restarting).
    up: bool,
    /// Provisioned from this tick on (started servers warm up first).
    up_at: u64,
    gone: bool,
    hold_until: u64,
}

impl SimServer {
    fn eligible(&self, t: u64) -> bool {
        self.up && !self.gone && !self.cordoned && t >= self.up_at
    }
    fn u(&self) -> f64 {
        self.sessions as f64 / f64::from(self.capacity)
    }
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Figures {
    pub algorithm: Algorithm,
    pub scenario: String,
    pub seed: u64,
    /// Longest time from a disturbance until the fleet stays within tolerance; `None` when
    /// it did not settle before the next disturbance or the end.
    pub converge_s: Option<u64>,
    /// Largest spread of utilization (max − min) after the first disturbance.
    pub worst_imbalance: f64,
    /// Sessions the algorithm told servers to close.
    pub moved: u64,
    /// Σ max(0, sessions − target) at each disturbance: what any rebalancer must move.
    pub minimum: u64,
    /// Servers that both shed and received moved sessions within one 15 s round.
    pub oscillations: u64,
    pub scale_actions: u64,
    /// A scale-out undone within the cooldown, or the reverse.
    pub scale_flaps: u64,
    pub peak_reconnects_per_s: u64,
    pub servers_end: usize,
    pub sessions_end: u64,
}

impl Figures {
    pub fn moved_ratio(&self) -> Option<f64> {
        (self.minimum > 0).then(|| self.moved as f64 / self.minimum as f64)
    }
}

/// Utilization over time, for the chart.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub times: Vec<u64>,
    pub fleet: Vec<f64>,
    /// `(server, utilization per sample; NaN while it is not taking part)`.
    pub servers: Vec<(String, Vec<f64>)>,
}

/// Servers shown on the chart at most.
pub const CHART_SERVERS: usize = 12;

enum Internal {
    Down(usize),
    Up(usize),
}

struct Sim<'a> {
    sc: &'a Scenario,
    algorithm: Algorithm,
    cfg: DecideConfig,
    rng: StdRng,
    servers: Vec<SimServer>,
    index: HashMap<ServerId, usize>,
    next_id: u64,
    /// Reconnects due per tick: moved (commanded) and forced (crash, restart).
    moved_due: Vec<u64>,
    forced_due: Vec<u64>,
    target: f64,
    ramp: Option<(f64, u64)>,
    internal: Vec<(u64, Internal)>,
    history: History,
    base: Instant,
    disturbances: Vec<u64>,
    minimum: u64,
    moved: u64,
    shed_in_round: HashSet<usize>,
    got_in_round: HashSet<usize>,
    oscillations: u64,
    scale_events: Vec<(u64, bool)>,
    peak: u64,
    converged: Vec<bool>,
    worst: f64,
    series: Series,
    sample_every: u64,
}

/// Runs one scenario with one algorithm and the default decision settings.
pub fn run(sc: &Scenario, algorithm: Algorithm, seed: u64) -> (Figures, Series) {
    run_with(sc, algorithm, seed, DecideConfig::default())
}

/// Runs one scenario with one algorithm; `cfg` drives the controller's decisions and the
/// scoring alike (a server within `tolerance` of U counts as balanced, oscillation is counted
/// per `round_interval`, a scale action undone within `cooldown` is a flap).
pub fn run_with(
    sc: &Scenario,
    algorithm: Algorithm,
    seed: u64,
    mut cfg: DecideConfig,
) -> (Figures, Series) {
    cfg.scale.enabled &= sc.autoscale;
    let horizon = sc.duration_s as usize + 64;
    let mut sim = Sim {
        sc,
        algorithm,
        cfg,
        rng: StdRng::seed_from_u64(seed),
        servers: Vec::new(),
        index: HashMap::new(),
        next_id: 0,
        moved_due: vec![0; horizon],
        forced_due: vec![0; horizon],
        target: 0.0,
        ramp: None,
        internal: Vec::new(),
        history: History::default(),
        base: Instant::now(),
        disturbances: vec![0],
        minimum: 0,
        moved: 0,
        shed_in_round: HashSet::new(),
        got_in_round: HashSet::new(),
        oscillations: 0,
        scale_events: Vec::new(),
        peak: 0,
        converged: Vec::with_capacity(horizon),
        worst: 0.0,
        series: Series::default(),
        sample_every: (sc.duration_s / 600).max(1),
    };
    for g in &sc.servers {
        for _ in 0..g.count {
            sim.add(g.capacity, g.sessions, 0);
        }
    }
    sim.target = sim.servers.iter().map(|s| s.sessions as f64).sum();
    sim.minimum += sim.minimum_now(0);
    for t in 0..=sc.duration_s {
        sim.tick(t);
    }
    sim.finish(seed)
}

impl Sim<'_> {
    fn add(&mut self, capacity: u32, sessions: u64, up_at: u64) -> usize {
        let id: ServerId = format!("s{:06}", self.next_id).into();
        self.next_id += 1;
        let i = self.servers.len();
        self.index.insert(id.clone(), i);
        self.servers.push(SimServer {
            id,
            capacity,
            sessions,
            cordoned: false,
            up: true,
            up_at,
            gone: false,
            hold_until: 0,
        });
        i
    }

    fn jitter(&mut self) -> u64 {
        1 + (self.rng.random::<f64>() * self.sc.reconnect_jitter_s).round() as u64
    }

    /// Stochastic rounding: the expectation is kept, the draw is seeded.
    fn round(&mut self, x: f64) -> u64 {
        let f = x.floor();
        f as u64 + u64::from(self.rng.random::<f64>() < x - f)
    }

    fn queue(&mut self, t: u64, n: u64, moved: bool) {
        for _ in 0..n {
            let at = (t + self.jitter()) as usize;
            if at < self.moved_due.len() {
                if moved {
                    self.moved_due[at] += 1;
                } else {
                    self.forced_due[at] += 1;
                }
            }
        }
    }

    fn fleet_u(&self, t: u64) -> f64 {
        let (s, c) = self
            .servers
            .iter()
            .filter(|x| x.eligible(t))
            .fold((0u64, 0u64), |(s, c), x| {
                (s + x.sessions, c + u64::from(x.capacity))
            });
        if c == 0 {
            0.0
        } else {
            s as f64 / c as f64
        }
    }

    fn minimum_now(&self, t: u64) -> u64 {
        let live: Vec<&SimServer> = self.servers.iter().filter(|x| x.eligible(t)).collect();
        let s: u64 = live.iter().map(|x| x.sessions).sum();
        let c: u64 = live.iter().map(|x| u64::from(x.capacity)).sum();
        if c == 0 {
            return 0;
        }
        live.iter()
            .map(|x| {
                x.sessions
                    .saturating_sub((u64::from(x.capacity) * s).div_ceil(c))
            })
            .sum()
    }

    fn events(&mut self, t: u64) {
        let mut disturbed = false;
        for e in self.sc.events.iter().filter(|e| e.at_s == t) {
            disturbed = true;
            match &e.kind {
                EventKind::Join { count, capacity } => {
                    for _ in 0..*count {
                        self.add(*capacity, 0, t);
                    }
                }
                EventKind::RollingRestart { every_s, down_s } => {
                    let n = self.servers.len();
                    for k in 0..n {
                        let down = t + k as u64 * every_s;
                        self.internal.push((down, Internal::Down(k)));
                        self.internal.push((down + down_s, Internal::Up(k)));
                    }
                    disturbed = false; // the returns are the disturbances
                }
                EventKind::Crash => {
                    let busiest = (0..self.servers.len())
                        .filter(|&i| self.servers[i].eligible(t))
                        .max_by_key(|&i| (self.servers[i].sessions, std::cmp::Reverse(i)));
                    if let Some(i) = busiest {
                        let n = std::mem::take(&mut self.servers[i].sessions);
                        self.servers[i].gone = true;
                        self.queue(t, n, false);
                    }
                }
                EventKind::Load { factor, over_s } => {
                    let over = (*over_s).max(1);
                    let total: f64 = self.servers.iter().map(|s| s.sessions as f64).sum();
                    self.ramp = Some(((factor - 1.0) * total / over as f64, t + over));
                    self.target *= factor;
                }
            }
        }
        let due: Vec<usize> = (0..self.internal.len())
            .filter(|&i| self.internal[i].0 == t)
            .collect();
        for i in due {
            match self.internal[i].1 {
                Internal::Down(k) => {
                    let n = std::mem::take(&mut self.servers[k].sessions);
                    self.servers[k].up = false;
                    self.queue(t, n, false);
                }
                Internal::Up(k) => {
                    self.servers[k].up = true;
                    disturbed = true;
                }
            }
        }
        if disturbed {
            self.disturbances.push(t);
            self.minimum += self.minimum_now(t);
        }
    }

    /// Routes `n` arriving sessions; returns the ones that found no room.
    fn route(&mut self, t: u64, n: u64, moved: bool, landed: &mut u64) -> u64 {
        let eligible: Vec<usize> = (0..self.servers.len())
            .filter(|&i| {
                let s = &self.servers[i];
                s.eligible(t) && s.hold_until <= t
            })
            .collect();
        if eligible.is_empty() {
            return n;
        }
        let mut left = 0;
        for _ in 0..n {
            let a = eligible[self.rng.random_range(0..eligible.len())];
            let pick = match self.sc.routing {
                Routing::Random => a,
                Routing::P2c => {
                    let b = eligible[self.rng.random_range(0..eligible.len())];
                    if self.servers[b].u() < self.servers[a].u() {
                        b
                    } else {
                        a
                    }
                }
            };
            let s = &mut self.servers[pick];
            if s.sessions >= u64::from(s.capacity) {
                left += 1;
                continue;
            }
            s.sessions += 1;
            *landed += 1;
            if moved {
                self.got_in_round.insert(pick);
            }
        }
        left
    }

    fn churn(&mut self, t: u64, landed: &mut u64) {
        if let Some((per_tick, until)) = self.ramp {
            if t < until {
                if per_tick >= 0.0 {
                    let n = self.round(per_tick);
                    self.route(t, n, false, landed);
                } else {
                    self.depart(-per_tick);
                }
            } else {
                self.ramp = None;
            }
        }
        if let Some(life) = self.sc.session_lifetime_s {
            let total: f64 = self.servers.iter().map(|s| s.sessions as f64).sum();
            self.depart(total / life);
            let n = self.round(self.target / life);
            self.route(t, n, false, landed);
        }
    }

    /// About `n` sessions leave, spread over the servers in proportion to what they hold.
    fn depart(&mut self, n: f64) {
        let total: f64 = self.servers.iter().map(|s| s.sessions as f64).sum();
        if total <= 0.0 {
            return;
        }
        for i in 0..self.servers.len() {
            let share = n * self.servers[i].sessions as f64 / total;
            let k = self.round(share).min(self.servers[i].sessions);
            self.servers[i].sessions -= k;
        }
    }

    fn snapshot(&self, t: u64) -> Topology {
        let mut pending = 0;
        let servers: Vec<Server> = self
            .servers
            .iter()
            .filter(|s| !s.gone)
            .map(|s| {
                let provisioning = t < s.up_at;
                pending += u32::from(provisioning);
                Server {
                    id: s.id.clone(),
                    address: "sim".into(),
                    port: 0,
                    capacity: s.capacity,
                    weight: 1.0,
                    passing: s.up && !provisioning,
                    admin: if s.cordoned {
                        Admin::Cordoned {
                            since_ms: 0,
                            by_operator: false,
                        }
                    } else {
                        Admin::Active
                    },
                    sessions: Count::Known(s.sessions),
                    provisioning,
                    starting: false,
                }
            })
            .collect();
        // Every simulated server is "ours", so scale-in may reap it.
        let containers = servers
            .iter()
            .map(|s| OwnedContainer {
                server: s.id.clone(),
                state: ContainerState::Running,
                created_s: 0,
            })
            .collect();
        Topology {
            version: t + 1,
            servers,
            pending,
            containers,
            containers_synced: true,
            sources: SourcesSynced {
                health: true,
                states: true,
                sessions: true,
            },
            ..Topology::default()
        }
    }

    fn shed(&mut self, t: u64, i: usize, n: u64) {
        let s = &mut self.servers[i];
        let n = n.min(s.sessions);
        s.sessions -= n;
        s.hold_until = t + HOLD_S;
        self.moved += n;
        self.shed_in_round.insert(i);
        self.queue(t, n, true);
    }

    fn decide(&mut self, t: u64) {
        match self.algorithm {
            Algorithm::Ours => {
                let topo = self.snapshot(t);
                let now = self.base + Duration::from_secs(t);
                self.history.observe(&topo, &self.cfg, now);
                let can = if self.sc.autoscale {
                    Capabilities::SCALER
                } else {
                    Capabilities::default()
                };
                let plan = decide(&topo, &self.cfg, can, now, &self.history);
                self.history.record(&plan, &topo, now);
                for a in plan.actions {
                    let idx = a.kind.server().and_then(|id| self.index.get(id).copied());
                    match (a.kind, idx) {
                        (
                            ActionKind::Shed { count, .. } | ActionKind::Drain { count, .. },
                            Some(i),
                        ) => self.shed(t, i, count),
                        (ActionKind::Cordon { .. }, Some(i)) => {
                            self.servers[i].cordoned = true;
                            self.scale_events.push((t, false));
                        }
                        (ActionKind::Reactivate { .. }, Some(i)) => {
                            self.servers[i].cordoned = false;
                            self.scale_events.push((t, true));
                        }
                        (ActionKind::Start { count }, _) => {
                            let cap = self
                                .servers
                                .iter()
                                .map(|s| s.capacity)
                                .max()
                                .unwrap_or(1000);
                            for _ in 0..count {
                                self.add(cap, 0, t + self.sc.provisioning_s);
                            }
                            self.scale_events.push((t, true));
                        }
                        (ActionKind::Reap { .. } | ActionKind::Discard { .. }, Some(i))
                            if self.servers[i].sessions == 0 =>
                        {
                            self.servers[i].gone = true;
                        }
                        _ => {}
                    }
                }
            }
            Algorithm::Clb => {
                if !t.is_multiple_of(10) {
                    return;
                }
                let live: Vec<usize> = (0..self.servers.len())
                    .filter(|&i| self.servers[i].eligible(t))
                    .collect();
                let counts: Vec<u64> = live.iter().map(|&i| self.servers[i].sessions).collect();
                if let Some((k, n)) = clb_round(&counts) {
                    self.shed(t, live[k], n);
                }
            }
            Algorithm::Naive => {
                let live: Vec<usize> = (0..self.servers.len())
                    .filter(|&i| self.servers[i].eligible(t))
                    .collect();
                let view: Vec<(u32, u64)> = live
                    .iter()
                    .map(|&i| (self.servers[i].capacity, self.servers[i].sessions))
                    .collect();
                for (k, n) in naive_round(&view, self.cfg.rebalance.tolerance) {
                    self.shed(t, live[k], n);
                }
            }
        }
    }

    fn measure(&mut self, t: u64) {
        let u = self.fleet_u(t);
        let live: Vec<f64> = self
            .servers
            .iter()
            .filter(|s| s.eligible(t))
            .map(SimServer::u)
            .collect();
        let (lo, hi) = live
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        self.converged.push(
            live.iter()
                .all(|x| (x - u).abs() <= self.cfg.rebalance.tolerance),
        );
        if t >= self.disturbances.get(1).copied().unwrap_or(0) && !live.is_empty() {
            self.worst = self.worst.max(hi - lo);
        }
        let round_s = self.cfg.rebalance.round_interval.as_secs().max(1);
        if t % round_s == round_s - 1 {
            self.oscillations += self.shed_in_round.intersection(&self.got_in_round).count() as u64;
            self.shed_in_round.clear();
            self.got_in_round.clear();
        }
        if t.is_multiple_of(self.sample_every) {
            self.series.times.push(t);
            self.series.fleet.push(u);
            for (k, s) in self.servers.iter().take(CHART_SERVERS).enumerate() {
                if self.series.servers.len() <= k {
                    let mut v = vec![f64::NAN; self.series.times.len() - 1];
                    v.reserve(1);
                    self.series.servers.push((s.id.to_string(), v));
                }
                let x = if s.eligible(t) { s.u() } else { f64::NAN };
                self.series.servers[k].1.push(x);
            }
        }
    }

    fn tick(&mut self, t: u64) {
        self.events(t);
        let mut landed = 0;
        self.churn(t, &mut landed);
        let (m, f) = (self.moved_due[t as usize], self.forced_due[t as usize]);
        let m_left = self.route(t, m, true, &mut landed);
        let f_left = self.route(t, f, false, &mut landed);
        if let Some(next) = self.moved_due.get_mut(t as usize + 1) {
            *next += m_left;
        }
        if let Some(next) = self.forced_due.get_mut(t as usize + 1) {
            *next += f_left;
        }
        self.peak = self.peak.max(landed);
        self.decide(t);
        self.measure(t);
    }

    fn finish(self, seed: u64) -> (Figures, Series) {
        let end = self.converged.len() as u64;
        let mut marks = self.disturbances.clone();
        marks.sort_unstable();
        marks.dedup();
        let mut converge: Option<u64> = Some(0);
        for (k, &d) in marks.iter().enumerate() {
            let next = marks.get(k + 1).copied().unwrap_or(end);
            let window = &self.converged[d as usize..next as usize];
            // The first tick from which the fleet stays within tolerance until `next`.
            let settled = window
                .iter()
                .rposition(|c| !c)
                .map_or(Some(0), |i| (i + 1 < window.len()).then_some(i as u64 + 1));
            converge = match (converge, settled) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        // A scale action undone within the configured cooldown is a flap.
        let cooldown_s = self.cfg.scale.cooldown.as_secs();
        let mut flaps = 0;
        for (i, (t, out)) in self.scale_events.iter().enumerate() {
            if self.scale_events[..i]
                .iter()
                .any(|(t0, o0)| o0 != out && t - t0 < cooldown_s)
            {
                flaps += 1;
            }
        }
        let live: Vec<&SimServer> = self.servers.iter().filter(|s| !s.gone).collect();
        let figures = Figures {
            algorithm: self.algorithm,
            scenario: self.sc.name.clone(),
            seed,
            converge_s: converge,
            worst_imbalance: (self.worst * 1000.0).round() / 1000.0,
            moved: self.moved,
            minimum: self.minimum,
            oscillations: self.oscillations,
            scale_actions: self.scale_events.len() as u64,
            scale_flaps: flaps,
            peak_reconnects_per_s: self.peak,
            servers_end: live.len(),
            sessions_end: live.iter().map(|s| s.sessions).sum(),
        };
        (figures, self.series)
    }
}
