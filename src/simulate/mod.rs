//! `rebalancer simulate`: runs the controller's own decision code (not a copy) over a
//! simulated fleet, beside the algorithms this project grew from, and reports how fast each
//! converges, how many sessions it moves against the minimum, whether it oscillates or
//! flaps, and how hard the reconnects hit.

pub mod baselines;
pub mod chart;
pub mod fleet;
pub mod scenario;

use std::fmt::Write as _;
use std::path::PathBuf;

pub use fleet::{Algorithm, Figures, Series};
pub use scenario::{Routing, Scenario, ScenarioError};

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// A built-in scenario (server-joins, rolling-deploy, flash-crowd, nightly-drop, crash,
    /// heterogeneous, internet-scale) or a scenario file.
    #[arg(long)]
    pub scenario: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `ours`, `clb`, `naive`, or `all` for the three side by side.
    #[arg(long, default_value = "all")]
    pub algorithm: String,
    /// Override the scenario's routing of reconnecting clients.
    #[arg(long, value_enum)]
    pub routing: Option<Routing>,
    /// One JSON object per algorithm, one per line, instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write a PNG of per-server utilization over time (one per algorithm: FILE-<algorithm>.png).
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Decide (and score) with this pipeline file's `[rebalance]`, `[scale]` and `[safety]`
    /// settings instead of the defaults.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("--algorithm {0:?}: choose ours, clb, naive or all")]
    Algorithm(String),
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
    #[error("{0}")]
    Pipeline(#[from] crate::config::ConfigErrors),
}

pub fn algorithms(name: &str) -> Result<Vec<Algorithm>, SimulateError> {
    Ok(match name {
        "all" => vec![Algorithm::Ours, Algorithm::Clb, Algorithm::Naive],
        "ours" => vec![Algorithm::Ours],
        "clb" => vec![Algorithm::Clb],
        "naive" => vec![Algorithm::Naive],
        other => return Err(SimulateError::Algorithm(other.to_string())),
    })
}

/// The JSON object of one run.
pub fn json(f: &Figures, wall_ms: u128) -> serde_json::Value {
    let mut v = serde_json::to_value(f).expect("figures serialize");
    v["moved_ratio"] = serde_json::json!(f.moved_ratio().map(|r| (r * 1000.0).round() / 1000.0));
    v["wall_ms"] = serde_json::json!(wall_ms);
    v
}

/// Runs the scenario for each algorithm; prints a table or JSON lines; writes charts.
pub fn run(args: &SimulateArgs) -> Result<Vec<Figures>, SimulateError> {
    let mut sc = Scenario::load(&args.scenario)?;
    if let Some(r) = args.routing {
        sc.routing = r;
    }
    let algos = algorithms(&args.algorithm)?;
    let decide = match &args.pipeline {
        Some(p) => {
            let mut cfgs =
                crate::config::load_all(std::slice::from_ref(p), &crate::config::process_env)?;
            cfgs.remove(0).decide
        }
        None => crate::controller::decide::DecideConfig::default(),
    };
    let mut out = Vec::new();
    for a in &algos {
        let started = std::time::Instant::now();
        let (figures, series) = fleet::run_with(&sc, *a, args.seed, decide.clone());
        let wall = started.elapsed().as_millis();
        if args.json {
            println!("{}", json(&figures, wall));
        }
        if let Some(path) = &args.chart {
            let file = if algos.len() > 1 {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("chart");
                path.with_file_name(format!("{stem}-{}.png", format!("{a:?}").to_lowercase()))
            } else {
                path.clone()
            };
            chart::draw(&file, &sc, *a, &series)?;
            eprintln!("chart: {}", file.display());
        }
        out.push(figures);
    }
    if !args.json {
        print!("{}", table(&sc, args.seed, &out));
    }
    Ok(out)
}

/// The terminal table.
pub fn table(sc: &Scenario, seed: u64, rows: &[Figures]) -> String {
    let mut s = format!(
        "scenario {} (seed {seed}, {} s, routing {:?})\n{:<9} {:>10} {:>9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>6} {:>10}\n",
        sc.name, sc.duration_s, sc.routing, "algorithm", "converge_s", "worst_imb", "moved", "minimum", "ratio", "oscil", "scale", "flaps", "peak_rc/s"
    );
    for f in rows {
        let _ = writeln!(
            s,
            "{:<9} {:>10} {:>9.3} {:>9} {:>9} {:>7} {:>6} {:>6} {:>6} {:>10}\n",
            format!("{:?}", f.algorithm).to_lowercase(),
            f.converge_s.map_or("never".to_string(), |c| c.to_string()),
            f.worst_imbalance,
            f.moved,
            f.minimum,
            f.moved_ratio()
                .map_or("-".to_string(), |r| format!("{r:.2}")),
            f.oscillations,
            f.scale_actions,
            f.scale_flaps,
            f.peak_reconnects_per_s,
        );
    }
    s
}
