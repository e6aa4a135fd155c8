#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), then runs every test.
# Integration tests start their own redis-server and consul agents on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The slow-client test holds 2,000 connections open: as many descriptors as the system allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# Every test target of both crates (the product and the agent's), the agent's example built,
# plus the decide and pick benches run once as a smoke test (the latency bench is a measurement: run
# it with `cargo bench --bench latency`).
cargo test --locked --workspace --lib --bins --tests --examples --bench decide --bench pick "$@"
