#!/usr/bin/env bash
# Tracing overhead benchmark: bakes a service and runs bench/tracing_bench.py in it.
# Extra arguments go to the script (e.g. --events 50000 --rounds 5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export UV_PYTHON_DOWNLOADS=never PATH="$root/.venv/bin:$PATH"
rm -rf "$root/build/bench-tracing"
mkdir -p "$root/build/bench-tracing"
cookiecutter --no-input -o "$root/build/bench-tracing" "$root" service_name=bench-service >/dev/null
cd "$root/build/bench-tracing/bench-service"
uv sync --quiet
uv run python "$root/bench/tracing_bench.py" bench_service "$@"
