//! The fold: the one writer of the topology snapshot. It applies batches of changes and
//! publishes a new immutable version through a `watch` channel only when the content changed.
//! A source's resync replaces everything that source said before, at once, so a reader never
//! sees half a resync.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::decide::SafetyConfig;
use crate::fleet::events::Events;
use crate::fleet::source::{
    Change, HealthList, Instance, Reading, SessionsUpdate, SourceKind, Stamped, StateList,
};
use crate::fleet::topology::{
    Admin, ContainerState, Count, OwnedContainer, Server, ServerId, SourcesSynced, Topology,
};

/// What the fold believes of the numbers it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A count above this many times its server's capacity is unknown.
    pub max_count_ratio: u32,
    /// A registration with a larger `max_sessions` is invalid.
    pub max_capacity: u32,
    /// So is one with more than this many times the fleet's median `max_sessions`.
    pub capacity_outlier_ratio: u32,
    /// While the sessions source is down longer than this, every count read before is
    /// unknown: in Redis it would have expired by now (`redis.count_ttl`).
    pub count_ttl: Duration,
}

impl From<&SafetyConfig> for Limits {
    fn from(s: &SafetyConfig) -> Limits {
        Limits {
            max_count_ratio: s.max_count_ratio,
            max_capacity: s.max_capacity,
            capacity_outlier_ratio: s.capacity_outlier_ratio,
            count_ttl: crate::config::RedisConfig::default().count_ttl,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::from(&SafetyConfig::default())
    }
}

pub struct Fold {
    events: Events,
    limits: Limits,
    instances: Vec<Instance>,
    states: HashMap<ServerId, Admin>,
    counts: HashMap<ServerId, Count>,
    invalid_meta: HashMap<ServerId, String>,
    invalid_states: HashMap<ServerId, String>,
    invalid_counts: HashSet<ServerId>,
    /// Registered servers whose count is above `max_count_ratio` × capacity.
    absurd_counts: HashSet<ServerId>,
    synced: SourcesSynced,
    containers: Vec<OwnedContainer>,
    containers_synced: bool,
    /// Owned containers whose server has been seen passing (for the provision-time metric).
    provisioned: HashSet<ServerId>,
    /// Sources that have failed since they last synced (for the resync event).
    failed: HashSet<SourceKind>,
    /// Since when the sessions source has been down, until it resyncs.
    sessions_down_since: Option<Instant>,
    current: Arc<Topology>,
    tx: watch::Sender<Arc<Topology>>,
}

impl Fold {
    pub fn new(events: Events, limits: Limits) -> (Fold, watch::Receiver<Arc<Topology>>) {
        let current = Arc::new(Topology::default());
        let (tx, rx) = watch::channel(current.clone());
        let fold = Fold {
            events,
            limits,
            instances: Vec::new(),
            states: HashMap::new(),
            counts: HashMap::new(),
            invalid_meta: HashMap::new(),
            invalid_states: HashMap::new(),
            invalid_counts: HashSet::new(),
            absurd_counts: HashSet::new(),
            synced: SourcesSynced::default(),
            containers: Vec::new(),
            containers_synced: false,
            provisioned: HashSet::new(),
            failed: HashSet::new(),
            sessions_down_since: None,
            current,
            tx,
        };
        (fold, rx)
    }

    pub fn current(&self) -> Arc<Topology> {
        self.current.clone()
    }

    /// Applies a batch; publishes and returns the new snapshot if its content changed.
    pub fn apply(&mut self, batch: Vec<Stamped>) -> Option<Arc<Topology>> {
        let changed_at = batch.iter().map(|s| s.at).min();
        let now = Instant::now();
        let mut lag: HashMap<SourceKind, Duration> = HashMap::new();
        for s in &batch {
            if !matches!(s.change, Change::Down(_)) {
                let l = lag.entry(s.change.kind()).or_default();
                *l = (*l).max(now.saturating_duration_since(s.at));
            }
        }
        for (kind, l) in lag {
            self.events.source_lag(kind, l);
        }
        for s in batch {
            if matches!(s.change, Change::Down(SourceKind::Sessions)) {
                self.sessions_down_since.get_or_insert(s.at);
            }
            self.apply_one(s.change);
        }
        self.publish(changed_at)
    }

