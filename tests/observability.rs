//! What a person watching sees: a real Prometheus scrapes the controller, every query of the
//! Grafana dashboard is valid and names a metric the controller exports, and the README
//! documents every metric.

mod support;

use std::collections::BTreeSet;

use rebalancer::telemetry::METRICS;
use support::*;

fn repo(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Every `PromQL` expression of the dashboards, with the `$pipeline` variable bound.
fn dashboard_queries() -> Vec<String> {
    let dir = format!("{}/grafana/dashboards", env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboards are JSON");
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                out.push(target["expr"].as_str().unwrap().replace("$pipeline", ".*"));
            }
        }
    }
    assert!(out.len() > 10, "the dashboard has panels");
    out
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("rebalancer_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn exported(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|b| b.ends_with("_seconds"))
        .unwrap_or(name);
    METRICS.iter().any(|(n, _, _, _)| *n == base)
}

#[test]
fn every_dashboard_query_names_only_metrics_the_controller_exports() {
    for q in dashboard_queries() {
        for name in metric_names(&q) {
            assert!(
                exported(&name),
                "dashboard uses {name}, which the controller does not export: {q}"
            );
        }
    }
}

#[test]
fn the_readme_documents_every_metric() {
    let readme = repo("README.md");
    for (name, _, _, _) in METRICS {
        assert!(readme.contains(name), "README.md does not mention {name}");
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_controller_and_every_dashboard_query_runs() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    for id in ["s1", "s2", "s3"] {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, "30").await;
    }
    let port = free_port();
    let ctl = Controller::start(
        &temp_dir("obs"),
        &pipeline_toml("ws", &redis, &consul, port, "", ""),
        port,
    );
    ctl.until_synced(90.0).await;
    let prom = Prometheus::start(&[format!("127.0.0.1:{port}")]).await;

    let sessions = eventually(
        "Prometheus to have scraped the controller",
        WAIT,
        || async {
            let r = prom
                .query("rebalancer_sessions{pipeline=\"ws\"}")
                .await
                .ok()?;
            r[0]["value"][1].as_str().map(str::to_string)
        },
    )
    .await;
    assert_eq!(sessions, "90");
    let up = prom.query("up{job=\"rebalancer\"}").await.unwrap();
    assert_eq!(up[0]["value"][1], "1");

    for q in dashboard_queries() {
        if let Err(e) = prom.query(&q).await {
            panic!("dashboard query is not valid PromQL: {q}\n{e}");
        }
    }
}
