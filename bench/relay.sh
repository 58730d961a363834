#!/usr/bin/env bash
# Relay benchmark: wrk against the mock upstream directly and through tollgate, in one run,
# on loopback only. Prints req/s at -c32 and p50/p99 at -c1 for each target, and refuses a
# run where any answer was not a 2xx (wrk's "Non-2xx" line).
#
#   bench/relay.sh [TOLLGATE_BIN] [MOCK_BIN]     (defaults: target/release/{tollgate,tollgate-mock})
#   DURATION=10s THREADS=1 bench/relay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TG=${1:-target/release/tollgate}
MOCK=${2:-target/release/tollgate-mock}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-1}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
[ -x "$TG" ] && [ -x "$MOCK" ] || cargo build --release -p tollgate -p tollgate-bench --bin tollgate --bin tollgate-mock

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port); GW_PORT=$(free_port); ADMIN_PORT=$(free_port)

"$MOCK" --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.log" 2>&1 & pids+=($!)
cat >"$work/tollgate.yaml" <<EOF
server:
  listen: "127.0.0.1:$GW_PORT"
  admin_listen: "127.0.0.1:$ADMIN_PORT"
  threads: $THREADS
  log_level: warn
database: { path: "$work/tollgate.db" }
channels:
  - { name: mock, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-bench", models: [gpt-4o-mini], max_concurrency: 4096 }
pricing:
  models: { gpt-4o-mini: { input: 0.15, output: 0.60 } }
limits:
  default: { rpm: 100000000, tpm: 2000000000, concurrency: 4096 }
  ip: { rps: 100000000 }
EOF
"$TG" --config "$work/tollgate.yaml" accounts create bench --balance-usd 1000000 >/dev/null
KEY=$("$TG" --config "$work/tollgate.yaml" keys create --account bench | tail -n1)
"$TG" serve --config "$work/tollgate.yaml" >"$work/gw.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" && break
  sleep 0.1
done

cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")
EOF

run() { # name url conns
  local out
  out=$(KEY=$KEY wrk -t1 -c"$3" -d"$DURATION" --latency -s "$work/post.lua" "$2/v1/chat/completions" 2>&1)
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
    echo "$1 c=$3: INVALID RUN (non-2xx or socket errors)"; echo "$out"; exit 1
  fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  printf '%-10s c=%-3s %10s req/s   p50 %-8s p99 %s\n' "$1" "$3" "$rps" "$p50" "$p99"
}
curl -fsS -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "http://127.0.0.1:$GW_PORT/v1/chat/completions"
run direct "http://127.0.0.1:$MOCK_PORT" 32
run tollgate "http://127.0.0.1:$GW_PORT" 32
run direct "http://127.0.0.1:$MOCK_PORT" 1
run tollgate "http://127.0.0.1:$GW_PORT" 1
