"""structlog setup: JSON lines when stdout is not a terminal, colours when it is.

Standard-library logging (aiokafka, aio-pika, grpc, ...) goes through the same renderer,
so every line the process writes has one format.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

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
