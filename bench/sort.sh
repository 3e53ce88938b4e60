#!/usr/bin/env bash
# Decode + dedupe step benchmark (Intake.decode_and_dedupe in runtime/intake.py, CPU time per event): bakes a service
# and runs bench/sort_bench.py in it. Extra arguments go to the script (--batch, --rounds).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
service_dir="$(bash "$root/scripts/bake.sh" bench-sort service_name=bench-service)"
cd "$service_dir"
"$root/.venv/bin/uv" run python "$root/bench/sort_bench.py" bench_service "$@"
