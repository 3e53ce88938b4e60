#!/usr/bin/env bash
# Bakes a fresh service into build/NAME/ and installs it (uv sync); prints its folder.
# Usage: bash scripts/bake.sh NAME [cookiecutter answers, e.g. broker=rabbitmq]
# Shared by scripts/demo.sh and the bench/ scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="$1"
shift
bash "$root/scripts/bootstrap.sh"
export UV_PYTHON_DOWNLOADS=never PATH="$root/.venv/bin:$PATH"
rm -rf "${root:?}/build/$name"
mkdir -p "$root/build/$name"
cookiecutter --no-input -o "$root/build/$name" "$root" "$@" >/dev/null
service_dir="$(find "$root/build/$name" -mindepth 1 -maxdepth 1 -type d)"
echo "baked $(basename "$service_dir") into ${service_dir#"$root"/}" >&2
(cd "$service_dir" && uv sync --quiet)
echo "$service_dir"
