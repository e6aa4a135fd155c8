//! `rebalancer loadgen`: opens and holds N WebSocket clients, reconnecting after every close
//! with exponential backoff and full jitter, to given URLs or to servers discovered in Consul.
//! Live progress on stderr; one JSON summary object as the last line of stdout. Bounded in
//! count (`--connections` ≤ 100,000) and time (`--duration` ≤ 24 h); Ctrl-C ends it early
//! with the summary.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::contract::consul::Consul;
use crate::contract::protocol::state_prefix;
use crate::contract::states;
use crate::contract::states::Admin;
use crate::contract::tls::ConsulEndpoint;
use crate::fleet::source::consul_health;

pub const MAX_CONNECTIONS: u32 = 100_000;
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Clients to open and hold.
    #[arg(long, default_value_t = 100)]
    pub connections: u32,
    /// How long to run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Server or gateway URL to connect to (repeatable; one is picked at random each time).
    #[arg(long = "url")]
    pub urls: Vec<String>,
    /// Discover servers in this Consul (with --service): random among passing, non-cordoned.
    /// `https://` with `CONSUL_CACERT` (and `CONSUL_CLIENT_CERT`/`_KEY`).
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    pub consul: Option<String>,
    /// Consul ACL token (see docs/security.md for the load generator's policy).
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,
    #[arg(long, default_value = "ws")]
    pub service: String,
    /// Every client's first connection goes here (to pile a fleet up on one server).
    #[arg(long)]
    pub pile_on: Option<String>,
    /// New connections opened per second at most.
    #[arg(long, default_value_t = 500)]
    pub ramp: u32,
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub backoff_min: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("{0}")]
    Args(String),
    #[error("Consul: {0}")]
    Consul(#[from] crate::contract::tls::TlsError),
}

impl LoadgenArgs {
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |m: &str| Err(LoadgenError::Args(m.to_string()));
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return bad("--connections must be between 1 and 100000");
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return bad("--duration must be between 1ms and 24h");
        }
        if self.urls.is_empty() && self.consul.is_none() {
            return bad("give --url (repeatable) or --consul with --service");
        }
        if self.ramp == 0 {
            return bad("--ramp must be at least 1");
        }
        for u in self.urls.iter().chain(&self.pile_on) {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                return Err(LoadgenError::Args(format!("{u:?} is not a ws:// URL")));
            }
        }
        Ok(())
    }
}

/// Full jitter: a uniformly random delay up to the exponential backoff's current value.
pub fn full_jitter(cap: Duration, rng: &mut impl Rng) -> Duration {
    Duration::from_millis(rng.random_range(0..=cap.as_millis() as u64))
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    reconnects: AtomicU64,
    failed_attempts: AtomicU64,
    disconnected_ms: AtomicU64,
    per_server: Mutex<BTreeMap<String, i64>>,
    close_codes: Mutex<BTreeMap<u16, u64>>,
}

impl Stats {
    fn server(&self, name: &str, delta: i64) {
        let mut m = self.per_server.lock().expect("not poisoned");
        let v = m.entry(name.to_string()).or_insert(0);
        *v += delta;
        if *v == 0 {
            m.remove(name);
        }
    }

    fn line(&self, total: u32) -> String {
        let connected = self.connected.load(Ordering::Relaxed);
        let servers: Vec<String> = self
            .per_server
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(k, v)| format!("{k} {v:>4}"))
            .collect();
        format!(
            "connected {connected:>5}/{total}  reconnecting {:>4}  reconnects {:>5}  | {}",
            u64::from(total).saturating_sub(connected),
            self.reconnects.load(Ordering::Relaxed),
            servers.join("  ")
        )
    }
}

/// Where clients connect: fixed URLs, or servers discovered in Consul.
struct Targets {
    fixed: Vec<String>,
    discovered: RwLock<Vec<String>>,
}

