# Sourced by scripts/test and scripts/demo: a virtualenv with the project, and a redis-server.
# Safe to run again: it only installs what is missing.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "invalgw needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))." >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | cksum | cut -d' ' -f1)
if [ ! -f "$stamp" ]; then
    echo "==> installing invalgw and its test tools into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${INVALGW_REDIS_SERVER:-}" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "==> installing redis-server (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
        echo "==> installing redis-server (sudo apt)"
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    elif command -v brew >/dev/null 2>&1; then
        echo "==> installing redis (brew)"
        brew install redis
    else
        echo "redis-server is needed and was not found. Install Redis 7 or newer" >&2
        echo "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)," >&2
        echo "or set INVALGW_REDIS_SERVER to the redis-server binary." >&2
        exit 1
    fi
fi
