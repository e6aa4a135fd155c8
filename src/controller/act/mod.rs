//! Actuators: the only code that writes to the outside world. Shed and drain commands go out
//! over Redis pub/sub, cordon and reactivate are Consul KV writes, start and reap go to a
//! [`Scaler`]. Behind one small trait so a recording actuator can stand in for tests.

pub mod docker;
pub mod execute;
pub mod scaler;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

pub use scaler::{ScaleError, Scaler};

use crate::contract::consul::{Consul, ConsulError};
use crate::contract::protocol::{
    commands_channel, state_key, unix_ms, AdminState, Command, CommandKind, StateRecord,
    BY_CONTROLLER, PROTOCOL_VERSION,
};
use crate::contract::signing::CommandKeys;
use crate::controller::decide::{Action, ActionKind, Capabilities};

/// What an action is done under: the leader's epoch and the snapshot that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActContext {
    pub epoch: u64,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("cannot connect to Redis to publish commands: {0}")]
    RedisConnect(#[source] redis::RedisError),
    #[error("cannot publish a {kind} command for {server} on {channel}: {source}")]
    Publish {
        kind: &'static str,
        server: String,
        channel: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("cannot write the state of {server} to Consul KV: {source}")]
    WriteState {
        server: String,
        #[source]
        source: ConsulError,
    },
    #[error("will not write the state of {server}: {why}")]
    StateFenced { server: String, why: String },
    #[error("the state record of {server} changed while it was being written (check-and-set failed); not overwritten")]
    StateConflict { server: String },
    #[error("no scaler is configured to {0}")]
    NoScaler(&'static str),
    #[error(transparent)]
    Scale(#[from] ScaleError),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("no server listens on {channel}: the {kind} command for {server} reached nobody")]
    NoReceivers {
        kind: &'static str,
        server: String,
        channel: String,
    },
}

impl ActError {
    /// Worth another attempt: not a refusal that the same attempt would meet again.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            ActError::NoScaler(_) | ActError::StateFenced { .. } | ActError::StateConflict { .. }
        )
    }

    /// The state record stopped the action: a newer leader's, an operator's, or changed.
    pub fn fenced(&self) -> bool {
        matches!(
            self,
            ActError::StateFenced { .. } | ActError::StateConflict { .. }
        )
    }
}

pub trait Actuator: Send + Sync {
    /// Carries out `action`; a shed or drain answers with the command it published, whose
    /// ack the pipeline then awaits.
    fn execute<'a>(
        &'a self,
        action: &'a Action,
        ctx: ActContext,
    ) -> BoxFuture<'a, Result<Option<Command>, ActError>>;

    /// What it can do besides commands and state writes (a scaler for `Start` and `Reap`).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// Builds the contract's command for a shed or drain.
pub fn command_for(
    action: &Action,
    ctx: ActContext,
    now: SystemTime,
    ttl: Duration,
) -> Option<Command> {
    let (kind, server, count) = match &action.kind {
        ActionKind::Shed { server, count } => (CommandKind::Shed, server, *count),
        ActionKind::Drain { server, count } => (CommandKind::Drain, server, *count),
        _ => return None,
    };
    let issued = unix_ms(now);
    Some(Command {
        v: PROTOCOL_VERSION,
        id: uuid::Uuid::new_v4().simple().to_string(),
        kind,
        server: server.to_string(),
        count,
        epoch: ctx.epoch,
        issued_at_ms: issued,
        expires_at_ms: issued + ttl.as_millis() as u64,
        kid: None,
        sig: None,
    })
}

/// The real actuator of one pipeline.
pub struct LiveActuator {
    service: String,
    command_ttl: Duration,
    redis: redis::Client,
    conn: OnceCell<ConnectionManager>,
    consul: Consul,
    scaler: Option<Arc<dyn Scaler>>,
    /// Signs every command when set.
    keys: Option<CommandKeys>,
}

const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

impl LiveActuator {
    pub fn new(
        service: &str,
        command_ttl: Duration,
        redis: redis::Client,
        consul: Consul,
        scaler: Option<Arc<dyn Scaler>>,
        keys: Option<CommandKeys>,
    ) -> LiveActuator {
        LiveActuator {
            keys,
            service: service.to_string(),
            command_ttl,
            redis,
            conn: OnceCell::new(),
            consul,
            scaler,
        }
    }

