"""How `dispatcher worker` is set up for its pool: which command lines patch for gevent, and the
Celery settings each pool gets (the gevent consumer's stall itself: tests/acceptance/test_gevent_worker.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from celery import Celery
from click.testing import CliRunner

from dispatcher.cli import main
from dispatcher.config import Settings, parse_config
from dispatcher.green import pool_asked
from dispatcher.worker.app import configure_pool, make_celery


@pytest.mark.parametrize(("argv", "pool"), [
    (["dispatcher", "worker", "--pool", "gevent"], "gevent"),
    (["dispatcher", "worker", "-c", "8", "--pool=gevent"], "gevent"),
    (["-m", "worker", "--pool", "threads"], "threads"),
    (["dispatcher", "worker"], "gevent"),                    # the default
    (["dispatcher", "worker", "-c", "8"], "gevent"),
    (["dispatcher", "api", "--pool", "gevent"], None),       # only a worker's command line counts
    (["dispatcher", "--pool", "gevent", "worker"], None),     # the option is the worker command's
    (["dispatcher", "worker", "--pool"], None),
    (["/venv/bin/dispatcher", "worker"], "gevent"),           # the installed script
    (["/src/dispatcher/__main__.py", "worker"], "gevent"),    # python -m dispatcher, once started
    (["/venv/lib/pytest/__main__.py", "-k", "worker"], None),  # another program importing dispatcher
])
def test_only_a_worker_command_line_asking_for_gevent_is_read_as_one(argv: list[str], pool: str | None) -> None:
    assert pool_asked(argv) == pool


def celery_app() -> Celery:
    config = parse_config({"targets": {}}, Settings(broker_url="redis://127.0.0.1:6379/15"), env={})
    return make_celery(config)


def test_a_gevent_worker_prefetches_two_messages_per_greenlet_and_threads_one() -> None:
    green, threads = celery_app(), celery_app()
    configure_pool(green, "gevent", 256)
    configure_pool(threads, "threads", 64)
    assert green.conf.worker_prefetch_multiplier == 2
    assert threads.conf.worker_prefetch_multiplier == 1


def test_the_broker_channel_may_open_a_connection_per_task_beside_its_own_and_keeps_its_other_options() -> None:
    app = celery_app()
    configure_pool(app, "gevent", 256)
    options = app.conf.broker_transport_options
    assert options["max_connections"] >= 256 + 1
    assert options["visibility_timeout"] == 3600


def test_a_gevent_worker_started_without_its_command_line_is_refused_before_anything_starts() -> None:
    # in-process (CliRunner): sys.argv is pytest's, so nothing was patched at import
    result = CliRunner().invoke(main, ["worker", "--pool", "gevent"], env={"DISPATCHER_BROKER_URL": "redis://x"})
    assert result.exit_code == 2
    assert "--pool gevent" in result.output


def test_a_gevent_worker_command_line_patches_before_dispatchers_imports_and_keeps_the_real_zero_wait_poll() -> None:
    # in a process of its own: patching this one would turn the rest of the suite green
    probe = textwrap.dedent("""
        import sys, socket
        sys.argv = ["dispatcher", "worker", "--pool", "gevent"]
        import dispatcher, httpcore._utils as u
        from gevent import monkey
        a, b = socket.socketpair()
        before = u.is_socket_readable(a)
        b.send(b"x")
        print(monkey.is_module_patched("socket"), monkey.is_module_patched("threading"),
              type(u.select.poll).__name__, before, u.is_socket_readable(a))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True", "builtin_function_or_method", "False", "True"]


def test_in_a_gevent_worker_redis_checks_a_connection_without_gevent_but_still_waits_cooperatively() -> None:
    probe = textwrap.dedent("""
        import sys, socket, time
        sys.argv = ["dispatcher", "worker"]
        import dispatcher, gevent
        from redis._parsers import hiredis
        a, b = socket.socketpair()
        idle = hiredis._socket_can_read(a, 0)
        gevent.spawn_later(0.1, b.send, b"x")       # only runs if the waiting check lets it
        started = time.monotonic()
        waited = hiredis._socket_can_read(a, 2.0)
        print(idle, waited, time.monotonic() - started < 1.0, hiredis._socket_can_read(a, 0))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True", "True", "True"]


def test_any_other_command_line_patches_nothing() -> None:
    probe = "import sys; sys.argv = ['dispatcher', 'api']; import dispatcher; print('gevent' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_every_task_shares_one_stand_in_result_backend_instead_of_building_one_per_thread_or_greenlet() -> None:
    # a gevent worker runs each task in a greenlet of its own, and its threading.local is per greenlet
    from concurrent.futures import ThreadPoolExecutor

    from celery.backends.base import DisabledBackend

    app = celery_app()
    first = app.backend
    with ThreadPoolExecutor(max_workers=3) as pool:
        backends = list(pool.map(lambda _: app.backend, range(3)))
    assert isinstance(first, DisabledBackend)
    assert all(backend is first for backend in backends)
