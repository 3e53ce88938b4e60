#!/usr/bin/env bash
# Tracing overhead benchmark: bakes a service and runs bench/tracing_bench.py in it.
# Extra arguments go to the script (e.g. --events 50000 --rounds 5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
service_dir="$(bash "$root/scripts/bake.sh" bench-tracing service_name=bench-service)"
cd "$service_dir"
"$root/.venv/bin/uv" run python "$root/bench/tracing_bench.py" bench_service "$@"
