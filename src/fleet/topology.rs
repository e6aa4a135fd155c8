//! The immutable, versioned snapshot of a fleet that every decision is made from.

use std::sync::Arc;

use tokio::time::Instant;

pub use crate::contract::states::{Admin, ServerId};

/// A live session count as the snapshot knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Known(u64),
    /// Absent, expired, or not a non-negative integer: never read as zero.
    Unknown,
}

impl Count {
    pub fn known(self) -> Option<u64> {
        match self {
            Count::Known(n) => Some(n),
            Count::Unknown => None,
        }
    }
}

/// State of a container this pipeline owns, as far as decisions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, starting or restarting.
    Starting,
    Running,
    /// Exited or dead.
    Stopped,
}

/// A container labelled as this pipeline's, and the server it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedContainer {
    pub server: ServerId,
    pub state: ContainerState,
    /// Creation time, seconds since the Unix epoch.
    pub created_s: i64,
}

/// One registered server.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub id: ServerId,
    pub address: Arc<str>,
    pub port: u16,
    /// `Meta.max_sessions`.
    pub capacity: u32,
    /// `Meta.weight` (1.0 when absent); used by the gateway's routing.
    pub weight: f32,
    /// Every Consul check of the instance is passing.
    pub passing: bool,
    pub admin: Admin,
    pub sessions: Count,
    /// Runs in a container of ours that has not passed yet: pending, not failing.
    pub provisioning: bool,
    /// Registered, and a check has never run yet: neither passing nor failing.
    pub starting: bool,
}

impl Server {
    /// Counts toward the fleet: passing, with a known count and a readable state.
    pub fn is_live(&self) -> bool {
        self.passing && self.sessions.known().is_some() && self.admin != Admin::Unknown
    }

    pub fn is_cordoned(&self) -> bool {
        matches!(self.admin, Admin::Cordoned { .. })
    }

    /// Cordoned by an operator: the controller never reactivates or reaps it.
    pub fn is_held_by_operator(&self) -> bool {
        matches!(
            self.admin,
            Admin::Cordoned {
                by_operator: true,
                ..
            }
        )
    }

    /// Sessions over capacity; `None` while the count is unknown.
    pub fn utilization(&self) -> Option<f64> {
        let s = self.sessions.known()?;
        Some(s as f64 / f64::from(self.capacity.max(1)))
    }
}

/// Which inputs the snapshot is built from; each is `true` while connected and synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourcesSynced {
    pub health: bool,
    pub states: bool,
    pub sessions: bool,
}

impl SourcesSynced {
    pub fn all(&self) -> bool {
        self.health && self.states && self.sessions
    }

    /// Names of the sources that are not synced, for reasons and logs.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.health {
            v.push("consul-health");
        }
        if !self.states {
            v.push("consul-kv");
        }
        if !self.sessions {
            v.push("redis-sessions");
        }
        v
    }
}

/// A snapshot of the fleet. It knows what it does not know: unknown counts, unreadable
/// states, and sources that are disconnected (then it is *stale*).
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Increases by one each time the content changes.
    pub version: u64,
    /// Registered servers, sorted by id.
    pub servers: Vec<Server>,
    /// Session counts with no registration behind them (ignored).
    pub ghosts: u32,
    /// Instances excluded for missing or invalid meta.
    pub invalid_instances: u32,
    /// Servers being provisioned by a scaler: capacity that is coming.
    pub pending: u32,
    /// Containers this pipeline owns, sorted by server id (with container scaling).
    pub containers: Vec<OwnedContainer>,
    /// The container list is current (the Docker source is connected).
    pub containers_synced: bool,
    pub sources: SourcesSynced,
    /// When the oldest change folded into this version was first seen.
    pub changed_at: Option<Instant>,
}

/// Fleet-wide sums over a snapshot, computed once per decision.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    /// Σ sessions of live servers (active and cordoned).
    pub sessions: u64,
    /// Σ capacity of live, active servers.
    pub capacity: u64,
    pub active: u32,
    pub cordoned: u32,
    pub failing: u32,
    pub registered: u32,
    /// Passing servers whose count or state is unknown.
    pub unknown: u32,
    /// Sessions recently shed and still reconnecting, included in `sessions` (set by the
    /// decisions, which know what was shed; zero in a snapshot's own totals).
    pub in_transit: u64,
}

impl Totals {
    /// Overall utilization `U`; infinite when sessions exist but no active capacity does.
    pub fn utilization(&self) -> f64 {
        if self.capacity == 0 {
            if self.sessions == 0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            self.sessions as f64 / self.capacity as f64
        }
    }
}

impl Topology {
    pub fn is_stale(&self) -> bool {
        !self.sources.all()
    }

    pub fn get(&self, id: &str) -> Option<&Server> {
        self.servers
            .binary_search_by(|s| s.id.as_ref().cmp(id))
            .ok()
            .map(|i| &self.servers[i])
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in &self.servers {
            if s.provisioning && !s.passing {
                continue; // counted in `pending`, not as failing
            }
            if s.starting {
                continue; // its checks have not run yet: not failing, not live
            }
            t.registered += 1;
            if !s.passing {
                t.failing += 1;
                continue;
            }
            if !s.is_live() {
                t.unknown += 1;
                continue;
            }
            // Saturating: no count, however large, wraps a sum into a small one.
            let n = s.sessions.known().unwrap_or(0);
            t.sessions = t.sessions.saturating_add(n);
            if s.is_cordoned() {
                t.cordoned += 1;
            } else {
                t.active += 1;
                t.capacity = t.capacity.saturating_add(u64::from(s.capacity));
            }
        }
        t
    }

    /// The owned container of `server`, if any.
    pub fn container(&self, server: &str) -> Option<&OwnedContainer> {
        self.containers
            .binary_search_by(|c| c.server.as_ref().cmp(server))
            .ok()
            .map(|i| &self.containers[i])
    }

    /// Same fleet, ignoring the version and timing fields.
    pub fn same_content(&self, other: &Topology) -> bool {
        self.servers == other.servers
            && self.ghosts == other.ghosts
            && self.invalid_instances == other.invalid_instances
            && self.pending == other.pending
            && self.containers == other.containers
            && self.containers_synced == other.containers_synced
            && self.sources == other.sources
    }
}

/// Small builders of snapshots, for tests of the pure stages (here and in `tests/`).
#[doc(hidden)]
pub mod fixtures {
    use super::{Admin, Count, Server, SourcesSynced, Topology};

    pub fn server(id: &str, capacity: u32, sessions: u64) -> Server {
        Server {
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 0,
            capacity,
            weight: 1.0,
            passing: true,
            admin: Admin::Active,
            sessions: Count::Known(sessions),
            provisioning: false,
            starting: false,
        }
    }

    pub fn fleet(servers: Vec<Server>) -> Topology {
        let mut servers = servers;
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        Topology {
            version: 1,
            servers,
            sources: SourcesSynced {
                health: true,
                states: true,
                sessions: true,
            },
            ..Topology::default()
        }
    }
}
