//! The balancer: picking a server for each new connection or request from the routing
//! table (`table.rs`), recording outcomes in the server's breaker, keeping the table, and
//! the retry budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::counter;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::topology::Topology;
use crate::telemetry::GW_RETRIES as RETRIES;

use super::route::Kind;
use super::table::{Backend, PickRules, Table};
use super::Gateway;

/// One plain request in flight at a server, counted until dropped (whatever way the request
/// ends: answered, failed, or its client gone).
pub(super) struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A routable server as of one request.
pub(super) struct Target {
    pub(super) id: Arc<str>,
    pub(super) host: Arc<str>,
    pub(super) backend: Arc<Backend>,
    pub(super) _inflight: Option<InFlight>,
}

impl Gateway {
    /// Picks a server for a new connection or request, other than those in `tried`, and
    /// reserves a slot on it; with shared accounting, `inflight` requests stand for session
    /// counts. Reads the routing table without a lock; draws two servers, whatever the
    /// fleet's size.
    pub(super) fn pick_with(
        &self,
        tried: &[Arc<str>],
        kind: Kind,
        inflight: Option<&HashMap<String, f64>>,
    ) -> Option<Target> {
        let cfg = &self.0.cfg;
        let rules = PickRules {
            reservation_ttl: cfg.reservation_ttl,
            slow_start: cfg.slow_start,
            breaker_open: cfg.breaker_open,
        };
        let table = self.0.table.load();
        let slot = table.pick(
            tried,
            kind,
            inflight,
            rules,
            Instant::now(),
            &mut rand::rng(),
        )?;
        let b = &slot.backend;
        let inflight = (kind == Kind::Request).then(|| {
            b.inflight.fetch_add(1, Ordering::Relaxed);
            InFlight(b.inflight.clone())
        });
        Some(Target {
            id: b.id.clone(),
            host: slot.host.clone(),
            backend: b.clone(),
            _inflight: inflight,
        })
    }

    /// Records a request's outcome in its server's breaker.
    pub(super) fn outcome(&self, target: &Target, ok: bool) {
        let cfg = &self.0.cfg;
        target
            .backend
            .outcome(ok, Instant::now(), cfg.breaker_failures, cfg.breaker_open);
    }

    /// Rebuilds the routing table whenever the fleet changes, until `stop`: the one writer
    /// of the table and of the servers' state registry.
    pub(super) async fn keep_table(self, stop: CancellationToken) {
        let mut topology = self.0.topology.clone();
        loop {
            self.rebuild_table(&topology.borrow_and_update().clone());
            tokio::select! {
                () = stop.cancelled() => return,
                changed = topology.changed() => if changed.is_err() { return },
            }
        }
    }

    pub(super) fn rebuild_table(&self, t: &Topology) {
        let mut registry = self.0.registry.lock().expect("not poisoned");
        // Servers that left go with their series (rendered from the table at each scrape).
        let (table, _left) = Table::build(t, &mut registry, self.0.cfg.target_port, Instant::now());
        drop(registry);
        self.0.table.store(Arc::new(table));
    }

    /// Spends one retry from the budget (a share of requests, plus 10 spare); `false` when
    /// it is spent.
    pub(super) fn spend_retry(&self) -> bool {
        let req = self.0.requests.load(Ordering::Relaxed) as f64;
        let ret = self.0.retries.load(Ordering::Relaxed) as f64;
        if ret < req * self.0.cfg.retry_budget + 10.0 {
            self.0.retries.fetch_add(1, Ordering::Relaxed);
            counter!(RETRIES).increment(1);
            true
        } else {
            false
        }
    }
}
