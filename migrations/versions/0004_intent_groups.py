"""intent groups: one ticket per alert group (or producer group_key), follow-up actions on intents

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "intent_groups",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("group_key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("creator_intent_id", sa.Uuid(), nullable=True),
        sa.Column("ticket_provider_id", sa.String(length=64), nullable=True),
        sa.Column("ticket_number", sa.String(length=64), nullable=True),
        sa.Column("ticket_url", sa.String(length=500), nullable=True),
        sa.Column("ticket_closed", sa.Boolean(), nullable=False),
        sa.Column("current_state", JSON, nullable=True),
        sa.Column("sent_state", JSON, nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_intent_groups")),
        sa.UniqueConstraint("target", "group_key", name=op.f("uq_intent_groups_target_group_key")),
    )
    with op.batch_alter_table("intents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("action", sa.String(length=16), server_default="create", nullable=False))
        batch_op.add_column(sa.Column("group_id", BIGID, nullable=True))
        batch_op.add_column(sa.Column("group_seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("payload", JSON, nullable=True))
        batch_op.create_foreign_key(batch_op.f("fk_intents_group_id_intent_groups"), "intent_groups",
                                    ["group_id"], ["id"])
        batch_op.create_index(batch_op.f("ix_intents_group_id_group_seq"), ["group_id", "group_seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("intents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_intents_group_id_group_seq"))
        batch_op.drop_constraint(batch_op.f("fk_intents_group_id_intent_groups"), type_="foreignkey")
        batch_op.drop_column("payload")
        batch_op.drop_column("group_seq")
        batch_op.drop_column("group_id")
        batch_op.drop_column("action")
    op.drop_table("intent_groups")
