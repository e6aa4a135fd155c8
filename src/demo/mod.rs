//! The demo roles: a WebSocket echo server that embeds the agent, and a load generator
//! that holds clients against a fleet. They exist to show and test the system end to end.

pub mod loadgen;
pub mod server;
