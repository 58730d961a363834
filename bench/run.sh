#!/usr/bin/env bash
# tollgate benchmark scenarios, all in one run, on loopback only: the same load against
#   direct      the mock upstream (tollgate-mock),
#   passthrough a bare Pingora proxy in front of it (tollgate-passthrough: the floor),
#   tollgate    the gateway in front of it (auth, limits, billing, relay),
# with tollgate's server.threads and the pass-through's --threads equal. Scenarios:
#   (a) non-streaming, open loop at fixed rates: p50/p99/p99.9 and what tollgate adds over
#       the pass-through (latency from each request's intended send time); then one request
#       at a time (closed loop, one connection, the row "c=1");
#   (b) saturation, closed loop, at 1 and 2 proxy threads: req/s and the ratio to the pass-through;
#   (c) streaming, 50 chunks: time to first byte and the per-chunk gap, and what tollgate adds;
#   (d) 1,000 concurrent long streams: resident memory and open file descriptors of the
#       proxy, at rest, at the peak and after (pass-through and tollgate);
#   (e) features: tollgate saturated (closed loop, one proxy thread) with each optional
#       part switched off in turn: req/s and proxy CPU per request; a part's cost is the
#       difference to "all on";
#   (f) a flood of unknown keys (FLOOD_KEYS distinct ones, cycled), with the pre-auth guard
#       on and off: req/s refused, and the key lookups that reached SQLite
#       (tollgate_key_store_lookups_total) against the bound (distinct keys per
#       negative-cache TTL);
#   (g) the response cache (memory backend): the same request answered from the cache
#       (`x-tollgate-cache: on`, every answer after the first a hit) against the uncached
#       path (`x-tollgate-cache: off`) and the pass-through, closed loop and one at a time;
#       then `backend: redis`: hits from the node's own tier, and hits served from Redis
#       (a node whose own tier keeps nothing, reading what another stored);
#   (h) scale-out: one node on SQLite; one node on PostgreSQL + Redis; three nodes on
#       PostgreSQL + Redis (one loadgen per node, SAT_CONNS split between them), closed
#       loop: req/s in all, the worst node's p50/p99, and Redis calls and PostgreSQL
#       transactions per request (tollgate_redis_calls_total and pg_stat_database's
#       xact_commit over the run). Needs redis-server and PostgreSQL on 127.0.0.1:5432
#       (trust auth, user postgres), as the tests do; the database is made and dropped.
# Every answer must be a 2xx: a run with any non-2xx, transport error, timeout, truncated
# stream or (open loop) slot it could not send in time is marked INVALID, and the script
# then exits 1 after printing every table.
#
#   bench/run.sh                         build release binaries, run everything (~1.5 min)
#   DURATION=30s bench/run.sh            longer runs
#   SCENARIOS="a c" bench/run.sh         a subset
#   Knobs (defaults): DURATION=5s WARMUP=1s RATES="1000 5000" CONNS=64 THREADS=2
#     SAT_THREADS="1 2" SAT_CONNS=64 STREAM_RATE=50 STREAM_CONNS=64 CHUNKS=50 CHUNK_DELAY_MS=10
#     MEM_STREAMS=1000 MEM_CHUNKS=100 MEM_CHUNK_DELAY_MS=50
#     FLOOD_KEYS=1000 FLOOD_CONNS=64
#     CHART=bench/latency.svg (scenario a's percentiles drawn by tollgate-chart)
#     LOADGEN_THREADS=1 SKIP_BUILD= CARGO_TARGET_DIR=target BIN=$CARGO_TARGET_DIR/release
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"   # (d) holds thousands of sockets
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
RATES=${RATES:-1000 5000}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
SAT_THREADS=${SAT_THREADS:-1 2}
SAT_CONNS=${SAT_CONNS:-64}
STREAM_RATE=${STREAM_RATE:-50}
STREAM_CONNS=${STREAM_CONNS:-64}
CHUNKS=${CHUNKS:-50}
CHUNK_DELAY_MS=${CHUNK_DELAY_MS:-10}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
MEM_STREAMS=${MEM_STREAMS:-1000}
MEM_CHUNKS=${MEM_CHUNKS:-100}
MEM_CHUNK_DELAY_MS=${MEM_CHUNK_DELAY_MS:-50}
FLOOD_KEYS=${FLOOD_KEYS:-1000}
FLOOD_CONNS=${FLOOD_CONNS:-64}
SCENARIOS=${SCENARIOS:-a b c d e f g h}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET_DIR/release}

