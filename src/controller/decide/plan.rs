//! What a decision round produces: actions with their structured reasons, and typed
//! accounts of what was halted or withheld. All of it is rendered to one line only when
//! shown, so a round over a large fleet does not pay for formatting thousands of strings.

use std::fmt;

use crate::fleet::topology::ServerId;

/// Why an action was planned: structured, and rendered as one line only when shown, so a
/// round over a large fleet does not pay for formatting thousands of strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    Overutilized {
        u: f64,
        fleet_u: f64,
        tolerance: f64,
        threshold: u64,
        offload: u64,
        /// The pull rule applied (some server is more than `tolerance` below U, so every
        /// server above U gives), not `u > U + tolerance`.
        pull: bool,
        /// Sessions shed recently and still reconnecting, counted in U.
        in_transit: u64,
    },
    Draining {
        sessions: u64,
        drain_rate: u64,
    },
    ScaleOut {
        u: f64,
        scale_out_at: f64,
        active: u32,
        min_servers: u32,
        needed: u32,
        have: u32,
    },
    ScaleIn {
        u: f64,
        scale_in_at: f64,
        low_for_s: u64,
        sessions: u64,
    },
    Empty {
        zero_for_s: u64,
    },
    /// A container of ours whose server never passed, or that stopped.
    Provision {
        what: &'static str,
        for_s: u64,
    },
    /// Free text, for tests and operator-made actions.
    Text(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Overutilized { u, fleet_u, tolerance, threshold, offload, pull, in_transit } => {
                if *pull {
                    write!(f, "u={u:.2} > U={fleet_u:.2} and a server is more than {tolerance:.2} below U")?;
                } else {
                    write!(f, "u={u:.2} > U={fleet_u:.2}+{tolerance:.2}")?;
                }
                write!(f, "; threshold {threshold}, offload {offload}")?;
                if *in_transit > 0 {
                    write!(f, "; U counts {in_transit} session(s) in transit")?;
                }
                Ok(())
            }
            Reason::Draining { sessions, drain_rate } => {
                write!(f, "cordoned with {sessions} sessions; draining at drain_rate {drain_rate}")
            }
            Reason::ScaleOut { u, scale_out_at, active, min_servers, needed, have } => {
                if active < min_servers {
                    write!(f, "{active} active below min_servers {min_servers}")?;
                } else {
                    write!(f, "U={u:.2} > scale_out_at {scale_out_at:.2}")?;
                }
                write!(f, "; {needed} servers needed, {have} active or pending")
            }
            Reason::ScaleIn { u, scale_in_at, low_for_s, sessions } => write!(
                f,
                "U={u:.2} < scale_in_at {scale_in_at:.2} for {low_for_s}s; fewest sessions ({sessions})"
            ),
            Reason::Empty { zero_for_s } => write!(f, "cordoned with zero sessions for {zero_for_s}s"),
            Reason::Provision { what, for_s } => write!(f, "{what} ({for_s}s)"),
            Reason::Text(t) => f.write_str(t),
        }
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Reason {
        Reason::Text(s.to_string())
    }
}

/// One thing to do to the outside world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// Tell an over-utilized server to close `count` sessions.
    Shed { server: ServerId, count: u64 },
    /// Tell a cordoned server to close `count` sessions.
    Drain { server: ServerId, count: u64 },
    /// Mark a server cordoned in Consul KV: it takes no new sessions.
    Cordon { server: ServerId },
    /// Mark a cordoned server active again.
    Reactivate { server: ServerId },
    /// Ask the scaler for `count` new servers.
    Start { count: u32 },
    /// Ask the scaler to stop a cordoned, empty server.
    Reap { server: ServerId },
    /// Ask the scaler to remove a container of ours that never became healthy, or stopped.
    Discard { server: ServerId },
}

