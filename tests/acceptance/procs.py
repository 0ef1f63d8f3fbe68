"""Real processes for acceptance tests: start, wait for, stop and inspect `dispatcher` subprocesses.

Every process writes stdout and stderr to files (never PIPEs, which block a chatty process once
full) and runs in its own session, so stopping it also stops its children (Celery's prefork pool).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dispatcher.domain import TERMINAL_STATUSES

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TAIL_LINES = 40


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dispatcher_command() -> list[str]:
    """The venv's `dispatcher` script next to this interpreter, else `python -m dispatcher.cli`."""
    script = Path(sys.executable).parent / "dispatcher"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "dispatcher.cli"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"TOML has no {value!r} here")
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))      # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(data: Mapping[str, Any]) -> str:
    """A tiny TOML writer for nested string-keyed tables of scalars and scalar lists."""
    lines: list[str] = []

    def table(path: list[str], values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for key, value in scalars.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in tables.items():
            table([*path, key], value)

    table([], data)
    return "\n".join(lines).lstrip("\n") + "\n"


@dataclass
class Proc:
    """One subprocess with its output in files."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        parts = []
        for label, path in (("stderr", self.stderr), ("stdout", self.stdout)):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            chunk = "\n".join(text.splitlines()[-lines:])
            parts.append(f"----- {self.name} {label} (last {lines} lines, {path}) -----\n{chunk}")
        state = "running" if self.alive else f"exited with {self.popen.returncode}"
        return f"===== {self.name} (pid {self.popen.pid}, {state}) =====\n" + "\n".join(parts)

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM the process group (the process and its children), then SIGKILL what is left."""
        pgid = self.popen.pid  # start_new_session=True: the group id is our child's pid
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # children (e.g. prefork pool processes) may outlive a parent that exited or was killed
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


@dataclass
class Procs:
    """The processes of one test setup; ``stop_all`` ends them in reverse start order."""

    directory: Path
    env: dict[str, str]
    items: list[Proc] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Proc:
        stdout = self.directory / f"{name}.stdout.log"
        stderr = self.directory / f"{name}.stderr.log"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen([*dispatcher_command(), *args], stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.directory,
                                     start_new_session=True)
        proc = Proc(name, popen, stdout, stderr)
        self.items.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            proc.stop()

    def tails(self, lines: int = TAIL_LINES) -> str:
        return "\n\n".join(proc.tail(lines) for proc in self.items)

    def check_alive(self) -> None:
        dead = [p for p in self.items if not p.alive]
        if dead:
            raise AssertionError(f"process(es) exited: {', '.join(p.name for p in dead)}\n\n" + self.tails())


def subprocess_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any DISPATCHER_* setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1,
               procs: Procs | None = None) -> Any:
    """Call ``check`` until it returns something truthy; fail with the processes' logs on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if procs is not None:
            procs.check_alive()
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            logs = f"\n\n{procs.tails()}" if procs is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}{logs}")
        time.sleep(interval)


def wait_for_intents(producer: Any, ids: list[uuid.UUID], *, procs: Procs, timeout: float) -> list[Any]:
    """Until every intent is terminal; their views. One query a look, every 0.2 s: a simulator
    judging arrival times in a thread of this process must not be held off by the looking (50
    reads every 0.2 s bunched its arrival stamps)."""
    def done() -> list[Any] | None:
        outcomes = producer.store.outcomes(ids)
        if len(outcomes) < len(ids) or not all(status in TERMINAL_STATUSES for status, _ in outcomes.values()):
            return None
        return [producer.service.get(i) for i in ids]

    views: list[Any] = wait_until(done, timeout=timeout, what=f"{len(ids)} intents to finish", procs=procs,
                                  interval=0.2)
    return views


class SimulatorProcess:
    """`dispatcher simulate` in a subprocess, steered through its /_sim control API.

    Has the ``hostup_url`` / ``nocworx_url`` attributes of
    :class:`dispatcher.simulator.RunningSimulator`, so ``target_table`` accepts it.
    """

    def __init__(self, proc: Proc, host: str, port: int) -> None:
        self.proc = proc
        self.url = f"http://{host}:{port}"
        self.hostup_url = f"{self.url}/api/v2"
        self.nocworx_url = self.url
        self._client = httpx.Client(base_url=f"{self.url}/_sim", timeout=10)

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._client.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    def healthy(self) -> bool:
        return bool(self._call("GET", "/health").get("ok"))

    def settings(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/config")
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def tickets(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tickets")
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
        result: dict[str, Any] = self._call("PUT", "/config", json=changes)
        return result

    def tickets_for(self, intent_id: str) -> int:
        return int(self.stats()["tickets_by_marker"].get(intent_id, 0))


class ApiClient:
    """The dispatcher's HTTP API with a write and a read token."""

    def __init__(self, url: str, write_token: str, read_token: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)
        self.write = {"Authorization": f"Bearer {write_token}"}
        self.read = {"Authorization": f"Bearer {read_token}"}

    def close(self) -> None:
        self.http.close()

    def submit(self, intent: Mapping[str, Any]) -> httpx.Response:
        return self.http.post("/v1/intents", json=dict(intent), headers=self.write)

    def submit_ok(self, intent: Mapping[str, Any]) -> dict[str, Any]:
        response = self.submit(intent)
        assert response.status_code == 202, f"intake refused {dict(intent)}: {response.status_code} {response.text}"
        data: dict[str, Any] = response.json()
        return data

    def get(self, intent_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/intents/{intent_id}", headers=self.read)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def list_all(self, **filters: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {**filters, "limit": "500", **({"cursor": cursor} if cursor else {})}
            response = self.http.get("/v1/intents", params=params, headers=self.read)
            response.raise_for_status()
            page = response.json()
            out.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def wait_terminal(self, ids: Iterable[str], *, timeout: float = 45.0,
                      procs: Procs | None = None) -> dict[str, dict[str, Any]]:
        """Poll each intent until it is terminal; fail naming the stragglers (and the logs) at the deadline."""
        pending = list(ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for intent_id in list(pending):
                view = self.get(intent_id)
                if view["status"] in TERMINAL:
                    done[intent_id] = view
                    pending.remove(intent_id)
            if not pending:
                break
            if procs is not None:
                procs.check_alive()
            if time.monotonic() > deadline:
                states = {i: (v := self.get(i))["status"] + f" (attempts {v['attempts']}, last_error "
                          f"{v['last_error']})" for i in pending}
                logs = f"\n\n{procs.tails()}" if procs is not None else ""
                raise AssertionError(f"{len(pending)} intent(s) not terminal after {timeout:g} s: {states}{logs}")
            time.sleep(0.1)
        return done
