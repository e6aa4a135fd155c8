//! The scaler: what starts and stops servers. The Docker implementation is its own module;
//! without one, a pipeline reports the servers it is short of instead.

use futures::future::BoxFuture;

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("cannot start {count} server(s): {message}")]
    Start { count: u32, message: String },
    #[error("cannot stop server {server}: {message}")]
    Reap { server: String, message: String },
}

pub trait Scaler: Send + Sync {
    /// The ids of `count` new servers, chosen once per action so that every attempt at it
    /// starts the same servers: a retried start adopts what an earlier attempt created.
    fn new_ids(&self, count: u32) -> Vec<String>;
    /// Starts the servers `ids` (those not already there); they count as pending until they
    /// register and pass.
    fn start<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), ScaleError>>;
    /// Stops the cordoned, empty server `server` (only one this scaler owns).
    fn reap<'a>(&'a self, server: &'a str) -> BoxFuture<'a, Result<(), ScaleError>>;
    /// Removes the container of a server that never became healthy, or that stopped.
    fn discard<'a>(&'a self, server: &'a str) -> BoxFuture<'a, Result<(), ScaleError>>;
    /// How long a stop may take before the server is killed: a reap waits this out.
    fn stop_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}
