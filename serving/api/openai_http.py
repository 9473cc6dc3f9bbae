"""OpenAI-compatible HTTP API (FastAPI): translate requests, delegate to the engine client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from serving.api import metrics
from serving.api.admission import Admission, Overloaded, Unavailable
from serving.api.engine_client import EngineClient
from serving.api.fast_path import FastPath
from serving.api.http_errors import ApiError, BodyLimitAndAuth, error_body, invalid_body
from serving.api.openai_calls import Call, api_error, check_model, start_chat, start_completion
from serving.api.openai_schema import ChatCompletionRequest, CompletionRequest
from serving.engine.async_engine import EngineDeadError
from serving.engine.sampling_params import ParamError
from serving.engine.stats import merge_stats


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def build_app(admission: Admission, api_key: str | None = None, max_body_bytes: int = 8 * 2**20,
              routers: Sequence[APIRouter] = (), max_upload_bytes: int | None = None) -> FastAPI:
    """`routers` add routes (e.g. /v1/files and /v1/batches) under the same auth, limits and
    error shapes; /v1/files uploads may be up to max_upload_bytes."""
    app = FastAPI(title="herd", description="OpenAI-compatible API of the herd serving stack",
                  version="0.1.0")
    counters = metrics.GatewayCounters()

    async def completions_handler(body: CompletionRequest, request: Request):
        return await _respond(start_completion(engine(body.model), body), body.stream, request)

    async def chat_handler(body: ChatCompletionRequest, request: Request):
        return await _respond(start_chat(engine(body.model), body), body.stream, request)

    app.add_middleware(FastPath, routes={"/v1/completions": (CompletionRequest, completions_handler),
                                         "/v1/chat/completions": (ChatCompletionRequest, chat_handler)},
                       on_error=lambda e: api_error_response(e) if isinstance(e, ApiError) else None)
    app.add_middleware(BodyLimitAndAuth, api_key=api_key, max_body_bytes=max_body_bytes, counters=counters,
                       max_upload_bytes=max_upload_bytes)
    for router in routers:
        app.include_router(router, responses=ERRORS)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = invalid_body(exc.errors())
        return JSONResponse(error_body(err.message, err.type, err.param), err.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return api_error_response(exc)

    def engine(model: str) -> EngineClient:
        try:
            client = admission.admit()
        except Unavailable as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", code="queue_full") from None
        check_model(client, model)
        return client

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if not admission.ready:
            status = "draining" if admission.draining else "loading"
            return JSONResponse(error_body(f"not ready: {status}", "service_unavailable"), 503)
        replicas = [{"replica": r.index, "healthy": r.healthy, "restarts": r.restarts}
                    for r in await asyncio.to_thread(admission.client.replica_states)]
        if not any(r["healthy"] for r in replicas):
            return JSONResponse(error_body("no replica is serving", "service_unavailable"), 503)
        return {"status": "ok", "replicas": replicas}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics():
        client = admission.client
        replicas = await asyncio.to_thread(client.replica_states) if client else []
        stats = merge_stats([r.stats for r in replicas if r.stats is not None]) if client else None
        model = client.models()[0].id if client else ""
        return PlainTextResponse(metrics.render(stats, model, counters, admission.ready, replicas),
                                 media_type="text/plain; version=0.0.4")

    def model_card(m) -> dict[str, Any]:
        return {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by,
                "max_model_len": m.max_model_len}

    @app.get("/v1/models", responses=ERRORS)
    async def list_models():
        client = engine_or_503()
        return {"object": "list", "data": [model_card(m) for m in client.models()]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def get_model(model_id: str):
        client = engine_or_503()
        for m in client.models():
            if m.id == model_id:
                return model_card(m)
        raise ApiError(404, f"The model `{model_id}` does not exist.", "invalid_request_error",
                       "model", "model_not_found")

    def engine_or_503() -> EngineClient:
        if admission.client is None:
            raise ApiError(503, "the model is still loading; retry shortly", "service_unavailable")
        return admission.client

    # Non-streamed calls with a valid body usually arrive through FastPath instead (fast_path.py).
    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        return await completions_handler(body, request)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat_handler(body, request)

    return app


def api_error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status)


async def _respond(call: Call, stream: bool, request: Request):
    if stream:
        return await _sse(call.chunks(), call.param_alias)
    body = await _until_disconnect(request, call.run())
    # Server-Timing: how long the engine took, so a client can tell it from the gateway's share.
    return JSONResponse(body, headers={"Server-Timing": f"engine;dur={call.engine_seconds * 1e3:.3f}"})


async def _until_disconnect(request: Request, work):
    """Runs `work` in this task while a watcher waits for the client to leave; if it does, the
    work is cancelled at once (which aborts its engine requests)."""
    this = asyncio.current_task()
    left = False

    async def watch() -> None:
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        this.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        this.uncancel()
        raise ApiError(499, "client disconnected", "client_closed_request") from None
    finally:
        watcher.cancel()


async def _sse(chunks: AsyncIterator[dict[str, Any]], param_alias=None) -> StreamingResponse:
    """Server-sent events; the first chunk is awaited before the 200 goes out, so a request the
    engine refuses (e.g. a prompt over the context) is still a 400."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except ParamError as e:
        raise api_error(e, param_alias) from None
    except EngineDeadError as e:
        raise ApiError(503, str(e), "service_unavailable") from None

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n"
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ParamError as e:
            yield f"data: {json.dumps(error_body(str(e), 'invalid_request_error', e.param))}\n\n"
        except EngineDeadError as e:  # e.g. its replica died mid-stream
            yield f"data: {json.dumps(error_body(str(e), 'service_unavailable'))}\n\n"
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield f"data: {json.dumps(error_body(str(e), 'internal_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
