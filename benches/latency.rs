//! Event-to-action latency against a real Redis and Consul with 1,000 servers: from a
//! session-count change (the SET) to the published shed command, minus the debounce quiet
//! window. Runs the built controller binary.
//!
//! Run: `cargo bench --bench latency` (needs `scripts/setup.sh`). Results: BENCHMARKS.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{eventually, free_port, get, pipeline_toml, sample, temp_dir, ConsulAgent, Redis};

const SERVERS: usize = 1000;
const SAMPLES: usize = 300;
const QUIET_MS: u64 = 5;

/// Stops the controller however the bench ends, a failed assertion included.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    for i in 0..SERVERS {
        consul
            .register_capacity("ws", &format!("s{i:04}"), 100)
            .await;
    }
    let mut conn = redis.conn().await;
    for i in 0..SERVERS {
        redis::cmd("SET")
            .arg(format!("rebalancer:ws:sessions:s{i:04}"))
            .arg(50)
            .arg("EX")
            .arg(3600)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let port = free_port();
    let toml = pipeline_toml(
        "bench",
        &redis,
        &consul,
        port,
        "",
        "[rebalance]\nround_interval = \"1h\"\ndisruption_budget = 1.0\n[scale]\nenabled = false\n",
    )
    .replace("quiet = \"50ms\"", &format!("quiet = \"{QUIET_MS}ms\""))
    .replace("max_delay = \"300ms\"", "max_delay = \"100ms\"");
    let dir = temp_dir("latency");
    std::fs::write(dir.join("p.toml"), toml).unwrap();
    let _ctl = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .args(["run", "--pipeline"])
            .arg(dir.join("p.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    eventually(
        "the controller to lead with 1,000 servers",
        Duration::from_secs(60),
        || {
            let m = metrics.clone();
            async move {
                let text = get(m).await.ok()?.text().await.ok()?;
                (sample(&text, "rebalancer_leader", &[]) == Some(1.0)
                    && sample(&text, "rebalancer_servers", &[("state", "active")])
                        == Some(SERVERS as f64))
                .then_some(())
            }
        },
    )
    .await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("rebalancer:ws:commands").await.unwrap();
    let mut msgs = pubsub.into_on_message();

    let mut samples = Vec::with_capacity(SAMPLES);
    for k in 0..SAMPLES {
        let key = format!("rebalancer:ws:sessions:s{:04}", k % SERVERS);
        let t0 = Instant::now();
        redis::cmd("SET")
            .arg(&key)
            .arg(95)
            .arg("EX")
            .arg(3600)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), msgs.next())
            .await
            .expect("a command")
            .unwrap();
        let took = t0.elapsed();
        let payload: String = m.get_payload().unwrap();
        assert!(
            payload.contains(&format!("\"server\":\"s{:04}\"", k % SERVERS)),
            "{payload}"
        );
        samples.push(took.saturating_sub(Duration::from_millis(QUIET_MS)));
        // Back to balanced, and let that settle before the next sample.
        redis::cmd("SET")
            .arg(&key)
            .arg(50)
            .arg("EX")
            .arg(3600)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    samples.sort();
    let q = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).min(samples.len()) - 1];
    println!(
        "event_to_action servers={SERVERS} samples={SAMPLES} quiet={QUIET_MS}ms (subtracted): p50={:.2?} p90={:.2?} p99={:.2?} max={:.2?}",
        q(0.50),
        q(0.90),
        q(0.99),
        samples[samples.len() - 1]
    );
}