    /// Forgets the counts once the sessions source has been down longer than their TTL:
    /// they have expired in Redis, whatever the last reading said. Call it on a timer.
    pub fn expire(&mut self, now: Instant) -> Option<Arc<Topology>> {
        let down_for = now.saturating_duration_since(self.sessions_down_since?);
        if down_for < self.limits.count_ttl {
            return None;
        }
        for c in self.counts.values_mut() {
            *c = Count::Unknown;
        }
        self.publish(None)
    }

    /// Publishes the snapshot of what is folded so far, if its content changed.
    fn publish(&mut self, changed_at: Option<Instant>) -> Option<Arc<Topology>> {
        let mut next = self.build();
        self.note_absurd(&next);
        self.note_provisioned(&next);
        if next.same_content(&self.current) {
            return None;
        }
        next.version = self.current.version + 1;
        next.changed_at = changed_at;
        let next = Arc::new(next);
        self.current = next.clone();
        self.events.snapshot(&next);
        if !next.containers.is_empty() || next.containers_synced {
            self.events.containers(&next);
        }
        self.tx.send_replace(next.clone());
        Some(next)
    }

    fn apply_one(&mut self, change: Change) {
        let kind = change.kind();
        if !matches!(change, Change::Down(_)) {
            let after_error = self.failed.remove(&kind);
            self.events.source_change(kind, after_error);
        }
        match change {
            Change::Down(k) => {
                self.failed.insert(k);
                match k {
                    SourceKind::Health => self.synced.health = false,
                    SourceKind::States => self.synced.states = false,
                    SourceKind::Sessions => self.synced.sessions = false,
                    SourceKind::Containers => self.containers_synced = false,
                }
            }
            Change::Health(h) => self.apply_health(h),
            Change::Containers(c) => {
                self.containers = c;
                self.containers_synced = true;
            }
            Change::States(s) => self.apply_states(s),
            Change::Sessions(SessionsUpdate::Resync(all)) => {
                self.counts.clear();
                let mut garbage = HashSet::new();
                for (id, r) in all {
                    let c = self.reading(&id, r, &mut garbage);
                    self.counts.insert(id, c);
                }
                self.invalid_counts = garbage;
                self.synced.sessions = true;
                self.sessions_down_since = None;
            }
            Change::Sessions(SessionsUpdate::Patch {
                changes,
                notifications,
                ..
            }) => {
                self.events.notifications(notifications);
                for (id, r) in changes {
                    match r {
                        None => {
                            self.invalid_counts.remove(&id);
                            self.counts.remove(&id);
                        }
                        Some(Ok(n)) => {
                            self.invalid_counts.remove(&id);
                            self.counts.insert(id, Count::Known(n));
                        }
                        Some(Err(raw)) => {
                            // Reported once while it stays garbage: the same value often
                            // arrives both in a resync and in the notification after it.
                            if self.invalid_counts.insert(id.clone()) {
                                self.events.invalid_count(&id, &raw);
                            }
                            self.counts.insert(id, Count::Unknown);
                        }
                    }
                }
            }
        }
    }

    /// A reading as a count; garbage is logged and counted once while it stays garbage.
    fn reading(&self, id: &ServerId, r: Reading, garbage: &mut HashSet<ServerId>) -> Count {
        match r {
            Ok(n) => Count::Known(n),
            Err(raw) => {
                if !self.invalid_counts.contains(id) && !garbage.contains(id) {
                    self.events.invalid_count(id, &raw);
                }
                garbage.insert(id.clone());
                Count::Unknown
            }
        }
    }

