#!/usr/bin/env bash
# Start everything and run the ledger with demo data: PostgreSQL and NATS (started if
# needed), migrate, seed the bundled price book and a demo tenant, run `serve`, feed
# demo traffic, show per-request breakdowns through the API, close last month's invoices
# and reconcile them. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --quiet
bin=target/debug/tokenledger

export TOKENLEDGER_OWNER_DATABASE_URL=${TOKENLEDGER_OWNER_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/tokenledger}
export DATABASE_URL=${DATABASE_URL:-postgres://tokenledger_app@127.0.0.1:5432/tokenledger}
export TOKENLEDGER_HTTP_ADDR=${TOKENLEDGER_HTTP_ADDR:-127.0.0.1:8080}
export TOKENLEDGER_ADMIN_TOKEN=${TOKENLEDGER_ADMIN_TOKEN:-tl_admin_dev_only}
api=http://$TOKENLEDGER_HTTP_ADDR

$bin migrate
$bin import-prices
# a 20% global markup; dated back only while the ledger is still empty
$bin add-markup --percent 20 --effective-from 2020-01-01T00:00:00Z 2>/dev/null || true

# a fake OpenAI-compatible provider (config/router.json points every provider at it)
$bin fake-upstream --addr 127.0.0.1:9000 >/dev/null &
fake_pid=$!
export TOKENLEDGER_ROUTER_ADDR=${TOKENLEDGER_ROUTER_ADDR:-127.0.0.1:8081}
router=http://$TOKENLEDGER_ROUTER_ADDR
# the fake upstream doubles as the demo's webhook receiver, on loopback: allow exactly it
export TOKENLEDGER_WEBHOOK_ALLOW=${TOKENLEDGER_WEBHOOK_ALLOW:-127.0.0.1:9000}
$bin serve --roles api,writer,pricing,webhooks,router &
serve_pid=$!
trap 'kill $serve_pid $fake_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do curl -sf "$api/readyz" >/dev/null && break; sleep 0.2; done

admin() { curl -sf -H "authorization: Bearer $TOKENLEDGER_ADMIN_TOKEN" "$@"; }
admin -X POST "$api/v1/admin/tenants" -H 'content-type: application/json' \
  -d '{"id":"demo","name":"Demo Inc"}' >/dev/null 2>&1 || true
key=$(admin -X POST "$api/v1/admin/tenants/demo/api-keys" -H 'content-type: application/json' \
  -d '{"name":"demo"}' | sed -E 's/.*"secret":"([^"]+)".*/\1/')

# a webhook endpoint (once) and a small monthly budget that alerts, so the demo traffic
# crosses its thresholds and the alerts are delivered, signed
hook=http://127.0.0.1:9000/fake/webhooks
if ! curl -sf "$api/v1/webhooks/endpoints" -H "authorization: Bearer $key" | grep -q "$hook"; then
  curl -sf -X POST "$api/v1/webhooks/endpoints" -H "authorization: Bearer $key" -H 'content-type: application/json' \
    -d "{\"url\":\"$hook\",\"description\":\"demo receiver\"}" >/dev/null
  budget='{"name":"demo-monthly","scope":"tenant","period":"month","amount":"0.2","action":"alert"'
  # dated back while the tenant has no usage yet, else from now (plus the clock skew)
  curl -sf -X POST "$api/v1/budgets" -H "authorization: Bearer $key" -H 'content-type: application/json' \
    -d "$budget,\"effective_from\":\"2020-01-01T00:00:00Z\"}" >/dev/null 2>&1 ||
    curl -sf -X POST "$api/v1/budgets" -H "authorization: Bearer $key" -H 'content-type: application/json' \
      -d "$budget}" >/dev/null || true
fi

run=$(date +%s)
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# usage_events ID-PREFIX TIME "provider model input cached output reasoning batch"...: a
# CloudEvents batch of the demo tenant's usage
usage_events() {
  local prefix=$1 time=$2 out="[" i=0
  shift 2
  for spec in "$@"; do
    set -- $spec
    [ $i -gt 0 ] && out+=","
    out+="{\"specversion\":\"1.0\",\"id\":\"$prefix-$i\",\"source\":\"demo\",\"type\":\"tokenledger.usage.v1\",\"time\":\"$time\",\"data\":{\"tenant_id\":\"demo\",\"api_key_id\":\"key-1\",\"request_id\":\"$prefix-$i\",\"provider\":\"$1\",\"model\":\"$2\",\"input_tokens\":$3,\"cached_input_tokens\":$4,\"output_tokens\":$5,\"reasoning_tokens\":$6,\"batch\":$7,\"status\":\"ok\",\"latency_ms\":900}}"
    i=$((i + 1))
  done
  echo "$out]"
}
events=$(usage_events "demo-$run" "$now" "openai gpt-4o 12000 3000 800 0 false" \
  "anthropic claude-sonnet-4-5 40000 30000 1200 0 false" "openai gpt-5 5000 0 4000 2500 false" \
  "deepseek deepseek-chat 8000 2000 900 0 true" "google gemini-2.5-pro 250000 0 2000 0 false" \
  "mistral mistral-small-latest 3000 0 500 0 false")
echo "== POST /v1/events (6 demo requests)"
curl -sf -X POST "$api/v1/events" -H "authorization: Bearer $key" \
  -H 'content-type: application/cloudevents-batch+json' -d "$events"; echo

echo "== synthetic load: 5,000 events over 50 tenants"
$bin loadgen --setup --count 5000 --tenants 50 --rate 2500
sleep 2

echo "== GET /v1/requests/demo-$run-0 (per-request breakdown)"
curl -sf "$api/v1/requests/demo-$run-0" -H "authorization: Bearer $key"; echo
echo "== GET /v1/usage?group_by=model"
today=$(date -u +%Y-%m-%d); tomorrow=$(date -u -d tomorrow +%Y-%m-%d)
curl -sf "$api/v1/usage?from=$today&to=$tomorrow&group_by=model" -H "authorization: Bearer $key"; echo
echo "== GET /v1/balances"
curl -sf "$api/v1/balances" -H "authorization: Bearer $key"; echo
echo "== POST /v1/quote (routing class auto:balanced, 3,000 input + 800 output tokens)"
curl -sf -X POST "$api/v1/quote" -H "authorization: Bearer $key" -H 'content-type: application/json' \
  -d '{"routing_class":"auto:balanced","input_tokens":3000,"output_tokens":800}'; echo
echo "== GET /v1/routing/auto:balanced (the decision the pricing role publishes to NATS KV)"
curl -sf "$api/v1/routing/auto:balanced" -H "authorization: Bearer $key" | head -c 600; echo
echo "== POST $router/v1/chat/completions (routing class auto:budget, through the fake upstream)"
out=$(curl -sf -D /tmp/tokenledger-demo-headers "$router/v1/chat/completions" -H "authorization: Bearer $key" \
  -H 'content-type: application/json' \
  -d '{"model":"auto:budget","messages":[{"role":"user","content":"Why must usage be counted exactly once?"}]}')
echo "$out"
rid=$(grep -i '^x-tokenledger-request-id:' /tmp/tokenledger-demo-headers | tr -d '\r' | awk '{print $2}')
echo "== the same request streamed, with usage"
curl -sfN "$router/v1/chat/completions" -H "authorization: Bearer $key" -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Why must usage be counted exactly once?"}]}' | tail -n 4
sleep 1
echo "== GET /v1/requests/$rid (what the ledger recorded for the routed request)"
curl -sf "$api/v1/requests/$rid" -H "authorization: Bearer $key" | head -c 700; echo
echo "== webhooks the demo receiver got (budget alerts, signed per Standard Webhooks)"
sleep 1
curl -sf http://127.0.0.1:9000/fake/webhooks | head -c 900; echo
echo "== GET /v1/webhooks/messages?limit=2 (the delivery log)"
curl -sf "$api/v1/webhooks/messages?limit=2" -H "authorization: Bearer $key" | head -c 700; echo
last=$(date -u -d "$(date -u +%Y-%m-01) -1 day" +%Y-%m)
echo "== backfill: 3 requests of the demo tenant dated $last (late lines on this month's invoice once $last is closed)"
events=$(usage_events "backfill-$run" "$last-15T12:00:00Z" "openai gpt-4o 20000 4000 1500 0 false" \
  "anthropic claude-sonnet-4-5 60000 50000 2000 0 false" "deepseek deepseek-chat 9000 0 700 0 false")
curl -sf -X POST "$api/v1/events" -H "authorization: Bearer $key" \
  -H 'content-type: application/cloudevents-batch+json' -d "$events" >/dev/null
sleep 1
echo "== tokenledger invoice close --period $last (every tenant with $last lines; a second run closes nothing new)"
$bin invoice close --period "$last"
number=$(curl -sf "$api/v1/invoices?period=$last" -H "authorization: Bearer $key" |
  sed -nE 's/.*"number":"([^"]+)".*/\1/p')
if [ -n "$number" ]; then
  echo "== GET /v1/invoices/$number?format=csv (finalised: immutable, numbered, hashed)"
  curl -sf "$api/v1/invoices/$number?format=csv" -H "authorization: Bearer $key"
fi
echo "== GET /v1/invoices/draft (this month's live draft: total, rounding, first lines)"
curl -sf "$api/v1/invoices/draft" -H "authorization: Bearer $key" | head -c 900; echo
echo "== tokenledger reconcile --period $last (internal: ledger vs projection vs invoices)"
$bin reconcile --period "$last" | grep -E '"(findings|lines|finalized_invoices|tenants_with_lines)"'
echo "== our commitment with openai (0.05 a month at 20% off; it may start in a month not yet settled) and the provider settlement of $last"
admin -o /dev/null -X POST "$api/v1/admin/provider-commitments" -H 'content-type: application/json' \
  -d "{\"name\": \"openai-demo\", \"provider\": \"openai\", \"amount\": \"0.05\", \"discount_percent\": \"20\", \"effective_from\": \"$last-01T00:00:00Z\"}" || true
$bin provider-settle --period "$last" |
  grep -E '"(provider|revision|list_cost|absorbed_list|drawdown|discount|true_up|net_cost)"' | head -12 || true
echo "== tokenledger verify"
$bin verify
echo
echo "tokenledger is serving on $api, the router on $router (demo tenant key: $key). Ctrl-C to stop."
wait $serve_pid
