//! A `consul agent -dev` of our own per test, and the writes and reads tests make of it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use super::http::{get, http, http_builder};
use super::procs::{
    self, free_port, log_file, temp_dir, tool, until_ready, Proc, Service, INSTALL_HINT,
};
use super::tls::Certs;

/// A `consul agent -dev` of our own, every port free or disabled.
pub struct ConsulAgent {
    pub http_port: u16,
    ports: [u16; 3],
    dir: PathBuf,
    proc: Option<Proc>,
    http: reqwest::Client,
    /// With ACLs on (`default_policy = "deny"`): the master token, which the helpers send.
    pub master_token: Option<String>,
    /// With TLS: HTTPS only (no plain port), client certificates required.
    pub tls: Option<Certs>,
}

impl ConsulAgent {
    pub async fn start() -> ConsulAgent {
        let c = ConsulAgent {
            http_port: free_port(),
            ports: [free_port(), free_port(), free_port()],
            dir: temp_dir("consul"),
            proc: None,
            http: http(),
            master_token: None,
            tls: None,
        };
        procs::start(c).await
    }

    /// An agent with ACLs on and `default_policy = "deny"`: only `master` may do anything
    /// until tokens are made ([`ConsulAgent::token_with_rules`]). The helpers send `master`.
    pub async fn start_with_acls(master: &str) -> ConsulAgent {
        ConsulAgent::start_acl_tls(master, None).await
    }

    /// As [`ConsulAgent::start_with_acls`], and reached only over HTTPS with a client
    /// certificate signed by `certs`' CA (`verify_incoming_https`).
    pub async fn start_secure(master: &str, certs: &Certs) -> ConsulAgent {
        ConsulAgent::start_acl_tls(master, Some(certs)).await
    }

    async fn start_acl_tls(master: &str, certs: Option<&Certs>) -> ConsulAgent {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("X-Consul-Token", master.parse().unwrap());
        let builder = match certs {
            Some(c) => c.http_builder(),
            None => http_builder(),
        };
        let c = ConsulAgent {
            http_port: free_port(),
            ports: [free_port(), free_port(), free_port()],
            dir: temp_dir("consul-acl"),
            proc: None,
            http: builder.default_headers(headers).build().unwrap(),
            master_token: Some(master.to_string()),
            tls: certs.cloned(),
        };
        procs::start(c).await
    }

    /// A token holding one policy of `rules` (Consul 1.8 HCL): its secret.
    pub async fn token_with_rules(&self, name: &str, rules: &str) -> String {
        // Right after start the ACL system may still be initializing (500): retry.
        let url = format!("{}/v1/acl/policy", self.address());
        let body = json!({"Name": name, "Rules": rules}).to_string();
        let mut last = String::new();
        for _ in 0..100 {
            let r = self.http.put(&url).body(body.clone()).send().await.unwrap();
            if r.status().is_success() {
                last.clear();
                break;
            }
            last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(last.is_empty(), "PUT /v1/acl/policy {name}: {last}");
        let r = self
            .put(
                "/v1/acl/token",
                json!({"Description": name, "Policies": [{"Name": name}]}),
            )
            .await;
        let v: serde_json::Value = r.json().await.unwrap();
        v["SecretID"].as_str().unwrap().to_string()
    }

    pub fn address(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.http_port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Stops and starts again on the same ports; a dev agent comes back empty.
    pub async fn restart(&mut self) {
        self.stop();
        procs::restart(self).await;
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
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
        // A note, as a real check has output: a critical check with none has never run.
        self.put(
            &format!("/v1/agent/check/{verb}/service:{id}?note=set-by-test"),
            json!(null),
        )
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

    /// Puts a service in maintenance (critical in every health answer) or takes it out.
    pub async fn maintenance(&self, id: &str, on: bool) {
        self.put(
            &format!("/v1/agent/service/maintenance/{id}?enable={on}&reason=test"),
            json!(null),
        )
        .await;
    }

    /// Every key in the KV store.
    pub async fn kv_keys(&self) -> Vec<String> {
        let r = self
            .http
            .get(format!("{}/v1/kv/?keys", self.address()))
            .send()
            .await
            .expect("reach the test consul");
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Vec::new();
        }
        r.json().await.expect("a list of keys")
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

    /// The `X-Consul-Index` of a read of `path`: where a blocking query on it would wait.
    pub async fn index(&self, path: &str) -> u64 {
        let r = self
            .http
            .get(format!("{}{path}", self.address()))
            .send()
            .await
            .expect("reach the test consul");
        r.headers()["X-Consul-Index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The `state` field of a server's KV record (`None`: no record).
    pub async fn server_state(&self, service: &str, id: &str) -> Option<String> {
        let raw = self
            .kv_get(&format!("rebalancer/{service}/servers/{id}"))
            .await?;
        let v: serde_json::Value = serde_json::from_str(&raw).ok()?;
        v["state"].as_str().map(str::to_string)
    }

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

impl Service for ConsulAgent {
    fn name(&self) -> String {
        format!(
            "consul on port {} (logs in {})",
            self.http_port,
            self.dir.display()
        )
    }

    fn new_ports(&mut self) {
        self.http_port = free_port();
        self.ports = [free_port(), free_port(), free_port()];
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
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(match &self.tls {
                None => vec!["-http-port".to_string(), http.clone()],
                Some(c) => vec![
                    "-http-port".to_string(),
                    "-1".to_string(),
                    "-hcl".to_string(),
                    format!(
                        r#"ports {{ https = {http} }} ca_file = "{}" cert_file = "{}" key_file = "{}" verify_incoming_https = true"#,
                        c.ca.display(),
                        c.server_cert.display(),
                        c.server_key.display()
                    ),
                ],
            })
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
            .args(self.master_token.as_ref().map_or_else(Vec::new, |m| {
                vec![
                    "-hcl".to_string(),
                    format!(
                        r#"acl {{ enabled = true, default_policy = "deny", enable_token_persistence = false, tokens {{ master = "{m}", agent = "{m}" }} }}"#
                    ),
                ]
            }))
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
}
