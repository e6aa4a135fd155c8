//! The active health probe loop: every server of the routing table, checked at
//! `health_interval`, fed to its rise/fall state.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Gateway;

/// Health checks in flight at once: a fleet of thousands is checked in waves, not with
/// thousands of requests (and sockets) at the same moment.
const PROBES_AT_ONCE: usize = 64;

impl Gateway {
    /// Active health checks of every server the snapshot knows, until `stop`.
    pub(super) async fn check_health(self, stop: CancellationToken) {
        let client = crate::contract::tls::plain_http_builder()
            .timeout(self.0.cfg.health_interval.max(Duration::from_millis(500)))
            .build()
            .expect("a plain HTTP client builds");
        loop {
            let table = self.0.table.load_full();
            let urls: Vec<String> = table
                .all
                .iter()
                .map(|slot| format!("http://{}{}", slot.host, self.0.cfg.health_path))
                .collect();
            let results: Vec<bool> = futures::stream::iter(urls)
                .map(|url| {
                    let client = client.clone();
                    async move {
                        matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
                    }
                })
                .buffered(PROBES_AT_ONCE)
                .collect()
                .await;
            for (slot, passed) in table.all.iter().zip(results) {
                let b = &slot.backend;
                if let Some(up) = b.checked(passed, self.0.cfg.rise, self.0.cfg.fall) {
                    tracing::info!(backend = %b.id, up, "health check state changed");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.0.cfg.health_interval) => {}
            }
        }
    }
}
