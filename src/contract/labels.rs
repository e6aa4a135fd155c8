//! The labels that mark a container as owned by a pipeline: the Docker source lists by
//! them, the scaler sets them, and only containers carrying them are ever stopped.

/// Label naming the pipeline that owns a container.
pub const LABEL_PIPELINE: &str = "rebalancer.pipeline";
/// Label naming the server (Consul service ID) a container runs.
pub const LABEL_SERVER: &str = "rebalancer.server";
/// Label holding the port handed to the container's server.
pub const LABEL_PORT: &str = "rebalancer.port";
/// Label naming the Consul service the container's server registers as.
pub const LABEL_SERVICE: &str = "rebalancer.service";
