#!/usr/bin/env bash
# Archive benchmark (bench/archive_bench.py): the archiver against the no-op loop on the
# same Kafka broker, bytes stored per event, replay rate. Bakes a Kafka service; needs the
# servers (scripts/servers.sh start). Extra arguments go to the script (--events, --payload).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$root/scripts/servers.sh" env)"
service_dir="$(bash "$root/scripts/bake.sh" bench-archive service_name=bench-service broker=kafka)"
cd "$service_dir"
"$root/.venv/bin/uv" run python "$root/bench/archive_bench.py" bench_service "$@"
