"""The gRPC gateway driven by the generated herd.v1 stubs over a real socket."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.herd.v1 import herd_pb2 as pb
from protos.herd.v1 import herd_pb2_grpc as pb_grpc
from serving.api.admission import Admission
from tests.integration.servers import GrpcServer, async_engine, wait_idle

DEFAULT = "SmolLM2-135M-Instruct"
CAPITAL = [pb.ChatMessage(role="user", content="What is the capital of France?")]


@pytest.fixture(scope="module")
def engine(default_fp32):
    eng = async_engine(default_fp32, served_model_name=DEFAULT)
    yield eng
    eng.shutdown()


def _serve(engine, **admission_kw) -> GrpcServer:
    admission = Admission(**admission_kw)
    admission.client = engine
    return GrpcServer(admission)


@pytest.fixture(scope="module")
def server(engine):
    srv = _serve(engine)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.HerdStub(channel)


def greedy(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, **kw)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        list(call())
    return info.value


def test_list_models(stub):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.id for m in models] == [DEFAULT] and models[0].max_model_len == 1024


def test_chat_unary_answers(stub):
    replies = list(stub.Chat(pb.ChatRequest(messages=CAPITAL, params=greedy(max_tokens=24))))
    assert len(replies) == 1
    choice, usage = replies[0].choices[0], replies[0].usage
    assert "Paris" in choice.text and choice.finish_reason in ("stop", "length")
    assert usage.completion_tokens == len(choice.token_ids) > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len(replies[0].prompt_token_ids) == usage.prompt_tokens


def test_generate_stream_matches_unary(stub):
    req = dict(text="The three primary colors are", params=greedy(max_tokens=20, ignore_eos=True))
    whole = list(stub.Generate(pb.GenerateRequest(**req)))[0].choices[0]
    parts = list(stub.Generate(pb.GenerateRequest(stream=True, **req)))
    assert len(parts) > 2
    assert "".join(c.text for p in parts for c in p.choices) == whole.text
    assert [t for p in parts for c in p.choices for t in c.token_ids] == list(whole.token_ids)
    assert parts[-1].choices[-1].finish_reason == "length" and whole.finish_reason == "length"
    assert [p.HasField("usage") for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].usage.completion_tokens == 20
    assert parts[0].prompt_token_ids and not any(p.prompt_token_ids for p in parts[1:])


def test_token_ids_logprobs_and_prompt_logprobs(stub):
    ids = [1, 504, 3458, 282, 4649, 314]
    reply = list(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), params=greedy(max_tokens=4, logprobs=3, prompt_logprobs=2))))[0]
    choice = reply.choices[0]
    assert len(choice.logprobs) == 4
    for tok, lp in zip(choice.token_ids, choice.logprobs):
        assert lp.token_id == tok and len(lp.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert lp.top_logprobs[0].token_id == tok and lp.logprob == pytest.approx(lp.top_logprobs[0].logprob)
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob
    assert [p.token_id for p in reply.prompt_logprobs] == ids[1:]
    assert all(len(p.top_logprobs) == 2 and p.logprob <= 0 for p in reply.prompt_logprobs)


def test_n_samples_are_seeded(stub):
    req = pb.GenerateRequest(text="Once upon a time", params=pb.SamplingParams(
        n=2, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True))
    a, b = (list(stub.Generate(req))[0] for _ in range(2))
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert a.usage.completion_tokens == 16


@pytest.mark.parametrize("request_kw, field", [
    (dict(text="hi", params=pb.SamplingParams(temperature=-1)), "params.temperature"),
    (dict(text="hi", params=pb.SamplingParams(top_p=0)), "params.top_p"),
    (dict(text="hi", params=pb.SamplingParams(logprobs=21)), "params.logprobs"),
    (dict(params=pb.SamplingParams()), "prompt"),
    (dict(text="word " * 2000), "text"),
    (dict(token_ids=pb.TokenIds(ids=[10**6])), "token_ids"),
])
def test_invalid_argument_names_the_field(stub, engine, request_kw, field):
    err = _code(lambda: stub.Generate(pb.GenerateRequest(**request_kw)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(field + ":"), err.details()
    wait_idle(engine)


def test_chat_errors(stub):
    err = _code(lambda: stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in err.details()
    err = _code(lambda: stub.Chat(pb.ChatRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("messages:")
    err = _code(lambda: stub.Chat(pb.ChatRequest(model="nope", messages=CAPITAL)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_aborts_the_engine_request(stub, engine):
    call = stub.Generate(pb.GenerateRequest(text="Count:", stream=True,
                                            params=greedy(max_tokens=500, ignore_eos=True)))
    next(call)
    call.cancel()
    wait_idle(engine)
    assert engine.num_in_flight() == 0


def test_deadline_aborts_the_engine_request(stub, engine):
    err = _code(lambda: stub.Generate(pb.GenerateRequest(text="Count:", params=greedy(max_tokens=500, ignore_eos=True)),
                                      timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(engine)


def test_stats_count_tokens(stub):
    before = stub.GetStats(pb.GetStatsRequest())
    list(stub.Generate(pb.GenerateRequest(text="Hello", params=greedy(max_tokens=3, ignore_eos=True))))
    after = stub.GetStats(pb.GetStatsRequest())
    assert after.generation_tokens - before.generation_tokens == 3
    assert after.num_kv_blocks > 0 and after.num_free_kv_blocks == after.num_kv_blocks
    assert after.requests_in_flight == 0


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "herd.v1.Herd"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"herd.v1.Herd", "grpc.health.v1.Health"} <= names


def test_loading_is_unavailable_and_not_serving():
    loading = GrpcServer(Admission())  # no engine yet: still loading
    try:
        with grpc.insecure_channel(loading.target) as ch:
            err = _code(lambda: pb_grpc.HerdStub(ch).Generate(pb.GenerateRequest(text="hi")))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        loading.stop()


def test_queue_full_is_resource_exhausted(engine):
    full = _serve(engine, max_queued_requests=0)
    try:
        with grpc.insecure_channel(full.target) as ch:
            err = _code(lambda: pb_grpc.HerdStub(ch).Generate(pb.GenerateRequest(text="hi")))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        full.stop()


def test_api_key(engine):
    admission = Admission()
    admission.client = engine
    secured = GrpcServer(admission, api_key="sekret")
    try:
        with grpc.insecure_channel(secured.target) as ch:
            stub = pb_grpc.HerdStub(ch)
            for metadata in (None, [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            err = _code(lambda: stub.Generate(pb.GenerateRequest(text="hi")))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", "Bearer sekret")])
            assert ok.models[0].id == DEFAULT
            # health stays open, as /health does over HTTP
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        secured.stop()
