//! Redis session counts: keyspace notifications on `rebalancer:<svc>:sessions:*`.
//!
//! Subscribe first, then SCAN + MGET (so no change falls in a gap); afterwards read only the
//! keys that changed, batched into one MGET per burst; resync in full after every reconnect
//! and on a slow reconcile tick, which also proves the connection is alive.
//!
//! A notification only says "this key changed". A task of its own drains them as they
//! arrive into a set of dirty keys, so a key changed a thousand times before it is read is
//! read once, and memory is bounded by the number of keys, not by the update rate: nothing
//! piles up in the client's queue while the reader waits on Redis or the fold is busy.
//! Past [`MAX_DIRTY`] distinct keys the set gives up and the next read is a full resync.
//!
//! Notifications can stop while everything looks connected (another tenant's `CONFIG SET`,
//! a restarted managed Redis, a half-open subscription), and then counts freeze while the
//! snapshot says it is synced. So the source writes a heartbeat key of its own every
//! [`HEARTBEAT`] and expects the notification of that write back within [`HEARTBEAT`]; when
//! it does not come, the source fails (the snapshot goes stale) and reconnects, which
//! re-applies `notify-keyspace-events` (or names the setting) and resyncs in full.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, AsyncTypedCommands, Client, RedisError};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::contract::protocol::sessions_key_prefix;
use crate::fleet::topology::ServerId;

/// The notification classes needed: keyspace events (`K`) for string commands (`$`),
/// generic ones such as DEL and EXPIRE (`g`), expiries (`x`) and evictions (`e`).
pub const NEEDED_FLAGS: &str = "K$gxe";
/// Most keys read in one MGET.
pub const BATCH: usize = 1000;
/// Most distinct dirty keys held between two reads; past it, the next read is a full resync.
pub const MAX_DIRTY: usize = 100_000;
/// How often the heartbeat key is written, and how long its notification may take.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(5);

/// A count as read: the integer, or the text that is not one.
pub type Reading = Result<u64, String>;

#[derive(Debug, Clone, PartialEq)]
pub enum SessionsUpdate {
    /// Every count there is (after a connect, or on the reconcile tick).
    Resync(Vec<(ServerId, Reading)>),
    /// Counts that changed; `None` for a key that is gone (deleted, expired).
    Patch {
        changes: Vec<(ServerId, Option<Reading>)>,
        /// When the oldest notification of this read arrived.
        noticed_at: Instant,
        /// Notifications coalesced into this read.
        notifications: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSourceError {
    #[error("cannot connect to Redis at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: RedisError,
    },
    #[error(
        "Redis at {addr} has notify-keyspace-events {current:?} and refused CONFIG SET ({source}); \
         set notify-keyspace-events to include {NEEDED_FLAGS} (for example `notify-keyspace-events {NEEDED_FLAGS}` in redis.conf)"
    )]
    Notifications {
        addr: String,
        current: String,
        #[source]
        source: RedisError,
    },
    #[error("cannot subscribe to {pattern} on Redis at {addr}: {source}")]
    Subscribe {
        addr: String,
        pattern: String,
        #[source]
        source: RedisError,
    },
    #[error("cannot read session counts from Redis at {addr}: {source}")]
    Read {
        addr: String,
        #[source]
        source: RedisError,
    },
    #[error("the subscription connection to Redis at {addr} closed")]
    Closed { addr: String },
    #[error(
        "Redis at {addr} sent no keyspace notification for the heartbeat key {key} within {HEARTBEAT:?}: \
         counts may be frozen; reconnecting (notify-keyspace-events must include {NEEDED_FLAGS})"
    )]
    NotificationsLost { addr: String, key: String },
    #[error("Redis at {addr} did not answer the {what} in time: paused or overloaded; the counts are stale until it does")]
    Unanswered { addr: String, what: String },
}

/// Parses a count's raw bytes; anything but a non-negative integer is kept as text (unknown,
/// never 0), at most 64 characters of it. Bytes that are not UTF-8 are garbage of that one
/// key, never an error of the whole read.
pub fn read_count(raw: &[u8]) -> Reading {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err(format!("{} bytes that are not UTF-8", raw.len()));
    };
    text.trim()
        .parse::<u64>()
        .map_err(|_| text.chars().take(64).collect())
}

/// The flags to set so that `current` covers [`NEEDED_FLAGS`], or `None` if it already does.
pub fn flags_to_set(current: &str) -> Option<String> {
    // 'A' stands for every event class, but not for 'K' (which channel they go to).
    let covered = |c: char| current.contains(c) || (c != 'K' && current.contains('A'));
    let missing: String = NEEDED_FLAGS.chars().filter(|c| !covered(*c)).collect();
    (!missing.is_empty()).then(|| format!("{current}{missing}"))
}

