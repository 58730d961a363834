#!/usr/bin/env bash
# Builds and runs the gateway on the embedded default: conf/tollgate.yaml, SQLite, no Redis.
# Installs what is missing. Extra arguments go to `tollgate serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
tollgate_deps run
cargo build --release --bin tollgate
exec ./target/release/tollgate serve --config "${TOLLGATE_CONFIG:-conf/tollgate.yaml}" "$@"
