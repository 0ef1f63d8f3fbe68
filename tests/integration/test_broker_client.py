"""kombu's Redis channel keeps one client for its synchronous commands (dispatcher.worker.app
reuse_one_broker_client) instead of building one per command, and builds it again when the channel's
pool is replaced; messages still go and come back as before."""

from __future__ import annotations

from typing import Any

from dispatcher.config import Settings, parse_config
from dispatcher.worker.app import make_celery


def test_a_channel_reuses_its_client_until_its_pool_is_replaced(redis_url: str) -> None:
    app = make_celery(parse_config({"targets": {}}, Settings(broker_url=redis_url), env={}))
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given                              # a client handed in is used as is
        channel._pool = None                                    # what kombu does after a connection error
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
            assert third.ping()


def test_messages_published_and_read_back_through_the_shared_client(redis_url: str) -> None:
    app = make_celery(parse_config({"targets": {}}, Settings(broker_url=redis_url), env={}))
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("dispatcher.reuse-check")
        for n in range(3):
            queue.put({"n": n})
        got = [queue.get(timeout=5) for _ in range(3)]
        for message in got:
            message.ack()
        assert [m.payload["n"] for m in got] == [0, 1, 2]
        queue.close()
