"""Tool modes of a chat request: what constrains the output, and streamed deltas that add up to
the unstreamed reply."""

from __future__ import annotations

import json

import pytest

from serving.api.chat_tools import ChatTools
from serving.engine.sampling_params import ParamError

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
LLAMA4_TEMPLATE = "{{- tools }} <|python_start|> ..."


def tools(choice=None, template=None, parallel=None):
    return ChatTools.from_request([WEATHER, TIME], choice, parallel, template)


def stream(t: ChatTools, pieces: list[str], finish="stop"):
    """Feeds the pieces as a server streams them: (content, tool calls, finish reason)."""
    s = t.stream()
    deltas = [d for p in pieces for d in s.feed(p)]
    tail, reason = s.end(finish)
    deltas += tail
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"name": None, "arguments": "", "ids": set()})
            call["name"] = c.get("function", {}).get("name") or call["name"]
            call["arguments"] += c.get("function", {}).get("arguments", "")
            call["ids"] |= {c.get("id")} - {None}
    return content, [calls[i] for i in sorted(calls)], reason


TWO_CALLS = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("text", [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    TWO_CALLS,
    "No call here, just <b>text</b> and a < sign.\n",
    '<tool_call>{"name": broken json</tool_call>',
])
def test_streamed_auto_deltas_equal_the_whole_reply(text, size):
    t = tools()
    content, calls, reason = t.complete(text, "stop")
    s_content, s_calls, s_reason = stream(t, chunks(text, size))
    assert s_content == (content or "") and s_reason == reason
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c["function"]["name"], c["function"]["arguments"])
                                                             for c in calls]
    assert all(len(c["ids"]) == 1 for c in s_calls)
    assert (reason == "tool_calls") == bool(calls)


@pytest.mark.parametrize(("parallel", "names"), [(None, ["get_time", "get_weather"]),
                                                 (True, ["get_time", "get_weather"]), (False, ["get_time"])])
def test_auto_parallel_tool_calls_false_returns_the_first_call_only(parallel, names):
    t = tools(parallel=parallel)
    content, calls, reason = t.complete(TWO_CALLS, "stop")
    assert [c["function"]["name"] for c in calls] == names and reason == "tool_calls" and not content
    _, s_calls, s_reason = stream(t, chunks(TWO_CALLS, 5))
    assert [c["name"] for c in s_calls] == names and s_reason == "tool_calls"


def test_llama4_template_reads_either_form():
    t = tools(template=LLAMA4_TEMPLATE)
    assert t.native and t.parser.name == "llama4"
    for text in ('[get_weather(city="Rome")]', '{"name": "get_weather", "parameters": {"city": "Rome"}}'):
        content, calls, reason = t.complete(text, "stop")
        assert content is None and reason == "tool_calls"
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}


def test_named_streams_arguments_as_they_come_and_finishes_stop():
    t = tools({"type": "function", "function": {"name": "get_weather"}})
    assert t.structured().param == "tool_choice"
    assert json.loads(t.structured().spec) == WEATHER["function"]["parameters"]
    content, calls, reason = stream(t, ['{"ci', 'ty": "Pa', 'ris"}'])
    assert content == "" and reason == "stop"
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}', "ids": calls[0]["ids"]}]
    assert stream(t, [])[1][0]["name"] == "get_weather"  # even an empty call names its function


def test_required_is_a_list_of_listed_calls():
    t = tools("required", parallel=False)
    schema = json.loads(t.structured().spec)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [alt["properties"]["name"]["const"] for alt in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    content, calls, reason = t.complete('[{"name": "get_time", "arguments": {}}]', "stop")
    assert content is None and reason == "tool_calls" and calls[0]["function"]["arguments"] == "{}"
    cut = t.complete('[{"name": "get_ti', "length")  # cut short by max_tokens: stays text
    assert cut == ('[{"name": "get_ti', [], "length")


def test_fallback_prompt_lists_tools_and_turns_history_into_text():
    t = tools()
    assert not t.native
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    messages, template_tools = t.render(history)
    assert template_tools is None and len(messages) == 4
    assert messages[0]["content"].startswith("Be brief.") and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    native = tools(template=LLAMA4_TEMPLATE)
    assert native.render(history) == (history, [WEATHER, TIME])
    assert tools("none").render(history) == (history, None)


@pytest.mark.parametrize("args, param", [
    (([WEATHER], {"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (([WEATHER, WEATHER], None), "tools"),
    (([], "required"), "tool_choice"),
])
def test_bad_tool_requests_name_the_field(args, param):
    with pytest.raises(ParamError) as info:
        ChatTools.from_request(*args, None, None)
    assert info.value.param == param
