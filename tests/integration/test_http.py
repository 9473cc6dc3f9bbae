"""The HTTP gateway driven by the official openai client over a real socket."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from serving.api.admission import Admission
from tests.integration.servers import HttpServer, async_engine, wait_idle

DEFAULT = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def engine(default_fp32):
    eng = async_engine(default_fp32, served_model_name=DEFAULT)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    admission = Admission()
    admission.client = engine
    srv = HttpServer(admission, max_body_bytes=200_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [DEFAULT]
    assert client.models.retrieve(DEFAULT).id == DEFAULT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat(client):
    r = client.chat.completions.create(model=DEFAULT, messages=CAPITAL, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_server_timing_reports_the_engine_time(server):
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", json={"model": DEFAULT, "prompt": "Hi", "max_tokens": 3})
    total_ms = (time.perf_counter() - t0) * 1e3
    assert r.status_code == 200
    name, dur = r.headers["server-timing"].split(";dur=")
    assert name == "engine" and 0 < float(dur) < total_ms


def test_chat_parts_developer_role_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model=DEFAULT, temperature=0, max_completion_tokens=3,
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "What is the capital of "},
                                               {"type": "text", "text": "France?"}]}])
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_stream_matches_non_stream(client):
    full = client.chat.completions.create(model=DEFAULT, messages=CAPITAL, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model=DEFAULT, messages=CAPITAL, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_n_seed_logprobs_stop(client):
    args = dict(model=DEFAULT, messages=CAPITAL, temperature=1.0, max_tokens=12, n=3, seed=7,
                logprobs=True, top_logprobs=3)
    a, b = client.chat.completions.create(**args), client.chat.completions.create(**args)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    for choice in a.choices:
        lp = choice.logprobs.content
        assert len(lp) >= 1 and all(len(t.top_logprobs) == 3 for t in lp)
        assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in lp)
    r = client.chat.completions.create(model=DEFAULT, messages=CAPITAL, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_completions_prompt_forms(client):
    tok_ids = [504, 3458, 314]
    r = client.completions.create(model=DEFAULT, prompt=["The sky is", "Once upon a"], max_tokens=5,
                                  temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.usage.completion_tokens == 20
    one = client.completions.create(model=DEFAULT, prompt=tok_ids, max_tokens=4, temperature=0)
    many = client.completions.create(model=DEFAULT, prompt=[tok_ids, tok_ids], max_tokens=4, temperature=0)
    assert one.choices[0].text == many.choices[0].text == many.choices[1].text
    assert one.usage.prompt_tokens == 3


def test_completions_echo_logprobs_best_of(client):
    r = client.completions.create(model=DEFAULT, prompt="The capital of France is", max_tokens=4,
                                  temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith("The capital of France is")
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == c.text
    assert all(t is None or len(t) >= 1 for t in lp.top_logprobs)
    best = client.completions.create(model=DEFAULT, prompt="Hello", max_tokens=4, temperature=1.0, seed=1,
                                     best_of=3, n=1)
    assert len(best.choices) == 1
    ids = client.completions.create(model=DEFAULT, prompt="Hi", max_tokens=2, logprobs=0, temperature=0,
                                    extra_body={"return_tokens_as_token_ids": True})
    assert all(t.startswith("token_id:") for t in ids.choices[0].logprobs.tokens)


def test_completions_stream(client):
    full = client.completions.create(model=DEFAULT, prompt="The sky is", max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=DEFAULT, prompt="The sky is", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_vllm_extra_fields(client):
    r = client.completions.create(model=DEFAULT, prompt="Hi", max_tokens=6, temperature=0,
                                  extra_body={"min_tokens": 6, "ignore_eos": True, "top_k": 5, "min_p": 0.1,
                                              "repetition_penalty": 1.1, "stop_token_ids": [2]})
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"suffix": "x"}}, "suffix"),
    ({"extra_body": {"min_tokens": 9, "max_tokens": 3}}, "min_tokens"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
])
def test_invalid_fields_name_the_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=DEFAULT, prompt="Hi", **kwargs)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_prompt_over_context_is_400_streamed_or_not(client):
    long = "hello " * 1100
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            r = client.chat.completions.create(model=DEFAULT, messages=[{"role": "user", "content": long}],
                                               stream=stream)
            list(r) if stream else None
        assert e.value.body["param"] == "messages" and "context length" in e.value.body["message"]


def test_bad_json_and_body_limit(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", json={"model": DEFAULT, "prompt": "x" * 300_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_disconnect_mid_stream_aborts(server, engine):
    body = {"model": DEFAULT, "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            assert json.loads(next(events)[6:])["choices"][0]["finish_reason"] is None
        assert engine.engine.scheduler.running  # still generating when the client leaves
    wait_idle(engine, timeout=1.0)


def test_disconnect_before_a_non_streamed_reply_aborts(server, engine):
    body = {"model": DEFAULT, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_idle(engine, timeout=1.0)


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"model": DEFAULT, "prompt": "The capital of France is", "max_tokens": 5,
                         "temperature": 0, "logprobs": 2}),
    ("/v1/chat/completions", {"model": DEFAULT, "messages": CAPITAL, "max_tokens": 5, "temperature": 0}),
    ("/v1/completions", {"model": DEFAULT, "prompt": "Hi", "min_tokens": 9, "max_tokens": 3}),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": CAPITAL}),
])
def test_fast_path_and_fastapi_route_reply_alike(server, route, body):
    """An application/json body takes the fast path (fast_path.py); one typed as another JSON
    media type (application/*+json) goes to FastAPI's route. Same status, same body (bar ids
    and timestamps)."""
    data = json.dumps(body).encode()
    fast = httpx.post(server.url + route, content=data, headers={"content-type": "application/json"})
    routed = httpx.post(server.url + route, content=data, headers={"content-type": "application/vnd.herd+json"})

    def comparable(r: httpx.Response) -> dict:
        out = r.json()
        for key in ("id", "created"):
            out.pop(key, None)
        return out
    assert fast.status_code == routed.status_code
    assert comparable(fast) == comparable(routed)


def test_health_and_metrics(server, client):
    client.completions.create(model=DEFAULT, prompt="Hi", max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("herd:num_requests_running", "herd:kv_cache_usage_perc", "herd:prefix_cache_hit_rate",
                 "herd:prompt_tokens_total", "herd:generation_tokens_total", "herd:num_preemptions_total",
                 "herd:time_to_first_token_seconds_bucket", "herd:inter_token_latency_seconds_bucket",
                 "herd:e2e_request_latency_seconds_count"):
        assert name in text
    assert 'herd:http_responses_total{route="/v1/completions",status="200"}' in text


def test_openapi_document_lists_the_routes(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"):
        assert path in doc["paths"]
    assert "400" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_auth_queue_full_and_loading(engine):
    keyed = Admission()
    keyed.client = engine
    srv = HttpServer(keyed, api_key="secret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="secret", max_retries=0)
        assert ok.models.list().data[0].id == DEFAULT
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open
        keyed.max_queued_requests = 0
        with pytest.raises(openai.RateLimitError):
            ok.completions.create(model=DEFAULT, prompt="Hi", max_tokens=2)
        keyed.max_queued_requests = None
        keyed.client = None  # as while the model loads
        with pytest.raises(openai.InternalServerError) as e:
            ok.completions.create(model=DEFAULT, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and httpx.get(srv.url + "/health").status_code == 503
    finally:
        srv.stop()
