//! The static cache: GET responses for configured path prefixes, kept in memory by moka with
//! a TTL, honouring `Cache-Control` and `Vary`, and safe to put in front of personal
//! responses: nothing with `Set-Cookie` is stored, nor an answer to a request carrying
//! `Authorization` or `Cookie` unless the server marked it `public`. Its capacity is in
//! bytes (`cache_max_bytes`, each entry weighing its size), and no entry may be larger than
//! `cache_max_entry_bytes`, so a body is kept only up to that while it streams to the
//! client. moka's housekeeping collects expired entries; a background task runs it even
//! when the cache is idle.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

/// A cached response, and the request headers its `Vary` names, as they were.
#[derive(Debug, Clone)]
pub struct Cached {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
    pub expires: Instant,
    pub vary: Vec<(String, Option<String>)>,
}

impl Cached {
    /// What the entry weighs against `cache_max_bytes`.
    fn size(&self, key: &str) -> usize {
        const OVERHEAD: usize = 256;
        key.len()
            + self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
            + self
                .vary
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                .sum::<usize>()
            + OVERHEAD
    }
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

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Status,
    CacheControl,
    SetCookie,
    /// The request carried `Authorization` or `Cookie`, and the response is not `public`.
    Personal,
    VaryStar,
    TooLarge,
}

/// Whether a response to a request may be stored, and for how long (pure).
pub fn storable(
    request: &HeaderMap,
    status: u16,
    response: &HeaderMap,
    default_ttl: Duration,
    max_entry: usize,
) -> Result<Duration, NotStored> {
    if status != 200 {
        return Err(NotStored::Status);
    }
    let text = |h: &HeaderMap, name: &str| -> Vec<String> {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
            .collect()
    };
    if response.contains_key(http::header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let cc = text(response, "cache-control").join(",");
    let ttl = ttl_for((!cc.is_empty()).then_some(cc.as_str()), default_ttl)
        .ok_or(NotStored::CacheControl)?;
    let public = cc.split(',').any(|d| d.trim() == "public");
    if (request.contains_key(http::header::AUTHORIZATION)
        || request.contains_key(http::header::COOKIE))
        && !public
    {
        return Err(NotStored::Personal);
    }
    if text(response, "vary")
        .iter()
        .flat_map(|v| v.split(','))
        .any(|n| n.trim() == "*")
    {
        return Err(NotStored::VaryStar);
    }
    let declared = response
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_entry) {
        return Err(NotStored::TooLarge);
    }
    Ok(ttl)
}

