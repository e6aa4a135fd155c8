//! The controller: composed in [`app`] from the pipeline files, one [`pipeline`] per file.
//! Each pipeline reads the fleet's snapshot ([`crate::fleet::view`]), decides with pure
//! functions ([`decide`]) and acts through an [`act::Actuator`] while it holds the leader
//! lock ([`leader`]); its snapshots are served on the topology [`feed`].

pub mod acks;
pub mod act;
pub mod app;
pub mod decide;
pub mod events;
pub mod feed;
pub mod leader;
pub mod pipeline;
