"""Build hook: generate Python code for proto/**/*.proto with grpcio-tools.

Runs on every build (including `uv sync`'s editable install). After editing a
.proto file run `make proto` (or `python hatch_build.py`) to regenerate.

The envelope (proto/io/cloudevents/v1/cloudevents.proto, template-owned) keeps that
name in the protobuf registry whatever the service is called, so any number of
generated services load into one process; its module goes into this package's events.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent
PACKAGE = "{{ cookiecutter.package_name }}"
ENVELOPE = Path("io/cloudevents/v1/cloudevents.proto")


def generate(root: Path = ROOT) -> list[Path]:
    """Compile every .proto under proto/ into src/ (message code and type stubs)."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "proto"
    sources = sorted(str(path.relative_to(proto_root)) for path in proto_root.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {sources}")
        generated = []
        for source in sources:
            relative = Path(source)
            target = Path(PACKAGE, "events", relative.name) if relative == ENVELOPE else relative
            for suffix in ("_pb2.py", "_pb2.pyi"):
                built = out / str(relative).replace(".proto", suffix)
                destination = root / "src" / str(target).replace(".proto", suffix)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built, destination)
            generated.append(root / "src" / str(target).replace(".proto", "_pb2.py"))
    return generated


class ProtoBuildHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate(Path(self.root))


if __name__ == "__main__":
    for path in generate():
        print(f"generated {path.relative_to(ROOT)}", file=sys.stderr)
