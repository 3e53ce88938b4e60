"""Schemas across services (issue 24): a second service takes the first's event types
from the shared schema set with `make proto` and its installed wheel handles them; buf
fails `make schemas-check` on a breaking change with buf's own message and passes a
compatible one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from .conftest import BIN, bake, run_ok, tool_env
from .test_wheel import Installed, install_wheel

pytestmark = pytest.mark.slow  # bakes, syncs and builds services

ORDERS = Path("proto/order_service/events/orders.proto")


BILLING_HANDLERS = '''"""billing-service handles order-service's StockReserved (shared set)."""

from google.protobuf.message import Message

from .events.order_service.events.orders_pb2 import StockReserved
from .runtime import Context, Router

router = Router()


@router.handles(StockReserved)
async def bill(event: StockReserved, ctx: Context) -> None:
    ctx.log.info("billing", order_id=event.order_id)


def demo_events() -> list[tuple[Message, str]]:
    return [(StockReserved(order_id="o-1", sku="sku-apple", quantity=2), "o-1")]
'''


def git(*args: str, cwd: Path) -> None:
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    identity |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    run_ok(["git", *args], cwd=cwd, env={**os.environ, **identity}, timeout=60)


@pytest.fixture(scope="module")
def billing(default_bake: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """docs' "Consume another team's events": order-service's proto folder published as
    the shared schema set (a git repository), billing-service (RabbitMQ) baked pointing at
    it, `make proto`, a handler of StockReserved; its wheel built and installed."""
    where = tmp_path_factory.mktemp("shared-set")
    shared = where / "event-schemas"
    shutil.copytree(default_bake / "proto", shared)
    git("init", "--quiet", "--initial-branch=main", cwd=shared)
    git("add", ".", cwd=shared)
    git("commit", "--quiet", "-m", "order-service's events", cwd=shared)
    answers = {"service_name": "billing-service", "broker": "rabbitmq"}
    service = bake(where / "bake", schemas_source=str(shared), **answers)
    (service / "src" / "billing_service" / "handlers.py").write_text(BILLING_HANDLERS)
    run_ok(["make", "proto"], cwd=service, env=tool_env(), timeout=600)
    assert (service / ORDERS).is_file()
    envelope = service / "proto" / "io" / "cloudevents" / "v1" / "cloudevents.proto"
    assert not envelope.read_text().startswith("// Taken")  # the template's, not the set's
    return install_wheel(service, where / "installed")


def test_a_second_service_handles_the_first_services_event_from_the_shared_set(
    billing: Installed,
) -> None:
    assert "order_service.events.StockReserved" in billing.run("types").split()
    assert "handled: 1\n" in billing.run("demo")


@pytest.fixture(scope="module")
def in_git(default_bake: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default bake as a repository whose main branch has it, synced, on a branch."""
    service = tmp_path_factory.mktemp("in-git") / default_bake.name
    shutil.copytree(default_bake, service)
    git("init", "--quiet", "--initial-branch=main", cwd=service)
    git("add", ".", cwd=service)
    git("commit", "--quiet", "-m", "baked", cwd=service)
    git("checkout", "--quiet", "-b", "change", cwd=service)
    run_ok(["uv", "sync", "--quiet"], cwd=service, env=tool_env(), timeout=600)
    return service


def schemas_check(service: Path, old: str, new: str) -> subprocess.CompletedProcess[str]:
    """`make schemas-check` with one edit of orders.proto, which is then undone."""
    path = service / ORDERS
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    try:
        env = {**tool_env(), "CI": "true"}  # as in CI: no comparison skipped
        return subprocess.run(
            ["make", "schemas-check"], cwd=service, env=env, capture_output=True, text=True
        )
    finally:
        path.write_text(text)


QUANTITY = "  int32 quantity = 3;"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            QUANTITY,
            "  int64 quantity = 3;",
            'Field "3" with name "quantity" on message "OrderPlaced" changed type from '
            '"int32" to "int64".',
        ),
        (
            QUANTITY,
            "  int32 quantity = 4;",
            'Previously present field "3" with name "quantity" on message "OrderPlaced" was '
            "deleted without reserving the number",
        ),
        (
            "  string reason = 2;\n",
            "",
            'Previously present field "2" with name "reason" on message "OrderCancelled" was '
            "deleted without reserving the number",
        ),
    ],
    ids=["type-changed", "number-changed", "removed-unreserved"],
)
def test_a_breaking_change_fails_with_bufs_message(
    in_git: Path, old: str, new: str, message: str
) -> None:
    checked = schemas_check(in_git, old, new)
    assert checked.returncode != 0
    assert f"{ORDERS}:" in checked.stdout
    assert message in checked.stdout


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (QUANTITY, QUANTITY + "\n  optional string coupon = 4;"),
        ("  string reason = 2;\n", '  reserved 2;\n  reserved "reason";\n'),
    ],
    ids=["new-optional-field", "field-retired-and-reserved"],
)
def test_a_compatible_change_passes(in_git: Path, old: str, new: str) -> None:
    checked = schemas_check(in_git, old, new)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "buf breaking against main" in checked.stderr


def test_in_ci_a_missing_main_fails_in_one_line(in_git: Path) -> None:
    """A shallow checkout without the branch to compare with must not pass unchecked."""
    env = {**tool_env(), "CI": "true", "SCHEMAS_AGAINST": "origin/main"}
    checked = subprocess.run(
        ["make", "schemas-check"], cwd=in_git, env=env, capture_output=True, text=True
    )
    assert checked.returncode != 0
    assert "error: no origin/main in git to check proto/ against: fetch it\n" in checked.stderr
    assert "Traceback" not in checked.stderr
    local = subprocess.run(
        ["make", "schemas-check"],
        cwd=in_git,
        env={**env, "CI": "false"},
        capture_output=True,
        text=True,
    )
    assert local.returncode == 0, local.stderr
    assert "buf breaking skipped" in local.stderr


def asyncapi_validator() -> Draft7Validator:
    """The official AsyncAPI 3.0 JSON schema (npm @asyncapi/specs, scripts/bootstrap.sh)."""
    found = sorted(BIN.parent.glob("share/asyncapi-specs-*/schemas/3.0.0.json"))
    assert found, "no AsyncAPI schema in .venv/share: run scripts/bootstrap.sh (needs npm)"
    schema = json.loads(found[-1].read_text())
    resource = Resource.from_contents(schema, default_specification=DRAFT7)
    registry = Registry().with_resource(schema["$id"], resource).crawl()
    return Draft7Validator(schema, registry=registry)


def test_asyncapi_documents_validate_against_the_asyncapi_schema(
    billing: Installed, in_git: Path
) -> None:
    validator = asyncapi_validator()
    orders = json.loads(
        run_ok(
            ["uv", "run", "order-service", "asyncapi"], cwd=in_git, env=tool_env(), timeout=120
        ).stdout
    )
    bills = json.loads(billing.run("asyncapi"))
    for document in (orders, bills):
        assert [error.message for error in validator.iter_errors(document)] == []

    def actions(document: dict[str, Any]) -> dict[str, str]:
        return {
            op["channel"]["$ref"].rpartition("/")[2]: op["action"]
            for op in document["operations"].values()
        }

    assert actions(orders) == {
        "order_service.events.OrderPlaced": "receive",
        "order_service.events.OrderCancelled": "receive",
        "order_service.events.StockReserved": "send",
        "order_service.events.StockReleased": "send",
    }
    placed = orders["channels"]["order_service.events.OrderPlaced"]
    assert placed["bindings"]["kafka"]["topic"] == "order_service.events.OrderPlaced"
    quantity = orders["components"]["schemas"]["order_service.events.OrderPlaced"]["properties"][
        "quantity"
    ]
    assert quantity == {"type": "integer", "format": "int32"}
    # billing-service handles order-service's type, from the shared set, over RabbitMQ.
    assert actions(bills)["order_service.events.StockReserved"] == "receive"
    reserved = bills["channels"]["order_service.events.StockReserved"]
    assert reserved["bindings"]["amqp"]["exchange"]["name"] == "events"
    assert bills["servers"]["rabbitmq"]["protocol"] == "amqp"

    broken = {
        **orders,
        "operations": {"x": {"action": "publish", "channel": {"$ref": "#/channels/x"}}},
    }
    assert list(validator.iter_errors(broken))  # the validator does catch a bad document
