//! The topology view: the live fleet as the controller and the gateway both see it.
//! Sources turn Consul, Redis and Docker into change streams; they are merged, debounced
//! and folded into one immutable, versioned snapshot behind a `watch` channel ([`view`]),
//! or followed from a controller's feed ([`follow`]).

pub mod events;
pub mod fold;
pub mod follow;
pub mod source;
pub mod topology;
pub mod view;
