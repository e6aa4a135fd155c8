//! The contract every part speaks (protocol v1) and the clients of the shared services. All
//! of it but the containers' ownership labels lives in the agent's crate (a server embeds
//! it), re-exported here under the same names.

pub use rebalancer_agent::contract::{
    consul, consul_watch, protocol, secret, signing, states, tls, urls,
};

pub mod labels;
