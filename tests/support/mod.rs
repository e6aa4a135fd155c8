//! Test harness: real Redis, Consul, Prometheus and the Docker engine on free loopback
//! ports, started per test and killed when dropped, and the roles of the binary under test.
//! A missing binary fails the test with how to install it. One file per job.
#![allow(dead_code, unused_imports)]

mod consul;
mod docker;
mod faulty;
mod http;
mod procs;
mod prometheus;
mod rawws;
mod redis;
mod tls;
mod wait;

pub use consul::*;
pub use docker::*;
pub use faulty::*;
pub use http::*;
pub use procs::*;
pub use prometheus::*;
pub use rawws::*;
pub use redis::*;
pub use tls::*;
pub use wait::*;