/// The request headers a response's `Vary` names, with the values this request has.
pub fn vary_of(request: &HeaderMap, response: &HeaderMap) -> Vec<(String, Option<String>)> {
    response
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .map(|n| {
            let value = request
                .get_all(n.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(", ");
            let value = (!value.is_empty()).then_some(value);
            (n, value)
        })
        .collect()
}

#[derive(Clone)]
pub struct StaticCache {
    inner: moka::sync::Cache<String, Arc<Cached>>,
    paths: Arc<Vec<String>>,
    ttl: Duration,
    max_entry: usize,
}

impl StaticCache {
    /// At most `max_bytes` in all, `max_entry` bytes each, and `capacity` entries (an entry
    /// weighs its size, and at least `max_bytes / capacity`).
    pub fn new(
        capacity: u64,
        max_bytes: u64,
        max_entry: usize,
        ttl: Duration,
        paths: Vec<String>,
    ) -> StaticCache {
        let least = (max_bytes / capacity.max(1)).max(1);
        StaticCache {
            inner: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(move |key: &String, v: &Arc<Cached>| {
                    (v.size(key) as u64).max(least).min(u64::from(u32::MAX)) as u32
                })
                .time_to_live(ttl)
                .build(),
            paths: Arc::new(paths),
            ttl,
            max_entry,
        }
    }

    pub fn covers(&self, path: &str) -> bool {
        self.paths.iter().any(|p| path.starts_with(p.as_str()))
    }

    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The entry for `key`, if it is fresh and was stored for a request like this one (the
    /// headers its `Vary` names have the same values).
    pub fn get(&self, key: &str, request: &HeaderMap) -> Option<Arc<Cached>> {
        let hit = self.inner.get(key)?;
        if Instant::now() >= hit.expires {
            self.inner.invalidate(key);
            return None;
        }
        let same = hit.vary.iter().all(|(name, value)| {
            let now: Vec<&str> = request
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let now = now.join(", ");
            value.as_deref().unwrap_or("") == now
        });
        same.then_some(hit)
    }

    /// Stores `entry` under `key` unless it is over the per-entry limit.
    pub fn put(&self, key: &str, entry: Cached) -> bool {
        if entry.body.len() > self.max_entry {
            return false;
        }
        self.inner.insert(key.to_string(), Arc::new(entry));
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

    /// Bytes held (after pending housekeeping), as entries weigh.
    pub fn weight(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.weighted_size()
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

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    fn entry(body: &'static str, vary: Vec<(String, Option<String>)>) -> Cached {
        Cached {
            status: 200,
            headers: vec![],
            body: body.into(),
            expires: Instant::now() + Duration::from_secs(60),
            vary,
        }
    }

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

    #[test]
    fn personal_responses_are_never_stored() {
        let d = Duration::from_secs(60);
        let ok = |req: &[(&'static str, &'static str)], resp: &[(&'static str, &'static str)]| {
            storable(&headers(req), 200, &headers(resp), d, 1000)
        };
        assert_eq!(ok(&[], &[]), Ok(d));
        assert_eq!(ok(&[], &[("set-cookie", "a=1")]), Err(NotStored::SetCookie));
        assert_eq!(
            ok(&[("authorization", "Bearer x")], &[]),
            Err(NotStored::Personal)
        );
        assert_eq!(
            ok(&[("cookie", "s=1")], &[("cache-control", "max-age=9")]),
            Err(NotStored::Personal)
        );
        assert_eq!(
            ok(
                &[("cookie", "s=1")],
                &[("cache-control", "public, max-age=9")]
            ),
            Ok(Duration::from_secs(9))
        );
        assert_eq!(ok(&[], &[("vary", "accept, *")]), Err(NotStored::VaryStar));
        assert_eq!(
            ok(&[], &[("content-length", "1001")]),
            Err(NotStored::TooLarge)
        );
        assert_eq!(
            storable(&headers(&[]), 404, &headers(&[]), d, 1000),
            Err(NotStored::Status)
        );
    }

    #[test]
    fn a_varied_entry_answers_only_requests_like_the_one_it_was_stored_for() {
        let c = StaticCache::new(10, 1 << 20, 1000, Duration::from_secs(60), vec!["/".into()]);
        let gzip = headers(&[("accept-encoding", "gzip")]);
        let vary = vary_of(&gzip, &headers(&[("vary", "Accept-Encoding")]));
        assert_eq!(
            vary,
            vec![("accept-encoding".to_string(), Some("gzip".to_string()))]
        );
        assert!(c.put("/a", entry("zipped", vary)));
        assert!(c.get("/a", &gzip).is_some());
        assert!(c
            .get("/a", &headers(&[("accept-encoding", "br")]))
            .is_none());
        assert!(c.get("/a", &headers(&[])).is_none());
        // A header absent when stored must be absent when served.
        let vary = vary_of(&headers(&[]), &headers(&[("vary", "accept-language")]));
        assert!(c.put("/b", entry("plain", vary)));
        assert!(c.get("/b", &headers(&[])).is_some());
        assert!(c
            .get("/b", &headers(&[("accept-language", "fr")]))
            .is_none());
    }

    #[tokio::test]
    async fn entries_expire_and_the_capacity_bounds_bytes_and_entries() {
        let c = StaticCache::new(
            10,
            1 << 20,
            1000,
            Duration::from_millis(200),
            vec!["/static/".into()],
        );
        assert!(c.covers("/static/app.js") && !c.covers("/api"));
        assert!(c.put("/static/a", entry("a", vec![])));
        assert_eq!(c.get("/static/a", &HeaderMap::new()).unwrap().body, "a");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            c.get("/static/a", &HeaderMap::new()).is_none(),
            "expired after the TTL"
        );
        let few = StaticCache::new(10, 1 << 20, 1000, Duration::from_secs(60), vec!["/".into()]);
        for i in 0..100 {
            few.put(&format!("/{i}"), entry("x", vec![]));
        }
        assert!(few.len() <= 10, "{} entries", few.len());
        // 64 KiB in all, 20 KiB each at most: entries of 10 KiB, at most six of them.
        let small = StaticCache::new(
            1000,
            64 * 1024,
            20 * 1024,
            Duration::from_secs(60),
            vec!["/".into()],
        );
        let body: &'static str = Box::leak("b".repeat(10 * 1024).into_boxed_str());
        for i in 0..50 {
            small.put(&format!("/{i}"), entry(body, vec![]));
        }
        assert!(small.weight() <= 64 * 1024, "{} bytes", small.weight());
        assert!(small.len() <= 6, "{} entries", small.len());
        let huge: &'static str = Box::leak("h".repeat(30 * 1024).into_boxed_str());
        assert!(
            !small.put("/huge", entry(huge, vec![])),
            "over the per-entry limit"
        );
    }
}
