"""The alert webhooks (``POST /v1/alerts/alertmanager``, ``/v1/alerts/grafana``) and the problem+json
answers for everything FastAPI itself would answer in its own shape (unknown paths, bad parameters).

A webhook call is one notification: authorised (``alerts:write``), bounded in size, signed when
Grafana's HMAC secret is configured, validated with field-named errors, routed, and stored with its
group's decision in one transaction before any 2xx. ``?dry_run=true`` answers what would be sent
without storing or sending anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatcher.domain import Action
from dispatcher.errors import FieldProblem, IntentInvalid
from dispatcher.intake.alerts import (
    AlertmanagerWebhook,
    GrafanaWebhook,
    Notification,
    parse_alertmanager,
    parse_grafana,
    signature_ok,
)
from dispatcher.service import Dispatcher, GroupAccepted

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Grafana-Alerting-Signature"
Authorize = Callable[[Request, str], str]


def _schema(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


def install_alert_routes(app: FastAPI, service: Dispatcher, authorize: Authorize) -> dict[str, Any]:
    """Add the webhook routes; returns the component schemas they reference (for the OpenAPI document)."""
    from dispatcher.intake.api import Problem, _in_thread

    config = service.config
    am_schema, am_defs = _schema(AlertmanagerWebhook)
    grafana_schema, grafana_defs = _schema(GrafanaWebhook)

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Problem(413, "Payload too large", f"the body is larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Problem(413, "Payload too large", f"the body is larger than {limit} bytes")
        return bytes(body)

    def parse(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Problem(400, "Malformed JSON", f"the body is not valid JSON: {exc}",
                          errors=[FieldProblem("body", "not valid JSON")]) from None

    async def handle(request: Request, notification: Notification, dry_run: bool, who: str) -> Response:
        try:
            if dry_run:
                return JSONResponse(await _in_thread(service.preview_alerts, notification))
            result: GroupAccepted = await _in_thread(
                service.accept_alerts, notification, submitted_by=who,
                submitted_from=request.client.host if request.client else None)
        except IntentInvalid as exc:
            raise Problem(422, "Invalid alert notification", str(exc), errors=exc.problems) from None
        body = {"action": result.action.value, "reason": result.reason, "intent": result.intent.as_dict(),
                "group": result.group.as_dict()}
        return JSONResponse(body, status_code=200 if result.action is Action.none else 202,
                            headers={"Location": f"/v1/intents/{result.intent.id}"})

    def validated(parser: Callable[[Any], Notification], data: Any) -> Notification:
        try:
            return parser(data)
        except IntentInvalid as exc:
            raise Problem(422, "Invalid alert notification", str(exc), errors=exc.problems) from None

    responses: dict[int | str, dict[str, Any]] = {
        202: {"description": "stored: the group's ticket will be created, replied to or reopened"},
        200: {"description": "stored as nothing new (same alerts as last time), or a dry run's plan"},
        401: {"description": "no or bad bearer token (Grafana: bad or missing signature when a secret is set)"},
        403: {"description": "the token lacks the alerts:write scope"},
        413: {"description": "the body is larger than [api] max_body_bytes"},
        422: {"description": "the payload can never succeed (a field is wrong, or no route takes it)"},
        503: {"description": "the database cannot commit; nothing was stored, retry"},
    }

    @app.post("/v1/alerts/alertmanager", status_code=202, tags=["alerts"], responses=responses,
              summary="Alertmanager webhook (version 4): one ticket per alert group, kept up to date",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": am_schema}}}})
    async def alertmanager(request: Request, dry_run: bool = False) -> Response:
        who = authorize(request, "alerts:write")
        notification = validated(parse_alertmanager, parse(await read_body(request)))
        return await handle(request, notification, dry_run, who)

    @app.post("/v1/alerts/grafana", status_code=202, tags=["alerts"], responses=responses,
              summary="Grafana webhook contact point: one ticket per alert group, kept up to date",
              description=f"When `[alerts] grafana_secret_env` is set, `{SIGNATURE_HEADER}` must carry the hex "
                          "HMAC-SHA256 of the raw body under that secret.",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": grafana_schema}}}})
    async def grafana(request: Request, dry_run: bool = False) -> Response:
        who = authorize(request, "alerts:write")
        body = await read_body(request)
        secret = config.alerts.grafana_secret
        if secret is not None and not signature_ok(body, secret.get_secret_value(),
                                                   request.headers.get(SIGNATURE_HEADER)):
            raise Problem(401, "Unauthorized", f"the {SIGNATURE_HEADER} header is missing or does not match "
                                               "the body", errors=[FieldProblem(SIGNATURE_HEADER, "bad signature")])
        notification = validated(parse_grafana, parse(body))
        return await handle(request, notification, dry_run, who)

    return {**am_defs, **grafana_defs}


def install_problem_handlers(app: FastAPI) -> None:
    """Unknown paths, wrong methods, bad query parameters and crashes answer problem+json too."""
    from dispatcher.intake.api import Problem, problem_response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        return problem_response(request, Problem(exc.status_code, title, str(exc.detail),
                                                 headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            loc = [str(part) for part in item.get("loc", ()) if part not in ("query", "path", "header", "body")]
            problems.append(FieldProblem(".".join(loc) or "request", str(item.get("msg", "invalid"))))
        detail = "; ".join(str(p) for p in problems) or "the request is not valid"
        return problem_response(request, Problem(400, "Invalid request", detail, errors=problems))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error answering %s %s", request.method, request.url.path)
        return problem_response(request, Problem(500, "Internal server error",
                                                 "an unexpected error occurred; it has been logged"))
