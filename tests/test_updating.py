"""docs/updating.md's cruft commands do what it says, on a git copy of this template:
plain `cruft diff` compares with the pinned commit, `--checkout main` shows an update,
and `cruft update --checkout main` applies it and re-pins the service."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import TEMPLATE, run_ok, tool

pytestmark = pytest.mark.slow  # bakes, then updates with cruft

# Not part of the template a user would clone.
LOCAL_ONLY = shutil.ignore_patterns(".git", ".venv", "build", "site", "*_cache", "__pycache__")
MAKEFILE = "{{cookiecutter.service_name}}/Makefile"


def git(folder: Path, *args: str) -> str:
    identity = ["-c", "user.name=Template Test", "-c", "user.email=test@example.com"]
    return run_ok(["git", *identity, *args], cwd=folder, timeout=60).stdout


def cruft(service: Path, *args: str) -> str:
    return run_ok([tool("cruft"), *args], cwd=service, timeout=300).stdout


def cruft_check(service: Path) -> str:
    """`cruft check` exits 1 when the service is behind; its verdict, either way."""
    result = subprocess.run(
        [tool("cruft"), "check"], cwd=service, capture_output=True, text=True, timeout=300
    )
    return result.stdout


def test_cruft_diff_and_update_follow_the_templates_main(tmp_path: Path) -> None:
    documented = (TEMPLATE / "docs" / "updating.md").read_text()
    assert "cruft diff --checkout main" in documented
    assert "cruft update --checkout main" in documented
    template = tmp_path / "template"
    shutil.copytree(TEMPLATE, template, ignore=LOCAL_ONLY)
    git(template, "init", "--quiet", "--initial-branch=main")
    git(template, "add", "--all")
    git(template, "commit", "--quiet", "--message=template")
    pinned = git(template, "rev-parse", "HEAD").strip()

    made = tmp_path / "services"
    run_ok(
        [tool("cruft"), "create", "--no-input", "--output-dir", str(made), str(template)],
        timeout=300,
    )
    [service] = made.iterdir()
    git(service, "init", "--quiet")
    git(service, "add", "--all")
    git(service, "commit", "--quiet", "--message=baked")
    assert json.loads((service / ".cruft.json").read_text())["commit"] == pinned

    change = "# a change made to the template after the service was baked\n"
    with (template / MAKEFILE).open("a") as makefile:
        makefile.write(change)
    git(template, "commit", "--quiet", "--all", "--message=change")

    assert "FAILURE" in cruft_check(service)
    assert cruft(service, "diff") == "", "plain diff: the service against its pinned commit"
    assert f"+{change}" in cruft(service, "diff", "--checkout", "main")
    cruft(service, "update", "--checkout", "main", "--skip-apply-ask")
    assert (service / "Makefile").read_text().endswith(change)
    state = json.loads((service / ".cruft.json").read_text())
    assert state["commit"] == git(template, "rev-parse", "main").strip()
