//! Test harness: real Redis and Consul agents on free loopback ports, started per test and
//! killed when dropped. A missing binary fails the test with how to install it.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How long tests wait for something that should happen in well under a second.
pub const WAIT: Duration = Duration::from_secs(20);
use std::time::Duration;

use serde_json::json;

pub const INSTALL_HINT: &str =
    "run `scripts/setup.sh` (installs redis-server and unpacks consul into target/tools/)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Finds a tool: `REBALANCER_<NAME>_BIN`, then PATH, then `target/tools/<name>-bin`.
pub fn tool(name: &str) -> PathBuf {
    let var = format!("REBALANCER_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    let local = repo()
        .join("target")
        .join("tools")
        .join(format!("{name}-bin"));
    if local.exists() {
        return local;
    }
    panic!("`{name}` is needed by this test and was not found on PATH, in ${var} or in target/tools/: {INSTALL_HINT}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a just-started process is `ready`. `None` when it exited first (typically a
/// port taken by a concurrent test between choosing it and binding it); panics after
/// `timeout`, naming what it waited for and where the logs are.
async fn until_ready<F, Fut>(
    mut proc: Proc,
    what: &str,
    timeout: Duration,
    dir: &Path,
    mut ready: F,
) -> Option<Proc>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = proc.0.try_wait() {
            return None;
        }
        if ready().await {
            return Some(proc);
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).expect("create a log file")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rebalancer-test-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `redis-server` of our own, with keyspace notifications *off* (the controller must
/// turn them on).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            proc: None,
        };
        // As for consul: a port chosen free may be taken before redis binds it.
        for attempt in 0..4 {
            if attempt > 0 {
                r.port = free_port();
            }
            if r.spawn().await {
                return r;
            }
        }
        panic!(
            "redis-server exited at every start; see {}/redis.log",
            r.dir.display()
        );
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

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Stops and starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        for _ in 0..20 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("redis-server did not restart on port {}", self.port);
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
}

/// A `consul agent -dev` of our own, every port free or disabled.
pub struct ConsulAgent {
    pub http_port: u16,
    ports: [u16; 3],
    dir: PathBuf,
    proc: Option<Proc>,
    http: reqwest::Client,
}

impl ConsulAgent {
    pub async fn start() -> ConsulAgent {
        let mut c = ConsulAgent {
            http_port: free_port(),
            ports: [free_port(), free_port(), free_port()],
            dir: temp_dir("consul"),
            proc: None,
            http: reqwest::Client::new(),
        };
        // A port chosen free can be taken by a concurrent test before consul binds it:
        // then consul exits at once, and a first start tries again on other ports.
        for attempt in 0..4 {
            if attempt > 0 {
                c.http_port = free_port();
                c.ports = [free_port(), free_port(), free_port()];
            }
            if c.spawn().await {
                return c;
            }
        }
        panic!(
            "consul exited at every start; see {}/consul.err",
            c.dir.display()
        );
    }

    /// Starts the agent on its ports; `false` when it exited before becoming leader.
    async fn spawn(&mut self) -> bool {
        let [serf_lan, serf_wan, server] = self.ports;
        let (http, lan, wan, srv) = (
            self.http_port.to_string(),
            serf_lan.to_string(),
            serf_wan.to_string(),
            server.to_string(),
        );
        let node = format!("test-{}", self.http_port);
        let child = Command::new(tool("consul"))
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &http, "-dns-port", "-1", "-grpc-port", "-1"])
            .args([
                "-serf-lan-port",
                &lan,
                "-serf-wan-port",
                &wan,
                "-server-port",
                &srv,
                "-node",
                &node,
            ])
            .current_dir(&self.dir)
            .stdout(log_file(&self.dir, "consul.log"))
            .stderr(log_file(&self.dir, "consul.err"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start consul: {e}; {INSTALL_HINT}"));
        let url = format!("{}/v1/status/leader", self.address());
        let http = self.http.clone();
        let ready = until_ready(
            Proc(child),
            "consul to elect itself leader",
            Duration::from_secs(30),
            &self.dir,
            || async {
                let Ok(r) = http.get(&url).send().await else {
                    return false;
                };
                r.text().await.is_ok_and(|body| body.len() > 2)
            },
        )
        .await;
        let started = ready.is_some();
        self.proc = ready;
        started
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Stops and starts again on the same ports; a dev agent comes back empty.
    pub async fn restart(&mut self) {
        self.stop();
        for _ in 0..20 {
            if self.spawn().await {
                return;
            }
            // The old agent's ports may take a moment to be free again.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "consul did not restart on its ports; see {}/consul.err",
            self.dir.display()
        );
    }

    async fn put(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        let r = self
            .http
            .put(format!("{}{path}", self.address()))
            .body(body.to_string())
            .send()
            .await
            .expect("reach the test consul");
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
        r
    }

    /// Registers a server the way the contract says, with a TTL check that starts passing.
    pub async fn register(&self, service: &str, id: &str, meta: serde_json::Value) {
        self.put(
            "/v1/agent/service/register",
            json!({
                "ID": id, "Name": service, "Address": "127.0.0.1", "Port": 9000,
                "Meta": meta,
                "Check": {"CheckID": format!("service:{id}"), "TTL": "600s", "Status": "passing"}
            }),
        )
        .await;
    }

    pub async fn register_capacity(&self, service: &str, id: &str, max_sessions: u32) {
        self.register(
            service,
            id,
            json!({"max_sessions": max_sessions.to_string()}),
        )
        .await;
    }

    pub async fn deregister(&self, id: &str) {
        self.put(&format!("/v1/agent/service/deregister/{id}"), json!(null))
            .await;
    }

    pub async fn set_passing(&self, id: &str, passing: bool) {
        let verb = if passing { "pass" } else { "fail" };
        self.put(&format!("/v1/agent/check/{verb}/service:{id}"), json!(null))
            .await;
    }

    pub async fn kv_put(&self, key: &str, value: &str) {
        let r = self
            .http
            .put(format!("{}/v1/kv/{key}", self.address()))
            .body(value.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// The raw value at `key`, if any.
    pub async fn kv_get(&self, key: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/v1/kv/{key}?raw=true", self.address()))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }

    /// The `state` field of a server's KV record (`None`: no record).
    pub async fn server_state(&self, service: &str, id: &str) -> Option<String> {
        let raw = self
            .kv_get(&format!("rebalancer/{service}/servers/{id}"))
            .await?;
        let v: serde_json::Value = serde_json::from_str(&raw).ok()?;
        v["state"].as_str().map(str::to_string)
    }
}

/// A pipeline's TOML pointed at the test's Redis and Consul, with fast timings. `top` holds
/// top-level keys, `sections` extra sections (not the ones written here).
pub fn pipeline_toml(
    name: &str,
    redis: &Redis,
    consul: &ConsulAgent,
    metrics_port: u16,
    top: &str,
    sections: &str,
) -> String {
    format!(
        r#"name = "{name}"
service = "ws"
{top}
[consul]
address = "{consul}"
wait = "20s"
[redis]
url = "{redis}"
reconcile = "5s"
[debounce]
quiet = "50ms"
max_delay = "300ms"
[leader]
session_ttl = "10s"
[metrics]
listen = "127.0.0.1:{metrics_port}"
{sections}
"#,
        consul = consul.address(),
        redis = redis.url(),
    )
}

/// One Prometheus recorder for the whole test binary, for in-process tests.
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    H.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the test recorder")
    })
}

/// The value of the sample of `name` whose labels include every `labels` pair, from
/// Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

/// The built `rebalancer` binary running one pipeline; killed when dropped.
pub struct Controller {
    child: std::process::Child,
    pub metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    pub fn start(dir: &Path, toml: &str, metrics_port: u16) -> Controller {
        let file = dir.join("pipeline.toml");
        std::fs::write(&file, toml).unwrap();
        let log = dir.join("controller.log");
        let child = Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .args(["run", "--pipeline"])
            .arg(&file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the rebalancer binary");
        Controller {
            child,
            metrics_port,
            log,
        }
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.metrics().await, name, labels)
    }

    /// Waits until the controller leads and has a synced snapshot of `sessions` sessions.
    pub async fn until_synced(&self, sessions: f64) {
        eventually(
            "the controller to lead with a synced snapshot",
            WAIT,
            || async {
                let text = self.metrics().await;
                (sample(&text, "rebalancer_leader", &[]) == Some(1.0)
                    && sample(&text, "rebalancer_snapshot_stale", &[]) == Some(0.0)
                    && sample(&text, "rebalancer_sessions", &[]) == Some(sessions))
                .then_some(())
            },
        )
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `prometheus` of our own scraping `targets` every second.
pub struct Prometheus {
    pub port: u16,
    _proc: Proc,
}

impl Prometheus {
    pub async fn start(targets: &[String]) -> Prometheus {
        let dir = temp_dir("prometheus");
        let port = free_port();
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rebalancer\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log_file(&dir, "prometheus.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus: {e}; {INSTALL_HINT}"));
        let p = Prometheus {
            port,
            _proc: Proc(child),
        };
        let url = format!("http://127.0.0.1:{port}/-/ready");
        eventually("prometheus to be ready", WAIT, || {
            let url = url.clone();
            async move {
                reqwest::get(url)
                    .await
                    .ok()?
                    .status()
                    .is_success()
                    .then_some(())
            }
        })
        .await;
        p
    }

    /// Runs an instant query; `Err` carries Prometheus' error for an invalid one.
    pub async fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let body: serde_json::Value = reqwest::Client::new()
            .get(url)
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"]["result"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }
}

/// Sends SIGTERM and waits up to `grace` for the process to exit, then kills it.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `rebalancer demo-server` with the agent, capacity `max`, on a free port.
pub struct DemoServer {
    pub id: String,
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl DemoServer {
    pub fn start(id: &str, max: u32, redis: &Redis, consul: &ConsulAgent) -> DemoServer {
        let port = free_port();
        let args = vec![
            "demo-server".into(),
            "--service".into(),
            "ws".into(),
            "--id".into(),
            id.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--max-sessions".into(),
            max.to_string(),
            "--consul".into(),
            consul.address(),
            "--redis".into(),
            redis.url(),
            "--shed-window".into(),
            "1s".into(),
        ];
        let log = temp_dir(&format!("server-{id}")).join("server.log");
        let mut s = DemoServer {
            id: id.into(),
            port,
            child: None,
            args,
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_rebalancer"))
                .args(&self.args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start a demo server"),
        );
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// SIGTERM: the agent deregisters and drains its sessions, then the process exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(10));
        }
    }

    /// Starts again with the same id and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `rebalancer loadgen`; [`Loadgen::finish`] stops it and returns its JSON summary.
pub struct Loadgen {
    child: Option<Child>,
    out: PathBuf,
    progress: PathBuf,
}

impl Loadgen {
    pub fn start(args: &[&str]) -> Loadgen {
        let dir = temp_dir("loadgen");
        let out = dir.join("summary.json");
        let child = Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .arg("loadgen")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(log_file(&dir, "progress.log"))
            .spawn()
            .expect("start the load generator");
        Loadgen {
            child: Some(child),
            out,
            progress: dir.join("progress.log"),
        }
    }

    /// Waits until the load generator itself (its progress line, once a second) counts
    /// `n` clients connected: the servers count a session a moment before its client
    /// hears the upgrade answer.
    /// Waits for a progress line, written after this call began, that shows `n` clients
    /// connected. Lines are written once a second, so the last one may predate a shed the
    /// caller has already seen settle in Redis: it must not count.
    pub async fn until_connected(&self, n: u64) {
        let want = format!("connected {n:>5}/");
        let lines = || {
            std::fs::read_to_string(&self.progress)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let seen = lines().len();
        eventually(
            &format!("the load generator to see {n} clients connected"),
            WAIT,
            || async {
                let now = lines();
                (now.len() > seen && now.last()?.contains(&want)).then_some(())
            },
        )
        .await;
    }

    pub fn finish(&mut self) -> serde_json::Value {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(15));
        }
        let text = std::fs::read_to_string(&self.out).unwrap();
        let last = text
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no summary from loadgen: {text:?}"));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {last}"))
    }
}

impl Drop for Loadgen {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Redis {
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

impl ConsulAgent {
    /// IDs of passing instances of `service`.
    pub async fn passing(&self, service: &str) -> Vec<String> {
        let url = format!(
            "{}/v1/health/service/{service}?passing=true",
            self.address()
        );
        let Ok(r) = self.http.get(url).send().await else {
            return Vec::new();
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["Service"]["ID"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub const DOCKER_HINT: &str = "run `scripts/setup.sh` (installs docker.io and starts dockerd --bridge=none --iptables=false --ip6tables=false)";

/// Runs the docker CLI; panics with how to get an engine when it cannot.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker: {e}; {DOCKER_HINT}"));
    if !out.status.success() {
        panic!(
            "docker {args:?} failed: {}; {DOCKER_HINT}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test image (`rebalancer:test`), built once per test binary from the binary under test
/// with `scripts/docker-image.sh`.
pub fn docker_image() -> &'static str {
    static IMAGE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        docker(&["version", "--format", "{{.Server.Version}}"]);
        let script = repo().join("scripts/docker-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_rebalancer"))
            .arg("rebalancer:test")
            .output()
            .expect("run scripts/docker-image.sh");
        assert!(
            out.status.success(),
            "building the test image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    "rebalancer:test"
}

/// `(name, state)` of the containers carrying `label=value`.
pub fn containers_labelled(label: &str, value: &str) -> Vec<(String, String)> {
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label={label}={value}"),
        "--format",
        "{{.Names}} {{.State}}",
    ])
    .lines()
    .filter_map(|l| {
        l.split_once(' ')
            .map(|(a, b)| (a.to_string(), b.to_string()))
    })
    .collect()
}

/// Removes every container of a pipeline (and any named ones) when dropped.
pub struct ContainerJanitor {
    pub pipeline: String,
    pub names: Vec<String>,
}

impl Drop for ContainerJanitor {
    fn drop(&mut self) {
        let mut ids: Vec<String> = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=rebalancer.pipeline={}", self.pipeline),
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        ids.extend(self.names.iter().cloned());
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
    }
}

/// `rebalancer gateway` in front of the test fleet; killed when dropped.
pub struct GatewayProc {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    log: PathBuf,
}

impl GatewayProc {
    pub async fn start(redis: &Redis, consul: &ConsulAgent) -> GatewayProc {
        Self::start_with(redis, consul, "").await
    }

    /// With `extra` keys added to the `[gateway]` section.
    pub async fn start_with(redis: &Redis, consul: &ConsulAgent, extra: &str) -> GatewayProc {
        let (port, metrics_port) = (free_port(), free_port());
        let toml = pipeline_toml(
            "gw",
            redis,
            consul,
            free_port(),
            "",
            &format!(
                "[gateway]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
                 health_interval = \"300ms\"\nbreaker_open = \"2s\"\nslow_start = \"1ms\"\n{extra}"
            ),
        );
        let dir = temp_dir("gateway");
        std::fs::write(dir.join("p.toml"), toml).unwrap();
        let log = dir.join("gateway.log");
        let child = Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .args(["gateway", "--pipeline"])
            .arg(dir.join("p.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the gateway");
        let g = GatewayProc {
            child,
            port,
            metrics_port,
            log,
        };
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        eventually("the gateway to serve metrics", WAIT, || {
            let url = url.clone();
            async move { reqwest::get(url).await.ok().map(|_| ()) }
        })
        .await;
        g
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        sample(&text, name, labels)
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long closed-loop tests wait for a fleet to settle.
pub const LOOP_WAIT: Duration = Duration::from_secs(90);

/// Waits (up to [`LOOP_WAIT`]) until the session counts of service `ws` satisfy `f`.
pub async fn counts_where(
    redis: &Redis,
    what: &str,
    f: impl Fn(&std::collections::BTreeMap<String, u64>) -> bool,
) -> std::collections::BTreeMap<String, u64> {
    eventually(what, LOOP_WAIT, || async {
        let c = redis.counts("ws").await;
        f(&c).then_some(c)
    })
    .await
}

/// Waits until every shed the controller published has been carried out and acked by its
/// server (acks come after the server's spread window), and every one of the `clients` is
/// counted on a server again (the last ones shed reconnect after their backoff).
pub async fn sheds_settled(ctl: &Controller, redis: &Redis, clients: u64) {
    eventually(
        "every published shed acked and its clients back",
        LOOP_WAIT,
        || async {
            let shed = [("kind", "shed"), ("result", "ok")];
            let published = ctl
                .metric("rebalancer_actions_total", &shed)
                .await
                .unwrap_or(0.0);
            let acked = redis.acks("ws").await.len() as f64;
            let counted: u64 = redis.counts("ws").await.values().sum();
            (published == acked && counted == clients).then_some(())
        },
    )
    .await;
}
