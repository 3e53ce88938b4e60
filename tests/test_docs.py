"""The documentation site builds with `mkdocs build --strict`: no broken link, no page
left out of the navigation, no missing anchor."""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import TEMPLATE, run_ok, tool


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run_ok(
        [tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=TEMPLATE,
        env=env,
        timeout=300,
    )
    assert (tmp_path / "site" / "security" / "index.html").exists()
