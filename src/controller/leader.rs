//! Leader election: one controller per pipeline acts, holding a Consul session lock on
//! `rebalancer/<pipeline>/leader`. The lock's `LockIndex` is the epoch every command carries,
//! so servers can ignore a deposed leader.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::contract::consul::{Consul, ConsulError};
use crate::contract::protocol::leader_key;
use crate::fleet::events::Events;

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

struct Election {
    consul: Consul,
    key: String,
    name: String,
    ttl: Duration,
    session: Option<String>,
}

impl Election {
    async fn create_session(&self) -> Result<String, ConsulError> {
        let body = json!({
            "Name": self.name,
            "TTL": format!("{}s", self.ttl.as_secs()),
            "Behavior": "release",
            "LockDelay": "1s",
        });
        let out = self
            .consul
            .put("/v1/session/create", body.to_string().into_bytes())
            .await?;
        Ok(Consul::decode::<SessionCreated>("/v1/session/create", &out)?.id)
    }

    /// One round: keep the session alive, try the lock, and say which epoch is held.
    async fn round(&mut self) -> Result<Option<u64>, ConsulError> {
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
            .map(|e| e.lock_index))
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

/// Runs the election until `shutdown`, publishing the held epoch (or `None`) on `tx`.
/// Leadership is given up on any error: acting needs a lock known to be held.
pub async fn run(
    consul: Consul,
    pipeline: String,
    ttl: Duration,
    events: Events,
    tx: watch::Sender<Option<u64>>,
    shutdown: CancellationToken,
) {
    let mut e = Election {
        consul,
        key: leader_key(&pipeline),
        name: format!("rebalancer:{pipeline}"),
        ttl,
        session: None,
    };
    let period = ttl / 3;
    loop {
        let epoch = match e.round().await {
            Ok(epoch) => epoch,
            Err(err) => {
                tracing::warn!(pipeline, error = %err, "leader election round failed");
                None
            }
        };
        if *tx.borrow() != epoch {
            events.leadership(epoch);
            tx.send_replace(epoch);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
    }
    tx.send_replace(None);
    e.resign().await;
}
