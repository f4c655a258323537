#!/usr/bin/env bash
# The whole test suite against real PostgreSQL and NATS (started if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# each test makes its own database; drop those earlier runs left behind
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -Atc "select datname from pg_database where datname like 'tl\_test\_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$db\" with (force)" >/dev/null || true
done
cargo test --locked "$@"
