"""The OpenAI generation calls without a transport: validate a body, submit it to an engine and
shape the results. The HTTP routes and batch files both go through here, so a batch line's
body is exactly what the HTTP API returns for the same request."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from serving.api.engine_client import EngineClient
from serving.api.http_errors import ApiError
from serving.api.openai_responses import TokenNames
from serving.api.openai_schema import ChatCompletionRequest, CompletionRequest
from serving.api.openai_shapes import ChatShape, CompletionShape
from serving.api.streams import fan_in
from serving.engine.async_engine import EngineDeadError
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import ParamError, SamplingParams


@dataclass
class Call:
    """One submitted call: its engine streams (one per prompt) and how to shape what they yield."""

    streams: list[AsyncIterator[RequestOutput]]
    shape: CompletionShape | ChatShape
    param_alias: dict[str, str] | None = None  # engine param name -> the body's field
    engine_seconds: float | None = None  # results(): from submitting to the last output

    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        if isinstance(self.shape, ChatShape):
            return self.shape.chunks(fan_in(self.streams))
        return self.shape.chunks(fan_in(self.streams), len(self.streams))

    def response(self, results: list[RequestOutput]) -> dict[str, Any]:
        if isinstance(self.shape, ChatShape):
            return self.shape.response(results[0])
        return self.shape.response(results)

    async def results(self) -> list[RequestOutput]:
        """Every prompt's merged output; engine refusals become ApiErrors."""
        results: list[RequestOutput | None] = [None] * len(self.streams)
        start = time.perf_counter()
        try:
            async for i, out in fan_in(self.streams):
                if results[i] is None:
                    results[i] = out
                else:
                    results[i].merge(out)
        except ParamError as e:
            raise api_error(e, self.param_alias) from None
        except EngineDeadError as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        self.engine_seconds = time.perf_counter() - start
        return results

    async def run(self) -> dict[str, Any]:
        """The non-streamed response body."""
        return self.response(await self.results())


def api_error(e: ParamError, alias: dict[str, str] | None = None) -> ApiError:
    return ApiError(400, str(e), "invalid_request_error", (alias or {}).get(e.param, e.param))


def check_model(client: EngineClient, model: str) -> None:
    if model not in {m.id for m in client.models()}:
        raise ApiError(404, f"The model `{model}` does not exist.", "invalid_request_error",
                       "model", "model_not_found")


def _params(build: Callable[[], SamplingParams]) -> SamplingParams:
    try:
        return build()
    except ParamError as e:
        raise api_error(e) from None


def start_completion(client: EngineClient, body: CompletionRequest) -> Call:
    params = _params(body.to_sampling_params)
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = [client.generate(p if isinstance(p, str) else {"prompt_token_ids": p}, params, f"{rid}-{i}")
               for i, p in enumerate(body.prompts())]
    names = TokenNames(client.tokenizer, body.return_tokens_as_token_ids)
    return Call(streams, CompletionShape(rid, body, params, names))


def start_chat(client: EngineClient, body: ChatCompletionRequest) -> Call:
    tok = client.tokenizer
    tools = _params(lambda: body.chat_tools(tok.chat_template, client.tool_call_parser))
    params = _params(lambda: body.to_sampling_params(tools))
    messages, template_tools = tools.render(body.template_messages()) if tools else (body.template_messages(), None)
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=body.add_generation_prompt, tools=template_tools)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "invalid_request_error", "messages") from None
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = client.generate({"prompt_token_ids": ids}, params, rid)
    return Call([stream], ChatShape(rid, body, params, TokenNames(tok), tools), {"prompt": "messages"})
