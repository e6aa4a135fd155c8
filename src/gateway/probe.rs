//! The active health probe loop: every server the snapshot knows, checked at
//! `health_interval`, fed to its rise/fall state.

use std::time::Duration;

use metrics::gauge;
use tokio_util::sync::CancellationToken;

use crate::telemetry::GW_BACKEND_UP as BACKEND_UP;

use super::Gateway;

impl Gateway {
    /// Active health checks of every server the snapshot knows, until `stop`.
    pub(super) async fn check_health(self, stop: CancellationToken) {
        let client = crate::contract::tls::plain_http_builder()
            .timeout(self.0.cfg.health_interval.max(Duration::from_millis(500)))
            .build()
            .expect("a plain HTTP client builds");
        loop {
            let t = self.0.topology.borrow().clone();
            let checks = t.servers.iter().map(|s| {
                let url = format!("http://{}{}", self.host_of(s), self.0.cfg.health_path);
                let id = s.id.clone();
                let client = client.clone();
                async move {
                    (
                        id,
                        matches!(client.get(url).send().await, Ok(r) if r.status().is_success()),
                    )
                }
            });
            let results = futures::future::join_all(checks).await;
            {
                let mut backends = self.0.backends.lock().expect("not poisoned");
                for (id, passed) in results {
                    let b = backends.entry(id.clone()).or_default();
                    if let Some(up) = b.active.record(passed, self.0.cfg.rise, self.0.cfg.fall) {
                        tracing::info!(backend = %id, up, "health check state changed");
                    }
                    gauge!(BACKEND_UP, "backend" => id.to_string()).set(if b.active.up() {
                        1.0
                    } else {
                        0.0
                    });
                }
                // A server that left the fleet is not up: say so, not its last check.
                backends.retain(|id, _| {
                    let stays = t.get(id).is_some();
                    if !stays {
                        gauge!(BACKEND_UP, "backend" => id.to_string()).set(0.0);
                    }
                    stays
                });
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.0.cfg.health_interval) => {}
            }
        }
    }
}
