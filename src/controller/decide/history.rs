//! What past rounds did and how long conditions have held: the memory the pure decisions
//! are given, updated by the pipeline from each snapshot and each plan.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::{ActionKind, DecideConfig, Plan};
use crate::contract::protocol::Ack;
use crate::fleet::topology::{ServerId, Topology};

pub use crate::config::decide::BUDGET_WINDOW;

#[derive(Debug, Clone, Default)]
pub struct History {
    last_shed: HashMap<ServerId, Instant>,
    /// Sessions shed or drained, oldest first, for the budget window.
    disruptions: VecDeque<Disruption>,
    last_scale_out: Option<Instant>,
    last_scale_in: Option<Instant>,
    low_since: Option<Instant>,
    zero_since: HashMap<ServerId, Instant>,
    /// Owned containers whose server has not passed yet, since when.
    pending_since: HashMap<ServerId, Instant>,
    /// Failed provisions in a row (a start refused, a container discarded).
    failures: u32,
    /// Since when this controller (as leader) has held a complete snapshot.
    complete_since: Option<Instant>,
    last_failure: Option<Instant>,
    /// Servers of owned containers seen passing at least once: failing ones now are failing,
    /// never discarded as a provisioning that did not work.
    passed: HashSet<ServerId>,
    /// Unix seconds when this controller began watching; containers created longer than a
    /// provision timeout before may have passed unseen, so they are never discarded.
    watching_since_s: i64,
    last_discard: Option<Instant>,
    /// Commands this controller published, by id, until acked or past their deadline.
    outstanding: HashMap<String, Outstanding>,
    /// Ids of this controller's commands no longer outstanding, so a late ack is not taken
    /// for another controller's shed (bounded: the newest [`SENT_REMEMBERED`]).
    sent: VecDeque<String>,
    /// Servers whose command went unacked, with their count when it was sent: not shed
    /// again until the count changes (the command may still be in effect, or the server deaf).
    unacked: HashMap<ServerId, Option<u64>>,
}

/// Sessions told to leave a server at `at`.
#[derive(Debug, Clone)]
struct Disruption {
    at: Instant,
    server: ServerId,
    count: u64,
    /// The server's count when the command was decided; `None` for another controller's
    /// shed, known only by its ack (sent once the server had let them go).
    from: Option<u64>,
}

/// How many of its own command ids a controller remembers after they are settled.
const SENT_REMEMBERED: usize = 1024;

#[derive(Debug, Clone)]
struct Outstanding {
    server: ServerId,
    count_at_send: Option<u64>,
    deadline: Instant,
}

/// What an ack read from the acks stream meant to this controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckSeen {
    /// One of this controller's commands, obeyed.
    Obeyed,
    /// One of this controller's commands, refused by its server.
    Refused,
    /// Another controller's (or an earlier run's) shed, now part of this history.
    Foreign,
    /// Another controller's refusal, or too old to matter.
    Ignored,
}

impl History {
    /// A history for a controller that began watching at `unix_s` (wall-clock seconds).
    pub fn watching_from(unix_s: i64) -> History {
        History {
            watching_since_s: unix_s,
            ..History::default()
        }
    }

    /// Notes how long conditions of `t` have held. Call once per decision, before it.
    pub fn observe(&mut self, t: &Topology, cfg: &DecideConfig, now: Instant) {
        let totals = t.totals();
        let trustworthy = !t.is_stale() && totals.unknown == 0;
        if trustworthy {
            self.complete_since.get_or_insert(now);
        }
        let low =
            trustworthy && totals.capacity > 0 && totals.utilization() < cfg.scale.scale_in_at;
        self.low_since = if low {
            self.low_since.or(Some(now))
        } else {
            None
        };

        let mut zero = HashMap::with_capacity(self.zero_since.len());
        if trustworthy {
            for s in &t.servers {
                if s.is_live() && s.is_cordoned() && s.sessions.known() == Some(0) {
                    zero.insert(
                        s.id.clone(),
                        self.zero_since.get(&s.id).copied().unwrap_or(now),
                    );
                }
            }
        }
        self.zero_since = zero;

        let mut pending = HashMap::with_capacity(self.pending_since.len());
        self.passed.retain(|id| t.container(id).is_some());
        for c in &t.containers {
            let passing = t.get(&c.server).is_some_and(|s| s.passing);
            if passing {
                if self.pending_since.contains_key(&c.server) {
                    self.failures = 0; // a container came up: provisioning works again
                }
                self.passed.insert(c.server.clone());
            } else if self.passed.contains(&c.server) {
                // Passed before: failing (or absent, unknown) now, not pending.
            } else if c.state != crate::fleet::topology::ContainerState::Stopped {
                pending.insert(
                    c.server.clone(),
                    self.pending_since.get(&c.server).copied().unwrap_or(now),
                );
            }
        }
        self.pending_since = pending;
        // A held-back server is judged again once its count has moved.
        self.unacked.retain(|id, held| {
            t.get(id)
                .is_some_and(|s| s.sessions.known() == *held || s.sessions.known().is_none())
        });

        let horizon = cfg.rebalance.round_interval.max(BUDGET_WINDOW);
        self.last_shed
            .retain(|_, at| now.saturating_duration_since(*at) < horizon);
        while let Some(d) = self.disruptions.front() {
            if now.saturating_duration_since(d.at) >= BUDGET_WINDOW {
                self.disruptions.pop_front();
            } else {
                break;
            }
        }
    }

