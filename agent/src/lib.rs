//! rebalancer's agent: what a connection server embeds to take part in protocol v1. It
//! registers the server in Consul with an HTTP health check, reports the session count to
//! Redis, watches its own cordon state, and obeys shed and drain commands, acking each on
//! the acks stream. Redis or Consul outages never crash the server or drop its sessions:
//! every loop retries with backoff and re-registers, re-reports and resubscribes.
//!
//! A crate of its own so that a server embedding it builds only what an agent needs:
//! tokio, redis, reqwest (rustls with `ring`), serde, tracing and the metrics facade. The
//! contract (protocol v1, signing, the Consul client, TLS and credentials) and the stream
//! stages live here too; the `rebalancer` crate re-exports them. `examples/minimal_server.rs`
//! is a whole server in one file.

pub mod commands;
pub mod contract;
pub mod report;
pub mod sessions;
pub mod shed;
pub mod stages;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use metrics::counter;
use redis::aio::ConnectionManager;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use commands::{CommandFilter, Here, RefusalLog, Verdict};
pub use sessions::{CloseReason, SessionGuard, SessionRegistry, Sessions, VictimPolicy};

use crate::contract::consul::Consul;
use crate::contract::consul_watch::{consul_fetch, watch, Restarts};
use crate::contract::protocol::{
    acks_stream, commands_channel, segment, sessions_key, state_key, unix_ms, Ack, Command,
    CommandKind, MAX_COMMAND_BYTES,
};
use crate::contract::signing::{CommandKeys, KEYS_ENV};
use crate::contract::states::Admin;
use crate::contract::tls::{ConsulEndpoint, RedisEndpoint, RedisOpenError, TlsError};
use crate::stages::{BackoffPolicy, StreamStages};

/// Commands refused by this server, by reason.
pub const AGENT_REFUSED: &str = "rebalancer_agent_commands_refused_total";

/// Each refusal reason is logged at most this often.
const REFUSAL_LOG_EVERY_MS: u64 = 60_000;

/// Entries kept in the acks stream (approximately: `XADD MAXLEN ~`).
pub const ACKS_MAXLEN: usize = 10_000;

#[derive(Clone)]
pub struct AgentConfig {
    pub service: String,
    /// Consul service ID; also the server's name in counts and commands.
    pub id: String,
    /// Address and port registered in Consul (where clients and health checks reach us).
    pub address: String,
    pub port: u16,
    pub max_sessions: u32,
    pub weight: Option<f32>,
    /// Consul: address (e.g. `http://127.0.0.1:8500`), ACL token (see `docs/security.md`
    /// for its policy) and TLS; [`ConsulEndpoint::from_env`] reads what the `consul` CLI does.
    pub consul: ConsulEndpoint,
    /// Redis: URL, ACL user and TLS; [`RedisEndpoint::from_env`] reads `REDIS_*`.
    pub redis: RedisEndpoint,
    /// Path of the HTTP health check Consul runs against the server.
    pub health_path: String,
    /// Heartbeat of the count report; the key's TTL is three of these.
    pub report_interval: Duration,
    /// At most one report per this window when the count changes.
    pub coalesce: Duration,
    /// Sheds and drains are spread over this window.
    pub shed_window: Duration,
    pub policy: VictimPolicy,
    /// On shutdown, sessions are closed over this window after deregistering.
    pub shutdown_drain: Duration,
    /// With keys, only commands signed by one of them are obeyed; without, unsigned ones
    /// are (said once at start). See [`CommandKeys::from_env`].
    pub keys: Option<CommandKeys>,
}

/// The Redis URL's password and the command keys never show.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("service", &self.service)
            .field("id", &self.id)
            .field("address", &self.address)
            .field("port", &self.port)
            .field("max_sessions", &self.max_sessions)
            .field("weight", &self.weight)
            .field("consul", &self.consul)
            .field("redis", &self.redis)
            .field("health_path", &self.health_path)
            .field("report_interval", &self.report_interval)
            .field("coalesce", &self.coalesce)
            .field("shed_window", &self.shed_window)
            .field("policy", &self.policy)
            .field("shutdown_drain", &self.shutdown_drain)
            .field("keys", &self.keys)
            .finish()
    }
}

impl AgentConfig {
    pub fn new(
        service: &str,
        id: &str,
        address: &str,
        port: u16,
        max_sessions: u32,
    ) -> AgentConfig {
        AgentConfig {
            service: service.into(),
            id: id.into(),
            address: address.into(),
            port,
            max_sessions,
            weight: None,
            consul: ConsulEndpoint {
                address: "http://127.0.0.1:8500".into(),
                ..ConsulEndpoint::default()
            },
            redis: RedisEndpoint {
                url: "redis://127.0.0.1:6379/0".into(),
                ..RedisEndpoint::default()
            },
            health_path: "/health".into(),
            report_interval: Duration::from_secs(1),
            coalesce: Duration::from_millis(100),
            shed_window: Duration::from_secs(2),
            policy: VictimPolicy::Random,
            shutdown_drain: Duration::from_secs(2),
            keys: None,
        }
    }

