"""Fleet report: which template release each service is on, whether it is current, and
what updating it would change. For the platform team, over local clones of the services:

    .venv/bin/python scripts/fleet.py ../services/*            # or: --from-file repos.txt

One row per service, oldest release first; then the outdated ones by name. Exits 1 when
any service is outdated or cannot be checked, so a scheduled job can alert on it. Uses
cruft (scripts/requirements-dev.txt): `cruft check`, and for an outdated service
`cruft update` on a throwaway copy, which says exactly which files the update changes and
which it would leave in conflict; both clone the template from the address in the
service's `.cruft.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

UNVERSIONED = "unversioned"  # baked before the template recorded its release
NOT_COPIED = (".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache")
UNMERGED = {"UU", "AA", "DU", "UD", "AU", "UA", "DD"}  # git status codes of a conflict
TIMEOUT_S = 600


@dataclass(frozen=True)
class Report:
    path: Path
    name: str
    version: str
    commit: str
    current: bool | None  # None: could not be checked (see problem)
    changed_files: tuple[str, ...] = ()  # what updating would change, without conflict
    conflicts: tuple[str, ...] = ()  # files the update would leave for the owner to merge
    problem: str = ""

    @property
    def outdated(self) -> bool:
        return self.current is False


def cruft_command() -> str:
    """cruft beside this interpreter (the template's .venv), else from PATH."""
    local = Path(sys.executable).parent / "cruft"
    found = str(local) if local.exists() else shutil.which("cruft")
    if found is None:
        raise SystemExit("fleet: error: cruft is not installed; run scripts/bootstrap.sh")
    return found


def version_key(version: str) -> tuple[int, ...]:
    """Sort key: unversioned first, then by release number."""
    if version == UNVERSIONED:
        return (-1,)
    return tuple(int(part) for part in re.findall(r"\d+", version))


def git(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    identity = ["-c", "user.name=fleet", "-c", "user.email=fleet@localhost"]
    return subprocess.run(
        ["git", *identity, *args], cwd=folder, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def trial_update(path: Path, checkout: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(changed files, conflicted files, problem): `cruft update` run on a throwaway copy of
    the service. `cruft diff` would miss the files an update adds; this is the update."""
    with tempfile.TemporaryDirectory(prefix="fleet-") as scratch:
        copy = Path(scratch) / path.name
        shutil.copytree(path, copy, symlinks=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
        if not (copy / ".git").exists():
            git(copy, "init", "--quiet")
        git(copy, "add", "--all")
        git(copy, "commit", "--quiet", "--allow-empty", "--message=as found")
        update = subprocess.run(
            [cruft_command(), "update", "--checkout", checkout, "--skip-apply-ask"],
            cwd=copy,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        if update.returncode != 0:
            return (), (), "cruft update: " + " ".join(update.stderr.split())[-300:]
        status = git(copy, "status", "--porcelain", "--untracked-files=all").stdout
    changed, conflicted = set(), set()
    for line in status.splitlines():
        code, name = line[:2], line[3:]
        if code in UNMERGED or name.endswith(".rej"):
            conflicted.add(name.removesuffix(".rej"))
        elif name != ".cruft.json":
            changed.add(name)
    return tuple(sorted(changed - conflicted)), tuple(sorted(conflicted)), ""


def inspect(path: Path, checkout: str) -> Report:
    """One service's release, verdict and pending changes; problems become its report."""
    if not (path / ".cruft.json").is_file():
        problem = "no .cruft.json: not made with cruft (`cruft link TEMPLATE` adopts it)"
        return Report(path, path.name, "?", "?", None, problem=problem)
    try:
        state = json.loads((path / ".cruft.json").read_text())
        answers = state["context"]["cookiecutter"]
        name = answers["service_name"]
        version = answers.get("_template_version", UNVERSIONED)
        commit = state["commit"][:12]
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"unreadable .cruft.json ({type(error).__name__}: {error})"
        return Report(path, path.name, "?", "?", None, problem=problem)
    # cruft check says SUCCESS (exit 0) or FAILURE (exit 1); anything else is an error.
    check = subprocess.run(
        [cruft_command(), "check", "--checkout", checkout],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if check.returncode == 0 and "SUCCESS" in check.stdout:
        return Report(path, name, version, commit, True)
    if "FAILURE" not in check.stdout:
        said = " ".join((check.stderr + check.stdout).split())[-300:]
        return Report(path, name, version, commit, None, problem=f"cruft check: {said}")
    changed, conflicted, problem = trial_update(path, checkout)
    return Report(path, name, version, commit, False, changed, conflicted, problem)


def render(reports: list[Report], *, verbose: bool) -> str:
    rows = [("service", "template", "commit", "status", "on update", "path")]
    for report in reports:
        if report.current is None:
            status, update = "ERROR", report.problem
        elif report.current:
            status, update = "current", "-"
        else:
            status = "OUTDATED"
            count = len(report.changed_files)
            update = f"{count} file{'' if count == 1 else 's'} change"
            if report.conflicts:
                update += f", {len(report.conflicts)} conflict"
            if report.problem:
                update = report.problem
        rows.append((report.name, report.version, report.commit, status, update, str(report.path)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]
    if verbose:
        for report in reports:
            lines += [f"{report.name}: {file}" for file in report.changed_files]
            lines += [f"{report.name}: {file} (conflict)" for file in report.conflicts]
    outdated = [report.name for report in reports if report.outdated]
    errors = [report.name for report in reports if report.current is None]
    lines.append(f"outdated: {', '.join(outdated) if outdated else 'none'}")
    if errors:
        lines.append(f"could not check: {', '.join(errors)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("services", nargs="*", type=Path, help="local clones of the services")
    parser.add_argument(
        "--from-file", type=Path, help="a file with one service path per line (# comments)"
    )
    parser.add_argument(
        "--checkout", default="main", help="the template branch or tag to compare with"
    )
    parser.add_argument("--jobs", type=int, default=4, help="services checked at once")
    parser.add_argument("--json", action="store_true", help="one JSON object per service")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the changed files")
    args = parser.parse_args(argv)
    paths: list[Path] = list(args.services)
    if args.from_file is not None:
        try:
            lines = args.from_file.read_text().splitlines()
        except OSError as error:
            parser.exit(2, f"fleet: error: {args.from_file}: {error.strerror}\n")
        paths += [Path(line.strip()) for line in lines if line.strip() and line[0] != "#"]
    if not paths:
        parser.error("name at least one service folder (or --from-file)")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        reports = list(pool.map(lambda path: inspect(path, args.checkout), paths))
    reports.sort(key=lambda report: (version_key(report.version), report.name))
    if args.json:
        for report in reports:
            fields = {**vars(report), "path": str(report.path), "outdated": report.outdated}
            print(json.dumps(fields))
    else:
        print(render(reports, verbose=args.verbose))
    return 0 if all(report.current for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
