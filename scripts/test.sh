#!/usr/bin/env bash
# The whole test suite against real PostgreSQL and NATS (started if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test --locked "$@"
