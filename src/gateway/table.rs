//! The routing table: the servers of the newest snapshot, each with the state the gateway
//! keeps of it (active health, circuit breaker, reservations, requests in flight). One task
//! rebuilds it when the fleet changes and swaps it in whole; every pick reads it without a
//! lock and draws two eligible servers ([`super::route::pick_two`]), so a pick costs the
//! same at ten servers and at ten thousand. A server's state lives as long as the server
//! stays in the fleet, from one table to the next.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::fleet::topology::{Admin, Topology};

use super::health::{Active, Breaker, BreakerState};
use super::route::{pick_two, ramp, Candidate, Kind};
use super::series::BackendCounts;

/// What the gateway keeps of one server while it is in the fleet.
pub struct Backend {
    pub id: Arc<str>,
    first_seen: Instant,
    /// Active health, as the probe last judged it (`active` holds the rise/fall streak).
    up: AtomicBool,
    active: Mutex<Active>,
    /// The breaker has failures or is open: an outcome must look at it (otherwise a
    /// success has nothing to do, and takes no lock).
    dirty: AtomicBool,
    /// While open: milliseconds after `first_seen` before which no request goes there.
    open_until_ms: AtomicU64,
    breaker: Mutex<Breaker>,
    /// Connections routed here that the server's count may not show yet.
    reservations: Mutex<VecDeque<Instant>>,
    /// The count of the last table, to see how many reservations a rise shows.
    last_count: AtomicU64,
    /// Plain requests this gateway has in flight there.
    pub inflight: Arc<AtomicU64>,
    /// Its series (`requests_total`, `websockets_open`), rendered at each scrape.
    pub counts: BackendCounts,
}

impl Backend {
    pub fn new(id: Arc<str>, now: Instant) -> Backend {
        Backend {
            counts: BackendCounts::default(),
            id,
            first_seen: now,
            up: AtomicBool::new(true),
            active: Mutex::new(Active::default()),
            dirty: AtomicBool::new(false),
            open_until_ms: AtomicU64::new(0),
            breaker: Mutex::new(Breaker::default()),
            reservations: Mutex::new(VecDeque::new()),
            last_count: AtomicU64::new(u64::MAX),
            inflight: Arc::new(AtomicU64::new(0)),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.first_seen).as_millis() as u64
    }

    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records an active check; `Some(up)` when the server's health changed.
    pub fn checked(&self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        let mut a = self.active.lock().expect("not poisoned");
        let changed = a.record(passed, rise, fall);
        self.up.store(a.up(), Ordering::Relaxed);
        changed
    }

    /// The breaker's state now, for the metrics.
    pub fn breaker_state(&self, now: Instant, open_for: Duration) -> BreakerState {
        self.breaker
            .lock()
            .expect("not poisoned")
            .state(now, open_for)
    }

    /// The breaker keeps requests away now.
    fn open(&self, now: Instant) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) > self.ms(now)
    }

    /// May a request go now? Only a breaker that tripped is asked (half-open lets one probe
    /// through at a time).
    fn allow(&self, now: Instant, open_for: Duration) -> bool {
        !self.dirty.load(Ordering::Relaxed)
            || self
                .breaker
                .lock()
                .expect("not poisoned")
                .allow(now, open_for)
    }

    /// Records a request's outcome in the breaker: the states before and after, when it
    /// looked (a success on a clean breaker does not).
    pub fn outcome(
        &self,
        ok: bool,
        now: Instant,
        failures: u32,
        open_for: Duration,
    ) -> Option<(BreakerState, BreakerState)> {
        if ok && !self.dirty.load(Ordering::Relaxed) {
            return None;
        }
        let mut b = self.breaker.lock().expect("not poisoned");
        let before = b.state(now, open_for);
        if ok {
            b.success();
        } else if b.failure(now, failures) {
            tracing::warn!(backend = %self.id, "circuit breaker opened");
        }
        let after = b.state(now, open_for);
        let open_until = match after {
            BreakerState::Open => self.ms(now + open_for),
            _ => 0,
        };
        self.open_until_ms.store(open_until, Ordering::Relaxed);
        self.dirty.store(!ok, Ordering::Relaxed);
        Some((before, after))
    }

    /// Reservations younger than `ttl`, the older ones dropped.
    fn reserved(&self, now: Instant, ttl: Duration) -> u64 {
        let mut r = self.reservations.lock().expect("not poisoned");
        while r
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > ttl)
        {
            r.pop_front();
        }
        r.len() as u64
    }

    /// The server's count is now `count`: a rise since the last table shows that many of the
    /// connections routed there, so that many reservations (the oldest) are dropped; they
    /// would otherwise be counted twice until their TTL.
    fn counted(&self, count: u64) {
        let last = self.last_count.swap(count, Ordering::Relaxed);
        if last == u64::MAX || count <= last {
            return;
        }
        let mut r = self.reservations.lock().expect("not poisoned");
        let shown = usize::try_from(count - last)
            .unwrap_or(usize::MAX)
            .min(r.len());
        r.drain(..shown);
    }

    fn reserve(&self, now: Instant) {
        self.reservations
            .lock()
            .expect("not poisoned")
            .push_back(now);
    }
}