/// Keys changed since the last read, filled by the drain task.
#[derive(Debug, Default)]
struct Dirty {
    keys: HashSet<String>,
    /// More than [`MAX_DIRTY`] distinct keys: read everything instead.
    overflow: bool,
    /// The heartbeat's notification came back.
    heartbeat: bool,
    notifications: u64,
    /// When the first notification since the last read arrived.
    since: Option<Instant>,
    /// The subscription ended.
    closed: bool,
}

#[derive(Debug, Default)]
struct Inbox {
    dirty: Mutex<Dirty>,
    ready: Notify,
    /// Messages drained since the connection was made.
    drained: std::sync::atomic::AtomicU64,
}

impl Inbox {
    fn take(&self) -> Dirty {
        std::mem::take(&mut *self.dirty.lock().expect("not poisoned"))
    }

    /// Whether the heartbeat came back since the last look (and forgets it).
    fn take_heartbeat(&self) -> bool {
        std::mem::take(&mut self.dirty.lock().expect("not poisoned").heartbeat)
    }
}

/// The drain task; stopped (and the subscription dropped) with the connection.
struct Drain(tokio::task::JoinHandle<()>);

impl Drop for Drain {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Drains `messages` into `inbox` as fast as they come, until the subscription ends.
fn drain(
    mut messages: Pin<Box<dyn Stream<Item = redis::Msg> + Send>>,
    inbox: Arc<Inbox>,
    channel_prefix: String,
    prefix: String,
    heartbeat_key: String,
) -> Drain {
    Drain(tokio::spawn(async move {
        while let Some(first) = messages.next().await {
            let mut d = inbox.dirty.lock().expect("not poisoned");
            d.since.get_or_insert_with(Instant::now);
            let mut next = Some(first);
            // Everything already delivered, under one lock.
            while let Some(m) = next {
                if let Some(k) = m.get_channel_name().strip_prefix(&channel_prefix) {
                    if k.starts_with(&prefix) {
                        d.notifications += 1;
                        if d.keys.len() < MAX_DIRTY {
                            d.keys.insert(k.to_string());
                        } else if !d.keys.contains(k) {
                            d.overflow = true;
                        }
                    } else if k == heartbeat_key {
                        d.heartbeat = true;
                    }
                }
                next = messages.next().now_or_never().flatten();
            }
            drop(d);
            inbox
                .drained
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            inbox.ready.notify_one();
        }
        inbox.dirty.lock().expect("not poisoned").closed = true;
        inbox.ready.notify_one();
    }))
}

struct Live {
    conn: MultiplexedConnection,
    inbox: Arc<Inbox>,
    _drain: Drain,
    reconcile: tokio::time::Interval,
    heartbeat: tokio::time::Interval,
    /// The heartbeat written and not yet heard back: by when it must be.
    awaiting: Option<tokio::time::Instant>,
    /// Drained batches when the heartbeat was written.
    drained_at_beat: u64,
}

enum State {
    Connecting,
    Live(Box<Live>),
}

struct Ctx {
    client: Client,
    addr: String,
    prefix: String,
    channel_prefix: String,
    reconcile: Duration,
    /// This source's own heartbeat key, outside the counts' prefix.
    heartbeat_key: String,
}

impl Ctx {
    /// Redis did not answer `what` in time.
    fn unanswered(&self, what: &str) -> RedisSourceError {
        RedisSourceError::Unanswered {
            addr: self.addr.clone(),
            what: what.to_string(),
        }
    }
}

/// Streams session-count updates for `service` from the Redis of `client`.
pub fn stream(
    client: Client,
    service: &str,
    reconcile: Duration,
) -> impl Stream<Item = Result<SessionsUpdate, RedisSourceError>> {
    let info = client.get_connection_info();
    let addr = info.addr().to_string();
    let db = info.redis_settings().db();
    let prefix = sessions_key_prefix(service);
    let heartbeat_key = format!(
        "rebalancer:{service}:heartbeat:{}",
        uuid::Uuid::new_v4().simple()
    );
    let ctx = Ctx {
        channel_prefix: format!("__keyspace@{db}__:"),
        client,
        addr,
        prefix,
        reconcile,
        heartbeat_key,
    };
    futures::stream::unfold((State::Connecting, ctx), |(state, ctx)| async move {
        let (item, next) = step(state, &ctx).await;
        Some((item, (next, ctx)))
    })
}

async fn step(state: State, ctx: &Ctx) -> (Result<SessionsUpdate, RedisSourceError>, State) {
    match state {
        State::Connecting => match connect(ctx).await {
            Ok((live, counts)) => (
                Ok(SessionsUpdate::Resync(counts)),
                State::Live(Box::new(live)),
            ),
            Err(e) => (Err(e), State::Connecting),
        },
        State::Live(mut live) => {
            let dirty = loop {
                let overdue = live.awaiting;
                tokio::select! {
                    () = live.inbox.ready.notified() => {}
                    _ = live.reconcile.tick() => {
                        return match resync(ctx, &mut live.conn).await {
                            Ok(c) => (Ok(SessionsUpdate::Resync(c)), State::Live(live)),
                            Err(e) => (Err(e), State::Connecting),
                        };
                    }
                    _ = live.heartbeat.tick(), if overdue.is_none() => {
                        // A Redis that does not answer (paused, stuck) is as bad as one whose
                        // notifications stopped: noticed within a heartbeat, not a timeout.
                        let wrote = tokio::time::timeout(HEARTBEAT, beat(ctx, &mut live.conn)).await;
                        if let Err(e) = wrote.unwrap_or_else(|_| Err(ctx.unanswered("SET of the heartbeat key"))) {
                            return (Err(e), State::Connecting);
                        }
                        live.awaiting = Some(Instant::now() + HEARTBEAT);
                        live.drained_at_beat = live.inbox.drained.load(std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    () = sleep_until_some(overdue) => {
                        if live.inbox.take_heartbeat() {
                            // It came back; this reader was only late to look (a busy fold).
                            live.awaiting = None;
                            continue;
                        }
                        let drained = live.inbox.drained.load(std::sync::atomic::Ordering::Relaxed);
                        if drained != live.drained_at_beat {
                            // Notifications flow: the heartbeat's waits behind a storm of them.
                            live.drained_at_beat = drained;
                            live.awaiting = Some(Instant::now() + HEARTBEAT);
                            continue;
                        }
                        // Turn them back on if we may; the reconnect resyncs what was missed.
                        let _ = enable_notifications(ctx, &mut live.conn).await;
                        return (
                            Err(RedisSourceError::NotificationsLost {
                                addr: ctx.addr.clone(),
                                key: ctx.heartbeat_key.clone(),
                            }),
                            State::Connecting,
                        );
                    }
                }
                let dirty = live.inbox.take();
                if dirty.closed {
                    return (
                        Err(RedisSourceError::Closed {
                            addr: ctx.addr.clone(),
                        }),
                        State::Connecting,
                    );
                }
                if dirty.heartbeat {
                    live.awaiting = None; // notifications work
                }
                if dirty.overflow {
                    return match resync(ctx, &mut live.conn).await {
                        Ok(c) => (Ok(SessionsUpdate::Resync(c)), State::Live(live)),
                        Err(e) => (Err(e), State::Connecting),
                    };
                }
                if !dirty.keys.is_empty() {
                    break dirty;
                }
                // Only our heartbeat: nothing to read, nothing to say; wait on.
            };
            let mut keys: Vec<String> = dirty.keys.into_iter().collect();
            keys.sort_unstable();
            let read = tokio::time::timeout(HEARTBEAT * 2, mget(ctx, &mut live.conn, &keys)).await;
            match read.unwrap_or_else(|_| Err(ctx.unanswered("MGET of the changed counts"))) {
                Ok(values) => {
                    let changes = keys
                        .iter()
                        .zip(values)
                        .map(|(k, v)| (id_of(ctx, k), v.as_deref().map(read_count)))
                        .collect();
                    let update = SessionsUpdate::Patch {
                        changes,
                        noticed_at: dirty.since.unwrap_or_else(Instant::now),
                        notifications: dirty.notifications,
                    };
                    (Ok(update), State::Live(live))
                }
                Err(e) => (Err(e), State::Connecting),
            }
        }
    }
}

/// Writes the heartbeat key; its notification must come back.
async fn beat(ctx: &Ctx, conn: &mut MultiplexedConnection) -> Result<(), RedisSourceError> {
    redis::cmd("SET")
        .arg(&ctx.heartbeat_key)
        .arg(crate::contract::protocol::unix_ms(
            std::time::SystemTime::now(),
        ))
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(conn)
        .await
        .map_err(|source| RedisSourceError::Read {
            addr: ctx.addr.clone(),
            source,
        })
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn id_of(ctx: &Ctx, key: &str) -> ServerId {
    key.strip_prefix(&ctx.prefix).unwrap_or(key).into()
}

async fn connect(ctx: &Ctx) -> Result<(Live, Vec<(ServerId, Reading)>), RedisSourceError> {
    let addr = ctx.addr.clone();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = ctx
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|source| RedisSourceError::Connect {
            addr: addr.clone(),
            source,
        })?;

    enable_notifications(ctx, &mut conn).await?;

    let pattern = format!("{}{}*", ctx.channel_prefix, ctx.prefix);
    let heartbeat = format!("{}{}", ctx.channel_prefix, ctx.heartbeat_key);
    let subscribe = async {
        let mut pubsub = ctx.client.get_async_pubsub().await?;
        pubsub.psubscribe(&pattern).await?;
        pubsub.subscribe(&heartbeat).await?;
        Ok::<_, RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(TIMEOUT, subscribe)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })
        .map_err(|source| RedisSourceError::Subscribe {
            addr: addr.clone(),
            pattern: pattern.clone(),
            source,
        })?;
    let counts = resync(ctx, &mut conn).await?;
    let mut reconcile = tokio::time::interval(ctx.reconcile);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile.reset();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let inbox = Arc::new(Inbox::default());
    let drain = drain(
        Box::pin(pubsub.into_on_message()),
        inbox.clone(),
        ctx.channel_prefix.clone(),
        ctx.prefix.clone(),
        ctx.heartbeat_key.clone(),
    );
    Ok((
        Live {
            conn,
            inbox,
            _drain: drain,
            reconcile,
            heartbeat,
            awaiting: None,
            drained_at_beat: 0,
        },
        counts,
    ))
}

/// Makes sure `notify-keyspace-events` covers what the source needs; where `CONFIG SET` is
/// refused (managed Redis), the error names the setting to make.
async fn enable_notifications(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
) -> Result<(), RedisSourceError> {
    // CONFIG GET may be renamed away on managed Redis; then CONFIG SET below says so.
    let current: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await
        .unwrap_or_default();
    let current = current.get(1).cloned().unwrap_or_default();
    if let Some(flags) = flags_to_set(&current) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(&flags)
            .query_async::<()>(conn)
            .await
            .map_err(|source| RedisSourceError::Notifications {
                addr: ctx.addr.clone(),
                current: current.clone(),
                source,
            })?;
        tracing::info!(redis = %ctx.addr, from = %current, to = %flags, "enabled keyspace notifications");
    }
    Ok(())
}

async fn resync(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
) -> Result<Vec<(ServerId, Reading)>, RedisSourceError> {
    let read_err = |source| RedisSourceError::Read {
        addr: ctx.addr.clone(),
        source,
    };
    let keys: Vec<String> = {
        let mut scan = conn.clone();
        let mut iter = scan
            .scan_options::<String>(
                redis::ScanOptions::default()
                    .with_pattern(format!("{}*", ctx.prefix))
                    .with_count(BATCH),
            )
            .await
            .map_err(read_err)?;
        let mut keys = Vec::new();
        while let Some(k) = iter.next().await {
            keys.push(k.map_err(read_err)?);
        }
        keys
    };
    let values = mget(ctx, conn, &keys).await?;
    Ok(keys
        .iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (id_of(ctx, k), read_count(&v))))
        .collect())
}

