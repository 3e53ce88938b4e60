"""Remove files that belong to options the user did not choose. No network, no docker."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

# Files (relative to the generated service) that exist only for one broker choice.
# The chosen broker's compose file becomes docker-compose.yml.
# `{package}` stands for the package name.
BROKER_FILES: dict[str, list[str]] = {
    "kafka": [
        "compose/kafka.yml",
        "src/{package}/runtime/brokers/kafka.py",
        "src/{package}/runtime/brokers/kafka_batches.py",
        "src/{package}/runtime/brokers/kafka_reading.py",
        "tests/runtime/test_kafka.py",
        "tests/integration/kafka_support.py",
        "tests/integration/test_kafka_only.py",
    ],
    "rabbitmq": [
        "compose/rabbitmq.yml",
        "src/{package}/runtime/brokers/rabbitmq.py",
        "src/{package}/runtime/brokers/rabbitmq_reading.py",
        "tests/runtime/test_rabbitmq.py",
        "tests/integration/rabbitmq_support.py",
        "tests/integration/test_rabbitmq_only.py",
    ],
}


def prune(root: Path, broker: str, package: str) -> None:
    if broker not in BROKER_FILES:
        raise ValueError(f"unknown broker {broker!r}; choose one of {sorted(BROKER_FILES)}")
    for other, paths in BROKER_FILES.items():
        if other == broker:
            continue
        for relative in paths:
            target = root / relative.format(package=package)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (root / "compose" / f"{broker}.yml").replace(root / "docker-compose.yml")
    compose_dir = root / "compose"
    if compose_dir.is_dir() and not any(compose_dir.iterdir()):
        compose_dir.rmdir()


def main() -> int:
    answers = json.loads(r"""{{ cookiecutter | tojson }}""")
    try:
        prune(Path.cwd(), answers["broker"], answers["package_name"])
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
