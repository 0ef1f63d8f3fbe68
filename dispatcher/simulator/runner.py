"""Run the simulator: in a background thread for tests and benchmarks, or blocking for the CLI."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from dispatcher.simulator.app import create_app
from dispatcher.simulator.settings import SimulatorSettings

_STARTUP_TIMEOUT_S = 10.0


class RunningSimulator:
    """A simulator serving on a real port in a daemon thread; ``stop()`` (or ``with``) ends it.

    The helper methods go through the ``/_sim`` HTTP API, so they are safe from any thread.
    """

    def __init__(self, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self.hostup_url = f"{self.url}/api/v2"
        self.nocworx_url = self.url

    # -- life cycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- control API -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}/_sim{path}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def tickets(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tickets")
        return result

    def tasks(self) -> list[dict[str, Any]]:
        """NocWorx tasks: accepted (``request_date``), resolving (``resolves_at``), polled (``polls``)."""
        result: list[dict[str, Any]] = self._call("GET", "/tasks")
        return result

    def requests(self, provider: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str] = {}
        if provider:
            params["provider"] = provider
        if since is not None:
            params["since"] = repr(since)
        result: list[dict[str, Any]] = self._call("GET", "/requests", params=params)
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change some settings (``PUT /_sim/config``); returns all of them."""
        for name in ("latency_ms", "task_delay_range_s"):
            if isinstance(changes.get(name), tuple):
                changes[name] = list(changes[name])
        result: dict[str, Any] = self._call("PUT", "/config", json=changes)
        return result

    def reset(self) -> None:
        self._call("POST", "/reset")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def start_in_thread(settings: SimulatorSettings | None = None, host: str = "127.0.0.1",
                    port: int = 0) -> RunningSimulator:
    """Serve in a daemon thread; port 0 picks a free port. Returns once connections are accepted."""
    sock = _bind(host, port)
    actual_port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings), log_config=None, log_level="warning", access_log=False,
        lifespan="off", timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"simulator:{actual_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"simulator did not start on {host}:{actual_port}")
        time.sleep(0.01)
    return RunningSimulator(server, thread, host, actual_port)


def serve(settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted (``dispatcher simulate``). Its own process, so its start-up heap is
    frozen: the arrival times it logs are what rate-limit checks judge, and a full collection would
    hold them back (see :mod:`dispatcher.heap`)."""
    from dispatcher.heap import settle_heap

    app = create_app(settings)
    settle_heap()
    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
