"""The event archive: every event that crossed the bus, in Parquet files in object
storage (files.py: the table layout; sink.py: the `archive` run mode's durable step;
reading.py: what `events query` and `replay --from-archive` read)."""
