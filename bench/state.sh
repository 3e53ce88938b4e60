#!/usr/bin/env bash
# State-store benchmark: bakes a service, starts the servers, runs bench/state_bench.py.
# Extra arguments go to the script (e.g. --ids 200000 --json build/state-bench.json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$root/scripts/servers.sh" start)"
service_dir="$(bash "$root/scripts/bake.sh" bench service_name=bench-service)"
cd "$service_dir"
"$root/.venv/bin/uv" run python "$root/bench/state_bench.py" bench_service "$@"
