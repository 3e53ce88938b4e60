"""The object-store seam: put, get and list objects by path, in a local folder
(`file:///...`, the embedded default) or S3-compatible storage (`s3://bucket/prefix`).

One maintained client serves both: obstore (Rust's `object_store` crate, as used by
DataFusion and crates.io), async, typed, with retries and multipart uploads built in
(docs/design.md says why). The archive and claim-checked payloads use it through
`ObjectStore` only, so a test may swap in any class with the same three methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import obstore
from obstore.store import LocalStore, S3Store
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .. import SERVICE_NAME
from .config import ENV_PREFIX, load_model
from .errors import ConfigError

STORE_SCHEMES = ("file", "s3")


def _data_dir() -> Path:
    """Where the service keeps files of its own when nothing else is configured."""
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return Path(base) / SERVICE_NAME
    try:
        return Path.home() / ".local" / "share" / SERVICE_NAME
    except RuntimeError:  # no home directory (a container user without one)
        return Path(tempfile.gettempdir()) / SERVICE_NAME


DEFAULT_ARCHIVE_URL = (_data_dir() / "archive").as_uri()


class ObjectStoreUnavailable(Exception):
    """The store did not confirm a read or write (down, timed out); retried, never acked."""


class ObjectNotFound(Exception):
    """No object at that path."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    path: str  # relative to the store's prefix
    size: int


class ObjectStore(Protocol):
    """What the archive and the claim-check need of object storage."""

    url: str

    async def put(self, path: str, data: bytes) -> None:
        """Store `data` at `path` durably: returns only once it will be read back."""

    async def get(self, path: str) -> bytes:
        """The object at `path`; ObjectNotFound if there is none."""

    async def size(self, path: str) -> int:
        """The size of the object at `path` (not fetched); ObjectNotFound if there is none."""

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under the folder `prefix` (whole path segments)."""


class ObjectStoreSettings(BaseSettings):
    """Object storage shared by the archive and claim-checked payloads."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    archive_url: str = Field(
        DEFAULT_ARCHIVE_URL,
        description="Event archive: file:///folder (no server) or s3://bucket/prefix",
    )
    s3_endpoint: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, ...); unset: AWS. TLS is verified"
    )
    s3_region: str = Field("us-east-1", description="S3 region")
    s3_access_key_id: str | None = Field(
        None, description="S3 access key; unset: AWS_* variables, instance or pod role"
    )
    s3_secret_access_key: str | None = Field(None, description="S3 secret key (use *_FILE)")
    object_store_timeout_s: float = Field(30.0, gt=0, description="One object store request")

    @field_validator("archive_url")
    @classmethod
    def _archive_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in STORE_SCHEMES:
            raise ValueError(
                f"unknown scheme in {value!r}; use file:///folder or s3://bucket/prefix"
            )
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError(f"{value!r} names no bucket; use s3://bucket/prefix")
        if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
            raise ValueError(f"{value!r}: give an absolute folder, e.g. file:///var/lib/archive")
        return value

    @field_validator("s3_endpoint", "s3_access_key_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # a manifest's `NAME: ""`

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s):// URL")
        return value


class ObstoreObjects:
    """`ObjectStore` over an obstore store (LocalStore or S3Store).

    obstore's blocking calls run in worker threads rather than its async ones: an async
    call resolves its Python future from a Rust thread, which races the interpreter's
    exit and aborted a short command (SIGABRT after its last line, about one run in ten
    here); a blocking call never touches Python from Rust's threads."""

    def __init__(self, url: str, store: Any, local_root: Path | None = None) -> None:
        self.url = url
        self._store = store
        self._local_root = local_root  # a local folder: put also syncs to disk

    async def put(self, path: str, data: bytes) -> None:
        with _mapped_errors(path, missing_is_outage=True):
            await asyncio.to_thread(obstore.put, self._store, path, data)
        if self._local_root is not None:
            # The local store renames a finished temporary file into place but does not
            # sync: without this, a power loss could lose a file whose events were acked.
            await asyncio.to_thread(_sync, self._local_root, path)

    async def get(self, path: str) -> bytes:
        with _mapped_errors(path):
            return await asyncio.to_thread(self._get, path)

    def _get(self, path: str) -> bytes:
        return bytes(obstore.get(self._store, path).bytes())

    async def size(self, path: str) -> int:
        with _mapped_errors(path):
            meta = await asyncio.to_thread(obstore.head, self._store, path)
            return int(meta["size"])

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        with _mapped_errors(prefix):
            return await asyncio.to_thread(_listing, self._store, prefix)


