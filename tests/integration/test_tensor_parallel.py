"""Tensor parallelism: a replica of two Ray actors joined by gloo gives what one process gives."""

from __future__ import annotations

import pytest
import ray

from serving.cluster.replica import Replica
from serving.cluster.tensor_parallel import _attention_heads, split_range
from serving.engine import EngineConfig, LLMEngine, SamplingParams
from serving.llm import LLM
from tests.integration.test_engine import _prompts


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_heads_are_dealt_in_whole_groups():
    assert [split_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    # SmolLM2: 9 query heads over 3 KV heads on 2 ranks -> 2 groups and 1 group.
    assert [_attention_heads(9, 3, r, 2) for r in range(2)] == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    # Llama 4 Scout on 8 ranks: one KV head and 5 query heads each.
    assert _attention_heads(40, 8, 3, 8) == ((15, 20), (3, 4))
    # Fewer KV heads than ranks: each KV head on 2 ranks that split its 4 query heads.
    assert [_attention_heads(8, 2, r, 4) for r in range(4)] == [((0, 2), (0, 1)), ((2, 4), (0, 1)),
                                                               ((4, 6), (1, 2)), ((6, 8), (1, 2))]
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _attention_heads(6, 2, 0, 4)


def _compare(replica_outs, alone_outs, atol):
    for got, want in zip(replica_outs, alone_outs, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert g.keys() == w.keys()
            for t in g:
                assert abs(g[t].logprob - w[t].logprob) < atol
        for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            for t in w:
                assert abs(g[t].logprob - w[t].logprob) < atol


def test_tiny_llama4_tp2_equals_one_process(tiny_llama4, tiny_llama4_dir):
    """MoE on every layer (experts split 2 + 2), a NoPE layer, chunked attention, prompts past
    the chunk; two prompts batched, a tiny KV cache."""
    cfg = dict(model=str(tiny_llama4_dir), dtype="float32", block_size=4, num_kv_blocks=40,
               max_num_batched_tokens=16, max_model_len=96)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3, [13, 27, 9])]
    alone = LLM.from_engine(LLMEngine(tiny_llama4, EngineConfig(**cfg))).generate(prompts, params, use_tqdm=False)
    replica = Replica(EngineConfig(**cfg), tensor_parallel_size=2)
    try:
        got = replica.generate(prompts, params)
        assert ray.get(replica.leader.free_blocks.remote()) == (40, 40)
    finally:
        steps = replica.shutdown()
    _compare(got, alone, atol=1e-4)
    assert steps[0] > 0  # the follower ran the steps too


def test_default_model_tp2_equals_one_process(default_fp32):
    """The default model: 9 query heads / 3 KV heads split 6 / 3, tied embeddings split by vocab."""
    cfg = dict(dtype="float32", max_model_len=256, num_kv_blocks=64)
    tok = default_fp32.tokenizer
    prompts = [{"prompt_token_ids": tok.encode_chat([{"role": "user", "content": q}])}
               for q in ("What is the capital of France?", "Name three colours.")]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2, prompt_logprobs=1)
    alone = LLM.from_engine(LLMEngine(default_fp32, EngineConfig(**cfg))).generate(prompts, params, use_tqdm=False)
    replica = Replica(EngineConfig(**cfg), tensor_parallel_size=2)
    try:
        got = replica.generate(prompts, params)
    finally:
        replica.shutdown()
    _compare(got, alone, atol=1e-3)
    assert "Paris" in got[0].outputs[0].text
