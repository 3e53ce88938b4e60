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