    /// The Consul registration of this server.
    pub fn registration(&self) -> serde_json::Value {
        let mut meta = json!({ "max_sessions": self.max_sessions.to_string() });
        if let Some(w) = self.weight {
            meta["weight"] = json!(w.to_string());
        }
        json!({
            "ID": self.id,
            "Name": self.service,
            "Address": self.address,
            "Port": self.port,
            "Meta": meta,
            "Check": {
                "CheckID": format!("service:{}", self.id),
                "HTTP": format!("http://{}:{}{}", self.address, self.port, self.health_path),
                "Interval": "1s",
                "Timeout": "1s",
                "DeregisterCriticalServiceAfter": "1m",
            }
        })
    }
}

/// Whether a new session may be opened now, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// At `max_sessions`.
    Full,
    /// Cordoned: no new sessions, existing ones stay until drained.
    Cordoned,
    /// Just told to shed: reconnecting clients must land elsewhere, not back here.
    Shedding,
    ShuttingDown,
}

impl Admission {
    pub fn reason(self) -> &'static str {
        match self {
            Admission::Accept => "accepted",
            Admission::Full => "server full",
            Admission::Cordoned => "server cordoned",
            Admission::Shedding => "server shedding",
            Admission::ShuttingDown => "server shutting down",
        }
    }
}

#[derive(Default)]
struct State {
    cordoned: AtomicBool,
    shutting_down: AtomicBool,
    /// Refuse new sessions until then (set while a shed is carried out).
    hold_until: Mutex<Option<Instant>>,
}

