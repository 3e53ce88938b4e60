"""Progress of a long operation and its summary: a bar (rich) on a terminal; otherwise
a line of counts and rate every few seconds on stderr (JSON with --json), so a script
or a log collector sees it move. The summary goes to stdout."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

COUNTS = ("read", "matched", "republished", "skipped", "failed")
LABELS = {"republished": "re-published"}
REPORT_EVERY_S = 2.0


class Progress:
    """Counts of one operation (`action`); `total`: the messages to read, where known."""

    def __init__(
        self, action: str, total: int | None, *, as_json: bool, stream: TextIO | None = None
    ) -> None:
        self.action = action
        self.total = total
        self.as_json = as_json
        self.stream = sys.stderr if stream is None else stream
        self.counts = dict.fromkeys(COUNTS, 0)
        self._started = self._reported = time.monotonic()
        self._bar: Bar | None = None
        if self.stream.isatty() and not as_json:
            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._task = self._bar.add_task(action, total=total, counts="")
            self._bar.start()

    def add(self, **counts: int) -> None:
        for name, count in counts.items():
            self.counts[name] += count
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.counts["read"], counts=self._text())
        elif now - self._reported >= REPORT_EVERY_S:
            self._reported = now
            print(self._line(now), file=self.stream, flush=True)

    def finish(self) -> dict[str, object]:
        """Stops the display; the summary (counts, seconds, rate)."""
        if self._bar is not None:
            self._bar.stop()
        seconds = time.monotonic() - self._started
        return {
            "action": self.action,
            **self.counts,
            "seconds": round(seconds, 3),
            "per_second": round(self.counts["read"] / seconds, 1) if seconds > 0 else None,
        }

    def summary_line(self, summary: dict[str, object]) -> str:
        if self.as_json:
            return json.dumps({"summary": summary})
        return f"{self.action}: {self._text()} in {summary['seconds']} s"

    def _text(self) -> str:
        return ", ".join(f"{LABELS.get(name, name)} {self.counts[name]}" for name in COUNTS)

    def _line(self, now: float) -> str:
        rate = self.counts["read"] / max(now - self._started, 1e-9)
        if self.as_json:
            return json.dumps(
                {
                    "progress": self.action,
                    **self.counts,
                    "total": self.total,
                    "per_second": round(rate, 1),
                }
            )
        of = f" of {self.total}" if self.total is not None else ""
        return f"{self.action}: {self._text()} (read{of}; {rate:.0f}/s)"
