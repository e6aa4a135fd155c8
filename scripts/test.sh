#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), then runs every test.
# Integration tests start their own redis-server and consul agents on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Every test target, plus the decide bench run once as a smoke test (the latency bench is a
# measurement: run it with `cargo bench --bench latency`).
cargo test --locked --lib --bins --tests --bench decide "$@"
