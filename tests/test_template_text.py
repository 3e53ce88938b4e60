"""Quick checks of the template's own text, before any bake: what the baked lint would
find only minutes later (tests/test_bake.py bakes and lints for real)."""

from __future__ import annotations

from .conftest import TEMPLATE
from .test_bake import MATRIX

PLACEHOLDER = "{{ cookiecutter.package_name }}"
LONGEST_PACKAGE = max((answers.get("package_name", "") for answers in MATRIX.values()), key=len)
LINE_LENGTH = 100  # the baked service's ruff line-length


def test_python_lines_fit_the_longest_package_name_of_the_matrix() -> None:
    """A line that names the package fits ruff's line length with the matrix's longest
    package name in it (an import that fits `order_service` may not fit 40 characters)."""
    too_long = []
    for path in (TEMPLATE / "{{cookiecutter.service_name}}").rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            baked = line.replace(PLACEHOLDER, LONGEST_PACKAGE)
            if PLACEHOLDER in line and len(baked) > LINE_LENGTH:
                too_long.append(f"{path.relative_to(TEMPLATE)}:{number}: {len(baked)} chars")
    assert len(LONGEST_PACKAGE) >= 40
    assert not too_long, "\n".join(too_long)
