"""The CI a baked service comes with: its GitHub Actions workflow parses and passes
actionlint, runs only commands that exist (Makefile targets, tools of the baked dev
group), gives the integration tests every TEST_* address they read; pre-commit runs the
linters `make lint` runs; `make` alone lists every target."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from .conftest import bake, run_ok, tool

WORKFLOW = ".github/workflows/ci.yml"
JOBS = {"lint", "schemas", "unit", "integration", "template", "image"}


@pytest.fixture(scope="module", params=["kafka", "rabbitmq"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bake(tmp_path_factory.mktemp(f"ci-{request.param}"), broker=request.param)


def workflow(service: Path) -> dict[str, dict[str, dict[str, object]]]:
    parsed = yaml.safe_load((service / WORKFLOW).read_text())
    assert isinstance(parsed, dict)
    return parsed


def run_lines(service: Path) -> list[str]:
    """Every line of every `run:` step, heredoc bodies left out."""
    lines: list[str] = []
    for job in workflow(service)["jobs"].values():
        for step in job["steps"]:  # type: ignore[attr-defined]
            heredoc_end = None
            for line in step.get("run", "").splitlines():
                if heredoc_end is not None:
                    heredoc_end = None if line.strip() == heredoc_end else heredoc_end
                    continue
                if (match := re.search(r"<<-?'?(\w+)'?", line)) is not None:
                    heredoc_end = match.group(1)
                lines.append(line.strip())
    return lines


def makefile_targets(service: Path) -> set[str]:
    text = (service / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.MULTILINE))


def recipe(service: Path, target: str) -> list[str]:
    """The command lines of one Makefile target, `$(UV)` spelled `uv`."""
    text = (service / "Makefile").read_text()
    body = text.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
    return [line.strip().replace("$(UV)", "uv") for line in body.splitlines()[1:]]


def uv_run_tools(lines: list[str]) -> set[str]:
    """The program each `uv run ...` command line starts."""
    return {shlex.split(line)[2] for line in lines if line.startswith("uv run ")}


def linters(lines: list[str]) -> set[str]:
    """`ruff check`, `ruff format`, `mypy`: tool and subcommand of each `uv run` line."""
    found = set()
    for line in lines:
        if line.startswith("uv run "):
            words = shlex.split(line)[2:4]
            found.add(" ".join(word for word in words if word[0] not in "-."))
    return found


def runnable_with_uv(service: Path) -> set[str]:
    """What `uv run X` finds in a synced service: python, the service's own command and
    the commands of its dev group (each of these packages installs one of its name)."""
    project = tomllib.loads((service / "pyproject.toml").read_text())
    dev = project["dependency-groups"]["dev"]
    names = {re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0] for requirement in dev}
    names = {name.removesuffix("-bin") for name in names}  # buf-bin installs buf
    return {"python", *project["project"]["scripts"], *names}


def test_workflow_parses_and_passes_actionlint(service: Path) -> None:
    assert set(workflow(service)["jobs"]) == JOBS
    run_ok([tool("actionlint"), WORKFLOW], cwd=service, timeout=120)


def test_workflow_runs_only_make_targets_and_tools_that_exist(service: Path) -> None:
    lines = run_lines(service)
    targets = {shlex.split(line)[1] for line in lines if line.startswith("make ")}
    expected = {"lint-code", "schemas-check", "test-unit", "test-integration", "template-check"}
    assert expected | {"image"} <= targets
    assert targets <= makefile_targets(service)
    for target in targets:
        dry_run = subprocess.run(["make", "-n", target], cwd=service, capture_output=True)
        assert dry_run.returncode == 0, dry_run.stderr
    made = [line for target in targets for line in recipe(service, target)]
    assert uv_run_tools(lines + made) <= runnable_with_uv(service)


def test_integration_job_sets_every_server_address_the_tests_read(service: Path) -> None:
    read = set()
    for source in (service / "tests").rglob("*.py"):
        read |= set(re.findall(r"[\"'](TEST_[A-Z0-9_]+)[\"']", source.read_text()))
    assert "TEST_ETCD_ENDPOINTS" in read
    given = workflow(service)["jobs"]["integration"]["env"]
    assert isinstance(given, dict)
    assert {name for name in given if name.startswith("TEST_")} == read
    broker = "kafka" if "TEST_KAFKA_BOOTSTRAP" in read else "rabbitmq"
    assert set(workflow(service)["jobs"]["integration"]["services"]) == {broker, "etcd"}


def test_pre_commit_runs_the_linters_of_make_lint(service: Path) -> None:
    config = service / ".pre-commit-config.yaml"
    run_ok([tool("pre-commit"), "validate-config", str(config)], timeout=120)
    [local] = yaml.safe_load(config.read_text())["repos"]
    entries = [hook["entry"] for hook in local["hooks"]]
    made = linters(recipe(service, "lint-code"))
    assert linters(entries) == made == {"ruff check", "ruff format", "mypy"}
    assert uv_run_tools(entries) <= runnable_with_uv(service)


def test_make_alone_lists_every_target(service: Path) -> None:
    listed = run_ok(["make"], cwd=service, timeout=60).stdout
    shown = set(re.findall(r"^  make (\S+)", listed, flags=re.MULTILINE))
    assert shown == makefile_targets(service)
