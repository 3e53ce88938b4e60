"""etcd state store (aetcd): dedupe records shared by every replica, fenced per stream.

Layout under `<ETCD_KEY_PREFIX>/<CONSUMER_GROUP>/<stream>/`:
  fence              the current owner of an exclusive stream; its mod revision is the token
  ids/<ns>-<writer>  one key per committed batch: JSON [recorded_at, [event ids...]],
                     attached to a lease, so ids leave etcd by themselves after the TTL
  progress           the next position to consume (Kafka offset), as decimal text
  state/<key>        a key's handler state: JSON {"v": value, "a": [applied event ids]};
                     an emptied state stays on a lease until its applied ids expire

One transaction per stream per group of batches, comparing the fence revision (exclusive
streams) or the read revisions of the changed state keys (shared streams). A commit beyond
etcd's limits (1.5 MiB per request, 128 operations per transaction) is split: state keys first,
then ids, then progress last; each state key names the events that produced it, so a
crash between the parts cannot apply a redelivered event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.rpc
import aetcd.watcher
import grpc
from aetcd.exceptions import ClientError
from aetcd.rpc import DeleteRangeRequest, PutRequest, RequestOp, TxnRequest
from aetcd.utils import prefix_range_end
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..config import ENV_PREFIX, Settings, load_model
from ..errors import ConfigError
from ..gathering import all_or_raise
from ..logs import get_logger
from .base import (
    Checkpoint,
    Conflict,
    Fence,
    Fenced,
    KeyState,
    Loaded,
    StateStore,
    StateUnavailable,
)

log = get_logger(component="etcd")
CHUNK_BYTES = 1_000_000  # etcd refuses requests over 1.5 MiB by default
# etcd allows 128 operations per transaction by default (compares and puts counted apart).
MAX_PUTS_PER_TXN = 64
MAX_DELETES_PER_TXN = 60
MAX_RESPONSE_BYTES = 512 * 1024 * 1024
# Refresh reads keys written up to this long before the cursor: writers' clocks differ.
CLOCK_SKEW_NS = 30_000_000_000
# What an unreachable or failing etcd raises; each becomes StateUnavailable.
ETCD_ERRORS = (ClientError, grpc.RpcError, OSError, TimeoutError)
T = TypeVar("T")


class EtcdSettings(BaseSettings):
    """etcd-only settings; the same prefix as every other variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    etcd_key_prefix: str = Field("/event-services", description="Root of this service's keys")
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_timeout_s: float = Field(5.0, gt=0, description="Per-request timeout")
    etcd_tls_ca_file: Path | None = Field(None, description="CA bundle: turns TLS on")
    etcd_tls_cert_file: Path | None = Field(None, description="Client certificate (mutual TLS)")
    etcd_tls_key_file: Path | None = Field(None, description="Client certificate's key")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials from the ETCD_TLS_* files, or None for plaintext."""
        files = (self.etcd_tls_ca_file, self.etcd_tls_cert_file, self.etcd_tls_key_file)
        if not any(files):
            return None
        try:
            ca, cert, key = (path.read_bytes() if path else None for path in files)
        except OSError as error:
            raise ConfigError(f"{ENV_PREFIX}ETCD_TLS_*: cannot read {error.filename}") from None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def endpoints_of(url: str) -> list[tuple[str, int]]:
    """etcd://h1:2379,h2:2379 -> [("h1", 2379), ("h2", 2379)]"""
    found = []
    for part in urlsplit(url).netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if host:
            found.append((host, int(port)))
        elif part.strip():
            found.append((part.strip(), 2379))
    return found or [("localhost", 2379)]


