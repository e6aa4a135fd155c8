//! Shared request accounting (optional): per-server in-flight requests in a Redis sorted set
//! `rebalancer:<svc>:inflight`, so several gateway replicas balance requests together.
//! Every change is one Lua script (atomic); every call has a timeout; a request's slot is
//! released by a guard on every completion path — errors and client aborts included. When
//! Redis does not answer in time the gateway routes on its own view instead of waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

pub fn key(service: &str) -> String {
    format!("rebalancer:{service}:inflight")
}

const ACQUIRE: &str = "return redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])";
const RELEASE: &str = r"
local v = tonumber(redis.call('ZINCRBY', KEYS[1], -1, ARGV[1]))
if v <= 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return v";

#[derive(Clone)]
pub struct Accounting {
    conn: ConnectionManager,
    key: Arc<str>,
    timeout: Duration,
    acquire: Arc<Script>,
    release: Arc<Script>,
}

impl Accounting {
    pub fn new(
        client: redis::Client,
        service: &str,
        timeout: Duration,
    ) -> Result<Accounting, redis::RedisError> {
        let conn = ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout * 10))
                // Longer than a request waits (`timeout`): a change that Redis made must be
                // seen to have been made, or it could not be undone (see `acquire`).
                .set_response_timeout(Some(timeout * 10)),
        )?;
        Ok(Accounting {
            conn,
            key: key(service).into(),
            timeout,
            acquire: Arc::new(Script::new(ACQUIRE)),
            release: Arc::new(Script::new(RELEASE)),
        })
    }

    /// In-flight counts of every server, or `None` when Redis does not answer in time.
    pub async fn inflight(&self) -> Option<HashMap<String, f64>> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(&*self.key).arg(0).arg(-1).arg("WITHSCORES");
        let q = cmd.query_async::<Vec<(String, f64)>>(&mut c);
        match tokio::time::timeout(self.timeout, q).await {
            Ok(Ok(v)) => Some(v.into_iter().collect()),
            _ => None,
        }
    }

    /// Counts a request to `server`; the slot is released when the guard drops.
    ///
    /// The increment runs in a task of its own, so it is undone even when nobody waits for
    /// it any more: the request gave up on Redis after `timeout`, or the client went away
    /// while it was on its way. Otherwise such an increment would stay counted for good.
    pub async fn acquire(&self, server: &str) -> Option<Slot> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let acc = self.clone();
        let server = server.to_string();
        tokio::spawn(async move {
            let mut c = acc.conn.clone();
            let mut inv = acc.acquire.key(&*acc.key);
            inv.arg(&server);
            if let Err(e) = inv.invoke_async::<f64>(&mut c).await {
                tracing::debug!(server, error = %e, "shared accounting unavailable; request not counted");
                return;
            }
            // When the receiver is gone, the slot comes back and dropping it releases it.
            let _ = tx.send(Slot { acc, server });
        });
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(slot)) => Some(slot),
            _ => None,
        }
    }
}

/// One counted request.
pub struct Slot {
    acc: Accounting,
    server: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let acc = self.acc.clone();
        let server = std::mem::take(&mut self.server);
        // Runs even when the request's own task was cancelled (a client abort). Retried only
        // when Redis refused the connection: after any other error the decrement may have
        // been made, and making it twice would take another request's count.
        tokio::spawn(async move {
            let mut c = acc.conn.clone();
            let mut inv = acc.release.key(&*acc.key);
            inv.arg(&server);
            for _ in 0..3 {
                match inv.invoke_async::<f64>(&mut c).await {
                    Ok(_) => return,
                    Err(e) if e.is_connection_refusal() => tokio::time::sleep(acc.timeout).await,
                    Err(e) => {
                        tracing::warn!(server, error = %e, "could not release a shared accounting slot");
                        return;
                    }
                }
            }
            tracing::warn!(
                server,
                "could not release a shared accounting slot: Redis refused"
            );
        });
    }
}
