//! rebalancer: keeps fleets of long-lived-connection servers balanced and right-sized.
//!
//! The crate is laid out in wings (see `docs/architecture.md`): `contract` is what every part
//! speaks; `stages` the stream plumbing; `fleet` the topology view that the controller and
//! the gateway both read; `controller`, `gateway`, `agent`, `simulate` and `demo` the roles.
//! The agent, with the contract and the stages it needs, is the `rebalancer-agent` crate
//! (a connection server embeds it without the rest), re-exported under the same names.

pub use rebalancer_agent as agent;
pub mod cli;
pub mod config;
pub mod contract;
pub mod controller;
pub mod demo;
pub mod fleet;
pub mod gateway;
pub mod simulate;
pub use rebalancer_agent::stages;
pub mod telemetry;
