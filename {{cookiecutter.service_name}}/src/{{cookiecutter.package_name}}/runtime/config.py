"""Settings from environment variables with the service's prefix (pydantic-settings).

Every field below is one variable, e.g. ``ORDER_SERVICE_BATCH_SIZE``. Secrets may come
from files: set ``<NAME>_FILE`` to a path and the file's content becomes the value.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .. import SERVICE_NAME
from .errors import ConfigError

PACKAGE_NAME = __name__.split(".")[0]
ENV_PREFIX = f"{PACKAGE_NAME.upper()}_"
BROKER_SCHEMES = ("memory", "kafka", "amqp", "amqps")
STATE_SCHEMES = ("memory", "sqlite", "etcd")
S = TypeVar("S", bound=BaseSettings)
DEFAULT_DEAD_LETTER_TOPIC = "{topic}.dlq"


def _check_url(value: str, schemes: tuple[str, ...], example: str) -> str:
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"unknown scheme in {value!r}; use one of {allowed} (e.g. {example})")
    return value


def dead_letter_topic(template: str, topic: str, group: str) -> str:
    """DEAD_LETTER_TOPIC's `template` for messages from `topic` consumed by `group`."""
    return template.format(topic=topic, group=group)


class Settings(BaseSettings):
    """Runtime configuration. Defaults let `run` start anywhere with no servers."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    broker_url: str = Field("memory://", description="memory:// | kafka://h:p,... | amqp(s)://")
    state_url: str = Field("memory://", description="Where dedupe records/checkpoints live")
    consumer_group: str = Field(SERVICE_NAME, description="Kafka group / RabbitMQ queue name")
    event_source: str = Field(
        f"urn:service:{SERVICE_NAME}", description="CloudEvents `source` of emitted events"
    )
    dead_letter_topic: str = Field(
        DEFAULT_DEAD_LETTER_TOPIC,
        description="Kafka dead-letter topic; {topic} and {group} are replaced",
    )
    topic_prefix: str = Field("", description="Prepended to every topic / routing key")
    batch_size: int = Field(500, gt=0, le=100_000, description="Max messages per batch")
    batch_timeout_ms: int = Field(200, gt=0, description="Max wait for a batch's first message")
    commit_interval_ms: int = Field(
        100,
        ge=0,
        description="Least time between checkpoints; a batch fills until the next may be written",
    )
    max_message_bytes: int = Field(1_048_576, gt=0, description="Larger messages are dead-lettered")
    max_concurrency: int = Field(64, gt=0, description="Keys handled at once within a batch")
    retry_attempts: int = Field(5, ge=1, description="Handler attempts before dead-lettering")
    retry_initial_backoff_ms: int = Field(100, ge=0, description="First retry delay")
    retry_max_backoff_ms: int = Field(10_000, ge=0, description="Cap on one retry delay")
    publish_retry_max_backoff_ms: int = Field(5_000, gt=0, description="Cap when the bus is down")
    dedupe_max_ids: int = Field(1_000_000, gt=0, description="Dedupe horizon by count")
    dedupe_ttl_s: float = Field(7 * 24 * 3600, gt=0, description="Dedupe horizon by age")
    drain_timeout_s: float = Field(20.0, gt=0, description="SIGTERM: time to finish in-flight work")
    heartbeat_file: Path = Field(
        Path(tempfile.gettempdir()) / f"{SERVICE_NAME}.heartbeat",
        description="Touched by the loop; `healthcheck` reads it",
    )
    heartbeat_max_age_s: float = Field(30.0, gt=0, description="Older heartbeat = unhealthy")
    broker_tls_ca_file: Path | None = Field(None, description="CA bundle to verify the broker")
    broker_tls_cert_file: Path | None = Field(None, description="Client certificate (mutual TLS)")
    broker_tls_key_file: Path | None = Field(None, description="Client certificate's key")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")
    log_format: Literal["auto", "json", "console"] = Field("auto")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return _check_url(value, BROKER_SCHEMES, "kafka://localhost:9092")

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str) -> str:
        return _check_url(value, STATE_SCHEMES, "sqlite:///var/lib/service/state.db")

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.retry_max_backoff_ms < self.retry_initial_backoff_ms:
            raise ValueError("RETRY_MAX_BACKOFF_MS must be >= RETRY_INITIAL_BACKOFF_MS")
        return self

    @field_validator("dead_letter_topic")
    @classmethod
    def _dead_letter_topic(cls, value: str) -> str:
        try:
            value.format(topic="t", group="g")
        except (KeyError, IndexError, ValueError):
            raise ValueError("use only the placeholders {topic} and {group}") from None
        return value

    def dead_letter_topic_for(self, topic: str) -> str:
        """Where messages from `topic` are parked (Kafka topic; the memory bus too)."""
        return dead_letter_topic(self.dead_letter_topic, topic, self.consumer_group)

    @property
    def dead_letter_queue(self) -> str:
        """RabbitMQ: the dead-letter exchange and queue of this service."""
        return f"{self.consumer_group}.dlq"

    @property
    def unrouted_queue(self) -> str:
        """RabbitMQ: the exchange and queue of this service's emitted events that no
        queue was bound for."""
        return f"{self.consumer_group}.unrouted"

    def topic_for(self, event_type: str) -> str:
        """The topic (Kafka) or routing key (RabbitMQ) events of `event_type` travel on."""
        return self.topic_prefix + event_type


def _file_values(model: type[BaseSettings]) -> dict[str, str]:
    """Values of `<PREFIX><FIELD>_FILE` variables: the named file's content, stripped."""
    values: dict[str, str] = {}
    for name in model.model_fields:
        path = os.environ.get(f"{ENV_PREFIX}{name.upper()}_FILE")
        if path is None:
            continue
        try:
            values[name] = Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(
                f"{ENV_PREFIX}{name.upper()}_FILE: cannot read {path}: {error.strerror}"
            ) from None
    return values


