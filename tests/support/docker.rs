//! The Docker engine in tests: the CLI, the test image, and cleaning up labelled containers.

use std::process::Command;

use super::procs::repo;

pub const DOCKER_HINT: &str = "run `scripts/setup.sh` (installs docker.io and starts dockerd --bridge=none --iptables=false --ip6tables=false)";

/// Runs the docker CLI; panics with how to get an engine when it cannot.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker: {e}; {DOCKER_HINT}"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}; {DOCKER_HINT}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test image (`rebalancer:test`), built once per test binary from the binary under test
/// with `scripts/docker-image.sh`.
pub fn docker_image() -> &'static str {
    static IMAGE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        docker(&["version", "--format", "{{.Server.Version}}"]);
        let script = repo().join("scripts/docker-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_rebalancer"))
            .arg("rebalancer:test")
            .output()
            .expect("run scripts/docker-image.sh");
        assert!(
            out.status.success(),
            "building the test image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    "rebalancer:test"
}

/// `(name, state)` of the containers carrying `label=value`.
pub fn containers_labelled(label: &str, value: &str) -> Vec<(String, String)> {
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label={label}={value}"),
        "--format",
        "{{.Names}} {{.State}}",
    ])
    .lines()
    .filter_map(|l| {
        l.split_once(' ')
            .map(|(a, b)| (a.to_string(), b.to_string()))
    })
    .collect()
}

/// Removes every container of a pipeline (and any named ones) when dropped.
pub struct ContainerJanitor {
    pub pipeline: String,
    pub names: Vec<String>,
}

impl Drop for ContainerJanitor {
    fn drop(&mut self) {
        let mut ids: Vec<String> = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=rebalancer.pipeline={}", self.pipeline),
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        ids.extend(self.names.iter().cloned());
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
    }
}
