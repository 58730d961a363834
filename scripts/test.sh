#!/usr/bin/env bash
# Runs every test: unit tests, the integration tests (real binary, real SQLite file, mock
# upstream) and the official OpenAI SDK compatibility test. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
tollgate_deps test
cargo test --workspace "$@"