def load_model(model: type[S], **overrides: Any) -> S:
    """A settings model from the environment (and *_FILE variables), or one-line ConfigError."""
    try:
        return model(**{**_file_values(model), **overrides})
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; raises ConfigError with one line naming the variable."""
    return load_model(Settings, **overrides)


# Modules holding the settings models besides `Settings`; a broker adapter that was not
# generated for this service is simply absent.
SETTINGS_MODULES = (
    "brokers.kafka",
    "brokers.rabbitmq",
    "state.etcd",
    "objectstore",
    "archive.sink",
    "claimcheck",
)
# Values that are credentials: deployment manifests give them as <NAME>_FILE.
SECRET_FIELDS = frozenset(
    {"broker_url", "kafka_sasl_password", "etcd_password", "s3_secret_access_key"}
)


def settings_models() -> list[type[BaseSettings]]:
    """Every settings model of this service: one environment variable per field."""
    import importlib

    models: list[type[BaseSettings]] = [Settings]
    for module_name in SETTINGS_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ModuleNotFoundError as error:
            if error.name == f"{__package__}.{module_name}":
                continue
            raise
        models += [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, BaseSettings)
            and value.__module__ == module.__name__
        ]
    return models


def reference() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, as `config` prints them."""
    rows = []
    for model in settings_models():
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "" if default is None else str(default)
            rows.append((f"{ENV_PREFIX}{name.upper()}", shown, field.description or ""))
    return rows


# A prefixed name wherever a file writes it: `NAME=v`, `NAME: v`, `name: NAME`, `${NAME}`.
_PREFIXED = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(ENV_PREFIX)}[A-Z0-9_]+")
# Not configuration: tools' and version control's folders.
_SKIPPED_FOLDERS = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}


def _text_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                skipped = _SKIPPED_FOLDERS.intersection(found.relative_to(path).parts)
                if found.is_file() and not skipped:
                    yield found
        else:
            yield path


def unknown_variables(paths: list[Path]) -> list[tuple[Path, int, str]]:
    """(file, line, variable) for each name with this service's prefix that is not one of
    its settings (nor a setting's ``_FILE`` form): what a renamed or removed setting leaves
    in deployment files, env files and docs, where the service would silently ignore it."""
    known = {variable for variable, _, _ in reference()}
    known |= {f"{variable}_FILE" for variable in known}
    found = []
    for path in _text_files(paths):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: no settings in it
        for number, line in enumerate(lines, start=1):
            found += [(path, number, name) for name in _PREFIXED.findall(line) if name not in known]
    return found


def describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        name = f"{ENV_PREFIX}{field.upper()}" if field != "settings" else "settings"
        given = item.get("input")
        shown = f" (got {given!r})" if field != "settings" and not isinstance(given, dict) else ""
        problems.append(f"{name}: {message}{shown}")
    return "; ".join(problems)