async fn mget(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    keys: &[String],
) -> Result<Vec<Option<Vec<u8>>>, RedisSourceError> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(BATCH) {
        // Bytes, not strings: one value that is not UTF-8 must not fail the whole batch.
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(chunk)
            .query_async(conn)
            .await
            .map_err(|source| RedisSourceError::Read {
                addr: ctx.addr.clone(),
                source,
            })?;
        out.extend(values);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_that_are_not_non_negative_integers_are_kept_as_text() {
        assert_eq!(read_count(b"42"), Ok(42));
        assert_eq!(read_count(b" 7\n"), Ok(7));
        assert_eq!(read_count(b"-3"), Err("-3".into()));
        assert_eq!(read_count(b"lots"), Err("lots".into()));
        assert_eq!(read_count(b""), Err(String::new()));
        assert_eq!(read_count(b"1.5"), Err("1.5".into()));
        assert_eq!(
            read_count(b"\xff\xfe12"),
            Err("4 bytes that are not UTF-8".into())
        );
    }

    #[test]
    fn notification_flags_are_extended_not_replaced() {
        assert_eq!(flags_to_set(""), Some("K$gxe".into()));
        assert_eq!(flags_to_set("Ex"), Some("ExK$ge".into()));
        assert_eq!(flags_to_set("KA"), None);
        assert_eq!(flags_to_set("AE"), Some("AEK".into()));
        assert_eq!(flags_to_set("gxK$e"), None);
    }
}
