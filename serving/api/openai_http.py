"""OpenAI-compatible HTTP API (FastAPI): translate requests, delegate to the engine client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from serving.api import metrics
from serving.api.admission import Admission, Overloaded, Unavailable
from serving.api.engine_client import EngineClient
from serving.api.http_errors import ApiError, BodyLimitAndAuth, error_body
from serving.api.openai_responses import TokenNames, chat_logprobs, completion_logprobs, usage
from serving.api.openai_schema import ChatCompletionRequest, CompletionRequest
from serving.api.streams import fan_in
from serving.engine.async_engine import EngineDeadError
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import ParamError, SamplingParams
from serving.engine.stats import merge_stats


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def build_app(admission: Admission, api_key: str | None = None, max_body_bytes: int = 8 * 2**20) -> FastAPI:
    app = FastAPI(title="herd", description="OpenAI-compatible API of the herd serving stack",
                  version="0.1.0")
    counters = metrics.GatewayCounters()
    app.add_middleware(BodyLimitAndAuth, api_key=api_key, max_body_bytes=max_body_bytes, counters=counters)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        return JSONResponse(error_body(f"{'.'.join(loc) or 'body'}: {err.get('msg')}",
                                       "invalid_request_error", ".".join(loc) or None), 400)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status)

    def engine(model: str) -> EngineClient:
        try:
            client = admission.admit()
        except Unavailable as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", code="queue_full") from None
        if model not in {m.id for m in client.models()}:
            raise ApiError(404, f"The model `{model}` does not exist.", "invalid_request_error",
                           "model", "model_not_found")
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

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        client = engine(body.model)
        params = _params(body.to_sampling_params)
        prompts = body.prompts()
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [client.generate(p if isinstance(p, str) else {"prompt_token_ids": p}, params, f"{rid}-{i}")
                   for i, p in enumerate(prompts)]
        names = TokenNames(client.tokenizer, body.return_tokens_as_token_ids)
        shape = _CompletionShape(rid, body, params, names)
        if body.stream:
            return await _sse(shape.chunks(fan_in(streams), len(prompts)))
        results = await _collect(request, streams)
        return shape.response(results)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        client = engine(body.model)
        params = _params(body.to_sampling_params)
        try:
            ids = client.tokenizer.encode_chat(body.template_messages(),
                                               add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", "invalid_request_error", "messages") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = client.generate({"prompt_token_ids": ids}, params, rid)
        shape = _ChatShape(rid, body, params, TokenNames(client.tokenizer))
        if body.stream:
            return await _sse(shape.chunks(fan_in([stream])), {"prompt": "messages"})
        results = await _collect(request, [stream], param_alias={"prompt": "messages"})
        return shape.response(results[0])

    return app


def _params(build) -> SamplingParams:
    try:
        return build()
    except ParamError as e:
        raise ApiError(400, str(e), "invalid_request_error", e.param) from None


def _param_error(e: ParamError, alias: dict[str, str] | None = None) -> ApiError:
    param = (alias or {}).get(e.param, e.param)
    return ApiError(400, str(e), "invalid_request_error", param)


async def _collect(request: Request, streams, param_alias=None) -> list[RequestOutput]:
    """Runs to completion, aborting everything if the client goes away first."""
    results: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        async for i, out in fan_in(streams):
            if results[i] is None:
                results[i] = out
            else:
                results[i].merge(out)

    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "client disconnected", "client_closed_request")
    try:
        task.result()
    except ParamError as e:
        raise _param_error(e, param_alias) from None
    except EngineDeadError as e:
        raise ApiError(503, str(e), "service_unavailable") from None
    return results


async def _sse(chunks: AsyncIterator[dict[str, Any]], param_alias=None) -> StreamingResponse:
    """Server-sent events; the first chunk is awaited before the 200 goes out, so a request the
    engine refuses (e.g. a prompt over the context) is still a 400."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except ParamError as e:
        raise _param_error(e, param_alias) from None
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


