#!/usr/bin/env bash
# Wire-format benchmark: what translation costs. wrk through one tollgate against the mock,
# in one run, loopback only: OpenAI clients served natively, and translated to an Anthropic
# and a Gemini channel; Anthropic clients served natively, and translated to an
# OpenAI-compatible channel. Prints req/s at -c32 with the gateway's CPU time per request
# (user + system, from /proc: independent of how fast the mock or wrk are) and p50/p99 at
# -c1, and refuses a run where any answer was not a 2xx (wrk's "Non-2xx" line).
#
#   bench/wire.sh [TOLLGATE_BIN] [MOCK_BIN]     (defaults: target/release/{tollgate,tollgate-mock})
#   DURATION=10s THREADS=1 bench/wire.sh
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
UP="http://127.0.0.1:$MOCK_PORT"

"$MOCK" --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.log" 2>&1 & pids+=($!)
cat >"$work/tollgate.yaml" <<EOF
server:
  listen: "127.0.0.1:$GW_PORT"
  admin_listen: "127.0.0.1:$ADMIN_PORT"
  threads: $THREADS
  log_level: warn
database: { path: "$work/tollgate.db" }
channels:
  - { name: openai, base_url: "$UP", api_key: "sk-bench", models: [gpt-x], max_concurrency: 4096 }
  - { name: anthropic, kind: anthropic, base_url: "$UP", api_key: "sk-bench", models: [claude-x], max_concurrency: 4096 }
  - { name: gemini, kind: gemini, base_url: "$UP", api_key: "sk-bench", models: [gem-x], max_concurrency: 4096 }
pricing:
  models:
    gpt-x: { input: 0.15, output: 0.60 }
    claude-x: { input: 3.00, output: 15.00, cache_read: 0.30, cache_write: 3.75 }
    gem-x: { input: 0.10, output: 0.40 }
limits:
  default: { rpm: 100000000, tpm: 2000000000, concurrency: 4096 }
metrics: { enabled: true }
log: { access: true }
EOF
"$TG" --config "$work/tollgate.yaml" accounts create bench --balance-usd 1000000 >/dev/null
KEY=$("$TG" --config "$work/tollgate.yaml" keys create --account bench | tail -n1)
"$TG" serve --config "$work/tollgate.yaml" >"$work/gw.log" 2>&1 & pids+=($!)
GW_PID=$!
CLK_TCK=$(getconf CLK_TCK)
gw_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" && break
  sleep 0.1
done

# lua FILE PATH BODY [HEADER...]: a wrk script posting BODY to PATH with the key.
lua() {
  local file=$1 path=$2 body=$3; shift 3
  {
    echo 'wrk.method = "POST"'
    echo "wrk.path = \"$path\""
    echo "wrk.body = '$body'"
    echo 'wrk.headers["Content-Type"] = "application/json"'
    echo 'wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")'
    for h in "$@"; do echo "wrk.headers[\"${h%%:*}\"] = \"${h#*: }\""; done
  } >"$file"
}
chat() { echo "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello in one short sentence.\"}],\"max_tokens\":16}"; }
lua "$work/oa-oa.lua" /v1/chat/completions "$(chat gpt-x)"
lua "$work/oa-an.lua" /v1/chat/completions "$(chat claude-x)"
lua "$work/oa-ge.lua" /v1/chat/completions "$(chat gem-x)"
lua "$work/an-an.lua" /v1/messages "$(chat claude-x)" "anthropic-version: 2023-06-01"
lua "$work/an-oa.lua" /v1/messages "$(chat gpt-x)" "anthropic-version: 2023-06-01"

run() { # name script conns
  local out before
  before=$(gw_ticks)
  out=$(KEY=$KEY wrk -t1 -c"$3" -d"$DURATION" --latency -s "$2" "http://127.0.0.1:$GW_PORT" 2>&1)
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
    echo "$1 c=$3: INVALID RUN (non-2xx or socket errors)"; echo "$out"; tail -5 "$work/gw.log"; exit 1
  fi
  local rps p50 p99 n ticks cpu
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  ticks=$(( $(gw_ticks) - before ))
  cpu=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  printf '%-22s c=%-3s %10s req/s   gateway CPU %6s us/req   p50 %-8s p99 %-8s\n' "$1" "$3" "$rps" "$cpu" "$p50" "$p99"
}
for c in 32 1; do
  run "openai -> openai" "$work/oa-oa.lua" "$c"
  run "openai -> anthropic" "$work/oa-an.lua" "$c"
  run "openai -> gemini" "$work/oa-ge.lua" "$c"
  run "anthropic -> anthropic" "$work/an-an.lua" "$c"
  run "anthropic -> openai" "$work/an-oa.lua" "$c"
done
