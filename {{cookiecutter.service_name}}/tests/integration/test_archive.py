"""The archiver against the real broker and an S3-compatible server, run as an operator
runs it (`<service> archive`): files in S3 holding every event, a SIGKILL and restart
losing none, and wrong storage settings refused in one line.

The S3 server's address comes from the environment (scripts/servers.sh starts moto):

    TEST_S3_ENDPOINT=http://127.0.0.1:19900   TEST_S3_ACCESS_KEY_ID, TEST_S3_SECRET_ACCESS_KEY
    TEST_S3_BUCKET=...   (optional: an existing bucket; else one is made per test, as moto
                          allows without credentials)

Without it these cases are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from {{ cookiecutter.package_name }}.events.orders_pb2 import OrderPlaced, StockReserved
from {{ cookiecutter.package_name }}.runtime import Context, Router
from {{ cookiecutter.package_name }}.runtime.app import build_loop, event_registry
from {{ cookiecutter.package_name }}.runtime.brokers.base import event_message
from {{ cookiecutter.package_name }}.runtime.claimcheck import (
    ClaimCheck,
    ClaimCheckSettings,
)
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, Settings
from {{ cookiecutter.package_name }}.runtime.envelope import (
    CloudEventsProtobufCodec,
    Envelope,
    event_type_of,
    new_event_id,
    now,
)
from {{ cookiecutter.package_name }}.runtime.objectstore import (
    ObjectStoreSettings,
    ObstoreObjects,
    open_object_store,
)

from ..runtime.conftest import RunningLoop
from .conftest import (
    Backend,
    fetch_at_least,
    free_port,
    run_cli,
    start_cli,
    unavailable,
    wait_until,
)

pytestmark = pytest.mark.servers


@dataclass
class S3:
    endpoint: str
    bucket: str
    prefix: str
    variables: dict[str, str]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def store(self) -> ObstoreObjects:
        return open_object_store(
            ObjectStoreSettings(
                archive_url=self.url,
                s3_endpoint=self.endpoint,
                s3_access_key_id=self.variables["S3_ACCESS_KEY_ID"],
                s3_secret_access_key=self.variables["S3_SECRET_ACCESS_KEY"],
            )
        )


@pytest.fixture
def s3() -> S3:
    endpoint = os.environ.get("TEST_S3_ENDPOINT")
    if not endpoint:
        unavailable("TEST_S3_ENDPOINT", "set it to run against an S3-compatible server")
    bucket = os.environ.get("TEST_S3_BUCKET")
    if not bucket:
        bucket = f"archive-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=30):
            pass
    variables = {
        "ARCHIVE_URL": "",
        "S3_ENDPOINT": endpoint,
        "S3_ACCESS_KEY_ID": os.environ.get("TEST_S3_ACCESS_KEY_ID", "test"),
        "S3_SECRET_ACCESS_KEY": os.environ.get("TEST_S3_SECRET_ACCESS_KEY", "test"),
        "S3_REGION": os.environ.get("TEST_S3_REGION", "us-east-1"),
    }
    s3 = S3(endpoint, bucket, f"it-{uuid.uuid4().hex[:8]}", variables)
    s3.variables["ARCHIVE_URL"] = s3.url
    return s3


async def archived_ids(store: ObstoreObjects) -> list[str]:
    """Every id in every file of the archive (duplicates kept)."""
    ids: list[str] = []
    for found in await store.list():
        if found.path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(await store.get(found.path)), columns=["id"])
            ids += [value for value in table.column("id").to_pylist() if value is not None]
    return ids


async def until_archived(
    store: ObstoreObjects, enough: Callable[[list[str]], bool], deadline_s: float
) -> None:
    async with asyncio.timeout(deadline_s):
        while not enough(await archived_ids(store)):  # noqa: ASYNC110 - polls the store
            await asyncio.sleep(0.1)


class Archive:
    """`<service> archive` in a subprocess, on `backend`'s bus, into the object store
    that `storage` (ARCHIVE_URL, S3_* variables) names."""

    def __init__(
        self, backend: Backend, storage: dict[str, str], tmp_path: Path, **variables: str
    ) -> None:
        self.settings = backend.settings()
        group = f"{self.settings.consumer_group}-archive"
        backend.used.append(self.settings.model_copy(update={"consumer_group": group}))
        self.heartbeat = tmp_path / "archive.heartbeat"
        self.variables = {
            **storage,
            "ARCHIVE_GROUP": group,
            "ARCHIVE_FILE_MAX_AGE_S": "0.2",
            "HEARTBEAT_FILE": str(self.heartbeat),
            "LOG_LEVEL": "WARNING",
            **variables,
        }
        self.process: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        self.heartbeat.unlink(missing_ok=True)
        self.process = start_cli(self.settings, "archive", **self.variables)
        health = ("healthcheck",)
        await wait_until(
            lambda: run_cli(self.settings, *health, **self.variables).returncode == 0, 60
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            self.process.communicate(timeout=60)
            self.process = None


@pytest.fixture
async def archive(real_backend: Backend, s3: S3, tmp_path: Path) -> AsyncIterator[Archive]:
    running = Archive(real_backend, s3.variables, tmp_path)
    yield running
    running.stop(signal.SIGKILL)


async def publish(backend: Backend, settings: Settings, count: int) -> list[str]:
    codec = CloudEventsProtobufCodec(event_registry())
    broker = backend.broker(settings)
    await broker.start([])
    messages, ids = [], []
    for number in range(count):
        payload = OrderPlaced(order_id=f"o{number}", quantity=1)
        envelope = Envelope(
            new_event_id(), event_type_of(payload), "urn:test", payload, f"o{number}", now()
        )
        ids.append(envelope.id)
        topic = settings.topic_for(envelope.type)
        messages.append(
            event_message(
                codec, envelope, topic, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
            )
        )
    await broker.publish(messages)
    return ids


async def test_the_archiver_stores_every_event_in_s3(
    real_backend: Backend, archive: Archive, s3: S3
) -> None:
    await publish(real_backend, archive.settings, 1)  # Kafka: the topic exists for the pattern
    await archive.start()
    ids = await publish(real_backend, archive.settings, 50)
    await until_archived(s3.store(), lambda found: set(ids) <= set(found), 60)
    archive.stop()


async def test_a_sigkilled_archiver_loses_nothing_after_a_restart(
    real_backend: Backend, archive: Archive, s3: S3
) -> None:
    archive.variables["ARCHIVE_FILE_MAX_EVENTS"] = "10"
    archive.variables["BATCH_SIZE"] = "10"
    await publish(real_backend, archive.settings, 1)
    await archive.start()
    ids = await publish(real_backend, archive.settings, 300)
    store = s3.store()
    await until_archived(store, bool, 60)
    archive.stop(signal.SIGKILL)  # mid-way: some files written, some acked, some neither
    await archive.start()
    await until_archived(store, lambda found: set(ids) <= set(found), 90)
    archive.stop()


def test_a_missing_bucket_is_refused_in_one_line(real_backend: Backend, s3: S3) -> None:
    settings = real_backend.settings()
    variables = {**s3.variables, "ARCHIVE_URL": f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x"}
    done = run_cli(settings, "archive", **variables)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()[-1:]
    assert "the bucket does not exist" in line
    assert "Traceback" not in done.stderr


def test_a_bad_archive_url_is_refused_in_one_line(real_backend: Backend) -> None:
    done = run_cli(real_backend.settings(), "archive", ARCHIVE_URL="ftp://x/y")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"{ENV_PREFIX}ARCHIVE_URL" in done.stderr


async def test_events_query_and_replay_read_the_archive_in_s3(
    real_backend: Backend, archive: Archive, s3: S3
) -> None:
    await publish(real_backend, archive.settings, 1)
    await archive.start()
    ids = await publish(real_backend, archive.settings, 20)  # subjects o0 ... o19
    await until_archived(s3.store(), lambda found: set(ids) <= set(found), 60)
    archive.stop()
    settings, variables = archive.settings, s3.variables

    done = run_cli(settings, "events", "query", "--subject", "o1*", **variables)
    assert done.returncode == 0, done.stderr
    queried = [json.loads(line) for line in done.stdout.splitlines()]
    chosen = [ids[1], *ids[10:]]  # o1, o10 ... o19: each once, in event-time order
    assert [event["id"] for event in queried] == chosen
    assert queried[0]["payload"]["orderId"] == "o1"

    copies = settings.topic_for("copies")
    reader = real_backend.broker(settings.model_copy(update={"consumer_group": copies}))
    await reader.start([copies])  # RabbitMQ: bound before the copies come
    replay = ("replay", "--from-archive", "--subject", "o1*", "--to-topic", copies, "--json")
    done = run_cli(settings, *replay, **variables)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["summary"]["republished"] == len(chosen)
    received = await fetch_at_least(reader, len(chosen))
    codec = CloudEventsProtobufCodec(event_registry())
    assert sorted(codec.decode(message.body).id for message in received) == sorted(chosen)
    assert all(message.headers.get("traceparent") for message in received)


class PrivateS3:
    """moto's S3 server of this test's own (TEST_S3_SERVER_BIN): it may be stopped. moto
    keeps everything in memory: a restart comes back empty, with the bucket made anew."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.port, self.log = binary, free_port(), folder / "s3.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self, bucket: str | None, **environment: str) -> None:
        """Start; make `bucket` unless None (a server checking credentials refuses it)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-H", "127.0.0.1", "-p", str(self.port)],
                env={**os.environ, **environment},
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if bucket is None:
                    socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                    return
                request = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT")
                with urllib.request.urlopen(request, timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[PrivateS3]:
    binary = os.environ.get("TEST_S3_SERVER_BIN")
    if not binary or not os.path.exists(binary):
        unavailable("TEST_S3_SERVER_BIN", "set it (scripts/servers.sh env) to stop an S3 server")
    server = PrivateS3(binary, tmp_path)
    yield server
    server.stop()


async def test_an_s3_outage_holds_the_acks_and_loses_nothing(
    real_backend: Backend, private_s3: PrivateS3, tmp_path: Path
) -> None:
    bucket = "outage"
    private_s3.start(bucket)
    variables = {
        "ARCHIVE_URL": f"s3://{bucket}/events",
        "S3_ENDPOINT": private_s3.endpoint,
        "S3_ACCESS_KEY_ID": "test",
        "S3_SECRET_ACCESS_KEY": "test",
        "OBJECT_STORE_TIMEOUT_S": "2",
    }
    s3 = S3(private_s3.endpoint, bucket, "events", variables)
    archive = Archive(real_backend, variables, tmp_path, PUBLISH_RETRY_MAX_BACKOFF_MS="200")
    try:
        await publish(real_backend, archive.settings, 1)
        await archive.start()
        private_s3.stop()
        ids = await publish(real_backend, archive.settings, 20)
        # Not ready while no file can be written: nothing of the 20 is acked meanwhile.
        health = ("healthcheck",)
        await wait_until(
            lambda: run_cli(archive.settings, *health, **archive.variables).returncode == 1, 60
        )
        private_s3.start(bucket)  # back, empty: only files written from now on are there
        await until_archived(s3.store(), lambda found: set(ids) <= set(found), 90)
    finally:
        archive.stop(signal.SIGKILL)


async def test_the_default_archive_is_a_local_folder_that_events_query_reads(
    real_backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ARCHIVE_URL: a folder under the data directory, no server."""
    data = tmp_path / "data"
    monkeypatch.setenv("XDG_DATA_HOME", str(data))  # the commands' data directory
    archive = Archive(real_backend, {}, tmp_path)
    try:
        await publish(real_backend, archive.settings, 1)
        await archive.start()
        ids = await publish(real_backend, archive.settings, 10)
        query = ("events", "query", "--type", "*.OrderPlaced")

        def queried() -> list[str]:
            done = run_cli(archive.settings, *query, **archive.variables)
            assert done.returncode == 0, done.stderr
            return [json.loads(line)["id"] for line in done.stdout.splitlines()]

        await wait_until(lambda: set(ids) <= set(queried()), 60)
        assert list((data / "{{ cookiecutter.service_name }}" / "archive").glob("type=*"))
    finally:
        archive.stop(signal.SIGKILL)


