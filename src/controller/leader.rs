//! Leader election: one controller per pipeline acts, holding a Consul session lock on
//! `rebalancer/<pipeline>/leader`. Each acquisition gets an epoch that every command carries,
//! so servers can ignore a deposed leader: the wall-clock milliseconds of the acquisition
//! (and above any epoch this process held before), so epochs never go backwards, even when
//! Consul loses its state and hands the lock out again at `LockIndex` 1.
//!
//! What the election publishes is a [`Lease`]: the epoch and until when it may be acted on
//! (the last renewal plus the session TTL, less a margin). A leader that was paused past it
//! does not act on its cached epoch when it resumes; and right before a destructive batch
//! the pipeline asks Consul again, with a consistent read ([`LockCheck`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::time::Instant;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::contract::consul::{Consul, ConsulError};
use crate::contract::protocol::{leader_key, unix_ms};
use crate::fleet::events::Events;

/// Consul's lock delay on our sessions: after a session is invalidated (it expired), its
/// locks cannot be taken for this long. A release (a graceful stop) has none.
const LOCK_DELAY: Duration = Duration::from_secs(1);

/// A standby watching the lock never runs rounds closer together than this.
const MIN_STANDBY_GAP: Duration = Duration::from_millis(100);

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionCreated {
    #[serde(rename = "ID")]
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockEntry {
    lock_index: u64,
    #[serde(default)]
    session: Option<String>,
}

/// The leader lock as last renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Carried by every command issued under this lease.
    pub epoch: u64,
    /// Past this, the lease is not acted on until renewed.
    pub valid_until: Instant,
    /// The Consul session holding the lock.
    pub session: Arc<str>,
}

impl Lease {
    /// The epoch of `lease` if it may be acted on at `now`.
    pub fn epoch_at(lease: Option<&Lease>, now: Instant) -> Option<u64> {
        lease.filter(|l| now < l.valid_until).map(|l| l.epoch)
    }
}

/// Asks, right before a destructive batch, whether the lock is still held by `lease`.
pub trait LockCheck: Send + Sync {
    fn still_held<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, bool>;
}

/// The real check: a consistent read of the lock key.
pub struct ConsulLockCheck {
    pub consul: Consul,
    pub key: String,
}

impl LockCheck for ConsulLockCheck {
    fn still_held<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let path = format!("/v1/kv/{}?consistent", self.key);
            match self.consul.get(&path).await {
                Ok(Some(body)) => Consul::decode::<Vec<LockEntry>>(&path, &body)
                    .ok()
                    .and_then(|e| e.into_iter().next())
                    .is_some_and(|e| e.session.as_deref() == Some(&*lease.session)),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "cannot confirm the leader lock; not acting");
                    false
                }
            }
        })
    }
}

/// Every answer is yes: for tests and single-controller set-ups that need no lock.
pub struct AlwaysHeld;

impl LockCheck for AlwaysHeld {
    fn still_held<'a>(&'a self, _: &'a Lease) -> BoxFuture<'a, bool> {
        Box::pin(async { true })
    }
}

struct Election {
    consul: Consul,
    key: String,
    name: String,
    ttl: Duration,
    session: Option<String>,
    /// The session and `LockIndex` of the lock while held, and the epoch given to it.
    held: Option<(String, u64, u64)>,
    /// The highest epoch this process has held.
    last_epoch: u64,
    /// The standby found the lock free at its last wait (and then failed to take it).
    saw_free: bool,
}

impl Election {
    async fn create_session(&self) -> Result<String, ConsulError> {
        let body = json!({
            "Name": self.name,
            "TTL": format!("{}s", self.ttl.as_secs()),
            "Behavior": "release",
            "LockDelay": format!("{}ms", LOCK_DELAY.as_millis()),
        });
        let out = self
            .consul
            .put("/v1/session/create", body.to_string().into_bytes())
            .await?;
        Ok(Consul::decode::<SessionCreated>("/v1/session/create", &out)?.id)
    }

    /// One round: keep the session alive, try the lock, and say which lease is held.
    async fn round(&mut self) -> Result<Option<Lease>, ConsulError> {
        let started = Instant::now();
        // Any failure gives the lock up: the next hold is a new acquisition, with a new epoch
        // (a Consul that came back empty hands out the same LockIndex again).
        let held = self.try_lock().await.inspect_err(|_| self.held = None)?;
        let Some((sid, lock_index)) = held else {
            self.held = None;
            return Ok(None);
        };
        let epoch = match &self.held {
            Some((session, index, epoch)) if *session == sid && *index == lock_index => *epoch,
            _ => {
                // A new acquisition: a new epoch, above every one before it.
                let epoch = unix_ms(SystemTime::now()).max(self.last_epoch + 1);
                self.held = Some((sid.clone(), lock_index, epoch));
                self.last_epoch = epoch;
                epoch
            }
        };
        // Consul may keep a session up to twice its TTL, but ours is renewed every third of
        // it: past a TTL less a margin since the last renewal, something is wrong.
        let valid_until = started + self.ttl - self.ttl / 4;
        Ok(Some(Lease {
            epoch,
            valid_until,
            session: sid.into(),
        }))
    }