impl Targets {
    fn pick(&self) -> Option<String> {
        let d = self.discovered.read().expect("not poisoned");
        let pool = if self.fixed.is_empty() {
            &*d
        } else {
            &self.fixed
        };
        if pool.is_empty() {
            return None;
        }
        Some(pool[rand::rng().random_range(0..pool.len())].clone())
    }
}

/// Passing, non-cordoned instances of `service` as `ws://address:port/`.
async fn discover(
    consul: &Consul,
    service: &str,
) -> Result<Vec<String>, crate::contract::consul::ConsulError> {
    let hpath = format!("/v1/health/service/{service}?passing=true");
    let health = consul_health::parse(
        &hpath,
        &consul.blocking_get(&hpath, 0, Duration::ZERO).await?,
    )?;
    let kpath = format!("/v1/kv/{}?recurse=true", state_prefix(service));
    let states = states::parse(
        service,
        &kpath,
        &consul.blocking_get(&kpath, 0, Duration::ZERO).await?,
    )?;
    let cordoned: std::collections::HashSet<_> = states
        .states
        .into_iter()
        .filter(|(_, a)| !matches!(a, Admin::Active))
        .map(|(id, _)| id)
        .collect();
    Ok(health
        .instances
        .into_iter()
        .filter(|i| i.passing && !cordoned.contains(&i.id))
        .map(|i| format!("ws://{}:{}/", i.address, i.port))
        .collect())
}

/// Runs the clients; returns the summary object (also printed as stdout's last line by the CLI).
pub async fn run(
    args: LoadgenArgs,
    stop: CancellationToken,
) -> Result<serde_json::Value, LoadgenError> {
    args.validate()?;
    let started = Instant::now();
    let deadline = started + args.duration;
    let stats = Arc::new(Stats::default());
    let targets = Arc::new(Targets {
        fixed: args.urls.clone(),
        discovered: RwLock::new(Vec::new()),
    });
    let done = CancellationToken::new();
    // The distribution as it was when the run ended, before the clients close.
    let at_end: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    {
        let (done, stop, stats, at_end) =
            (done.clone(), stop.clone(), stats.clone(), at_end.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
            *at_end.lock().expect("not poisoned") =
                stats.per_server.lock().expect("not poisoned").clone();
            done.cancel();
        });
    }
    if let Some(addr) = &args.consul {
        let mut endpoint = ConsulEndpoint::from_env(addr, &|k| std::env::var(k).ok());
        if let Some(t) = args.consul_token.clone().filter(|t| !t.is_empty()) {
            endpoint.token = Some(crate::contract::secret::Secret::new(t));
        }
        let consul = Consul::connect(&endpoint)?;
        let (targets, done, service) = (targets.clone(), done.clone(), args.service.clone());
        let first = discover(&consul, &service).await.unwrap_or_default();
        *targets.discovered.write().expect("not poisoned") = first;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = done.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                match discover(&consul, &service).await {
                    Ok(list) => *targets.discovered.write().expect("not poisoned") = list,
                    Err(e) => tracing::warn!(error = %e, "discovery failed; keeping the last list"),
                }
            }
        });
    }
    let progress = {
        let (stats, done, total) = (stats.clone(), done.clone(), args.connections);
        let tty = std::io::stderr().is_terminal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = done.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if tty {
                    eprint!("\r{:<100}", stats.line(total));
                } else {
                    eprintln!("{}", stats.line(total));
                }
            }
            if tty {
                eprintln!();
            }
        })
    };
    let spacing = Duration::from_secs_f64(1.0 / f64::from(args.ramp));
    let mut clients = Vec::with_capacity(args.connections as usize);
    for i in 0..args.connections {
        let start_at = started + spacing * i;
        clients.push(tokio::spawn(client(
            args.clone(),
            targets.clone(),
            stats.clone(),
            done.clone(),
            start_at,
        )));
    }
    for c in clients {
        let _ = c.await;
    }
    let _ = progress.await;
    let per_server = at_end.lock().expect("not poisoned").clone();
    let codes: BTreeMap<String, u64> = stats
        .close_codes
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    Ok(json!({
        "connections": args.connections,
        "connected_at_end": stats.connected.load(Ordering::Relaxed),
        "reconnects": stats.reconnects.load(Ordering::Relaxed),
        "failed_attempts": stats.failed_attempts.load(Ordering::Relaxed),
        "disconnected_seconds": stats.disconnected_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        "per_server": per_server,
        "close_codes": codes,
        "duration_seconds": started.elapsed().as_secs_f64(),
    }))
}

