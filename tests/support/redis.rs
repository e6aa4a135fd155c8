//! A `redis-server` of our own per test, and the reads tests make of it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::procs::{
    self, free_port, log_file, temp_dir, tool, until_ready, Proc, Service, INSTALL_HINT,
};

/// A `redis-server` of our own, with keyspace notifications *off* (the controller must
/// turn them on).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub async fn start() -> Redis {
        let r = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            proc: None,
        };
        procs::start(r).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server: a paused Redis keeps its connections
    /// open and answers nothing, as one stuck on a slow disk or a long fork does.
    pub fn signal(&self, signal: &str) {
        super::procs::send_signal(self.proc.as_ref().expect("redis is running").0.id(), signal);
    }

    /// Stops and starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        procs::restart(self).await;
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    pub async fn set(&self, key: &str, value: &str, ttl_secs: u64) {
        let mut c = self.conn().await;
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(ttl_secs)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }

    /// Sets a server's session count the way the contract says: `SET … EX`.
    pub async fn report(&self, service: &str, server: &str, sessions: &str) {
        self.set(
            &format!("rebalancer:{service}:sessions:{server}"),
            sessions,
            300,
        )
        .await;
    }

    /// Every reported session count of `service`, by server.
    pub async fn counts(&self, service: &str) -> std::collections::BTreeMap<String, u64> {
        let mut c = self.conn().await;
        let prefix = format!("rebalancer:{service}:sessions:");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        let mut out = std::collections::BTreeMap::new();
        for k in keys {
            let v: Option<String> = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap_or(None);
            if let Some(n) = v.and_then(|v| v.parse().ok()) {
                out.insert(k.trim_start_matches(&prefix).to_string(), n);
            }
        }
        out
    }

    /// The acks stream of `service`: each entry's fields.
    pub async fn acks(&self, service: &str) -> Vec<std::collections::HashMap<String, String>> {
        let mut c = self.conn().await;
        let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(format!("rebalancer:{service}:acks"))
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        raw.into_iter()
            .map(|(_, kv)| kv.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect())
            .collect()
    }
}

impl Service for Redis {
    fn name(&self) -> String {
        format!(
            "redis-server on port {} (logs in {})",
            self.port,
            self.dir.display()
        )
    }

    fn new_ports(&mut self) {
        self.port = free_port();
    }

    /// Starts redis on its port; `false` when it exited before answering PING.
    async fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let child = Command::new(tool("redis-server"))
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--notify-keyspace-events", ""])
            .current_dir(&self.dir)
            .stdout(log_file(&self.dir, "redis.log"))
            .stderr(log_file(&self.dir, "redis.err"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL_HINT}"));
        let url = self.url();
        let ready = until_ready(
            Proc(child),
            "redis-server to answer PING",
            Duration::from_secs(10),
            &self.dir,
            || async {
                let Ok(c) = redis::Client::open(url.as_str()) else {
                    return false;
                };
                let Ok(mut conn) = c.get_multiplexed_async_connection().await else {
                    return false;
                };
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            },
        )
        .await;
        let started = ready.is_some();
        self.proc = ready;
        started
    }
}
