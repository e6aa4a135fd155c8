//! The soak: the built controller, with its shipped defaults, over a churning fleet of 1,000
//! servers against a real Redis and Consul, its memory, file descriptors, threads and tasks
//! sampled. First an update storm (counts `SET` pipelined as fast as Redis takes them),
//! then `SOAK_SECS` (default 1,800) of churn: every count re-reported each second with
//! drift, five servers leaving and five joining every ten seconds, Redis restarted empty at
//! a third and Consul at two thirds. Prints a table for BENCHMARKS.md.
//!
//! Run: `cargo bench --bench soak` (needs `scripts/setup.sh`; `SOAK_SECS=120` for a short
//! run). A measurement, not a test: it asserts only that the controller kept up.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::{eventually, free_port, temp_dir, ConsulAgent, Controller, Redis};

const SERVERS: usize = 1000;
const STORM_SECS: u64 = 10;
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

struct Sample {
    at: Duration,
    phase: &'static str,
    rss_mib: f64,
    fds: usize,
    threads: u64,
    tasks: f64,
}

fn proc_sample(pid: u32, at: Duration, phase: &'static str, tasks: f64) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    Sample {
        at,
        phase,
        rss_mib: field("VmRSS:") as f64 / 1024.0,
        fds,
        threads: field("Threads:"),
        tasks,
    }
}

/// A tiny deterministic generator: the soak needs drift, not cryptography.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

async fn take(ctl: &Controller, phase: &'static str, began: Instant) -> Sample {
    let tasks = ctl
        .metric("rebalancer_runtime_tasks", &[])
        .await
        .unwrap_or(-1.0);
    proc_sample(ctl.pid(), began.elapsed(), phase, tasks)
}

async fn register(consul: &ConsulAgent, ids: &BTreeSet<String>) {
    for id in ids {
        consul.register_capacity("ws", id, 100).await;
    }
}

/// Every count re-reported with a TTL, as agents do; values drift by ±2 around 50.
async fn report_all(
    conn: &mut redis::aio::MultiplexedConnection,
    counts: &mut std::collections::BTreeMap<String, u64>,
    rng: &mut Lcg,
) {
    let mut pipe = redis::pipe();
    for (id, n) in counts.iter_mut() {
        *n = (*n + rng.next(5)).saturating_sub(2).clamp(30, 70);
        pipe.cmd("SET")
            .arg(format!("rebalancer:ws:sessions:{id}"))
            .arg(*n)
            .arg("EX")
            .arg(3)
            .ignore();
    }
    let _: Result<(), _> = pipe.query_async(conn).await;
}

