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
from typing import Any

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


def require(missing: Sequence[str]) -> None:
    """A test whose servers or binaries are missing fails under CI (CI=true), else skips."""
    if not missing:
        return
    names = ", ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {names} missing: run scripts/servers.sh start")
    pytest.skip(f"needs {names} (bash scripts/servers.sh start)")


CRASH = TEMPLATE / "tests" / "crash"


def crash_driver_figures(
    folder: Path, broker: str, driver: str, *args: str, env: Mapping[str, str]
) -> dict[str, Any]:
    """Bake a service whose handler logs what it handled (tests/crash/handlers.py), run a
    driver of tests/crash/ with its interpreter, and return the figures the driver prints
    as its last line."""
    service = bake(folder / "bake", broker=broker, service_name="crash-test")
    shutil.copy(CRASH / "handlers.py", service / "src" / "crash_test" / "handlers.py")
    subprocess.run(["uv", "sync", "--quiet"], cwd=service, env=env, check=True, timeout=600)
    command = ["uv", "run", "python", str(CRASH / driver), "crash_test", str(folder / "run")]
    result = run_ok([*command, *args], cwd=service, env=env, timeout=900)
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


# Parallel runs (scripts/test.sh: pytest-xdist, --dist loadgroup): the tests of a module
# share its module-scoped bakes and installs, so they run on one worker, except in these
# modules, whose tests each bake their own service.
INDEPENDENT_TESTS = {"test_crash.py", "test_outages.py", "test_bench.py"}
# The longest first, so that the workers finish at about the same time.
LONGEST_FIRST = ["test_bake.py", "test_crash.py", "test_bench.py", "test_updating.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.name
        callspec = getattr(item, "callspec", None)
        if module == "test_bake.py" and callspec is not None:
            # Each bake's tests share that bake; the four bakes are spread over workers.
            item.add_marker(pytest.mark.xdist_group(f"bake-{callspec.params['name']}"))
        elif module not in INDEPENDENT_TESTS:
            item.add_marker(pytest.mark.xdist_group(module))

    def rank(item: pytest.Item) -> int:
        module = item.path.name
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def default_bake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bake with the default answers (order-service) that tests copy, never change."""
    return bake(tmp_path_factory.mktemp("default-bake"))
