"""Pure parts of the delivery guarantees: reconcile paging, prefork lease names, the ack-slot repair."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from dispatcher.config import Settings, parse_config
from dispatcher.providers.base import Op, RawResponse
from dispatcher.providers.hostup import HostUpAdapter
from dispatcher.providers.nocworx import NocWorxAdapter
from dispatcher.worker import tasks
from dispatcher.worker.app import free_prefetch_slots_when_acks_fail

SINCE = datetime(2026, 4, 27, 12, 0, tzinfo=UTC)


def answer(body: Any) -> RawResponse:
    return RawResponse(status=200, headers={}, body=json.dumps(body).encode(), duration_ms=1.0)


def hostup_page(created: list[datetime], cursor: str | None) -> dict[str, Any]:
    items = [{"id": f"tkt_{n}", "number": str(n), "subject": "s", "createdAt": at.isoformat().replace("+00:00", "Z")}
             for n, at in enumerate(created)]
    return {"data": items, "nextCursor": cursor, "hasMore": cursor is not None}


def test_a_hostup_reconcile_reads_the_next_page_while_the_list_has_not_reached_the_first_create() -> None:
    adapter = HostUpAdapter()
    [first] = adapter.find_requests_for_marker("s")
    newer = adapter.classify(Op.find, answer(hostup_page([SINCE + timedelta(minutes=1)] * 2, "abc")))
    following = adapter.next_find_request(first, newer, SINCE)
    assert following is not None and following.params == {"limit": 100, "cursor": "abc"}
    reached = adapter.classify(Op.find, answer(hostup_page([SINCE + timedelta(minutes=1),
                                                            SINCE - timedelta(seconds=1)], "def")))
    assert adapter.next_find_request(first, reached, SINCE) is None  # older than the first create: done
    last = adapter.classify(Op.find, answer(hostup_page([SINCE + timedelta(minutes=1)], None)))
    assert adapter.next_find_request(first, last, SINCE) is None  # no more pages


def test_a_nocworx_reconcile_pages_through_full_task_pages_newer_than_the_first_create() -> None:
    adapter = NocWorxAdapter()
    tasks_spec, tickets_spec = adapter.find_requests_for_marker("s")
    recent = int((SINCE + timedelta(minutes=1)).timestamp())
    full = adapter.classify(Op.find, answer([{"id": n, "request_date": recent} for n in range(100)]))
    following = adapter.next_find_request(tasks_spec, full, SINCE)
    assert following is not None and following.params is not None and following.params["page"] == 2
    short = adapter.classify(Op.find, answer([{"id": 1, "request_date": recent}]))
    assert adapter.next_find_request(tasks_spec, short, SINCE) is None  # the last page
    old = int((SINCE - timedelta(seconds=1)).timestamp())
    reached = adapter.classify(Op.find, answer([{"id": n, "request_date": old} for n in range(100)]))
    assert adapter.next_find_request(tasks_spec, reached, SINCE) is None
    tickets = adapter.classify(Op.find, answer([{"id": n, "date_created": recent} for n in range(20)]))
    nxt = adapter.next_find_request(tickets_spec, tickets, SINCE)  # NocWorx's default page is 20
    assert nxt is not None and nxt.params is not None and nxt.params["page"] == 2


def test_each_prefork_child_leases_under_its_own_name_and_the_main_process_under_the_workers() -> None:
    config = parse_config({"targets": {}}, Settings(worker_name="w1"), env={})
    saved = tasks._state.get("main_pid")
    try:
        tasks._state["main_pid"] = os.getpid()
        assert tasks.lease_holder(config) == "w1"
        tasks._state["main_pid"] = os.getpid() + 1  # we are a forked child of that process
        assert tasks.lease_holder(config) == f"w1/{os.getpid()}"
    finally:
        if saved is None:
            tasks._state.pop("main_pid", None)
        else:
            tasks._state["main_pid"] = saved


class RedisGone:
    """A kombu channel whose Redis went away."""

    do_restore = False  # nothing to hand back at exit (kombu's QoS asks its channel)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        yield  # pragma: no cover


@pytest.mark.parametrize("settle", ["ack", "reject", "requeue"])
def test_a_message_whose_ack_cannot_reach_redis_still_frees_its_prefetch_slot(settle: str) -> None:
    from kombu.transport import redis as kombu_redis

    free_prefetch_slots_when_acks_fail()
    qos: Any = kombu_redis.QoS(RedisGone(), prefetch_count=1)
    qos._delivered["tag-1"] = object()  # the one message this consumer may hold
    assert not qos.can_consume()
    with pytest.raises(redis.ConnectionError):
        if settle == "ack":
            qos.ack("tag-1")
        else:
            qos.reject("tag-1", requeue=settle == "requeue")
    assert qos.can_consume()  # the worker asks Redis for messages again once it is back
