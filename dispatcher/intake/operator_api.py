"""Operator endpoints (scope ``operator``): retry (with edits), cancel, repoll, bulk retry, targets.

The same use cases as the CLI (:mod:`dispatcher.operations`); every action lands in the audit
table with the token's name as the actor.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from dispatcher.domain import problems_from_validation
from dispatcher.errors import IntentInvalid, UnknownIntent
from dispatcher.operations import EDITABLE, IntentFilter, OperationRefused, Operations
from dispatcher.service import Dispatcher


class RetryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    edit: dict[str, Any] = Field(default_factory=dict, description=f"fields to fix first: {', '.join(EDITABLE)}")
    reason: str | None = Field(default=None, max_length=500)


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=500)


class FilterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: list[str] = Field(default_factory=lambda: ["failed"])
    target: str | None = None
    provider: str | None = None
    source: str | None = None
    since: datetime | None = None
    error_code: str | None = None
    group_key: str | None = None
    text: str | None = None


class BulkRetryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: FilterBody
    reason: str | None = Field(default=None, max_length=500)
    dry_run: bool = False
    limit: int = Field(default=1000, ge=1, le=10_000)


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500)


def add_operator_routes(app: FastAPI, service: Dispatcher, authorize: Callable[[Request, str], str],
                        read_json: Callable[[Request], Awaitable[Any]]) -> None:
    """Mount the operator endpoints; ``authorize`` and ``read_json`` are the API's own."""
    from dispatcher.intake.api import Problem

    ops = Operations(service)

    async def body_of(request: Request, model: type[BaseModel]) -> Any:
        raw = await read_json(request) if await request.body() else {}
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise Problem(422, "Invalid request", "the request body is invalid",
                          errors=problems_from_validation(exc)) from None

    async def act(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(func, *args, **kwargs)
        except UnknownIntent as exc:
            raise Problem(404, "Not found", str(exc)) from None
        except OperationRefused as exc:
            raise Problem(409, "Conflict", str(exc)) from None
        except IntentInvalid as exc:
            raise Problem(422, "Invalid request", str(exc), errors=exc.problems) from None

    def intent_id(value: str) -> uuid.UUID:
        try:
            return uuid.UUID(value)
        except ValueError:
            raise Problem(404, "Not found", f"{value!r} is not an intent id") from None

    @app.post("/v1/intents/{id}/retry", tags=["operator"], summary="Retry a failed intent, after optional edits",
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": RetryBody.model_json_schema()}}}})
    async def retry(id: str, request: Request) -> Response:
        who = authorize(request, "operator")
        body = await body_of(request, RetryBody)
        view = await act(ops.retry, intent_id(id), actor=f"api:{who}", edits=body.edit or None, reason=body.reason)
        return JSONResponse(view.as_dict(), status_code=202)

    @app.post("/v1/intents/{id}/cancel", tags=["operator"], summary="Cancel an intent that has not been sent")
    async def cancel(id: str, request: Request) -> Response:
        who = authorize(request, "operator")
        body = await body_of(request, ReasonBody)
        view = await act(ops.cancel, intent_id(id), actor=f"api:{who}", reason=body.reason)
        return JSONResponse(view.as_dict())

    @app.post("/v1/intents/{id}/repoll", tags=["operator"], summary="Poll a NocWorx task again after its deadline")
    async def repoll(id: str, request: Request) -> Response:
        who = authorize(request, "operator")
        body = await body_of(request, ReasonBody)
        view = await act(ops.repoll, intent_id(id), actor=f"api:{who}", reason=body.reason)
        return JSONResponse(view.as_dict(), status_code=202)

    @app.post("/v1/intents/retry", tags=["operator"], summary="Retry every intent a filter selects",
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": BulkRetryBody.model_json_schema()}}}})
    async def bulk_retry(request: Request) -> Response:
        who = authorize(request, "operator")
        body: BulkRetryBody = await body_of(request, BulkRetryBody)
        flt = IntentFilter(**{**body.filter.model_dump(), "status": tuple(body.filter.status)})
        chosen = await act(ops.find_all, flt, cap=body.limit)
        retried: list[str] = []
        refused: list[dict[str, str]] = []
        if not body.dry_run:
            for view in chosen:
                try:
                    await act(ops.retry, view.id, actor=f"api:{who}", reason=body.reason)
                    retried.append(str(view.id))
                except Exception as exc:  # one refusal does not stop the batch; each is reported
                    refused.append({"id": str(view.id), "reason": str(exc)})
        return JSONResponse({"matched": len(chosen), "dry_run": body.dry_run,
                             "ids": [str(v.id) for v in chosen] if body.dry_run else retried,
                             "refused": refused}, status_code=200)

    @app.get("/v1/targets", tags=["operator"], summary="Each target's state and queue")
    async def list_targets(request: Request) -> Response:
        authorize(request, "operator")

        def collect() -> list[dict[str, Any]]:
            now = service.clock()
            states = service.store.target_states()
            queues = service.store.queue_stats(now)
            out = []
            for name, target in sorted(service.config.targets.items()):
                state = states.get(name)
                out.append({"target": name, "provider": target.provider.value,
                            "paused": bool(state and state.paused),
                            "paused_reason": state.paused_reason if state and state.paused else None,
                            "rate": f"{target.rate_count}/{target.rate_period_s:g}s", "burst": target.burst,
                            **queues.get(name, {"open": 0, "oldest_age_s": None})})
            return out

        return JSONResponse({"data": await run_in_threadpool(collect)})

    @app.post("/v1/targets/{name}/pause", tags=["operator"], summary="Stop sending to a target")
    async def pause(name: str, request: Request) -> Response:
        who = authorize(request, "operator")
        body: PauseBody = await body_of(request, PauseBody)
        await act(ops.pause, name, actor=f"api:{who}", reason=body.reason)
        return JSONResponse({"target": name, "paused": True})

    @app.post("/v1/targets/{name}/resume", tags=["operator"], summary="Resume a paused target")
    async def resume(name: str, request: Request) -> Response:
        who = authorize(request, "operator")
        count = await act(ops.resume, name, actor=f"api:{who}")
        return JSONResponse({"target": name, "paused": False, "intents_due": count})
