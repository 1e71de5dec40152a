"""What the Durable Streams protocol needs from the log.

Sliding and absolute retention, forks (a stream that reads another's first
events, and the reference count that keeps a source's rows for its forks),
the writer sequence token, the producer that closed a stream, protocol-owned
attributes, append-batch boundaries on events, and idempotent producer state.
`ttl_seconds` becomes nullable: a stream may stay readable after it finished
until it is deleted.

Downgrading keeps every stream and its own events but forgets the rest
(forks no longer see their inherited events).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STREAM_COLUMNS = (
    "idle_ttl_seconds",
    "hard_expires_at",
    "forked_from",
    "fork_seq",
    "fork_count",
    "writer_seq",
    "closed_by",
    "attributes",
)


def upgrade() -> None:
    # On SQLite this rebuilds the table (batch mode); migrate.py keeps foreign
    # keys off meanwhile so that events are not cascaded away.
    with op.batch_alter_table("streams") as batch:
        batch.alter_column("ttl_seconds", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("idle_ttl_seconds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("hard_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("forked_from", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("fork_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(
            sa.Column("fork_count", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("writer_seq", sa.Text(), nullable=True))
        batch.add_column(sa.Column("closed_by", sa.Text(), nullable=True))
        batch.add_column(sa.Column("attributes", sa.Text(), nullable=True))
    # A plain ADD COLUMN on both backends: no rebuild of the biggest table.
    op.add_column(
        "events",
        sa.Column("batch_end", sa.Boolean(), server_default=sa.true(), nullable=False),
    )
    op.create_table(
        "producers",
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("producer_id", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["streams.id"],
            name=op.f("fk_producers_stream_id_streams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("stream_id", "producer_id", name=op.f("pk_producers")),
    )


def downgrade() -> None:
    op.drop_table("producers")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("batch_end")
    # 0001 requires a retention for every stream: keep the kept-forever ones a day.
    op.execute("UPDATE streams SET ttl_seconds = 86400 WHERE ttl_seconds IS NULL")
    with op.batch_alter_table("streams") as batch:
        for column in STREAM_COLUMNS:
            batch.drop_column(column)
        batch.alter_column("ttl_seconds", existing_type=sa.Integer(), nullable=False)
