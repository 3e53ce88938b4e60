"""Take event types from the organisation's shared schema set into proto/ (`make proto`).

schemas.toml says where the set is (a git repository, cloned at `ref`, or a directory of
.proto files) and which of its files this service takes (`include` globs; the files they
import come along). They are copied into proto/ at their path in the set, so the wheel
and the image build them with no network (hatch_build.py), and schemas.lock records the
revision. Files this service owns (proto/{{ cookiecutter.package_name }}/) and the
template's envelope (proto/io/) are never taken from the set: here they are the source.

Run `make proto` (this, then the code generation) after changing schemas.toml, or to
take the set's newest revision.

`python schemas.py check` (`make schemas-check`, part of `make lint` and CI) runs
`buf lint` over proto/ and `buf breaking` against the same folder on the main branch
(buf.yaml says which rules, and why), so a change that leaves old events unreadable fails.
Set SCHEMAS_AGAINST to compare with another git ref (CI uses origin/main).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "{{ cookiecutter.package_name }}"
CONFIG = "schemas.toml"
LOCK = "schemas.lock"
# Folders in proto/ the set never writes: this service's own types, the envelope, and
# protobuf's well-known types (which protoc and buf bring themselves).
OWNED = ((PACKAGE,), ("io", "cloudevents"), ("google", "protobuf"))
HEADER = (
    "// Taken from the shared schema set by `make proto` ({source} @ {revision}): edit it "
    "there, not here.\n"
)
IMPORT = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.MULTILINE)


class SchemaError(Exception):
    """A problem with the shared schema set or schemas.toml, said in one line."""


@dataclass(frozen=True)
class SchemaSet:
    source: str = ""
    ref: str = "main"
    include: list[str] = field(default_factory=lambda: ["**/*.proto"])

    @classmethod
    def load(cls, root: Path = ROOT) -> SchemaSet:
        path = root / CONFIG
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except tomllib.TOMLDecodeError as error:
            raise SchemaError(f"{CONFIG}: {error}") from None
        unknown = set(data) - {"source", "ref", "include"}
        if unknown:
            raise SchemaError(f"{CONFIG}: unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**data)


def owned(path: Path) -> bool:
    return any(path.parts[: len(prefix)] == prefix for prefix in OWNED)


def shown(source: str) -> str:
    """The source without credentials (https://user:token@host/...), for files we write."""
    return re.sub(r"//[^/@]*@", "//", source)


def checkout(schemas: SchemaSet, root: Path, scratch: Path) -> tuple[Path, str]:
    """The set's folder and its revision: a directory as it is, a git repository cloned."""
    local = root / Path(schemas.source).expanduser()  # a relative path: from this folder
    if local.is_dir() and not (local / ".git").exists():
        return local, "directory"
    if shutil.which("git") is None:
        raise SchemaError(
            f"{shown(schemas.source)} is no directory, and git (to clone it) is missing"
        )
    clone = scratch / "set"
    command = ["git", "clone", "--quiet", "--depth", "1", "--branch", schemas.ref]
    source = str(local) if local.exists() else schemas.source
    done = subprocess.run(
        [*command, source, str(clone)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["git failed"])[-1]
        raise SchemaError(f"cannot fetch {shown(schemas.source)} at {schemas.ref}: {why}")
    revision = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return clone, revision


def wanted(folder: Path, include: list[str]) -> list[Path]:
    """The included files and, transitively, the files of the set they import."""
    todo = sorted({p.relative_to(folder) for g in include for p in folder.glob(g)})
    todo = [path for path in todo if path.suffix == ".proto"]
    taken: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in taken or owned(path):
            continue
        taken.add(path)
        for imported in IMPORT.findall((folder / path).read_text(encoding="utf-8")):
            if (folder / imported).is_file():
                todo.append(Path(imported))
    return sorted(taken)


def sync(root: Path = ROOT) -> list[Path]:
    """Copy the set's wanted files into proto/, remove those taken before and no longer
    wanted, and write schemas.lock. Returns the files taken (relative to proto/)."""
    schemas = SchemaSet.load(root)
    proto = root / "proto"
    lock_path = root / LOCK
    before = taken_before(root)
    if not schemas.source:
        taken: list[Path] = []
        revision = ""
    else:
        with tempfile.TemporaryDirectory() as scratch:
            folder, revision = checkout(schemas, root, Path(scratch))
            taken = wanted(folder, schemas.include)
            if not taken:
                raise SchemaError(
                    f"{shown(schemas.source)} has no .proto file matching {schemas.include}"
                )
            header = HEADER.format(source=shown(schemas.source), revision=revision)
            for path in taken:
                target = proto / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(header + (folder / path).read_text(encoding="utf-8"))
    for stale in set(before) - {str(path) for path in taken}:
        (proto / stale).unlink(missing_ok=True)
        for folder in (proto / stale).parents:  # and the folders it leaves empty
            if folder == proto or (folder.is_dir() and any(folder.iterdir())):
                break
            if folder.is_dir():
                folder.rmdir()
    lock = {"source": shown(schemas.source), "ref": schemas.ref, "revision": revision}
    lock_path.write_text(json.dumps({**lock, "files": [str(p) for p in taken]}, indent=2) + "\n")
    return taken


def git_out(*args: str, root: Path) -> str | None:
    """A git command's output, or None when it fails (no repository, no such ref)."""
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def breaking_against(root: Path, ref: str) -> str | None:
    """buf's input for proto/ as it is at `ref`, or None when there is nothing to compare
    with: no git repository (a fresh bake), no `ref` yet, or no proto/ at `ref` (a new
    service). In CI a missing `ref` is an error (a shallow checkout), never a skip."""
    top = git_out("rev-parse", "--show-toplevel", root=root)
    prefix = git_out("rev-parse", "--show-prefix", root=root)
    if top is None or prefix is None:
        return None
    if git_out("rev-parse", "--verify", ref + "^{commit}", root=root) is None:
        if os.environ.get("CI") == "true":
            raise SchemaError(f"no {ref} in git to check proto/ against: fetch it")
        return None
    if git_out("cat-file", "-e", f"{ref}:{prefix}proto", root=root) is None:
        return None
    where = f",subdir={prefix.rstrip('/')}" if prefix else ""
    return f"{top}/.git#ref={ref}{where}"


def taken_before(root: Path) -> list[str]:
    """The files schemas.lock says `make proto` copied from the set (relative to proto/)."""
    lock = root / LOCK
    files: list[str] = json.loads(lock.read_text()).get("files", []) if lock.exists() else []
    return files


def check(root: Path = ROOT) -> int:
    """buf lint of this service's own files (the set's are linted where they are written),
    then buf breaking of all against the main branch, so taking an incompatible revision
    of the set fails too; buf prints what is wrong."""
    excluded = [arg for path in taken_before(root) for arg in ("--exclude-path", f"proto/{path}")]
    if (linted := buf("lint", *excluded, root=root)) != 0:
        return linted
    ref = os.environ.get("SCHEMAS_AGAINST", "main")
    against = breaking_against(root, ref)
    if against is None:
        print(f"buf breaking skipped: no proto/ in git at {ref} to compare with", file=sys.stderr)
        return 0
    print(f"buf breaking against {ref}", file=sys.stderr)
    return buf("breaking", "--against", against, root=root)


def buf(*args: str, root: Path) -> int:
    """Run buf (the buf-bin dev dependency, beside this Python); it prints its findings."""
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.exists() else shutil.which("buf")
    if found is None:
        raise SchemaError("buf is not installed: run `uv sync` (buf-bin is a dev dependency)")
    return subprocess.run([found, *args], cwd=root, check=False).returncode


def main(argv: list[str]) -> int:
    try:
        if argv == ["check"]:
            return check()
        if argv:
            raise SchemaError(f"usage: python schemas.py [check], not {' '.join(argv)}")
        taken = sync()
    except SchemaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in taken:
        print(f"took proto/{path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