/// One server of a table: its backend state and what the snapshot says of it.
pub struct Slot {
    pub backend: Arc<Backend>,
    /// `address:port` requests go to.
    pub host: Arc<str>,
    sessions: u64,
    capacity: u32,
    weight: f32,
}

/// What picking needs of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct PickRules {
    pub reservation_ttl: Duration,
    pub slow_start: Duration,
    pub breaker_open: Duration,
}

/// The servers of one snapshot.
#[derive(Default)]
pub struct Table {
    /// The snapshot's version it was built from.
    pub version: u64,
    /// Every server of the snapshot: what the probe checks.
    pub all: Vec<Slot>,
    /// Indices into `all` of the routable ones (passing in Consul, active).
    routable: Vec<usize>,
}

impl Table {
    /// The table of `t`, reusing the state of servers in `backends` and adding the new
    /// ones; servers that left are dropped from `backends` (and returned).
    pub fn build(
        t: &Topology,
        backends: &mut HashMap<Arc<str>, Arc<Backend>>,
        target_port: Option<u16>,
        now: Instant,
    ) -> (Table, Vec<Arc<Backend>>) {
        let mut all = Vec::with_capacity(t.servers.len());
        let mut routable = Vec::new();
        for s in &t.servers {
            let backend = backends
                .entry(s.id.clone())
                .or_insert_with(|| Arc::new(Backend::new(s.id.clone(), now)))
                .clone();
            if let Some(n) = s.sessions.known() {
                backend.counted(n);
            }
            if s.passing && s.admin == Admin::Active {
                routable.push(all.len());
            }
            all.push(Slot {
                backend,
                host: format!("{}:{}", s.address, target_port.unwrap_or(s.port)).into(),
                sessions: s.sessions.known().unwrap_or(0),
                capacity: s.capacity,
                weight: s.weight,
            });
        }
        let mut left = Vec::new();
        if backends.len() > all.len() {
            backends.retain(|id, b| {
                let stays = t.get(id).is_some();
                if !stays {
                    left.push(b.clone());
                }
                stays
            });
        }
        let table = Table {
            version: t.version,
            all,
            routable,
        };
        (table, left)
    }

