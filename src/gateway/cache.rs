//! The static cache: GET responses for configured path prefixes, kept in memory by moka with
//! a TTL and a capacity in entries, honouring `Cache-Control`. moka's housekeeping collects
//! expired entries; a background task runs it even when the cache is idle.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// A cached response.
#[derive(Debug, Clone)]
pub struct Cached {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
    pub expires: Instant,
}

/// How long a response may be kept, from its `Cache-Control`; `None`: not at all.
pub fn ttl_for(cache_control: Option<&str>, default: Duration) -> Option<Duration> {
    let Some(cc) = cache_control else {
        return Some(default);
    };
    let mut ttl = default;
    for d in cc.split(',').map(|d| d.trim().to_ascii_lowercase()) {
        if d == "no-store" || d == "no-cache" || d == "private" {
            return None;
        }
        if let Some(v) = d
            .strip_prefix("s-maxage=")
            .or_else(|| d.strip_prefix("max-age="))
        {
            match v.trim_matches('"').parse::<u64>() {
                Ok(0) | Err(_) => return None,
                Ok(s) => ttl = ttl.min(Duration::from_secs(s)),
            }
        }
    }
    Some(ttl)
}

#[derive(Clone)]
pub struct StaticCache {
    inner: moka::sync::Cache<String, Arc<Cached>>,
    paths: Arc<Vec<String>>,
    ttl: Duration,
}

impl StaticCache {
    pub fn new(capacity: u64, ttl: Duration, paths: Vec<String>) -> StaticCache {
        StaticCache {
            inner: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            paths: Arc::new(paths),
            ttl,
        }
    }

    pub fn covers(&self, path: &str) -> bool {
        self.paths.iter().any(|p| path.starts_with(p.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<Arc<Cached>> {
        let hit = self.inner.get(key)?;
        if Instant::now() >= hit.expires {
            self.inner.invalidate(key);
            return None;
        }
        Some(hit)
    }

    /// Stores a 200 response unless its `Cache-Control` forbids; returns whether it did.
    pub fn put(
        &self,
        key: &str,
        status: u16,
        headers: Vec<(String, String)>,
        body: bytes::Bytes,
    ) -> bool {
        if status != 200 {
            return false;
        }
        let cc = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("cache-control"))
            .map(|(_, v)| v.as_str());
        let Some(ttl) = ttl_for(cc, self.ttl) else {
            return false;
        };
        self.inner.insert(
            key.to_string(),
            Arc::new(Cached {
                status,
                headers,
                body,
                expires: Instant::now() + ttl,
            }),
        );
        true
    }

    /// Entries held (after pending housekeeping).
    pub fn len(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Collects expired entries in the background until `stop`.
    pub fn spawn_collector(&self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => inner.run_pending_tasks(),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_is_honoured() {
        let d = Duration::from_secs(60);
        assert_eq!(ttl_for(None, d), Some(d));
        assert_eq!(
            ttl_for(Some("public, max-age=5"), d),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            ttl_for(Some("max-age=600"), d),
            Some(d),
            "never longer than the configured TTL"
        );
        assert_eq!(ttl_for(Some("no-store"), d), None);
        assert_eq!(ttl_for(Some("private, max-age=60"), d), None);
        assert_eq!(ttl_for(Some("max-age=0"), d), None);
    }

    #[tokio::test]
    async fn hits_expire_and_the_capacity_bounds_the_entries() {
        let c = StaticCache::new(10, Duration::from_millis(200), vec!["/static/".into()]);
        assert!(c.covers("/static/app.js") && !c.covers("/api"));
        assert!(c.put("/static/a", 200, vec![], "a".into()));
        assert!(!c.put("/static/b", 404, vec![], "b".into()), "only 200s");
        assert_eq!(c.get("/static/a").unwrap().body, "a");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(c.get("/static/a").is_none(), "expired after the TTL");
        let big = StaticCache::new(10, Duration::from_secs(60), vec!["/".into()]);
        for i in 0..100 {
            big.put(&format!("/{i}"), 200, vec![], "x".into());
        }
        assert!(big.len() <= 10, "{} entries", big.len());
    }
}
