"""Refuse bad cookiecutter answers with one clear line before anything is written."""

from __future__ import annotations

import json
import keyword
import re
import sys

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
PACKAGE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
# Kubernetes object names are DNS labels: at most 63 characters.
MAX_SERVICE_NAME = 63
# Keeps generated import lines within the 100-column lint limit.
MAX_PACKAGE_NAME = 40
# Names the generated package must not take: they would shadow imports it relies on.
RESERVED_PACKAGES = {"runtime", "events", "handlers", "tests", "google", "grpc"}


def validate(answers: dict[str, str]) -> str | None:
    """Return a one-line reason the answers are refused, or None when they are fine."""
    service = answers["service_name"]
    package = answers["package_name"]
    if not SERVICE_NAME.match(service):
        return (
            f"service_name {service!r} is not a slug: use lowercase letters, digits and "
            "single dashes, starting with a letter (e.g. order-service)"
        )
    if len(service) > MAX_SERVICE_NAME:
        return (
            f"service_name {service!r} is longer than {MAX_SERVICE_NAME} characters "
            "(the Kubernetes name limit)"
        )
    if not PACKAGE_NAME.match(package) or not package.isidentifier():
        return (
            f"package_name {package!r} is not a Python identifier: use lowercase letters, "
            "digits and underscores, not starting with a digit"
        )
    if len(package) > MAX_PACKAGE_NAME:
        return f"package_name {package!r} is longer than {MAX_PACKAGE_NAME} characters"
    if keyword.iskeyword(package) or keyword.issoftkeyword(package):
        return f"package_name {package!r} is a Python keyword"
    if package in sys.stdlib_module_names or package in RESERVED_PACKAGES:
        return f"package_name {package!r} would shadow the module of the same name; pick another"
    if "\n" in answers["description"] or "\r" in answers["description"]:
        return "description must be a single line"
    if any(c in answers["schemas_source"] for c in "\n\r"):
        return "schemas_source must be a single line (a git URL or a directory)"
    if not answers["author_name"].strip():
        return "author_name must not be empty"
    if not EMAIL.match(answers["author_email"]):
        return f"author_email {answers['author_email']!r} is not an e-mail address"
    return None


def main() -> int:
    # Answers arrive as data (JSON), never pasted into code; tojson escapes quotes.
    answers = json.loads(r"""{{ cookiecutter | tojson }}""")
    problem = validate(answers)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
