#!/usr/bin/env bash
# Restart-to-first-handled after SIGKILL, dynamic vs static group membership (Kafka):
# bakes a Kafka service, starts the servers, runs bench/restart_bench.py.
# Extra arguments go to the script (e.g. --restarts 9).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$root/scripts/servers.sh" start)"
service_dir="$(bash "$root/scripts/bake.sh" restart-bench service_name=crash-test broker=kafka)"
cp "$root/tests/crash/handlers.py" "$service_dir/src/crash_test/handlers.py"
cd "$service_dir"
rm -rf "$root/build/restart-bench/run"
"$root/.venv/bin/uv" run python "$root/bench/restart_bench.py" crash_test "$root/build/restart-bench/run" "$@"
