#!/usr/bin/env bash
# State-store benchmark: bakes a service, starts the servers, runs bench/state_bench.py.
# Extra arguments go to the script (e.g. --ids 200000 --json build/state-bench.json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export UV_PYTHON_DOWNLOADS=never PATH="$root/.venv/bin:$PATH"
eval "$(bash "$root/scripts/servers.sh" start)"
rm -rf "$root/build/bench"
mkdir -p "$root/build/bench"
cookiecutter --no-input -o "$root/build/bench" "$root" service_name=bench-service >/dev/null
cd "$root/build/bench/bench-service"
uv sync --quiet
uv run python "$root/bench/state_bench.py" bench_service "$@"
