//! Consul KV prefix `rebalancer/<svc>/servers/`: the administrative state of each server,
//! streamed each time it changes (the records are read by [`crate::contract::states`]).

use std::time::Duration;

use futures::Stream;

use crate::contract::consul::{Consul, ConsulError};
use crate::contract::consul_watch::{consul_fetch, watch, Restarts};
use crate::contract::protocol::state_prefix;
pub use crate::contract::states::{parse, read_state, StateList};

/// Streams the state records of `service` each time they change.
pub fn stream(
    consul: Consul,
    service: &str,
    wait: Duration,
    restarts: Restarts,
) -> impl Stream<Item = Result<StateList, ConsulError>> {
    let path = format!("/v1/kv/{}?recurse=true", state_prefix(service));
    let p2 = path.clone();
    let svc = service.to_string();
    watch(consul_fetch(consul, path, wait, restarts), move |f| {
        parse(&svc, &p2, f)
    })
}
