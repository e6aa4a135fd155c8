#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), then runs every test.
# Integration tests start their own redis-server and consul agents on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --all-targets --locked "$@"