    async fn redis(&self) -> Result<ConnectionManager, ActError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(ATTEMPT_TIMEOUT))
            .set_response_timeout(Some(ATTEMPT_TIMEOUT));
        self.conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.redis.clone(), config))
            .await
            .cloned()
            .map_err(ActError::RedisConnect)
    }

    /// Publishes `cmd`; the same command (the same id) on every retry, so a server that got
    /// the first copy ignores the next.
    async fn publish(&self, cmd: &Command) -> Result<(), ActError> {
        let channel = commands_channel(&self.service);
        let payload = serde_json::to_string(cmd).expect("commands serialize");
        let mut conn = self.redis().await?;
        let receivers = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|source| ActError::Publish {
                kind: cmd.kind.as_str(),
                server: cmd.server.clone(),
                channel: channel.clone(),
                source,
            })?;
        if receivers == 0 {
            return Err(ActError::NoReceivers {
                kind: cmd.kind.as_str(),
                server: cmd.server.clone(),
                channel,
            });
        }
        Ok(())
    }

    /// How long one attempt at `action` may take: a stop waits out the container's grace.
    fn attempt_timeout(&self, action: &Action) -> Duration {
        match (&action.kind, &self.scaler) {
            (ActionKind::Reap { .. } | ActionKind::Discard { .. }, Some(s)) => {
                s.stop_grace() + ATTEMPT_TIMEOUT
            }
            _ => ATTEMPT_TIMEOUT,
        }
    }

    /// Reads `server`'s state record for a check-and-set: its index (0: none), or why it
    /// must not be touched under `epoch` (an operator's cordon, a newer leader's record, a
    /// record that cannot be read).
    async fn fenced_index(&self, server: &str, epoch: u64) -> Result<u64, ActError> {
        let key = state_key(&self.service, server);
        let current = self
            .consul
            .kv_get(&key)
            .await
            .map_err(|source| ActError::WriteState {
                server: server.to_string(),
                source,
            })?;
        let Some(kv) = current else { return Ok(0) };
        let fenced = |why: String| ActError::StateFenced {
            server: server.to_string(),
            why,
        };
        let rec: StateRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| fenced(format!("its record cannot be read ({e})")))?;
        if rec.state == AdminState::Cordoned && rec.by_operator() {
            return Err(fenced("an operator cordoned it".into()));
        }
        if let Some(theirs) = rec.epoch.filter(|e| *e > epoch) {
            return Err(fenced(format!(
                "its record was written by a newer leader (epoch {theirs} > {epoch})"
            )));
        }
        Ok(kv.modify_index)
    }

    /// Writes `server`'s state with a check-and-set on the record read just before, so a
    /// deposed leader never overwrites a newer one's write, nor anyone's concurrent write.
    async fn write_state(
        &self,
        server: &str,
        state: AdminState,
        reason: &str,
        epoch: u64,
    ) -> Result<(), ActError> {
        let index = self.fenced_index(server, epoch).await?;
        let record = StateRecord {
            state,
            since_ms: unix_ms(SystemTime::now()),
            reason: reason.to_string(),
            by: Some(BY_CONTROLLER.to_string()),
            epoch: Some(epoch),
        };
        let body = serde_json::to_vec(&record).expect("state records serialize");
        let written = self
            .consul
            .kv_cas(&state_key(&self.service, server), body, index)
            .await
            .map_err(|source| ActError::WriteState {
                server: server.to_string(),
                source,
            })?;
        if written {
            Ok(())
        } else {
            Err(ActError::StateConflict {
                server: server.to_string(),
            })
        }
    }

    async fn once(
        &self,
        action: &Action,
        ctx: ActContext,
        command: Option<&Command>,
        new_ids: &[String],
    ) -> Result<(), ActError> {
        match &action.kind {
            ActionKind::Shed { .. } | ActionKind::Drain { .. } => {
                self.publish(command.expect("a command for every shed and drain"))
                    .await
            }
            ActionKind::Cordon { server } => {
                let reason = action.reason.to_string();
                self.write_state(server, AdminState::Cordoned, &reason, ctx.epoch)
                    .await
            }
            ActionKind::Reactivate { server } => {
                let reason = action.reason.to_string();
                self.write_state(server, AdminState::Active, &reason, ctx.epoch)
                    .await
            }
            ActionKind::Start { .. } => match &self.scaler {
                Some(s) => Ok(s.start(new_ids).await?),
                None => Err(ActError::NoScaler("start servers")),
            },
            ActionKind::Reap { server } | ActionKind::Discard { server } => match &self.scaler {
                Some(s) => {
                    // Fenced before anything is stopped; the record goes only if unchanged.
                    let index = self.fenced_index(server, ctx.epoch).await?;
                    if matches!(action.kind, ActionKind::Reap { .. }) {
                        s.reap(server).await?;
                    } else {
                        s.discard(server).await?;
                    }
                    if index == 0 {
                        return Ok(());
                    }
                    let key = state_key(&self.service, server);
                    let deleted =
                        self.consul
                            .kv_delete_cas(&key, index)
                            .await
                            .map_err(|source| ActError::WriteState {
                                server: server.to_string(),
                                source,
                            })?;
                    if deleted {
                        Ok(())
                    } else {
                        Err(ActError::StateConflict {
                            server: server.to_string(),
                        })
                    }
                }
                None => Err(ActError::NoScaler("reap servers")),
            },
        }
    }
}

