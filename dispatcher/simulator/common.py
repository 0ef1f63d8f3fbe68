"""What every simulated provider endpoint goes through: log, latency, faults, auth, rate limit.

Each provider supplies its own error dialect (:class:`Dialect`); the order of the gates is the
same for both so a test can reason about which answer wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dispatcher.domain import find_marker
from dispatcher.providers.headers import parse_retry_after
from dispatcher.simulator.settings import SimulatorSettings
from dispatcher.simulator.state import RateLimited, RequestRecord, SimState

Handler = Callable[[Request, SimState], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class SimulatedDrop(Exception):
    """Raised after a partial response so the server closes the connection mid-body."""


class _HideSimulatedDrops(logging.Filter):
    """A drop is the simulator working as asked, not an application error worth a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc and isinstance(exc[1], SimulatedDrop))


_DROP_FILTER = _HideSimulatedDrops()


def quiet_simulated_drops() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _DROP_FILTER not in logger.filters:
        logger.addFilter(_DROP_FILTER)


class DroppingResponse(Response):
    """Sends the status line, headers (full Content-Length) and half the body, then dies.

    The client therefore sees an incomplete message (httpx: ``RemoteProtocolError``) although
    the server did the work: the "lost answer" case a dispatcher has to reconcile.
    """

    def __init__(self, original: Response) -> None:
        super().__init__(content=bytes(original.body), status_code=original.status_code)
        self.raw_headers = list(original.raw_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        quiet_simulated_drops()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        half = bytes(self.body[: len(self.body) // 2])
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise SimulatedDrop("connection dropped after create (simulated)")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None,
                  media_type: str = "application/json") -> Response:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(content=body, status_code=status, headers=headers, media_type=media_type)


def retry_after_value(limited: RateLimited, settings: SimulatorSettings) -> str:
    """Retry-After as integer seconds or, when configured, as the HTTP date of the reset."""
    if settings.retry_after_format == "http-date":
        return formatdate(math.ceil(limited.reset_at), usegmt=True)
    return str(limited.retry_after_s)


def bearer_ok(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and token.strip() == key


async def read_json(request: Request) -> tuple[Any, bool]:
    """The body as JSON and whether it parsed; an empty body is ``None``."""
    raw = await request.body()
    if not raw.strip():
        return None, True
    try:
        return json.loads(raw), True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, False


class Dialect(ABC):
    """How one provider says the things every endpoint may have to say."""

    name: str

    @abstractmethod
    def key(self, settings: SimulatorSettings) -> str: ...

    @abstractmethod
    def unauthorized(self, request: Request, state: SimState) -> Response: ...

    @abstractmethod
    def rate_limited(self, request: Request, state: SimState, limited: RateLimited) -> Response: ...

    @abstractmethod
    def server_error(self, request: Request, state: SimState) -> Response: ...

    def decorate(self, response: Response) -> None:  # noqa: B027 - optional hook, default adds nothing
        """Headers the provider puts on every answer."""


def sim_state(request: Request) -> SimState:
    state: SimState = request.app.state.sim
    return state


def provider_endpoint(dialect: Dialect, handler: Handler) -> Endpoint:
    """Wrap ``handler`` in the gates every request of ``dialect``'s provider passes, in this order:
    log arrival, latency, injected 5xx, bearer auth, rate window, then the handler itself."""

    async def endpoint(request: Request) -> Response:
        state = sim_state(request)
        arrived = time.time()
        raw = await request.body()
        record = RequestRecord(
            provider=dialect.name, method=request.method, path=request.url.path,
            query=request.url.query, at=arrived,
            marker=find_marker(raw.decode("utf-8", "replace")) if raw else None,
        )
        state.request_log.append(record)
        counters = state.counters[dialect.name]
        counters["requests"] += 1

        low, high = state.settings.latency_ms
        if high > 0:
            await asyncio.sleep(state.rng.uniform(low, high) / 1000.0)

        settings = state.settings
        limited: RateLimited | None = None
        if state.chance(settings.error_rate):
            response = dialect.server_error(request, state)
            record.fault = "error"
        elif not bearer_ok(request, dialect.key(settings)):
            response = dialect.unauthorized(request, state)
        elif (limited := state.take(dialect.name, time.time())) is not None:
            response = dialect.rate_limited(request, state, limited)
        else:
            response = await handler(request, state)

        dialect.decorate(response)
        status = response.status_code
        record.status = status
        record.throttled = status == 429
        if "retry-after" in response.headers:  # what the answer asked for, so a log shows early requests
            record.retry_after = parse_retry_after(response.headers["retry-after"],
                                                   datetime.fromtimestamp(arrived, UTC))
        if status == 429:
            counters["429"] += 1
        elif status == 401:
            counters["401"] += 1
        elif status >= 500:
            counters["5xx"] += 1
        if isinstance(response, DroppingResponse):
            record.fault = "drop"
            counters["dropped"] += 1
        return response

    return endpoint
