"""The HTTP API (FastAPI): intents in, intents out, health.

Intake answers 2xx only after the intent is committed; 503 when the database cannot be reached
(so producers retry); 4xx as ``application/problem+json`` naming each bad field.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dispatcher import metrics
from dispatcher.domain import IntentInput, Status
from dispatcher.errors import FieldProblem, IntentInvalid, UnknownIntent
from dispatcher.service import Dispatcher, ItemResult, ItemStatus

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

    async def read_json(request: Request, limit: int | None = None) -> Any:
        limit = limit or config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Problem(413, "Payload too large", f"the body is larger than {limit} bytes")
        body = bytearray()  # not bytes +=: that copies the whole body per chunk (quadratic on a big batch)
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

    from dispatcher.intake.alert_routes import install_alert_routes, install_problem_handlers

    install_problem_handlers(app)
    defs.update(install_alert_routes(app, service, authorize))

    @app.post("/v1/intents", status_code=202, tags=["intents"],
              summary="Submit one ticket intent (202 accepted, 200 for an idempotent replay)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": intent_schema}}}})
    async def submit(request: Request, dry_run: bool = False) -> Response:
        who = authorize(request, "intents:write")
        data = await read_json(request)
        try:
            if dry_run:  # what would be sent, where: nothing stored, nothing sent
                return JSONResponse(await _in_thread(service.preview, data))
            accepted = await _in_thread(service.accept, data, source="api", submitted_by=who,
                                        submitted_from=request.client.host if request.client else None)
        except IntentInvalid as exc:
            raise Problem(422, "Invalid intent", str(exc), errors=exc.problems) from None
        return JSONResponse(accepted.intent.as_dict(), status_code=200 if accepted.replay else 202,
                            headers={"Location": f"/v1/intents/{accepted.intent.id}"})

    @app.post("/v1/intents/batch", tags=["intents"],
              summary="Submit many intents: 200 with one result per item; 422 when none is valid; 413 over the "
                      "maximum",
              description="Body `{\"intents\": [...]}` with at most `[api] max_batch` intents. Each item is "
                          "validated as `POST /v1/intents` would; the valid new ones are stored in one transaction "
                          "and enqueued (items with a `group_key` one by one after it, as their group decides "
                          "ticket or reply). The answer is 200 with `results[i] = {index, status: accepted|replay|"
                          "invalid, id?, errors?, duplicate_of?}` even when some items are invalid (207-like); "
                          "an item whose idempotency key an earlier item of the same batch has is a `replay` of "
                          "it with `duplicate_of` naming that item. When no item is valid: 422 "
                          "(problem+json, with the same `results`).",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["intents"], "additionalProperties": False,
                  "properties": {"intents": {"type": "array", "minItems": 1, "maxItems": config.max_batch,
                                             "items": intent_schema}}}}}}})
    async def submit_batch(request: Request) -> Response:
        who = authorize(request, "intents:write")
        items = _batch_items(await read_json(request, limit=config.max_batch_body_bytes), config.max_batch)
        results = await _in_thread(service.accept_many, items, source="api", submitted_by=who,
                                   submitted_from=request.client.host if request.client else None)
        out = [_item_json(r) for r in results]
        counts = {s: sum(1 for r in out if r["status"] == s) for s in ("accepted", "replay", "invalid")}
        if counts["invalid"] == len(out):
            errors = [{"field": f"intents[{r.index}].{p.field}", "reason": p.reason} for r in results for p in r.errors]
            return JSONResponse({"type": "about:blank", "title": "Invalid intents", "status": 422,
                                 "detail": "no intent in the batch is valid; nothing was stored",
                                 "instance": request.url.path, "errors": errors, "results": out},
                                status_code=422, media_type=PROBLEM)
        return JSONResponse({"results": out, **counts})

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

    @app.get("/readyz", tags=["health"], summary="The database and the broker are reachable",
             description="503 only when intake cannot work (database, broker). `components` reports the "
                         "scheduler's and the workers' heartbeats (ok | stale | missing) without failing "
                         "readiness: intents accepted meanwhile wait safely in the database.")
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
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
        if checks["database"] == "ok":
            with contextlib.suppress(Exception):  # a report only: never the reason readiness fails
                body["components"] = (await _in_thread(service.store.liveness, service.clock())).as_dict()
        return JSONResponse(body, status_code=200 if ok else 503)

    scrape = metrics.registry(metrics.DatabaseCollector(service.store, config.targets))

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)")
    async def prometheus_metrics() -> Response:
        return Response(await _in_thread(generate_latest, scrape), media_type=CONTENT_TYPE_LATEST)

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _batch_items(data: Any, max_batch: int) -> list[Any]:
    """The ``intents`` list of a batch body, or the problem with the body as a whole."""
    if not isinstance(data, dict):
        raise Problem(422, "Invalid batch", "the body must be an object: {\"intents\": [...]}",
                      errors=[FieldProblem("body", "must be an object with an 'intents' list")])
    unknown = sorted(set(data) - {"intents"})
    if unknown:
        raise Problem(422, "Invalid batch", f"unknown field(s): {', '.join(unknown)}",
                      errors=[FieldProblem(name, "unknown field") for name in unknown])
    items = data.get("intents")
    if not isinstance(items, list) or not items:
        reason = "required" if items is None else "must be a non-empty list of intents"
        raise Problem(422, "Invalid batch", f"intents: {reason}", errors=[FieldProblem("intents", reason)])
    if len(items) > max_batch:
        raise Problem(413, "Batch too large", f"the batch has {len(items)} intents; at most {max_batch} per "
                      "request ([api] max_batch): split it", errors=[FieldProblem("intents", f"at most {max_batch}")])
    return items


def _item_json(result: ItemResult) -> dict[str, Any]:
    """One item's result: a duplicate within the batch is a replay of the earlier item."""
    status = ItemStatus.replay if result.status is ItemStatus.duplicate else result.status
    out: dict[str, Any] = {"index": result.index, "status": status.value}
    if result.id is not None:
        out["id"] = str(result.id)
    if result.duplicate_of is not None:
        out["duplicate_of"] = result.duplicate_of
    if result.errors:
        out["errors"] = [{"field": p.field, "reason": p.reason} for p in result.errors]
    return out


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
