//! Sources: the outside world as streams of typed changes. Each yields its errors as items
//! and resyncs in full after every reconnect; retry pacing is applied by the pipeline.

pub mod consul_health;
pub mod consul_kv;
pub mod docker;
pub mod redis_sessions;

use tokio::time::Instant;

pub use consul_health::{HealthList, Instance};
pub use consul_kv::StateList;
pub use redis_sessions::{Reading, SessionsUpdate};

/// Which source a change or error came from (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    Health,
    States,
    Sessions,
    Containers,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Health => "consul-health",
            SourceKind::States => "consul-kv",
            SourceKind::Sessions => "redis-sessions",
            SourceKind::Containers => "docker",
        }
    }
}

/// One change to fold into the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The full list of registered instances (every Consul answer is a full list).
    Health(HealthList),
    /// The full list of per-server states.
    States(StateList),
    Sessions(SessionsUpdate),
    /// Every container this pipeline owns.
    Containers(Vec<crate::fleet::topology::OwnedContainer>),
    /// The source lost its connection: the snapshot is stale until it resyncs.
    Down(SourceKind),
}

impl Change {
    pub fn kind(&self) -> SourceKind {
        match self {
            Change::Health(_) => SourceKind::Health,
            Change::States(_) => SourceKind::States,
            Change::Sessions(_) => SourceKind::Sessions,
            Change::Containers(_) => SourceKind::Containers,
            Change::Down(k) => *k,
        }
    }
}

/// A change and when it was first seen, so the time from change to action can be measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub at: Instant,
    pub change: Change,
}
