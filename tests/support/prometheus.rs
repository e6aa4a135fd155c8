//! Metrics in tests: one in-process recorder, reading samples from Prometheus text, and a
//! `prometheus` server of our own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::http::{get, http, http_builder};
use super::procs::{free_port, log_file, temp_dir, tool, until_ready, Proc, INSTALL_HINT};
use super::wait::{eventually, WAIT};

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
            async move { get(url).await.ok()?.status().is_success().then_some(()) }
        })
        .await;
        p
    }

    /// Runs an instant query; `Err` carries Prometheus' error for an invalid one.
    pub async fn query(&self, expr: &str) -> Result<serde_json::Value, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let body: serde_json::Value = http()
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
