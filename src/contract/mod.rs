//! The contract every part speaks (protocol v1) and the clients of the shared services:
//! names and shapes of keys, channels and records, the Consul client and its blocking
//! watch, state records, the containers' ownership labels, TLS and credentials for Consul
//! and Redis, and URL helpers. Nothing here imports a wing.

pub mod consul;
pub mod consul_watch;
pub mod labels;
pub mod protocol;
pub mod secret;
pub mod signing;
pub mod states;
pub mod tls;
pub mod urls;
