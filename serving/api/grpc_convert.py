"""herd.v1 protobuf messages <-> engine types (SamplingParams in, RequestOutput out)."""

from __future__ import annotations

import json

from protos.herd.v1 import herd_pb2 as pb
from serving.api.chat_tools import ChatTools
from serving.api.openai_structured import from_response_format, pick
from serving.engine.outputs import PositionLogprobs, RequestOutput
from serving.engine.sampling_params import ParamError, SamplingParams

# Proto field -> SamplingParams field, for the optional scalars copied only when set.
_SCALARS = ("n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
            "prompt_logprobs", "skip_special_tokens")
MAX_LOGPROBS = 20


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields keep vLLM's defaults; invalid values raise ParamError naming the field."""
    kw = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    for name in ("logprobs", "prompt_logprobs"):
        if kw.get(name, 0) > MAX_LOGPROBS:
            raise ParamError(f"params.{name}", f"must be <= {MAX_LOGPROBS}, got {kw[name]}")
    try:
        return SamplingParams(
            **kw, stop=list(msg.stop) or None, stop_token_ids=list(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos, include_stop_str_in_output=msg.include_stop_str_in_output,
            logit_bias=dict(msg.logit_bias) or None)
    except ParamError as e:
        raise ParamError(f"params.{e.param}", str(e).split(": ", 1)[-1]) from None


def chat_tools(request: pb.ChatRequest, chat_template: str | None, parser: str | None) -> ChatTools | None:
    """The request's tools and tool_choice, as the HTTP API takes them; ParamError names the field."""
    tools = []
    for i, t in enumerate(request.tools):
        fn = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        if t.parameters_json:
            try:
                fn["parameters"] = json.loads(t.parameters_json)
            except json.JSONDecodeError as e:
                raise ParamError(f"tools[{i}].parameters_json", f"not valid JSON: {e}") from None
            if not isinstance(fn["parameters"], dict):
                raise ParamError(f"tools[{i}].parameters_json", "must be a JSON Schema object")
        tools.append({"type": "function", "function": fn})
    choice = request.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None
    return ChatTools.from_request(tools, choice, parallel, chat_template, parser)


def chat_structured(request: pb.ChatRequest, tools: ChatTools | None):
    rf = None
    if request.HasField("response_format") and request.response_format.type:
        rf = {"type": request.response_format.type}
        if request.response_format.schema_json:
            try:
                schema = json.loads(request.response_format.schema_json)
            except json.JSONDecodeError as e:
                raise ParamError("response_format.schema_json", f"not valid JSON: {e}") from None
            rf["json_schema"] = {"name": "response", "schema": schema}
    return pick(from_response_format(rf), tools.structured() if tools else None)


def token_logprobs(token_ids, positions: list[PositionLogprobs | None], top_n: int,
                   name) -> list[pb.TokenLogprob]:
    out = []
    for tok, entry in zip(token_ids, positions):
        if entry is None:  # the first prompt token has nothing before it
            continue
        best = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top_n]
        out.append(pb.TokenLogprob(
            token_id=tok, token=name(tok), logprob=entry[tok].logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, token=name(t), logprob=lp.logprob) for t, lp in best]))
    return out


class ResponseBuilder:
    """Turns one request's (delta or merged) outputs into GenerateResponse messages, keeping
    the token counts that the last message's usage reports."""

    def __init__(self, request_id: str, params: SamplingParams, name, tools: ChatTools | None = None) -> None:
        self.request_id, self.params, self.name = request_id, params, name
        self.completion_tokens = 0
        self.first = True
        # with tools, a sample's text is held until it ends, then split into content and calls
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.held: dict[int, str] = {}

    def message(self, out: RequestOutput) -> pb.GenerateResponse:
        msg = pb.GenerateResponse(request_id=self.request_id)
        if self.first:
            msg.prompt_token_ids.extend(out.prompt_token_ids)
            if out.prompt_logprobs is not None:
                msg.prompt_logprobs.extend(token_logprobs(
                    out.prompt_token_ids, out.prompt_logprobs, self.params.prompt_logprobs or 0, self.name))
            self.first = False
        for o in out.outputs:
            if not o.token_ids and not o.text and o.finish_reason is None:
                continue
            self.completion_tokens += len(o.token_ids)
            text, reason, calls = o.text, o.finish_reason, []
            if self.tools is not None:
                self.held[o.index] = self.held.get(o.index, "") + o.text
                text = ""
                if reason is not None:
                    content, calls, reason = self.tools.complete(self.held.pop(o.index), reason)
                    text = content or ""
            choice = msg.choices.add(index=o.index, token_ids=o.token_ids, text=text, finish_reason=reason or "")
            for c in calls:
                choice.tool_calls.add(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
            if o.logprobs is not None:
                choice.logprobs.extend(token_logprobs(o.token_ids, o.logprobs, self.params.logprobs or 0,
                                                      self.name))
        if out.finished:
            prompt = len(out.prompt_token_ids)
            msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                                        total_tokens=prompt + self.completion_tokens,
                                        cached_prompt_tokens=out.num_cached_tokens))
        return msg
