# Sourced by scripts/test and scripts/demo: a virtualenv with the project, and the system tools.
# Safe to run again: it only installs what is missing.
#   ensure_venv    $INVALGW_VENV (default .venv) with the locked dependencies ($INVALGW_LOCK,
#                  default requirements/lock.txt) and invalgw itself (editable)
#   ensure_tools [promtool]   redis-server (and promtool and prometheus, for the tests),
#                             via apt or brew

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${INVALGW_VENV:-.venv}

ensure_venv() {
    local python=${PYTHON:-python3}
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "invalgw needs Python 3.11 or newer (found: $("$python" --version 2>&1))." >&2
        exit 1
    fi
    if [ ! -x $VENV/bin/python ]; then
        echo "==> creating $VENV"
        "$python" -m venv "$VENV"
    fi
    local lock=${INVALGW_LOCK:-requirements/lock.txt} stamp
    stamp=$VENV/.installed-$(cat "$lock" | cksum | cut -d' ' -f1)
    if [ ! -f "$stamp" ]; then
        echo "==> installing the locked dependencies ($lock) into $VENV"
        $VENV/bin/python -m pip install --quiet --disable-pip-version-check \
            --require-hashes --no-deps -r "$lock"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
    # The project itself, every time (a few seconds): a "strict" editable install links exactly
    # the files the wheel would ship under the import name invalgw, so mypy and the tests see
    # the package as users get it, and a module added since the last run is picked up.
    rm -rf build/__editable__.*
    $VENV/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation --config-settings editable_mode=strict -e .
}

ensure_tools() {
    local apt=() brew=()
    if ! command -v redis-server >/dev/null 2>&1 && [ -z "${INVALGW_REDIS_SERVER:-}" ]; then
        apt+=(redis-server) brew+=(redis)
    fi
    if [ "${1:-}" = promtool ] && ! { command -v promtool && command -v prometheus; } >/dev/null 2>&1
    then
        # Debian ships promtool and the server in "prometheus": the alert unit tests use
        # promtool, the end-to-end alert test runs the server
        apt+=(prometheus) brew+=(prometheus)
    fi
    if [ ${#apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "==> installing ${apt[*]} (apt)"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${apt[@]}" >/dev/null
    elif [ ${#brew[@]} -gt 0 ] && command -v brew >/dev/null 2>&1; then
        echo "==> installing ${brew[*]} (brew)"
        brew install "${brew[@]}"
    fi
    if ! command -v redis-server >/dev/null 2>&1 && [ -z "${INVALGW_REDIS_SERVER:-}" ]; then
        echo "redis-server is needed and was not found. Install Redis 7 or newer" >&2
        echo "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)," >&2
        echo "or set INVALGW_REDIS_SERVER to the redis-server binary." >&2
        exit 1
    fi
}