if [ -z "${SKIP_BUILD:-}" ]; then
  # One build of both packages, so Pingora is compiled once with one feature set.
  cargo build --release -p tollgate -p tollgate-bench --bins
fi
for b in tollgate tollgate-mock tollgate-passthrough tollgate-loadgen tollgate-chart; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (build first or unset SKIP_BUILD)"; exit 1; }
done

work=$(mktemp -d)
MOCK_PID=; PT_PID=; TG_PID=; FLEET_PIDS=; REDIS_PID=; PG_DB=
stop() { # pid...: SIGINT is Pingora's fast shutdown (and the mock's ctrl-c); KILL after 5 s
  local p
  for p in "$@"; do [ -n "$p" ] && kill -INT "$p" 2>/dev/null || true; done
  for p in "$@"; do
    [ -n "$p" ] || continue
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}
cleanup() {
  stop "$TG_PID" "$PT_PID" "$MOCK_PID" ${FLEET_PIDS:-} ${REDIS_PID:-}
  if [ -n "${PG_DB:-}" ]; then
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url
  for _ in $(seq 100); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "no answer from $1"; exit 1
}
MOCK_PORT=$(free_port)
"$BIN/tollgate-mock" --listen "127.0.0.1:$MOCK_PORT" >"$work/mock.log" 2>&1 & MOCK_PID=$!
wait_http "http://127.0.0.1:$MOCK_PORT/v1/models"

# tollgate's optional parts, all on; scenario (e) switches them off one at a time.
FEATURES_ON='log: { access: true }
metrics: { enabled: true }
queue: { enabled: true }
limits:
  default: { rpm: 100000000, tpm: 2000000000, concurrency: 4096 }
  ip: { failed_auth_per_min: 100000000 }
pricing:
  models: { gpt-4o-mini: { input: 0.15, output: 0.60 } }'
FEATURES=$FEATURES_ON

start_proxies() { # threads
  local t=$1
  stop "$TG_PID" "$PT_PID"
  PT_PORT=$(free_port); GW_PORT=$(free_port); ADMIN_PORT=$(free_port)
  "$BIN/tollgate-passthrough" --listen "127.0.0.1:$PT_PORT" --upstream "127.0.0.1:$MOCK_PORT" \
    --threads "$t" >"$work/pt.log" 2>&1 & PT_PID=$!
  rm -f "$work"/tollgate.db*
  cat >"$work/tollgate.yaml" <<EOF
server:
  listen: "127.0.0.1:$GW_PORT"
  admin_listen: "127.0.0.1:$ADMIN_PORT"
  threads: $t
  upstream_keepalive_pool_size: 128
  log_level: warn
database: { path: "$work/tollgate.db" }
channels:
  - { name: mock, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-bench", models: [gpt-4o-mini], max_concurrency: 4096 }
$FEATURES
EOF
  "$BIN/tollgate" --config "$work/tollgate.yaml" accounts create bench --balance-usd 1000000 >/dev/null
  KEY=$("$BIN/tollgate" --config "$work/tollgate.yaml" keys create --account bench | tail -n1)
  "$BIN/tollgate" serve --config "$work/tollgate.yaml" >"$work/gw.log" 2>&1 & TG_PID=$!
  wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
  wait_http "http://127.0.0.1:$PT_PORT/v1/models"
  curl -fsS -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' \
    "http://127.0.0.1:$GW_PORT/v1/chat/completions" || { echo "tollgate smoke request failed"; cat "$work/gw.log"; exit 1; }
}

url_of() { # direct|passthrough|tollgate
  case $1 in
    direct) echo "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" ;;
    passthrough) echo "http://127.0.0.1:$PT_PORT/v1/chat/completions" ;;
    tollgate) echo "http://127.0.0.1:$GW_PORT/v1/chat/completions" ;;
  esac
}