impl ActionKind {
    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ActionKind::Shed { .. } => "shed",
            ActionKind::Drain { .. } => "drain",
            ActionKind::Cordon { .. } => "cordon",
            ActionKind::Reactivate { .. } => "reactivate",
            ActionKind::Start { .. } => "start",
            ActionKind::Reap { .. } => "reap",
            ActionKind::Discard { .. } => "discard",
        }
    }

    /// Disconnects users or removes capacity: never done from stale or partial data.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            ActionKind::Shed { .. }
                | ActionKind::Drain { .. }
                | ActionKind::Cordon { .. }
                | ActionKind::Reap { .. }
                | ActionKind::Discard { .. }
        )
    }

    pub fn server(&self) -> Option<&ServerId> {
        match self {
            ActionKind::Shed { server, .. }
            | ActionKind::Drain { server, .. }
            | ActionKind::Cordon { server }
            | ActionKind::Reactivate { server }
            | ActionKind::Reap { server }
            | ActionKind::Discard { server } => Some(server),
            ActionKind::Start { .. } => None,
        }
    }
}

/// An action with the one-line reason that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub kind: ActionKind,
    pub reason: Reason,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ActionKind::Shed { server, count } => write!(f, "shed {count} from {server}")?,
            ActionKind::Drain { server, count } => write!(f, "drain {count} from {server}")?,
            ActionKind::Cordon { server } => write!(f, "cordon {server}")?,
            ActionKind::Reactivate { server } => write!(f, "reactivate {server}")?,
            ActionKind::Start { count } => write!(f, "start {count} server(s)")?,
            ActionKind::Reap { server } => write!(f, "reap {server}")?,
            ActionKind::Discard { server } => write!(f, "discard {server}")?,
        }
        write!(f, ": {}", self.reason)
    }
}

/// What one decision round wants done, and why the rest was not.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Everything halted, and why.
    pub halted: Option<Halt>,
    /// Things that would have been done but were withheld, each with its reason.
    pub withheld: Vec<Withheld>,
    /// Servers needed that nobody can start (no scaler configured).
    pub shortfall: u32,
    /// Cordoned, empty servers past `reap_after` that nobody can stop (no scaler configured).
    pub unreaped: u32,
    /// The fleet's overall utilization `U` this plan was made at.
    pub utilization: f64,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn shed_total(&self) -> u64 {
        self.actions
            .iter()
            .map(|a| match a.kind {
                ActionKind::Shed { count, .. } | ActionKind::Drain { count, .. } => count,
                _ => 0,
            })
            .sum()
    }

    pub(super) fn has(&self, f: impl Fn(&ActionKind) -> bool) -> bool {
        self.actions.iter().any(|a| f(&a.kind))
    }
}

/// Why every action of a round halted.
#[derive(Debug, Clone, PartialEq)]
pub enum Halt {
    /// Too much of the fleet fails its health checks to act on anything.
    Unhealthy {
        failing: u32,
        registered: u32,
        halt_unhealthy_fraction: f64,
    },
}

impl fmt::Display for Halt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Halt::Unhealthy {
                failing,
                registered,
                halt_unhealthy_fraction,
            } => write!(
                f,
                "{failing} of {registered} registered servers fail health checks (more than {:.0}%): all actions halted",
                halt_unhealthy_fraction * 100.0
            ),
        }
    }
}

/// Why nothing destructive (shed, drain, cordon, reap, discard) may be done from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Some sources are not synced.
    Stale { missing: Vec<&'static str> },
    /// Passing servers whose session count or state is unknown.
    Unknown { servers: u32 },
    /// With container scaling, the container list is not current.
    ContainersNotSynced,
    /// Consul lists no server while containers of ours run: a filtered or restored catalog,
    /// not a fleet that vanished.
    EmptyHealth { containers: u32 },
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gate::Stale { missing } => write!(
                f,
                "snapshot is stale ({} not synced); nothing destructive",
                missing.join(", ")
            ),
            Gate::Unknown { servers } => write!(
                f,
                "{servers} passing server(s) have an unknown session count or state; nothing destructive"
            ),
            Gate::ContainersNotSynced => f.write_str("the container list is not synced"),
            Gate::EmptyHealth { containers } => write!(
                f,
                "Consul lists no server while {containers} container(s) of ours run; nothing destructive"
            ),
        }
    }
}

