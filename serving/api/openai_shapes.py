"""OpenAI response and stream-chunk bodies of the two generation calls, built from engine outputs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from serving.api.chat_tools import ChatTools, ChoiceStream
from serving.api.openai_responses import TokenNames, chat_logprobs, completion_logprobs, usage
from serving.api.openai_schema import ChatCompletionRequest, CompletionRequest
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams


class CompletionShape:
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


class ChatShape:
    def __init__(self, rid: str, body: ChatCompletionRequest, params: SamplingParams, names: TokenNames,
                 tools: ChatTools | None = None) -> None:
        self.rid, self.body, self.params, self.names, self.tools = rid, body, params, names, tools
        self.created = int(time.time())

    def _logprobs(self, out) -> dict | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(out.token_ids, out.logprobs or [], self.names, self.body.top_logprobs or 0)

    def _choice(self, out) -> dict[str, Any]:
        content, calls, reason = (self.tools.complete(out.text, out.finish_reason) if self.tools
                                  else (out.text, [], out.finish_reason))
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"index": out.index, "message": message, "logprobs": self._logprobs(out), "finish_reason": reason}

    def response(self, result: RequestOutput) -> dict[str, Any]:
        choices = [self._choice(out) for out in result.outputs]
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
        streams: dict[int, ChoiceStream] = {}
        prompt_tokens = completion_tokens = cached = 0
        async for _, result in outputs:
            prompt_tokens, cached = len(result.prompt_token_ids), result.num_cached_tokens
            for out in result.outputs:
                if out.index not in streams:
                    streams[out.index] = ChoiceStream(self.tools)
                    yield self._chunk([{"index": out.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], include_usage)
                completion_tokens += len(out.token_ids)
                deltas, reason = streams[out.index].feed(out.text), None
                if out.finish_reason:
                    tail, reason = streams[out.index].end(out.finish_reason)
                    deltas += tail
                if not deltas and (out.token_ids or reason):
                    deltas = [{}]  # tokens whose text is held back still carry their logprobs
                for j, delta in enumerate(deltas):
                    last = j == len(deltas) - 1
                    yield self._chunk([{"index": out.index, "delta": delta,
                                        "logprobs": self._logprobs(out) if j == 0 else None,
                                        "finish_reason": reason if last else None}], include_usage)
        if include_usage:
            chunk = self._chunk([], False)
            chunk["usage"] = usage(prompt_tokens, completion_tokens, cached)
            yield chunk
