"""The loop on a real etcd: restart, fencing, outage, bounded key count. Template-owned.

Needs the `etcd` binary (Debian package etcd-server): each test starts its own etcd on
free loopback ports, so it can stop and restart it. Under CI=true a missing binary fails.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
from aetcd.exceptions import ConnectionFailedError
from google.protobuf.wrappers_pb2 import StringValue

from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.app import build_loop
from {{ cookiecutter.package_name }}.runtime.brokers.memory import MemoryBroker
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, Settings
from {{ cookiecutter.package_name }}.runtime.state import (
    StateStore,
    StateUnavailable,
    open_state_store,
)
from {{ cookiecutter.package_name }}.runtime.state.base import Checkpoint, KeyState
from {{ cookiecutter.package_name }}.runtime.testing import ServiceHarness

from ..runtime.conftest import FAST, RunningLoop
from .conftest import free_port, unavailable
from .tls_support import make_certificates

pytestmark = pytest.mark.servers  # starts etcd processes of its own


class PrivateEtcd:
    """An etcd process of this test's own, on loopback; with `tls`, mutual TLS only."""

    def __init__(self, data_dir: Path, tls: dict[str, Path] | None = None) -> None:
        self.data_dir = data_dir
        self.port, self.peer_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.tls = tls  # server "cert" and "key"; client certificates must chain to "ca"

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def arguments(self) -> list[str]:
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        arguments = [
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
        ]
        if self.tls:
            arguments += [
                f"--cert-file={self.tls['cert']}",
                f"--key-file={self.tls['key']}",
                "--client-cert-auth",
                f"--trusted-ca-file={self.tls['ca']}",
            ]
        return arguments

    def start(self) -> None:
        """Start etcd and wait until it listens. The ports were free when chosen, but
        another process (a parallel test run) may take one first: then this etcd exits and
        the port answers for someone else, so a start only counts while it is alive."""
        deadline = time.monotonic() + 30
        while True:
            process = subprocess.Popen(
                ["etcd", *self.arguments()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.process = process
            while process.poll() is None and time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                        time.sleep(0.1)  # bound, or about to fail for a taken port?
                        if process.poll() is None:
                            return
                time.sleep(0.05)
            assert time.monotonic() < deadline, "etcd did not start"
            self.port, self.peer_port = free_port(), free_port()  # taken: try others

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[PrivateEtcd]:
    if shutil.which("etcd") is None:
        unavailable("the etcd binary", "install the Debian package etcd-server")
    server = PrivateEtcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


def recording_router(handled: list[str], delay_s: float = 0.0) -> Router:
    router = Router()

    @router.handles(StringValue)
    async def record(event: StringValue, ctx: Context) -> None:
        await asyncio.sleep(delay_s)
        handled.append(event.value)

    return router


def harness(etcd: PrivateEtcd, router: Router, group: str, **settings: Any) -> ServiceHarness:
    return ServiceHarness(
        router, **{**FAST, "state_url": etcd.url, "consumer_group": group, **settings}
    )


@pytest.fixture
async def group() -> AsyncIterator[str]:
    yield f"it-etcd-{uuid.uuid4().hex[:8]}"


async def test_a_restart_resumes_without_rehandling_checkpointed_ids(
    etcd: PrivateEtcd, group: str
) -> None:
    handled: list[str] = []
    first = harness(etcd, recording_router(handled), group)
    event_ids = [await first.publish(StringValue(value=f"e{n}")) for n in range(50)]
    await first.run_until_idle()
    await first.state.close()

    second = harness(etcd, recording_router(handled), group)  # a new process
    for n, event_id in enumerate(event_ids):
        await second.publish(StringValue(value=f"e{n}"), event_id=event_id)
    stats = await second.run_until_idle()
    assert stats.duplicates == 50
    assert sorted(handled) == sorted(f"e{n}" for n in range(50))
    await second.state.close()


async def test_an_etcd_outage_pauses_acks_and_resumes_without_loss(
    etcd: PrivateEtcd, group: str
) -> None:
    handled: list[str] = []
    service = harness(etcd, recording_router(handled), group, heartbeat_max_age_s=60)
    for n in range(20):
        await service.publish(StringValue(value=f"before-{n}"))
    await service.run_until_idle()

    etcd.stop()
    for n in range(20):
        await service.publish(StringValue(value=f"during-{n}"))
    run = asyncio.create_task(service.run_until_idle(deadline_s=60))
    await asyncio.sleep(2.0)
    assert service.bus.pending(service.group) == 20  # handled, but nothing acked
    etcd.start()
    stats = await run

    assert stats.acked == 20
    assert sorted(handled) == sorted(
        [f"before-{n}" for n in range(20)] + [f"during-{n}" for n in range(20)]
    )
    await service.state.close()


class PausableProxy:
    """A TCP proxy to etcd on loopback whose answers can be held back: a call sent while
    paused stays in flight on its connection (deterministic, unlike stopping etcd)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.answering = asyncio.Event()
        self.answering.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _connect(self, client_in: asyncio.StreamReader, client_out: Any) -> None:
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(client_in, server_out, None),
            self._pipe(server_in, client_out, self.answering),
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: Any, gate: Any) -> None:
        try:
            while data := await reader.read(65536):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.answering.set()
        if self.server is not None:
            self.server.close()


async def test_a_call_in_flight_outlives_another_calls_failure(
    etcd: PrivateEtcd, group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kafka service reads several partitions' state at once on one connection: one
    call's failure must not cancel the others (a CancelledError used to end the process)."""
    proxy = PausableProxy(etcd.port)
    url = f"etcd://127.0.0.1:{await proxy.start()}"
    store = open_state_store(Settings(state_url=url, consumer_group=group))
    try:
        await store.commit(Checkpoint("p0", states={"k": KeyState(b'{"n":1}')}))
        proxy.answering.clear()  # etcd's answers are held: the read below stays in flight
        reading = asyncio.create_task(store.load_states("p0", ["k"]))
        await asyncio.sleep(0.2)
        assert not reading.done()

        async def lost(*_: Any, **__: Any) -> None:
            raise ConnectionFailedError("connection lost")

        monkeypatch.setattr(aetcd.Client, "put", lost)  # another partition's call fails
        with pytest.raises(StateUnavailable):
            await store.take_over("p1")
        proxy.answering.set()
        assert (await reading)["k"].value == b'{"n":1}'
    finally:
        await store.close()
        await proxy.close()


async def test_a_cancelled_store_call_stays_cancelled(etcd: PrivateEtcd, group: str) -> None:
    """The store turns a call cancelled under it into StateUnavailable, never a call whose
    own task was cancelled (the loop stopping or crashing)."""
    store = open_state_store(Settings(state_url=etcd.url, consumer_group=group))
    await store.open()
    assert etcd.process is not None
    etcd.process.send_signal(signal.SIGSTOP)
    try:
        reading = asyncio.create_task(store.load_states("p0", ["k"]))
        await asyncio.sleep(0.2)
        reading.cancel()
        await asyncio.wait([reading])
        assert reading.cancelled()
    finally:
        etcd.process.send_signal(signal.SIGCONT)
    await store.close()


async def test_a_fenced_instance_rejoins_and_never_acks_its_stale_batch(
    etcd: PrivateEtcd, group: str
) -> None:
    handled: list[str] = []
    in_handler = asyncio.Event()
    router = Router()

    @router.handles(StringValue)
    async def slow(event: StringValue, ctx: Context) -> None:
        in_handler.set()
        await asyncio.sleep(0.3)
        handled.append(event.value)

    service = harness(etcd, router, group)
    await service.publish(StringValue(value="x"))
    broker = MemoryBroker(service.bus, group, exclusive=True)  # like a Kafka partition
    loop = build_loop(service.settings, router, broker=broker, state=service.state)
    running = RunningLoop(loop)
    await asyncio.wait_for(in_handler.wait(), 30)  # this instance owns the stream now
    usurper: StateStore = open_state_store(service.settings)
    await usurper.take_over(group)  # a newer owner appears while "x" is being handled
    await running.wait_until(lambda: loop.stats.fenced >= 1)
    await running.wait_until(lambda: service.bus.pending(group) == 0)  # redelivered, done
    stats = await running.stop_gracefully()
    assert handled == ["x", "x"]  # the stale run was never acked; the rejoined one was
    assert stats.acked == 1
    await usurper.close()
    await service.state.close()


async def test_the_etcd_key_count_stays_bounded_over_a_long_run(
    etcd: PrivateEtcd, group: str
) -> None:
    handled: list[str] = []
    service = harness(etcd, recording_router(handled), group, dedupe_max_ids=200, batch_size=50)
    counts = []
    for round_number in range(10):
        for n in range(300):
            await service.publish(StringValue(value=f"r{round_number}-{n}"))
        await service.run_until_idle()
        counts.append(len((await service.state.load(group)).records))
    assert len(handled) == 3000
    assert max(counts) <= 200 + 50  # the horizon, at batch granularity
    await service.state.close()


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[PrivateEtcd]:
    for binary in ("etcd", "openssl"):
        if shutil.which(binary) is None:
            unavailable(binary, "install it to run the etcd TLS tests")
    server = PrivateEtcd(tmp_path / "etcd", make_certificates(tmp_path / "pki", "etcd"))
    server.start()
    yield server
    server.stop()


async def test_etcd_over_mutual_tls_uses_the_configured_ca_and_certificate(
    tls_etcd: PrivateEtcd, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert tls_etcd.tls is not None
    group = f"it-tls-{uuid.uuid4().hex[:6]}"
    settings = Settings(state_url=tls_etcd.url, consumer_group=group)
    monkeypatch.setenv(f"{ENV_PREFIX}ETCD_TLS_CA_FILE", str(tls_etcd.tls["ca"]))
    monkeypatch.setenv(f"{ENV_PREFIX}ETCD_TLS_CERT_FILE", str(tls_etcd.tls["client_cert"]))
    monkeypatch.setenv(f"{ENV_PREFIX}ETCD_TLS_KEY_FILE", str(tls_etcd.tls["client_key"]))
    store = open_state_store(settings)
    await store.commit(Checkpoint("s", ["over-tls"], time.time()))
    assert [event_id for event_id, _ in (await store.load("s")).records] == ["over-tls"]
    await store.close()

    # A CA that did not sign the server's certificate fails, with the reason in one line.
    other_ca = make_certificates(tmp_path / "other", "other")["ca"]
    monkeypatch.setenv(f"{ENV_PREFIX}ETCD_TLS_CA_FILE", str(other_ca))
    monkeypatch.setenv(f"{ENV_PREFIX}ETCD_TIMEOUT_S", "2")
    untrusting = open_state_store(settings)
    with pytest.raises(StateUnavailable, match=r"^etcd: ") as refused:
        await untrusting.load("s")
    assert "\n" not in str(refused.value)
    await untrusting.close()
