"""Shared helpers for the template's tests: bake the template into a temporary folder."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parent.parent
# The template's release, as cookiecutter.json records it for the bake.
TEMPLATE_VERSION: str = json.loads((TEMPLATE / "cookiecutter.json").read_text())[
    "_template_version"
]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool installed beside this interpreter (the template's .venv), else from PATH."""
    local = BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; run scripts/bootstrap.sh")
    return found


def tool_env() -> dict[str, str]:
    """Environment for baked services' commands: our uv first on PATH, no Python downloads."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env["UV_PYTHON"] = sys.executable
    env.pop("VIRTUAL_ENV", None)
    return env


def run_ok(
    args: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with its output captured; fail the test, showing the command and the
    end of its output, unless it exits 0."""
    result = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{shlex.join(args)} exited {result.returncode}\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-5000:]}"
    )
    return result


def bake_cli(
    output_dir: Path, *, merged: bool = False, **answers: str
) -> subprocess.CompletedProcess[str]:
    """Run the cookiecutter command line, as a user would; `merged`: stderr into stdout,
    in the order a terminal shows them."""
    args = [tool("cookiecutter"), "--no-input", "-o", str(output_dir), str(TEMPLATE)]
    args += [f"{key}={value}" for key, value in answers.items()]
    stderr = subprocess.STDOUT if merged else subprocess.PIPE
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300)


def bake(output_dir: Path, **answers: str) -> Path:
    result = bake_cli(output_dir, **answers)
    if result.returncode != 0:
        raise AssertionError(f"bake failed:\n{result.stdout}\n{result.stderr}")
    [service] = [path for path in output_dir.iterdir() if path.is_dir()]
    return service


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def default_bake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bake with the default answers (order-service) that tests copy, never change."""
    return bake(tmp_path_factory.mktemp("default-bake"))
