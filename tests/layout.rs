//! The house rules of `docs/architecture.md`, checked on the source tree: which wing may
//! import which, and how long a source file may grow.

use std::path::{Path, PathBuf};

/// Each wing, the wings (top-level modules of the crate) it must not import, and why.
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "contract",
        &[
            "fleet",
            "controller",
            "gateway",
            "agent",
            "simulate",
            "demo",
            "config",
            "cli",
            "telemetry",
        ],
        "the contract is what every part speaks: it imports no wing",
    ),
    (
        "stages",
        &[
            "contract",
            "fleet",
            "controller",
            "gateway",
            "agent",
            "simulate",
            "demo",
            "config",
            "cli",
            "telemetry",
        ],
        "stream stages are generic plumbing",
    ),
    (
        "agent",
        &[
            "fleet",
            "controller",
            "gateway",
            "simulate",
            "demo",
            "config",
            "cli",
        ],
        "the agent is embedded in other people's servers: contract and stages only",
    ),
    (
        "fleet",
        &["controller", "gateway", "agent", "simulate", "demo", "cli"],
        "the topology view is shared by the controller and the gateway",
    ),
    (
        "telemetry",
        &[
            "contract",
            "fleet",
            "controller",
            "gateway",
            "agent",
            "simulate",
            "demo",
            "config",
            "cli",
        ],
        "metric names, the exporter and tracing sit below everything",
    ),
    (
        "config",
        &[
            "fleet",
            "controller",
            "gateway",
            "agent",
            "simulate",
            "demo",
            "cli",
            "telemetry",
        ],
        "configuration holds every typed setting and imports only the contract",
    ),
    (
        "gateway",
        &["controller", "agent", "simulate", "demo", "cli"],
        "the gateway takes the fleet from the topology view, not from the controller",
    ),
    (
        "simulate",
        &[
            "controller::app",
            "controller::pipeline",
            "controller::act",
            "controller::leader",
            "controller::feed",
            "gateway",
            "agent",
            "demo",
            "cli",
        ],
        "the simulator runs the controller's pure decisions, nothing that does IO",
    ),
    (
        "demo",
        &["controller", "gateway", "simulate", "cli"],
        "the demo roles use the agent and the contract",
    ),
    (
        "controller",
        &["gateway", "agent", "simulate", "demo", "cli"],
        "the controller's wing stands on the contract and the topology view",
    ),
];

/// Longest source file.
const MAX_LINES: usize = 700;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The agent's crate (`rebalancer-agent`): the agent, the contract and the stages.
fn agent_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/src")
}

/// The wing of a file of the agent's crate: `contract`, `stages`, or else `agent`.
fn agent_wing(file: &Path) -> &'static str {
    let rel = file.strip_prefix(agent_src()).unwrap();
    match rel.components().next().unwrap().as_os_str().to_str() {
        Some("contract") => "contract",
        Some("stages") => "stages",
        _ => "agent",
    }
}

/// The wing of a file: its first path component under `src/`, without `.rs`.
fn wing(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn no_import_crosses_the_rules_between_wings() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut broken = Vec::new();
    for f in &files {
        let w = wing(f);
        let Some((_, forbidden, why)) = RULES.iter().find(|(name, _, _)| *name == w) else {
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for target in *forbidden {
                let path = format!("crate::{target}");
                let hit = code.match_indices(&path).any(|(i, _)| {
                    let next = code[i + path.len()..].chars().next();
                    !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if hit {
                    broken.push(format!(
                        "{}:{}: {w} imports {target}: {why}",
                        f.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports across the rules:\n{}",
        broken.join("\n")
    );
}

#[test]
fn in_the_agents_crate_the_contract_and_the_stages_import_nothing_above_them() {
    let mut files = Vec::new();
    rust_files(&agent_src(), &mut files);
    let mut broken = Vec::new();
    for f in &files {
        let allowed: &[&str] = match agent_wing(f) {
            "contract" => &["crate::contract", "crate::stages"],
            "stages" => &["crate::stages"],
            _ => continue,
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                if !allowed.iter().any(|a| code[i..].starts_with(a)) {
                    broken.push(format!("{}:{}: {}", f.display(), n + 1, code.trim()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "the contract imports only itself and the stages, the stages only themselves:\n{}",
        broken.join("\n")
    );
}

/// A connection server that adds the agent's crate builds none of the product's weight.
#[test]
fn the_agent_crate_builds_without_the_products_dependencies() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--locked", "-p", "rebalancer-agent", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p} {f}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let packages: Vec<&str> = tree.lines().collect();
    assert!(packages.iter().any(|l| l.starts_with("redis ")), "{tree}");
    for heavy in [
        "bollard",
        "plotters",
        "axum",
        "moka",
        "metrics-exporter-prometheus",
        "clap",
    ] {
        assert!(
            !packages.iter().any(|l| l.starts_with(&format!("{heavy} "))),
            "the agent's crate pulls in {heavy}:\n{tree}"
        );
    }
    // hyper comes with reqwest, as an HTTP client only.
    for l in packages.iter().filter(|l| l.starts_with("hyper ")) {
        assert!(!l.contains("server"), "hyper with its server: {l}");
    }
}

#[test]
fn every_wing_has_a_rule() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let roots = ["lib", "main", "cli"];
    for f in &files {
        let w = wing(f);
        assert!(
            roots.contains(&w.as_str()) || RULES.iter().any(|(name, _, _)| *name == w),
            "{}: wing {w} has no rule in tests/layout.rs (and no paragraph in docs/architecture.md?)",
            f.display()
        );
    }
}

#[test]
fn no_source_file_is_over_700_lines() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    rust_files(&agent_src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "cut these by job:\n{}", long.join("\n"));
}

/// The gateway is read by job (issue "The gateway, rebuilt by job"): none of its files may
/// grow past 600 lines.
#[test]
fn no_gateway_file_is_over_600_lines() {
    let mut files = Vec::new();
    rust_files(&src().join("gateway"), &mut files);
    assert!(files.len() > 10, "the gateway's files: {files:?}");
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 600).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "cut these by job:\n{}", long.join("\n"));
}