/// An agent for one server. Cheap to clone; every clone shares the state.
#[derive(Clone)]
pub struct Agent {
    cfg: Arc<AgentConfig>,
    sessions: Arc<dyn Sessions>,
    state: Arc<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Redis: {0}")]
    Redis(#[from] RedisOpenError),
    #[error("Redis {url:?}: {source}")]
    RedisSettings {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Consul: {0}")]
    Consul(#[from] TlsError),
}

impl Agent {
    pub fn new(cfg: AgentConfig, sessions: Arc<dyn Sessions>) -> Agent {
        Agent {
            cfg: Arc::new(cfg),
            sessions,
            state: Arc::default(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Whether to accept a new session now.
    pub fn admission(&self) -> Admission {
        if self.state.shutting_down.load(Ordering::Relaxed) {
            Admission::ShuttingDown
        } else if self.state.cordoned.load(Ordering::Relaxed) {
            Admission::Cordoned
        } else if self
            .state
            .hold_until
            .lock()
            .expect("not poisoned")
            .is_some_and(|t| Instant::now() < t)
        {
            Admission::Shedding
        } else if self.sessions.count() >= u64::from(self.cfg.max_sessions) {
            Admission::Full
        } else {
            Admission::Accept
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.state.shutting_down.load(Ordering::Relaxed)
    }

    /// Runs every loop until `shutdown`; then deregisters, closes the remaining sessions over
    /// `shutdown_drain`, and removes the count.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let redis = self.cfg.redis.client()?;
        let consul = Consul::connect(&self.cfg.consul)?;
        let conn = ConnectionManager::new_lazy_with_config(
            redis.clone(),
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                // Fail fast and let our own loops retry: the manager's default of six
                // retries with backoff kept a call, and so shutdown, waiting on a dead Redis.
                .set_number_of_retries(1),
        )
        .map_err(|source| AgentError::RedisSettings {
            url: self.cfg.redis.shown(),
            source,
        })?;
        let loops = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(self.clone().register_loop(consul.clone(), loops.clone())),
            tokio::spawn(self.clone().cordon_loop(consul.clone(), loops.clone())),
            tokio::spawn(self.clone().report_loop(conn.clone(), loops.clone())),
            tokio::spawn(
                self.clone()
                    .command_loop(redis, conn.clone(), loops.clone()),
            ),
        ];
        shutdown.cancelled().await;

        self.state.shutting_down.store(true, Ordering::Relaxed);
        tracing::info!(server = %self.cfg.id, "shutting down: deregistering, then draining");
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            consul.put(
                &format!("/v1/agent/service/deregister/{}", segment(&self.cfg.id)),
                Vec::new(),
            ),
        )
        .await;
        let n = self.sessions.count();
        self.close_spread(n, self.cfg.shutdown_drain, CloseReason::Drain)
            .await;
        loops.cancel();
        for t in tasks {
            let _ = t.await;
        }
        let mut c = conn;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("DEL")
                .arg(sessions_key(&self.cfg.service, &self.cfg.id))
                .query_async::<()>(&mut c),
        )
        .await;
        Ok(())
    }

    /// Registers, and registers again whenever Consul has forgotten us (an agent restart).
    async fn register_loop(self, consul: Consul, stop: CancellationToken) {
        let body = self.cfg.registration().to_string().into_bytes();
        let path = format!("/v1/agent/service/{}", segment(&self.cfg.id));
        let policy = BackoffPolicy::default();
        let mut delays = policy.delays();
        loop {
            let found = tokio::select! {
                () = stop.cancelled() => return,
                r = consul.get(&path) => r,
            };
            let wait = match found {
                Ok(Some(_)) => Duration::from_secs(5),
                Ok(None) => match consul.put("/v1/agent/service/register", body.clone()).await {
                    Ok(_) => {
                        tracing::info!(server = %self.cfg.id, service = %self.cfg.service, "registered in Consul");
                        delays = policy.delays();
                        Duration::from_secs(5)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register in Consul; retrying");
                        delays.next().unwrap_or(policy.max)
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach Consul; retrying");
                    delays.next().unwrap_or(policy.max)
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Follows this server's state record; keeps the last known state while Consul is away.
    async fn cordon_loop(self, consul: Consul, stop: CancellationToken) {
        let path = format!("/v1/kv/{}", state_key(&self.cfg.service, &self.cfg.id));
        let (svc, id, p2) = (self.cfg.service.clone(), self.cfg.id.clone(), path.clone());
        let states = watch(
            // A short wait bounds the hang a Consul restarted empty causes; a probe per
            // server would cost Consul more than it saves.
            consul_fetch(consul, path, Duration::from_secs(30), Restarts::none()),
            move |f| {
                let list = crate::contract::states::parse(&svc, &p2, f)?;
                Ok(list
                    .states
                    .into_iter()
                    .find(|(s, _)| **s == *id)
                    .map(|(_, a)| a))
            },
        );
        let states = states
            .backoff(BackoffPolicy::default())
            .take_until(stop.cancelled());
        let mut states = std::pin::pin!(states);
        while let Some(next) = states.next().await {
            match next {
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the cordon state; keeping the last one");
                }
                Ok(Some(Admin::Unknown)) => {
                    tracing::warn!(server = %self.cfg.id, "unreadable state record; keeping the last state");
                }
                Ok(state) => {
                    let cordoned = matches!(state, Some(Admin::Cordoned { .. }));
                    if self.state.cordoned.swap(cordoned, Ordering::Relaxed) != cordoned {
                        tracing::info!(server = %self.cfg.id, cordoned, "state changed");
                    }
                }
            }
        }
    }

    async fn report_loop(self, conn: ConnectionManager, stop: CancellationToken) {
        let key = sessions_key(&self.cfg.service, &self.cfg.id);
        let ttl_ms = (self.cfg.report_interval * 3).as_millis() as u64;
        let sink = move |count: u64| {
            let mut c = conn.clone();
            let key = key.clone();
            async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(count)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut c)
                    .await
            }
        };
        report::run(
            self.sessions.watch_count(),
            self.cfg.report_interval,
            self.cfg.coalesce,
            sink,
            stop,
        )
        .await;
    }

    async fn command_loop(
        self,
        redis: redis::Client,
        conn: ConnectionManager,
        stop: CancellationToken,
    ) {
        let channel = commands_channel(&self.cfg.service);
        let mut filter = CommandFilter::new(&self.cfg.id, 4096).with_keys(self.cfg.keys.clone());
        let mut refusals = RefusalLog::default();
        if let Some(k) = &self.cfg.keys {
            tracing::info!(server = %self.cfg.id, keys = ?k.ids(), "obeying only signed commands");
        } else {
            tracing::warn!(server = %self.cfg.id,
                "no command keys ({KEYS_ENV}): obeying unsigned commands, from anyone who can PUBLISH");
        }
        let policy = BackoffPolicy::default();
        let mut delays = policy.delays();
        loop {
            let subscribed = async {
                let mut ps = redis.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
                Ok(Ok(ps)) => {
                    tracing::info!(server = %self.cfg.id, %channel, "listening for commands");
                    delays = policy.delays();
                    let mut msgs = ps.into_on_message();
                    loop {
                        let m = tokio::select! {
                            () = stop.cancelled() => return,
                            m = msgs.next() => m,
                        };
                        let Some(m) = m else { break };
                        let Ok(payload) = m.get_payload::<String>() else {
                            continue;
                        };
                        self.on_command(&payload, &mut filter, &mut refusals, &conn);
                    }
                    tracing::warn!(server = %self.cfg.id, "command subscription lost; resubscribing");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot subscribe to commands; retrying"),
                Err(_) => tracing::warn!("subscribing to commands timed out; retrying"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delays.next().unwrap_or(policy.max)) => {}
            }
        }
    }

    fn on_command(
        &self,
        payload: &str,
        filter: &mut CommandFilter,
        refusals: &mut RefusalLog,
        conn: &ConnectionManager,
    ) {
        let now = unix_ms(SystemTime::now());
        let mut refuse = |reason: &'static str, epoch: u64| {
            counter!(AGENT_REFUSED, "reason" => reason).increment(1);
            if refusals.should_log(reason, now, REFUSAL_LOG_EVERY_MS) {
                let shown: String = payload.chars().take(200).collect();
                tracing::warn!(server = %self.cfg.id, reason, epoch, payload = %shown,
                    "refusing a command (logged once a minute per reason)");
            }
        };
        if payload.len() > MAX_COMMAND_BYTES {
            refuse("oversized", 0);
            return;
        }
        let Ok(cmd) = serde_json::from_str::<Command>(payload) else {
            refuse("not_json", 0);
            return;
        };
        let here = Here {
            sessions: self.sessions.count(),
            capacity: u64::from(self.cfg.max_sessions),
            cordoned: self.state.cordoned.load(Ordering::Relaxed),
        };
        let verdict = filter.check(&cmd, now, here);
        match verdict {
            Verdict::Accept => {}
            Verdict::OtherServer | Verdict::Duplicate => return,
            _ => {
                refuse(verdict.as_str(), cmd.epoch);
                if verdict.is_acked_refusal() && cmd.server == self.cfg.id {
                    // Said on the acks stream, so the controller counts it as refused and a
                    // deposed (or misconfigured) leader hears why.
                    let ack = Ack {
                        id: cmd.id.clone(),
                        server: self.cfg.id.clone(),
                        requested: cmd.count,
                        shed: 0,
                        at_ms: now,
                        epoch: cmd.epoch,
                        refused: Some(verdict.as_str().to_string()),
                    };
                    let (agent, conn) = (self.clone(), conn.clone());
                    tokio::spawn(async move { agent.ack(&ack, conn).await });
                }
                return;
            }
        }
        tracing::info!(id = %cmd.id, kind = cmd.kind.as_str(), count = cmd.count, epoch = cmd.epoch, "obeying command");
        let (agent, conn) = (self.clone(), conn.clone());
        tokio::spawn(async move {
            let reason = match cmd.kind {
                CommandKind::Shed => {
                    // Reconnecting clients must not land back here while we shed.
                    *agent.state.hold_until.lock().expect("not poisoned") =
                        Some(Instant::now() + agent.cfg.shed_window + Duration::from_secs(2));
                    CloseReason::Shed
                }
                CommandKind::Drain => CloseReason::Drain,
            };
            let shed = agent
                .close_spread(cmd.count, agent.cfg.shed_window, reason)
                .await;
            let ack = Ack {
                id: cmd.id.clone(),
                server: agent.cfg.id.clone(),
                requested: cmd.count,
                shed,
                at_ms: unix_ms(SystemTime::now()),
                epoch: cmd.epoch,
                refused: None,
            };
            agent.ack(&ack, conn).await;
        });
    }

    /// Appends `ack` to the acks stream (capped).
    async fn ack(&self, ack: &Ack, mut conn: ConnectionManager) {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(acks_stream(&self.cfg.service))
            .arg("MAXLEN")
            .arg("~")
            .arg(ACKS_MAXLEN)
            .arg("*");
        for (name, value) in ack.fields() {
            xadd.arg(name).arg(value);
        }
        if let Err(e) = xadd.query_async::<String>(&mut conn).await {
            tracing::warn!(id = %ack.id, error = %e, "cannot ack command");
        }
    }

    /// Closes `n` sessions at random offsets within `window`; returns how many were closed.
    async fn close_spread(&self, n: u64, window: Duration, reason: CloseReason) -> u64 {
        let start = Instant::now();
        let offsets = shed::spread(n.min(self.sessions.count()), window, &mut rand::rng());
        let mut closed = 0;
        for (at, k) in shed::batches(&offsets) {
            tokio::time::sleep_until(start + at).await;
            closed += self.sessions.close(k, self.cfg.policy, reason);
        }
        closed
    }
}