# Several nodes on one database and one Redis: FLEET_PORTS / FLEET_ADMIN / FLEET_PIDS.
start_redis() {
  [ -n "${REDIS_PID:-}" ] && return 0
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 & REDIS_PID=$!
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.05; done
  echo "redis-server did not start"; exit 1
}
start_fleet() { # n database-yaml extra-yaml
  local n=$1 db=$2 extra=$3 i port admin
  stop ${FLEET_PIDS:-}
  FLEET_PORTS=(); FLEET_ADMIN=(); FLEET_PIDS=""
  for i in $(seq 0 $((n - 1))); do
    port=$(free_port); admin=$(free_port)
    cat >"$work/node$i.yaml" <<EOF
server:
  listen: "127.0.0.1:$port"
  admin_listen: "127.0.0.1:$admin"
  threads: 1
  upstream_keepalive_pool_size: 128
  log_level: warn
database: $db
channels:
  - { name: mock, base_url: "http://127.0.0.1:$MOCK_PORT", api_key: "sk-bench", models: [gpt-4o-mini], max_concurrency: 4096 }
$FEATURES_ON
$extra
EOF
    if [ "$i" = 0 ]; then
      # (A database shared with an earlier fleet already has the account.)
      "$BIN/tollgate" --config "$work/node0.yaml" accounts create bench --balance-usd 1000000 >/dev/null 2>&1 || true
      KEY=$("$BIN/tollgate" --config "$work/node0.yaml" keys create --account bench | tail -n1)
    fi
    "$BIN/tollgate" serve --config "$work/node$i.yaml" >"$work/node$i.log" 2>&1 &
    FLEET_PIDS="$FLEET_PIDS $!"
    FLEET_PORTS+=("$port"); FLEET_ADMIN+=("$admin")
    wait_http "http://127.0.0.1:$admin/healthz"
  done
}
metric_sum() { # name: summed over the fleet's nodes
  local a
  for a in "${FLEET_ADMIN[@]}"; do curl -s "http://127.0.0.1:$a/metrics"; done |
    awk -v n="$1" 'index($0, n) == 1 { s += $NF } END { print s + 0 }'
}
pg_commits() {
  local v=
  [ -n "${PG_DB:-}" ] && v=$(psql -At -h 127.0.0.1 -U postgres -c "SELECT xact_commit FROM pg_stat_database WHERE datname = '$PG_DB'" 2>/dev/null)
  echo "${v:-0}"
}
fleet_load() { # label [loadgen-args...]: one loadgen per node at once, SAT_CONNS split between them
  local label=$1 n=${#FLEET_PORTS[@]} i r0 r1 p0 p1 pids=""
  shift
  local conns=$(( (SAT_CONNS + n - 1) / n ))
  r0=$(metric_sum tollgate_redis_calls_total); p0=$(pg_commits)
  for i in $(seq 0 $((n - 1))); do
    TOLLGATE_KEY=$KEY "$BIN/tollgate-loadgen" "http://127.0.0.1:${FLEET_PORTS[$i]}/v1/chat/completions" --json \
      --label "$label:node$i" --threads "$LOADGEN_THREADS" --duration "$DURATION" --warmup "$WARMUP" \
      --connections "$conns" "$@" >"$work/fleet$i.json" & pids="$pids $!"
  done
  for p in $pids; do wait "$p" || true; done
  r1=$(metric_sum tollgate_redis_calls_total); p1=$(pg_commits)
  python3 - "$label" "$r0" "$r1" "$p0" "$p1" "$work"/fleet*.json >>"$FLEET_RESULTS" <<'PY'
import json, sys
label, r0, r1, p0, p1 = sys.argv[1], *map(float, sys.argv[2:6])
rows = [json.loads(open(f).read()) for f in sys.argv[6:]]
# Requests over the whole run (warm-up included), as the counters count them.
sent = sum(r.get("ok", 0) for r in rows) or 1
print(json.dumps({"label": label, "rps": sum(r["rps"] for r in rows),
  "p50": max((r.get("latency_us") or {}).get("p50") or 0 for r in rows),
  "p99": max((r.get("latency_us") or {}).get("p99") or 0 for r in rows),
  "redis_per_req": (r1 - r0) / sent, "pg_per_req": (p1 - p0) / sent,
  "valid": all(r["valid"] for r in rows),
  "errors": {k: v for r in rows for k, v in r["errors"].items()}}))
PY
  rm -f "$work"/fleet*.json
}

RESULTS=$work/results.jsonl
: >"$RESULTS"
CPU=$work/cpu.jsonl
: >"$CPU"
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
load() { # label target loadgen-args...
  local label=$1 target=$2 proxy=; shift 2
  case $target in passthrough) proxy=$PT_PID ;; tollgate) proxy=$TG_PID ;; esac
  echo "  $label ..." >&2
  local m0 p0 t0 m1 p1 t1
  m0=$(ticks "$MOCK_PID"); p0=$([ -n "$proxy" ] && ticks "$proxy" || echo 0); t0=$(date +%s.%N)
  # Exit status 2 is an invalid run: it is kept (valid=false) and reported in the table.
  TOLLGATE_KEY=$KEY "$BIN/tollgate-loadgen" "$(url_of "$target")" --json --label "$label" \
    --threads "$LOADGEN_THREADS" --duration "${LOAD_DURATION:-$DURATION}" --warmup "${LOAD_WARMUP:-$WARMUP}" "$@" >>"$RESULTS" || [ $? -eq 2 ]
  m1=$(ticks "$MOCK_PID"); p1=$([ -n "$proxy" ] && ticks "$proxy" || echo 0); t1=$(date +%s.%N)
  # CPU share of one core (warm-up included) of the mock and of the proxy under test.
  awk -v l="$label" -v m="$((m1 - m0))" -v p="$((p1 - p0))" -v t0="$t0" -v t1="$t1" \
    'BEGIN { printf "{\"label\":\"%s\",\"mock_cpu_pct\":%.1f,\"proxy_cpu_pct\":%.1f}\n", l, m/(t1-t0), p/(t1-t0) }' >>"$CPU"
}

