"""The template's release: `_template_version` in cookiecutter.json is CHANGELOG.md's
newest release, each entry says what changed for services and what an owner must do,
and a bake records the release in the service."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import TEMPLATE, TEMPLATE_VERSION, bake

SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def entries() -> dict[str, str]:
    """CHANGELOG.md's `## ` sections by heading, in order."""
    text = (TEMPLATE / "CHANGELOG.md").read_text()
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def test_the_current_release_is_the_newest_entry_after_unreleased() -> None:
    unreleased, *releases = entries()
    assert unreleased == "Unreleased"
    assert releases[0] == TEMPLATE_VERSION
    numbers = []
    for release in releases:
        match = SEMVER.match(release)
        assert match is not None, f"{release!r} is not a semantic version"
        numbers.append(tuple(int(part) for part in match.groups()))
    assert numbers == sorted(set(numbers), reverse=True), "newest first, each once"


def test_each_entry_says_what_changed_and_what_an_owner_must_do() -> None:
    for heading, entry in entries().items():
        assert "### Changed for services" in entry, heading
        assert "### What you must do" in entry, heading


def test_a_bake_records_the_release(out: Path) -> None:
    service = bake(out)
    package = (service / "src" / "order_service" / "__init__.py").read_text()
    assert f'TEMPLATE_VERSION = "{TEMPLATE_VERSION}"' in package
