"""Build hook: generate Python code for proto/**/*.proto with grpcio-tools.

Runs on every build (including `uv sync`'s editable install). After editing a
.proto file run `make proto` (or `python hatch_build.py`) to regenerate.

Every .proto under proto/, wherever it sits, becomes a module of this package's events
by its file name (proto/billing/events/invoices.proto: events/invoices_pb2.py), so the
wheel ships it and `types` lists it; imports between them are pointed there. A type
keeps its protobuf name (its file's `package` line), which is what the bus sees, so
another service's .proto copied at its own path and the template's envelope
(io/cloudevents/v1/cloudevents.proto) load beside any other service in one process.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent
PACKAGE = "{{ cookiecutter.package_name }}"


class ProtoError(Exception):
    """A problem with the .proto files, said in one line."""


def modules(sources: list[Path]) -> dict[Path, str]:
    """Each source (relative to proto/) and its module name in this package's events."""
    named: dict[str, Path] = {}
    for source in sources:
        name = source.stem + "_pb2"
        if name in named:
            raise ProtoError(
                f"proto/{named[name]} and proto/{source} would both generate "
                f"src/{PACKAGE}/events/{name}.py: rename one file (its package line, "
                "and so its types' names, may stay)"
            )
        named[name] = source
    return {source: name for name, source in named.items()}


def point_imports(code: str, names: dict[Path, str]) -> str:
    """protoc imports a generated module by its .proto's path; ours all sit in events."""
    for source, name in names.items():
        where = ".".join(source.parent.parts)
        imported = f"from {where} import {name}" if where else f"import {name}"
        pointed = f"from {PACKAGE}.events import {name} as "
        code = re.sub(rf"^{re.escape(imported)} as ", pointed, code, flags=re.MULTILINE)
    return code


def generate(root: Path = ROOT) -> list[Path]:
    """Compile every .proto under proto/ into src/<package>/events/ (code and type stubs)."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "proto"
    sources = sorted(path.relative_to(proto_root) for path in proto_root.rglob("*.proto"))
    names = modules(sources)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    events = root / "src" / PACKAGE / "events"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            *map(str, sources),
        ]
        if protoc.main(args) != 0:
            raise ProtoError("protoc refused the .proto files (its messages are above)")
        generated = []
        for source, name in names.items():
            for suffix in (".py", ".pyi"):
                built = out / source.parent / (name + suffix)
                code = point_imports(built.read_text(encoding="utf-8"), names)
                (events / (name + suffix)).write_text(code, encoding="utf-8")
            generated.append(events / (name + ".py"))
    return generated


class ProtoBuildHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate_or_exit(Path(self.root))


def generate_or_exit(root: Path = ROOT) -> list[Path]:
    """generate(), or exit with one line (not a traceback through the build backend)."""
    try:
        return generate(root)
    except ProtoError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    for path in generate_or_exit():
        print(f"generated {path.relative_to(ROOT)}", file=sys.stderr)