#[tokio::main]
async fn main() {
    let soak = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800),
    );
    let (mut redis, mut consul) = (Redis::start().await, ConsulAgent::start().await);
    let mut ids: BTreeSet<String> = (0..SERVERS).map(|i| format!("s{i:05}")).collect();
    register(&consul, &ids).await;
    let mut counts: std::collections::BTreeMap<String, u64> =
        ids.iter().map(|id| (id.clone(), 50)).collect();
    let mut rng = Lcg(7);
    let mut conn = redis.conn().await;
    report_all(&mut conn, &mut counts, &mut rng).await;

    // The shipped defaults, but for where Redis, Consul and the metrics are.
    let port = free_port();
    let toml = format!(
        "name = \"ws\"\nservice = \"ws\"\n[consul]\naddress = \"{}\"\n[redis]\nurl = \"{}\"\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        consul.address(),
        redis.url()
    );
    let ctl = Controller::start(&temp_dir("soak"), &toml, port);
    let pid = ctl.pid();
    let began = Instant::now();
    let mut samples = Vec::new();
    eventually(
        "the controller synced on 1,000 servers",
        Duration::from_secs(60),
        || async {
            (ctl.metric("rebalancer_servers", &[("state", "active")])
                .await
                == Some(SERVERS as f64))
            .then_some(())
        },
    )
    .await;
    samples.push(take(&ctl, "synced", began).await);

    // The storm: pipelined batches for STORM_SECS, as fast as Redis answers.
    let storm_began = Instant::now();
    let mut sets = 0u64;
    while storm_began.elapsed() < Duration::from_secs(STORM_SECS) {
        let mut pipe = redis::pipe();
        for _ in 0..10_000 {
            let id = format!("s{:05}", rng.next(SERVERS as u64));
            pipe.cmd("SET")
                .arg(format!("rebalancer:ws:sessions:{id}"))
                .arg(30 + rng.next(40))
                .arg("EX")
                .arg(60)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        sets += 10_000;
    }
    let rate = sets as f64 / storm_began.elapsed().as_secs_f64();
    samples.push(take(&ctl, "storm end", began).await);
    // The last values: the controller has caught up when its sum matches them.
    report_all(&mut conn, &mut counts, &mut rng).await;
    let want: u64 = counts.values().sum();
    let caught_up = Instant::now();
    eventually(
        "the controller to catch up after the storm",
        Duration::from_secs(120),
        || async {
            (ctl.metric("rebalancer_sessions", &[]).await == Some(want as f64)).then_some(())
        },
    )
    .await;
    let drained = caught_up.elapsed();
    samples.push(take(&ctl, "caught up", began).await);

    // The churn.
    let churn_began = Instant::now();
    let (mut next_id, mut last_sample, mut last_turnover) =
        (SERVERS, Instant::now(), Instant::now());
    let (mut redis_restarted, mut consul_restarted) = (false, false);
    while churn_began.elapsed() < soak {
        let t = churn_began.elapsed();
        if !redis_restarted && t >= soak / 3 {
            redis.restart().await;
            conn = redis.conn().await;
            redis_restarted = true;
            samples.push(take(&ctl, "redis restarted", began).await);
        }
        if !consul_restarted && t >= soak * 2 / 3 {
            consul.restart().await;
            register(&consul, &ids).await;
            consul_restarted = true;
            samples.push(take(&ctl, "consul restarted", began).await);
        }
        if last_turnover.elapsed() >= Duration::from_secs(10) {
            last_turnover = Instant::now();
            for _ in 0..5 {
                let leaving = ids
                    .iter()
                    .nth(rng.next(ids.len() as u64) as usize)
                    .cloned()
                    .unwrap();
                consul.deregister(&leaving).await;
                ids.remove(&leaving);
                counts.remove(&leaving);
                let joining = format!("s{next_id:05}");
                next_id += 1;
                consul.register_capacity("ws", &joining, 100).await;
                counts.insert(joining.clone(), 50);
                ids.insert(joining);
            }
        }
        report_all(&mut conn, &mut counts, &mut rng).await;
        if last_sample.elapsed() >= SAMPLE_EVERY {
            last_sample = Instant::now();
            samples.push(take(&ctl, "churn", began).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    report_all(&mut conn, &mut counts, &mut rng).await;
    let want: u64 = counts.values().sum();
    eventually(
        "the controller to hold the last counts",
        Duration::from_secs(60),
        || async {
            (ctl.metric("rebalancer_sessions", &[]).await == Some(want as f64)).then_some(())
        },
    )
    .await;
    samples.push(take(&ctl, "end", began).await);

    println!("soak: {SERVERS} servers, storm {rate:.0} SET/s for {STORM_SECS} s (caught up {drained:.1?} after), churn {soak:?}, controller pid {pid}");
    println!("| t (s) | phase | RSS (MiB) | FDs | threads | tasks |");
    println!("|---:|---|---:|---:|---:|---:|");
    for s in &samples {
        println!(
            "| {:.0} | {} | {:.1} | {} | {} | {} |",
            s.at.as_secs_f64(),
            s.phase,
            s.rss_mib,
            s.fds,
            s.threads,
            s.tasks
        );
    }
}