table() { # scenario-letter
  python3 - "$RESULTS" "$1" "$CPU" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = {c["label"]: c for c in (json.loads(l) for l in open(sys.argv[3]) if l.strip())}
for r in rows:
    r.update(cpu.get(r["label"], {}))
sc = sys.argv[2]
rows = [r for r in rows if r["label"].split(":")[0] == sc]
def key(r):  # scenario:group:target
    _, group, target = r["label"].split(":")
    return group, target
by = {key(r): r for r in rows}
def q(r, h, p):
    v = (r.get(h) or {}).get(p)
    return v
def us(v): return "-" if v is None else (f"{v/1000:.2f} ms" if v >= 10000 else f"{v} us")
def delta(a, b):
    return "-" if a is None or b is None else f"{a-b:+d} us"
def cpus(r):
    f = lambda v: "-" if v is None else f"{v:.0f}"
    return f"{f(r.get('loadgen_cpu_pct'))} / {f(r.get('mock_cpu_pct'))} / {f(r.get('proxy_cpu_pct')) if key(r)[1] != 'direct' else '-'}"
def valid(r):
    if r["valid"]: return "ok"
    return "INVALID " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
groups = []
for r in rows:
    g = key(r)[0]
    if g not in groups: groups.append(g)
out = []
if sc == "a":
    out.append("| rate (req/s) | target | achieved req/s | p50 | p99 | p99.9 | max | tollgate adds p50 | adds p99 | adds p99.9 | run |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for g in groups:
        pt = by.get((g, "passthrough"))
        for t in ("direct", "passthrough", "tollgate"):
            r = by.get((g, t))
            if not r: continue
            adds = ["", "", ""]
            if t == "tollgate" and pt:
                adds = [delta(q(r, "latency_us", p), q(pt, "latency_us", p)) for p in ("p50", "p99", "p99_9")]
            out.append(f"| {g} | {t} | {r['rps']:.0f} | " + " | ".join(us(q(r, "latency_us", p)) for p in ("p50", "p99", "p99_9", "max"))
                       + f" | {' | '.join(adds)} | {valid(r)} |")
elif sc == "b":
    out.append("| proxy threads | target | req/s | p50 | p99 | vs pass-through | CPU% loadgen / mock / proxy | run |")
    out.append("|---|---|---|---|---|---|---|---|")
    for g in groups:
        pt = by.get((g, "passthrough"))
        for t in ("direct", "passthrough", "tollgate"):
            r = by.get((g, t))
            if not r: continue
            ratio = f"{r['rps']/pt['rps']:.2f}x" if pt and pt["rps"] else "-"
            out.append(f"| {g} | {t} | {r['rps']:.0f} | {us(q(r, 'latency_us', 'p50'))} | {us(q(r, 'latency_us', 'p99'))} | {ratio} | {cpus(r)} | {valid(r)} |")
elif sc == "c":
    out.append("| streams/s | target | ok streams | TTFB p50 | TTFB p99 | gap p50 | gap p99 | tollgate adds TTFB p50 | adds TTFB p99 | adds gap p50 | adds gap p99 | run |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for g in groups:
        pt = by.get((g, "passthrough"))
        for t in ("direct", "passthrough", "tollgate"):
            r = by.get((g, t))
            if not r: continue
            adds = ["", "", "", ""]
            if t == "tollgate" and pt:
                adds = [delta(q(r, h, p), q(pt, h, p)) for h, p in
                        (("ttfb_us", "p50"), ("ttfb_us", "p99"), ("chunk_gap_us", "p50"), ("chunk_gap_us", "p99"))]
            out.append(f"| {g} | {t} | {r['ok']} | {us(q(r, 'ttfb_us', 'p50'))} | {us(q(r, 'ttfb_us', 'p99'))} | "
                       f"{us(q(r, 'chunk_gap_us', 'p50'))} | {us(q(r, 'chunk_gap_us', 'p99'))} | {' | '.join(adds)} | {valid(r)} |")
print("\n".join(out))
PY
}

echo "# tollgate benchmark  $(date -u '+%Y-%m-%d %H:%M UTC')  nproc=$(nproc)  DURATION=$DURATION"
if [[ " $SCENARIOS " == *" a "* || " $SCENARIOS " == *" c "* ]]; then
  start_proxies "$THREADS"
fi
if [[ " $SCENARIOS " == *" a "* ]]; then
  echo; echo "## (a) non-streaming, open loop, $CONNS connections, proxy threads $THREADS (latency from intended send)"
  for rate in $RATES; do
    for t in direct passthrough tollgate; do
      load "a:$rate:$t" "$t" --rate "$rate" --connections "$CONNS"
    done
  done
  # One request at a time (closed loop, one connection): the latency each hop adds alone.
  for t in direct passthrough tollgate; do
    load "a:c=1:$t" "$t" --connections 1
  done
  table a
  if [ -n "${CHART:-}" ]; then
    "$BIN/tollgate-chart" "$RESULTS" "$CHART" && echo && echo "chart: $CHART"
  fi
fi
if [[ " $SCENARIOS " == *" c "* ]]; then
  echo; echo "## (c) streaming, $CHUNKS chunks ${CHUNK_DELAY_MS} ms apart, open loop at $STREAM_RATE streams/s, proxy threads $THREADS"
  for t in direct passthrough tollgate; do
    load "c:$STREAM_RATE:$t" "$t" --rate "$STREAM_RATE" --connections "$STREAM_CONNS" \
      --stream --chunks "$CHUNKS" --chunk-delay-ms "$CHUNK_DELAY_MS"
  done
  table c
fi
if [[ " $SCENARIOS " == *" b "* ]]; then
  echo; echo "## (b) saturation, closed loop, $SAT_CONNS connections, loadgen threads $LOADGEN_THREADS"
  for th in $SAT_THREADS; do
    start_proxies "$th"
    for t in direct passthrough tollgate; do
      load "b:$th:$t" "$t" --connections "$SAT_CONNS"
    done
  done
  table b
fi

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
if [[ " $SCENARIOS " == *" d "* ]]; then
  echo; echo "## (d) $MEM_STREAMS concurrent streams ($MEM_CHUNKS chunks ${MEM_CHUNK_DELAY_MS} ms apart), proxy threads $THREADS"
  MEM=$work/mem.jsonl; : >"$MEM"
  start_proxies "$THREADS"
  for t in passthrough tollgate; do
    pid=$PT_PID; [ "$t" = tollgate ] && pid=$TG_PID
    rest_rss=$(rss_kb "$pid"); rest_fds=$(fds "$pid")
    peak=$work/peak.$t; echo "0 0" >"$peak"
    ( for _ in $(seq 3000); do  # at most 10 min; killed when the load below ends
        kill -0 "$pid" 2>/dev/null || break
        echo "$(rss_kb "$pid") $(fds "$pid")" >>"$peak"; sleep 0.2
      done ) & SAMPLER=$!
    stream_s=$(( MEM_CHUNKS * MEM_CHUNK_DELAY_MS / 1000 + 2 ))
    LOAD_DURATION=${stream_s}s LOAD_WARMUP=0s load "d:$MEM_STREAMS:$t" "$t" --connections "$MEM_STREAMS" \
      --stream --chunks "$MEM_CHUNKS" --chunk-delay-ms "$MEM_CHUNK_DELAY_MS" --timeout-ms 60000
    kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true
    sleep 2
    after_rss=$(rss_kb "$pid"); after_fds=$(fds "$pid")
    awk -v t="$t" -v rr="$rest_rss" -v rf="$rest_fds" -v ar="$after_rss" -v af="$after_fds" \
      '{ if ($1 > mr) mr = $1; if ($2 > mf) mf = $2 }
       END { printf "{\"target\":\"%s\",\"rest_kb\":%d,\"rest_fds\":%d,\"peak_kb\":%d,\"peak_fds\":%d,\"after_kb\":%d,\"after_fds\":%d}\n", t, rr, rf, mr, mf, ar, af }' \
      "$peak" >>"$MEM"
  done
  python3 - "$MEM" "$RESULTS" <<'PY'
import json, sys
mem = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
res = {r["label"].split(":")[2]: r for r in (json.loads(l) for l in open(sys.argv[2]) if l.strip()) if r["label"].startswith("d:")}
mib = lambda kb: f"{kb/1024:.1f} MiB"
print("| target | streams ok | RSS at rest | RSS peak | RSS 2 s after | fds at rest | fds peak | fds after | run |")
print("|---|---|---|---|---|---|---|---|---|")
for m in mem:
    r = res.get(m["target"], {})
    ok = "ok" if r.get("valid") else "INVALID " + ",".join(f"{k}={v}" for k, v in r.get("errors", {}).items())
    print(f"| {m['target']} | {r.get('ok', '-')} | {mib(m['rest_kb'])} | {mib(m['peak_kb'])} | {mib(m['after_kb'])} | {m['rest_fds']} | {m['peak_fds']} | {m['after_fds']} | {ok} |")
PY
fi
if [[ " $SCENARIOS " == *" e "* ]]; then
  echo; echo "## (e) features, saturation (closed loop, $SAT_CONNS connections), proxy threads 1: CPU per request"
  variants=("all on" "access log off" "metrics off" "queue off" "no limits" "no prices (free)" "all optional off")
  for v in "${variants[@]}"; do
    FEATURES=$FEATURES_ON
    case $v in
      "access log off") FEATURES=${FEATURES/"log: { access: true }"/"log: { access: false }"} ;;
      "metrics off") FEATURES=${FEATURES/"metrics: { enabled: true }"/"metrics: { enabled: false }"} ;;
      "queue off") FEATURES=${FEATURES/"queue: { enabled: true }"/"queue: { enabled: false }"} ;;
      "no limits") FEATURES=${FEATURES/"default: { rpm: 100000000, tpm: 2000000000, concurrency: 4096 }"/"default: {}"} ;;
      "no prices (free)") FEATURES=${FEATURES/"models: { gpt-4o-mini: { input: 0.15, output: 0.60 } }"/"unpriced: free"} ;;
      "all optional off")
        FEATURES='log: { access: false }
