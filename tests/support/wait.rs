//! Waiting for a condition with a deadline, never a fixed sleep, and the waits the
//! closed-loop tests share.

use std::future::Future;
use std::time::Duration;

use super::procs::Controller;
use super::redis::Redis;

/// How long tests wait for something that should happen in well under a second.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long closed-loop tests wait for a fleet to settle.
pub const LOOP_WAIT: Duration = Duration::from_secs(90);

/// Waits (up to [`LOOP_WAIT`]) until the session counts of service `ws` satisfy `f`.
pub async fn counts_where(
    redis: &Redis,
    what: &str,
    f: impl Fn(&std::collections::BTreeMap<String, u64>) -> bool,
) -> std::collections::BTreeMap<String, u64> {
    eventually(what, LOOP_WAIT, || async {
        let c = redis.counts("ws").await;
        f(&c).then_some(c)
    })
    .await
}

/// Waits until every shed the controller published has been carried out and acked by its
/// server (acks come after the server's spread window), and every one of the `clients` is
/// counted on a server again (the last ones shed reconnect after their backoff).
pub async fn sheds_settled(ctl: &Controller, redis: &Redis, clients: u64) {
    eventually(
        "every published shed acked and its clients back",
        LOOP_WAIT,
        || async {
            let shed = [("kind", "shed"), ("result", "ok")];
            let published = ctl
                .metric("rebalancer_actions_total", &shed)
                .await
                .unwrap_or(0.0);
            let acked = redis.acks("ws").await.len() as f64;
            let counted: u64 = redis.counts("ws").await.values().sum();
            (published == acked && counted == clients).then_some(())
        },
    )
    .await;
}

/// The acks stream once it has not changed for two seconds: with no controller left to
/// publish, every shed has then been carried out and acked (servers ack after their shed
/// window, 1 s in these tests).
pub async fn acks_settled(redis: &Redis) -> Vec<std::collections::HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + LOOP_WAIT;
    let mut last = redis.acks("ws").await;
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let acks = redis.acks("ws").await;
        if acks != last {
            (last, since) = (acks, tokio::time::Instant::now());
        } else if since.elapsed() >= Duration::from_secs(2) {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the acks stream never settled: {last:?}"
        );
    }
}