    fn apply_health(&mut self, mut h: HealthList) {
        let max = self.limits.max_capacity;
        h.instances.retain(|i| {
            let ok = i.capacity <= max;
            if !ok {
                h.invalid.push((
                    i.id.clone(),
                    format!(
                        "Meta.max_sessions = {} is above safety.max_capacity ({max})",
                        i.capacity
                    ),
                ));
            }
            ok
        });
        // The lower median: with two servers, the smaller; one outlier never moves it.
        let mut caps: Vec<u32> = h.instances.iter().map(|i| i.capacity).collect();
        caps.sort_unstable();
        if let Some(&median) = caps.get(caps.len().saturating_sub(1) / 2) {
            let ratio = self.limits.capacity_outlier_ratio;
            let most = u64::from(median) * u64::from(ratio);
            h.instances.retain(|i| {
                let ok = u64::from(i.capacity) <= most;
                if !ok {
                    h.invalid.push((
                        i.id.clone(),
                        format!(
                            "Meta.max_sessions = {} is more than safety.capacity_outlier_ratio ({ratio}) × the fleet's median ({median})",
                            i.capacity
                        ),
                    ));
                }
                ok
            });
        }
        let mut invalid = HashMap::with_capacity(h.invalid.len());
        for (id, why) in h.invalid {
            if self.invalid_meta.get(&id) != Some(&why) {
                self.events.invalid_meta(&id, &why);
            }
            invalid.insert(id, why);
        }
        self.invalid_meta = invalid;
        self.instances = h.instances;
        self.synced.health = true;
    }

    fn apply_states(&mut self, s: StateList) {
        let mut invalid = HashMap::with_capacity(s.invalid.len());
        for (id, why) in s.invalid {
            if self.invalid_states.get(&id) != Some(&why) {
                self.events.invalid_state(&id, &why);
            }
            invalid.insert(id, why);
        }
        self.invalid_states = invalid;
        self.states = s.states.into_iter().collect();
        self.synced.states = true;
    }

    /// The largest count believed of a server of `capacity`.
    fn max_count(&self, capacity: u32) -> u64 {
        u64::from(capacity).saturating_mul(u64::from(self.limits.max_count_ratio))
    }

    /// Logs and counts each count above its bound once, while it stays above it.
    fn note_absurd(&mut self, t: &Topology) {
        let mut now = HashSet::new();
        for s in &t.servers {
            if let Some(&Count::Known(n)) = self.counts.get(&s.id) {
                if n > self.max_count(s.capacity) {
                    if !self.absurd_counts.contains(&s.id) {
                        let why = format!(
                            "{n} is above safety.max_count_ratio ({}) × max_sessions ({})",
                            self.limits.max_count_ratio, s.capacity
                        );
                        self.events.absurd_count(&s.id, &why);
                    }
                    now.insert(s.id.clone());
                }
            }
        }
        self.absurd_counts = now;
    }

    /// Records how long each owned container took to pass, once.
    fn note_provisioned(&mut self, t: &Topology) {
        let now_s = crate::contract::protocol::unix_ms(std::time::SystemTime::now()) / 1000;
        for c in &t.containers {
            if !self.provisioned.contains(&c.server) && t.get(&c.server).is_some_and(|s| s.passing)
            {
                self.provisioned.insert(c.server.clone());
                let took = now_s.saturating_sub(c.created_s.max(0) as u64);
                self.events
                    .provisioned(&c.server, std::time::Duration::from_secs(took));
            }
        }
        self.provisioned.retain(|id| t.container(id).is_some());
    }