metrics: { enabled: false }
queue: { enabled: false }
limits: { default: {}, ip: { failed_auth_per_min: 0 } }
pricing: { unpriced: free }' ;;
    esac
    start_proxies 1
    [ "$v" = "all on" ] && load "e:floor:passthrough" passthrough --connections "$SAT_CONNS"
    load "e:$v:tollgate" tollgate --connections "$SAT_CONNS"
  done
  FEATURES=$FEATURES_ON
  python3 - "$RESULTS" "$CPU" "$DURATION" "$WARMUP" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and json.loads(l)["label"].startswith("e:")]
cpu = {c["label"]: c for c in (json.loads(l) for l in open(sys.argv[2]) if l.strip())}
secs = lambda d: float(d[:-2]) / 1000 if d.endswith("ms") else float(d.rstrip("s"))
span = secs(sys.argv[3]) + secs(sys.argv[4])
def per_req(r):  # saturated: CPU seconds per second over requests per second
    c = cpu.get(r["label"], {}).get("proxy_cpu_pct")
    return None if c is None or not r["rps"] else c / 100 * 1e6 / r["rps"]
base = None
print("| configuration | req/s | vs pass-through | proxy CPU per request | cost of the part switched off | run |")
print("|---|---|---|---|---|---|")
floor = next((r for r in rows if r["label"] == "e:floor:passthrough"), None)
for r in rows:
    name = r["label"].split(":")[1]
    u = per_req(r)
    if name == "all on": base = u
    cost = "" if name in ("floor", "all on") or u is None or base is None else f"{base - u:+.1f} us"
    ratio = f"{r['rps'] / floor['rps']:.2f}x" if floor and floor["rps"] else "-"
    valid = "ok" if r["valid"] else "INVALID " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
    label = "pass-through (floor)" if name == "floor" else name
    print(f"| {label} | {r['rps']:.0f} | {ratio} | {'-' if u is None else f'{u:.1f} us'} | {cost} | {valid} |")