    /// A new leader judges the fleet afresh: it settles again from its first complete
    /// snapshot.
    pub fn restart_settle(&mut self) {
        self.complete_since = None;
    }

    /// Time left before a complete snapshot has been held for `settle`: a fleet still
    /// filling up (or seen by a new leader) is not judged on its first seconds.
    pub fn settling(&self, now: Instant, settle: Duration) -> Option<Duration> {
        if settle.is_zero() {
            return None;
        }
        match self.complete_since {
            None => Some(settle),
            Some(at) => settle
                .checked_sub(now.saturating_duration_since(at))
                .filter(|d| !d.is_zero()),
        }
    }

    /// Remembers what a plan decided on `t` did (or, in dry-run, would have done).
    pub fn record(&mut self, plan: &Plan, t: &Topology, now: Instant) {
        for a in &plan.actions {
            match &a.kind {
                ActionKind::Shed { server, count } | ActionKind::Drain { server, count } => {
                    self.last_shed.insert(server.clone(), now);
                    self.disruptions.push_back(Disruption {
                        at: now,
                        server: server.clone(),
                        count: *count,
                        from: t.get(server).and_then(|s| s.sessions.known()),
                    });
                }
                ActionKind::Cordon { .. } => self.last_scale_in = Some(now),
                ActionKind::Reactivate { .. } | ActionKind::Start { .. } => {
                    self.last_scale_out = Some(now);
                }
                ActionKind::Reap { server } => {
                    self.zero_since.remove(server);
                }
                ActionKind::Discard { server } => {
                    self.pending_since.remove(server);
                    self.last_discard = Some(now);
                    self.failed(now);
                }
            }
        }
    }

    /// Remembers a command this controller published: acked, or counted unacked after
    /// `deadline`. `count` is its server's session count when it was sent.
    pub fn sent(&mut self, id: &str, server: &str, count: Option<u64>, deadline: Instant) {
        self.outstanding.insert(
            id.to_string(),
            Outstanding {
                server: server.into(),
                count_at_send: count,
                deadline,
            },
        );
    }

    fn settle_sent(&mut self, id: String) {
        if self.sent.len() == SENT_REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back(id);
    }

    /// Takes in an ack read from the acks stream at `now` (`now_ms` on the wall clock).
    /// Another controller's shed, or one of an earlier run of this one, becomes this
    /// history's own, at the time the server finished it: a new leader does not shed the
    /// same excess again, nor spend the budget twice.
    pub fn acked(&mut self, ack: &Ack, now: Instant, now_ms: u64) -> AckSeen {
        if let Some(o) = self.outstanding.remove(&ack.id) {
            self.settle_sent(ack.id.clone());
            if ack.refused.is_some() {
                return AckSeen::Refused;
            }
            self.unacked.remove(&o.server);
            return AckSeen::Obeyed;
        }
        if self.sent.contains(&ack.id) {
            // Ours, acked after its deadline: already counted unacked; the count will tell.
            return if ack.refused.is_some() {
                AckSeen::Refused
            } else {
                AckSeen::Obeyed
            };
        }
        let age = Duration::from_millis(now_ms.saturating_sub(ack.at_ms));
        if ack.refused.is_some() || ack.shed == 0 || age >= BUDGET_WINDOW {
            return AckSeen::Ignored;
        }
        let at = now.checked_sub(age).unwrap_or(now);
        let last = self
            .last_shed
            .entry(ack.server.as_str().into())
            .or_insert(at);
        *last = (*last).max(at);
        let i = self.disruptions.partition_point(|d| d.at <= at);
        self.disruptions.insert(
            i,
            Disruption {
                at,
                server: ack.server.as_str().into(),
                count: ack.shed,
                from: None,
            },
        );
        AckSeen::Foreign
    }

    /// Commands past their deadline with no ack: their servers are held until their count
    /// changes. Returns those servers, each once.
    pub fn expire_unacked(&mut self, now: Instant) -> Vec<ServerId> {
        let late: Vec<String> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut servers = Vec::with_capacity(late.len());
        for id in late {
            if let Some(o) = self.outstanding.remove(&id) {
                self.unacked.insert(o.server.clone(), o.count_at_send);
                servers.push(o.server);
            }
            self.settle_sent(id);
        }
        servers
    }

