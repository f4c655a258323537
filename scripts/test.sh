#!/usr/bin/env bash
# The whole test suite against real PostgreSQL and NATS (started if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# each test makes its own database; drop those earlier runs left behind
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -Atc "select datname from pg_database where datname like 'tl\_test\_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$db\" with (force)" >/dev/null || true
done
# the official OpenAI Python SDK, for the router's client test, the Standard Webhooks
# reference library, which checks the webhook signatures, and the CloudEvents Python SDK,
# which sends usage events in every content mode (over httpx): all from PyPI
venv=target/sdk-venv
if ! "$venv/bin/python" -c "import openai, standardwebhooks, cloudevents.core, httpx" 2>/dev/null; then
  python3 -m venv "$venv" || {
    # Debian's python3 needs python3-venv for this
    apt-get install -y -q python3-venv >/dev/null && python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q --disable-pip-version-check "openai==3.57.0" "standardwebhooks==1.1.0" "cloudevents==2.2.0" "httpx==0.29.0"
fi
export TOKENLEDGER_TEST_PYTHON="$PWD/$venv/bin/python"
cargo test --locked "$@"