PY
fi
if [[ " $SCENARIOS " == *" f "* ]]; then
  echo; echo "## (f) a flood of $FLOOD_KEYS distinct unknown keys, closed loop, $FLOOD_CONNS connections, proxy threads $THREADS"
  FLOOD=$work/flood.jsonl; : >"$FLOOD"
  lookups() {
    curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" \
      | awk '/^tollgate_key_store_lookups_total/ { n += $2 } END { print n + 0 }'
  }
  for guard in on off "off, access log off"; do
    FEATURES=$FEATURES_ON
    [ "$guard" = on ] && FEATURES=${FEATURES/"failed_auth_per_min: 100000000"/"failed_auth_per_min: 120"}
    [ "$guard" != on ] && FEATURES=${FEATURES/"failed_auth_per_min: 100000000"/"failed_auth_per_min: 0"}
    [ "$guard" = "off, access log off" ] && FEATURES=${FEATURES/"log: { access: true }"/"log: { access: false }"}
    start_proxies "$THREADS"
    [ "$guard" = on ] && KEY=sk-tg-flood load "f:floor:passthrough" passthrough --connections "$FLOOD_CONNS" --distinct-keys "$FLOOD_KEYS"
    before=$(lookups)
    KEY=sk-tg-flood load "f:guard $guard:tollgate" tollgate --connections "$FLOOD_CONNS" \
      --distinct-keys "$FLOOD_KEYS" --expect 401 --expect 429
    echo "{\"guard\":\"$guard\",\"lookups\":$(( $(lookups) - before ))}" >>"$FLOOD"
  done
  FEATURES=$FEATURES_ON
  ttl_ms=2000   # auth.negative_cache_ttl_ms, the default
  python3 - "$RESULTS" "$FLOOD" "$DURATION" "$WARMUP" "$FLOOD_KEYS" "$ttl_ms" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and json.loads(l)["label"].startswith("f:")]
