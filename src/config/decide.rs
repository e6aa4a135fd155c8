//! The decision stages' settings (`[rebalance]`, `[scale]`, `[safety]`) with their
//! defaults. They live with the configuration so that it imports no wing; the decisions
//! (`crate::controller::decide`) re-export them.

use std::time::Duration;

/// Window of the disruption budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// All knobs of the decision stages. `Default` is the documented defaults (those of an
/// empty pipeline file): the pipeline file's schema takes its defaults from here.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DecideConfig {
    pub rebalance: RebalanceConfig,
    pub scale: ScaleConfig,
    pub safety: SafetyConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    pub enabled: bool,
    /// Utilization points above the fleet's `U` before a server counts as over-utilized.
    pub tolerance: f64,
    /// Share of a server's offload shed in one round.
    pub shed_fraction: f64,
    /// Sheds smaller than this are not worth the disruption (dead band).
    pub min_shed: u64,
    pub max_shed: u64,
    /// No server is shed from (or drained) twice within this interval.
    pub round_interval: Duration,
    /// Sessions per round closed on a cordoned server.
    pub drain_rate: u64,
    /// Fraction of the fleet's live sessions that may be shed or drained in any minute.
    pub disruption_budget: f64,
    /// No shed or drain until a complete snapshot has been held this long, after start-up
    /// and after each election: a fleet still filling is not judged on its first seconds.
    pub settle: Duration,
    /// Sessions shed or drained this recently still count in Σ sessions (the agents' shed
    /// window plus the time their clients take to reconnect), so U does not dip meanwhile.
    pub in_transit: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            enabled: true,
            tolerance: 0.10,
            shed_fraction: 1.0,
            min_shed: 1,
            max_shed: 1000,
            round_interval: Duration::from_secs(15),
            drain_rate: 100,
            disruption_budget: 0.5,
            settle: Duration::from_secs(5),
            in_transit: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub enabled: bool,
    pub scale_out_at: f64,
    pub scale_in_at: f64,
    pub target_utilization: f64,
    pub min_servers: u32,
    pub max_servers: u32,
    pub scale_in_after: Duration,
    pub cooldown: Duration,
    pub reap_after: Duration,
    pub max_per_round: u32,
    /// With container scaling: a container not passing within this is discarded.
    pub provision_timeout: Option<Duration>,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            enabled: true,
            scale_out_at: 0.70,
            scale_in_at: 0.40,
            target_utilization: 0.55,
            min_servers: 1,
            max_servers: 100,
            scale_in_after: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
            reap_after: Duration::from_secs(10),
            max_per_round: 5,
            provision_timeout: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SafetyConfig {
    /// Above this fraction of registered servers failing health, every action halts...
    pub halt_unhealthy_fraction: f64,
    /// ...provided at least this many fail: one failing server of two is not an outage.
    pub halt_min_failing: u32,
    /// A session count above this many times its server's capacity is not believed: the
    /// count is unknown (and counted), as garbage is.
    pub max_count_ratio: u32,
    /// A registration whose `max_sessions` is above this is invalid (excluded and counted).
    pub max_capacity: u32,
    /// A registration whose `max_sessions` is more than this many times the fleet's median
    /// is invalid too: one server's numbers cannot drive the fleet's utilization alone.
    pub capacity_outlier_ratio: u32,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            halt_unhealthy_fraction: 0.45,
            halt_min_failing: 2,
            max_count_ratio: 10,
            max_capacity: 1_000_000,
            capacity_outlier_ratio: 100,
        }
    }
}
