#!/usr/bin/env bash
# Bakes a service from this template with default answers into build/demo/ and runs
# its demo: the real consume loop on the embedded in-memory bus, over a scripted
# stream with a duplicate, an unknown type, poison and an oversized message.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export UV_PYTHON_DOWNLOADS=never
export PATH="$root/.venv/bin:$PATH"
rm -rf "$root/build/demo"
mkdir -p "$root/build/demo"
cookiecutter --no-input -o "$root/build/demo" "$root" "$@"
service_dir="$(find "$root/build/demo" -mindepth 1 -maxdepth 1 -type d)"
cd "$service_dir"
echo "baked $(basename "$service_dir") into ${service_dir#"$root"/}" >&2
uv sync --quiet
exec uv run "$(basename "$service_dir")" demo
