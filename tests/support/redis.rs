//! A `redis-server` of our own per test, and the reads tests make of it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::procs::{
    self, free_port, log_file, temp_dir, tool, until_ready, Proc, Service, INSTALL_HINT,
};
use super::tls::Certs;

/// A `redis-server` of our own, with keyspace notifications *off* (the controller must
/// turn them on).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    /// TLS only (client certificates required) and ACL users, the default user off.
    secure: Option<Secure>,
}

struct Secure {
    certs: Certs,
    /// ACL file lines of the roles' users.
    users: String,
}

/// The user the helpers connect as on a secure Redis: every command, key and channel.
pub const REDIS_ADMIN: (&str, &str) = ("admin", "admin-secret");

impl Redis {
    pub async fn start() -> Redis {
        let r = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            proc: None,
            secure: None,
        };
        procs::start(r).await
    }

    /// A Redis reached only over TLS with a client certificate signed by `certs`' CA, with
    /// the default user off and the ACL users of `users` (ACL file lines) plus
    /// [`REDIS_ADMIN`], which the helpers use.
    pub async fn start_secure(certs: &Certs, users: &str) -> Redis {
        let r = Redis {
            port: free_port(),
            dir: temp_dir("redis-tls"),
            proc: None,
            secure: Some(Secure {
                certs: certs.clone(),
                users: users.to_string(),
            }),
        };
        procs::start(r).await
    }

    /// The URL roles are given: no user in it (a secure one's come from `REDIS_USERNAME`).
    pub fn url(&self) -> String {
        let scheme = if self.secure.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// A client of the helpers' own (on a secure Redis: [`REDIS_ADMIN`] over TLS).
    pub fn client(&self) -> redis::Client {
        match &self.secure {
            None => redis::Client::open(self.url()).unwrap(),
            Some(s) => rebalancer::contract::tls::RedisEndpoint {
                url: self.url(),
                username: Some(REDIS_ADMIN.0.to_string()),
                password: Some(rebalancer::contract::secret::Secret::new(REDIS_ADMIN.1)),
                tls: s.certs.files(),
            }
            .client()
            .unwrap(),
        }
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
        self.client()
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
        let listen = match &self.secure {
            None => vec!["--port".to_string(), port],
            Some(s) => {
                let acl = self.dir.join("users.acl");
                std::fs::write(
                    &acl,
                    format!(
                        "user default off\nuser {} on >{} ~* &* +@all\n{}\n",
                        REDIS_ADMIN.0,
                        REDIS_ADMIN.1,
                        s.users.trim()
                    ),
                )
                .unwrap();
                let c = &s.certs;
                [
                    ("--port", "0".to_string()),
                    ("--tls-port", port),
                    ("--tls-cert-file", c.server_cert.display().to_string()),
                    ("--tls-key-file", c.server_key.display().to_string()),
                    ("--tls-ca-cert-file", c.ca.display().to_string()),
                    ("--tls-auth-clients", "yes".to_string()),
                    ("--aclfile", acl.display().to_string()),
                ]
                .into_iter()
                .flat_map(|(k, v)| [k.to_string(), v])
                .collect()
            }
        };
        let child = Command::new(tool("redis-server"))
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--notify-keyspace-events", ""])
            .current_dir(&self.dir)
            .stdout(log_file(&self.dir, "redis.log"))
            .stderr(log_file(&self.dir, "redis.err"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL_HINT}"));
        let client = self.client();
        let ready = until_ready(
            Proc(child),
            "redis-server to answer PING",
            Duration::from_secs(10),
            &self.dir,
            || async {
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
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