class EtcdStateStore(StateStore):
    def __init__(self, settings: Settings, etcd: EtcdSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.etcd = etcd
        self.clock = clock
        self.writer = uuid.uuid4().hex[:12]
        self._endpoints = endpoints_of(settings.state_url)
        self._endpoint = 0
        self._client: aetcd.Client | None = None
        # Calls in flight per client, and clients dropped after a failure: a client is
        # closed only once no call uses it (closing it cancels the calls still on it).
        self._users: Counter[aetcd.Client] = Counter()
        self._retired: list[aetcd.Client] = []
        self._root = f"{etcd.etcd_key_prefix.rstrip('/')}/{settings.consumer_group}/".encode()
        self._lease: tuple[int, float] | None = None  # (lease id, granted at)
        # Batch keys per stream (oldest first) with their id counts: the count horizon.
        self._batches: dict[str, _BatchCounts] = {}

    @property
    def ttl_s(self) -> float:
        return self.settings.dedupe_ttl_s

    def _key(self, stream: str, suffix: str = "") -> bytes:
        return self._root + stream.encode() + b"/" + suffix.encode()

    async def open(self) -> None:
        await self._call(_connect)

    def _current(self) -> aetcd.Client:
        """The client calls go to; made when needed (it connects on its first call, once
        however many calls wait for that)."""
        if self._client is None:
            host, port = self._endpoints[self._endpoint % len(self._endpoints)]
            credentials = self.etcd.credentials()
            self._client = (
                aetcd.Client if credentials is None else partial(_TlsClient, credentials)
            )(
                host,
                port,
                username=self.etcd.etcd_username,
                password=self.etcd.etcd_password,
                timeout=self.etcd.etcd_timeout_s,
                # A restore reads a whole dedupe window in one response (~40 bytes per id).
                options={"grpc.max_receive_message_length": MAX_RESPONSE_BYTES},
            )
        return self._client

    async def take_over(self, stream: str) -> Fence:
        async def put_fence(client: aetcd.Client) -> Fence:
            response = await client.put(self._key(stream, "fence"), self.writer.encode())
            return Fence(stream, int(response.header.revision))

        return await self._call(put_fence)

    async def load(self, stream: str, after: int = 0) -> Loaded:
        async def read(client: aetcd.Client) -> Loaded:
            prefix = self._key(stream, "ids/")
            start = prefix + (f"{max(0, after - CLOCK_SKEW_NS):020d}".encode() if after else b"")
            response = await client.get_range(start, prefix_range_end(prefix))
            oldest_allowed = self.clock() - self.ttl_s
            batches = self._batches.setdefault(stream, _BatchCounts())
            records: list[tuple[str, float]] = []
            for item in sorted(response, key=lambda kv: kv.key):
                recorded_at, ids = json.loads(item.value)
                batches.put(item.key, len(ids))
                if recorded_at >= oldest_allowed:
                    records += [(event_id, float(recorded_at)) for event_id in ids]
            progress = None if after else await client.get(self._key(stream, "progress"))
            return Loaded(records, time.time_ns(), int(progress.value) if progress else None)

        return await self._call(read)

    async def load_states(self, stream: str, keys: Sequence[str]) -> dict[str, KeyState]:
        """One read: a transaction per MAX_PUTS_PER_TXN keys, all sent at once."""

        async def read(client: aetcd.Client, chunk: Sequence[str]) -> dict[str, KeyState]:
            gets = [client.transactions.get(self._state_key(stream, key)) for key in chunk]
            _, responses = await client.transaction(compare=[], success=gets, failure=[])
            found = {}
            for key, response in zip(chunk, responses, strict=True):
                for value, meta in response:
                    found[key] = KeyState.decode(value, int(meta.mod_revision))
            return found

        chunks = [keys[at : at + MAX_PUTS_PER_TXN] for at in range(0, len(keys), MAX_PUTS_PER_TXN)]
        found = {key: KeyState() for key in keys}
        for read_states in await all_or_raise(self._call(read, chunk) for chunk in chunks):
            found.update(read_states)
        return found

    def _state_key(self, stream: str, key: str) -> bytes:
        return self._key(stream, "state/") + key.encode()

    async def commit(self, checkpoint: Checkpoint) -> None:
        stream, progress = checkpoint.stream, checkpoint.progress
        under = self._state_key(stream, "")
        writes: list[_Put] = [
            _Put(under + key.encode(), new.encode(), new.value is None, key, new.version)
            for key, new in checkpoint.states.items()
        ]
        counts: dict[bytes, int] = {}
        if checkpoint.ids:
            ids_and_time = _id_values(checkpoint.ids, checkpoint.recorded_at)
            for number, (value, count) in enumerate(ids_and_time):
                key = self._key(stream, f"ids/{time.time_ns():020d}-{self.writer}-{number}")
                writes.append(_Put(key, value, leased=True))
                counts[key] = count
        if progress is not None:
            writes.append(_Put(self._key(stream, "progress"), str(progress).encode()))
        if not writes:
            return
        *parts, last = _transactions(writes)
        fence = checkpoint.fence
        # In three steps, each step's transactions sent at once: the key states, then the
        # ids, then the last part (the progress). An id or the progress is never durable
        # before the state its event left: a crash between steps only re-runs events.
        states = [part for part in parts if all(put.state_of is not None for put in part)]
        for step in (states, parts[len(states) :]):
            await all_or_raise(
                self._call(self._write, stream, part, counts, fence, False) for part in step
            )
        await self._call(self._write, stream, last, counts, fence, True)

    async def _write(
        self,
        client: aetcd.Client,
        stream: str,
        writes: list[_Put],
        counts: dict[bytes, int],
        fence: Fence | None,
        last: bool,
    ) -> None:
        """One transaction; the last part of a commit also deletes ids beyond the horizon."""
        batches = self._batches.setdefault(stream, _BatchCounts())
        adding = sum(counts.get(write.key, 0) for write in writes)
        expired = self._beyond_count_horizon(batches, adding) if last else []
        if fence is not None:
            compare = [client.transactions.mod(self._key(stream, "fence")) == fence.token]
        else:
            compare = [
                client.transactions.mod(write.key) == write.version
                for write in writes
                if write.state_of is not None
            ]
        lease = await self._current_lease(client) if any(w.leased for w in writes) else 0
        puts = [
            PutRequest(key=write.key, value=write.value, lease=lease if write.leased else 0)
            for write in writes
        ]
        operations = [RequestOp(request_put=put) for put in puts]
        deletes = [DeleteRangeRequest(key=old) for old in expired]
        operations += [RequestOp(request_delete_range=delete) for delete in deletes]
        if not await self._transaction(client, compare, operations):
            if fence is not None:
                raise Fenced(stream)
            raise Conflict(stream, ", ".join(w.state_of for w in writes if w.state_of))
        for old in expired:
            batches.drop(old)
        for write in writes:
            if write.key in counts:
                batches.put(write.key, counts[write.key])

    async def _transaction(
        self, client: aetcd.Client, compare: list[Any], operations: list[RequestOp]
    ) -> bool:
        """Whether the transaction succeeded. Its operations are built as etcd's own
        request messages: aetcd's operation objects, turned into those same messages,
        cost as much again per put (~1.4 µs; a group writes one put per changed key)."""
        await client.connect()
        request = TxnRequest(
            compare=[comparison.build_message() for comparison in compare], success=operations
        )
        timeout, metadata = self.etcd.etcd_timeout_s, client.metadata
        response = await client.kvstub.Txn(request, timeout=timeout, metadata=metadata)
        return bool(response.succeeded)

    def _beyond_count_horizon(self, batches: _BatchCounts, adding: int) -> list[bytes]:
        """Oldest batch keys to delete so the stream keeps at most DEDUPE_MAX_IDS ids."""
        total = batches.total + adding
        expired: list[bytes] = []
        for key, count in batches.counts.items():
            if total <= self.settings.dedupe_max_ids or len(expired) >= MAX_DELETES_PER_TXN:
                break
            expired.append(key)
            total -= count
        return expired

    async def _current_lease(self, client: aetcd.Client) -> int:
        """One lease per tenth of the TTL: keys expire between TTL and 1.1 x TTL."""
        bucket_s = max(1.0, self.ttl_s / 10)
        now = time.monotonic()
        if self._lease is None or now - self._lease[1] >= bucket_s:
            lease = await client.lease(int(self.ttl_s + bucket_s) + 1)
            self._lease = (int(lease.id), now)
        return self._lease[0]

    async def _call(self, step: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`step(client, *args)` on the current client. An etcd failure drops that client
        (the next call opens one to the next endpoint) and raises StateUnavailable, and so
        does a call cancelled under a task that nobody cancelled (its channel went away)."""
        client = self._current()
        self._users[client] += 1
        try:
            return await step(client, *args)
        except ETCD_ERRORS as error:
            self._retire(client)
            raise StateUnavailable(f"etcd: {_reason(error)}") from error
        except asyncio.CancelledError as error:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this task is being cancelled (a stop, a crash): never swallowed
            self._retire(client)
            raise StateUnavailable("etcd: call cancelled with its connection") from error
        finally:
            self._users[client] -= 1
            await self._close_unused()

    def _retire(self, client: aetcd.Client) -> None:
        """Calls after a failure of `client` go to a new client, on the next endpoint;
        `client` is closed once the calls still in flight on it have ended."""
        if client is self._client:
            self._client, self._lease = None, None
            self._endpoint += 1
            self._retired.append(client)

    async def _close_unused(self) -> None:
        for client in [client for client in self._retired if self._users[client] <= 0]:
            self._retired.remove(client)
            del self._users[client]
            with contextlib.suppress(*ETCD_ERRORS):
                await client.close()

    async def close(self) -> None:
        if self._client is not None:
            self._retired.append(self._client)
            self._client = None
        self._users.clear()  # the loop has stopped: nothing is in flight any more
        await self._close_unused()

    def key_count_prefix(self) -> bytes:
        return self._root


def _reason(error: BaseException) -> str:
    """What went wrong, in one line: gRPC's own text of an error spans several (aetcd
    turns the errors of its calls into its own; transactions are sent directly)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


async def _connect(client: aetcd.Client) -> None:
    await client.connect()


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd opens plaintext channels only; this opens the same stubs over TLS."""

    def __init__(self, credentials: grpc.ChannelCredentials, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        if self._username is not None and self._password is not None:
            self.auth_stub = aetcd.rpc.AuthStub(self.channel)
            request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
            response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", response.token),)
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class _BatchCounts:
    """One stream's batch keys, oldest first, with their id counts and the sum of those
    (kept as they change: a window of a million ids has thousands of batches)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: OrderedDict[bytes, int] = OrderedDict()
        self.total = 0

    def put(self, key: bytes, count: int) -> None:
        self.total += count - self.counts.get(key, 0)
        self.counts[key] = count

    def drop(self, key: bytes) -> None:
        self.total -= self.counts.pop(key, 0)


class _Put(NamedTuple):  # one per changed key: a named tuple is the cheapest to make
    key: bytes
    value: bytes
    leased: bool = False  # expires with the dedupe horizon
    state_of: str | None = None  # the handler key, for state writes
    version: int = 0  # the state's revision when read (compared on shared streams)


def _transactions(writes: list[_Put]) -> list[list[_Put]]:
    """Writes in order, grouped into transactions within etcd's request limits."""
    parts: list[list[_Put]] = [[]]
    size = 0
    for write in writes:
        cost = len(write.key) + len(write.value) + 16
        if parts[-1] and (size + cost > CHUNK_BYTES or len(parts[-1]) >= MAX_PUTS_PER_TXN):
            parts.append([])
            size = 0
        parts[-1].append(write)
        size += cost
    return parts


def _id_values(ids: Sequence[str], recorded_at: float) -> list[tuple[bytes, int]]:
    """The stored records of `ids`: JSON `[recorded_at,[id,...]]` of at most CHUNK_BYTES
    each, ids in order, with how many ids each holds. Each id is escaped once, in C (a
    group's thousands of ids are written at once)."""
    head = f"[{float(recorded_at)!r},["

    def record(run: list[str]) -> tuple[bytes, int]:
        return f"{head}{','.join(run)}]]".encode(), len(run)

    quoted = list(map(encode_basestring_ascii, ids))
    if len(head) + sum(map(len, quoted)) + len(quoted) + 1 <= CHUNK_BYTES:  # the usual case
        return [record(quoted)]
    records: list[tuple[bytes, int]] = []
    run: list[str] = []
    size = len(head) + 1  # and "]]" less the comma the last id does not take
    for text in quoted:
        if run and size + len(text) + 1 > CHUNK_BYTES:
            records.append(record(run))
            run, size = [], len(head) + 1
        run.append(text)
        size += len(text) + 1
    records.append(record(run))
    return records


def open_store(settings: Settings, clock: Callable[[], float]) -> EtcdStateStore:
    return EtcdStateStore(settings, load_model(EtcdSettings), clock)
