#!/usr/bin/env bash
# HTTP/1.1 against HTTP/2 to the provider, with many concurrent streams, on loopback through
# the release binaries. The mock speaks both (h2c by prior knowledge, HTTP/1.1 otherwise);
# the gateway's channel is `http2: off` (a connection per stream) or `http2: on` with
# `max_h2_streams` (streams share connections). Clients reach the gateway over HTTP/1.1
# keep-alive connections, one stream each at a time (the loadgen, closed loop).
# Printed per mode: upstream connections (the mock's count: accepted, and the most open at
# once), the gateway's peak RSS (VmHWM), its CPU per stream, and the client-side time to
# first byte and gap between chunks (p50/p99). Numbers only, no assertions.
#
#   bench/h2.sh                                 build, run (~40 s)
#   STREAMS=1000 DURATION=20s SKIP_BUILD=1 bench/h2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS=${STREAMS:-500}          # concurrent client streams (loadgen connections)
CHUNKS=${CHUNKS:-50}             # content chunks per stream
DELAY_MS=${DELAY_MS:-20}         # between chunks, at the mock
MAX_H2_STREAMS=${MAX_H2_STREAMS:-100}
DURATION=${DURATION:-10s}
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

start() { # channel-options
  stop "$TG_PID" "$MOCK_PID"
  # A fresh mock per mode, so its connection counts are this mode's alone.
  MOCK_PORT=$(free_port)
  "$BIN/tollgate-mock" --h2 --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.log" 2>&1 & MOCK_PID=$!
  wait_http "http://127.0.0.1:$MOCK_PORT/mock/stats"
  GW_PORT=$(free_port); ADMIN_PORT=$(free_port)
  rm -f "$work"/tollgate.db*
  cat >"$work/tollgate.yaml" <<YAML
server: { listen: "127.0.0.1:$GW_PORT", admin_listen: "127.0.0.1:$ADMIN_PORT", threads: $THREADS, log_level: warn, connections: { max_connections: 20000 } }
database: { path: "$work/tollgate.db" }
log: { access: false }
channels:
  - { name: mock, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-bench", models: [gpt-4o-mini], max_concurrency: 8192, $1 }
pricing: { models: { gpt-4o-mini: { input: 0.15, output: 0.60 } } }
limits: { default: { rpm: 100000000, tpm: 2000000000, concurrency: 8192 } }
queue: { max_depth: 8192 }
YAML
  "$BIN/tollgate" --config "$work/tollgate.yaml" accounts create bench --balance-usd 1000000 >/dev/null
  KEY=$("$BIN/tollgate" --config "$work/tollgate.yaml" keys create --account bench | tail -n1)
  "$BIN/tollgate" serve --config "$work/tollgate.yaml" >"$work/gw.log" 2>&1 & TG_PID=$!
  wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"
}

run() { # label
  local t0 t1 out stats before hwm
  before=$(curl -s "http://127.0.0.1:$MOCK_PORT/mock/stats")
  t0=$(ticks "$TG_PID")
  out=$(TOLLGATE_KEY=$KEY "$BIN/tollgate-loadgen" "http://127.0.0.1:$GW_PORT/v1/chat/completions" \
    --json --label "$1" --connections "$STREAMS" --duration "$DURATION" --warmup 2s --threads 2 \
    --stream --chunks "$CHUNKS" --chunk-delay-ms "$DELAY_MS" --timeout-ms 60000 || true)
  t1=$(ticks "$TG_PID")
  stats=$(curl -s "http://127.0.0.1:$MOCK_PORT/mock/stats")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$TG_PID/status")
  python3 - "$out" "$stats" "$hwm" "$((t1 - t0))" "$HZ" "$before" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); m = json.loads(sys.argv[2])
hwm_mib = int(sys.argv[3]) / 1024; ticks = int(sys.argv[4]); hz = int(sys.argv[5])
# The gateway's connections alone: less the ones before the run and the stats request itself.
m["accepted"] -= json.loads(sys.argv[6])["accepted"] + 1
cpu_us = ticks / hz * 1e6 / max(r["ok"], 1)
ttfb = r.get("ttfb_us") or {}; gap = r.get("chunk_gap_us") or {}
errs = ",".join(f"{k}={v}" for k, v in (r.get("errors") or {}).items()) or "none"
print(f"| {r['label']} | {r['ok']} | {m['accepted']} / {m['peak']} (h2: {m['h2']}) | {hwm_mib:.1f} MiB "
      f"| {cpu_us:.0f} us | {ttfb.get('p50')} / {ttfb.get('p99')} us | {gap.get('p50')} / {gap.get('p99')} us | {errs} |")
PY
}

echo "$STREAMS concurrent streams, $CHUNKS chunks ${DELAY_MS} ms apart, $DURATION measured (+2 s warm-up), gateway threads: $THREADS"
echo
echo "| upstream | streams done | upstream connections accepted / peak open | gateway peak RSS | gateway CPU per stream (incl. warm-up) | TTFB p50 / p99 | chunk gap p50 / p99 | errors |"
echo "|---|---|---|---|---|---|---|---|"
start "http2: off"; run "HTTP/1.1 (http2: off)"
start "http2: on, max_h2_streams: $MAX_H2_STREAMS"; run "h2c (http2: on, max_h2_streams: $MAX_H2_STREAMS)"
