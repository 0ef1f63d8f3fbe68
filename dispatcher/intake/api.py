"""The HTTP API (FastAPI): intents in, intents out, health.

Intake answers 2xx only after the intent is committed; 503 when the database cannot be reached
(so producers retry); 4xx as ``application/problem+json`` naming each bad field.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dispatcher.domain import IntentInput, Status
from dispatcher.errors import FieldProblem, IntentInvalid, UnknownIntent
from dispatcher.service import Dispatcher

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


class Problem(Exception):
    """An HTTP error answered as RFC 7807 problem details."""

    def __init__(self, status: int, title: str, detail: str, *, errors: list[FieldProblem] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors or []
        self.headers = headers or {}


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": problem.title, "status": problem.status,
                            "detail": problem.detail, "instance": request.url.path}
    if problem.errors:
        body["errors"] = [{"field": p.field, "reason": p.reason} for p in problem.errors]
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM, headers=problem.headers)


def _schema_with_components(model: type[IntentInput]) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return schema, defs


def create_app(service: Dispatcher, *, readiness: Any = None) -> FastAPI:
    """The ASGI app. ``readiness`` is a callable returning {"broker": bool} (None: no broker to check)."""
    config = service.config
    app = FastAPI(title="dispatcher", version="0.1.0",
                  description="Files support tickets into HostUp and NocWorx from queued intents.")
    intent_schema, defs = _schema_with_components(IntentInput)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(DBAPIError)
    async def _db_down(request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database unreachable: %s", type(exc.orig).__name__)
        return problem_response(request, Problem(503, "Service unavailable",
                                                 "the database cannot be reached; nothing was stored, retry later",
                                                 headers={"Retry-After": "5"}))

    def authorize(request: Request, scope: str) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise Problem(401, "Unauthorized", "a bearer token is required",
                          headers={"WWW-Authenticate": 'Bearer realm="dispatcher"'})
        given = header[7:].strip().encode()
        for token in config.tokens:
            if hmac.compare_digest(given, token.token.get_secret_value().encode()):
                if scope not in token.scopes and "operator" not in token.scopes:
                    raise Problem(403, "Forbidden", f"this token lacks the '{scope}' scope")
                return token.name
        raise Problem(401, "Unauthorized", "the bearer token is not valid",
                      headers={"WWW-Authenticate": 'Bearer realm="dispatcher", error="invalid_token"'})

    async def read_json(request: Request) -> Any:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Problem(413, "Payload too large", f"the body is larger than {limit} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Problem(413, "Payload too large", f"the body is larger than {limit} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Problem(400, "Malformed JSON", f"the body is not valid JSON: {exc}",
                          errors=[FieldProblem("body", "not valid JSON")]) from None

    from dispatcher.intake.operator_api import add_operator_routes

    add_operator_routes(app, service, authorize, read_json)

    @app.post("/v1/intents", status_code=202, tags=["intents"],
              summary="Submit one ticket intent (202 accepted, 200 for an idempotent replay)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": intent_schema}}}})
    async def submit(request: Request) -> Response:
        who = authorize(request, "intents:write")
        data = await read_json(request)
        try:
            accepted = await _in_thread(service.accept, data, source="api", submitted_by=who,
                                        submitted_from=request.client.host if request.client else None)
        except IntentInvalid as exc:
            raise Problem(422, "Invalid intent", str(exc), errors=exc.problems) from None
        return JSONResponse(accepted.intent.as_dict(), status_code=200 if accepted.replay else 202,
                            headers={"Location": f"/v1/intents/{accepted.intent.id}"})

    @app.get("/v1/intents/{intent_id}", tags=["intents"], summary="One intent with its attempts")
    async def show(intent_id: str, request: Request) -> Response:
        authorize(request, "intents:read")
        try:
            view = await _in_thread(service.get, _parse_id(intent_id), with_attempts=True)
        except UnknownIntent as exc:
            raise Problem(404, "Not found", str(exc)) from None
        return JSONResponse(view.as_dict(with_attempts=True))

    @app.get("/v1/intents", tags=["intents"], summary="Intents, newest first, with cursor pagination")
    async def list_intents(request: Request, status: str | None = None, target: str | None = None,
                           limit: int = 50, cursor: str | None = None) -> Response:
        authorize(request, "intents:read")
        statuses = [s for s in (status or "").split(",") if s]
        bad = [s for s in statuses if s not in Status.__members__]
        if bad:
            raise Problem(400, "Invalid filter", f"unknown status {bad[0]!r}",
                          errors=[FieldProblem("status", f"must be one of {', '.join(Status.__members__)}")])
        if not 1 <= limit <= 500:
            raise Problem(400, "Invalid filter", "limit must be 1..500",
                          errors=[FieldProblem("limit", "must be between 1 and 500")])
        before = _parse_id(cursor, field="cursor") if cursor else None
        views = await _in_thread(service.store.list_intents, status=statuses, target=target, limit=limit, before=before)
        next_cursor = str(views[-1].id) if len(views) == limit else None
        return JSONResponse({"data": [v.as_dict() for v in views], "next_cursor": next_cursor})

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database and the broker are reachable")
    async def readyz() -> Response:
        checks: dict[str, Any] = {}
        try:
            await _in_thread(_ping_db, service)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        if readiness is not None:
            checks.update(await _in_thread(readiness))
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                            status_code=200 if ok else 503)

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _ping_db(service: Dispatcher) -> None:
    with service.store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _parse_id(value: str, *, field: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Problem(404 if field == "id" else 400, "Not found" if field == "id" else "Invalid cursor",
                      f"{value!r} is not an intent id", errors=[FieldProblem(field, "not an intent id")]) from None


async def _in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run blocking store work off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(func, *args, **kwargs)
