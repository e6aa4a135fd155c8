//! The fleet's named events: what its sources and its fold saw, each logged and counted in
//! one place. `Events` is one pipeline's; the controller adds its own (decisions, actions,
//! leadership) in `controller/events.rs`.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::fleet::source::SourceKind;
use crate::fleet::topology::Topology;
use crate::telemetry::{
    CAPACITY, CONTAINERS, GHOSTS, INVALID_COUNTS, INVALID_META, INVALID_STATES, NOTIFICATIONS,
    PROVISION, SERVERS, SESSIONS, SNAPSHOT_STALE, SNAPSHOT_VERSION, SOURCE_ERRORS, SOURCE_EVENTS,
    SOURCE_LAG, SOURCE_RESYNCS, SOURCE_UP, UTILIZATION,
};

/// The named events of one pipeline.
#[derive(Clone, Debug)]
pub struct Events {
    pub(crate) pipeline: Arc<str>,
}

impl Events {
    pub fn new(pipeline: &str) -> Events {
        Events {
            pipeline: pipeline.into(),
        }
    }

    pub(crate) fn p(&self) -> String {
        self.pipeline.to_string()
    }

    pub fn source_change(&self, kind: SourceKind, resync_after_error: bool) {
        counter!(SOURCE_EVENTS, "pipeline" => self.p(), "source" => kind.as_str()).increment(1);
        gauge!(SOURCE_UP, "pipeline" => self.p(), "source" => kind.as_str()).set(1.0);
        if resync_after_error {
            counter!(SOURCE_RESYNCS, "pipeline" => self.p(), "source" => kind.as_str())
                .increment(1);
            tracing::info!(pipeline = %self.pipeline, source = kind.as_str(), "source reconnected and resynced");
        }
    }

    pub fn source_error(&self, kind: SourceKind, error: &dyn std::error::Error) {
        counter!(SOURCE_ERRORS, "pipeline" => self.p(), "source" => kind.as_str()).increment(1);
        gauge!(SOURCE_UP, "pipeline" => self.p(), "source" => kind.as_str()).set(0.0);
        tracing::warn!(pipeline = %self.pipeline, source = kind.as_str(), error = %error, "source failed; retrying with backoff");
    }

    /// Keyspace notifications coalesced into one read of the counts.
    pub fn notifications(&self, n: u64) {
        counter!(NOTIFICATIONS, "pipeline" => self.p()).increment(n);
    }

    /// From a source's oldest change in a batch to the fold of that batch.
    pub fn source_lag(&self, kind: SourceKind, lag: Duration) {
        gauge!(SOURCE_LAG, "pipeline" => self.p(), "source" => kind.as_str())
            .set(lag.as_secs_f64());
    }

    pub fn invalid_meta(&self, server: &str, why: &str) {
        counter!(INVALID_META, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, why, "instance excluded: invalid Consul meta");
    }

    pub fn invalid_state(&self, server: &str, why: &str) {
        counter!(INVALID_STATES, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, why, "unreadable state record; server treated as unknown");
    }

    pub fn invalid_count(&self, server: &str, raw: &str) {
        counter!(INVALID_COUNTS, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, value = raw, "session count is not a non-negative integer; treated as unknown");
    }

    /// A well-formed count too large to believe of its server.
    pub fn absurd_count(&self, server: &str, why: &str) {
        counter!(INVALID_COUNTS, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, why, "session count is not believable; treated as unknown");
    }

    pub fn snapshot(&self, t: &Topology) {
        let p = self.p();
        let totals = t.totals();
        gauge!(SNAPSHOT_VERSION, "pipeline" => p.clone()).set(t.version as f64);
        gauge!(SNAPSHOT_STALE, "pipeline" => p.clone()).set(if t.is_stale() { 1.0 } else { 0.0 });
        for (state, n) in [
            ("active", totals.active),
            ("cordoned", totals.cordoned),
            ("failing", totals.failing),
            ("unknown", totals.unknown),
            ("invalid", t.invalid_instances),
        ] {
            gauge!(SERVERS, "pipeline" => p.clone(), "state" => state).set(f64::from(n));
        }
        gauge!(GHOSTS, "pipeline" => p.clone()).set(f64::from(t.ghosts));
        gauge!(SESSIONS, "pipeline" => p.clone()).set(totals.sessions as f64);
        gauge!(CAPACITY, "pipeline" => p.clone()).set(totals.capacity as f64);
        let u = totals.utilization();
        gauge!(UTILIZATION, "pipeline" => p).set(if u.is_finite() { u } else { -1.0 });
        tracing::debug!(pipeline = %self.pipeline, version = t.version, servers = t.servers.len(),
            sessions = totals.sessions, capacity = totals.capacity, stale = t.is_stale(), "snapshot");
    }

    pub fn containers(&self, t: &Topology) {
        let running = t
            .containers
            .iter()
            .filter(|c| {
                c.state == crate::fleet::topology::ContainerState::Running
                    && t.get(&c.server).is_some_and(|s| s.passing)
            })
            .count();
        let stopped = t
            .containers
            .iter()
            .filter(|c| c.state == crate::fleet::topology::ContainerState::Stopped)
            .count();
        gauge!(CONTAINERS, "pipeline" => self.p(), "state" => "pending").set(f64::from(t.pending));
        gauge!(CONTAINERS, "pipeline" => self.p(), "state" => "running").set(running as f64);
        gauge!(CONTAINERS, "pipeline" => self.p(), "state" => "stopped").set(stopped as f64);
    }

    pub fn provisioned(&self, server: &str, took: Duration) {
        histogram!(PROVISION, "pipeline" => self.p()).record(took.as_secs_f64());
        tracing::info!(pipeline = %self.pipeline, server, seconds = took.as_secs(), "container's server passing");
    }
}
