//! Processes in tests: finding tools, free ports, start-and-retry for services whose ports
//! may be taken, and the roles of the binary under test (controller, demo server, load
//! generator, gateway), each killed when dropped.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::consul::ConsulAgent;
use super::http::{get, http, http_builder};
use super::prometheus::sample;
use super::redis::Redis;
use super::wait::{eventually, WAIT};

pub const INSTALL_HINT: &str =
    "run `scripts/setup.sh` (installs redis-server and openssl, and unpacks consul into target/tools/)";

pub fn repo() -> PathBuf {
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

/// A service started on ports chosen free, which a concurrent test may take before the
/// service binds them.
pub trait Service {
    /// What it is and where its logs are, for failures.
    fn name(&self) -> String;
    /// Chooses other free ports.
    fn new_ports(&mut self);
    /// Starts it on its ports; `false` when it exited before it was ready.
    fn spawn(&mut self) -> impl Future<Output = bool>;
}

/// Starts `s`, on other ports after each exit at start-up (a lost port race).
pub async fn start<S: Service>(mut s: S) -> S {
    spawn_retrying(&mut s, 4, true).await;
    s
}

/// Starts `s` again on the same ports, once the old process's ports are free again.
pub async fn restart<S: Service>(s: &mut S) {
    spawn_retrying(s, 20, false).await;
}

/// The one spawn-and-retry loop.
async fn spawn_retrying<S: Service>(s: &mut S, attempts: u32, new_ports: bool) {
    for attempt in 0..attempts {
        if attempt > 0 {
            if new_ports {
                s.new_ports();
            } else {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        if s.spawn().await {
            return;
        }
    }
    panic!("{} exited at every one of {attempts} starts", s.name());
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a just-started process is `ready`. `None` when it exited first (typically a
/// port taken by a concurrent test between choosing it and binding it); panics after
/// `timeout`, naming what it waited for and where the logs are.
pub async fn until_ready<F, Fut>(
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
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; logs in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn log_file(dir: &Path, name: &str) -> std::fs::File {
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

/// Sends `signal` (`STOP`, `CONT`, `TERM`) to `pid`; panics if it cannot.
pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid}");
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

/// The controller whose `rebalancer_leader` is 1, if exactly one of `ctls` is leader.
pub async fn the_leader(ctls: &[&Controller]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, c) in ctls.iter().enumerate() {
        if c.metric("rebalancer_leader", &[]).await == Some(1.0) {
            leaders.push(i);
        }
    }
    (leaders.len() == 1).then(|| leaders[0])
}

/// The built `rebalancer` binary running one pipeline; killed when dropped.
pub struct Controller {
    child: std::process::Child,
    pub metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    pub fn start(dir: &Path, toml: &str, metrics_port: u16) -> Controller {
        Controller::start_with_env(dir, toml, metrics_port, &[])
    }

    /// The binary on a pipeline `ws` against `redis` and `consul`, with `sections` added
    /// to the test timings, its files under a temporary directory named after `tag`.
    pub fn with_sections(
        tag: &str,
        redis: &Redis,
        consul: &ConsulAgent,
        sections: &str,
    ) -> Controller {
        let port = free_port();
        let toml = pipeline_toml("ws", redis, consul, port, "", sections);
        Controller::start(&temp_dir(tag), &toml, port)
    }

    /// Started with `env` set (command keys, say).
    pub fn start_with_env(
        dir: &Path,
        toml: &str,
        metrics_port: u16,
        env: &[(&str, &str)],
    ) -> Controller {
        let file = dir.join("pipeline.toml");
        std::fs::write(&file, toml).unwrap();
        let log = dir.join("controller.log");
        let child = Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .args(["run", "--pipeline"])
            .arg(&file)
            .envs(env.iter().copied())
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
        match get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.metrics().await, name, labels)
    }

    /// Decision rounds made so far, whatever their outcome.
    async fn decisions(&self) -> f64 {
        let text = self.metrics().await;
        ["act", "idle", "halted"]
            .iter()
            .filter_map(|o| sample(&text, "rebalancer_decisions_total", &[("outcome", o)]))
            .sum()
    }

    /// Waits until the controller has made `n` more decision rounds: an observation window
    /// counted in rounds, not in seconds.
    pub async fn rounds(&self, n: u32) {
        let from = self.decisions().await;
        eventually(&format!("{n} more decision rounds"), WAIT, || async {
            (self.decisions().await >= from + f64::from(n)).then_some(())
        })
        .await;
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process: a stopped controller holds its
    /// connections and its cached lease, and does nothing, as one stuck in a long GC-like
    /// pause or a frozen VM does.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    /// A graceful stop: SIGTERM, and up to 15 s to exit.
    pub fn terminate(&mut self) {
        terminate(&mut self.child, Duration::from_secs(15));
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `rebalancer demo-server` with the agent, capacity `max`, on a free port.
/// `n` demo servers (`s1`…, 100 sessions each), once all pass in Consul.
pub async fn demo_fleet(redis: &Redis, consul: &ConsulAgent, n: usize) -> Vec<DemoServer> {
    let servers: Vec<DemoServer> = (1..=n)
        .map(|i| DemoServer::start(&format!("s{i}"), 100, redis, consul))
        .collect();
    eventually("the servers passing", WAIT, || async {
        (consul.passing("ws").await.len() == n).then_some(())
    })
    .await;
    servers
}

pub struct DemoServer {
    pub id: String,
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl DemoServer {
    pub fn start(id: &str, max: u32, redis: &Redis, consul: &ConsulAgent) -> DemoServer {
        DemoServer::start_with_env(id, max, redis, consul, &[])
    }

    /// Started with `env` set (command keys, say).
    pub fn start_with_env(
        id: &str,
        max: u32,
        redis: &Redis,
        consul: &ConsulAgent,
        env: &[(&str, &str)],
    ) -> DemoServer {
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
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            log,
        };
        s.spawn_listening();
        s
    }

    /// Spawns until the server listens: one that exits at start-up (its port taken between
    /// choosing it and binding it) is started again on another port.
    fn spawn_listening(&mut self) {
        for _ in 0..4 {
            self.spawn();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return;
                }
                if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if std::time::Instant::now() >= deadline {
                return; // slow, not gone: the test's own wait says so
            }
            self.port = free_port();
            let at = self.args.iter().position(|a| a == "--listen").unwrap() + 1;
            self.args[at] = format!("127.0.0.1:{}", self.port);
        }
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
                .envs(self.env.iter().map(|(k, v)| (k, v)))
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
        Loadgen::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Loadgen {
        let dir = temp_dir("loadgen");
        let out = dir.join("summary.json");
        let child = Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .arg("loadgen")
            .args(args)
            .envs(env.iter().copied())
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

/// One demo server (`s1`, 100 sessions), once it passes in Consul.
pub async fn one_server(redis: &Redis, consul: &ConsulAgent) -> DemoServer {
    demo_fleet(redis, consul, 1).await.remove(0)
}

/// `rebalancer gateway` in front of the test fleet; killed when dropped.
pub struct GatewayProc {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    log: PathBuf,
    pipeline: PathBuf,
}

impl GatewayProc {
    pub async fn start(redis: &Redis, consul: &ConsulAgent) -> GatewayProc {
        Self::start_with(redis, consul, "").await
    }

    /// With `extra` keys added to the `[gateway]` section.
    pub async fn start_with(redis: &Redis, consul: &ConsulAgent, extra: &str) -> GatewayProc {
        GatewayProc::start_with_env(redis, consul, extra, &[]).await
    }

    /// Started with `env` set (a Consul token, say).
    pub async fn start_with_env(
        redis: &Redis,
        consul: &ConsulAgent,
        extra: &str,
        env: &[(&str, &str)],
    ) -> GatewayProc {
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
            .envs(env.iter().copied())
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
            pipeline: dir.join("p.toml"),
        };
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        eventually("the gateway to serve metrics", WAIT, || {
            let url = url.clone();
            async move { get(url).await.ok().map(|_| ()) }
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

    /// The pipeline file it was started with.
    pub fn pipeline_file(&self) -> &Path {
        &self.pipeline
    }

    /// Its `/metrics` page (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        match get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.metrics().await, name, labels)
    }

    /// Waits until it serves a plain request.
    pub async fn serving(&self) {
        eventually("the gateway serving", WAIT, || async {
            let r = get(self.http_url("/hello")).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    /// How many times `limit` has bitten (`rebalancer_gateway_limited_total`).
    pub async fn limited(&self, limit: &str) -> f64 {
        self.metric("rebalancer_gateway_limited_total", &[("limit", limit)])
            .await
            .unwrap_or(-1.0)
    }

    /// Its resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the gateway's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
