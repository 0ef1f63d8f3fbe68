"""SQLAlchemy 2.0 tables. Postgres is the source of truth; SQLite serves the embedded default.

``intents`` is one row per producer request; ``attempts`` one row per HTTP exchange with a provider
(recorded before it is sent, completed after); ``tickets`` what the providers made; ``events`` the
intent's story (accepted, routed, waits, polls, operator actions) for audit and ``intents show``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigId = BigInteger().with_variant(Integer, "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: Json, uuid.UUID: Uuid}


class IntentRow(Base):
    __tablename__ = "intents"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    target: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    submitted_by: Mapped[str | None] = mapped_column(String(100))
    submitted_from: Mapped[str | None] = mapped_column(String(100))

    subject: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str | None] = mapped_column(String(40))
    department: Mapped[str | None] = mapped_column(String(100))
    category: Mapped[str | None] = mapped_column(String(40))
    service: Mapped[dict[str, Any] | None] = mapped_column(Json)
    cc: Mapped[list[str]] = mapped_column(Json, default=list)
    critical_reason: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    group_key: Mapped[str | None] = mapped_column(String(200))

    resolved_department: Mapped[str | None] = mapped_column(String(100))
    resolved_category: Mapped[str | None] = mapped_column(String(40))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error_code: Mapped[str | None] = mapped_column(String(64))
    last_error_message: Mapped[str | None] = mapped_column(Text)

    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    leased_by: Mapped[str | None] = mapped_column(String(100))
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    needs_reconcile: Mapped[bool] = mapped_column(Boolean, default=False)

    task_uuid: Mapped[str | None] = mapped_column(String(64))
    poll_path: Mapped[str | None] = mapped_column(String(300))
    poll_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    #: what the intent does to its group's ticket (domain.Action); ungrouped intents create
    action: Mapped[str] = mapped_column(String(16), default="create", server_default="create")
    group_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("intent_groups.id"))
    #: the order of intake within the group (flap damping: a newer pending follow-up supersedes)
    group_seq: Mapped[int | None] = mapped_column(Integer)
    #: the alert state this intent describes, and a follow-up's steps (reopen/reply/close) and progress
    payload: Mapped[dict[str, Any] | None] = mapped_column(Json)

    __table_args__ = (
        UniqueConstraint("target", "idempotency_key"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "target", "status"),
        Index(None, "group_key"),
        Index(None, "group_id", "group_seq"),
    )


class IntentGroupRow(Base):
    """One ticket per group: the unique (target, group_key) is what makes concurrent creators agree.

    Intake inserts the row if missing (ON CONFLICT DO NOTHING) and locks it (FOR UPDATE) before it
    decides create / reply / reopen / none, so two notifications can never both decide "create".
    """

    __tablename__ = "intent_groups"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(String(64))
    group_key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    creator_intent_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    ticket_provider_id: Mapped[str | None] = mapped_column(String(64))
    ticket_number: Mapped[str | None] = mapped_column(String(64))
    ticket_url: Mapped[str | None] = mapped_column(String(500))
    ticket_closed: Mapped[bool] = mapped_column(Boolean, default=False)
    current_state: Mapped[dict[str, Any] | None] = mapped_column(Json)
    sent_state: Mapped[dict[str, Any] | None] = mapped_column(Json)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("target", "group_key"),)


class AttemptRow(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    intent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("intents.id", ondelete="CASCADE"), index=True)
    number: Mapped[int | None] = mapped_column(Integer)
    op: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(500))
    request: Mapped[dict[str, Any] | None] = mapped_column(Json)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    provider_request_id: Mapped[str | None] = mapped_column(String(100))
    task_uuid: Mapped[str | None] = mapped_column(String(64))
    verdict: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    retry_after_s: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TicketRow(Base):
    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    intent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("intents.id", ondelete="CASCADE"), unique=True)
    target: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(16))
    provider_ticket_id: Mapped[str] = mapped_column(String(64))
    number: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str | None] = mapped_column(String(500))
    department: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("target", "provider_ticket_id"),)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    intent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("intents.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(100))
    data: Mapped[dict[str, Any] | None] = mapped_column(Json)


class TargetStateRow(Base):
    """Operator-visible state of one target: paused (401/403 or by hand) and why."""

    __tablename__ = "target_states"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    paused_by: Mapped[str | None] = mapped_column(String(100))
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error_code: Mapped[str | None] = mapped_column(String(64))
    last_error_message: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OperatorActionRow(Base):
    """Every operator action (retry, edit, cancel, repoll, pause, resume): who, when, what."""

    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(32))
    intent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("intents.id", ondelete="SET NULL"), index=True)
    target: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(Json)


class HeartbeatRow(Base):
    """A worker's or the scheduler's last sign of life (see :mod:`dispatcher.health`)."""

    __tablename__ = "heartbeats"

    component: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    info: Mapped[dict[str, Any] | None] = mapped_column(Json)