    /// Picks a routable server for `kind`, not in `tried`, up, with its breaker letting a
    /// request through, and (for a session) not full; reserves a slot on it for a session.
    /// With shared accounting, `inflight` (every gateway's requests by server) stands for
    /// the session counts.
    pub fn pick(
        &self,
        tried: &[Arc<str>],
        kind: Kind,
        inflight: Option<&HashMap<String, f64>>,
        rules: PickRules,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<&Slot> {
        let mut refused: Vec<usize> = Vec::new();
        loop {
            let load = |i: usize| {
                let slot = &self.all[self.routable[i]];
                let b = &slot.backend;
                if !b.up() || b.open(now) || refused.contains(&i) || tried.contains(&b.id) {
                    return None;
                }
                let c = Candidate {
                    sessions: match inflight {
                        Some(m) => m.get(&*b.id).copied().unwrap_or(0.0).max(0.0) as u64,
                        None => slot.sessions,
                    },
                    reserved: b.reserved(now, rules.reservation_ttl),
                    // With shared accounting, `sessions` are every gateway's requests already.
                    inflight: match inflight {
                        Some(_) => 0,
                        None => b.inflight.load(Ordering::Relaxed),
                    },
                    capacity: slot.capacity,
                    weight: slot.weight,
                    ramp: ramp(
                        now.saturating_duration_since(b.first_seen).as_secs_f64(),
                        rules.slow_start.as_secs_f64(),
                    ),
                };
                (kind == Kind::Request || !c.full()).then(|| c.load())
            };
            let i = pick_two(self.routable.len(), load, rng)?;
            let slot = &self.all[self.routable[i]];
            // A half-open breaker lets one request through at a time: another is drawn.
            if !slot.backend.allow(now, rules.breaker_open) {
                refused.push(i);
                continue;
            }
            if kind == Kind::Session {
                slot.backend.reserve(now);
            }
            return Some(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::topology::{Count, Server};

    const CORDONED: Admin = Admin::Cordoned {
        since_ms: 1,
        by_operator: false,
    };

    fn server(id: &str, sessions: u64, passing: bool, admin: Admin) -> Server {
        Server {
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 9000,
            capacity: 100,
            weight: 1.0,
            passing,
            admin,
            sessions: Count::Known(sessions),
            provisioning: false,
            starting: false,
        }
    }

    fn topology(version: u64, mut servers: Vec<Server>) -> Topology {
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        Topology {
            version,
            servers,
            ..Topology::default()
        }
    }

    const RULES: PickRules = PickRules {
        reservation_ttl: Duration::from_secs(5),
        slow_start: Duration::ZERO,
        breaker_open: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn a_server_keeps_its_state_across_tables_and_loses_it_when_it_leaves() {
        let now = Instant::now();
        let mut backends = HashMap::new();
        let t1 = topology(
            1,
            vec![
                server("a", 10, true, Admin::Active),
                server("b", 90, true, Admin::Active),
                server("c", 0, true, CORDONED),
                server("d", 0, false, Admin::Active),
            ],
        );
        let (table, left) = Table::build(&t1, &mut backends, Some(7000), now);
        assert!(left.is_empty());
        assert_eq!(table.all.len(), 4, "the probe checks every server");
        assert_eq!(
            table.routable.len(),
            2,
            "only passing, active servers are routed to"
        );
        assert_eq!(&*table.all[0].host, "127.0.0.1:7000");
        let a = table.all[0].backend.clone();
        a.inflight.fetch_add(3, Ordering::Relaxed);
        let t2 = topology(2, vec![server("a", 10, true, Admin::Active)]);
        let (table, left) = Table::build(&t2, &mut backends, None, now);
        assert!(Arc::ptr_eq(&table.all[0].backend, &a), "a keeps its state");
        assert_eq!(table.all[0].backend.inflight.load(Ordering::Relaxed), 3);
        let mut gone: Vec<&str> = left.iter().map(|b| &*b.id).collect();
        gone.sort_unstable();
        assert_eq!(gone, ["b", "c", "d"]);
        assert_eq!(backends.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reported_rise_takes_the_reservations_it_shows() {
        let now = Instant::now();
        let mut backends = HashMap::new();
        let fleet = |n| topology(1, vec![server("a", n, true, Admin::Active)]);
        let (table, _) = Table::build(&fleet(10), &mut backends, None, now);
        for _ in 0..5 {
            table
                .pick(&[], Kind::Session, None, RULES, now, &mut rand::rng())
                .unwrap();
        }
        let a = table.all[0].backend.clone();
        assert_eq!(a.reserved(now, RULES.reservation_ttl), 5);
        // Three of the five are counted now: two reservations remain, not five.
        Table::build(&fleet(13), &mut backends, None, now);
        assert_eq!(a.reserved(now, RULES.reservation_ttl), 2);
        // A fall takes none; a larger rise takes what is left.
        Table::build(&fleet(12), &mut backends, None, now);
        assert_eq!(a.reserved(now, RULES.reservation_ttl), 2);
        Table::build(&fleet(40), &mut backends, None, now);
        assert_eq!(a.reserved(now, RULES.reservation_ttl), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn picks_skip_down_open_tried_and_full_servers() {
        let now = Instant::now();
        let mut backends = HashMap::new();
        let t = topology(
            1,
            vec![
                server("full", 100, true, Admin::Active),
                server("down", 0, true, Admin::Active),
                server("open", 0, true, Admin::Active),
                server("tried", 0, true, Admin::Active),
                server("ok", 50, true, Admin::Active),
            ],
        );
        let (table, _) = Table::build(&t, &mut backends, None, now);
        let by_id = |id: &str| table.all.iter().find(|s| &*s.backend.id == id).unwrap();
        for _ in 0..2 {
            by_id("down").backend.checked(false, 2, 2);
        }
        assert!(!by_id("down").backend.up());
        for _ in 0..5 {
            by_id("open")
                .backend
                .outcome(false, now, 5, RULES.breaker_open);
        }
        let tried: Vec<Arc<str>> = vec!["tried".into()];
        let mut rng = rand::rng();
        for _ in 0..50 {
            let s = table
                .pick(&tried, Kind::Session, None, RULES, now, &mut rng)
                .unwrap();
            assert_eq!(&*s.backend.id, "ok");
        }
        // 50 reservations on top of 50 sessions: full now.
        assert!(table
            .pick(&tried, Kind::Session, None, RULES, now, &mut rng)
            .is_none());
        // A plain request is not refused for fullness.
        let r = table.pick(&tried, Kind::Request, None, RULES, now, &mut rng);
        assert!(r.is_some_and(|s| ["ok", "full"].contains(&&*s.backend.id)));
        // Past the open time, the breaker half-opens: one probe request.
        let later = now + RULES.breaker_open;
        let only_open: Vec<Arc<str>> = ["full", "tried", "ok"].map(Arc::from).to_vec();
        let probe = table.pick(&only_open, Kind::Request, None, RULES, later, &mut rng);
        assert_eq!(probe.map(|s| &*s.backend.id), Some("open"));
        assert!(
            table
                .pick(&only_open, Kind::Request, None, RULES, later, &mut rng)
                .is_none(),
            "one probe at a time"
        );
        let open = &by_id("open").backend;
        assert_eq!(
            open.outcome(true, later, 5, RULES.breaker_open),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert_eq!(open.outcome(true, later, 5, RULES.breaker_open), None);
    }
}
