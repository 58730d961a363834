#!/usr/bin/env bash
# The admission queue's cost, on loopback, through the release binaries:
#   (1) nothing waits (max_concurrency 4096): closed loop, queue on and off; req/s, p50 and
#       the gateway's CPU per request, and the difference: the queue's added cost per
#       admitted request;
#   (2) a saturated channel (max_concurrency 8, the mock answering in 5 ms), 64 connections:
#       with the queue every request waits its turn and is served; without it the excess
#       is refused at once (503). Served req/s and refusals for both.
#
#   bench/queue.sh                          build, run (~30 s)
#   DURATION=10s SKIP_BUILD=1 bench/queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET_DIR/release}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -p tollgate -p tollgate-bench --bins
fi
work=$(mktemp -d)
MOCK_PID=; TG_PID=
stop() { local p; for p in "$@"; do [ -n "$p" ] && kill -INT "$p" 2>/dev/null || true; done
  for p in "$@"; do [ -n "$p" ] || continue
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap 'stop "$TG_PID" "$MOCK_PID"; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1"; exit 1; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
HZ=$(getconf CLK_TCK)

MOCK_PORT=$(free_port)
"$BIN/tollgate-mock" --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.log" 2>&1 & MOCK_PID=$!
wait_http "http://127.0.0.1:$MOCK_PORT/v1/models"

start() { # queue-enabled max-concurrency
  stop "$TG_PID"
  GW_PORT=$(free_port); ADMIN_PORT=$(free_port)
  rm -f "$work"/tollgate.db*
  cat >"$work/tollgate.yaml" <<EOF
server: { listen: "127.0.0.1:$GW_PORT", admin_listen: "127.0.0.1:$ADMIN_PORT", threads: $THREADS, log_level: warn }
database: { path: "$work/tollgate.db" }
channels:
  - { name: mock, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-bench", models: [gpt-4o-mini], max_concurrency: $2 }
pricing: { models: { gpt-4o-mini: { input: 0.15, output: 0.60 } } }
limits: { default: { rpm: 100000000, tpm: 2000000000 } }
queue: { enabled: $1, max_depth: 4096 }
EOF
  "$BIN/tollgate" --config "$work/tollgate.yaml" accounts create bench --balance-usd 1000000 >/dev/null
  KEY=$("$BIN/tollgate" --config "$work/tollgate.yaml" keys create --account bench | tail -n1)
  "$BIN/tollgate" serve --config "$work/tollgate.yaml" >"$work/gw.log" 2>&1 & TG_PID=$!
  wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"
}

run() { # label body
  local t0 t1 out
  t0=$(ticks "$TG_PID")
  out=$(TOLLGATE_KEY=$KEY "$BIN/tollgate-loadgen" "http://127.0.0.1:$GW_PORT/v1/chat/completions" \
    --json --label "$1" --connections "$CONNS" --duration "$DURATION" --warmup 1s --body "$2" || true)
  t1=$(ticks "$TG_PID")
  python3 - "$out" "$((t1 - t0))" "$HZ" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); ticks = int(sys.argv[2]); hz = int(sys.argv[3])
secs = float(r.get("duration_s") or 0) or None
served = r["ok"]
cpu_us = ticks / hz * 1e6 / max(served, 1)
errs = ",".join(f"{k}={v}" for k, v in (r.get("errors") or {}).items()) or "none"
p50 = (r.get("latency_us") or {}).get("p50")
print(f"| {r['label']} | {r['rps']:.0f} | {p50} us | {cpu_us:.0f} us | {errs} |")
PY
}

FAST='{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
SLOW='{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}],"x_mock":{"delay_ms":5}}'
echo "| run | served req/s | p50 | gateway CPU per served request (incl. warm-up) | refusals/errors |"
echo "|---|---|---|---|---|"
start true 4096;  run "nothing waits, queue on" "$FAST"
start false 4096; run "nothing waits, queue off" "$FAST"
start true 8;     run "saturated (8 slots, 5 ms), queue on" "$SLOW"
start false 8;    run "saturated (8 slots, 5 ms), queue off" "$SLOW"