def test_refused_credentials_are_one_line(real_backend: Backend, private_s3: PrivateS3) -> None:
    private_s3.start(None, INITIAL_NO_AUTH_ACTION_COUNT="0")  # moto checks credentials
    variables = {
        "ARCHIVE_URL": "s3://any-bucket/events",
        "S3_ENDPOINT": private_s3.endpoint,
        "S3_ACCESS_KEY_ID": "not-a-key",
        "S3_SECRET_ACCESS_KEY": "not-a-secret",
    }
    for command in (("archive",), ("events", "query")):
        done = run_cli(real_backend.settings(), *command, **variables)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "the access key is refused" in done.stderr
    # And it exits cleanly every time: obstore's async calls made about one such exit in
    # five abort (SIGABRT, -6) after the line, four commands at once here.
    settings = real_backend.settings()
    for _ in range(3):
        running = [start_cli(settings, "events", "query", **variables) for _ in range(4)]
        for process in running:
            _, error = process.communicate(timeout=60)
            assert process.returncode == 2, error


async def test_a_claim_checked_payload_crosses_the_real_bus_through_s3(
    real_backend: Backend, s3: S3
) -> None:
    """One service emits a 200 KB StockReserved per OrderPlaced; another handles it whole,
    the bus carrying only the pointer."""
    claim_check = ClaimCheck(s3.store(), ClaimCheckSettings(claim_check_threshold_bytes=10_000))
    received: list[str] = []
    emitter, consumer = Router(), Router()

    @emitter.handles(OrderPlaced)
    async def emit_large(event: OrderPlaced, ctx: Context) -> None:
        ctx.emit(StockReserved(order_id=event.order_id, sku="s" * 200_000), key=event.order_id)

    @consumer.handles(StockReserved)
    async def record(event: StockReserved, ctx: Context) -> None:
        received.append(event.sku)

    base_settings = real_backend.settings()
    loops = []
    for router, group in ((consumer, "consumer"), (emitter, "emitter")):
        settings = base_settings.model_copy(
            update={"consumer_group": f"{base_settings.consumer_group}-{group}"}
        )
        loop = build_loop(
            settings, router, broker=real_backend.broker(settings), claim_check=claim_check
        )
        loops.append(RunningLoop(loop))
        await loops[-1].wait_started()
    try:
        await publish(real_backend, base_settings, 3)
        await loops[0].wait_until(lambda: len(received) == 3, 60)
        assert received == ["s" * 200_000] * 3
        assert len(await s3.store().list("claims/")) == 3  # one object per payload
    finally:
        for running in loops:
            await running.stop_gracefully()
