//! The simulator: deterministic for a seed, right on hand-computed cases, and its chart is
//! a real PNG. (The baselines' rules are unit tests in src/simulate/baselines.rs.)

use rebalancer::simulate::{fleet, Algorithm, Scenario};

#[test]
fn the_same_seed_gives_the_same_figures() {
    for name in ["server-joins", "rolling-deploy", "nightly-drop"] {
        let sc = Scenario::load(name).unwrap();
        for a in [Algorithm::Ours, Algorithm::Clb, Algorithm::Naive] {
            let (f1, _) = fleet::run(&sc, a, 7);
            let (f2, _) = fleet::run(&sc, a, 7);
            assert_eq!(f1, f2, "{name} {a:?}");
        }
    }
    let sc = Scenario::load("rolling-deploy").unwrap();
    let (a, _) = fleet::run(&sc, Algorithm::Clb, 1);
    let (b, _) = fleet::run(&sc, Algorithm::Clb, 2);
    assert_ne!(a, b, "another seed draws other reconnects");
}

#[test]
fn one_empty_server_joining_three_full_ones_moves_exactly_the_minimum_of_75() {
    let sc = Scenario::load("server-joins").unwrap();
    let (f, _) = fleet::run(&sc, Algorithm::Ours, 1);
    println!("{f:?}");
    assert_eq!(f.minimum, 75, "3 × (100 − ceil(100 × 300/400))");
    assert_eq!(f.moved, 75);
    assert_eq!(f.oscillations, 0);
    assert!(
        f.converge_s.is_some_and(|c| c <= 30),
        "within two rounds: {f:?}"
    );
    assert_eq!(f.sessions_end, 300, "nobody lost");
}

#[test]
fn ours_beats_the_baselines_where_the_targets_say() {
    for name in ["server-joins", "rolling-deploy"] {
        let sc = Scenario::load(name).unwrap();
        let (ours, _) = fleet::run(&sc, Algorithm::Ours, 1);
        let (clb, _) = fleet::run(&sc, Algorithm::Clb, 1);
        println!("{name}: ours {ours:?}\nclb {clb:?}");
        assert!(
            ours.moved as f64 <= 1.05 * ours.minimum as f64,
            "{name}: {ours:?}"
        );
        assert_eq!(ours.oscillations, 0, "{name}");
        let c = ours.converge_s.expect("ours converges");
        assert!(c <= 30, "{name}: within two rounds of 15 s, took {c}");
        assert!(
            clb.converge_s.is_none_or(|cc| cc > c),
            "{name}: strictly faster than clb"
        );
    }
    let sc = Scenario::load("server-joins").unwrap();
    let (ours, _) = fleet::run(&sc, Algorithm::Ours, 1);
    let (naive, _) = fleet::run(&sc, Algorithm::Naive, 1);
    assert!(
        ours.moved < naive.moved,
        "fewer moved than naive: {} vs {}",
        ours.moved,
        naive.moved
    );
    for name in ["flash-crowd", "nightly-drop"] {
        let (f, _) = fleet::run(&Scenario::load(name).unwrap(), Algorithm::Ours, 1);
        assert!(f.scale_actions > 0, "{name} scales: {f:?}");
        assert_eq!(f.scale_flaps, 0, "{name}: {f:?}");
    }
}

#[test]
fn the_chart_is_a_png() {
    let sc = Scenario::load("server-joins").unwrap();
    let (_, series) = fleet::run(&sc, Algorithm::Ours, 1);
    let file = std::env::temp_dir().join(format!("rebalancer-chart-{}.png", std::process::id()));
    rebalancer::simulate::chart::draw(&file, &sc, Algorithm::Ours, &series)
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        bytes.len() > 10_000,
        "a drawn chart, not an empty image: {} bytes",
        bytes.len()
    );
    assert_eq!(series.servers.len(), 4);
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_cli_prints_one_json_object_per_algorithm() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rebalancer"))
        .args([
            "simulate",
            "--scenario",
            "server-joins",
            "--seed",
            "3",
            "--algorithm",
            "all",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for (row, name) in rows.iter().zip(["ours", "clb", "naive"]) {
        assert_eq!(row["algorithm"], name);
        for key in [
            "scenario",
            "converge_s",
            "moved",
            "minimum",
            "oscillations",
            "scale_flaps",
            "peak_reconnects_per_s",
        ] {
            assert!(row.get(key).is_some(), "{key} missing: {row}");
        }
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_rebalancer"))
        .args(["simulate", "--scenario", "no-such-scenario"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("server-joins"),
        "lists the built-in names"
    );
}

#[test]
fn the_simulator_scores_balance_with_the_configured_tolerance() {
    let sc = Scenario::load("server-joins").unwrap();
    let (default, _) = fleet::run(&sc, Algorithm::Naive, 1);
    assert!(
        default.converge_s.is_some_and(|c| c > 0),
        "an empty server joining three full ones is out of balance at first: {default:?}"
    );
    // Within 0.99 of U, every fleet is balanced: converged from the start, nothing shed.
    let mut cfg = rebalancer::controller::decide::DecideConfig::default();
    cfg.rebalance.tolerance = 0.99;
    let (wide, _) = fleet::run_with(&sc, Algorithm::Ours, 1, cfg.clone());
    assert_eq!(wide.converge_s, Some(0), "{wide:?}");
    assert_eq!(wide.moved, 0, "{wide:?}");
    let (naive, _) = fleet::run_with(&sc, Algorithm::Naive, 1, cfg);
    assert_eq!(
        naive.moved, 0,
        "the naive baseline sheds at the same tolerance: {naive:?}"
    );
}
