# Installs what tollgate needs to build (and, with `test`, to test) when it is missing.
# Sourced by scripts/run.sh, scripts/test.sh and .ci/run. Debian/Ubuntu.
# shellcheck shell=bash

tollgate_deps() {
    local mode=${1:-run} pkgs=() sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    command -v cmake >/dev/null || pkgs+=(cmake)            # pingora-core builds zlib-ng
    command -v cc >/dev/null || pkgs+=(build-essential)
    command -v curl >/dev/null || pkgs+=(curl ca-certificates)
    if [ "$mode" = test ]; then
        command -v python3 >/dev/null || pkgs+=(python3)
        python3 -m venv --help >/dev/null 2>&1 || pkgs+=(python3-venv)
        command -v redis-server >/dev/null || pkgs+=(redis-server)
        command -v wrk >/dev/null || pkgs+=(wrk)
    fi
    if [ ${#pkgs[@]} -gt 0 ]; then
        echo "installing: ${pkgs[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        [ -f "$HOME/.cargo/env" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    if [ "$mode" = test ]; then
        # The official OpenAI SDK for the compatibility test, in a venv of its own.
        local venv=".venv-test"
        if ! "$venv/bin/python" -c "import openai" >/dev/null 2>&1; then
            python3 -m venv "$venv"
            "$venv/bin/pip" install -q --disable-pip-version-check openai
        fi
        PYTHON="$PWD/$venv/bin/python"
        export PYTHON
    fi
}
