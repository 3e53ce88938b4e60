"""Reading the archive (`events query`, `replay --from-archive`): the files of the chosen
partitions (types and hours, pruned by path) fetched through the object store, then
filtered, deduplicated by id and ordered by event time in DuckDB.

The same code reads a local folder and S3: obstore fetches the files and DuckDB queries
them as Arrow tables, so no DuckDB extension (httpfs) is downloaded at run time.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import unquote

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from ..objectstore import ObjectInfo, ObjectStore
from .files import SCHEMA

# Files fetched at once.
FETCH_CONCURRENCY = 16
# The columns besides the files': the Hive partition columns.
PARTITION_COLUMNS = ("type", "date", "hour")
# What a query sees: the chosen events, each id once (the first archived), in event-time
# order (archive time for events without one), then in the bus's order.
EVENTS_VIEW = "events"  # operator/events.py names it too (without importing this)


@dataclass(frozen=True, slots=True)
class Selection:
    """What an operator picked; every filter empty means all."""

    since: datetime | None = None
    until: datetime | None = None
    types: tuple[str, ...] = ()  # globs
    subjects: tuple[str, ...] = ()  # globs
    sources: tuple[str, ...] = ()  # globs

    def wants(self, partition: dict[str, str]) -> bool:
        """Whether a file of this partition may hold chosen events (an hour overlapping
        the window, a type matching a glob)."""
        if self.types and not any(fnmatchcase(partition["type"], t) for t in self.types):
            return False
        try:
            start = datetime.fromisoformat(f"{partition['date']}T{partition['hour']}:00+00:00")
        except ValueError:
            return False
        if self.until is not None and start >= self.until:
            return False
        return self.since is None or start + timedelta(hours=1) > self.since


def partition_of(path: str) -> dict[str, str] | None:
    """`type=`, `date=` and `hour=` of a file's path; None for anything else."""
    parts = path.split("/")
    if len(parts) < 4 or not parts[-1].endswith(".parquet"):
        return None
    found = dict(part.split("=", 1) for part in parts[-4:-1] if "=" in part)
    if set(found) != set(PARTITION_COLUMNS):
        return None
    found["type"] = unquote(found["type"])
    return found


async def chosen_files(store: ObjectStore, selection: Selection) -> list[ObjectInfo]:
    return [
        found
        for found in await store.list()
        if (partition := partition_of(found.path)) is not None and selection.wants(partition)
    ]


async def read_table(store: ObjectStore, files: Sequence[ObjectInfo]) -> pa.Table:
    """Every row of `files`, with the partition columns, as one Arrow table."""
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def one(found: ObjectInfo) -> pa.Table:
        async with limit:
            data = await store.get(found.path)
        table = pq.read_table(io.BytesIO(data), schema=SCHEMA)
        partition = partition_of(found.path) or {}
        for name in PARTITION_COLUMNS:
            table = table.append_column(name, pa.array([partition[name]] * len(table)))
        return table

    tables = await asyncio.gather(*(one(found) for found in files))
    if not tables:
        empty = SCHEMA
        for name in PARTITION_COLUMNS:
            empty = empty.append(pa.field(name, pa.string()))
        return empty.empty_table()
    return pa.concat_tables(tables)


def _glob_any(column: str, globs: Sequence[str], parameters: list[Any]) -> str:
    parameters.extend(globs)
    return "(" + " OR ".join(f"{column} GLOB ?" for _ in globs) + ")"


def events_query(selection: Selection) -> tuple[str, list[Any]]:
    """The SQL of the `events` view over the table `archive_rows`, and its parameters."""
    where, parameters = ["TRUE"], []
    when = "coalesce(time, archived_at)"
    if selection.since is not None:
        where.append(f"{when} >= ?")
        parameters.append(selection.since)
    if selection.until is not None:
        where.append(f"{when} < ?")
        parameters.append(selection.until)
    for column, globs in (
        ("type", selection.types),
        ("subject", selection.subjects),
        ("source", selection.sources),
    ):
        if globs:
            where.append(_glob_any(column, globs, parameters))
    sql = (
        "SELECT * FROM archive_rows WHERE "
        + " AND ".join(where)
        + " QUALIFY id IS NULL OR row_number() OVER (PARTITION BY id ORDER BY archived_at) = 1"
        + f' ORDER BY {when}, topic, partition, "offset"'
    )
    return sql, parameters


async def open_events(store: ObjectStore, selection: Selection) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the view `events`: the chosen events, deduplicated, in
    event-time order (see EVENTS_VIEW)."""
    table = await read_table(store, await chosen_files(store, selection))
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    connection.register("archive_rows", table)
    sql, parameters = events_query(selection)
    # A view cannot take parameters: the chosen rows become a table once.
    connection.execute(f"CREATE TABLE {EVENTS_VIEW} AS {sql}", parameters)
    return connection


def run_sql(connection: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The operator's own SQL over `events`; a bad query is one line."""
    try:
        return connection.execute(sql).to_arrow_table()
    except duckdb.Error as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"--sql: {first}") from None
