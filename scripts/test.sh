#!/usr/bin/env bash
# Runs every test: unit tests, the integration tests (real binary, real SQLite file, mock
# upstream) and the official OpenAI SDK compatibility test. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
tollgate_deps test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one result line per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
