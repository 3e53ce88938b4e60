"""A restarted service keeps its dedupe records in the embedded store. Template-owned."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.config import (
    ENV_PREFIX,
    Settings,
    load_settings,
)
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError
from {{ cookiecutter.package_name }}.runtime.state import open_state_store
from {{ cookiecutter.package_name }}.runtime.state.base import (
    Checkpoint,
    Fence,
    StateUnavailable,
)
from {{ cookiecutter.package_name }}.runtime.state.etcd import CHUNK_BYTES, _id_values
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness


async def test_a_restarted_service_on_sqlite_drops_duplicates(tmp_path: Path) -> None:
    handled: list[str] = []
    router = Router()

    @router.handles(StringValue)
    async def handle(event: StringValue, ctx: Context) -> None:
        handled.append(event.value)

    url = f"sqlite://{tmp_path / 'state.db'}"
    first = ServiceHarness(router, state_url=url)
    event_id = await first.publish(StringValue(value="x"))
    await first.run_until_idle()

    second = ServiceHarness(router, state_url=url)  # a new process, same state file
    await second.publish(StringValue(value="x"), event_id=event_id)
    stats = await second.run_until_idle()
    assert handled == ["x"]
    assert stats.duplicates == 1


def test_sqlite_url_without_a_path_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}STATE_URL", "sqlite://")
    with pytest.raises(ConfigError, match="give a file"):
        open_state_store(load_settings())


@pytest.mark.parametrize(
    ("ids", "records"),
    [
        ([str(uuid.uuid4()) for _ in range(4000)], 1),  # a full group
        ([str(uuid.uuid4()) for _ in range(30_000)], 2),  # 39 bytes an id
        (["\N{GRINNING FACE}" * 1000 + str(n) for n in range(300)], 4),  # 12 bytes a character
        (['\x01"' * 2000 + str(n) for n in range(300)], 5),  # escaped control characters
    ],
)
def test_etcd_id_records_stay_within_the_request_limit(ids: list[str], records: int) -> None:
    recorded_at = 1700000000.123456
    values = _id_values(ids, recorded_at)
    assert len(values) == records
    stored = [json.loads(value) for value, _ in values]
    assert [event_id for _, chunk in stored for event_id in chunk] == ids
    assert [len(chunk) for _, chunk in stored] == [count for _, count in values]
    assert all(at == recorded_at for at, _ in stored)
    assert all(len(value) <= CHUNK_BYTES for value, _ in values)


async def test_an_unreachable_etcd_fails_a_commit_with_its_reason_in_one_line() -> None:
    """gRPC's own text of an error spans several lines; the store's retry warnings and
    logs take one."""
    settings = Settings(state_url="etcd://127.0.0.1:1", consumer_group="g")  # nobody there
    store = open_state_store(settings)
    # Progress alone: no lease is asked for first, the transaction is the first call.
    with pytest.raises(StateUnavailable, match=r"^etcd: UNAVAILABLE: ") as failed:
        await store.commit(Checkpoint("s", (), time.time(), Fence("s", 1), progress=1))
    assert "\n" not in str(failed.value)
    await store.close()
