#!/usr/bin/env bash
# Relay benchmark: wrk against the mock upstream directly and through tollgate, in one run,
# on loopback only. Prints req/s at -c32 and p50/p99 at -c1 for each target, and refuses a
# run where any answer was not a 2xx (wrk's "Non-2xx" line).
#
#   bench/relay.sh [TOLLGATE_BIN] [MOCK_BIN]     (defaults: target/release/{tollgate,tollgate-mock})
#   DURATION=10s THREADS=1 bench/relay.sh
#   OBSERVE=off bench/relay.sh    metrics filter and access log off (default on: both on,
#                                 the access log at info level into the gateway's log file;
#                                 OBSERVE=metrics: the metrics filter only)
#
# For the runs through tollgate it also prints the gateway's CPU time per request (user +
# system, from /proc), which does not depend on how fast the mock or wrk are.
set -euo pipefail
cd "$(dirname "$0")/.."
TG=${1:-target/release/tollgate}
MOCK=${2:-target/release/tollgate-mock}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-1}
OBSERVE=${OBSERVE:-on}
case "$OBSERVE" in
  on) LOG_LEVEL=info; OBSERVE_YAML="metrics: { enabled: true }
log: { access: true }" ;;
  metrics) LOG_LEVEL=info; OBSERVE_YAML="metrics: { enabled: true }
log: { access: false }" ;;
  off) LOG_LEVEL=warn; OBSERVE_YAML="metrics: { enabled: false }
log: { access: false }" ;;
  *) echo "OBSERVE must be on, metrics or off" >&2; exit 2 ;;
esac
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
  log_level: $LOG_LEVEL
database: { path: "$work/tollgate.db" }
channels:
  - { name: mock, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-bench", models: [gpt-4o-mini], max_concurrency: 4096 }
pricing:
  models: { gpt-4o-mini: { input: 0.15, output: 0.60 } }
limits:
  default: { rpm: 100000000, tpm: 2000000000, concurrency: 4096 }
  ip: { rps: 100000000 }
$OBSERVE_YAML
EOF
"$TG" --config "$work/tollgate.yaml" accounts create bench --balance-usd 1000000 >/dev/null
KEY=$("$TG" --config "$work/tollgate.yaml" keys create --account bench | tail -n1)
"$TG" serve --config "$work/tollgate.yaml" >"$work/gw.log" 2>&1 & pids+=($!)
GW_PID=$!
CLK_TCK=$(getconf CLK_TCK)
# user + system CPU ticks of the gateway process
gw_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
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
  local rps p50 p99 cpu=""
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  if [ -n "${4:-}" ]; then
    local n ticks
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    ticks=$(( $(gw_ticks) - $4 ))
    cpu=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "   gateway CPU %.1f us/req", t / hz * 1e6 / n }')
  fi
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  printf '%-10s c=%-3s %10s req/s   p50 %-8s p99 %-8s%s\n' "$1" "$3" "$rps" "$p50" "$p99" "$cpu"
}
curl -fsS -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "http://127.0.0.1:$GW_PORT/v1/chat/completions"
run direct "http://127.0.0.1:$MOCK_PORT" 32
echo "observe: $OBSERVE"
run tollgate "http://127.0.0.1:$GW_PORT" 32 "$(gw_ticks)"
run direct "http://127.0.0.1:$MOCK_PORT" 1
run tollgate "http://127.0.0.1:$GW_PORT" 1 "$(gw_ticks)"