/// Something a round would have done, and why it did not.
#[derive(Debug, Clone, PartialEq)]
pub enum Withheld {
    ScaleOutCooldown {
        missing: u32,
    },
    ScaleOutBackingOff {
        missing: u32,
    },
    ScaleOutMaxServers {
        want: u32,
        max_servers: u32,
    },
    /// Servers are needed and a scaler could start them, but `gate` forbids it now.
    ScaleOutGated {
        start: u32,
        gate: Gate,
    },
    ScaleOutNoScaler {
        start: u32,
        reason: Reason,
    },
    /// Servers an operator cordoned stay cordoned, however hot the fleet runs.
    OperatorCordons {
        servers: u32,
    },
    ScaleInGated(Gate),
    ScaleInCooldown,
    ReapGated {
        server: ServerId,
        gate: Gate,
    },
    ReapNoScaler {
        servers: u32,
    },
    DiscardGated {
        server: ServerId,
        gate: Gate,
    },
    /// Discards are capped per round and spaced by the cooldown.
    DiscardPaced {
        server: ServerId,
    },
    RebalanceScalingOut,
    RebalanceCordonsPending,
    RebalanceGated(Gate),
    /// A complete snapshot has not been held for `rebalance.settle` yet.
    Settling {
        settle_ms: u64,
    },
    ShedRecently {
        servers: usize,
    },
    /// Their last command went unacked and their count has not moved since.
    Unacked {
        servers: usize,
    },
    NoBudget {
        servers: usize,
        per_minute: u64,
    },
    NoRoom {
        servers: usize,
    },
}

impl fmt::Display for Withheld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Withheld::ScaleOutCooldown { missing } => write!(
                f,
                "scale-out of {missing}: within cooldown of the last scale-out"
            ),
            Withheld::ScaleOutBackingOff { missing } => write!(
                f,
                "scale-out of {missing}: backing off after failed provisions"
            ),
            Withheld::ScaleOutMaxServers { want, max_servers } => write!(
                f,
                "scale-out: {want} more needed but max_servers {max_servers} reached"
            ),
            Withheld::ScaleOutGated { start, gate } => write!(
                f,
                "scale-out: {start} more server(s) needed, but {gate}"
            ),
            Withheld::ScaleOutNoScaler { start, reason } => write!(
                f,
                "scale-out: {start} more server(s) needed ({reason}) but no scaler is configured"
            ),
            Withheld::OperatorCordons { servers } => write!(
                f,
                "scale-out: {servers} server(s) cordoned by an operator are left cordoned"
            ),
            Withheld::ScaleInGated(gate) => write!(f, "scale-in: {gate}"),
            Withheld::ScaleInCooldown => {
                f.write_str("scale-in: within cooldown of the last scale action")
            }
            Withheld::ReapGated { server, gate } => write!(f, "reap {server}: {gate}"),
            Withheld::ReapNoScaler { servers } => write!(
                f,
                "reap: {servers} cordoned, empty server(s) past reap_after, but no scaler is configured to stop them"
            ),
            Withheld::DiscardGated { server, gate } => write!(f, "discard {server}: {gate}"),
            Withheld::DiscardPaced { server } => write!(
                f,
                "discard {server}: one per round's budget and cooldown, later"
            ),
            Withheld::RebalanceScalingOut => f.write_str(
                "rebalance: scale-out pending, new capacity fills through new connections first",
            ),
            Withheld::RebalanceCordonsPending => {
                f.write_str("rebalance: waiting for this round's cordons to show in the snapshot")
            }
            Withheld::RebalanceGated(gate) => write!(f, "rebalance: {gate}"),
            Withheld::Settling { settle_ms } => write!(
                f,
                "rebalance: settling, no shed before a complete snapshot is {settle_ms} ms old"
            ),
            Withheld::ShedRecently { servers } => write!(
                f,
                "shed: {servers} server(s) already shed within round_interval"
            ),
            Withheld::Unacked { servers } => write!(
                f,
                "shed/drain: {servers} server(s) held back, their last command went unacked and their count has not moved"
            ),
            Withheld::NoBudget { servers, per_minute } => write!(
                f,
                "shed/drain: {servers} server(s) held back, the disruption budget ({per_minute} per minute) is spent"
            ),
            Withheld::NoRoom { servers } => write!(
                f,
                "shed/drain: {servers} server(s) held back, the under-utilized servers cannot absorb more"
            ),
        }
    }
}
