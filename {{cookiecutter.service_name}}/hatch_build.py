"""Build hook: generate Python code for proto/**/*.proto with grpcio-tools.

Runs on every build (including `uv sync`'s editable install). After editing a
.proto file run `make proto` (it also takes the shared schema set, see schemas.py).

Every .proto under proto/, wherever it sits, becomes a module inside this package's
events, so the wheel and the image ship it and `types` lists it. This service's own
files (proto/{{ cookiecutter.package_name }}/events/) and the envelope generate
events/<name>_pb2.py; any other file keeps its path below events
(proto/order_service/events/orders.proto: events/order_service/events/orders_pb2.py), so
two teams' files of one name never clash. Imports between them are pointed there. A
type keeps its protobuf name (its file's `package` line), which is what the bus sees.
"""

from __future__ import annotations

import re
import shutil
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


# Files generated flat into events/: this service's own and the template's envelope.
FLAT = (Path(PACKAGE) / "events", Path("io/cloudevents/v1"))


def module_path(source: Path) -> Path:
    """Where a .proto's code goes, relative to events/, without the suffix."""
    name = source.stem + "_pb2"
    if source.parent in FLAT:
        return Path(name)
    return source.parent / name


def modules(sources: list[Path]) -> dict[Path, Path]:
    """Each source (relative to proto/) and its module path in this package's events."""
    placed: dict[Path, Path] = {}
    for source in sources:
        path = module_path(source)
        if path in placed:
            raise ProtoError(
                f"proto/{placed[path]} and proto/{source} would both generate "
                f"src/{PACKAGE}/events/{path}.py: rename one file (its package line, "
                "and so its types' names, may stay)"
            )
        placed[path] = source
    return {source: path for path, source in placed.items()}


def point_imports(code: str, names: dict[Path, Path]) -> str:
    """protoc imports a generated module by its .proto's path; ours all sit in events."""
    for source, path in names.items():
        where = ".".join(source.parent.parts)
        name = source.stem + "_pb2"
        imported = f"from {where} import {name}" if where else f"import {name}"
        package = ".".join((PACKAGE, "events", *path.parent.parts))
        pointed = f"from {package} import {name} as "
        code = re.sub(rf"^{re.escape(imported)} as ", pointed, code, flags=re.MULTILINE)
    return code


def clear(events: Path) -> None:
    """Remove earlier generated code, so a .proto deleted or moved leaves no module behind."""
    for old in [*events.glob("*_pb2.py"), *events.glob("*_pb2.pyi")]:
        old.unlink()
    for folder in events.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            shutil.rmtree(folder)


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
        clear(events)
        generated = []
        for source, path in names.items():
            target = events / path
            for folder in reversed(target.parents):
                if folder.is_relative_to(events) and folder != events:
                    folder.mkdir(exist_ok=True)
                    (folder / "__init__.py").touch()
            for suffix in (".py", ".pyi"):
                built = out / source.parent / (source.stem + "_pb2" + suffix)
                code = point_imports(built.read_text(encoding="utf-8"), names)
                target.with_suffix(suffix).write_text(code, encoding="utf-8")
            generated.append(target.with_suffix(".py"))
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