look = {f["guard"]: f["lookups"] for f in (json.loads(l) for l in open(sys.argv[2]) if l.strip())}
secs = lambda d: float(d[:-2]) / 1000 if d.endswith("ms") else float(d.rstrip("s"))
span = secs(sys.argv[3]) + secs(sys.argv[4])
keys, ttl = int(sys.argv[5]), int(sys.argv[6]) / 1000
bound = keys * (math.floor(span / ttl) + 1)
pt = next((r for r in rows if r["label"] == "f:floor:passthrough"), None)
print(f"| target | answered req/s | statuses | vs pass-through | SQLite key lookups | bound ({keys} keys x {span:g} s / {ttl:g} s TTL) | run |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    name = r["label"].split(":")[1]
    st = ", ".join(f"{k}: {v}" for k, v in sorted(r.get("status", {}).items()))
    ratio = f"{r['rps']/pt['rps']:.2f}x" if pt and name != "floor" else ""
    g = name.replace("guard ", "", 1)
    lk = look.get(g, "")
    b = bound if g in look else ""
    valid = "ok" if r["valid"] else "INVALID " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
    label = "pass-through (answers 200)" if name == "floor" else f"tollgate, pre-auth guard {g}"
    print(f"| {label} | {r['rps']:.0f} | {st} | {ratio} | {lk} | {b} | {valid} |")
PY
fi
if [[ " $SCENARIOS " == *" g "* ]]; then
  echo; echo "## (g) response cache, memory backend, proxy threads $THREADS"
  FEATURES="$FEATURES_ON
cache: { responses: { backend: memory, ttl_s: 600 } }"
  start_proxies "$THREADS"
  for conns in "$SAT_CONNS" 1; do
    load "g:c=$conns:passthrough" passthrough --connections "$conns"
    load "g:c=$conns:tollgate, uncached" tollgate --connections "$conns" -H "x-tollgate-cache: off"
    load "g:c=$conns:tollgate, cache hits" tollgate --connections "$conns" -H "x-tollgate-cache: on"
  done
  FEATURES=$FEATURES_ON
  # The Redis backend: hits from the node's own tier, then hits that come from Redis (a
  # second node whose own tier is too small to keep anything).
  start_redis
  FLEET_RESULTS=$work/fleet.jsonl; : >"$FLEET_RESULTS"
  REDIS_YAML="redis: { url: \"redis://127.0.0.1:$REDIS_PORT/0\", timeout_ms: 50 }"
  SAVED_CONNS=$SAT_CONNS
  for conns in "$SAVED_CONNS" 1; do
    SAT_CONNS=$conns
    start_fleet 1 "{ path: \"$work/g1-$conns.db\" }" "$REDIS_YAML
cache: { responses: { backend: redis, ttl_s: 600 } }"
    fleet_load "g-redis:c=$conns:redis backend, hits from the node's memory" -H "x-tollgate-cache: on"
    start_fleet 1 "{ path: \"$work/g2-$conns.db\" }" "$REDIS_YAML
cache: { responses: { backend: redis, ttl_s: 600, max_bytes: 1, max_entry_bytes: 1 } }"
    fleet_load "g-redis:c=$conns:redis backend, hits from Redis (another node stored them)" -H "x-tollgate-cache: on"
  done
  SAT_CONNS=$SAVED_CONNS
  stop ${FLEET_PIDS:-}; FLEET_PIDS=
  python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and json.loads(l)["label"].startswith("g:")]
