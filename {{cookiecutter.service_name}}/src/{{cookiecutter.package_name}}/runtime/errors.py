"""Exceptions a handler raises to steer the loop, and the one for bad configuration."""

from __future__ import annotations


class RetryLater(Exception):
    """A transient failure: the loop retries with exponential backoff, then dead-letters."""


class DeadLetter(Exception):
    """A permanent failure: the event goes to the dead-letter destination now, with `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InvalidEnvelope(DeadLetter):
    """An envelope attribute that cannot be read (e.g. a time no datetime can hold), found
    when it is first read: the event is dead-lettered, whoever read it."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid-envelope", detail)


class ConfigError(Exception):
    """A setting the user gave is wrong; the message is one line meant for them."""


class UndecodableEvent(Exception):
    """Bytes that are not a valid envelope, or a payload that does not match its type."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CommandFailed(Exception):
    """A command could not do its job (the bus is down, refused the event); one line."""
