"""Build hook: generate Python code for proto/**/*.proto with grpcio-tools.

Runs on every build (including `uv sync`'s editable install). After editing a
.proto file run `make proto` (or `python hatch_build.py`) to regenerate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent


def generate(root: Path = ROOT) -> list[Path]:
    """Compile every .proto under proto/ into src/ (message code and type stubs)."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "proto"
    sources = sorted(str(path.relative_to(proto_root)) for path in proto_root.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={root / 'src'}",
        f"--pyi_out={root / 'src'}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {sources}")
    return [root / "src" / source.replace(".proto", "_pb2.py") for source in sources]


class ProtoBuildHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate(Path(self.root))


if __name__ == "__main__":
    for path in generate():
        print(f"generated {path.relative_to(ROOT)}", file=sys.stderr)
