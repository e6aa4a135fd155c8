//! The contract every part speaks (protocol v1) and the clients of the shared services:
//! names and shapes of keys, channels and records, signing, the Consul client and its
//! blocking watch, state records, TLS and credentials for Consul and Redis, and URL helpers.
//! Nothing here imports the agent.

pub mod consul;
pub mod consul_watch;
pub mod protocol;
pub mod secret;
pub mod signing;
pub mod states;
pub mod tls;
pub mod urls;
