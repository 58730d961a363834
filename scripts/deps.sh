# Installs what tollgate needs to build (and, with `test`, to test) when it is missing.
# Sourced by scripts/run.sh, scripts/test.sh and .ci/run. Debian/Ubuntu.
# shellcheck shell=bash

# Oldest Rust that builds pingora 0.9.1 and this workspace.
TOLLGATE_MIN_RUST=1.88.0
# The OpenAI SDK version the compatibility test is written against.
TOLLGATE_OPENAI_SDK=3.57.0
# The official Anthropic SDK, for the same test against `/v1/messages`.
TOLLGATE_ANTHROPIC_SDK=2.10.0
# The websocket client of the realtime test.
TOLLGATE_PY_WEBSOCKETS=15.0.1
# HTTP/2 for the SDK's httpx client (`http2=True`) in the compatibility test.
TOLLGATE_PY_H2="h2>=4,<5"

tollgate_deps() {
    local mode=${1:-run} pkgs=() sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    command -v cmake >/dev/null || pkgs+=(cmake)            # pingora-core builds zlib-ng
    command -v cc >/dev/null || pkgs+=(build-essential)
    command -v make >/dev/null || pkgs+=(make)             # jemalloc (the default allocator) builds with it
    command -v curl >/dev/null || pkgs+=(curl ca-certificates)
    # The protocol tests drive curl with --http2 and --http2-prior-knowledge.
    if [ "$mode" = test ] && command -v curl >/dev/null && ! curl -V | grep -q HTTP2; then
        pkgs+=(curl)
    fi
    if [ "$mode" = test ]; then
        command -v python3 >/dev/null || pkgs+=(python3)
        # `python3 -m venv` needs ensurepip, which Debian ships separately.
        python3 -c 'import ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
        command -v redis-server >/dev/null || pkgs+=(redis-server)
        # The store tests run on SQLite and on PostgreSQL (a server, not only psql).
        compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || pkgs+=(postgresql)
    fi
    if [ ${#pkgs[@]} -gt 0 ]; then
        echo "installing: ${pkgs[*]}"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
    tollgate_rust "$mode"
    if [ "$mode" = test ]; then
        tollgate_pg || return 1
        # The official OpenAI SDK for the compatibility test, in a venv of its own.
        local venv=".venv-test"
        if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$TOLLGATE_OPENAI_SDK')" >/dev/null 2>&1; then
            rm -rf "$venv"
            python3 -m venv "$venv"
            "$venv/bin/pip" install -q --disable-pip-version-check "openai==$TOLLGATE_OPENAI_SDK"
        fi
        "$venv/bin/python" -c "import anthropic, sys; sys.exit(anthropic.__version__ != '$TOLLGATE_ANTHROPIC_SDK')" >/dev/null 2>&1 \
            || "$venv/bin/pip" install -q --disable-pip-version-check "anthropic==$TOLLGATE_ANTHROPIC_SDK"
        "$venv/bin/python" -c "import websockets, sys; sys.exit(websockets.__version__ != '$TOLLGATE_PY_WEBSOCKETS')" >/dev/null 2>&1 \
            || "$venv/bin/pip" install -q --disable-pip-version-check "websockets==$TOLLGATE_PY_WEBSOCKETS"
        "$venv/bin/python" -c "import h2" >/dev/null 2>&1 \
            || "$venv/bin/pip" install -q --disable-pip-version-check "$TOLLGATE_PY_H2"
        PYTHON="$PWD/$venv/bin/python"
        export PYTHON
    fi
}

# PostgreSQL for the tests: a server on 127.0.0.1:5432 that lets `postgres` in without a
# password (as the dev machines' does), started when it is not answering. Tests create and
# drop their own databases. `TOLLGATE_TEST_PG` (a URL without a database) points them at
# another server instead.
tollgate_pg() {
    [ -n "${TOLLGATE_TEST_PG:-}" ] && return 0
    local probe=(psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1') sudo="" ver hba
    "${probe[@]}" >/dev/null 2>&1 && return 0
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n1)
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if [ -f "$hba" ] && ! $sudo grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
        $sudo sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    fi
    if $sudo pg_ctlcluster "$ver" main status >/dev/null 2>&1; then
        $sudo pg_ctlcluster "$ver" main reload
    else
        $sudo pg_ctlcluster "$ver" main start
    fi
    for _ in $(seq 1 30); do
        "${probe[@]}" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "PostgreSQL does not answer on 127.0.0.1:5432 as user postgres" >&2
    return 1
}

# A recent enough Rust (a distro's old cargo cannot build pingora), plus rustfmt and clippy
# for the test mode.
tollgate_rust() {
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    local have=""
    command -v rustc >/dev/null && have=$(rustc --version | awk '{print $2}')
    if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$TOLLGATE_MIN_RUST" "$have" | sort -V | head -n1)" != "$TOLLGATE_MIN_RUST" ]; then
        if command -v rustup >/dev/null; then
            rustup toolchain install stable --profile minimal && rustup default stable
        else
            curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
            . "$HOME/.cargo/env"
        fi
    fi
    if [ "${1:-run}" = test ]; then
        for c in rustfmt clippy; do
            local probe=$c
            [ "$c" = rustfmt ] && probe=fmt
            if ! cargo "$probe" --version >/dev/null 2>&1; then
                command -v rustup >/dev/null || { echo "cargo $probe is missing and rustup is not installed" >&2; return 1; }
                rustup component add "$c"
            fi
        done
    fi
}