impl Actuator for LiveActuator {
    fn execute<'a>(
        &'a self,
        action: &'a Action,
        ctx: ActContext,
    ) -> BoxFuture<'a, Result<Option<Command>, ActError>> {
        Box::pin(async move {
            // One command, one id, for every attempt; one set of new servers likewise.
            let mut command = command_for(action, ctx, SystemTime::now(), self.command_ttl);
            if let (Some(c), Some(keys)) = (command.as_mut(), &self.keys) {
                keys.sign(c);
            }
            let new_ids = match (&action.kind, &self.scaler) {
                (ActionKind::Start { count }, Some(s)) => s.new_ids(*count),
                _ => Vec::new(),
            };
            let limit = self.attempt_timeout(action);
            let attempt = || async {
                tokio::time::timeout(limit, self.once(action, ctx, command.as_ref(), &new_ids))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ActError::Timeout {
                            what: action.kind.label().to_string(),
                            after: limit,
                        })
                    })
            };
            attempt
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(1))
                        .with_max_times(2)
                        .with_jitter(),
                )
                .sleep(tokio::time::sleep)
                .when(ActError::retryable)
                .await?;
            Ok(command)
        })
    }

    fn capabilities(&self) -> Capabilities {
        if self.scaler.is_some() {
            Capabilities::SCALER
        } else {
            Capabilities::default()
        }
    }
}

/// Records what it is asked to do, for tests that want to see the plan acted on. Each
/// action takes `delay` (on the tokio clock, so paused time measures it exactly).
#[derive(Default)]
pub struct Recording {
    pub done: Mutex<Vec<(Action, ActContext)>>,
    pub published: Mutex<Vec<Command>>,
    pub delay: Duration,
}

impl Recording {
    /// What was done so far.
    pub fn actions(&self) -> Vec<(Action, ActContext)> {
        self.done.lock().expect("not poisoned").clone()
    }

    /// The commands the sheds and drains so far would have published.
    pub fn commands(&self) -> Vec<Command> {
        self.published.lock().expect("not poisoned").clone()
    }
}

impl Actuator for Recording {
    fn execute<'a>(
        &'a self,
        action: &'a Action,
        ctx: ActContext,
    ) -> BoxFuture<'a, Result<Option<Command>, ActError>> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.done
                .lock()
                .expect("not poisoned")
                .push((action.clone(), ctx));
            let command = command_for(action, ctx, SystemTime::now(), Duration::from_secs(10));
            if let Some(c) = &command {
                self.published.lock().expect("not poisoned").push(c.clone());
            }
            Ok(command)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shed_becomes_a_command_that_expires_after_the_ttl() {
        let a = Action {
            kind: ActionKind::Shed {
                server: "s1".into(),
                count: 40,
            },
            reason: "r".into(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let c = command_for(
            &a,
            ActContext {
                epoch: 7,
                version: 3,
            },
            now,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            (c.kind, c.server.as_str(), c.count, c.epoch),
            (CommandKind::Shed, "s1", 40, 7)
        );
        assert_eq!((c.issued_at_ms, c.expires_at_ms), (1_000_000, 1_010_000));
        let c2 = command_for(
            &a,
            ActContext {
                epoch: 7,
                version: 3,
            },
            now,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_ne!(c.id, c2.id, "ids are unique");
        let cordon = Action {
            kind: ActionKind::Cordon {
                server: "s1".into(),
            },
            reason: "r".into(),
        };
        assert!(command_for(
            &cordon,
            ActContext {
                epoch: 1,
                version: 1
            },
            now,
            Duration::from_secs(1)
        )
        .is_none());
    }
}
