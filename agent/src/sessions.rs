//! What the agent needs from a connection server: how many sessions it holds, and closing
//! some of them. [`SessionRegistry`] implements it for servers that register each session.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::sync::{oneshot, watch};

/// Which sessions to close first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VictimPolicy {
    /// Spread the disruption evenly over old and new clients.
    #[default]
    Random,
    /// The most recently opened first: the clients that have had the least of this server.
    Newest,
    /// The longest-lived first.
    Oldest,
}

impl VictimPolicy {
    pub const ALL: [VictimPolicy; 3] = [
        VictimPolicy::Random,
        VictimPolicy::Newest,
        VictimPolicy::Oldest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VictimPolicy::Random => "random",
            VictimPolicy::Newest => "newest",
            VictimPolicy::Oldest => "oldest",
        }
    }
}

impl std::fmt::Display for VictimPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VictimPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VictimPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a victim policy (random, newest, oldest)"))
    }
}

/// Why a session is being closed; servers turn it into a WebSocket close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Shed to rebalance: reconnect now (1013, try again later — elsewhere).
    Shed,
    /// The server is draining or shutting down (1012, service restart).
    Drain,
}

impl CloseReason {
    /// WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Shed => 1013,
            CloseReason::Drain => 1012,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Shed => "rebalancing: please reconnect",
            CloseReason::Drain => "server draining: please reconnect",
        }
    }
}

/// The server side of the agent contract.
pub trait Sessions: Send + Sync + 'static {
    /// Sessions held now.
    fn count(&self) -> u64;
    /// Follows the count as it changes.
    fn watch_count(&self) -> watch::Receiver<u64>;
    /// Asks up to `n` sessions, chosen by `policy`, to close; returns how many were asked.
    fn close(&self, n: u64, policy: VictimPolicy, reason: CloseReason) -> u64;
}

struct Entry {
    close: oneshot::Sender<CloseReason>,
}

struct Inner {
    next: u64,
    /// Open sessions by opening order: the first is the oldest.
    open: BTreeMap<u64, Entry>,
}

/// A registry of open sessions. A connection task holds a [`SessionGuard`] and waits on it to
/// be told to close; dropping the guard removes the session.
#[derive(Clone)]
pub struct SessionRegistry {
    inner: Arc<Mutex<Inner>>,
    count: Arc<watch::Sender<u64>>,
}

impl Default for SessionRegistry {
    fn default() -> Self {
        SessionRegistry {
            inner: Arc::new(Mutex::new(Inner {
                next: 0,
                open: BTreeMap::new(),
            })),
            count: Arc::new(watch::channel(0).0),
        }
    }
}

/// One open session. Await [`SessionGuard::closed`] beside the connection's own work.
pub struct SessionGuard {
    registry: SessionRegistry,
    seq: u64,
    close: Option<oneshot::Receiver<CloseReason>>,
}

