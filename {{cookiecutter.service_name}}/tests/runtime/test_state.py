"""State stores keep dedupe records durably and within the horizon. Template-owned."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.runtime.config import load_settings
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError
from {{ cookiecutter.package_name }}.runtime.state import (
    SqliteStateStore,
    open_state_store,
)
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness


async def test_sqlite_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path, 1000, 3600, time.time)
    await store.open()
    await store.commit("q", [("a", time.time()), ("b", time.time())])
    await store.close()

    reopened = SqliteStateStore(path, 1000, 3600, time.time)
    await reopened.open()
    assert [event_id for event_id, _ in await reopened.load("q")] == ["a", "b"]
    assert await reopened.load("other") == []
    await reopened.close()


async def test_sqlite_store_forgets_past_the_horizon(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteStateStore(tmp_path / "state.db", 3, 60, lambda: now[0])
    await store.open()
    for n in range(5):
        await store.commit("q", [(f"e{n}", now[0] + n)])
    assert [event_id for event_id, _ in await store.load("q")] == ["e2", "e3", "e4"]
    now[0] += 1000
    assert await store.load("q") == []
    await store.close()


async def test_a_restarted_service_on_sqlite_drops_duplicates(tmp_path: Path) -> None:
    from google.protobuf.wrappers_pb2 import StringValue

    from {{ cookiecutter.package_name }}.runtime import Context, Router

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
    from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX

    monkeypatch.setenv(f"{ENV_PREFIX}STATE_URL", "sqlite://")
    with pytest.raises(ConfigError, match="give a file"):
        open_state_store(load_settings())
