"""structlog setup: JSON lines when stdout is not a terminal, colours when it is.

Standard-library logging (aiokafka, aio-pika, grpc, ...) goes through the same renderer,
so every line the process writes has one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from .config import Settings


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Logs to `stream` (stdout unless given: a command whose stdout is data, stderr)."""
    level = getattr(logging, settings.log_level)
    out = sys.stdout if stream is None else stream
    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**bound)
    return logger


# The level below which each of structlog's filtering loggers drops lines (the classes
# `make_filtering_bound_logger` gives are one per level). CRITICAL lines are always written.
_FILTERING_LEVELS = {
    structlog.make_filtering_bound_logger(level): level
    for level in (logging.NOTSET, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
}


def logs_at(level: int) -> bool:
    """Whether the configured structlog logger writes lines of `level` (read each time:
    logging may be configured after loggers were made; any other logger class: yes)."""
    wrapper = structlog.get_config()["wrapper_class"]
    return level >= _FILTERING_LEVELS.get(wrapper, logging.NOTSET)


def _at_level(level: int, name: str) -> Callable[..., Any]:
    def log(self: EventLogger, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not logs_at(level):
            return None  # dropped anyway: no logger is bound for it
        return getattr(self.bound(), name)(event, *args, **kw)

    log.__name__ = name
    return log


class EventLogger:
    """The logger a handler gets as `ctx.log`: bound to its event (by `bind`) on the first
    line at a level that is written. A handler's debug lines then cost a level check while
    debug is off, not a bound logger per event. Anything else (`bind`, `adebug`, ...) is
    the bound logger's own."""

    __slots__ = ("_bind", "_bound")

    def __init__(self, bind: Callable[[], structlog.typing.FilteringBoundLogger]) -> None:
        self._bind = bind
        self._bound: structlog.typing.FilteringBoundLogger | None = None

    def bound(self) -> structlog.typing.FilteringBoundLogger:
        if self._bound is None:
            self._bound = self._bind()
        return self._bound

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bound(), name)

    debug = _at_level(logging.DEBUG, "debug")
    info = _at_level(logging.INFO, "info")
    msg = _at_level(logging.INFO, "msg")
    warning = _at_level(logging.WARNING, "warning")
    warn = _at_level(logging.WARNING, "warn")
    error = _at_level(logging.ERROR, "error")
    exception = _at_level(logging.ERROR, "exception")
    critical = _at_level(logging.CRITICAL, "critical")
    fatal = _at_level(logging.CRITICAL, "fatal")