impl SessionGuard {
    /// Resolves when the agent asks this session to close.
    pub async fn closed(&mut self) -> CloseReason {
        match self.close.as_mut() {
            Some(rx) => match rx.await {
                Ok(r) => {
                    self.close = None;
                    r
                }
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry.remove(self.seq);
    }
}

impl SessionRegistry {
    pub fn new() -> SessionRegistry {
        SessionRegistry::default()
    }

    /// Registers a new session.
    pub fn open(&self) -> SessionGuard {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().expect("not poisoned");
        let seq = inner.next;
        inner.next += 1;
        inner.open.insert(seq, Entry { close: tx });
        let n = inner.open.len() as u64;
        drop(inner);
        self.count.send_replace(n);
        SessionGuard {
            registry: self.clone(),
            seq,
            close: Some(rx),
        }
    }

    fn remove(&self, seq: u64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if inner.open.remove(&seq).is_some() {
            let n = inner.open.len() as u64;
            drop(inner);
            self.count.send_replace(n);
        }
    }

    /// Picks victims' sequence numbers by `policy` (pure apart from `rng`).
    fn pick(
        open: &BTreeMap<u64, Entry>,
        n: u64,
        policy: VictimPolicy,
        rng: &mut impl Rng,
    ) -> Vec<u64> {
        let n = (n as usize).min(open.len());
        match policy {
            VictimPolicy::Oldest => open.keys().take(n).copied().collect(),
            VictimPolicy::Newest => open.keys().rev().take(n).copied().collect(),
            VictimPolicy::Random => {
                let keys: Vec<u64> = open.keys().copied().collect();
                rand::seq::index::sample(rng, keys.len(), n)
                    .into_iter()
                    .map(|i| keys[i])
                    .collect()
            }
        }
    }
}

impl Sessions for SessionRegistry {
    fn count(&self) -> u64 {
        *self.count.borrow()
    }

    fn watch_count(&self) -> watch::Receiver<u64> {
        self.count.subscribe()
    }

    fn close(&self, n: u64, policy: VictimPolicy, reason: CloseReason) -> u64 {
        let mut inner = self.inner.lock().expect("not poisoned");
        let victims = Self::pick(&inner.open, n, policy, &mut rand::rng());
        let mut asked = 0;
        for seq in victims {
            // A victim leaves the registry when its task drops the guard; until then it is
            // no longer eligible, so two commands never pick the same session.
            if let Some(e) = inner.open.remove(&seq) {
                if e.close.send(reason).is_ok() {
                    asked += 1;
                }
            }
        }
        let left = inner.open.len() as u64;
        drop(inner);
        self.count.send_replace(left);
        asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(r: &SessionRegistry, n: usize) -> Vec<SessionGuard> {
        (0..n).map(|_| r.open()).collect()
    }

    async fn told(guards: &mut [SessionGuard]) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, g) in guards.iter_mut().enumerate() {
            if tokio::time::timeout(std::time::Duration::from_millis(1), g.closed())
                .await
                .is_ok()
            {
                out.push(i);
            }
        }
        out
    }

    #[tokio::test]
    async fn newest_and_oldest_pick_by_opening_order() {
        let r = SessionRegistry::new();
        let mut g = opened(&r, 5);
        assert_eq!(r.close(2, VictimPolicy::Newest, CloseReason::Shed), 2);
        assert_eq!(told(&mut g).await, vec![3, 4]);
        assert_eq!(r.close(2, VictimPolicy::Oldest, CloseReason::Shed), 2);
        assert_eq!(told(&mut g).await, vec![0, 1]);
        assert_eq!(r.count(), 1);
    }

    #[tokio::test]
    async fn random_picks_distinct_sessions_and_never_more_than_there_are() {
        let r = SessionRegistry::new();
        let mut g = opened(&r, 10);
        assert_eq!(r.close(4, VictimPolicy::Random, CloseReason::Shed), 4);
        assert_eq!(told(&mut g).await.len(), 4);
        assert_eq!(r.close(100, VictimPolicy::Random, CloseReason::Drain), 6);
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn random_spreads_over_the_whole_registry() {
        let mut open = BTreeMap::new();
        for i in 0..100 {
            open.insert(
                i,
                Entry {
                    close: oneshot::channel().0,
                },
            );
        }
        let mut rng = rand::rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            seen.extend(SessionRegistry::pick(
                &open,
                5,
                VictimPolicy::Random,
                &mut rng,
            ));
        }
        assert!(
            seen.len() > 80,
            "random victims cover the registry: {}",
            seen.len()
        );
    }

    #[tokio::test]
    async fn the_count_follows_opens_closes_and_drops() {
        let r = SessionRegistry::new();
        let mut w = r.watch_count();
        let g = opened(&r, 3);
        assert_eq!(*w.borrow_and_update(), 3);
        drop(g);
        assert_eq!(r.count(), 0);
    }
}
