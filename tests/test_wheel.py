"""The baked service's wheel, built with `uv build` and installed in a fresh virtualenv
away from the sources, runs: what `pip install` or the image gets. A baked service's own
suite runs on an editable install, which sees every file under src/ and so hides any the
wheel lacks. Also: the README's command table names exactly the commands the CLI has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import TEMPLATE_VERSION, bake, run_ok, tool, tool_env

pytestmark = pytest.mark.slow  # builds and installs wheels

OTHER_SERVICE_PROTOS = {
    "billing/events/money.proto": """
syntax = "proto3";
package billing.events;
message Money { int64 cents = 1; string currency = 2; }
""",
    # The name of this service's own sample file, in another package.
    "billing/events/orders.proto": """
syntax = "proto3";
package billing.events;
message OrderBilled { string order_id = 1; }
""",
    # Imports its neighbour by the path it had in the other service's repository.
    "billing/events/invoices.proto": """
syntax = "proto3";
package billing.events;
import "billing/events/money.proto";
import "google/protobuf/timestamp.proto";
message InvoicePaid {
  string invoice_id = 1;
  Money amount = 2;
  google.protobuf.Timestamp paid_at = 3;
}
""",
}


@dataclass
class Installed:
    """A wheel installed in a virtualenv of its own; commands run from an empty folder."""

    service: Path
    venv: Path
    cwd: Path

    @property
    def name(self) -> str:
        return self.service.name

    def run(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        command = [str(self.venv / "bin" / self.name), *args]
        return run_ok(command, cwd=self.cwd, env=env, timeout=120).stdout


def build_wheel(service: Path, dist: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("uv"), "build", "--wheel", "--out-dir", str(dist), str(service)],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def install_wheel(service: Path, where: Path) -> Installed:
    built = build_wheel(service, where / "dist")
    assert built.returncode == 0, built.stderr[-5000:]
    [wheel] = (where / "dist").glob("*.whl")
    venv = where / "venv"
    run_ok([sys.executable, "-m", "venv", str(venv)], timeout=300)
    install = [tool("uv"), "pip", "install", "--python", str(venv / "bin" / "python"), str(wheel)]
    run_ok(install, env=tool_env(), timeout=600)
    empty = where / "elsewhere"
    empty.mkdir()
    return Installed(service, venv, empty)


def with_protos(service: Path, where: Path, protos: dict[str, str]) -> Path:
    """A copy of the baked service with these files added under proto/."""
    copy = where / service.name
    shutil.copytree(service, copy)
    for relative, text in protos.items():
        path = copy / "proto" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip())
    return copy


@pytest.fixture(scope="module", params=["kafka", "rabbitmq"])
def installed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Installed:
    broker: str = request.param
    service = bake(tmp_path_factory.mktemp(f"wheel-{broker}"), broker=broker)
    return install_wheel(service, tmp_path_factory.mktemp(f"installed-{broker}"))


def test_installed_wheel_names_its_version_types_and_settings(installed: Installed) -> None:
    expected = f"{installed.name} 0.1.0 (template {TEMPLATE_VERSION})"
    assert installed.run("--version").strip() == expected
    types = installed.run("types").split()
    assert "order_service.events.OrderPlaced" in types
    assert "io.cloudevents.v1.CloudEvent" not in types
    settings = installed.run("config").splitlines()
    assert "ORDER_SERVICE_BROKER_URL=memory://" in settings


def test_readme_command_table_lists_every_command_of_the_cli(installed: Installed) -> None:
    usage = installed.run("--help")
    listed = usage[usage.index("  COMMAND\n") :]
    commands = set(re.findall(r"^    ([a-z][\w-]*)", listed, flags=re.MULTILINE))
    options = set(re.findall(r"\[(--[\w-]+)\]", usage.splitlines()[0]))
    assert {"run", "types", "--version"} <= commands | options
    readme = (installed.service / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    in_table = re.findall(rf"^\| `{installed.name} (\S+?)[` ]", section, flags=re.MULTILINE)
    assert sorted(in_table) == sorted(commands | options)


def test_another_services_protos_ship_in_the_wheel(
    default_bake: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Copied at their own path, importing each other by it: the installed service lists
    their types under their own names."""
    where = tmp_path_factory.mktemp("other-protos")
    service = with_protos(default_bake, where, OTHER_SERVICE_PROTOS)
    installed = install_wheel(service, where)
    types = installed.run("types").split()
    assert {"billing.events.InvoicePaid", "billing.events.Money"} <= set(types)
    assert "billing.events.OrderBilled" in types
    assert "order_service.events.OrderPlaced" in types


def test_two_protos_of_one_module_stop_the_build_in_one_line(
    default_bake: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """This service's files and the envelope's share events/: one name there is refused."""
    where = tmp_path_factory.mktemp("clash")
    clash = {
        "order_service/events/cloudevents.proto": OTHER_SERVICE_PROTOS["billing/events/money.proto"]
    }
    service = with_protos(default_bake, where, clash)
    built = build_wheel(service, where / "dist")
    assert built.returncode != 0
    output = built.stdout + built.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: proto/")]
    assert errors == [
        "error: proto/io/cloudevents/v1/cloudevents.proto and "
        "proto/order_service/events/cloudevents.proto "
        "would both generate src/order_service/events/cloudevents_pb2.py: rename one file "
        "(its package line, and so its types' names, may stay)"
    ]
    assert not list((where / "dist").glob("*.whl"))
