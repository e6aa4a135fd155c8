//! The command line: one binary, several roles.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, PipelineConfig};
use crate::controller::app::AppError;

/// Exit code for bad configuration (sysexits' `EX_CONFIG`).
pub const EX_CONFIG: u8 = 64;
/// Exit code when a needed local resource cannot be had (sysexits' `EX_UNAVAILABLE`).
pub const EX_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "rebalancer",
    version,
    about = "Keeps fleets of long-lived-connection servers balanced and right-sized"
)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "REBALANCER_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller for one or more pipelines, side by side.
    Run {
        /// A pipeline file (repeatable). Keys can be overridden by REBALANCER_* variables.
        #[arg(long = "pipeline", short = 'p', required = true, num_args = 1..)]
        pipelines: Vec<PathBuf>,
    },
    /// Validate pipeline files and the TLS files they name, without connecting to anything
    /// (exit 64 when invalid).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// A WebSocket echo server that embeds the agent (registers, reports, obeys commands).
    DemoServer(crate::demo::server::DemoServerArgs),
    /// Open and hold N WebSocket clients, reconnecting with backoff; JSON summary at the end.
    Loadgen(crate::demo::loadgen::LoadgenArgs),
    /// Run the controller's decisions over a simulated fleet, beside the baselines.
    Simulate(crate::simulate::SimulateArgs),
    /// The least-connections HTTP/WebSocket gateway in front of the fleet.
    Gateway(crate::gateway::GatewayArgs),
}

/// Loads and validates, printing every error; `Err(exit code)` when invalid. The TLS
/// files the pipelines name are read too: a missing or wrong one is a configuration error.
fn load(files: &[PathBuf]) -> Result<Vec<PipelineConfig>, ExitCode> {
    let cfgs = config::load_all(files, &config::process_env).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("error: {e}");
        }
        eprintln!("{} error(s) in pipeline configuration", errors.0.len());
        ExitCode::from(EX_CONFIG)
    })?;
    let mut bad = 0;
    for c in &cfgs {
        let consul = crate::contract::consul::Consul::connect(&c.consul.endpoint()).err();
        let redis = c.redis.endpoint().client().err();
        let gateway = c
            .gateway
            .tls
            .as_ref()
            .and_then(|files| crate::gateway::tls::load(files).err());
        for e in [
            consul.map(|e| format!("Consul: {e}")),
            redis.map(|e| format!("Redis: {e}")),
            gateway.map(|e| format!("gateway: {e}")),
        ]
        .into_iter()
        .flatten()
        {
            eprintln!("error: {}: {e}", c.file.display());
            bad += 1;
        }
    }
    if bad > 0 {
        eprintln!("{bad} error(s) in pipeline configuration");
        return Err(ExitCode::from(EX_CONFIG));
    }
    Ok(cfgs)
}

pub fn check(files: &[PathBuf]) -> ExitCode {
    match load(files) {
        Ok(cfgs) => {
            for c in cfgs {
                println!(
                    "ok: {} (pipeline {:?}, service {:?})",
                    c.file.display(),
                    c.name,
                    c.service
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// A token cancelled by Ctrl-C or SIGTERM.
fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        t.cancel();
    });
    token
}

pub fn run(files: &[PathBuf]) -> ExitCode {
    let cfgs = match load(files) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match crate::controller::app::run(cfgs, on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                match e {
                    e if e.is_config() => ExitCode::from(EX_CONFIG),
                    AppError::Metrics(_) | AppError::Listen { .. } => {
                        ExitCode::from(EX_UNAVAILABLE)
                    }
                    _ => ExitCode::FAILURE,
                }
            }
        }
    })
}

pub fn demo_server(args: crate::demo::server::DemoServerArgs) -> ExitCode {
    use crate::demo::server::DemoError;
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match crate::demo::server::run(args, on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                match e {
                    DemoError::Config(_) | DemoError::Agent(_) => ExitCode::from(EX_CONFIG),
                    DemoError::Listen { .. } => ExitCode::from(EX_UNAVAILABLE),
                    DemoError::Serve(_) => ExitCode::FAILURE,
                }
            }
        }
    })
}

pub fn loadgen(args: crate::demo::loadgen::LoadgenArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match crate::demo::loadgen::run(args, on_signal()).await {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EX_CONFIG)
            }
        }
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub fn simulate(args: &crate::simulate::SimulateArgs) -> ExitCode {
    match crate::simulate::run(args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                crate::simulate::SimulateError::Chart(_) => ExitCode::FAILURE,
                _ => ExitCode::from(EX_CONFIG),
            }
        }
    }
}

pub fn gateway(args: &crate::gateway::GatewayArgs) -> ExitCode {
    let env = |k: &str| config::gateway_env_aliases(&config::process_env, k);
    let cfg = match config::load_all(std::slice::from_ref(&args.pipeline), &env) {
        Ok(mut c) => c.remove(0),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            return ExitCode::from(EX_CONFIG);
        }
    };
    // The first event loop, on this thread; `run` starts the others on threads of their own.
    let built = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let loops = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    };
    let rt = match built.map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    }) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match crate::gateway::run(cfg, args.listen, loops, on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                match e {
                    crate::gateway::GatewayError::Tls(_) => ExitCode::from(EX_CONFIG),
                    _ => ExitCode::from(EX_UNAVAILABLE),
                }
            }
        }
    })
}