class _CompletionShape:
    def __init__(self, rid: str, body: CompletionRequest, params: SamplingParams, names: TokenNames) -> None:
        self.rid, self.body, self.params, self.names = rid, body, params, names
        self.created = int(time.time())

    def _choice_logprobs(self, out, result: RequestOutput, first: bool) -> dict | None:
        if self.body.logprobs is None:
            return None
        ids, lps = list(out.token_ids), list(out.logprobs or [])
        if self.body.echo and first and result.prompt_logprobs is not None:
            ids, lps = list(result.prompt_token_ids) + ids, list(result.prompt_logprobs) + lps
        return completion_logprobs(ids, lps, self.names, self.body.logprobs)

    def _echo(self, result: RequestOutput) -> str:
        return (result.prompt if result.prompt is not None
                else self.names.tokenizer.decode(result.prompt_token_ids)) if self.body.echo else ""

    def response(self, results: list[RequestOutput]) -> dict[str, Any]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, result in enumerate(results):
            prompt_tokens += len(result.prompt_token_ids)
            for out in result.outputs:
                completion_tokens += len(out.token_ids)
                choices.append({"index": p * self.params.n + out.index, "text": self._echo(result) + out.text,
                                "logprobs": self._choice_logprobs(out, result, True),
                                "finish_reason": out.finish_reason})
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.body.model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    async def chunks(self, outputs, num_prompts: int) -> AsyncIterator[dict[str, Any]]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        started: set[int] = set()
        prompt_tokens, completion_tokens = [0] * num_prompts, 0
        async for p, result in outputs:
            prompt_tokens[p] = len(result.prompt_token_ids)
            for out in result.outputs:
                index = p * self.params.n + out.index
                first = index not in started
                started.add(index)
                completion_tokens += len(out.token_ids)
                text = (self._echo(result) if first else "") + out.text
                chunk = {"id": self.rid, "object": "text_completion", "created": self.created,
                         "model": self.body.model,
                         "choices": [{"index": index, "text": text,
                                      "logprobs": self._choice_logprobs(out, result, first),
                                      "finish_reason": out.finish_reason}]}
                if include_usage:
                    chunk["usage"] = None
                yield chunk
        if include_usage:
            yield {"id": self.rid, "object": "text_completion", "created": self.created,
                   "model": self.body.model, "choices": [],
                   "usage": usage(sum(prompt_tokens), completion_tokens)}


class _ChatShape:
    def __init__(self, rid: str, body: ChatCompletionRequest, params: SamplingParams, names: TokenNames) -> None:
        self.rid, self.body, self.params, self.names = rid, body, params, names
        self.created = int(time.time())

    def _logprobs(self, out) -> dict | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(out.token_ids, out.logprobs or [], self.names, self.body.top_logprobs or 0)

    def response(self, result: RequestOutput) -> dict[str, Any]:
        choices = [{"index": out.index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": self._logprobs(out), "finish_reason": out.finish_reason}
                   for out in result.outputs]
        completion = sum(len(o.token_ids) for o in result.outputs)
        return {"id": self.rid, "object": "chat.completion", "created": self.created,
                "model": self.body.model, "choices": choices,
                "usage": usage(len(result.prompt_token_ids), completion, result.num_cached_tokens)}

    def _chunk(self, choices: list[dict], include_usage: bool) -> dict[str, Any]:
        chunk = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.body.model, "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    async def chunks(self, outputs) -> AsyncIterator[dict[str, Any]]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        started: set[int] = set()
        prompt_tokens = completion_tokens = cached = 0
        async for _, result in outputs:
            prompt_tokens, cached = len(result.prompt_token_ids), result.num_cached_tokens
            for out in result.outputs:
                if out.index not in started:
                    started.add(out.index)
                    yield self._chunk([{"index": out.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], include_usage)
                completion_tokens += len(out.token_ids)
                if out.text or out.token_ids or out.finish_reason:
                    delta = {"content": out.text} if out.text else {}
                    yield self._chunk([{"index": out.index, "delta": delta, "logprobs": self._logprobs(out),
                                        "finish_reason": out.finish_reason}], include_usage)
        if include_usage:
            chunk = self._chunk([], False)
            chunk["usage"] = usage(prompt_tokens, completion_tokens, cached)
            yield chunk
