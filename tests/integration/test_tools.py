"""Tool calling and structured outputs over HTTP with the official openai client, on the default model."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

from protos.herd.v1 import herd_pb2 as pb
from protos.herd.v1 import herd_pb2_grpc as pb_grpc
from serving.api.admission import Admission
from serving.batch.runner import run_batch
from tests.integration.servers import GrpcServer, HttpServer, async_engine, wait_idle

DEFAULT = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                   "required": ["tz"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(default_fp32):
    eng = async_engine(default_fp32, served_model_name=DEFAULT)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    admission = Admission()
    admission.client = engine
    srv = HttpServer(admission)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.stop()


def schema_for(i: int) -> dict:
    """Varied schemas: nested objects, arrays, enums, required fields, bounded numbers."""
    name = {"type": "string", "maxLength": 6 + i % 10}
    count = {"type": "integer", "minimum": i % 7, "maximum": 10 + i}
    score = {"type": "number", "minimum": 0, "maximum": 1 + i % 3, "multipleOf": 0.01}  # bounded digits too
    colour = {"enum": ["red", "green", "blue", f"shade-{i}"]}
    tags = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 1 + i % 3}
    point = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                              "y": {"type": "integer", "minimum": -50, "maximum": 50}},
             "required": ["x", "y"], "additionalProperties": False}
    pool = [("name", name), ("count", count), ("score", score), ("colour", colour), ("tags", tags),
            ("point", point), ("ok", {"type": "boolean"}),
            ("items", {"type": "array", "items": point, "maxItems": 2})]
    chosen = [pool[(i + k * (1 + i % 3)) % len(pool)] for k in range(2 + i % 4)]
    props = dict(chosen)
    required = sorted(props)[: 1 + i % len(props)]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_json_schema_outputs_always_validate(client):
    schemas = [schema_for(i) for i in range(100)]

    def ask(i: int):
        r = client.chat.completions.create(
            model=DEFAULT, temperature=0 if i % 2 else 0.8, seed=i, max_tokens=300,
            messages=[{"role": "user", "content": f"Describe thing number {i} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i],
                                                                    "strict": True}})
        return r.choices[0]

    with ThreadPoolExecutor(32) as pool:
        choices = list(pool.map(ask, range(100)))
    for i, choice in enumerate(choices):
        assert choice.finish_reason == "stop", (i, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schemas[i])


def test_json_object_and_vllm_structured_outputs(client):
    r = client.chat.completions.create(model=DEFAULT, messages=ASK, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=DEFAULT, prompt="Is the sky blue? Answer:", max_tokens=5,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model=DEFAULT, prompt="A phone number:", max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert len(r.choices[0].text) == 8 and r.choices[0].text[3] == "-"


def test_named_tool_choice_round_trip(client):
    first = client.chat.completions.create(
        model=DEFAULT, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI's API: a forced call finishes with "stop"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    final = client.chat.completions.create(model=DEFAULT, messages=history, tools=[WEATHER, TIME],
                                           temperature=0, max_tokens=30)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls

    stream = client.chat.completions.create(
        model=DEFAULT, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, arguments, ids = None, "", set()
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            name = tc.function.name or name
            arguments += tc.function.arguments or ""
            ids |= {tc.id} - {None}
    assert name == "get_weather" and arguments == call.function.arguments and len(ids) == 1


def test_required_tool_choice_calls_a_listed_tool(client):
    r = client.chat.completions.create(model=DEFAULT, messages=[{"role": "user", "content": "Time in Tokyo?"}],
                                       tools=[WEATHER, TIME], tool_choice="required", temperature=0,
                                       max_tokens=120, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_auto_parses_the_models_own_format_streamed_and_not(client):
    # The default model's template knows no tools, so herd asks for <tool_call> blocks; a regex
    # holds the model to that format so that the parser's path is exercised for real.
    forced = {"regex": r'Checking\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "[A-Za-z]{1,8}"\}\}\n'
                       r"</tool_call>"}
    kw = {"model": DEFAULT, "messages": [{"role": "user", "content": "Time in Tokyo?"}], "tools": [WEATHER, TIME],
          "temperature": 0, "max_tokens": 60, "extra_body": {"structured_outputs": forced}}
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"tz"}
    content, calls = "", []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            calls += chunk.choices[0].delta.tool_calls or []
            if chunk.choices[0].finish_reason:
                assert chunk.choices[0].finish_reason == "tool_calls"
    assert content == "Checking." and "<tool_call>" not in content
    assert [c.function.arguments for c in calls] == [call.function.arguments]

    plain = client.chat.completions.create(model=DEFAULT, messages=ASK, tools=[WEATHER], temperature=0,
                                           max_tokens=20, extra_body={"structured_outputs": {"regex": "No tools [a-z]+"}})
    assert plain.choices[0].message.content.startswith("No tools") and not plain.choices[0].message.tool_calls


@pytest.mark.parametrize("kw, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "("}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "structured_outputs"),
])
def test_bad_tool_and_format_fields_are_400s_naming_the_field(client, engine, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT, messages=ASK, max_tokens=4, **kw)
    assert info.value.body["param"] == param
    wait_idle(engine)


def test_constrained_rows_leave_batch_mates_unchanged(engine, tmp_path):
    free = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12, "temperature": 0}
    lines = [{"custom_id": "free-alone", "url": "/v1/chat/completions", "body": free}]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(lines[0]) + "\n")
    asyncio.run(run_batch(engine, src, tmp_path / "alone.jsonl", progress=False))
    mixed = [{"custom_id": f"json-{i}", "url": "/v1/chat/completions",
              "body": {**free, "max_tokens": 200, "response_format": {
                  "type": "json_schema", "json_schema": {"name": "s", "schema": schema_for(i)}}}} for i in range(6)]
    mixed.insert(3, {"custom_id": "free-mixed", "url": "/v1/chat/completions", "body": free})
    mixed.append({"custom_id": "tool", "url": "/v1/chat/completions",
                  "body": {**free, "tools": [TIME], "tool_choice": "required", "max_tokens": 80}})
    src.write_text("".join(json.dumps(x) + "\n" for x in mixed))
    asyncio.run(run_batch(engine, src, tmp_path / "mixed.jsonl", progress=False))
    alone = json.loads((tmp_path / "alone.jsonl").read_text())["response"]["body"]["choices"][0]
    out = {x["custom_id"]: x["response"]["body"] for x in map(json.loads, (tmp_path / "mixed.jsonl").open())}
    assert out["free-mixed"]["choices"][0]["message"] == alone["message"]
    for i in range(6):
        jsonschema.validate(json.loads(out[f"json-{i}"]["choices"][0]["message"]["content"]), schema_for(i))
    assert out["tool"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


@pytest.fixture(scope="module")
def stub(engine):
    admission = Admission()
    admission.client = engine
    srv = GrpcServer(admission)
    with grpc.insecure_channel(srv.target) as channel:
        yield pb_grpc.HerdStub(channel)
    srv.stop()


def test_grpc_chat_tools_round_trip_and_response_schema(stub):
    tools = [pb.Tool(name=t["function"]["name"], description=t["function"]["description"],
                     parameters_json=json.dumps(t["function"]["parameters"])) for t in (WEATHER, TIME)]
    ask = pb.ChatMessage(role="user", content=ASK[0]["content"])
    req = pb.ChatRequest(messages=[ask], tools=tools, tool_choice="get_weather",
                         params=pb.SamplingParams(temperature=0, max_tokens=60))
    (reply,) = list(stub.Chat(req))
    (call,) = reply.choices[0].tool_calls
    assert call.name == "get_weather" and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    streamed = list(stub.Chat(pb.ChatRequest(messages=[ask], tools=tools, tool_choice="get_weather", stream=True,
                                             params=pb.SamplingParams(temperature=0, max_tokens=60))))
    assert [c.arguments for m in streamed for ch in m.choices for c in ch.tool_calls] == [call.arguments]

    history = [ask, pb.ChatMessage(role="assistant", tool_calls=[call]),
               pb.ChatMessage(role="tool", tool_call_id=call.id, content='{"temperature": 21}')]
    (final,) = list(stub.Chat(pb.ChatRequest(messages=history, tools=tools,
                                             params=pb.SamplingParams(temperature=0, max_tokens=20))))
    assert final.choices[0].text and not final.choices[0].tool_calls

    schema = schema_for(3)
    (shaped,) = list(stub.Chat(pb.ChatRequest(
        messages=[ask], params=pb.SamplingParams(temperature=0, max_tokens=200),
        response_format=pb.ResponseFormat(type="json_schema", schema_json=json.dumps(schema)))))
    jsonschema.validate(json.loads(shaped.choices[0].text), schema)

    for bad, field in ((pb.ChatRequest(messages=[ask], tools=tools, tool_choice="nope"), "tool_choice"),
                       (pb.ChatRequest(messages=[ask], tools=[pb.Tool(name="f", parameters_json="{")]),
                        "tools[0].parameters_json"),
                       (pb.ChatRequest(messages=[ask], response_format=pb.ResponseFormat(type="xml")),
                        "response_format.type")):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Chat(bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
