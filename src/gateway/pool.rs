//! Idle keep-alive connections to the servers, shared between client connections.
//!
//! A client connection drives its own server connections on its own task (see
//! `Upstreams`); when it ends, the idle ones it leaves are put here, so that the next client
//! connection (a client that does not keep its connection alive, say) reuses them instead
//! of opening new ones. Newest first; entries older than the idle timeout are dropped,
//! which closes their connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// One server's idle items, each with when it was put.
type Idle<T> = Vec<(Instant, T)>;

pub struct IdlePool<T> {
    idle: Mutex<HashMap<Arc<str>, Idle<T>>>,
    max_per_server: usize,
    ttl: Duration,
}

impl<T> IdlePool<T> {
    pub fn new(max_per_server: usize, ttl: Duration) -> Self {
        IdlePool {
            idle: Mutex::new(HashMap::new()),
            max_per_server,
            ttl,
        }
    }

    /// Keeps `item` for `server`; hands it back when the server already has its fill.
    pub fn put(&self, server: Arc<str>, item: T, now: Instant) -> Result<(), T> {
        let mut idle = self.idle.lock().expect("not poisoned");
        let list = idle.entry(server).or_default();
        if list.len() >= self.max_per_server {
            return Err(item);
        }
        list.push((now, item));
        Ok(())
    }

    /// The newest idle item for `server` that is still `usable` and younger than the idle
    /// timeout; the others met on the way are dropped.
    pub fn take(&self, server: &str, now: Instant, usable: impl Fn(&T) -> bool) -> Option<T> {
        let mut idle = self.idle.lock().expect("not poisoned");
        let list = idle.get_mut(server)?;
        while let Some((at, item)) = list.pop() {
            if now.saturating_duration_since(at) < self.ttl && usable(&item) {
                return Some(item);
            }
        }
        None
    }

    /// Drops every item past the idle timeout; returns how many.
    pub fn prune(&self, now: Instant) -> usize {
        let mut idle = self.idle.lock().expect("not poisoned");
        let mut dropped = 0;
        idle.retain(|_, list| {
            let before = list.len();
            list.retain(|(at, _)| now.saturating_duration_since(*at) < self.ttl);
            dropped += before - list.len();
            !list.is_empty()
        });
        dropped
    }

    /// Idle items held, over every server.
    pub fn len(&self) -> usize {
        let idle = self.idle.lock().expect("not poisoned");
        idle.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_usable_item_is_taken_and_stale_or_dead_ones_are_dropped() {
        let t0 = Instant::now();
        let pool = IdlePool::new(10, Duration::from_secs(90));
        let s: Arc<str> = "s1".into();
        pool.put(s.clone(), 1, t0).unwrap();
        pool.put(s.clone(), 2, t0 + Duration::from_secs(80))
            .unwrap();
        pool.put(s.clone(), 3, t0 + Duration::from_secs(85))
            .unwrap();
        // 3 is closed; 2 is the newest usable one.
        let now = t0 + Duration::from_secs(95);
        assert_eq!(pool.take("s1", now, |i| *i != 3), Some(2));
        // 1 is past the idle timeout: dropped, not handed out.
        assert_eq!(pool.take("s1", now, |_| true), None);
        assert!(pool.is_empty());
        assert_eq!(pool.take("s2", now, |_| true), None);
    }

    #[test]
    fn a_server_holds_at_most_its_fill_and_prune_drops_what_has_expired() {
        let t0 = Instant::now();
        let pool = IdlePool::new(2, Duration::from_secs(10));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(pool.put(a.clone(), 1, t0).is_ok());
        assert!(pool.put(a.clone(), 2, t0 + Duration::from_secs(5)).is_ok());
        assert_eq!(pool.put(a.clone(), 3, t0), Err(3), "full: handed back");
        assert!(pool.put(b, 4, t0).is_ok());
        assert_eq!(pool.prune(t0 + Duration::from_secs(12)), 2);
        assert_eq!(pool.len(), 1);
        assert_eq!(
            pool.take("a", t0 + Duration::from_secs(12), |_| true),
            Some(2)
        );
    }
}
