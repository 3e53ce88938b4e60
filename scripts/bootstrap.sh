#!/usr/bin/env bash
# Creates .venv with the template's own tools (cookiecutter, cruft, uv, pytest, ruff, kubectl,
# actionlint, pre-commit).
# Idempotent: re-running only installs what requirements-dev.txt changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
stamp="$root/.venv/.requirements-dev.sha"
want="$(sha256sum "$root/scripts/requirements-dev.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/scripts/requirements-dev.txt"
    echo "$want" > "$stamp"
fi
# The official AsyncAPI 3.0 JSON schema (npm package @asyncapi/specs, fetched with npm, from
# Debian's package when missing), which tests/test_schemas.py validates the baked services'
# `asyncapi` documents against.
specs_version=6.11.1
specs="$root/.venv/share/asyncapi-specs-$specs_version"
if [ ! -f "$specs/schemas/3.0.0.json" ]; then
    if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    fi
    if command -v npm >/dev/null 2>&1; then
        scratch="$(mktemp -d)"
        (cd "$scratch" && npm pack --silent "@asyncapi/specs@$specs_version" >/dev/null)
        mkdir -p "$specs"
        tar -xzf "$scratch"/asyncapi-specs-*.tgz -C "$specs" --strip-components=1 \
            package/schemas/3.0.0.json package/LICENSE
        rm -rf "$scratch"
    else
        echo "warning: no npm: the AsyncAPI schema test will fail until npm is installed" >&2
    fi
fi