    fn build(&self) -> Topology {
        let servers: Vec<Server> = self
            .instances
            .iter()
            .map(|i| Server {
                id: i.id.clone(),
                address: i.address.clone(),
                port: i.port,
                capacity: i.capacity,
                weight: i.weight,
                passing: i.passing,
                admin: self.states.get(&i.id).copied().unwrap_or(Admin::Active),
                sessions: match self.counts.get(&i.id) {
                    Some(&Count::Known(n)) if n > self.max_count(i.capacity) => Count::Unknown,
                    Some(&c) => c,
                    None => Count::Unknown,
                },
                provisioning: false,
                starting: i.starting,
            })
            .collect();
        let mut servers = servers;
        let mut pending = 0;
        for c in &self.containers {
            if c.state == ContainerState::Stopped {
                continue;
            }
            match servers.binary_search_by(|s| s.id.cmp(&c.server)) {
                Ok(i) if servers[i].passing => {}
                Ok(i) => {
                    servers[i].provisioning = true;
                    pending += 1;
                }
                Err(_) => pending += 1,
            }
        }
        let registered: HashSet<&str> = self.instances.iter().map(|i| &*i.id).collect();
        let ghosts = self
            .counts
            .keys()
            .filter(|id| !registered.contains(&***id) && !self.invalid_meta.contains_key(*id))
            .count() as u32;
        Topology {
            version: self.current.version,
            servers,
            ghosts,
            invalid_instances: self.invalid_meta.len() as u32,
            pending,
            containers: self.containers.clone(),
            containers_synced: self.containers_synced,
            sources: self.synced,
            changed_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    fn inst(id: &str, cap: u32) -> Instance {
        Instance {
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 1,
            capacity: cap,
            weight: 1.0,
            passing: true,
            starting: false,
        }
    }

    fn at(change: Change) -> Stamped {
        Stamped {
            at: Instant::now(),
            change,
        }
    }

    fn synced_fold() -> (Fold, watch::Receiver<Arc<Topology>>) {
        let (mut f, rx) = Fold::new(Events::new("t"), Limits::default());
        f.apply(vec![
            at(Change::Health(HealthList {
                instances: vec![inst("a", 100), inst("b", 100)],
                invalid: vec![("x".into(), "Meta.max_sessions is missing".into())],
            })),
            at(Change::States(StateList::default())),
            at(Change::Sessions(SessionsUpdate::Resync(vec![
                ("a".into(), Ok(10)),
                ("b".into(), Err("lots".into())),
                ("ghost".into(), Ok(5)),
                ("x".into(), Ok(1)),
            ]))),
        ]);
        (f, rx)
    }

    #[tokio::test]
    async fn a_synced_snapshot_records_counts_unknowns_ghosts_and_invalid_instances() {
        let (_f, rx) = synced_fold();
        let t = rx.borrow().clone();
        assert_eq!(t.version, 1);
        assert!(!t.is_stale());
        assert_eq!(t.get("a").unwrap().sessions, Count::Known(10));
        assert_eq!(
            t.get("b").unwrap().sessions,
            Count::Unknown,
            "garbage is unknown, never 0"
        );
        assert_eq!(t.ghosts, 1);
        assert_eq!(t.invalid_instances, 1);
    }

    #[tokio::test]
    async fn only_changed_content_publishes_a_new_version() {
        let (mut f, rx) = synced_fold();
        let same = vec![at(Change::Sessions(SessionsUpdate::Patch {
            changes: vec![("a".into(), Some(Ok(10)))],
            noticed_at: Instant::now(),
            notifications: 1,
        }))];
        assert!(f.apply(same).is_none());
        assert_eq!(rx.borrow().version, 1);
        let changed = vec![at(Change::Sessions(SessionsUpdate::Patch {
            changes: vec![("a".into(), Some(Ok(11)))],
            noticed_at: Instant::now(),
            notifications: 1,
        }))];
        assert_eq!(f.apply(changed).unwrap().version, 2);
        let gone = vec![at(Change::Sessions(SessionsUpdate::Patch {
            changes: vec![("a".into(), None)],
            noticed_at: Instant::now(),
            notifications: 1,
        }))];
        let t = f.apply(gone).unwrap();
        assert_eq!(
            t.get("a").unwrap().sessions,
            Count::Unknown,
            "an expired count is unknown"
        );
    }

    #[tokio::test]
    async fn garbage_seen_in_a_resync_and_again_in_a_patch_is_reported_once() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let (mut f, _rx) = synced_fold(); // resync with b = "lots"
            let same = vec![at(Change::Sessions(SessionsUpdate::Patch {
                changes: vec![("b".into(), Some(Err("lots".into())))],
                noticed_at: Instant::now(),
                notifications: 1,
            }))];
            f.apply(same);
            let fixed = vec![at(Change::Sessions(SessionsUpdate::Patch {
                changes: vec![("b".into(), Some(Ok(3)))],
                noticed_at: Instant::now(),
                notifications: 1,
            }))];
            f.apply(fixed);
            let again = vec![at(Change::Sessions(SessionsUpdate::Patch {
                changes: vec![("b".into(), Some(Err("x".into())))],
                noticed_at: Instant::now(),
                notifications: 1,
            }))];
            f.apply(again);
        });
        let text = handle.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("rebalancer_invalid_counts_total"))
            .unwrap_or("");
        assert!(
            line.ends_with(" 2"),
            "once for the first garbage, once after it was fixed and broke again: {text}"
        );
    }

    #[tokio::test]
    async fn a_source_going_down_makes_the_snapshot_stale_until_it_resyncs() {
        let (mut f, _rx) = synced_fold();
        let t = f
            .apply(vec![at(Change::Down(SourceKind::Sessions))])
            .unwrap();
        assert!(t.is_stale());
        assert_eq!(t.sources.missing(), vec!["redis-sessions"]);
        let t = f
            .apply(vec![at(Change::Sessions(SessionsUpdate::Resync(vec![(
                "a".into(),
                Ok(3),
            )])))])
            .unwrap();
        assert!(!t.is_stale());
        assert_eq!(t.get("a").unwrap().sessions, Count::Known(3));
        assert_eq!(
            t.get("b").unwrap().sessions,
            Count::Unknown,
            "a resync replaces, it does not merge"
        );
        assert_eq!(t.ghosts, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_older_than_their_ttl_are_unknown_while_redis_is_down() {
        let (mut f, _rx) = synced_fold();
        f.apply(vec![at(Change::Down(SourceKind::Sessions))]);
        let down = Instant::now();
        let ttl = Limits::default().count_ttl;
        assert!(f.expire(down + ttl - Duration::from_millis(1)).is_none());
        assert_eq!(f.current().get("a").unwrap().sessions, Count::Known(10));
        let t = f.expire(down + ttl).expect("a new snapshot");
        assert_eq!(
            t.get("a").unwrap().sessions,
            Count::Unknown,
            "it would have expired in Redis by now"
        );
        assert!(f.expire(down + ttl * 2).is_none(), "said once");
        // Back: the resync brings the counts back.
        let t = f
            .apply(vec![at(Change::Sessions(SessionsUpdate::Resync(vec![(
                "a".into(),
                Ok(4),
            )])))])
            .unwrap();
        assert_eq!(t.get("a").unwrap().sessions, Count::Known(4));
        assert!(f.expire(down + ttl * 3).is_none(), "up: nothing ages out");
    }

    #[tokio::test]
    async fn absurd_numbers_are_not_believed_and_cannot_wrap_a_sum() {
        let (mut f, _rx) = Fold::new(Events::new("t"), Limits::default());
        let t = f
            .apply(vec![
                at(Change::Health(HealthList {
                    instances: vec![
                        inst("a", 100),
                        inst("b", 100),
                        inst("c", 100),
                        inst("huge", u32::MAX),
                    ],
                    invalid: vec![],
                })),
                at(Change::States(StateList::default())),
                at(Change::Sessions(SessionsUpdate::Resync(vec![
                    ("a".into(), Ok(50)),
                    ("b".into(), Ok(u64::MAX)),
                    ("c".into(), Ok(1_000)),
                    ("huge".into(), Ok(1)),
                ]))),
            ])
            .unwrap();
        assert_eq!(t.get("a").unwrap().sessions, Count::Known(50));
        assert_eq!(
            t.get("b").unwrap().sessions,
            Count::Unknown,
            "above 10 × capacity: not believed"
        );
        assert_eq!(
            t.get("c").unwrap().sessions,
            Count::Known(1_000),
            "exactly 10 × capacity is still believed"
        );
        assert!(
            t.get("huge").is_none(),
            "max_sessions above safety.max_capacity is an invalid registration"
        );
        assert_eq!(t.invalid_instances, 1);
        let totals = t.totals();
        assert_eq!(totals.sessions, 1_050);
        assert_eq!(totals.unknown, 1);
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut t = crate::fleet::topology::fixtures::fleet(vec![
            crate::fleet::topology::fixtures::server("a", 100, u64::MAX),
            crate::fleet::topology::fixtures::server("b", 100, 5),
        ]);
        t.version = 1;
        assert_eq!(t.totals().sessions, u64::MAX);
    }
}
