"""The claim finds its intent by primary key whatever PostgreSQL's statistics say about its status."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, text, update

from dispatcher.store.repo import _claim_statement
from dispatcher.store.tables import IntentRow

INTENTS = IntentRow.__table__


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's nodes, depth first."""
    return [plan, *[node for child in plan.get("Plans", []) for node in nodes(child)]]


def test_a_poll_claim_reads_one_row_when_the_statistics_think_polling_is_rare(engine: Engine) -> None:
    # the statistics are taken while the batch is queued; then half of it starts polling: the
    # (status, next_attempt_at) index looks selective for "polling" but holds every polling intent
    now = datetime.now(UTC)
    ids = [uuid.uuid4() for _ in range(2000)]
    with engine.begin() as conn:
        conn.execute(insert(INTENTS), [dict(
            id=intent_id, target="nocworx", provider="nocworx", status="queued", source="api", subject="s",
            body="b", priority="medium", cc=[], labels={}, attempts=0, deliveries=0, needs_reconcile=False,
            next_attempt_at=now, created_at=now, updated_at=now) for intent_id in ids])
        conn.execute(text("ANALYZE intents"))
        conn.execute(update(INTENTS).where(INTENTS.c.id.in_(ids[::2]))
                     .values(status="polling", next_attempt_at=now - timedelta(seconds=1)))
    claim = _claim_statement(frozenset({"polling"}))
    params = {"b_id": ids[0], "b_now": now, "lease_until": now + timedelta(seconds=60), "leased_by": "w1",
              "updated_at": now, "status": "polling"}
    compiled = claim.compile(dialect=engine.dialect)
    with engine.begin() as conn:
        explained = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + str(compiled),
                                         compiled.construct_params(params)).scalar_one()
        conn.rollback()
    plan = (explained if isinstance(explained, list) else json.loads(explained))[0]["Plan"]
    scans = [node for node in nodes(plan) if "Index Name" in node]
    assert {node["Index Name"] for node in scans} == {"pk_intents", "pk_target_states"}
    by_key = next(node for node in scans if node["Index Name"] == "pk_intents")
    assert (by_key["Actual Rows"], by_key.get("Rows Removed by Filter", 0)) == (1, 0)
