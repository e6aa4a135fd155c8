//! rebalancer: keeps fleets of long-lived-connection servers balanced and right-sized.
#![forbid(unsafe_code)]

pub mod config;
pub mod decide;
pub mod protocol;
pub mod topology;
pub mod stages;
pub mod consul;
pub mod source;
pub mod fold;
pub mod telemetry;
