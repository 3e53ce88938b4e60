#!/usr/bin/env bash
# Bakes a service from this template with default answers into build/demo/ and runs
# its demo: the real consume loop on the embedded in-memory bus, over a scripted
# stream with a duplicate, an unknown type, poison and an oversized message.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
service_dir="$(bash "$root/scripts/bake.sh" demo "$@")"
cd "$service_dir"
exec "$root/.venv/bin/uv" run "$(basename "$service_dir")" demo
