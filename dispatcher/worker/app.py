"""The Celery app (Redis broker) and the queue adapter that publishes to it.

Settings follow design.md §4: late acks and reject-on-worker-lost so a killed worker's message is
delivered again; prefetch 1 so a busy worker hoards nothing; countdowns kept far below the
visibility timeout (long waits live in Postgres). One queue per target, so a throttled target does
not hold back the others.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from celery import Celery, bootsteps
from celery.utils.nodenames import anon_nodename
from kombu import Queue  # type: ignore[attr-defined]

from dispatcher.config import AppConfig
from dispatcher.green import GEVENT
from dispatcher.queue import EnqueueFailed

log = logging.getLogger(__name__)

TASK_NAMES = {"dispatch": "dispatcher.dispatch", "poll": "dispatcher.poll"}
VISIBILITY_TIMEOUT_S = 3600
#: a cold (SIGQUIT) shutdown waits this long for running tasks before cancelling them
SOFT_SHUTDOWN_S = 20.0
#: message header: when it was published (epoch seconds, the publisher's clock)
PUBLISHED_AT = "dispatcher_published_at"
#: Redis commands per pipeline when publishing a batch
PUBLISH_BATCH = 1000


def queue_name(target: str) -> str:
    return f"dispatcher.{target}"


def _queues(config: AppConfig) -> list[Any]:
    names = [queue_name(name) for name in sorted(config.targets)] or ["dispatcher.default"]
    return [Queue(name) for name in names]  # type: ignore[no-untyped-call]


def make_celery(config: AppConfig) -> Celery:
    broker = config.settings.broker_url
    reuse_one_broker_client()
    app = Celery("dispatcher", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        # no result backend: Celery's stand-in (DisabledBackend) keeps no state, so one instance
        # serves every task. Otherwise Celery keeps one per thread, and a gevent worker's
        # threading.local is per greenlet: each task built its own as its tracer marked it done
        # (reading the configuration anew), seen in the raw stacks of bench/e2e.py --profile
        result_backend_thread_safe=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.5},
        task_queues=_queues(config),
        task_default_queue="dispatcher.default",
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # SIGTERM is a warm shutdown: running tasks finish (each is bounded by its HTTP timeouts) and
        # the messages this worker reserved or holds for a countdown go back to Redis as the
        # connection closes. A cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT) would
        # cancel running tasks at once and leave their intents to the lease; soft shutdown lets them
        # finish first, for up to this long (below the usual 30 s a supervisor waits before SIGKILL).
        worker_soft_shutdown_timeout=SOFT_SHUTDOWN_S,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


#: Redis connections a worker's channel may open beyond one per task running at once (the consumer's
#: own, a publish); kombu's default cap is 10, and each task acks on a connection of its own
BROKER_CONNECTIONS_SPARE = 8


def configure_pool(app: Celery, pool: str, concurrency: int) -> None:
    """Settings that depend on the worker's pool and how many tasks it runs at once.

    Every task acks its own message (late acks), so the channel's Redis connections must cover all
    of them at once: past kombu's cap of 10, an ack fails with "Too many connections" (seen with
    the gevent pool) and the message is delivered again an hour later.

    gevent: Celery's consumer has no event loop with a green pool (``synloop``); it reads one
    message per ``drain_events`` and, while every prefetch slot is taken, does not ask Redis for
    more, and nothing wakes it when an ack frees a slot: it sleeps out its 2 s poll. With a prefetch
    of one per greenlet the slots fill as soon as every greenlet is busy, and the worker takes in
    its next messages only when that poll ends (tests/acceptance/test_gevent_worker.py fails on
    it: 40 intents over 4 greenlets in over 12 s instead of about 3). With two per greenlet the slots never fill
    first: the consumer blocks handing the next message to the pool (gevent's ``Pool.spawn`` waits
    for a free greenlet) and goes on the moment one finishes, so the worker still holds at most one
    message more than it runs. And a step that hands back, at warm shutdown, the countdown messages
    still waiting for a greenlet (:class:`HandBackWaitingCountdowns`).
    """
    options = dict(app.conf.broker_transport_options or {})
    options["max_connections"] = max(10, concurrency + BROKER_CONNECTIONS_SPARE)
    app.conf.broker_transport_options = options
    if pool == GEVENT:
        app.conf.worker_prefetch_multiplier = 2
        app.steps["consumer"].add(HandBackWaitingCountdowns)


class HandBackWaitingCountdowns(bootsteps.StartStopStep):  # type: ignore[misc]
    """Warm shutdown of a gevent worker: no countdown message starts its task once the worker stops.

    A countdown message whose time has come goes to the pool from its timer greenlet
    (``Consumer.apply_eta_task``), which blocks in gevent's ``Pool.spawn`` while every greenlet is
    busy. Warm shutdown cancels only the timers not fired yet (``Consumer.on_close``), then waits for
    the pool with ``Pool.join``, which returns as soon as the pool has been empty once: when the
    running greenlets end together, a timer greenlet waiting for a slot starts its task just after,
    and the worker closes its connection and exits under it, the task cut off mid-run (its intent
    claimed, so the message handed back finds it leased and does nothing until the lease expires:
    chaos G2 once waited out its deadline on one). Killing every timer greenlet first (the
    consumer's steps stop before the pool) starts nothing more; their messages are not acknowledged
    and go back to Redis as the channel closes. tests/acceptance/test_gevent_shutdown.py."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def stop(self, c: Any) -> None:
        timer = getattr(c, "timer", None)
        if timer is not None and hasattr(timer, "clear"):  # celery.concurrency.gevent.Timer.clear
            timer.clear()  # kills them all, those blocked in Pool.spawn included


def cold_shutdown_between_events(consumer: Any) -> bool:
    """A prefork worker's SIGQUIT runs Celery's cold shutdown between two events of its loop.

    Celery does the whole cold shutdown in the signal handler (``celery.apps.worker.on_cold_shutdown``):
    it sleeps out the soft shutdown, cancels the tasks still running, then stops the pool and joins
    its children, all on top of whatever the main thread was doing. Usually that is waiting in
    ``epoll``. But when the signal lands while the loop is handling a message from a child (billiard
    has read the child's READY and not yet credited it to the child's ``on_ready_counter``), the join
    never sees that message, and the child, told to exit, waits for the credit in
    ``Worker._ensure_messages_consumed`` for 300 x 0.1 s: the worker exits 30 s late (chaos S3b: 51 s
    after SIGQUIT instead of 22, so its prefetched messages went back to Redis too late).

    So: a SIGQUIT that finds the loop mid-turn is recorded, wakes the loop (a pipe on the hub), and
    Celery's handler runs at the top of the next turn (``on_tick``), where nothing is half handled;
    one that finds it waiting in ``epoll``, or no loop running at all (reconnecting to the broker, a
    warm shutdown under way), runs Celery's handler at once, as before. The handlers Celery installs
    from there on (a second SIGQUIT) are its own. False without an event loop (gevent, threads).
    """
    from kombu.asynchronous.hub import Hub
    from kombu.utils import eventio

    hub = getattr(consumer, "hub", None)
    celery_handler = signal.getsignal(signal.SIGQUIT)
    if hub is None or not callable(celery_handler) or threading.current_thread() is not threading.main_thread():
        return False
    loop_code = Hub.create_loop.__code__
    poll_file = eventio.__file__
    pending: list[int] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def mid_turn(frame: Any) -> bool:
        if frame is not None and frame.f_code.co_name == "poll" and frame.f_code.co_filename == poll_file:
            return False  # waiting for events: nothing in hand
        while frame is not None:
            if frame.f_code is loop_code:
                return True
            frame = frame.f_back
        return False  # the loop is not running: no later turn to wait for

    def on_signal(signum: int, frame: Any) -> None:
        if not mid_turn(frame):
            celery_handler(signum, frame)
            return
        pending.append(signum)
        with contextlib.suppress(OSError):
            os.write(wake_w, b"q")

    def drain() -> None:
        with contextlib.suppress(OSError):
            while os.read(wake_r, 512):
                pass

    def on_tick() -> None:
        if wake_r not in hub.readers:  # the hub is reset after a lost connection
            hub.add_reader(wake_r, drain)
        if pending:
            signum = pending[0]
            pending.clear()
            hub.on_tick.discard(on_tick)
            celery_handler(signum, None)

    hub.add_reader(wake_r, drain)
    hub.on_tick.add(on_tick)
    signal.signal(signal.SIGQUIT, on_signal)
    return True


def free_prefetch_slots_when_acks_fail() -> None:
    """Keep a worker consuming after Redis went away while all its children were busy.

    kombu's Redis ``QoS.ack``/``reject`` write to Redis first and only then free the message's
    prefetch slot. When Redis is down (or restarted) at that moment the write raises, Celery logs
    "Couldn't ack" and carries on, but the slot is never freed; once every slot of the worker is lost
    this way it never asks Redis for a message again, silently, until restarted (found by the chaos
    suite, S4). Freeing the slot whatever happens to the write is safe here: a message whose ack did
    not reach Redis is at worst delivered again after the visibility timeout, and a second delivery
    of an intent id does nothing (the claim).
    """
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    qos: Any = kombu_redis.QoS
    if getattr(qos, "_dispatcher_frees_slots", False):
        return
    ack, reject = qos.ack, qos.reject
    release: Any = virtual.QoS.ack  # frees the slot locally, touches no broker

    def safe_ack(self: Any, delivery_tag: Any) -> None:
        try:
            ack(self, delivery_tag)
        except Exception:
            release(self, delivery_tag)  # the slot is free; the caller still logs the failure
            raise

    def safe_reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            reject(self, delivery_tag, requeue=requeue)
        except Exception:
            release(self, delivery_tag)
            raise

    qos.ack, qos.reject = safe_ack, safe_reject
    qos._dispatcher_frees_slots = True


def reuse_one_broker_client() -> None:
    """Let each kombu Redis channel keep one client for its synchronous commands.

    kombu builds a new ``redis.Redis`` for every command it sends outside its event loop
    (``Channel.conn_or_acquire``): storing each delivered message as unacked, every ack, every
    publish from a task. The connection comes from the channel's pool either way, but building the
    client (its table of response callbacks) was 3.6 % of a busy worker's CPU in the profile of
    bench/e2e.py. A ``redis.Redis`` is safe to share between threads (each command takes a
    connection from the pool and gives it back), so one per channel does the same work; it is built
    again whenever the channel's pool is replaced (kombu does that after a connection error).
    """
    from kombu.transport import redis as kombu_redis

    channel: Any = kombu_redis.Channel
    if getattr(channel, "_dispatcher_reuses_client", False):
        return

    @contextlib.contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Any:
        if client:
            yield client
            return
        mine = self.__dict__.get("_dispatcher_client")
        if mine is None or mine.connection_pool is not self.pool:
            mine = self._dispatcher_client = self._create_client()
        yield mine

    channel.conn_or_acquire = conn_or_acquire
    channel._dispatcher_reuses_client = True


class CeleryQueue:
    """Publishes ``dispatcher.dispatch`` / ``dispatcher.poll`` with an intent id on the target's queue.

    Every message carries the time it was published (header :data:`PUBLISHED_AT`), so the scheduler
    can tell a message still waiting in a backlog from a lost one (:meth:`oldest_waiting`).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        #: a broker whose queues are plain Redis lists we may read and push to (not Sentinel)
        self._plain_redis = str(app.conf.broker_url or "").startswith(("redis://", "rediss://", "unix://"))
        self._redis: Any = None
        #: task name -> its stamper (None: kombu publishes, the broker or the layout is not ours to stamp)
        self._stampers: dict[str, RedisStamper | None] = {}

    def enqueue(self, task: str, intent_id: uuid.UUID, *, target: str, countdown: float = 0.0) -> None:
        """One message (a poll, a retry, one intent accepted): stamped from a template and LPUSHed on
        Redis (:class:`RedisStamper`; a worker publishes one per NocWorx task, and Celery's
        ``send_task`` cost a tenth of a worker's CPU), else ``send_task``."""
        name, queue = TASK_NAMES[task], queue_name(target)
        published = time.time()
        try:
            stamper = self._stamper(name, queue)
            if stamper is not None:
                eta = None if countdown <= 0 else datetime.fromtimestamp(published + countdown, UTC).isoformat()
                key, message = stamper.stamp(intent_id, queue, published=published, eta=eta)
                self._client().lpush(key, message)
                return
            options: dict[str, Any] = {"queue": queue, "headers": {PUBLISHED_AT: published}}
            if countdown > 0:
                options["countdown"] = countdown
            self.app.send_task(name, args=[str(intent_id)], **options)
        except Exception as exc:  # kombu and redis raise ConnectionError and friends when Redis is down
            raise EnqueueFailed(f"{type(exc).__name__}: {exc}") from exc

    def _stamper(self, name: str, queue: str) -> RedisStamper | None:
        if name not in self._stampers:
            stamper = None
            if self._plain_redis:
                with self.app.producer_or_acquire() as producer:
                    # its channel connects: fail as fast as send_task when Redis is down (not cached then)
                    producer.connection.ensure_connection(**self.app.conf.task_publish_retry_policy)
                    stamper = RedisStamper.probe(self.app, producer.channel, name, queue)
            self._stampers[name] = stamper
        return self._stampers[name]

    def _client(self) -> Any:
        """A Redis client on the broker for the few commands sent outside kombu (thread-safe). It
        gives up about as soon as ``send_task`` does when Redis is down (two retries, 0.2 s apart)."""
        if self._redis is None:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry

            retry = Retry(ExponentialBackoff(cap=0.2, base=0.1), 2)
            self._redis = redis.Redis.from_url(str(self.app.conf.broker_url), socket_timeout=2.0,
                                               socket_connect_timeout=2.0, retry=retry)
        return self._redis

    def enqueue_many(self, task: str, items: list[tuple[uuid.UUID, str]]) -> None:
        """Publish many messages over one connection, pipelined (batch intake).

        ``send_task`` per message costs what a batch need not pay: Celery's routing and argument
        repr and kombu's per-message work (about 150 µs of CPU) and a Redis round trip each. On Redis
        the messages are stamped from a template (:class:`RedisStamper`) and pushed in pipelines;
        elsewhere they are built by Celery (``amqp.as_task_v2``) and sent through kombu's publish
        batch. bench/intake.py has the figures. On a failure part of the batch may have gone; the
        caller marks all of it for the scheduler, and a message delivered twice is harmless (the
        claim lets one through).
        """
        if not items:
            return
        name = TASK_NAMES[task]
        published = time.time()
        try:
            stamper = self._stamper(name, queue_name(items[0][1]))
            if stamper is not None:
                stamper.push([(intent_id, queue_name(target)) for intent_id, target in items], published,
                             self._client())
                return
            with self.app.producer_or_acquire() as producer:
                # fail as fast as send_task does when Redis is down (kombu's default is seconds of retries)
                producer.connection.ensure_connection(**self.app.conf.task_publish_retry_policy)
                self._publish_each(producer, name, items, published)
        except Exception as exc:  # kombu raises OperationalError and friends when Redis is down
            raise EnqueueFailed(f"{type(exc).__name__}: {exc}") from exc

    def _publish_each(self, producer: Any, name: str, items: list[tuple[uuid.UUID, str]], published: float) -> None:
        """Celery's messages through kombu's producer, batched when kombu can (>= 5.7)."""
        amqp = self.app.amqp
        ignore_result = bool(self.app.conf.task_ignore_result)
        origin = anon_nodename()
        task_ids = _task_ids(len(items))
        batch = producer.batch(max_size=PUBLISH_BATCH) if hasattr(producer, "batch") else contextlib.nullcontext()
        with batch:
            for (intent_id, target), task_id in zip(items, task_ids, strict=True):
                arg = str(intent_id)
                message = amqp.as_task_v2(task_id, name, args=[arg], argsrepr=f"['{arg}']", kwargsrepr="{}",
                                          origin=origin, ignore_result=ignore_result)
                message.headers[PUBLISHED_AT] = published
                producer.publish(message.body, exchange="", routing_key=queue_name(target), serializer="json",
                                 headers=message.headers, declare=[], retry=False, **message.properties)

    def oldest_waiting(self, targets: Iterable[str]) -> dict[str, datetime | None]:
        """Per target: when the oldest message still waiting in its queue was published (None: the
        queue is empty). A target whose oldest message cannot be dated (no :data:`PUBLISHED_AT`, a
        broker other than Redis, Redis unreachable) is left out: nothing is known about it.

        Redis lists are FIFO (publish = LPUSH, consume = BRPOP), so every message published before
        the oldest waiting one has been handed to a worker: an intent published earlier than that and
        still due has lost its message (a flush, a restart, a worker that died holding it).
        """
        if not self._plain_redis:
            return {}
        import redis

        out: dict[str, datetime | None] = {}
        try:
            for target in targets:
                raw = self._client().lindex(queue_name(target), -1)
                if raw is None:
                    out[target] = None
                    continue
                # a message without our header (e.g. Celery's own retry) says nothing about its target
                with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError, OverflowError):
                    stamp = json.loads(raw)["headers"][PUBLISHED_AT]
                    out[target] = datetime.fromtimestamp(float(stamp), UTC)
        except redis.RedisError as exc:
            log.info("cannot look at the broker's queues (%s): presuming messages lost by age alone", exc)
            return {}
        return out


def _task_ids(count: int) -> list[str]:
    """Random (version 4) task ids from one read of the random source, not one per message."""
    pool = os.urandom(16 * count)
    return [str(uuid.UUID(bytes=pool[16 * i:16 * i + 16], version=4)) for i in range(count)]


class RedisStamper:
    """Messages of one task stamped from a template and pushed to Redis: batch intake's pipelines and
    every single publish (a poll, a retry).

    A message is Celery's (protocol 2, built by ``amqp.as_task_v2``) in kombu's Redis envelope
    (``prepare_message`` and the channel's own augmentation, serialized by kombu), made once per
    queue (and with or without an ETA) with placeholders, then stamped per message with its intent
    id, a task id, a delivery tag, when it was published and, for a countdown, its ETA. That is
    about a quarter of kombu's cost per message (bench/intake.py). :meth:`probe` checks that every
    placeholder landed where expected; should Celery or kombu ever shape messages otherwise, it
    declines and the caller goes through kombu.
    """

    TASK_ID = "f0000000-0000-4000-8000-00000000000a"  # headers id and root_id, properties correlation_id
    ARG = "f0000000-0000-4000-8000-00000000000b"      # the body's argument and headers argsrepr
    TAG = "f0000000-0000-4000-8000-00000000000c"      # properties delivery_tag
    BODY = "f0000000-0000-4000-8000-00000000000d"     # the base64 body
    PUBLISHED = '"f0000000-0000-4000-8000-00000000000e"'  # headers PUBLISHED_AT: a JSON string for a number
    ETA = "f0000000-0000-4000-8000-00000000000f"      # headers eta (ISO 8601), in the delayed template
    EXPECTED = {TASK_ID: 3, ARG: 1, TAG: 1, BODY: 1, PUBLISHED: 1}

    def __init__(self, app: Celery, channel: Any, name: str) -> None:
        self.app, self.channel, self.name = app, channel, name
        self._templates: dict[tuple[str, bool], tuple[str, str, str]] = {}

    @classmethod
    def probe(cls, app: Celery, channel: Any, name: str, queue: str) -> RedisStamper | None:
        """A stamper if this channel is kombu's Redis channel and the templates check out, else None."""
        needed = ("prepare_message", "_inplace_augment_message", "_q_for_pri")
        if not all(hasattr(channel, attribute) for attribute in needed):
            return None
        if getattr(channel, "global_keyprefix", None):  # keys we would push to are not the queues' names
            return None
        stamper = cls(app, channel, name)
        try:
            templates = {delayed: stamper._template(queue, delayed) for delayed in (False, True)}
        except Exception:
            log.warning("cannot build a message template; publishing through kombu", exc_info=True)
            return None
        for delayed, (_, envelope, body) in templates.items():
            expected = {**cls.EXPECTED, cls.ETA: 1 if delayed else 0}
            if any(envelope.count(mark) != n for mark, n in expected.items()) or body.count(cls.ARG) != 1:
                log.warning("unexpected message layout; publishing through kombu")
                return None
        return stamper

    def _template(self, queue: str, delayed: bool) -> tuple[str, str, str]:
        """(Redis key, envelope JSON, body JSON) with placeholders, for one queue."""
        if (queue, delayed) not in self._templates:
            from kombu.entity import PERSISTENT_DELIVERY_MODE
            from kombu.serialization import dumps as serialize
            from kombu.utils.json import dumps as envelope_json

            message = self.app.amqp.as_task_v2(
                self.TASK_ID, self.name, args=[self.ARG], argsrepr=f"['{self.ARG}']", kwargsrepr="{}",
                origin=anon_nodename(), ignore_result=bool(self.app.conf.task_ignore_result),
                eta=self.ETA if delayed else None)
            message.headers[PUBLISHED_AT] = json.loads(self.PUBLISHED)
            content_type, content_encoding, body = serialize(message.body, serializer="json")  # type: ignore[no-untyped-call]
            properties = {**message.properties, "delivery_mode": PERSISTENT_DELIVERY_MODE}
            envelope = self.channel.prepare_message(body, 0, content_type, content_encoding, message.headers,
                                                    properties)
            self.channel._inplace_augment_message(envelope, "", queue)
            if envelope["properties"].get("body_encoding") != "base64":
                raise ValueError(f"body encoding {envelope['properties'].get('body_encoding')!r}, not base64")
            envelope["body"] = self.BODY
            envelope["properties"]["delivery_tag"] = self.TAG
            key = self.channel._q_for_pri(queue, envelope["properties"].get("priority") or 0)
            text = body.decode() if isinstance(body, bytes) else str(body)
            self._templates[queue, delayed] = (key, envelope_json(envelope), text)  # type: ignore[no-untyped-call]
        return self._templates[queue, delayed]

    def stamp(self, intent_id: uuid.UUID, queue: str, *, published: float, eta: str | None = None,
              task_id: str | None = None, tag: str | None = None) -> tuple[str, str]:
        """(Redis key, message) for one intent; ``eta``: when a countdown ends (ISO 8601)."""
        key, envelope, body = self._template(queue, eta is not None)
        arg = str(intent_id)
        encoded = base64.b64encode(body.replace(self.ARG, arg).encode()).decode()
        message = (envelope.replace(self.TASK_ID, task_id or str(uuid.uuid4())).replace(self.ARG, arg)
                   .replace(self.TAG, tag or str(uuid.uuid4())).replace(self.BODY, encoded)
                   .replace(self.PUBLISHED, repr(float(published))))
        return key, message if eta is None else message.replace(self.ETA, eta)

    def push(self, items: list[tuple[uuid.UUID, str]], published: float, client: Any) -> None:
        """LPUSH each (intent id, queue) message through ``client`` (a ``redis.Redis`` on the broker),
        PUBLISH_BATCH to a pipeline."""
        task_ids, tags = _task_ids(len(items)), _task_ids(len(items))
        for start in range(0, len(items), PUBLISH_BATCH):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(start + PUBLISH_BATCH, len(items))):
                intent_id, queue = items[i]
                pipe.lpush(*self.stamp(intent_id, queue, published=published, task_id=task_ids[i], tag=tags[i]))
            pipe.execute()
