#!/usr/bin/env bash
# The whole benchmark in one command, on this machine's loopback servers:
#   bash bench/run.sh [--events 100000] [--rounds 5]     (arguments go to throughput.py)
# BENCH_IDS (default 1000000) and BENCH_SECONDS (4) size the state-store part;
# BENCH_INSTRUCTION_SHAPES and BENCH_INSTRUCTION_EVENTS (SMALL,LARGE) the instruction counts.
# Starts the servers (scripts/servers.sh) unless they run already, bakes a Kafka and a
# RabbitMQ service, installs FastStream beside each (benchmark only), runs
# bench/throughput.py for both brokers, then bench/state_bench.py (memory per remembered
# id, restart with a one-million-id window, store writes against message rate), then
# bench/instructions.py (instructions per event of each handler shape, under valgrind).
# Figures are printed and written to build/bench/results.json, state.json and
# instructions.json.
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
# Instructions per event by handler shape, counted by valgrind: the machine's noise, which
# moves rates and CPU time by up to 2x here, does not move these.
if ! command -v valgrind >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
(cd "$root/build/bench-kafka/bench-service" && .venv/bin/python "$root/bench/instructions.py" \
    bench_service --state etcd --shapes "${BENCH_INSTRUCTION_SHAPES:-noop,stateful,emit-one,sample}" \
    --events "${BENCH_INSTRUCTION_EVENTS:-2000,10000}" --json "$root/build/bench/instructions.json")
