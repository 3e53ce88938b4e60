#!/usr/bin/env bash
# Runs every template test: hooks, a baked option matrix (lint + each baked service's
# own `make test` / `make lint`). Installs its own tools first (scripts/bootstrap.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export UV_PYTHON_DOWNLOADS=never
cd "$root"
.venv/bin/ruff check hooks tests
.venv/bin/ruff format --check hooks tests
exec .venv/bin/python -m pytest "$@"
