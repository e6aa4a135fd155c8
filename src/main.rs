//! The `rebalancer` binary: parse the command line, start logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use rebalancer::cli::{self, Cli, Command};

/// jemalloc, configured (.cargo/config.toml) to give freed memory back within seconds:
/// glibc's malloc keeps a long-running gateway at the high-water mark of its busiest
/// minute.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    rebalancer::telemetry::init_tracing(cli.log_json);
    // Every client of Consul, Redis and the servers speaks TLS through rustls with `ring`.
    rebalancer::contract::tls::install_crypto();
    match &cli.command {
        Command::Run { pipelines } => cli::run(pipelines),
        Command::Check { files } => cli::check(files),
        Command::DemoServer(args) => cli::demo_server(args.clone()),
        Command::Loadgen(args) => cli::loadgen(args.clone()),
        Command::Simulate(args) => cli::simulate(args),
        Command::Gateway(args) => cli::gateway(args),
    }
}