def _listing(store: Any, prefix: str) -> list[ObjectInfo]:
    return [
        ObjectInfo(str(meta["path"]), int(meta["size"]))
        for chunk in obstore.list(store, prefix=prefix or None)
        for meta in chunk
    ]


def _sync(root: Path, path: str) -> None:
    """fsync the file at `path` under `root` and each folder down to it."""
    target = root / path
    for node in (target, *[p for p in target.parents if p.is_relative_to(root)]):
        descriptor = os.open(node, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _mapped_errors(path: str, *, missing_is_outage: bool = False) -> Iterator[None]:
    """obstore's errors as ours: a missing object, else an unavailable store. A write
    finds nothing missing but its bucket: an outage of the store as far as it can tell."""
    try:
        yield
    except FileNotFoundError as error:
        if missing_is_outage:
            raise ObjectStoreUnavailable(_first_line(error)) from error
        raise ObjectNotFound(path) from error
    except (ObjectNotFound, ObjectStoreUnavailable, ConfigError):
        raise
    except Exception as error:
        raise ObjectStoreUnavailable(_first_line(error)) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_object_store_settings() -> ObjectStoreSettings:
    return load_model(ObjectStoreSettings)


def open_object_store(settings: ObjectStoreSettings, url: str | None = None) -> ObstoreObjects:
    """The store at `url` (default ARCHIVE_URL). Nothing is contacted yet (see `check`)."""
    url = url or settings.archive_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        root = Path(unquote(parts.path))
        try:
            root.mkdir(parents=True, exist_ok=True)
            store = LocalStore(root, mkdir=True)
        except OSError as error:
            raise ConfigError(f"ARCHIVE_URL {url!r}: cannot use the folder: {error}") from None
        return ObstoreObjects(url, store, local_root=root)
    timeout = timedelta(seconds=settings.object_store_timeout_s)
    options: dict[str, Any] = {
        "region": settings.s3_region,
        "client_options": {"timeout": timeout, "connect_timeout": timeout},
        # Outages are retried by the loop (and reported); obstore's own retries stay short.
        "retry_config": {"max_retries": 2, "retry_timeout": timeout},
    }
    if settings.s3_endpoint is not None:
        options["endpoint"] = settings.s3_endpoint
        # Plain HTTP only when the endpoint says so (a test server); https is verified.
        options["allow_http"] = settings.s3_endpoint.startswith("http://")
        options["virtual_hosted_style_request"] = False
    if settings.s3_access_key_id is not None:
        options["access_key_id"] = settings.s3_access_key_id
        options["secret_access_key"] = settings.s3_secret_access_key or ""
    try:
        s3 = S3Store(parts.netloc, prefix=parts.path.strip("/") or None, **options)
    except Exception as error:  # obstore refuses the configuration itself
        raise ConfigError(f"ARCHIVE_URL {url!r}: {_first_line(error)}") from None
    return ObstoreObjects(url, s3)


async def check(store: ObjectStore) -> None:
    """Fail early, in one line, when the store cannot be used at all (no bucket, refused
    credentials, no such host): one list request. An outage is ObjectStoreUnavailable."""
    try:
        await store.list("_check/")
    except ObjectNotFound:
        raise ConfigError(f"ARCHIVE_URL {store.url!r}: the bucket does not exist") from None
    except ObjectStoreUnavailable as error:
        text = str(error.__cause__ or error)
        for marker, why in _REFUSALS:
            if marker in text:
                raise ConfigError(f"ARCHIVE_URL {store.url!r}: {why} ({error})") from None
        raise


# What an S3 answer means when the store is misconfigured rather than down.
_REFUSALS: Sequence[tuple[str, str]] = (
    ("NoSuchBucket", "the bucket does not exist"),
    ("InvalidAccessKeyId", "the access key is refused"),
    ("SignatureDoesNotMatch", "the secret key is refused"),
    ("AccessDenied", "access denied"),
    ("403 Forbidden", "access denied"),
    ("404 Not Found", "the bucket does not exist"),
    ("dns error", "no such host"),
)