print("| connections | target | req/s | p50 | p99 | run |")
print("|---|---|---|---|---|---|")
for r in rows:
    _, conns, target = r["label"].split(":")
    lat = r.get("latency_us") or {}
    valid = "ok" if r["valid"] else "INVALID " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
    print(f"| {conns.split('=')[1]} | {target} | {r['rps']:.0f} | {lat.get('p50')} us | {lat.get('p99')} us | {valid} |")
PY
  python3 - "$FLEET_RESULTS" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if not l.strip(): continue
    r = json.loads(l)
    _, conns, target = r["label"].split(":")
    valid = "ok" if r["valid"] else "INVALID " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
    print(f"| {conns.split('=')[1]} | {target} | {r['rps']:.0f} | {r['p50']} us | {r['p99']} us | {valid} (Redis calls/request {r['redis_per_req']:.2f}) |")
PY
  if grep -q '"valid": false' "$FLEET_RESULTS"; then echo; echo "INVALID: a Redis cache run had a non-2xx answer"; exit 1; fi
fi
if [[ " $SCENARIOS " == *" h "* ]]; then
  echo; echo "## (h) scale-out, closed loop, $SAT_CONNS connections in all, one proxy thread per node"
  stop "$TG_PID" "$PT_PID"; TG_PID=; PT_PID=
  start_redis
  PG_DB="tollgate_bench_$$"
  psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $PG_DB" >/dev/null
  FLEET_RESULTS=$work/fleet.jsonl; : >"$FLEET_RESULTS"
  REDIS_YAML="redis: { url: \"redis://127.0.0.1:$REDIS_PORT/0\", timeout_ms: 50 }"
  start_fleet 1 "{ path: \"$work/fleet.db\" }" ""
  fleet_load "one node, SQLite"
  start_fleet 1 "{ url: \"postgres://postgres@127.0.0.1:5432/$PG_DB\" }" "$REDIS_YAML"
  fleet_load "one node, PostgreSQL + Redis"
  start_fleet 3 "{ url: \"postgres://postgres@127.0.0.1:5432/$PG_DB\" }" "$REDIS_YAML"
  fleet_load "three nodes, PostgreSQL + Redis"
  stop ${FLEET_PIDS:-}; FLEET_PIDS=
  python3 - "$FLEET_RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| deployment | req/s | p50 (worst node) | p99 (worst node) | Redis calls / request | PostgreSQL transactions / request | run |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    valid = "ok" if r["valid"] else "INVALID " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
    sqlite = "SQLite" in r["label"]
    pg = "-" if sqlite else f"{r['pg_per_req']:.3f}"
    rd = "-" if sqlite else f"{r['redis_per_req']:.3f}"
    print(f"| {r['label']} | {r['rps']:.0f} | {r['p50']} us | {r['p99']} us | {rd} | {pg} | {valid} |")
PY
  if grep -q '"valid": false' "$FLEET_RESULTS"; then echo; echo "INVALID: a scale-out run had a non-2xx answer"; exit 1; fi
fi
if grep -q '"valid":false' "$RESULTS"; then
  echo; echo "INVALID: at least one run had a non-2xx answer or an error (see the run column)"; exit 1
fi
