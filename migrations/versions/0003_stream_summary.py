"""A view for people: one row per stream with its status, events, bytes and age.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The age of a row in seconds, in each dialect's words.
AGE = {
    "sqlite": "CAST((julianday('now') - julianday(s.created_at)) * 86400 AS INTEGER)",
    "postgresql": "CAST(EXTRACT(EPOCH FROM (now() - s.created_at)) AS BIGINT)",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute(
        f"""
        CREATE VIEW stream_summary AS
        SELECT s.id,
               s.status,
               s.content_type,
               s.last_seq AS events,
               COALESCE(e.bytes, 0) AS bytes,
               s.created_at,
               s.finished_at,
               s.expires_at,
               {AGE[dialect]} AS age_seconds,
               s.error_status,
               s.error_message
        FROM streams s
        LEFT JOIN (
            SELECT stream_id, SUM(LENGTH(payload)) AS bytes FROM events GROUP BY stream_id
        ) e ON e.stream_id = s.id
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW stream_summary")
