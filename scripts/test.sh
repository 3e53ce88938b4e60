#!/usr/bin/env bash
# Runs every template test: hooks, a baked option matrix (lint + each baked service's
# own `make test` / `make lint`, whose integration suite runs against the real servers
# started here). Installs its own tools (scripts/bootstrap.sh) and servers
# (scripts/servers.sh) first; stops the servers it started when done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export UV_PYTHON_DOWNLOADS=never
cd "$root"
.venv/bin/ruff check hooks tests scripts
.venv/bin/ruff format --check hooks tests scripts
if [ "${SKIP_SERVERS:-}" != "1" ]; then
    eval "$(bash scripts/servers.sh start)"
    trap 'bash "$root/scripts/servers.sh" stop' EXIT
fi
# Three workers on two cores: the suite mostly waits (on servers, bakes' subprocesses).
# TEST_WORKERS=0 runs it in this one process.
.venv/bin/python -m pytest -n "${TEST_WORKERS:-3}" --dist loadgroup --no-loadscope-reorder \
    --durations=15 "$@"  # the slowest, to keep CI well under 20 min