async fn client(
    args: LoadgenArgs,
    targets: Arc<Targets>,
    stats: Arc<Stats>,
    done: CancellationToken,
    start_at: Instant,
) {
    tokio::select! {
        () = done.cancelled() => return,
        () = tokio::time::sleep_until(start_at) => {}
    }
    let builder = ExponentialBuilder::default()
        .with_min_delay(args.backoff_min)
        .with_max_delay(args.backoff_max)
        .without_max_times();
    let mut delays = builder.build();
    let mut first = args.pile_on.clone();
    let mut down_since: Option<Instant> = None;
    while !done.is_cancelled() {
        let Some(target) = first.take().or_else(|| targets.pick()) else {
            tokio::select! {
                () = done.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        };
        let connect = tokio::time::timeout(
            args.connect_timeout,
            tokio_tungstenite::connect_async(target.as_str()),
        );
        let ws = tokio::select! {
            () = done.cancelled() => break,
            r = connect => r,
        };
        if let Ok(Ok((mut ws, _))) = ws {
            delays = builder.build();
            stats.connected.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = down_since.take() {
                stats
                    .disconnected_ms
                    .fetch_add(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            let mut server = target
                .trim_start_matches("ws://")
                .trim_end_matches('/')
                .to_string();
            let mut counted = false;
            let mut ping = tokio::time::interval(Duration::from_secs(15));
            ping.tick().await;
            let ended_by_us = loop {
                tokio::select! {
                    () = done.cancelled() => {
                        let _ = ws.close(None).await;
                        break true;
                    }
                    _ = ping.tick() => {
                        if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                            break false;
                        }
                    }
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) if !counted => {
                            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                                if let Some(s) = v["server"].as_str() {
                                    server = s.to_string();
                                }
                            }
                            stats.server(&server, 1);
                            counted = true;
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            *stats.close_codes.lock().expect("not poisoned").entry(code).or_insert(0) += 1;
                            break false;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break false,
                    },
                }
            };
            if counted {
                stats.server(&server, -1);
            }
            if ended_by_us {
                // The run is over: count this client as held to the end.
                break;
            }
            stats.connected.fetch_sub(1, Ordering::Relaxed);
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            down_since = Some(Instant::now());
        } else {
            stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            down_since.get_or_insert_with(Instant::now);
        }
        let cap = delays.next().unwrap_or(args.backoff_max);
        let wait = full_jitter(cap, &mut rand::rng());
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(t) = down_since {
        stats
            .disconnected_ms
            .fetch_add(t.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_within_the_cap_and_uses_all_of_it() {
        let mut rng = rand::rng();
        let cap = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..1000).map(|_| full_jitter(cap, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d <= cap));
        assert!(draws.iter().any(|d| *d < Duration::from_millis(10)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(90)));
    }

    #[test]
    fn arguments_are_bounded() {
        let ok = LoadgenArgs {
            connections: 10,
            duration: Duration::from_secs(5),
            urls: vec!["ws://127.0.0.1:1/".into()],
            consul: None,
            consul_token: None,
            service: "ws".into(),
            pile_on: None,
            ramp: 100,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        };
        assert!(ok.validate().is_ok());
        assert!(LoadgenArgs {
            connections: 200_000,
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(LoadgenArgs {
            duration: Duration::from_secs(90_000),
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(LoadgenArgs {
            urls: vec![],
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(LoadgenArgs {
            urls: vec!["http://x".into()],
            ..ok
        }
        .validate()
        .is_err());
    }
}
