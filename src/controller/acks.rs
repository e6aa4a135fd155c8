//! The acks stream, read: what servers did with the commands addressed to them. Every
//! controller of a pipeline reads it, leader or not, so a standby's history knows what the
//! leader shed and a new leader (or a restarted one) does not shed the same excess twice.
//! It starts [`REPLAY`] back, then follows the stream with blocking reads, and after a
//! reconnect goes on from the last entry it read.

use std::time::{Duration, SystemTime};

use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::contract::protocol::{acks_stream, unix_ms, Ack};
use crate::stages::BackoffPolicy;

/// How far back the reader starts: the disruption budget's window, the oldest shed any
/// decision still weighs.
pub const REPLAY: Duration = crate::config::decide::BUDGET_WINDOW;

/// How long one blocking read waits for a new entry.
const BLOCK: Duration = Duration::from_secs(5);
/// Entries per read.
const BATCH: usize = 512;

/// Reads the acks of `service`'s servers until `stop`, handing each to the returned channel.
pub fn spawn(redis: redis::Client, service: &str, stop: CancellationToken) -> mpsc::Receiver<Ack> {
    let (tx, rx) = mpsc::channel(BATCH);
    let key = acks_stream(service);
    tokio::spawn(async move {
        let from = unix_ms(SystemTime::now()).saturating_sub(REPLAY.as_millis() as u64);
        let mut last = format!("{from}-0");
        let policy = BackoffPolicy::default();
        let mut delays = policy.delays();
        let mut invalid_logged = false;
        loop {
            let read = follow(&redis, &key, &mut last, &tx, &mut invalid_logged, &stop);
            match read.await {
                Ok(()) => return, // stopped, or nobody listens any more
                Err(e) => {
                    tracing::warn!(stream = %key, error = %e, "cannot read the acks stream; retrying");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delays.next().unwrap_or(policy.max)) => {}
            }
        }
    });
    rx
}

/// Follows `key` from after `last` on one connection until an error, `stop`, or the
/// receiver going away.
async fn follow(
    redis: &redis::Client,
    key: &str,
    last: &mut String,
    tx: &mpsc::Sender<Ack>,
    invalid_logged: &mut bool,
    stop: &CancellationToken,
) -> redis::RedisResult<()> {
    let timeout = BLOCK + Duration::from_secs(5);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = redis
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let opts = StreamReadOptions::default()
        .block(BLOCK.as_millis() as usize)
        .count(BATCH);
    loop {
        let (keys, ids) = ([key], [last.clone()]);
        let read = redis::AsyncCommands::xread_options(&mut conn, &keys, &ids, &opts);
        let reply: Option<StreamReadReply> = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = read => r?,
        };
        let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
        for entry in entries {
            last.clone_from(&entry.id);
            let field = |name: &str| entry.get::<String>(name);
            match Ack::from_fields(field) {
                Ok(ack) => {
                    if tx.send(ack).await.is_err() {
                        return Ok(());
                    }
                }
                Err(why) if !*invalid_logged => {
                    *invalid_logged = true;
                    tracing::warn!(stream = %key, entry = %entry.id, why, "ignoring an entry of the acks stream that is not an ack (logged once)");
                }
                Err(_) => {}
            }
        }
    }
}
