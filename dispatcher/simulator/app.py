"""One ASGI app for both fake providers plus the ``/_sim`` control API tests use to count and steer.

Paths: HostUp under ``/api/v2``, NocWorx under ``/v1``, control under ``/_sim`` (loopback only, no
auth: it is a test double, and the control API must never be reachable from elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from dispatcher.simulator import hostup, nocworx
from dispatcher.simulator.common import Endpoint, Handler, json_response, quiet_simulated_drops, sim_state
from dispatcher.simulator.settings import SettingsError, SimulatorSettings, check_settings, merge_settings
from dispatcher.simulator.state import PROVIDERS, SimState


def _is_loopback(request: Request) -> bool:
    if request.client is None:
        return True                       # unix socket or in-process transport
    host = request.client.host
    if host in ("testclient", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _control(handler: Handler) -> Endpoint:
    """Refuse control calls from anywhere but this machine."""

    async def endpoint(request: Request) -> Response:
        if not _is_loopback(request):
            return json_response({"error": "the /_sim control API only answers loopback clients"}, 403)
        return await handler(request, sim_state(request))

    return endpoint


async def stats(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    return json_response(state.stats())


async def requests(request: Request, state: SimState) -> Response:
    provider = request.query_params.get("provider") or None
    if provider is not None and provider not in PROVIDERS:
        return json_response({"error": f"provider must be one of {', '.join(PROVIDERS)}"}, 400)
    since: float | None = None
    if request.query_params.get("since"):
        try:
            since = float(request.query_params["since"])
        except ValueError:
            return json_response({"error": "since must be an epoch timestamp (seconds)"}, 400)
    return json_response(state.requests_json(provider, since))


async def tickets(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    return json_response(state.tickets_json())


async def tasks(request: Request, state: SimState) -> Response:
    state.settle(time.time())
    return json_response(state.tasks_json())


async def get_config(request: Request, state: SimState) -> Response:
    return json_response(state.settings.to_json())


async def put_config(request: Request, state: SimState) -> Response:
    try:
        patch = json.loads(await request.body() or b"{}")
        settings = merge_settings(state.settings, patch)
    except json.JSONDecodeError:
        return json_response({"error": "body must be JSON", "problems": ["body: not JSON"]}, 400)
    except SettingsError as exc:
        return json_response({"error": "invalid settings", "problems": exc.problems}, 400)
    state.settle(time.time())             # tasks already due resolve under the rules they were made with
    state.apply_settings(settings)
    return json_response(settings.to_json())


async def reset(request: Request, state: SimState) -> Response:
    state.reset()
    return json_response({"reset": True, "settings": state.settings.to_json()})


async def health(request: Request, state: SimState) -> Response:
    return json_response({"ok": True})


def create_app(settings: SimulatorSettings | None = None) -> Starlette:
    """Build a fresh simulator; its state lives on ``app.state.sim`` (a :class:`SimState`)."""
    settings = settings or SimulatorSettings()
    check_settings(settings)
    quiet_simulated_drops()
    control = [
        Route("/stats", _control(stats), methods=["GET"]),
        Route("/requests", _control(requests), methods=["GET"]),
        Route("/tickets", _control(tickets), methods=["GET"]),
        Route("/tasks", _control(tasks), methods=["GET"]),
        Route("/config", _control(get_config), methods=["GET"]),
        Route("/config", _control(put_config), methods=["PUT"]),
        Route("/reset", _control(reset), methods=["POST"]),
        Route("/health", _control(health), methods=["GET"]),
    ]
    app = Starlette(routes=[
        Mount("/api/v2", routes=hostup.routes()),
        Mount("/v1", routes=nocworx.routes()),
        Mount("/_sim", routes=control),
    ])
    app.state.sim = SimState(settings)
    return app
