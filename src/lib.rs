//! rebalancer: keeps fleets of long-lived-connection servers balanced and right-sized.
#![forbid(unsafe_code)]

pub mod act;
pub mod agent;
pub mod cli;
pub mod config;
pub mod consul;
pub mod decide;
pub mod demo_server;
pub mod feed;
pub mod fold;
pub mod gateway;
pub mod leader;
pub mod loadgen;
pub mod pipeline;
pub mod protocol;
pub mod simulate;
pub mod source;
pub mod stages;
pub mod telemetry;
pub mod topology;
