"""streamkeep: durable, resumable streams on SQLite or Postgres."""

__version__ = "0.1.0"
