#!/usr/bin/env bash
# The whole benchmark in one command, on this machine's loopback servers:
#   bash bench/run.sh [--events 100000] [--rounds 5]     (arguments go to throughput.py)
# BENCH_IDS (default 1000000) and BENCH_SECONDS (4) size the state-store part.
# Starts the servers (scripts/servers.sh) unless they run already, bakes a Kafka and a
# RabbitMQ service, installs FastStream beside each (benchmark only), runs
# bench/throughput.py for both brokers, then bench/state_bench.py (memory per remembered
# id, restart with a one-million-id window, store writes against message rate).
# Figures are printed and written to build/bench/results.json and build/bench/state.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FASTSTREAM="faststream[kafka,rabbit]==0.7.8"
bash "$root/scripts/bootstrap.sh"
export PATH="$root/.venv/bin:$PATH" UV_PYTHON_DOWNLOADS=never
started=0
if ! (exec 3<>/dev/tcp/127.0.0.1/19092) 2>/dev/null; then started=1; fi
eval "$(bash "$root/scripts/servers.sh" start)"
if [ "$started" = 1 ]; then trap 'bash "$root/scripts/servers.sh" stop' EXIT; fi
mkdir -p "$root/build/bench"
rm -f "$root/build/bench/results.json"
for broker in kafka rabbitmq; do
    service_dir="$(bash "$root/scripts/bake.sh" "bench-$broker" service_name=bench-service "broker=$broker")"
    (cd "$service_dir" && uv pip install --quiet --python .venv/bin/python "$FASTSTREAM")
    (cd "$service_dir" && .venv/bin/python "$root/bench/throughput.py" bench_service "$broker" \
        --json "$root/build/bench/results.json" "$@")
done
(cd "$root/build/bench-kafka/bench-service" && .venv/bin/python "$root/bench/state_bench.py" \
    bench_service --ids "${BENCH_IDS:-1000000}" --seconds "${BENCH_SECONDS:-4}" \
    --json "$root/build/bench/state.json")