    /// Whether `server`'s last command went unacked and its count has not moved since.
    pub fn held_unacked(&self, server: &str) -> bool {
        self.unacked.contains_key(server)
    }

    /// A provision failed (a start refused, a container that never came up): scale-out
    /// backs off, doubling with each failure in a row.
    pub fn failed(&mut self, now: Instant) {
        self.failures = (self.failures + 1).min(16);
        self.last_failure = Some(now);
        self.last_scale_out = None; // nothing is coming: do not hold rebalancing back
    }

    /// Scale-out waits `cooldown × 2^(failures − 1)` after the last failure.
    pub fn backing_off(&self, now: Instant, cooldown: std::time::Duration) -> bool {
        match (self.failures, self.last_failure) {
            (0, _) | (_, None) => false,
            (n, Some(at)) => {
                now.saturating_duration_since(at) < cooldown * (1u32 << (n - 1).min(5))
            }
        }
    }

    /// The server of an owned container has been seen passing.
    pub fn has_passed(&self, server: &str) -> bool {
        self.passed.contains(server)
    }

    /// A container created at `created_s` has been watched since it was young enough to
    /// be still provisioning: whether it ever passed is known.
    pub fn watched_from_birth(&self, created_s: i64, provision_timeout: Duration) -> bool {
        let timeout = i64::try_from(provision_timeout.as_secs()).unwrap_or(i64::MAX);
        created_s >= self.watching_since_s.saturating_sub(timeout)
    }

    pub fn discarded_within(&self, now: Instant, window: Duration) -> bool {
        self.last_discard
            .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    /// How long an owned container's server has been pending.
    pub fn pending_for(&self, server: &str, now: Instant) -> Option<Duration> {
        self.pending_since
            .get(server)
            .map(|at| now.saturating_duration_since(*at))
    }

    pub fn shed_within(&self, server: &str, now: Instant, window: Duration) -> bool {
        self.last_shed
            .get(server)
            .is_some_and(|at| now.saturating_duration_since(*at) < window)
    }

    /// Sessions shed or drained within the budget window before `now`.
    pub fn disrupted(&self, now: Instant) -> u64 {
        self.disrupted_within(now, BUDGET_WINDOW)
    }

    /// Sessions shed or drained within `window` before `now` (at most the budget window's).
    pub fn disrupted_within(&self, now: Instant, window: Duration) -> u64 {
        self.disruptions
            .iter()
            .filter(|d| now.saturating_duration_since(d.at) < window)
            .fold(0u64, |a, d| a.saturating_add(d.count))
    }

    /// Sessions shed within `window` before `now` that have left their server in `t` and are
    /// not yet counted anywhere: reconnecting. A server's part is what it was told to shed,
    /// but no more than its count has fallen since: sessions a deaf or slow server still
    /// holds are in its count already, and counting them twice would raise U into a
    /// scale-out nobody needs. A server gone or with no known count is not in the totals, so
    /// all it was told to shed is. Another controller's shed, known by its ack, had left.
    pub fn in_transit(&self, t: &Topology, now: Instant, window: Duration) -> u64 {
        let mut by_server: HashMap<&str, (u64, Option<u64>)> = HashMap::new();
        for d in self
            .disruptions
            .iter()
            .filter(|d| now.saturating_duration_since(d.at) < window)
        {
            // Oldest first: a server's first shed in the window gives the count it fell from.
            let e = by_server.entry(&d.server).or_insert((0, d.from));
            e.0 = e.0.saturating_add(d.count);
            if d.from.is_none() {
                e.1 = None;
            }
        }
        by_server
            .into_iter()
            .map(|(server, (told, from))| {
                match (from, t.get(server).and_then(|s| s.sessions.known())) {
                    (Some(from), Some(now)) => told.min(from.saturating_sub(now)),
                    _ => told,
                }
            })
            .fold(0u64, u64::saturating_add)
    }

    pub fn scaled_out_within(&self, now: Instant, window: Duration) -> bool {
        self.last_scale_out
            .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    pub fn scaled_within(&self, now: Instant, window: Duration) -> bool {
        self.scaled_out_within(now, window)
            || self
                .last_scale_in
                .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    /// How long the fleet has been below `scale_in_at` on trustworthy snapshots.
    pub fn low_for(&self, now: Instant) -> Option<Duration> {
        self.low_since.map(|at| now.saturating_duration_since(at))
    }

    /// How long a cordoned server has had zero sessions.
    pub fn zero_for(&self, server: &str, now: Instant) -> Option<Duration> {
        self.zero_since
            .get(server)
            .map(|at| now.saturating_duration_since(*at))
    }
}