    /// Renews (or creates) the session and tries the lock: the session and the lock's
    /// `LockIndex` while held.
    async fn try_lock(&mut self) -> Result<Option<(String, u64)>, ConsulError> {
        let sid = if let Some(sid) = &self.session {
            let path = format!("/v1/session/renew/{sid}");
            match self.consul.put(&path, Vec::new()).await {
                Ok(_) => sid.clone(),
                Err(e) => {
                    if matches!(&e, ConsulError::Status { status, .. } if status.as_u16() == 404) {
                        self.session = None; // expired: make a new one next round
                    }
                    return Err(e);
                }
            }
        } else {
            let sid = self.create_session().await?;
            self.session = Some(sid.clone());
            sid
        };
        let holder = json!({ "pid": std::process::id() })
            .to_string()
            .into_bytes();
        let acquired = self
            .consul
            .put(&format!("/v1/kv/{}?acquire={sid}", self.key), holder)
            .await?;
        if acquired.as_ref().trim_ascii() != b"true" {
            return Ok(None);
        }
        let path = format!("/v1/kv/{}", self.key);
        let Some(body) = self.consul.get(&path).await? else {
            return Ok(None);
        };
        let entries: Vec<LockEntry> = Consul::decode(&path, &body)?;
        Ok(entries
            .first()
            .filter(|e| e.session.as_deref() == Some(sid.as_str()))
            .map(|e| (sid.clone(), e.lock_index)))
    }

    /// A standby's wait between rounds: a blocking read of the lock key, so a release wakes
    /// it at once (a graceful stop hands over in well under a second), and so does the
    /// release of a holder whose session expired (then the lock delay is waited out). At
    /// most `period`, so the session is renewed in time.
    async fn wait_as_standby(&mut self, period: Duration) {
        let started = Instant::now();
        let deadline = started + period;
        let path = format!("/v1/kv/{}", self.key);
        // Where the lock is now (the round just failed to take it).
        let (index, held) = match self.consul.blocking_get(&path, 0, period).await {
            Ok(f) => (f.index, lock_held(&path, &f)),
            Err(e) => {
                tracing::debug!(key = %self.key, error = %e, "cannot read the leader lock");
                tokio::time::sleep_until(deadline).await;
                return;
            }
        };
        if !held {
            // Free, yet not ours. Released just after our try (a graceful stop): try again at
            // once. Free at two tries in a row: within the lock delay of a session that
            // expired, so try once it has passed.
            let next = if self.saw_free {
                Instant::now() + LOCK_DELAY
            } else {
                started + MIN_STANDBY_GAP
            };
            self.saw_free = true;
            tokio::time::sleep_until(next.min(deadline)).await;
            return;
        }
        self.saw_free = false;
        let wait = deadline.saturating_duration_since(Instant::now());
        if let Ok(f) = self.consul.blocking_get(&path, index.max(1), wait).await {
            if f.index != index {
                // Released or taken over: a round at once, never a busy loop.
                tokio::time::sleep_until(started + MIN_STANDBY_GAP).await;
                return;
            }
        }
        tokio::time::sleep_until(deadline).await;
    }

    async fn resign(&mut self) {
        if let Some(sid) = self.session.take() {
            let _ = self
                .consul
                .put(&format!("/v1/kv/{}?release={sid}", self.key), Vec::new())
                .await;
            let _ = self
                .consul
                .put(&format!("/v1/session/destroy/{sid}"), Vec::new())
                .await;
        }
    }
}

/// Whether a read of the lock key shows a holder.
fn lock_held(path: &str, f: &crate::contract::consul::Fetched) -> bool {
    f.found
        && Consul::decode::<Vec<LockEntry>>(path, &f.body)
            .ok()
            .and_then(|e| e.into_iter().next())
            .is_some_and(|e| e.session.is_some())
}

/// Runs the election until `shutdown`, publishing the held lease (or `None`) on `tx`.
/// Leadership is given up on any error: acting needs a lock known to be held.
pub async fn run(
    consul: Consul,
    pipeline: String,
    ttl: Duration,
    events: Events,
    tx: watch::Sender<Option<Lease>>,
    shutdown: CancellationToken,
) {
    let mut e = Election {
        consul,
        key: leader_key(&pipeline),
        name: format!("rebalancer:{pipeline}"),
        ttl,
        session: None,
        held: None,
        last_epoch: 0,
        saw_free: false,
    };
    let period = ttl / 3;
    loop {
        let lease = match e.round().await {
            Ok(lease) => lease,
            Err(err) => {
                tracing::warn!(pipeline, error = %err, "leader election round failed");
                None
            }
        };
        let epoch = lease.as_ref().map(|l| l.epoch);
        if tx.borrow().as_ref().map(|l| l.epoch) != epoch {
            events.leadership(epoch);
        }
        let standby = lease.is_none();
        tx.send_replace(lease);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = async {
                if standby {
                    e.wait_as_standby(period).await;
                } else {
                    tokio::time::sleep(period).await;
                }
            } => {}
        }
    }
    tx.send_replace(None);
    e.resign().await;
}
